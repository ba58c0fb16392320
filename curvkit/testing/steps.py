"""Conformance of a method under the step options the core applies around its blocks.

* :func:`check_statistics_period`: with statistics every 2 steps (the schedule's
  ``statistics_period`` field, ``T_stats`` for most methods) and a refresh every 3, the
  method trains, each block is updated exactly on the statistics steps (the core counts),
  and stale statistics and inverses between them do no harm;
* :func:`check_weight_decay_modes`: every ``weight_decay_mode``
  (:data:`~curvkit.optim.options.WEIGHT_DECAY_MODES`) trains; on the first step
  ``"after"`` and ``"decoupled"`` move the parameters exactly as the core's rule says
  from the step without decay (the block's direction must not depend on the decay), and
  ``"before"`` preconditions the decayed gradient (a different, finite step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from curvkit.methods import MethodSpec

__all__ = ["check_statistics_period", "check_weight_decay_modes"]


def check_statistics_period(
    method: str | MethodSpec, *, registry: Any = None, period: int = 2, steps: int = 24, lr: float = 0.05
) -> None:
    """Statistics every ``period`` steps (and a refresh every ``period + 1`` where the method
    has a refresh period): each block is updated on exactly the statistics steps, and the
    full-batch loss falls to at most 80% of its start with finite parameters."""
    from curvkit.testing.methods import _full_loss, _make, _mlp, _spec, _task, _train

    spec = _spec(method, registry)
    fields = spec.schedule.fields()
    if "statistics_period" not in fields:
        return  # statistics every step: nothing to check
    options = dict(spec.sample_configs[0])
    options[fields["statistics_period"]] = period
    if "refresh_period" in fields:
        options[fields["refresh_period"]] = period + 1
    torch.manual_seed(0)
    model = _mlp()
    X, y = _task("mlp", torch.Generator(device="cpu").manual_seed(5))
    before = _full_loss(model, X, y)
    opt = _make(spec, model, options, registry, lr)
    _train(opt, model, X, y, steps)
    after = _full_loss(model, X, y)
    expected = math.ceil(steps / period)
    counts = {name: block.num_updates for name, block in opt.preconditioner.blocks.items()}
    wrong = {name: n for name, n in counts.items() if n != expected}
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    problems = []
    if wrong:
        problems.append(
            f"blocks updated {wrong} times, expected {expected} (statistics on steps 0, {period}, ...; the core counts "
            "the updates a block accepts: a block that also increments num_updates itself, or declines batches, "
            "shows here)"
        )
    if not finite or not after <= 0.8 * before:
        problems.append(
            f"full-batch loss {before:.4f} -> {after:.4f} after {steps} steps (finite parameters: {finite})"
        )
    if problems:
        raise AssertionError(f"method {spec.name!r} with {options!r}: " + "; ".join(problems) + ".")


def _one_step(spec: MethodSpec, registry: Any, options: dict[str, Any], **step: Any) -> tuple[list[Any], list[Any]]:
    """Parameters before and after one step of a fresh MLP (momentum off, no trust region)."""
    from curvkit.optim.optimizer import CurvatureOptimizer
    from curvkit.testing.methods import _mlp, _task

    torch.manual_seed(0)
    model = _mlp().double()
    X, y = _task("mlp", torch.Generator(device="cpu").manual_seed(6), n=32)
    opt = CurvatureOptimizer(
        model, method=spec, loss_fn=nn.CrossEntropyLoss(), registry=registry, recommended=False, **step, **options
    )
    start = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    out = model(X.double())
    loss = nn.functional.cross_entropy(out, y)
    opt.curvature_backward(out, y)
    loss.backward()
    opt.step()
    return start, [p.detach().clone() for p in model.parameters()]


def check_weight_decay_modes(
    method: str | MethodSpec, *, registry: Any = None, weight_decay: float = 0.1, lr: float = 0.05
) -> None:
    """Every weight-decay mode: the first step against the core's rule (float64), then a
    short run that must lower the loss (see the module docstring)."""
    from curvkit.optim.options import WEIGHT_DECAY_MODES
    from curvkit.testing.methods import _full_loss, _make, _mlp, _spec, _task, _train

    spec = _spec(method, registry)
    options = dict(spec.sample_configs[0])
    start, plain = _one_step(spec, registry, options, lr=lr)
    rules = {
        "after": lambda t0, t1: t1 - lr * weight_decay * t0,  # Δ + γθ
        "decoupled": lambda t0, t1: t1 - lr * weight_decay * t0,  # θ(1 − ηγ) − ηΔ
    }
    for mode in WEIGHT_DECAY_MODES:
        _, moved = _one_step(spec, registry, options, lr=lr, weight_decay=weight_decay, weight_decay_mode=mode)
        rule = rules.get(mode)
        for i, (t0, t1, got) in enumerate(zip(start, plain, moved)):
            if not bool(torch.isfinite(got).all()):
                raise AssertionError(f"method {spec.name!r}: weight_decay_mode={mode!r} left parameter {i} non-finite.")
            if rule is None:
                continue
            want = rule(t0, t1)
            err = float((got - want).abs().max())
            if not err <= 1e-9 * max(1.0, float(want.abs().max())):
                raise AssertionError(
                    f"method {spec.name!r}: the first step with weight_decay_mode={mode!r} (γ={weight_decay}) moves "
                    f"parameter {i} {err:.3g} away from the step without decay plus the decay term; the block's "
                    "direction must not depend on the decay (the optimizer adds it)."
                )
        if mode == "before" and all(torch.equal(a, b) for a, b in zip(plain, moved)):
            raise AssertionError(
                f"method {spec.name!r}: weight_decay_mode='before' took the same step as no decay; the decayed "
                "gradient was not preconditioned."
            )
        torch.manual_seed(0)
        model = _mlp()
        X, y = _task("mlp", torch.Generator(device="cpu").manual_seed(7))
        before = _full_loss(model, X, y)
        opt = _make(spec, model, {**options, "weight_decay": 1e-3, "weight_decay_mode": mode}, registry, lr)
        _train(opt, model, X, y, 20)
        after = _full_loss(model, X, y)
        if not after <= 0.8 * before:
            raise AssertionError(
                f"method {spec.name!r} with weight_decay_mode={mode!r}: full-batch loss {before:.4f} -> {after:.4f} "
                "after 20 steps (expected <= 80% of the start)."
            )
