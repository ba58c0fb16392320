r"""The core's block for unit-wise layers (normalisation layers' scale and shift).

A unit-wise layer (:mod:`curvkit.stats.norms`) has ``D`` units with ``k`` parameters each
(``k = 2``: scale ``γ_i`` and shift ``β_i``; ``k = 1``: a scale only). Its curvature block
is the **exact** per-unit Fisher

.. math:: F_i = \sum_{p,n} J_{p,n,i}J_{p,n,i}^\top \in \mathbb{R}^{k\times k},\qquad
   J_{p,n,i} = \sqrt{s}\sum_r g_{p,n,r,i}\,[\hat x_{n,r,i},\ 1],

``D`` independent ``k × k`` blocks (the couplings between units are dropped, nothing
within a unit is approximated). :class:`UnitwiseBlock` keeps their running average and
preconditions the ``(D, k)`` matrix form of the layer's gradient (column 0 the scale,
column 1 the shift) with :math:`(F_i + \lambda I)^{-1}` per unit. Every method uses it for
unit-wise layers, unless its :class:`~curvkit.methods.MethodSpec` names its own
``unitwise_block`` factory; the knobs come from the method's configuration where it has
them:

* **EMA**: ``ema_decay`` ρ (``F ← ρF + (1−ρ)F_batch``, the k-th update with
  ``min(1 − 1/k, ρ)`` as for the Kronecker factors); a configuration without
  ``ema_decay`` (SKFAC, SINGD, IKFAC, INGD) uses :data:`DEFAULT_EMA_DECAY`;
* **damping**: the method's damping strategy and current strength λ, read as a shift of
  the product (:func:`unitwise_shift`): λ itself for π, exact, Levenberg–Marquardt,
  TKFAC's, equal-split and SINGD's damping (each is a shift of ``G ⊗ A`` by about λ);
  ``a·g·λ²`` for :class:`~curvkit.linalg.damping.ConstantDamping` (the identity part of
  ``(G + gλ)⊗(A + aλ)``); λ times the layer's largest per-unit eigenvalue for
  :class:`~curvkit.linalg.damping.RelativeDamping`;
* **refresh**: with the method's ``T_inv`` (every step without one), a batched symmetric
  eigendecomposition of the ``D`` blocks in at least float32 (float64 if that fails),
  eigenvalues clamped at zero.

The state (``F`` and its damped inverse, ``2·D·k²`` numbers) is kept in at least
float32 whatever the parameters' dtype. In data-parallel training the batch's
``F_batch`` is averaged over the processes (:meth:`UnitwiseBlock.batch_statistics`) and
each refresh is computed by one process and broadcast (:meth:`UnitwiseBlock.refresh_state`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.blocks import BlockInfo, CurvatureBlock, LayerStats
from curvkit.linalg.damping import ConstantDamping, Damping, RelativeDamping
from curvkit.linalg.kronecker import UnitwiseOperator
from curvkit.numerics import all_finite

__all__ = ["DEFAULT_EMA_DECAY", "UnitwiseBlock", "UnitwiseOperator", "unitwise_shift"]

#: ρ of a unit-wise block under a method whose configuration has no ``ema_decay``.
DEFAULT_EMA_DECAY = 0.95


def unitwise_shift(damping: Any, lam: float, eigenvalues: Tensor) -> float:
    """The shift added to every eigenvalue of a unit-wise layer's blocks (module docstring).

    Args:
        damping: The method's damping strategy (``None``: ``lam`` itself).
        lam: Its current strength λ.
        eigenvalues: ``(D, k)`` eigenvalues of the blocks (for relative damping).

    Returns:
        A positive shift: a shift that would be zero (``ConstantDamping`` with ``a = 0``, an
        all-zero layer under relative damping) is raised to the float32 machine epsilon
        times the largest eigenvalue (or 1), so the inverse exists.
    """
    largest = float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    if isinstance(damping, RelativeDamping):
        shift = float(lam) * largest
    elif isinstance(damping, ConstantDamping):
        shift = float(damping.a) * float(damping.g) * float(lam) ** 2
    else:
        shift = float(lam)
    floor = float(torch.finfo(torch.float32).eps) * (largest if largest > 0 else 1.0)
    return shift if shift > floor else floor


class UnitwiseBlock(CurvatureBlock):
    """Exact per-unit ``k × k`` blocks of a normalisation layer (see the module docstring).

    Args:
        info: The layer (``info.unitwise``; ``d_out = D`` units, ``d_in = k``).
        ema_decay: ρ of the running average.
        factor_dtype: A dtype for the state, at least float32 (``None``: float32, or the
            parameters' dtype if wider).
    """

    honours_stats_dtype: ClassVar[bool | None] = None  # no Kronecker factors

    symmetric_statistics: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, info: BlockInfo, *, ema_decay: float = DEFAULT_EMA_DECAY, factor_dtype: Any = None) -> None:
        super().__init__(info)
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay={ema_decay!r} must lie in [0, 1).")
        #: ρ of this block (the preconditioner uses it instead of the method's ``ema_decay``).
        self.stat_decay = float(ema_decay)
        self.factor_dtype = factor_dtype if isinstance(factor_dtype, torch.dtype) else None
        self.F: Tensor | None = None
        self.inverse: Tensor | None = None
        self._batch: tuple[LayerStats, Tensor] | None = None

    @classmethod
    def from_config(cls, info: BlockInfo, config: Any, registry: Any = None) -> UnitwiseBlock:
        """The default unit-wise block of a method: ρ = ``config.ema_decay`` where the
        configuration has it, else :data:`DEFAULT_EMA_DECAY`; ``factor_dtype`` likewise."""
        del registry
        ema = getattr(config, "ema_decay", None)
        return cls(
            info,
            ema_decay=DEFAULT_EMA_DECAY if ema is None else float(ema),
            factor_dtype=getattr(config, "factor_dtype", None),
        )

    @property
    def num_units(self) -> int:
        return self.info.d_out

    @property
    def k(self) -> int:
        return self.info.d_in

    def _state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        out = torch.promote_types(dtype, torch.float32)
        if self.factor_dtype is not None and self.factor_dtype.is_floating_point:
            out = torch.promote_types(out, self.factor_dtype)
        return out

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        self.F = torch.zeros(self.num_units, self.k, self.k, dtype=self._state_dtype(dtype), device=device)

    # --- statistics ---------------------------------------------------------------------

    def batch_fisher(self, stats: LayerStats) -> Tensor:
        """The batch's ``(D, k, k)`` per-unit Fisher (computed once per batch)."""
        if stats.shared is not None:
            if "F" not in stats.shared:
                raise RuntimeError(
                    f"layer {self.info.name!r}: the distributed statistics have no 'F' (got {sorted(stats.shared)})."
                )
            return stats.shared["F"]
        cached = self._batch
        if cached is not None and cached[0] is stats:
            return cached[1]
        f = stats.unit_fisher()
        self._batch = (stats, f)
        return f

    def batch_statistics(self, stats: LayerStats) -> dict[str, Tensor] | None:
        """``{"F": (D, k, k)}``, the batch's per-unit Fisher, an average over its data
        (like ``G``), so processes' values average into the whole batch's."""
        return {"F": self.batch_fisher(stats)}

    def batch_is_finite(self, stats: LayerStats) -> bool:
        return all_finite(self.batch_fisher(stats))

    def batch_magnitudes(self, stats: LayerStats) -> tuple[Tensor, ...]:
        """``(Σ_i tr F_i,)``: the size of the batch's per-unit Fisher, for the outlier gate
        of the statistics (:meth:`CurvatureBlock.batch_magnitudes`)."""
        return (self.batch_fisher(stats).diagonal(dim1=-2, dim2=-1).sum(),)

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.F is None:
            self.init(dtype=stats.dtype, device=stats.device)
        assert self.F is not None
        f = self.batch_fisher(stats)
        self._batch = None
        self.F.mul_(decay).add_(f.to(self.F.dtype), alpha=1.0 - decay)
        self.num_updates += 1

    # --- refresh and preconditioning ------------------------------------------------------

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.F is not None, "refresh() before the first update()"
        inverse = self._damped_inverse(self.F, damping, lam)
        if inverse is None:
            self.inverse_failures += 1
            if self.inverse is not None:
                return
            inverse = self._damped_inverse(torch.zeros_like(self.F), damping, lam)
            assert inverse is not None
        self.inverse = inverse

    def _damped_inverse(self, f: Tensor, damping: Damping, lam: float) -> Tensor | None:
        """``(F_i + shift I)⁻¹`` for every unit, or ``None`` if it is not finite."""
        work = f if f.dtype in (torch.float32, torch.float64) else f.float()
        sym = 0.5 * (work + work.transpose(1, 2))
        try:
            evals, evecs = torch.linalg.eigh(sym)
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            try:
                evals, evecs = torch.linalg.eigh(sym.double())
            except RuntimeError:
                return None
        if not (all_finite(evals) and all_finite(evecs)):
            return None
        evals = evals.clamp_min(0.0)
        shift = unitwise_shift(damping, lam, evals)
        inverse = (evecs / (evals + shift).unsqueeze(1)) @ evecs.transpose(1, 2)
        if not all_finite(inverse):
            return None
        return inverse.to(f.dtype)

    def precondition(self, grad: Tensor) -> Tensor:
        if self.inverse is None:
            raise RuntimeError(f"block {self.info.name!r}: precondition() before the first refresh()")
        g = grad if grad.dtype == self.inverse.dtype else grad.to(self.inverse.dtype)
        out = torch.bmm(self.inverse, g.unsqueeze(-1)).squeeze(-1)  # per unit F_i⁻¹ g_i (einsum: ~4× the time)
        return out if out.dtype == grad.dtype else out.to(grad.dtype)

    def as_operator(self) -> UnitwiseOperator:
        """The EMA of the per-unit Fisher, ``blockdiag(F_1, …, F_D)``."""
        assert self.F is not None
        return UnitwiseOperator(self.F, label=self.info.name)

    def quadratic(self, direction: Tensor) -> float:
        """:math:`\\sum_i \\delta_i^\\top F_i \\delta_i` for ``direction`` ``(D, k)``."""
        assert self.F is not None
        d = direction.to(self.F.dtype)
        return float(torch.einsum("di,dij,dj->", d, self.F, d))

    # --- distribution ---------------------------------------------------------------------

    def refresh_cost(self) -> float:
        return float(self.num_units) * float(self.k) ** 3

    def refresh_state(self) -> dict[str, Any] | None:
        return {"inverse_failures": self.inverse_failures, "inverse": self.inverse}

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        self.inverse_failures = int(state["inverse_failures"])
        self.inverse = state["inverse"]

    # --- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_updates": self.num_updates,
            "inverse_failures": self.inverse_failures,
            "stat_decay": self.stat_decay,
        }
        if self.F is not None:
            out["F"] = self.F
        if self.inverse is not None:
            out["inverse"] = self.inverse
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        self.F = state["F"].clone() if "F" in state else None
        self.inverse = state["inverse"].clone() if "inverse" in state else None
        self._batch = None

    def describe(self) -> str:
        what = "scale and shift" if self.info.has_bias else "scale"
        return (
            f"{type(self).__name__}({self.num_units} units × exact {self.k}×{self.k} Fisher ({what}), "
            f"EMA ρ={self.stat_decay:g})"
        )
