"""`lpo bench` (lpo/tools/bench.py, issue #8 item 6): the shapes and tiny-sd15 sizes run end to end with one
repeat and emit every key with finite positive timings; the per-step counts, taken by hooks on the models,
show SPO's K extra U-Net evaluations, K decodes and K pixel-model evaluations per prompt against LPO's one CFG
U-Net pass and one batched LRM call; the step choice and the statistics; bad input. Offline, tiny models."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from lpo import cli
from lpo.config import ConfigError
from lpo.tools import bench as B

ITEMS = ("lpo_step", "spo_step", "lrm_train_step_latents", "lrm_train_step_on_the_fly", "loader_epoch")
RATIOS = ("spo_over_lpo_step", "on_the_fly_over_latents_lrm_step", "loader_over_train_samples_per_s")
COUNT_KEYS = ("unet_calls_per_step", "unet_cfg_evals_per_prompt", "lrm_calls_per_step", "lrm_latents_per_prompt",
              "vae_decodes_per_prompt", "pixel_evals_per_prompt", "pixel_calls_per_step")
CHILDREN = {"shapes": 4, "tiny-sd15": 3}
PROMPTS_PER_STEP = 2


def _finite_positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def results() -> dict:
    """shapes through run() (tiny-sd15 goes through the CLI, below)."""
    out = {}
    opts = B.BenchOptions(size="shapes", batch=PROMPTS_PER_STEP, train_batch=2, children=CHILDREN["shapes"],
                          repeats=1, warmup=0, loader_samples=16)
    out["shapes"] = B.run(opts)
    return out


@pytest.fixture(scope="module")
def cli_result(tmp_path_factory) -> tuple[dict, dict]:
    """tiny-sd15 through `lpo bench`: the printed JSON and the --out file."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(["bench", "--size", "tiny-sd15", "--batch", str(PROMPTS_PER_STEP), "--train-batch", "2",
                         "--children", str(CHILDREN["tiny-sd15"]), "--repeats", "1", "--warmup", "0",
                         "--loader-samples", "16", "--out", str(path)])
    assert code == 0
    return json.loads(stdout.getvalue()), json.loads(path.read_text())


def _sizes(results, cli_result) -> dict:
    return {"shapes": results["shapes"], "tiny-sd15": cli_result[0]}


def test_cli_prints_the_json_it_writes(cli_result):
    printed, written = cli_result
    assert printed == written
    assert list(written["sizes"]) == ["tiny-sd15"]


@pytest.mark.parametrize("size", ["shapes", "tiny-sd15"])
def test_every_key_with_finite_positive_timings(results, cli_result, size):
    result = _sizes(results, cli_result)[size]
    assert result["device"] == "cpu" and result["dtype"] == "fp32" and result["device_name"]
    assert result["threads"] >= 1 and result["versions"]["torch"]
    s = result["sizes"][size]
    for item in ITEMS:
        t = s["timings_s"][item]
        assert t["n"] == 1 and len(t["all"]) == 1
        assert all(_finite_positive(t[k]) for k in ("median", "p10", "p90")), (item, t)
        assert t["p10"] <= t["median"] <= t["p90"]
    for name in RATIOS:
        assert _finite_positive(s["ratios"][name]), (name, s["ratios"])
    assert s["ratios"]["spo_over_lpo_step"] == pytest.approx(
        s["timings_s"]["spo_step"]["median"] / s["timings_s"]["lpo_step"]["median"])
    assert _finite_positive(s["throughput_samples_per_s"]["train_step_latents"])
    assert _finite_positive(s["throughput_samples_per_s"]["loader"]["median"])
    assert s["lrm_training"]["losses_finite"]
    assert s["settings"]["prompts_per_step"] == PROMPTS_PER_STEP and s["settings"]["train_pairs"] == 2
    assert set(s["counts_per_step"]["lpo"]) == set(COUNT_KEYS) == set(s["counts_per_step"]["spo"])
    for method in ("lpo", "spo"):
        assert all(_finite_positive(v) for v in s["breakdown_mean_s"][method].values())


