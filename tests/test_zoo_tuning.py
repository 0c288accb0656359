"""ZooTuning on tiny zoos: targeting, norm handling, one-hot gates reproduce a source, registry, I/O."""
import copy

import pytest
import torch
from torch import nn

from zootune.errors import CheckpointError, ZooMismatchError, ZootuneError
from zootune.layers import AggregatedLayer
from zootune.methods.registry import build_method
from zootune.methods.zoo_tuning import ZooTuning
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask


def tiny_zoo(m=3, dtype=torch.float32):
    zoo = []
    for seed in range(m):
        torch.manual_seed(100 + seed)
        model = resnet_small(num_classes=7, depth=10, width=4).to(dtype)
        with torch.no_grad():  # distinct, non-trivial norm parameters and statistics per member
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0, 0.1)
                    module.running_mean.normal_(0, 0.1)
                    module.running_var.uniform_(0.5, 2.0)
                    module.num_batches_tracked.fill_(7)
        zoo.append(model.eval())
    return zoo


def test_only_targeted_layers_are_replaced():
    zoo = tiny_zoo()
    model = ZooTuning(zoo, num_outputs=3, exclude=["layer2.*"])
    original = dict(zoo[0].named_modules())
    replaced = set(model.aggregated_layers())
    expected = {name for name, module in original.items()
                if isinstance(module, nn.Conv2d) and not name.startswith("layer2.")}
    assert replaced == expected
    for name, module in model.model.named_modules():
        if name in replaced or any(name.startswith(r + ".") for r in replaced):
            continue
        if name == "fc":
            assert isinstance(module, nn.Linear) and module.out_features == 3
        else:
            assert type(module) is type(original[name]), name
    only = ZooTuning(zoo, num_outputs=3, include="layer1.*")
    assert set(only.aggregated_layers()) == {n for n in expected if n.startswith("layer1.")}


def test_linear_targeting_and_alignment_choice():
    zoo = tiny_zoo(2)
    model = ZooTuning(zoo, target_types=(nn.Conv2d, nn.Linear), align="kernel>1")
    layers = model.aggregated_layers()
    assert isinstance(model.model.fc, AggregatedLayer)  # no new head: the members' head is aggregated
    for name, layer in layers.items():
        kernel = zoo[0].get_submodule(name).weight.shape[2:]
        assert (layer.align is not None) == any(k > 1 for k in kernel), name
    assert all(layer.align is None for layer in ZooTuning(zoo, align="none").aggregated_layers().values())
    assert all(layer.align is not None for layer in ZooTuning(zoo, align="all").aggregated_layers().values())


def test_bank_holds_every_source_and_everything_trains():
    zoo = tiny_zoo()
    model = ZooTuning(zoo, num_outputs=3)
    layer = model.aggregated_layers()["layer1.0.conv1"]
    for i, member in enumerate(zoo):
        assert torch.equal(layer.bank[i], member.layer1[0].conv1.weight)
    assert all(p.requires_grad for p in model.parameters())
    assert layer.bank.data_ptr() != zoo[0].layer1[0].conv1.weight.data_ptr()  # a copy: the zoo is untouched


@pytest.mark.parametrize("keep_bn_stats", [False, True])
def test_norm_layers_get_mean_affine_and_reset_or_mean_stats(keep_bn_stats):
    zoo = tiny_zoo()
    model = ZooTuning(zoo, num_outputs=3, keep_bn_stats=keep_bn_stats)
    for name, bn in model.model.named_modules():
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        sources = [member.get_submodule(name) for member in zoo]
        torch.testing.assert_close(bn.weight, sum(s.weight for s in sources) / len(sources))
        torch.testing.assert_close(bn.bias, sum(s.bias for s in sources) / len(sources))
        if keep_bn_stats:
            torch.testing.assert_close(bn.running_mean, sum(s.running_mean for s in sources) / len(sources))
            torch.testing.assert_close(bn.running_var, sum(s.running_var for s in sources) / len(sources))
        else:
            assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
        assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("source", [0, 2])
