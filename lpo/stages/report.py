"""Stage `report`: one markdown report of an experiment, with PNG figures beside it.

    lpo report --config CFG --results results/<name> --out results/<name>/report.md

Reads whatever the experiment has produced and says what is missing instead of failing:
- eval/<model>/metrics.json for base + optimize.methods -> the metrics table with 95% intervals, the paired
  differences vs base, figures/metrics.png (means and intervals) and figures/metrics_table.png;
- eval/<model>/samples.npz (+ per_prompt.jsonl) -> figures/grid.png: rows = prompts, columns = models, the
  same seed (image 0 of each prompt); in shapes a green / red frame and a word = the oracle's exact match or not;
- lrm/accuracy_by_t.png (eval_lrm), spm/reward_models_by_t.png (eval_spm, when SPO is a method) and
  calibration/thresholds.png (calibrate), linked as they are;
- training logs: every *.jsonl under lrm/, spm/ and optimize/<method>/ (one JSON object per line; x = step,
  iteration or epoch, else the line number), or, where a stage wrote none, its TensorBoard scalars (tb/)
  -> figures/training_curves.png; and the scalars of summary.json files;
- benchmarks/*.tsv (Snakemake `benchmark:` files) -> wall and CPU seconds per stage and per method, reward
  model included (LPO = train_lrm + eval_lrm + calibrate + optimize_lpo, SPO = train_spm + optimize_spo,
  DPO = optimize_dpo; docs/method.md section 4, Tab. 6), quality per compute, figures/compute.png.

Every figure in FIGURES is always written (a placeholder that names the missing input when there is no data),
because the Snakemake rule declares them as outputs.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional

import numpy as np

from lpo.config import Config, ConfigError
from lpo.metrics.scorers import display_name
from lpo.methods import METHODS
from lpo.stage_main import stage_main

log = logging.getLogger(__name__)

FIG_DIR = "figures"
FIGURES = ("metrics.png", "metrics_table.png", "grid.png", "training_curves.png", "compute.png")


def uses_spm(methods: list[str]) -> bool:
    """Whether a method of the experiment reads SPO's pixel model (its training log and accuracy plot exist)."""
    return any("spm" in METHODS[m].inputs for m in methods if m in METHODS)


def method_stages(method: str, bench: dict[str, dict]) -> tuple[str, ...]:
    """Stages whose benchmark seconds make up a method's training cost: its reward model's (the registry's
    reward_stages; calibrate gates on eval_lrm, hence both for LPO), sibling_lrm when the experiment ran it and
    the method reads the LRM (it then reads the sibling-trained one), and its optimize run."""
    spec = METHODS.get(method)
    stages = spec.reward_stages if spec is not None else ()
    if spec is not None and "lrm" in spec.inputs and "sibling_lrm" in bench:
        stages = stages + ("sibling_lrm",)
    return stages + (f"optimize_{method}",)

# Absolute metrics in table order, and their column labels; scorer keys get their display names.
METRIC_LABELS: dict[str, str] = {
    "exact": "exact match",
    "fg": "fg colour",
    "bg": "bg colour",
    "shape": "shape",
    "has_object": "has object",
    "quality": "quality",
    "reward": "annotator reward",
    "lrm_score": "LRM score",
}
PAIRED_LABELS: dict[str, str] = {
    "win_rate": "win rate vs base",
    "exact_delta": "Δ exact",
    "fg_delta": "Δ fg",
    "bg_delta": "Δ bg",
    "shape_delta": "Δ shape",
    "reward_delta": "Δ reward",
}
# Panels of figures/metrics.png (those present), in order.
PLOT_METRICS = ("exact", "fg", "bg", "shape", "quality", "win_rate", "exact_delta", "lrm_score")
# Metrics that live in [0, 1] (shares of images, the oracle's quality score, a probability): plotted on 0..1.
UNIT_INTERVAL = frozenset({"exact", "fg", "bg", "shape", "has_object", "quality", "win_rate"})
PANEL_YLABELS: dict[str, str] = {
    "exact": "share of images", "fg": "share of images", "bg": "share of images", "shape": "share of images",
    "has_object": "share of images", "quality": "oracle score (0-1)", "win_rate": "P(preferred to base)",
    "reward": "annotator reward", "lrm_score": "S(p, x_t), unbounded",
}
X_KEYS = ("step", "global_step", "iteration", "iter", "epoch")
MAX_CURVE_ROWS = 8  # logs (one row of panels each) in figures/training_curves.png
CURVES_PER_FILE = 4
# Series that are not training curves (learning-rate schedules and best_* keys are skipped by name too).
SKIP_CURVES = frozenset({"epoch", "batch", "n", "evals_since_best", "nonfinite_skipped", "updates", "seconds"})
SKIP_CURVE_PREFIXES = ("kept_share/",)  # the same counts as kept/, divided by the batch
GROUPED_CURVES = ("kept/",)  # one panel with a line per timestep bin
VALIDATION_KEY = "metric"  # train_lrm / train_spm: the validation accuracy, logged at each evaluation
BENCH_COLUMNS = {"s": "wall_s", "cpu_time": "cpu_s", "max_rss": "max_rss_mb"}


