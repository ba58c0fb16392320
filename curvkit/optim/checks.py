"""Build-time and first-step checks of what a method's plugin code returns.

A method's code runs inside the core's step, where a mistake would otherwise surface far
from its cause (a bare ``StopIteration`` from the distribution plan, ``shape '[16, 6]' is
invalid for input of size 105`` from the parameter update). These checks run where the
value is produced and name the method, the layer, what was expected and what came back:

* :func:`check_block`: a block factory must return a
  :class:`~curvkit.blocks.CurvatureBlock` (checked when the optimizer is built);
* :func:`check_directions`: ``precondition(grad)`` must return a tensor of ``grad``'s
  shape (checked on each block's first preconditioned step; afterwards the check costs
  nothing).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["check_block", "check_directions"]


def _layer(info: Any) -> str:
    kind = getattr(getattr(info, "module_type", None), "__name__", "?")
    return f"layer {getattr(info, 'name', '?')!r} ({kind})"


def check_block(method: str, info: Any, block: Any, factory: str = "block_factory") -> Any:
    """Return ``block`` if it is a :class:`~curvkit.blocks.CurvatureBlock`; otherwise
    raise a ``TypeError`` naming the method, the layer and the returned type."""
    from curvkit.blocks import CurvatureBlock

    if isinstance(block, CurvatureBlock):
        return block
    raise TypeError(
        f"method {method!r}: its {factory} returned {type(block).__module__}.{type(block).__qualname__} for "
        f"{_layer(info)}; it must return a curvkit.blocks.CurvatureBlock (e.g. a KroneckerBlock, or a subclass "
        "of CurvatureBlock), or raise curvkit.UnsupportedModuleError to leave the layer to first-order steps."
    )


def check_directions(
    method: str, blocks: dict[str, Any], directions: dict[str, Tensor], grads: dict[str, Tensor], unchecked: set[str]
) -> set[str]:
    """Check the directions of the blocks in ``unchecked`` that preconditioned this step
    against their gradients' shapes; return the names still unchecked.

    Raises:
        TypeError: a block returned something that is not a tensor.
        ValueError: a block returned a tensor of another shape than its gradient (naming
            the method, the layer, the expected and the returned shape).
    """
    done = set()
    for name in unchecked:
        if name not in directions or directions[name] is grads.get(name):
            continue  # not preconditioned this step (no gradient, or first-order until statistics)
        got, want = directions[name], grads[name]
        info = blocks[name].info
        if not isinstance(got, Tensor):
            raise TypeError(
                f"method {method!r}: {type(blocks[name]).__qualname__}.precondition() returned "
                f"{type(got).__qualname__} for {_layer(info)}; it must return a tensor of the gradient's shape "
                f"{list(want.shape)}."
            )
        if got.shape != want.shape:
            raise ValueError(
                f"method {method!r}: {type(blocks[name]).__qualname__}.precondition() returned shape "
                f"{list(got.shape)} for {_layer(info)}; expected the gradient's shape {list(want.shape)} "
                "(d_out, d_in [+1 for the bias column])."
            )
        done.add(name)
    return unchecked - done
