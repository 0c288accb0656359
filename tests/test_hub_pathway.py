"""Hub-Pathway: routed execution, gating, losses, gradients, cost; heterogeneous hubs.

Every fast path is compared with a plain computation written out here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from zootune.errors import ZootuneError
from zootune.methods.hub_pathway import HubPathway, balance_loss, cv_squared, smooth_load
from zootune.zoo import Hub
from zootune.methods.registry import build_method, get_method
from zootune.models import build_model, mixer_tiny32, resnet_small, vit_tiny32
from zootune.tasks import ClassificationTask

NUM_CLASSES = 5


class PlainNet(nn.Module):
    """A user model without ``forward_features``; its head is called ``classifier``."""

    def __init__(self, width: int = 12):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, 3)

    def forward(self, x):
        return self.classifier(self.body(x))


def tiny_hub_models() -> list[nn.Module]:
    """Four architectures, feature sizes 32, 16, 24 and 12."""
    return [
        resnet_small(10, width=4),
        vit_tiny32(10, dim=16, depth=1, num_heads=2, mlp_ratio=1.0),
        mixer_tiny32(10, dim=24, depth=1, token_hidden=8, channel_hidden=16),
        PlainNet(12),
    ]


def randomize_generator(model: HubPathway, scale: float = 3.0) -> None:
    """Non-zero gate weights so that different inputs take different pathways."""
    with torch.no_grad():
        model.generator.gate.weight.normal_(0, scale)
        model.generator.gate.bias.zero_()


def images(n: int, size: int = 32) -> torch.Tensor:
    """Random inputs whose per-image colour offsets make the generator's pooled features differ."""
    return torch.randn(n, 3, size, size) + 2 * torch.randn(n, 3, 1, 1)


def dense_reference(model: HubPathway, x, top_index, top_weight):
    """Σ_{i∈topk(x)} w_i(x) · head_i(f_i(x)), every model run on the whole batch, one sample at a time."""
    all_outputs = [model.heads[i](model.extractors[i](model.members[i], x)) for i in range(len(model.members))]
    rows = []
    for b in range(x.shape[0]):
        total = torch.zeros(NUM_CLASSES)
        for slot in range(model.k):
            i = int(top_index[b, slot])
            total = total + top_weight[b, slot] * all_outputs[i][b]
        rows.append(total)
    return torch.stack(rows)


def test_routed_output_equals_dense_weighted_sum_in_eval():
    model = HubPathway(Hub(tiny_hub_models()), NUM_CLASSES, k=2).eval()
    randomize_generator(model)
    x = images(12)
    with torch.no_grad():
        routed = model(x)
        clean, _ = model.generator(x)
        top_logits, top_index = clean.topk(2, dim=1)
        expected = dense_reference(model, x, top_index, top_logits.softmax(dim=1))
    assert len(set(top_index.flatten().tolist())) > 2, "test needs several pathways in use"
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


def test_routed_output_equals_dense_weighted_sum_in_training_with_noise():
    # LayerNorm-only members: train-mode outputs do not depend on which other samples are in the batch
    models = [vit_tiny32(10, dim=16, depth=1, num_heads=2), mixer_tiny32(10, dim=8, depth=1), PlainNet(6)]
    model = HubPathway(models, NUM_CLASSES, k=2).train()
    randomize_generator(model, scale=1.0)
    x = images(10)
    routed = model(x)
    last = model._last
    expected = dense_reference(model, x, last["top_index"], last["top_weight"])
    torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)
    # the weights are the softmax over the kept *noisy* logits
    torch.testing.assert_close(
        last["top_weight"], last["noisy"].gather(1, last["top_index"]).softmax(dim=1)
    )


