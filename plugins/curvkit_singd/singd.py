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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.blocks import BlockInfo, CurvatureBlock, LayerStats
from curvkit.config import check_number
from curvkit.errors import ConfigError
from curvkit.linalg.damping import Damping, ScalarDamping
from curvkit.methods import MethodConfig, MethodSpec
from curvkit.numerics import all_finite
from curvkit.structures.base import DenseStructure, DiagonalStructure, FactorStructure
from curvkit_singd.structures import (
    BlockDiagonalStructure,
    GroupStructure,
    HierarchicalSquare,
    HierarchicalStructure,
    resolve_structure,
    s_add_,
    s_add_identity_,
    s_average_trace,
    s_clone,
    s_gram,
    s_inner,
    s_max_abs,
    s_product,
    s_scale_,
)

__all__ = [
    "SINGDDamping",
    "IKFACConfig",
    "INGDConfig",
    "SINGDBlock",
    "SINGDConfig",
    "IKFAC_SPEC",
    "INGD_SPEC",
    "SINGD_SPEC",
]

DTypeSpec = torch.dtype | None | tuple[torch.dtype | None, torch.dtype | None]


@dataclass(frozen=True, kw_only=True)
class SINGDDamping(ScalarDamping):
    """SINGD's damping λ: it enters only the ``m_K``/``m_C`` updates, as ``λ KᵀK`` and
    ``λ CᵀC`` (trace-coupled unless ``kfac_like``); nothing is ever inverted."""

    name: ClassVar[str] = "singd"


@dataclass(frozen=True, kw_only=True)
class SINGDConfig(MethodConfig):
    r"""SINGD's options, by the paper's symbols (Lin et al. 2024, Fig. 4).

    The optimizer's own options carry the rest: ``lr`` (β₂), ``momentum`` (α₂) and
    ``weight_decay`` (γ, applied after preconditioning: ``weight_decay_mode="after"``).

    Args:
        damping: λ, the damping inside the ``m_K``/``m_C`` updates (> 0); a float or a
            :class:`SINGDDamping`.
        alpha1: α₁, the Riemannian momentum of ``m_K``/``m_C`` in [0, 1); ``None`` means
            0.5, or 0 with ``kfac_like``.
        lr_cov: β₁, the step size of the ``K``/``C`` updates, or a callable ``step ->
            β₁`` (a schedule; ``step`` is the optimizer step of the update).
        T: Update ``K``, ``C`` every ``T`` steps (from step 0 on).
        structure: Structure of ``K`` and ``C`` (registered names, e.g. ``"dense"``,
            ``"diagonal"``, ``"block30diagonal"``, ``"hierarchical15_15"``,
            ``"triltoeplitz"``; ``"block{k}diagonal"`` and ``"hierarchical{k1}_{k2}"`` for
            any sizes), or a pair ``(K's, C's)``.
        kfac_like: IKFAC's update (no trace coupling, α₁ = 0).
        normalize_lr_cov: β₁ ← β₁ / max(1, ‖m‖_∞), with ½ → ½(1 − α₁).
        factor_dtype: dtype of ``K``, ``m_K`` and ``C``, ``m_C`` (one dtype or a pair
            ``(K's, C's)``; ``None``: the parameters' dtype). The update and the
            preconditioning run in these dtypes.
    """

    damping: SINGDDamping | float = field(default_factory=lambda: SINGDDamping(value=1e-3))
    alpha1: float | None = None
    lr_cov: float | Callable[[int], float] = 1e-2
    T: int = 10
    structure: str | tuple[str, str] = "dense"
    kfac_like: bool = False
    normalize_lr_cov: bool = False
    factor_dtype: DTypeSpec = None
    T_stats: int = field(default=10, init=False)

    def normalise(self) -> list[str]:
        out = super().normalise()
        if isinstance(self.T, int) and not isinstance(self.T, bool):
            self._set("T_stats", self.T)
        if isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool):
            try:
                self._set("damping", SINGDDamping(value=float(self.damping)))
            except ConfigError as err:
                out.extend(f"damping={self.damping!r}: {p}" for p in err.problems)
        if self.alpha1 is None:
            self._set("alpha1", 0.0 if self.kfac_like else 0.5)
        return out

    def problems(self) -> list[str]:
        out = super().problems()
        out = [p for p in out if not p.startswith("T_stats")]
        check_number(out, "T", self.T, low=1, integer=True)
        if not isinstance(self.damping, (SINGDDamping, float, int)):
            out.append(f"damping={self.damping!r} must be a float > 0 (λ) or a SINGDDamping")
        check_number(out, "alpha1", self.alpha1, low=0.0, high=1.0, high_open=True)
        if self.kfac_like and isinstance(self.alpha1, (int, float)) and self.alpha1 != 0:
            out.append(f"alpha1={self.alpha1!r} must be 0 with kfac_like=True (IKFAC has no Riemannian momentum)")
        if not callable(self.lr_cov):
            check_number(out, "lr_cov", self.lr_cov, low=0.0, low_open=True)
        if not isinstance(self.kfac_like, bool):
            out.append(f"kfac_like={self.kfac_like!r} must be True or False")
        if not isinstance(self.normalize_lr_cov, bool):
            out.append(f"normalize_lr_cov={self.normalize_lr_cov!r} must be True or False")
        s = self.structure
        if not (isinstance(s, str) or (isinstance(s, tuple) and len(s) == 2 and all(isinstance(x, str) for x in s))):
            out.append(f"structure={s!r} must be a registered structure name or a pair (K's, C's) of names")
        f = self.factor_dtype
        pair = f if isinstance(f, tuple) else (f, f)
        if len(pair) != 2 or not all(x is None or isinstance(x, torch.dtype) for x in pair):
            out.append(f"factor_dtype={f!r} must be a torch.dtype, None, or a pair (K's, C's) of them")
        elif any(x is not None and not x.is_floating_point for x in pair):
            out.append(f"factor_dtype={f!r} must be floating-point dtype(s)")
        return out

    # --- resolution ------------------------------------------------------------------------

    def structure_classes(self, registry: Any) -> tuple[type[FactorStructure], type[FactorStructure]]:
        names = (self.structure, self.structure) if isinstance(self.structure, str) else self.structure
        return resolve_structure(names[0], registry), resolve_structure(names[1], registry)

    def dtypes(self) -> tuple[torch.dtype | None, torch.dtype | None]:
        f = self.factor_dtype
        return f if isinstance(f, tuple) else (f, f)  # type: ignore[return-value]

    def check_components(self, registry: Any) -> None:
        self.structure_classes(registry)

    @property
    def lam(self) -> float:
        """λ as a float."""
        d = self.damping
        return float(d.value) if isinstance(d, SINGDDamping) else float(d)

    def beta1(self, step: int) -> float:
        return float(self.lr_cov(step)) if callable(self.lr_cov) else float(self.lr_cov)


