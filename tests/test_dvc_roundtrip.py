"""DVC around the Snakemake workflow (dvc.yaml): the stage graph is valid, and the smoke experiment round-trips.

Round trip, in a copy of the working tree under tmp_path (cache, remote and DVC's site cache all inside it):
`dvc repro experiment@smoke` -> `dvc push` to a local remote -> `git clone` -> `dvc pull` -> `snakemake --touch`
-> `snakemake -n` has nothing to do. The `--touch` step is needed because `dvc pull` restores files with fresh,
arbitrary mtimes and a fresh clone has no .snakemake metadata (README, "DVC").
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lpo.config import load_config

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "lpo test",
    "GIT_AUTHOR_EMAIL": "test@example.invalid",
    "GIT_COMMITTER_NAME": "lpo test",
    "GIT_COMMITTER_EMAIL": "test@example.invalid",
}
SMOKE = "config/smoke.yaml"
STAGES = ["data@smoke", "experiment@smoke"]


def tool_env(tmp_path: Path) -> dict[str, str]:
    """The venv's dvc/snakemake first on PATH; no DVC daemons (updater, analytics); everything under tmp_path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_IDENTITY)
    env["OMP_NUM_THREADS"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_DAEMON"] = "1"  # DVC skips spawning its detached updater/analytics processes
    env["DVC_SITE_CACHE_DIR"] = str(tmp_path / "dvc-site-cache")  # DVC's state and index databases
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    """Run a command; fail the test with its output when it exits non-zero. Returns stdout + stderr."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} (in {cwd}) exited {proc.returncode}:\n{out[-6000:]}"
    return out


def copy_working_tree(repo_root: Path, dst: Path, only: list[str] | None = None) -> None:
    """Tracked and untracked, not ignored files of the working tree (uncommitted changes included), as git sees
    them; `only` restricts the copy to those paths."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z", *(only or [])],
        cwd=repo_root, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, listed):
        src = repo_root / rel
        if not src.is_file():  # tracked but deleted in the working tree
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst / rel)


def git_repo(path: Path, env: dict[str, str], message: str) -> None:
    run(["git", "init", "-q"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-q", "-m", message], path, env)


def test_dvc_stage_graph_is_valid(repo_root, tmp_path):
    """`dvc dag` builds the graph of dvc.yaml and every *.dvc file: it fails on interpolation errors and on
    overlapping outputs (e.g. a data.dvc tracking all of data/ next to the data@<exp> stages' data/<dataset>)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    copy_working_tree(repo_root, repo, only=["dvc.yaml", "*.dvc", ".dvc", ".dvcignore"])
    env = tool_env(tmp_path)
    git_repo(repo, env, "dvc files")
    out = run(["dvc", "dag"], repo, env, timeout=60)
    for stage in ["data@shapes", "experiment@shapes", *STAGES]:
        assert stage in out, out


def test_dvc_experiments_match_their_configs(repo_root):
    """dvc.yaml names each experiment's outputs by hand; they must be where Snakemake writes them."""
    experiments = yaml.safe_load((repo_root / "dvc.yaml").read_text())["vars"][0]["experiments"]
    assert {"shapes", "smoke"} <= set(experiments)
    for key, item in experiments.items():
        files = ["config/config.yaml"] + ([item["config"]] if item["config"] != "config/config.yaml" else [])
        cfg = load_config(*[repo_root / f for f in files])
        assert (item["name"], item["dataset"]) == (cfg.experiment.name, cfg.download.dataset), f"dvc.yaml: {key}"


@pytest.mark.slow
def test_dvc_repro_push_clone_pull_roundtrip(repo_root, tmp_path):
    env = tool_env(tmp_path)
    repo, clone, remote = tmp_path / "repo", tmp_path / "clone", tmp_path / "remote"
    repo.mkdir()
    copy_working_tree(repo_root, repo)
    git_repo(repo, env, "working tree")
    run(["dvc", "remote", "add", "-d", "local", str(remote)], repo, env)
    run(["git", "commit", "-q", "-am", "local dvc remote"], repo, env)

    start = time.time()
    run(["dvc", "repro", "experiment@smoke"], repo, env, timeout=1800)
    repro_s = time.time() - start
    report = (repo / "results" / "smoke" / "report.md").read_text()
    assert (repo / "data" / "shapes-smoke" / "manifest.json").is_file()
    assert "Data and pipelines are up to date" in run(["dvc", "status", *STAGES], repo, env)
    # DVC ran Snakemake, so Snakemake's own bookkeeping agrees
    assert "Nothing to be done" in run(["snakemake", "-n", "--configfile", SMOKE], repo, env)

    run(["git", "add", "dvc.lock"], repo, env)
    run(["git", "commit", "-q", "-m", "smoke results"], repo, env)
    run(["dvc", "push"], repo, env, timeout=600)
    assert any(remote.rglob("*")), "nothing reached the remote"

    run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not (clone / "results").exists() and not (clone / "data").exists()
    assert (clone / ".dvc" / "config").read_text() == (repo / ".dvc" / "config").read_text()
    start = time.time()
    run(["dvc", "pull", "--with-deps", "experiment@smoke"], clone, env, timeout=600)
    pull_s = time.time() - start
    assert (clone / "results" / "smoke" / "report.md").read_text() == report
    assert "Data and pipelines are up to date" in run(["dvc", "status", *STAGES], clone, env)

    # Fresh mtimes in checkout order and no .snakemake metadata: Snakemake would re-run most of the DAG.
    before = subprocess.run(
        ["snakemake", "-n", "--configfile", SMOKE], cwd=clone, env=env, capture_output=True, text=True, timeout=300
    )
    stale = "Nothing to be done" not in before.stdout + before.stderr
    # The fix: DVC has just verified that these outputs belong to this code and config, so let Snakemake
    # record them as up to date (it only sets mtimes and metadata; no job runs).
    run(["snakemake", "--touch", "--configfile", SMOKE], clone, env)
    assert "Nothing to be done" in run(["snakemake", "-n", "--configfile", SMOKE], clone, env)
    # touching changed mtimes, not content
    assert "Data and pipelines are up to date" in run(["dvc", "status", *STAGES], clone, env)
    print(f"dvc repro {repro_s:.0f} s, dvc pull {pull_s:.0f} s, Snakemake stale after pull before --touch: {stale}")
