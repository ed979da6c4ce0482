"""Seeded, vectorised renderer of the shapes world: one filled shape on a plain background.

Geometry (pixel centres at i + 0.5, y down): a shape has a centre (cx, cy), a *circumradius* r and a rotation.
A circle has radius r; a regular n-gon has its vertices on the circle of radius r (triangles apex up, squares
axis-aligned before rotation). Sizing by the circumradius means rotation never changes the extent, so a shape
is inside the image, with a clean border ring, for every rotation. Edges are anti-aliased with the signed
distance: coverage = clip(0.5 - sd, 0, 1).

Flaws (the pretraining corpus's "web data" defects, strengths from world.*):
blur (Gaussian, sigma px), low_contrast (x -> 0.5 + k (x - 0.5)), noise (Gaussian, std), applied in that order.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np

from lpo.config import ConfigError, WorldConfig
from lpo.world.prompts import COLOUR_RGB, SHAPE_SIDES, TripleLike, check_world, triple_indices

FLAWS = ("blur", "noise", "low_contrast")
# Distance in pixels between the shape's circumscribed circle and the image edge. The oracle takes the
# background colour from the one-pixel border ring, so anti-aliasing (0.5 px) must never reach it.
BORDER_MARGIN = 1.5
_CHUNK = 2048  # images per vectorised block (keeps temporaries ~100 MB at 32x32)


def palette(world: WorldConfig) -> np.ndarray:
    """(C, 3) float32 colours of world.colours in [0, 1]."""
    return np.array([COLOUR_RGB[c] for c in world.colours], dtype=np.float32) / 255.0


def _check_range(world: WorldConfig, field: str, low: float, high: float) -> tuple[float, float]:
    value = getattr(world, field)
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ConfigError(f"world.{field}: expected [min, max] with {low} <= min <= max <= {high}, got {value}")
    return float(value[0]), float(value[1])


def check_render(world: WorldConfig) -> None:
    """Raise ConfigError naming the world.<field> the renderer cannot honour."""
    check_world(world)
    if world.resolution < 8:
        raise ConfigError(f"world.resolution: expected >= 8 pixels, got {world.resolution}")
    _, r_max = _check_range(world, "size_range", 1e-3, 0.5)
    if 2 * r_max * world.resolution + 2 * BORDER_MARGIN > world.resolution:
        raise ConfigError(
            f"world.size_range: a radius of {r_max} x {world.resolution} px does not fit inside the image with a "
            f"{BORDER_MARGIN}-px margin; lower the maximum to <= {0.5 - BORDER_MARGIN / world.resolution:.3f}"
        )
    if not 0.0 <= world.rotation_deg <= 180.0:
        raise ConfigError(f"world.rotation_deg: expected 0..180, got {world.rotation_deg}")
    _check_range(world, "blur_sigma", 0.0, 8.0)
    _check_range(world, "noise_std", 0.0, 1.0)
    _check_range(world, "contrast_factor", 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# Layout and drawing
# --------------------------------------------------------------------------------------------------------


def sample_layout(n: int, rng: np.random.Generator, world: WorldConfig) -> dict[str, np.ndarray]:
    """Per-image jitter: circumradius r (px), rotation (rad), centre (cx, cy) in px; each (n,) float64."""
    side = world.resolution
    r = rng.uniform(world.size_range[0], world.size_range[1], n) * side
    angle = np.deg2rad(rng.uniform(-world.rotation_deg, world.rotation_deg, n))
    # The centre is uniform over the positions that keep the circumscribed circle BORDER_MARGIN inside.
    low, high = r + BORDER_MARGIN, side - r - BORDER_MARGIN
    cx = low + rng.random(n) * (high - low)
    cy = low + rng.random(n) * (high - low)
    return {"r": r, "angle": angle, "cx": cx, "cy": cy}


def signed_distance(shape_sides: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Signed distance (px, negative inside) from pixel offsets (B, H, W) to a disc or a regular n-gon.

    n-gon: max over edges of the distance along the edge normal minus the apothem r cos(pi/n); exact inside
    and along the edges, slightly short near outside corners, which is all anti-aliasing needs.
    """
    r = r[:, None, None]  # (B, 1, 1)
    if shape_sides == 0:
        return np.sqrt(dx * dx + dy * dy) - r
    n = shape_sides
    # First vertex straight up (-y) for odd n; for even n a flat top edge (squares axis-aligned).
    first_vertex = -math.pi / 2 + (math.pi / n if n % 2 == 0 else 0.0)
    apothem = r * math.cos(math.pi / n)
    sd = np.full(dx.shape, -np.inf, dtype=dx.dtype)
    for k in range(n):
        normal = angle[:, None, None] + first_vertex + (2 * k + 1) * math.pi / n  # (B, 1, 1), mid-edge direction
        np.maximum(sd, dx * np.cos(normal) + dy * np.sin(normal) - apothem, out=sd)
    return sd


