"""The optimizer's own options: their checks and their defaults.

Every option of :class:`~curvkit.optim.CurvatureOptimizer` left out takes the method's
recommended value (:data:`RECOMMENDED` marks "left out"), else :data:`FALLBACK_DEFAULTS`.
:func:`check_group` names every problem of a parameter group; :func:`plainly_valid` is its
fast path for the common case, run at every step (a learning-rate scheduler may set a bad
value between steps).
"""

from __future__ import annotations

import math
from typing import Any

from curvkit.config import check_number

__all__ = [
    "FALLBACK_DEFAULTS",
    "MONITOR_KEY",
    "RECOMMENDED",
    "STATE_KEY",
    "WEIGHT_DECAY_MODES",
    "check_group",
    "plainly_valid",
]

WEIGHT_DECAY_MODES = ("after", "before", "decoupled")
#: Key of the preconditioner's state inside ``optimizer.state_dict()``.
STATE_KEY = "curvkit"
#: Key of the divergence monitor's state inside ``optimizer.state_dict()``.
MONITOR_KEY = "curvkit_monitor"


def check_group(group: dict[str, Any], where: str) -> list[str]:
    out: list[str] = []
    kahan = group.get("kahan_sum", True)
    if not isinstance(kahan, bool):
        out.append(f"{where}kahan_sum={kahan!r} must be True or False (compensated update of 16-bit parameters)")
    check_number(out, f"{where}lr", group["lr"], low=0.0)
    check_number(out, f"{where}momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    check_number(out, f"{where}weight_decay", group["weight_decay"], low=0.0)
    if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
        out.append(
            f"{where}weight_decay_mode={group['weight_decay_mode']!r} must be one of "
            f"{', '.join(map(repr, WEIGHT_DECAY_MODES))}"
        )
    return out


def plainly_valid(group: dict[str, Any]) -> bool:
    """The common case of :func:`check_group`, fast (plain floats in range); anything else
    goes through the full check, which names the problem."""
    lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
    return (
        type(lr) is float
        and type(mu) is float
        and type(wd) is float
        and 0.0 <= lr < math.inf
        and 0.0 <= mu < 1.0
        and 0.0 <= wd < math.inf
        and group["weight_decay_mode"] in WEIGHT_DECAY_MODES
        and type(group.get("kahan_sum", True)) is bool
    )


class _Recommended:
    """Sentinel default of the optimizer's options: the method's recommended value
    (:attr:`~curvkit.methods.MethodSpec.recommended`), or :data:`FALLBACK_DEFAULTS`."""

    def __repr__(self) -> str:
        return "<recommended>"


RECOMMENDED: Any = _Recommended()

#: The optimizer options of a method whose recommended settings do not set them (and of any
#: method with ``recommended=False``): plain SGD steps, no trust region.
FALLBACK_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "weight_decay_mode": "after",
    "kahan_sum": True,
    "kl_clip": None,
    "rms_clip": None,
    "grad_ratio_clip": None,
    "adaptive_step": None,
}
