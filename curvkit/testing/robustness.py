r"""The robustness kit: faults every method must survive **at its defaults**.

:func:`check_robustness` builds the method's optimizer as a user would
(:class:`~curvkit.optim.CurvatureOptimizer` with ``method=``, so the spec's recommended
settings apply; ``options=`` adds to them) on a small MLP (64-64-4, ReLU: an outlier input is
not squashed; wide enough that
B-KFAC's Brand update applies) and a synthetic teacher task, and injects each fault of
:data:`FAULTS`:

``nonfinite_gradients``
    a NaN, an +inf and a −inf gradient entry: each step is skipped and counted; parameters
    and optimizer state stay byte-identical; the next finite step trains.
``outlier_1e10``, ``outlier_1e20``
    after 15 steps one batch's inputs are scaled by 10¹⁰ (10²⁰); 25 steps later the
    full-batch loss must be back below its value before the outlier (training goes on).
``zero_first_batch``
    the first batch is all zeros; 30 more steps must lower the loss to ≤ 70 % of the start.
``batch_size_1``
    20 steps on single examples, then 30 normal steps must lower the loss to ≤ 70 % of the
    higher of its values before and after them.
``rank1_input``
    10 steps on a batch whose rows are all the same vector, then 20 normal steps that must
    lower the loss.
``failing_decomposition_float32``
    every decomposition (``cholesky``, ``cholesky_ex``, ``eigh``, ``eigvalsh``, ``qr``,
    ``svd``) fails in float32: the float64 retry must carry training (loss ≤ 70 %).
``failing_decomposition``
    every decomposition fails in every dtype: no exception escapes ``step()``, parameters
    stay finite, the failures are counted (blocks' ``inverse_failures`` /
    ``skipped_updates``) — or no decomposition ran (inverse-free methods).
``nan_lr``
    a NaN (and a negative) learning rate set after construction, as a scheduler might:
    ``step()`` raises :class:`~curvkit.errors.ConfigError` and changes nothing.
``resume_weights_only``
    a checkpoint written with ``torch.save`` and read with ``torch.load(weights_only=True)``
    resumes bit for bit.
``checkpoint_shape_mismatch``
    a checkpoint of a model with the same layer names but other widths is refused by
    ``load_state_dict`` with a message naming the layer.
``foreign_params``
    ``params=`` of another model is refused when the optimizer is built.
``step_without_gradients``
    ``step()`` before any backward does nothing and does not advance the step counter.
``hooks_gone_after_del``
    after ``del optimizer`` and a garbage collection the model carries no hook of it and
    the optimizer is collected.

Every fault also checks that no parameter and no tensor of the optimizer's ``state_dict``
is non-finite. :func:`robustness_report` returns one :class:`FaultResult` per fault (the
table ``benchmarks/robustness.py`` prints); :func:`check_robustness` raises
:class:`AssertionError` naming every failed fault.
"""

from __future__ import annotations

import copy
import gc
import io
import math
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvkit.methods import MethodSpec
from curvkit.testing.fault_run import (
    _BATCH,
    _CLASSES,
    _D_IN,
    _HIDDEN,
    FaultResult,
    _data,
    _finite_checks,
    _model,
    _Run,
    _same_state,
    failing_decompositions,
)

__all__ = [
    "EXPECTED_FAILURES",
    "FAULTS",
    "FaultResult",
    "check_robustness",
    "failing_decompositions",
    "robustness_report",
]


