"""The Snakemake workflow: lint-clean, and the DAG builds for every config in config/."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def workflow_copy(repo_root: Path, tmp_path: Path) -> Path:
    """A copy of the workflow files, so dry runs never touch the working tree's results/."""
    dst = tmp_path / "wf"
    dst.mkdir()
    for name in ["Snakefile", "workflow", "config", "profiles", "envs"]:
        src = repo_root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)
    assets = repo_root / "lpo" / "assets"
    if assets.exists():
        shutil.copytree(assets, dst / "lpo" / "assets")
    return dst


def snakemake(wf: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, *args], cwd=wf, capture_output=True, text=True, timeout=300)


def test_lint_is_clean(repo_root, tmp_path):
    wf = workflow_copy(repo_root, tmp_path)
    proc = snakemake(wf, "--lint")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "good condition" in proc.stdout + proc.stderr


@pytest.mark.parametrize("configfile", sorted(p.name for p in (Path(__file__).parent.parent / "config").glob("*.yaml")))
def test_dry_run_builds_dag(repo_root, tmp_path, configfile):
    wf = workflow_copy(repo_root, tmp_path)
    args = ["-n", "--quiet", "rules"]
    if configfile != "config.yaml":
        args += ["--configfile", f"config/{configfile}"]
    proc = snakemake(wf, *args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for rule in ["precompute_latents", "train_lrm", "eval_lrm", "calibrate", "optimize", "evaluate", "report"]:
        assert rule in out, f"{rule} missing from the DAG of {configfile}:\n{out}"


def test_schema_rejects_unknown_key(repo_root, tmp_path):
    wf = workflow_copy(repo_root, tmp_path)
    (wf / "bad.yaml").write_text("train_lrm:\n  lrr: 0.1\n")
    proc = snakemake(wf, "-n", "--configfile", "bad.yaml")
    assert proc.returncode != 0
    assert "lrr" in proc.stdout + proc.stderr
