"""The comparison run (zootune.experiment) on a tiny zoo and tiny targets built here."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from zootune.errors import ZootuneError
from zootune.experiment import RunConfig, default_excluded, run_experiment, select_methods, state_dict_checksum
from zootune.methods.registry import available_methods
from zootune.models import resnet_small

pytest.importorskip("zootune.engine")
pytest.importorskip("zootune.cost")
from zootune.data.datasets import DatasetSplits, ImageDataset  # noqa: E402
from zootune.zoo import Zoo  # noqa: E402


def tiny_zoo(m: int = 2) -> Zoo:
    torch.manual_seed(123)
    return Zoo.from_modules([resnet_small(num_classes=3, depth=10, width=4) for _ in range(m)],
                            names=[f"src{i}" for i in range(m)])


def tiny_target(name: str, seed: int = 0) -> DatasetSplits:
    # Two classes told apart by the mean of the red channel: learnable, deterministic per name.
    g = torch.Generator().manual_seed(sum(map(ord, name)) + seed)

    def split(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 3, 16, 16, generator=g) + (2 * y - 1).view(-1, 1, 1, 1) * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
        return ImageDataset(x, y)

    return DatasetSplits(split(24), split(12), split(12), 2, name)


def test_select_methods_puts_requirements_first_and_rejects_unknown():
    specs = select_methods(["ensemble"])
    names = [s.name for s in specs]
    assert names[-1] == "ensemble"
    for required in specs[-1].requires:
        assert names.index(required) < names.index("ensemble")
    default = [s.name for s in select_methods()]
    registered = available_methods()
    assert not any(registered[n].hub for n in default)
    assert not set(default) & set(default_excluded())
    assert any(registered[n].hub for n in (s.name for s in select_methods(hub=True))) == any(
        s.hub for s in registered.values())
    with pytest.raises(ZootuneError, match="unknown method"):
        select_methods(["no-such-method"])


def test_state_dict_checksum_sees_every_value():
    model = resnet_small(depth=10, width=4)
    before = state_dict_checksum(model)
    assert before == state_dict_checksum(model)
    model.bn1.num_batches_tracked += 1  # a 0-dim integer buffer
    assert state_dict_checksum(model) != before


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = RunConfig(targets=["red", "blue"], seeds=[0, 1], methods=["ensemble"], plots=False,
                       train=dict(epochs=1, batch_size=8, max_steps_per_epoch=2, eval_batch_size=16))
    results = run_experiment(config, out, zoo=tiny_zoo(), load_target=tiny_target, echo=None)
    return out, results, config


def test_run_writes_results_with_the_required_fields(tiny_run):
    out, results, config = tiny_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["zoo"]["names"] == ["src0", "src1"]
    assert on_disk["zoo"]["checksums"]["src1"] == state_dict_checksum(tiny_zoo()[1])
    assert on_disk["config"]["seeds"] == [0, 1] and on_disk["targets"] == ["red", "blue"]
    assert on_disk["zootune_version"] and on_disk["metric"] == "acc"
    ids = [row["id"] for row in on_disk["methods"]]
    assert ids == ["finetune:src0", "finetune:src1", "finetune:best-on-val", "ensemble"]
    for row in on_disk["methods"]:
        per_seed_means = []
        for target in ("red", "blue"):
            cell = row["targets"][target]
            assert len(cell["test"]) == len(cell["val"]) == 2
            assert cell["test_mean"] == pytest.approx(statistics.mean(cell["test"]))
            assert cell["test_std"] == pytest.approx(statistics.stdev(cell["test"]))
            assert all(0 <= v <= 100 for v in cell["test"] + cell["val"])
        for k in range(2):
            per_seed_means.append(statistics.mean(row["targets"][t]["test"][k] for t in ("red", "blue")))
        assert row["mean"] == pytest.approx(statistics.mean(per_seed_means))
        assert row["mean_std"] == pytest.approx(statistics.stdev(per_seed_means))
        for key in ("train_gflops", "train_params", "infer_gflops", "infer_params"):
            assert row["cost"][key] > 0
    text = (out / "results.md").read_text()
    assert "| ensemble |" in text
    assert (out / "log.txt").read_text().count("test") >= 8


def test_costs_and_best_single_follow_from_the_trained_members(tiny_run):
    _, results, _ = tiny_run
    rows = {row["id"]: row for row in results["methods"]}
    single, ensemble = rows["finetune:src0"]["cost"], rows["ensemble"]["cost"]
    # the ensemble runs both fine-tuned members: twice one member's parameters and FLOPs
    assert ensemble["infer_params"] == 2 * single["infer_params"]
    assert ensemble["infer_gflops"] == pytest.approx(2 * single["infer_gflops"], rel=1e-6)
    for target in ("red", "blue"):
        best = rows["finetune:best-on-val"]["targets"][target]
        for k in range(2):
            vals = {m: rows[f"finetune:{m}"]["targets"][target]["val"][k] for m in ("src0", "src1")}
            chosen = best["chosen"][k].split(":")[1]
            assert vals[chosen] == max(vals.values())
            assert best["test"][k] == rows[f"finetune:{chosen}"]["targets"][target]["test"][k]


def _test_disagrees_with_val_target(name: str, seed: int = 0) -> DatasetSplits:
    """The red-channel task, whose test split is the validation images with the labels flipped: for
    any two-class model, test accuracy = 100 - validation accuracy, so the member that validates
    best tests worst."""
    g = torch.Generator().manual_seed(5)

    def split(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 3, 8, 8, generator=g) * 0.5 + (2 * y - 1).view(-1, 1, 1, 1) * torch.tensor([1.0, 0, 0]).view(1, 3, 1, 1)
        return ImageDataset(x, y)

    train, val = split(24), split(12)
    return DatasetSplits(train, val, ImageDataset(val.images, 1 - val.labels), 2, name)


def test_best_on_val_row_follows_validation_when_test_disagrees(tmp_path):
    config = RunConfig(targets=["flip"], seeds=[0], methods=["finetune"], plots=False,
                       train=dict(epochs=1, batch_size=8, max_steps_per_epoch=2, eval_batch_size=16))
    results = run_experiment(config, tmp_path, zoo=tiny_zoo(3), load_target=_test_disagrees_with_val_target,
                             echo=None)
    cells = {row["id"]: row["targets"]["flip"] for row in results["methods"]}
    members = {f"finetune:src{i}": cells[f"finetune:src{i}"] for i in range(3)}
    val = {row_id: cell["val"][0] for row_id, cell in members.items()}
    for cell in members.values():  # the target's construction
        assert cell["test"][0] == pytest.approx(100 - cell["val"][0])
    assert len(set(val.values())) > 1, "the members must validate differently for the choice to matter"
    best = cells["finetune:best-on-val"]
    chosen = best["chosen"][0]
    # the first member with the best validation accuracy, and that member's test accuracy, which
    # here is the worst: choosing by the test metric would take another member
    assert chosen == next(row_id for row_id, v in val.items() if v == max(val.values()))
    assert best["val"] == [val[chosen]] and best["test"] == members[chosen]["test"]
    assert best["test"][0] == min(cell["test"][0] for cell in members.values())


def test_best_on_val_minimises_a_lower_is_better_validation_metric():
    from zootune.experiment import MethodResult, _best_on_val
    from zootune.methods.registry import get_method

    records = [MethodResult(f"finetune:m{i}", f"m{i}", "finetune", f"m{i}", "t", 0, test=test, val=val, seconds=1.0)
               for i, (val, test) in enumerate([(3.0, 1.0), (1.0, 5.0), (2.0, 0.5), (1.0, 4.0)])]
    best = _best_on_val(get_method("finetune"), records, higher_is_better=False)
    assert best.chosen == "finetune:m1"  # lowest validation error, the first of equals
    assert (best.val, best.test) == (1.0, 5.0)
    best = _best_on_val(get_method("finetune"), records, higher_is_better=True)
    assert best.chosen == "finetune:m0" and best.test == 1.0


def test_same_config_gives_the_same_numbers(tiny_run, tmp_path):
    _, results, config = tiny_run
    config = RunConfig(**{**config.to_dict(), "targets": ["red"], "seeds": [1], "methods": ["finetune"]})
    again = run_experiment(config, tmp_path, zoo=tiny_zoo(), load_target=tiny_target, echo=None)
    first = {row["id"]: row for row in results["methods"]}
    for row in again["methods"]:
        if row["id"].startswith("finetune:src"):
            assert row["targets"]["red"]["test"] == [first[row["id"]]["targets"]["red"]["test"][1]]
            assert row["targets"]["red"]["val"] == [first[row["id"]]["targets"]["red"]["val"][1]]


def test_unknown_target_is_a_user_error(tmp_path):
    pytest.importorskip("zootune.suite.targets")
    with pytest.raises(ZootuneError, match="unknown target"):
        run_experiment(RunConfig(targets=["no-such-target"], plots=False), tmp_path, zoo=tiny_zoo(), echo=None)


class _ErrorTask:
    """A non-classification task (mean absolute error on one output) for the run's task handling."""

    metric_name, higher_is_better = "mae", False

    def make_head(self, in_features):
        return torch.nn.Linear(in_features, 1)

    def loss(self, outputs, targets):
        return (outputs.squeeze(1) - targets.float()).abs().mean()

    def metric_sums(self, outputs, targets):
        return float((outputs.squeeze(1) - targets.float()).abs().sum()), targets.numel()

    def check_targets(self, targets):
        pass


