"""Every registered method honours the same contract (as PEFT tests every tuner and timm every model):
build -> one training step through the engine -> finalize -> save -> load -> identical outputs; and
a method that promises a plain model leaves no method module in it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from zootune.data.datasets import DatasetSplits, ImageDataset
from zootune.engine import TrainConfig, Trainer
from zootune.experiment import select_methods
from zootune.fitting import FittedSet, fit_members
from zootune.methods.registry import BuildContext, available_methods
from zootune.model_dir import export_info, load_model_dir, save_model_dir
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask
from zootune.zoo import Zoo
from zootune.zoo.checkpoint import save_state_dict

ARCH, ARCH_KWARGS = "resnet_small", {"depth": 10, "width": 4, "num_classes": 3}
NUM_CLASSES = 2


def _splits(seed: int, n: int = 16) -> DatasetSplits:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    x = torch.randn(n, 3, 16, 16, generator=g) + y.view(-1, 1, 1, 1).float()
    ds = ImageDataset(x, y)
    return DatasetSplits(ds, ds, ds, NUM_CLASSES, f"tiny{seed}")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    paths = []
    for i in range(2):
        torch.manual_seed(10 + i)
        paths.append(save_state_dict(root / f"m{i}.safetensors", resnet_small(**ARCH_KWARGS).state_dict()))
    return Zoo.from_checkpoints(paths, arch=ARCH, arch_kwargs=ARCH_KWARGS)


def _hub():
    """Two architectures (different widths, hence feature sizes) for hub methods."""
    from zootune.zoo import as_hub

    torch.manual_seed(0)
    return as_hub([resnet_small(**ARCH_KWARGS), resnet_small(**{**ARCH_KWARGS, "width": 8})])


CONFIG = TrainConfig(epochs=1, batch_size=8, max_steps_per_epoch=1, lr=0.01, progress=False, seed=0)


def _context(spec, zoo, task, data, done, rebuilding=False, options=None):
    return BuildContext(zoo=zoo, task=task, config=spec.parse_options(options or {}), data=None if rebuilding else data,
                        source_data=None if rebuilding else SimpleNamespace(train=data.train, val=None,
                                                                         task=ClassificationTask(3)),
                        fitted={n: done.models[n] for n in spec.requires}, member=0 if spec.per_member else None,
                        member_val_metrics=done.member_val_metrics, train_config=CONFIG, seed=0,
                        rebuilding=rebuilding)


def _arch_module_types() -> set[type]:
    return {type(m) for m in resnet_small(**ARCH_KWARGS).modules()}


@pytest.mark.parametrize("name", list(available_methods()))
def test_build_step_finalize_save_load(name, zoo, tmp_path):
    spec = available_methods()[name]
    source = _hub() if spec.hub else zoo
    task, data = ClassificationTask(NUM_CLASSES), _splits(0)
    done = FittedSet()
    for required in select_methods([name])[:-1]:
        fit_members(required, source, task, data, CONFIG, done)
    torch.manual_seed(0)
    context = _context(spec, source, task, data, done)
    built = spec.build(context)
    resolved = dict(context.resolved)  # what build decided from the data (a saved model records it)
    before = copy.deepcopy(built.state_dict())
    if spec.trains:
        model = Trainer(built, task, data.train, None, config=CONFIG).fit().model
        changed = [k for k, v in built.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
        assert changed, "one training step changed nothing"
    else:
        model = built.finalize() if hasattr(built, "finalize") else built
    model.eval()
    x = torch.stack([_splits(1).test[i][0] for i in range(4)])
    with torch.no_grad():
        expected = model(x)
    assert expected.shape == (4, NUM_CLASSES)

    # save -> load: the module rebuilt without data (ctx.rebuilding) takes the saved state exactly
    rebuilt = spec.build(_context(spec, source, task, data, done, rebuilding=True, options=resolved))
    rebuilt = rebuilt.finalize() if hasattr(rebuilt, "finalize") else rebuilt
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), expected, rtol=0, atol=0)

    if not spec.hub:  # the user's path: a model folder written and read back by zootune
        info = export_info(model, arch=ARCH, arch_kwargs=ARCH_KWARGS, task=ClassificationTask(NUM_CLASSES),
                           zoo_paths=list(zoo.origins), method=name, member=0 if spec.per_member else None,
                           options=resolved)
        save_model_dir(tmp_path / "model", model, info)
        loaded, _ = load_model_dir(tmp_path / "model")
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        assert (info["kind"] == "plain") == spec.plain_model, info["kind"]

    if spec.plain_model:
        # one public name for the plain model: merge_and_unload(), which finalize() gives the engine
        assert callable(getattr(built, "merge_and_unload", None)), name
        with torch.no_grad():
            torch.testing.assert_close(built.merge_and_unload().eval()(x), expected, rtol=0, atol=0)
        foreign = {type(m).__name__ for m in model.modules()} - {t.__name__ for t in _arch_module_types()}
        assert not foreign, f"method modules left in the plain model: {foreign}"
        assert set(model.state_dict()) == set(resnet_small(**{**ARCH_KWARGS, "num_classes": NUM_CLASSES}).state_dict())


def test_every_registered_method_is_covered():
    # the parametrisation above is the registry itself: a new method is tested without editing this file
    assert {"scratch", "fisher-merge"} <= set(available_methods())
