"""The ``zootune`` command: a thin layer over the Python API.

Subcommands: ``run`` (the comparison, :func:`zootune.experiment.run_experiment`), ``fit``, ``export``,
``evaluate``, ``predict`` (:func:`zootune.predict.predict_to_csv`), ``zoo build|list`` (the MiniZoo),
``rank`` (LogME), ``rl`` (MinAtar transfer, :mod:`zootune.cli.rl`). Each one parses its arguments,
calls the library and prints; the work is done by the library.

A problem caused by the user's input (:class:`zootune.errors.ZootuneError`, or bad arguments) is
printed as ONE line ``zootune: error: ...`` on stderr with exit status 2. Any other exception is a
bug in zootune and keeps its traceback. Ctrl-C exits with 130, SIGTERM with 143 (one line each;
checkpoints already written are kept).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from zootune.cli.args import (
    auto_or,
    layer_types,
    mebibytes,
    nonnegative_float,
    parse_method_option_list,
    parse_options,
    parse_seeds,
    positive_float,
    positive_int,
    seed_int,
    split_list,
    worker_count,
)
from zootune.errors import NonFiniteLossError, ZootuneError
from zootune.methods.registry import DEFAULT_METHOD
from zootune.version import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so that the error is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _folder_options(args) -> dict:
    """Keyword arguments of zootune.data.image_folder's loaders from the data flags."""
    options = {"max_pixels": args.max_image_pixels}
    if args.cache_budget is not None:
        options["cache_budget"] = int(args.cache_budget * 2**20)
    return options


def _preprocessing(zoo) -> dict:
    """Normalisation and evaluation crop of a zoo loaded by name, from its checkpoints' own
    pretrained configs ({} keeps zootune's defaults: ImageNet statistics, crop 0.875)."""
    from zootune.zoo.preprocessing import data_config

    config = data_config(zoo)
    if not config:
        return {}
    chosen = {"mean": list(config["mean"]), "std": list(config["std"])}
    if config.get("crop_pct"):
        chosen["crop_fraction"] = float(config["crop_pct"])
    return chosen


def _num_workers(args, image_size: int) -> int:
    from zootune.data.loading import default_num_workers

    return default_num_workers(image_size) if args.workers == "auto" else args.workers


# --------------------------------------------------------------------------------------------------
# Subcommands


def cmd_run(args) -> int:
    from zootune.experiment import RunConfig, run_experiment

    overrides = {}
    if args.targets is not None:
        overrides["targets"] = None if args.targets == "all" else split_list(args.targets)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.option:
        overrides["method_options"] = parse_method_option_list(args.option)
    if args.methods is not None:
        overrides["methods"] = split_list(args.methods)
    # the training flags are TrainConfig fields of the same name, applied over the run's settings
    train = {name: getattr(args, name) for name in ("epochs", "batch_size", "lr", "optimizer", "max_steps_per_epoch")
             if getattr(args, name) is not None}
    overrides.update(hub=args.hub, cache_dir=args.cache_dir, plots=not args.no_plots,
                     train={**train, "progress": args.progress})
    config = RunConfig.quick(**overrides) if args.quick else RunConfig(**overrides)
    from zootune.experiment import parse_method_options, resolve_targets, select_methods
    from zootune.run_folder import RunFolder

    parse_method_options(select_methods(config.methods, hub=config.hub), config.method_options)
    resolve_targets(config.targets)
    out = Path(args.out) if args.out else Path("zootune-out") / time.strftime("%Y%m%d-%H%M%S")
    with RunFolder(out, overwrite=args.overwrite, entries=("results.json", "results.md", "log.txt")):
        if args.quick:
            print("--quick: a smoke test -- default target, one seed, 24 steps per training (about 1.5 min on "
                  "2 CPU cores once the MiniZoo is built, which is extra the first time and cached); its numbers "
                  "are one seed of undertrained models, not results: `zootune run` is the comparison")
        run_experiment(config, out)
    return 0


