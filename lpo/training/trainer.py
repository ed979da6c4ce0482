"""The pair-trainer scaffold shared by train_lrm and train_spm (docs/method.md sections 2 and 5).

A stage supplies its model (the trainable module, its optimiser and parameters), a step function (the
Bradley-Terry loss on one batch of latent pairs: ``StepFn``), a validation function (``ValidateFn``), how to
save its best model, and how to describe a step in the log. ``PairTrainer.fit`` does the rest, the same way
for every stage:

- resume: ``lpo.checkpoint.StepCheckpoints`` under ``<out>/checkpoints`` (step folders, per-process generator
  states, latest.json); a checkpoint of another fingerprint is ignored with a warning;
- the step loop over ``PairLoader.iterate``: the data position of step s is divmod(s, batches_per_rank), its
  randomness a generator seeded by (seed, s, rank) (``step_generator``), so a resumed run ends with the same
  weights as an uninterrupted one (on CPU);
- per-prompt weights (``prompt_weights``, below), the loss, a non-finite check, backward, gradient clip,
  optimiser and LR schedule;
- validation every ``eval_every`` steps and at the last, the best model kept in ``<out>/checkpoints/best``
  (+ best.json), optional early stopping (``patience``);
- log records: ``<out>/train_log.jsonl`` (truncated to the resumed step) and TensorBoard ``<out>/tb``.

Non-finite loss: the flag is summed over the processes before the backward pass, so every process stops at
the same step with the same one-line error (naming the last good checkpoint), and nothing non-finite reaches
the weights; the same for a non-finite gradient norm (except under fp16, whose loss scaler skips those steps).

DDP weighting of the per-prompt weights (a choice; see ``prompt_weights``): the weights are computed over the
GLOBAL batch (the prompt keys gathered over the processes, docs/method.md section 2: "gathered over GPUs"), and each
process's locally normalised loss is scaled to its share of the global weighted sum, so that DDP's gradient
average is the gradient of the global weighted loss: a prompt's weight does not depend on how the batch was
split over processes. Under one process this is per_prompt_weights of the batch, times its sum.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from lpo.checkpoint import StepCheckpoints
from lpo.data.loader import PairLoader
from lpo.losses import per_prompt_weights
from lpo.reward.pairs import pair_correct
from lpo.utils import atomic_dir, write_json

log = logging.getLogger("lpo.training")


# --------------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The generator of one training step on one rank: a pure function of (seed, step, rank)."""
    state = np.random.SeedSequence([seed, 0x1A7, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def local_loss_scale(local_weights: torch.Tensor, world_size: int) -> float:
    """Factor that turns the local weighted mean into this rank's share of the global weighted loss.

    bradley_terry_loss normalises weights locally: L_loc = sum_loc w L / sum_loc w. With w normalised over
    the global batch (per_prompt_weights of the gathered keys, docs/method.md section 2: "gathered over GPUs") and
    DDP averaging gradients over ranks, L_loc * world * sum_loc w has the gradient of sum_global w L.
    """
    return float(world_size * local_weights.sum())


def now(device: torch.device) -> float:
    """perf_counter, after the device's queued work (CUDA) has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timing(seconds: list[float]) -> dict[str, Optional[float]]:
    """Mean / median step time, skipping the first 3 steps (warm-up) when there are enough."""
    s = seconds[3:] if len(seconds) > 6 else seconds
    if not s:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": round(float(np.mean(s)), 5), "median": round(float(np.median(s)), 5), "n": len(s)}


def truncate_log(path: Path, step: int) -> None:
    """Keep the log records of steps <= `step` (a resumed run rewrites what came after its checkpoint); at
    step 0 (a fresh start) none."""
    if not path.is_file():
        return
    if step == 0:
        path.unlink()
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes, as detached CPU copies (frozen parts are never saved)."""
    return {name: p.detach().cpu().clone() for name, p in module.named_parameters() if p.requires_grad}


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor], where: Path,
                         error: type[Exception]) -> None:
    """Copy ``trainable_state`` output back; `error` when the names do not match the module."""
    params = {name: p for name, p in module.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise error(f"{where}: checkpoint does not match the model (missing {missing[:3]}, extra {extra[:3]}); "
                    "delete the checkpoints folder to start over")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))


def sum_over_ranks(accelerator: Any, value: int) -> int:
    """Sum of an integer count over all processes."""
    return int(accelerator.reduce(torch.tensor([float(value)], device=accelerator.device), reduction="sum").item())


