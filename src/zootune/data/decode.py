"""Reading one image file the way it is meant to be seen, and checking a whole folder before training.

:func:`read_rgb` gives the 8-bit RGB picture a viewer would show:

- EXIF orientation applied (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways with an
  orientation tag is read upright;
- 16-bit grey images (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``, and ``I``, whose values are
  taken as 16-bit) scaled to 8 bits, ``v8 = round(v16 * 255 / 65535)`` -- Pillow's own conversion
  clips them at 255 (an almost all-white image); 16-bit RGB(A) PNGs are already reduced to 8 bits by
  Pillow (high byte);
- palette, grey, grey+alpha, CMYK, RGBA, ... converted with ``Image.convert("RGB")``; an alpha channel
  is dropped, as torchvision's folder loader does, so a checkpoint trained with that loader sees the
  same pixels;
- images above ``max_pixels`` (width x height, default :data:`DEFAULT_MAX_PIXELS`, Pillow's own
  warning threshold) refused with one :class:`~zootune.errors.DataError` line instead of Pillow's
  two-line ``DecompressionBombWarning``. Pillow itself refuses anything above twice
  ``PIL.Image.MAX_IMAGE_PIXELS``; a ``max_pixels`` above that also needs that Pillow setting raised.

:func:`scan_images` opens every file's header only (no pixel decoding) in a thread pool and raises
ONE ``DataError`` listing every file that cannot be opened or is too large, so a folder with several
bad files is fixed in one go instead of one crash at a time. A file whose header is fine but whose
pixel data is truncated is only found when it is decoded (during training, by name).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from zootune.errors import DataError

# Pillow's DecompressionBombWarning threshold (PIL.Image.MAX_IMAGE_PIXELS as shipped): ~9459 x 9459.
DEFAULT_MAX_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# What Pillow raises for a file it cannot identify or decode.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _too_large(path: Path, width: int, height: int, max_pixels: int) -> str:
    return (
        f"{path}: {width}x{height} = {width * height:,} pixels, above the limit of {max_pixels:,} "
        "(raise max_pixels / --max-image-pixels if the image is intended)"
    )


def _reason(err: BaseException, path: Path) -> str:
    """Pillow's message without the path it repeats ("cannot identify image file '/x/y.png'")."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text.replace(f" {str(path)!r}", "").replace(f" {str(path)}", "")


def _to_8bit_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        values = np.clip(values, 0, 65535)
        # round(v * 255 / 65535) in integers (65535 = 255 * 257)
        eight = ((values * 255 + 32767) // 65535).astype(np.uint8)
        image = Image.fromarray(eight, mode="L")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


@contextlib.contextmanager
def size_warnings_ignored():
    """Silence Pillow's ``DecompressionBombWarning`` (the size is checked against ``max_pixels``
    instead). The warning filter list is process-wide: enter this once around a thread pool, not
    in each thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS, *, guard_warnings: bool = True) -> Image.Image:
    """The decoded 8-bit RGB image of ``path`` (upright, see the module docstring).

    Raises :class:`DataError` (one line, naming the file) when it cannot be read or has more than
    ``max_pixels`` pixels; the size is checked from the header, before any pixel is decoded.
    ``guard_warnings=False``: the caller holds :func:`size_warnings_ignored` (threads).
    """
    if guard_warnings:
        with size_warnings_ignored():
            return read_rgb(path, max_pixels, guard_warnings=False)
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise DataError(f"cannot read image {_too_large(path, width, height, max_pixels)}")
            image.load()
            upright = ImageOps.exif_transpose(image)
            return _to_8bit_rgb(upright)
    except DataError:
        raise
    except _READ_ERRORS as err:
        raise DataError(f"cannot read image {path} ({_reason(err, path)}); remove or replace the file") from None


def _probe(path: Path, max_pixels: int) -> tuple[int, int, str | None]:
    """(width, height, problem or None) from the header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except _READ_ERRORS as err:
        return 0, 0, f"{path} ({_reason(err, path)})"
    if width * height > max_pixels:
        return width, height, _too_large(path, width, height, max_pixels)
    if width == 0 or height == 0:
        return width, height, f"{path} (empty image, {width}x{height})"
    return width, height, None


def default_scan_threads() -> int:
    """Threads for scanning and cache filling: opening headers waits on the disk more than on a core."""
    return min(32, 4 * usable_cpus())


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def scan_images(
    paths: Sequence[str | os.PathLike],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    threads: int | None = None,
) -> np.ndarray:
    """Open every file's header (no pixel decoding); return the (width, height) of each as an int64
    array (N, 2), or raise ONE :class:`DataError` naming every file that cannot be opened, is empty
    or is larger than ``max_pixels``."""
    paths = [Path(p) for p in paths]
    threads = threads or default_scan_threads()
    with size_warnings_ignored():
        if threads > 1 and len(paths) > 64:
            with ThreadPoolExecutor(threads) as pool:
                results = list(pool.map(lambda p: _probe(p, max_pixels), paths, chunksize=64))
        else:
            results = [_probe(p, max_pixels) for p in paths]
    problems = [problem for _, _, problem in results if problem is not None]
    if problems:
        raise DataError(
            f"cannot read images ({len(problems)} of {len(paths)} files): " + "; ".join(problems)
            + "; remove or replace them"
        )
    return np.array([(w, h) for w, h, _ in results], dtype=np.int64).reshape(-1, 2)