def test_one_hot_gate_with_identity_alignment_reproduces_that_source(source):
    zoo = tiny_zoo(3, torch.float64)
    model = ZooTuning(zoo, target_types=(nn.Conv2d, nn.Linear), formulation="grouped").double().eval()
    with torch.no_grad():
        for name, module in model.model.named_modules():
            if isinstance(module, AggregatedLayer):
                # sigmoid(+-1000) is exactly 1 / 0 in float64: the gate is one-hot(source)
                module.gate.expand.weight.zero_()
                module.gate.expand.bias.fill_(-1000.0)
                module.gate.expand.bias[source] = 1000.0
            elif isinstance(module, nn.BatchNorm2d):  # norms are shared: give them the source's
                module.load_state_dict(zoo[source].get_submodule(name).state_dict())
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(model(x), zoo[source](x), rtol=1e-12, atol=1e-12)
        other = (source + 1) % 3
        assert not torch.allclose(model(x), zoo[other](x), atol=1e-3)


def test_gate_statistics_are_mean_gates_over_the_pass():
    zoo = tiny_zoo()
    model = ZooTuning(zoo, num_outputs=3, formulation="bmm").eval()
    layer = model.aggregated_layers()["layer1.0.conv2"]
    inputs = []
    layer.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    batches = [torch.randn(3, 3, 32, 32), torch.randn(5, 3, 32, 32)]
    with torch.no_grad(), model.record_gates():
        for batch in batches:
            model(batch)
    expected = torch.cat([layer.gate(h) for h in inputs]).mean(0)
    stats = model.gate_statistics()
    assert set(stats) == set(model.aggregated_layers())
    torch.testing.assert_close(stats["layer1.0.conv2"], expected.detach())
    with torch.no_grad():
        model(batches[0])  # outside the block: not recorded
    torch.testing.assert_close(model.gate_statistics()["layer1.0.conv2"], expected.detach())


def test_registry_builds_both_methods_with_task_head():
    zoo = tiny_zoo(2)
    task = ClassificationTask(5)
    full = build_method("zoo-tuning", zoo, task, options={'formulation': "grouped"})
    lite = build_method("lite", zoo, task, options={'formulation': "stacked"})
    assert not full.config.lite and lite.config.lite
    assert full(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert all(layer.formulation == "stacked" for layer in lite.aggregated_layers().values())
    assert full.finalize() is full
    with pytest.raises(ZootuneError):
        full.merge_and_unload()


def test_user_errors_are_zootune_errors():
    zoo = tiny_zoo(2)
    with pytest.raises(ZootuneError):
        ZooTuning([], num_outputs=2)
    with pytest.raises(ZooMismatchError):
        ZooTuning([zoo[0], resnet_small(num_classes=7, depth=10, width=8)], num_outputs=2)
    with pytest.raises(ZootuneError):
        ZooTuning(zoo, num_outputs=2, include="no.such.layer")
    with pytest.raises(ZootuneError):
        ZooTuning(zoo, num_outputs=2, align="sometimes")


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    zoo = tiny_zoo()
    model = ZooTuning(zoo, num_outputs=3, formulation="stacked")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):  # move weights, alignment, gates and BN statistics off their initial values
        optimizer.zero_grad()
        model(x).logsumexp(1).mean().backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "saved")
    assert {p.name for p in (tmp_path / "saved").iterdir()} == {"model.safetensors", "config.json"}
    loaded = ZooTuning.load_pretrained(tmp_path / "saved", lambda: resnet_small(num_classes=7, depth=10, width=4))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(CheckpointError):
        ZooTuning.load_pretrained(tmp_path / "missing", zoo)
    with pytest.raises(ZooMismatchError):
        ZooTuning.load_pretrained(tmp_path / "saved", zoo[:2])