def coverage(shape_ix: np.ndarray, layout: Mapping[str, np.ndarray], world: WorldConfig) -> np.ndarray:
    """(N, H, W) float32 anti-aliased coverage of each image's shape."""
    side = world.resolution
    centres = np.arange(side, dtype=np.float32) + 0.5
    out = np.empty((len(shape_ix), side, side), dtype=np.float32)
    for s, name in enumerate(world.shapes):
        idx = np.flatnonzero(shape_ix == s)
        if idx.size == 0:
            continue
        dx = centres[None, None, :] - layout["cx"][idx, None, None].astype(np.float32)  # (B, 1, W)
        dy = centres[None, :, None] - layout["cy"][idx, None, None].astype(np.float32)  # (B, H, 1)
        dx, dy = np.broadcast_arrays(dx, dy)  # (B, H, W) each
        sd = signed_distance(SHAPE_SIDES[name], dx, dy, layout["r"][idx].astype(np.float32),
                             layout["angle"][idx].astype(np.float32))
        out[idx] = np.clip(0.5 - sd, 0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------------------
# Flaws
# --------------------------------------------------------------------------------------------------------


def gaussian_blur(images: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur of (B, H, W, 3) float images with a per-image sigma (B,), edge padding."""
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    offsets = np.arange(-radius, radius + 1, dtype=np.float32)
    weights = np.exp(-0.5 * (offsets[None, :] / np.maximum(sigma[:, None], 1e-6)) ** 2)  # (B, K)
    weights /= weights.sum(axis=1, keepdims=True)
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (radius, radius), (0, 0), (0, 0)), mode="edge")
    out = sum(weights[:, k, None, None, None] * padded[:, k:k + h] for k in range(2 * radius + 1))
    padded = np.pad(out, ((0, 0), (0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(weights[:, k, None, None, None] * padded[:, :, k:k + w] for k in range(2 * radius + 1))


def _check_flaws(flaws: Optional[Mapping[str, np.ndarray]], n: int) -> dict[str, np.ndarray]:
    out = {name: np.zeros(n, dtype=bool) for name in FLAWS}
    for name, mask in (flaws or {}).items():
        if name not in out:
            raise ValueError(f"unknown flaw {name!r} (known: {', '.join(FLAWS)})")
        mask = np.asarray(mask)
        if mask.shape != (n,) or mask.dtype != bool:
            raise ValueError(f"flaw {name!r}: expected a bool array of shape ({n},), got {mask.dtype} {mask.shape}")
        out[name] = mask
    return out


def apply_flaws(
    images: np.ndarray, flaws: Mapping[str, np.ndarray], rng: np.random.Generator, world: WorldConfig
) -> np.ndarray:
    """Blur, then low contrast, then noise, each on the images its bool mask (N,) selects; returns a copy.

    Strengths are drawn per image for all N images (so the draws do not depend on which images are
    flawed), then the noise field for the noisy ones.
    """
    n = len(images)
    flaws = _check_flaws(flaws, n)
    sigma = rng.uniform(world.blur_sigma[0], world.blur_sigma[1], n).astype(np.float32)
    k = rng.uniform(world.contrast_factor[0], world.contrast_factor[1], n).astype(np.float32)
    std = rng.uniform(world.noise_std[0], world.noise_std[1], n).astype(np.float32)
    out = images.copy()
    idx = np.flatnonzero(flaws["blur"])
    for start in range(0, idx.size, _CHUNK):
        part = idx[start:start + _CHUNK]
        out[part] = gaussian_blur(out[part], sigma[part])
    idx = np.flatnonzero(flaws["low_contrast"])
    out[idx] = 0.5 + k[idx, None, None, None] * (out[idx] - 0.5)
    idx = np.flatnonzero(flaws["noise"])
    noise = rng.standard_normal((idx.size,) + images.shape[1:], dtype=np.float32)
    out[idx] = np.clip(out[idx] + std[idx, None, None, None] * noise, 0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(images * 255.0), 0, 255).astype(np.uint8)


def render_indices(
    indices: np.ndarray,
    rng: np.random.Generator,
    world: WorldConfig,
    flaws: Optional[Mapping[str, np.ndarray]] = None,
    layout: Optional[Mapping[str, np.ndarray]] = None,
) -> np.ndarray:
    """Render (N, 3) [fg, shape, bg] index triples to uint8 (N, H, W, 3).

    Draws the layout from `rng` first (unless given), then the flaws: the same seed gives the same shapes
    with and without flaws.
    """
    check_render(world)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1, 3)
    n = len(indices)
    if layout is None:
        layout = sample_layout(n, rng, world)
    colours = palette(world)
    side = world.resolution
    images = np.empty((n, side, side, 3), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        sl = slice(start, start + _CHUNK)
        cov = coverage(indices[sl, 1], {k: v[sl] for k, v in layout.items()}, world)[..., None]  # (B, H, W, 1)
        fg = colours[indices[sl, 0]][:, None, None, :]  # (B, 1, 1, 3)
        bg = colours[indices[sl, 2]][:, None, None, :]  # (B, 1, 1, 3)
        images[sl] = bg + cov * (fg - bg)
    if flaws is not None:
        images = apply_flaws(images, flaws, rng, world)
    return to_uint8(images)


def render(
    triples: TripleLike,
    rng: np.random.Generator,
    world: WorldConfig,
    flaws: Optional[Mapping[str, np.ndarray]] = None,
) -> np.ndarray:
    """Render prompt triples (names) to uint8 (N, H, W, 3); `flaws` maps a FLAWS name to a bool mask (N,)."""
    return render_indices(triple_indices(triples, world), rng, world, flaws)
