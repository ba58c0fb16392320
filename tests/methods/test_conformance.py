"""The public conformance kit (curvkit.testing) run over every registered component."""

from __future__ import annotations

import pytest

import curvkit
from curvkit import testing

REGISTRY = curvkit.default_registry()
METHODS = REGISTRY.methods.names()


def test_the_bundled_methods_are_registered():
    assert {"kfac"} <= set(METHODS)


@pytest.mark.parametrize("name", REGISTRY.structures.names())
def test_structure_conformance(name):
    testing.check_structure(REGISTRY.structures.get(name))


@pytest.mark.parametrize("name", REGISTRY.inverters.names())
def test_inverter_conformance(name):
    testing.check_inverter(REGISTRY.inverters.get(name))


@pytest.mark.parametrize("name", METHODS)
def test_sample_configs_train(name):
    testing.check_sample_configs_train(name)


@pytest.mark.parametrize("name", METHODS)
def test_bad_configs_raise(name):
    testing.check_bad_configs(name)


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip(name):
    testing.check_state_dict_roundtrip(name)


@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_gradient_skips(name):
    testing.check_nonfinite_gradient_skips(name)


@pytest.mark.parametrize("name", METHODS)
def test_unitwise_layers(name):
    testing.check_unitwise_layers(name)


@pytest.mark.parametrize("name", METHODS)
def test_statistics_period(name):
    testing.check_statistics_period(name)


@pytest.mark.parametrize("name", METHODS)
def test_weight_decay_modes(name):
    testing.check_weight_decay_modes(name)


@pytest.mark.parametrize("name", METHODS)
def test_data_parallel(name):
    testing.check_data_parallel(name)


def test_the_kit_catches_a_broken_structure():
    """A structure whose matmul ignores its off-diagonal part fails with a named message."""
    import torch

    from curvkit.structures import DenseStructure

    class Broken(DenseStructure):
        name = "broken"

        def matmul(self, other):
            return torch.diag(self.matrix.diagonal()).to(other.dtype) @ other

    with pytest.raises(AssertionError, match="'broken'.*matmul"):
        testing.check_structure(Broken)


def test_the_kit_catches_a_state_dict_that_forgets_state():
    """A method whose block drops its inverse from state_dict fails the round trip."""
    from dataclasses import replace

    from curvkit.blocks import KroneckerBlock

    class Forgetful(KroneckerBlock):
        def state_dict(self):
            out = super().state_dict()
            out.pop("A", None)
            out.pop("G", None)
            return out

    spec = REGISTRY.methods.get("kfac")
    broken = replace(
        spec,
        name="forgetful",
        block_factory=lambda info, config, registry: Forgetful(
            info, structure=config.structure_classes(registry), inverter=config.inverter_object(registry)
        ),
    )
    with pytest.raises(AssertionError, match="'forgetful'.*state_dict"):
        testing.check_state_dict_roundtrip(broken, options={"damping": 1e-2, "T_inv": 1})


@pytest.mark.parametrize("name", METHODS)
def test_block_operators(name):
    """Every block's as_operator() satisfies the curvature-operator protocol, each operation
    against a dense float64 reference (curvkit.testing.check_block_operators)."""
    testing.check_block_operators(name)