@dataclass(frozen=True, kw_only=True)
class IKFACConfig(SINGDConfig):
    """IKFAC: SINGD's options with ``kfac_like=True`` (so α₁ = 0)."""

    kfac_like: bool = True


@dataclass(frozen=True, kw_only=True)
class INGDConfig(SINGDConfig):
    """INGD: SINGD with dense ``K`` and ``C`` (the structure is fixed)."""

    structure: str | tuple[str, str] = field(default="dense", init=False)


class SINGDBlock(CurvatureBlock):
    """Per-layer state of SINGD/IKFAC/INGD: structured ``K``, ``C``, ``m_K``, ``m_C``.

    ``update`` runs the inverse-free Riemannian update (its ``decay`` is not used: SINGD
    has no EMA of statistics); ``refresh`` does nothing (there is nothing to invert);
    ``precondition`` returns ``C Cᵀ ∇ K Kᵀ``. A non-finite ``H_K``, ``H_C`` or new
    momentum skips the update and leaves ``K``, ``C`` and the momenta untouched
    (counted in :attr:`skipped_updates`).
    """

    def __init__(self, info: BlockInfo, config: SINGDConfig, structures: tuple[type[FactorStructure], ...]) -> None:
        super().__init__(info)
        self.config = config
        self.structure_K, self.structure_C = structures
        self.dtype_K, self.dtype_C = config.dtypes()
        self.K: FactorStructure | None = None
        self.C: FactorStructure | None = None
        self.m_K: FactorStructure | None = None
        self.m_C: FactorStructure | None = None
        self.skipped_updates = 0
        # K Kᵀ / C Cᵀ (dense, block-diagonal, arrowhead or diagonal), kept between updates
        # where that saves work (see _dense_square)
        self._P_K: Tensor | FactorStructure | HierarchicalSquare | None = None
        self._P_C: Tensor | FactorStructure | HierarchicalSquare | None = None
        # scratch buffers for intermediate products (see _rmatmul_buffered); not state
        self._buffers: dict[str, Tensor] = {}

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        dk, dc = self.dtype_K or dtype, self.dtype_C or dtype
        self.K = self.structure_K.identity(self.info.d_in, dtype=dk, device=device)
        self.C = self.structure_C.identity(self.info.d_out, dtype=dc, device=device)
        if self.config.alpha1:
            self.m_K = self.structure_K.zeros(self.info.d_in, dtype=dk, device=device)
            self.m_C = self.structure_C.zeros(self.info.d_out, dtype=dc, device=device)
        self._P_K = self._P_C = None

    def batch_is_finite(self, stats: LayerStats) -> bool:
        # SINGD never forms the dense factors A and G: check the scaled rows it works from
        # (the update itself also refuses non-finite results, leaving K, C and momenta alone)
        a_rows, g_rows = stats.rows()
        return all_finite(a_rows) and all_finite(g_rows)

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.K is None:
            self.init(dtype=stats.inputs.dtype, device=stats.inputs.device)
        assert self.K is not None and self.C is not None
        cfg = self.config
        K, C = self.K, self.C
        a_rows, g_rows = stats.rows()
        g = g_rows.reshape(-1, g_rows.shape[-1])
        # H_K = Π̂(Kᵀ X Xᵀ K) = Π̂(S Sᵀ), S = Kᵀ X = (Xᵀ K)ᵀ (rows are Xᵀ)
        H_K = self._gram(self.structure_K, K, a_rows)
        H_C = self._gram(self.structure_C, C, g)
        KtK, CtC = s_inner(K), s_inner(C)
        lam = cfg.lam
        assert cfg.alpha1 is not None
        scale = 0.5 * ((1.0 - cfg.alpha1) if cfg.normalize_lr_cov else 1.0)
        if cfg.kfac_like:
            cK, dK, cC, dC = 1.0, lam, 1.0, lam
        else:
            cK, dK = s_average_trace(H_C), lam * s_average_trace(CtC)
            cC, dC = s_average_trace(H_K), lam * s_average_trace(KtK)
        new_m_K = s_scale_(s_add_identity_(s_add_(s_scale_(H_K, cK), KtK, dK), -1.0), scale)
        new_m_C = s_scale_(s_add_identity_(s_add_(s_scale_(H_C, cC), CtC, dC), -1.0), scale)
        if self.m_K is not None and self.m_C is not None:
            s_add_(new_m_K, self.m_K, cfg.alpha1)
            s_add_(new_m_C, self.m_C, cfg.alpha1)
        if not (new_m_K.is_finite() and new_m_C.is_finite()):
            self.skipped_updates += 1
            return
        step = self.num_updates * cfg.T
        beta_K = beta_C = cfg.beta1(step)
        if cfg.normalize_lr_cov:
            beta_K /= max(1.0, s_max_abs(new_m_K))
            beta_C /= max(1.0, s_max_abs(new_m_C))
        new_K = s_add_(s_clone(K), s_product(K, new_m_K), -beta_K)
        new_C = s_add_(s_clone(C), s_product(C, new_m_C), -beta_C)
        if not (new_K.is_finite() and new_C.is_finite()):
            self.skipped_updates += 1
            return
        self.K, self.C = new_K, new_C
        self._P_K = self._P_C = None
        if self.m_K is not None:
            self.m_K, self.m_C = new_m_K, new_m_C
        self.num_updates += 1

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
        # ∇ K Kᵀ = (K (∇ K)ᵀ)ᵀ, then C (Cᵀ ·) = C (· ᵀ C)ᵀ; with K Kᵀ / C Cᵀ kept (dense
        # or in the structure, both symmetric), one product per side
        x = grad.to(K.dtype)
        P = self._P_K
        if isinstance(P, BlockDiagonalStructure):
            x = self._rmatmul_buffered("P_K", P, x)
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

    @staticmethod
    def _gram(cls: type[FactorStructure], F: FactorStructure, rows: Tensor) -> FactorStructure:
        """``Π̂(Fᵀ XᵀX F)`` from the rows ``X``: ``Π̂(S Sᵀ)`` with ``S = Fᵀ Xᵀ = (X F)ᵀ``, or for
        a block-diagonal (diagonal) ``F`` block by block (entry by entry) from ``X``'s
        diagonal Gram blocks (column sums of squares); for a hierarchical ``F`` from the
        column groups of ``X F`` (no concatenation)."""
        x = rows.to(F.dtype)
        if isinstance(F, (BlockDiagonalStructure, HierarchicalStructure)):
            return F.sandwich_gram(x)
        if isinstance(F, DiagonalStructure):  # diag(F)² ⊙ Σ_rows X², without forming X F
            return DiagonalStructure(F.diag * F.diag * (x * x).sum(0))
        return s_gram(cls, F.rmatmul(x).T)

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
            return F.matrix @ F.matrix.T if d < self.config.T * other else F.matrix.new_empty(0)
        if isinstance(F, (BlockDiagonalStructure, HierarchicalStructure)):
            return F.square()
        if isinstance(F, DiagonalStructure):
            return DiagonalStructure(F.diag * F.diag)
        return torch.empty(0)

    def preconditioner_dense(self) -> tuple[Tensor, Tensor]:
        """``(K Kᵀ, C Cᵀ)`` as dense matrices (for tests and inspection)."""
        assert self.K is not None and self.C is not None
        k, c = self.K.to_dense(), self.C.to_dense()
        return k @ k.T, c @ c.T

    def as_operator(self) -> Any:
        """The curvature the preconditioner inverts, ``(C Cᵀ)⁻¹ ⊗ (K Kᵀ)⁻¹`` (dense)."""
        from curvkit.blocks import KroneckerOperator

        kk, cc = self.preconditioner_dense()
        return KroneckerOperator(torch.linalg.inv(kk.double()).to(kk.dtype), torch.linalg.inv(cc.double()).to(cc.dtype))

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_updates": self.num_updates,
            "skipped_updates": self.skipped_updates,
            "inverse_failures": self.inverse_failures,
        }
        for name in ("K", "C", "m_K", "m_C"):
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value.tensors())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._P_K = self._P_C = None
        self.num_updates = int(state["num_updates"])
        self.skipped_updates = int(state["skipped_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        for name, cls in (
            ("K", self.structure_K),
            ("C", self.structure_C),
            ("m_K", self.structure_K),
            ("m_C", self.structure_C),
        ):
            if name in state:
                setattr(self, name, cls.from_tensors({k: v.clone() for k, v in state[name].items()}))

    def describe(self) -> str:
        mode = "IKFAC" if self.config.kfac_like else "SINGD"
        return (
            f"{mode}(K: {self.structure_K.name} {self.info.d_in}², C: {self.structure_C.name} {self.info.d_out}², "
            f"T={self.config.T})"
        )


def singd_block(info: BlockInfo, config: SINGDConfig, registry: Any) -> SINGDBlock:
    return SINGDBlock(info, config, config.structure_classes(registry))


_BAD: tuple[tuple[dict[str, Any], type[Exception]], ...] = (
    ({"damping": -1.0}, ConfigError),
    ({"alpha1": 1.5}, ConfigError),
    ({"lr_cov": 0.0}, ConfigError),
    ({"T": 0}, ConfigError),
    ({"factor_dtype": "bf16"}, ConfigError),
    ({"kfac_approx": "sideways"}, ConfigError),
)

SINGD_SPEC = MethodSpec(
    name="singd",
    config_cls=SINGDConfig,
    block_factory=singd_block,
    summary="SINGD: inverse-free natural gradient with structured Kronecker factors K, C (bf16-friendly)",
    reference="Lin, Dangel, Eschenhagen, Neklyudov, Kristiadi, Turner & Makhzani (2024), Structured Inverse-Free "
    "Natural Gradient Descent: Memory-Efficient & Numerically-Stable KFAC, ICML, arXiv:2312.05705",
    sample_configs=(
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2},
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2, "structure": ("block3diagonal", "triltoeplitz")},
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2, "structure": "hierarchical3_2", "fisher": "mc"},
    ),
    bad_configs=(*_BAD, ({"structure": "nonesuch"}, Exception), ({"kfac_like": True, "alpha1": 0.5}, ConfigError)),
)

IKFAC_SPEC = MethodSpec(
    name="ikfac",
    config_cls=IKFACConfig,
    block_factory=singd_block,
    summary="IKFAC: inverse-free K-FAC (SINGD with kfac_like=True): K Kᵀ tracks (S_K + λI)⁻¹ without inverses",
    reference="Lin et al. (2024), arXiv:2312.05705, Theorem 1 / Fig. 3",
    sample_configs=({"T": 1, "lr_cov": 0.1, "damping": 1e-2},),
    bad_configs=(*_BAD, ({"alpha1": 0.5}, ConfigError)),
)

INGD_SPEC = MethodSpec(
    name="ingd",
    config_cls=INGDConfig,
    block_factory=singd_block,
    summary="INGD: inverse-free natural gradient with dense K, C and Riemannian momentum (SINGD, dense)",
    reference="Lin, Duruisseaux, Leok, Nielsen, Khan & Schmidt (2023), Simplifying Momentum-based "
    "Positive-definite Submanifold Optimization with Applications to Deep Learning, ICML, arXiv:2302.09738",
    sample_configs=({"T": 1, "lr_cov": 0.1, "damping": 1e-2},),
    bad_configs=_BAD,
)
