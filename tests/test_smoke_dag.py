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
    for model in ("base", "lpo", "spo", "dpo"):
        metrics = json.loads((res / "eval" / model / "metrics.json").read_text())
        assert metrics["metrics"], model
        assert model in report
    assert (res / "lrm" / "accuracy_by_t.png").stat().st_size > 0
    assert (res / "calibration" / "thresholds.json").exists()
    # every rule left its log and its benchmark
    assert len(list((res / "logs").glob("*.log"))) >= 12
    assert len(list((res / "benchmarks").glob("*.tsv"))) >= 11
    print(f"smoke DAG: {seconds:.0f} s")
    # a second run has nothing to do
    again = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", "config/smoke.yaml"],
        cwd=wf, env=env, capture_output=True, text=True, timeout=300,
    )
    assert "Nothing to be done" in again.stdout + again.stderr