def _check_zoo_arguments(args) -> bool:
    """Check ``--zoo``, ``--arch`` and ``--arch-option`` without reading any file; True when the zoo is
    checkpoint files (then ``args.builder`` is the architecture's builder and ``args.arch_kwargs`` its
    checked options), False when it is pretrained names (timm:..., torchvision:..., hf-hub:...)."""
    from zootune.models import resolve_arch_options
    from zootune.zoo import is_pretrained_name

    named = [entry for entry in args.zoo if is_pretrained_name(entry)]
    if named:
        if len(named) != len(args.zoo):
            files = [entry for entry in args.zoo if entry not in named]
            raise ZootuneError(f"--zoo mixes pretrained names ({named[0]}) and checkpoint files ({files[0]}); "
                               "give one kind (a file for a named member: NAME=PATH)")
        if args.arch is not None or args.arch_kwargs:
            raise ZootuneError("--arch/--arch-option are for checkpoint files; pretrained names bring their "
                               "architecture (drop --arch)")
        return False
    if args.arch is None:
        raise ZootuneError("--arch is required with checkpoint files (the architecture they hold; "
                           "pretrained names such as timm:resnet50.a1_in1k need none)")
    args.builder, args.arch_kwargs = resolve_arch_options(args.arch, args.arch_kwargs, trust_code=args.trust_code)
    return True


def _load_zoo(args, from_files: bool):
    """The zoo of ``--zoo``, once :func:`_check_zoo_arguments` has said whether it is ``from_files``
    (checkpoint files of ``--arch``) or pretrained names, whose architecture and preprocessing come
    with them (``args.arch`` is set to it)."""
    from zootune.zoo import Zoo

    if from_files:
        for path in args.zoo:
            if not Path(path).exists():
                raise ZootuneError(f"zoo checkpoint {path} does not exist")
            if Path(path).is_dir():
                raise ZootuneError(f"zoo checkpoint {path} is a folder, not a checkpoint file")
        return Zoo.from_checkpoints(args.zoo, arch=args.builder, arch_kwargs=args.arch_kwargs)
    zoo = Zoo.from_pretrained(args.zoo)
    args.arch, args.arch_kwargs = zoo.architecture, dict(zoo.arch_kwargs)
    if zoo.data_config is not None and _is_main_process():
        shown = ", ".join(f"{k} {v}" for k, v in zoo.data_config.to_dict().items())
        print(f"zoo: {len(zoo)} x {zoo.architecture}; the checkpoints' preprocessing: {shown}")
    return zoo


def _add_layer_types(spec, options: dict, layer_types: list[str] | None) -> None:
    """Put ``--aggregate`` into the method's options, if the method takes layer types (its spec's
    ``layer_types_option`` names the option)."""
    if layer_types is None:
        return
    option = spec.layer_types_option
    if option is None:
        raise ZootuneError(f"method {spec.name!r} aggregates no layers: --aggregate does not apply to it")
    if option in options:
        raise ZootuneError(f"give the layer types once: --aggregate or --option {option}=..., not both")
    options[option] = layer_types


def _print_reports() -> None:
    """Methods log what they built (e.g. which layers are aggregated and why) and the engine the time
    a training has left, at INFO: print both."""
    import logging

    class PrintHandler(logging.Handler):
        def emit(self, record):
            print(self.format(record))  # the sys.stdout of the moment, not of the first call

    for name in ("zootune.methods", "zootune.progress"):
        logger = logging.getLogger(name)
        if not any(type(h).__name__ == "PrintHandler" for h in logger.handlers):
            logger.addHandler(PrintHandler())
        logger.setLevel(logging.INFO)


def _methods():
    from zootune.methods.registry import available_methods

    return available_methods()


def _method_list() -> str:
    return ", ".join(_methods())


def _zoo_files(members: Sequence[str]) -> list[str]:
    """The checkpoint files that ``--zoo`` names (a NAME=PATH member's PATH too)."""
    files = []
    for member in members:
        _, sep, path = str(member).partition("=")
        files.append(path if sep else str(member))
    return [path for path in files if Path(path).is_file()]


