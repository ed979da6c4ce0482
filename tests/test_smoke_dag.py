"""The whole DAG on the smoke config, through Snakemake, as a user runs it (issue: <= 3 minutes on 2 cores)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from test_workflow import workflow_copy


def test_smoke_dag_runs_end_to_end(repo_root, tmp_path):
    wf = workflow_copy(repo_root, tmp_path)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread per job beats two (and two jobs run at once)
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/smoke.yaml", "--show-failed-logs"],
        cwd=wf, env=env, capture_output=True, text=True, timeout=900,
    )
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    res = wf / "results" / "smoke"
    report = (res / "report.md").read_text()
    for model in ("base", "lpo", "spo", "dpo", "grpo"):
        metrics = json.loads((res / "eval" / model / "metrics.json").read_text())
        assert metrics["metrics"], model
        assert model in report
    grpo = json.loads((res / "optimize" / "grpo" / "summary.json").read_text())
    assert grpo["method"] == "grpo" and grpo["tuples_trained"] > 0 and "kl" in grpo["history"][-1]
    assert (res / "lrm" / "accuracy_by_t.png").stat().st_size > 0
    assert (res / "calibration" / "thresholds.json").exists()
    # every rule left its log and its benchmark
    assert len(list((res / "logs").glob("*.log"))) >= 12
    assert len(list((res / "benchmarks").glob("*.tsv"))) >= 11
    print(f"smoke DAG: {seconds:.0f} s")
    # the latent-ceiling diagnostic (scripts/latent_ceiling.py, README "LRM") runs on the DAG's data and base
    out = tmp_path / "latent_ceiling.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "latent_ceiling.py"), "--config", "config/smoke.yaml", "--data", "data/shapes-smoke",
         "--base", "results/smoke/base", "--out", str(out), "--probe-epochs", "1"],
        cwd=wf, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ceiling = json.loads(out.read_text())
    assert ceiling["n_decided"] > 0
    for key in ("pair_accuracy_reward_on_image", "pair_accuracy_reward_on_round_trip"):
        assert 0.0 <= ceiling[key] <= 1.0, key
    assert set(ceiling["round_trip_attribute_agreement"]) == {"fg", "shape", "bg"}
    assert 0.0 <= ceiling["probe"]["pair_accuracy"] <= 1.0
    # the sibling-ranking diagnostic (scripts/sibling_ranking.py, README "LPO") on the DAG's base, LRM and thresholds
    out = tmp_path / "sibling" / "sibling_ranking.json"
    proc = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "sibling_ranking.py"), "--config", "config/smoke.yaml",
         "--base", "results/smoke/base", "--lrm", "results/smoke/lrm/model", "--world", "results/smoke/world",
         "--thresholds", "results/smoke/calibration/thresholds.json", "--prompts", "3", "--out", str(out)],
        cwd=wf, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sibling = json.loads(out.read_text())
    k = sibling["num_children"]
    assert len(sibling["steps"]) == sibling["ddim_steps"]
    for step in sibling["steps"]:
        assert step["pairs"] == 3 * k * (k - 1) // 2
        for scorer in ("lrm_parent", "lrm_child", "x0hat_judge"):
            c = step["concordance"][scorer]
            assert 0 <= c["agree"] <= c["judged"] <= step["pairs"]
        assert step["best_worst"]["kept"]["pairs"] <= step["best_worst"]["all"]["pairs"] == 3
    assert out.with_suffix(".png").stat().st_size > 0
    # stage sibling_lrm (README "LPO"; a rule only with sibling_lrm.enabled) on the DAG's base, LRM and world:
    # once with the reward's labels writing the rollout cache, once with the annotator's loading it
    out = tmp_path / "sibling_lrm"
    for labels in ("reward", "annotator"):
        over = tmp_path / f"sibling_{labels}.yaml"
        over.write_text("sibling_lrm:\n  prompts: 10\n  children: 3\n  steps: 2\n  batch_size: 8\n  eval_every: 1\n"
                        f"  labels: {labels}\n")
        proc = subprocess.run(
            [sys.executable, "-m", "lpo", "sibling_lrm", "--config", "config/smoke.yaml", "--config", str(over),
             "--base", "results/smoke/base", "--lrm", "results/smoke/lrm/model", "--world", "results/smoke/world",
             "--out", str(out), "--rollouts", str(tmp_path / "rollouts.npz")],
            cwd=wf, env=env, capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        record = json.loads((out / "sibling_lrm.json").read_text())
        assert record["config"]["labels"] == labels and record["pairs_train"] > 0 and record["pairs_held_out"] > 0
        assert [h["step"] for h in record["history"]] == [0, 1, 2]
        assert 0.0 <= record["best_held_out_concordance"] <= 1.0
    assert "rollouts: loaded" in proc.stdout + proc.stderr
    from lpo.reward.lrm import LatentRewardModel

    assert LatentRewardModel.from_pretrained(out / "model").vfe_scale > 0
    # LPO with the judge's rollout reward (scripts/oracle_lpo.py, README "LPO"): one iteration, a loadable policy
    over = tmp_path / "oracle_over.yaml"
    over.write_text("optimize:\n  iterations: 1\n  prompts_per_iteration: 2\n")
    proc = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "oracle_lpo.py"), "--config", "config/smoke.yaml",
         "--config", str(over), "--base", "results/smoke/base", "--world", "results/smoke/world",
         "--workdir", str(tmp_path / "oracle" / "work"), "--out", str(tmp_path / "oracle" / "policy")],
        cwd=wf, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "oracle" / "work" / "summary.json").read_text())
    assert summary["method"] == "lpo-oracle" and summary["iterations"] == 1
    assert summary["tuples_kept"] >= 0
    assert (tmp_path / "oracle" / "policy" / "unet").is_dir() and (tmp_path / "oracle" / "policy" / "lora").is_dir()
    # a second run has nothing to do
    again = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/smoke.yaml"],
        cwd=wf, env=env, capture_output=True, text=True, timeout=300,
    )
    assert "Nothing to be done" in again.stdout + again.stderr
