"""The harness of :func:`~curvkit.testing.check_robustness`: a fault's result, a small
training run to inject it into, the counts of non-finite values in a model and an
optimizer's state, and :func:`failing_decompositions`, which makes the decompositions an
inverter calls fail on demand. The faults themselves are in :mod:`curvkit.testing.robustness`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from curvkit.methods import MethodSpec

__all__ = ["FaultResult", "failing_decompositions"]


@dataclass
class FaultResult:
    """One fault's outcome for one method.

    Attributes:
        method: The method's name.
        fault: The fault (a key of :data:`FAULTS`).
        passed: Whether the method survived it.
        nonfinite_parameters: Parameters with a non-finite entry at the end.
        nonfinite_state: Tensors of the optimizer's ``state_dict`` with a non-finite entry.
        ended_training: For the outlier faults: whether the outlier ended training (the loss
            did not come back below its value before the outlier); ``None`` otherwise.
        detail: What was measured, or what went wrong.
        seconds: Wall-clock time of the check.
    """

    method: str
    fault: str
    passed: bool
    nonfinite_parameters: int = 0
    nonfinite_state: int = 0
    ended_training: bool | None = None
    detail: str = ""
    seconds: float = 0.0
    expected_failure: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --- the task ------------------------------------------------------------------------------

_D_IN, _HIDDEN, _CLASSES, _BATCH = 64, 64, 4, 16


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(_D_IN, _HIDDEN), nn.ReLU(), nn.Linear(_HIDDEN, _CLASSES))


def _data(n: int = 256, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(n, _D_IN, generator=gen, device="cpu")
    W = torch.randn(_D_IN, _CLASSES, generator=gen, device="cpu")
    return X, (X @ W).argmax(1)


class _Run:
    """A model, its optimizer and the task."""

    def __init__(self, spec: MethodSpec, options: dict[str, Any], registry: Any, seed: int = 0) -> None:
        from curvkit.optim.optimizer import CurvatureOptimizer

        torch.manual_seed(seed)
        self.model = _model()
        self.X, self.y = _data()
        self.loss_fn = nn.CrossEntropyLoss()
        self.opt = CurvatureOptimizer(
            self.model,
            method=spec,
            loss_fn=self.loss_fn,
            registry=registry,
            generator=torch.Generator(device="cpu").manual_seed(seed),
            **options,
        )
        self.position = 0

    def batch(self, size: int = _BATCH) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.X.shape[0]
        start = self.position % n
        if start + size > n:
            start = 0
        self.position = start + size
        return self.X[start : start + size], self.y[start : start + size]

    def step(self, X: torch.Tensor | None = None, y: torch.Tensor | None = None) -> float:
        if X is None or y is None:
            X, y = self.batch()
        self.opt.zero_grad()
        out = self.model(X)
        self.opt.curvature_backward(out, y)
        loss = self.loss_fn(out, y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def steps(self, n: int) -> None:
        for _ in range(n):
            self.step()

    def loss(self) -> float:
        with torch.no_grad():
            pre = getattr(self.opt, "preconditioner", None)
            ctx = pre.suspended() if pre is not None else contextlib.nullcontext()
            with ctx:
                return float(self.loss_fn(self.model(self.X), self.y))

    @property
    def counters(self) -> dict[str, Any]:
        return dict(self.opt.preconditioner.counters)

    def block_counts(self) -> tuple[int, int]:
        blocks = self.opt.preconditioner.blocks.values()
        return (
            sum(int(getattr(b, "inverse_failures", 0)) for b in blocks),
            sum(int(getattr(b, "skipped_updates", 0)) for b in blocks),
        )


def _count_nonfinite_parameters(model: nn.Module) -> int:
    return sum(1 for p in model.parameters() if not bool(torch.isfinite(p).all()))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _count_nonfinite_state(opt: Any) -> int:
    return sum(1 for t in _tensors(opt.state_dict()) if t.is_floating_point() and not bool(torch.isfinite(t).all()))


# --- failing decompositions ------------------------------------------------------------------

_DECOMPOSITIONS = ("cholesky", "cholesky_ex", "eigh", "eigvalsh", "qr", "svd")


@contextlib.contextmanager
def failing_decompositions(dtypes: tuple[torch.dtype, ...] | None = None) -> Iterator[dict[str, int]]:
    """Make ``torch.linalg``'s decompositions fail (within the ``with`` block) for inputs of
    ``dtypes`` (``None``: every dtype): ``cholesky``, ``eigh``, ``eigvalsh``, ``qr`` and
    ``svd`` raise :class:`torch.linalg.LinAlgError`; ``cholesky_ex`` reports ``info = 1``
    with a NaN factor. Yields ``{name: calls that failed}``."""
    originals = {name: getattr(torch.linalg, name) for name in _DECOMPOSITIONS}
    failed = dict.fromkeys(_DECOMPOSITIONS, 0)

    def fails(x: torch.Tensor) -> bool:
        return dtypes is None or x.dtype in dtypes

    def make(name: str) -> Callable[..., Any]:
        original = originals[name]

        def patched(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not fails(x):
                return original(x, *args, **kwargs)
            failed[name] += 1
            if name == "cholesky_ex":
                info = torch.ones(x.shape[:-2], dtype=torch.int32, device=x.device)
                return torch.full_like(x, float("nan")), info
            raise torch.linalg.LinAlgError(f"{name}: injected failure (curvkit.testing.failing_decompositions)")

        return patched

    try:
        for name in _DECOMPOSITIONS:
            setattr(torch.linalg, name, make(name))
        yield failed
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)


# --- the faults ------------------------------------------------------------------------------


def _finite_checks(result: FaultResult, run: _Run) -> FaultResult:
    result.nonfinite_parameters = _count_nonfinite_parameters(run.model)
    result.nonfinite_state = _count_nonfinite_state(run.opt)
    if result.nonfinite_parameters or result.nonfinite_state:
        result.passed = False
        result.detail += (
            f"; {result.nonfinite_parameters} non-finite parameter(s), {result.nonfinite_state} non-finite state "
            "tensor(s)"
        )
    return result


def _same_state(a: Any, b: Any) -> bool:
    from curvkit.testing.methods import _assert_same_state

    try:
        _assert_same_state("", a, b)
    except AssertionError:
        return False
    return True
