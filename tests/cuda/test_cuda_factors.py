"""Kronecker factors on the device, for every registered layer handler.

The handlers come from the registry when the tests are collected, so a handler a plugin
adds later is covered as soon as :data:`EXAMPLES` has a small model for its module types;
``test_every_registered_handler_has_an_example`` (which runs on the CPU, in CI) fails
loudly for a handler without one.

On the device (float64, TF32 off): our factors equal curvlinops' ``KFACLinearOperator``
computed on the same device where curvlinops supports every parametrised module (Linear,
Conv2d), for the empirical, MC (the same seeded device generator) and type-2 Fisher and
both approximations; and they equal our CPU factors (which tests/stats checks against
curvlinops and independent references) for the deterministic Fisher types. In float32 and
bf16 on the device they are within float32 / bf16 rounding of the float64 CPU factors.
Normalisation layers give :class:`~curvkit.UnitwiseFactors` ``(F,)`` (one tensor, checked
the same way); their dense float64 ground truth is in tests/stats/test_norms.py.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from _cuda_common import DEVICE, cuda_test, on_device, rel_err
from torch import nn

import curvkit

REGISTRY = curvkit.default_registry()
SEED = 7
#: Modules curvlinops' KFACLinearOperator supports.
CURVLINOPS_MODULES = (nn.Linear, nn.Conv2d)


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def _hf_conv1d() -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    return Conv1D(6, 5)  # nf=6 outputs, nx=5 inputs (GPT-2's transposed linear layer)


def _hf_rms_norm(style: str) -> nn.Module:
    if style == "gemma":
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm as Norm
    else:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm as Norm
    return Norm(6)


@dataclass(frozen=True)
class Example:
    """A small float64 model holding the module type, and its inputs ``(N, ...)``."""

    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], torch.Tensor]
    #: Device vs CPU agreement of deterministic factors; looser for modules that compute
    #: in float32 inside whatever the input's dtype (Hugging Face's RMSNorm classes).
    device_rtol: float = 1e-10


def _seq(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, 4, 5, generator=g, dtype=torch.float64, device="cpu")


def _head(d: int) -> list[nn.Module]:
    return [nn.Tanh(), nn.Flatten(), nn.Linear(d, 3)]


#: Module class (``module.qualname``) -> an example model containing it, ending in 3 logits.
#: Add a line here when you register a handler for a new module type. Besides the core's
#: types, the types the architecture names for future handlers are ready.
EXAMPLES: dict[str, Example] = {
    "torch.nn.modules.linear.Linear": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), *_head(4 * 4)),
        lambda g, n: _seq(n, g),  # (N, T, C): weight sharing over T
    ),
    "torch.nn.modules.conv.Conv1d": Example(
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), *_head(3 * 4)),
        lambda g, n: torch.randn(n, 2, 7, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.conv.Conv2d": Example(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 2, dilation=2), *_head(2 * 3 * 3)
        ),
        lambda g, n: torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.conv.Conv3d": Example(
        lambda: nn.Sequential(nn.Conv3d(2, 3, 2), *_head(3 * 2 * 2 * 2)),
        lambda g, n: torch.randn(n, 2, 3, 3, 3, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.sparse.Embedding": Example(
        lambda: nn.Sequential(nn.Embedding(10, 5, padding_idx=0), nn.Linear(5, 4), *_head(4 * 4)),
        lambda g, n: torch.randint(0, 10, (n, 4), generator=g, device="cpu"),
    ),
    "torch.nn.modules.normalization.LayerNorm": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), *_head(4 * 6)),
        lambda g, n: _seq(n, g),
    ),
    "torch.nn.modules.normalization.RMSNorm": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), *_head(4 * 6)),
        lambda g, n: _seq(n, g),
    ),
    "torch.nn.modules.normalization.GroupNorm": Example(
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), *_head(4 * 5 * 5)),
        lambda g, n: torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.batchnorm.BatchNorm1d": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), *_head(6)),
        lambda g, n: torch.randn(n, 5, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.batchnorm.BatchNorm2d": Example(
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), *_head(4 * 5 * 5)),
        lambda g, n: torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.batchnorm.BatchNorm3d": Example(
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2), *_head(2 * 2 * 2 * 2)),
        lambda g, n: torch.randn(n, 1, 3, 3, 3, generator=g, dtype=torch.float64, device="cpu"),
    ),
    "torch.nn.modules.activation.MultiheadAttention": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), _SelfAttention(), *_head(4 * 6)),
        lambda g, n: _seq(n, g),
    ),
    "transformers.pytorch_utils.Conv1D": Example(
        lambda: nn.Sequential(_hf_conv1d(), *_head(4 * 6)),
        lambda g, n: _seq(n, g),
    ),
    "transformers.models.llama.modeling_llama.LlamaRMSNorm": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), _hf_rms_norm("llama"), *_head(4 * 6)),
        lambda g, n: _seq(n, g),
        device_rtol=1e-5,
    ),
    "transformers.models.gemma.modeling_gemma.GemmaRMSNorm": Example(
        lambda: nn.Sequential(nn.Linear(5, 6), _hf_rms_norm("gemma"), *_head(4 * 6)),
        lambda g, n: _seq(n, g),
        device_rtol=1e-5,
    ),
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _handled_types() -> list[tuple[str, str]]:
    """``(handler name, module class qualname)`` for every registered handler's types."""
    return [
        (name, _qualname(cls))
        for name in REGISTRY.layer_handlers.names()
        for cls in REGISTRY.layer_handlers.get(name).module_types
    ]


