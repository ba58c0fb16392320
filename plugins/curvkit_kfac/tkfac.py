r"""TKFAC: trace-restricted K-FAC (Gao, Liu, Huang, Wang, Wang, Xu, Yu — AAAI 2021,
arXiv:2011.10741).

TKFAC writes a layer's Fisher block as :math:`F \approx \delta\,\Phi\otimes\Psi` with
:math:`\operatorname{tr}\Phi = \operatorname{tr}\Psi = 1` and chooses (the paper's
simplified Eq. 4.9, a partial-trace match)

.. math::
    \delta = \mathbb E[\lVert\bar a\rVert^2\lVert g\rVert^2],\qquad
    \Phi = \mathbb E[\lVert g\rVert^2\,\bar a\bar a^\top]/\delta,\qquad
    \Psi = \mathbb E[\lVert\bar a\rVert^2\,g g^\top]/\delta,

so that :math:`\operatorname{tr}(\delta\,\Phi\otimes\Psi)` equals the trace of the
Fisher block exactly (K-FAC's :math:`A\otimes G` does not preserve it). The block keeps
the **un-normalised** numerators :math:`\delta`, :math:`\delta\Phi`, :math:`\delta\Psi`
as EMAs with the same weights, so the trace identity holds under any averaging, and
divides at use time. The step (the paper's "normal damping", Eq. 5.15) is

.. math::
    \Delta = \hat\Psi^{-1}\nabla\hat\Phi^{-1},\qquad
    \hat\Phi = \sqrt\delta\,\Phi + \sqrt\lambda I,\quad \hat\Psi = \sqrt\delta\,\Psi + \sqrt\lambda I,

i.e. :math:`\Delta = \delta^{-1}(\Psi + \sqrt{\lambda/\delta}I)^{-1}\nabla(\Phi +
\sqrt{\lambda/\delta}I)^{-1}` (:class:`TKFACDamping`, the default). Any other factored
damping strategy is applied to the balanced factors :math:`(\sqrt\delta\Phi,
\sqrt\delta\Psi)`; with ``inverter="eigh"`` and ``damping=ExactDamping(value=λ)`` the step
is the exactly damped :math:`(\delta\,\Phi\otimes\Psi + \lambda I)^{-1}\nabla`.

In curvkit's row-major convention the block is ``Ψ ⊗ Φ`` acting on ``(d_out, d_in)``
gradients; :meth:`TKFACBlock.as_operator` returns it as a
:class:`~curvkit.blocks.KroneckerOperator` with ``A = δΦ`` and ``G = Ψ``.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.blocks import BlockInfo, KroneckerBlock, KroneckerOperator, LayerStats
from curvkit.errors import ConfigError, IncompatibleComponentsError, UnknownComponentError
from curvkit.linalg.damping import Damping, ExactDamping, ScalarDamping
from curvkit.methods import KroneckerConfig, MethodSpec
from curvkit.structures.base import FactorStructure
from curvkit_kfac.kfac import GRAD_RATIO_CLIP, KL_CLIP

__all__ = [
    "TKFACBlock",
    "TKFACConfig",
    "TKFACDamping",
    "TKFAC_SPEC",
    "tkfac_block",
    "trace_weighted_statistics",
]


def trace_weighted_statistics(stats: LayerStats) -> tuple[Tensor, Tensor, Tensor]:
    r"""One batch's un-normalised TKFAC statistics ``(δ, δΦ, δΨ)`` of a layer.

    With ``(a_rows (K, d_in), g_rows (P, K, d_out)) = stats.rows()`` (so ``A = a_rowsᵀ
    a_rows`` and ``G = Σ_p g_rows[p]ᵀ g_rows[p]``):

    * :math:`\delta = K\sum_{p,i}\lVert a_i\rVert^2\lVert g_{p,i}\rVert^2`,
    * :math:`\delta\Phi = K\sum_{p,i}\lVert g_{p,i}\rVert^2 a_i a_i^\top`,
    * :math:`\delta\Psi = K\sum_{p,i}\lVert a_i\rVert^2 g_{p,i} g_{p,i}^\top`.

    The factor ``K`` undoes the ``1/√K`` in the rows: without weight sharing, ``δ`` is
    then exactly the trace of the batch's Fisher block
    :math:`\sum_{p,n}\lVert J_{p,n}\rVert_F^2` (:meth:`LayerStats.per_example_gradients`);
    with expand it is that trace with every shared position counted as an example
    (Gao et al.'s Thm 4.3 assumption), with reduce that of the reduced per-example rows.
    """
    a_rows, g_rows = stats.rows()
    k = a_rows.shape[0]
    a_sq = a_rows.square().sum(1)  # (K,)
    g_sq = g_rows.square().sum(2)  # (P, K)
    g_w = g_sq.sum(0)  # (K,)
    delta = (a_sq * g_w).sum() * k
    phi = (a_rows * g_w.unsqueeze(1)).t() @ a_rows * k
    psi = torch.einsum("pki,k,pkj->ij", g_rows, a_sq, g_rows) * k
    return delta, phi, psi


@dataclass(frozen=True, kw_only=True)
class TKFACDamping(ScalarDamping):
    r"""TKFAC's damping (Gao et al. 2021, Eq. 5.15, "normal damping"): :math:`\sqrt\lambda`
    added to each **balanced** factor, :math:`\hat\Phi = \sqrt\delta\,\Phi + \sqrt\lambda I`
    and :math:`\hat\Psi = \sqrt\delta\,\Psi + \sqrt\lambda I`.

    A factored damping; :class:`TKFACBlock` hands it the balanced factors, so
    :meth:`factor_shifts` is simply :math:`(\sqrt\lambda, \sqrt\lambda)`. Equivalently
    :math:`\sqrt{\lambda/\delta}` on the trace-normalised factors.

    Args:
        value: :math:`\lambda > 0`.
    """

    name: ClassVar[str] = "tkfac"

    def factor_shifts(self, A: FactorStructure, G: FactorStructure, lam: float) -> tuple[float, float]:
        root = math.sqrt(lam)
        return root, root


@dataclass(frozen=True, kw_only=True)
class TKFACConfig(KroneckerConfig):
    """TKFAC's options: those of :class:`curvkit.methods.KroneckerConfig` (Fisher type,
    ``kfac_approx``, ``ema_decay``, ``T_stats``, ``T_inv``, ``damping``, ``inverter``,
    ``structure``, ``factor_dtype``).

    ``damping`` defaults to :class:`TKFACDamping` ``(value=1e-3)`` (a bare float ``λ``
    means ``TKFACDamping(value=λ)``); any factored damping, or an eigenbasis one with
    ``inverter="eigh"``, is applied to the balanced factors ``(√δ Φ, √δ Ψ)``.
    """

    damping: Damping | float = field(default_factory=lambda: TKFACDamping(value=1e-3))
    default_damping: Any = field(default=TKFACDamping, init=False, repr=False, compare=False)


def _scaled(factor: FactorStructure, scale: float) -> FactorStructure:
    return type(factor).from_dense(factor.to_dense() * scale)


class TKFACBlock(KroneckerBlock):
    r"""TKFAC's block: EMAs of :math:`\delta`, :math:`\delta\Phi` (stored as ``A``) and
    :math:`\delta\Psi` (stored as ``G``); the inverter inverts the balanced pair
    :math:`(\sqrt\delta\Phi, \sqrt\delta\Psi) = (\delta\Phi/\sqrt\delta,
    \delta\Psi/\sqrt\delta)` under the damping every ``T_inv`` steps (see the module
    docstring). A failed decomposition keeps the last good inverse and is counted in
    :attr:`inverse_failures`."""

    honours_stats_dtype: ClassVar[bool | None] = False  # TKFAC's trace-weighted statistics, not A(), G()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delta: Tensor | None = None

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        super().init(dtype=dtype, device=device)
        assert self.A is not None
        self.delta = torch.zeros((), dtype=self.A.dtype, device=device)

    def batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        """The trace-weighted pair ``(δΦ, δΨ)`` this block folds in (so the preconditioner's
        finiteness and outlier checks see what is folded in; ``δ`` is kept for
        :meth:`update`)."""
        delta, phi, psi = trace_weighted_statistics(stats)
        self._delta_batch = (weakref.ref(stats), delta)  # weak: a skipped batch is not kept alive
        return phi, psi

    def batch_is_finite(self, stats: LayerStats) -> bool:
        if not super().batch_is_finite(stats):
            return False
        pending = getattr(self, "_delta_batch", None)
        return pending is None or pending[0]() is not stats or bool(torch.isfinite(pending[1]))

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.A is None:
            self.init(dtype=stats.dtype, device=stats.device)
        assert self.A is not None and self.G is not None and self.delta is not None
        phi, psi = self.take_batch_factors(stats)
        pending, self._delta_batch = getattr(self, "_delta_batch", None), None
        delta = pending[1] if pending is not None and pending[0]() is stats else trace_weighted_statistics(stats)[0]
        self.A.ema_(self.structure_A.from_dense(phi.to(self.A.dtype)), decay)
        self.G.ema_(self.structure_G.from_dense(psi.to(self.G.dtype)), decay)
        self.delta.mul_(decay).add_(delta.to(self.delta.dtype), alpha=1 - decay)
        self.num_updates += 1

    def _inverse_root_delta(self) -> float:
        """:math:`1/\\sqrt\\delta`, or 0 when δ is not a positive finite number (no curvature
        seen: the damping alone is inverted)."""
        assert self.delta is not None
        d = float(self.delta)
        return 1.0 / math.sqrt(d) if d > 0 and math.isfinite(d) else 0.0

    def balanced_factors(self) -> tuple[FactorStructure, FactorStructure]:
        r""":math:`(\sqrt\delta\,\Phi, \sqrt\delta\,\Psi)` in the factors' structures."""
        assert self.A is not None and self.G is not None
        c = self._inverse_root_delta()
        return _scaled(self.A, c), _scaled(self.G, c)

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.A is not None and self.G is not None, "refresh() before the first update()"
        self.refresh_from(*self.balanced_factors(), damping, lam)

    # its refresh changes only the inverse, as K-FAC's does: shared the same way
    refresh_state = KroneckerBlock.refresh_state
    load_refresh_state = KroneckerBlock.load_refresh_state

    def trace_normalised(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(δ, Φ, Ψ)`` as dense tensors (``Φ = Ψ = 0`` while ``δ`` is 0)."""
        assert self.A is not None and self.G is not None and self.delta is not None
        c = self._inverse_root_delta() ** 2
        return self.delta.clone(), self.A.to_dense() * c, self.G.to_dense() * c

    def as_operator(self) -> KroneckerOperator:
        r""":math:`\delta\,\Psi\otimes\Phi` (row-major) as ``KroneckerOperator(A=δΦ, G=Ψ)``."""
        assert self.A is not None and self.G is not None
        c = self._inverse_root_delta() ** 2
        return KroneckerOperator(self.A.to_dense(), self.G.to_dense() * c, label=self.info.name)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.delta is not None:
            out["delta"] = self.delta
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "delta" in state:
            self.delta = state["delta"].clone()

    def describe(self) -> str:
        return (
            f"TKFACBlock(δΦ: {self.structure_A.name} {self.info.d_in}², δΨ: {self.structure_G.name} "
            f"{self.info.d_out}², inverter {self.inverter.name!r})"
        )


def tkfac_block(info: BlockInfo, config: TKFACConfig, registry: Any) -> TKFACBlock:
    block = TKFACBlock.from_config(info, config, registry)
    assert isinstance(block, TKFACBlock)
    return block


TKFAC_SPEC = MethodSpec(
    name="tkfac",
    class_name="TKFAC",
    config_cls=TKFACConfig,
    block_factory=tkfac_block,
    summary="TKFAC: trace-preserving δ·Φ⊗Ψ factors (EMA of un-normalised numerators), √(λ/δ) damping",
    reference="Gao, Liu, Huang, Wang, Wang, Xu & Yu (2021), A Trace-restricted Kronecker-Factored "
    "Approximation to Natural Gradient, AAAI, arXiv:2011.10741",
    sample_configs=(
        {"damping": 1e-2},
        {"damping": 1e-2, "fisher": "type-2", "T_inv": 3},
        {"damping": ExactDamping(value=1e-2), "inverter": "eigh", "fisher": "mc"},
    ),
    recommended={"lr": 0.03, "momentum": 0.9, "damping": 0.1, "kl_clip": KL_CLIP, "grad_ratio_clip": GRAD_RATIO_CLIP},
    bad_configs=(
        ({"ema_decay": 1.5, "T_inv": 0}, ConfigError),
        ({"damping": -1.0}, ConfigError),
        ({"damping": TKFACDamping(value=1e-3), "T_stats": 0}, ConfigError),
        ({"inverter": "cholesky", "damping": ExactDamping(value=1e-3)}, IncompatibleComponentsError),
        ({"inverter": "no-such-inverter"}, UnknownComponentError),
        ({"not_an_option": 1}, ConfigError),
    ),
)
