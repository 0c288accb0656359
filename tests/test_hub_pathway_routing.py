"""Hub-Pathway's generator breaks ties: an untrained or briefly trained generator routes inputs to
different models, not every image to the same two (issue 14: with W_g = 0 every clean logit is 0 and
evaluation's top-k took the lowest indices for every image)."""

import torch
import torch.nn.functional as F

from zootune.methods.hub_pathway import HubPathway
from zootune.models import resnet_small


def test_routing_is_spread_over_the_hub_from_the_first_steps():
    torch.manual_seed(0)
    model = HubPathway([resnet_small(10, width=4) for _ in range(5)], 4, k=2)
    x = torch.randn(64, 3, 32, 32) + 2 * torch.randn(64, 3, 1, 1)  # per-image colour offsets
    y = torch.randint(0, 4, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    counts = [model.route_counts(x)]
    for step in range(4):
        model.train()
        batch = slice(0, 32) if step % 2 == 0 else slice(32, 64)
        out = model(x[batch])
        loss = F.cross_entropy(out, y[batch]) + model.auxiliary_loss(out, y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        counts.append(model.route_counts(x))
    for count in counts:
        assert count.sum() == 64 * 2
        assert (count > 0).sum() >= 3, count.tolist()  # at least 3 of the 5 models receive images
        assert count.max() < 64, count.tolist()  # no model receives every image

    # the zero-initialised gate this replaces: one tie for every input, the same two models for all
    with torch.no_grad():
        model.generator.gate.weight.zero_()
        model.generator.gate.bias.zero_()
    tied = model.route_counts(x)
    assert sorted(tied.tolist()) == [0, 0, 0, 64, 64]
