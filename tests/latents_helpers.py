"""Test helpers for the reward-model and DPO stages: toy latent shards in the real format, and a simulated kill."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from lpo.data.shards import write_shards

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a cat", "a dog"]
LONG_CAPTION = "a very long caption " * 40  # > 77 CLIP tokens


def toy_samples(n: int, split: str, seed: int, offset: float = 1.0, nan_at: int | None = None,
                long_caption_at: int | None = None):
    """Pairs whose winner has a +offset mean; every 8th pair is a tie (no offset); 4 prompts."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        means = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
        winner = int(rng.integers(0, 2))
        tie = i % 8 == 7
        if not tie:
            means[winner] += offset
        labels = (0.5, 0.5) if tie else ((1.0, 0.0) if winner == 0 else (0.0, 1.0))
        if i == nan_at:
            means[0, 0, 0, 0] = np.nan
        caption = LONG_CAPTION if i == long_caption_at else PROMPTS[i % len(PROMPTS)]
        std = np.full((4, 8, 8), 0.1, np.float32)
        differ = [["fg"], ["shape"], ["fg", "shape"], []][i % 4]
        yield {"key": f"{split}-r{i:05d}", "mean0": means[0], "std0": std, "mean1": means[1], "std1": std,
               "meta": {"caption": caption, "label_0": labels[0], "label_1": labels[1], "split": split,
                        "prompt_key": f"p{PROMPTS.index(caption) if caption in PROMPTS else 9}",
                        "ranking_id": i, "differ": differ}}


def write_toy_latents(out: Path, n_train: int = 40, n_val: int = 16, n_test: int = 16, shards: int = 2, **kw) -> Path:
    write_shards(toy_samples(n_train, "train", 0, **kw), out, "train", shards)
    write_shards(toy_samples(n_val, "val", 1), out, "val", shards)
    write_shards(toy_samples(n_test, "test", 2), out, "test", shards)
    return out


def dies_in_call(real: Callable[..., Any], n: int) -> Callable[..., Any]:
    """`real`, except that its n-th call raises KeyboardInterrupt (a kill in the middle of a training step)."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    return wrapped


def run_killed(monkeypatch: pytest.MonkeyPatch, module: Any, attr: str, n: int, run: Callable[[], Any]) -> None:
    """Run `run()` with module.<attr> dying in its n-th call, expect the kill, then restore module.<attr>."""
    real = getattr(module, attr)
    monkeypatch.setattr(module, attr, dies_in_call(real, n))
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(module, attr, real)