def _is_main_process() -> bool:
    """Rank 0 under torchrun (RANK in the environment), or a plain process: the one that writes and prints."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def cmd_fit(args) -> int:
    from zootune.fitting import fit_with_requirements
    from zootune.run_folder import RunFolder, refuse_overlap
    from zootune.tasks import task_for

    # Everything the user typed is checked before any file is read or any model is built.
    spec, options = _fit_method(args)
    from_files = _check_zoo_arguments(args)
    config = _train_config(args)
    main_process = _is_main_process()
    say = print if main_process else (lambda *_a, **_k: None)
    refuse_overlap(args.out, [("--data", args.data)] + ([("--source-data", args.source_data)]
                                                        if args.source_data is not None else []),
                   files=[("zoo member", path) for path in _zoo_files(args.zoo)])
    with RunFolder(args.out, resume=args.resume, overwrite=args.overwrite, writer=main_process) as folder:
        zoo = _load_zoo(args, from_files)
        if main_process:
            _print_reports()
        if args.member is not None and not 0 <= args.member < len(zoo):
            raise ZootuneError(f"--member {args.member} is out of range for a zoo of {len(zoo)} models")
        preprocessing = _preprocessing(zoo)
        splits, source_data = _fit_data(args, zoo, preprocessing, say)
        task = task_for(splits)
        config, chosen = _fit_choices(args, spec, config, zoo, task, splits, folder.path, say)
        member = chosen.get("member", args.member)
        result, _ = fit_with_requirements(spec, zoo, task, splits, config, member=member, options=options,
                                          source_data=source_data, out_dir=folder.path, resume=args.resume, echo=say)
        metrics = _fitted_metrics(result.model, task, splits, config)
        model_dir, info = _save_fitted(folder, args, spec, {**options, **result.resolved}, result, splits,
                                       metrics, chosen, preprocessing)
    shown = " ".join(f"{split} {task.metric_name} {m[task.metric_name]:.2f}" for split, m in metrics.items())
    say(f"{spec.name}: {shown} ({result.seconds:.1f} s); model written to {model_dir} ({info['kind']})")
    return 0


def _fit_method(args):
    """The method of ``--method`` and its options (``--option``, ``--aggregate``), checked (names,
    types and ranges), and ``args.arch_kwargs`` parsed from ``--arch-option``."""
    from zootune.methods.registry import get_method

    spec = get_method(args.method)
    if spec.hub:
        raise ZootuneError(f"method {spec.name!r} needs a hub of different architectures; use the Python API")
    if args.source_data is not None and not spec.needs_source_data:
        raise ZootuneError(f"method {spec.name!r} uses no source data; --source-data is for "
                           f"{', '.join(n for n, s in _methods().items() if s.needs_source_data) or 'none'}")
    args.arch_kwargs = parse_options(args.arch_option, flag="--arch-option")
    options = parse_options(args.option)
    _add_layer_types(spec, options, args.aggregate)
    spec.parse_options(options)  # unknown names, types and ranges
    return spec, options


def _fitted_metrics(model, task, splits, config) -> dict:
    """The fitted model's metrics on the validation split, and on the test split when there is one."""
    from zootune.engine import evaluate

    metrics = {"val": evaluate(model, task, splits.val, num_workers=config.num_workers)}
    if splits.test is not None:
        metrics["test"] = evaluate(model, task, splits.test, num_workers=config.num_workers)
    return metrics


def _save_fitted(folder, args, spec, options: dict, result, splits, metrics: dict, chosen: dict,
                 preprocessing: dict) -> tuple[Path, dict]:
    """Commit the fitted model (safetensors + config.json) and metrics.json into the run folder as
    one unit; its folder and its config. ``options``: as the method resolved them from the data
    (e.g. the members' ranking), so that loading the folder rebuilds the same module without it."""
    from zootune.model_dir import export_info, save_model_dir
    from zootune.report import atomic_write_json
    from zootune.tasks import task_for

    member = chosen.get("member", args.member)
    member = (member or 0) if spec.per_member else member
    info = export_info(
        result.model, arch=args.arch, arch_kwargs=args.arch_kwargs, task=task_for(splits),
        zoo_paths=args.zoo, method=spec.name, member=member, options=options,
        class_names=list(splits.class_names), image_size=splits.image_size, metrics=metrics,
        trust_code=args.trust_code, preprocessing=preprocessing,
    )

    def write_model(tmp: Path) -> None:
        # the model, its config and its metrics are one unit: renamed into place together
        save_model_dir(tmp, result.model, info)
        atomic_write_json(tmp / "metrics.json", {"method": spec.name, "member": member,
                                                  "seconds": result.seconds, "chosen": chosen,
                                                  "best_val_metric": result.val_metric, **metrics})

    return folder.commit("model", write_model), info


# The flags of `zootune fit` that set the TrainConfig fields of the same names (TrainConfig checks
# their ranges); `auto` epochs and lr are resolved from the data later.
TRAIN_FLAGS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "seed", "device", "precision",
               "threads", "channels_last", "sync_bn", "max_steps_per_epoch", "warmup_epochs")
CHANNELS_LAST = {"auto": None, "on": True, "off": False}  # --channels-last -> TrainConfig.channels_last


def _train_config(args):
    """The engine's settings from the flags (``auto`` epochs and lr are resolved from the data later)."""
    from zootune.engine import TrainConfig, check_device

    check_device(args.device)
    values = {name: getattr(args, name) for name in TRAIN_FLAGS}
    values.update(epochs=1 if args.epochs == "auto" else args.epochs, lr=0.1 if args.lr == "auto" else args.lr,
                  warmup_epochs=0.0 if args.warmup_epochs == "auto" else args.warmup_epochs,
                  channels_last=CHANNELS_LAST[args.channels_last], progress=not args.no_progress)
    return TrainConfig(**values)


