"""Procedural images: shapes, polygons and cluttered backgrounds, rendered with numpy.

Shapes are rasterised from signed distances on a pixel grid at ``SUPERSAMPLE`` times the output
resolution and box-filtered down, so edges are anti-aliased. Everything draws from a given
``numpy.random.Generator``: the same seed gives the same images on every machine.

Signed distance to a convex polygon with vertices v_0..v_{k-1} (counter-clockwise)::

    d(p) = min_i  cross(v_{i+1} - v_i, p - v_i) / |v_{i+1} - v_i|     (> 0 inside)

and a disk of radius r centred at c: d(p) = r - |p - c|. A filled shape is d >= 0; an outline of
width w is 0 <= d < w.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SUPERSAMPLE = 2


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinates of pixel centres of a size x size canvas, in output-pixel units."""
    n = size * SUPERSAMPLE
    c = (np.arange(n, dtype=np.float32) + 0.5) / SUPERSAMPLE
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def disk_distance(x: np.ndarray, y: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    return r - np.hypot(x - cx, y - cy)


def polygon_distance(x: np.ndarray, y: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Signed distance (positive inside) to a convex polygon given by its (k, 2) vertices."""
    v0 = vertices
    v1 = np.roll(vertices, -1, axis=0)
    edges = v1 - v0
    # orientation: make "inside" positive whichever way the vertices go round
    signed_area = 0.5 * np.sum(v0[:, 0] * v1[:, 1] - v1[:, 0] * v0[:, 1])
    sign = 1.0 if signed_area > 0 else -1.0
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    d = None
    for (ex, ey), (ox, oy), length in zip(edges, v0, lengths):
        di = sign * (ex * (y - oy) - ey * (x - ox)) / length
        d = di if d is None else np.minimum(d, di)
    return d


def regular_polygon(
    sides: int, cx: float, cy: float, radius: float, rotation: float,
    rng: np.random.Generator | None = None, jitter: float = 0.0,
) -> np.ndarray:
    """Vertices (sides, 2) of a (optionally jittered) regular polygon; angles stay sorted -> convex."""
    angles = rotation + 2 * np.pi * np.arange(sides) / sides
    radii = np.full(sides, radius, dtype=np.float64)
    if rng is not None and jitter > 0:
        angles = angles + rng.uniform(-jitter, jitter, sides) * (np.pi / sides)
        radii = radii * rng.uniform(1 - 0.5 * jitter, 1.0, sides)
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)


def coverage(distance: np.ndarray, outline_width: float | None = None) -> np.ndarray:
    """Boolean mask at the supersampled resolution: filled (d >= 0) or an outline (0 <= d < w)."""
    if outline_width is None:
        return distance >= 0
    return (distance >= 0) & (distance < outline_width)


def paint(canvas: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """Paint ``color`` (3,) where ``mask`` (supersampled, bool) is set, in place on an (n, n, 3) canvas."""
    canvas[mask] = color


def downsample(canvas: np.ndarray) -> np.ndarray:
    """Box-filter a supersampled (n, n, ...) array to the output resolution."""
    s = SUPERSAMPLE
    n = canvas.shape[0] // s
    return canvas.reshape(n, s, n, s, *canvas.shape[2:]).mean(axis=(1, 3))


def smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int = 3) -> np.ndarray:
    """Smooth random field in [0, 1], shape (size*S, size*S, channels): bilinear upsampling of a
    cells x cells grid of uniform values (low ``cells`` = gentle gradients, high = clutter)."""
    grid = torch.from_numpy(rng.uniform(0, 1, (1, channels, cells, cells)).astype(np.float32))
    up = F.interpolate(grid, size=(size * SUPERSAMPLE,) * 2, mode="bilinear", align_corners=False)
    return up[0].permute(1, 2, 0).numpy().copy()


def random_color(rng: np.random.Generator, far_from: np.ndarray | None = None, min_dist: float = 0.35) -> np.ndarray:
    """A random RGB colour in [0, 1]^3, at least ``min_dist`` (Euclidean) from ``far_from`` if given,
    so that shapes stay visible against their local background."""
    for _ in range(20):
        c = rng.uniform(0, 1, 3)
        if far_from is None or np.linalg.norm(c - far_from) >= min_dist:
            return c
    return 1.0 - far_from if far_from is not None else c


def to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
