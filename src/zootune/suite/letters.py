"""The ``letters`` target: which of 10 capital letters, typeset in 21 font faces, on a colour field.

A target where one MiniZoo member dominates and most transfer no better than training from scratch
(measured in docs/robustness.md): the glyphs are typeset with the TrueType fonts that ship inside
matplotlib (DejaVu Sans/Serif/Mono, STIX, Computer Modern; never seen by a member), rotated, moved and
scaled, and filled in one random colour on a smooth random colour field. Only the
``scene-segmentation`` member was pretrained to delineate coloured shapes on colour fields; the MNIST
member saw white strokes on black, the counting member small shapes in clutter, the keypoint member
one polygon's corners, the SimCLR member photographs.

Each glyph is drawn with Pillow at 4x the output size (anti-aliased by the downscale).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from zootune.suite import render
from zootune.errors import DataError

LETTERS = tuple("ABCDEFGHKR")
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)
GENERATOR_VERSION = 1  # bump when the images change


@functools.lru_cache(maxsize=None)
def font_paths() -> tuple[Path, ...]:
    """The bundled font files of matplotlib used for the glyphs (all of :data:`FONT_FILES`)."""
    try:
        import matplotlib
    except ImportError:
        raise DataError("the letters target typesets with matplotlib's bundled fonts; install it with "
                        "`pip install zootune[plot]`") from None
    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    missing = [name for name in FONT_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"matplotlib at {folder} lacks the fonts {missing}; the letters target needs all of {FONT_FILES}")
    return tuple(folder / name for name in FONT_FILES)


def letter_scenes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (n, size, size, 3) uint8 and labels (n,) int64 (index into :data:`LETTERS`).

    Per image: a letter and a font face uniformly at random; glyph height ~60-85% of the image,
    shifted up to 1/16 of the side, rotated up to 15 degrees; a smooth colour field (2-3 cells a
    side) and a glyph colour at least 0.5 (RGB distance) from the field's mean colour.
    """
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    paths = font_paths()
    big = 4 * size
    images = np.empty((n, size, size, 3), np.uint8)
    labels = np.empty(n, np.int64)
    for i in range(n):
        label = int(rng.integers(len(LETTERS)))
        font = ImageFont.truetype(str(paths[int(rng.integers(len(paths)))]), int(rng.integers(80, 110)) * size // 32)
        glyph = Image.new("L", (big, big), 0)
        centre = (big / 2 + rng.uniform(-8, 8) * size / 32, big / 2 + rng.uniform(-8, 8) * size / 32)
        ImageDraw.Draw(glyph).text(centre, LETTERS[label], fill=255, font=font, anchor="mm")
        glyph = glyph.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
        coverage = np.asarray(glyph.resize((size, size), Image.BILINEAR), np.float32)[..., None] / 255.0
        field = render.smooth_noise(rng, size // render.SUPERSAMPLE, cells=int(rng.integers(2, 4)))
        colour = render.random_color(rng, field.mean(axis=(0, 1)), min_dist=0.5)
        images[i] = render.to_uint8(field * (1.0 - coverage) + colour * coverage)
        labels[i] = label
    return images, labels