def _fit_data(args, zoo, preprocessing: dict, say):
    """The training folder (and ``--source-data``), with ``auto`` size and augmentation resolved and said."""
    from zootune.data.image_folder import load_image_folder
    from zootune.zoo.preprocessing import data_config

    zoo_config = data_config(zoo) or {}
    zoo_size = int(zoo_config["input_size"][-1]) if zoo_config.get("input_size") else None
    splits = load_image_folder(args.data, image_size=args.image_size, val_fraction=args.val_fraction,
                               test_fraction=args.test_fraction, seed=args.seed, augment=args.augment,
                               zoo_input_size=zoo_size, **preprocessing, **_folder_options(args))
    for option, choice in splits.chosen.items():
        say(f"--{option.replace('_', '-')} auto: {choice['value']} ({choice['why']})")
    source_data = None
    if args.source_data is not None:
        augment = splits.chosen.get("augment", {}).get("value", args.augment)
        source_data = load_image_folder(args.source_data, image_size=splits.image_size, seed=args.seed,
                                   augment=augment, **preprocessing, **_folder_options(args))
    return splits, source_data


CHOICES_FILE = "choices.json"  # what --epochs/--lr auto resolved to, reused by --resume


def _saved_choices(path: Path) -> dict:
    """The run's earlier ``auto`` choices; {} (chosen again, the same on this machine) when missing or
    unreadable, with a warning for the latter."""
    import json
    import warnings

    if not path.is_file():
        return {}
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict) or not isinstance(saved.get("lr", 0.1), (int, float)):
        warnings.warn(f"{path} is unreadable: the automatic choices are made again")
        return {}
    return saved


def _fit_choices(args, spec, config, zoo, task, splits, out: Path, say):
    """``config`` with the workers for the chosen image size and ``auto`` epochs and lr resolved
    (read back from the run folder on --resume, so the run continues as it started); and what was
    chosen (for metrics.json), with the member a per-member method trains when ``--member`` is not
    given: the one LogME ranks first on the training images."""
    import dataclasses
    import math

    from zootune.engine.config import budget_epochs, warmup_epochs_for
    from zootune.methods.logme import best_member
    from zootune.methods.lr_probe import choose_learning_rate
    from zootune.report import atomic_write_json

    config = dataclasses.replace(config, num_workers=_num_workers(args, splits.image_size))
    chosen = {name: choice["value"] for name, choice in splits.chosen.items()}
    saved = _saved_choices(out / CHOICES_FILE) if args.resume else {}
    if spec.per_member and args.member is None:
        chosen["member"] = saved["member"] if "member" in saved else best_member(zoo, splits.train)
        say(f"--member: {chosen['member']}, the member LogME ranks first on the training images")
    if args.epochs == "auto":
        epochs, why = budget_epochs(len(splits.train), config.batch_size)
        chosen["epochs"] = saved.get("epochs", epochs)
        say(f"--epochs auto: {why}")
    if args.warmup_epochs == "auto":
        steps_per_epoch = max(1, math.ceil(len(splits.train) / config.batch_size))
        warmup, why = warmup_epochs_for(chosen.get("epochs", config.epochs), steps_per_epoch)
        chosen["warmup_epochs"] = saved.get("warmup_epochs", 0.0 if saved else warmup)  # runs begun without one
        say(f"--warmup-epochs auto: {why}")
    if args.lr == "auto" and "lr_probe" in saved:
        chosen.update(lr=saved["lr"], lr_probe=saved["lr_probe"])
        say(f"--lr auto: {saved['lr']:g}, as chosen when the run started")
    elif args.lr == "auto":
        run = {k: chosen[k] for k in ("epochs", "warmup_epochs") if k in chosen}  # the probe compresses this run
        probe = choose_learning_rate(zoo, task, splits, dataclasses.replace(config, **run),
                                     member=chosen.get("member", args.member))
        say(probe.summary())
        chosen.update(lr=probe.lr, lr_probe=probe.to_dict())
    config = dataclasses.replace(config, **{k: chosen[k] for k in ("epochs", "lr", "warmup_epochs") if k in chosen})
    if _is_main_process() and chosen:
        atomic_write_json(out / CHOICES_FILE, {**saved, **chosen})
    return config, chosen


