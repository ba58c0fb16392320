r"""The guard on every write: cheap checks of gradients, directions, updates and statistics,
the outlier gates, and the counters that record what they refused.

Everything here is a **reduction per tensor** — no elementwise pass of its own:

* the gradient of each tracked layer, by :math:`\lVert\nabla_l\rVert^2` (finite only if
  every entry is; :func:`squared_norms`);
* the preconditioned direction, by :math:`\langle\Delta_l, \nabla_l\rangle` (finite only if
  :math:`\Delta_l` is, :math:`\nabla_l` being finite); the KL clip reuses it;
* the parameter update, by a bound of the new parameter and momentum from the norms of
  the parameter, the direction and the old momentum (:func:`update_bound`; the compensated
  16-bit update: :math:`\lVert\theta\rVert + \lVert\text{increment}\rVert`, :func:`updates_fit`),
  below the dtype's largest value;
* the statistics, by the traces of the batch factors
  (:meth:`~curvkit.blocks.CurvatureBlock.batch_magnitudes`; a Gram matrix's trace is finite
  only if every entry is), which also feed the outlier gate (:class:`OutlierGates`), or a
  block's own check (:meth:`~curvkit.blocks.CurvatureBlock.batch_is_finite`).

Only a reduction that is not finite pays for an elementwise check of its tensor (to tell
a non-finite entry from an overflow of finite ones). On a 2-core CPU the guard costs what
the checks it replaced cost (``benchmarks/guard.py``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from curvkit.optim.layers import StepMatrices

__all__ = [
    "COUNTERS",
    "GRADIENT_OUTLIER_RATIO",
    "OUTLIER_PATIENCE",
    "OUTLIER_RATIO",
    "OutlierGates",
    "describe_counters",
    "finite_from_squares",
    "inner_products",
    "squared_norms",
    "update_bound",
    "updates_fit",
]

#: A statistics batch with a part whose magnitude
#: (:meth:`~curvkit.blocks.CurvatureBlock.batch_magnitudes`, e.g. ``tr A_b``) exceeds this
#: multiple of the layer's running magnitude of that part is an outlier: its statistics
#: update is skipped (all layers) and counted.
OUTLIER_RATIO = 1e4
#: A step whose gradient norm (tracked layers) exceeds this multiple of its running norm is
#: skipped as an outlier (counted ``outlier_gradients``), like a non-finite one.
GRADIENT_OUTLIER_RATIO = 1e4
#: After this many consecutive outliers (of either gate) the level is taken as real (a
#: change of the data, not an outlier): the batch is used and the running level restarts
#: from it.
OUTLIER_PATIENCE = 3

#: The preconditioner's counters (plain ints, saved in ``state_dict``).
COUNTERS: dict[str, int] = {
    "skipped_steps": 0,  # steps that changed no parameter (all reasons below)
    "nonfinite_gradients": 0,
    "outlier_gradients": 0,  # gradients far above their running norm (an outlier batch)
    "nonfinite_directions": 0,  # a non-finite (or overflowing) preconditioned direction
    "nonfinite_updates": 0,  # a parameter increment that is not finite or would overflow the parameter
    "skipped_stat_updates": 0,  # statistics batches refused before any block changed (non-finite)
    "outlier_stat_updates": 0,  # statistics batches skipped as outliers
    "accepted_outlier_levels": 0,  # outlier levels taken as real after OUTLIER_PATIENCE in a row
    "empty_steps": 0,  # step() calls without any gradient (nothing done, step counter not advanced)
}

def squared_norms(tensors: list[Tensor]) -> list[float]:
    """``‖x‖²`` of each tensor (one fused multi-tensor reduction), as Python floats."""
    if not tensors:
        return []
    return [n * n for n in torch.stack(torch._foreach_norm(tensors)).tolist()]  # one synchronisation


def gradient_squares(step: StepMatrices) -> dict[str, float]:
    """``{layer: ‖∇_l‖²}`` of a step's gradient matrices, in the layers' order: one
    reduction per stack of equal-shaped layers, one fused reduction for the others."""
    sq: dict[str, float] = {}
    for plan, s in step.stacks:
        sq.update(zip(plan.names, (n * n for n in torch.linalg.vector_norm(s, dim=(1, 2)).tolist())))
    rest = [n for n in step.mats if n not in sq]
    sq.update(zip(rest, squared_norms([step.mats[n] for n in rest])))
    return {n: sq[n] for n in step.mats}


def direction_reductions(
    step: StepMatrices, out: dict[str, Tensor], want_norms: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """``({layer: ⟨Δ_l, ∇_l⟩}, {layer: ‖Δ_l‖²} or {})`` of a step's directions ``out``
    (in ``out``'s order): one reduction per batched call, one per other layer."""
    dots: dict[str, float] = {}
    norms: dict[str, float] = {}
    for b in step.batched:
        assert b.grads is not None
        g = b.grads if b.grads.dtype == b.out.dtype else b.grads.to(b.out.dtype)
        o = b.out.reshape(len(b.names), -1)
        dots.update(zip(b.names, torch.linalg.vecdot(o, g.reshape(len(b.names), -1)).tolist()))
        if want_norms:
            norms.update(zip(b.names, (n * n for n in torch.linalg.vector_norm(o, dim=1).tolist())))
    rest = [n for n in out if n not in dots]
    dots.update(zip(rest, inner_products([(out[n], step.mats[n]) for n in rest])))
    if want_norms:
        rest = [n for n in out if n not in norms]
        norms.update(zip(rest, squared_norms([out[n] for n in rest])))
    return {n: dots[n] for n in out}, norms


def inner_products(pairs: list[tuple[Tensor, Tensor]]) -> list[float]:
    """``⟨x, y⟩`` of each pair (one reduction per pair, no temporary), as Python floats."""
    if not pairs:
        return []
    dots = []
    for x, y in pairs:
        a, b = x.reshape(-1), y.reshape(-1)
        dots.append(torch.dot(a, b if b.dtype == a.dtype else b.to(a.dtype)))
    return torch.stack(dots).tolist() if len(dots) > 1 else [float(dots[0])]  # one synchronisation


def finite_from_squares(squares: list[float], tensors: list[Tensor]) -> bool:
    """Whether every tensor is finite, given their squared norms: a finite ``‖x‖²`` proves
    ``x`` finite; a non-finite one (NaN/inf, or an overflow of finite values) pays for the
    elementwise check of that tensor only."""
    return all(math.isfinite(sq) or bool(torch.isfinite(t).all()) for sq, t in zip(squares, tensors))


def updates_fit(plans: Iterable[tuple[dict[str, Any], list[Tensor], list[Tensor], bool]]) -> bool:
    r"""The guard of the parameter update: for every ``(group, parameters, increments,
    compensated)`` of a step, :math:`\lVert\theta\rVert + \eta\lVert m\rVert` per
    tensor — an upper bound of :math:`\max|\theta| + \eta\max|m|` — must be finite and
    below the parameter dtype's largest value (the increment of a compensated 16-bit update
    already holds :math:`-\eta`), so the update cannot write a non-finite number. One fused
    multi-tensor norm per list."""
    for group, ps, ms, compensated in plans:
        if not ps:
            continue
        scale = 1.0 if compensated else abs(group["lr"])
        shrink = 1.0
        if not compensated and group["weight_decay"] != 0 and group["weight_decay_mode"] == "decoupled":
            shrink = abs(1 - group["lr"] * group["weight_decay"])
        norms = torch._foreach_norm([*ms, *(p.detach() for p in ps)])
        n = len(ps)
        for p, m_norm, p_norm in zip(ps, norms[:n], norms[n:]):
            bound = shrink * float(p_norm) + scale * float(m_norm)
            if not bound < _largest(p.dtype):  # False for NaN too
                return False
    return True


def update_bound(
    group: dict[str, Any],
    ps: list[Tensor],
    ds: list[Tensor],
    states: list[dict[str, Any]],
    known: list[float | None] | None = None,
) -> bool:
    r"""The guard of the in-place SGD update of a group's parameters ``ps`` by the
    directions ``ds`` (their per-parameter ``states`` hold the momentum buffers): with
    :math:`\theta' = s\theta - \eta m'` and :math:`m' = \mu m + \Delta + \gamma_a\theta`
    (:math:`s = 1 - \eta\gamma_d` for decoupled decay, :math:`\gamma_a` the "after" decay,
    :math:`m` absent on a first step), the bounds
    :math:`\lVert m'\rVert \le \mu\lVert m\rVert + \lVert\Delta\rVert + \gamma_a\lVert\theta\rVert`
    and :math:`\max|\theta'| \le |s|\lVert\theta\rVert + \eta\lVert m'\rVert` must be finite
    and below the dtypes' largest values, so the update cannot write a non-finite number.
    One fused multi-tensor norm for the group, before anything is written; ``known``
    (aligned with ``ds``): bounds of ``‖Δ‖`` already computed elsewhere (``None``: take
    the norm here)."""
    if not ps:
        return True
    lr, wd, mu, mode = abs(group["lr"]), group["weight_decay"], group["momentum"], group["weight_decay_mode"]
    shrink = abs(1 - group["lr"] * wd) if wd != 0 and mode == "decoupled" else 1.0
    after = abs(wd) if mode == "after" else 0.0
    bufs = [st.get("momentum_buffer") for st in states] if mu != 0 else [None] * len(states)
    held = [b for b in bufs if b is not None]
    values = ps if not torch.is_grad_enabled() else [p.detach() for p in ps]  # no graph for a norm
    n = len(ps)
    todo = ds if known is None else [d for d, k in zip(ds, known) if k is None]
    norms = torch.stack(torch._foreach_norm([*todo, *values, *held])).tolist()  # one synchronisation
    if known is not None and len(todo) < n:  # put the known bounds of ‖Δ‖ in their places
        computed = iter(norms[: len(todo)])
        norms = [next(computed) if k is None else k for k in known] + norms[len(todo) :]
    top_p, top_m = _largest(ps[0].dtype), _largest(ds[0].dtype)  # one dtype each per bucket
    k_buf = 2 * n
    for k in range(n):
        p_norm = norms[n + k]
        m_norm = norms[k] + after * p_norm
        if bufs[k] is not None:
            m_norm += abs(mu) * norms[k_buf]
            k_buf += 1
        if not (m_norm < top_m and shrink * p_norm + lr * m_norm < top_p):  # NaN: False
            return False
    return True


def _largest(dtype: torch.dtype, _cache: dict[torch.dtype, float] = {}) -> float:  # noqa: B006
    value = _cache.get(dtype)
    if value is None:
        value = _cache[dtype] = float(torch.finfo(dtype).max)
    return value


class OutlierGates:
    """The running levels of the two outlier gates, as plain values (saved in checkpoints).

    * ``gradient``: ``[consecutive outliers, log-average gradient norm or None]``; a step
      whose gradient norm is above :data:`GRADIENT_OUTLIER_RATIO` times the running norm is
      an outlier.
    * ``statistics``: ``{layer: [consecutive outliers, log-average magnitude of each part of
      its batch estimate, or None before the first non-zero one]}``; a batch with a part
      above :data:`OUTLIER_RATIO` times its running magnitude is an outlier.

    The running levels are log-averages with weight 0.9 over accepted values; a zero value
    (an all-zero batch) leaves them alone, so it cannot make every later value look like an
    outlier. :data:`OUTLIER_PATIENCE` outliers in a row are taken as a new level.
    """

    def __init__(self) -> None:
        self.gradient: list[Any] = [0, None]
        self.statistics: dict[str, list[Any]] = {}

    # --- the gradient ---------------------------------------------------------------------

    def gradient_outlier(self, total_sq: float) -> tuple[bool, bool]:
        """``(outlier, accepted as a new level)`` for a step with ``‖∇‖² = total_sq``."""
        level = self.gradient
        if level[1] is None or total_sq <= 0:
            return False, False
        norm = math.sqrt(total_sq) if math.isfinite(total_sq) else math.inf
        if norm <= math.exp(level[1]) * GRADIENT_OUTLIER_RATIO:
            return False, False
        if level[0] + 1 < OUTLIER_PATIENCE:
            level[0] += 1
            return True, False
        level[0], level[1] = 0, None
        return False, True

    def track_gradient(self, total_sq: float) -> None:
        level = self.gradient
        level[0] = 0
        if total_sq > 0 and math.isfinite(total_sq):
            log_norm = 0.5 * math.log(total_sq)
            level[1] = log_norm if level[1] is None else 0.9 * level[1] + 0.1 * log_norm

    # --- the statistics -------------------------------------------------------------------

    def statistics_outliers(self, magnitudes: dict[str, tuple[float, ...]]) -> tuple[list[str], bool]:
        """``(outlier layers, accepted as a new level)`` for a step's batch magnitudes. With
        ``accepted`` false and outliers present, the update is to be skipped (their streaks
        were advanced); with ``accepted`` true their running levels restart."""
        limit = math.log(OUTLIER_RATIO)
        outliers = []
        for name, values in magnitudes.items():
            entry = self.statistics.get(name)
            if entry is None or len(entry) != len(values) + 1:
                continue
            if any(m > 0 and run is not None and math.log(m) > run + limit for m, run in zip(values, entry[1:])):
                outliers.append(name)
        if not outliers:
            return [], False
        if all(self.statistics[n][0] + 1 < OUTLIER_PATIENCE for n in outliers):
            for n in outliers:
                self.statistics[n][0] += 1
            return outliers, False
        for n in outliers:
            del self.statistics[n]
        return outliers, True

    def track_statistics(self, name: str, magnitudes: tuple[float, ...]) -> None:
        entry = self.statistics.get(name)
        if entry is None or len(entry) != len(magnitudes) + 1:
            entry = self.statistics[name] = [0, *([None] * len(magnitudes))]
        entry[0] = 0
        for i, m in enumerate(magnitudes, start=1):
            if m > 0:
                entry[i] = math.log(m) if entry[i] is None else 0.9 * entry[i] + 0.1 * math.log(m)

    # --- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"gradient": list(self.gradient), "statistics": {n: list(v) for n, v in self.statistics.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        level = state.get("gradient", [0, None])
        self.gradient = [int(level[0]), None if level[1] is None else float(level[1])]
        self.statistics = {
            name: [int(v[0]), *(None if x is None else float(x) for x in v[1:])]
            for name, v in state.get("statistics", {}).items()
        }


def describe_counters(steps: int, counters: dict[str, Any], blocks: Iterable[Any]) -> str:
    """The guards' counters in one line (skips by reason, refused and outlier statistics,
    blocks' declined updates and failed decompositions)."""
    c = counters
    reasons = [
        f"{c.get(k, 0)} {label}"
        for k, label in (
            ("nonfinite_gradients", "non-finite gradient"),
            ("outlier_gradients", "outlier gradient"),
            ("nonfinite_directions", "non-finite direction"),
            ("nonfinite_updates", "non-finite update"),
        )
        if c.get(k, 0)
    ]
    blocks = list(blocks)
    declined = sum(int(getattr(b, "skipped_updates", 0)) for b in blocks)
    failures = sum(int(getattr(b, "inverse_failures", 0)) for b in blocks)
    return (
        f"{steps} steps taken, {c.get('skipped_steps', 0)} skipped"
        + (f" ({', '.join(reasons)})" if reasons else "")
        + f"; statistics: {c.get('skipped_stat_updates', 0)} non-finite batches and "
        f"{c.get('outlier_stat_updates', 0)} outlier batches skipped, "
        f"{c.get('accepted_outlier_levels', 0)} new levels accepted, {declined} block updates declined; "
        f"{failures} failed decompositions (last good kept); {c.get('empty_steps', 0)} calls without gradients"
    )
