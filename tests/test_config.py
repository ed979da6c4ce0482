"""The typed config: strict loading, clear errors naming file and key path, schema in sync with the dataclasses."""

import subprocess
import sys

import re

import pytest
import yaml

from lpo import config as C

CONFIG_FILES = ["config/config.yaml", "config/smoke.yaml", "config/sd15.yaml", "config/sdxl.yaml"]


def write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_shipped_configs_load(repo_root, name):
    paths = [repo_root / "config/config.yaml"] + ([repo_root / name] if name != "config/config.yaml" else [])
    cfg = C.load_config(*paths)
    assert cfg.experiment.name
    assert isinstance(cfg.train_lrm.lr, float)


def test_unknown_key_names_path_and_file(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "train_lrm": {"lrr": 1e-3}})
    with pytest.raises(C.ConfigError) as err:
        C.load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "train_lrm.lrr" in msg and "unknown key" in msg


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "latents": {"mpcf": {"stratgy": "2"}}})
    with pytest.raises(C.ConfigError, match=r"latents\.mpcf\.stratgy: unknown key"):
        C.load_config(path)


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "train_lrm": {"steps": "many"}})
    with pytest.raises(C.ConfigError, match=r"train_lrm\.steps: expected an integer, got 'many'"):
        C.load_config(path)


def test_bool_is_not_an_int(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "optimize": {"num_children": True}})
    with pytest.raises(C.ConfigError, match=r"optimize\.num_children"):
        C.load_config(path)


def test_missing_required_value(tmp_path):
    path = write(tmp_path, {"experiment": {"world": "shapes"}})
    with pytest.raises(C.ConfigError, match=r"experiment\.name: required key is missing"):
        C.load_config(path)


def test_bad_enum_value(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "backbone": {"preset": "sd3"}})
    with pytest.raises(C.ConfigError, match=r"backbone\.preset: 'sd3' is not one of"):
        C.load_config(path)


def test_list_items_checked(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "optimize": {"methods": ["lpo", "ppo"]}})
    with pytest.raises(C.ConfigError, match=r"optimize\.methods\[1\]"):
        C.load_config(path)


def test_int_accepted_for_float_and_yaml_int_for_string_enum(tmp_path):
    path = write(tmp_path, {"experiment": {"name": "x"}, "optimize": {"lpo": {"beta": 500}},
                            "latents": {"mpcf": {"strategy": 2}}})
    cfg = C.load_config(path)
    assert cfg.optimize.lpo.beta == 500.0 and isinstance(cfg.optimize.lpo.beta, float)
    assert cfg.latents.mpcf.strategy == "2"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(bad)


def test_later_files_deep_merge(tmp_path):
    a = write(tmp_path, {"experiment": {"name": "a", "seed": 3}, "train_lrm": {"steps": 7}}, "a.yaml")
    b = write(tmp_path, {"experiment": {"name": "b"}}, "b.yaml")
    cfg = C.load_config(a, b)
    assert (cfg.experiment.name, cfg.experiment.seed, cfg.train_lrm.steps) == ("b", 3, 7)


def test_configs_are_frozen(tmp_path):
    cfg = C.from_dict({"experiment": {"name": "x"}})
    with pytest.raises(Exception):
        cfg.train_lrm.steps = 3  # type: ignore[misc]


def test_nested_replace():
    cfg = C.from_dict({"experiment": {"name": "x"}})
    new = C.replace(cfg, train_lrm={"steps": 5})
    assert new.train_lrm.steps == 5 and cfg.train_lrm.steps != 5 and new.lrm == cfg.lrm


def test_schema_file_in_sync(repo_root):
    committed = (repo_root / "workflow/schemas/config.schema.yaml").read_text()
    assert committed == C.schema_yaml(), "run `python -m lpo.config --write-schema` after editing lpo/config.py"


def test_schema_defaults_round_trip():
    """The schema's defaults are exactly the dataclass defaults (Snakemake fills them, the stages re-read them)."""
    import jsonschema

    schema = C.json_schema()
    data = {"experiment": {"name": "x"}}
    jsonschema.validate(data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"experiment": {"name": "x"}, "bogus": 1}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"experiment": {"name": "x"}, "train_lrm": {"steps": "a"}}, schema)


def test_cli_check_reports_one_line(tmp_path, repo_root):
    path = write(tmp_path, {"experiment": {"name": "x"}, "evaluate": {"cfgg": 3}})
    proc = subprocess.run([sys.executable, "-m", "lpo.config", "--check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "evaluate.cfgg" in proc.stderr


@pytest.mark.parametrize("old,new", [("beta", "optimize.lpo.beta"), ("spo_t_max", "optimize.spo.t_max"),
                                     ("dpo_batch_size", "optimize.dpo.batch_size")])
def test_a_flat_method_key_of_earlier_versions_names_its_new_place(tmp_path, old, new):
    path = write(tmp_path, {"experiment": {"name": "x"}, "optimize": {old: 1}})
    with pytest.raises(C.ConfigError, match=rf"optimize\.{old}: this key moved to {re.escape(new)}.*--migrate"):
        C.load_config(path)


def test_migrate_moves_every_old_key_and_the_result_loads(tmp_path):
    old = {"experiment": {"name": "x"}, "optimize": {"beta": 400.0, "clip_eps": 0.2, "spo_t_max": 500,
                                                     "dpo_batch_size": 4, "lr": 1e-4}}
    cfg = C.from_dict(C.migrate(old))
    assert cfg.optimize.lpo.beta == 400.0 and cfg.optimize.lpo.clip_eps == cfg.optimize.spo.clip_eps == 0.2
    assert cfg.optimize.spo.t_max == 500 and cfg.optimize.dpo.batch_size == 4 and cfg.optimize.lr == 1e-4
    assert old["optimize"]["beta"] == 400.0  # the input is not changed