def cmd_export(args) -> int:
    from zootune.model_dir import find_model_dir, load_model_dir, save_model_dir
    from zootune.run_folder import check_writable_folder, commit_folder, refuse_overlap

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ZootuneError(f"run folder {run_dir} does not exist" if not run_dir.exists()
                           else f"{run_dir} is a file, not a run or model folder")
    out = Path(args.out).expanduser()
    refuse_overlap(out, [("the run or model folder", run_dir)])
    if out.exists() and not out.is_dir():
        raise ZootuneError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ZootuneError(f"--out {out} is not empty: --overwrite replaces it, or choose another folder")
    check_writable_folder(out.parent, "the folder of --out")
    model, info = load_model_dir(find_model_dir(run_dir), trust_code=args.trust_code)
    info = {k: v for k, v in info.items() if k not in ("format", "zootune_version")}
    commit_folder(out, lambda tmp: save_model_dir(tmp, model, info))
    outputs = f"{info['num_classes']} classes" if "num_classes" in info else f"a {info['task']['type']} model"
    print(f"exported {info['method']} ({info['kind']} model, {info['arch']}, {outputs}) to {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    from zootune.data.image_folder import load_evaluation_folder
    from zootune.engine import evaluate
    from zootune.model_dir import classifier_task, input_options, load_model_dir

    model, info = load_model_dir(args.model_dir, trust_code=args.trust_code)
    task = classifier_task(info, "zootune evaluate")
    # evaluated as it was trained: the size, normalisation and crop recorded at export
    options = {**input_options(info), **_folder_options(args)}
    if args.image_size is not None:
        options["image_size"] = args.image_size
    image_size = options.pop("image_size")
    # class folders are matched to the model's outputs by name where it records its class names
    folder_classes, dataset, what = load_evaluation_folder(
        args.data, image_size, class_names=info.get("class_names"), num_classes=info["num_classes"], **options)
    if len(folder_classes) < info["num_classes"]:
        what += f", {len(folder_classes)} of the model's {info['num_classes']} classes"
    metrics = evaluate(model, task, dataset, batch_size=args.batch_size, num_workers=_num_workers(args, image_size))
    print(f"{args.model_dir} on {args.data} ({what}, {len(dataset)} images): "
          + " ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.2f}" for k, v in metrics.items()))
    return 0


def cmd_predict(args) -> int:
    from zootune.predict import predict_to_csv

    predictions = predict_to_csv(args.model_dir, args.images, args.out, top_k=args.top_k, batch_size=args.batch_size,
                                 overwrite=args.overwrite, trust_code=args.trust_code,
                                 num_workers=None if args.workers == "auto" else args.workers,
                                 max_pixels=args.max_image_pixels)
    print(f"{len(predictions)} images: predictions written to {args.out}")
    return 0


def cmd_zoo_build(args) -> int:
    from zootune.minizoo import build_minizoo

    rows = build_minizoo(cache_dir=args.cache_dir, force=args.force, progress=not args.no_progress)
    print(f"MiniZoo ready: {len(rows)} members")
    return cmd_zoo_list(args)


def cmd_zoo_list(args) -> int:
    from zootune.minizoo import list_minizoo
    from zootune.report import format_text_table

    columns = ("name", "task", "data", "algorithm", "built", "checksum")
    rows = []
    for row in list_minizoo(cache_dir=args.cache_dir):
        cells = []
        for column in columns:
            value = row.get(column, row.get(f"{column}_ok", "-"))
            if isinstance(value, bool):
                value = "yes" if value else "no"
            elif column == "checksum" and isinstance(value, str) and len(value) > 12:
                value = value[:12]
            cells.append("-" if value is None else str(value))
        rows.append(cells)
    print(format_text_table(columns, rows, left_columns=len(columns)))
    return 0


def cmd_rank(args) -> int:
    from zootune.data.image_folder import load_image_folder
    from zootune.methods.logme import rank_zoo
    from zootune.report import format_text_table

    args.arch_kwargs = parse_options(args.arch_option, flag="--arch-option")
    zoo = _load_zoo(args, _check_zoo_arguments(args))
    splits = load_image_folder(args.data, image_size=args.image_size, augment=None, **_preprocessing(zoo),
                               **_folder_options(args))
    dataset = splits.train.with_transform(None)  # score un-augmented images
    ranking = rank_zoo(zoo, dataset, batch_size=args.batch_size, num_workers=_num_workers(args, args.image_size))
    rows = [[str(i + 1), name, f"{score:.4f}"] for i, (name, score) in enumerate(ranking)]
    print(f"LogME transferability on {args.data} ({len(dataset)} training images; higher is better):")
    print(format_text_table(("rank", "model", "LogME"), rows))
    return 0


