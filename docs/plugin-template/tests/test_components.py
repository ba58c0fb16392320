"""The template's structure, inverter and method pass curvkit's conformance kit, and the
kit catches the deliberately broken variants in ``curvkit_plugin_template.broken``.

These tests run against the *installed* plugin (``pip install ./docs/plugin-template``),
so they also prove that the entry point registers every component.
"""

from __future__ import annotations

import pytest
import torch
from curvkit_plugin_template import (
    SHAMPOO_SPEC,
    TEMPLATE_KFAC_SPEC,
    NewtonSchulzInverter,
    ScaledIdentityStructure,
    newton_schulz_inverse,
)
from curvkit_plugin_template.broken import UNCHECKED_TEMPLATE_KFAC_SPEC, SwappedEmaScaledIdentity
from torch import nn

import curvkit
import curvkit.optim
from curvkit.linalg import PiDamping
from curvkit.structures import DenseStructure, DiagonalStructure
from curvkit.testing import check_bad_configs, check_inverter, check_method, check_plugin, check_structure

PLUGIN = "plugin_template"


def test_every_component_is_registered_through_the_entry_point():
    registry = curvkit.default_registry()
    for table, name in (
        (registry.structures, ScaledIdentityStructure.name),
        (registry.inverters, NewtonSchulzInverter.name),
        (registry.methods, TEMPLATE_KFAC_SPEC.name),
        (registry.methods, SHAMPOO_SPEC.name),
    ):
        assert table.plugin_of(name) == PLUGIN
    assert curvkit.optim.TemplateShampoo.method == SHAMPOO_SPEC.name  # a named class, from the spec


# --- the conformance kit on the real components -------------------------------------------


def test_structure_conforms():
    check_structure(ScaledIdentityStructure)


def test_inverter_conforms_on_dense_diagonal_and_scaled_identity_factors():
    check_inverter(NewtonSchulzInverter(), structures=(DenseStructure, DiagonalStructure, ScaledIdentityStructure))


def test_method_conforms():
    # trains an MLP and a CNN with each sample config, rejects each bad config by name,
    # resumes bit for bit from a state_dict, and skips a step with a NaN gradient
    check_method(TEMPLATE_KFAC_SPEC.name)


def test_check_plugin_runs_the_kit_over_everything_the_plugin_registered():
    # every method also with statistics every 2 steps, every weight-decay mode, its blocks'
    # operators, and on two data-parallel processes against one on the whole batch
    assert check_plugin(PLUGIN) == {
        "structures": [ScaledIdentityStructure.name],
        "inverters": [NewtonSchulzInverter.name],
        "methods": [TEMPLATE_KFAC_SPEC.name, SHAMPOO_SPEC.name],
    }


# --- the kit catches the broken variants, with a message that names the mistake -----------


def test_the_kit_catches_the_swapped_ema():
    with pytest.raises(AssertionError) as caught:
        check_structure(SwappedEmaScaledIdentity)
    message = str(caught.value)
    assert message.startswith("structure 'template_scaled_identity_swapped_ema': ema_(other, decay=0.7)"), message
    assert "differs from the same operation on dense float64 matrices" in message


def test_the_kit_catches_the_unchecked_option():
    with pytest.raises(AssertionError) as caught:
        check_bad_configs(UNCHECKED_TEMPLATE_KFAC_SPEC)
    message = str(caught.value)
    assert message.startswith(
        "method 'template-kfac-unchecked': bad config {'ns_max_iter': 0} was accepted when the optimizer was built; "
        "expected ConfigError naming 'ns_max_iter'."
    ), message


# --- against references someone else wrote -------------------------------------------------


def test_newton_schulz_inverse_equals_torch_inverse():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(20, 40, dtype=torch.float64, generator=gen)
    m = x @ x.T / 40 + 1e-2 * torch.eye(20, dtype=torch.float64)
    inverse = newton_schulz_inverse(m)
    assert inverse is not None
    torch.testing.assert_close(inverse, torch.linalg.inv(m), rtol=1e-9, atol=1e-9)


def test_newton_schulz_reports_failure_instead_of_a_bad_inverse():
    a = DenseStructure.from_dense(torch.diag(torch.logspace(-3, 3, 8, dtype=torch.float64)))
    assert NewtonSchulzInverter(max_iter=2).prepare(a, a, PiDamping(value=1e-8), 1e-8) is None


def test_scaled_identity_is_the_frobenius_projection():
    gen = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, dtype=torch.float64, generator=gen)
    m = m + m.T
    c = float(ScaledIdentityStructure.from_dense(m).scale)
    # c minimises ||m - c I||_F: the derivative 2 (c d - tr m) vanishes, and nearby scales are worse
    assert c == pytest.approx(float(m.trace()) / 6, rel=1e-14)
    for other in (c - 1e-3, c + 1e-3):
        assert torch.linalg.norm(m - c * torch.eye(6, dtype=torch.float64)) < torch.linalg.norm(
            m - other * torch.eye(6, dtype=torch.float64)
        )


def _train(method: str, **options) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = curvkit.optim.create(method, model, lr=0.1, damping=1e-2, T_inv=1, **options)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_template_kfac_takes_the_steps_of_kfac_with_cholesky(structure):
    """Newton-Schulz and Cholesky invert the same damped factors, so template-kfac and
    curvkit's kfac (same defaults otherwise) take the same steps."""
    ours = _train("template-kfac", structure=structure)
    reference = _train("kfac", structure=structure, inverter="cholesky")
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
