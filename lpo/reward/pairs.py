"""The LRM's pair machinery, shared by training (lpo.training) and evaluation (eval_lrm), docs/method.md section 2.

``PairScorer`` (the LRM with per-caption text caching, called like a scorer of noisy latents), ``score_pairs``
(both images of every pair at each t, with the evaluation noise ``lpo.diffusion.key_noise``), ``pair_correct``
(pairwise verdicts, ties undecided), ``chunked_batches`` (a batch-1 PairLoader regrouped), ``dedupe`` and
``accuracy_by_t``. The noising itself (``q_sample``, ``noisy_pair``, ``key_noise``) lives in lpo.diffusion.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from lpo.data.loader import PairLoader
from lpo.diffusion import key_noise, noisy_pair
from lpo.reward.lrm import LatentRewardModel, TextEncoding

log = logging.getLogger("lpo.eval_lrm")  # the logger these functions had in lpo.stages.eval_lrm

# A scorer of noisy latents: (x_t (B, C, h, w), t (B,), prompts) -> scores (B,)
ScoreFn = Callable[[torch.Tensor, torch.Tensor, list[str]], torch.Tensor]


def pair_correct(s0: torch.Tensor, s1: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, decided), both (B,) bool: the higher score is the labelled winner; ties (0.5, 0.5) undecided.

    An exact score tie counts as wrong (it picks no winner)."""
    decided = labels[:, 0] != labels[:, 1]
    correct = ((s0 > s1) & (labels[:, 0] > labels[:, 1])) | ((s1 > s0) & (labels[:, 1] > labels[:, 0]))
    return correct & decided, decided


def cat_encodings(parts: Sequence[TextEncoding]) -> TextEncoding:
    """Concatenate text encodings along the batch."""
    pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
    return TextEncoding(
        context=torch.cat([p.context for p in parts]),  # (B, S, D)
        text_feature=torch.cat([p.text_feature for p in parts]),  # (B, F)
        truncated=torch.cat([p.truncated for p in parts]),  # (B,)
        pooled=pooled,
    )


class PairScorer(nn.Module):
    """forward(x_t, t, captions) -> LRM scores (B,), with the text encoding inside forward (so DDP syncs a
    trainable text encoder). A frozen encoder's encodings are cached per caption (LRU, `cache_size`), each
    computed alone, so a cached value never depends on which captions shared its batch (bit-identical resume).
    Truncated captions are collected in `truncated`."""

    def __init__(self, lrm: LatentRewardModel, cache_text: bool, cache_size: int = 4096) -> None:
        super().__init__()
        self.lrm = lrm
        self.cache_text = cache_text
        self.cache_size = cache_size
        self._cache: OrderedDict[str, TextEncoding] = OrderedDict()
        self._null: Optional[TextEncoding] = None
        self.truncated: set[str] = set()

    def _note_truncated(self, captions: Sequence[str], enc: TextEncoding) -> None:
        for caption, cut in zip(captions, enc.truncated.tolist()):
            if cut and caption not in self.truncated:
                self.truncated.add(caption)
                if len(self.truncated) <= 5:
                    log.warning("caption longer than %d tokens, truncated: %.80r", self.lrm.text_max_length, caption)

    def encode(self, captions: list[str]) -> tuple[TextEncoding, Optional[TextEncoding]]:
        needs_null = self.lrm.vfe_scale != 1.0
        if not self.cache_text:  # trained encoder: each distinct caption of the batch once, with gradients
            position = {c: i for i, c in enumerate(dict.fromkeys(captions))}
            unique = list(position)
            enc = self.lrm.encode_text(unique)
            self._note_truncated(unique, enc)
            rows = torch.tensor([position[c] for c in captions], device=enc.context.device)
            return enc[rows], self.lrm.encode_text([""]) if needs_null else None
        with torch.no_grad():
            for caption in dict.fromkeys(captions):  # unique, first-seen order
                if caption in self._cache:
                    self._cache.move_to_end(caption)
                    continue
                enc = self.lrm.encode_text([caption])
                self._note_truncated([caption], enc)
                self._cache[caption] = enc
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            if needs_null and self._null is None:
                self._null = self.lrm.encode_text([""])
            batch = cat_encodings([self._cache[c] for c in captions])
        return batch, self._null

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, captions: list[str]) -> torch.Tensor:
        enc, null = self.encode(captions)
        return self.lrm.score(x_t, t, enc, null)


