"""Calling a model and finding its logits: tensors, dict inputs, dict / ``ModelOutput`` outputs.

* Inputs: a tensor is passed as ``model(x)``, a mapping as ``model(**x)`` (Hugging Face
  models: ``{"input_ids": ..., "attention_mask": ...}``), a tuple or list as ``model(*x)``.
  The batch size is the targets' first dimension.
* Outputs: a tensor is the logits; a mapping (a ``dict``, or a Hugging Face
  ``ModelOutput``) is looked up at ``"logits"``. Anything else needs ``output_fn``, a
  callable from the model's output to the logits tensor (e.g.
  ``lambda out: out.last_hidden_state @ W``, or ``lambda out: out[0]`` for a tuple).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["batch_size", "call_model", "model_logits"]


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple/list."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    raise TypeError(
        f"inputs must be a tensor, a mapping of keyword arguments (model(**inputs)) or a tuple of positional "
        f"arguments (model(*inputs)); got {type(inputs).__name__}."
    )


def model_logits(output: Any, output_fn: Callable[[Any], Tensor] | None = None) -> Tensor:
    """The logits in a model's output (see the module docstring).

    Raises:
        TypeError: The output is neither a tensor nor a mapping with ``"logits"``, and no
            ``output_fn`` was given (or it returned something else than a tensor).
    """
    if output_fn is not None:
        out = output_fn(output)
        if not isinstance(out, Tensor):
            raise TypeError(f"output_fn returned {type(out).__name__}; it must return the logits tensor.")
        return out
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and isinstance(output["logits"], Tensor):
            return output["logits"]
        raise TypeError(
            f"the model returned a {type(output).__name__} with keys {sorted(map(str, output.keys()))} and no "
            "'logits' tensor; pass output_fn=, a callable that picks the logits from the output "
            "(e.g. output_fn=lambda out: out['scores'])."
        )
    raise TypeError(
        f"the model returned a {type(output).__name__}, not a tensor; pass output_fn=, a callable that picks the "
        "logits from it (e.g. output_fn=lambda out: out[0])."
    )


def batch_size(inputs: Any, targets: Tensor) -> int:
    """``N``: the targets' first dimension (checked against a tensor input's)."""
    n = int(targets.shape[0])
    if isinstance(inputs, Tensor) and (inputs.ndim == 0 or inputs.shape[0] != n):
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must share the leading batch dimension N."
        )
    return n