def _regression_target(name, seed=0):
    splits = tiny_target(name, seed)
    splits.task = _ErrorTask()
    return splits


def test_run_skips_methods_that_do_not_support_the_task(tmp_path):
    from zootune.tasks import Task

    Task.register(_ErrorTask)  # a virtual subclass: not a ClassificationTask
    lines = []
    config = RunConfig(targets=["reg"], seeds=[0], methods=["finetune", "distill"], plots=False,
                       train=dict(epochs=1, batch_size=8, max_steps_per_epoch=1, eval_batch_size=16))
    results = run_experiment(config, tmp_path, zoo=tiny_zoo(), load_target=_regression_target, echo=lines.append)
    methods = {row["method"] for row in results["methods"]}
    assert "finetune" in methods and "distill" not in methods
    assert results["metric"] == "mae" and results["higher_is_better"] is False
    assert any("distill: skipped on reg" in line for line in lines)


def test_run_refuses_targets_scored_by_different_metrics(tmp_path):
    def load(name, seed=0):
        return _regression_target(name, seed) if name == "reg" else tiny_target(name, seed)

    config = RunConfig(targets=["red", "reg"], seeds=[0], methods=["soup"], plots=False,
                       train=dict(epochs=1, batch_size=8, max_steps_per_epoch=1, eval_batch_size=16))
    with pytest.raises(ZootuneError, match="scored by mae.*acc"):
        run_experiment(config, tmp_path, zoo=tiny_zoo(), load_target=load, echo=None)


