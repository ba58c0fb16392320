r"""Divergence detection for the curvature optimizers.

A :class:`DivergenceMonitor` watches what a step computes anyway and warns **once per
kind** (a :class:`DivergenceWarning`, which names what happened and what to change) when a
run

* has **all its steps skipped**: :data:`SKIP_STREAK` steps in a row changed no parameter
  (non-finite gradients, directions or updates);
* has an **exploding parameter norm**: :math:`\lVert\theta\rVert` above
  :data:`PARAMETER_GROWTH` times its value at the first step (measured every
  :data:`PARAMETER_CHECK_EVERY` steps, one multi-tensor norm);
* has an **exploding gradient**: the running (log-average) norm of the tracked layers'
  gradients above :data:`GRADIENT_GROWTH` times its value over the first steps (the norms
  are the guard's reductions, no extra work);
* has an **exploding loss**, when ``step(closure)`` returns one: a non-finite loss, or one
  above :data:`LOSS_GROWTH` times the lowest seen.

Its counters (plain values) are saved in the optimizer's ``state_dict`` and shown by
``summary()``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GRADIENT_GROWTH",
    "LOSS_GROWTH",
    "PARAMETER_CHECK_EVERY",
    "PARAMETER_GROWTH",
    "SKIP_STREAK",
    "DivergenceMonitor",
    "DivergenceWarning",
]

#: Consecutive skipped steps that count as "every step is being skipped".
SKIP_STREAK = 10
#: Parameter-norm growth over the first step's norm that counts as divergence.
PARAMETER_GROWTH = 1e3
#: The parameter norm is measured every this many applied steps.
PARAMETER_CHECK_EVERY = 10
#: Gradient-norm growth (running log-average over the first steps' average) that counts as divergence.
GRADIENT_GROWTH = 1e4
#: Loss growth over the lowest loss seen (with ``step(closure)``) that counts as divergence.
LOSS_GROWTH = 1e3
#: Steps whose gradient norms define the gradient's starting level.
_WARMUP = 5


class DivergenceWarning(RuntimeWarning):
    """A curvature optimizer's run is diverging (see :class:`DivergenceMonitor`)."""


