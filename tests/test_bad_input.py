"""Bad input through the real CLI entry point: one ``zootune: error:`` line, exit code 2, no
traceback, nothing left behind that breaks a rerun -- and nothing executed from a model folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zootune.cli import main as cli
from zootune.models import resnet_small
from zootune.zoo.checkpoint import save_state_dict

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

ARCH = ["--arch", "resnet_small", "--arch-option", "depth=10", "--arch-option", "width=4"]
FAST = ["--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "2", "--no-progress"]


def _images(root: Path, classes=("a", "b"), per_class=6, size=12):
    g = torch.Generator().manual_seed(0)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 120 + 100 * k).clamp(0, 255).to(torch.uint8)
            Image.fromarray(pixels.numpy()).save(root / name / f"{i}.png")


def fitted_workspace(root: Path, classes=("a", "b"), *fit_options) -> Path:
    """``root`` with a zoo of two tiny checkpoints (m0, m1), an image folder of ``classes`` (data/) and
    the model the real ``zootune fit`` trains on them with finetune (fitted/)."""
    for i in range(2):
        torch.manual_seed(i)
        save_state_dict(root / f"m{i}.safetensors", resnet_small(num_classes=3, depth=10, width=4).state_dict())
    _images(root / "data", classes=classes)
    argv = ["fit", *ARCH, "--zoo", root / "m0.safetensors", root / "m1.safetensors", "--data", root / "data",
            "--method", "finetune", *FAST, *fit_options, "--out", root / "fitted"]
    assert cli.main([str(a) for a in argv]) == 0
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return fitted_workspace(tmp_path_factory.mktemp("bad"))


def run_cli(argv, cwd=None):
    """The real entry point in a fresh process: exit code, stdout, stderr."""
    done = subprocess.run([sys.executable, "-m", "zootune", *map(str, argv)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def assert_one_line_error(code, stderr, *fragments):
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("zootune: error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _model_dir_with(ws: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the fitted model folder whose config.json has ``changes`` applied (None: delete)."""
    return _model_config(ws, tmp_path / "copy", **changes)


# ----------------------------------------------------------------------------- no code from data

@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_model_folder_naming_code_does_not_run_it(ws, tmp_path, command):
    marker = tmp_path / "MARKER"
    folder = _model_dir_with(ws, tmp_path, arch="os:system", arch_kwargs={"command": f"touch {marker}"})
    argv = [command, folder, *(["--data", ws / "data"] if command == "evaluate" else ["--out", tmp_path / "x"])]
    code, _, err = run_cli(argv)
    assert_one_line_error(code, err, "names code to import", "--trust-code")
    assert not marker.exists()