class _ConvBNNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> fc: every conv is followed by a norm.
    (A tiny BN eps makes the scale invariance exact up to rounding, for exact comparisons.)"""

    def __init__(self, eps=1e-5):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, eps=eps)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=eps)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _sgd_steps(model, param_groups, batches, lr):
    optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=0.9)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_auto_bank_lr_makes_identical_sources_train_like_one_fine_tuned_source():
    # m identical sources, equal batch-shared gates (Lite, gate output weights zeroed) and no
    # alignment: the aggregated kernel is (sum_i a_i) W, and BatchNorm removes that scale. The
    # gates' gradient <dL/dW^, W> is 0 by that scale invariance, so they stay equal. With the bank at m x lr ("auto" measures
    # ||sum W_i||^2 / sum ||W_i||^2 = m here) every step moves (sum_i a_i) W exactly as plain SGD
    # moves W, so the two models keep computing the same function; at 1 x lr they drift apart.
    torch.manual_seed(0)
    plain = _ConvBNNet(eps=1e-12).double()
    m = 3
    batches = [(torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (8,))) for _ in range(4)]
    probe = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    outputs = {}
    for scale in ("auto", 1.0):
        zoo = [copy.deepcopy(plain) for _ in range(m)]
        model = ZooTuning(zoo, head=copy.deepcopy(plain.fc), lite=True, align="none", bank_lr_scale=scale)
        for layer in model.aggregated_layers().values():
            nn.init.zeros_(layer.gate.expand.weight)
        assert model.config.lr_scales == pytest.approx(
            {"conv1": m if scale == "auto" else 1.0, "conv2": m if scale == "auto" else 1.0})
        _sgd_steps(model, model.param_groups(0.05), batches, lr=0.05)
        outputs[scale] = model(probe)
    reference = copy.deepcopy(plain)
    _sgd_steps(reference, reference.parameters(), batches, lr=0.05)
    expected = reference(probe)
    torch.testing.assert_close(outputs["auto"], expected, rtol=1e-7, atol=1e-9)
    assert (outputs[1.0] - expected).abs().max() > 1e-3


def test_auto_bank_lr_is_one_for_uncorrelated_sources_and_layers_without_norm():
    torch.manual_seed(1)
    zoo = [_ConvBNNet() for _ in range(4)]  # independent random inits: nearly orthogonal kernels
    model = ZooTuning(zoo, num_outputs=3, target_types=(nn.Conv2d, nn.Linear), include=["conv*"])
    for name in ("conv1", "conv2"):
        assert 0.6 < model.config.lr_scales[name] < 1.6
    seq = [nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 2)) for _ in range(3)]
    for s in seq[1:]:
        s.load_state_dict(seq[0].state_dict())
    no_norm = ZooTuning(seq, target_types=(nn.Linear,))
    assert no_norm.config.lr_scales == {"0": 1.0, "1": 1.0}  # identical, but nothing normalises them


def test_param_groups_cover_every_parameter_once_with_their_rates():
    zoo = [resnet_small(depth=10, width=4) for _ in range(3)]
    model = ZooTuning(zoo, num_outputs=5, gate_lr_scale=7.0)
    groups = model.param_groups(0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    layers = model.aggregated_layers()
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    for name, layer in layers.items():
        assert rate[id(layer.bank)] == pytest.approx(0.1 * model.config.lr_scales[name])
        assert all(rate[id(p)] == pytest.approx(0.7) for p in layer.gate.parameters())
    assert rate[id(model.model.fc.weight)] == pytest.approx(0.1)


def test_zoo_tuning_over_one_source_starts_as_that_source():
    # With the gate output layer at 0 (gate_init="zero") every input gets gate 1/2; the BatchNorm
    # after each aggregated conv removes that constant scale, so in training mode (batch
    # statistics) the model computes exactly the source's function. The reference's random gate
    # init rescales every sample differently and does not.
    torch.manual_seed(0)
    source = _ConvBNNet(eps=1e-12).double()
    x = torch.randn(8, 3, 6, 6, dtype=torch.float64)
    expected = source(x)
    for gate_init, same in (("zero", True), ("reference", False)):
        model = ZooTuning([source], head=copy.deepcopy(source.fc), align="all", gate_init=gate_init).double()
        close = torch.allclose(model(x), expected, rtol=1e-7, atol=1e-9)
        assert close == same, gate_init


def test_saved_model_keeps_the_learning_rates_measured_on_its_zoo(tmp_path):
    # Rebuilding from a builder makes m copies of one model, whose "auto" scale would be m per
    # layer; the saved model must keep what was measured on the real, different sources.
    torch.manual_seed(0)
    zoo = [resnet_small(depth=10, width=4) for _ in range(3)]
    model = ZooTuning(zoo, num_outputs=3)
    model.save_pretrained(tmp_path)
    loaded = ZooTuning.load_pretrained(tmp_path, lambda: resnet_small(depth=10, width=4))
    assert loaded.config.lr_scales == pytest.approx(model.config.lr_scales)
    assert max(model.config.lr_scales.values()) < 2.0  # independent inits: far from m = 3


# ---------------------------------------------------------------------------------------------- robust


def _with_head(member, head):
    model = copy.deepcopy(member)
    model.fc = copy.deepcopy(head)
    return model


@pytest.mark.parametrize("lite", [False, True])
def test_robust_step_0_is_the_ranked_best_member_with_the_new_head(lite):
    # The robust variant starts with its gates exactly on the member ranked first and that member's
    # norm layers (affine AND running statistics), so before any step it IS that member with the
    # new head -- in training mode (batch statistics), in eval mode (running statistics) and, for
    # Lite, folded. The paper's start (uniform gates, mean norm affine, reset statistics) is not.
    zoo = tiny_zoo(3, torch.float64)
    head = nn.Linear(zoo[0].fc.in_features, 3).double()
    model = ZooTuning(zoo, head=copy.deepcopy(head), member_scores=[0.2, 0.9, 0.4], lite=lite,
                      formulation="grouped").double()
    paper = ZooTuning(zoo, head=copy.deepcopy(head), variant="paper", lite=lite, formulation="grouped").double()
    assert model.config.start_member == 1 and model.config.kept_members == [0, 1, 2]
    expected_member = _with_head(zoo[1], head)
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for mode in ("train", "eval"):
            for module in (model, paper, expected_member):
                module.train(mode == "train")
            expected = expected_member(x)
            torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-12)
            assert not torch.allclose(paper(x), expected, atol=1e-3), mode
        if lite:
            folded = model.eval().merge_and_unload()
            torch.testing.assert_close(folded(x), expected_member.eval()(x), rtol=1e-10, atol=1e-12)
    for layer in model.aggregated_layers().values():  # gates: 1 on the start member, 0 elsewhere
        torch.testing.assert_close(layer.gate(torch.randn(2, layer.in_channels, 4, 4, dtype=torch.float64)),
                                   torch.tensor([[0.0, 1.0, 0.0]] * 2, dtype=torch.float64))


def test_start_member_scores_pruning_and_their_errors():
    zoo = tiny_zoo(4)
    model = ZooTuning(zoo, num_outputs=3, member_scores=[50.0, 10.0, 62.0, 48.0], prune_margin=15.0)
    # rule: keep every member scoring at least (best score - margin): 62 - 15 = 47
    assert model.config.kept_members == [0, 2, 3]
    assert model.config.start_member == 1  # member 2 of the zoo is the second kept one
    layer = model.aggregated_layers()["layer1.0.conv1"]
    assert layer.num_sources == 3
    for bank_row, member in zip(layer.bank, (0, 2, 3)):
        assert torch.equal(bank_row, zoo[member].layer1[0].conv1.weight)
    explicit = ZooTuning(zoo, num_outputs=3, start_member=3, keep_members=[1, 3])
    assert explicit.config.kept_members == [1, 3] and explicit.config.start_member == 1
    unranked = ZooTuning(zoo, num_outputs=3)  # robust without a ranking: the paper's uniform start
    assert unranked.config.start_member is None and unranked.config.norm_init == "mean"
    assert unranked.config.gate == "sigmoid" and unranked.config.kept_members == [0, 1, 2, 3]
    for bad in ({"member_scores": [1.0, 2.0]}, {"member_scores": [1.0, float("nan"), 0.0, 0.0]},
                {"start_member": 4}, {"keep_members": [0, 9]}, {"start_member": 0, "keep_members": [1, 2]},
                {"variant": "fancy"}, {"norm_init": "start"}, {"start_member": 0, "gate": "sigmoid", "off_gate": 0.7},
                {"gate": "tanh"}):
        with pytest.raises(ZootuneError):
            ZooTuning(zoo, num_outputs=3, **bad)


def test_robust_defaults_and_learning_rates_at_the_start():
    from zootune.methods.zoo_tuning import model as zt_model

    zoo = tiny_zoo(3)
    model = ZooTuning(zoo, num_outputs=3, member_scores=[0.0, 1.0, 0.5])
    assert model.config.gate == zt_model.ROBUST_GATE and model.config.norm_init == "start"
    assert model.config.gate_lr_scale == model.config.align_lr_scale == "auto"
    for name in model.config.aggregated_layers:  # the preconditioners, computed plainly
        kernels = [m.get_submodule(name).weight.detach().double().flatten(1) for m in zoo]
        assert model.config.gate_lr_scales[name] == pytest.approx(3 / sum(float((w * w).sum()) for w in kernels))
        assert model.config.align_lr_scales[name] == pytest.approx(
            min(w.shape[0] / float((w * w).sum()) for w in kernels))
    # one-hot start: rho = sum a_i^2 |W_i|^2 / |sum a_i W_i|^2 = 1, so "auto" gives the bank the base rate
    assert all(v == pytest.approx(1.0) for v in model.config.lr_scales.values())
    paper = ZooTuning(zoo, num_outputs=3, variant="paper")
    assert paper.config.gate == "sigmoid" and paper.config.gate_lr_scale == zt_model.DEFAULT_GATE_LR_SCALE
    assert set(paper.config.align_lr_scales.values()) == {1.0}


def test_a_useless_members_gate_goes_to_zero():
    # Toy problem: the targets are member A's outputs (its own head), member J is a random network.
    # Zoo-Tuning over [A, J] starts on A with J's gate at 0.3 (off_gate) and trains only its gates:
    # J's kernels only corrupt A's function, so J's gate must go to ~0 while A's stays ~1.
    torch.manual_seed(0)
    teacher, junk = _ConvBNNet().double().eval(), _ConvBNNet().double().eval()
    with torch.no_grad():
        for net in (teacher, junk):
            for bn in (net.bn1, net.bn2):
                bn.running_var.uniform_(0.5, 2.0)
    model = ZooTuning([teacher, junk], head=copy.deepcopy(teacher.fc), start_member=0, off_gate=0.3,
                      align="none").double().eval()
    gates = [p for layer in model.aggregated_layers().values() for p in layer.gate.parameters()]
    for p in model.parameters():
        p.requires_grad_(any(p is g for g in gates))
    optimizer = torch.optim.Adam(gates, lr=0.02)
    data = torch.Generator().manual_seed(1)

    def mean_gates():
        with torch.no_grad(), model.record_gates():
            model(torch.randn(64, 3, 6, 6, generator=data, dtype=torch.float64))
        return torch.stack(list(model.gate_statistics().values())).double()  # (layers, 2)

    start = mean_gates()
    assert torch.allclose(start, torch.tensor([[1.0, 0.3]] * 2, dtype=torch.float64))
    for _ in range(300):
        x = torch.randn(32, 3, 6, 6, generator=data, dtype=torch.float64)
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), teacher(x)).backward()
        optimizer.step()
    end = mean_gates()
    assert (end[:, 1].abs() < 0.03).all(), end
    assert ((end[:, 0] - 1).abs() < 0.1).all(), end


def test_paper_variant_outputs_equal_the_previous_release():
    # Outputs of ZooTuning(..., variant="paper") after 3 SGD steps on a fixed tiny zoo and data,
    # recorded with the code before the robust variant existed (ZooTuning's defaults then).
    expected = {
        False: [-0.087789874155, 0.078321500488, 0.01408387852, -0.089223921779, 0.077526342806, 0.015499393922,
                -0.086918999037, 0.080081469345, 0.015303476155, -0.089914425321, 0.084607465464, 0.018175325205],
        True: [-0.087791874127, 0.078314458955, 0.014063780587, -0.089200682747, 0.07749809468, 0.015489645135,
               -0.086915847648, 0.080072134654, 0.015291360896, -0.089891121341, 0.084568042292, 0.018167012103],
    }
    torch.manual_seed(0)
    zoo = tiny_zoo(3, torch.float64)
    # the default (robust) without a member ranking starts and trains exactly like the paper's
    for (lite, values), variant in [(item, v) for item in expected.items() for v in ("paper", "robust")]:
        torch.manual_seed(1)
        model = ZooTuning(zoo, num_outputs=3, formulation="grouped", lite=lite, variant=variant).double()
        optimizer = torch.optim.SGD(model.param_groups(0.1), lr=0.1, momentum=0.9, weight_decay=5e-4)
        data = torch.Generator().manual_seed(2)
        for _ in range(3):
            x = torch.randn(6, 3, 32, 32, generator=data, dtype=torch.float64)
            y = torch.randint(0, 3, (6,), generator=data)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        with torch.no_grad():
            out = model.eval()(torch.randn(4, 3, 32, 32, generator=data, dtype=torch.float64))
        torch.testing.assert_close(out.flatten(), torch.tensor(values, dtype=torch.float64), rtol=1e-8, atol=1e-10)


def test_saved_robust_model_reloads_on_the_full_zoo_or_the_kept_members(tmp_path):
    zoo = tiny_zoo(4)
    model = ZooTuning(zoo, num_outputs=3, member_scores=[1.0, 9.0, 8.5, 0.0], prune_margin=2.0,
                      formulation="grouped")
    assert model.config.kept_members == [1, 2]
    optimizer = torch.optim.SGD(model.param_groups(0.1), lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(2):
        optimizer.zero_grad()
        model(x).logsumexp(1).mean().backward()
        optimizer.step()
    model.eval().save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model(x)
        for source in (zoo, zoo[1:3], lambda: resnet_small(num_classes=7, depth=10, width=4)):
            loaded = ZooTuning.load_pretrained(tmp_path, source).eval()
            assert loaded.config.start_member == 0 and loaded.config.num_sources == 2
            assert torch.equal(loaded(x), expected)
    with pytest.raises(ZooMismatchError):
        ZooTuning.load_pretrained(tmp_path, zoo[:3])


def test_robust_random_draws_do_not_depend_on_the_number_of_members():
    # Adding a member to the zoo must change a robust model only through that member: every gate's
    # random first layer is the same with and without it, and so is the random stream afterwards.
    zoo = tiny_zoo(3)
    states = []
    for members, scores in ((zoo[:2], [0.0, 1.0]), (zoo, [0.0, 1.0, 0.5])):
        torch.manual_seed(5)
        model = ZooTuning(members, num_outputs=3, member_scores=scores)
        states.append(({n: layer.gate.reduce.weight for n, layer in model.aggregated_layers().items()},
                       torch.rand(3)))
    (gates_2, after_2), (gates_3, after_3) = states
    assert all(torch.equal(gates_2[n], gates_3[n]) for n in gates_2)
    assert torch.equal(after_2, after_3)


# ------------------------------------------------------------------ stability against fine-tuning the start


def _train_losses_and_kernels(model, batches, lr=0.1):
    """Plain SGD steps through the engine's optimizer (its param_groups hook), on fixed batches:
    the loss of every step and each layer's kernel (the aggregated one at the start gates) after."""
    from zootune.engine import TrainConfig
    from zootune.engine.optim import build_optimizer

    task = ClassificationTask(7)
    optimizer = build_optimizer(model, TrainConfig(lr=lr))
    model.train()
    losses = []
    for x, y in batches:
        loss = task.loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if isinstance(model, ZooTuning):
        with torch.no_grad():
            kernels = {n: layer.fold(layer.gate_ema)[0] for n, layer in model.aggregated_layers().items()}
    else:
        kernels = {n: m.weight.detach() for n, m in model.model.named_modules() if isinstance(m, nn.Conv2d)}
    return losses, kernels


