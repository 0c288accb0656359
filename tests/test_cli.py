"""The zootune command: one-line errors for bad input, a fit -> export -> evaluate round trip on an
image folder and a tiny zoo written here, and the run options reaching the Python API."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import zootune.cli.main as cli
from zootune.errors import NonFiniteLossError
from zootune.methods.registry import available_methods
from zootune.models import resnet_small
from zootune.version import __version__

pytest.importorskip("zootune.engine")
from zootune.zoo import save_state_dict  # noqa: E402

ARCH = ["--arch", "resnet_small", "--arch-option", "depth=10", "--arch-option", "width=4"]
FAST = ["--epochs", "1", "--batch-size", "8", "--image-size", "16", "--max-steps-per-epoch", "2", "--no-progress"]
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def write_images(folder, classes: int, per_class: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.uniform(0, 120, (16, 16, 3)) + np.array(COLORS[c]) * 0.5
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"class{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        write_images(root / "data" / split, classes=3, per_class=n, seed=len(split))
    torch.manual_seed(0)
    for i in range(2):
        save_state_dict(root / f"m{i}.safetensors", resnet_small(depth=10, width=4).state_dict())
    save_state_dict(root / "wide.safetensors", resnet_small(depth=10, width=8).state_dict())
    return root


def run_cli(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("zootune: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "zootune", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"zootune {__version__}"


def test_error_from_a_real_process_is_one_line_without_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "zootune", "evaluate", str(tmp_path), "--data", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert_one_line_error(done.returncode, done.stderr, "not an exported zootune model")


@pytest.fixture(scope="module")
def fitted_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    argv = ["fit", *ARCH, "--zoo", workspace / "m0.safetensors", workspace / "m1.safetensors",
            "--data", workspace / "data", "--method", "finetune", "--member", "1", *FAST, "--out", out]
    code = cli.main([str(a) for a in argv])
    assert code == 0
    return out


def _bad_folders(root):
    (root / "empty").mkdir()
    (root / "files_only").mkdir()
    (root / "files_only" / "a.png").write_bytes(b"x")
    write_images(root / "no_images", 2, 3)
    for f in (root / "no_images" / "class1").iterdir():
        f.unlink()
    write_images(root / "corrupt", 2, 3)
    (root / "corrupt" / "class0" / "0.png").write_bytes(b"\x89PNG truncated")
    write_images(root / "five", 5, 2)


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("missing_zoo_file", ["does not exist"]),
        ("missing_data", ["does not exist"]),
        ("empty_dataset", ["empty"]),
        ("wrong_layout", ["not a folder of class folders"]),
        ("class_without_images", ["contains no images"]),
        ("unreadable_image", ["cannot read image", "0.png"]),
        ("zoo_mismatch", ["wide"]),
        ("unknown_method", ["unknown method"]),
        ("unknown_arch", ["unknown architecture"]),
        ("bad_option", ["key=value"]),
        ("bad_seeds", ["seeds"]),
        ("classes_the_model_lacks", ["class folder(s) class3, class4", "not among the model's classes"]),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(case, fragments, workspace, fitted_run, tmp_path, capsys):
    _bad_folders(tmp_path)
    zoo = ["--zoo", workspace / "m0.safetensors"]
    data = workspace / "data"

    def fit(*extra, zoo=zoo, data=data):
        return ["fit", *ARCH, *zoo, "--data", data, *FAST, "--out", tmp_path / "out", *extra]

    argv = {
        "missing_zoo_file": fit(zoo=["--zoo", tmp_path / "nope.pth"]),
        "missing_data": fit(data=tmp_path / "nope"),
        "empty_dataset": fit(data=tmp_path / "empty"),
        "wrong_layout": fit(data=tmp_path / "files_only"),
        "class_without_images": fit(data=tmp_path / "no_images"),
        "unreadable_image": fit(data=tmp_path / "corrupt"),
        "zoo_mismatch": fit(zoo=["--zoo", workspace / "m0.safetensors", workspace / "wide.safetensors"]),
        "unknown_method": fit("--method", "no-such-method"),
        "unknown_arch": ["fit", "--arch", "no_such_arch", *zoo, "--data", data, "--out", tmp_path / "o"],
        "bad_option": fit("--option", "novalue"),
        "bad_seeds": ["run", "--seeds", "0,x"],
        "classes_the_model_lacks": ["evaluate", fitted_run / "model", "--data", tmp_path / "five"],
    }[case]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out" / "model").exists()  # nothing exported for a failed fit


def test_unknown_target_is_reported_before_any_work(tmp_path, capsys):
    pytest.importorskip("zootune.suite.targets")
    code, _, err = run_cli(["run", "--targets", "no-such-target", "--out", tmp_path, "--cache-dir", tmp_path], capsys)
    assert_one_line_error(code, err, "unknown target")
    assert not (tmp_path / "minizoo").exists()  # the zoo was not built for a run that cannot start


def test_non_finite_loss_and_interrupt_messages(workspace, tmp_path, capsys, monkeypatch):
    import zootune.engine

    def nan_fit(self):
        raise NonFiniteLossError("loss is nan at epoch 2, step 5; the last good checkpoint is kept",
                                 checkpoint=tmp_path / "train" / "checkpoint.pt", advice="python advice")

    monkeypatch.setattr(zootune.engine.Trainer, "fit", nan_fit)
    argv = ["fit", *ARCH, "--zoo", workspace / "m0.safetensors", "--data", workspace / "data", *FAST,
            "--out", tmp_path]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, "loss is nan", "last good checkpoint", "--resume")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(zootune.engine.Trainer, "fit", interrupted)
    code, _, err = run_cli(argv, capsys)
    assert code == 130 and "--resume" in err and "Traceback" not in err


def test_fit_export_evaluate_round_trip(fitted_run, workspace, tmp_path, capsys):
    from safetensors.torch import load_file

    info = json.loads((fitted_run / "model" / "config.json").read_text())
    assert info["kind"] == "plain" and info["method"] == "finetune" and info["member"] == 1
    assert info["class_names"] == ["class0", "class1", "class2"] and info["zootune_version"] == __version__
    code, out, _ = run_cli(["export", fitted_run, "--out", tmp_path / "exported"], capsys)
    assert code == 0
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    trained = load_file(fitted_run / "model" / "model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert any("running_mean" in k for k in exported)  # BatchNorm statistics travel with the weights
    # a plain export loads strictly into the architecture with a 3-way head
    plain = resnet_small(num_classes=3, depth=10, width=4)
    plain.load_state_dict(exported, strict=True)

    code, out, _ = run_cli(["evaluate", tmp_path / "exported", "--data", workspace / "data"], capsys)
    assert code == 0
    test = json.loads((fitted_run / "model" / "metrics.json").read_text())["test"]
    assert f"loss {test['loss']:.4f} acc {test['acc']:.2f}" in out and "9 images" in out


@pytest.mark.parametrize("method, kind", [("lite", "plain"), ("zoo-tuning", "method")])
def test_zoo_tuning_fit_exports_a_model_that_evaluates_the_same(method, kind, workspace, tmp_path, capsys):
    if method not in available_methods():
        pytest.skip(f"{method} not registered")
    out = tmp_path / method
    code, printed, _ = run_cli(["fit", *ARCH, "--zoo", workspace / "m0.safetensors", workspace / "m1.safetensors",
                                "--data", workspace / "data", "--method", method, *FAST, "--out", out], capsys)
    assert code == 0
    # Lite folds into the plain architecture; full Zoo-Tuning is rebuilt from the zoo, then loaded
    assert json.loads((out / "model" / "config.json").read_text())["kind"] == kind
    code, printed, _ = run_cli(["evaluate", out / "model", "--data", workspace / "data"], capsys)
    test = json.loads((out / "model" / "metrics.json").read_text())["test"]
    assert code == 0 and f"loss {test['loss']:.4f} acc {test['acc']:.2f}" in printed


def test_fit_with_two_start_candidates_exports_the_kept_one_and_resumes(workspace, tmp_path, capsys):
    """Robust Zoo-Tuning with ``start_candidates=2``: both starts trained (the second in its own
    folder), the kept one exported with its start recorded, and a resumed fit ends identical."""
    out = tmp_path / "zt"
    argv = ["fit", *ARCH, "--zoo", workspace / "m0.safetensors", workspace / "m1.safetensors", "--data",
            workspace / "data", "--method", "zoo-tuning", "--option", "start_candidates=2", *FAST, "--out", out]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert (out / "train" / "candidate-2" / "checkpoint.pt").is_file()
    options = json.loads((out / "model" / "config.json").read_text())["options"]
    assert options["start_candidates"] == 2 and len(options["member_scores"]) == 2
    code, printed, _ = run_cli(["evaluate", out / "model", "--data", workspace / "data"], capsys)
    metrics = json.loads((out / "model" / "metrics.json").read_text())
    assert code == 0 and f"loss {metrics['test']['loss']:.4f} acc {metrics['test']['acc']:.2f}" in printed
    code, _, err = run_cli([*argv, "--resume"], capsys)
    assert code == 0, err
    resumed = json.loads((out / "model" / "metrics.json").read_text())
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in metrics.items() if k != "seconds"}
    # --overwrite replaces the candidates' folders with the run's (nothing of the old run stays)
    stale = out / "train" / "candidate-2" / "stale-marker"
    stale.write_text("old run")
    code, _, err = run_cli([*argv, "--overwrite"], capsys)
    assert code == 0 and not stale.exists(), err
    assert (out / "train" / "candidate-2" / "checkpoint.pt").is_file()


def test_run_options_reach_the_run_config(monkeypatch, tmp_path, capsys):
    import zootune.experiment

    seen = {}
    monkeypatch.setattr(zootune.experiment, "run_experiment", lambda config, out: seen.update(config=config, out=out))
    code, _, _ = run_cli(["run", "--seeds", "3", "--targets", "count,polygons", "--methods", "finetune,lite",
                          "--epochs", "4", "--no-plots", "--option", "lite:align=none", "--out", tmp_path], capsys)
    config = seen["config"]
    assert code == 0 and seen["out"] == tmp_path
    assert config.seeds == [0, 1, 2] and config.targets == ["count", "polygons"]
    assert config.methods == ["finetune", "lite"] and config.method_options == {"lite": {"align": "none"}}
    assert config.train.epochs == 4 and config.plots is False
    code, printed, _ = run_cli(["run", "--quick", "--seeds", "5,7", "--out", tmp_path], capsys)
    quick = seen["config"]
    assert quick.seeds == [5, 7] and quick.targets == ["default"] and quick.train.max_steps_per_epoch and "smoke test" in printed and "not results" in printed
    run_cli(["run", "--targets", "all", "--out", tmp_path], capsys)
    assert seen["config"].targets is None


def test_rank_prints_rank_zoo_order(workspace, capsys):
    logme = pytest.importorskip("zootune.methods.logme")
    from zootune.data.image_folder import load_image_folder
    from zootune.zoo import Zoo

    paths = [workspace / "m0.safetensors", workspace / "m1.safetensors"]
    code, out, _ = run_cli(["rank", *ARCH, "--zoo", *paths, "--data", workspace / "data", "--image-size", "16"], capsys)
    assert code == 0
    printed = [line.split()[1:3] for line in out.splitlines()[3:]]
    zoo = Zoo.from_checkpoints(paths, arch=resnet_small, arch_kwargs={"depth": 10, "width": 4})
    dataset = load_image_folder(workspace / "data", image_size=16).train.with_transform(None)
    expected = [[name, f"{score:.4f}"] for name, score in logme.rank_zoo(zoo, dataset)]
    assert printed == expected


# ------------------------------------------------------------------------------- training flags

FIT_REQUIRED = ["fit", "--zoo", "m.pth", "--data", "data", "--out", "out"]


def _fit_args(*extra):
    return cli.build_parser().parse_args(FIT_REQUIRED + list(extra))


def test_every_training_flag_of_fit_is_the_train_config_field_of_its_name():
    """A flag listed in TRAIN_FLAGS sets the TrainConfig field of the same name: one for a field that
    does not exist fails here, and so does a fit flag named like a field but not passed on."""
    import dataclasses

    from zootune.engine import TrainConfig

    assert cli.TRAIN_FLAGS == ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "seed", "device",
                               "precision", "threads", "channels_last", "sync_bn", "max_steps_per_epoch",
                               "warmup_epochs")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(cli.TRAIN_FLAGS) <= fields
    flags = {name for name in vars(_fit_args()) if name != "func"}
    assert flags & fields == set(cli.TRAIN_FLAGS)
    args = _fit_args("--epochs", "3", "--batch-size", "5", "--lr", "0.2", "--weight-decay", "0.1", "--optimizer",
                     "adam", "--seed", "7", "--device", "cpu", "--precision", "bf16", "--threads", "2",
                     "--channels-last", "on", "--sync-bn", "--max-steps-per-epoch", "4", "--warmup-epochs", "1.5",
                     "--no-progress")
    config = cli._train_config(args)
    assert {name: getattr(config, name) for name in cli.TRAIN_FLAGS} == {
        "epochs": 3, "batch_size": 5, "lr": 0.2, "weight_decay": 0.1, "optimizer": "adam", "seed": 7,
        "device": "cpu", "precision": "bf16", "threads": 2, "channels_last": True, "sync_bn": True,
        "max_steps_per_epoch": 4, "warmup_epochs": 1.5}
    assert config.progress is False
    auto = cli._train_config(_fit_args())  # auto epochs, lr and warm-up: placeholders until the data is read
    assert (auto.epochs, auto.lr, auto.channels_last, auto.progress, auto.warmup_epochs) == (1, 0.1, None, True, 0.0)


# TrainConfig decides these alone: the flag parses the value and checks no range of its own.
CHECKED_BY_TRAIN_CONFIG_ONLY = {"weight_decay", "optimizer"}


@pytest.mark.parametrize("flag, texts", [
    ("epochs", ["-1", "0", "1", "7"]), ("batch_size", ["0", "1", "48"]), ("threads", ["-3", "0", "1", "2"]),
    ("max_steps_per_epoch", ["0", "1"]), ("lr", ["-0.1", "0", "inf", "nan", "1e-3"]),
    ("weight_decay", ["-1", "nan", "inf", "0", "5e-4"]), ("optimizer", ["sgd", "adamw", "lbfgs"]),
    ("precision", ["fp32", "bf16", "fp16", "fp8"]),
])
def test_a_training_flag_refuses_what_train_config_refuses_and_nothing_else(flag, texts):
    """The range a training flag checks is TrainConfig's range, not another one."""
    from zootune.engine import TrainConfig
    from zootune.errors import ZootuneError

    kind = type(getattr(TrainConfig(), flag) or 1)
    for text in texts:
        try:
            value, refused_by_flag = getattr(_fit_args(f"--{flag.replace('_', '-')}", text), flag), False
        except cli._UsageError:
            value, refused_by_flag = kind(text), True
        try:
            TrainConfig(**{flag: value})
            refused_by_config = False
        except ZootuneError:
            refused_by_config = True
        assert refused_by_config or not refused_by_flag, (flag, text)  # never stricter than TrainConfig
        if flag not in CHECKED_BY_TRAIN_CONFIG_ONLY:
            assert refused_by_flag == refused_by_config, (flag, text)  # nor more lenient
