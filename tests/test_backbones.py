"""lpo.backbones: presets build offline, denoise, encode prompts as the stock pipelines do, and round-trip
through diffusers pipeline folders that the stock pipeline classes load with no extra arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from lpo import backbones as B
from lpo.config import BackboneConfig

PROMPTS = ["a red circle on a blue background", "a green square"]
TINY_PRESETS = ["shapes-tiny", "tiny-sd15", "tiny-sdxl"]
STOCK_CLASS = {"shapes": StableDiffusionPipeline, "sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy models on a shared 2-core machine: 2 threads run 10-60x slower than 1 under contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def backbones(one_thread) -> dict[str, B.Backbone]:
    return {name: B.load_backbone(BackboneConfig(preset=name), seed=0) for name in TINY_PRESETS}


@pytest.fixture(scope="module")
def saved(backbones, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {name: bb.save_pipeline(root / name, info={"preset": name}) for name, bb in backbones.items()}


def _sample(pipe, seed: int = 0):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.0, generator=generator, output_type="np").images


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_clip_tokenizer_matches_sd_ids():
    tok = B.build_clip_tokenizer()
    assert len(tok) == 49408
    assert tok("a red circle")["input_ids"] == [49406, 320, 736, 7117, 49407]
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length)["input_ids"]
    assert len(padded) == 77 and padded[5:] == [49407] * 72  # SD1.5 pads with the end token
    tok2 = B.build_clip_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!" (id 0)
    assert tok2("a red circle", padding="max_length", max_length=77)["input_ids"][5:] == [0] * 72


# ---- building, one denoising step ------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_denoising_step(backbones, name):
    bb = backbones[name]
    cond = bb.encode_prompts(PROMPTS)
    null = bb.null_embeds(len(PROMPTS))
    assert cond.hidden_states.shape == null.hidden_states.shape
    assert cond.hidden_states.shape[:2] == (2, bb.text_max_length)
    assert cond.hidden_states.shape[2] == bb.unet.config.cross_attention_dim
    assert not cond.hidden_states.requires_grad
    bb.scheduler.set_timesteps(5)
    t = bb.scheduler.timesteps[0]
    x = torch.randn(2, bb.latent_channels, bb.latent_size, bb.latent_size, generator=torch.Generator().manual_seed(0))
    both = B.PromptEmbeds.cat([null, cond])
    with torch.no_grad():
        eps = bb.unet(
            torch.cat([x, x]), t, encoder_hidden_states=both.hidden_states, added_cond_kwargs=both.added_cond_kwargs()
        ).sample  # (2B, C, h, w)
    eps_null, eps_cond = eps.chunk(2)
    assert not torch.allclose(eps_null, eps_cond)  # the prompt reaches the U-Net
    x_prev = bb.scheduler.step(eps_null + 4.0 * (eps_cond - eps_null), t, x).prev_sample
    assert x_prev.shape == x.shape and torch.isfinite(x_prev).all()


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_encode_prompts_equals_stock_pipeline(backbones, name):
    bb = backbones[name]
    pipe = bb.pipeline()
    cond, null = bb.encode_prompts(PROMPTS), bb.null_embeds(len(PROMPTS))
    kwargs = dict(device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    if bb.is_sdxl:
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, **kwargs)
        torch.testing.assert_close(cond.text_embeds, pooled)
        torch.testing.assert_close(null.text_embeds, neg_pooled)
        assert cond.text_embeds.shape == (2, bb.text_encoder_2.config.projection_dim)
        assert cond.add_time_ids.tolist() == [[64, 64, 0, 0, 64, 64]] * 2
        assert null.hidden_states.abs().max() == 0  # force_zeros_for_empty_prompt
    else:
        emb, neg = pipe.encode_prompt(PROMPTS, **kwargs)
        assert cond.added_cond_kwargs() is None
    torch.testing.assert_close(cond.hidden_states, emb)
    torch.testing.assert_close(null.hidden_states, neg)


def test_shapes_tiny_sizes_and_schedule(backbones):
    bb = backbones["shapes-tiny"]
    assert (bb.kind, bb.resolution, bb.latent_size, bb.text_max_length) == ("shapes", 32, 8, 16)
    assert type(bb.text_encoder).__name__ == "BertModel" and bb.text_encoder.config.hidden_size == 384
    assert not any(p.requires_grad for p in bb.text_encoder.parameters())  # frozen MiniLM
    assert sum(p.numel() for p in bb.unet.parameters()) < 1.5e6
    scheduler = B.shapes_scheduler()
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -50))
    assert bb.train_scheduler.config.beta_schedule == "linear"
    torch.testing.assert_close(bb.train_scheduler.alphas_cumprod, bb.scheduler.alphas_cumprod)


def test_tiny_real_shapes(backbones):
    sd15, sdxl = backbones["tiny-sd15"], backbones["tiny-sdxl"]
    assert len(sd15.unet.down_blocks) == 4 and sd15.resolution == 64
    assert [type(b).__name__ for b in sd15.unet.down_blocks][-1] == "DownBlock2D"
    assert len(sdxl.unet.down_blocks) == 3 and sdxl.unet.config.addition_embed_type == "text_time"
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert sd15.text_encoder.config.eos_token_id == 49407


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = B.build_tiny_sd15(0), B.build_tiny_sd15(0), B.build_tiny_sd15(1)
    assert torch.equal(torch.rand(1), expected)
    wa, wb, wc = (next(iter(m.unet.parameters())) for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_prompt_embeds_helpers(backbones):
    e = backbones["tiny-sdxl"].encode_prompts(PROMPTS)
    rep = e.index(torch.arange(2).repeat_interleave(3))  # each prompt K=3 times
    assert len(rep) == 6 and rep.text_embeds.shape[0] == 6 and rep.add_time_ids.shape == (6, 6)
    with pytest.raises(ValueError, match="mixing"):
        B.PromptEmbeds.cat([e, backbones["tiny-sd15"].encode_prompts(PROMPTS)])


# ---- pipeline folders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_pipeline_folder_roundtrip_with_stock_class(backbones, saved, name):
    bb, folder = backbones[name], saved[name]
    assert (folder / "model_index.json").is_file()
    assert not any(p.name.endswith(".partial") for p in folder.parent.iterdir())
    reloaded = STOCK_CLASS[bb.kind].from_pretrained(folder)  # no extra arguments
    assert type(reloaded.scheduler).__name__ == "DDIMScheduler"
    expected = _sample(bb.pipeline())
    got = _sample(reloaded)
    assert expected.shape == (2, bb.resolution, bb.resolution, 3)
    assert abs(expected - got).max() < 1e-5
    info = json.loads((folder / B.INFO_FILE).read_text())
    assert info["kind"] == bb.kind and info["preset"] == name


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_load_pipeline_folder(backbones, saved, name):
    bb, back = backbones[name], B.load_pipeline_folder(saved[name])
    assert (back.kind, back.resolution, back.text_max_length) == (bb.kind, bb.resolution, bb.text_max_length)
    assert back.scheduler.config.timestep_spacing == bb.scheduler.config.timestep_spacing
    torch.testing.assert_close(back.encode_prompts(PROMPTS).hidden_states, bb.encode_prompts(PROMPTS).hidden_states)
    for p, q in zip(back.unet.parameters(), bb.unet.parameters()):
        assert torch.equal(p, q)


def test_shapes_weights_folder(backbones, tmp_path):
    bb = backbones["shapes-tiny"]
    weights = bb.save_weights(tmp_path / "w")
    assert sorted(p.name for p in weights.iterdir()) == ["unet", "vae"]
    back = B.load_backbone(BackboneConfig(preset="shapes-tiny"), weights=weights)
    for p, q in zip(back.vae.parameters(), bb.vae.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(B.BackboneError, match="unet/config.json missing"):
        B.load_backbone(BackboneConfig(preset="shapes-tiny"), weights=tmp_path)


def test_sd15_and_sdxl_presets_from_local_folders(saved):
    sd15 = B.load_backbone(BackboneConfig(preset="sd15", pretrained=str(saved["tiny-sd15"])))
    assert sd15.kind == "sd15" and isinstance(sd15.scheduler, B.DDIMScheduler)
    folder = str(saved["tiny-sdxl"])
    sdxl = B.load_backbone(BackboneConfig(preset="sdxl", pretrained=folder, vae=folder))  # vae: a pipeline's vae/
    assert sdxl.kind == "sdxl" and sdxl.force_zeros_for_empty_prompt
    with pytest.raises(B.BackboneError, match="holds a sd15 model, but preset is 'sdxl'"):
        B.load_backbone(BackboneConfig(preset="sdxl", pretrained=str(saved["tiny-sd15"])))


# ---- errors ----------------------------------------------------------------------------------------------


def test_missing_local_sd15_folder_is_one_clear_line(tmp_path):
    missing = tmp_path / "no-such-sd15"
    with pytest.raises(B.BackboneError) as info:
        B.load_backbone(BackboneConfig(preset="sd15", pretrained=str(missing)))
    message = str(info.value)
    assert str(missing) in message and "backbone.pretrained" in message and "\n" not in message


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")  # diffusers' own hub call
def test_unreachable_hub_id_is_one_clear_line():
    with pytest.raises(B.BackboneError) as info:  # conftest sets HF_HUB_OFFLINE=1: fails at once
        B.load_backbone(BackboneConfig(preset="sdxl", pretrained="no-such-org/no-such-model"))
    message = str(info.value)
    assert "hub id 'no-such-org/no-such-model'" in message and "\n" not in message


def test_preset_argument_errors(tmp_path):
    with pytest.raises(B.BackboneError, match="backbone.pretrained: required"):
        B.load_backbone(BackboneConfig(preset="sd15"))
    with pytest.raises(B.BackboneError, match="takes no weights"):
        B.load_backbone(BackboneConfig(preset="tiny-sd15"), weights=tmp_path)
    with pytest.raises(B.BackboneError, match="not a diffusers pipeline folder"):
        B.load_backbone(BackboneConfig(preset="sd15", pretrained=str(tmp_path)))
