r"""Hugging Face's RMSNorm classes (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``,
``GemmaRMSNorm``, ...) as unit-wise blocks.

Every Hugging Face model defines its own RMSNorm class (most are copies of Llama's), so
they share no base class to match. They compute

* Llama style: :math:`y = w \odot \hat x`, ``weight * (x / rms(x)).to(input_dtype)``
  (epsilon ``variance_epsilon``);
* Gemma style: :math:`y = (1 + w) \odot \hat x` (epsilon ``eps``);

with :math:`\hat x = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last dimension. In
both the tensor that multiplies the parameter is :math:`\hat x` (:math:`\partial y / \partial
w = \hat x` for :math:`(1 + w)\hat x` too), so one unit-wise handler
(:class:`curvkit.stats.ScaleShiftHandler`, scale only) serves both.

Matching. The candidates are the classes whose name ends in ``RMSNorm`` defined in the
``transformers.models`` modules already imported (found without importing anything). A
name says nothing certain about a forward pass, so :meth:`HFRMSNormHandler.check` runs the
module once on a probe input (without autograd) and accepts it only if its output equals
:math:`w \odot \hat x` or :math:`(1 + w) \odot \hat x` to the precision of its dtype; any
other module is refused with that reason (its weight takes the first-order rule, or
``unsupported="error"`` raises).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import UnsupportedModuleError
from curvkit.stats import ScaleShiftHandler

__all__ = ["HFRMSNormHandler", "hf_rmsnorm_classes"]

_PREFIX = "transformers.models."
_CACHE: dict[str, Any] = {"key": None, "classes": ()}


def hf_rmsnorm_classes() -> tuple[type[nn.Module], ...]:
    """The ``*RMSNorm`` module classes of the Hugging Face model modules imported so far."""
    modules = [(name, mod) for name, mod in list(sys.modules.items()) if name.startswith(_PREFIX) and mod is not None]
    # the key holds the module objects themselves, so a replaced module cannot be mistaken
    # for its predecessor through a reused id()
    key = tuple(modules)
    cached = _CACHE["key"]
    same = cached is not None and len(cached) == len(key)
    if same and all(a[0] == b[0] and a[1] is b[1] for a, b in zip(cached, key)):
        return _CACHE["classes"]  # type: ignore[no-any-return]
    found: dict[int, type[nn.Module]] = {}
    for name, mod in modules:
        for obj in list(vars(mod).values()):
            if (
                isinstance(obj, type)
                and obj.__name__.endswith("RMSNorm")
                and obj.__module__ == name
                and issubclass(obj, nn.Module)
            ):
                found.setdefault(id(obj), obj)
    classes = tuple(sorted(found.values(), key=lambda c: f"{c.__module__}.{c.__qualname__}"))
    _CACHE.update(key=key, classes=classes)
    return classes


def _eps(module: nn.Module) -> float:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise UnsupportedModuleError(
        f"{type(module).__name__} has no epsilon attribute (variance_epsilon / eps / epsilon); curvkit cannot "
        "recompute its normalised input."
    )


class HFRMSNormHandler(ScaleShiftHandler):
    """Unit-wise blocks for Hugging Face RMSNorm modules (see the module docstring)."""

    name = "hf_rms_norm"
    unit_layout = "last"

    @property  # type: ignore[override]
    def module_types(self) -> tuple[type[nn.Module], ...]:
        return hf_rmsnorm_classes()

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(module))

    def bias(self, module: nn.Module) -> Tensor | None:
        return None  # a scale only

    def check(self, module: nn.Module) -> None:
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 1:
            raise UnsupportedModuleError(
                f"{type(module).__name__} has no 1-D weight; curvkit serves RMSNorm modules with a per-feature scale."
            )
        _eps(module)
        if weight.device.type == "meta":
            return
        style = self.style(module)
        if style is None:
            raise UnsupportedModuleError(
                f"{type(module).__name__}'s forward is neither weight * x̂ nor (1 + weight) * x̂ with x̂ = x / rms(x) "
                "over the last dimension (checked on a probe input), so curvkit does not know its curvature."
            )

    def style(self, module: nn.Module) -> str | None:
        """``"scale"`` (``w · x̂``), ``"offset"`` (``(1 + w) · x̂``) or ``None``: what the
        module's forward computes, from one probe call."""
        weight: Tensor = module.weight  # type: ignore[assignment]
        gen = torch.Generator(device="cpu").manual_seed(0)
        probe = torch.randn(2, 3, weight.shape[0], generator=gen, device="cpu").to(weight.device, weight.dtype)
        with torch.no_grad():
            out = module(probe)
            if isinstance(out, tuple):
                out = out[0]
            if not isinstance(out, Tensor) or out.shape != probe.shape:
                return None
            xhat = self.normalized(module, probe)
            w = weight.to(xhat.dtype)
            tol = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
            for style, expected in (("scale", w * xhat), ("offset", (1 + w) * xhat)):
                if torch.allclose(out.to(expected.dtype), expected, rtol=tol, atol=tol):
                    return style
        return None
