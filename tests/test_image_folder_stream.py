"""Image folders streamed from disk: the evaluation transform against a naive reading, training crops
from the original image, augmentation presets, per-sample seeds (0 vs 2 workers, exact resume with
workers), the RAM cache, the pre-scan and one-line worker errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

import zootune.cli.main as cli
from zootune.data import AUGMENT_PRESETS, MEAN, STD, ImageFolderDataset, load_image_folder, load_unsplit_image_folder
from zootune.data.folder_dataset import DECODED, EVAL_CROPS
from zootune.data.loading import _original_message, default_num_workers, one_line_worker_errors
from zootune.engine import TrainConfig, Trainer
from zootune.engine.checkpoint import load_checkpoint
from zootune.engine.sampler import GlobalBatchSampler, sample_seed
from zootune.errors import DataError
from zootune.tasks import ClassificationTask

SIZES = [(40, 30), (30, 40), (37, 37), (53, 21), (16, 16), (80, 64)]  # (width, height)


def write_folder(root, classes=3, per_class=4, seed=0, sizes=SIZES) -> None:
    """Random-noise images of varied sizes and aspects (portrait, landscape, square, tiny)."""
    rng = np.random.default_rng(seed)
    k = 0
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = sizes[k % len(sizes)]
            k += 1
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            pixels[..., c] = np.maximum(pixels[..., c], 128)  # a class signal for training tests
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")


def naive_eval_tensor(path, image_size, mean=MEAN, std=STD, crop_fraction=0.875) -> torch.Tensor:
    """The evaluation transform written plainly: whole image read, shorter side resized to
    round(size / crop_fraction) (longer side truncated like torchvision), central crop, per-pixel
    normalisation."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    short = round(image_size / crop_fraction)
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new != (w, h):
        image = image.resize(new, Image.BILINEAR)
    array = np.array(image)
    top = int(round((array.shape[0] - image_size) / 2))
    left = int(round((array.shape[1] - image_size) / 2))
    crop = array[top:top + image_size, left:left + image_size]
    out = torch.empty(3, image_size, image_size)
    for c in range(3):
        out[c] = (torch.tensor(crop[..., c], dtype=torch.float32) / 255.0 - mean[c]) / std[c]
    return out


@pytest.mark.parametrize("cache_budget", [0, None], ids=["streamed", "cached"])
@pytest.mark.parametrize("image_size", [16, 32])
def test_eval_items_equal_a_naive_reading_bit_for_bit(tmp_path, image_size, cache_budget):
    write_folder(tmp_path)
    splits = load_image_folder(tmp_path, image_size=image_size, val_fraction=0.5, cache_budget=cache_budget)
    assert (splits.val.cache is None) == (cache_budget == 0)
    for dataset in (splits.val, splits.train.with_transform(None)):
        for i, path in enumerate(dataset.paths):
            image, label = dataset[i]
            assert torch.equal(image, naive_eval_tensor(path, image_size)), path
            assert label == int(path.parent.name[1:])


def test_mean_and_std_are_parameters(tmp_path):
    write_folder(tmp_path, per_class=1)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.5, 1.0)
    _, dataset = load_unsplit_image_folder(tmp_path, image_size=16, mean=mean, std=std)
    for i, path in enumerate(dataset.paths):
        assert torch.equal(dataset[i][0], naive_eval_tensor(path, 16, mean=mean, std=std))


def test_training_crops_come_from_the_original_image(tmp_path):
    """A crop of the whole frame (scale 1, the image's own aspect) is the original resized once; a
    crop taken from an already-resized copy would differ."""
    from zootune.data import RandomResizedCropFlip
    from zootune.data.transforms import resize

    (tmp_path / "a").mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (60, 120, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "a" / "x.png")
    whole = RandomResizedCropFlip(16, scale=(1.0, 1.0), ratio=(2.0, 2.0), flip_p=0.0)
    dataset = ImageFolderDataset([tmp_path / "a" / "x.png"], [0], 16, whole)
    image, _ = dataset[(0, 123)]
    assert torch.allclose(image, resize(naive_tensor(pixels), (16, 16)), atol=1e-5)
    resized_first = naive_tensor(np.array(Image.fromarray(pixels).resize((18, 18), Image.BILINEAR)))
    assert not torch.allclose(image, resize(resized_first, (16, 16)), atol=1e-2)
    # the paper preset's crops vary with the sample seed and keep the output size
    paper = dataset.with_transform("paper")
    crops = [paper[(0, seed)][0] for seed in range(6)]
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert len({c.sum().item() for c in crops}) == 6


def naive_tensor(pixels_hwc) -> torch.Tensor:
    out = torch.empty(3, *pixels_hwc.shape[:2])
    for c in range(3):
        out[c] = (torch.tensor(pixels_hwc[..., c], dtype=torch.float32) / 255.0 - MEAN[c]) / STD[c]
    return out


