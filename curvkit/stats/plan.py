"""Which modules of a model are tracked, and by which layer handler."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from curvkit.config import UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedModuleError, WeightTyingError

__all__ = ["LayerPlan", "TrackingPlan", "make_plan"]


@dataclass(frozen=True)
class LayerPlan:
    """One tracked module.

    Attributes:
        name: Qualified name in the model (``model.get_submodule(name)``).
        module: The module.
        handler: Its layer handler.
        has_bias: Whether the bias is folded into ``A`` as an appended constant input.
    """

    name: str
    module: nn.Module
    handler: Any
    has_bias: bool

    @property
    def weight(self) -> Tensor:
        return self.handler.weight(self.module)

    @property
    def bias(self) -> Tensor | None:
        return self.handler.bias(self.module) if self.has_bias else None


@dataclass(frozen=True)
class TrackingPlan:
    """The tracked layers of a model and the modules left out.

    Attributes:
        layers: Tracked layers, in ``named_modules`` order.
        skipped: Names of modules with trainable parameters that no handler serves.
    """

    layers: tuple[LayerPlan, ...]
    skipped: tuple[str, ...]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def make_plan(model: nn.Module, registry: Any, unsupported: UnsupportedPolicy | str = "error") -> TrackingPlan:
    """Match every module that owns trainable parameters to a layer handler.

    A module is tracked when a handler serves its type and its weight requires grad; its
    bias is folded in when present and trainable.

    Args:
        model: The model.
        registry: A :class:`~curvkit.registry.Registry` (for the layer handlers).
        unsupported: Policy for modules with trainable parameters and no handler:
            ``"error"`` raises, ``"warn"`` warns and skips, ``"skip"`` skips silently.

    Raises:
        UnsupportedModuleError: Under the ``error`` policy, or when a handler refuses a
            module's configuration (e.g. grouped convolution) under ``error``.
        WeightTyingError: If a trainable parameter belongs to two tracked modules.
    """
    policy = as_enum(UnsupportedPolicy, unsupported, "unsupported")
    layers: list[LayerPlan] = []
    skipped: list[str] = []
    owners: dict[int, str] = {}
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        handler = registry.handler_for(module)
        problem = None
        if handler is None:
            known = sorted(
                {cls.__name__ for n in registry.layer_handlers for cls in registry.layer_handlers.get(n).module_types}
            )
            problem = (
                f"module {name!r} ({type(module).__name__}) has trainable parameters but no layer "
                f"handler; handled types: {', '.join(known)}. Pass unsupported='skip' or 'warn' to "
                "leave it out, or register a layer handler for it in a plugin."
            )
        else:
            try:
                handler.check(module)
            except UnsupportedModuleError as err:
                problem = f"module {name!r}: {err}"
        if problem is None and not handler.weight(module).requires_grad:
            problem = f"module {name!r}: its weight is frozen but its bias is not; freeze both or neither."
        if problem is not None:
            if policy is UnsupportedPolicy.ERROR:
                raise UnsupportedModuleError(problem)
            if policy is UnsupportedPolicy.WARN:
                warnings.warn(f"curvkit skips {problem}", stacklevel=2)
            skipped.append(name)
            continue
        bias = handler.bias(module)
        has_bias = bias is not None and bias.requires_grad
        for p in [handler.weight(module), bias] if has_bias else [handler.weight(module)]:
            if id(p) in owners:
                raise WeightTyingError(
                    f"modules {owners[id(p)]!r} and {name!r} share a parameter (weight tying); "
                    "Kronecker factors of a tied parameter are not the sum of per-module factors, "
                    "so curvkit refuses it. Untie the weights or exclude one module."
                )
            owners[id(p)] = name
        layers.append(LayerPlan(name, module, handler, has_bias))
    return TrackingPlan(tuple(layers), tuple(skipped))
