r"""SINGD, IKFAC and INGD (Lin et al., ICML 2023 and 2024): inverse-free Kronecker
preconditioners with structured factors.

Per layer the block keeps ``K`` (``d_in × d_in``) and ``C`` (``d_out × d_out``) with
``K Kᵀ ≈ (S_K + λI)⁻¹`` and ``C Cᵀ ≈ (S_C + λI)⁻¹``, and their Riemannian momenta
``m_K``, ``m_C``, all in a factor structure. Every ``T`` steps (SINGD's update frequency;
curvkit's ``T_stats``), with ``H_K = Π̂(Kᵀ U K)`` computed as ``Π̂(S Sᵀ)``, ``S = Kᵀ X``
from the captured rows ``X`` (and ``H_C`` likewise from the output-gradient rows):

.. math::

    m_K &\leftarrow \alpha_1 m_K + \tfrac12\big(\tfrac{\operatorname{tr} H_C}{d_o} H_K
        + \lambda \tfrac{\operatorname{tr}\hat\Pi(C^\top C)}{d_o} \hat\Pi(K^\top K) - I\big), \qquad
    K \leftarrow K (I - \beta_1 m_K),

and symmetrically for ``C``. IKFAC (``kfac_like=True``) drops the trace coupling and the
Riemannian momentum. The gradient is preconditioned as ``C Cᵀ ∇ K Kᵀ``; weight decay and
heavy-ball momentum are the optimizer's (``weight_decay_mode="after"``, ``momentum=α₂``).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.blocks import BlockInfo, CurvatureBlock, KroneckerOperator, LayerStats, products_note
from curvkit.config import KFACApprox
from curvkit.linalg.damping import Damping
from curvkit.numerics import all_finite, compensated_add
from curvkit.stats.factors import gram
from curvkit.structures.base import DenseStructure, DiagonalStructure, FactorStructure
from curvkit_singd.config import IKFACConfig, INGDConfig, SINGDConfig, SINGDDamping
from curvkit_singd.structures import (
    BlockDiagonalStructure,
    GroupStructure,
    HierarchicalSquare,
    HierarchicalStructure,
    TrilToeplitzStructure,
    TriuToeplitzStructure,
    s_add_,
    s_add_identity_,
    s_added,
    s_all_finite,
    s_average_trace,
    s_gram,
    s_inner,
    s_max_abs,
    s_product,
    s_scale_,
    s_spectral_estimate,
)
from curvkit_singd.structures.base import symmetric_mm

__all__ = [
    "SINGDDamping",
    "IKFACConfig",
    "INGDConfig",
    "SINGDBlock",
    "SINGDConfig",
]

_HALF = {torch.bfloat16, torch.float16}
_ROWS_BUFFER_BYTES = 16 * 2**20


def _spd_inverse(matrix: Tensor, what: str) -> Tensor:
    """The inverse of a symmetric positive-definite matrix through a float64
    eigendecomposition (symmetric by construction), in the matrix's dtype."""
    sym = matrix.double()
    evals, evecs = torch.linalg.eigh(0.5 * (sym + sym.T))
    if not bool((evals > 0).all()):
        raise ValueError(
            f"layer {what} is singular (smallest eigenvalue {float(evals.min()):.3g}), so the curvature it stands "
            "for, its inverse, does not exist."
        )
    return ((evecs / evals) @ evecs.T).to(matrix.dtype)


