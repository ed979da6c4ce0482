"""SPO's step-aware pixel reward model (lpo/reward/pixel.py; docs/method.md section 5): scores, SPO's zero-init time
conditioning, gradients into it, save/load, the CLIP kind on a tiny random CLIPModel folder, the one-step x0-hat
noise protocol and the accuracy-by-timestep evaluation. Tiny random models, offline."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from lpo.backbones import build_clip_tokenizer, build_shapes_tiny, build_tiny_sd15
from lpo.config import TrainSpmConfig
from lpo.data.loader import PairLoader
from lpo.reward import pixel as P
from lpo.reward.pixel import SpmError, SpmText, StepAwarePixelModel

sys.path.insert(0, str(Path(__file__).parent))
from latents_helpers import write_toy_latents  # noqa: E402

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def shapes_bb():
    return build_shapes_tiny(0)


def small_spm(bb, **cfg) -> StepAwarePixelModel:
    torch.manual_seed(0)
    return StepAwarePixelModel.from_backbone(bb, TrainSpmConfig(channels=[8, 16], **cfg))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random PickScore-shaped CLIPModel folder (32 px images, 8 px patches), with a CLIP tokenizer."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    path = tmp_path_factory.mktemp("pickscore") / "tiny-clip"
    CLIPModel(config).save_pretrained(path)
    build_clip_tokenizer().save_pretrained(path)
    return path


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------------------------------------
# Pure pieces
# --------------------------------------------------------------------------------------------------------


def test_timestep_embedding_and_modulate():
    emb = P.timestep_embedding(torch.tensor([0, 500, 999]), 8)
    assert emb.shape == (3, 8) and torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert not torch.allclose(emb[1], emb[2])
    x = torch.ones(2, 3, 4, 4)
    out = P.modulate(x, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), torch.tensor([[0.0, 1, 0], [0, 0, 0]]))
    assert out[0, 0].eq(2).all() and out[0, 1].eq(2).all() and out[1].eq(1).all()


def test_clip_contrastive_loss_rewards_matching_pairs_and_treats_equal_captions_alike():
    feats = torch.eye(4)
    ids = torch.arange(4)
    scale = torch.tensor(math.log(10.0))
    aligned = P.clip_contrastive_loss(feats, feats, scale, ids)
    shuffled = P.clip_contrastive_loss(feats, feats[[1, 0, 3, 2]], scale, ids)
    assert aligned < 0.01 < shuffled
    # images 0 and 1 share a caption: either may match either text, the loss cannot tell them apart
    dup = torch.tensor([0, 0, 2, 3])
    swapped = P.clip_contrastive_loss(feats[[1, 0, 2, 3]], feats, scale, dup)
    assert torch.allclose(P.clip_contrastive_loss(feats, feats, scale, dup), swapped)


def test_clip_pixels_map_the_vae_range_to_normalised_clip_input():
    x = P.to_clip_pixels(torch.zeros(1, 3, 16, 16), 32)
    assert x.shape == (1, 3, 32, 32)
    expected = (0.5 - torch.tensor(P.CLIP_MEAN)) / torch.tensor(P.CLIP_STD)
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# The small (shapes) SPM
# --------------------------------------------------------------------------------------------------------


def test_small_spm_scores_are_finite_per_image_and_cacheable_text(shapes_bb):
    spm = small_spm(shapes_bb)
    assert spm.kind == "small" and spm.proj_dim == 384
    x, t = images(4), torch.tensor([0, 10, 500, 999])
    s = spm.score(x, t, PROMPTS * 2)
    assert s.shape == (4,) and torch.isfinite(s).all()
    assert s.abs().max() <= torch.exp(spm.logit_scale) + 1e-4  # exp(logit_scale) x cosine
    cached = spm.encode_text(PROMPTS).repeat_interleave(2)
    swapped = spm.score(x, t, [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]])
    assert torch.allclose(spm.score(x, t, cached), swapped, atol=1e-5)
    assert not any(p.requires_grad for p in spm.text_encoder.parameters())  # frozen MiniLM
    spm.train()
    assert spm.image.training and not spm.text_encoder.training  # no dropout in the frozen text features
    with pytest.raises(ValueError, match="prompts for"):
        spm.score(x, t, PROMPTS)


def test_zero_init_adaln_means_t_has_no_effect_until_trained(shapes_bb):
    spm = small_spm(shapes_bb)
    x = images(3)
    with torch.no_grad():
        at = [spm.score(x, t, PROMPTS[:1] * 3) for t in (0, 250, 999)]
    assert torch.equal(at[0], at[1]) and torch.equal(at[0], at[2])

    # Gradients reach the time conditioning; one step later the score depends on t.
    s = spm.score(x, torch.tensor([0, 500, 999]), PROMPTS[:1] * 3)
    (s * torch.tensor([1.0, -1.0, 2.0])).sum().backward()
    adaln = [m.linear for m in spm.image.modules() if isinstance(m, P._AdaLN)]
    assert len(adaln) == 2 * 2 + 1  # two per block, one on the pooled feature
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in adaln)
    torch.optim.SGD(spm.time_parameters(), lr=1.0).step()
    with torch.no_grad():
        after = [spm.score(x, t, PROMPTS[:1] * 3) for t in (0, 999)]
    assert not torch.allclose(after[0], after[1])


def test_small_spm_round_trip(shapes_bb, tmp_path):
    spm = small_spm(shapes_bb, proj_dim=32)
    with torch.no_grad():  # move the zero-init weights so the round trip checks them too
        for p in spm.time_parameters():
            p.add_(0.01 * torch.randn_like(p))
    spm.save_pretrained(tmp_path / "spm", info={"note": "test"})
    for name in ("spm_config.json", "model.safetensors", "tokenizer/tokenizer_config.json", "train_spm.json"):
        assert (tmp_path / "spm" / name).is_file(), name
    back = StepAwarePixelModel.from_pretrained(tmp_path / "spm")
    x, t = images(2), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(spm.score(x, t, PROMPTS), back.score(x, t, PROMPTS))
    with pytest.raises(SpmError, match="not an SPM folder"):
        StepAwarePixelModel.from_pretrained(tmp_path)


def test_from_backbone_picks_the_kind_and_names_the_config_key(shapes_bb):
    with pytest.raises(SpmError, match="train_spm.pickscore"):
        StepAwarePixelModel.from_backbone(shapes_bb, TrainSpmConfig(pickscore="/some/folder"))
    with pytest.raises(SpmError, match="train_spm.pickscore: required"):
        StepAwarePixelModel.from_backbone(build_tiny_sd15(0), TrainSpmConfig())
    with pytest.raises(SpmError, match="train_spm.channels"):
        small_spm(shapes_bb, pickscore=None).__class__("small", shapes_bb.tokenizer, 16, channels=[],
                                                       text_encoder=shapes_bb.text_encoder)


# --------------------------------------------------------------------------------------------------------
# The CLIP (real worlds) SPM
# --------------------------------------------------------------------------------------------------------


def test_clip_spm_from_a_pickscore_folder(clip_dir, tmp_path):
    torch.manual_seed(0)
    spm = StepAwarePixelModel.from_backbone(build_tiny_sd15(0), TrainSpmConfig(pickscore=str(clip_dir)))
    assert spm.kind == "clip" and spm.proj_dim == 16 and spm.text_max_length == 77
    x = images(2, seed=1) * 0.5  # any input size: resized to the vision tower's 32 px
    x = torch.nn.functional.interpolate(x, size=(24, 24))
    with torch.no_grad():
        s0 = spm.score(x, 0, PROMPTS)
        s1 = spm.score(x, 900, PROMPTS)
        # zero-init adaLN: exactly the CLIP model it started from, for every t
        clip = CLIPModel.from_pretrained(clip_dir).eval()
        tok = build_clip_tokenizer()(PROMPTS, padding="max_length", max_length=77, return_tensors="pt")
        img = clip.get_image_features(pixel_values=P.to_clip_pixels(x, 32)).pooler_output
        txt = clip.get_text_features(**tok).pooler_output
        ref = clip.logit_scale.exp() * torch.nn.functional.cosine_similarity(img, txt)
    assert s0.shape == (2,) and torch.isfinite(s0).all()
    assert torch.equal(s0, s1)
    assert torch.allclose(s0, ref, atol=1e-4)
    # the whole CLIP trains (as SPO fine-tunes PickScore), and the time conditioning gets gradients
    assert any(p.requires_grad for p in spm.clip.text_model.parameters())
    spm.score(x, torch.tensor([10, 600]), PROMPTS).sum().backward()
    mods = list(spm.image.layer_mods) + [spm.image.pool_mod]
    assert all(m.linear.weight.grad.abs().sum() > 0 for m in mods)
    # round trip
    spm.save_pretrained(tmp_path / "spm")
    back = StepAwarePixelModel.from_pretrained(tmp_path / "spm")
    with torch.no_grad():
        assert torch.allclose(back.score(x, 300, PROMPTS), spm.score(x, 300, PROMPTS), atol=1e-6)


def test_clip_folder_without_tokenizer_uses_the_offline_clip_bpe(clip_dir, tmp_path):
    bare = tmp_path / "bare"
    CLIPModel.from_pretrained(clip_dir).save_pretrained(bare)  # weights + config only, as PickScore_v1
    spm = StepAwarePixelModel.from_pickscore(bare)
    assert len(spm.tokenizer) == 49408
    with pytest.raises(SpmError, match="no config.json"):
        StepAwarePixelModel.from_pickscore(tmp_path / "missing")


# --------------------------------------------------------------------------------------------------------
# The noise protocol and the evaluation
# --------------------------------------------------------------------------------------------------------


def test_one_step_x0_hat_shares_noise_and_t_within_a_pair(shapes_bb):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn((2, 1, 4, 8, 8), generator=g).repeat(1, 2, 1, 1, 1)  # both images of a pair equal
    x0[1, 1] += 1.0
    noise = torch.randn((2, 4, 8, 8), generator=g)
    cond, uncond = shapes_bb.encode_prompts(PROMPTS), shapes_bb.null_embeds(1)
    low = P.one_step_x0_hat(shapes_bb, x0, torch.tensor([0, 0]), noise, cond, uncond, 4.0)
    assert low.shape == (2, 2, 4, 8, 8)
    assert torch.equal(low[0, 0], low[0, 1])  # same latent + same noise + same t -> same x0-hat
    assert (low - x0).abs().max() < 0.1  # t = 0: x0-hat is (almost) x0
    high = P.one_step_x0_hat(shapes_bb, x0, torch.tensor([999, 999]), noise, cond, uncond, 4.0)
    assert (high - x0).abs().mean() > 0.3  # t = 999: the model's guess, far from x0
    imgs = P.decoded_x0_hat(shapes_bb, x0, torch.tensor([0, 500]), noise, cond, uncond, 4.0)
    assert imgs.shape == (2, 2, 3, 32, 32) and imgs.abs().max() <= 1.0


def test_pixel_accuracy_by_t_is_deterministic_and_skips_ties(shapes_bb, tmp_path):
    latents = write_toy_latents(tmp_path / "latents", n_train=8, n_val=8, n_test=12)
    loader = PairLoader(latents, "test", 1, shuffle=False)
    spm = small_spm(shapes_bb)
    a = P.pixel_accuracy_by_t(spm, shapes_bb, loader, [500, 0], seed=3, batch_size=5)
    b = P.pixel_accuracy_by_t(spm, shapes_bb, loader, [0, 500], seed=3, batch_size=12)
    assert [e["t"] for e in a] == [0, 500]
    assert a == b  # per-pair noise: batching does not matter
    for entry in a:
        assert entry["n"] == 12 - 1  # toy pair 7 of every 8 is a tie
        assert 0 <= entry["lo"] <= entry["acc"] <= entry["hi"] <= 1
    by_key = P.pixel_correct_by_t(spm, shapes_bb, loader, [0], seed=3)
    assert len(by_key[0]) == 11 and all(isinstance(v, bool) for v in by_key[0].values())


def test_spm_text_helpers():
    text = SpmText(torch.arange(6.0).view(3, 2))
    assert text.repeat_interleave(2).features[:, 0].tolist() == [0, 0, 2, 2, 4, 4]
    assert len(text.index([0, 2])) == 2