# --------------------------------------------------------------------------------------------------
# Parser


def _add_zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch",
                   help="architecture of the checkpoint files: a registered name (e.g. resnet50, resnet_small), "
                        "timm:NAME or torchvision:NAME, or module:function returning your model "
                        "(imported only with --trust-code); not needed with pretrained names")
    p.add_argument("--arch-option", action="append", metavar="KEY=VALUE",
                   help="keyword argument for the architecture builder, e.g. width=16 (repeatable)")
    p.add_argument("--zoo", nargs="+", required=True, metavar="MEMBER",
                   help="the zoo members: checkpoint files (.pth, .pt, .pth.tar, .safetensors) of --arch, or "
                        "pretrained names loaded through the libraries' caches: timm:ARCH[.TAG], "
                        "torchvision:ARCH[.WEIGHTS], hf-hub:ORG/NAME (NAME=PATH: that member's weights from a file)")
    _add_trust_argument(p)


def _add_trust_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="allow a module:function architecture (from the command line or a model folder's "
                        "config.json) to be imported and run; without it such names are refused")


AUGMENT_CHOICES = ("auto", "paper", "light", "no-flip", "none")  # zootune.data.transforms.AUGMENT_PRESETS


def _add_folder_arguments(p: argparse.ArgumentParser, augment: bool = False, cache: bool = True) -> None:
    if augment:
        p.add_argument("--augment", choices=AUGMENT_CHOICES, default="auto",
                       help="training augmentation: paper = random-resized crop (scale 0.08-1) of the original "
                            "+ horizontal flip; light = crop scale 0.35-1 + flip; no-flip = paper's crop only; "
                            "none = the evaluation centre crop; auto (default) = light below 96 px, paper from "
                            "96 px (zootune.data.auto)")
    p.add_argument("--workers", type=worker_count, default="auto",
                   help="DataLoader worker processes decoding images, or 'auto' (default): CPUs - 1 (at most 8) "
                        "for images read at 96 px or more, none for smaller images")
    if cache:
        p.add_argument("--cache-budget", type=mebibytes, metavar="MIB",
                       help="MiB of decoded pixels that may be kept in RAM to skip re-decoding (default 512; 0: "
                            "stream every image from disk)")
    p.add_argument("--max-image-pixels", type=positive_int, default=89_478_485, metavar="N",
                   help="refuse images with more pixels than this (default 89478485, Pillow's warning threshold)")


