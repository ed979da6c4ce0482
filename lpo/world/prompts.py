"""The shapes world's grammar: vocabulary, prompt text, parsing and the train/val/test split of triples.

A prompt describes one *triple* (fg colour, shape, bg colour) with fg != bg:
"a red circle on a blue background", "an orange square on a white background".

Growing the grammar (size, position, count, ...) means: a new field in :class:`Triple`, its vocabulary
here, a slot in :func:`format_prompt` / the parser's regular expression, a render parameter in
``render.py`` and a detector in ``oracle.py``. Nothing else indexes triples by position except
:func:`triple_indices`, which names the fields.
"""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple, Sequence, Union

import numpy as np

from lpo.config import ConfigError, WorldConfig

# Every colour name the grammar knows, with its sRGB value (0..255). A world uses the subset listed in
# world.colours. The default eight are >= 80 apart (Euclidean, 0..255) so nearest-colour decisions are safe;
# extra ones are here so a config can grow the palette without code changes.
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 130, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "pink": (250, 150, 200),
    "brown": (120, 70, 30),
    "cyan": (40, 210, 220),
    "grey": (128, 128, 128),
}

# Every shape name the grammar knows: 0 = disc, n >= 3 = regular n-gon (render.py draws both).
SHAPE_SIDES: dict[str, int] = {
    "circle": 0,
    "triangle": 3,
    "square": 4,
    "pentagon": 5,
    "hexagon": 6,
}

SPLITS = ("train", "val", "test")
# What functions taking "triples" accept: Triples, (fg, shape, bg) name sequences, or an (N, 3) index array.
TripleLike = Union[Sequence[Sequence[str]], np.ndarray]
_VOWELS = "aeiou"


class Triple(NamedTuple):
    """One prompt of the shapes world (names, not indices)."""

    fg: str
    shape: str
    bg: str


def check_world(world: WorldConfig) -> None:
    """Raise ConfigError naming the `world.<field>` that the grammar or the split cannot use."""
    for field, names, known in (("colours", world.colours, COLOUR_RGB), ("shapes", world.shapes, SHAPE_SIDES)):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"world.{field}: unknown name(s) {unknown} (known: {', '.join(known)})")
        if len(set(names)) != len(names):
            raise ConfigError(f"world.{field}: duplicate names in {names}")
    if len(world.colours) < 3:
        raise ConfigError(f"world.colours: need at least 3 colours (fg != bg, held-out triples), got {world.colours}")
    if not world.shapes:
        raise ConfigError("world.shapes: need at least one shape")
    for field in ("val_fraction", "test_fraction"):
        value = getattr(world, field)
        if not 0.0 <= value < 0.5:
            raise ConfigError(f"world.{field}: expected a share in [0, 0.5), got {value}")


# --------------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in _VOWELS else "a"


def format_prompt(triple: Triple) -> str:
    """'a red circle on a blue background' (with 'an' before a vowel: 'an orange square ...')."""
    return f"{_article(triple.fg)} {triple.fg} {triple.shape} on {_article(triple.bg)} {triple.bg} background"


# Both articles are accepted in either place: a human-typed "a orange circle" means the same triple.
_PROMPT_RE = re.compile(r"^an? (?P<fg>[a-z]+) (?P<shape>[a-z]+) on an? (?P<bg>[a-z]+) background$")


def parse_prompt(text: str, world: WorldConfig | None = None) -> Triple:
    """Parse a prompt back into its triple; raise ValueError quoting the text when it is not one.

    Case and runs of whitespace are ignored. With `world`, the words must be in that world's vocabulary;
    without it, in the grammar's full vocabulary (COLOUR_RGB, SHAPE_SIDES).
    """
    colours = world.colours if world is not None else list(COLOUR_RGB)
    shapes = world.shapes if world is not None else list(SHAPE_SIDES)
    normalised = " ".join(str(text).lower().split())
    match = _PROMPT_RE.match(normalised)
    if match is None:
        raise ValueError(f"not a shapes prompt ('a <colour> <shape> on a <colour> background'): {text!r}")
    triple = Triple(match["fg"], match["shape"], match["bg"])
    if triple.fg not in colours:
        raise ValueError(f"unknown foreground colour {triple.fg!r} in prompt {text!r} (known: {', '.join(colours)})")
    if triple.shape not in shapes:
        raise ValueError(f"unknown shape {triple.shape!r} in prompt {text!r} (known: {', '.join(shapes)})")
    if triple.bg not in colours:
        raise ValueError(f"unknown background colour {triple.bg!r} in prompt {text!r} (known: {', '.join(colours)})")
    if triple.fg == triple.bg:
        raise ValueError(f"foreground and background colour are the same ({triple.fg!r}) in prompt {text!r}")
    return triple