HANDLED = _handled_types()
IDS = [f"{h}-{t.rsplit('.', 1)[-1]}" for h, t in HANDLED]


def _case(qualname: str, n: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[str]]:
    """The example's model (float64, CPU), inputs, CE targets, and the names of the modules
    of the example's type."""
    example = EXAMPLES[qualname]
    torch.manual_seed(0)
    model = example.build().double()
    gen = torch.Generator(device="cpu").manual_seed(1)
    X = example.inputs(gen, n)
    y = torch.randint(0, 3, (n,), generator=gen, device="cpu")
    names = [name for name, m in model.named_modules() if _qualname(type(m)) == qualname]
    return model, X, y, names


def _ours(model, X, y, fisher, approx, device):
    gen = torch.Generator(device=device).manual_seed(SEED) if fisher == "mc" else None
    return curvkit.kronecker_factors(
        model, nn.CrossEntropyLoss(), X, y, fisher=fisher, kfac_approx=approx, generator=gen, registry=REGISTRY
    )


def _covers(factors: dict, names: list[str]) -> bool:
    return all(any(k == n or k.startswith(n + ".") for k in factors) for n in names)


def test_every_registered_handler_has_an_example():
    """Runs on the CPU (in CI): a handler registered without an example here fails, and so
    does an example that does not reach its handler."""
    missing = [(h, t) for h, t in HANDLED if t not in EXAMPLES]
    assert not missing, (
        "registered layer handlers without a CUDA example in tests/cuda/test_cuda_factors.py EXAMPLES: "
        + ", ".join(f"handler {h!r} for {t}" for h, t in missing)
        + ". Add a small float64 model containing the module type (ending in 3 logits) and its inputs."
    )
    for handler, qualname in HANDLED:
        model, X, y, names = _case(qualname)
        assert names, f"the example for {qualname} has no module of that type"
        factors = _ours(model, X, y, "type-2", "expand", torch.device("cpu"))
        assert _covers(factors, names), f"handler {handler!r}: no factors for {names} in {sorted(factors)}"


def _curvlinops_applies(model: nn.Module) -> bool:
    return all(
        isinstance(m, CURVLINOPS_MODULES) for m in model.modules() if any(True for _ in m.parameters(recurse=False))
    )


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize(("handler", "qualname"), HANDLED, ids=IDS)
@cuda_test
def test_factors_on_the_device(handler, qualname, fisher, approx):
    if qualname not in EXAMPLES:
        pytest.fail(
            f"handler {handler!r}: no example for {qualname} (see test_every_registered_handler_has_an_example)"
        )
    model, X, y, names = _case(qualname)
    model_dev = copy.deepcopy(model).to(DEVICE)
    ours = _ours(model_dev, X.to(DEVICE), y.to(DEVICE), fisher, approx, DEVICE)
    assert _covers(ours, names)
    for name, entry in ours.items():  # (A, G), or (F,) for a normalisation layer
        assert all(on_device(t) for t in entry), f"{name}: factors on {[t.device for t in entry]}"
        assert all(t.dtype == torch.float64 for t in entry)
    if fisher != "mc":  # MC draws differ between the CPU's and the device's generators
        cpu = _ours(model, X, y, fisher, approx, torch.device("cpu"))
        assert set(cpu) == set(ours)
        for name in cpu:
            for ours_t, cpu_t, which in zip(ours[name], cpu[name], ours[name]._fields):
                assert rel_err(ours_t, cpu_t) < EXAMPLES[qualname].device_rtol, f"{which} of {name!r}: device vs CPU"
    if _curvlinops_applies(model):
        from _reference import assert_factors_close, curvlinops_factors

        ref, _ = curvlinops_factors(
            model_dev, nn.CrossEntropyLoss(), [(X.to(DEVICE), y.to(DEVICE))], fisher=fisher, approx=approx, seed=SEED
        )
        assert all(on_device(t) for pair in ref.values() for t in pair)
        assert_factors_close(ours, ref, rtol=1e-6)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["float32", "bf16"])
@pytest.mark.parametrize(("handler", "qualname"), HANDLED, ids=IDS)
@cuda_test
def test_low_precision_factors_on_the_device(handler, qualname, dtype, tol):
    """float32 / bf16 factors on the device are within their rounding of the float64 CPU
    factors (bf16 on the CPU: about 4e-3 here)."""
    model, X, y, _ = _case(qualname, n=16)
    ref = _ours(model, X, y, "type-2", "expand", torch.device("cpu"))
    low = copy.deepcopy(model).to(device=DEVICE, dtype=dtype)
    Xd = X.to(device=DEVICE, dtype=dtype) if X.is_floating_point() else X.to(DEVICE)
    ours = _ours(low, Xd, y.to(DEVICE), "type-2", "expand", DEVICE)
    for name in ref:
        for ours_t, ref_t, which in zip(ours[name], ref[name], ref[name]._fields):
            assert on_device(ours_t) and ours_t.dtype == dtype
            assert rel_err(ours_t, ref_t) < tol, f"{which} of {name!r} in {dtype}"
