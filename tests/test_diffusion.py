"""lpo.diffusion: parity of the split DDIM step with diffusers, log-probs, CFG batching."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from lpo.diffusion import (
    StepSplit,
    cfg_noise_pred,
    ddim_sigmas,
    ddim_step_split,
    ddim_timesteps,
    sample_children,
    step_log_prob,
)

SD_KW = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
)


def make_scheduler(spacing: str = "leading", prediction_type: str = "epsilon", **kw) -> DDIMScheduler:
    args = {**SD_KW, "timestep_spacing": spacing, "prediction_type": prediction_type, **kw}
    return DDIMScheduler(**args)


def tiny_unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    extra = {}
    if sdxl:
        # SDXL's conditioning: pooled text embeds (6 here) + 6 time ids, each embedded with 4 channels.
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                     projection_class_embeddings_input_dim=6 + 6 * 4)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(4, 8), layers_per_block=1,
        norm_num_groups=2, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **extra,
    ).eval()


# ------------------------------------------------------------------------------------------------ grid


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_follow_diffusers_grid(spacing):
    sched = make_scheduler(spacing)
    timesteps, prev = ddim_timesteps(sched, 20)
    assert sched.num_inference_steps is None, "the given scheduler must not be mutated"
    ref = make_scheduler(spacing)
    ref.set_timesteps(20)
    assert timesteps.tolist() == ref.timesteps.tolist()
    assert prev[:-1].tolist() == timesteps[1:].tolist() and prev[-1].item() == -1
    if spacing != "linspace":  # evenly spaced grids: identical to diffusers' t - T // N
        expected = [t - 50 if t - 50 >= 0 else -1 for t in timesteps.tolist()]
        assert prev.tolist() == expected
    if spacing == "leading":
        assert timesteps[0].item() == 951 and timesteps[-1].item() == 1  # steps_offset=1
    if spacing == "trailing":
        assert timesteps[0].item() == 999 and timesteps[-1].item() == 49


def test_ddim_sigmas_match_diffusers_variance():
    sched = make_scheduler("trailing")
    timesteps, sigmas = ddim_sigmas(sched, 20, eta=1.0)
    sched.set_timesteps(20)
    ref = torch.stack([sched._get_variance(int(t), int(t) - 50).sqrt() for t in timesteps])
    torch.testing.assert_close(sigmas.float(), ref, rtol=1e-5, atol=1e-7)
    _, zero = ddim_sigmas(sched, 20, eta=0.0)
    assert torch.all(zero == 0)


# ------------------------------------------------------------------------------------------------ step parity


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(
    "spacing,prediction_type,clip_sample",
    [("leading", "epsilon", False), ("trailing", "epsilon", False), ("leading", "v_prediction", False),
     ("trailing", "v_prediction", False), ("leading", "epsilon", True)],
)
def test_step_split_matches_diffusers_step(spacing, prediction_type, clip_sample, eta):
    sched = make_scheduler(spacing, prediction_type, clip_sample=clip_sample)
    timesteps, prev = ddim_timesteps(sched, 20)
    sched.set_timesteps(20)
    gen = torch.Generator().manual_seed(1)
    for i in (0, 7, 19):  # first, middle and last step (last: alpha_prev = final_alpha_cumprod)
        t, t_prev = int(timesteps[i]), int(prev[i])
        x_t = torch.randn(2, 4, 8, 8, generator=gen)
        out = torch.randn(2, 4, 8, 8, generator=gen)
        noise = torch.randn(2, 4, 8, 8, generator=gen)
        split = ddim_step_split(out, x_t, t, t_prev, sched, eta)
        ref = sched.step(out, t, x_t, eta=eta, variance_noise=noise)
        ours = split.mean + split.sigma.view(2, 1, 1, 1) * noise
        torch.testing.assert_close(ours, ref.prev_sample, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(split.x0_hat, ref.pred_original_sample, rtol=1e-5, atol=1e-5)
        assert split.sigma.shape == (2,)
        if eta == 0.0:
            assert torch.all(split.sigma == 0)
        else:
            assert torch.all(split.sigma > 0)


def test_per_sample_timesteps_match_one_by_one():
    sched = make_scheduler("leading")
    sched.set_timesteps(20)
    t = torch.tensor([951, 501, 1])
    t_prev = torch.tensor([901, 451, -1])
    gen = torch.Generator().manual_seed(2)
    x_t, out, noise = (torch.randn(3, 4, 8, 8, generator=gen) for _ in range(3))
    split = ddim_step_split(out, x_t, t, t_prev, sched, 1.0)
    ours = split.mean + split.sigma.view(3, 1, 1, 1) * noise
    for b in range(3):
        ref = sched.step(out[b : b + 1], int(t[b]), x_t[b : b + 1], eta=1.0, variance_noise=noise[b : b + 1])
        torch.testing.assert_close(ours[b : b + 1], ref.prev_sample, rtol=1e-5, atol=1e-5)
    assert len(set(split.sigma.tolist())) == 3  # one sigma per sample


def test_step_split_rejects_bad_input():
    sched = make_scheduler()
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="t_prev must be < t"):
        ddim_step_split(x, x, 501, 551, sched, 1.0)
    with pytest.raises(TypeError, match="integers"):
        ddim_step_split(x, x, 501.0, 451, sched, 1.0)
    with pytest.raises(ValueError, match="shape"):
        ddim_step_split(x, x, torch.tensor([501, 451, 401]), 1, sched, 1.0)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_split(x, x, 501, 451, sched, 1.5)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step_split(x, x, 501, 451, make_scheduler(prediction_type="flow"), 1.0)


# ------------------------------------------------------------------------------------------------ children, log-prob


def _split(batch: int = 2) -> StepSplit:
    sched = make_scheduler()
    gen = torch.Generator().manual_seed(3)
    x_t, out = torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 4, 8, 8, generator=gen)
    return ddim_step_split(out, x_t, torch.tensor([951, 451][:batch]), torch.tensor([901, 401][:batch]), sched, 1.0)


def test_sample_children_shape_and_noise():
    split = _split()
    children = sample_children(split, 4, torch.Generator().manual_seed(5))
    assert children.shape == (2, 4, 4, 8, 8)
    noise = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = split.mean.unsqueeze(1) + split.sigma.view(2, 1, 1, 1, 1) * noise
    torch.testing.assert_close(children, expected)
    assert not torch.allclose(children[:, 0], children[:, 1])  # K different children of one mean


def test_step_log_prob_matches_torch_normal():
    split = _split()
    children = sample_children(split, 3, torch.Generator().manual_seed(6))
    for k in range(3):
        ours = step_log_prob(children[:, k], split.mean, split.sigma)
        normal = torch.distributions.Normal(split.mean, split.sigma.view(2, 1, 1, 1))
        ref = normal.log_prob(children[:, k]).flatten(1).mean(1)
        assert ours.shape == (2,)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # The mean itself is the most likely point.
    at_mean = step_log_prob(split.mean, split.mean, split.sigma)
    assert torch.all(at_mean > step_log_prob(children[:, 0], split.mean, split.sigma))


def test_step_log_prob_needs_positive_sigma():
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="sigma must be > 0"):
        step_log_prob(x, x, torch.tensor([0.1, 0.0]))


# ------------------------------------------------------------------------------------------------ CFG


class _CallCounter:
    def __init__(self, module: torch.nn.Module):
        self.batches: list[int] = []
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.batches.append(args[0].shape[0])


@torch.no_grad()
def test_cfg_noise_pred_is_two_passes_combined_in_one_call():
    unet = tiny_unet()
    calls = _CallCounter(unet)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    cond = torch.randn(3, 5, 8, generator=gen)
    uncond = torch.randn(1, 5, 8, generator=gen)  # one null-prompt embedding for the batch
    t = torch.tensor([951, 501, 1])
    guided = cfg_noise_pred(unet, x, t, cond, uncond, 5.0)
    assert calls.batches == [6], "one U-Net pass over [uncond; cond]"
    e_cond = unet(x, t, encoder_hidden_states=cond).sample
    e_uncond = unet(x, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample
    torch.testing.assert_close(guided, e_uncond + 5.0 * (e_cond - e_uncond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, e_cond, atol=1e-4)

    calls.batches.clear()
    plain = cfg_noise_pred(unet, x, 501, cond, None, 1.0)
    assert calls.batches == [3], "guidance 1 skips the uncond half"
    torch.testing.assert_close(plain, unet(x, 501, encoder_hidden_states=cond).sample, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_cfg_noise_pred_sdxl_added_cond():
    unet = tiny_unet(sdxl=True)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond, uncond = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(2, -1)
    added_cond = {"text_embeds": torch.randn(2, 6, generator=gen), "time_ids": time_ids}
    added_uncond = {"text_embeds": torch.randn(1, 6, generator=gen), "time_ids": time_ids}
    t = torch.tensor([901, 51])
    guided = cfg_noise_pred(unet, x, t, cond, uncond, 3.0, added_cond, added_uncond)
    e_cond = unet(x, t, encoder_hidden_states=cond, added_cond_kwargs=added_cond).sample
    e_uncond = unet(
        x, t, encoder_hidden_states=uncond,
        added_cond_kwargs={"text_embeds": added_uncond["text_embeds"].expand(2, -1), "time_ids": time_ids},
    ).sample
    torch.testing.assert_close(guided, e_uncond + 3.0 * (e_cond - e_uncond), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="together"):
        cfg_noise_pred(unet, x, t, cond, uncond, 3.0, added_cond, None)


# ------------------------------------------------------------------------------------------------ dtypes, devices


def test_half_precision_inputs_are_computed_in_float32():
    sched = make_scheduler()
    gen = torch.Generator().manual_seed(9)
    x32, out32 = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    split16 = ddim_step_split(out32.bfloat16(), x32.bfloat16(), 951, 901, sched, 1.0)
    split32 = ddim_step_split(out32.bfloat16().float(), x32.bfloat16().float(), 951, 901, sched, 1.0)
    assert split16.mean.dtype == torch.float32 and split16.sigma.dtype == torch.float32
    torch.testing.assert_close(split16.mean, split32.mean)  # same as upcasting first
    children = sample_children(split16, 2, torch.Generator().manual_seed(0))
    assert step_log_prob(children[:, 0].bfloat16(), split16.mean, split16.sigma).dtype == torch.float32


@pytest.mark.gpu
def test_cuda_step_with_cpu_generator_matches_cpu():
    split_cpu = _split()
    split_gpu = StepSplit(*(v.cuda() for v in (split_cpu.x0_hat, split_cpu.eps_hat, split_cpu.mean, split_cpu.sigma)))
    c_cpu = sample_children(split_cpu, 4, torch.Generator().manual_seed(1))
    c_gpu = sample_children(split_gpu, 4, torch.Generator().manual_seed(1))  # CPU generator, CUDA tensors
    assert c_gpu.is_cuda
    torch.testing.assert_close(c_gpu.cpu(), c_cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        step_log_prob(c_gpu[:, 0], split_gpu.mean, split_gpu.sigma).cpu(),
        step_log_prob(c_cpu[:, 0], split_cpu.mean, split_cpu.sigma), rtol=1e-5, atol=1e-5,
    )
