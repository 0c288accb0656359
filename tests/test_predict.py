"""``zootune predict`` and :mod:`zootune.predict`: a model folder made by the real ``zootune fit``,
applied to a folder of new images (nested); checked against the model's logits computed plainly here,
and against the README's plain-PyTorch snippet."""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from zootune.cli import main as cli
from zootune.errors import ZootuneError

sys.path.insert(0, str(Path(__file__).parent))
from test_bad_input import fitted_workspace  # noqa: E402

CLASSES = ("a", "b", "c")
README = Path(__file__).resolve().parents[1] / "README.md"


def _photo(path: Path, width: int, height: int, level: int) -> None:
    """Noise of the brightness of class ``level``'s training images (test_bad_input._images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(level).uniform(0, 120, (height, width, 3)) + 100 * level
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A 3-class model fitted by the real command, and new photos of several sizes in nested folders."""
    # trained long enough (8 steps) to tell the classes apart, so that the predictions differ
    root = fitted_workspace(tmp_path_factory.mktemp("predict"), CLASSES, "--epochs", "4", "--lr", "0.1")
    photos = root / "photos"
    for name, width, height, level in [("z.png", 20, 14, 0), ("b.jpg", 9, 30, 1), ("sub/a.png", 33, 33, 2),
                                       ("sub/deeper/c.bmp", 40, 17, 0), ("sub/deeper/d.PNG", 7, 7, 2)]:
        _photo(photos / name, width, height, level)
    (photos / "notes.txt").write_text("not an image")
    _photo(photos / ".hidden.png", 8, 8, 1)
    _photo(photos / ".cache" / "x.png", 8, 8, 1)
    return root


def _predict(ws, out, *extra) -> list[dict]:
    assert cli.main([str(a) for a in ["predict", ws / "fitted", ws / "photos", "--out", out, *extra]]) == 0
    with open(out, newline="") as handle:
        return list(csv.DictReader(handle))


def _plain_reference(model: nn.Module, info: dict, paths) -> torch.Tensor:
    """Probabilities computed plainly: each image decoded and transformed on its own, one forward each."""
    from zootune.data.decode import read_rgb
    from zootune.data.transforms import ResizeCenterCrop, to_normalized_chw
    from zootune.model_dir import input_options

    options = input_options(info)
    crop = ResizeCenterCrop(options["image_size"], options.get("crop_fraction", 0.875))
    rows = []
    with torch.no_grad():
        for path in paths:
            pixels = crop(read_rgb(path))
            x = to_normalized_chw(pixels, **{k: options[k] for k in ("mean", "std") if k in options})
            rows.append(model(x[None]).double().softmax(dim=1)[0])
    return torch.stack(rows)


def test_one_row_per_image_found_in_nested_folders_in_sorted_order(ws, tmp_path, capsys):
    rows = _predict(ws, tmp_path / "predictions.csv")
    expected = sorted(str(ws / "photos" / name) for name in
                      ("z.png", "b.jpg", "sub/a.png", "sub/deeper/c.bmp", "sub/deeper/d.PNG"))
    assert [row["path"] for row in rows] == expected  # hidden files and folders, and notes.txt, are skipped
    assert list(rows[0]) == ["path", "class", "probability"]
    assert all(row["class"] in CLASSES and 0 < float(row["probability"]) <= 1 for row in rows)
    assert "5 images" in capsys.readouterr().out


def test_top_k_is_sorted_sums_to_at_most_one_and_is_clamped_to_the_classes(ws, tmp_path):
    rows = _predict(ws, tmp_path / "top2.csv", "--top-k", "2")
    assert list(rows[0]) == ["path", "class", "probability", "top2_class", "top2_probability"]
    for row in rows:
        probabilities = [float(row["probability"]), float(row["top2_probability"])]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        assert row["class"] != row["top2_class"]
    every = _predict(ws, tmp_path / "top9.csv", "--top-k", "9")  # 3 classes: clamped to 3
    assert list(every[0])[-2:] == ["top3_class", "top3_probability"]
    for row in every:
        probabilities = [float(row[c]) for c in ("probability", "top2_probability", "top3_probability")]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert sorted([row["class"], row["top2_class"], row["top3_class"]]) == list(CLASSES)


