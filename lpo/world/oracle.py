"""The shapes world's judge: analytic, vectorised detectors on pixels.

Per image (all steps are array operations over the batch):
1. background = per-channel median of the one-pixel border ring (the renderer keeps shapes off it);
2. object mask = pixels of a 3x3-smoothed image far from the background, the threshold rising with the
   estimated pixel noise; a mask (eroded back by the smoothing's pixel) under MIN_OBJECT_FRACTION of the
   image -> "no object";
3. object colour = mean of the raw pixels whose smoothed colour is farthest from the background (the
   object's interior, free of anti-aliased or blurred edges); colours are named by the nearest palette
   colour *up to contrast*: the distance to the segment from the palette colour towards mid-grey (down to
   CONTRAST_FLOOR), so a washed-out red is still red (low contrast is a quality flaw, scored below);
4. shape = nearest prototype in a rotation-invariant feature space: the n-fold symmetry strengths
   f_n = |sum c z^n| / sum c |z|^n (n = 3..6) of the soft coverage c around its centroid (z complex pixel
   offsets). A disc has f = 0, a triangle f_3 (and f_6) > 0, a square f_4 > 0; rotation changes only the phase
   of sum c z^n, and an isotropic blur leaves it unchanged;
5. quality in [0, 1] = sharpness x noise x contrast (each in [0, 1], see :func:`quality_parts`).

Works on any RGB image (generated ones too: blurry, off-palette, empty): never raises on content.
"""

from __future__ import annotations

import functools

import numpy as np

from lpo.config import WorldConfig
from lpo.world.prompts import SHAPE_SIDES, TripleLike, triple_indices
from lpo.world.render import coverage, palette

GREY = 0.5
CONTRAST_FLOOR = 0.3  # colour naming accepts palette colours washed towards grey down to this factor
MIN_OBJECT_FRACTION = 0.005  # smaller masks are "no object" (the smallest rendered triangle covers ~6%)
MASK_THRESHOLD_MIN = 0.08  # minimal colour distance (RGB in [0, 1]) of an object pixel from the background
NOISE_SCALE = 0.05  # noise score = exp(-sigma / NOISE_SCALE); sigma = estimated pixel-noise std
CORE_FRACTION = 0.95  # object colour = pixels at >= 95% of the largest (smoothed) distance from the background
SHARPNESS_TOP_K = 8  # sharpness = mean of the K steepest 2-pixel transitions
COLOUR_SOFTNESS = 0.08  # std of the Gaussian colour likelihood behind the colour confidences
SHAPE_SOFTNESS = 0.06  # the same for the shape features
SYMMETRY_ORDERS = (3, 4, 5, 6)
# Blur and small, rounded renders damp high harmonics most (a blurred small triangle keeps ~60% of its f_3 but
# ~35% of its f_6), so the shape distance weights them less; f_6 still separates a hexagon from a circle.
SYMMETRY_WEIGHTS = np.sqrt(np.array([1.0, 1.0, 0.5, 0.25], dtype=np.float32))
SHAPE_SHARPEN = 2.0  # coverage -> clip(0.5 + gain (c - 0.5)): undoes part of a blur before the moments
_CHUNK = 1024


def _as_float(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3), or float in [0, 1], to float32 in [0, 1]; raise on anything else."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape[1:3]) < 8:
        raise ValueError(f"expected images of shape (N, H, W, 3) with H, W >= 8, got {images.shape}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if np.issubdtype(images.dtype, np.floating):
        if images.size and (np.nanmin(images) < -1e-3 or np.nanmax(images) > 1 + 1e-3):
            raise ValueError("float images must be in [0, 1] (convert [-1, 1] model outputs first)")
        return np.clip(np.nan_to_num(images.astype(np.float32)), 0.0, 1.0)
    raise ValueError(f"expected uint8 or float images, got dtype {images.dtype}")


def _shift_sum(x: np.ndarray, radius: int = 1) -> np.ndarray:
    """Sum over the (2r+1)^2 neighbourhood of (B, H, W, ...) with edge padding."""
    h, w = x.shape[1:3]
    pad = [(0, 0), (radius, radius), (radius, radius)] + [(0, 0)] * (x.ndim - 3)
    p = np.pad(x, pad, mode="edge")
    out = np.zeros_like(x)
    for i in range(2 * radius + 1):
        for j in range(2 * radius + 1):
            out += p[:, i:i + h, j:j + w]
    return out


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of (B, H, W)."""
    return _shift_sum(mask.astype(np.float32)) > 0


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion of (B, H, W) (edge-padded)."""
    return _shift_sum(mask.astype(np.float32)) > 8.5


def border_ring(x: np.ndarray) -> np.ndarray:
    """(B, 4(S-1), 3) pixels of the outermost ring."""
    return np.concatenate([x[:, 0, :], x[:, -1, :], x[:, 1:-1, 0], x[:, 1:-1, -1]], axis=1)


def estimate_noise(x: np.ndarray) -> np.ndarray:
    """Robust pixel-noise std (B,): median |x - mean of 4 neighbours| over interior pixels and channels.

    For i.i.d. Gaussian noise the residual has std sigma * sqrt(1 + 1/4); edges touch too few pixels to move
    the median, so clean renders give 0.
    """
    centre = x[:, 1:-1, 1:-1]
    neighbours = (x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:]) / 4
    resid = np.abs(centre - neighbours).reshape(len(x), -1)  # (B, (H-2)(W-2)3)
    return np.median(resid, axis=1) / (0.6745 * np.sqrt(1.25))


