"""The shapes world: grammar, split, renderer, oracle, annotator, auxiliary scorers (numpy only, seconds)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from lpo.config import AnnotatorConfig, ConfigError, WorldConfig
from lpo.world import annotator, auxiliary as aux, oracle
from lpo.world.prompts import (
    Triple,
    all_triples,
    format_prompt,
    parse_prompt,
    pretrain_triples,
    split_triples,
    triple_indices,
    triples_from_indices,
)
from lpo.world.render import FLAWS, check_render, palette, render, render_indices

WORLD = WorldConfig()
N = 1000


def random_indices(n: int, seed: int, world: WorldConfig = WORLD) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = triple_indices(all_triples(world), world)
    return idx[rng.integers(0, len(idx), n)]


@pytest.fixture(scope="module")
def clean_set():
    """1,000 clean jittered renders of random triples and their detection."""
    idx = random_indices(N, seed=1)
    images = render_indices(idx, np.random.default_rng(2), WORLD)
    oracle.detect(images[:4], WORLD)  # warm the prototype cache before timing
    start = time.perf_counter()
    det = oracle.detect(images, WORLD)
    seconds = time.perf_counter() - start
    print(f"\n[oracle] detect on {N} images of {WORLD.resolution}x{WORLD.resolution}: {seconds:.3f} s")
    return idx, images, det, seconds


# --------------------------------------------------------------------------------------------------------
# Grammar and split
# --------------------------------------------------------------------------------------------------------


def test_prompt_round_trip_and_articles():
    for t in all_triples(WORLD):
        assert parse_prompt(format_prompt(t), WORLD) == t
    assert format_prompt(Triple("red", "circle", "blue")) == "a red circle on a blue background"
    assert format_prompt(Triple("orange", "square", "white")) == "an orange square on a white background"
    assert parse_prompt("  A  Red circle on a BLUE background ") == Triple("red", "circle", "blue")
    assert parse_prompt("a orange circle on an white background") == Triple("orange", "circle", "white")


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("a red circle", "not a shapes prompt"),
        ("a red blob on a blue background", "unknown shape 'blob'"),
        ("a red circle on a red background", "same"),
        ("a red circle on a blue backdrop", "not a shapes prompt"),
        ("", "not a shapes prompt"),
    ],
)
def test_parse_errors_quote_the_text(text, fragment):
    with pytest.raises(ValueError) as err:
        parse_prompt(text, WORLD)
    assert fragment in str(err.value)
    assert repr(text) in str(err.value)


def test_parse_checks_the_world_vocabulary():
    assert parse_prompt("a pink circle on a blue background") == Triple("pink", "circle", "blue")  # grammar knows it
    with pytest.raises(ValueError, match="unknown foreground colour 'pink'"):
        parse_prompt("a pink circle on a blue background", WORLD)  # this world does not


def test_split_is_deterministic_disjoint_and_covers_roles():
    splits = split_triples(WORLD)
    assert splits == split_triples(WORLD)
    other = split_triples(dataclasses.replace(WORLD, split_seed=1))
    assert other["test"] != splits["test"]
    sets = {k: set(v) for k, v in splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(all_triples(WORLD))
    n = len(all_triples(WORLD))
    assert len(splits["test"]) == round(WORLD.test_fraction * n) and len(splits["val"]) == round(WORLD.val_fraction * n)
    train = splits["train"]
    for colour in WORLD.colours:
        assert any(t.fg == colour for t in train) and any(t.bg == colour for t in train), colour
    for shape in WORLD.shapes:
        assert any(t.shape == shape for t in train), shape
    assert not set(pretrain_triples(splits)) & sets["test"]


def test_split_and_render_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="world.colours"):
        split_triples(dataclasses.replace(WORLD, colours=["red", "blue", "mauve"]))
    with pytest.raises(ConfigError, match="world.size_range"):
        check_render(dataclasses.replace(WORLD, size_range=[0.3, 0.49]))
    with pytest.raises(ConfigError, match="world.test_fraction"):
        split_triples(dataclasses.replace(WORLD, test_fraction=0.7))
    with pytest.raises(ConfigError, match="cannot hold out"):
        split_triples(dataclasses.replace(WORLD, colours=["red", "green", "blue"], shapes=["circle"],
                                          test_fraction=0.45, val_fraction=0.45))


def test_indices_round_trip_and_accept_json_lists():
    triples = all_triples(WORLD)
    idx = triple_indices(triples, WORLD)
    assert triples_from_indices(idx, WORLD) == triples
    assert (triple_indices([list(t) for t in triples], WORLD) == idx).all()
    assert (triple_indices(idx, WORLD) == idx).all()
    with pytest.raises(ValueError, match="out of range"):
        triple_indices(np.array([[0, 9, 1]]), WORLD)


# --------------------------------------------------------------------------------------------------------
# Renderer
# --------------------------------------------------------------------------------------------------------


def test_render_is_seeded_and_keeps_the_border_clean():
    triples = [Triple("red", "square", "blue"), Triple("white", "triangle", "black")] * 50
    a = render(triples, np.random.default_rng(0), WORLD)
    b = render(triples, np.random.default_rng(0), WORLD)
    c = render(triples, np.random.default_rng(1), WORLD)
    assert a.dtype == np.uint8 and a.shape == (100, 32, 32, 3)
    assert (a == b).all() and (a != c).any()
    pal = np.rint(palette(WORLD) * 255).astype(np.uint8)
    idx = triple_indices(triples, WORLD)
    ring = oracle.border_ring(a)  # (N, 124, 3)
    assert (ring == pal[idx[:, 2]][:, None, :]).all()  # the whole shape is inside, off the border ring
    is_fg = (a == pal[idx[:, 0]][:, None, None, :]).all(-1).sum((1, 2))
    assert (is_fg >= 20).all()  # every image shows its object
    assert len({im.tobytes() for im in a}) == 100  # jittered: no two renders alike


def test_flaws_change_only_the_selected_images():
    idx = random_indices(40, seed=3)
    mask = np.zeros(40, bool)
    mask[::2] = True
    clean = render_indices(idx, np.random.default_rng(4), WORLD)
    for name in FLAWS:
        flawed = render_indices(idx, np.random.default_rng(4), WORLD, flaws={name: mask})
        changed = (flawed != clean).any((1, 2, 3))
        assert (changed == mask).all(), name
    with pytest.raises(ValueError, match="unknown flaw"):
        render_indices(idx, np.random.default_rng(4), WORLD, flaws={"jpeg": mask})


# --------------------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------------------


def test_oracle_is_right_on_clean_jittered_renders(clean_set):
    idx, images, det, seconds = clean_set
    verdict = oracle.judge_detection(det, idx)
    for key in ("fg", "bg", "shape"):
        assert verdict[key].mean() >= 0.99, (key, verdict[key].mean())
    assert det["has_object"].all()
    assert det["quality"].min() > 0.9  # clean renders are high quality
    assert seconds < 5.0  # ~0.5 s alone on 2 cores; generous for a shared machine


def test_oracle_is_rotation_robust():
    world = dataclasses.replace(WORLD, rotation_deg=180.0)
    idx = random_indices(600, seed=5, world=world)
    images = render_indices(idx, np.random.default_rng(6), world)
    verdict = oracle.judge(images, idx, world)
    assert verdict["shape"].mean() >= 0.99


def test_grown_grammar_needs_no_code_changes():
    """All known colours and shapes (pentagon, hexagon, pink, cyan, ...), any rotation: still detected."""
    from lpo.world.prompts import COLOUR_RGB, SHAPE_SIDES

    world = dataclasses.replace(WORLD, colours=list(COLOUR_RGB), shapes=list(SHAPE_SIDES), rotation_deg=180.0)
    idx = random_indices(500, seed=15, world=world)
    verdict = oracle.judge(render_indices(idx, np.random.default_rng(16), world), idx, world)
    assert verdict["exact"].mean() >= 0.99


def test_quality_ranks_flawed_below_clean(clean_set):
    idx, _, det, _ = clean_set
    for name in FLAWS:  # paired: same shapes, with and without the flaw
        flawed = render_indices(idx, np.random.default_rng(2), WORLD, flaws={name: np.ones(N, bool)})
        q = oracle.detect(flawed, WORLD)["quality"]
        share = float(np.mean(q < det["quality"]))
        print(f"\n[oracle] {name}: flawed quality below clean in {share:.3f} of pairs (median {np.median(q):.2f})")
        assert share >= 0.95, name
    # corpus mix (rates 0.1 each, flaws co-occur): any flawed vs any clean image, unpaired
    rng = np.random.default_rng(7)
    flaws = {name: rng.random(N) < 0.3 for name in FLAWS}
    mixed = oracle.detect(render_indices(idx, np.random.default_rng(8), WORLD, flaws=flaws), WORLD)["quality"]
    any_flaw = np.any(list(flaws.values()), axis=0)
    q_flawed, q_clean = mixed[any_flaw], mixed[~any_flaw]
    auc = float(np.mean(q_flawed[:, None] < q_clean[None, :]))
    print(f"[oracle] corpus mix: P(quality flawed < clean) = {auc:.3f}")
    assert auc >= 0.95


def test_no_object_images_are_reported_not_crashed():
    pal = np.rint(palette(WORLD) * 255).astype(np.uint8)
    rng = np.random.default_rng(9)
    plain = np.broadcast_to(pal[:, None, None, :], (len(pal), 32, 32, 3)).copy()
    noisy = np.clip(plain + rng.normal(0, 20, plain.shape), 0, 255).astype(np.uint8)
    images = np.concatenate([plain, noisy])
    det = oracle.detect(images, WORLD)
    assert not det["has_object"].any()
    assert (det["fg"] == -1).all() and (det["shape"] == -1).all()
    assert (det["bg"] == np.concatenate([np.arange(len(pal))] * 2)).all()  # the background is still named
    assert (det["quality"] == 0).all()
    target = np.stack([(det["bg"] + 1) % len(pal), np.zeros(len(images), int), det["bg"]], axis=1)
    verdict = oracle.judge(images, target, WORLD)
    assert not verdict["fg"].any() and not verdict["shape"].any() and not verdict["exact"].any()
    assert verdict["bg"].all()


def test_oracle_survives_generated_looking_images():
    rng = np.random.default_rng(10)
    idx = random_indices(64, seed=11)
    images = render_indices(idx, rng, WORLD).astype(np.float32) / 255
    # off-palette colours, heavy blur, random junk, float input, a single pixel, an all-object image
    images[:16] = 0.8 * images[:16] + 0.2 * rng.random((16, 1, 1, 3))
    images[16:32] = oracle._shift_sum(oracle._shift_sum(images[16:32])) / 81
    images[32:40] = rng.random((8, 32, 32, 3))
    images[40] = 0.0
    images[40, 16, 16] = 1.0
    images[41] = 0.3
    det = oracle.detect(images, WORLD)
    for key in ("quality", "sharpness", "noise", "contrast", "fg_conf", "bg_conf", "shape_conf"):
        assert np.isfinite(det[key]).all() and (det[key] >= 0).all() and (det[key] <= 1).all(), key
    assert det["has_object"][:16].all()
    assert not det["has_object"][40] and not det["has_object"][41]  # one pixel is below the object size
    assert (det["quality"][32:40] < 0.3).all()  # random junk is low quality
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        oracle.detect(images * 2 - 1, WORLD)
    assert oracle.detect(np.zeros((0, 32, 32, 3), np.uint8), WORLD)["quality"].shape == (0,)


# --------------------------------------------------------------------------------------------------------
# Annotator and auxiliary scorers
# --------------------------------------------------------------------------------------------------------


def mixed_pairs(n: int, seed: int):
    """Pairs of renders for the same prompt; each image has a wrong attribute or a flaw with some chance."""
    rng = np.random.default_rng(seed)
    target = random_indices(n, seed=seed)
    shown = []
    for _ in range(2):
        idx = target.copy()
        for col, size in ((0, len(WORLD.colours)), (1, len(WORLD.shapes))):
            wrong = rng.random(n) < 0.35
            idx[wrong, col] = (idx[wrong, col] + rng.integers(1, size, wrong.sum())) % size
        idx[idx[:, 0] == idx[:, 2], 0] = target[idx[:, 0] == idx[:, 2], 0]  # keep fg != bg
        flaws = {name: rng.random(n) < 0.2 for name in FLAWS}
        shown.append(render_indices(idx, rng, WORLD, flaws=flaws))
    return target, shown[0], shown[1]


def test_annotator_is_reproducible_and_bradley_terry():
    cfg = AnnotatorConfig()
    target, im0, im1 = mixed_pairs(1000, seed=12)
    a = annotator.annotate_images(im0, im1, target, WORLD, cfg, np.random.default_rng(0))
    b = annotator.annotate(a["reward_0"], a["reward_1"], cfg, np.random.default_rng(0))
    c = annotator.annotate(a["reward_0"], a["reward_1"], cfg, np.random.default_rng(1))
    assert (a["label_0"] == b[0]).all() and (a["label_1"] == b[1]).all()  # same seed, same labels
    assert (a["label_0"] != c[0]).any()
    assert set(np.unique(a["label_0"])) <= {0.0, 0.5, 1.0}
    assert (a["label_0"] + a["label_1"] == 1.0).all()
    diff = a["reward_0"] - a["reward_1"]
    assert ((a["label_0"] == 0.5) == (np.abs(diff) < cfg.tie_margin)).all()
    agreement = annotator.agreement_with_noiseless((a["label_0"], a["label_1"]), a["reward_0"], a["reward_1"])
    print(f"\n[annotator] tau={cfg.temperature} lambda={cfg.quality_weight} delta={cfg.tie_margin}: "
          f"agreement with the noiseless reward = {agreement:.3f} on {int((a['label_0'] != 0.5).sum())} decided "
          f"pairs; ties {np.mean(a['label_0'] == 0.5):.3f}")
    assert 0.85 < agreement < 0.99  # noisy like people, far better than chance
    for tau in (0.05, 0.3):
        other = dataclasses.replace(cfg, temperature=tau)
        labels = annotator.annotate(a["reward_0"], a["reward_1"], other, np.random.default_rng(0))
        print(f"[annotator] tau={tau}: agreement = "
              f"{annotator.agreement_with_noiseless(labels, a['reward_0'], a['reward_1']):.3f}")
    # Bradley-Terry frequencies: a reward gap of tau * log(3) wins 75% of the time
    gap = np.full(20000, cfg.temperature * np.log(3.0))
    label_0, _ = annotator.annotate(gap, np.zeros_like(gap), cfg, np.random.default_rng(3))
    assert abs(label_0.mean() - 0.75) < 0.015


def test_annotator_rejects_bad_config():
    with pytest.raises(ConfigError, match="annotator.temperature"):
        annotator.annotate(np.zeros(2), np.ones(2), AnnotatorConfig(temperature=0.0), np.random.default_rng(0))


def test_aux_scores_follow_their_attributes_and_correlate_with_reward():
    base = [Triple("red", "circle", "blue")] * 50
    rng = np.random.default_rng(13)
    right = aux.aux_scores(render(base, rng, WORLD), base, WORLD)
    wrong_colour = aux.aux_scores(render([Triple("yellow", "circle", "blue")] * 50, rng, WORLD), base, WORLD)
    wrong_shape = aux.aux_scores(render([Triple("red", "square", "blue")] * 50, rng, WORLD), base, WORLD)
    assert right["clip"].min() > 0.9 and right["vqa"].min() > 0.9 and right["aesthetic"].min() > 7.0
    assert wrong_colour["clip"].max() < 0.7 and wrong_colour["vqa"].min() > 0.9  # vqa: shape + bg only
    assert wrong_shape["vqa"].max() < 0.7 and wrong_shape["clip"].min() > 0.9  # clip: colours only
    assert (right["aesthetic"] <= 10).all() and (right["aesthetic"] >= 0).all()

    target, im0, _ = mixed_pairs(1000, seed=14)
    det = oracle.detect(im0, WORLD)
    scores = aux.aux_scores(im0, target, WORLD, detection=det)
    r = annotator.reward(oracle.judge_detection(det, target), AnnotatorConfig())
    for name in aux.AUX_NAMES:
        corr = np.corrcoef(scores[name], r)[0, 1]
        print(f"[aux] corr({name}, annotator reward) = {corr:.2f}")
        assert 0.2 < corr < 0.97, name
