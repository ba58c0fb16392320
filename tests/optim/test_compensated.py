"""The compensated (Kahan) update of 16-bit parameters in :class:`CurvatureOptimizer`.

With the identity inverter the optimizer is SGD, so a layer whose gradient is the same on
every step has a closed-form trajectory; it is computed in float64 and compared with the
bf16 parameters after many steps each smaller than half an ulp of the parameter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvkit.errors import ConfigError
from curvkit.optim import KFAC

STEPS = 300
LR = 1e-3


def _layer(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    with torch.no_grad():  # entries of size ~1, so a step of ~1e-3 is below half a bf16 ulp (2⁻⁸)
        layer.weight.copy_(1 + torch.rand(4, 6))
        layer.bias.copy_(1 + torch.rand(4))
    return layer.to(dtype)


def _train(layer: nn.Module, steps: int, **options) -> KFAC:
    opt = KFAC(layer, lr=LR, inverter="identity", **options)
    x = torch.linspace(-1, 1, 12, dtype=layer.weight.dtype).reshape(2, 6)
    c = torch.linspace(0.5, 1.5, 8, dtype=layer.weight.dtype).reshape(2, 4)
    for _ in range(steps):
        opt.zero_grad()
        (layer(x) * c).sum().backward()  # the same gradient on every step
        opt.step()
    return opt


def _exact(layer16: nn.Module, steps: int, momentum: float, wd: float) -> list[torch.Tensor]:
    """The float64 recursion from the bf16 start and the bf16 gradient."""
    probe = copy.deepcopy(layer16)
    x = torch.linspace(-1, 1, 12, dtype=probe.weight.dtype).reshape(2, 6)
    c = torch.linspace(0.5, 1.5, 8, dtype=probe.weight.dtype).reshape(2, 4)
    (probe(x) * c).sum().backward()
    out = []
    for p in probe.parameters():
        theta, g, buf = p.detach().double(), p.grad.double(), None
        for _ in range(steps):
            theta = theta * (1 - LR * wd)
            buf = g.clone() if buf is None else momentum * buf + g
            theta = theta - LR * (buf if momentum else g)
        out.append(theta)
    return out


@pytest.mark.parametrize(("momentum", "wd"), [(0.0, 0.0), (0.0, 0.1)])
def test_bf16_parameters_follow_the_exact_recursion(momentum, wd):
    start = _layer(torch.bfloat16)
    exact = _exact(start, STEPS, momentum, wd)
    options = {"momentum": momentum, "weight_decay": wd, "weight_decay_mode": "decoupled"}
    on, off = copy.deepcopy(start), copy.deepcopy(start)
    _train(on, STEPS, **options)
    _train(off, STEPS, kahan_sum=False, **options)
    ulp = 2.0**-7  # bf16 spacing on [1, 2) (8 significant bits)
    for p_on, p_off, ref in zip(on.parameters(), off.parameters(), exact):
        assert p_on.dtype == torch.bfloat16
        err_on = float((p_on.detach().double() - ref).abs().max())
        err_off = float((p_off.detach().double() - ref).abs().max())
        assert err_on <= ulp, f"compensated bf16 update is {err_on:.3g} from the float64 recursion (ulp {ulp})"
        # without compensation the steps (≈ 1e-3 < ulp / 2) are rounded away: the test can fail
        assert err_off > 10 * ulp, err_off


def test_momentum_buffer_stays_in_the_parameters_dtype_and_the_error_is_carried():
    layer = _layer(torch.bfloat16)
    opt = _train(layer, 5, momentum=0.9)
    for p in layer.parameters():
        state = opt.state[p]
        assert state["momentum_buffer"].dtype == torch.bfloat16
        assert state["kahan_comp"].dtype == torch.bfloat16 and state["kahan_comp"].abs().sum() > 0


def test_float32_parameters_are_untouched_by_the_flag():
    a, b = _layer(torch.float32), _layer(torch.float32)
    opt = _train(a, 20, momentum=0.9)
    _train(b, 20, momentum=0.9, kahan_sum=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        assert "kahan_comp" not in opt.state[p]


def test_resume_with_the_carried_error_is_bit_exact():
    ref, resumed = _layer(torch.bfloat16), _layer(torch.bfloat16)
    opt = _train(ref, 5, momentum=0.9)
    saved = copy.deepcopy(opt.state_dict())
    snapshot = copy.deepcopy(ref.state_dict())
    x = torch.linspace(-1, 1, 12, dtype=torch.bfloat16).reshape(2, 6)
    c = torch.linspace(0.5, 1.5, 8, dtype=torch.bfloat16).reshape(2, 4)

    def more(layer, opt):
        for _ in range(7):
            opt.zero_grad()
            (layer(x) * c).sum().backward()
            opt.step()

    more(ref, opt)
    resumed.load_state_dict(snapshot)
    opt2 = KFAC(resumed, lr=LR, inverter="identity", momentum=0.9)
    opt2.load_state_dict(saved)
    more(resumed, opt2)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_bad_flag_is_named():
    with pytest.raises(ConfigError, match="kahan_sum='yes'"):
        KFAC(_layer(torch.float32), kahan_sum="yes")  # type: ignore[arg-type]
