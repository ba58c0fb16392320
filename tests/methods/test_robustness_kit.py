"""The robustness kit (curvkit.testing.check_robustness) over every registered method, at its
defaults, and the kit catching what it should."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import curvkit
from curvkit import testing
from curvkit.testing.robustness import EXPECTED_FAILURES, FAULTS

REGISTRY = curvkit.default_registry()
METHODS = REGISTRY.methods.names()
SOUND_FAULTS = [f for f in FAULTS if f not in EXPECTED_FAILURES]  # all of them now


@pytest.mark.parametrize("name", METHODS)
def test_every_method_survives_every_fault(name):
    results = testing.check_robustness(name, faults=SOUND_FAULTS)
    assert [r.fault for r in results] == SOUND_FAULTS
    assert all(r.nonfinite_parameters == 0 and r.nonfinite_state == 0 for r in results)
    assert not any(r.ended_training for r in results)


def test_expected_failures_do_not_raise_but_are_reported(monkeypatch):
    """A fault listed in EXPECTED_FAILURES is reported with its reason, not raised."""
    import curvkit.testing.robustness as kit

    monkeypatch.setitem(kit.EXPECTED_FAILURES, "foreign_params", "a reason")
    monkeypatch.setitem(
        kit.FAULTS,
        "foreign_params",
        lambda spec, options, registry: kit.FaultResult(spec.name, "foreign_params", False),
    )
    (result,) = testing.check_robustness("kfac", faults=["foreign_params"])
    assert not result.passed and result.expected_failure == "a reason"


def test_the_kit_catches_a_method_that_writes_nan():
    """A block that turns every statistics update into NaN (and does not check it): the kit
    names the faults it fails."""
    from curvkit.blocks import KroneckerBlock

    class Poisoned(KroneckerBlock):
        def update(self, stats, decay):
            super().update(stats, decay)
            assert self.A is not None
            self.A.matrix.fill_(float("nan"))

    kfac = REGISTRY.methods.get("kfac")

    def block(info, config, registry):
        return Poisoned(info, structure=config.structure_classes(registry), inverter=config.inverter_object(registry))

    spec = dataclasses.replace(kfac, name="poisoned", block_factory=block)
    results = {r.fault: r for r in testing.robustness_report(spec, faults=["zero_first_batch", "resume_weights_only"])}
    assert not results["zero_first_batch"].passed and results["zero_first_batch"].nonfinite_state > 0
    with pytest.raises(AssertionError, match="'poisoned' failed .* robustness fault"):
        testing.check_robustness(spec, faults=["zero_first_batch"])


def test_failing_decompositions_fail_only_the_chosen_dtypes():
    m = torch.eye(3) * 2
    with testing.failing_decompositions((torch.float32,)) as failed:
        with pytest.raises(torch.linalg.LinAlgError):
            torch.linalg.eigh(m)
        assert int(torch.linalg.cholesky_ex(m)[1]) == 1
        torch.testing.assert_close(torch.linalg.eigh(m.double())[0], torch.full((3,), 2.0, dtype=torch.float64))
    assert failed["eigh"] == 1 and failed["cholesky_ex"] == 1
    torch.linalg.eigh(m)  # restored


def test_unknown_fault_is_refused():
    with pytest.raises(ValueError, match="unknown fault"):
        testing.robustness_report("kfac", faults=["meteor"])


def test_plugin_authors_can_add_options():
    (result,) = testing.check_robustness("kfac", options={"damping": 0.3, "T_inv": 3}, faults=["nonfinite_gradients"])
    assert result.passed

    # an optimizer the kit cannot build is reported, not raised
    (bad,) = testing.robustness_report("kfac", options={"not_an_option": 1}, faults=["batch_size_1"])
    assert not bad.passed and "not_an_option" in bad.detail
