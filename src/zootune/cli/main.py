"""The ``zootune`` command: a thin layer over the Python API.

Subcommands: ``run`` (the comparison, :func:`zootune.experiment.run_experiment`), ``fit``, ``export``,
``evaluate``, ``zoo build|list`` (the MiniZoo), ``rank`` (LogME), ``rl`` (MinAtar transfer,
:mod:`zootune.cli.rl`). Each one parses its arguments, calls the library and prints; the work is done
by the library.

A problem caused by the user's input (:class:`zootune.errors.ZootuneError`, or bad arguments) is
printed as ONE line ``zootune: error: ...`` on stderr with exit status 2. Any other exception is a
bug in zootune and keeps its traceback. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from zootune.errors import NonFiniteLossError, ZootuneError
from zootune.version import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    """Raised instead of argparse's print-usage-and-exit, so that the error is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse API
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> [0, 1, 2]; a single number ``"3"`` -> three seeds [0, 1, 2]."""
    try:
        parts = [int(p) for p in _split_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be integers, e.g. 0,1,2 or 3 (got {text!r})") from None
    if not parts:
        raise argparse.ArgumentTypeError("give at least one seed")
    if len(parts) == 1 and "," not in text:
        if parts[0] < 1:
            raise argparse.ArgumentTypeError(f"the number of seeds must be >= 1 (got {parts[0]})")
        return list(range(parts[0]))
    return parts


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of workers >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of workers >= 0, got {value}")
    return value


def _mebibytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MiB >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a size in MiB >= 0, got {text!r}")
    return value


def _folder_options(args) -> dict:
    """Keyword arguments of zootune.data.image_folder's loaders from the data flags."""
    options = {"max_pixels": args.max_image_pixels}
    if args.cache_budget is not None:
        options["cache_budget"] = int(args.cache_budget * 2**20)
    return options


def _num_workers(args, image_size: int) -> int:
    from zootune.data.loading import default_num_workers

    return default_num_workers(image_size) if args.workers == "auto" else args.workers


