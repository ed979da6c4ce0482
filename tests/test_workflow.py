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


def test_sibling_lrm_rule_feeds_lpo_only_when_enabled(repo_root, tmp_path):
    wf = workflow_copy(repo_root, tmp_path)
    default = snakemake(wf, "-n", "-p")
    assert default.returncode == 0, default.stdout + default.stderr
    assert "rule sibling_lrm" not in default.stdout and "sibling_lrm/model" not in default.stdout
    proc = snakemake(wf, "-n", "-p", "--configfile", "config/shapes-sibling.yaml")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "rule sibling_lrm" in out or "localrule sibling_lrm" in out
    commands = [line for line in out.splitlines() if " -m lpo " in line]
    calibrate = next(c for c in commands if " -m lpo calibrate " in c)
    optimize = next(c for c in commands if " -m lpo optimize " in c)
    evaluate = [c for c in commands if " -m lpo evaluate " in c]
    assert "--lrm results/shapes-sibling/sibling_lrm/model " in calibrate
    assert "--lrm results/shapes-sibling/sibling_lrm/model " in optimize
    assert evaluate and all("--lrm results/shapes-sibling/lrm/model " in c for c in evaluate)  # evaluation's LRM stays
