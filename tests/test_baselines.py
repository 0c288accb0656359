"""Baselines: fine-tune, ensemble, distillation, Knowledge Flow, uniform soup.

Every test builds a tiny zoo on the fly and compares against a plain computation written here.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zootune.errors import ZooMismatchError, ZootuneError
from zootune.methods import distill, ensemble, knowledge_flow, soup
from zootune.methods.registry import build_method, get_method
from zootune.models import resnet_small
from zootune.tasks import ClassificationTask


def tiny_zoo(m=3, num_classes=(10, 5, 7), width=4):
    zoo = []
    for i in range(m):
        torch.manual_seed(100 + i)
        model = resnet_small(num_classes=num_classes[i % len(num_classes)], width=width)
        # Non-trivial BN statistics, different per member.
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
        zoo.append(model)
    return zoo


class MLP(nn.Module):
    """A BN-free model: the same function in train and eval mode."""

    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh())
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.fc(self.body(x))


# ---------------------------------------------------------------- fine-tune


def test_finetune_new_head_and_zoo_untouched():
    zoo = tiny_zoo()
    before = {k: v.clone() for k, v in zoo[1].state_dict().items()}
    task = ClassificationTask(4)
    model = build_method('finetune', zoo, task, member=1)
    plain = model.finalize()
    assert plain.fc.out_features == 4
    # Backbone starts from member 1 exactly; the member itself is not modified.
    for key, value in zoo[1].state_dict().items():
        assert torch.equal(value, before[key])
        if not key.startswith("fc."):
            assert torch.equal(plain.state_dict()[key], value)
    with pytest.raises(ZootuneError):
        build_method('finetune', zoo, task, member=3)


def test_finetune_param_groups_apply_backbone_multiplier():
    zoo = tiny_zoo()
    model = build_method('finetune', zoo, ClassificationTask(4), options={'backbone_lr_mult': 0.1}, member=0)
    groups = model.param_groups(0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head"]["lr"] == pytest.approx(0.5)
    assert by_name["backbone"]["lr"] == pytest.approx(0.05)
    head_ids = {id(p) for p in model.model.fc.parameters()}
    assert {id(p) for p in by_name["head"]["params"]} == head_ids
    # Every trainable parameter in exactly one group.
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())

    # One SGD step: each parameter moves by exactly lr_group * grad.
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(groups, lr=0.5)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.step()
    for p, p0, g in zip(model.parameters(), start, grads):
        lr = 0.5 if id(p) in head_ids else 0.05
        torch.testing.assert_close(p.detach(), p0 - lr * g)


def test_finetune_zero_multiplier_freezes_backbone():
    model = build_method('finetune', tiny_zoo(), ClassificationTask(3), options={'backbone_lr_mult': 0.0})
    groups = model.param_groups(0.1)
    assert [g["name"] for g in groups] == ["head"]


# ---------------------------------------------------------------- ensemble


def test_ensemble_probability_average_equals_plain_mean():
    task = ClassificationTask(4)
    members = [build_method('finetune', tiny_zoo(), task, member=i).finalize() for i in range(3)]
    model = build_method("ensemble", None, task, fitted={"finetune": members})
    model.train()  # members must still run in eval mode
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        for m in members:
            m.eval()
        expected = sum(torch.softmax(m(x), dim=1) for m in members) / len(members)
    torch.testing.assert_close(out.exp(), expected)
    assert all(not m.training for m in members)
    assert all(not p.requires_grad for p in model.parameters())


def test_ensemble_logit_average_and_errors():
    members = [MLP() for _ in range(3)]
    model = ensemble.Ensemble(members, combine="logit")
    x = torch.randn(7, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), sum(m(x) for m in members) / 3)
    with pytest.raises(ZootuneError):
        ensemble.Ensemble(members, combine="median")
    with pytest.raises(ZootuneError):
        build_method('ensemble', None, ClassificationTask(3), fitted=None)


# ---------------------------------------------------------------- distillation


def test_distill_kd_term_zero_when_student_equals_single_teacher():
    task = ClassificationTask(3)
    teacher = MLP()
    model = distill.Distill(copy.deepcopy(teacher), [teacher], task, temperature=4.0, alpha=0.5)
    model.train()
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    out = model(x)
    aux = model.auxiliary_loss(out, y)
    # aux = alpha * (T^2 KL - task): with KL = 0 the total (task + aux) is (1 - alpha) * task.
    torch.testing.assert_close(task.loss(out, y) + aux, 0.5 * task.loss(out, y))


def test_distill_loss_matches_plain_formula():
    task = ClassificationTask(3)
    teachers = [MLP(), MLP()]
    student = MLP()
    model = distill.Distill(student, teachers, task, temperature=2.0, alpha=0.3)
    model.train()
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    out = model(x)
    total = task.loss(out, y) + model.auxiliary_loss(out, y)
    with torch.no_grad():
        T = 2.0
        p = sum(torch.softmax(t(x) / T, dim=1) for t in teachers) / 2
        q = torch.softmax(student(x) / T, dim=1)
        kl = (p * (p.log() - q.log())).sum(dim=1).mean()
        expected = 0.7 * F.cross_entropy(student(x), y) + 0.3 * T * T * kl
    assert kl > 0
    torch.testing.assert_close(total.detach(), expected)


def test_distill_teachers_run_only_in_training_and_are_dropped():
    task = ClassificationTask(4)
    zoo = tiny_zoo()
    fitted = [build_method('finetune', zoo, task, member=i).finalize() for i in range(3)]
    model = build_method('distill', zoo, task, fitted={"finetune": fitted}, member_val_metrics=[50.0, 80.0, 60.0])
    calls = []
    for t in model.teachers:
        t.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model(x)
    assert len(calls) == 3 and all(not t.training for t in model.teachers)
    model.eval()
    model(x)
    assert len(calls) == 3  # evaluation runs the student alone
    student = model.finalize()
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in fitted[0].parameters())
    # The student starts from the pretrained member whose fine-tune validated best (member 1).
    torch.testing.assert_close(student.conv1.weight, zoo[1].conv1.weight)
    assert distill.pick_student_member(3, [0.3, 0.1, 0.2], higher_is_better=False, student_member=None) == 1


# ---------------------------------------------------------------- soup


def test_soup_weights_equal_elementwise_mean():
    zoo = tiny_zoo()
    task = ClassificationTask(4)
    model = build_method('soup', zoo, task).finalize()
    state = model.state_dict()
    for key in zoo[0].state_dict():
        if key.startswith("fc."):
            continue
        values = [m.state_dict()[key] for m in zoo]
        if not values[0].is_floating_point():
            continue
        expected = values[0].clone()
        for v in values[1:]:
            expected = expected + v
        torch.testing.assert_close(state[key], expected / len(values))
    assert model.fc.out_features == 4  # heads (of different sizes) are not averaged


def test_soup_bn_reset_and_mismatch():
    zoo = tiny_zoo()
    model = soup.uniform_soup(zoo, bn_stats="reset")
    assert torch.equal(model.bn1.running_mean, torch.zeros_like(model.bn1.running_mean))
    assert torch.equal(model.bn1.running_var, torch.ones_like(model.bn1.running_var))
    with pytest.raises(ZooMismatchError):
        soup.uniform_soup([resnet_small(width=4), resnet_small(width=8)])


# ---------------------------------------------------------------- Knowledge Flow


def kf_model(m=2, **kw):
    zoo = tiny_zoo(m)
    task = ClassificationTask(4)
    return zoo, build_method('knowledge-flow', zoo, task, options={**kw})


def test_kf_flow_point_matches_plain_mixture():
    zoo, model = kf_model(flow_points=["layer4"])
    fp = model.student.layer4
    with torch.no_grad():
        fp.mix_logits.copy_(torch.tensor([0.3, -0.2, 0.5]))
        for q in fp.transforms:
            q.weight.add_(0.1 * torch.randn_like(q.weight))
            q.bias.normal_()
    model.train()
    x = torch.randn(3, 3, 16, 16)
    out = model(x)

    s = model.student
    with torch.no_grad():
        w = torch.softmax(torch.tensor([0.3, -0.2, 0.5]), dim=0)

        def trunk(net, x):
            h = net.relu(net.bn1(net.conv1(x)))
            return net.layer3(net.layer2(net.layer1(h)))

        assert all(not t.training for t in model.teachers)  # frozen teachers run in eval mode
        teachers_h = [t.layer4(trunk(t, x)) for t in model.teachers]
        mixed = w[0] * fp.base_layer(trunk(s, x))
        for j, h_t in enumerate(teachers_h):
            q = fp.transforms[j]
            mixed = mixed + w[j + 1] * (torch.einsum("oc,bchw->bohw", q.weight, h_t) + q.bias[None, :, None, None])
        expected = s.fc(torch.flatten(s.avgpool(mixed), 1))
    torch.testing.assert_close(out.detach(), expected, rtol=1e-4, atol=1e-5)


def test_kf_finalized_student_equals_kf_with_teacher_weights_zero():
    zoo, model = kf_model()
    x = torch.randn(4, 3, 16, 16)
    model.train()
    model.set_training_progress(0.2)
    assert model.teachers_active()
    with torch.no_grad():
        for fp in model.flow_modules():
            fp.mix_logits.copy_(torch.tensor([0.0, float("-inf"), float("-inf")]))
        out_zero = model(x)
        for fp in model.flow_modules():
            fp.mix_logits.copy_(torch.tensor([0.0, 1.0, 1.0]))
        out_flow = model(x)
    student = model.finalize()
    student.train()
    with torch.no_grad():
        out_student = student(x)
    torch.testing.assert_close(out_student, out_zero)
    assert not torch.allclose(out_student, out_flow)  # the teachers do flow in when weighted

    # No teacher parameters, transforms or mixing weights left: exactly the architecture's state.
    reference = resnet_small(num_classes=4, width=4)
    assert list(student.state_dict()) == list(reference.state_dict())
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in reference.parameters())
    assert not any(isinstance(m, knowledge_flow.FlowPoint) for m in student.modules())
    # The zoo the user passed is not frozen by the method.
    assert all(p.requires_grad for m in zoo for p in m.parameters())


def test_kf_teachers_only_run_in_training_phase():
    _, model = kf_model(flow_points=["layer1", "layer2"])
    calls, late = [], []
    for t in model.teachers:
        t.register_forward_pre_hook(lambda *_: calls.append(1))
        t.layer3.register_forward_pre_hook(lambda *_: late.append(1))
    x = torch.randn(2, 3, 16, 16)
    model.train()
    model.set_training_progress(0.5)
    model(x)
    assert len(calls) == 2
    model.set_training_progress(0.95)  # teacher-free final phase
    model(x)
    model.eval()
    model(x)
    assert len(calls) == 2
    assert not late  # teachers stop after the last flow point


def train_kf(lambda1, steps=15):
    torch.manual_seed(0)
    _, model = kf_model(lambda1=lambda1, student_only_from=1.0, initial_student_weight=None)  # uniform start
    task = ClassificationTask(4)
    optimizer = torch.optim.SGD(model.param_groups(0.05), lr=0.05, momentum=0.9)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    model.train()
    for step in range(steps):
        # The engine's per-step contract (zootune.methods.base).
        model.set_training_progress(step / steps)
        out = model(x)
        loss = task.loss(out, y) + model.auxiliary_loss(out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(sum(fp.mix_weights()[1:].sum() for fp in model.flow_modules()))


def test_kf_lambda1_grows_and_pushes_teacher_weights_down():
    _, model = kf_model(lambda1=3.0)
    lambdas = [model.lambda1_at(t) for t in (0.0, 0.25, 0.5, 1.0)]
    assert lambdas == sorted(lambdas) and lambdas[0] < lambdas[-1] == pytest.approx(3.0)
    # The auxiliary loss is lambda1(t) * sum w_j^2: larger later in training for the same weights.
    model.set_training_progress(0.1)
    early = model.auxiliary_loss(None, None)
    model.set_training_progress(0.9)
    late = model.auxiliary_loss(None, None)
    torch.testing.assert_close(late, 9 * early)

    initial = 4 * 2 / 3  # 4 flow points, 2 teachers with weight 1/3 each
    with_penalty = train_kf(lambda1=20.0)
    without = train_kf(lambda1=0.0)
    assert with_penalty < initial - 0.1
    assert with_penalty < without - 0.1


def test_kf_errors_for_unknown_flow_point():
    with pytest.raises(ZootuneError):
        kf_model(flow_points=["layer9"])
    with pytest.raises(ZootuneError):
        knowledge_flow.KnowledgeFlow(MLP(), [MLP()])  # no layer1..4: flow points must be named


def test_kf_generic_model_with_named_flow_point():
    teachers = [MLP(), MLP()]
    student = MLP()
    model = knowledge_flow.KnowledgeFlow(student, teachers, flow_points=["body"], example_input=torch.randn(1, 6))
    model.train()
    out = model(torch.randn(5, 6))
    assert out.shape == (5, 3) and math.isfinite(float(out.detach().sum()))
    assert isinstance(model.finalize().body, nn.Sequential)


# ---------------------------------------------------------------- student from the best-validated member


def test_member_val_metrics_reach_later_methods_and_student_is_that_member():
    from zootune.fitting import FittedSet

    zoo, task = tiny_zoo(), ClassificationTask(4)
    fitted = [build_method('finetune', zoo, task, member=i).finalize() for i in range(3)]
    val = [40.0, 55.0, 90.0]  # member 2 validated best
    # What the run hands on: a per-member method's validation metrics, once every member ran.
    done = FittedSet()
    fits = [type("F", (), {"model": m, "val_metric": v})() for m, v in zip(fitted, val)]
    done.add(get_method("finetune"), fits[:2], len(zoo))
    assert done.member_val_metrics is None  # two of three members: no ranking to hand on
    done.add(get_method("finetune"), fits, len(zoo))
    assert done.member_val_metrics == val and done.models["finetune"] == fitted
    for name in ("distill", "knowledge-flow"):
        built = build_method(name, zoo, task, fitted={"finetune": fitted}, member_val_metrics=val)
        student = built.finalize()
        for key, value in zoo[2].state_dict().items():
            if not key.startswith("fc."):  # the head is the task's new one
                assert torch.equal(student.state_dict()[key], value), (name, key)
    # The user's own choice wins over the ranking.
    student = build_method("distill", zoo, task, options={"student_member": 0}, fitted={"finetune": fitted},
                           member_val_metrics=val).finalize()
    assert torch.equal(student.state_dict()["conv1.weight"], zoo[0].state_dict()["conv1.weight"])


def test_distill_logit_average_matches_plain_formula():
    t1, t2 = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[3.0, 1.0, 0.0]])
    temperature = 2.0
    mean_logits = [(1.0 + 3.0) / 2, (0.0 + 1.0) / 2, (-1.0 + 0.0) / 2]
    z = [math.exp(v / temperature) for v in mean_logits]
    expected = torch.tensor([[v / sum(z) for v in z]])
    got = distill.averaged_teacher_probs([t1, t2], temperature, average="logits")
    torch.testing.assert_close(got, expected)
    # ... which differs from averaging the probabilities.
    assert not torch.allclose(got, distill.averaged_teacher_probs([t1, t2], temperature, average="probs"))
    with pytest.raises(ZootuneError):
        build_method('distill', tiny_zoo(), ClassificationTask(4), options={'average': "median"}, fitted={"finetune": [MLP()]})


# ---------------------------------------------------------------- Knowledge Flow's lambda2 term


def test_kf_previous_iterate_kl_hand_made_value():
    # p_prev = (1/2, 1/2), p = (3/4, 1/4): KL = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3).
    previous = torch.tensor([[0.0, 0.0]])
    current = torch.tensor([[math.log(3.0), 0.0]])
    torch.testing.assert_close(knowledge_flow.previous_iterate_kl(previous, current), torch.tensor(0.5 * math.log(4 / 3)))
    # Batch mean: a second, identical row (KL 0) halves it.
    both = knowledge_flow.previous_iterate_kl(torch.cat([previous, current]), torch.cat([current, current]))
    torch.testing.assert_close(both, torch.tensor(0.25 * math.log(4 / 3)))


def test_kf_lambda2_term_compares_with_the_previous_iterate():
    torch.manual_seed(0)
    teachers = [MLP(), MLP()]
    model = knowledge_flow.KnowledgeFlow(MLP(), teachers, flow_points=["body"], example_input=torch.randn(1, 6),
                                         lambda1=0.0, lambda2=0.7)
    model.train()
    model.set_training_progress(0.3)
    x1, x2 = torch.randn(5, 6), torch.randn(5, 6)
    out = model(x1)
    # First step: the previous iterate is the current model, so the term is exactly 0.
    assert float(model.auxiliary_loss(out, None).detach()) == 0.0
    # The previous iterate is not a submodule: not trained, not saved, not counted.
    plain = knowledge_flow.KnowledgeFlow(MLP(), [MLP(), MLP()], flow_points=["body"], example_input=torch.randn(1, 6))
    assert list(model.state_dict()) == list(plain.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in plain.parameters())

    # "Optimizer step" by hand, then the term on a new batch equals the plain KL between the model
    # before and after the step, teachers flowing in both.
    before = copy.deepcopy(model)
    before.lambda2 = 0.0
    with torch.no_grad():
        model.student.fc.weight.add_(torch.randn_like(model.student.fc.weight))
        model.student.body.base_layer[0].bias.sub_(0.3)
        model.student.body.mix_logits.add_(torch.tensor([0.0, 0.4, -0.4]))
    out = model(x2)
    aux = model.auxiliary_loss(out, None)
    with torch.no_grad():
        p_prev = torch.softmax(before(x2), dim=1)
        p_now = torch.softmax(out, dim=1)
        expected = 0.7 * (p_prev * (p_prev.log() - p_now.log())).sum(dim=1).mean()
    assert float(expected) > 1e-2
    torch.testing.assert_close(aux.detach(), expected)
    aux.backward()  # the gradient reaches the student (through the current prediction only)
    assert model.student.fc.weight.grad is not None and model.student.fc.weight.grad.abs().sum() > 0

    # Teacher-free phase and eval: no teacher features; eval keeps no previous prediction.
    model.eval()
    model(x2)
    assert float(model.auxiliary_loss(out, None).detach()) == 0.0  # lambda1 = 0 and nothing stashed


def test_kf_lambda2_restarts_after_loading_a_state_dict():
    torch.manual_seed(1)
    make = lambda: knowledge_flow.KnowledgeFlow(  # noqa: E731
        MLP(), [MLP(), MLP()], flow_points=["body"], example_input=torch.randn(1, 6), lambda1=0.0, lambda2=1.0)
    model, other = make(), make()
    model.train()
    model.load_state_dict(other.state_dict())  # e.g. resuming: the previous iterate is not known
    out = model(torch.randn(4, 6))
    assert float(model.auxiliary_loss(out, None).detach()) == 0.0


def test_kf_initial_student_weight_and_zero_transforms():
    _, model = kf_model(m=3, initial_student_weight=0.7, transform_init="zero", flow_points=["layer2"])
    fp = model.student.layer2
    w = fp.mix_weights().detach()
    torch.testing.assert_close(w, torch.tensor([0.7, 0.1, 0.1, 0.1]))
    # Zero transforms: the teachers add nothing yet, the flow point is w_s times the student's own output.
    fp.teacher_features = [torch.randn(2, 8, 8, 8) for _ in range(3)]
    x = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fp(x), 0.7 * fp.base_layer(x))
    fp.teacher_features = None
    with pytest.raises(ZootuneError):
        kf_model(initial_student_weight=1.0)


# ---------------------------------------------------------------- scratch


def test_scratch_is_the_architecture_freshly_initialised_from_the_seed(tmp_path):
    from zootune.zoo import Zoo
    from zootune.zoo.checkpoint import save_state_dict

    zoo, task = tiny_zoo(), ClassificationTask(4)
    paths = []
    for i, member in enumerate(zoo):
        paths.append(save_state_dict(tmp_path / f"m{i}.safetensors", member.state_dict()))
    from_files = Zoo.from_checkpoints(paths, arch=lambda: resnet_small(num_classes=10, width=4))
    for source in (zoo, Zoo.from_modules(list(zoo)), from_files):
        a = build_method("scratch", source, task, seed=1).finalize()
        b = build_method("scratch", source, task, seed=1).finalize()
        c = build_method("scratch", source, task, seed=2).finalize()
        assert set(a.state_dict()) == set(zoo[0].state_dict()) and a.fc.out_features == 4
        for key, value in a.state_dict().items():
            if key.startswith("fc.") or not value.is_floating_point():
                continue
            assert torch.equal(value, b.state_dict()[key]), key  # same seed, same model
            if key.endswith("weight") and value.dim() > 1:
                assert not torch.equal(value, c.state_dict()[key]), key  # another seed, another draw
                assert all(not torch.equal(value, m.state_dict()[key]) for m in zoo), key  # no member's weights