def test_unselected_model_does_not_run_and_selected_ones_run_once():
    models = tiny_hub_models()
    model = HubPathway(models, NUM_CLASSES, k=2, copy_members=False).eval()
    with torch.no_grad():  # prefer models 1 and 3, never model 0 or 2
        model.generator.gate.bias.copy_(torch.tensor([-10.0, 5.0, -10.0, 4.0]))
    calls = [0] * len(models)
    for i, member in enumerate(models):
        member.register_forward_pre_hook(lambda _m, _a, i=i: calls.__setitem__(i, calls[i] + 1))
    # PlainNet has no forward_features: its features come from calling the model itself; the
    # others' forward_features bypass forward(), so hook their first layer instead.
    first_layers = [models[0].conv1, models[1].patch_embed, models[2].patch_embed, models[3].body[0]]
    runs = [[] for _ in models]
    for i, layer in enumerate(first_layers):
        layer.register_forward_pre_hook(lambda _m, args, i=i: runs[i].append(args[0].shape[0]))
    with torch.no_grad():
        model(images(6))
    assert runs == [[], [6], [], [6]]
    assert calls[0] == calls[2] == 0


def test_dispatch_sends_each_sample_only_to_its_models():
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=1, copy_members=False).eval()
    randomize_generator(model)
    x = images(16)
    seen = {}
    first_layers = [model.members[0].conv1, model.members[1].patch_embed, model.members[2].patch_embed,
                    model.members[3].body[0]]
    for i, layer in enumerate(first_layers):
        layer.register_forward_pre_hook(lambda _m, args, i=i: seen.__setitem__(i, args[0].clone()))
    with torch.no_grad():
        model(x)
        choice = model.generator(x)[0].argmax(dim=1)
    for i in range(4):
        rows = (choice == i).nonzero().flatten()
        if rows.numel() == 0:
            assert i not in seen
        else:
            torch.testing.assert_close(seen[i], x[rows])
    assert model.route_counts(x).tolist() == torch.bincount(choice, minlength=4).tolist()


def test_noise_is_off_in_eval_and_eval_is_deterministic():
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=2)
    randomize_generator(model, scale=0.1)
    with torch.no_grad():  # large noise: training routes would change from call to call
        model.generator.noise.bias.fill_(5.0)
    x = images(16)
    model.eval()
    with torch.no_grad():
        first, second = model(x), model(x)
        clean = model.generator(x)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert torch.equal(model._last["noisy"], clean)
    model.train()
    with torch.no_grad():
        routes_a = model(x) is not None and model._last["top_index"].clone()
        routes_b = model(x) is not None and model._last["top_index"].clone()
    assert not torch.equal(model._last["noisy"], model._last["clean"])
    assert not torch.equal(routes_a, routes_b), "training routes should vary with the noise"


def test_gradients_reach_only_selected_models_and_generator():
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=2, explore_weight=1.0).train()
    with torch.no_grad():  # model 2 is never among the top 2 even with noise
        model.generator.gate.bias.copy_(torch.tensor([3.0, 3.0, -50.0, 3.0]))
        model.generator.gate.weight.normal_(0, 1.0)
    x, y = images(16), torch.randint(0, NUM_CLASSES, (16,))
    outputs = model(x)
    selected = set(model._last["top_index"].flatten().tolist())
    assert 2 not in selected and len(selected) >= 2
    loss = F.cross_entropy(outputs, y) + model.auxiliary_loss(outputs, y)
    loss.backward()
    for i, (member, head) in enumerate(zip(model.members, model.heads)):
        trainable = [p for p in [*member.parameters(), *head.parameters()] if p.requires_grad]
        has_grad = [p.grad is not None and p.grad.abs().sum() > 0 for p in trainable]
        if i in selected:
            assert any(has_grad)
            assert all(p.grad is not None for p in trainable), f"member {i}: some parameters got no gradient"
        else:
            assert not any(has_grad)
    assert model.generator.gate.weight.grad.abs().sum() > 0
    assert model.generator.noise.weight.grad.abs().sum() > 0  # through the smooth load
    assert model.generator.body[0].weight.grad.abs().sum() > 0


