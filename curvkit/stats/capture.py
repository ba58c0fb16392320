"""Capture of layer inputs and outputs during a forward pass.

:func:`capture` installs forward hooks on the tracked modules and removes them in
``finally``, whatever happens inside the block. For each tracked layer it records the
input (detached) and the output tensor (still in the autograd graph), so gradients with
respect to layer outputs can be taken afterwards. It refuses a module called twice in one
forward (weight sharing by reuse), and it notices when an in-place operation overwrote a
layer output (``ReLU(inplace=True)``): then :attr:`Capture.outputs_intact` is false and
:meth:`Capture.grad_hooks` must be used instead of differentiating the outputs directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from curvkit.errors import UnsupportedModuleError, WeightTyingError
from curvkit.stats.plan import TrackingPlan

__all__ = ["Capture", "capture"]


@dataclass
class Capture:
    """What a forward pass recorded, by layer name.

    Attributes:
        inputs: Detached layer inputs.
        outputs: Layer outputs (attached to the graph).
        versions: Version counters of the outputs right after they were produced.
        grads: Filled by tensor hooks with gradients w.r.t. layer outputs, when
            ``record_grads`` is on (a list per layer, one entry per backward pass).
    """

    plan: TrackingPlan
    record_grads: bool = False
    inputs: dict[str, Tensor] = field(default_factory=dict)
    outputs: dict[str, Tensor] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    grads: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def outputs_intact(self) -> bool:
        """False if any recorded output was modified in place after it was produced."""
        return all(self.outputs[n]._version == v for n, v in self.versions.items())


@contextmanager
def capture(plan: TrackingPlan, *, record_grads: bool = False) -> Iterator[Capture]:
    """Record inputs and outputs of the tracked layers while the block runs.

    Args:
        plan: The tracked layers.
        record_grads: Also install a tensor hook on every output that appends the
            gradient flowing into it to :attr:`Capture.grads`. Tensor hooks registered at
            production time see the gradient of the output *before* any in-place
            modification, which makes this path safe with in-place activations.

    Raises:
        WeightTyingError: A tracked module ran twice in one forward pass.
    """
    cap = Capture(plan, record_grads)
    handles: list[RemovableHandle] = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, output):  # type: ignore[no-untyped-def]
            if name in cap.inputs:
                raise WeightTyingError(
                    f"module {name!r} ran twice in one forward pass (a module reused at two "
                    "places shares its weight); its Kronecker factors are not defined per use, "
                    "so curvkit refuses it. Use a separate module for each place."
                )
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise UnsupportedModuleError(f"module {name!r} must be called with exactly one tensor input.")
            cap.inputs[name] = args[0].detach()
            cap.outputs[name] = output
            cap.versions[name] = output._version
            if record_grads and output.requires_grad:
                store = cap.grads.setdefault(name, [])
                output.register_hook(lambda g: store.append(g.detach()))

        return hook

    try:
        for layer in plan:
            handles.append(layer.module.register_forward_hook(make_hook(layer.name)))
        yield cap
    finally:
        for handle in handles:
            handle.remove()
