"""Zoo-Tuning and Lite on real torchvision and timm families (random weights, 32 x 32 images).

For each family: full Zoo-Tuning trains a step (fp32 and under bf16 autocast) and survives a
save/load round trip; Lite trains, folds back into the family's own class, loads strictly into a
fresh instance built by the library with equal outputs, and survives save/load of both forms.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from interop_helpers import CLASSES, FAMILIES, build, family_params, images, labels, make_members, train_step

from zootune.methods.zoo_tuning import ZooTuning, load_folded, save_folded

# Autotuning times every formulation of every layer once; the big families pin one formulation
# (all are exact and tested against a per-sample loop in the main suite) to keep the lane short.
AUTO = {"tv_resnet18", "tv_mobilenet_v3_small", "timm_convnext_atto", "timm_mobilenetv3_small_100"}


@pytest.fixture(scope="module", params=family_params())
def family(request):
    """(name, family, members): built once per family and shared by the tests of this module."""
    spec = FAMILIES[request.param]
    return request.param, spec, make_members(spec)


def zoo_tuning(family, **options) -> ZooTuning:
    name, spec, members = family
    formulation = "auto" if name in AUTO else "grouped"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every family's default targets cover most of its parameters
        model = ZooTuning(members, num_outputs=CLASSES, formulation=formulation, **{**spec.options, **options})
    return model


def test_full_zoo_tuning_trains_and_round_trips(family, tmp_path):
    name, spec, members = family
    model = zoo_tuning(family)
    assert model.report.aggregated_fraction() > 0.5, model.report.summary()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = images(), labels()
    loss = train_step(model, x, y)
    assert torch.isfinite(torch.tensor(loss))
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    model.eval()
    with torch.no_grad():
        expected = model(x)
    model.save_pretrained(tmp_path / "full")
    loaded = ZooTuning.load_pretrained(tmp_path / "full", lambda: build(spec, seed=99)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_full_zoo_tuning_trains_under_bf16_autocast(family):
    model = zoo_tuning(family)
    loss = train_step(model, images(), labels(), autocast=True)
    assert torch.isfinite(torch.tensor(loss))


def test_lite_folds_into_the_family_class_and_loads_strictly(family, tmp_path):
    name, spec, members = family
    model = zoo_tuning(family, lite=True)
    x, y = images(), labels()
    for step in range(2):  # moves the bank, the alignment, the gates' EMA and the norm statistics
        train_step(model, images(seed=step + 1), y)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    plain = model.merge_and_unload()
    assert type(plain) is type(members[0])
    assert [type(m) for _, m in plain.named_modules() if _ != model.config.head_name] == \
        [type(m) for _, m in build(spec, 0, num_classes=CLASSES).named_modules() if _ != model.config.head_name]
    fresh = build(spec, seed=7, num_classes=CLASSES)  # the library's own model with a 3-way head
    fresh.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-4, atol=1e-4)
    # both saved forms give the same outputs back
    save_folded(plain, tmp_path / "folded", head_name=model.config.head_name)
    reloaded = load_folded(tmp_path / "folded", lambda: build(spec, seed=5)).eval()
    model.save_pretrained(tmp_path / "lite")
    lite = ZooTuning.load_pretrained(tmp_path / "lite", lambda: build(spec, seed=6)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), fresh(x), rtol=0, atol=0)
        torch.testing.assert_close(lite(x), expected, rtol=0, atol=0)


@pytest.mark.xfail(strict=False, raises=RuntimeError,
                   reason="Lite's shared kernel mixes the bf16 gate with the fp32 bank under autocast "
                          "(issue 14; fixed in layers/aggregate.py on the AMP branch)")
def test_lite_trains_under_bf16_autocast(family):
    model = zoo_tuning(family, lite=True)
    loss = train_step(model, images(), labels(), autocast=True)
    assert torch.isfinite(torch.tensor(loss))