def batch_stream(loader: PairLoader, step: int, skipped: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Training batches from global step `step` on: (epoch, batch) = divmod(step, batches_per_rank).

    Adds each finished epoch's count of skipped non-finite samples to skipped["train"]."""
    epoch, start = divmod(step, loader.batches_per_rank)
    for epoch in itertools.count(epoch):
        yield from loader.iterate(epoch, start_batch=start)
        n = loader.last_stats.get("nonfinite_skipped", 0)
        if n:
            log.warning("epoch %d: %d samples with non-finite latents skipped on this rank", epoch, n)
        skipped["train"] += n
        start = 0


# --------------------------------------------------------------------------------------------------------
# What a stage supplies
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepResult:
    """A step function's output: the locally normalised weighted Bradley-Terry loss, the pair scores (B,) each,
    the labels (B, 2), and extra log fields (e.g. t_mean)."""

    loss: torch.Tensor
    s0: torch.Tensor
    s1: torch.Tensor
    labels: torch.Tensor
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# step_fn(batch, generator, weights (B,) on the device) -> StepResult; draws all its randomness from generator
StepFn = Callable[[dict[str, Any], torch.Generator, torch.Tensor], StepResult]
# validate() -> {"acc_by_t": {t: acc}, "metric": float, "n": int, ...}, the same on every process
ValidateFn = Callable[[], dict[str, Any]]


@dataclasses.dataclass
class StepContext:
    """One finished step, for the stage's log record: common values and the step function's result."""

    step: int
    epoch: int
    batch: int
    loss: float
    train_acc: Optional[float]
    grad_norm: Optional[float]
    start: float
    end: float
    out: StepResult


@dataclasses.dataclass
class TrainerSettings:
    name: str  # the stage: logger name, progress bar, config section in messages
    steps: int
    eval_every: int
    checkpoint_every: int
    seed: int
    grad_clip: float
    keep_checkpoints: int = 1
    patience: Optional[int] = None
    early_stopping: bool = False  # track validations without improvement (logged, and with patience: stop)
    mixed_precision: str = "no"
    hint: str = ""  # what to try after a non-finite loss


class RunState:
    """Mutable training state of one run (what a checkpoint stores besides weights and optimiser)."""

    def __init__(self) -> None:
        self.step = 0
        self.best_metric = -math.inf
        self.best_step: Optional[int] = None
        self.best_acc_by_t: Optional[dict[str, float]] = None
        self.evals_since_best = 0
        self.done = False
        self.nonfinite_skipped = {"train": 0, "val": 0}  # samples the loader skipped, summed over ranks
        self.history: list[dict[str, Any]] = []

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# --------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------


class PairTrainer:
    """The training loop of a pair reward model (module docstring). Call ``resume()``, then ``fit()``, then
    ``export_best(path)`` on the main process."""

    def __init__(self, accelerator: Any, settings: TrainerSettings, out_dir: Path, loader: PairLoader,
                 module: torch.nn.Module, optimizer: Any, params: list[torch.nn.Parameter], fingerprint: str,
                 error: type[Exception], step_fn: StepFn, validate_fn: ValidateFn,
                 save_best: Callable[[Path, int, float], None], describe: Callable[[StepContext], dict[str, Any]],
                 lr_scheduler: Any = None, data_desc: str = "the input data") -> None:
        self.accelerator, self.s, self.out_dir, self.loader = accelerator, settings, Path(out_dir), loader
        self.module, self.optimizer, self.params, self.lr_scheduler = module, optimizer, params, lr_scheduler
        self.error, self.step_fn, self.validate_fn = error, step_fn, validate_fn
        self.save_best, self.describe, self.data_desc = save_best, describe, data_desc
        self.is_main, self.rank, self.world = (accelerator.is_main_process, accelerator.process_index,
                                               accelerator.num_processes)
        self.device = accelerator.device
        self.ckpt_root = self.out_dir / "checkpoints"
        self.best_dir = self.ckpt_root / "best"
        self.checkpoints = StepCheckpoints(self.ckpt_root, fingerprint, settings.keep_checkpoints, self.rank,
                                           self.is_main, accelerator.wait_for_everyone)
        self.fingerprint = fingerprint
        self.state = RunState()
        self.resumed_from: Optional[int] = None
        self.step_seconds: list[float] = []
        self.log_path = self.out_dir / "train_log.jsonl"
        self.writer: Any = None
        self.last_ckpt: Optional[Path] = None

    # ---- weighting --------------------------------------------------------------------------------------

    def prompt_weights(self, prompt_keys: list[str]) -> tuple[torch.Tensor, float]:
        """(w (B,) on the device, share): per_prompt_weights over the GLOBAL batch (the keys gathered over the
        processes, concatenated in rank order), this process's slice; and ``local_loss_scale(w, world)``, the
        factor that turns the locally normalised weighted loss into this rank's share of the global one."""
        from accelerate.utils import gather_object

        b = len(prompt_keys)
        all_keys = gather_object(list(prompt_keys)) if self.world > 1 else list(prompt_keys)
        w = per_prompt_weights(all_keys)[self.rank * b:(self.rank + 1) * b].to(self.device)
        return w, local_loss_scale(w, self.world)

    # ---- resume, logging --------------------------------------------------------------------------------

    def resume(self) -> Optional[dict[str, Any]]:
        """Restore weights, optimiser, LR schedule, run state and generators from the newest checkpoint of this
        run; returns the checkpoint's state (a stage may keep more in it) or None. Opens the logs."""
        found = self.checkpoints.resume()
        saved = None
        if found is not None:
            step_dir, saved = found
            load_trainable_state(self.module, saved["trainable"], step_dir, self.error)
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.lr_scheduler is not None:
                self.lr_scheduler.load_state_dict(saved["lr_scheduler"])
            self.state.load(saved["run"])
            self.resumed_from = self.state.step
            self.last_ckpt = step_dir
            log.info("resumed from %s (step %d, epoch %d, batch %d)", step_dir, self.state.step,
                     *divmod(self.state.step, self.loader.batches_per_rank))
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            truncate_log(self.log_path, self.state.step)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=self.state.step)
        return saved

    def log_record(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def scalar(self, tag: str, value: Any) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, self.state.step)

    # ---- validation and checkpoints ---------------------------------------------------------------------

    def evaluate_and_select(self) -> None:
        state, s = self.state, self.s
        result = self.validate_fn()
        if result["metric"] > state.best_metric:
            state.best_metric, state.best_step, state.evals_since_best = result["metric"], state.step, 0
            state.best_acc_by_t = result["acc_by_t"]
            if self.is_main:
                self.save_best(self.best_dir, state.step, result["metric"])
                write_json(self.best_dir / "best.json", {"step": state.step, **result})
            self.accelerator.wait_for_everyone()
        else:
            state.evals_since_best += 1
        if "nonfinite_skipped" in result:
            state.nonfinite_skipped["val"] = result["nonfinite_skipped"]  # the same val samples every time
        entry = {"event": "validation", "step": state.step, **result, "best_step": state.best_step,
                 "best_metric": state.best_metric}
        if s.early_stopping:
            entry["evals_since_best"] = state.evals_since_best
        state.history.append(entry)
        self.log_record(entry)
        for t, acc in result["acc_by_t"].items():
            self.scalar(f"val/acc_t{t}", acc)
        self.scalar("val/metric", result["metric"])
        log.info("%s step %d: val accuracy %s (metric %.3f); best %.3f at step %s; %d validation(s) without "
                 "improvement%s", s.name, state.step, {t: round(a, 3) for t, a in result["acc_by_t"].items()},
                 result["metric"], state.best_metric, state.best_step, state.evals_since_best,
                 f" (patience {s.patience})" if s.patience else "")
        if s.early_stopping and s.patience is not None and state.evals_since_best >= s.patience:
            log.info("early stop: no improvement in %d validations", s.patience)
            state.done = True

    def save_checkpoint(self, extra: Optional[Callable[[], dict[str, Any]]] = None) -> Path:
        def main_state() -> dict[str, Any]:
            epoch, batch_index = divmod(self.state.step, self.loader.batches_per_rank)
            out = {"step": self.state.step, "trainable": trainable_state(self.module),
                   "optimizer": self.optimizer.state_dict(), "run": self.state.as_dict(),
                   "data": {"epoch": epoch, "batch": batch_index}, "world_size": self.world}
            if self.lr_scheduler is not None:
                out["lr_scheduler"] = self.lr_scheduler.state_dict()
            return out

        self.last_ckpt = self.checkpoints.save(self.state.step, main_state)
        return self.last_ckpt

    def nonfinite(self, what: str, value: float) -> Exception:
        """The error that stops training before a non-finite loss or gradient reaches the weights."""
        epoch, batch_index = divmod(self.state.step, self.loader.batches_per_rank)
        self.log_record({"event": f"nonfinite_{what.replace(' ', '_')}", "step": self.state.step + 1,
                         "epoch": epoch, "batch": batch_index})
        latest = self.checkpoints.latest()
        where = f"{self.last_ckpt} (step {latest[1]})" if self.last_ckpt and latest else "none (no checkpoint yet)"
        return self.error(
            f"non-finite {what} ({value}) at step {self.state.step + 1} (epoch {epoch}, batch {batch_index}); "
            f"training stopped without applying it. Last good checkpoint: {where}. {self.s.hint}, or check "
            f"{self.data_desc}"
        )

    # ---- the loop ---------------------------------------------------------------------------------------

    def fit(self, before_step: Callable[[], None] = lambda: None) -> RunState:
        """Train from the current state to ``steps`` (or an early stop); returns the run state.
        `before_step` runs before every step (e.g. putting frozen parts back in eval mode)."""
        s, state, accelerator = self.s, self.state, self.accelerator
        bar = tqdm(total=s.steps, initial=state.step, desc=s.name, disable=not self.is_main, mininterval=5)
        skipped_done = {"train": 0}  # non-finite samples of finished epochs on this rank (live epoch: last_stats)
        batches = batch_stream(self.loader, state.step, skipped_done)
        while state.step < s.steps and not state.done:
            before_step()
            start = now(self.device)
            epoch, batch_index = divmod(state.step, self.loader.batches_per_rank)
            batch = next(batches)
            gen = step_generator(s.seed, state.step, self.rank)
            w, share = self.prompt_weights(batch["prompt_keys"])
            out = self.step_fn(batch, gen, w)
            loss = out.loss * share
            correct, decided = pair_correct(out.s0.detach(), out.s1.detach(), out.labels)
            totals = accelerator.reduce(torch.stack([
                loss.detach().float() / self.world, (~torch.isfinite(loss.detach())).float(),
                correct.float().sum(), decided.float().sum(),
            ]), reduction="sum")
            if totals[1] > 0:  # summed over ranks, so every rank stops at the same step
                raise self.nonfinite("loss", float(totals[0]))
            self.optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(self.params, s.grad_clip) if s.grad_clip > 0 else None
            # fp16's loss scaler skips overflowing steps by itself; otherwise an inf/NaN gradient would poison
            # the weights (the norm is the same on every rank: DDP averaged the gradients)
            if grad_norm is not None and s.mixed_precision != "fp16" and not math.isfinite(float(grad_norm)):
                raise self.nonfinite("gradient norm", float(grad_norm))
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            state.step += 1
            end = now(self.device)
            self.step_seconds.append(end - start)

            record = self.describe(StepContext(
                step=state.step, epoch=epoch, batch=batch_index, loss=float(totals[0]),
                train_acc=float(totals[2] / totals[3]) if totals[3] > 0 else None,
                grad_norm=None if grad_norm is None else float(grad_norm), start=start, end=end, out=out))
            self.log_record(record)
            for key in ("loss", "train_acc", "lr", "logit_scale", "grad_norm"):
                self.scalar(f"train/{key}", record.get(key))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if state.step % s.eval_every == 0 or state.step == s.steps:
                self.evaluate_and_select()
            if state.step % s.checkpoint_every == 0 or state.step == s.steps or state.done:
                self.save_checkpoint()
        bar.close()
        batches.close()
        if not (self.best_dir / "best.json").is_file():  # e.g. deleted by hand after a finished run
            log.warning("%s: no best model saved; validating the final weights as the best", self.best_dir)
            state.best_metric = -math.inf
            self.evaluate_and_select()
            if not (self.best_dir / "best.json").is_file():  # a non-finite metric: keep the final weights
                if self.is_main:
                    self.save_best(self.best_dir, state.step, float("nan"))
                    write_json(self.best_dir / "best.json", {"step": state.step})
                accelerator.wait_for_everyone()
        train_skipped = skipped_done["train"] + self.loader.last_stats.get("nonfinite_skipped", 0)
        state.nonfinite_skipped["train"] += sum_over_ranks(accelerator, train_skipped)
        return state

    @contextlib.contextmanager
    def export_best(self, path: Path) -> Iterator[Path]:
        """The best model copied into a temporary folder (without best.json) that becomes `path` when the block
        exits (lpo.utils.atomic_dir); the stage adds its own files there. Main process only."""
        with atomic_dir(path) as tmp:
            shutil.rmtree(tmp)
            shutil.copytree(self.best_dir, tmp)
            (tmp / "best.json").unlink(missing_ok=True)
            yield tmp

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
