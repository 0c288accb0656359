"""Every registered method on a torchvision and a timm family through the engine; Hub-Pathway over a
heterogeneous hub; Knowledge Flow on a timm ViT's token blocks; LogME on both libraries."""

from __future__ import annotations

import warnings

import pytest
import torch
from interop_helpers import (
    CLASSES, FAMILIES, SIZE, build, family_params, images, labels, make_members, needs_both, needs_timm,
    train_step,
)

from zootune.data.datasets import DatasetSplits, ImageDataset
from zootune.engine import TrainConfig
from zootune.errors import ZootuneError
from zootune.fitting import fit_method
from zootune.methods.hub_pathway import HubPathway
from zootune.zoo import Hub
from zootune.methods.knowledge_flow import KnowledgeFlow
from zootune.methods.logme import rank_zoo
from zootune.methods.registry import available_methods
from zootune.tasks import ClassificationTask

# Methods whose finalized model is the zoo's own architecture with the new head.
PLAIN = {"finetune", "distill", "knowledge-flow", "soup", "lite"}


def splits(n: int = 8) -> DatasetSplits:
    return DatasetSplits(train=ImageDataset(images(n, seed=1), labels(n)), val=ImageDataset(images(4, seed=2), labels()),
                         test=None, num_classes=CLASSES, name="interop")


@pytest.fixture(scope="module", params=family_params(["tv_resnet18", "timm_convnext_atto"]))
def zoo(request):
    return make_members(FAMILIES[request.param], m=2)


def test_every_registered_method_trains_and_finalizes(zoo, tmp_path):
    task = ClassificationTask(CLASSES)
    config = TrainConfig(epochs=1, batch_size=4, max_steps_per_epoch=1, progress=False, lr=0.01)
    data = splits()
    fitted: dict = {}
    done = []
    for name, spec in available_methods().items():
        if spec.hub:
            continue  # Hub-Pathway: below, on a hub of different architectures
        for required in spec.requires:
            assert required in fitted, f"{name} needs {required}, which is registered after it"
        members = range(len(zoo)) if spec.per_member else [None]
        models = []
        options = {"formulation": "grouped"} if name in ("zoo-tuning", "lite") else {}
        for member in members:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # PAC-Net without source data warns that it calibrates only
                result = fit_method(spec, zoo, task, data, config, member=member, options=options,
                                    fitted={r: fitted[r] for r in spec.requires}, out_dir=tmp_path / f"{name}-{member}")
            model = result.model.eval()
            with torch.no_grad():
                out = model(images(2))
            assert out.shape == (2, CLASSES) and torch.isfinite(out).all(), name
            if name in PLAIN:
                assert type(model) is type(zoo[0]), f"{name} finalized to a {type(model).__name__}"
            models.append(model)
        fitted[name] = models if spec.per_member else models[0]
        done.append(name)
    assert {"finetune", "ensemble", "distill", "knowledge-flow", "soup", "zoo-tuning", "lite", "pac-net"} <= set(done)


def test_logme_ranks_library_members(zoo):
    ranking = rank_zoo(zoo, ImageDataset(images(12, seed=3), torch.arange(12) % CLASSES), names=["a", "b"])
    assert sorted(name for name, _ in ranking) == ["a", "b"]
    assert all(torch.isfinite(torch.tensor(score)) for _, score in ranking)


@needs_both
def test_hub_pathway_over_a_resnet_a_vit_and_a_convnext():
    models = [build(FAMILIES["tv_resnet18"], 0), build(FAMILIES["timm_vit_tiny_patch16_224"], 1),
              build(FAMILIES["timm_convnext_atto"], 2)]
    hub = Hub(models, names=["resnet18", "vit_tiny", "convnext_atto"])
    model = HubPathway(hub, CLASSES, k=2, input_shape=(3, SIZE, SIZE))
    assert model.feature_dims == [512, 192, 320]
    x = images(16, seed=4) + 2 * torch.randn(16, 3, 1, 1)
    counts = model.route_counts(x)
    assert (counts > 0).sum() >= 2 and counts.max() < 16, counts.tolist()  # no tie sends all to the same two
    for step in range(2):
        train_step(model, images(8, seed=5 + step), torch.arange(8) % CLASSES)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (16, CLASSES) and torch.isfinite(out).all()


@needs_timm
def test_hub_pathway_says_when_a_fixed_size_member_needs_input_shape():
    vit = build(FAMILIES["timm_vit_tiny_patch16_224"], 0, img_size=224)  # accepts 224 x 224 only
    with pytest.raises(ZootuneError, match="input_shape"):
        HubPathway([vit, build(FAMILIES["timm_convnext_atto"], 1)], CLASSES)  # default probe: 32 x 32
    HubPathway([vit, build(FAMILIES["timm_convnext_atto"], 1)], CLASSES, input_shape=(3, 224, 224))


@needs_timm
@pytest.mark.parametrize("probe", [False, True])
def test_knowledge_flow_on_timm_vit_blocks_mixes_channels_not_tokens(probe):
    family = FAMILIES["timm_vit_tiny_patch16_224"]
    student, teachers = build(family, 0, num_classes=CLASSES), [build(family, 1), build(family, 2)]
    x = images(2)
    flow = KnowledgeFlow(student, teachers, flow_points=["blocks.0", "blocks.11"], example_input=x if probe else None,
                         initial_student_weight=0.8)
    for name in flow.flow_points:
        point = flow.student.get_submodule(name)
        assert point.transforms[0].weight.shape == (192, 192)  # not the 5 tokens of a 32 x 32 image
    train_step(flow, x, labels(2))
    assert all(flow.student.get_submodule(n).channel_dim == -1 for n in flow.flow_points)
    plain = flow.finalize()
    assert type(plain) is type(student) and not any(type(m).__name__ == "FlowPoint" for m in plain.modules())
