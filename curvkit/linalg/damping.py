r"""Damping strategies: frozen, self-validating dataclasses, not boolean flags.

Every strategy says how a damping strength :math:`\lambda` regularises the Kronecker
approximation :math:`G\otimes A` of a layer's curvature before it is inverted. There are
two *kinds*, and an inverter declares which it supports (see
:mod:`curvkit.linalg.inverters`):

* ``"factored"``: a shift per factor, :math:`(G + s_G I)^{-1} \nabla (A + s_A I)^{-1}`; any
  inverter can apply it.
* ``"eigenbasis"``: a shift of the Kronecker product itself,
  :math:`(G\otimes A + \lambda_{\text{eff}} I)^{-1}`, exact only in the eigenbasis of both
  factors (the eigendecomposition inverter).

The strength :math:`\lambda` is part of the optimizer's state (so that
:class:`LevenbergMarquardtDamping` can adapt it); :meth:`initial_value` gives its start.

References:
    Martens & Grosse (2015), *Optimizing Neural Networks with Kronecker-factored
    Approximate Curvature*, §6.3 (factored Tikhonov with the π correction) and §6.5
    (Levenberg–Marquardt adaptation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from curvkit.config import ValidatedConfig, check_number
from curvkit.structures.base import FactorStructure

__all__ = [
    "ConstantDamping",
    "ScalarDamping",
    "Damping",
    "ExactDamping",
    "LevenbergMarquardtDamping",
    "PiDamping",
    "RelativeDamping",
]


def _average_trace(factor: FactorStructure) -> float:
    return float(factor.trace()) / factor.dim


def _largest_eigenvalue(factor: FactorStructure) -> float:
    """The largest eigenvalue of a PSD factor, retried in float64; if both fail, the trace
    (an upper bound for a PSD matrix, so the damping errs on the large side)."""
    if factor.is_diagonal:
        return float(factor.diagonal().max())
    m = factor.to_dense()
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    for attempt in (m.dtype, torch.float64) if m.dtype != torch.float64 else (torch.float64,):
        try:
            top = float(torch.linalg.eigvalsh(m.to(attempt))[-1])
        except RuntimeError:  # torch.linalg.LinAlgError: no convergence
            continue
        if math.isfinite(top):
            return top
    return float(m.diagonal().sum())


class Damping(ValidatedConfig):
    """Base of the damping strategies.

    Attributes:
        kind: ``"factored"`` or ``"eigenbasis"`` (see the module docstring).
        name: Registered name.
    """

    kind: ClassVar[str] = "factored"
    name: ClassVar[str] = ""
    adaptive: ClassVar[bool] = False

    def initial_value(self) -> float:
        """The damping strength :math:`\\lambda` at the first step."""
        value = getattr(self, "value", None)
        if value is None:
            raise NotImplementedError(f"{type(self).__name__} must define initial_value()")
        return float(value)

    def factor_shifts(self, A: FactorStructure, G: FactorStructure, lam: float) -> tuple[float, float]:
        """``(s_A, s_G)`` for a ``"factored"`` strategy."""
        raise NotImplementedError(f"{type(self).__name__} is not a factored damping")

    def product_shift(self, eig_A: Tensor, eig_G: Tensor, lam: float) -> float:
        """:math:`\\lambda_{\\text{eff}}` added to every eigenvalue of ``G ⊗ A`` for an
        ``"eigenbasis"`` strategy (``eig_*`` are the factors' eigenvalues)."""
        raise NotImplementedError(f"{type(self).__name__} is not an eigenbasis damping")


@dataclass(frozen=True, kw_only=True)
class ScalarDamping(Damping):
    """Base of the strategies with one strength ``value`` (λ > 0); validates it."""

    value: float = 1e-3

    def problems(self) -> list[str]:
        out: list[str] = []
        check_number(out, "value", self.value, low=0.0, low_open=True)
        return out


@dataclass(frozen=True, kw_only=True)
class ConstantDamping(Damping):
    r"""A fixed shift per factor: :math:`(A + \lambda_A I)`, :math:`(G + \lambda_G I)`.

    Note that this is not invariant to how a backend splits scale between ``A`` and ``G``
    (see :class:`PiDamping` for the invariant choice).

    Args:
        a: :math:`\lambda_A \ge 0`.
        g: :math:`\lambda_G \ge 0`.
    """

    name: ClassVar[str] = "constant"
    a: float = 1e-3
    g: float = 1e-3

    def problems(self) -> list[str]:
        out: list[str] = []
        check_number(out, "a", self.a, low=0.0)
        check_number(out, "g", self.g, low=0.0)
        return out

    def initial_value(self) -> float:
        return 1.0

    def factor_shifts(self, A: FactorStructure, G: FactorStructure, lam: float) -> tuple[float, float]:
        return self.a * lam, self.g * lam


@dataclass(frozen=True, kw_only=True)
class PiDamping(ScalarDamping):
    r"""Factored Tikhonov damping with the π correction (Martens & Grosse 2015, §6.3).

    .. math:: (A + \pi\sqrt{\lambda}\,I)^{-1} \otimes (G + \tfrac{\sqrt{\lambda}}{\pi} I)^{-1},
       \qquad \pi = \sqrt{\frac{\operatorname{tr}(A)/d_A}{\operatorname{tr}(G)/d_G}}.

    The product of the two shifts is always :math:`\lambda`, and π makes the result
    invariant to rescaling ``A`` by ``c`` and ``G`` by ``1/c``.

    Args:
        value: :math:`\lambda > 0`.
    """

    name: ClassVar[str] = "pi"

    def factor_shifts(self, A: FactorStructure, G: FactorStructure, lam: float) -> tuple[float, float]:
        ta, tg = _average_trace(A), _average_trace(G)
        pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 and math.isfinite(ta / tg) else 1.0
        root = math.sqrt(lam)
        return pi * root, root / pi


@dataclass(frozen=True, kw_only=True)
class ExactDamping(ScalarDamping):
    r"""Exact Tikhonov damping of the product, :math:`(G\otimes A + \lambda I)^{-1}`.

    Computed in the Kronecker eigenbasis: with :math:`A = Q_A \Lambda_A Q_A^\top` and
    :math:`G = Q_G \Lambda_G Q_G^\top`,
    :math:`\Delta = Q_G[(Q_G^\top \nabla Q_A) \oslash (\lambda_G\lambda_A^\top + \lambda)]Q_A^\top`.
    Needs the eigendecomposition inverter.

    Args:
        value: :math:`\lambda > 0`.
    """

    kind: ClassVar[str] = "eigenbasis"
    name: ClassVar[str] = "exact"

    def product_shift(self, eig_A: Tensor, eig_G: Tensor, lam: float) -> float:
        return lam


@dataclass(frozen=True, kw_only=True)
class RelativeDamping(ScalarDamping):
    r"""Damping relative to the largest eigenvalue (Puiu 2022's K-FAC codes).

    * ``on="product"`` (an eigenbasis damping):
      :math:`\lambda_{\text{eff}} = \lambda\,\lambda_{\max}(A)\,\lambda_{\max}(G)`;
    * ``on="factors"`` (a factored damping): :math:`s_A = \lambda\,\lambda_{\max}(A)`,
      :math:`s_G = \lambda\,\lambda_{\max}(G)` (with a Cholesky inverter this costs one
      extra symmetric eigenvalue computation per factor and refresh).

    Args:
        value: :math:`\lambda > 0`.
        on: ``"product"`` or ``"factors"``.
    """

    name: ClassVar[str] = "relative"
    on: Literal["product", "factors"] = "product"

    @property  # type: ignore[misc]
    def kind(self) -> str:  # type: ignore[override]
        return "eigenbasis" if self.on == "product" else "factored"

    def problems(self) -> list[str]:
        out = super().problems()
        if self.on not in ("product", "factors"):
            out.append(f"on={self.on!r} must be 'product' or 'factors'")
        return out

    def factor_shifts(self, A: FactorStructure, G: FactorStructure, lam: float) -> tuple[float, float]:
        return lam * _largest_eigenvalue(A), lam * _largest_eigenvalue(G)

    def product_shift(self, eig_A: Tensor, eig_G: Tensor, lam: float) -> float:
        return lam * float(eig_A.max()) * float(eig_G.max())


@dataclass(frozen=True, kw_only=True)
class LevenbergMarquardtDamping(Damping):
    r"""Adaptive damping by the Levenberg–Marquardt rule (Martens & Grosse 2015, §6.5).

    Every ``every`` steps the optimizer compares the actual change of the loss with the
    change the quadratic model predicted,

    .. math:: \rho = \frac{h(\theta+\delta) - h(\theta)}{M(\delta) - M(0)},\qquad
       M(\delta) - M(0) = \nabla h^\top\delta + \tfrac12\,\delta^\top(\hat F + \lambda I)\delta,

    and sets :math:`\lambda \leftarrow \omega\lambda` if :math:`\rho > 3/4`,
    :math:`\lambda \leftarrow \lambda/\omega` if :math:`\rho < 1/4`, with
    :math:`\omega = (19/20)^{\text{every}}`. :math:`\hat F` is the layer-wise Kronecker
    curvature the optimizer holds (kfac-jax uses the exact GGN there; we use the cheaper
    estimate, and say so). Needs ``optimizer.step(closure)`` with a closure that returns
    the loss.

    Args:
        initial: :math:`\lambda_0` (Martens & Grosse: 150).
        every: Adaptation period :math:`T_1` (5).
        omega: Decrease factor; ``None`` means :math:`(19/20)^{T_1}`.
        minimum, maximum: Bounds for :math:`\lambda`.
        inner: How :math:`\lambda` is applied: ``"pi"`` (factored, :class:`PiDamping`) or
            ``"exact"`` (eigenbasis, :class:`ExactDamping`).
    """

    name: ClassVar[str] = "levenberg-marquardt"
    adaptive: ClassVar[bool] = True
    initial: float = 150.0
    every: int = 5
    omega: float | None = None
    minimum: float = 1e-8
    maximum: float = 1e8
    inner: Literal["pi", "exact"] = "pi"

    @property  # type: ignore[misc]
    def kind(self) -> str:  # type: ignore[override]
        return "factored" if self.inner == "pi" else "eigenbasis"

    def problems(self) -> list[str]:
        out: list[str] = []
        check_number(out, "initial", self.initial, low=0.0, low_open=True)
        check_number(out, "every", self.every, low=1, integer=True)
        check_number(out, "omega", self.omega, low=0.0, high=1.0, low_open=True, high_open=True, optional=True)
        check_number(out, "minimum", self.minimum, low=0.0, low_open=True)
        check_number(out, "maximum", self.maximum, low=0.0, low_open=True)
        if not out and self.minimum > self.maximum:
            out.append(f"minimum={self.minimum!r} must not exceed maximum={self.maximum!r}")
        if not out and not self.minimum <= self.initial <= self.maximum:
            out.append(f"initial={self.initial!r} must lie in [minimum, maximum] = [{self.minimum}, {self.maximum}]")
        if self.inner not in ("pi", "exact"):
            out.append(f"inner={self.inner!r} must be 'pi' or 'exact'")
        return out

    def initial_value(self) -> float:
        return float(self.initial)

    @property
    def decrease(self) -> float:
        return self.omega if self.omega is not None else (19 / 20) ** self.every

    def adapt(self, lam: float, rho: float) -> float:
        """The next :math:`\\lambda` given the reduction ratio ``rho``."""
        if not math.isfinite(rho) or rho < 0.25:
            lam = lam / self.decrease
        elif rho > 0.75:
            lam = lam * self.decrease
        return min(max(lam, self.minimum), self.maximum)

    def factor_shifts(self, A: FactorStructure, G: FactorStructure, lam: float) -> tuple[float, float]:
        return PiDamping(value=lam).factor_shifts(A, G, lam)

    def product_shift(self, eig_A: Tensor, eig_G: Tensor, lam: float) -> float:
        return lam