def test_members_original_heads_are_frozen_and_excluded():
    model = HubPathway(tiny_hub_models(), NUM_CLASSES)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        "members.0.fc.weight", "members.0.fc.bias", "members.1.head.weight", "members.1.head.bias",
        "members.2.head.weight", "members.2.head.bias", "members.3.classifier.weight",
        "members.3.classifier.bias",
    }
    grouped = {id(p) for g in model.param_groups(0.1) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert {g["lr"] for g in HubPathway(tiny_hub_models(), NUM_CLASSES, backbone_lr_mult=0.1).param_groups(1.0)} == {1.0, 0.1}


def test_balance_loss_is_minimal_for_uniform_routing():
    uniform = torch.full((5,), 3.2)
    assert balance_loss(uniform, uniform).item() == pytest.approx(0.0, abs=1e-9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        importance = torch.rand(5, generator=generator) * 4
        load = torch.rand(5, generator=generator) * 4
        assert balance_loss(importance, load) > balance_loss(uniform, uniform)
    # CV² = population variance / mean², written out
    v = torch.tensor([1.0, 2.0, 6.0])
    mean = sum(v.tolist()) / 3
    var = sum((t - mean) ** 2 for t in v.tolist()) / 3
    assert cv_squared(v).item() == pytest.approx(var / mean**2, rel=1e-5)


def test_exploration_loss_of_uniform_routing_is_zero():
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=1).eval()
    with torch.no_grad():
        model.generator.gate.bias.copy_(torch.tensor([0.0, 1.0, 2.0, 3.0]))
        model(images(4))
    skewed = model.exploration_loss()
    # force a uniform routing: sample b goes to model b with weight 1
    model._last["top_index"] = torch.arange(4).view(4, 1)
    model._last["top_weight"] = torch.ones(4, 1)
    assert model.exploration_loss().item() == pytest.approx(0.0, abs=1e-9)
    assert skewed.item() > 1.0


def test_smooth_load_matches_monte_carlo():
    # P(i in top-k) when logit i alone gets fresh noise, the other noisy logits held fixed
    generator = torch.Generator().manual_seed(1)
    clean = torch.randn(3, 4, generator=generator)
    std = torch.rand(3, 4, generator=generator) + 0.5
    noisy = clean + torch.randn(3, 4, generator=generator) * std
    k, draws = 2, 20000
    expected = torch.zeros(4)
    for b in range(3):
        for i in range(4):
            hits = 0
            samples = clean[b, i] + torch.randn(draws, generator=generator) * std[b, i]
            others = torch.cat([noisy[b, :i], noisy[b, i + 1 :]])
            kth_other = others.topk(k).values[-1]
            hits = (samples > kth_other).float().mean()
            expected[i] += hits
    torch.testing.assert_close(smooth_load(clean, noisy, std, k), expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("weighting", ["none", "gate"])
def test_exploitation_loss_trains_each_model_on_its_routed_data(weighting):
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=2, exploit_weighting=weighting).eval()
    randomize_generator(model)
    x, y = images(8), torch.randint(0, NUM_CLASSES, (8,))
    with torch.no_grad():
        model(x)
        loss = model.exploitation_loss(y)
        top_index, top_weight = model._last["top_index"], model._last["top_weight"]
        terms = []
        for b in range(8):
            for slot in range(2):
                i = int(top_index[b, slot])
                logits = model.heads[i](model.extractors[i](model.members[i], x[b : b + 1]))
                ce = F.cross_entropy(logits, y[b : b + 1])
                terms.append(ce if weighting == "none" else top_weight[b, slot] * ce)
    expected = sum(terms) / (16 if weighting == "none" else 8)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


def test_hub_accepts_different_feature_sizes_and_named_entry_points():
    models = tiny_hub_models()
    model = HubPathway(models, NUM_CLASSES)
    assert model.feature_dims == [32, 16, 24, 12]
    assert [h.in_features for h in model.heads] == [32, 16, 24, 12]

    net = PlainNet(7)
    x = images(3)
    # "input of module X": here the input of body[3] (Flatten) is the pooled map (B, 7, 1, 1)
    hub = Hub([net, net, net], names=["by_module", "by_method", "by_callable"],
              feature_names={"by_module": "body.3"},
              feature_fns={"by_method": "forward", "by_callable": lambda m, t: m.body[:2](t)})
    expected_pooled = net.body(x)
    torch.testing.assert_close(hub.features(0, x), expected_pooled)
    torch.testing.assert_close(hub.features(1, x), net(x))  # a method name: its output
    torch.testing.assert_close(hub.features(2, x), net.body[:2](x).mean(dim=(2, 3)))  # maps are pooled
    assert HubPathway(hub, NUM_CLASSES).feature_dims == [7, 3, 7]


def test_module_input_entry_point_skips_the_rest_of_the_forward():
    net = PlainNet(5)
    ran_head = []
    net.classifier.register_forward_hook(lambda *_: ran_head.append(True))
    hub = Hub([net], feature_names="classifier")
    torch.testing.assert_close(hub.features(0, torch.ones(2, 3, 8, 8)), net.body(torch.ones(2, 3, 8, 8)))
    assert not ran_head
    assert net.classifier._forward_pre_hooks == {}  # the temporary hook is removed


def test_user_errors_are_zootune_errors():
    models = tiny_hub_models()
    with pytest.raises(ZootuneError, match="k must be"):
        HubPathway(models, NUM_CLASSES, k=5)
    with pytest.raises(ZootuneError, match="no submodule"):
        Hub(models, feature_names=["nope", None, None, None])
    with pytest.raises(ZootuneError, match="no method"):
        Hub(models, feature_fns="encode")
    with pytest.raises(ZootuneError, match="3 entries"):
        Hub(models, feature_fns=[None, None, None])
    with pytest.raises(ZootuneError, match="unique"):
        Hub(models[:2], names=["a", "a"])
    with pytest.raises(ZootuneError, match="probe input"):  # the Mixer only takes 32x32
        HubPathway(models, NUM_CLASSES, input_shape=(3, 16, 16))


def test_inference_flops_are_k_over_m_of_the_ensemble_plus_generator():
    members = [resnet_small(10, width=4) for _ in range(5)]
    model = HubPathway(members, NUM_CLASSES, k=2, input_shape=(3, 16, 16)).eval()
    randomize_generator(model)
    x = images(10, size=16)

    def flops(fn):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops()

    routed = flops(lambda: model(x))
    generator = flops(lambda: model.generator(x))
    ensemble = flops(lambda: [model.heads[i](model.extractors[i](model.members[i], x)) for i in range(5)])
    # every sample runs exactly 2 of the 5 identical members; the aggregation itself is not a matmul
    assert routed == generator + ensemble * 2 // 5
    assert (model.route_counts(x) > 0).sum() > 2  # the routing is really mixed


def test_registered_as_hub_method_and_builds_from_a_task():
    spec = get_method("hub-pathway")
    assert spec.hub and spec.trains
    model = build_method(spec.name, tiny_hub_models(), ClassificationTask(NUM_CLASSES), options={'k': 3, 'exploit_weight': 0.5})
    assert isinstance(model, HubPathway) and model.k == 3 and model.exploit_weight == 0.5
    assert model(images(4)).shape == (4, NUM_CLASSES)
    assert model.finalize() is model


def test_registered_architectures_build():
    for name in ("vit_tiny32", "mixer_tiny32"):
        net = build_model(name, num_classes=4)
        features = net.forward_features(images(2))
        assert features.shape == (2, net.num_features)
        torch.testing.assert_close(net(images(2) * 0 + 1)[0], net.head(net.forward_features(torch.ones(1, 3, 32, 32)))[0])


def test_members_are_copied_by_default():
    models = tiny_hub_models()
    before = models[0].conv1.weight.clone()
    model = HubPathway(models, NUM_CLASSES)
    with torch.no_grad():
        model.members[0].conv1.weight.add_(1.0)
    assert torch.equal(models[0].conv1.weight, before)
    assert models[0].fc.weight.requires_grad  # the original's head is not frozen by the probe


def test_minizoo_hub_members_are_cached_and_rebuilt_when_damaged(tmp_path, monkeypatch):
    import zootune.minizoo.hub as hub_module

    built = []

    def fake_pretraining(spec, progress=False):  # the cache logic is under test, not pretraining
        built.append(spec.name)
        return build_model(spec.arch), {"steps": spec.steps}

    monkeypatch.setattr(hub_module, "build_member", fake_pretraining)
    spec = hub_module.HubMemberSpec("mixer-test", "mixer_tiny32", "mnist-supervised", steps=2)
    hub = hub_module.load_hub(cache_dir=tmp_path, members=[spec], zoo_members=())
    assert hub.names == ["mixer-test"] and type(hub[0]).__name__ == "MLPMixer" and built == ["mixer-test"]
    path = hub_module.hub_dir(tmp_path) / "mixer-test.safetensors"
    assert path.exists() and not list(path.parent.glob("*.tmp"))

    again = hub_module.load_hub(cache_dir=tmp_path, members=[spec], zoo_members=())
    assert built == ["mixer-test"], "a cached member must not be pretrained again"
    for a, b in zip(hub[0].state_dict().values(), again[0].state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ZootuneError, match="not built"):
        hub_module.load_hub(cache_dir=tmp_path / "empty", members=[spec], zoo_members=(), build_if_missing=False)
    changed = hub_module.HubMemberSpec("mixer-test", "mixer_tiny32", "mnist-supervised", steps=3)
    hub_module.load_hub(cache_dir=tmp_path, members=[changed], zoo_members=())
    assert len(built) == 2, "a member cached by another recipe is rebuilt"
    path.write_bytes(b"truncated")
    hub_module.load_hub(cache_dir=tmp_path, members=[changed], zoo_members=())
    assert len(built) == 3, "a damaged cache file is rebuilt"


def test_trains_with_the_engine_and_is_reproducible():
    from zootune.engine import TrainConfig, Trainer

    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (48,), generator=generator)
    inputs = torch.randn(48, 3, 32, 32, generator=generator) + labels.view(-1, 1, 1, 1)
    data = [(inputs[i], int(labels[i])) for i in range(48)]
    task = ClassificationTask(3)

    def fit():
        torch.manual_seed(0)
        sources = tiny_hub_models()[1:]
        model = HubPathway(sources, task)
        config = TrainConfig(epochs=2, batch_size=16, lr=0.05, seed=0, progress=False)
        return Trainer(model, task, data[:32], data[32:], config=config).fit(), sources

    (first, sources), (second, _) = fit(), fit()
    assert isinstance(first.model, HubPathway)
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    trained_members = [i for i, (source, member) in enumerate(zip(sources, first.model.members))
                       if not torch.equal(source.patch_embed.weight if i < 2 else source.body[0].weight,
                                          member.patch_embed.weight if i < 2 else member.body[0].weight)]
    assert trained_members, "training must update the members that inputs were routed to"


