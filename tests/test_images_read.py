"""Images read as a viewer shows them (issue 11, "images read right"): 16-bit scaled to 8 bits, EXIF
orientation applied, palette/grey/alpha/CMYK converted, oversized images refused in one line before
decoding. The files are generated here; the oversized PNG is a hand-written header, never allocated."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from zootune.data import load_image_folder
from zootune.data.decode import DEFAULT_MAX_PIXELS, read_rgb, scan_images
from zootune.errors import DataError


def png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written from its specification: signature, IHDR, one zlib IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sixteen_bit_rows(values: np.ndarray) -> bytes:
    """Scanlines (filter byte 0) of a uint16 array (H, W) or (H, W, C), big-endian as PNG stores them."""
    flat = values.astype(">u2").reshape(values.shape[0], -1)
    return b"".join(b"\x00" + row.tobytes() for row in flat)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (8, 1))
    path = tmp_path / "grey16.png"
    path.write_bytes(png_bytes(64, 8, 16, 0, sixteen_bit_rows(ramp)))
    assert Image.open(path).mode.startswith("I")  # Pillow's 16-bit grey mode, clipped by convert("RGB")
    pixels = np.asarray(read_rgb(path))
    expected = np.floor(ramp.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    for c in range(3):
        assert np.array_equal(pixels[..., c], expected)
    assert pixels.min() == 0 and pixels.max() == 255 and len(np.unique(pixels)) > 60


def test_sixteen_bit_grey_written_by_pillow_too(tmp_path):
    values = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # up to 65472
    Image.fromarray(values).save(tmp_path / "g.png")
    pixels = np.asarray(read_rgb(tmp_path / "g.png"))[..., 0]
    assert np.array_equal(pixels, ((values.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8))
    assert (pixels == 255).mean() < 0.01  # Pillow's own conversion makes ~99% of this image white


def test_sixteen_bit_rgb_png_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 48).round().astype(np.uint16)
    rgb = np.stack([np.tile(ramp, (4, 1)), np.tile(ramp[::-1], (4, 1)), np.full((4, 48), 32768, np.uint16)], -1)
    path = tmp_path / "rgb16.png"
    path.write_bytes(png_bytes(48, 4, 16, 2, sixteen_bit_rows(rgb)))
    pixels = np.asarray(read_rgb(path)).astype(int)
    expected = rgb.astype(np.float64) * 255 / 65535
    assert np.abs(pixels - expected).max() <= 1  # Pillow keeps the high byte: within one level


# EXIF orientation -> the rotation that makes the stored pixels upright (numpy written plainly).
UPRIGHT = {
    1: lambda a: a,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated 90° counter-clockwise: turn clockwise
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied(tmp_path, orientation):
    stored = np.zeros((24, 40, 3), np.uint8)  # landscape, a bright block in the top-left corner only
    stored[:8, :12] = 255
    stored[16:, 30:, 0] = 200  # and a red one bottom-right: every rotation and mirror is distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif.tobytes())
    with Image.open(path) as raw:
        decoded = np.asarray(raw.convert("RGB"))  # the stored pixels, orientation ignored
    upright = np.asarray(read_rgb(path))
    assert np.array_equal(upright, np.ascontiguousarray(UPRIGHT[orientation](decoded)))
    if orientation == 6:
        assert upright.shape == (40, 24, 3)
        assert upright[:8, -8:].mean() > 200 and upright[:8, :8].mean() < 60  # block now top-right


@pytest.mark.parametrize(
    "mode, value, rgb",
    [
        ("L", 77, (77, 77, 77)),
        ("LA", (77, 10), (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("RGBA", (10, 20, 30, 0), (10, 20, 30)),  # alpha dropped, as torchvision's loader does
        ("CMYK", (255, 0, 0, 0), (0, 255, 255)),  # pure cyan
        ("P", 1, (0, 128, 255)),
    ],
)
def test_other_modes_become_rgb(tmp_path, mode, value, rgb):
    image = Image.new(mode, (6, 5), value)
    if mode == "P":
        image.putpalette([0, 0, 0, 0, 128, 255] + [0] * 762)
    suffix = ".jpg" if mode == "CMYK" else (".tif" if mode == "LA" else ".png")
    if mode == "CMYK":
        image.save(tmp_path / f"x{suffix}", quality=100)
    else:
        image.save(tmp_path / f"x{suffix}")
    pixels = np.asarray(read_rgb(tmp_path / f"x{suffix}")).astype(int)
    assert pixels.shape == (5, 6, 3)
    assert np.abs(pixels - np.array(rgb)).max() <= (2 if mode == "CMYK" else 0)


def huge_png(path, side=12000) -> None:
    """A PNG whose header says side x side, with a few bytes of pixel data (never a real image)."""
    path.write_bytes(png_bytes(side, side, 8, 2, b"\x00" * 16))


def test_oversized_image_is_one_line_before_decoding(tmp_path):
    huge_png(tmp_path / "huge.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DataError) as err:
            read_rgb(tmp_path / "huge.png")
        with pytest.raises(DataError) as scanned:
            scan_images([tmp_path / "huge.png"])
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    for message in (str(err.value), str(scanned.value)):
        assert "\n" not in message
        assert "12000x12000 = 144,000,000 pixels" in message and f"limit of {DEFAULT_MAX_PIXELS:,}" in message


def test_pixel_limit_is_configurable(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (30, 20), (i * 40, 0, 0)).save(tmp_path / c / f"{i}.png")
    load_image_folder(tmp_path, image_size=8)  # 600 pixels: fine by default
    with pytest.raises(DataError, match=r"6 of 6 files.*30x20 = 600 pixels, above the limit of 599"):
        load_image_folder(tmp_path, image_size=8, max_pixels=599)
    with pytest.raises(DataError, match="above the limit of 599"):
        read_rgb(tmp_path / "a" / "0.png", max_pixels=599)