class SINGDBlock(CurvatureBlock):
    """Per-layer state of SINGD/IKFAC/INGD: structured ``K``, ``C``, ``m_K``, ``m_C``.

    ``update`` runs the inverse-free Riemannian update (its ``decay`` is not used: SINGD
    has no EMA of statistics); ``refresh`` does nothing (there is nothing to invert);
    ``precondition`` returns ``C Cᵀ ∇ K Kᵀ``. A non-finite ``H_K``, ``H_C`` or new
    momentum skips the update and leaves ``K``, ``C`` and the momenta untouched
    (counted in :attr:`skipped_updates`).
    """

    #: ``stats_dtype=torch.bfloat16`` lowers the Gram products of the update
    #: (``Kᵀ XᵀX K``, ``Cᵀ GᵀG C``: the products over the batch's rows) to bf16 operands with
    #: float32 accumulation; the config refuses it for structured factors, whose grams are
    #: no dense products.
    honours_stats_dtype: ClassVar[bool | None] = True

    def __init__(self, info: BlockInfo, config: SINGDConfig, structures: tuple[type[FactorStructure], ...]) -> None:
        super().__init__(info)
        self.config = config
        self.structure_K, self.structure_C = structures
        self.dtype_K, self.dtype_C = config.dtypes()
        self.K: FactorStructure | None = None
        self.C: FactorStructure | None = None
        self.m_K: FactorStructure | None = None
        self.m_C: FactorStructure | None = None
        # rounding errors of K and C in half precision (see _step_factor), else None
        self.err_K: dict[str, Tensor] | None = None
        self.err_C: dict[str, Tensor] | None = None
        self.skipped_updates = 0
        #: Updates whose factor step was shortened by ``max_factor_step``.
        self.bounded_steps = 0
        # K Kᵀ / C Cᵀ (dense, block-diagonal, arrowhead or diagonal), kept between updates
        # where that saves work (see _dense_square)
        self._P_K: Tensor | FactorStructure | HierarchicalSquare | None = None
        self._P_C: Tensor | FactorStructure | HierarchicalSquare | None = None
        # with precondition_dtype: the dense K Kᵀ / C Cᵀ (or K, C) in that dtype, per update
        self._lowered: dict[str, Tensor] | None = None
        # scratch buffers for intermediate products (see _rmatmul_buffered); not state
        self._buffers: dict[str, Tensor] = {}
        # (stats, H_K, H_C, scale of H_K, scale of H_C) computed by batch_is_finite for update
        # (a weak reference: a skipped batch must not keep its features alive)
        self._pending: tuple[weakref.ref[LayerStats], FactorStructure, FactorStructure, float, float] | None = None

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        dk, dc = self.dtype_K or dtype, self.dtype_C or dtype
        self.K = self.structure_K.identity(self.info.d_in, dtype=dk, device=device)
        self.C = self.structure_C.identity(self.info.d_out, dtype=dc, device=device)
        if self.config.alpha1:
            self.m_K = self.structure_K.zeros(self.info.d_in, dtype=dk, device=device)
            self.m_C = self.structure_C.zeros(self.info.d_out, dtype=dc, device=device)
        self._P_K = self._P_C = self._lowered = None
        self.err_K = self.err_C = None

    # --- data-parallel training: the grams are batch averages, reduced over ranks ------------

    def batch_statistics(self, stats: LayerStats) -> dict[str, Tensor] | None:
        """``H_K = Π̂(Kᵀ A K)`` and ``H_C = Π̂(Cᵀ G C)`` of the batch, scaled, as their
        structures' tensors (``"K.<name>"``, ``"C.<name>"``): averages over the batch's data,
        so the distributor averages them over ranks and every rank makes the same update
        (a structured factor sends only its structure's numbers; a dense one, a triangle).
        ``None`` (the batch is gathered instead) for a structure with non-float tensors."""
        H_K, H_C, sK, sC = self._grams(stats)
        out: dict[str, Tensor] = {}
        for prefix, H, scale in (("K.", H_K, sK), ("C.", H_C, sC)):
            for key, t in H.tensors().items():
                if not t.is_floating_point():
                    return None
                out[prefix + key] = t * scale
        return out

    @property
    def symmetric_statistics(self) -> frozenset[str]:  # type: ignore[override]
        """The dense grams travel as triangles."""
        sides = (("K.", self.structure_K), ("C.", self.structure_C))
        return frozenset(prefix + "matrix" for prefix, cls in sides if cls is DenseStructure)

    def _shared_grams(self, stats: LayerStats) -> tuple[FactorStructure, FactorStructure, float, float]:
        assert stats.shared is not None
        if self.K is None:
            self.init(dtype=stats.dtype, device=stats.device)
        parts: dict[str, dict[str, Tensor]] = {"K.": {}, "C.": {}}
        for key, t in stats.shared.items():
            parts[key[:2]][key[2:]] = t
        return self.structure_K.from_tensors(parts["K."]), self.structure_C.from_tensors(parts["C."]), 1.0, 1.0

    def batch_is_finite(self, stats: LayerStats) -> bool:
        if stats.shared is not None:  # the ranks' averaged grams (batch_statistics)
            return super().batch_is_finite(stats)
        # SINGD never forms the dense factors A and G, nor needs the scaled rows: it computes
        # H_K, H_C here (kept for update) and checks their traces. A non-finite entry of
        # the rows X makes a column of S = X K non-finite (K's diagonal touches every column),
        # so a diagonal entry of Π̂(Sᵀ S) is +inf or NaN (sums of squares cannot cancel), and
        # the trace with it; every structure's Π̂ keeps the diagonal (Toeplitz: its mean).
        self._pending = None
        H_K, H_C, sK, sC = self._grams(stats)
        if not (torch.isfinite(H_K.trace()) and torch.isfinite(H_C.trace())):
            return False
        self._pending = (weakref.ref(stats), H_K, H_C, sK, sC)
        return True

    def _grams(self, stats: LayerStats) -> tuple[FactorStructure, FactorStructure, float, float]:
        """``(H̃_K, H̃_C, s_K, s_C)`` with ``H_K = s_K H̃_K`` and ``H_C = s_C H̃_C`` — the batch's
        grams from the captured features, unscaled: the row scalings of
        :meth:`LayerStats.rows` (``1/√(NR)`` and ``√g_scale``, two passes over the rows) are
        folded into the scalar coefficients of the update instead; a diagonal ``K`` never
        forms the rows with the bias column (its gram is the column sums of squares)."""
        if self.K is None:
            self.init(dtype=stats.dtype, device=stats.device)
        assert self.K is not None and self.C is not None
        K, C = self.K, self.C
        low = getattr(stats, "product_dtype", None)  # stats_dtype: the rows' products in bf16
        # (N, R, d_in) without the bias column, cached on the stats (any other object with
        # rows(), such as a test's stand-in, goes through rows())
        x = stats.in_features if isinstance(stats, LayerStats) else None
        # float16 factors keep the scaled rows: unscaled sums over N·R rows can leave its range
        fp16 = torch.float16 in (K.dtype, C.dtype)
        if x is not None and not fp16 and (stats.approx is KFACApprox.EXPAND or x.shape[1] == 1):
            h, m = stats.layer.handler, stats.layer.module
            x = x.reshape(-1, x.shape[-1])
            sK, sC = 1.0 / max(1, x.shape[0]), stats.g_scale
            g = h.output_features(m, stats.grads[0]) if len(stats.grads) == 1 else stats.g_features
            g = g.reshape(-1, g.shape[-1])
            bias = stats.layer.has_bias
            if isinstance(K, DiagonalStructure):
                x = x.to(K.dtype)
                sq = (x * x).sum(0)
                if bias:
                    sq = torch.cat([sq, sq.new_full((1,), x.shape[0])])
                H_K: FactorStructure = DiagonalStructure(K.diag * K.diag * sq)
            else:
                if bias:  # [X, 1] in a buffer kept on the block (up to 16 MiB), ones written once
                    shape = (x.shape[0], x.shape[1] + 1)
                    buf = self._buffers.get("rows")
                    if buf is None or tuple(buf.shape) != shape or buf.dtype != K.dtype or buf.device != x.device:
                        buf = torch.empty(shape, dtype=K.dtype, device=x.device)
                        buf[:, -1] = 1
                        if buf.numel() * buf.element_size() <= _ROWS_BUFFER_BYTES:
                            self._buffers["rows"] = buf
                    buf[:, :-1].copy_(x)
                    x = buf
                H_K = self._gram(self.structure_K, K, x, low)
        else:
            a_rows, g_rows = stats.rows()
            g, sK, sC = g_rows.reshape(-1, g_rows.shape[-1]), 1.0, 1.0
            H_K = self._gram(self.structure_K, K, a_rows, low)
        # H_K = Π̂(Kᵀ X Xᵀ K) = Π̂(S Sᵀ), S = Kᵀ X = (Xᵀ K)ᵀ (rows are Xᵀ)
        return H_K, self._gram(self.structure_C, C, g, low), sK, sC

    def update(self, stats: LayerStats, decay: float) -> bool | None:
        pending, self._pending = self._pending, None
        if stats.shared is not None:
            H_K, H_C, sK, sC = self._shared_grams(stats)
        elif pending is not None and pending[0]() is stats:
            H_K, H_C, sK, sC = pending[1:]
        else:
            H_K, H_C, sK, sC = self._grams(stats)
        assert self.K is not None and self.C is not None
        cfg = self.config
        K, C = self.K, self.C
        if (
            isinstance(K, DiagonalStructure)
            and isinstance(C, DiagonalStructure)
            and isinstance(H_K, DiagonalStructure)
            and isinstance(H_C, DiagonalStructure)
            and not {K.dtype, C.dtype} & _HALF
        ):
            return self._update_diagonal(K.diag, C.diag, H_K.diag, H_C.diag, sK, sC)
        KtK, CtC = s_inner(K), s_inner(C)
        lam = cfg.lam
        assert cfg.alpha1 is not None
        scale = 0.5 * ((1.0 - cfg.alpha1) if cfg.normalize_lr_cov else 1.0)
        # H_K, H_C are unscaled (see _grams): their scales enter the coefficients cK, cC
        if cfg.kfac_like:
            cK, dK, cC, dC = sK, lam, sC, lam
        else:
            cK, dK = sK * sC * s_average_trace(H_C), lam * s_average_trace(CtC)
            cC, dC = sC * sK * s_average_trace(H_K), lam * s_average_trace(KtK)
        new_m_K = s_scale_(s_add_identity_(s_add_(s_scale_(H_K, cK), KtK, dK), -1.0), scale)
        new_m_C = s_scale_(s_add_identity_(s_add_(s_scale_(H_C, cC), CtC, dC), -1.0), scale)
        if self.m_K is not None and self.m_C is not None:
            s_add_(new_m_K, self.m_K, cfg.alpha1)
            s_add_(new_m_C, self.m_C, cfg.alpha1)
        if not s_all_finite(new_m_K, new_m_C):
            self.skipped_updates += 1
            return False
        step = self.num_updates * cfg.T
        beta_K = beta_C = cfg.beta1(step)
        if cfg.normalize_lr_cov:
            beta_K /= max(1.0, s_max_abs(new_m_K))
            beta_C /= max(1.0, s_max_abs(new_m_C))
        if cfg.max_factor_step is not None:
            beta_K = self._bounded(beta_K, s_spectral_estimate(new_m_K))
            beta_C = self._bounded(beta_C, s_spectral_estimate(new_m_C))
        new_K, err_K = self._step_factor(K, s_product(K, new_m_K), -beta_K, self.err_K)
        new_C, err_C = self._step_factor(C, s_product(C, new_m_C), -beta_C, self.err_C)
        if not s_all_finite(new_K, new_C):
            self.skipped_updates += 1
            return False
        self.K, self.C = new_K, new_C
        self.err_K, self.err_C = err_K, err_C
        self._P_K = self._P_C = self._lowered = None
        if self.m_K is not None:
            self.m_K, self.m_C = new_m_K, new_m_C
        self.num_updates += 1

    def _update_diagonal(self, k: Tensor, c: Tensor, hk: Tensor, hc: Tensor, sK: float, sC: float) -> bool | None:
        """:meth:`update` for diagonal ``K`` and ``C`` (float32/64): the same arithmetic on the
        diagonals in a third of the tensor operations (in place on the fresh ``H``'s), which
        is most of its cost at these sizes."""
        cfg = self.config
        assert cfg.alpha1 is not None
        lam = cfg.lam
        scale = 0.5 * ((1.0 - cfg.alpha1) if cfg.normalize_lr_cov else 1.0)
        kk, cc = k * k, c * c
        if cfg.kfac_like:
            cK, dK, cC, dC = sK, lam, sC, lam
        else:
            m_hc, m_cc, m_hk, m_kk = torch.stack([hc.mean(), cc.mean(), hk.mean(), kk.mean()]).tolist()
            cK, dK, cC, dC = sK * sC * m_hc, lam * m_cc, sC * sK * m_hk, lam * m_kk
        mk = hk.mul_(cK).add_(kk, alpha=dK).sub_(1.0).mul_(scale)
        mc = hc.mul_(cC).add_(cc, alpha=dC).sub_(1.0).mul_(scale)
        if isinstance(self.m_K, DiagonalStructure) and isinstance(self.m_C, DiagonalStructure):
            mk.add_(self.m_K.diag, alpha=cfg.alpha1)
            mc.add_(self.m_C.diag, alpha=cfg.alpha1)
        if not (all_finite(mk) and all_finite(mc)):
            self.skipped_updates += 1
            return False
        beta_K = beta_C = cfg.beta1(self.num_updates * cfg.T)
        if cfg.normalize_lr_cov:
            beta_K /= max(1.0, float(mk.abs().max()))
            beta_C /= max(1.0, float(mc.abs().max()))
        if cfg.max_factor_step is not None:  # a diagonal's spectral norm is its largest entry
            beta_K = self._bounded(beta_K, float(mk.abs().max()))
            beta_C = self._bounded(beta_C, float(mc.abs().max()))
        new_k = torch.addcmul(k, k, mk, value=-beta_K)
        new_c = torch.addcmul(c, c, mc, value=-beta_C)
        if not (all_finite(new_k) and all_finite(new_c)):
            self.skipped_updates += 1
            return False
        self.K, self.C = DiagonalStructure(new_k), DiagonalStructure(new_c)
        self._P_K = self._P_C = self._lowered = None
        if self.m_K is not None:
            self.m_K, self.m_C = DiagonalStructure(mk), DiagonalStructure(mc)
        self.num_updates += 1

    def _bounded(self, beta: float, norm: float) -> float:
        """β₁ limited so that ``β₁‖m‖ ≤ max_factor_step`` (‖m‖: an estimate of the largest
        singular value, :func:`~curvkit_singd.structures.s_spectral_estimate`), counted in
        :attr:`bounded_steps`; unchanged (bit for bit) when the bound does not bind."""
        bound = self.config.max_factor_step
        assert bound is not None
        if beta * norm <= bound or not math.isfinite(norm):
            return beta
        self.bounded_steps += 1
        return bound / norm

    @staticmethod
    def _step_factor(
        F: FactorStructure, delta: FactorStructure, alpha: float, err: dict[str, Tensor] | None
    ) -> tuple[FactorStructure, dict[str, Tensor] | None]:
        """``F + alpha · delta``. For a half-precision ``F`` (bf16, fp16) the sum is formed in
        float32 together with the rounding error of the previous updates, ``err``, and
        rounded once; the new rounding error is kept in ``F``'s dtype (compensated, Kahan-
        style summation). Without it a step ``β₁ K m_K`` below half an ulp of ``K`` (bf16:
        a relative ``2⁻⁹``; with β₁ = 10⁻² that is most of them) is rounded away, and
        ``K Kᵀ`` stops tracking the curvature."""
        if F.dtype not in _HALF:
            return s_added(F, delta, alpha), None
        theirs, out, new_err = delta.tensors(), {}, {}
        for name, t in F.tensors().items():
            out[name], new_err[name] = compensated_add(t, theirs[name], None if err is None else err[name], alpha=alpha)
        return type(F).from_tensors(out), new_err

    def refresh(self, damping: Damping, lam: float) -> None:
        """Nothing to refresh: ``K`` and ``C`` are the preconditioner."""

    def precondition(self, grad: Tensor) -> Tensor:
        if self.K is None:
            self.init(dtype=grad.dtype, device=grad.device)
        assert self.K is not None and self.C is not None
        K, C = self.K, self.C
        d_in, d_out = self.info.d_in, self.info.d_out
        if self._P_K is None:
            self._P_K = self._dense_square(K, d_in, d_out)
        if self._P_C is None:
            self._P_C = self._dense_square(C, d_out, d_in)
        low = self.config.precondition_dtype
        if low is not None and isinstance(K, DenseStructure) and isinstance(C, DenseStructure):
            return self._precondition_lowered(grad, low)
        # ∇ K Kᵀ = (K (∇ K)ᵀ)ᵀ, then C (Cᵀ ·) = C (· ᵀ C)ᵀ; with K Kᵀ / C Cᵀ kept (dense
        # or in the structure, both symmetric), one product per side
        x = grad.to(K.dtype)
        P = self._P_K
        if isinstance(P, DiagonalStructure) and isinstance(self._P_C, DiagonalStructure) and K.dtype == C.dtype:
            # (K Kᵀ)_jj and (C Cᵀ)_ii scale the columns and rows: one new tensor, scaled in place
            return torch.mul(x, P.diag).mul_(self._P_C.diag.unsqueeze(1)).to(grad.dtype)
        if isinstance(P, BlockDiagonalStructure):
            x = self._rmatmul_buffered("P_K", P, x)
        elif isinstance(P, HierarchicalSquare):  # into a buffer kept on the block: C's side consumes it
            x = P.rmatmul(x, out=self._scratch("P_Kout", x))
        elif not isinstance(P, Tensor):
            x = P.rmatmul(x)
        elif P.numel():
            x = x @ P
        elif isinstance(K, GroupStructure):
            x = K.square_right(x)
        else:
            x = K.matmul(K.rmatmul(x).T).T
        x = x.to(C.dtype)
        P = self._P_C
        if not isinstance(P, Tensor):
            return P.matmul(x).to(grad.dtype)
        if P.numel():
            return (P @ x).to(grad.dtype)
        if isinstance(C, GroupStructure):
            return C.square_left(x).to(grad.dtype)
        y = C.rmatmul(x.T).T
        return C.matmul(y).to(grad.dtype)

    def _precondition_lowered(self, grad: Tensor, dtype: torch.dtype) -> Tensor:
        """``C Cᵀ ∇ K Kᵀ`` of dense factors with the products' operands in ``dtype`` (copies
        of ``K Kᵀ`` / ``C Cᵀ``, or of ``K`` / ``C`` where the squares are not kept, made once
        per factor update); the result in the gradient's dtype."""
        assert isinstance(self._P_K, Tensor) and isinstance(self._P_C, Tensor)
        assert self.K is not None and self.C is not None
        if self._lowered is None:
            self._lowered = {
                "K": (self._P_K if self._P_K.numel() else self.K.matrix).to(dtype),  # type: ignore[attr-defined]
                "C": (self._P_C if self._P_C.numel() else self.C.matrix).to(dtype),  # type: ignore[attr-defined]
            }
        k, c = self._lowered["K"], self._lowered["C"]
        x = grad.to(dtype)
        x = x @ k if self._P_K.numel() else (x @ k) @ k.T
        x = c @ x if self._P_C.numel() else c @ (c.T @ x)
        return x.to(grad.dtype)

    @staticmethod
    def _gram(
        cls: type[FactorStructure], F: FactorStructure, rows: Tensor, low: torch.dtype | None = None
    ) -> FactorStructure:
        """``Π̂(Fᵀ XᵀX F)`` from the rows ``X``: ``Π̂(S Sᵀ)`` with ``S = Fᵀ Xᵀ = (X F)ᵀ``, or for
        a block-diagonal (diagonal) ``F`` block by block (entry by entry) from ``X``'s
        diagonal Gram blocks (column sums of squares); for a hierarchical ``F`` from the
        column groups of ``X F`` (no concatenation). ``low`` (``stats_dtype``, dense ``F``
        only): the products over the rows take bf16 operands and accumulate in float32."""
        x = rows.to(F.dtype)
        if isinstance(F, (BlockDiagonalStructure, HierarchicalStructure, TrilToeplitzStructure, TriuToeplitzStructure)):
            return F.sandwich_gram(x)
        if isinstance(F, DiagonalStructure):  # diag(F)² ⊙ Σ_rows X², without forming X F
            return DiagonalStructure(F.diag * F.diag * (x * x).sum(0))
        if isinstance(F, DenseStructure) and F.dtype not in _HALF:
            M = F.matrix
            if x.shape[0] > 2 * x.shape[1]:
                # more than 2d rows: Fᵀ (XᵀX) F costs n d² + 2 d³ multiply-adds, (X F)ᵀ (X F) 2 n d²
                xtx = symmetric_mm(x.T, x) if low is None else gram(x, product_dtype=low).to(M.dtype)
                return cls.from_dense(symmetric_mm(M.T, xtx @ M))
            if low is not None:  # X F with bf16 operands (rounded to bf16), then its gram
                return cls.from_dense(gram(x.to(low) @ M.to(low), product_dtype=low).to(M.dtype))
        # (in half precision (X F)ᵀ (X F): two roundings of the result instead of three)
        return s_gram(cls, F.rmatmul(x).T)

    def _scratch(self, key: str, like: Tensor) -> Tensor:
        """A buffer of ``like``'s shape, dtype and device kept on the block (fresh multi-
        megabyte tensors cost page faults on every step); its content is an intermediate."""
        buf = self._buffers.get(key)
        if buf is None or buf.shape != like.shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
            self._buffers[key] = buf
        return buf

    def _rmatmul_buffered(self, key: str, F: FactorStructure, x: Tensor) -> Tensor:
        """``x @ F``; for a block-diagonal ``F`` into buffers kept on the block (the result is
        an intermediate, consumed before the next call with the same ``key``)."""
        if not isinstance(F, BlockDiagonalStructure):
            return F.rmatmul(x)
        m = x.shape[0]
        shapes = {"out": tuple(x.shape), "work": (int(F.blocks.shape[0]), m, F.BLOCK)}
        bufs = []
        for part, shape in shapes.items():
            buf = self._buffers.get(key + part)
            if buf is None or tuple(buf.shape) != shape or buf.dtype != x.dtype or buf.device != x.device:
                buf = x.new_empty(shape)
                self._buffers[key + part] = buf
            bufs.append(buf)
        return F.rmatmul(x, out=bufs[0], work=bufs[1])

    def _dense_square(self, F: FactorStructure, d: int, other: int) -> Tensor | FactorStructure | HierarchicalSquare:
        """``F Fᵀ``, kept between updates where that saves work; an empty tensor where it
        does not (then ``F`` and ``Fᵀ`` are applied in turn).

        * dense ``F``: if forming it once per update (``d³``) and applying it on each of the
          ``T`` steps until the next (``T · other · d²``) costs less than two products per
          step (``2 T · other · d²``), i.e. if ``d < T · other``;
        * block-diagonal ``F`` (``F Fᵀ`` is block-diagonal: ``d k²`` to form, one block
          product per step instead of two), hierarchical ``F`` (an arrowhead: half the
          work of ``F`` then ``Fᵀ``) and diagonal ``F``: always.
        """
        if isinstance(F, DenseStructure):
            return symmetric_mm(F.matrix, F.matrix.T) if d < self.config.T * other else F.matrix.new_empty(0)
        if isinstance(F, (BlockDiagonalStructure, HierarchicalStructure)):
            return F.square()
        if isinstance(F, DiagonalStructure):
            return DiagonalStructure(F.diag * F.diag)
        return torch.empty(0, device=F.device)

    def preconditioner_dense(self) -> tuple[Tensor, Tensor]:
        """``(K Kᵀ, C Cᵀ)`` as dense matrices (for tests and inspection)."""
        assert self.K is not None and self.C is not None
        k, c = self.K.to_dense(), self.C.to_dense()
        return k @ k.T, c @ c.T

    def as_operator(self) -> KroneckerOperator:
        """The curvature the preconditioner inverts, ``G ⊗ A = (C Cᵀ)⁻¹ ⊗ (K Kᵀ)⁻¹`` (dense
        factors, inverted through a float64 eigendecomposition). SINGD tracks
        ``K Kᵀ ≈ (S_K + λI)⁻¹`` and ``C Cᵀ ≈ (S_C + λI)⁻¹``, so this estimate includes the
        method's damping λ in each factor.

        Raises:
            ValueError: ``K Kᵀ`` or ``C Cᵀ`` is singular (its inverse does not exist).
        """
        kk, cc = self.preconditioner_dense()
        name = self.info.name
        return KroneckerOperator(_spd_inverse(kk, f"{name}: K Kᵀ"), _spd_inverse(cc, f"{name}: C Cᵀ"), label=name)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "bounded_steps": self.bounded_steps,
            "inverse_failures": self.inverse_failures,
        }
        for name in ("K", "C", "m_K", "m_C"):
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value.tensors())
        for name in ("err_K", "err_C"):
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._P_K = self._P_C = self._lowered = None
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state["skipped_updates"])
        self.bounded_steps = int(state.get("bounded_steps", 0))
        self.inverse_failures = int(state["inverse_failures"])
        for name, cls in (
            ("K", self.structure_K),
            ("C", self.structure_C),
            ("m_K", self.structure_K),
            ("m_C", self.structure_C),
        ):
            if name in state:
                setattr(self, name, cls.from_tensors({k: v.clone() for k, v in state[name].items()}))
        for name in ("err_K", "err_C"):
            setattr(self, name, {k: v.clone() for k, v in state[name].items()} if name in state else None)

    def describe(self) -> str:
        mode = "IKFAC" if self.config.kfac_like else "SINGD"
        return (
            f"{mode}(K: {self.structure_K.name} {self.info.d_in}², C: {self.structure_C.name} {self.info.d_out}², "
            f"T={self.config.T}" + products_note(self.config.precondition_dtype) + ")"
        )