def chunked_batches(loader: PairLoader, size: int) -> Iterator[dict[str, Any]]:
    """A batch_size-1 PairLoader's samples regrouped into batches of `size` (the last one may be short)."""
    if loader.batch_size != 1:
        raise ValueError("chunked_batches needs a PairLoader with batch_size=1 (so no sample is dropped)")
    singles = loader.iterate(0)
    while True:
        group = list(itertools.islice(singles, size))
        if not group:
            return
        yield {
            "mean": torch.cat([g["mean"] for g in group]),  # (B, 2, C, h, w)
            "std": torch.cat([g["std"] for g in group]),  # (B, 2, C, h, w)
            "labels": torch.cat([g["labels"] for g in group]),  # (B, 2)
            **{key: [v for g in group for v in g[key]] for key in ("captions", "keys", "prompt_keys", "meta")},
        }


@torch.no_grad()
def score_pairs(
    score_fn: ScoreFn,
    loader: PairLoader,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    seed: int,
    batch_size: int,
    device: torch.device,
    desc: str = "score",
    show_progress: bool = True,
) -> list[dict[str, Any]]:
    """Score both images of every pair of `loader` at each timestep, with the training noise protocol.

    Same t for both images, independent noise (posterior and diffusion) per image from ``key_noise(seed, key)``.
    Returns one record per pair: key, prompt_key, caption, labels [l0, l1], meta, scores [[s0, s1] per t].
    """
    records = []
    bar = tqdm(total=len(loader), desc=desc, unit="pair", disable=not show_progress, mininterval=5)
    for batch in chunked_batches(loader, batch_size):
        b = len(batch["keys"])
        noises = [key_noise(seed, k, batch["mean"].shape[2:]) for k in batch["keys"]]
        eps_post = torch.stack([n[0] for n in noises]).to(device)  # (B, 2, C, h, w)
        eps = torch.stack([n[1] for n in noises]).to(device)  # (B, 2, C, h, w)
        mean, std = batch["mean"].to(device), batch["std"].to(device)
        captions = batch["captions"] + batch["captions"]
        per_t = []
        for t in timesteps:
            tt = torch.full((b,), int(t), dtype=torch.int64, device=device)
            x_t = noisy_pair(mean, std, tt, alphas_cumprod, eps_post, eps)  # (B, 2, C, h, w)
            x = torch.cat([x_t[:, 0], x_t[:, 1]])  # (2B, C, h, w): images 0 then images 1
            s = score_fn(x, torch.cat([tt, tt]), captions).float().cpu()  # (2B,)
            per_t.append(torch.stack([s[:b], s[b:]], dim=1))  # (B, 2)
        scores = torch.stack(per_t, dim=1)  # (B, T, 2)
        for i in range(b):
            records.append({
                "key": batch["keys"][i], "prompt_key": batch["prompt_keys"][i], "caption": batch["captions"][i],
                "labels": batch["labels"][i].tolist(), "meta": batch["meta"][i], "scores": scores[i].tolist(),
            })
        bar.update(b)
    bar.close()
    return records


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per pair key (ranks that replay samples to stay in step score some pairs twice)."""
    return list({r["key"]: r for r in records}.values())


def accuracy_by_t(records: list[dict[str, Any]], n_t: int) -> tuple[np.ndarray, np.ndarray]:
    """(correct (P, T) bool, decided (P,) bool) from score records; ties are undecided."""
    scores = torch.tensor([r["scores"] for r in records], dtype=torch.float64).view(len(records), n_t, 2)  # (P, T, 2)
    labels = torch.tensor([r["labels"] for r in records], dtype=torch.float64)  # (P, 2)
    correct = []
    for j in range(n_t):
        c, decided = pair_correct(scores[:, j, 0], scores[:, j, 1], labels)
        correct.append(c)
    return torch.stack(correct, dim=1).numpy(), decided.numpy()