# --------------------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------------------


def read_metrics(results: Path, models: list[str], missing: list[str]) -> dict[str, dict]:
    """eval/<model>/metrics.json for each model that has one (others are noted in `missing`)."""
    out = {}
    for model in models:
        path = results / "eval" / model / "metrics.json"
        if path.is_file():
            out[model] = json.loads(path.read_text())
        else:
            missing.append(f"eval/{model}/metrics.json (model {model} not evaluated)")
    return out


def read_benchmarks(bench_dir: Path) -> dict[str, dict[str, float]]:
    """benchmarks/<stage>.tsv -> {stage: {wall_s, cpu_s, max_rss_mb}}, averaged over repeated rows; "NA" and
    unparsable cells are NaN."""
    out = {}
    for path in sorted(bench_dir.glob("*.tsv")):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if not rows:
            continue
        stats = {}
        for column, key in BENCH_COLUMNS.items():
            vals = [_number(r.get(column)) for r in rows]
            stats[key] = float(np.mean(vals)) if vals else math.nan
        out[path.stem] = stats
    return out


def _number(text: Optional[str]) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSON-lines log and the number of unreadable lines (a killed run may leave half a line)."""
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def curve_series(rows: list[dict]) -> tuple[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(x label, {key: (x, y)}) for every numeric key of a log; x = the first X_KEYS key present, else line no."""
    x_key = next((k for k in X_KEYS if any(k in r for r in rows)), None)
    series: dict[str, tuple[list, list]] = {}
    for n, row in enumerate(rows):
        x = row.get(x_key, n) if x_key else n
        if not _is_number(x):
            continue
        for key, value in row.items():
            if key == x_key or not _is_number(value):
                continue
            xs, ys = series.setdefault(key, ([], []))
            xs.append(float(x))
            ys.append(float(value))
    return x_key or "line", {k: (np.array(x), np.array(y)) for k, (x, y) in series.items()}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _curve_priority(key: str) -> tuple[int, str]:
    """Losses, accuracies, rewards and kept-pair counts first."""
    for rank, word in enumerate(("loss", "acc", "reward", "kept", "margin", "pairs")):
        if word in key:
            return rank, key
    return 99, key


def _is_bookkeeping(key: str) -> bool:
    """Series that are not training curves: schedules, best-so-far records, counters, duplicated shares."""
    leaf = key.rsplit("/", 1)[-1]
    return (leaf in SKIP_CURVES or leaf.startswith("best_") or leaf.endswith("lr")
            or any(key.startswith(p) for p in SKIP_CURVE_PREFIXES))


def curve_panels(series: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[str, list[str]]]:
    """(panel title, series keys) for one log: the CURVES_PER_FILE most telling training curves.

    Every "<prefix>/..." key of a prefix in GROUPED_CURVES shares one panel (e.g. the kept pairs of each
    timestep bin); a validation metric ("metric") is drawn in the training-accuracy panel when there is one.
    """
    keys = [k for k in series if not _is_bookkeeping(k)]
    if not keys:  # an unknown log: show what there is rather than nothing
        keys = list(series)
    val = VALIDATION_KEY if VALIDATION_KEY in keys and len(keys) > 1 else None
    panels: dict[str, list[str]] = {}
    for key in sorted((k for k in keys if k != val), key=_curve_priority):
        group = next((g for g in GROUPED_CURVES if key.startswith(g)), None)
        panels.setdefault(f"{group}* (per timestep bin)" if group else key, []).append(key)
    out = list(panels.items())[:CURVES_PER_FILE]
    if val:
        acc = next((i for i, (_, ks) in enumerate(out) if any("acc" in k for k in ks)), None)
        if acc is None:
            out = (out + [(val, [val])])[:CURVES_PER_FILE]
        else:
            out[acc] = (out[acc][0] + " + validation", out[acc][1] + [val])
    return out


