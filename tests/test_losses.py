"""lpo.losses: hand-computed values, log 2 at init, clip gradients, ties and weights."""

from __future__ import annotations

import math

import pytest
import torch

from lpo.losses import (
    bradley_terry_loss,
    diffusion_dpo_loss,
    step_dpo_loss,
    pair_gap,
    per_prompt_weights,
    per_sample_mse,
)

LOG2 = math.log(2.0)
T = torch.tensor


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------ Bradley-Terry


def test_bradley_terry_hand_values():
    s0, s1 = torch.tensor([2.0, 2.0]), torch.tensor([0.0, 0.0])
    win0 = bradley_terry_loss(s0[:1], s1[:1], torch.tensor([1.0]), torch.tensor([0.0]))
    win1 = bradley_terry_loss(s0[:1], s1[:1], torch.tensor([0.0]), torch.tensor([1.0]))
    assert win0.item() == pytest.approx(softplus(-2.0), rel=1e-6)  # -log sigmoid(s_w - s_l)
    assert win1.item() == pytest.approx(softplus(2.0), rel=1e-6)
    both = bradley_terry_loss(s0, s1, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert both.item() == pytest.approx((softplus(-2.0) + softplus(2.0)) / 2, rel=1e-6)


def test_bradley_terry_ties_are_symmetric_and_zero_at_equal_scores():
    half = torch.tensor([0.5])
    tie = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), half, half)
    tie_swapped = bradley_terry_loss(torch.tensor([0.0]), torch.tensor([2.0]), half, half)
    # cross-entropy against (0.5, 0.5) + log 0.5 (official "+ log 0.5 if tie")
    expected = 0.5 * (softplus(-2.0) + softplus(2.0)) + math.log(0.5)
    assert tie.item() == pytest.approx(expected, rel=1e-6)
    assert tie.item() == pytest.approx(tie_swapped.item(), rel=1e-6)
    equal = bradley_terry_loss(torch.tensor([1.3]), torch.tensor([1.3]), half, half)
    assert equal.item() == pytest.approx(0.0, abs=1e-7)
    # ... and the tie pulls the scores together: gradient on s0 is positive when s0 > s1.
    s0 = torch.tensor([2.0], requires_grad=True)
    bradley_terry_loss(s0, torch.tensor([0.0]), half, half).backward()
    assert s0.grad.item() > 0


def test_bradley_terry_weights_normalised():
    s0, s1 = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])
    l0, l1 = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])
    per = [softplus(-2.0), softplus(1.0)]
    w = torch.tensor([3.0, 1.0])
    got = bradley_terry_loss(s0, s1, l0, l1, w)
    assert got.item() == pytest.approx((3 * per[0] + per[1]) / 4, rel=1e-6)
    assert bradley_terry_loss(s0, s1, l0, l1, 10 * w).item() == pytest.approx(got.item(), rel=1e-6)


def test_bradley_terry_rejects_bad_labels():
    with pytest.raises(ValueError, match="sum to 1"):
        bradley_terry_loss(torch.zeros(1), torch.zeros(1), torch.tensor([1.0]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="1-D"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3), torch.ones(2), torch.zeros(2))


def test_per_prompt_weights():
    w = per_prompt_weights(["a", "a", "b", "c", "c", "c"])
    expected = torch.tensor([1 / 2, 1 / 2, 1, 1 / 3, 1 / 3, 1 / 3])
    torch.testing.assert_close(w, expected / expected.sum())
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert w[:2].sum().item() == pytest.approx(w[2].item())  # every prompt carries the same total weight
    # dataset-wide counts (official num_examples_per_prompt column)
    w2 = per_prompt_weights(["a", "b"], counts={"a": 4, "b": 1})
    torch.testing.assert_close(w2, torch.tensor([0.2, 0.8]))
    with pytest.raises(ValueError, match="missing"):
        per_prompt_weights(["a", "z"], counts={"a": 1})


def test_pair_gap_is_softmax_difference():
    s_w, s_l = torch.tensor([1.7, 0.2, 3.0]), torch.tensor([0.5, 0.2, -1.0])
    p = torch.softmax(torch.stack([s_w, s_l]), dim=0)  # (2, B)
    torch.testing.assert_close(pair_gap(s_w, s_l), p[0] - p[1])
    assert pair_gap(s_w, s_l)[1].item() == 0.0


