"""zootune.data: tensor transforms, stratified splits, image folders and the target suite."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from zootune.data import (
    MEAN, STD, Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, load_image_folder,
    load_unsplit_image_folder, stratified_split,
)
from zootune.suite import scenes, targets
from zootune.suite.targets import TARGETS, get_target
from zootune.errors import DataError

# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("shape,size", [((3, 32, 32), 32), ((3, 40, 57), 24), ((1, 17, 9), (12, 20))])
def test_random_resized_crop_output_size_and_box(shape, size):
    crop = RandomResizedCrop(size, scale=(0.08, 1.0))
    expected = (size, size) if isinstance(size, int) else size
    h, w = shape[1:]
    for _ in range(50):
        top, left, ch, cw = crop.crop_box(h, w)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        assert tuple(crop(torch.rand(shape)).shape) == (shape[0], *expected)


def test_random_resized_crop_area_and_aspect_follow_scale_and_ratio():
    crop = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    h = w = 200  # large enough that rounding barely moves area/aspect and the first try fits
    for _ in range(200):
        _, _, ch, cw = crop.crop_box(h, w)
        area = ch * cw / (h * w)
        assert 0.25 * 0.95 <= area <= 0.5 * 1.05
        assert 0.5 * 0.95 <= cw / ch <= 2.0 * 1.05


def test_tensor_crop_draws_the_global_rng_as_written():
    """The built-in targets' crops (global torch RNG) are the formula's draws in this order: area,
    aspect (per try), then top, left -- so their augmentation, and their numbers, stay as they were."""

    def naive_box(h, w, scale, ratio):
        for _ in range(10):
            area = h * w * (scale[0] + (scale[1] - scale[0]) * torch.rand(()).item())
            aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(()).item())
            cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return int(torch.randint(0, h - ch + 1, ()).item()), int(torch.randint(0, w - cw + 1, ()).item()), ch, cw
        raise AssertionError("no fitting crop in this test's settings")

    crop = RandomResizedCrop(16, scale=(0.35, 1.0))
    torch.manual_seed(5)
    boxes = [crop.crop_box(32, 32) for _ in range(50)]
    torch.manual_seed(5)
    assert boxes == [naive_box(32, 32, (0.35, 1.0), (3 / 4, 4 / 3)) for _ in range(50)]


def test_full_scale_square_crop_is_identity():
    image = torch.rand(3, 16, 16)
    out = RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))(image)
    assert torch.equal(out, image)


def test_flip_with_p1_is_exact_mirror_and_p0_is_identity():
    image = torch.rand(3, 5, 7)
    mirrored = torch.empty_like(image)
    for c in range(3):
        for i in range(5):
            for j in range(7):
                mirrored[c, i, j] = image[c, i, 6 - j]
    assert torch.equal(RandomHorizontalFlip(p=1.0)(image), mirrored)
    assert torch.equal(RandomHorizontalFlip(p=0.0)(image), image)


def test_normalize_matches_formula():
    image = torch.rand(3, 4, 4)
    out = Normalize()(image)
    for c in range(3):
        for i in range(4):
            for j in range(4):
                assert out[c, i, j].item() == pytest.approx((image[c, i, j].item() - MEAN[c]) / STD[c], abs=1e-6)


def test_augmentation_reproducible_under_torch_seed_only():
    t = Compose([RandomResizedCrop(16), RandomHorizontalFlip()])
    image = torch.rand(3, 32, 32)

    def run(other_rng_seed):
        random.seed(other_rng_seed)  # the transforms must not read python's or numpy's RNG
        np.random.seed(other_rng_seed)
        torch.manual_seed(123)
        return torch.stack([t(image) for _ in range(8)])

    first = run(1)
    assert torch.equal(first, run(2))
    torch.manual_seed(124)
    assert not torch.equal(first, torch.stack([t(image) for _ in range(8)]))


# ----------------------------------------------------------------------------- splits


def test_stratified_split_disjoint_complete_proportional_and_seeded():
    labels = np.repeat(np.arange(4), [40, 20, 10, 30])
    parts = stratified_split(labels, (0.5, 0.3, 0.2), seed=3)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # disjoint and complete
    for cls, n in zip(range(4), [40, 20, 10, 30]):
        counts = [int((labels[p] == cls).sum()) for p in parts]
        assert counts[0] == round(0.5 * n) and counts[1] == round(0.8 * n) - round(0.5 * n)
    again = stratified_split(labels, (0.5, 0.3, 0.2), seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = stratified_split(labels, (0.5, 0.3, 0.2), seed=4)
    assert not np.array_equal(parts[0], other[0])


# ----------------------------------------------------------------------------- image folders

COLORS = {"blue": (0, 0, 255), "green": (0, 200, 0), "red": (220, 0, 0)}


def _write_class_folders(root, per_class=5, size=(20, 14)):
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, color).save(root / name / f"{i}.png")


def _expected_pixel(color):
    return torch.tensor([(c / 255.0 - m) / s for c, m, s in zip(color, MEAN, STD)])


def test_image_folder_single_root_split(tmp_path):
    _write_class_folders(tmp_path, per_class=10)
    splits = load_image_folder(tmp_path, image_size=16, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.class_names == sorted(COLORS) and splits.num_classes == 3
    assert splits.sizes() == {"train": 18, "val": 6, "test": 6}
    for dataset in (splits.val, splits.test):
        for image, label in dataset:
            assert image.shape == (3, 16, 16) and image.dtype == torch.float32
            # label must point at the folder the image came from
            assert torch.allclose(image[:, 8, 8], _expected_pixel(COLORS[splits.class_names[label]]), atol=1e-5)
    image, label = splits.train[0]  # augmented: still the right size, uniform colour stays uniform
    assert image.shape == (3, 16, 16)
    assert torch.allclose(image[:, 3, 3], _expected_pixel(COLORS[splits.class_names[label]]), atol=1e-4)
    again = load_image_folder(tmp_path, image_size=16, val_fraction=0.2, test_fraction=0.2, seed=0)
    assert splits.val.paths == again.val.paths and torch.equal(splits.val.labels, again.val.labels)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(splits.val, again.val))
    assert not set(splits.train.paths) & set(splits.val.paths)


def test_image_folder_separate_split_folders(tmp_path):
    for split, n in (("train", 4), ("val", 2), ("test", 3)):
        _write_class_folders(tmp_path / split, per_class=n)
    splits = load_image_folder(tmp_path, image_size=8)
    assert splits.sizes() == {"train": 12, "val": 6, "test": 9}
    assert splits.val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    names, whole = load_unsplit_image_folder(tmp_path / "test", image_size=8)
    assert names == sorted(COLORS) and whole.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert whole.transform is None and splits.train.transform is not None


def _message(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        load_image_folder(tmp_path / "nope")
    _message(e)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty dataset"):
        load_image_folder(empty)

    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    with pytest.raises(DataError, match="not a folder of class folders"):
        load_image_folder(flat)

    no_images = tmp_path / "noimg"
    _write_class_folders(no_images)
    (no_images / "zebra").mkdir()
    (no_images / "zebra" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="zebra.*contains no images"):
        load_image_folder(no_images)

    corrupt = tmp_path / "corrupt"
    _write_class_folders(corrupt)
    (corrupt / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="broken.png") as e:
        load_image_folder(corrupt)
    _message(e)

    tiny = tmp_path / "tiny"
    _write_class_folders(tiny, per_class=1)
    with pytest.raises(DataError, match="empty dataset"):
        load_image_folder(tiny, val_fraction=0.2)

    mismatch = tmp_path / "mismatch"
    _write_class_folders(mismatch / "train")
    _write_class_folders(mismatch / "val")
    (mismatch / "val" / "red").rename(mismatch / "val" / "crimson")
    with pytest.raises(DataError, match=r"only in train \['red'\], only in val \['crimson'\]"):
        load_image_folder(mismatch)

    no_val = tmp_path / "no_val"  # train/ and test/ but no val/: the message names val/, not test/
    _write_class_folders(no_val / "train")
    _write_class_folders(no_val / "test")
    with pytest.raises(DataError, match=r"has train/ but no val/") as e:
        load_image_folder(no_val)
    assert "test/ is optional" in _message(e)


# ----------------------------------------------------------------------------- target suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return cache, {name: get_target(name, seed=0, cache_dir=cache) for name in TARGETS}


def _hashes(dataset):
    return {hashlib.sha256(dataset.images[i].numpy().tobytes()).hexdigest() for i in range(len(dataset))}


def test_targets_format_and_disjoint_splits(suite):
    _, loaded = suite
    assert len(loaded) >= 4
    for name, splits in loaded.items():
        assert splits.name == name and len(splits.class_names) == splits.num_classes
        sizes = splits.sizes()
        assert 300 <= sizes["train"] <= 2000 and sizes["val"] >= 200 and sizes["test"] >= 200, (name, sizes)
        for dataset in (splits.train, splits.val, splits.test):
            image, label = dataset[0]
            assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
            assert dataset.labels.dtype == torch.int64
            assert set(dataset.labels.tolist()) == set(range(splits.num_classes)), name  # every class present
        train, val, test = (_hashes(d) for d in (splits.train, splits.val, splits.test))
        assert not (train & val) and not (train & test) and not (val & test), name


def test_targets_deterministic_for_a_seed_and_cache_faithful(suite, tmp_path):
    cache, loaded = suite
    for name in ("polygons", "digits8x8"):
        cached = get_target(name, seed=0, cache_dir=cache)  # from the .npz cache (where cached)
        fresh = get_target(name, seed=0, cache_dir=tmp_path)  # regenerated from scratch
        for split in ("train", "val", "test"):
            a, b, c = (getattr(s, split) for s in (loaded[name], cached, fresh))
            assert torch.equal(a.images, b.images) and torch.equal(a.images, c.images)
            assert torch.equal(a.labels, c.labels)
    other = get_target("digits8x8", seed=1, cache_dir=tmp_path)
    assert not torch.equal(other.test.labels, loaded["digits8x8"].test.labels)


def test_generated_target_labels_match_the_drawing():
    images, labels = scenes.polygon_target_shapes(12, seed=5)
    again_images, again_labels = scenes.polygon_target_shapes(12, seed=5)
    assert np.array_equal(images, again_images) and np.array_equal(labels, again_labels)
    assert set(labels.tolist()) <= set(range(len(scenes.POLYGON_SIDES)))
    _, counts = scenes.count_target_scenes(20, seed=5)
    assert counts.min() >= 0 and counts.max() <= 5


def test_textures_come_from_disjoint_picture_regions():
    lo = [r for r in targets.TEXTURE_REGIONS.values()]
    for (a0, a1), (b0, b1) in zip(lo, lo[1:]):
        assert a1 <= b0  # column bands do not overlap, so no test crop shares pixels with training
    with pytest.raises(DataError, match="unknown target"):
        get_target("imagenet")


def test_read_manifest_is_empty_when_missing_and_refuses_a_corrupt_one(tmp_path):
    from zootune.data.cache import read_manifest
    from zootune.errors import CheckpointError

    path = tmp_path / "manifest.json"
    assert read_manifest(path, "members", 3, "fix it") == {"format": 3, "members": {}}
    path.write_text('{"members": {"a": {"sha256": "x"}}}')
    assert read_manifest(path, "members", 3, "fix it")["members"] == {"a": {"sha256": "x"}}
    for bad in ("{not json", '{"agents": {}}', "[1, 2]"):
        path.write_text(bad)
        with pytest.raises(CheckpointError, match=r"manifest .* is unreadable .*; fix it"):
            read_manifest(path, "members", 3, "fix it")