def test_run_with_a_hub_adds_the_hub_pathway_row_with_routed_costs(tmp_path):
    from zootune import Hub
    from zootune.models.vit import vit_tiny32

    torch.manual_seed(7)
    hub = Hub([resnet_small(num_classes=3, depth=10, width=4), resnet_small(num_classes=3, depth=10, width=8),
               vit_tiny32(num_classes=3)], names=["r4", "r8", "vit"])
    config = RunConfig(targets=["red"], seeds=[0], methods=["soup", "hub-pathway"], hub=True, plots=False,
                       train=dict(epochs=1, batch_size=8, max_steps_per_epoch=2, eval_batch_size=16))
    results = run_experiment(config, tmp_path, zoo=tiny_zoo(), hub=hub, load_target=tiny_target, echo=None)
    rows = {row["method"]: row for row in results["methods"]}
    assert set(rows) == {"soup", "hub-pathway"}
    cell = rows["hub-pathway"]["targets"]["red"]
    assert len(cell["test"]) == 1 and 0.0 <= cell["test"][0] <= 100.0
    assert cell["cost"]["infer_params"] > 0 and cell["cost"]["infer_gflops"] > 0


def test_candidates_are_screened_and_the_winner_ends_as_it_would_have_alone(tmp_path):
    """Robust Zoo-Tuning's two starts: each trains the first part of the epochs, the better on
    validation continues from its checkpoint -- and ends bit for bit where training that start alone
    for the whole run ends."""
    from zootune.engine import TrainConfig
    from zootune.fitting import fit_method, screening_epochs
    from zootune.methods.registry import get_method
    from zootune.tasks import ClassificationTask

    zoo, splits, task = tiny_zoo(3), tiny_target("screen"), ClassificationTask(2)
    config = TrainConfig(epochs=4, batch_size=8, lr=0.05, progress=False, device="cpu")
    assert screening_epochs(4) == 2 and screening_epochs(3) == 2 and screening_epochs(1) is None
    # a quarter of a long run; at least 250 steps while that is within the first half
    assert screening_epochs(91, 11) == 23 and screening_epochs(200, 50) == 50 and screening_epochs(40, 1) == 20
    assert screening_epochs(8, 19) == 4 and screening_epochs(20, 100) == 5
    spec = get_method("zoo-tuning")
    scores = [0.0, 2.0, 1.0]  # member 1 first, member 2 the second start
    fitted = fit_method(spec, zoo, task, splits, config, options={"member_scores": scores}, out_dir=tmp_path / "run")
    for folder in (tmp_path / "run", tmp_path / "run" / "candidate-2"):
        assert (folder / "checkpoint.pt").is_file()
    winner = fitted.resolved.get("start_member", 1)
    alone = fit_method(spec, zoo, task, splits, config, options={"member_scores": scores, "start_member": winner})
    for k, v in alone.model.state_dict().items():
        assert torch.equal(fitted.model.state_dict()[k], v), k
