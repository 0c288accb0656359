"""Applying a trained model to new images: the most probable classes of each image, as a CSV.

Each image is read and preprocessed exactly as an evaluation split is
(:func:`zootune.data.image_folder.load_image_files` with the size, normalisation and crop the model
folder records, :func:`zootune.model_dir.input_options`). The model's output ``z`` (eval mode, no
gradients; :func:`zootune.engine.evaluation.predict`) gives the class probabilities

    p = softmax(z)

-- the distribution its cross-entropy was trained on (an ensemble's output, the log of its averaged
probabilities, gives back those averaged probabilities). The ``top_k`` classes are those of the
highest ``p``, most probable first, ties in class order; a ``top_k`` above the number of classes is
clamped to it.

The model folder must hold an image classifier: its config.json's ``task`` is a classification
(:func:`zootune.model_dir.classifier_task`; a landmark model, or a model saved from Python without
its task, is refused in one line), and a model whose output is not one score per class,
``(N, num_classes)``, is refused.

The CSV (:func:`predictions_csv`): a header ``path,class,probability,top2_class,top2_probability,...``
and one row per image in sorted path order, written atomically (:mod:`zootune.atomic`). The file is
never written over anything that is read: not inside the model folder, not over an input image.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from zootune.atomic import atomic_write_text
from zootune.data.decode import DEFAULT_MAX_PIXELS
from zootune.errors import ZootuneError


@dataclass(frozen=True)
class Prediction:
    """One image's ``top`` classes: (class name, probability) pairs, most probable first."""

    path: Path
    top: tuple[tuple[str, float], ...]

    @property
    def class_name(self) -> str:
        return self.top[0][0]

    @property
    def probability(self) -> float:
        return self.top[0][1]


def class_names_of(info: dict) -> list[str]:
    """The model's class names from its config (``"0"``, ``"1"``, ... when it records none; a config
    whose names do not match its class count is refused when the folder is read, by
    :func:`zootune.model_dir.check_model_config`)."""
    names = info.get("class_names")
    return list(names) if names else [str(i) for i in range(info["num_classes"])]


def _check_top_k(top_k: int) -> None:
    if not (isinstance(top_k, int) and top_k >= 1):
        raise ZootuneError(f"top-k must be an integer >= 1, got {top_k!r}")


def predict_images(model: nn.Module, info: dict, paths: Sequence[str | os.PathLike], top_k: int = 1,
                   batch_size: int = 256, *, num_workers: int | None = None,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
    """The ``top_k`` classes of each image of ``paths`` (in that order) under ``model`` and its config
    ``info`` (:func:`zootune.model_dir.load_model_dir`); see the module docstring for the rule.
    ``num_workers``: DataLoader workers (None: :func:`zootune.data.loading.default_num_workers`)."""
    from zootune.data.image_folder import load_image_files
    from zootune.data.loading import default_num_workers
    from zootune.engine.evaluation import predict
    from zootune.model_dir import classifier_task, input_options

    _check_top_k(top_k)
    classifier_task(info, "predict")
    names = class_names_of(info)
    # every image is read once: a RAM cache would only decode them twice
    dataset = load_image_files(paths, **input_options(info), cache_budget=0, max_pixels=max_pixels)
    workers = default_num_workers(dataset.image_size) if num_workers is None else num_workers
    outputs = predict(model, dataset, batch_size=batch_size, num_workers=workers)
    if outputs.dim() != 2 or outputs.shape[1] != len(names):
        raise ZootuneError(f"the model is not an image classifier of its {len(names)} classes: its output for "
                           f"{len(dataset)} images has shape {tuple(outputs.shape)}, not (N, {len(names)})")
    k = min(top_k, len(names))
    ranked, order = torch.sort(outputs.double().softmax(dim=1), dim=1, descending=True, stable=True)
    ranked, order = ranked[:, :k].tolist(), order[:, :k].tolist()
    return [Prediction(path, tuple((names[c], p) for c, p in zip(order[i], ranked[i])))
            for i, path in enumerate(dataset.paths)]


def predictions_csv(predictions: Sequence[Prediction]) -> str:
    """The CSV text: ``path,class,probability`` then ``topK_class,topK_probability`` for K = 2.. the
    number of classes each row holds; probabilities with 6 significant digits."""
    k = max((len(p.top) for p in predictions), default=1)
    header = ["path", "class", "probability"]
    for rank in range(2, k + 1):
        header += [f"top{rank}_class", f"top{rank}_probability"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for prediction in predictions:
        writer.writerow([str(prediction.path), *(cell for name, p in prediction.top for cell in (name, f"{p:.6g}"))])
    return text.getvalue()


def check_predictions_out(out: str | os.PathLike, *, model_dir: str | os.PathLike, images: Sequence[Path],
                          overwrite: bool = False) -> Path:
    """``out`` as a file the predictions may be written to: not inside ``model_dir``, not one of the
    ``images`` read, not a folder, not an existing file unless ``overwrite``; its folder writable."""
    from zootune.run_folder import check_writable_folder

    out = Path(out).expanduser()
    real = Path(os.path.realpath(out))
    if real.is_relative_to(os.path.realpath(Path(model_dir).expanduser())):
        raise ZootuneError(f"--out {out} is inside the model folder {model_dir}; write the predictions elsewhere")
    if any(os.path.realpath(image) == str(real) for image in images):
        raise ZootuneError(f"--out {out} is one of the input images; write the predictions elsewhere")
    if out.is_dir():
        raise ZootuneError(f"--out {out} is a folder, not a file")
    if out.exists() and not overwrite:
        raise ZootuneError(f"--out {out} exists: --overwrite replaces it, or choose another file")
    check_writable_folder(out.parent, "the folder of --out")
    return out


def predict_to_csv(model_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                   top_k: int = 1, batch_size: int = 256, overwrite: bool = False, trust_code: bool = False,
                   num_workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Prediction]:
    """``zootune predict``: the images among ``inputs`` (:func:`zootune.data.image_folder.find_images`),
    ``out`` checked (:func:`check_predictions_out`) before the model folder (or a ``zootune fit`` run
    folder's ``model/``) is loaded, :func:`predict_images`, and the CSV written atomically to ``out``."""
    from zootune.data.image_folder import find_images
    from zootune.model_dir import find_model_dir, load_model_dir

    _check_top_k(top_k)  # before any file is read
    images = find_images(inputs)
    out = check_predictions_out(out, model_dir=model_dir, images=images, overwrite=overwrite)
    model, info = load_model_dir(find_model_dir(model_dir), trust_code=trust_code)
    predictions = predict_images(model, info, images, top_k, batch_size, num_workers=num_workers,
                                 max_pixels=max_pixels)
    atomic_write_text(out, predictions_csv(predictions))
    return predictions


__all__ = ["Prediction", "check_predictions_out", "class_names_of", "predict_images", "predict_to_csv",
           "predictions_csv"]
