"""Generated scenes for the MiniZoo's pretext tasks and for the target suite.

Pretraining scenes (used by MiniZoo members) and target scenes (used by :mod:`zootune.suite.targets`)
are drawn by *different* generators -- different shape kinds, styles (filled vs outlined), backgrounds
and seeds -- so no member has seen a target image, while the skills a member learned (delineating
shapes, counting objects, finding corners) still transfer.

All generators return uint8 images of shape (n, size, size, 3) plus their annotations.
"""

from __future__ import annotations

import numpy as np

from zootune.suite import render

# shape kinds of the segmentation / counting pretraining scenes (label 0 is background)
SCENE_SHAPES = ("disk", "square", "triangle")


def _shape_distance(kind: str, x, y, cx, cy, r, rotation):
    if kind == "disk":
        return render.disk_distance(x, y, cx, cy, r)
    sides = {"triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}[kind]
    return render.polygon_distance(x, y, render.regular_polygon(sides, cx, cy, r, rotation))


def segmentation_scenes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """1-4 filled disks/squares/triangles (later ones occlude earlier) on a smooth colour field.

    Returns images (n, size, size, 3) uint8 and label maps (n, size, size) int64 with 0 = background,
    1 + SCENE_SHAPES.index(kind) for shapes (majority label of each output pixel).
    """
    rng = np.random.default_rng(seed)
    x, y = render.pixel_grid(size)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty((n, size, size), np.int64)
    num_labels = 1 + len(SCENE_SHAPES)
    for i in range(n):
        canvas = render.smooth_noise(rng, size, cells=int(rng.integers(2, 5)))
        label = np.zeros(canvas.shape[:2], np.int64)
        for _ in range(int(rng.integers(1, 5))):
            k = int(rng.integers(len(SCENE_SHAPES)))
            r = rng.uniform(0.12, 0.3) * size
            cx, cy = rng.uniform(0.1, 0.9, 2) * size
            mask = render.coverage(_shape_distance(SCENE_SHAPES[k], x, y, cx, cy, r, rng.uniform(0, 2 * np.pi)))
            local = canvas[mask].mean(axis=0) if mask.any() else None
            render.paint(canvas, mask, render.random_color(rng, local))
            label[mask] = k + 1
        images[i] = render.to_uint8(render.downsample(canvas))
        onehot = np.eye(num_labels, dtype=np.float32)[label]
        labels[i] = render.downsample(onehot).argmax(-1)
    return images, labels


def counting_scenes(n: int, seed: int, size: int = 32, max_each: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Small disks/squares/triangles (0..max_each of each kind, placed without overlap) on clutter.

    Returns images and counts (n, 3) float32 in SCENE_SHAPES order.
    """
    rng = np.random.default_rng(seed)
    x, y = render.pixel_grid(size)
    images = np.empty((n, size, size, 3), np.uint8)
    counts = np.zeros((n, len(SCENE_SHAPES)), np.float32)
    for i in range(n):
        canvas = 0.3 + 0.4 * render.smooth_noise(rng, size, cells=int(rng.integers(4, 9)))
        placed: list[tuple[float, float, float]] = []
        wanted = rng.integers(0, max_each + 1, len(SCENE_SHAPES))
        for k, m in enumerate(wanted):
            for _ in range(int(m)):
                r = rng.uniform(1.8, 3.2)
                for _attempt in range(30):  # rejection sampling keeps objects apart, so counts are exact
                    cx, cy = rng.uniform(r + 0.5, size - r - 0.5, 2)
                    if all(np.hypot(cx - px, cy - py) > r + pr + 1.0 for px, py, pr in placed):
                        break
                else:
                    continue
                placed.append((cx, cy, r))
                mask = render.coverage(_shape_distance(SCENE_SHAPES[k], x, y, cx, cy, r, rng.uniform(0, 2 * np.pi)))
                color = render.random_color(rng, canvas[mask].mean(axis=0), min_dist=0.5)
                render.paint(canvas, mask, color)
                counts[i, k] += 1
        images[i] = render.to_uint8(render.downsample(canvas))
    return images, counts


def keypoint_shapes(
    n: int, seed: int, size: int = 32, heatmap_size: int = 16, sigma: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """One jittered convex polygon (3-7 corners, filled) per image; targets are corner heatmaps.

    The heatmap (heatmap_size x heatmap_size) is max_j exp(-|p - v_j|^2 / (2 sigma^2)) over the
    corners v_j, in heatmap pixels -- the keypoint-heatmap target of pose estimators.
    """
    rng = np.random.default_rng(seed)
    x, y = render.pixel_grid(size)
    hc = (np.arange(heatmap_size, dtype=np.float32) + 0.5) * (size / heatmap_size)
    hx, hy = np.meshgrid(hc, hc)
    scale = heatmap_size / size
    images = np.empty((n, size, size, 3), np.uint8)
    heatmaps = np.empty((n, heatmap_size, heatmap_size), np.float32)
    for i in range(n):
        canvas = render.smooth_noise(rng, size, cells=int(rng.integers(2, 6)))
        sides = int(rng.integers(3, 8))
        r = rng.uniform(0.25, 0.42) * size
        cx, cy = rng.uniform(0.5 * size - 4, 0.5 * size + 4, 2)
        verts = render.regular_polygon(sides, cx, cy, r, rng.uniform(0, 2 * np.pi), rng, jitter=0.5)
        mask = render.coverage(render.polygon_distance(x, y, verts))
        render.paint(canvas, mask, render.random_color(rng, canvas[mask].mean(axis=0), min_dist=0.5))
        images[i] = render.to_uint8(render.downsample(canvas))
        d2 = ((hx[None] - verts[:, 0, None, None]) ** 2 + (hy[None] - verts[:, 1, None, None]) ** 2) * scale**2
        heatmaps[i] = np.exp(-d2 / (2 * sigma**2)).max(axis=0)
    return images, heatmaps


# ----------------------------------------------------------------------------- target scenes


def count_target_scenes(n: int, seed: int, size: int = 32, max_count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Target "count": 1..max_count *outlined* ellipses, kept apart, on a striped clutter background;
    label = number of objects - 1. Outlines and ellipses never occur in pretraining (its shapes are
    filled disks, squares and triangles)."""
    rng = np.random.default_rng(seed)
    x, y = render.pixel_grid(size)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        base = render.smooth_noise(rng, size, cells=int(rng.integers(3, 7)))
        stripes = 0.5 + 0.5 * np.sin(x * rng.uniform(0.5, 1.5) + y * rng.uniform(-1, 1))
        canvas = 0.25 + 0.35 * base + 0.1 * stripes[..., None]
        count = int(rng.integers(1, max_count + 1))
        placed: list[tuple[float, float, float]] = []
        for _ in range(count):
            rx = rng.uniform(2.2, 3.8)
            for _attempt in range(50):
                cx, cy = rng.uniform(rx + 0.5, size - rx - 0.5, 2)
                if all(np.hypot(cx - px, cy - py) > rx + pr + 1.2 for px, py, pr in placed):
                    break
            else:
                count = len(placed)
                break
            placed.append((cx, cy, rx))
            ry = rx * rng.uniform(0.6, 1.0)
            theta = rng.uniform(0, np.pi)
            dx, dy = x - cx, y - cy
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
            mask = (rho <= 1.0) & (rho >= 1.0 - 1.3 / ry)
            render.paint(canvas, mask, render.random_color(rng, canvas[mask].mean(axis=0), min_dist=0.55))
        images[i] = render.to_uint8(render.downsample(canvas))
        labels[i] = len(placed) - 1
    return images, labels


POLYGON_SIDES = (3, 4, 5, 6)


def polygon_target_shapes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Target "polygons": one *outlined* irregular convex polygon with 3-6 sides; label = sides - 3.

    Sizes and positions vary more than in the keypoint pretraining scenes and the polygon is drawn as
    an outline, so the images differ while the corner-finding skill transfers.
    """
    rng = np.random.default_rng(seed)
    x, y = render.pixel_grid(size)
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        canvas = render.smooth_noise(rng, size, cells=int(rng.integers(4, 9)))
        k = int(rng.integers(len(POLYGON_SIDES)))
        r = rng.uniform(0.28, 0.45) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        verts = render.regular_polygon(POLYGON_SIDES[k], cx, cy, r, rng.uniform(0, 2 * np.pi), rng, jitter=0.2)
        mask = render.coverage(render.polygon_distance(x, y, verts), outline_width=rng.uniform(1.5, 2.5))
        render.paint(canvas, mask, render.random_color(rng, canvas[mask].mean(axis=0), min_dist=0.55))
        images[i] = render.to_uint8(render.downsample(canvas))
        labels[i] = k
    return images, labels