# ---------------------------------------------------------------------------------------------- robust


def test_robust_routing_starts_on_the_ranked_best_member():
    from zootune.methods.hub_pathway import ROBUST_ROUTE_PRIOR

    scores = [0.1, 0.5, 0.9, 0.2]
    x = images(16)
    # k = 2: every input goes to the two best-ranked members (2 and 1), half and half
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=2, member_scores=scores).eval()
    with torch.no_grad():
        routing = model.routing(x)
    assert all(set(row) == {1, 2} for row in routing["top_index"].tolist())
    torch.testing.assert_close(routing["top_weight"], torch.full((16, 2), 0.5), atol=0.02, rtol=0)
    with torch.no_grad():
        generator_logits, _ = model.generator(x)
    torch.testing.assert_close(routing["clean"], generator_logits + model.route_prior)
    assert model.route_prior.tolist() == [0.0, ROBUST_ROUTE_PRIOR, ROBUST_ROUTE_PRIOR, 0.0]
    # only the best one preferred (route_prior_top=1): it comes first, with the softmax weight the
    # prior gives it over a logit of 0
    model = HubPathway(tiny_hub_models(), NUM_CLASSES, k=2, member_scores=scores, route_prior_top=1).eval()
    with torch.no_grad():
        routing = model.routing(x)
    assert (routing["top_index"][:, 0] == 2).all()
    expected = torch.sigmoid(torch.tensor(ROBUST_ROUTE_PRIOR))
    torch.testing.assert_close(routing["top_weight"][:, 0], expected.expand(16), atol=0.02, rtol=0)
    for unranked in (HubPathway(tiny_hub_models(), NUM_CLASSES, k=2),
                     HubPathway(tiny_hub_models(), NUM_CLASSES, k=2, member_scores=scores, variant="paper")):
        assert not unranked.route_prior.any() and not unranked.has_route_prior
    with pytest.raises(ZootuneError, match="member_scores"):
        HubPathway(tiny_hub_models(), NUM_CLASSES, member_scores=[1.0, 2.0])
    with pytest.raises(ZootuneError, match="route_prior needs"):
        HubPathway(tiny_hub_models(), NUM_CLASSES, route_prior=2.0)