def _fault_nonfinite_gradients(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    run.steps(3)
    result = FaultResult(spec.name, "nonfinite_gradients", True)
    problems = []
    for value in (float("nan"), float("inf"), float("-inf")):
        params = [p.detach().clone() for p in run.model.parameters()]
        state = copy.deepcopy(run.opt.state_dict())
        before = run.counters["skipped_steps"]
        X, y = run.batch()
        run.opt.zero_grad()
        out = run.model(X)
        run.opt.curvature_backward(out, y)
        run.loss_fn(out, y).backward()
        first = next(run.model.parameters())
        assert first.grad is not None
        first.grad.view(-1)[0] = value
        run.opt.step()
        if any(not torch.equal(a, b.detach()) for a, b in zip(params, run.model.parameters())):
            problems.append(f"a {value} gradient changed the parameters")
        if not _same_state(state, run.opt.state_dict()):
            problems.append(f"a {value} gradient changed the optimizer state")
        if run.counters["skipped_steps"] != before + 1:
            problems.append(f"a {value} gradient was not counted in skipped_steps")
    params = [p.detach().clone() for p in run.model.parameters()]
    run.step()
    if all(torch.equal(a, b.detach()) for a, b in zip(params, run.model.parameters())):
        problems.append("the next finite step did not change the parameters")
    result.passed = not problems
    result.detail = "; ".join(problems) or "NaN, +inf, -inf gradients skipped and counted, state byte-identical"
    return _finite_checks(result, run)


def _outlier(scale: float) -> Callable[[MethodSpec, dict[str, Any], Any], FaultResult]:
    def fault(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
        run = _Run(spec, options, registry)
        start = run.loss()
        run.steps(15)
        before = run.loss()
        X, y = run.batch()
        skipped = run.counters["skipped_steps"]
        run.step(X * scale, y)
        after_outlier = run.loss()
        applied = 0
        for _ in range(25):
            s = run.counters["skipped_steps"]
            run.step()
            applied += run.counters["skipped_steps"] == s
        end = run.loss()
        ended = not math.isfinite(end) or end >= before or applied < 10
        result = FaultResult(spec.name, f"outlier_{scale:.0e}".replace("+", ""), not ended, ended_training=ended)
        c = run.counters
        result.detail = (
            f"loss {start:.3f} -> {before:.3f} before the outlier, {after_outlier:.3g} after it, {end:.3f} 25 steps "
            f"later; outlier step skipped: {run.counters['skipped_steps'] > skipped}; outlier statistics skipped: "
            f"{c.get('outlier_stat_updates', 0) + c.get('skipped_stat_updates', 0)}; {applied}/25 later steps applied"
        )
        result.extra = {"loss_before": before, "loss_after_outlier": after_outlier, "loss_end": end}
        return _finite_checks(result, run)

    return fault


def _trains(run: _Run, start: float, steps: int, what: str, result: FaultResult) -> FaultResult:
    """``steps`` normal steps must bring the full-batch loss to ≤ 70 % of ``start``."""
    run.steps(steps)
    end = run.loss()
    ok = math.isfinite(end) and end <= 0.7 * start
    result.passed = result.passed and ok
    result.detail = f"{what}: full-batch loss {start:.3f} -> {end:.3f} after {steps} more steps" + (
        "" if ok else " (expected <= 70% of the start)"
    )
    return _finite_checks(result, run)


def _fault_zero_first_batch(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    start = run.loss()
    X, y = run.batch()
    run.step(torch.zeros_like(X), y)
    return _trains(run, start, 30, "all-zero first batch", FaultResult(spec.name, "zero_first_batch", True))


def _fault_batch_size_1(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    """20 steps on single examples (rank-one statistics; a learning rate meant for batches of
    16 overfits them, so the loss may rise), then 30 normal steps must bring the loss to ≤ 70 %
    of the higher of its values before and after them: the optimizer still trains."""
    run = _Run(spec, options, registry)
    start = run.loss()
    for i in range(20):
        run.step(run.X[i : i + 1], run.y[i : i + 1])
    mid = run.loss()
    result = FaultResult(spec.name, "batch_size_1", math.isfinite(mid))
    return _trains(
        run,
        max(start, mid) if math.isfinite(mid) else start,
        30,
        f"20 steps of batch 1 (loss {start:.3f} -> {mid:.3f})",
        result,
    )


def _fault_rank1_input(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    start = run.loss()
    X, y = run.batch()
    for _ in range(10):
        run.step(X[:1].expand_as(X).clone(), y)
    return _trains(run, start, 20, "10 steps on a rank-1 batch", FaultResult(spec.name, "rank1_input", True))


def _fault_failing_float32(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    start = run.loss()
    result = FaultResult(spec.name, "failing_decomposition_float32", True)
    with failing_decompositions((torch.float32,)) as failed:
        out = _trains(run, start, 25, "float32 decompositions failing", result)
    calls = sum(failed.values())
    failures, _ = run.block_counts()
    out.detail += f"; {calls} float32 decompositions failed and were retried in float64"
    if failures:
        out.passed = False
        out.detail += f"; {failures} refreshes kept the last good inverse (the float64 retry should have worked)"
    return out


def _fault_failing_always(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    result = FaultResult(spec.name, "failing_decomposition", True)
    try:
        with failing_decompositions(None) as failed:
            run.steps(15)
    except Exception as err:  # noqa: BLE001 - an escaping exception is the failure reported
        result.passed = False
        result.detail = f"step() raised {type(err).__name__}: {err}"
        return _finite_checks(result, run)
    calls = sum(failed.values())
    failures, declined = run.block_counts()
    if calls == 0:
        result.detail = "no decomposition ran (an inverse-free method)"
    elif failures + declined == 0:
        result.passed = False
        result.detail = f"{calls} decompositions failed but no failure was counted"
    else:
        result.detail = (
            f"{calls} decompositions failed; counted: {failures} refreshes kept the last good inverse, "
            f"{declined} updates declined"
        )
    return _finite_checks(result, run)


def _fault_nan_lr(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    from curvkit.errors import ConfigError

    run = _Run(spec, options, registry)
    run.steps(3)
    problems = []
    for bad in (float("nan"), -0.1):
        params = [p.detach().clone() for p in run.model.parameters()]
        state = copy.deepcopy(run.opt.state_dict())
        good = run.opt.param_groups[0]["lr"]
        run.opt.param_groups[0]["lr"] = bad
        X, y = run.batch()
        run.opt.zero_grad()
        out = run.model(X)
        run.opt.curvature_backward(out, y)
        run.loss_fn(out, y).backward()
        try:
            run.opt.step()
            problems.append(f"lr={bad} was accepted")
        except ConfigError as err:
            if "lr" not in str(err):
                problems.append(f"the error for lr={bad} does not name lr: {err}")
        run.opt.param_groups[0]["lr"] = good
        run.opt.preconditioner.clear_records()
        if any(not torch.equal(a, b.detach()) for a, b in zip(params, run.model.parameters())):
            problems.append(f"lr={bad} changed the parameters")
        if not _same_state(state, run.opt.state_dict()):
            problems.append(f"lr={bad} changed the optimizer state")
    result = FaultResult(spec.name, "nan_lr", not problems)
    result.detail = "; ".join(problems) or "NaN and negative lr refused with ConfigError, nothing changed"
    return _finite_checks(result, run)


def _fault_resume(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    run.steps(5)
    buffer = io.BytesIO()
    torch.save({"model": run.model.state_dict(), "opt": run.opt.state_dict()}, buffer)
    torch.manual_seed(42)
    run.steps(7)
    expected = [p.detach().clone() for p in run.model.parameters()]
    result = FaultResult(spec.name, "resume_weights_only", True)
    buffer.seek(0)
    try:
        saved = torch.load(buffer, weights_only=True)
    except Exception as err:  # noqa: BLE001
        result.passed = False
        result.detail = f"torch.load(weights_only=True) failed: {type(err).__name__}: {str(err).splitlines()[0]}"
        return _finite_checks(result, run)
    other = _Run(spec, options, registry)
    other.model.load_state_dict(saved["model"])
    other.opt.load_state_dict(saved["opt"])
    other.position = 5 * _BATCH
    torch.manual_seed(42)
    other.steps(7)
    same = all(torch.equal(a, b.detach()) for a, b in zip(expected, other.model.parameters()))
    result.passed = same
    result.detail = (
        "resumed bit for bit from torch.load(weights_only=True)"
        if same
        else "the resumed run differs from the uninterrupted one"
    )
    return _finite_checks(result, run)


def _fault_shape_mismatch(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    from curvkit.optim.optimizer import CurvatureOptimizer

    run = _Run(spec, options, registry)
    run.steps(3)
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(_D_IN, _HIDDEN + 8), nn.ReLU(), nn.Linear(_HIDDEN + 8, _CLASSES))
    opt = CurvatureOptimizer(wider, method=spec, loss_fn=run.loss_fn, registry=registry, **options)
    X, y = run.X[:_BATCH], run.y[:_BATCH]
    for _ in range(3):
        opt.zero_grad()
        out = wider(X)
        opt.curvature_backward(out, y)
        run.loss_fn(out, y).backward()
        opt.step()
    state = copy.deepcopy(run.opt.state_dict())
    result = FaultResult(spec.name, "checkpoint_shape_mismatch", True)
    try:
        run.opt.load_state_dict(opt.state_dict())
        result.passed = False
        result.detail = "a checkpoint of a wider model was accepted"
    except (ValueError, RuntimeError, KeyError) as err:
        message = str(err)
        named = "'0" in message or "'2" in message
        result.passed = named
        result.detail = (
            "refused, naming the layer" if named else f"refused, but the message names no layer: {message[:200]}"
        )
    if not _same_state(state, run.opt.state_dict()):
        result.passed = False
        result.detail += "; the refused load changed the optimizer state"
    del opt
    return _finite_checks(result, run)


def _fault_foreign_params(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    from curvkit.optim.optimizer import CurvatureOptimizer

    model, other = _model(), _model()
    result = FaultResult(spec.name, "foreign_params", True)
    try:
        CurvatureOptimizer(model, other.parameters(), method=spec, registry=registry, **options)
        result.passed = False
        result.detail = "params of another model were accepted"
    except ValueError as err:
        result.detail = "refused: " + str(err).split(":")[0]
    return result


def _fault_step_without_gradients(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    run = _Run(spec, options, registry)
    params = [p.detach().clone() for p in run.model.parameters()]
    steps = run.opt.preconditioner.steps
    run.opt.zero_grad()
    run.opt.step()
    with torch.enable_grad():
        run.model(run.X[:_BATCH])  # a forward without backward, then step()
    run.opt.step()
    moved = any(not torch.equal(a, b.detach()) for a, b in zip(params, run.model.parameters()))
    advanced = run.opt.preconditioner.steps != steps
    ok = not moved and not advanced
    result = FaultResult(spec.name, "step_without_gradients", ok)
    result.detail = (
        "step() without gradients did nothing"
        if ok
        else f"step() without gradients: parameters moved {moved}, step counter advanced {advanced}"
    )
    run.steps(2)
    return _finite_checks(result, run)


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def _fault_hooks_after_del(spec: MethodSpec, options: dict[str, Any], registry: Any) -> FaultResult:
    from curvkit.optim.optimizer import CurvatureOptimizer

    torch.manual_seed(0)
    model = _model()
    X, y = _data()
    baseline = _hook_count(model)
    opt = CurvatureOptimizer(model, method=spec, loss_fn=nn.CrossEntropyLoss(), registry=registry, **options)
    for i in range(3):
        opt.zero_grad()
        out = model(X[i * _BATCH : (i + 1) * _BATCH])
        opt.curvature_backward(out, y[i * _BATCH : (i + 1) * _BATCH])
        nn.functional.cross_entropy(out, y[i * _BATCH : (i + 1) * _BATCH]).backward()
        opt.step()
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    left = _hook_count(model) - baseline
    alive = ref() is not None
    ok = left == 0 and not alive
    result = FaultResult(spec.name, "hooks_gone_after_del", ok)
    result.detail = (
        "no hook left, optimizer collected"
        if ok
        else f"after del and gc.collect(): {left} hook(s) left on the model, optimizer still alive: {alive}"
    )
    return result


#: Faults that cannot pass yet, with the reason: :func:`check_robustness` reports them in
#: its results (``expected_failure``) but does not raise for them. Remove an entry when the
#: work it names lands.
EXPECTED_FAILURES: dict[str, str] = {}

#: The faults, by name (see the module docstring).
FAULTS: dict[str, Callable[[MethodSpec, dict[str, Any], Any], FaultResult]] = {
    "nonfinite_gradients": _fault_nonfinite_gradients,
    "outlier_1e10": _outlier(1e10),
    "outlier_1e20": _outlier(1e20),
    "zero_first_batch": _fault_zero_first_batch,
    "batch_size_1": _fault_batch_size_1,
    "rank1_input": _fault_rank1_input,
    "failing_decomposition_float32": _fault_failing_float32,
    "failing_decomposition": _fault_failing_always,
    "nan_lr": _fault_nan_lr,
    "resume_weights_only": _fault_resume,
    "checkpoint_shape_mismatch": _fault_shape_mismatch,
    "foreign_params": _fault_foreign_params,
    "step_without_gradients": _fault_step_without_gradients,
    "hooks_gone_after_del": _fault_hooks_after_del,
}


def _spec(method: str | MethodSpec, registry: Any) -> MethodSpec:
    from curvkit.testing.methods import _spec as spec_of

    return spec_of(method, registry)


def robustness_report(
    method: str | MethodSpec,
    *,
    registry: Any = None,
    options: dict[str, Any] | None = None,
    faults: list[str] | tuple[str, ...] | None = None,
) -> list[FaultResult]:
    """Run the faults (default: all of :data:`FAULTS`) against ``method`` at its defaults
    plus ``options``; one :class:`FaultResult` per fault. An exception inside a fault is
    reported as a failed result, not raised."""
    spec = _spec(method, registry)
    names = list(FAULTS) if faults is None else list(faults)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    out = []
    for name in names:
        t0 = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                result = FAULTS[name](spec, dict(options or {}), registry)
        except Exception as err:  # noqa: BLE001 - reported in the table
            result = FaultResult(spec.name, name, False, detail=f"raised {type(err).__name__}: {err}")
        result.seconds = time.perf_counter() - t0
        if not result.passed and name in EXPECTED_FAILURES:
            result.expected_failure = EXPECTED_FAILURES[name]
        out.append(result)
    return out


def check_robustness(
    method: str | MethodSpec,
    *,
    registry: Any = None,
    options: dict[str, Any] | None = None,
    faults: list[str] | tuple[str, ...] | None = None,
) -> list[FaultResult]:
    """Run :func:`robustness_report` and raise :class:`AssertionError` naming every fault
    the method did not survive (see the module docstring for the faults). Plugin authors
    call it from their tests: ``check_robustness("my-method")``.

    Args:
        method: A registered method name or a :class:`~curvkit.methods.MethodSpec`.
        registry: The registry to resolve names in (default: the installed plugins).
        options: Options added to the method's recommended settings.
        faults: The faults to run (default: all of :data:`FAULTS`).

    Returns:
        The results (all passed, except the :data:`EXPECTED_FAILURES`, which carry their
        reason in ``expected_failure``).
    """
    results = robustness_report(method, registry=registry, options=options, faults=faults)
    failed = [r for r in results if not r.passed and r.expected_failure is None]
    if failed:
        name = failed[0].method
        lines = "\n".join(f"  {r.fault}: {r.detail}" for r in failed)
        raise AssertionError(f"method {name!r} failed {len(failed)} robustness fault(s):\n{lines}")
    return results
