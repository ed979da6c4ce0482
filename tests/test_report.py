"""Stage `report` on a fake results folder: tables, links, figures, compute; missing inputs handled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lpo.config import from_dict
from lpo.stages import report

BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"
PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a black triangle on a "
           "yellow background"]


def _ci(mean: float, half: float = 0.05) -> dict:
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": 6, "groups": 3}


def fake_eval(results: Path, model: str, exact: float, win: float, prompts=PROMPTS, seed: int = 0) -> None:
    out = results / "eval" / model
    out.mkdir(parents=True)
    metrics = {"exact": _ci(exact), "fg": _ci(0.6), "bg": _ci(0.5), "shape": _ci(0.4), "quality": _ci(0.7),
               "reward": _ci(1.0), "win_rate": _ci(win), "exact_delta": _ci(exact - 0.2), "lrm_score": _ci(1.5)}
    doc = {"model": model, "n_prompts": len(prompts), "images_per_prompt": 2,
           "sampling": {"ddim_steps": 20, "cfg": 4.0, "eta": 0.0}, "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(doc))
    rng = np.random.default_rng(seed)
    np.savez(out / "samples.npz", images=rng.integers(0, 256, (len(prompts), 2, 32, 32, 3), dtype=np.uint8),
             prompts=np.array(prompts))
    rows = [{"index": i, "prompt": p, "values": {"exact": [float(i % 2), 0.0]}} for i, p in enumerate(prompts)]
    (out / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "white").save(path)


@pytest.fixture
def cfg():
    return from_dict({"experiment": {"name": "t"}, "optimize": {"methods": ["lpo", "spo", "dpo"]},
                      "evaluate": {"grid_prompts": 3}})


@pytest.fixture
def full(tmp_path) -> Path:
    res = tmp_path / "results" / "t"
    fake_eval(res, "base", 0.2, 0.5)
    fake_eval(res, "lpo", 0.3, 0.6, seed=1)
    fake_eval(res, "dpo", 0.25, 0.55, seed=2)  # spo is left out: a missing model
    png(res / "lrm" / "accuracy_by_t.png")
    png(res / "spm" / "reward_models_by_t.png")
    png(res / "calibration" / "thresholds.png")
    (res / "lrm" / "accuracy.json").write_text(json.dumps({"overall": {"accuracy": 0.71}}))
    (res / "lrm" / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 1.0 / (s + 1), "acc": 0.5 + s / 200}) + "\n" for s in range(60))
        + '{"step": 60, "lo'  # a killed run's half line
    )
    (res / "optimize" / "lpo").mkdir(parents=True)
    (res / "optimize" / "lpo" / "log.jsonl").write_text(
        "".join(json.dumps({"iteration": i, "loss": 0.69 - i / 100, "kept": i}) + "\n" for i in range(10)))
    from torch.utils.tensorboard import SummaryWriter  # dpo logs to TensorBoard only

    writer = SummaryWriter(str(res / "optimize" / "dpo" / "tb"))
    for step in range(5):
        writer.add_scalar("dpo/loss", 0.7 - step / 10, step)
    writer.close()
    (res / "optimize" / "lpo" / "summary.json").write_text(json.dumps({"iterations": 10, "kept": {"share": 0.2}}))
    (res / "benchmarks").mkdir()
    for stage, sec in {"train_lrm": 80.0, "eval_lrm": 20.0, "calibrate": 20.0, "optimize_lpo": 240.0, "optimize_dpo": 300.0,
                       "evaluate_base": 10.0}.items():
        row = f"{sec}\t0:01:40\t500.5\t900\tNA\tNA\t1\t2\t90\t{2 * sec}\n"
        (res / "benchmarks" / f"{stage}.tsv").write_text(BENCH_HEADER + row)
    return res


def test_full_report(cfg, full):
    out = full / "report.md"
    summary = report.run(cfg, full, out)
    md = out.read_text()
    # the metrics table: header with labels, one row per evaluated model, mean [lo, hi]
    assert "| model | exact match | fg colour | bg colour | shape | quality | annotator reward | LRM score |" in md
    assert "| lpo | 0.300 [0.250, 0.350] |" in md and "| dpo | 0.250 [0.200, 0.300] |" in md
    assert "| win rate vs base | Δ exact |" in md.replace("| model ", "")
    # figures beside the report, linked relative to it; the existing stage plots linked as they are
    for link in ("figures/metrics.png", "figures/grid.png", "figures/training_curves.png", "figures/compute.png",
                 "lrm/accuracy_by_t.png", "spm/reward_models_by_t.png", "calibration/thresholds.png"):
        assert f"]({link})" in md, link
    for name in report.FIGURES:
        with Image.open(full / "figures" / name) as im:
            assert im.format == "PNG"
    with Image.open(full / "figures" / "grid.png") as im:
        assert im.height > 300  # 3 prompt rows, not the placeholder
    # compute: per stage and per method with the reward model included; quality per compute
    assert "| LPO | train_lrm + eval_lrm + calibrate + optimize_lpo | 360.0 | 720.0 | - |" in md
    assert "| SPO | train_spm + optimize_spo | n/a | n/a | train_spm, optimize_spo |" in md
    assert "| LPO | 0.100 [0.050, 0.150] | 0.600 [0.550, 0.650] | 0.100 | 1.000 [0.500, 1.500] |" in md
    # logs: both read, the half line counted; the summary's scalars listed
    assert "`lrm/train_log.jsonl` (60 rows, 1 unreadable)" in md and "`optimize/lpo/log.jsonl` (10 rows)" in md
    assert "`optimize/dpo/tb` (5 TensorBoard points)" in md
    assert "| kept.share | 0.200 |" in md
    # what is missing is said, not an error
    assert "eval/spo/metrics.json" in md and "optimize/spo/**/*.jsonl" in md
    assert summary["models"] == ["base", "lpo", "dpo"]


def test_empty_results_folder_gives_a_report_of_what_is_missing(cfg, tmp_path):
    res = tmp_path / "results" / "t"
    res.mkdir(parents=True)
    summary = report.run(cfg, res, res / "report.md")
    md = (res / "report.md").read_text()
    assert "No model has been evaluated yet" in md and "No Snakemake benchmark files" in md
    for item in ("eval/base/metrics.json", "lrm/accuracy_by_t.png", "spm/reward_models_by_t.png",
                 "calibration/thresholds.png",
                 "benchmarks/*.tsv", "lrm/**/*.jsonl"):
        assert any(item in m for m in summary["missing"]), item
        assert item in md
    for name in report.FIGURES:  # declared rule outputs: always written (placeholders)
        assert (res / "figures" / name).is_file()


def test_grid_leaves_out_a_model_evaluated_on_other_prompts(cfg, tmp_path):
    res = tmp_path / "r"
    fake_eval(res, "base", 0.2, 0.5)
    fake_eval(res, "lpo", 0.3, 0.6, prompts=["something else"] + PROMPTS[1:])
    summary = report.run(cfg, res, res / "report.md")
    assert any("lpo was evaluated on other prompts" in n for n in summary["notes"])


def test_benchmarks_average_repeats_and_tolerate_na(tmp_path):
    rows = "10\t0\tNA\t0\t0\t0\t0\t0\t0\t4\n" + "20\t0\t30\t0\t0\t0\t0\t0\t0\t6\n"
    (tmp_path / "x.tsv").write_text(BENCH_HEADER + rows)
    bench = report.read_benchmarks(tmp_path)
    assert bench["x"]["wall_s"] == 15.0 and bench["x"]["cpu_s"] == 5.0 and np.isnan(bench["x"]["max_rss_mb"])
    comp = report.method_compute({"train_lrm": {"wall_s": 1.0, "cpu_s": 2.0}}, ["lpo", "dpo"])
    assert comp["lpo"]["wall_s"] == 1.0 and comp["lpo"]["missing"] == ["eval_lrm", "calibrate", "optimize_lpo"]
    assert np.isnan(comp["dpo"]["wall_s"])
    with_sibling = report.method_compute({"train_lrm": {"wall_s": 1.0, "cpu_s": 2.0},
                                          "sibling_lrm": {"wall_s": 5.0, "cpu_s": 6.0}}, ["lpo"])
    assert with_sibling["lpo"]["wall_s"] == 6.0 and with_sibling["lpo"]["per_stage"]["sibling_lrm"] == 5.0


def test_curve_series_picks_the_step_key_and_numeric_values():
    rows = [{"iteration": 0, "loss": 1.0, "tag": "a", "ok": True}, {"iteration": 1, "loss": 0.5, "acc": 0.7}]
    x, series = report.curve_series(rows)
    assert x == "iteration" and set(series) == {"loss", "acc"}
    assert series["loss"][0].tolist() == [0.0, 1.0] and series["acc"][0].tolist() == [1.0]
    assert report.curve_series([{"loss": 1.0}, {"loss": 2.0}])[0] == "line"


def test_cli(tmp_path, full, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"experiment": {"name": "t"}}))
    assert report.main(["--config", str(cfg_file), "--results", str(full), "--out", str(full / "r.md")]) == 0
    assert (full / "r.md").is_file()
    assert report.main(["--config", str(cfg_file), "--results", str(tmp_path / "nope"), "--out", "x.md"]) == 2
    assert "folder not found" in capsys.readouterr().err


# ---- figures: what a reader sees in report.md and in `snakemake --report` ----


def test_curve_panels_skip_bookkeeping_group_bins_and_overlay_validation():
    one = (np.arange(3.0), np.ones(3))
    series = {k: one for k in ("loss", "train_acc", "lr", "head_lr", "best_metric", "best_step", "metric",
                               "kept/t0-249", "kept/t250-499", "kept_share/t0-249", "grad_norm", "epoch")}
    panels = dict(report.curve_panels(series))
    assert list(panels) == ["loss", "train_acc + validation", "kept/* (per timestep bin)", "grad_norm"]
    assert panels["train_acc + validation"] == ["train_acc", "metric"]
    assert panels["kept/* (per timestep bin)"] == ["kept/t0-249", "kept/t250-499"]
    # a log of nothing but bookkeeping still gets its panels
    assert report.curve_panels({"lr": one}) == [("lr", ["lr"])]


def test_moving_average_is_centred():
    x = np.arange(10.0)
    xs, ys = report.moving_average(x, x * 2, 5)
    assert xs.tolist() == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0] and np.allclose(ys, xs * 2)


def test_training_curves_show_every_log(tmp_path):
    rng = np.random.default_rng(0)
    logs = [{"stage": f"optimize_m{i}", "path": tmp_path / f"{i}.jsonl", "kind": "log", "rows": 80, "bad": 0,
             "x": "step", "series": {f"m{i}/loss": (np.arange(80.0), rng.random(80)),
                                     f"m{i}/implicit_acc": (np.arange(80.0), rng.random(80))}}
            for i in range(6)]
    assert report.plot_curves(tmp_path / "c.png", logs)
    with Image.open(tmp_path / "c.png") as im:  # one row of panels per log: 6 x 2.6 in at 100 dpi
        assert im.height >= 6 * 2.6 * 100 - 5


def test_metrics_table_figure_has_both_tables(tmp_path):
    header, rows = ["model", "exact match"], [["base", "0.344 [0.236, 0.464]"]]
    assert report.plot_table(tmp_path / "one.png", [("absolute", header, rows)])
    assert report.plot_table(tmp_path / "two.png", [("absolute", header, rows), ("vs base", header, rows)])
    with Image.open(tmp_path / "one.png") as one, Image.open(tmp_path / "two.png") as two:
        assert two.height > 1.6 * one.height
    assert not report.plot_table(tmp_path / "none.png", [("empty", header, [])])


def test_stage_plots_draw_from_their_json(tmp_path):
    """eval_lrm's accuracy plot (with the pixel model) and calibrate's threshold plot, from JSON-shaped dicts."""
    from lpo.stages import calibrate, eval_lrm

    ts = [49, 549, 999]
    rows = [{"t": t, "n": 20, "acc": a, "lo": a - 0.1, "hi": a + 0.1, "above_chance": a - 0.1 > 0.5}
            for t, a in zip(ts, (0.8, 0.65, 0.5))]
    eval_lrm.plot_accuracy(tmp_path / "acc.png", rows, 0.89, rows, "20 test pairs")
    result = {"mode": "sigma", "timesteps": ts[::-1], "thresholds": [0.5, 0.42, 0.35],
              "trainable": [False, True, True], "untrainable_reason": ["lrm_at_chance", None, None]}
    calibrate.plot_thresholds(result, tmp_path / "th.png")
    for name in ("acc.png", "th.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.width > 300


def test_every_reported_figure_has_a_caption_file_and_a_label():
    """`snakemake --report` needs each report(caption=...) file; labels name the figures in its menu."""
    import re

    root = Path(__file__).resolve().parents[1]
    smk = "\n".join(p.read_text() for p in sorted((root / "workflow" / "rules").glob("*.smk")))
    blocks = re.findall(r"report\(\s*f\"[^\"]+\",(.*?)\n\s*\),", smk, flags=re.S)
    assert len(blocks) >= 8
    for block in blocks:
        caption = re.search(r'caption="\.\./report/([\w.]+\.rst)"', block)
        assert caption and (root / "workflow" / "report" / caption.group(1)).is_file(), block
        assert re.search(r'labels=\{"figure": "[^"]+"\}', block), block
    assert (root / "workflow" / "report" / "workflow.rst").is_file()
