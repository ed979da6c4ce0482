"""Tests of lpo/policy.py: LoRA policy through peft, reference = adapters disabled, diffusers-format outputs.

Tiny random backbones (tiny-sd15: CLIP + SD1.5 block layout; shapes-tiny: random U-Net/VAE + the packaged
MiniLM), offline. The LoRA weights are perturbed before saving: a fresh gaussian-init LoRA has B = 0 and would
make every comparison trivially pass.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lpo import backbones
from lpo.config import ConfigError, LoraConfig, OptimizeConfig
from lpo.policy import (
    LORA_WEIGHT_NAME,
    PolicyError,
    build_policy,
    check_policy_config,
    load_checkpoint,
    save_checkpoint,
)

BUILDERS = {"tiny-sd15": backbones.build_tiny_sd15, "shapes-tiny": backbones.build_shapes_tiny}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _cfg(**lora) -> OptimizeConfig:
    return OptimizeConfig(lora=LoraConfig(**{"rank": 4, **lora}))


def _inputs(bb: backbones.Backbone, batch: int = 2, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    c, s = bb.latent_channels, bb.latent_size
    x = torch.randn((batch, c, s, s), generator=g)
    t = torch.tensor([999, 300][:batch])
    ctx = torch.randn((batch, bb.text_max_length, bb.unet.config.cross_attention_dim), generator=g)
    return x, t, ctx


def _out(unet, inputs) -> torch.Tensor:
    x, t, ctx = inputs
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=ctx).sample


def _perturb_lora(policy, seed: int = 1) -> None:
    """Random A and B, as after training (B = 0 at init makes the adapters a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_trainable().items():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_rank_zero_is_rejected_before_touching_the_unet():
    bb = backbones.build_tiny_sd15(0)
    with pytest.raises(ConfigError, match="optimize.lora.rank"):
        check_policy_config(_cfg(rank=0))
    with pytest.raises(PolicyError, match="full_finetune"):
        build_policy(bb, _cfg(rank=0))
    assert not getattr(bb.unet, "_hf_peft_config_loaded", False)  # no adapter was added
    assert all(p.requires_grad for p in bb.unet.parameters())  # and nothing was frozen
    check_policy_config(OptimizeConfig(full_finetune=True, lora=LoraConfig(rank=0)))  # rank unused: fine


def test_unknown_target_modules_are_an_error():
    bb = backbones.build_tiny_sd15(0)
    with pytest.raises(Exception, match="to_nothing"):
        build_policy(bb, _cfg(target_modules=["to_nothing"]))


def test_fresh_lora_policy_equals_base_and_reference_is_base_exactly():
    bb = backbones.build_tiny_sd15(0)
    base = copy.deepcopy(bb.unet)
    inputs = _inputs(bb)
    policy = build_policy(bb, _cfg())
    assert torch.equal(_out(policy.unet, inputs), _out(base, inputs))  # gaussian init: B = 0
    _perturb_lora(policy)
    trained = _out(policy.unet, inputs)
    assert not torch.allclose(trained, _out(base, inputs), atol=1e-4)
    with policy.reference() as ref:
        assert ref is policy.unet  # the same module, no second copy
        assert torch.equal(_out(ref, inputs), _out(base, inputs))
    assert torch.equal(_out(policy.unet, inputs), trained)  # adapters back on after the block


def test_reference_reenables_adapters_after_an_error():
    bb = backbones.build_tiny_sd15(0)
    policy = build_policy(bb, _cfg())
    _perturb_lora(policy)
    inputs = _inputs(bb)
    trained = _out(policy.unet, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        with policy.reference():
            raise RuntimeError("boom")
    assert torch.equal(_out(policy.unet, inputs), trained)


def test_only_lora_parameters_train():
    bb = backbones.build_tiny_sd15(0)
    policy = build_policy(bb, _cfg())
    named = policy.named_trainable()
    assert named and all(".lora_A." in n or ".lora_B." in n for n in named)
    before = {n: p.detach().clone() for n, p in policy.unet.named_parameters()}
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    x, t, ctx = _inputs(bb)
    loss = policy.unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in policy.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(named)
    assert any(".lora_B." in n for n in changed)


@pytest.mark.parametrize("preset", sorted(BUILDERS))
def test_lora_and_merged_folders_load_in_stock_diffusers(preset, tmp_path):
    bb = BUILDERS[preset](0)
    policy = build_policy(bb, _cfg(rank=4, alpha=2.0))  # alpha != rank must survive the round trip
    _perturb_lora(policy)
    inputs = _inputs(bb)
    expected = _out(policy.unet, inputs)

    lora_dir = policy.save_lora(tmp_path / "lora")
    assert (lora_dir / LORA_WEIGHT_NAME).is_file()
    pipe = BUILDERS[preset](0).pipeline()  # the same base weights (same seed), no adapters
    pipe.load_lora_weights(str(lora_dir))
    assert torch.allclose(_out(pipe.unet, inputs), expected, atol=1e-6)

    policy.save_merged(tmp_path / "merged", info={"method": "test"})
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None,
                                                    requires_safety_checker=False)
    assert not any("lora" in n for n, _ in stock.unet.named_parameters())
    assert torch.allclose(_out(stock.unet, inputs), expected, atol=1e-5)
    reloaded = backbones.load_pipeline_folder(tmp_path / "merged")
    assert reloaded.kind == bb.kind
    assert torch.allclose(_out(reloaded.unet, inputs), expected, atol=1e-5)
    # saving did not alter the in-memory policy
    assert torch.equal(_out(policy.unet, inputs), expected)


def test_full_finetune_keeps_a_frozen_reference_copy():
    bb = backbones.build_tiny_sd15(0)
    base = copy.deepcopy(bb.unet)
    policy = build_policy(bb, OptimizeConfig(full_finetune=True))
    assert policy.mode == "full"
    assert len(policy.trainable_parameters()) == len(list(policy.unet.parameters()))
    with torch.no_grad():
        for p in policy.unet.parameters():
            p.add_(0.01)
    inputs = _inputs(bb)
    with policy.reference() as ref:
        assert ref is not policy.unet
        assert torch.equal(_out(ref, inputs), _out(base, inputs))
    with pytest.raises(PolicyError, match="no LoRA"):
        policy.save_lora("unused")


def test_checkpoint_round_trip(tmp_path):
    policy = build_policy(backbones.build_tiny_sd15(0), _cfg())
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    x, t, ctx = _inputs(policy.backbone)
    policy.unet(x, t, encoder_hidden_states=ctx).sample.pow(2).mean().backward()
    opt.step()
    gen = torch.Generator().manual_seed(3)
    save_checkpoint(tmp_path / "state.pt", policy, opt, 7, [gen.get_state()], {"note": 1})
    saved = policy.trainable_state_dict()

    other = build_policy(backbones.build_tiny_sd15(0), _cfg())
    opt2 = torch.optim.AdamW(other.trainable_parameters(), lr=1e-2)
    state = load_checkpoint(tmp_path / "state.pt", other, opt2, world_size=1)
    assert state["iteration"] == 7 and state["extra"] == {"note": 1}
    assert all(torch.equal(saved[n], p) for n, p in other.trainable_state_dict().items())
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(state["rng"][0], gen.get_state())
    with pytest.raises(PolicyError, match="same number of processes"):
        load_checkpoint(tmp_path / "state.pt", other, opt2, world_size=2)
    wrong_rank = build_policy(backbones.build_tiny_sd15(0), _cfg(rank=2))
    with pytest.raises(PolicyError, match="shape|match"):
        load_checkpoint(tmp_path / "state.pt", wrong_rank,
                        torch.optim.AdamW(wrong_rank.trainable_parameters()), world_size=1)
    assert load_checkpoint(tmp_path / "missing.pt", other, opt2, world_size=1) is None
