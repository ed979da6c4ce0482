"""Stage `synthesize`: prompt split + flawed pretraining corpus, written atomically (small n, seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from lpo.config import ConfigError, from_dict, replace
from lpo.stages import synthesize
from lpo.utils import read_json
from lpo.world import oracle
from lpo.world.prompts import parse_prompt, triple_indices
from lpo.world.render import FLAWS

N_IMAGES = 600


def make_cfg(**synth):
    return from_dict({"experiment": {"name": "t", "seed": 3},
                      "synthesize": {"n_images": N_IMAGES, "caption_flaw_rate": 0.2, "blur_rate": 0.15,
                                     "noise_rate": 0.15, "low_contrast_rate": 0.15, **synth}})


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    cfg = make_cfg()
    out = tmp_path_factory.mktemp("syn") / "world"
    summary = synthesize.run(cfg, out, show_progress=False)
    return cfg, out, summary


def test_writes_prompts_and_corpus(outputs):
    cfg, out, summary = outputs
    assert sorted(p.name for p in out.iterdir()) == ["corpus.npz", "prompts.json", "summary.json"]
    assert not list(out.parent.glob(".*partial"))  # atomic: no temp folder left behind
    corpus = synthesize.load_corpus(out / "corpus.npz")  # allow_pickle=False
    n, side = N_IMAGES, cfg.world.resolution
    assert corpus["images"].shape == (n, side, side, 3) and corpus["images"].dtype == np.uint8
    assert corpus["captions"].shape == (n,) and corpus["captions"].dtype.kind == "U"
    assert corpus["triples"].shape == (n, 3) and corpus["flaws"].shape == (n, len(FLAWS))
    assert list(corpus["flaw_names"]) == list(FLAWS) and list(corpus["colours"]) == cfg.world.colours
    assert summary["n_images"] == n and summary["flaws"]["blur"] == int(corpus["flaws"][:, 0].sum())
    assert read_json(out / "summary.json") == summary


def test_split_document_and_held_out_test_triples(outputs):
    cfg, out, _ = outputs
    doc = read_json(out / "prompts.json")
    assert doc["pretrain_splits"] == ["train", "val"]
    for split in ("train", "val", "test"):
        assert [list(parse_prompt(p, cfg.world)) for p in doc[split]["prompts"]] == doc[split]["triples"]
    test = {tuple(t) for t in doc["test"]["triples"]}
    pretrain = {tuple(t) for s in ("train", "val") for t in doc[s]["triples"]}
    assert test and not test & pretrain
    corpus = synthesize.load_corpus(out / "corpus.npz")
    shown = {tuple(cfg.world.colours[f] if k != 1 else cfg.world.shapes[f] for k, f in enumerate(t))
             for t in corpus["triples"]}
    captioned = {tuple(parse_prompt(c, cfg.world)) for c in set(corpus["captions"])}
    assert shown <= pretrain and captioned <= pretrain  # no test triple is rendered or named
    assert len(shown) == len(pretrain)  # balanced: every pretraining triple is used


def test_caption_flaws_name_exactly_one_wrong_attribute(outputs):
    cfg, out, _ = outputs
    corpus = synthesize.load_corpus(out / "corpus.npz")
    parsed = triple_indices([parse_prompt(c, cfg.world) for c in corpus["captions"]], cfg.world)
    assert (parsed == corpus["caption_triples"]).all()
    n_wrong = (corpus["caption_triples"] != corpus["triples"]).sum(1)
    assert (n_wrong[corpus["caption_flawed"]] == 1).all() and (n_wrong[~corpus["caption_flawed"]] == 0).all()
    assert abs(corpus["caption_flawed"].mean() - 0.2) < 0.05
    for k in range(len(FLAWS)):
        assert abs(corpus["flaws"][:, k].mean() - 0.15) < 0.05


def test_clean_images_match_their_true_triples(outputs):
    cfg, out, _ = outputs
    corpus = synthesize.load_corpus(out / "corpus.npz")
    clean = ~corpus["flaws"].any(1)
    verdict = oracle.judge(corpus["images"][clean], corpus["triples"][clean].astype(np.int64), cfg.world)
    assert verdict["exact"].mean() >= 0.99
    q = oracle.detect(corpus["images"], cfg.world)["quality"]
    assert np.mean(q[~clean][:, None] < q[clean][None, :]) >= 0.95  # flawed images score lower quality


def test_deterministic_by_seed(tmp_path, outputs):
    cfg, out, _ = outputs
    synthesize.run(cfg, tmp_path / "again", show_progress=False)
    a, b = synthesize.load_corpus(out / "corpus.npz"), synthesize.load_corpus(tmp_path / "again" / "corpus.npz")
    assert all((a[k] == b[k]).all() for k in a)
    other = replace(cfg, experiment={"seed": 4})
    synthesize.run(other, tmp_path / "other", show_progress=False)
    c = synthesize.load_corpus(tmp_path / "other" / "corpus.npz")
    assert (a["images"] != c["images"]).any()
    assert read_json(tmp_path / "other" / "prompts.json") == read_json(out / "prompts.json")  # split_seed, not seed


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="synthesize.blur_rate"):
        synthesize.run(make_cfg(blur_rate=1.5), tmp_path / "x", show_progress=False)
    with pytest.raises(ConfigError, match="experiment.world"):
        synthesize.run(replace(make_cfg(), experiment={"world": "real"}), tmp_path / "x", show_progress=False)
    assert not (tmp_path / "x").exists()


def test_main_cli(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"experiment": {"name": "cli"}, "synthesize": {"n_images": 50}}))
    override = tmp_path / "o.yaml"
    override.write_text(yaml.safe_dump({"synthesize": {"n_images": 40}}))
    assert synthesize.main(["--config", str(config), "--config", str(override), "--out", str(tmp_path / "w")]) == 0
    assert synthesize.load_corpus(tmp_path / "w" / "corpus.npz")["images"].shape[0] == 40