def gradient_image_folder(root) -> list:
    """Two classes of left-to-right brightness ramps: mirrored, a ramp runs right-to-left."""
    paths = []
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], (48, 1, 3))
        Image.fromarray(ramp).save(root / f"c{c}" / "ramp.png")
        paths.append(root / f"c{c}" / "ramp.png")
    return paths


def brightening_to_the_right(image: torch.Tensor) -> bool:
    columns = image.mean(dim=(0, 1))
    return bool(columns[-1] > columns[0])


def test_presets_no_flip_and_none_never_mirror(tmp_path):
    paths = gradient_image_folder(tmp_path)
    dataset = ImageFolderDataset(paths, [0, 1], 16, "paper")
    flipped = [not brightening_to_the_right(dataset[(0, s)][0]) for s in range(40)]
    assert 5 < sum(flipped) < 35  # the check sees flips: the paper preset mirrors about half
    no_flip = dataset.with_transform("no-flip")
    assert all(brightening_to_the_right(no_flip[(0, s)][0]) for s in range(40))
    none = dataset.with_transform("none")
    assert none.transform is None
    evaluation = dataset.with_transform(None)
    for s in range(5):
        assert torch.equal(none[(0, s)][0], evaluation[0][0])
    # presets are what their names promise
    assert AUGMENT_PRESETS["light"][0][0] > AUGMENT_PRESETS["paper"][0][0]
    assert dataset.with_transform("light").transform.scale == (0.35, 1.0)
    assert set(AUGMENT_PRESETS) | {"auto"} == set(cli.AUGMENT_CHOICES)  # auto: zootune.data.auto


def test_load_image_folder_augment_option(tmp_path):
    gradient_image_folder(tmp_path / "train")
    gradient_image_folder(tmp_path / "val")
    splits = load_image_folder(tmp_path, image_size=16, augment="no-flip")
    assert splits.train.transform.flip_p == 0 and splits.val.transform is None
    assert all(brightening_to_the_right(splits.train[(i % 2, s)][0]) for i in range(2) for s in range(20))
    with pytest.raises(DataError, match="unknown augmentation 'mirror'"):
        load_image_folder(tmp_path, augment="mirror")


def batches(dataset, workers: int, epoch: int, seed: int = 3):
    sampler = GlobalBatchSampler(len(dataset), 5, seed=seed, sample_seeds=True)
    sampler.set_epoch(epoch)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_augmentation_does_not_depend_on_workers(tmp_path):
    write_folder(tmp_path)
    dataset = load_image_folder(tmp_path, image_size=16, val_fraction=0.25, cache_budget=0).train
    no_workers = batches(dataset, 0, epoch=1)
    two_workers = batches(dataset, 2, epoch=1)
    assert len(no_workers) == len(two_workers) == 2
    for (xa, ya), (xb, yb) in zip(no_workers, two_workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # the same per-sample keys give the same images from the cache
    cached = dataset.with_transform(dataset.transform).fill_cache()
    assert cached.cache.kind == DECODED
    for (xa, _), (xc, _) in zip(no_workers, batches(cached, 0, epoch=1)):
        assert torch.equal(xa, xc)
    # another epoch draws other crops of the same images
    assert not torch.equal(batches(dataset, 0, epoch=2)[0][0], no_workers[0][0])


def test_sample_seed_is_a_function_of_seed_epoch_index_only():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)
    sampler = GlobalBatchSampler(10, 4, seed=1, rank=1, world_size=2, sample_seeds=True)
    sampler.set_epoch(2)
    for batch in sampler:
        assert all(key == (key[0], sample_seed(1, 2, key[0])) for key in batch)


