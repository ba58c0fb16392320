r"""The core's schedule: which step collects statistics, which refreshes, and with what.

A method declares the fields of its schedule (:class:`curvkit.methods.Schedule`);
:class:`StepSchedule` applies them. It counts the **accepted** steps (a skipped step does
not advance it), says when statistics are due (every ``statistics_period`` steps) and which
blocks to refresh (every ``refresh_period`` steps, plus a block's very first refresh, which
is retried on every step until it succeeds), and holds the damping strategy and its
current value λ (adapted by Levenberg–Marquardt damping, :mod:`curvkit.optim.adaptive`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from curvkit.blocks import CurvatureBlock
from curvkit.linalg.damping import Damping
from curvkit.methods import ScheduleValues

__all__ = ["StepSchedule"]


class StepSchedule:
    """Steps, periods, refresh bookkeeping and damping of one preconditioner.

    Attributes:
        values: The method's schedule (periods, EMA decay ρ, damping strategy).
        steps: Accepted steps so far.
        damping_value: The current damping λ.
        refreshed: Blocks that have an inverse of their own (their first refresh worked).
        refresh_counts: Refreshes this process computed, per block (not checkpointed).
    """

    def __init__(self, values: ScheduleValues, names: Iterable[str]) -> None:
        self.values = values
        self.steps = 0
        self.damping_value = values.damping.initial_value() if values.damping is not None else 0.0
        self.refreshed: set[str] = set()
        self.refresh_counts: dict[str, int] = {name: 0 for name in names}

    @property
    def damping(self) -> Damping | None:
        return self.values.damping

    @property
    def ema_decay(self) -> float:
        return self.values.ema_decay

    @property
    def stats_due(self) -> bool:
        """Whether the current step collects statistics."""
        return self.steps % self.values.statistics_period == 0

    @property
    def refresh_due(self) -> bool:
        """Whether the current step refreshes every block."""
        return self.steps % self.values.refresh_period == 0

    def due_refreshes(self, blocks: Mapping[str, CurvatureBlock]) -> list[str]:
        """Blocks to refresh now: all with statistics on a refresh step, and any whose first
        refresh has not worked yet."""
        every = self.refresh_due
        refreshed = self.refreshed
        return [n for n, b in blocks.items() if b.num_updates > 0 and (every or n not in refreshed)]

    def refresh(self, blocks: Mapping[str, CurvatureBlock], name: str) -> None:
        """Refresh one block with the current damping."""
        blocks[name].refresh(self.damping, self.damping_value)  # type: ignore[arg-type]
        self.refresh_counts[name] += 1

    def mark_refreshed(self, due: list[str], blocks: Mapping[str, CurvatureBlock], failures: dict[str, int]) -> None:
        """Record the refreshes that worked (a block whose first refresh failed has no inverse
        of its own yet: it is retried on the next step rather than on the schedule's)."""
        self.refreshed.update(n for n in due if n in self.refreshed or blocks[n].inverse_failures == failures[n])

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "damping_value": self.damping_value, "refreshed": sorted(self.refreshed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.damping_value = float(state["damping_value"])
        self.refreshed = set(state["refreshed"])