def moving_average(x: np.ndarray, y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average of y over `window` points, with the x of each window's centre."""
    half = (window - 1) // 2
    return x[half: half + len(y) - window + 1], np.convolve(y, np.ones(window) / window, mode="valid")


def training_logs(results: Path, methods: list[str], missing: list[str]) -> list[dict]:
    """Every *.jsonl and summary.json under the training stages' folders, as {stage, path, ...} entries."""
    folders = {"train_lrm": results / "lrm"}
    if uses_spm(methods):
        folders["train_spm"] = results / "spm"
    folders.update({f"optimize_{m}": results / "optimize" / m for m in methods})
    found = []
    for stage, folder in folders.items():
        logs = sorted(folder.rglob("*.jsonl")) if folder.is_dir() else []
        summaries = sorted(folder.rglob("summary.json")) if folder.is_dir() else []
        for path in logs:
            rows, bad = read_jsonl(path)
            x_label, series = curve_series(rows)
            found.append({"stage": stage, "path": path, "kind": "log", "rows": len(rows), "bad": bad,
                          "x": x_label, "series": series})
        if not logs:  # no JSON-lines log: fall back on the stage's TensorBoard scalars
            event_dirs = sorted({p.parent for p in folder.rglob("events.out.tfevents.*")}) if folder.is_dir() else []
            for path in event_dirs:
                series = tensorboard_series(path)
                rows = max((len(x) for x, _ in series.values()), default=0)
                found.append({"stage": stage, "path": path, "kind": "log", "rows": rows, "bad": 0, "x": "step",
                              "series": series, "tb": True})
            if not event_dirs:
                missing.append(f"{folder.relative_to(results)}/**/*.jsonl or tb/ (no training log of {stage})")
        for path in summaries:
            try:
                doc = json.loads(path.read_text())
            except json.JSONDecodeError:
                missing.append(f"{path.relative_to(results)} (not valid JSON)")
                continue
            found.append({"stage": stage, "path": path, "kind": "summary", "scalars": _scalars(doc)})
    return found


def tensorboard_series(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of the scalar events in one TensorBoard folder (the stages' tb/)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0 = keep every point
    events.Reload()
    return {tag: (np.array([e.step for e in events.Scalars(tag)], dtype=float),
                  np.array([e.value for e in events.Scalars(tag)], dtype=float))
            for tag in events.Tags()["scalars"]}


def _scalars(doc, prefix: str = "", depth: int = 0) -> dict[str, float]:
    """Numeric leaves of a JSON document up to two levels deep, as {"a.b": value}."""
    out = {}
    if isinstance(doc, dict) and depth < 2:
        for key, value in doc.items():
            name = f"{prefix}{key}"
            if _is_number(value):
                out[name] = float(value)
            elif isinstance(value, dict):
                out.update(_scalars(value, name + ".", depth + 1))
    return out


# --------------------------------------------------------------------------------------------------------
# Tables (pure: dicts in, markdown rows out)
# --------------------------------------------------------------------------------------------------------


def fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"


def fmt_seconds(value: float) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.1f}"


def fmt_scalar(value: float) -> str:
    """Integers as integers (counts, steps), other numbers as fmt does."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e12 else fmt(value)


def fmt_ci(m: Optional[dict]) -> str:
    """'0.512 [0.448, 0.567]' for a {mean, lo, hi} entry; '-' when absent."""
    if not m:
        return "-"
    return f"{fmt(m['mean'])} [{fmt(m['lo'])}, {fmt(m['hi'])}]"


def metric_label(key: str) -> str:
    return METRIC_LABELS.get(key) or PAIRED_LABELS.get(key) or display_name(key) or key


def table_columns(metrics: dict[str, dict], paired: bool) -> list[str]:
    """Metric keys present in any model, in the report's order: absolute metrics (or paired ones)."""
    present = []
    for doc in metrics.values():
        for key in doc.get("metrics", {}):
            if key not in present:
                present.append(key)
    is_paired = [k for k in present if k in PAIRED_LABELS or k.endswith("_delta")]
    if paired:
        return sorted(is_paired, key=lambda k: list(PAIRED_LABELS).index(k) if k in PAIRED_LABELS else 99)
    absolute = [k for k in present if k not in is_paired]
    order = list(METRIC_LABELS)
    return sorted(absolute, key=lambda k: (order.index(k) if k in order else len(order) - 0.5, k))


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def metrics_rows(metrics: dict[str, dict], columns: list[str]) -> list[list[str]]:
    return [[model] + [fmt_ci(doc["metrics"].get(c)) for c in columns] for model, doc in metrics.items()]


def method_compute(bench: dict[str, dict], methods: list[str]) -> dict[str, dict]:
    """Per method: summed wall and CPU seconds of ``method_stages`` (reward-model training included) and the
    stages without a benchmark file."""
    out = {}
    for method in methods:
        stages = method_stages(method, bench)
        have = [s for s in stages if s in bench]
        out[method] = {
            "stages": list(stages),
            "missing": [s for s in stages if s not in bench],
            "wall_s": float(sum(bench[s]["wall_s"] for s in have)) if have else math.nan,
            "cpu_s": float(sum(bench[s]["cpu_s"] for s in have)) if have else math.nan,
            "per_stage": {s: bench[s]["wall_s"] for s in have},
        }
    return out


def primary_metric(cfg: Config, metrics: dict[str, dict]) -> Optional[str]:
    """evaluate.primary_metric, else exact match (shapes) or the first configured scorer."""
    if cfg.evaluate.primary_metric:
        return cfg.evaluate.primary_metric
    if cfg.experiment.world == "shapes":
        return "exact"
    return next(iter(cfg.evaluate.scorers), None)


def quality_per_compute(metrics: dict[str, dict], compute: dict[str, dict], key: Optional[str]) -> list[dict]:
    """Gain over base of the primary metric per hour of wall and CPU time, for each method with both.

    The gain is the paired difference <key>_delta (with its interval) when evaluate wrote one, else the
    difference of the two means (no interval).
    """
    rows = []
    base = metrics.get("base", {}).get("metrics", {})
    for method, comp in compute.items():
        doc = metrics.get(method, {}).get("metrics", {})
        if key is None or (f"{key}_delta" not in doc and (key not in doc or key not in base)):
            gain = None
        elif f"{key}_delta" in doc:
            gain = dict(doc[f"{key}_delta"])
        else:
            gain = {"mean": doc[key]["mean"] - base[key]["mean"], "lo": math.nan, "hi": math.nan}
        row = {"method": method, "gain": gain, "win_rate": doc.get("win_rate"), **comp}
        for unit, seconds in (("wall_h", comp["wall_s"]), ("cpu_h", comp["cpu_s"])):
            hours = seconds / 3600 if math.isfinite(seconds) and seconds > 0 else math.nan
            row[unit] = hours
            row[f"gain_per_{unit}"] = (
                {k: gain[k] / hours for k in ("mean", "lo", "hi")} if gain and math.isfinite(hours) else None
            )
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def placeholder(path: Path, title: str, message: str) -> None:
    """A small figure that says what is missing (declared rule outputs must always exist)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 1.6))
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.4, "\n".join(textwrap.wrap(message, 80)), ha="center", va="center", fontsize=9, color="0.3")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_metrics(path: Path, metrics: dict[str, dict], keys: list[str]) -> bool:
    """One panel per metric: each model's mean and 95% interval (chance / no-change lines where meaningful).

    Metrics bounded in [0, 1] get the full 0..1 axis so that small differences are not blown up; paired
    metrics (win rate, deltas) leave out the base model, which is 0.5 / 0 against itself by construction.
    """
    keys = [k for k in keys if any(k in d["metrics"] for d in metrics.values())]
    if not keys:
        return False
    plt = _plt()
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.7 * rows), squeeze=False)
    models = list(metrics)
    for ax, key in zip(axes.flat, keys):
        paired = key in PAIRED_LABELS or key.endswith("_delta")
        for x, model in enumerate(models):
            m = metrics[model]["metrics"].get(key)
            if m is None or (paired and model == "base"):
                continue
            err = [[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]]
            ax.errorbar([x], [m["mean"]], yerr=err, fmt="o", capsize=4, color=f"C{x}")
        if key == "win_rate":
            ax.axhline(0.5, ls="--", color="0.5", lw=1)
        if key.endswith("_delta"):
            ax.axhline(0.0, ls="--", color="0.5", lw=1)
        if key in UNIT_INTERVAL:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(range(len(models)), models)
        ax.set_xlim(-0.5, len(models) - 0.5)
        ax.set_title(metric_label(key), fontsize=10)
        ax.set_ylabel(PANEL_YLABELS.get(key, "delta vs base" if key.endswith("_delta") else "mean"), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    any_doc = next(iter(metrics.values()))
    fig.suptitle(f"Held-out test prompts ({any_doc.get('n_prompts')} prompts x {any_doc.get('images_per_prompt')} "
                 "images): mean and 95% bootstrap interval over prompts; dashed = no change vs base", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_table(path: Path, blocks: list[tuple[str, list[str], list[list[str]]]]) -> bool:
    """Metrics tables as one image, a titled table per block (title, header, rows), stacked.

    For `snakemake --report`, which shows figures, not the markdown. Font and cell sizes are set for a reader
    who sees the image scaled to the width of a browser window (about 1,000 px).
    """
    blocks = [b for b in blocks if b[2]]
    if not blocks:
        return False
    plt = _plt()
    col_w, row_h, title_h = 1.4, 0.45, 0.45  # inches per column / table row / block title
    width = max(col_w * len(header) for _, header, _ in blocks)
    heights = [title_h + row_h * (len(rows) + 1) for _, _, rows in blocks]
    fig = plt.figure(figsize=(width, sum(heights) + 0.1))
    top = 1.0
    for (title, header, rows), h in zip(blocks, heights):
        frac = h / (sum(heights) + 0.1)
        table_w = col_w * len(header) / width
        ax = fig.add_axes((0.0, top - frac, table_w, frac - title_h / (sum(heights) + 0.1)))
        ax.axis("off")
        wrapped = ["\n".join(textwrap.wrap(c, 14)) for c in header]
        cells = [[c.replace(" [", "\n[") for c in row] for row in rows]
        table = ax.table(cellText=cells, colLabels=wrapped, cellLoc="center", bbox=(0, 0, 1, 1))
        table.auto_set_font_size(False)
        table.set_fontsize(10)
        for (r, c), cell in table.get_celld().items():
            if r == 0 or c == 0:
                cell.set_text_props(weight="bold")
                cell.set_facecolor("0.92")
        fig.text(0.005, top - 0.5 * title_h / (sum(heights) + 0.1), title, fontsize=11, va="center")
        top -= frac
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return True


def load_samples(results: Path, models: list[str], missing: list[str]) -> dict[str, dict]:
    """eval/<model>/samples.npz (+ image-0 exact match from per_prompt.jsonl) for the models that have them."""
    out = {}
    for model in models:
        path = results / "eval" / model / "samples.npz"
        if not path.is_file():
            missing.append(f"eval/{model}/samples.npz (no images of {model} for the grid)")
            continue
        with np.load(path, allow_pickle=False) as data:
            entry = {"images": data["images"], "prompts": [str(p) for p in data["prompts"]]}
        per_prompt = path.with_name("per_prompt.jsonl")
        if per_prompt.is_file():
            rows, _ = read_jsonl(per_prompt)
            entry["exact"] = [r.get("values", {}).get("exact", [None])[0] for r in rows]
        out[model] = entry
    return out


def plot_grid(path: Path, samples: dict[str, dict], n_rows: int, notes: list[str]) -> bool:
    """Rows = prompts, columns = models, image 0 (the same seed) of each; frame and word = exact match (shapes).

    The oracle's verdict is drawn twice: a coloured frame around the axes and a word under the image, so that it
    is readable without colour vision and is not mistaken for a border the model itself painted.
    """
    if not samples or n_rows < 1:
        return False
    ref_model = next(iter(samples))
    ref = samples[ref_model]["prompts"]
    models = []
    for model, entry in samples.items():
        k = min(len(ref), len(entry["prompts"]))
        if entry["prompts"][:k] != ref[:k]:
            notes.append(f"grid: {model} was evaluated on other prompts than {ref_model}; left out")
            continue
        models.append(model)
    n_rows = min([n_rows] + [len(samples[m]["prompts"]) for m in models])
    if n_rows < 1:
        return False
    judged = any(samples[m].get("exact") for m in models)
    plt = _plt()
    row_h = 1.75 if judged else 1.5  # inches; room for the verdict under each image
    fig, axes = plt.subplots(n_rows, len(models), figsize=(1.6 * len(models) + 2.4, row_h * n_rows), squeeze=False)
    for r in range(n_rows):
        for c, model in enumerate(models):
            ax = axes[r, c]
            ax.imshow(samples[model]["images"][r, 0], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            exact = samples[model].get("exact", [])
            if r < len(exact) and exact[r] is not None:
                match = exact[r] >= 0.5
                colour = "tab:green" if match else "tab:red"
                for spine in ax.spines.values():
                    spine.set_edgecolor(colour)
                    spine.set_linewidth(4)
                ax.set_xlabel("exact match" if match else "no match", fontsize=8, color=colour, labelpad=2,
                              weight="bold" if match else "normal")
            if r == 0:
                ax.set_title(model, fontsize=10)
            if c == 0:
                ax.set_ylabel("\n".join(textwrap.wrap(ref[r], 22)), rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_curves(path: Path, logs: list[dict]) -> bool:
    """One row of panels per training log (at most MAX_CURVE_ROWS), its curve_panels in the columns."""
    rows = [(entry, curve_panels(entry["series"])) for entry in logs if entry["kind"] == "log"]
    rows = [(entry, panels) for entry, panels in rows if panels][:MAX_CURVE_ROWS]
    if not rows:
        return False
    plt = _plt()
    cols = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(3.5 * cols, 2.6 * len(rows)), squeeze=False)
    for r, (entry, panels) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            if c >= len(panels):
                ax.axis("off")
                continue
            title, keys = panels[c]
            for k, key in enumerate(keys):
                x, y = entry["series"][key]
                colour = f"C{k}" if len(keys) > 1 else "C0"
                if key == VALIDATION_KEY:  # a few evaluations: markers, not a noisy line
                    ax.plot(x, y, "s-", ms=4, lw=1, color="C3", label="validation")
                    continue
                label = key.rsplit("/", 1)[-1] if len(keys) > 1 else None
                smooth = len(y) > 50
                ax.plot(x, y, lw=0.8, alpha=0.35 if smooth else 1.0, color=colour, marker="" if len(y) > 30 else ".",
                        label=None if smooth else label)
                if smooth:  # a centred moving average shows the trend through noisy per-step values
                    trend = colour if len(keys) > 1 else "C1"
                    ax.plot(*moving_average(x, y, max(5, len(y) // 25)), lw=1.6, color=trend, label=label)
            if len(keys) > 1:
                ax.legend(fontsize=8, loc="best")
            ax.set_title(f"{entry['stage']}: {title}", fontsize=10)
            ax.set_xlabel(entry["x"], fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_compute(path: Path, compute: dict[str, dict]) -> bool:
    """Stacked wall-clock seconds per method, one segment per stage (reward-model training included)."""
    methods = [m for m, c in compute.items() if c["per_stage"]]
    if not methods:
        return False
    plt = _plt()
    stages = list(dict.fromkeys(s for m in methods for s in compute[m]["stages"]))  # reward model first
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(methods) + 1.4))
    labelled: set[str] = set()
    for y, method in enumerate(methods):
        left = 0.0
        for stage in compute[method]["stages"]:
            sec = compute[method]["per_stage"].get(stage)
            if sec is None or not math.isfinite(sec):
                continue
            ax.barh(y, sec, left=left, color=f"C{stages.index(stage)}", label=None if stage in labelled else stage)
            labelled.add(stage)
            left += sec
        cpu = compute[method]["cpu_s"]
        ax.text(left, y, f" {left:.0f} s wall, {cpu:.0f} s CPU", va="center", fontsize=8)
    ax.set_xlim(0, 1.35 * max(sum(compute[m]["per_stage"].values()) for m in methods))
    ax.invert_yaxis()  # methods top to bottom in config order
    # below the axes: inside, it would cover the bar of whichever method is longest at the bottom
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(4, len(stages)), frameon=False)
    ax.set_yticks(range(len(methods)), [m.upper() for m in methods])
    ax.set_xlabel("wall-clock seconds (Snakemake benchmark)")
    ax.set_title("Training cost per method, reward model included", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend below the axes
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------------------


def _link(path: Path, base: Path) -> str:
    return os.path.relpath(path, base).replace(os.sep, "/")


def run(cfg: Config, results_dir: Path, out_path: Path) -> dict:
    """Write out_path (markdown) and FIGURES into out_path's folder/figures; return what was found and missed."""
    results, out_path = Path(results_dir), Path(out_path)
    if not results.is_dir():
        raise ConfigError(f"--results {results}: folder not found")
    here = out_path.parent
    fig_dir = here / FIG_DIR
    fig_dir.mkdir(parents=True, exist_ok=True)
    methods = list(cfg.optimize.methods)
    models = ["base"] + methods
    missing: list[str] = []
    notes: list[str] = []
    drawn: dict[str, bool] = {}
    md: list[str] = [f"# Report: {cfg.experiment.name}", ""]
    md.append(f"World `{cfg.experiment.world}`, backbone `{cfg.backbone.preset}`, seed {cfg.experiment.seed}; "
              f"models: {', '.join(models)}.")

    # ---- metrics ----
    metrics = read_metrics(results, models, missing)
    md += ["", "## Metrics on held-out prompts", ""]
    if metrics:
        any_doc = next(iter(metrics.values()))
        md.append(f"{any_doc.get('n_prompts')} test prompts x {any_doc.get('images_per_prompt')} images, the same "
                  f"seeds for every model; DDIM {any_doc.get('sampling', {}).get('ddim_steps')} steps, eta 0, CFG "
                  f"{any_doc.get('sampling', {}).get('cfg')}. Mean [95% bootstrap interval over prompts].")
        absolute, paired = table_columns(metrics, paired=False), table_columns(metrics, paired=True)
        header = ["model"] + [metric_label(c) for c in absolute]
        md += ["", markdown_table(header, metrics_rows(metrics, absolute))]
        if "lrm_score" in absolute:
            md += ["", "LRM score: the latent reward model's mean score of the final latents at the lowest DDIM "
                       "timestep; it is optimised by LPO, so it measures progress on the proxy, not quality."]
        if paired:
            md += ["", "### Against the base model (same prompts and seeds)", "",
                   "Win rate = the annotator's expected preference sigmoid((r_model - r_base) / tau) (0.5 = no "
                   "change); Δ = paired per-image difference model - base, resampled by prompt.", ""]
            md.append(markdown_table(["model"] + [metric_label(c) for c in paired], metrics_rows(metrics, paired)))
        drawn["metrics.png"] = plot_metrics(fig_dir / "metrics.png", metrics,
                                            list(PLOT_METRICS) + list(cfg.evaluate.scorers))
        # the base model against itself is 0.5 / 0 by construction: left out of the paired image table
        versus_base = {m: d for m, d in metrics.items() if m != "base"}
        drawn["metrics_table.png"] = plot_table(fig_dir / "metrics_table.png", [
            ("Held-out metrics: mean [95% bootstrap interval over prompts]",
             ["model"] + [metric_label(c) for c in absolute], metrics_rows(metrics, absolute)),
            ("Against the base model, same prompts and seeds (win rate: 0.5 = no change; Δ: model - base)",
             ["model"] + [metric_label(c) for c in paired], metrics_rows(versus_base, paired)),
        ])
        if drawn["metrics.png"]:
            md += ["", f"![metrics]({_link(fig_dir / 'metrics.png', here)})"]
    else:
        md.append("No model has been evaluated yet (no eval/<model>/metrics.json).")
    for name in ("metrics.png", "metrics_table.png"):
        if not drawn.get(name):
            placeholder(fig_dir / name, "Metrics", "no eval/<model>/metrics.json with plottable metrics")

    # ---- image grid ----
    md += ["", "## Samples", ""]
    samples = load_samples(results, models, missing)
    if plot_grid(fig_dir / "grid.png", samples, cfg.evaluate.grid_prompts, notes):
        frame = " Frame: green = the oracle's exact match, red = not." if cfg.experiment.world == "shapes" else ""
        md.append(f"Rows = test prompts, columns = models, the same seed (image 0 of each prompt).{frame}")
        md += ["", f"![samples]({_link(fig_dir / 'grid.png', here)})"]
    else:
        md.append("No samples to show (no eval/<model>/samples.npz, or evaluate.grid_prompts is 0).")
        placeholder(fig_dir / "grid.png", "Samples", "no eval/<model>/samples.npz found")

    # ---- reward model and thresholds ----
    md += ["", "## Latent reward model and thresholds", ""]
    stage_plots = [("lrm/accuracy_by_t.png", "LRM accuracy by timestep (eval_lrm)")]
    if uses_spm(methods):
        stage_plots.append(("spm/reward_models_by_t.png", "LRM vs SPO's pixel model by timestep (eval_spm)"))
    stage_plots.append(("calibration/thresholds.png", "Thresholds th(t) (calibrate)"))
    for rel, what in stage_plots:
        if (results / rel).is_file():
            md += [f"{what}:", "", f"![{what}]({_link(results / rel, here)})", ""]
        else:
            missing.append(f"{rel} ({what})")
            md += [f"{what}: not produced yet ({rel} missing).", ""]
    accuracy = results / "lrm" / "accuracy.json"
    if accuracy.is_file():
        scalars = _scalars(json.loads(accuracy.read_text()))
        if scalars:
            rows = [[k, fmt_scalar(v)] for k, v in list(scalars.items())[:20]]
            md += [markdown_table(["lrm/accuracy.json", "value"], rows)]

    # ---- training curves ----
    md += ["", "## Training curves", ""]
    logs = training_logs(results, methods, missing)
    if plot_curves(fig_dir / "training_curves.png", logs):
        used = [f"`{_link(e['path'], results)}` ({e['rows']} " + ("TensorBoard points" if e.get("tb") else "rows")
                + (f", {e['bad']} unreadable" if e["bad"] else "") + ")" for e in logs if e["kind"] == "log"]
        md += ["From " + ", ".join(used) + ".", "",
               f"![training curves]({_link(fig_dir / 'training_curves.png', here)})"]
    else:
        md.append("No training logs found (*.jsonl or tb/ under lrm/, spm/, optimize/<method>/).")
        placeholder(fig_dir / "training_curves.png", "Training curves", "no *.jsonl or TensorBoard training logs")
    for entry in (e for e in logs if e["kind"] == "summary" and e["scalars"]):
        rows = [[k, fmt_scalar(v)] for k, v in list(entry["scalars"].items())[:15]]
        md += ["", markdown_table([f"`{_link(entry['path'], results)}`", "value"], rows)]

    # ---- compute ----
    md += ["", "## Compute", ""]
    bench = read_benchmarks(results / "benchmarks")
    compute = method_compute(bench, methods)
    if bench:
        rows = [[stage, fmt_seconds(b["wall_s"]), fmt_seconds(b["cpu_s"]), fmt_seconds(b["max_rss_mb"])]
                for stage, b in bench.items()]
        md += ["Per stage (Snakemake benchmark files, benchmarks/*.tsv):", "",
               markdown_table(["stage", "wall s", "CPU s", "max RSS MB"], rows), ""]
        rows = [[m.upper(), " + ".join(c["stages"]), fmt_seconds(c["wall_s"]), fmt_seconds(c["cpu_s"]),
                 ", ".join(c["missing"]) or "-"] for m, c in compute.items()]
        md += ["Per method, reward-model training included (as the paper's Tab. 6):", "",
               markdown_table(["method", "stages", "wall s", "CPU s", "missing"], rows)]
        key = primary_metric(cfg, metrics)
        qpc = quality_per_compute(metrics, compute, key)
        if key is not None and any(m in metrics for m in methods) and not any(r["gain"] for r in qpc):
            notes.append(f"quality per compute: metric {key!r} (evaluate.primary_metric) not found in the methods' "
                         "metrics.json")
        if key is not None and any(r["gain"] for r in qpc):
            rows = [[r["method"].upper(), fmt_ci(r["gain"]), fmt_ci(r["win_rate"]), fmt(r["wall_h"]),
                     fmt_ci(r["gain_per_wall_h"]), fmt_ci(r["gain_per_cpu_h"])] for r in qpc]
            md += ["", f"Quality per compute: gain in {metric_label(key)} over base per hour of training.", "",
                   markdown_table(["method", f"Δ {metric_label(key)}", "win rate", "wall h", "Δ per wall h",
                                   "Δ per CPU h"], rows)]
        if plot_compute(fig_dir / "compute.png", compute):
            md += ["", f"![compute]({_link(fig_dir / 'compute.png', here)})"]
        else:
            placeholder(fig_dir / "compute.png", "Compute", "no benchmark of a training stage found")
    else:
        missing.append("benchmarks/*.tsv (no Snakemake benchmark files)")
        md.append("No Snakemake benchmark files (benchmarks/*.tsv): run the workflow through Snakemake.")
        placeholder(fig_dir / "compute.png", "Compute", "no benchmarks/*.tsv found")

    # ---- missing inputs ----
    md += ["", "## Missing inputs", ""]
    md += [f"- {m}" for m in missing + notes] if missing or notes else ["Nothing missing."]
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, out_path)
    log.info("report -> %s (%d models evaluated, %d missing inputs)", out_path, len(metrics), len(missing))
    return {"out": str(out_path), "models": list(metrics), "missing": missing, "notes": notes,
            "figures": [str(fig_dir / f) for f in FIGURES]}


def main(argv: Optional[list[str]] = None) -> int:
    def arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--results", required=True, metavar="DIR", help="the experiment's folder, results/<name>")

    return stage_main("report", __doc__, lambda cfg, a: run(cfg, Path(a.results), Path(a.out)), argv,
                      out=("PATH", "markdown file (results/<name>/report.md)"), arguments=arguments, summary_keys=())


if __name__ == "__main__":
    sys.exit(main())
