"""Options are checked before any work: unknown names, types and ranges, one exception type."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

from zootune.errors import OptionError, ZootuneError
from zootune.methods.registry import available_methods, get_method
from zootune.options import check_kwargs, parse_config, require


@dataclass
class Example:
    rate: float = 1.0
    steps: int = 3
    mode: Literal["a", "b"] = "a"
    names: list[str] | None = None
    flag: bool = False

    def __post_init__(self):
        require(self.rate > 0, f"rate must be > 0, got {self.rate}")


def test_parse_config_checks_names_types_and_ranges():
    config = parse_config(Example, {"rate": 2, "mode": "b", "names": ["x"], "flag": True}, what="ex")
    assert config.rate == 2.0 and isinstance(config.rate, float) and config.names == ["x"]
    cases = [
        ({"rte": 1.0}, "unknown ex option.*'rte'.*valid: flag, mode, names, rate, steps"),
        ({"rate": "1.0"}, "'rate' must be a number, got '1.0'"),
        ({"steps": 1.5}, "'steps' must be an integer"),
        ({"steps": True}, "'steps' must be an integer"),
        ({"flag": 1}, "'flag' must be true or false"),
        ({"mode": "c"}, "'mode' must be one of 'a', 'b'"),
        ({"names": ["x", 3]}, "'names' must be a list of a string or null"),
        ({"rate": -1}, "ex: rate must be > 0, got -1"),
    ]
    for values, message in cases:
        with pytest.raises(OptionError, match=message):
            parse_config(Example, values, what="ex")


def test_check_kwargs_follows_the_signature():
    def builder(num_classes: int = 10, width: int = 8, scale=1.0, *, name: str = "x"):
        return None

    assert check_kwargs(builder, {"width": 4, "scale": 2}, what="arch") == {"width": 4, "scale": 2.0}
    with pytest.raises(OptionError, match="unknown arch option.*'depth'.*valid: name, num_classes, scale, width"):
        check_kwargs(builder, {"depth": 3}, what="arch")
    with pytest.raises(OptionError, match="'width' must be an integer, got 'wide'"):
        check_kwargs(builder, {"width": "wide"}, what="arch")
    with pytest.raises(OptionError, match="'scale' must be a number"):
        check_kwargs(builder, {"scale": "big"}, what="arch")

    def open_builder(**kwargs):
        return None

    assert check_kwargs(open_builder, {"anything": 1}, what="arch") == {"anything": 1}


def test_every_registered_method_declares_its_options_and_refuses_unknown_ones():
    for name, spec in available_methods().items():
        assert dataclasses.is_dataclass(spec.config), name  # one option system: a dataclass
        assert spec.option_names(), name
        assert spec.layer_types_option is None or spec.layer_types_option in spec.option_names(), name
        with pytest.raises(OptionError, match=f"unknown {name} option"):
            spec.parse_options({"no_such_option": 1})
        spec.parse_options({})  # the defaults are valid


def test_range_checks_of_methods():
    with pytest.raises(OptionError, match="backbone_lr_mult must be >= 0"):
        get_method("finetune").parse_options({"backbone_lr_mult": -1})
    with pytest.raises(OptionError, match="alpha must be in"):
        get_method("distill").parse_options({"alpha": 2.0})
    with pytest.raises(OptionError, match="prune_fraction"):
        get_method("pac-net").parse_options({"prune_fraction": 1.5})
    with pytest.raises(OptionError, match="hub-pathway: variant must be one of"):
        get_method("hub-pathway").parse_options({"variant": "fast"})
    with pytest.raises(OptionError, match="hub-pathway: k must be >= 1"):
        get_method("hub-pathway").parse_options({"k": 0})


def test_every_registered_architecture_declares_options_its_builder_accepts():
    """The option table of each architecture holds the builder's own defaults (a model built with
    them given explicitly has the layout of one built with none), and each name it fixes is one the
    builder refuses itself."""
    from zootune.model_dir import same_layout
    from zootune.models import ARCH_OPTIONS, ARCHITECTURES

    assert set(ARCH_OPTIONS) == set(ARCHITECTURES)
    for name, builder in ARCHITECTURES.items():
        table = ARCH_OPTIONS[name]
        defaults = dataclasses.asdict(table())  # the defaults pass the table's own range checks
        with torch.device("meta"):  # structure only: nothing allocated or initialised
            assert same_layout(builder(**defaults), builder()), name
        for fixed in table.fixed:
            assert fixed not in defaults, (name, fixed)
            with pytest.raises(TypeError):
                builder(**{fixed: None})


def test_the_minizoo_architecture_fixes_what_the_minizoo_builds_with():
    from zootune.minizoo.store import ARCH, ARCH_NAME
    from zootune.models import ARCH_OPTIONS

    assert set(ARCH_OPTIONS[ARCH_NAME].fixed) == set(ARCH) - {"builder"}


def test_an_architecture_registered_without_a_table_is_checked_by_its_signature():
    from zootune.models import ARCH_OPTIONS, ARCHITECTURES, register_architecture, resolve_arch_options

    def tiny(num_classes: int = 2, width: int = 4):
        return torch.nn.Linear(width, num_classes)

    try:
        register_architecture("test_tiny", tiny)
        assert "test_tiny" not in ARCH_OPTIONS
        assert resolve_arch_options("test_tiny", {"width": 3}) == (tiny, {"width": 3})
        with pytest.raises(OptionError, match="unknown architecture 'test_tiny' option.*'depth'"):
            resolve_arch_options("test_tiny", {"depth": 3})
    finally:
        ARCHITECTURES.pop("test_tiny", None)


def test_check_device_says_why_a_device_cannot_be_used(monkeypatch):
    from zootune.engine import check_device

    check_device(None)
    check_device("cpu")
    with pytest.raises(ZootuneError, match="unknown device 'tpu'"):
        check_device("tpu")
    with pytest.raises(ZootuneError, match="cannot train on 'meta' devices"):
        check_device("meta")
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with pytest.raises(ZootuneError, match="CUDA is not available in this torch build"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.4")  # a CUDA build: on a machine without GPUs ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ZootuneError, match="no cuda device is available on this machine"):
        check_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # ... and on one with two
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ZootuneError, match=r"'cuda:5': this machine has 2 cuda device\(s\) \(cuda:0 to cuda:1\)"):
        check_device("cuda:5")