@pytest.mark.parametrize("size", ["shapes", "tiny-sd15"])
def test_counts_spo_pays_k_unet_passes_decodes_and_pixel_calls_lpo_one_pass_and_one_lrm_call(results, cli_result,
                                                                                             size):
    s = _sizes(results, cli_result)[size]["sizes"][size]
    k = CHILDREN[size]
    lpo, spo = s["counts_per_step"]["lpo"], s["counts_per_step"]["spo"]
    # LPO: one batched CFG U-Net pass (one CFG evaluation per prompt), one batched LRM call over the B x K children
    assert lpo["unet_calls_per_step"] == 1 and lpo["unet_cfg_evals_per_prompt"] == 1
    assert lpo["lrm_calls_per_step"] == 1 and lpo["lrm_latents_per_prompt"] == k
    assert lpo["vae_decodes_per_prompt"] == 0 and lpo["pixel_evals_per_prompt"] == 0
    # SPO: the same trunk pass plus, per prompt, K CFG evaluations, K decodes and K pixel-model evaluations
    assert spo["unet_cfg_evals_per_prompt"] - 1 == k and spo["unet_calls_per_step"] == 2
    assert spo["vae_decodes_per_prompt"] == k and spo["pixel_evals_per_prompt"] == k
    assert spo["pixel_calls_per_step"] == 1 and spo["lrm_calls_per_step"] == 0
    assert s["models"]["spm"]["kind"] == ("small" if size == "shapes" else "clip")


def test_bench_plan_takes_the_step_nearest_half_that_spo_trains():
    timesteps, prev = [951, 901, 851, 801, 751, 701, 501, 451, 1], [901, 851, 801, 751, 701, 501, 451, 1, -1]
    plan = B.bench_plan(timesteps, prev, spo_t_max=750, num_train_timesteps=1000)
    assert (plan.timesteps, plan.prev, plan.train) == ((501,), (451,), (True,))
    plan = B.bench_plan(timesteps, prev, spo_t_max=460, num_train_timesteps=1000)
    assert plan.timesteps == (451,)  # the last step (t_prev = -1) is never picked
    with pytest.raises(ConfigError, match=r"optimize\.spo\.t_max"):
        B.bench_plan([999, 499], [499, -1], spo_t_max=400, num_train_timesteps=1000)


def test_summarize_median_and_percentiles():
    s = B.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s["median"], s["p10"], s["p90"], s["n"]) == (3.0, pytest.approx(1.4), pytest.approx(4.6), 5)


@pytest.mark.parametrize("changes, match", [
    ({"children": 1}, "--children must be >= 2"),
    ({"size": "sd21"}, "--size 'sd21'"),
    ({"repeats": 0}, "--repeats must be >= 1"),
    ({"batch": 0}, "--batch must be >= 1"),
    ({"warmup": -1}, "--warmup must be >= 0"),
    ({"dtype": "fp16"}, "fp16 needs --device cuda"),
])
def test_bad_options_are_config_errors_naming_the_option(changes, match):
    with pytest.raises(ConfigError, match=match):
        B.run(B.BenchOptions(**changes))


def test_cli_bad_input_is_one_line_and_exit_2(capsys):
    assert cli.main(["bench", "--children", "1"]) == 2
    assert "--children must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:  # argparse: choices come from SIZE_GROUPS
        cli.main(["bench", "--size", "sd21"])
    assert err.value.code == 2


def test_measure_warms_up_each_then_interleaves_the_timed_rounds():
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a") or "ra", "b": lambda: calls.append("b") or "rb"}
    out = B.measure(fns, repeats=2, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert out["a"][1] == ["ra", "ra"] and len(out["b"][0]) == 2 and all(s >= 0 for s in out["b"][0])


def test_counted_adds_only_the_rows_seen_during_its_own_calls():
    layer = torch.nn.Linear(2, 2)
    counters = {"layer": B.RowCounter(layer)}
    totals = {"layer": [0, 0]}
    layer(torch.zeros(5, 2))  # outside: not counted
    B.counted(lambda: layer(torch.zeros(3, 2)), counters, totals)()
    counters["layer"].close()
    layer(torch.zeros(7, 2))  # after close: not seen
    assert totals == {"layer": [1, 3]} and counters["layer"].rows == 8