def test_predict_names_a_broken_image_from_a_real_process(ws, tmp_path):
    _images(tmp_path / "photos")
    (tmp_path / "photos" / "b" / "torn.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code, _, err = run_cli(["predict", ws / "fitted", tmp_path / "photos", "--out", tmp_path / "p.csv"])
    assert_one_line_error(code, err, "torn.jpg")
    assert not (tmp_path / "p.csv").exists()


def test_trust_code_lets_a_harmless_builder_load(ws, tmp_path):
    folder = _model_dir_with(ws, tmp_path, arch="zootune.models:resnet_small")
    code, _, err = run_cli(["evaluate", folder, "--data", ws / "data"])
    assert_one_line_error(code, err, "names code to import")
    code, out, err = run_cli(["evaluate", folder, "--data", ws / "data", "--trust-code"])
    assert code == 0, err
    assert "acc" in out


def test_a_model_folder_with_valid_declared_options_still_loads(ws, tmp_path, capsys):
    """The option tables refuse what a builder cannot take, not what it can: resnet10_small of width 4
    is the fitted resnet_small(depth=10, width=4)."""
    folder = _model_dir_with(ws, tmp_path, arch="resnet10_small", arch_kwargs={"width": 4, "in_chans": 3})
    assert cli.main([str(a) for a in ["evaluate", folder, "--data", ws / "data"]]) == 0, capsys.readouterr().err
    assert "acc" in capsys.readouterr().out

# ----------------------------------------------------------------------------- the matrix
# Each case: (id, argv as a function of the workspace and a fresh folder, fragments the error line must hold).
# Run in-process through zootune.cli.main.main (what the `zootune` script calls): an unexpected
# exception would surface here as a failed test with its traceback.


def _bad_files(ws: Path) -> None:
    """Broken inputs, made once per module."""
    import pickle

    (ws / "text.pt").write_text("this is not a checkpoint\n")
    (ws / "empty.safetensors").write_bytes(b"")
    (ws / "random.pt").write_bytes(bytes(range(256)) * 8)
    (ws / "truncated.safetensors").write_bytes((ws / "m0.safetensors").read_bytes()[:300])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (ws / "evil.pt").write_bytes(pickle.dumps({"state_dict": Evil()}))
    torch.save({"fc.weight": torch.zeros(2, 2)}, ws / "zip_evil.pt")
    state = resnet_small(num_classes=3, depth=10, width=4).state_dict()
    state["conv1.weight"][0, 0, 0, 0] = float("nan")
    save_state_dict(ws / "nan.safetensors", state)
    save_state_dict(ws / "wide.safetensors", resnet_small(num_classes=3, depth=10, width=8).state_dict())
    (ws / "a_file").write_text("x")
    (ws / "empty_dir").mkdir(exist_ok=True)
    (ws / "one_class" / "only").mkdir(parents=True, exist_ok=True)
    _images(ws / "one_class", classes=("only",))
    _images(ws / "broken_images")
    (ws / "broken_images" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    _images(ws / "three_classes", classes=("a", "b", "c"))
    occupied = ws / "occupied"
    (occupied / "model").mkdir(parents=True, exist_ok=True)
    (occupied / "results.json").write_text("{}")
    (ws / "zoo_folder").mkdir(exist_ok=True)
    (ws / "zoo_folder" / "m0.safetensors").write_bytes((ws / "m0.safetensors").read_bytes())
    (ws / "export_full").mkdir(exist_ok=True)
    (ws / "export_full" / "something").write_text("x")
    # a fit folder interrupted before its model was written: a training checkpoint, no model/
    (ws / "unfinished" / "train").mkdir(parents=True, exist_ok=True)
    (ws / "unfinished" / "train" / "checkpoint.pt").write_bytes((ws / "fitted" / "train" / "checkpoint.pt").read_bytes())


def _fit(ws, out, *extra, zoo=("m0.safetensors", "m1.safetensors"), data="data", arch=ARCH):
    return ["fit", *arch, "--zoo", *[ws / z for z in zoo], "--data", ws / data, *FAST, "--out", out, *extra]


def _predict(model, images, out, *extra):
    return ["predict", model, images, "--out", out / "predictions.csv", *extra]


def _model_config(ws, out, **changes):
    """A copy of the fitted model folder beside ``out`` whose config.json has ``changes`` applied
    (None: delete the field)."""
    folder = out.parent / f"model-{out.name}"
    folder.mkdir()
    source = ws / "fitted" / "model"
    (folder / "model.safetensors").write_bytes((source / "model.safetensors").read_bytes())
    config = json.loads((source / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _config_text(ws, out, text):
    folder = _model_config(ws, out)
    (folder / "config.json").write_text(text)
    return folder


def _weights(ws, out, data: bytes | None = None, **changes):
    folder = _model_config(ws, out, **changes)
    if data is not None:
        (folder / "model.safetensors").write_bytes(data)
    return folder


def _landmark_model(ws, out):
    """A copy of the fitted model folder turned into a 2-landmark model: its task recorded as such and
    its head resized to the 4 outputs that task makes (so that it loads)."""
    from zootune.zoo.checkpoint import load_state_dict_file

    folder = _model_config(ws, out, task={"type": "landmarks", "num_landmarks": 2}, num_classes=None,
                           class_names=None)
    state = load_state_dict_file(folder / "model.safetensors")
    state["fc.weight"], state["fc.bias"] = state["fc.weight"][:1].repeat(4, 1), torch.zeros(4)
    save_state_dict(folder / "model.safetensors", state)
    return folder


def _non_finite_weights(ws, out):
    """A copy of the fitted model folder whose weights hold one NaN (a diverged training's export)."""
    from zootune.zoo.checkpoint import load_state_dict_file

    folder = _model_config(ws, out)
    state = load_state_dict_file(folder / "model.safetensors")
    state["conv1.weight"].view(-1)[0] = float("nan")
    save_state_dict(folder / "model.safetensors", state)
    return folder


CASES = [
    # ---- fit: the zoo
    ("zoo-missing", lambda ws, o: _fit(ws, o, zoo=("nope.pt",)), ["nope.pt", "does not exist"]),
    ("zoo-is-folder", lambda ws, o: _fit(ws, o, zoo=("empty_dir",)), ["empty_dir", "folder"]),
    ("zoo-text-file", lambda ws, o: _fit(ws, o, zoo=("text.pt",)), ["text.pt", "not a PyTorch checkpoint"]),
    ("zoo-empty-safetensors", lambda ws, o: _fit(ws, o, zoo=("empty.safetensors",)), ["empty.safetensors"]),
    ("zoo-truncated", lambda ws, o: _fit(ws, o, zoo=("truncated.safetensors",)), ["truncated.safetensors"]),
    ("zoo-random-bytes", lambda ws, o: _fit(ws, o, zoo=("random.pt",)), ["random.pt"]),
    ("zoo-unsafe-pickle", lambda ws, o: _fit(ws, o, zoo=("evil.pt",)), ["refusing to load", "evil.pt"]),
    ("zoo-no-weights", lambda ws, o: _fit(ws, o, zoo=("zip_evil.pt",)), ["zip_evil.pt"]),
    ("zoo-nan-weights", lambda ws, o: _fit(ws, o, zoo=("m0.safetensors", "nan.safetensors")),
     ["nan.safetensors", "conv1.weight", "non-finite"]),
    ("zoo-mismatch", lambda ws, o: _fit(ws, o, zoo=("m0.safetensors", "wide.safetensors")), ["wide.safetensors"]),
    # ---- fit: the architecture
    ("arch-unknown", lambda ws, o: _fit(ws, o, arch=["--arch", "resnet_tiny9"]), ["unknown architecture", "resnet_tiny9"]),
    ("arch-code-untrusted", lambda ws, o: _fit(ws, o, arch=["--arch", "zootune.models:resnet_small"]),
     ["names code to import", "--trust-code"]),
    ("arch-code-missing-module", lambda ws, o: _fit(ws, o, "--trust-code", arch=["--arch", "no_such_mod:f"]),
     ["cannot import module", "no_such_mod"]),
    ("arch-option-unknown", lambda ws, o: _fit(ws, o, arch=[*ARCH, "--arch-option", "depthh=3"]),
     ["unknown", "depthh", "valid:", "width"]),
    ("arch-option-type", lambda ws, o: _fit(ws, o, arch=["--arch", "resnet_small", "--arch-option", "width=wide"]),
     ["'width'", "integer", "wide"]),
    ("arch-option-malformed", lambda ws, o: _fit(ws, o, arch=[*ARCH, "--arch-option", "width"]), ["key=value"]),
    ("arch-library-missing", lambda ws, o: _fit(ws, o, arch=["--arch", "timm:resnet50"]) if _missing("timm") else
     _fit(ws, o, arch=["--arch", "timm:no_such_model_xyz"]), ["timm"]),
    # ---- fit: the method and its options
    ("method-unknown", lambda ws, o: _fit(ws, o, "--method", "zoo-tunning"), ["unknown method", "zoo-tunning"]),
    ("method-needs-hub", lambda ws, o: _fit(ws, o, "--method", "hub-pathway"), ["hub"]),
    ("option-unknown", lambda ws, o: _fit(ws, o, "--method", "finetune", "--option", "backbone_lr=0.1"),
     ["unknown finetune option", "backbone_lr", "backbone_lr_mult"]),
    ("option-type", lambda ws, o: _fit(ws, o, "--method", "finetune", "--option", "backbone_lr_mult=fast"),
     ["backbone_lr_mult", "number", "fast"]),
    ("option-range", lambda ws, o: _fit(ws, o, "--method", "finetune", "--option", "backbone_lr_mult=-1"),
     ["backbone_lr_mult", ">= 0"]),
    ("option-malformed", lambda ws, o: _fit(ws, o, "--option", "align"), ["key=value", "align"]),
    ("zt-option-unknown", lambda ws, o: _fit(ws, o, "--method", "zoo-tuning", "--option", "gates=softmax"),
     ["unknown zoo-tuning option", "gates"]),
    ("zt-no-layer-of-that-type", lambda ws, o: _fit(ws, o, "--method", "zoo-tuning", "--option",
                                                    'target_types=["Linear"]'), ["no layer to aggregate", "Linear"]),
    ("zt-layer-type-unknown", lambda ws, o: _fit(ws, o, "--method", "zoo-tuning", "--option",
                                                 'target_types=["Attention"]'), ["unknown layer type", "Attention"]),
    ("zt-bank-lr-negative", lambda ws, o: _fit(ws, o, "--method", "zoo-tuning", "--option", "bank_lr_scale=-1"),
     ["bank_lr_scale"]),
    ("zt-align-choice", lambda ws, o: _fit(ws, o, "--method", "lite", "--option", "align=sometimes"), ["align"]),
    ("zt-start-candidates-zero", lambda ws, o: _fit(ws, o, "--method", "zoo-tuning", "--option", "start_candidates=0"),
     ["start_candidates", ">= 1"]),
    ("zt-start-candidates-type", lambda ws, o: _fit(ws, o, "--method", "lite", "--option", "start_candidates=two"),
     ["start_candidates"]),
    ("pac-source-data-missing", lambda ws, o: _fit(ws, o, "--method", "pac-net", "--source-data", ws / "nowhere"),
     ["nowhere"]),
    ("source-data-unused", lambda ws, o: _fit(ws, o, "--method", "finetune", "--source-data", ws / "data"),
     ["--source-data"]),
    # ---- fit: training options
    ("seed-negative", lambda ws, o: _fit(ws, o, "--seed", "-5"), ["seed", "0..4294967295"]),
    ("seed-huge", lambda ws, o: _fit(ws, o, "--seed", str(2**70)), ["seed"]),
    ("seed-text", lambda ws, o: _fit(ws, o, "--seed", "abc"), ["seed", "abc"]),
    ("epochs-zero", lambda ws, o: _fit(ws, o, "--epochs", "0"), ["positive integer"]),
    ("epochs-text", lambda ws, o: _fit(ws, o, "--epochs", "many"), ["many"]),
    ("lr-zero", lambda ws, o: _fit(ws, o, "--lr", "0"), ["--lr", "finite number > 0"]),
    ("lr-text", lambda ws, o: _fit(ws, o, "--lr", "fast"), ["--lr", "fast"]),
    ("lr-inf", lambda ws, o: _fit(ws, o, "--lr", "inf"), ["--lr", "finite number > 0", "inf"]),
    ("lr-nan", lambda ws, o: _fit(ws, o, "--lr", "nan"), ["--lr", "finite number > 0", "nan"]),
    ("lr-automatic", lambda ws, o: _fit(ws, o, "--lr", "automatic"), ["--lr", "automatic"]),
    ("epochs-auto-typo", lambda ws, o: _fit(ws, o, "--epochs", "Auto"), ["--epochs", "Auto"]),
    ("warmup-negative", lambda ws, o: _fit(ws, o, "--warmup-epochs", "-1"), ["--warmup-epochs", "number >= 0"]),
    ("warmup-nan", lambda ws, o: _fit(ws, o, "--warmup-epochs", "nan"), ["--warmup-epochs", "finite", "nan"]),
    ("warmup-text", lambda ws, o: _fit(ws, o, "--warmup-epochs", "some"), ["--warmup-epochs", "some"]),
    ("image-size-text", lambda ws, o: _fit(ws, o, "--image-size", "big"), ["--image-size", "big"]),
    ("augment-unknown", lambda ws, o: _fit(ws, o, "--augment", "heavy"), ["--augment", "heavy"]),
    ("batch-size-zero", lambda ws, o: _fit(ws, o, "--batch-size", "0"), ["positive integer"]),
    ("optimizer-unknown", lambda ws, o: _fit(ws, o, "--optimizer", "lion"), ["optimizer", "lion"]),
    ("weight-decay-negative", lambda ws, o: _fit(ws, o, "--weight-decay", "-1"), ["weight_decay"]),
    ("weight-decay-inf", lambda ws, o: _fit(ws, o, "--weight-decay", "inf"), ["weight_decay", "finite", "inf"]),
    ("weight-decay-nan", lambda ws, o: _fit(ws, o, "--weight-decay", "nan"), ["weight_decay", "finite", "nan"]),
    ("image-size-zero", lambda ws, o: _fit(ws, o, "--image-size", "0"), ["positive integer"]),
    ("member-out-of-range", lambda ws, o: _fit(ws, o, "--method", "finetune", "--member", "5"), ["member", "5"]),
    ("unknown-flag", lambda ws, o: _fit(ws, o, "--learning-rate", "0.1"), ["unrecognized", "--learning-rate"]),
    ("resume-and-overwrite", lambda ws, o: _fit(ws, o, "--resume", "--overwrite"), ["--resume", "--overwrite"]),
    # ---- fit: data and output
    ("data-missing", lambda ws, o: _fit(ws, o, data="no_data"), ["no_data", "does not exist"]),
    ("data-is-file", lambda ws, o: _fit(ws, o, data="a_file"), ["a_file"]),
    ("data-empty", lambda ws, o: _fit(ws, o, data="empty_dir"), ["empty_dir"]),
    ("data-one-class", lambda ws, o: _fit(ws, o, data="one_class"), ["at least 2"]),
    ("data-broken-image", lambda ws, o: _fit(ws, o, data="broken_images"), ["bad.png"]),
    ("out-is-file", lambda ws, o: _fit(ws, ws / "a_file"), ["a_file", "is a file"]),
    ("out-unwritable", lambda ws, o: _fit(ws, Path("/proc/zootune-cannot-write-here")), ["cannot be written"]),
    ("out-holds-run", lambda ws, o: _fit(ws, ws / "occupied"), ["holds another run", "--resume", "--overwrite"]),
    ("out-is-data", lambda ws, o: _fit(ws, ws / "data", "--overwrite"), ["--data", "never writes over"]),
    ("out-inside-data", lambda ws, o: _fit(ws, ws / "data" / "a" / "run"), ["is inside --data"]),
    ("out-contains-data", lambda ws, o: _fit(ws, ws, "--overwrite"), ["contains --data"]),
    ("out-is-zoo-folder", lambda ws, o: _fit(ws, ws / "zoo_folder", "--overwrite",
                                             zoo=("zoo_folder/m0.safetensors", "m1.safetensors")),
     ["is the folder of zoo member", "m0.safetensors"]),
    # ---- export
    ("export-onto-run", lambda ws, o: ["export", ws / "fitted", "--out", ws / "fitted", "--overwrite"],
     ["never writes over", "fitted"]),
    ("export-onto-model", lambda ws, o: ["export", ws / "fitted" / "model", "--out", ws / "fitted" / "model",
                                         "--overwrite"], ["never writes over"]),
    ("export-into-run", lambda ws, o: ["export", ws / "fitted", "--out", ws / "fitted" / "train", "--overwrite"],
     ["is inside"]),
    ("export-over-run", lambda ws, o: ["export", ws / "fitted" / "model", "--out", ws / "fitted", "--overwrite"],
     ["contains"]),
    ("export-missing", lambda ws, o: ["export", ws / "no_run", "--out", o], ["no_run", "does not exist"]),
    ("export-run-is-file", lambda ws, o: ["export", ws / "a_file", "--out", o], ["a_file", "is a file"]),
    ("export-no-config", lambda ws, o: ["export", ws / "empty_dir", "--out", o], ["not an exported zootune model"]),
    ("export-unfinished-run", lambda ws, o: ["export", ws / "unfinished", "--out", o],
     ["unfinished", "is an unfinished run", "train/checkpoint.pt", "--resume --out"]),
    ("export-out-is-file", lambda ws, o: ["export", ws / "fitted", "--out", ws / "a_file"], ["a_file", "is a file"]),
    ("export-out-not-empty", lambda ws, o: ["export", ws / "fitted", "--out", ws / "export_full"],
     ["not empty", "--overwrite"]),
    ("export-out-unwritable", lambda ws, o: ["export", ws / "fitted", "--out", Path("/proc/zootune-x/model")],
     ["cannot be written"]),
    ("config-not-json", lambda ws, o: ["export", _config_text(ws, o, "{not json"), "--out", o], ["not valid JSON"]),
    ("config-is-list", lambda ws, o: ["export", _config_text(ws, o, "[1, 2]"), "--out", o], ["JSON object", "list"]),
    ("config-no-num-classes", lambda ws, o: ["export", _model_config(ws, o, num_classes=None), "--out", o],
     ["lacks num_classes"]),
    ("config-no-format", lambda ws, o: ["export", _model_config(ws, o, format=None), "--out", o], ["lacks format"]),
    ("config-num-classes-text", lambda ws, o: ["export", _model_config(ws, o, num_classes="ten"), "--out", o],
     ["num_classes", "integer"]),
    ("config-num-classes-zero", lambda ws, o: ["export", _model_config(ws, o, num_classes=0), "--out", o],
     ["num_classes must be >= 1"]),
    ("config-unknown-field", lambda ws, o: ["export", _model_config(ws, o, loader="pickle"), "--out", o],
     ["unknown field", "loader"]),
    ("config-kind-unknown", lambda ws, o: ["export", _model_config(ws, o, kind="script"), "--out", o], ["kind"]),
    ("config-arch-code", lambda ws, o: ["export", _model_config(ws, o, arch="os:system"), "--out", o],
     ["names code to import"]),
    ("config-arch-kwargs-unknown", lambda ws, o: ["export", _model_config(ws, o, arch_kwargs={"evil": 1}), "--out", o],
     ["unknown", "evil"]),
    ("config-method-unknown", lambda ws, o: ["export", _model_config(ws, o, kind="method", method="sneaky"), "--out", o],
     ["unknown method", "sneaky"]),
    ("config-method-option-unknown", lambda ws, o: ["export", _model_config(ws, o, kind="method", method="zoo-tuning",
                                                                          options={"evil": 1}), "--out", o],
     ["unknown zoo-tuning option", "evil"]),
    ("config-method-zoo-missing", lambda ws, o: ["export", _model_config(ws, o, kind="method", method="zoo-tuning",
                                                                       zoo=["/nonexistent/m0.pt"]), "--out", o],
     ["/nonexistent/m0.pt"]),
    ("weights-corrupt", lambda ws, o: ["export", _weights(ws, o, b"garbage"), "--out", o], ["model.safetensors"]),
    ("weights-mismatch", lambda ws, o: ["export", _weights(ws, o, num_classes=7, class_names=None,
                                                           task={"type": "classification", "num_classes": 7}),
                                        "--out", o], ["does not match its config.json"]),
    ("config-task-unknown", lambda ws, o: ["export", _model_config(ws, o, task={"type": "segmentation"}), "--out", o],
     ["unknown task type 'segmentation'", "known: classification, landmarks"]),
    ("config-task-option-unknown", lambda ws, o: ["export", _model_config(
        ws, o, task={"type": "classification", "num_classes": 2, "smoothing": 0.1}), "--out", o],
     ["unknown task 'classification' option", "'smoothing'"]),
    ("config-task-num-classes-differ", lambda ws, o: ["export", _model_config(
        ws, o, task={"type": "classification", "num_classes": 3}), "--out", o],
     ["num_classes 2 differs from its task's 3"]),
    ("config-no-task", lambda ws, o: ["export", _model_config(ws, o, task=None, num_classes=None), "--out", o],
     ["lacks task"]),
    ("weights-non-finite", lambda ws, o: ["export", _non_finite_weights(ws, o), "--out", o],
     ["model.safetensors", "conv1.weight", "non-finite"]),
    ("config-class-names-count", lambda ws, o: ["export", _model_config(ws, o, class_names=["a"]), "--out", o],
     ["class_names", "2 classes"]),
    # ---- evaluate
    ("evaluate-missing", lambda ws, o: ["evaluate", ws / "no_model", "--data", ws / "data"], ["no_model"]),
    ("evaluate-data-missing", lambda ws, o: ["evaluate", ws / "fitted" / "model", "--data", ws / "no_data"],
     ["no_data"]),
    ("evaluate-unknown-class", lambda ws, o: ["evaluate", ws / "fitted" / "model", "--data", ws / "three_classes"],
     ["class folder(s) c of", "not among the model's classes (a, b)"]),
    ("evaluate-class-count-unnamed", lambda ws, o: ["evaluate", _model_config(ws, o, class_names=None),
                                                    "--data", ws / "three_classes"],
     ["2 classes", "3 class folders", "records no class names"]),
    ("evaluate-landmark-model", lambda ws, o: ["evaluate", _landmark_model(ws, o), "--data", ws / "data"],
     ["zootune evaluate applies image classifiers", "a landmarks model"]),
    ("evaluate-non-finite-weights", lambda ws, o: ["evaluate", _non_finite_weights(ws, o), "--data", ws / "data"],
     ["model.safetensors", "non-finite"]),
    ("evaluate-batch-size", lambda ws, o: ["evaluate", ws / "fitted" / "model", "--data", ws / "data",
                                           "--batch-size", "-1"], ["positive integer"]),
    # ---- predict
    ("predict-model-missing", lambda ws, o: _predict(ws / "no_model", ws / "data", o), ["no_model", "does not exist"]),
    ("predict-not-a-model-folder", lambda ws, o: _predict(ws / "empty_dir", ws / "data", o),
     ["not an exported zootune model"]),
    ("predict-config-task-not-a-record", lambda ws, o: _predict(_model_config(ws, o, task="landmarks"), ws / "data", o),
     ["'task'", "must be a JSON object"]),
    ("predict-landmark-model", lambda ws, o: _predict(_landmark_model(ws, o), ws / "data", o),
     ["predict applies image classifiers", "a landmarks model"]),
    ("predict-class-names-count", lambda ws, o: _predict(_model_config(ws, o, class_names=["a", "b", "c"]),
                                                         ws / "data", o), ["class_names must name each of the 2 classes"]),
    ("predict-no-images", lambda ws, o: _predict(ws / "fitted", ws / "empty_dir", o),
     ["no images found in", "empty_dir", "recursively"]),
    ("predict-image-missing", lambda ws, o: _predict(ws / "fitted", ws / "nope.png", o),
     ["nope.png", "does not exist"]),
    ("predict-not-an-image", lambda ws, o: _predict(ws / "fitted", ws / "a_file", o), ["a_file", "not an image file"]),
    ("predict-broken-image", lambda ws, o: _predict(ws / "fitted", ws / "broken_images", o), ["bad.png"]),
    ("predict-top-k-zero", lambda ws, o: _predict(ws / "fitted", ws / "data", o, "--top-k", "0"),
     ["--top-k", "positive integer"]),
    ("predict-out-inside-model", lambda ws, o: ["predict", ws / "fitted", ws / "data", "--out",
                                                ws / "fitted" / "model" / "p.csv"], ["inside the model folder"]),
    ("predict-out-is-an-input", lambda ws, o: ["predict", ws / "fitted", ws / "data", "--out",
                                               ws / "data" / "a" / "0.png"], ["one of the input images"]),
    ("predict-out-exists", lambda ws, o: ["predict", ws / "fitted", ws / "data", "--out", ws / "a_file"],
     ["exists", "--overwrite"]),
    ("predict-out-is-folder", lambda ws, o: ["predict", ws / "fitted", ws / "data", "--out", ws / "empty_dir"],
     ["is a folder"]),
    # ---- run
    ("run-target-unknown", lambda ws, o: ["run", "--targets", "cifar1000", "--out", o], ["unknown target", "cifar1000"]),
    ("run-method-unknown", lambda ws, o: ["run", "--methods", "finetun", "--out", o], ["unknown method", "finetun"]),
    ("run-option-unknown", lambda ws, o: ["run", "--methods", "lite", "--option", "lite:nope=1", "--out", o],
     ["unknown lite option", "nope"]),
    ("run-option-not-in-run", lambda ws, o: ["run", "--methods", "lite", "--option", "soup:bn_stats=reset", "--out", o],
     ["not in this run", "soup"]),
    ("run-option-no-method", lambda ws, o: ["run", "--option", "align=none", "--out", o], ["METHOD:key=value"]),
    ("run-seeds-negative", lambda ws, o: ["run", "--seeds", "-1,2", "--out", o], ["seed"]),
    ("run-lr-inf", lambda ws, o: ["run", "--lr", "inf", "--out", o], ["lr must be > 0 and finite"]),
    ("run-seeds-zero-count", lambda ws, o: ["run", "--seeds", "0", "--out", o], ["number of seeds"]),
    ("run-out-holds-results", lambda ws, o: ["run", "--out", ws / "occupied"], ["holds another run"]),
    # ---- rank, zoo, top level
    ("rank-zoo-missing", lambda ws, o: ["rank", *ARCH, "--zoo", ws / "nope.pt", "--data", ws / "data"], ["nope.pt"]),
    ("rank-data-missing", lambda ws, o: ["rank", *ARCH, "--zoo", ws / "m0.safetensors", "--data", ws / "no_data"],
     ["no_data"]),
    ("zoo-no-action", lambda ws, o: ["zoo"], ["zoo needs an action"]),
    ("no-command", lambda ws, o: [], ["no command given"]),
    ("unknown-command", lambda ws, o: ["train"], ["invalid choice", "train"]),
]


# ---- architecture options and --device: refused before the zoo or the data is read (the zoo and the
# data named here do not exist, so an error about them would mean the check came too late)
# architecture -> its bad --arch-option values -> the fragments the error line must hold
BAD_ARCH_OPTIONS = {
    **{name: {  # resnet_small of the depth of the name: the other depth is refused too
        "unknown": ("no_such=3", ["'no_such'", "valid: in_chans, num_classes, width"]),
        "fixed": (f"depth={other}", ["'depth'", "fixed by this architecture", "valid: in_chans, num_classes, width"]),
        "type": ("width=abc", ["'width'", "must be an integer", "'abc'"]),
        "negative": ("width=-8", ["width must be >= 1", "-8"]),
        "zero": ("width=0", ["width must be >= 1", "got 0"]),
    } for name, other in (("resnet10_small", 18), ("resnet18_small", 10))},
    "resnet_small": {
        "choice": ("depth=7", ["'depth'", "one of 10, 18", "got 7"]),
        "zero": ("width=0", ["width must be >= 1", "got 0"]),
    },
    "minizoo_resnet10_w8": {
        "unknown": ("no_such=3", ["'no_such'", "valid: in_chans, num_classes"]),
        "fixed": ("width=16", ["'width'", "fixed by this architecture", "valid: in_chans, num_classes"]),
        "type": ("in_chans=abc", ["'in_chans'", "must be an integer"]),
        "negative": ("in_chans=-8", ["in_chans must be >= 1", "-8"]),
        "zero": ("num_classes=0", ["num_classes must be >= 1", "got 0"]),
    },
    "resnet50": {
        "unknown": ("no_such=3", ["'no_such'", "valid: in_chans, num_classes, small_input, widths"]),
        "fixed": ("layers=[1,1,1,1]", ["'layers'", "fixed by this architecture"]),
        "type": ("widths=abc", ["'widths'", "a list of an integer", "'abc'"]),
        "negative": ("widths=[8,16,32,-8]", ["widths must be four channel counts >= 1", "-8"]),
        "zero": ("in_chans=0", ["in_chans must be >= 1", "got 0"]),
    },
    "vit_tiny32": {
        "unknown": ("no_such=3", ["'no_such'", "valid: depth, dim, img_size, in_chans, mlp_ratio"]),
        "type": ("dim=abc", ["'dim'", "must be an integer", "'abc'"]),
        "negative": ("dim=-8", ["dim must be >= 1", "-8"]),
        "zero": ("depth=0", ["depth must be >= 1", "got 0"]),
        "heads": ("dim=30", ["dim 30 must be a multiple of num_heads 4"]),
    },
    "mixer_tiny32": {
        "unknown": ("no_such=3", ["'no_such'", "valid: channel_hidden, depth, dim"]),
        "patches": ("patch_size=5", ["img_size 32 must be a multiple of patch_size 5"]),
    },
    "minatar_qnet": {
        "fixed": ("num_actions=3", ["'num_actions'", "fixed by this architecture", "valid: conv_channels"]),
        "zero": ("hidden=0", ["hidden must be >= 1", "got 0"]),
    },
}


def _arch_kwargs(text: str) -> dict:
    from zootune.cli.args import parse_options

    return parse_options([text], flag="--arch-option")


def _fit_before_any_work(ws, out, *extra, arch):
    return _fit(ws, out, *extra, zoo=("nope.pt",), data="no_data", arch=arch)


def _arch_option_cases():
    """Each bad option: through `fit` and `rank` (--arch-option) and a model folder's config.json
    (arch_kwargs) for `evaluate` and `export`."""
    cases = []
    for arch, bad in BAD_ARCH_OPTIONS.items():
        for what, (text, fragments) in bad.items():
            fragments = [f"architecture {arch!r}", *fragments]
            flags = ["--arch", arch, "--arch-option", text]
            kwargs = _arch_kwargs(text)
            cases += [
                (f"arch-{arch}-{what}", lambda ws, o, f=flags: _fit_before_any_work(ws, o, arch=f), fragments),
                (f"rank-arch-{arch}-{what}", lambda ws, o, f=flags: ["rank", *f, "--zoo", ws / "nope.pt",
                                                                     "--data", ws / "no_data"], fragments),
                (f"evaluate-config-{arch}-{what}", lambda ws, o, a=arch, k=kwargs: [
                    "evaluate", _model_config(ws, o, arch=a, arch_kwargs=k), "--data", ws / "no_data"], fragments),
                (f"export-config-{arch}-{what}", lambda ws, o, a=arch, k=kwargs: [
                    "export", _model_config(ws, o, arch=a, arch_kwargs=k), "--out", o], fragments),
            ]
    return cases


def _device_cases():
    """--device: parsed as a torch device and available here; what "not available" says depends on
    this torch build and machine."""
    cases = [("device-unknown-type", lambda ws, o: _fit_before_any_work(ws, o, "--device", "tpu", arch=ARCH),
              ["unknown device", "'tpu'"]),
             ("device-malformed", lambda ws, o: _fit_before_any_work(ws, o, "--device", "cuda:x", arch=ARCH),
              ["unknown device", "'cuda:x'"])]
    if torch.version.cuda is None and torch.version.hip is None:
        unavailable = ["CUDA is not available in this torch build"]
    elif not torch.cuda.is_available():
        unavailable = ["no cuda device is available"]
    else:
        unavailable = None
    if unavailable:
        cases.append(("device-cuda-unavailable",
                      lambda ws, o: _fit_before_any_work(ws, o, "--device", "cuda", arch=ARCH), unavailable))
    count = torch.cuda.device_count() if unavailable is None else 0
    cases.append((f"device-cuda-{count + 5}", lambda ws, o: _fit_before_any_work(
        ws, o, "--device", f"cuda:{count + 5}", arch=ARCH), unavailable or [f"this machine has {count} cuda device"]))
    return cases


CASES += _arch_option_cases() + _device_cases()

def _missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def bad_ws(ws):
    _bad_files(ws)
    return ws


@pytest.mark.parametrize("name,argv,fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_input_gives_one_line_exit_2_and_leaves_no_run_behind(bad_ws, tmp_path, capsys, name, argv, fragments):
    from zootune.run_folder import RUN_ENTRIES

    out = tmp_path / "out"
    code = cli.main([str(a) for a in argv(bad_ws, out)])
    captured = capsys.readouterr()
    assert_one_line_error(code, captured.err, *fragments)
    # nothing left behind that would make a corrected rerun refuse or trip over it
    if out.exists():
        assert not [p for e in RUN_ENTRIES for p in out.glob(e)], list(out.iterdir())
        assert not [p for p in out.rglob(".*tmp*")], list(out.rglob("*"))


# ----------------------------------------------------------------------------- warnings: one line each


def _warnings(stderr: str) -> list[str]:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert all(line.startswith("zootune: warning: ") for line in lines), stderr
    return lines


def test_a_zoo_checkpoint_given_twice_is_warned_about_saying_how_it_is_the_same(ws, tmp_path):
    copy = tmp_path / "copy_of_m0.safetensors"
    copy.write_bytes((ws / "m0.safetensors").read_bytes())
    code, out, err = run_cli(["rank", *ARCH, "--zoo", ws / "m0.safetensors", ws / "m0.safetensors", copy,
                              ws / "m1.safetensors", "--data", ws / "data"])
    assert code == 0, err
    lines = _warnings(err)
    assert len(lines) == 2, err
    twice = next(line for line in lines if "given twice" in line)
    assert "the same file as" in twice and "m0.safetensors" in twice
    same = next(line for line in lines if "same content" in line)
    assert str(copy) in same and str(ws / "m0.safetensors") in same and str(ws / "m1.safetensors") not in same


def test_a_tiny_image_size_is_warned_about(ws):
    code, out, err = run_cli(["evaluate", ws / "fitted" / "model", "--data", ws / "data", "--image-size", "4"])
    assert code == 0, err
    assert len(_warnings(err)) == 1 and "reduced to 4x4 pixels" in err


def test_images_in_sub_folders_of_a_class_folder_are_counted_not_silently_dropped(ws, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(ws / "data", data)
    _images(data / "a" / "extra", classes=("x",), per_class=2)  # a/extra/x/0.png, a/extra/x/1.png
    code, out, err = run_cli(["evaluate", ws / "fitted" / "model", "--data", data])
    assert code == 0, err
    (line,) = _warnings(err)
    assert "2 image(s) in sub-folders" in line and f"e.g. {data / 'a' / 'extra' / 'x' / '0.png'}" in line
    assert "12 images" in out  # what is read: the class folders' own files only


# ----------------------------------------------------------------------------- evaluate matches classes by name


@pytest.fixture(scope="module")
def three_class_model(ws):
    """A model fitted on classes a, b, c (class_names recorded), and its folder of those classes."""
    _images(ws / "abc", classes=("a", "b", "c"))
    out = ws / "fitted_abc"
    assert cli.main([str(a) for a in _fit(ws, out, "--method", "finetune", data="abc")]) == 0
    return out / "model", ws / "abc"


def _predictions(model, dataset):
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return model(images).argmax(1)


def test_evaluate_on_a_subset_of_the_classes_labels_them_by_name(three_class_model, tmp_path):
    import shutil

    from zootune.data.image_folder import load_evaluation_folder
    from zootune.model_dir import load_model_dir

    model_dir, full = three_class_model
    subset = tmp_path / "bc"  # b and c only: by position they would be labels 0 and 1, by name 1 and 2
    for name in ("b", "c"):
        shutil.copytree(full / name, subset / name)
    code, out, err = run_cli(["evaluate", model_dir, "--data", subset])
    assert code == 0, err
    assert "2 of the model's 3 classes, 12 images" in out

    model, info = load_model_dir(model_dir)
    _, whole, _ = load_evaluation_folder(full, info["image_size"], class_names=info["class_names"])
    _, part, _ = load_evaluation_folder(subset, info["image_size"], class_names=info["class_names"])
    in_subset = [i for i, path in enumerate(whole.paths) if path.parent.name in ("b", "c")]
    assert [p.relative_to(subset) for p in part.paths] == [whole.paths[i].relative_to(full) for i in in_subset]
    assert part.labels.tolist() == whole.labels[in_subset].tolist() and set(part.labels.tolist()) == {1, 2}
    expected = _predictions(model, whole)[in_subset]
    assert torch.equal(_predictions(model, part), expected)
    accuracy = 100.0 * (expected == whole.labels[in_subset]).float().mean().item()
    assert f"acc {accuracy:.2f}" in out


def test_class_folders_are_labelled_by_the_models_order_not_their_own(tmp_path):
    from zootune.data.image_folder import load_unsplit_image_folder

    _images(tmp_path, classes=("a", "b", "c"), per_class=2)
    names, sorted_order = load_unsplit_image_folder(tmp_path, 8)
    _, model_order = load_unsplit_image_folder(tmp_path, 8, class_names=["c", "a", "b"])
    by_path = dict(zip(model_order.paths, model_order.labels.tolist()))
    assert names == ["a", "b", "c"] and sorted(by_path) == sorted(sorted_order.paths)
    assert {path.parent.name: label for path, label in by_path.items()} == {"c": 0, "a": 1, "b": 2}


# ----------------------------------------------------------------------------- --resume on other data


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, except the lock, whose content is the pid of the last process that opened it."""
    from zootune.run_folder import LOCK_NAME

    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def test_resume_on_changed_data_is_refused_and_the_run_is_kept(ws, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ws / "fitted", run)
    moved = tmp_path / "moved_data"  # the same files elsewhere: the same data
    shutil.copytree(ws / "data", moved)
    code, _, err = run_cli(_fit(ws, run, "--method", "finetune", "--resume", data=moved))
    assert code == 0, err

    changed = tmp_path / "changed_data"
    shutil.copytree(ws / "data", changed)
    (changed / "a" / "6.png").write_bytes((changed / "a" / "0.png").read_bytes())  # one more image of class a
    before = _snapshot(run)
    code, _, err = run_cli(_fit(ws, run, "--method", "finetune", "--resume", data=changed))
    assert_one_line_error(code, err, "training data changed since", "checkpoint.pt", "--overwrite")
    assert _snapshot(run) == before


def test_resume_from_a_checkpoint_without_a_data_fingerprint_warns_and_continues(ws, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ws / "fitted", run)
    checkpoint = run / "train" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state.pop("data_fingerprint") is not None  # what an older zootune wrote: no such key
    torch.save(state, checkpoint)
    code, _, err = run_cli(_fit(ws, run, "--method", "finetune", "--resume"))
    assert code == 0, err
    (line,) = _warnings(err)
    assert "records no fingerprint of its training data" in line and str(checkpoint) in line


@pytest.mark.parametrize("source,out", [("fitted", "fitted"), ("fitted/model", "fitted/model"),
                                        ("fitted/model", "fitted"), ("fitted", "fitted/model")])
def test_export_onto_its_own_run_leaves_the_run_byte_identical(ws, source, out):
    before = _snapshot(ws / "fitted")
    assert "train/checkpoint.pt" in before and "model/metrics.json" in before
    code, _, stderr = run_cli(["export", ws / source, "--out", ws / out, "--overwrite"])
    assert_one_line_error(code, stderr, "never writes over")
    assert _snapshot(ws / "fitted") == before
