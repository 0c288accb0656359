"""The pieces of the robust variants: gate priors, member scoring, junk members, the letters target."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zootune.data.datasets import ImageDataset
from zootune.errors import ZootuneError
from zootune.layers.gate import Gate
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask


@pytest.mark.parametrize("activation", ["sigmoid", "softmax", "tanh", "linear"])
def test_gate_prior_gives_every_input_the_given_gates(activation):
    gate = Gate(8, 3, activation).double()
    wanted = torch.tensor([0.1, 0.7, 0.2], dtype=torch.float64) if activation == "softmax" else \
        torch.tensor([0.05, 0.9, 0.3], dtype=torch.float64)
    gate.set_prior(wanted)
    h = torch.randn(5, 8, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(gate(h), wanted.expand(5, 3))  # output layer at zero: input-independent
    assert "prior" not in gate.state_dict()  # rebuilt from the owner's options, never loaded


def test_tanh_gate_formula_is_prior_plus_tanh_of_the_mlp():
    gate = Gate(8, 3, "tanh", zero_init=False)
    gate.set_prior(torch.tensor([0.0, 1.0, 0.0]))
    h = torch.randn(5, 8, 4, 4)
    pooled = h.mean((2, 3))
    manual = torch.tensor([0.0, 1.0, 0.0]) + torch.tanh(
        torch.relu(pooled @ gate.reduce.weight.T) @ gate.expand.weight.T + gate.expand.bias)
    torch.testing.assert_close(gate(h), manual)
    plain = Gate(8, 3, "sigmoid", zero_init=False)
    assert not plain.has_prior  # the paper's gate adds nothing at all


def _tiny_data(n=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    images = torch.randn(n, 3, 16, 16, generator=generator) + labels.view(-1, 1, 1, 1).float()
    return ImageDataset(images, labels)


def test_probe_scores_are_the_short_fine_tunes_best_validation_metric():
    from zootune.engine import TrainConfig, Trainer
    from zootune.methods.finetune import FineTune, copy_with_new_head
    from zootune.methods.zoo_tuning.start import rank, score_members

    torch.manual_seed(0)
    zoo = [resnet_small(num_classes=7, depth=10, width=4).eval() for _ in range(2)]
    train, val = _tiny_data(24, 0), _tiny_data(12, 1)
    task = ClassificationTask(3)
    config = TrainConfig(epochs=5, batch_size=8, lr=0.05, seed=3, progress=False)
    scores = score_members(zoo, task, train, val, method="probe", train_config=config, probe_epochs=1)
    expected = []
    for member in zoo:  # the definition, written out: 1 epoch of fine-tuning, best validation accuracy
        torch.manual_seed(3)
        model, head_name = copy_with_new_head(member, task)
        one_epoch = TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=3, progress=False)
        expected.append(Trainer(FineTune(model, head_name), task, train, val, config=one_epoch).fit().best_val_metric)
    assert scores == pytest.approx(expected)
    assert rank([0.2, 0.9, 0.9, 0.1]) == [1, 2, 0, 3]
    with pytest.raises(ZootuneError):
        score_members(zoo, task, train, None)
    with pytest.raises(ZootuneError):
        score_members(zoo, task, train, val, method="oracle")


def test_default_ranking_averages_the_normalised_probe_and_logme():
    from zootune.engine import TrainConfig
    from zootune.methods.zoo_tuning.start import combine, score_members

    torch.manual_seed(0)
    zoo = [resnet_small(num_classes=7, depth=10, width=4).eval() for _ in range(3)]
    train, val, task = _tiny_data(24, 0), _tiny_data(12, 1), ClassificationTask(3)
    config = TrainConfig(epochs=5, batch_size=8, lr=0.05, seed=3, progress=False)
    probe = score_members(zoo, task, train, val, method="probe", train_config=config)
    logme = score_members(zoo, task, train, val, method="logme")
    assert score_members(zoo, task, train, val, train_config=config) == pytest.approx(combine(probe, logme))
    # written out: min-max per list, then the mean; a constant list counts 0
    assert combine([30.0, 35.0, 40.0], [-0.5, -0.3, -0.4]) == pytest.approx([0.0, 0.75, 0.75])
    assert combine([1.0, 1.0], [2.0, 0.0]) == pytest.approx([0.5, 0.0])
    # a clear probe lead survives LogME preferring a member that does not train (member 0 here);
    # a probe near-tie is broken by LogME
    assert max(range(4), key=combine([20.0, 60.0, 25.0, 22.0], [0.3, 0.2, 0.1, 0.15]).__getitem__) == 1
    assert max(range(3), key=combine([33.0, 32.7, 26.0], [-0.58, -0.54, -0.59]).__getitem__) == 1


def test_logme_scores_are_in_zoo_order():
    from zootune.methods.logme import rank_zoo
    from zootune.methods.zoo_tuning.start import score_members

    torch.manual_seed(0)
    zoo = [resnet_small(num_classes=7, depth=10, width=4).eval() for _ in range(3)]
    data = _tiny_data(30)
    scores = score_members(zoo, ClassificationTask(3), data, method="logme")
    by_name = dict(rank_zoo(zoo, data, names=["a", "b", "c"]))
    assert scores == pytest.approx([by_name["a"], by_name["b"], by_name["c"]])


def test_junk_members_are_cached_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    import zootune.minizoo.junk as junk
    from zootune.minizoo.store import minizoo_resnet

    built = []

    def fake_build(name):  # the cache logic is under test, not pretraining
        built.append(name)
        torch.manual_seed(len(built))
        return minizoo_resnet().eval(), {"member": name}

    monkeypatch.setattr(junk, "build_junk_member", fake_build)
    first = dict(junk.load_junk_members(cache_dir=tmp_path))
    assert list(first) == list(junk.JUNK_MEMBERS) and built == list(junk.JUNK_MEMBERS)
    again = dict(junk.load_junk_members(cache_dir=tmp_path))
    assert len(built) == 2, "cached members are not rebuilt"
    for name in first:
        for a, b in zip(first[name].state_dict().values(), again[name].state_dict().values()):
            assert torch.equal(a, b)
    (junk.junk_dir(tmp_path) / "random-init.safetensors").write_bytes(b"damaged")
    junk.load_junk_members(cache_dir=tmp_path)
    assert built[-1] == "random-init" and len(built) == 3


def test_random_init_junk_member_is_the_seeded_architecture():
    import zootune.minizoo.junk as junk
    from zootune.minizoo.store import minizoo_resnet

    model, _ = junk.build_junk_member("random-init")
    torch.manual_seed(junk.RANDOM_INIT_SEED)
    reference = minizoo_resnet()
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)


def test_letters_target_is_deterministic_and_covers_every_letter():
    pytest.importorskip("matplotlib")
    from zootune.suite.letters import LETTERS, letter_scenes

    images, labels = letter_scenes(60, seed=3)
    again, _ = letter_scenes(60, seed=3)
    other, _ = letter_scenes(60, seed=4)
    assert images.shape == (60, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(images, again) and not np.array_equal(images, other)
    assert set(labels.tolist()) == set(range(len(LETTERS)))
    # the glyph is there: every image has pixels far from its background field's smooth colours
    spread = images.reshape(60, -1, 3).astype(float).std(axis=1).max(axis=1)
    assert (spread > 10).all()


def test_letters_is_an_extra_target_not_in_the_default_suite():
    from zootune.suite import targets

    assert "letters" in targets.EXTRA_TARGETS and "letters" not in targets.TARGETS
    assert targets.EXTRA_TARGETS["letters"].num_classes == 10


def test_build_ranks_the_members_on_the_data_and_records_the_ranking(monkeypatch):
    """Through the method contract: the robust variant ranks the zoo on the target's data in build,
    starts on the member ranked first, and writes the scores to ctx.resolved (what a saved model
    records, so that it is rebuilt on the same start without data)."""
    import zootune.methods.zoo_tuning.start as start_module
    from zootune.data.datasets import DatasetSplits
    from zootune.methods.registry import BuildContext, get_method
    from zootune.models import resnet_small
    from zootune.tasks import ClassificationTask

    seen = {}

    def fake_scores(zoo, task, train, val, **kw):
        seen["data"] = (train, val)
        return [0.1, 0.9, 0.3]

    monkeypatch.setattr(start_module, "score_members", fake_scores)
    torch.manual_seed(0)
    zoo = [resnet_small(num_classes=3, depth=10, width=4) for _ in range(3)]
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 2
    data = DatasetSplits(ImageDataset(x, y), ImageDataset(x, y), None, 2, "t")
    spec = get_method("zoo-tuning")
    ctx = BuildContext(zoo=zoo, task=ClassificationTask(2), config=spec.parse_options({}), data=data)
    model = spec.build(ctx)
    assert seen["data"] == (data.train, data.val)
    assert ctx.resolved == {"member_scores": [0.1, 0.9, 0.3]} and model.config.start_member == 1
    # the paper's variant, an explicit start, or no data: no ranking
    for options, context in (({"variant": "paper"}, {"data": data}), ({"start_member": 2}, {"data": data}),
                             ({}, {})):
        ctx = BuildContext(zoo=zoo, task=ClassificationTask(2), config=spec.parse_options(options), **context)
        spec.build(ctx)
        assert ctx.resolved == {}


def test_ranking_inside_build_leaves_the_new_parameters_as_given_scores_would():
    """The probe trains (and draws random numbers); a build that ranks its zoo must still initialise
    its new head and gates from the caller's seed, exactly like a build handed the same scores --
    otherwise `zootune run` and a benchmark that ranks first report different runs of one method."""
    from zootune.data.datasets import DatasetSplits
    from zootune.engine import TrainConfig
    from zootune.methods.registry import BuildContext, get_method

    torch.manual_seed(0)
    zoo = [resnet_small(num_classes=3, depth=10, width=4).eval() for _ in range(2)]
    train, val = _tiny_data(16, 0), _tiny_data(8, 1)
    data = DatasetSplits(train, val, None, 3, "t")
    config = TrainConfig(epochs=1, batch_size=8, lr=0.05, seed=3, progress=False)
    spec = get_method("zoo-tuning")

    def build(options):
        torch.manual_seed(11)
        ctx = BuildContext(zoo=zoo, task=ClassificationTask(3), config=spec.parse_options(options), data=data,
                           train_config=config)
        return spec.build(ctx), ctx

    ranked, ctx = build({})
    assert "member_scores" in ctx.resolved
    given, _ = build({"member_scores": ctx.resolved["member_scores"]})
    after_ranked = torch.rand(3)
    for (name, a), (_, b) in zip(ranked.state_dict().items(), given.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(11)
    spec.build(BuildContext(zoo=zoo, task=ClassificationTask(3), config=spec.parse_options(
        {"member_scores": ctx.resolved["member_scores"]}), data=data, train_config=config))
    after_given = torch.rand(3)
    assert torch.equal(after_ranked, after_given)  # and the random stream goes on from the same place


@pytest.mark.parametrize("scores", [[0.2, 0.9, 0.5], [0.2, 0.5, 0.9]])  # on this data: the first / second start wins
def test_start_candidates_keeps_the_start_that_validates_best(scores):
    """``start_candidates=2``: robust Zoo-Tuning trained from the first- and the second-ranked member
    (each exactly as a run given that start), the better on validation kept, its start recorded."""
    from zootune.data.datasets import DatasetSplits
    from zootune.engine import TrainConfig
    from zootune.fitting import fit_method
    from zootune.methods.registry import get_method
    from zootune.methods.zoo_tuning.start import rank

    torch.manual_seed(0)
    zoo = [resnet_small(num_classes=3, depth=10, width=4).eval() for _ in range(3)]
    data = DatasetSplits(_tiny_data(16, 0), _tiny_data(12, 1), None, 3, "t")
    task = ClassificationTask(3)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05, seed=3, progress=False, exact_choices="macs")  # exact: no timing
    spec = get_method("zoo-tuning")
    first, second = rank(scores)[:2]
    alone = {start: fit_method(spec, zoo, task, data, config, options={"member_scores": scores, "start_member": start})
             for start in (first, second)}
    assert alone[first].val_metric != alone[second].val_metric  # the case is decisive
    chosen = fit_method(spec, zoo, task, data, config, options={"member_scores": scores, "start_candidates": 2})
    winner = second if alone[second].val_metric > alone[first].val_metric else first
    assert chosen.val_metric == alone[winner].val_metric
    for (name, a), (_, b) in zip(chosen.model.state_dict().items(), alone[winner].model.state_dict().items()):
        assert torch.equal(a, b), name
    assert chosen.resolved.get("start_member") == (second if winner == second else None)
    # one candidate is one training, from the first-ranked member
    single = fit_method(spec, zoo, task, data, config, options={"member_scores": scores, "start_candidates": 1})
    assert single.val_metric == alone[first].val_metric and single.built.config.start_member == first
    # the paper's variant and a start the user chose have no further candidates
    for options in ({"variant": "paper", "start_candidates": 2}, {"start_member": 0, "member_scores": scores,
                                                                 "start_candidates": 2}):
        assert spec.candidates(_context(spec, zoo, options)) == []


def _context(spec, zoo, options):
    from zootune.methods.registry import BuildContext

    return BuildContext(zoo=zoo, task=ClassificationTask(3), config=spec.parse_options(options))
