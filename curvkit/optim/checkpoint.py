"""A preconditioner's checkpoint (tensors and plain values only, checked before loading) and its
summary (what runs where).

:func:`preconditioner_state` is what ``Preconditioner.state_dict()`` (and the optimizer's
``state_dict()["curvkit"]``) returns: readable with ``torch.load(..., weights_only=True)``,
with each layer's matrix shape so that :func:`check_preconditioner_state` can refuse a
checkpoint of another model (naming the layer and both shapes) before anything changes.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch

from curvkit.optim.guards import COUNTERS, OutlierGates
from curvkit.optim.layers import to_device
from curvkit.registry import using_registry

if TYPE_CHECKING:
    from curvkit.optim.preconditioner import Preconditioner

__all__ = [
    "check_preconditioner_state",
    "load_preconditioner_state",
    "preconditioner_state",
    "preconditioner_summary",
]


def preconditioner_state(pre: Preconditioner) -> dict[str, Any]:
    """Tensors and plain Python values only, so ``torch.load(..., weights_only=True)``
    reads a checkpoint; with each layer's matrix shape ``[d_out, d_in]`` (bias column
    included), which :func:`load_preconditioner_state` checks."""
    return {
        "method": pre.spec.name,
        "steps": pre.steps,
        "damping_value": pre.damping_value,
        "counters": dict(pre.counters),
        "seed": pre.capture.seed,
        "generator": None if pre.generator is None else pre.generator.get_state(),
        "generator_device": None if pre.generator is None else str(pre.generator.device),
        "refreshed": sorted(pre.schedule.refreshed),
        "layer_shapes": {name: [b.info.d_out, b.info.d_in] for name, b in pre.blocks.items()},
        "outlier_gates": pre.gates.state_dict(),
        "blocks": {name: block.state_dict() for name, block in pre.blocks.items()},
    }


def check_preconditioner_state(pre: Preconditioner, state: dict[str, Any]) -> None:
    """Raise ``ValueError`` (changing nothing) unless ``state`` is a
    :func:`preconditioner_state` of this method for layers this model tracks, with the same
    shapes (the message names the layer and both shapes)."""
    if state.get("method") != pre.spec.name:
        raise ValueError(
            f"state_dict is from method {state.get('method')!r}, this preconditioner runs {pre.spec.name!r}."
        )
    unknown = set(state["blocks"]) - set(pre.blocks)
    if unknown:
        raise ValueError(
            f"state_dict has blocks for layers {sorted(unknown)} that this model does not track; "
            f"tracked: {sorted(pre.blocks)}."
        )
    mismatched = []
    for name, shape in state.get("layer_shapes", {}).items():
        info = pre.blocks[name].info
        ours = [info.d_out, info.d_in]
        if list(shape) != ours:
            mismatched.append(
                f"layer {name!r}: the checkpoint's matrix form is {list(shape)} (d_out, d_in incl. bias), "
                f"this model's is {ours}"
            )
    if mismatched:
        raise ValueError(
            "state_dict does not fit this model (saved from a model with the same layer names but other widths?): "
            + "; ".join(mismatched)
        )


def load_preconditioner_state(pre: Preconditioner, state: dict[str, Any]) -> None:
    """Restore :func:`preconditioner_state`'s output, after :func:`check_preconditioner_state`."""
    check_preconditioner_state(pre, state)
    pre.steps = int(state["steps"])
    pre.damping_value = float(state["damping_value"])
    pre.counters = {**COUNTERS, **dict(state["counters"])}
    pre.capture.seed = int(state["seed"])
    if state["generator"] is not None:
        here = next((p.device for p in pre.tracked_parameters()), None)
        saved = torch.device(state["generator_device"])
        if here is not None and saved.type != here.type:
            # CPU and CUDA generator states are not interchangeable: a new stream, seeded
            warnings.warn(
                f"the MC generator was saved on {saved.type} and the model is on {here.type}: its state "
                "cannot be restored there, so MC targets continue from a new seeded stream.",
                stacklevel=2,
            )
            pre.generator = torch.Generator(device=here).manual_seed(pre.capture.seed + pre.steps)
        else:
            if pre.generator is None:
                pre.generator = torch.Generator(device=here if here is not None else saved)
            pre.generator.set_state(state["generator"].cpu())  # map_location may have moved it
    pre.schedule.refreshed = set(state["refreshed"])
    pre.gates = OutlierGates()
    pre.gates.load_state_dict(state.get("outlier_gates", {}))
    pre._last_step_state = None
    for name, block_state in state["blocks"].items():
        # a checkpoint from another device (map_location, or CPU -> CUDA): the layer's device
        device = pre.layers[name].weight.device
        with using_registry(pre.registry):  # inverse kinds are looked up in the preconditioner's registry
            pre.blocks[name].load_state_dict(to_device(block_state, device))


def preconditioner_summary(pre: Preconditioner) -> str:
    """A table of what runs where: one line per tracked layer, plus skipped modules."""
    lines = [f"{pre.spec.name}: {len(pre.blocks)} tracked layer(s), {pre.config!r}"]
    dist = pre.distributor
    if dist.world_size > 1:
        lines.append(f"  distributed: {dist.describe()}")
    for name, block in pre.blocks.items():
        where = ""
        if dist.world_size > 1:
            shared = name in dist.shared_refreshes
            where = f" [refresh on rank {dist.plan[name]}]" if shared else " [refresh on every rank]"
        if name in pre.engine.broadcast:  # (the engine warned, with the fix)
            lines.append(
                f"  {name or '<model>'}: first-order (its module was called on a batch of one and broadcast over "
                "the data, so it has no per-datum statistics; pass its ids expanded to the batch to precondition "
                "it)"
            )
            continue
        pending = "" if block.num_updates else " — no statistics yet, first-order steps until it has some"
        tie = pre.layers[name].describe_sites()
        lines.append(f"  {name or '<model>'}: {block.describe()}{tie}{where}{pending}")
    for name, reason in pre.first_order_layers.items():
        lines.append(f"  {name}: first-order ({reason})")
    for pname, reason in pre.plan.first_order.items():
        lines.append(f"  {pname}: first-order ({reason})")
    # not indented: the indented lines are one per block or parameter
    lines.append(f"guards: {pre.describe_counters()}")
    return "\n".join(lines)
