"""Conformance checks for factor structures and inverters, against dense float64 algebra."""

from __future__ import annotations

from typing import Any

import torch

from curvkit.linalg.damping import ConstantDamping, ExactDamping, PiDamping
from curvkit.structures.base import FactorStructure

__all__ = ["check_inverter", "check_structure"]


def _spd(dim: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(dim, 2 * dim, dtype=torch.float64, generator=generator)
    return x @ x.T / (2 * dim) + 0.1 * torch.eye(dim, dtype=torch.float64)


def _close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-10, kind: str = "structure"
) -> None:
    if not torch.allclose(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max().clamp_min(1.0))):
        err = float((actual - expected).abs().max())
        raise AssertionError(
            f"{kind} {name!r}: {what} differs from the same operation on dense float64 matrices "
            f"(max abs error {err:.3g}, tolerance rtol={rtol:g})."
        )


def check_structure(cls: type[FactorStructure], *, dims: tuple[int, ...] = (1, 5, 12), seed: int = 0) -> None:
    """Check a :class:`~curvkit.structures.FactorStructure` against its dense projection.

    Checks: ``from_dense`` is a projection (idempotent); ``to_dense``/``tensors``/
    ``from_tensors`` round-trip; ``matmul``, ``rmatmul``, ``trace``, ``diagonal`` and
    ``ema_`` agree with the same operations on the dense projection; ``identity`` and
    ``zeros`` are what they say.
    """
    name = getattr(cls, "name", cls.__name__)
    if not name:
        raise AssertionError(f"{cls.__name__} has no registered name (set the class attribute `name`).")
    gen = torch.Generator().manual_seed(seed)
    for d in dims:
        m = _spd(d, gen)
        s = cls.from_dense(m)
        p = s.to_dense()
        if tuple(p.shape) != (d, d):
            raise AssertionError(f"structure {name!r}: to_dense() has shape {tuple(p.shape)}, expected {(d, d)}.")
        idempotence = f"from_dense(to_dense()) at d={d} (the projection must be idempotent)"
        _close(name, cls.from_dense(p).to_dense(), p, idempotence)
        _close(
            name,
            cls.from_tensors({k: v.clone() for k, v in s.tensors().items()}).to_dense(),
            p,
            f"from_tensors(tensors()) at d={d} (the state_dict round trip)",
        )
        x = torch.randn(d, 3, dtype=torch.float64, generator=gen)
        _close(name, s.matmul(x), p @ x, f"matmul(x) at d={d}")
        _close(name, s.rmatmul(x.T), x.T @ p, f"rmatmul(x) at d={d}")
        _close(name, s.trace().reshape(()), p.trace(), f"trace() at d={d}")
        _close(name, s.diagonal(), p.diagonal(), f"diagonal() at d={d}")
        other = cls.from_dense(_spd(d, gen))
        expected = 0.7 * p + 0.3 * other.to_dense()
        ema = f"ema_(other, decay=0.7) at d={d} (expected 0.7·self + 0.3·other)"
        _close(name, s.ema_(other, 0.7).to_dense(), expected, ema)
        eye, zero = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        _close(name, cls.identity(d, dtype=torch.float64).to_dense(), eye, f"identity({d})")
        _close(name, cls.zeros(d, dtype=torch.float64).to_dense(), zero, f"zeros({d})")


def check_inverter(
    inverter: Any, *, structures: tuple[type[FactorStructure], ...] | None = None, seed: int = 0
) -> None:
    """Check an inverter: for each damping kind it supports, ``prepare(...).apply(∇)``
    equals the dense solve ``(G̃ ⊗ Ã)⁻¹ vec(∇)`` (factored) or ``(G ⊗ A + λI)⁻¹ vec(∇)``
    (eigenbasis), in float64, for dense and diagonal factors.
    """
    from curvkit.structures.base import DenseStructure, DiagonalStructure

    name = getattr(inverter, "name", type(inverter).__name__)
    structures = structures or (DenseStructure, DiagonalStructure)
    gen = torch.Generator().manual_seed(seed)
    dampings: list[Any] = []
    if "factored" in inverter.supports:
        dampings += [PiDamping(value=0.3), ConstantDamping(a=0.2, g=0.05)]
    if "eigenbasis" in inverter.supports:
        dampings.append(ExactDamping(value=0.3))
    if not dampings:
        raise AssertionError(f"inverter {name!r} declares no supported damping kind (supports={inverter.supports!r}).")
    for cls in structures:
        A = cls.from_dense(_spd(4, gen))
        G = cls.from_dense(_spd(3, gen))
        grad = torch.randn(3, 4, dtype=torch.float64, generator=gen)
        for damping in dampings:
            lam = damping.initial_value()
            inv = inverter.prepare(A, G, damping, lam)
            if inv is None:
                raise AssertionError(
                    f"inverter {name!r}: prepare() returned None (failure) on well-conditioned {cls.name} factors "
                    f"with {damping!r}."
                )
            a, g = A.to_dense(), G.to_dense()
            if damping.kind == "factored":
                s_a, s_g = damping.factor_shifts(A, G, lam)
                dense = torch.kron(g + s_g * torch.eye(3, dtype=g.dtype), a + s_a * torch.eye(4, dtype=a.dtype))
            else:
                dense = torch.kron(g, a) + lam * torch.eye(12, dtype=a.dtype)
            expected = torch.linalg.solve(dense, grad.reshape(-1)).reshape(3, 4)
            if getattr(inverter, "name", "") == "identity":
                expected = grad
            _close(
                name,
                inv.apply(grad),
                expected,
                f"prepare(A, G, {damping!r}, {lam:g}).apply(grad) on {cls.name} factors",
                1e-8,
                kind="inverter",
            )