def _parse_value(text: str):
    """An option value: JSON when it parses (numbers, true/false, null, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def _parse_options(items: Sequence[str] | None) -> dict:
    options = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ZootuneError(f"--option expects key=value, got {item!r}")
        options[key.replace("-", "_")] = _parse_value(value)
    return options


# --------------------------------------------------------------------------------------------------
# Subcommands


def cmd_run(args) -> int:
    from zootune.experiment import RunConfig, run_experiment

    overrides = {}
    if args.targets is not None:
        overrides["targets"] = None if args.targets == "all" else _split_list(args.targets)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.methods is not None:
        overrides["methods"] = _split_list(args.methods)
    for name in ("epochs", "batch_size", "lr", "optimizer", "max_steps_per_epoch"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    overrides.update(hub=args.hub, cache_dir=args.cache_dir, plots=not args.no_plots, progress=args.progress)
    config = RunConfig.quick(**overrides) if args.quick else RunConfig(**overrides)
    out = Path(args.out) if args.out else Path("zootune-out") / time.strftime("%Y%m%d-%H%M%S")
    if args.quick:
        print("--quick: default target, one seed, short trainings (about 3 min on 2 CPU cores once "
              "the MiniZoo is built; building it the first time is extra and cached)")
    run_experiment(config, out)
    return 0


def _load_zoo(args):
    from zootune.cli.modelfile import resolve_arch
    from zootune.zoo import Zoo

    missing = [p for p in args.zoo if not Path(p).is_file()]
    if missing:
        raise ZootuneError(f"zoo checkpoint {missing[0]} does not exist")
    return Zoo.from_checkpoints(args.zoo, arch=resolve_arch(args.arch), arch_kwargs=args.arch_kwargs)


def cmd_fit(args) -> int:
    from zootune.cli.modelfile import export_info, save_model_dir
    from zootune.data.image_folder import load_image_folder
    from zootune.engine import TrainConfig, evaluate
    from zootune.experiment import fit_method, select_methods
    from zootune.methods.registry import get_method
    from zootune.report import atomic_write_json
    from zootune.tasks import ClassificationTask

    spec = get_method(args.method)
    if spec.hub:
        raise ZootuneError(f"method {spec.name!r} needs a hub of different architectures; use the Python API")
    args.arch_kwargs = _parse_options(args.arch_option)
    options = _parse_options(args.option)
    zoo = _load_zoo(args)
    splits = load_image_folder(args.data, image_size=args.image_size, val_fraction=args.val_fraction,
                               test_fraction=args.test_fraction, seed=args.seed, augment=args.augment,
                               **_folder_options(args))
    task = ClassificationTask(splits.num_classes)
    workers = _num_workers(args, args.image_size)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                         weight_decay=args.weight_decay, seed=args.seed, progress=not args.no_progress,
                         max_steps_per_epoch=args.max_steps_per_epoch, num_workers=workers)
    out = Path(args.out)
    if spec.per_member and args.member is None:
        args.member = 0
    # Methods this one needs (the ensemble needs the fine-tuned members) are trained first, each
    # with its own checkpoint folder so that --resume continues any of them.
    fitted: dict = {}
    for required in select_methods([spec.name])[:-1]:
        members = range(len(zoo)) if required.per_member else [None]
        models = []
        for member in members:
            tag = required.name + (f"-{member}" if member is not None else "")
            print(f"training {tag} (needed by {spec.name})")
            models.append(fit_method(required, zoo, task, splits, config, member=member, fitted=fitted,
                                     out_dir=out / "requires" / tag, resume=args.resume).model)
        fitted[required.name] = models if required.per_member else models[0]
    result = fit_method(spec, zoo, task, splits, config, member=args.member, fitted=fitted, options=options,
                        out_dir=out / "train", resume=args.resume)
    metrics = {"val": evaluate(result.model, task, splits.val, num_workers=workers)}
    if splits.test is not None:
        metrics["test"] = evaluate(result.model, task, splits.test, num_workers=workers)
    info = export_info(
        result.model, arch=args.arch, arch_kwargs=args.arch_kwargs, num_classes=splits.num_classes,
        zoo_paths=args.zoo, method=spec.name, member=args.member, options=options,
        class_names=list(splits.class_names), image_size=args.image_size, metrics=metrics,
    )
    save_model_dir(out / "model", result.model, info)
    atomic_write_json(out / "metrics.json", {"method": spec.name, "member": args.member, "seconds": result.seconds,
                                             "best_val_metric": result.val_metric, **metrics})
    shown = " ".join(f"{split} {task.metric_name} {m[task.metric_name]:.2f}" for split, m in metrics.items())
    print(f"{spec.name}: {shown} ({result.seconds:.1f} s); model written to {out / 'model'} ({info['kind']})")
    return 0


def _model_dir_of(run_dir: Path) -> Path:
    """A ``zootune fit`` output folder holds the model in ``model/``; a model folder is itself."""
    if (run_dir / "model" / "config.json").is_file():
        return run_dir / "model"
    return run_dir


def cmd_export(args) -> int:
    from zootune.cli.modelfile import load_model_dir, save_model_dir

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ZootuneError(f"run folder {run_dir} does not exist")
    model, info = load_model_dir(_model_dir_of(run_dir))
    info = {k: v for k, v in info.items() if k not in ("format", "zootune_version")}
    save_model_dir(args.out, model, info)
    print(f"exported {info['method']} ({info['kind']} model, {info['arch']}, {info['num_classes']} classes) to {args.out}")
    return 0


def _evaluation_set(data: str, image_size: int, options: dict):
    """(class names, dataset, what): a train/val[/test] folder's test split (else its val split); a
    single folder of class folders is evaluated whole, without augmentation."""
    from zootune.data import image_folder
    root = Path(data).expanduser()
    folders = image_folder.split_folders(root) if root.is_dir() else None
    if folders is not None:  # only the evaluated split is read
        split = "test" if "test" in folders else "val"
        class_names, dataset = image_folder.load_unsplit_image_folder(folders[split], image_size=image_size, **options)
        return class_names, dataset, f"{split} split"
    class_names, dataset = image_folder.load_unsplit_image_folder(root, image_size=image_size, **options)
    return class_names, dataset, "all images"


def cmd_evaluate(args) -> int:
    from zootune.cli.modelfile import load_model_dir
    from zootune.engine import evaluate
    from zootune.errors import DataError
    from zootune.tasks import ClassificationTask

    model, info = load_model_dir(args.model_dir)
    image_size = args.image_size or info.get("image_size") or 32
    class_names, dataset, what = _evaluation_set(args.data, image_size, _folder_options(args))
    model_classes = info.get("class_names") or []
    if len(class_names) != info["num_classes"]:
        raise DataError(
            f"the model predicts {info['num_classes']} classes but {args.data} has {len(class_names)} "
            f"class folders ({', '.join(class_names)}): labels would be out of range"
        )
    if model_classes and list(model_classes) != list(class_names):
        raise DataError(
            f"class folders of {args.data} ({', '.join(class_names)}) differ from the model's "
            f"classes ({', '.join(model_classes)})"
        )
    task = ClassificationTask(info["num_classes"])
    metrics = evaluate(model, task, dataset, batch_size=args.batch_size, num_workers=_num_workers(args, image_size))
    print(f"{args.model_dir} on {args.data} ({what}, {len(dataset)} images): "
          + " ".join(f"{k} {v:.4f}" if k == "loss" else f"{k} {v:.2f}" for k, v in metrics.items()))
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

    args.arch_kwargs = _parse_options(args.arch_option)
    zoo = _load_zoo(args)
    splits = load_image_folder(args.data, image_size=args.image_size, augment=None, **_folder_options(args))
    dataset = splits.train.with_transform(None)  # score un-augmented images
    ranking = rank_zoo(zoo, dataset, batch_size=args.batch_size, num_workers=_num_workers(args, args.image_size))
    rows = [[str(i + 1), name, f"{score:.4f}"] for i, (name, score) in enumerate(ranking)]
    print(f"LogME transferability on {args.data} ({len(dataset)} training images; higher is better):")
    print(format_text_table(("rank", "model", "LogME"), rows))
    return 0


# --------------------------------------------------------------------------------------------------
# Parser


def _add_zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", required=True,
                   help="architecture of the zoo: a registered name (e.g. resnet50, resnet_small) or "
                        "module:function returning your model")
    p.add_argument("--arch-option", action="append", metavar="KEY=VALUE",
                   help="keyword argument for the architecture builder, e.g. width=16 (repeatable)")
    p.add_argument("--zoo", nargs="+", required=True, metavar="CKPT",
                   help="checkpoints of the zoo members (.pth, .pt, .pth.tar, .safetensors)")


AUGMENT_CHOICES = ("paper", "light", "no-flip", "none")  # zootune.data.transforms.AUGMENT_PRESETS


def _add_folder_arguments(p: argparse.ArgumentParser, augment: bool = False) -> None:
    if augment:
        p.add_argument("--augment", choices=AUGMENT_CHOICES, default="paper",
                       help="training augmentation: paper = random-resized crop (scale 0.08-1) of the original "
                            "+ horizontal flip; light = crop scale 0.35-1 + flip; no-flip = paper's crop only; "
                            "none = the evaluation centre crop (default paper)")
    p.add_argument("--workers", type=_workers, default="auto",
                   help="DataLoader worker processes decoding images, or 'auto' (default): CPUs - 1 (at most 8) "
                        "for --image-size >= 96, none for smaller images")
    p.add_argument("--cache-budget", type=_mebibytes, metavar="MIB",
                   help="MiB of decoded pixels that may be kept in RAM to skip re-decoding (default 512; 0: stream "
                        "every image from disk)")
    p.add_argument("--max-image-pixels", type=_positive_int, default=89_478_485, metavar="N",
                   help="refuse images with more pixels than this (default 89478485, Pillow's warning threshold)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zootune", description="Transfer learning from a zoo of pretrained models.")
    parser.add_argument("--version", action="version", version=f"zootune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="compare all methods on the MiniZoo targets (the main job)",
                       description="Build or load the MiniZoo, train every method on every target and "
                                   "seed, print a Table-1-style table and write results.json, results.md, "
                                   "log.txt and plots into --out.")
    p.add_argument("--quick", action="store_true",
                   help="default target, 1 seed, short trainings: <= 3 min on 2 CPU cores with the MiniZoo built")
    p.add_argument("--targets", help="comma-separated target names, or 'all' (default: all; --quick: the default target)")
    p.add_argument("--seeds", type=_parse_seeds, help="comma-separated seeds (0,1,2) or a count (3); default 3")
    p.add_argument("--methods", help="comma-separated methods (default: every one that applies); "
                                     "methods they need (finetune for ensemble/distill) are added")
    p.add_argument("--hub", action="store_true", help="also run hub methods (Hub-Pathway) on the MiniZoo hub")
    p.add_argument("--epochs", type=_positive_int, help="epochs per training")
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"),
                   help="for every training (default sgd; the landmark target uses adamw, see docs/landmarks.md)")
    p.add_argument("--max-steps-per-epoch", type=_positive_int, help=argparse.SUPPRESS)
    p.add_argument("--out", help="output folder (default ./zootune-out/<timestamp>)")
    p.add_argument("--cache-dir", help="MiniZoo/data cache (default $ZOOTUNE_CACHE or ~/.cache/zootune)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--progress", action="store_true", help="show per-epoch progress bars")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("fit", help="train one method on your image folder and export the model",
                       description="Train a method on an image folder (<root>/<class>/<image>, or "
                                   "train/ val/ [test/] folders of those) from a zoo of checkpoints; "
                                   "writes the model (safetensors + config.json), metrics.json and checkpoints.")
    _add_zoo_arguments(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--method", default="zoo-tuning", help="zoo-tuning, lite, finetune, ensemble, ... (default zoo-tuning)")
    p.add_argument("--member", type=int, help="zoo member index for per-member methods (finetune; default 0)")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=_positive_int, default=48)
    p.add_argument("--optimizer", default="sgd", help="sgd (Nesterov momentum 0.9), adam or adamw")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--image-size", type=_positive_int, default=32)
    p.add_argument("--val-fraction", type=float, default=0.2, help="for a single folder of classes")
    p.add_argument("--test-fraction", type=float, default=0.0, help="for a single folder of classes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="method option passed to its build(), e.g. align=all (repeatable)")
    p.add_argument("--max-steps-per-epoch", type=_positive_int, help=argparse.SUPPRESS)
    _add_folder_arguments(p, augment=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("export", help="write the trained model of a fit folder as safetensors + config.json")
    p.add_argument("run_dir", metavar="RUN_DIR", help="output folder of `zootune fit` (or a model folder)")
    p.add_argument("--out", required=True, help="folder to write model.safetensors and config.json into")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="evaluate an exported model on an image folder")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="exported model folder (model.safetensors + config.json)")
    p.add_argument("--data", required=True, help="image folder; its test/ split if it has one, else all images")
    p.add_argument("--image-size", type=_positive_int, help="default: the size the model was trained at")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    _add_folder_arguments(p)
    p.set_defaults(func=cmd_evaluate)

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

    p = sub.add_parser("rank", help="rank zoo members by LogME transferability on your data")
    _add_zoo_arguments(p)
    p.add_argument("--data", required=True, help="image folder")
    p.add_argument("--image-size", type=_positive_int, default=32)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    _add_folder_arguments(p)
    p.set_defaults(func=cmd_rank)

    from zootune.cli.rl import add_rl_parser

    add_rl_parser(sub, _positive_int, _parse_seeds)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``zootune`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if not hasattr(args, "func"):
            raise _UsageError(
                "no command given; choose one of run, fit, export, evaluate, zoo, rank, rl (see `zootune --help`)"
                if getattr(args, "command", None) != "zoo" else "zoo needs an action: build or list"
            )
        return args.func(args)
    except _UsageError as e:
        print(f"zootune: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except NonFiniteLossError as e:
        print(f"zootune: error: {_one_line(e)}; the last good checkpoint is kept: lower --lr and rerun "
              "with --resume to continue from it", file=sys.stderr)
        return EXIT_USAGE
    except ZootuneError as e:
        print(f"zootune: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if getattr(args, "command", None) == "fit":
            hint = "checkpoints are written every epoch: the same command with --resume continues"
        else:
            hint = "the trainings that finished are listed in the run folder's log.txt"
        print(f"zootune: interrupted; {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
