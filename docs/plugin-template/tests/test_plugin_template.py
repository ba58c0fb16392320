"""The template plugin is found through its entry point, and its handler is correct.

Correctness is checked against a reference someone else wrote: curvkit's own ``nn.Linear``
handler on the same network with the weights copied transposed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch
from curvkit_plugin_template import TransposedLinear, TransposedLinearHandler
from curvkit_plugin_template import plugin as template_plugin
from torch import nn

import curvkit

PLUGIN = "plugin_template"  # the entry-point name in pyproject.toml


def test_handler_is_registered_through_the_entry_point():
    registry = curvkit.default_registry()
    assert PLUGIN in registry.plugins
    assert "transposed_linear" in registry.layer_handlers
    assert registry.layer_handlers.plugin_of("transposed_linear") == PLUGIN
    assert isinstance(registry.handler_for(TransposedLinear(3, 2)), TransposedLinearHandler)
    assert not isinstance(registry.handler_for(nn.Linear(3, 2)), TransposedLinearHandler)


def test_block_list_removes_it():
    registry = curvkit.build_registry(block=[PLUGIN])
    assert PLUGIN in registry.blocked and "transposed_linear" not in registry.layer_handlers


def test_curvkit_plugins_command_shows_it():
    script = shutil.which("curvkit") or str(__import__("pathlib").Path(sys.executable).with_name("curvkit"))
    out = subprocess.run([script, "plugins"], capture_output=True, text=True, check=True, timeout=300).stdout
    assert re.search(rf"^\s+transposed_linear\s+{PLUGIN}\s+TransposedLinear$", out, re.MULTILINE), out


def _twin_models(bias: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ours = nn.Sequential(TransposedLinear(5, 4, bias=bias), nn.Tanh(), TransposedLinear(4, 3, bias=bias)).double()
    plain = nn.Sequential(nn.Linear(5, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3, bias=bias)).double()
    with torch.no_grad():
        for t, lin in ((ours[0], plain[0]), (ours[2], plain[2])):
            lin.weight.copy_(t.weight.T)
            if bias:
                lin.bias.copy_(t.bias)
    return ours, plain


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
def test_factors_equal_those_of_nn_linear(approx, fisher, bias):
    ours, plain = _twin_models(bias)
    X = torch.randn(6, 7, 5, dtype=torch.float64)  # (N, sequence, d_in): weight sharing over 7 positions
    y = torch.randn(6, 7, 3, dtype=torch.float64)
    assert torch.allclose(ours(X), plain(X))

    def factors(model):
        generator = torch.Generator().manual_seed(1) if fisher == "mc" else None
        return curvkit.kronecker_factors(
            model, nn.MSELoss(), X, y, fisher=fisher, kfac_approx=approx, generator=generator
        )

    got, want = factors(ours), factors(plain)
    assert set(got) == set(want) == {"0", "2"}
    for name in want:
        d_in = 5 if name == "0" else 4
        assert got[name].A.shape == (d_in + bias, d_in + bias)
        torch.testing.assert_close(got[name].A, want[name].A, rtol=1e-12, atol=0)
        torch.testing.assert_close(got[name].G, want[name].G, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_kfac_trains_it_like_nn_linear(bias):
    """The handler's weight layout (``weight_matrix``/``weight_from_matrix``) lets curvkit's
    optimizers precondition the transposed weight: K-FAC takes the same steps on
    TransposedLinear as on the equivalent nn.Linear."""
    import curvkit.optim

    ours, plain = _twin_models(bias)
    X = torch.randn(6, 7, 5, dtype=torch.float64)
    y = torch.randn(6, 7, 3, dtype=torch.float64)
    opts = [
        curvkit.optim.KFAC(m, lr=0.1, momentum=0.5, damping=0.05, loss_average="batch+sequence") for m in (ours, plain)
    ]
    for _ in range(4):
        for model, opt in zip((ours, plain), opts):
            opt.zero_grad()
            nn.functional.mse_loss(model(X), y).backward()
            opt.step()
    for t, lin in ((ours[0], plain[0]), (ours[2], plain[2])):
        torch.testing.assert_close(t.weight.T, lin.weight, rtol=1e-10, atol=1e-12)
        if bias:
            torch.testing.assert_close(t.bias, lin.bias, rtol=1e-10, atol=1e-12)


def test_plugin_works_without_installation():
    """A plugin can also be passed explicitly, e.g. in its own tests before it is installed."""
    registry = curvkit.build_registry(autoload=False, plugins=[(PLUGIN, template_plugin)])
    assert registry.layer_handlers.plugin_of("transposed_linear") == PLUGIN
    ours, _ = _twin_models(True)
    X, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    factors = curvkit.kronecker_factors(ours, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=registry)
    assert {name: tuple(f.G.shape) for name, f in factors.items()} == {"0": (4, 4), "2": (3, 3)}