def _add_run_parser(sub) -> None:
    """``zootune run``: the comparison of the methods on the MiniZoo targets."""
    from zootune.engine.config import OPTIMIZERS

    p = sub.add_parser("run", help="compare all methods on the MiniZoo targets (the main job)",
                       description="Build or load the MiniZoo, train every method on every target and "
                                   "seed, print a Table-1-style table and write results.json, results.md, "
                                   "log.txt and plots into --out.")
    p.add_argument("--quick", action="store_true",
                   help="default target, 1 seed, short trainings: <= 3 min on 2 CPU cores with the MiniZoo built")
    p.add_argument("--targets", help="comma-separated target names, or 'all' (default: all; --quick: the default target)")
    p.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds (0,1,2) or a count (3); default 3")
    p.add_argument("--methods", help="comma-separated methods (default: every one that applies; "
                                     f"registered: {_method_list()}); the methods they require are added first")
    p.add_argument("--hub", action="store_true",
                   help="also run hub methods (members of different architectures) on the MiniZoo hub")
    p.add_argument("--epochs", type=positive_int, help="epochs per training")
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="for every training (default sgd; the landmark target uses adamw, see docs/landmarks.md)")
    p.add_argument("--max-steps-per-epoch", type=positive_int, help=argparse.SUPPRESS)
    p.add_argument("--out", help="output folder (default ./zootune-out/<timestamp>)")
    p.add_argument("--overwrite", action="store_true", help="replace the results that --out holds")
    p.add_argument("--option", action="append", metavar="METHOD:KEY=VALUE",
                   help="an option of one method (repeatable; checked before any training)")
    p.add_argument("--cache-dir", help="MiniZoo/data cache (default $ZOOTUNE_CACHE or ~/.cache/zootune)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    p.set_defaults(func=cmd_run)


def _add_fit_parser(sub) -> None:
    """``zootune fit``: train one method on an image folder and export the model. The flags named in
    ``TRAIN_FLAGS`` are the TrainConfig fields of the same names."""
    from zootune.engine.config import PRECISIONS

    p = sub.add_parser("fit", help="train one method on your image folder and export the model",
                       description="Train a method on an image folder (<root>/<class>/<image>, or "
                                   "train/ val/ [test/] folders of those) from a zoo of checkpoints; "
                                   "writes the model (safetensors + config.json), metrics.json and checkpoints.")
    _add_zoo_arguments(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--method", default=DEFAULT_METHOD, help=f"one of: {_method_list()} (default {DEFAULT_METHOD})")
    p.add_argument("--member", type=int, help="zoo member index for per-member methods (default: the "
                                               "member LogME ranks first on the training images)")
    p.add_argument("--epochs", type=auto_or(positive_int), default="auto",
                   help="epochs, or auto (default): at least 10 epochs and 1000 steps, at most 300 epochs")
    p.add_argument("--lr", type=auto_or(positive_float), default="auto",
                   help="learning rate, or auto (default): the largest of 0.1, 0.03, 0.01 (Adam/AdamW: 1e-3, "
                        "3e-4, 1e-4) at which a 2-epoch fine-tune of one member trains without diverging")
    p.add_argument("--warmup-epochs", type=auto_or(nonnegative_float), default="auto",
                   help="epochs over which the rate rises linearly to --lr, or auto (default): the first 5%% of "
                        "the steps")
    p.add_argument("--batch-size", type=positive_int, default=48)
    p.add_argument("--optimizer", default="sgd", help="sgd (Nesterov momentum 0.9), adam or adamw")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--image-size", type=auto_or(positive_int), default="auto",
                   help="input size in pixels, or auto (default): the zoo's pretrained input size, else the "
                        "images' median shorter side within [32, 224]")
    p.add_argument("--val-fraction", type=float, default=0.2, help="for a single folder of classes")
    p.add_argument("--test-fraction", type=float, default=0.0, help="for a single folder of classes")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of everything random (0..2**32-1)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="an option of the method (repeatable; unknown names and wrong types are refused before any work)")
    p.add_argument("--aggregate", type=layer_types, metavar="TYPES",
                   help="layer types to aggregate, comma-separated: conv, linear, conv1d, conv2d, conv3d "
                        "(default: the method's, conv; a ViT needs conv,linear)")
    p.add_argument("--max-steps-per-epoch", type=positive_int, help=argparse.SUPPRESS)
    _add_folder_arguments(p, augment=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoints (a new --lr, --epochs or --weight-decay "
                        "takes effect from the next step; the schedule is recomputed for the new --epochs)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--source-data", metavar="FOLDER",
                   help="image folder of the source task, for methods that re-train a source task")
    p.add_argument("--no-progress", action="store_true", help="no progress bars and no time-left line")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this process's GPU when there is one, else cpu)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="autocast precision of the forward pass (fp16 adds loss scaling; default fp32)")
    p.add_argument("--channels-last", choices=tuple(CHANNELS_LAST), default="auto",
                   help="channels-last memory format for convolutional models (auto: on for CUDA)")
    p.add_argument("--threads", type=positive_int,
                   help="CPU intra-op threads (default: 1 for small models or a busy machine, else all cores)")
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm statistics over the global batch instead of each process's")
    p.set_defaults(func=cmd_fit)


def _add_export_parser(sub) -> None:
    """``zootune export``: a fit folder's model as safetensors + config.json."""
    p = sub.add_parser("export", help="write the trained model of a fit folder as safetensors + config.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `zootune fit` (or a model folder)")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    _add_trust_argument(p)
    p.set_defaults(func=cmd_export)


def _add_evaluate_parser(sub) -> None:
    """``zootune evaluate``: an exported model on an image folder."""
    p = sub.add_parser("evaluate", help="evaluate an exported model on an image folder")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model folder (model.safetensors + config.json)")
    p.add_argument("--data", required=True, help="image folder; its test/ split if it has one, else all images")
    p.add_argument("--image-size", type=positive_int, help="default: the size the model was trained at")
    p.add_argument("--batch-size", type=positive_int, default=256)
    _add_folder_arguments(p)
    _add_trust_argument(p)
    p.set_defaults(func=cmd_evaluate)


def _add_predict_parser(sub) -> None:
    """``zootune predict``: an exported model's classes of images, as CSV."""
    p = sub.add_parser("predict", help="apply an exported model to images; write the predicted classes as CSV",
                       description="Predict the classes of image files and folders (searched recursively) with an "
                                   "exported model, preprocessed as it was evaluated; one CSV row per image: path, "
                                   "class, probability, then top2_class, top2_probability, ... up to --top-k.")
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="exported model folder (model.safetensors + config.json), or a `zootune fit` output folder")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="CSV file to write (not inside MODEL_DIR, not an input image)")
    p.add_argument("--top-k", type=positive_int, default=1,
                   help="classes per image, most probable first (default 1; above the number of classes: all)")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_folder_arguments(p, cache=False)
    _add_trust_argument(p)
    p.set_defaults(func=cmd_predict)


