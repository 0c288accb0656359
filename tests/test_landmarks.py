"""Landmark regression: the NME task, the generated face target, 300W point files, and the zoo
methods (Zoo-Tuning, Lite, fine-tune, ensemble, soup) on a landmark task through the same classes and
engine as classification. Tiny models and datasets are built here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zootune.data import landmarks as lm
from zootune.suite import faces as face_suite
from zootune.suite.targets import (
    EXTRA_TARGETS,
    TARGETS,
    TargetSpec,
    _generated,
    get_target,
)
from zootune.data.transforms import MEAN, STD
from zootune.engine import TrainConfig, Trainer, evaluate
from zootune.errors import DataError, ZootuneError
from zootune.methods.registry import build_method, get_method
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask, LandmarkTask
from zootune.zoo import Zoo

# ----------------------------------------------------------------------------- the task


def _outputs(points) -> torch.Tensor:
    return torch.tensor(points, dtype=torch.float64).reshape(len(points), -1)


def test_nme_equals_hand_computed_values_for_both_normalisations():
    # image 1: eyes at (0, 0) and (4, 0) -> inter-ocular distance 4; the three errors are 1, 0 and 5
    # (a 3-4-5 triangle), mean 2 -> NME 100 * 2 / 4 = 50 %. The landmark box is 4 wide, 3 high ->
    # sqrt(4 * 3) = sqrt(12) -> NME 100 * 2 / sqrt(12).
    # image 2: eyes 2 apart; errors 1 (0.6, 0.8), 0, 0 -> mean 1/3 -> 100 * (1/3) / 2; box 1 x 2.
    truth = torch.tensor([[[0, 0], [4, 0], [2, 3]], [[1, 1], [1, 3], [2, 2]]], dtype=torch.float64)
    guess = _outputs([[[0, 1], [4, 0], [5, 7]], [[1.6, 1.8], [1, 3], [2, 2]]])
    inter_ocular = LandmarkTask(3, "inter-ocular", eye_indices=(0, 1))
    by_box = LandmarkTask(3, "bbox")

    per_image = inter_ocular.per_sample_nme(guess, truth)
    assert per_image.tolist() == pytest.approx([50.0, 100 * (1 / 3) / 2])
    total, count = inter_ocular.metric_sums(guess, truth)
    assert count == 2 and total == pytest.approx(50.0 + 100 / 6)
    assert by_box.per_sample_nme(guess, truth).tolist() == pytest.approx(
        [100 * 2 / math.sqrt(12), 100 * (1 / 3) / math.sqrt(1 * 2)])
    # other eye indices change the normaliser: eyes = landmarks 1 and 2 -> |(4,0)-(2,3)| = sqrt(13)
    assert LandmarkTask(3, eye_indices=(1, 2)).per_sample_nme(guess[:1], truth[:1]).item() == pytest.approx(
        100 * 2 / math.sqrt(13))
    assert inter_ocular.metric_name == "nme" and inter_ocular.higher_is_better is False


def test_loss_is_smooth_l1_summed_over_coordinates_and_averaged_over_images():
    task = LandmarkTask(2, beta=0.1)
    truth = torch.zeros(2, 2, 2)
    guess = _outputs([[[0.05, 0.0], [0.5, 0.0]], [[0.0, -0.3], [0.0, 0.0]]]).float()
    # huber_0.1(0.05) = 0.5 * 0.05^2 / 0.1 = 0.0125; huber_0.1(0.5) = 0.5 - 0.05 = 0.45;
    # huber_0.1(-0.3) = 0.3 - 0.05 = 0.25. Image sums: 0.4625 and 0.25 -> mean 0.35625.
    assert task.loss(guess, truth).item() == pytest.approx(0.35625)


def test_metric_sums_over_batches_equal_the_nme_of_the_concatenation():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(10, 5, 2, generator=g)
    guess = torch.rand(10, 10, generator=g)
    task = LandmarkTask(5, "bbox")
    a, b = task.metric_sums(guess[:4], truth[:4]), task.metric_sums(guess[4:], truth[4:])
    whole, n = task.metric_sums(guess, truth)
    assert n == 10 and a[1] + b[1] == 10
    assert a[0] + b[0] == pytest.approx(whole)
    # the plain per-image formula, written out
    naive = 0.0
    for i in range(10):
        p, t = guess[i].reshape(5, 2).double(), truth[i].double()
        w, h = (t[:, 0].max() - t[:, 0].min()).item(), (t[:, 1].max() - t[:, 1].min()).item()
        naive += 100 * sum(math.dist(p[k].tolist(), t[k].tolist()) for k in range(5)) / 5 / math.sqrt(w * h)
    assert whole == pytest.approx(naive)


def test_split_metric_does_not_depend_on_the_batch_size():
    task = LandmarkTask(face_suite.NUM_LANDMARKS)
    images, points = face_suite.face_scenes(10, seed=5)
    dataset = lm.LandmarkDataset.from_uint8(images, points)
    model = resnet_small(num_classes=task.num_outputs, depth=10, width=4)
    assert evaluate(model, task, dataset, batch_size=3)["nme"] == pytest.approx(
        evaluate(model, task, dataset, batch_size=10)["nme"])


@pytest.mark.parametrize("bad, message", [
    (torch.full((2, 3, 2), float("nan")), "non-finite"),
    (torch.tensor([[[0.0, 0.0], [1.0, 0.0], [float("inf"), 0.5]]]), "non-finite"),
    (torch.zeros(2, 6), "shape"),
    (torch.zeros(2, 4, 2), "shape"),
    (torch.tensor([0, 1, 2]), "class labels"),
    (torch.zeros(2, 3, 2, dtype=torch.int64), "floating point"),
    (torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.1, 0.9]]]), "eye landmarks coincide"),
])
def test_bad_targets_raise_data_error(bad, message):
    with pytest.raises(DataError, match=message):
        LandmarkTask(3).check_targets(bad)


def test_zero_sized_landmark_box_is_refused_for_bbox_normalisation():
    flat = torch.tensor([[[0.1, 0.5], [0.4, 0.5], [0.9, 0.5]]])  # a horizontal line: height 0
    LandmarkTask(3).check_targets(flat)  # inter-ocular distance 0.3: fine
    with pytest.raises(DataError, match="bounding box"):
        LandmarkTask(3, "bbox").check_targets(flat)


def test_task_options_are_checked_and_head_has_2k_outputs_centred():
    with pytest.raises(DataError):
        LandmarkTask(3, normalisation="inter-pupil")
    with pytest.raises(DataError):
        LandmarkTask(3, eye_indices=(0, 3))
    head = LandmarkTask(7).make_head(20)
    assert head.out_features == 14 and torch.all(head.bias == 0.5)
    with pytest.raises(DataError, match="14"):
        LandmarkTask(7).loss(torch.zeros(2, 10), torch.zeros(2, 7, 2))


def test_trainer_stops_on_nan_landmarks_with_a_data_error():
    images = torch.randn(8, 3, 16, 16)
    points = torch.rand(8, 3, 2)
    points[5, 1, 0] = float("nan")
    task = LandmarkTask(3)
    model = resnet_small(num_classes=6, depth=10, width=4)
    with pytest.raises(DataError, match="non-finite"):
        Trainer(model, task, lm.LandmarkDataset(images, points), None,
                TrainConfig(epochs=1, batch_size=8, progress=False)).fit()


# ----------------------------------------------------------------------------- the generated faces


def test_faces_are_deterministic_for_a_seed_and_differ_between_seeds():
    a_images, a_points = face_suite.face_scenes(4, seed=11)
    b_images, b_points = face_suite.face_scenes(4, seed=11)
    c_images, c_points = face_suite.face_scenes(4, seed=12)
    assert a_images.shape == (4, 32, 32, 3) and a_images.dtype == np.uint8
    assert a_points.shape == (4, face_suite.NUM_LANDMARKS, 2) and a_points.dtype == np.float32
    assert np.array_equal(a_images, b_images) and np.array_equal(a_points, b_points)
    assert not np.array_equal(a_images, c_images) and not np.allclose(a_points, c_points)


def test_landmarks_lie_inside_the_image_on_the_rendered_features():
    n = 40
    images, points, parts = face_suite.face_scenes(n, seed=3, occlusion_prob=0.0, return_parts=True)
    assert (points > 0).all() and (points < 1).all()
    pixel = np.floor(points * 32).astype(int)  # the pixel containing each landmark
    part = face_suite.PARTS.index
    luminance = images.astype(np.float64).mean(axis=3)

    def around(i, k, radius=1):
        x, y = pixel[i, k]
        return parts[i, max(y - radius, 0): y + radius + 1, max(x - radius, 0): x + radius + 1]

    for i in range(n):
        for eye in face_suite.EYE_INDICES:
            x, y = pixel[i, eye]
            assert parts[i, y, x] == part("pupil")
            # the pupil is darker than the white of the same eye (lighting varies slowly over 2 px)
            whites = around(i, eye, 2) == part("eye_white")
            if whites.any():
                window = luminance[i, max(y - 2, 0): y + 3, max(x - 2, 0): x + 3]
                assert luminance[i, y, x] < window[whites].mean() - 15
        x, y = pixel[i, 2]
        assert parts[i, y, x] == part("nose")
        for corner in (3, 4):  # the lip band thins out towards its corners: look 2 px around
            assert (around(i, corner, 2) == part("mouth")).any()
        for brow in (6, 7):
            assert (around(i, brow) == part("brow")).any()
        chin = around(i, 5)  # on the outline of the head: skin on one side, background on the other
        assert (chin == part("skin")).any() and (chin == part("background")).any()
    assert np.isin(face_suite.PARTS.index("pupil"), parts)
    # Inter-ocular distances are a few pixels at 32x32: the faces are small but not degenerate.
    iod = np.linalg.norm(points[:, 0] - points[:, 1], axis=1) * 32
    assert iod.min() > 2.5 and iod.max() < 16


def test_occluders_are_drawn_some_of_the_time():
    _, _, parts = face_suite.face_scenes(40, seed=4, return_parts=True)
    occluded = (parts == face_suite.PARTS.index("occluder")).any(axis=(1, 2)).mean()
    assert 0.1 < occluded < 0.7
    _, _, clean = face_suite.face_scenes(20, seed=4, occlusion_prob=0.0, return_parts=True)
    assert not (clean == face_suite.PARTS.index("occluder")).any()


def test_landmark_target_is_extra_not_in_all_and_comes_with_its_task(monkeypatch, tmp_path):
    from zootune.experiment import resolve_targets

    assert "landmarks" in EXTRA_TARGETS and "landmarks" not in TARGETS
    assert "landmarks" not in resolve_targets(["all"]) and "landmarks" not in resolve_targets(None)
    assert resolve_targets(["landmarks"]) == ["landmarks"]
    # the registered target, with small splits so the test is fast
    spec = EXTRA_TARGETS["landmarks"]
    small = TargetSpec(**{**spec.__dict__, "make_arrays": _generated("landmarks", face_suite.face_scenes,
                                                                     {"train": 6, "val": 4, "test": 4})})
    monkeypatch.setitem(EXTRA_TARGETS, "landmarks", small)
    splits = get_target("landmarks", seed=0, cache_dir=tmp_path)
    again = get_target("landmarks", seed=0, cache_dir=tmp_path)  # from the .npz cache
    assert isinstance(splits.task, LandmarkTask) and splits.task.num_landmarks == face_suite.NUM_LANDMARKS
    assert splits.sizes() == {"train": 6, "val": 4, "test": 4}
    image, points = splits.train[0]
    assert image.shape == (3, 32, 32) and points.shape == (face_suite.NUM_LANDMARKS, 2) and points.dtype == torch.float32
    assert torch.equal(splits.test.landmarks, again.test.landmarks) and torch.equal(splits.val.images, again.val.images)
    assert list((tmp_path / "targets").glob("landmarks-seed0-*.npz"))
    splits.task.check_targets(splits.val.landmarks)
    with pytest.raises(DataError, match="no image transform"):
        lm.LandmarkDataset(splits.val.images, splits.val.landmarks, transform=lambda x: x)


# ----------------------------------------------------------------------------- 300W point files


def test_read_pts_and_load_a_folder_crops_around_the_points(tmp_path):
    from PIL import Image

    picture = np.zeros((60, 100, 3), np.uint8)
    picture[20, 30] = picture[20, 50] = picture[40, 40] = 255  # three bright points (row y, column x)
    Image.fromarray(picture).save(tmp_path / "face1.png")
    # 300W numbering is 1-based
    (tmp_path / "face1.pts").write_text("version: 1\nn_points:  3\n{\n31 21\n51 21\n41 41\n}\n")
    assert lm.read_pts(tmp_path / "face1.pts").tolist() == [[31, 21], [51, 21], [41, 41]]
    dataset = lm.load_landmark_folder(tmp_path, size=32, margin=0.25)
    assert len(dataset) == 1
    image, points = dataset[0]
    # box 20 x 20 around (30..50, 20..40), enlarged by 25 % per side -> a 30 px square from (25, 15)
    expected = (np.array([[30, 20], [50, 20], [40, 40]]) + 0.5 - [25, 15]) / 30
    assert points.numpy() == pytest.approx(expected, abs=0.02)
    raw = (image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)).mean(0)
    for x, y in np.floor(points.numpy() * 32).astype(int):
        assert raw[y - 1: y + 2, x - 1: x + 2].max() > 0.2  # the bright dot is still under its landmark

    (tmp_path / "bad.pts").write_text("n_points: 3\n{\n1 2\n}\n")
    with pytest.raises(DataError, match="n_points says 3"):
        lm.read_pts(tmp_path / "bad.pts")
    with pytest.raises(DataError, match="not a .pts"):
        (tmp_path / "junk.pts").write_text("hello")
        lm.read_pts(tmp_path / "junk.pts")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image"):
        lm.load_landmark_folder(tmp_path / "empty")


# ----------------------------------------------------------------------------- the zoo methods


def tiny_zoo(m: int = 3) -> Zoo:
    # members share an initialisation and drift apart a little, as MiniZoo members do
    torch.manual_seed(7)
    base = resnet_small(num_classes=5, depth=10, width=4)
    members = []
    for i in range(m):
        member = resnet_small(num_classes=5, depth=10, width=4)
        member.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in member.parameters():
                p.add_(0.05 * torch.randn_like(p))
        members.append(member)
    return Zoo.from_modules(members, names=[f"m{i}" for i in range(m)])


@pytest.fixture(scope="module")
def faces():
    images, points = face_suite.face_scenes(48, seed=9)
    return (lm.LandmarkDataset.from_uint8(images[:32], points[:32]),
            lm.LandmarkDataset.from_uint8(images[32:], points[32:]))


@pytest.mark.parametrize("method", ["zoo-tuning", "lite"])
def test_landmarks_go_through_the_same_zoo_tuning_class_as_classification(method, faces):
    from zootune.methods.zoo_tuning import ZooTuning

    zoo = tiny_zoo()
    task = LandmarkTask(face_suite.NUM_LANDMARKS)
    spec = get_method(method)
    built = build_method(spec.name, zoo, task)
    assert type(built) is type(build_method(spec.name, zoo, ClassificationTask(4))) is ZooTuning
    assert built(faces[0].images[:2]).shape == (2, 2 * face_suite.NUM_LANDMARKS)
    train, val = faces
    config = TrainConfig(epochs=3, batch_size=16, optimizer="adamw", lr=3e-3, progress=False, seed=0)
    result = Trainer(built, task, train, val, config).fit()
    losses = [record["train_loss"] for record in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert result.best_val_metric == min(r["val_nme"] for r in result.history)  # lower is better
    outputs = result.model.eval()(val.images[:4])
    assert outputs.shape == (4, 2 * face_suite.NUM_LANDMARKS)
    if method == "lite":  # folded into one plain model with the same head size
        assert not isinstance(result.model, ZooTuning)


def test_ensemble_returns_the_mean_of_the_members_coordinates(faces):
    task = LandmarkTask(face_suite.NUM_LANDMARKS)
    zoo = tiny_zoo(2)
    members = []
    for i in range(2):
        torch.manual_seed(i)
        members.append(build_method("finetune", zoo, task, member=i).finalize().eval())
        with torch.no_grad():  # make the members' predictions differ clearly
            members[-1].fc.bias.add_(0.1 * i)
    ensemble = build_method("ensemble", zoo, task, fitted={"finetune": members})
    x = faces[1].images[:5]
    expected = (members[0](x) + members[1](x)) / 2  # a plain average of (x, y) coordinates
    assert torch.allclose(ensemble(x), expected, atol=1e-6)
    assert ensemble.combine == "logit"


def test_soup_and_finetune_build_landmark_heads():
    task = LandmarkTask(face_suite.NUM_LANDMARKS)
    zoo = tiny_zoo(2)
    for method in ("soup", "finetune"):
        model = build_method(method, zoo, task).finalize()
        assert model.fc.out_features == 2 * face_suite.NUM_LANDMARKS and torch.all(model.fc.bias == 0.5)


@pytest.mark.parametrize("method", ["knowledge-flow", "hub-pathway"])
def test_other_zoo_methods_train_on_a_landmark_task(method, faces):
    task = LandmarkTask(face_suite.NUM_LANDMARKS)
    model = build_method(method, tiny_zoo(2), task)
    x, y = faces[0].images[:8], faces[0].landmarks[:8]
    outputs = model(x)
    assert outputs.shape == (8, 2 * face_suite.NUM_LANDMARKS)
    loss = task.loss(outputs, y)
    if hasattr(model, "auxiliary_loss"):
        loss = loss + model.auxiliary_loss(outputs, y)
    loss.backward()
    assert math.isfinite(loss.item())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_distillation_refuses_a_landmark_task_with_one_clear_error():
    zoo = tiny_zoo(2)
    with pytest.raises(ZootuneError, match="classification only"):
        build_method("distill", zoo, LandmarkTask(3), fitted={"finetune": list(zoo)})


def test_comparison_run_on_a_landmark_target_selects_the_lowest_nme(tmp_path, faces):
    from zootune.data.datasets import DatasetSplits
    from zootune.experiment import RunConfig, run_experiment

    train, val = faces

    def load(name, seed=0):
        return DatasetSplits(train, val, val, face_suite.NUM_LANDMARKS, name, task=LandmarkTask(face_suite.NUM_LANDMARKS))

    config = RunConfig(targets=["faces"], seeds=[0], methods=["finetune", "ensemble", "lite"], plots=False,
                       train=dict(epochs=1, batch_size=16, optimizer="adamw", lr=3e-3, eval_batch_size=16))
    results = run_experiment(config, tmp_path, zoo=tiny_zoo(2), load_target=load, echo=None)
    assert results["metric"] == "nme" and results["higher_is_better"] is False
    rows = {row["id"]: row for row in results["methods"]}
    singles = [rows[f"finetune:m{i}"]["targets"]["faces"] for i in range(2)]
    best = rows["finetune:best-on-val"]["targets"]["faces"]
    assert best["val"][0] == min(cell["val"][0] for cell in singles)
    assert {"ensemble", "lite"} <= set(rows)
    for row in rows.values():
        value = row["targets"]["faces"]["test"][0]
        assert math.isfinite(value) and value > 0
