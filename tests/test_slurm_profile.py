"""profiles/slurm through the real executor plugin (snakemake-executor-plugin-slurm), with stub SLURM binaries.

Stub `sbatch`, `sacct`, `sacctmgr`, `scontrol`, `sinfo`, `squeue` and `scancel` on PATH record what Snakemake
submits; no job ever runs. `sacct` reports every job COMPLETED, and with `--latency-wait 0` Snakemake then stops
on the missing outputs (MissingOutputException), so each run ends after one submission round (~5 s).

To reach every GPU rule, each scenario fakes the outputs upstream of an antichain of the DAG of config/sd15.yaml
(the paper's setting), so exactly those jobs are ready and get submitted. The expected GPU count, memory and
runtime of each job are read from the experiment config (`resources.*`), the partition and CPUs from the profile:
the test checks that the numbers flow config -> rule resources -> profile -> sbatch command line.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_workflow import workflow_copy

CONFIG = "config/sd15.yaml"
PROFILE = "profiles/slurm"
ACCOUNT = "myproject"  # the profile's placeholder account; the stub sacctmgr knows it
# Rules whose GPU count is another rule's entry in `resources.gpus` (workflow/rules/reward.smk).
GPU_KEY = {"eval_spm": "eval_lrm"}

# name -> (existing upstream outputs, targets, rules expected in the submission round). Keys of the first two
# fields are filled in by `paths` below.
SCENARIOS = {
    "cpu": ([], [], {"base", "download"}),
    "latents": (["base", "data"], ["latents"], {"precompute_latents"}),
    "train": (["base", "data", "latents"], ["lrm", "spm", "policy_dpo"], {"train_lrm", "train_spm", "optimize"}),
    "eval": (
        ["base", "data", "latents", "lrm", "spm"],
        ["lrm_accuracy", "spm_accuracy", "policy_spo", "eval_base"],
        {"eval_lrm", "eval_spm", "optimize", "evaluate"},
    ),
    "calibrate": (["base", "data", "latents", "lrm", "spm", "lrm_accuracy"], ["thresholds"], {"calibrate"}),
}

STUBS = {
    # Records its argv (one JSON line per submission) and prints a job id as `sbatch --parsable` does.
    "sbatch": """
import json, os, sys
with open(os.environ["SLURM_STUB_CAPTURE"], "a") as fh:
    fh.write(json.dumps({"jobid": os.getpid(), "argv": sys.argv[1:]}) + "\\n")
print(os.getpid())
""",
    # The plugin's status query (`sacct -X --parsable2 ... --name <run uuid>`): every submitted job COMPLETED.
    "sacct": """
import json, os, sys
path = os.environ["SLURM_STUB_CAPTURE"]
if "--name" in sys.argv and os.path.exists(path):
    for line in open(path):
        print(f"{json.loads(line)['jobid']}|COMPLETED")
""",
    "sacctmgr": f"print({ACCOUNT!r})",  # account validation
    "scontrol": "print('MinJobAge = 300 sec')\nprint('MaxArraySize = 1001')",
    "sinfo": "print('PARTITION')\nprint('cpu*')\nprint('gpu')",
    "squeue": "",
    "scancel": "",
}


def paths(config: dict) -> dict[str, str]:
    """Outputs of config/sd15.yaml's rules that the scenarios fake or target (workflow/rules/*.smk)."""
    res = f"results/{config['experiment']['name']}"
    return {
        "base": f"{res}/base",
        "data": f"data/{config['download']['dataset']}",
        "latents": f"{res}/latents",
        "lrm": f"{res}/lrm/model",
        "spm": f"{res}/spm/model",
        "lrm_accuracy": f"{res}/lrm/accuracy.json",
        "spm_accuracy": f"{res}/spm/accuracy.json",
        "thresholds": f"{res}/calibration/thresholds.json",
        "policy_dpo": f"{res}/policy/dpo",
        "policy_spo": f"{res}/policy/spo",
        "eval_base": f"{res}/eval/base/metrics.json",
    }


def fake_outputs(wf: Path, rel_paths: list[str]) -> None:
    """Create the outputs in DAG order with increasing mtimes, so Snakemake takes them as up to date."""
    t0 = 1_700_000_000
    for i, rel in enumerate(rel_paths):
        path = wf / rel
        if rel.endswith(".json"):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
        else:
            path.mkdir(parents=True, exist_ok=True)
            (path / "fake").write_text("")
            os.utime(path / "fake", (t0 + i, t0 + i))
        os.utime(path, (t0 + i, t0 + i))