def test_predictions_equal_the_argmax_of_the_plainly_computed_logits(ws):
    from zootune.data.image_folder import find_images
    from zootune.model_dir import load_model_dir
    from zootune.predict import predict_images

    model, info = load_model_dir(ws / "fitted" / "model")
    paths = find_images([ws / "photos"])
    predictions = predict_images(model, info, paths, top_k=3, batch_size=2)  # batches of 2, 2 and 1
    reference = _plain_reference(model, info, paths)
    assert [p.path for p in predictions] == paths
    assert [p.class_name for p in predictions] == [info["class_names"][i] for i in reference.argmax(dim=1).tolist()]
    assert len({p.class_name for p in predictions}) > 1  # a model that says one class everywhere would prove little
    for prediction, probabilities in zip(predictions, reference):
        expected = {info["class_names"][c]: float(p) for c, p in enumerate(probabilities)}
        assert {name: pytest.approx(expected[name], abs=1e-6) for name, _ in prediction.top} == dict(prediction.top)
    assert not model.training


def test_a_model_folder_and_its_fit_run_folder_give_the_same_csv(ws, tmp_path):
    argv = ["predict", ws / "fitted" / "model", ws / "photos", "--out", tmp_path / "from_model.csv"]
    assert cli.main([str(a) for a in argv]) == 0
    _predict(ws, tmp_path / "from_run.csv")
    assert (tmp_path / "from_model.csv").read_text() == (tmp_path / "from_run.csv").read_text()


def test_an_existing_out_is_replaced_only_with_overwrite(ws, tmp_path, capsys):
    out = tmp_path / "p.csv"
    out.write_text("keep me")
    argv = [str(a) for a in ["predict", ws / "fitted", ws / "photos", "--out", out]]
    assert cli.main(argv) == 2 and out.read_text() == "keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0 and out.read_text().startswith("path,class,probability\n")


def test_a_model_whose_output_is_not_one_score_per_class_is_refused(ws):
    from zootune.data.image_folder import find_images
    from zootune.model_dir import load_model_dir
    from zootune.predict import predict_images

    _, info = load_model_dir(ws / "fitted" / "model")
    landmarks = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 10))  # 5 (x, y) points
    with pytest.raises(ZootuneError, match=r"not an image classifier of its 3 classes.*\(5, 10\)"):
        predict_images(landmarks, info, find_images([ws / "photos"]))
    with pytest.raises(ZootuneError, match="top-k must be an integer >= 1"):
        predict_images(landmarks, info, [ws / "photos" / "z.png"], top_k=0)


def _readme_snippet() -> str:
    """The python block of README.md's "Using the trained model" section."""
    section = README.read_text(encoding="utf-8").split("\n## Using the trained model\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_the_readme_snippet_predicts_what_zootune_predict_does(ws, tmp_path):
    rows = _predict(ws, tmp_path / "p.csv", "--top-k", "3")
    placeholder = 'folder, paths = "exported", ["cat.jpg", "dog.png"]'
    code = _readme_snippet()
    assert code.count(placeholder) == 1
    code = code.replace(placeholder, f"folder, paths = {str(ws / 'fitted' / 'model')!r}, {[r['path'] for r in rows]!r}")
    namespace: dict = {}
    exec(compile(code, "<README.md: Using the trained model>", "exec"), namespace)
    assert namespace["predicted"] == [row["class"] for row in rows]
    for row, probabilities in zip(rows, namespace["probabilities"].tolist()):
        names = namespace["config"]["class_names"]
        for rank in ("", "top2_", "top3_"):
            index = names.index(row[f"{rank}class"])
            assert float(row[f"{rank}probability"]) == pytest.approx(probabilities[index], rel=1e-4, abs=1e-6)
