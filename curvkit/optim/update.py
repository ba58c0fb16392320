r"""The parameter update: weight decay, momentum and the step — ``torch.optim.SGD``'s exact
operations, as multi-tensor (``torch._foreach_*``) calls, with a compensated (Kahan) update
for 16-bit parameters and a guard that refuses an increment that is not finite or could
overflow the parameter (:func:`~curvkit.optim.guards.update_bound`, checked before the
in-place update). ``state`` is the
optimizer's per-parameter state (``momentum_buffer``, ``kahan_comp``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.numerics import compensated_add
from curvkit.optim.guards import update_bound, updates_fit

__all__ = ["apply_updates"]


def apply_updates(
    state: Any,
    params: dict[int, Tensor],
    directions: dict[int, Tensor],
    groups: dict[int, dict[str, Any]],
    scales: dict[int, float] | None = None,
    direction_bounds: dict[int, float] | None = None,
) -> bool:
    """Weight decay (after / decoupled), momentum and the update — SGD's exact operations,
    one multi-tensor call per operation for the parameters of a group that share dtypes.

    ``scales`` (``{id(parameter): factor}``, default 1): the trust region's factors, applied
    to the directions first (one multi-tensor product per group). ``direction_bounds``
    (``{id(parameter): a bound of ‖its direction‖}``, after the scale): norms known already
    (the direction guard's), which the guard then does not take again.

    Guarded before anything is written: one fused norm of the parameters, directions and
    momentum buffers bounds every increment (:func:`~curvkit.optim.guards.update_bound`);
    one that is not finite, or could overflow the parameter, returns ``False`` with
    parameters and momenta untouched. Then the buffers and parameters are updated in place,
    as ``torch.optim.SGD`` does. 16-bit parameters with ``kahan_sum`` take a compensated
    update whose increments are formed out of place and checked exactly
    (:func:`~curvkit.optim.guards.updates_fit`)."""
    buckets: dict[tuple[int, torch.dtype, torch.dtype, torch.device], list[int]] = {}
    for i, d in directions.items():
        p = params[i]
        buckets.setdefault((id(groups[i]), p.dtype, d.dtype, p.device), []).append(i)
    plain: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[dict[str, Any]], list[float | None]]] = []
    compensated: list[tuple[dict[str, Any], list[Tensor], list[Tensor], list[tuple[dict[str, Any], Tensor]]]] = []
    for (_, dtype, _, _), ids in buckets.items():
        group = groups[ids[0]]
        ps = [params[i] for i in ids]
        ds = [directions[i] for i in ids]
        bounds: list[float | None] = [None] * len(ids)
        if scales:
            factors = [scales.get(i, 1.0) for i in ids]
            if any(f != 1.0 for f in factors):
                ds = list(torch._foreach_mul(ds, factors))
        if direction_bounds:
            bounds = [direction_bounds.get(i) if not scales or scales.get(i, 1.0) == 1.0 else None for i in ids]
        if group.get("kahan_sum", True) and dtype in (torch.bfloat16, torch.float16):
            compensated.append((group, ps, *_compensated_plan(state, group, ps, ds)))
        else:
            plain.append((group, ps, ds, [state[p] for p in ps], bounds))
    if not all(update_bound(group, ps, ds, sts, known) for group, ps, ds, sts, known in plain):
        return False
    if compensated and not updates_fit((group, ps, incs, True) for group, ps, incs, _ in compensated):
        return False
    for group, ps, ds, sts, _ in plain:
        _plain_update(group, ps, ds, sts)
    for _, ps, incs, bufs in compensated:
        for st, m in bufs:
            st["momentum_buffer"] = m
        _compensated_commit(state, ps, incs)
    return True


def _plain_update(group: dict[str, Any], ps: list[Tensor], ds: list[Tensor], states: list[dict[str, Any]]) -> None:
    """``torch.optim.SGD``'s operations in place (after the bound was checked)."""
    lr, wd, mu, mode = group["lr"], group["weight_decay"], group["momentum"], group["weight_decay_mode"]
    if wd != 0 and mode == "after":
        ds = list(torch._foreach_add(ds, ps, alpha=wd))
    if mu != 0:
        old = [(st, d) for st, d in zip(states, ds) if st.get("momentum_buffer") is not None]
        for st, d in zip(states, ds):
            if st.get("momentum_buffer") is None:
                st["momentum_buffer"] = torch.clone(d).detach()
        if old:
            bufs = [st["momentum_buffer"] for st, _ in old]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, [d for _, d in old])
        ds = [st["momentum_buffer"] for st in states]
    if wd != 0 and mode == "decoupled":
        torch._foreach_mul_(ps, 1 - lr * wd)
    torch._foreach_add_(ps, ds, alpha=-lr)


def _compensated_plan(
    state: Any, group: dict[str, Any], ps: list[Tensor], ds: list[Tensor]
) -> tuple[list[Tensor], list[tuple[dict[str, Any], Tensor]]]:
    """The out-of-place increments of a compensated 16-bit update and the momentum buffers
    to install once they are checked."""
    lr, wd, mu, mode = group["lr"], group["weight_decay"], group["momentum"], group["weight_decay_mode"]
    if wd != 0 and mode == "after":
        ds = list(torch._foreach_add(ds, ps, alpha=wd))
    bufs: list[tuple[dict[str, Any], Tensor]] = []
    if mu != 0:
        ds, bufs = _momentum(state, ps, ds, mu)
    return _compensated_increments(state, ps, ds, lr, wd if mode == "decoupled" else 0.0), bufs


def _momentum(
    state: Any, ps: list[Tensor], ds: list[Tensor], mu: float
) -> tuple[list[Tensor], list[tuple[dict[str, Any], Tensor]]]:
    """The new buffers ``m ← μ m + Δ`` (``m = Δ`` on a parameter's first step), formed
    out of place: ``(the m's, [(parameter's state, new buffer)] to install once checked)``."""
    out: list[Tensor] = []
    old: list[Tensor] = []
    incs: list[Tensor] = []
    where: list[int] = []
    states = [state[p] for p in ps]
    for k, (st, d) in enumerate(zip(states, ds)):
        buf = st.get("momentum_buffer")
        if buf is None:
            out.append(torch.clone(d).detach())
        else:
            out.append(d)  # placeholder, replaced below
            old.append(buf)
            incs.append(d)
            where.append(k)
    if old:
        new = torch._foreach_mul(old, mu)
        torch._foreach_add_(new, incs)
        for k, m in zip(where, new):
            out[k] = m
    return out, list(zip(states, out))


def _compensated_increments(
    state: Any, ps: list[Tensor], ms: list[Tensor], lr: float, decoupled: float
) -> list[Tensor]:
    """The float32 increments ``−η m − η γ θ`` plus the carried rounding error of 16-bit
    ``θ`` (see :meth:`_compensated_commit`)."""
    out = []
    for p, m in zip(ps, ms):
        inc = m.to(torch.float32, copy=True).mul_(-lr)
        if decoupled:
            inc.add_(p, alpha=-lr * decoupled)
        carried = state[p].get("kahan_comp")
        if carried is not None:  # folded into the (small) increment before it meets θ
            inc.add_(carried)
        out.append(inc)
    return out


def _compensated_commit(state: Any, ps: list[Tensor], incs: list[Tensor]) -> None:
    """``θ ← θ + inc`` for 16-bit ``θ`` with the rounding error carried in
    ``state[θ]["kahan_comp"]`` (:func:`curvkit.numerics.compensated_add`)."""
    for p, inc in zip(ps, incs):
        new, err = compensated_add(p, inc)
        p.copy_(new)
        state[p]["kahan_comp"] = err