def _add_zoo_parser(sub) -> None:
    """``zootune zoo build|list``: the MiniZoo."""
    p = sub.add_parser("zoo", help="the MiniZoo: build or list", description="The MiniZoo of small pretrained ResNets.")
    zoo_sub = p.add_subparsers(dest="zoo_command", metavar="ACTION")
    q = zoo_sub.add_parser("build", help="pretrain the MiniZoo members that are missing (cached)")
    q.add_argument("--force", action="store_true", help="rebuild even if cached")
    q.add_argument("--cache-dir")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_zoo_build)
    q = zoo_sub.add_parser("list", help="table of the MiniZoo members and their cache state")
    q.add_argument("--cache-dir")
    q.set_defaults(func=cmd_zoo_list)


def _add_rank_parser(sub) -> None:
    """``zootune rank``: the zoo members by LogME on an image folder."""
    p = sub.add_parser("rank", help="rank zoo members by LogME transferability on your data")
    _add_zoo_arguments(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--image-size", type=positive_int, default=32)
    p.add_argument("--batch-size", type=positive_int, default=256)
    _add_folder_arguments(p)
    p.set_defaults(func=cmd_rank)

def build_parser() -> argparse.ArgumentParser:
    from zootune.cli.rl import add_rl_parser

    parser = _Parser(prog="zootune", description="Transfer learning from a zoo of pretrained models.")
    parser.add_argument("--version", action="version", version=f"zootune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_parser in (_add_run_parser, _add_fit_parser, _add_export_parser, _add_evaluate_parser,
                       _add_predict_parser, _add_zoo_parser, _add_rank_parser, add_rl_parser):
        add_parser(sub)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (checkpoints kept, one line) but with its own exit status."""


def _raise_terminated(signum, frame):  # noqa: ARG001 - signal handler signature
    raise _Terminated()


def _nan_advice(e: NonFiniteLossError, command: str | None) -> str:
    if command != "fit":
        return "try a lower --lr"
    if e.checkpoint is not None:
        return "rerun the same command with a lower --lr and --resume to continue from that checkpoint"
    return "rerun with a lower --lr (nothing to resume from)"


def _keep_freed_memory_for_reuse() -> None:
    """glibc returns every allocation above its (adaptive) mmap threshold to the kernel when it is
    freed, so a training loop whose activations are a few MiB maps and page-faults them in again at
    every step. Measured (docs/dev-notes/data-and-minizoo.md, benchmarks/folder_speed.py fit32): that
    cost 13-17% of a 32-px folder fit's CPU time, depending on what the process happened to free
    first; with a fixed 32 MiB threshold the run times agree within noise. Other C libraries: nothing."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zootune`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    _keep_freed_memory_for_reuse()
    parser = build_parser()
    args = None
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if _can_handle_signals() else None
    warning_context = warnings.catch_warnings()
    warning_context.__enter__()
    warnings.showwarning = _one_line_warning  # a library's multi-line warning becomes one line
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            raise _UsageError(
                "no command given; choose one of run, fit, export, evaluate, predict, zoo, rank, rl "
                "(see `zootune --help`)"
                if getattr(args, "command", None) != "zoo" else "zoo needs an action: build or list"
            )
        return args.func(args)
    except _UsageError as e:
        print(f"zootune: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f"zootune: error: {_one_line(e.cause)}; {_nan_advice(e, getattr(args, 'command', None))}",
              file=sys.stderr)
        return EXIT_USAGE
    except ZootuneError as e:
        print(f"zootune: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, _Terminated) else "interrupted"
        if getattr(args, "command", None) == "fit":
            hint = "checkpoints are written every epoch: the same command with --resume continues"
        else:
            hint = "the trainings that finished are listed in the run folder's log.txt"
        print(f"zootune: {what}; {hint}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, _Terminated) else EXIT_INTERRUPTED
    finally:
        warning_context.__exit__(None, None, None)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
    print(f"zootune: warning: {_one_line(message)}", file=sys.stderr)


def _can_handle_signals() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