# ------------------------------------------------------------------------------------------------ LPO


def test_step_dpo_loss_is_log2_at_init():
    logp = torch.randn(5)
    logp_l = torch.randn(5)
    loss, stats = step_dpo_loss(logp, logp.clone(), logp_l, logp_l.clone(), beta=500.0, clip_eps=0.1)
    assert loss.item() == pytest.approx(LOG2, rel=1e-6)
    assert stats["clipped_frac"].item() == 0.0
    assert stats["implicit_acc"].item() == 0.0  # ties are not "correct"


def test_step_dpo_loss_hand_values():
    beta = 10.0
    # inside the clip range: L = softplus(-beta (lr_w - lr_l))
    loss, stats = step_dpo_loss(T([0.05]), T([0.0]), T([-0.02]), T([0.0]), beta, 0.1)
    assert loss.item() == pytest.approx(softplus(-beta * 0.07), rel=1e-5)
    assert stats["implicit_acc"].item() == 1.0
    assert stats["margin"].item() == pytest.approx(0.7, rel=1e-5)
    # outside: the winner's log-ratio 0.5 is clipped to log 1.1, the loser's -0.5 to log 0.9
    loss, stats = step_dpo_loss(T([0.5]), T([0.0]), T([-0.5]), T([0.0]), beta, 0.1)
    assert loss.item() == pytest.approx(softplus(-beta * (math.log(1.1) - math.log(0.9))), rel=1e-5)
    assert stats["clipped_frac"].item() == 1.0
    assert stats["logratio_w"].item() == pytest.approx(0.5)


def test_lpo_clip_blocks_gradients_outside_the_range():
    # Winner's ratio above 1 + eps and loser's below 1 - eps: the clip blocks any further push.
    logp_w = torch.tensor([0.2, 0.01], requires_grad=True)
    logp_l = torch.tensor([-0.3, -0.01], requires_grad=True)
    ref = torch.zeros(2)
    loss, stats = step_dpo_loss(logp_w, ref, logp_l, ref, beta=500.0, clip_eps=0.1)
    loss.backward()
    assert logp_w.grad[0].item() == 0.0 and logp_l.grad[0].item() == 0.0  # clipped pair: no gradient
    assert logp_w.grad[1].item() < 0 and logp_l.grad[1].item() > 0  # in-range pair: raise w, lower l
    assert stats["clipped_frac"].item() == pytest.approx(0.5)


def test_step_dpo_loss_rejects_bad_hyperparameters():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="clip_eps"):
        step_dpo_loss(z, z, z, z, beta=1.0, clip_eps=1.0)
    with pytest.raises(ValueError, match="beta"):
        step_dpo_loss(z, z, z, z, beta=0.0, clip_eps=0.1)


# ------------------------------------------------------------------------------------------------ Diffusion-DPO


def test_diffusion_dpo_hand_values_and_init():
    err = torch.rand(4)
    err_l = torch.rand(4)
    loss, _ = diffusion_dpo_loss(err, err_l, err.clone(), err_l.clone(), beta=5000.0)
    assert loss.item() == pytest.approx(LOG2, rel=1e-6)
    # inside = -beta/2 ((0.1 - 0.3) - (0.2 - 0.2)) = 1
    loss, stats = diffusion_dpo_loss(T([0.1]), T([0.3]), T([0.2]), T([0.2]), 10.0)
    assert loss.item() == pytest.approx(softplus(-1.0), rel=1e-5)
    assert stats["implicit_acc"].item() == 1.0
    assert stats["inside"].item() == pytest.approx(1.0, rel=1e-5)


def test_diffusion_dpo_gradient_prefers_the_winner():
    err_w = torch.tensor([0.2], requires_grad=True)
    err_l = torch.tensor([0.2], requires_grad=True)
    loss, _ = diffusion_dpo_loss(err_w, err_l, torch.tensor([0.2]), torch.tensor([0.2]), 100.0)
    loss.backward()
    assert err_w.grad.item() > 0 and err_l.grad.item() < 0  # lower the winner's error, raise the loser's


def test_per_sample_mse():
    pred = torch.zeros(2, 3, 2, 2)
    target = torch.ones(2, 3, 2, 2)
    target[1] *= 2
    torch.testing.assert_close(per_sample_mse(pred, target), torch.tensor([1.0, 4.0]))