def write_stubs(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(f"#!{sys.executable}\n{body.strip()}\n")
        stub.chmod(0o755)


# sbatch options that take a separate value (the plugin writes the others as --key=value or as bare flags).
VALUE_OPTIONS = {"--job-name", "--output", "--comment", "-A", "-p", "-t", "--mem", "-D", "-C", "--mem-per-cpu"}


def sbatch_options(argv: list[str]) -> dict[str, str]:
    """One captured sbatch argv as {option: value} ('' for flags)."""
    options, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg in VALUE_OPTIONS:
            options[arg] = argv[i + 1]
            i += 2
            continue
        key, _, value = arg.partition("=")
        options[key] = value
        i += 1
    return options


def job_rule(comment: str) -> str:
    """The rule name in the plugin's job comment: `rule_<rule>` or `rule_<rule>_wildcards_<values>`."""
    match = re.fullmatch(r"rule_(.+?)(?:_wildcards_.*)?", comment)
    assert match, comment
    return match.group(1)


def shell_commands(stdout: str) -> dict[str, str]:
    """Rule -> its shell command, from Snakemake's job printout (printshellcmds is on in the profile)."""
    blocks = re.findall(r"^rule (\w+):\n(?:    .*\n)*?Shell command: (.*)$", stdout, flags=re.MULTILINE)
    return dict(blocks)


@pytest.fixture(scope="module")
def experiment(repo_root) -> dict:
    return yaml.safe_load((repo_root / CONFIG).read_text())


@pytest.fixture(scope="module")
def profile(repo_root) -> dict:
    return yaml.safe_load((repo_root / PROFILE / "config.yaml").read_text())


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_sbatch_command_lines(repo_root, tmp_path, experiment, profile, scenario):
    existing, targets, expected_rules = SCENARIOS[scenario]
    where = paths(experiment)
    wf = workflow_copy(repo_root, tmp_path)
    fake_outputs(wf, [where[name] for name in existing])
    write_stubs(tmp_path / "bin")
    capture = tmp_path / "sbatch.jsonl"
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(tmp_path / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["SLURM_STUB_CAPTURE"] = str(capture)
    env["OMP_NUM_THREADS"] = "1"
    for var in [v for v in env if v.startswith("SLURM_") and v != "SLURM_STUB_CAPTURE"]:
        del env[var]  # a real SLURM job context would change the plugin's behaviour
    proc = subprocess.run(
        [
            sys.executable, "-m", "snakemake", "--workflow-profile", PROFILE, "--configfile", CONFIG,
            # Stop after the first round: no retry, no waiting for outputs, first status query after 1 s.
            "--retries", "0", "--latency-wait", "0", "--slurm-init-seconds-before-status-checks", "1",
            *[where[name] for name in targets],
        ],
        cwd=wf, env=env, capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert "completed successfully, but some output files are missing" in out, out[-4000:]
    submissions = [json.loads(line) for line in capture.read_text().splitlines()]
    jobs = {}
    for sub in submissions:
        options = sbatch_options(sub["argv"])
        rule = job_rule(options["--comment"])
        assert rule not in jobs, f"{rule} submitted twice"
        jobs[rule] = options
    assert set(jobs) == expected_rules, out[-4000:]

    resources = experiment["resources"]
    defaults, per_rule = profile["default-resources"], profile["set-resources"]
    commands = shell_commands(out)
    for rule, options in jobs.items():
        gpus = resources["gpus"].get(GPU_KEY.get(rule, rule), 0)
        assert options["-A"] == ACCOUNT
        assert options["--mem"] == str(resources["mem_mb"].get(rule, defaults["mem_mb"])), rule
        assert options["-t"] == str(resources["runtime"].get(rule, defaults["runtime"])), rule
        assert options["--nodes"] == "1", rule  # all GPUs of a job on one node, where accelerate starts them
        assert "--wrap" in options and "--executor slurm-jobstep" in options["--wrap"]
        if gpus:
            assert options["-p"] == per_rule[rule]["slurm_partition"] == "gpu", rule
            assert options["--gpus"] == str(gpus), rule
            assert options["--cpus-per-gpu"] == str(per_rule[rule]["cpus_per_gpu"]), rule
            assert "--cpus-per-task" not in options, rule
            # the rule starts one process per GPU on that node
            if gpus > 1:
                assert f"-m accelerate.commands.launch --config_file config/accelerate/ddp.yaml --num_processes {gpus} -m lpo" in (
                    commands[rule]
                ), commands.get(rule)
            else:
                assert "accelerate" not in commands[rule], commands[rule]
        else:
            assert options["-p"] == defaults["slurm_partition"] == "cpu", rule
            assert "--gpus" not in options and "--gres" not in options, rule
            assert options["--cpus-per-task"] == "1", rule
            assert options["--ntasks"] == "1", rule


def test_every_gpu_rule_of_the_real_configs_has_a_gpu_partition(repo_root, profile):
    """A rule that gets GPUs from sd15.yaml or sdxl.yaml but is missing from set-resources would ask the cpu
    partition for GPUs; the scenarios above submit most rules, this covers the config keys themselves."""
    gpu_rules = set(GPU_KEY) | {
        rule
        for name in ("sd15.yaml", "sdxl.yaml")
        for rule, count in yaml.safe_load((repo_root / "config" / name).read_text())["resources"]["gpus"].items()
        if count > 0
    }
    per_rule = profile["set-resources"]
    missing = sorted(rule for rule in gpu_rules if per_rule.get(rule, {}).get("slurm_partition") != "gpu")
    assert not missing, f"{PROFILE}/config.yaml: no gpu partition for {missing}"
    assert "cpus_per_task" not in profile["default-resources"], "it would override every rule's cpus_per_gpu"
