"""Knowledge Flow on token models: the 1x1 transforms mix channels, not tokens (issue 14).

On a timm ViT (flow points ``blocks.*``, features (B, N, C)) the transform used to act on dim 1:
without example_input an einsum error, with it a (N x N) matrix silently mixing the tokens. The
ViT-like model here has N = 5 tokens of C = 6 channels; the reference below applies Q_j along the
last dim, written plainly.
"""

import pytest
import torch
from torch import nn

from zootune.errors import ZootuneError
from zootune.methods.knowledge_flow import KnowledgeFlow, locate_channels


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class TinyViT(nn.Module):
    """4 x 4 patches of an 8 x 8 image plus a class token: (B, 5, 6) token sequences."""

    def __init__(self, dim=6, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(Block(dim), Block(dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], 1)
        return self.head(self.blocks(tokens)[:, 0])


def models(m=2):
    out = []
    for seed in range(m + 1):
        torch.manual_seed(seed)
        out.append(TinyViT().eval())
    return out[0], out[1:]


@pytest.mark.parametrize("probe", [False, True])
def test_transforms_mix_the_channels_of_token_features(probe):
    student, teachers = models()
    x = torch.randn(2, 3, 8, 8)
    flow = KnowledgeFlow(student, teachers, flow_points=["blocks.0"], initial_student_weight=0.5,
                         example_input=x if probe else None)
    point = flow.student.blocks[0]
    with torch.no_grad():
        for transform in point.transforms:
            assert transform.weight.shape == (6, 6)  # channels, not the 5 tokens
            transform.weight.normal_()
            transform.bias.normal_()
    flow.train()
    captured = {}
    hook = flow.student.blocks[1].register_forward_pre_hook(lambda _m, args: captured.__setitem__("h", args[0]))
    flow(x)
    hook.remove()
    # reference: h = w_s * block0(tokens) + sum_j w_j * (h_tj W_j^T + b_j), along the channels
    with torch.no_grad():
        def block0_output(model):
            tokens = model.patch(x).flatten(2).transpose(1, 2)
            tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], 1)
            return model.blocks[0](tokens) if not hasattr(model.blocks[0], "base_layer") \
                else model.blocks[0].base_layer(tokens)
        w = point.mix_weights()
        expected = w[0] * block0_output(flow.student)
        for j, (teacher, transform) in enumerate(zip(teachers, point.transforms)):
            h_t = block0_output(teacher)
            expected = expected + w[j + 1] * (h_t @ transform.weight.T + transform.bias)
    torch.testing.assert_close(captured["h"], expected)


def test_channels_are_located_at_either_end_or_refused():
    assert locate_channels((2, 5, 6), 6) == -1
    assert locate_channels((2, 6, 4, 4), 6) == 1
    assert locate_channels((2, 6), 6) == 1
    assert locate_channels((2, 6, 6), 6, hint=-1) == -1  # both ends: the last layer decides
    with pytest.raises(ZootuneError, match="channel_dim"):
        locate_channels((2, 6, 6), 6)
    with pytest.raises(ZootuneError, match="neither"):
        locate_channels((2, 5, 7), 6)


def test_a_flow_point_it_cannot_handle_is_refused_in_one_line():
    student, teachers = models()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ZootuneError, match="not a module"):
        KnowledgeFlow(student, teachers, flow_points=["blocks.9"])
    with pytest.raises(ZootuneError, match="channel_dim must be"):
        KnowledgeFlow(student, teachers, flow_points=["blocks.0"], channel_dim=2)
    flow = KnowledgeFlow(student, teachers, flow_points=["blocks.0"], channel_dim=1)  # forced, and wrong
    flow.train()
    with pytest.raises(ZootuneError, match="channels at dim 1"):
        flow(x)
    flow = KnowledgeFlow(*models(), flow_points=["patch"], example_input=x)  # a conv map: channels first
    assert flow.student.patch.channel_dim == 1


def test_default_flow_points_of_a_timm_style_model_come_from_its_feature_info():
    from zootune.methods.knowledge_flow import default_flow_points

    model = TinyViT()
    model.feature_info = [{"module": "patch"}, {"module": "blocks.0"}, {"module": "blocks.1"}]
    assert default_flow_points(model) == ["patch", "blocks.0", "blocks.1"]
    model.feature_info = [{"module": f"blocks.{i % 2}"} for i in range(6)]
    assert len(default_flow_points(model)) == 4  # at most the last four
    del model.feature_info
    with pytest.raises(ZootuneError, match="flow_points"):
        default_flow_points(model)
