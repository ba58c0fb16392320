"""One registry for every kind: inverse kinds (state_dict loading) and dampings (by name in
a configuration) are looked up in the pluggy registry, nowhere else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
import curvkit.linalg.inverters as inverters
import curvkit.optim
from curvkit.errors import ConfigError, UnknownComponentError
from curvkit.linalg import ExactDamping, LevenbergMarquardtDamping
from curvkit.linalg.inverters import FactoredInverse, KroneckerInverse, inverse_from_state, inverse_state
from curvkit.registry import active_registry, using_registry


def test_no_side_table_of_inverse_kinds():
    assert not hasattr(inverters, "_INVERSE_KINDS")
    assert "__init_subclass__" not in vars(KroneckerInverse)


def test_bundled_inverse_kinds_are_registered_by_their_plugins():
    registry = curvkit.default_registry()
    assert {k: registry.inverses.plugin_of(k) for k in ("factored", "eigen", "identity")} == dict.fromkeys(
        ("factored", "eigen", "identity"), "curvkit"
    )
    assert {registry.inverses.plugin_of(k) for k in ("lowrank", "lowrank-eigen", "woodbury")} == {"lowrank"}


def test_a_plugin_inverse_is_found_only_through_its_registry():
    class Scaled(KroneckerInverse):
        kind = "test-scaled"

        def __init__(self, c: torch.Tensor) -> None:
            self.c = c

        def apply(self, grad):
            return grad * self.c

        def tensors(self):
            return {"c": self.c}

        @classmethod
        def from_tensors(cls, tensors):
            return cls(tensors["c"])

    class Plugin:
        @curvkit.hookimpl
        def curvkit_register_inverses(self, register):
            register.add(Scaled)

    state = inverse_state(Scaled(torch.tensor(2.0)))
    with pytest.raises(
        ValueError, match=r"unknown inverse kind 'test-scaled'.*registered: .*factored.*register_inverses"
    ):
        inverse_from_state(state)  # defined, but registered nowhere
    registry = curvkit.build_registry(autoload=False, plugins=[("scaled", Plugin())])
    assert registry.inverses.plugin_of("test-scaled") == "scaled"
    assert isinstance(inverse_from_state(state, registry=registry), Scaled)
    with using_registry(registry):
        assert active_registry() is registry
        assert inverse_from_state(state).apply(torch.ones(2)).tolist() == [2.0, 2.0]
    assert active_registry() is curvkit.default_registry()


def test_state_dict_round_trip_finds_the_inverse_in_the_preconditioners_registry():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = curvkit.optim.create("kfac", model, damping=0.1, recommended=False)
    nn.functional.cross_entropy(model(torch.randn(8, 3)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    state = opt.state_dict()
    assert state["curvkit"]["blocks"]["0"]["inverse_kind"] == "factored"
    opt.load_state_dict(state)
    assert isinstance(opt.preconditioner.blocks["0"].inverse, FactoredInverse)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def test_dampings_by_name_resolve_through_the_registry():
    opt = curvkit.optim.create("kfac", _model(), damping="exact", inverter="eigh")
    assert opt.preconditioner.damping == ExactDamping()
    opt = curvkit.optim.create("kfac", _model(), damping={"name": "levenberg-marquardt", "initial": 10.0})
    assert opt.preconditioner.damping == LevenbergMarquardtDamping(initial=10.0)
    assert opt.config.damping == LevenbergMarquardtDamping(initial=10.0)
    # a plugin's damping by name (the low-rank plugin's equal split)
    opt = curvkit.optim.create("skfac", _model(), damping={"name": "equal-split", "value": 0.05})
    assert type(opt.preconditioner.damping).__name__ == "EqualSplitDamping"


def test_bad_damping_names_and_options_are_named():
    with pytest.raises(UnknownComponentError, match=r"unknown damping strategy 'pie'.*Did you mean 'pi'"):
        curvkit.optim.create("kfac", _model(), damping="pie")
    with pytest.raises(
        ConfigError, match=r"damping=\{'name': 'pi', 'valu': 1\}.*options of PiDamping \('pi'\) are value"
    ):
        curvkit.optim.create("kfac", _model(), damping={"name": "pi", "valu": 1})
    with pytest.raises(ConfigError, match=r"damping=\{'name': 'pi', 'value': -1\}: value=-1 must be"):
        curvkit.optim.create("kfac", _model(), damping={"name": "pi", "value": -1})
    with pytest.raises(ConfigError, match=r"damping=\[1\] must be a damping strategy"):
        curvkit.optim.create("kfac", _model(), damping=[1])


def test_a_name_is_resolved_in_the_given_registry_only():
    import curvkit_kfac

    registry = curvkit.build_registry(autoload=False, plugins=[("kfac", curvkit_kfac)])
    with pytest.raises(UnknownComponentError, match="'equal-split'"):
        curvkit.optim.create("kfac", _model(), damping="equal-split", registry=registry)