def colour_distances(colours: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """(B, C) distances of colours (B, 3) to each palette colour (C, 3) up to contrast (oracle step 3).

    d_j = min over k in [CONTRAST_FLOOR, 1] of || x - (g + k (p_j - g)) ||, g = mid-grey: the distance to the
    segment from p_j towards grey, i.e. to p_j as any contrast reduction down to CONTRAST_FLOOR shows it.
    """
    v = pal - GREY  # (C, 3)
    u = colours - GREY  # (B, 3)
    vv = np.maximum((v * v).sum(1), 1e-12)  # (C,)
    k = np.clip(u @ v.T / vv, CONTRAST_FLOOR, 1.0)  # (B, C)
    diff = u[:, None, :] - k[:, :, None] * v[None]  # (B, C, 3)
    return np.sqrt((diff * diff).sum(-1))


def soft_probs(dist: np.ndarray, softness: float) -> np.ndarray:
    """Softmax of -d^2 / (2 s^2) along the last axis: the classes' posterior under a Gaussian likelihood."""
    logits = -0.5 * (dist / softness) ** 2
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def symmetry_features(cov: np.ndarray) -> np.ndarray:
    """(B, len(SYMMETRY_ORDERS)) rotation-invariant n-fold symmetry strengths of soft masks (B, H, W).

    f_n = |sum c z^n| / sum c |z|^n, z = pixel offset from the centroid as a complex number (oracle step 4).
    """
    h, w = cov.shape[1:]
    cov = cov.astype(np.float32)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mass = np.maximum(cov.sum((1, 2)), 1e-6)  # (B,)
    cx = (cov * xs).sum((1, 2)) / mass
    cy = (cov * ys).sum((1, 2)) / mass
    z = ((xs[None] - cx[:, None, None]) + 1j * (ys[None] - cy[:, None, None])).astype(np.complex64)  # (B, H, W)
    r = np.abs(z)
    cz, cr = cov * z, cov * r  # c z^n and c |z|^n, raised one power per order
    for _ in range(SYMMETRY_ORDERS[0] - 1):
        cz, cr = cz * z, cr * r
    feats = []
    for n in SYMMETRY_ORDERS:
        if n != SYMMETRY_ORDERS[0]:
            cz, cr = cz * z, cr * r
        feats.append(np.abs(cz.sum((1, 2))) / np.maximum(cr.sum((1, 2)), 1e-6))
    return np.stack(feats, axis=1).astype(np.float32)


def sharpen(cov: np.ndarray) -> np.ndarray:
    """Steepen soft coverage around 0.5 (keeps 0 outside the support)."""
    return np.clip(0.5 + SHAPE_SHARPEN * (cov - 0.5), 0.0, 1.0) * (cov > 0)


def shape_distances(feats: np.ndarray, protos: np.ndarray) -> np.ndarray:
    """(B, S) weighted Euclidean distances of features (B, F) to the shape prototypes (S, F)."""
    return np.linalg.norm((feats[:, None, :] - protos[None]) * SYMMETRY_WEIGHTS, axis=-1)


@functools.lru_cache(maxsize=8)
def _shape_prototypes(shapes: tuple[str, ...]) -> np.ndarray:
    """(S, F) symmetry features of each shape, from one clean, large render (rotation-invariant)."""
    world = WorldConfig(resolution=96, shapes=list(shapes), size_range=[0.4, 0.4], rotation_deg=0.0)
    layout = {k: np.full(len(shapes), v, dtype=np.float64) for k, v in (("r", 38.4), ("angle", 0.0), ("cx", 48.0),
                                                                        ("cy", 48.0))}
    return symmetry_features(sharpen(coverage(np.arange(len(shapes)), layout, world)))


def shape_prototypes(world: WorldConfig) -> np.ndarray:
    """(S, F) prototype features for world.shapes (circle = 0; n-gons by their symmetry)."""
    unknown = [name for name in world.shapes if name not in SHAPE_SIDES]
    if unknown:
        raise ValueError(f"world.shapes: unknown shape(s) {unknown} (known: {', '.join(SHAPE_SIDES)})")
    return _shape_prototypes(tuple(world.shapes))


def quality_parts(t: np.ndarray, sigma: np.ndarray, contrast: np.ndarray, has_object: np.ndarray) -> dict:
    """Quality components in [0, 1] and their product (oracle step 5).

    sharpness: mean of the SHARPNESS_TOP_K largest 2-pixel steps max(|t(x+1)-t(x-1)|, |t(y+1)-t(y-1)|) of the
      normalised profile t (0 on the background colour, 1 on the object colour): an anti-aliased edge moves
      t from 0 to 1 within 2 pixels, a blurred one does not (sigma 1 px: ~0.68);
    noise: exp(-sigma / NOISE_SCALE) of the estimated noise std;
    contrast: ||fg - bg|| / ||palette(fg) - palette(bg)||, 1 for a clean render, k after a contrast factor k.
    An image without an object has sharpness and contrast 0.
    """
    dx = np.abs(t[:, 1:-1, 2:] - t[:, 1:-1, :-2])  # (B, H-2, W-2)
    dy = np.abs(t[:, 2:, 1:-1] - t[:, :-2, 1:-1])
    steps = np.minimum(np.maximum(dx, dy), 1.0).reshape(len(t), -1)
    k = min(SHARPNESS_TOP_K, steps.shape[1])
    sharp = np.partition(steps, steps.shape[1] - k, axis=1)[:, -k:].mean(1)
    sharp = np.where(has_object, sharp, 0.0)
    noise = np.exp(-sigma / NOISE_SCALE)
    contrast = np.where(has_object, np.clip(contrast, 0.0, 1.0), 0.0)
    return {"sharpness": sharp, "noise": noise, "contrast": contrast, "quality": sharp * noise * contrast}


def _detect_chunk(x: np.ndarray, pal: np.ndarray, protos: np.ndarray) -> dict[str, np.ndarray]:
    b, h, w, _ = x.shape
    sigma = estimate_noise(x)
    # 1. background
    bg_rgb = np.median(border_ring(x), axis=1)  # (B, 3)
    # 2. object mask on a 3x3 box-smoothed image (noise std / 3); threshold ~6 smoothed-noise stds
    smooth = _shift_sum(x) / 9.0
    thr = np.maximum(MASK_THRESHOLD_MIN, 2.0 * sigma)  # (B,)
    dist_bg = np.linalg.norm(smooth - bg_rgb[:, None, None, :], axis=-1)  # (B, H, W)
    far = dist_bg > thr[:, None, None]
    # the size test counts the eroded mask: smoothing grew the mask by a pixel (a lone pixel became 3x3)
    has_object = _erode(far).sum((1, 2)) >= max(1, int(np.ceil(MIN_OBJECT_FRACTION * h * w)))
    # 3. object colour: mean of the raw pixels whose smoothed colour is farthest from the background (>= 95%
    # of the maximum): the object's interior, without anti-aliased or blurred edges
    dist = np.where(far, dist_bg, 0.0)
    core = dist >= CORE_FRACTION * dist.max((1, 2), keepdims=True)  # (B, H, W)
    fg_rgb = (x * core[..., None]).sum((1, 2)) / np.maximum(core.sum((1, 2)), 1)[:, None]  # (B, 3)
    fg_rgb = np.where(has_object[:, None], fg_rgb, np.nan)
    # colour names
    d_bg = colour_distances(bg_rgb, pal)
    bg_p = soft_probs(d_bg, COLOUR_SOFTNESS)
    bg_ix = d_bg.argmin(1)
    d_fg = colour_distances(np.nan_to_num(fg_rgb), pal)
    fg_p = soft_probs(d_fg, COLOUR_SOFTNESS)
    fg_ix = np.where(has_object, d_fg.argmin(1), -1)
    fg_p = np.where(has_object[:, None], fg_p, 0.0)
    # 4. shape from the soft coverage t (0 on bg, 1 on fg) of the raw image, restricted near the mask
    axis = np.nan_to_num(fg_rgb) - bg_rgb
    norm2 = np.maximum((axis * axis).sum(-1), 1e-6)[:, None, None]
    t = ((x - bg_rgb[:, None, None]) * axis[:, None, None]).sum(-1) / norm2  # (B, H, W)
    t_smooth = ((smooth - bg_rgb[:, None, None]) * axis[:, None, None]).sum(-1) / norm2
    support = _dilate(far & (t_smooth > 0.5))
    cov = np.clip(t, 0.0, 1.0) * support
    feats = symmetry_features(sharpen(cov))
    d_shape = shape_distances(feats, protos)  # (B, S)
    shape_p = np.where(has_object[:, None], soft_probs(d_shape, SHAPE_SOFTNESS), 0.0)
    shape_ix = np.where(has_object, d_shape.argmin(1), -1)
    # 5. quality
    pal_fg = pal[np.maximum(fg_ix, 0)]
    pal_bg = pal[bg_ix]
    denom = np.linalg.norm(pal_fg - pal_bg, axis=-1)
    # contrast relative to the palette pair it was named as (0 when fg and bg got the same name)
    measured = np.linalg.norm(np.nan_to_num(fg_rgb) - bg_rgb, axis=-1)
    contrast = np.where(denom > 0, measured / np.maximum(denom, 1e-6), 0.0)
    parts = quality_parts(t, sigma, contrast, has_object)
    area = np.where(has_object, cov.sum((1, 2)) / (h * w), 0.0)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    mass = np.maximum(cov.sum((1, 2)), 1e-6)
    centre = np.stack([(cov * xs).sum((1, 2)) / mass / w, (cov * ys).sum((1, 2)) / mass / h], axis=1)  # (B, 2)
    return {
        "has_object": has_object,
        "bg": bg_ix,
        "fg": fg_ix,
        "shape": shape_ix,
        "bg_conf": bg_p[np.arange(b), bg_ix],
        "fg_conf": np.where(has_object, fg_p[np.arange(b), np.maximum(fg_ix, 0)], 0.0),
        "shape_conf": np.where(has_object, shape_p[np.arange(b), np.maximum(shape_ix, 0)], 0.0),
        "bg_probs": bg_p,
        "fg_probs": fg_p,
        "shape_probs": shape_p,
        "bg_rgb": bg_rgb,
        "fg_rgb": fg_rgb,
        "shape_features": feats,
        "area": area,
        "centre": np.where(has_object[:, None], centre, np.nan),
        "noise_sigma": sigma,
        **parts,
    }


def detect(images: np.ndarray, world: WorldConfig) -> dict[str, np.ndarray]:
    """Detect background, object colour and shape, with confidences and quality, for (N, H, W, 3) images.

    Returns arrays over N: has_object (bool); bg, fg, shape (indices into world.colours / world.shapes; fg and
    shape are -1 without an object); bg_conf, fg_conf, shape_conf and bg_probs, fg_probs (N, C),
    shape_probs (N, S) (Gaussian-likelihood posteriors, 0 without an object); quality, sharpness, noise,
    contrast in [0, 1]; bg_rgb, fg_rgb (N, 3; fg NaN without an object); shape_features (N, F);
    area (object share of the image), centre (N, 2, as a fraction of the side), noise_sigma.
    """
    x = _as_float(images)
    pal = palette(world)
    protos = shape_prototypes(world)
    if len(x) == 0:  # the same keys, dtypes and trailing shapes, with no rows
        return {key: value[:0] for key, value in _detect_chunk(np.zeros((1,) + x.shape[1:], np.float32), pal,
                                                                protos).items()}
    chunks = [_detect_chunk(x[s:s + _CHUNK], pal, protos) for s in range(0, len(x), _CHUNK)]
    return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


def judge_detection(det: dict[str, np.ndarray], target: np.ndarray) -> dict[str, np.ndarray]:
    """Per-attribute correctness of a detection against (N, 3) [fg, shape, bg] index triples."""
    fg = det["fg"] == target[:, 0]
    shape = det["shape"] == target[:, 1]
    bg = det["bg"] == target[:, 2]
    return {
        "fg": fg,
        "shape": shape,
        "bg": bg,
        "exact": fg & shape & bg,
        "quality": det["quality"],
        "has_object": det["has_object"],
    }


def judge(images: np.ndarray, triples: TripleLike, world: WorldConfig) -> dict[str, np.ndarray]:
    """Judge images against their prompt triples: bool arrays fg, shape, bg, exact, has_object; float quality.

    Without a detected object, fg and shape are wrong (bg may still be right).
    """
    target = triple_indices(triples, world)
    if len(target) != len(images):
        raise ValueError(f"judge: {len(images)} images but {len(target)} triples")
    return judge_detection(detect(images, world), target)