class TinyConvNet(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class Interrupt(Exception):
    pass


class KillAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if trainer.epoch == self.epoch:
            raise Interrupt


def test_resume_with_workers_reaches_the_same_weights(tmp_path):
    write_folder(tmp_path / "data")
    splits = load_image_folder(tmp_path / "data", image_size=16, val_fraction=0.25, cache_budget=0)
    task = ClassificationTask(3)

    def config(workers):
        return TrainConfig(epochs=3, batch_size=4, lr=0.05, seed=5, num_workers=workers, progress=False, device="cpu")

    def fit(workers, out=None, **kw):
        return Trainer(TinyConvNet(), task, splits.train, splits.val, config(workers), out_dir=out, **kw).fit()

    straight = fit(0)
    with_workers = fit(2)
    with pytest.raises(Interrupt):
        fit(0, tmp_path / "run", callbacks=[KillAfter(1)])
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(999)  # a new process: the global RNG is restored from the checkpoint
    resumed = fit(2, tmp_path / "run", resume=True)
    for other in (with_workers, resumed):
        for key, value in straight.model.state_dict().items():
            assert torch.equal(other.model.state_dict()[key], value), key
    # guard: the weights depend on the augmentation seed (so equality above is not vacuous)
    other_seed = Trainer(TinyConvNet(), task, splits.train, splits.val,
                         TrainConfig(epochs=3, batch_size=4, lr=0.05, seed=6, num_workers=0, progress=False,
                                     device="cpu")).fit()
    assert not torch.equal(other_seed.model[0].weight, straight.model[0].weight)


def test_cache_follows_the_budget_and_never_changes_an_item(tmp_path):
    write_folder(tmp_path, per_class=6)
    streamed = load_image_folder(tmp_path, image_size=16, test_fraction=0.2, cache_budget=0)
    assert all(d.cache is None for d in (streamed.train, streamed.val, streamed.test))
    cached = load_image_folder(tmp_path, image_size=16, test_fraction=0.2)
    assert cached.train.cache.kind == DECODED and cached.val.cache.kind == EVAL_CROPS
    decoded_bytes = sum(w * h * 3 for w, h in (Image.open(p).size for p in cached.train.paths))
    assert cached.train.cache.nbytes == decoded_bytes
    # a budget that holds the evaluation crops but not the training originals
    eval_only = (len(cached.val) + len(cached.test)) * 16 * 16 * 3
    partial = load_image_folder(tmp_path, image_size=16, test_fraction=0.2, cache_budget=eval_only)
    assert partial.train.cache is None and partial.val.cache is not None and partial.test.cache is not None
    for a, b in ((streamed.train, cached.train), (streamed.val, cached.val), (streamed.test, partial.test)):
        for i in range(len(a)):
            assert torch.equal(a[(i, 77 + i)][0], b[(i, 77 + i)][0])
    # an evaluation-crop cache cannot serve crops of the original: the augmented copy streams
    assert cached.val.with_transform("paper").cache is None


def test_prescan_reports_every_bad_file_in_one_line(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "c0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "c1" / "empty.jpg").write_bytes(b"")
    (tmp_path / "c2" / "notes.jpg").write_text("not an image")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "3 of 15 files" in message
    for name in ("broken.png", "empty.jpg", "notes.jpg"):
        assert name in message


def truncated_after_scan(root):
    """A PNG whose header is intact (the scan passes) but whose pixel data stops half way."""
    write_folder(root, per_class=4)
    path = root / "c1" / "0.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_a_file_failing_in_a_worker_is_one_line(tmp_path, workers):
    path = truncated_after_scan(tmp_path)
    splits = load_image_folder(tmp_path, image_size=16, val_fraction=0.25, cache_budget=0)
    dataset = splits.train if path in splits.train.paths else splits.val
    loader = DataLoader(dataset, batch_size=4, num_workers=workers)
    with pytest.raises(DataError) as err:
        for _ in one_line_worker_errors(loader):
            pass
    message = str(err.value)
    assert message.startswith(f"cannot read image {path}") and "\n" not in message and "Traceback" not in message


def test_original_message_from_pytorch_reraise_text():
    text = ("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nzootune.errors.DataError: cannot read image /a/b.png (broken)\n')
    assert _original_message(text) == "cannot read image /a/b.png (broken)"
    assert _original_message("plain message") == "plain message"


def test_default_workers_rule():
    assert default_num_workers(32, cpus=16) == 0
    assert default_num_workers(224, cpus=1) == 0
    assert default_num_workers(224, cpus=2) == 1
    assert default_num_workers(224, cpus=64) == 8


def test_cli_fit_with_folder_options(tmp_path, capsys):
    from zootune.models import resnet_small
    from zootune.zoo import save_state_dict

    write_folder(tmp_path / "data" / "train", per_class=4)
    write_folder(tmp_path / "data" / "val", per_class=2, seed=1)
    torch.manual_seed(0)
    save_state_dict(tmp_path / "m.safetensors", resnet_small(depth=10, width=4).state_dict())
    base = ["fit", "--arch", "resnet10_small", "--arch-option", "width=4",
            "--zoo", tmp_path / "m.safetensors", "--data", tmp_path / "data", "--method", "finetune",
            "--epochs", "1", "--batch-size", "4", "--image-size", "16", "--no-progress"]
    code = cli.main([str(a) for a in [*base, "--workers", "2", "--augment", "no-flip", "--cache-budget", "0",
                                      "--max-steps-per-epoch", "2", "--out", tmp_path / "out"]])
    assert code == 0, capsys.readouterr().err
    for flags, fragment in ((["--augment", "mirror"], "--augment"), (["--workers", "-1"], "--workers"),
                            (["--cache-budget", "x"], "--cache-budget"), (["--max-image-pixels", "0"], "positive")):
        code = cli.main([str(a) for a in [*base, *flags, "--out", tmp_path / "bad"]])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    code = cli.main([str(a) for a in [*base, "--max-image-pixels", "100", "--out", tmp_path / "bad"]])
    err = capsys.readouterr().err
    assert code == 2 and "above the limit of 100" in err and len(err.strip().splitlines()) == 1