class DivergenceMonitor:
    """Watches one optimizer's steps (see the module docstring).

    Args:
        describe: Returns a line naming the optimizer's current settings (learning rate,
            damping, trust region) for the warnings.
    """

    def __init__(self, describe: Any) -> None:
        self._describe = describe
        self.state: dict[str, Any] = {
            "applied_steps": 0,
            "skip_streak": 0,
            "longest_skip_streak": 0,
            "initial_param_norm": None,
            "last_param_norm": None,
            "initial_log_grad": None,
            "log_grad": None,
            "min_loss": None,
            "warnings": [],  # the kinds warned about, in order
        }

    # --- events -------------------------------------------------------------------------

    def skipped(self, step: int, counters: dict[str, Any]) -> None:
        s = self.state
        s["skip_streak"] += 1
        s["longest_skip_streak"] = max(s["longest_skip_streak"], s["skip_streak"])
        if s["skip_streak"] >= SKIP_STREAK:
            reasons = ", ".join(
                f"{counters.get(k, 0)} {label}"
                for k, label in (
                    ("nonfinite_gradients", "non-finite gradients"),
                    ("outlier_gradients", "outlier gradients"),
                    ("nonfinite_directions", "non-finite directions"),
                    ("nonfinite_updates", "non-finite updates"),
                )
                if counters.get(k, 0)
            )
            self._warn(
                "skipped",
                f"the last {s['skip_streak']} steps (up to step {step}) were all skipped "
                f"({reasons or 'see counters'}); "
                "the parameters have not changed since. Non-finite gradients usually mean a non-finite loss: check "
                "the inputs and targets for NaN/inf, lower the learning rate, or raise the damping.",
            )

    def applied(self, grad_norms_sq: dict[str, float], params: list[Tensor]) -> None:
        s = self.state
        s["skip_streak"] = 0
        s["applied_steps"] += 1
        total = sum(grad_norms_sq.values())
        if total > 0 and math.isfinite(total):
            log_g = 0.5 * math.log(total)
            if s["log_grad"] is None:
                s["log_grad"] = log_g
            else:
                s["log_grad"] = 0.9 * s["log_grad"] + 0.1 * log_g
            if s["applied_steps"] <= _WARMUP:
                s["initial_log_grad"] = s["log_grad"]
            elif s["initial_log_grad"] is not None and s["log_grad"] > s["initial_log_grad"] + math.log(
                GRADIENT_GROWTH
            ):
                self._warn(
                    "gradient",
                    f"the gradient norm grew from about {math.exp(s['initial_log_grad']):.3g} (first steps) to about "
                    f"{math.exp(s['log_grad']):.3g}: the loss is probably exploding. Lower the learning rate or "
                    "raise the damping, and keep the trust region on (kl_clip / rms_clip / grad_ratio_clip).",
                )
        if params and (s["applied_steps"] == 1 or s["applied_steps"] % PARAMETER_CHECK_EVERY == 0):
            self._check_parameters(params)

    def loss(self, value: Any) -> None:
        if value is None:
            return
        try:
            v = float(value)
        except (TypeError, ValueError, RuntimeError):
            return
        s = self.state
        if not math.isfinite(v):
            self._warn(
                "loss",
                f"the loss returned by the closure is {v}: lower the learning rate, raise the damping, or check the "
                "data for NaN/inf (steps with non-finite gradients are skipped).",
            )
            return
        if s["min_loss"] is None or v < s["min_loss"]:
            s["min_loss"] = v
        elif s["min_loss"] > 0 and v > LOSS_GROWTH * s["min_loss"]:
            self._warn(
                "loss",
                f"the loss grew to {v:.4g}, {v / s['min_loss']:.3g}× the lowest seen ({s['min_loss']:.4g}): the run "
                "is diverging. Lower the learning rate or raise the damping, and keep the trust region on.",
            )

    # --- internals ------------------------------------------------------------------------

    def _check_parameters(self, params: list[Tensor]) -> None:
        s = self.state
        norms = torch._foreach_norm([p.detach() for p in params])
        norm = float(torch.linalg.vector_norm(torch.stack([n.double() for n in norms])))
        s["last_param_norm"] = norm
        if s["initial_param_norm"] is None:
            s["initial_param_norm"] = norm
            return
        start = s["initial_param_norm"]
        if not math.isfinite(norm) or (start > 0 and norm > PARAMETER_GROWTH * start):
            self._warn(
                "parameters",
                f"the parameter norm grew from {start:.4g} (first step) to {norm:.4g} after {s['applied_steps']} "
                "steps: the run is diverging. Lower the learning rate or raise the damping, and keep the trust region "
                "on (kl_clip / rms_clip / grad_ratio_clip).",
            )

    def _warn(self, kind: str, message: str) -> None:
        if kind in self.state["warnings"]:
            return
        self.state["warnings"].append(kind)
        warnings.warn(f"{message} [{self._describe()}]", DivergenceWarning, stacklevel=4)

    # --- reporting and checkpoints ----------------------------------------------------------

    def describe(self) -> str:
        """One line for ``summary()``."""
        s = self.state
        warned = ", ".join(s["warnings"]) if s["warnings"] else "none"
        norm = s["last_param_norm"]
        grad = None if s["log_grad"] is None else math.exp(s["log_grad"])
        return (
            f"divergence warnings: {warned}; applied steps {s['applied_steps']}, longest run of skipped steps "
            f"{s['longest_skip_streak']}, parameter norm {'n/a' if norm is None else f'{norm:.4g}'}"
            f" (first step {'n/a' if s['initial_param_norm'] is None else format(s['initial_param_norm'], '.4g')}), "
            f"running gradient norm {'n/a' if grad is None else f'{grad:.4g}'}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.state:
            if k in state:
                v = state[k]
                self.state[k] = list(v) if isinstance(v, list) else v