# --------------------------------------------------------------------------------------------------------
# Triples <-> indices
# --------------------------------------------------------------------------------------------------------


def all_triples(world: WorldConfig) -> list[Triple]:
    """Every valid triple of the world, in canonical order (fg, shape, bg as listed in the config)."""
    return [
        Triple(fg, shape, bg)
        for fg, shape, bg in itertools.product(world.colours, world.shapes, world.colours)
        if fg != bg
    ]


def triple_indices(triples: TripleLike, world: WorldConfig) -> np.ndarray:
    """(N, 3) int64 indices [fg colour, shape, bg colour] into world.colours / world.shapes.

    Accepts Triples, any (fg, shape, bg) name sequences (e.g. lists read from prompts.json), or an (N, 3)
    integer array, which is range-checked and returned as is.
    """
    if isinstance(triples, np.ndarray) and np.issubdtype(triples.dtype, np.integer):
        out = triples.astype(np.int64).reshape(-1, 3)
        limits = np.array([len(world.colours), len(world.shapes), len(world.colours)])
        if out.size and ((out < 0) | (out >= limits)).any():
            raise ValueError(f"triple indices out of range: {len(world.colours)} colours, {len(world.shapes)} shapes")
        return out
    colour_ix = {c: i for i, c in enumerate(world.colours)}
    shape_ix = {s: i for i, s in enumerate(world.shapes)}
    out = np.empty((len(triples), 3), dtype=np.int64)
    for n, t in enumerate(triples):
        fg, shape, bg = t
        try:
            out[n] = (colour_ix[fg], shape_ix[shape], colour_ix[bg])
        except KeyError as err:
            raise ValueError(f"triple {tuple(t)} uses {err.args[0]!r}, which world.colours/world.shapes lack") from None
    return out


def triples_from_indices(indices: np.ndarray, world: WorldConfig) -> list[Triple]:
    """Inverse of :func:`triple_indices`."""
    return [Triple(world.colours[f], world.shapes[s], world.colours[b]) for f, s, b in np.asarray(indices)]


# --------------------------------------------------------------------------------------------------------
# Split
# --------------------------------------------------------------------------------------------------------


def _roles(t: Triple) -> tuple[tuple[str, str], ...]:
    """The (role, value) items a triple contributes to coverage of the train split."""
    return (("fg", t.fg), ("shape", t.shape), ("bg", t.bg))


def split_triples(world: WorldConfig) -> dict[str, list[Triple]]:
    """Split all triples into train / val / test, deterministically by world.split_seed.

    Test triples are held out of pretraining and of LRM training altogether (like Pick-a-Pic's
    validation_unique); val triples may be pretrained on. Every colour keeps both roles (fg and bg) in train
    and every shape stays in train: triples are visited in a seeded random order and moved to test (then val)
    only while train keeps at least one other triple with each of their values. Each split is returned in
    canonical order.
    """
    check_world(world)
    triples = all_triples(world)
    n = len(triples)
    n_test = int(round(world.test_fraction * n))
    n_val = int(round(world.val_fraction * n))
    rng = np.random.default_rng(world.split_seed)
    order = rng.permutation(n)

    coverage: dict[tuple[str, str], int] = {}
    for t in triples:
        for item in _roles(t):
            coverage[item] = coverage.get(item, 0) + 1
    held: dict[str, list[int]] = {"test": [], "val": []}
    for i in order:
        split = "test" if len(held["test"]) < n_test else "val" if len(held["val"]) < n_val else None
        if split is None:
            break
        items = _roles(triples[i])
        if all(coverage[item] > 1 for item in items):
            held[split].append(int(i))
            for item in items:
                coverage[item] -= 1
    if len(held["test"]) < n_test or len(held["val"]) < n_val:
        raise ConfigError(
            f"world.test_fraction/val_fraction: cannot hold out {n_test} test + {n_val} val of {n} triples "
            "while keeping every colour (as fg and bg) and every shape in train"
        )
    held_out = set(held["test"]) | set(held["val"])
    return {
        "train": [t for i, t in enumerate(triples) if i not in held_out],
        "val": [triples[i] for i in sorted(held["val"])],
        "test": [triples[i] for i in sorted(held["test"])],
    }


def pretrain_triples(splits: dict[str, list[Triple]]) -> list[Triple]:
    """Triples the base model may be pretrained on: train + val (test is held out altogether)."""
    return list(splits["train"]) + list(splits["val"])