def _fixed_batches(n=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 16, 16, generator=g, dtype=dtype), torch.randint(0, 7, (16,), generator=g))
            for _ in range(n)]


def _start_and_finetune(zoo, **options):
    from zootune.methods.finetune import fine_tune

    torch.manual_seed(0)
    finetuned = fine_tune(zoo[1], ClassificationTask(7))
    torch.manual_seed(0)
    model = ZooTuning(zoo, num_outputs=7, start_member=1, **options)
    return finetuned, model


def test_robust_start_with_gates_and_alignments_frozen_trains_exactly_as_finetuning_its_start():
    # float64: the two compute the same function by different convolutions, and 50 steps at lr 0.1
    # amplify float32 rounding past 1e-5
    zoo = tiny_zoo(3, dtype=torch.float64)
    finetuned, model = _start_and_finetune(zoo)
    model.double()
    for layer in model.aggregated_layers().values():
        for p in [*layer.gate.parameters(), *([layer._align_weight()] if layer.align is not None else [])]:
            p.requires_grad_(False)
    batches = _fixed_batches(dtype=torch.float64)
    want, _ = _train_losses_and_kernels(finetuned, batches)
    got, _ = _train_losses_and_kernels(model, batches)
    assert got == pytest.approx(want, abs=1e-5)


def test_preconditioned_gates_and_alignments_keep_the_kernels_near_finetunings():
    """With every factor free at lr 0.1, the aggregated kernels' norms stay within 1.25x of the fine-tuned
    start member's (layer by layer, after 50 steps); the unpreconditioned rates move them further."""
    zoo = tiny_zoo(3)
    batches = _fixed_batches()

    def worst_ratio(**options):
        finetuned, model = _start_and_finetune(zoo, **options)
        _, reference = _train_losses_and_kernels(finetuned, batches)
        _, kernels = _train_losses_and_kernels(model, batches)
        return max(max(kernels[n].norm() / reference[n].norm(), reference[n].norm() / kernels[n].norm())
                   for n in kernels)

    preconditioned = worst_ratio()
    assert preconditioned < 1.25
    assert worst_ratio(gate_lr_scale=0.2, align_lr_scale=1.0) > preconditioned