def test_prior_exploration_does_not_push_routing_towards_uniform():
    # explore="prior" (robust): CV² of Importance_i / q_i and Load_i / q_i with q = softmax(prior), 0
    # when the routing follows the prior's shares; uniform exploration (paper) is 0 for uniform use.
    robust = HubPathway(tiny_hub_models(), NUM_CLASSES, k=1, member_scores=[0.0, 0.0, 1.0, 0.0])
    assert robust.route_prior.tolist() == [0.0, 0.0, 3.0, 0.0]
    paper = HubPathway(tiny_hub_models(), NUM_CLASSES, k=1, member_scores=[0.0, 0.0, 1.0, 0.0], variant="paper",
                       route_prior=None)
    share = robust.route_prior.softmax(0)
    following_prior = (8 * share, 8 * share)
    uniform = (torch.full((4,), 2.0), torch.full((4,), 2.0))
    for model, zero, positive in ((robust, following_prior, uniform), (paper, uniform, following_prior)):
        model.importance_and_load = lambda values=zero: values
        assert model.exploration_loss().item() == pytest.approx(0.0, abs=1e-9)
        model.importance_and_load = lambda values=positive: values
        assert model.exploration_loss().item() > 0.5
    assert robust.explore == "prior" and paper.explore == "uniform"


