"""One training step of every registered method on the device, in float32 and bf16.

Every sample configuration of every registered method (plugins included; an MC Fisher is
replaced by type-2, since the CPU's and the device's generators draw different targets)
takes one step on a small CNN (Conv2d, Linear) on the device and on the CPU from the same
weights and batch. Checked on the device: parameters, gradients and every optimizer state
tensor larger than a few scalars (factors, inverses, momentum) are on the device, in the
dtype they should be; the parameter update equals the CPU's within the method's own
rounding sensitivity, measured here on the CPU: in float32 at most ``max(1e-4, 10 e32)``
with ``e32`` the relative difference of the float32 and float64 CPU updates, in bf16 at
most ``max(0.05, 3 e16)`` with ``e16`` that of the bf16 and float32 CPU updates.

Also: checkpoints cross devices (a device checkpoint loads on the CPU and a CPU checkpoint
on the device, with the state on the new device and equal to the saved one), and an MC
generator on the wrong device is refused with a clear error.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from _cuda_common import CUDA, DEVICE, ON_CPU, off_device_state, on_device, rel_err, tensors_in
from torch import nn

import curvkit
from curvkit.optim import CurvatureOptimizer

pytestmark = CUDA

REGISTRY = curvkit.default_registry()
CONFIGS = [
    (name, i, dict(options))
    for name in REGISTRY.methods.names()
    for i, options in enumerate(REGISTRY.methods.get(name).sample_configs)
]
IDS = [f"{name}-{i}" for name, i, _ in CONFIGS]
CPU = torch.device("cpu")


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 8), nn.Tanh(), nn.Linear(8, 4)
    )


def _batch(step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(100 + step)
    return torch.randn(32, 1, 6, 6, generator=g, device="cpu"), torch.randint(0, 4, (32,), generator=g, device="cpu")


def _deterministic(options: dict) -> dict:
    options = dict(options)
    if str(getattr(options.get("fisher"), "value", options.get("fisher"))) == "mc":
        options["fisher"] = "type-2"
    return options


def _build(name: str, options: dict, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    model = _model().to(device=device, dtype=dtype)
    opt = CurvatureOptimizer(
        model, method=name, lr=0.1, loss_fn=nn.CrossEntropyLoss(), registry=REGISTRY, **_deterministic(options)
    )
    return model, opt


def _step(model, opt, step: int = 0, check_grads: bool = False) -> None:
    param = next(model.parameters())
    X, y = _batch(step)
    X, y = X.to(device=param.device, dtype=param.dtype), y.to(param.device)
    opt.zero_grad()
    out = model(X)
    loss = nn.functional.cross_entropy(out.float(), y)
    opt.curvature_backward(out, y)
    loss.backward()
    if check_grads:
        for p in model.parameters():
            assert p.grad is not None and p.grad.device == p.device and p.grad.dtype == p.dtype
    opt.step()


def _update(name: str, options: dict, device: torch.device, dtype: torch.dtype):
    model, opt = _build(name, options, device, dtype)
    before = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    _step(model, opt, check_grads=True)
    after = torch.cat([p.detach().double().flatten().cpu() for p in model.parameters()])
    return after - before, model, opt


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bf16"])
@pytest.mark.parametrize(("name", "index", "options"), CONFIGS, ids=IDS)
def test_one_step_on_the_device_equals_the_cpu_step(name, index, options, dtype):
    ours, model, opt = _update(name, options, DEVICE, dtype)
    for p in model.parameters():
        assert on_device(p) and p.dtype == dtype
        assert p.grad is not None and on_device(p.grad) and p.grad.dtype == dtype
    misplaced = off_device_state(opt.state_dict())
    assert not misplaced, f"{name} [{index}]: optimizer state off the device: {misplaced}"
    assert ours.norm() > 0, f"{name} [{index}]: the step did not move the parameters"
    cpu32, *_ = _update(name, options, CPU, torch.float32)
    if dtype == torch.float32:
        cpu64, *_ = _update(name, options, CPU, torch.float64)
        sensitivity = rel_err(cpu32, cpu64)
        expected, tol = cpu32, max(1e-4, 10 * sensitivity)
    else:
        cpu16, *_ = _update(name, options, CPU, torch.bfloat16)
        sensitivity = rel_err(cpu16, cpu32)
        expected, tol = cpu16, max(0.05, 3 * sensitivity)
    err = rel_err(ours, expected)
    assert err <= tol, (
        f"{name} {options} in {dtype}: the device's update differs from the CPU's by {err:.3g} (relative), "
        f"allowed {tol:.3g} (the CPU's own rounding sensitivity: {sensitivity:.3g})"
    )


def _state_equal(a: dict, b: dict) -> list[str]:
    ta, tb = dict(tensors_in(a)), dict(tensors_in(b))
    if set(ta) != set(tb):
        return [f"keys differ: {sorted(set(ta) ^ set(tb))}"]
    return [k for k in ta if not torch.equal(ta[k].cpu(), tb[k].cpu())]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("direction", ["device-to-cpu", "cpu-to-device"])
@pytest.mark.parametrize("name", REGISTRY.methods.names())
def test_a_checkpoint_resumes_on_another_device(name, direction):
    source, target = (DEVICE, CPU) if direction == "device-to-cpu" else (CPU, DEVICE)
    options = dict(REGISTRY.methods.get(name).sample_configs[0])
    model, opt = _build(name, options, source, torch.float32)
    _step(model, opt, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location=target, weights_only=False)
    model2, opt2 = _build(name, options, target, torch.float32)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(copy.deepcopy(saved["opt"]))
    differing = _state_equal(opt2.state_dict(), saved["opt"])
    assert not differing, f"{name}: loaded state differs from the saved one at {differing}"
    moved = [
        f"{path} on {t.device}"
        for path, t in tensors_in(opt2.state_dict())
        if t.is_floating_point() and t.numel() > 4 and t.device.type != target.type
    ]
    assert not moved, f"{name}: state not on {target} after loading: {moved}"
    _step(model2, opt2, 1)
    assert all(bool(torch.isfinite(p).all()) and p.device.type == target.type for p in model2.parameters())


@pytest.mark.skipif(ON_CPU, reason="the CPU stands in for the device: no second device type to mismatch")
def test_an_mc_generator_on_the_cpu_is_refused_for_a_device_model():
    model, X, y = _model().to(DEVICE), *(t.to(DEVICE) for t in _batch())
    with pytest.raises(ValueError, match=r"generator is on cpu .* outputs are on cuda"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="mc", generator=torch.Generator(device="cpu").manual_seed(0)
        )
    opt = CurvatureOptimizer(
        model, method="kfac", fisher="mc", loss_fn=nn.CrossEntropyLoss(), generator=torch.Generator(device="cpu")
    )
    out = model(X)
    with pytest.raises(ValueError, match="torch.Generator"):
        opt.curvature_backward(out, y)


@pytest.mark.parametrize("direction", ["device-to-cpu", "cpu-to-device"])
def test_an_mc_checkpoint_resumes_on_another_device(direction):
    """The MC generator's state (a CPU byte tensor, which ``map_location`` moves) restores
    on the same device type; across CPU and CUDA it cannot, and a new seeded stream starts
    with a warning."""
    source, target = (DEVICE, CPU) if direction == "device-to-cpu" else (CPU, DEVICE)
    options = {"damping": 0.01, "fisher": "mc"}
    torch.manual_seed(0)
    model = _model().to(source)
    opt = CurvatureOptimizer(model, method="kfac", lr=0.1, loss_fn=nn.CrossEntropyLoss(), **options)
    _step(model, opt, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, map_location=target, weights_only=False)
    torch.manual_seed(0)
    model2 = _model().to(target)
    opt2 = CurvatureOptimizer(model2, method="kfac", lr=0.1, loss_fn=nn.CrossEntropyLoss(), **options)
    model2.load_state_dict(saved["model"])
    if source.type != target.type:
        with pytest.warns(UserWarning, match="cannot be restored"):
            opt2.load_state_dict(saved["opt"])
    else:
        opt2.load_state_dict(saved["opt"])
        assert torch.equal(opt2.preconditioner.generator.get_state(), opt.preconditioner.generator.get_state())
    assert opt2.preconditioner.generator.device.type == target.type
    _step(model2, opt2, 1)
    assert all(bool(torch.isfinite(p).all()) for p in model2.parameters())