def test_registry_passes_member_scores_to_the_robust_variant():
    task = ClassificationTask(NUM_CLASSES)
    model = build_method("hub-pathway", Hub(tiny_hub_models()), task, options={"member_scores": [0, 3, 1, 2]})
    assert model.route_prior.topk(2).indices.tolist() in ([1, 3], [3, 1]) and model.variant == "robust"


def test_options_are_one_dataclass_with_the_constructors_former_names_and_defaults():
    from zootune.errors import OptionError
    from zootune.methods.hub_pathway import HubPathwayOptions

    spec = get_method("hub-pathway")
    assert spec.config is HubPathwayOptions
    assert spec.option_names() == [
        "k", "explore_weight", "exploit_weight", "exploit_weighting", "noisy", "generator_width",
        "generator_input_size", "input_shape", "backbone_lr_mult", "copy_members", "variant", "member_scores",
        "route_prior", "route_prior_top", "explore", "generator_lr_mult"]
    assert isinstance(spec.parse_options({"k": 3}), HubPathwayOptions)
    defaults = HubPathway(tiny_hub_models(), NUM_CLASSES)
    assert defaults.options == HubPathwayOptions() and defaults.k == 2 and defaults.explore == "prior"
    assert (defaults.explore_weight, defaults.exploit_weight, defaults.exploit_weighting) == (0.01, 1.0, "none")
    assert HubPathway(tiny_hub_models(), NUM_CLASSES, 3).k == 3  # k may stay positional
    torch.manual_seed(0)
    by_keywords = HubPathway(tiny_hub_models(), NUM_CLASSES, k=1, exploit_weighting="gate")
    torch.manual_seed(0)
    by_options = HubPathway(tiny_hub_models(), NUM_CLASSES, options=HubPathwayOptions(k=1, exploit_weighting="gate"))
    for a, b in zip(by_keywords.state_dict().values(), by_options.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ZootuneError, match="either options= or keyword options"):
        HubPathway(tiny_hub_models(), NUM_CLASSES, options=HubPathwayOptions(), k=1)
    with pytest.raises(OptionError, match="unknown hub-pathway option.*'width'"):
        HubPathway(tiny_hub_models(), NUM_CLASSES, width=3)
    with pytest.raises(OptionError, match="exploit_weighting must be 'none' or 'gate'"):
        HubPathwayOptions(exploit_weighting="all")
