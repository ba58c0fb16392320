"""SINGD's, IKFAC's and INGD's options (:class:`SINGDConfig` and its variants) and its
damping, in the paper's symbols (see :mod:`curvkit_singd.singd` for the update)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from curvkit.config import check_number
from curvkit.errors import ConfigError
from curvkit.linalg.damping import ScalarDamping
from curvkit.methods import StatisticsConfig, check_precondition_dtype, has_dense_sides
from curvkit.structures.base import FactorStructure
from curvkit_singd.structures import resolve_structure

__all__ = ["DTypeSpec", "IKFACConfig", "INGDConfig", "SINGDConfig", "SINGDDamping"]

DTypeSpec = torch.dtype | None | tuple[torch.dtype | None, torch.dtype | None]


@dataclass(frozen=True, kw_only=True)
class SINGDDamping(ScalarDamping):
    """SINGD's damping λ: it enters only the ``m_K``/``m_C`` updates, as ``λ KᵀK`` and
    ``λ CᵀC`` (trace-coupled unless ``kfac_like``); nothing is ever inverted."""

    name: ClassVar[str] = "singd"


@dataclass(frozen=True, kw_only=True)
class SINGDConfig(StatisticsConfig):
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
        max_factor_step: Bound on a factor step: β₁ is shortened so that
            :math:`\beta_1\lVert m_K\rVert_2 \le` ``max_factor_step`` (likewise for ``C``;
            the norm estimated by three power iterations), so ``K ← K(I − β₁m_K)``
            changes ``K``'s singular values by at most about that fraction and one outlier
            batch cannot blow ``K`` or ``C`` up. ``None`` (the
            paper's update, the field default) is off; the recommended settings use 0.5,
            which normal training stays far below (β₁‖m_K‖ ≤ 0.04 on ``curvkit bench``'s
            tasks), so it does not change a run that needs no bound.
        precondition_dtype: With ``structure="dense"``: dtype of the preconditioning
            products' operands, ``∇ K Kᵀ`` and ``C Cᵀ ·`` — ``None`` (default: the factors'
            dtype) or ``torch.bfloat16`` (bf16 operands, float32 accumulation; ``K``,
            ``C``, their momenta and the update stay in ``factor_dtype``; the bf16 copies
            are made once per factor update).
    """

    damping: SINGDDamping | float = field(default_factory=lambda: SINGDDamping(value=1e-3))
    alpha1: float | None = None
    lr_cov: float | Callable[[int], float] = 1e-2
    T: int = 10
    structure: str | tuple[str, str] = "dense"
    kfac_like: bool = False
    normalize_lr_cov: bool = False
    factor_dtype: DTypeSpec = None
    max_factor_step: float | None = None
    precondition_dtype: torch.dtype | None = None

    def normalise(self) -> list[str]:
        out = super().normalise()
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
        check_number(out, "T", self.T, low=1, integer=True)
        if not isinstance(self.damping, (SINGDDamping, float, int)):
            out.append(f"damping={self.damping!r} must be a float > 0 (λ) or a SINGDDamping")
        check_number(out, "alpha1", self.alpha1, low=0.0, high=1.0, high_open=True)
        check_number(out, "max_factor_step", self.max_factor_step, low=0.0, low_open=True, optional=True)
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
        check_precondition_dtype(out, self.precondition_dtype, s, every_side_dense=True)
        f = self.factor_dtype
        pair = f if isinstance(f, tuple) else (f, f)
        if len(pair) != 2 or not all(x is None or isinstance(x, torch.dtype) for x in pair):
            out.append(f"factor_dtype={f!r} must be a torch.dtype, None, or a pair (K's, C's) of them")
        elif any(x is not None and not x.is_floating_point for x in pair):
            out.append(f"factor_dtype={f!r} must be floating-point dtype(s)")
        if self.stats_dtype is torch.bfloat16:
            grams = "stats_dtype=torch.bfloat16 runs the dense Gram products of the update (Kᵀ XᵀX K, Cᵀ GᵀG C) in bf16"
            if isinstance(s, str | tuple) and not has_dense_sides(s, every_side=True):
                out.append(
                    f"{grams}, but structure={s!r} has structured factors, whose grams are no dense products: it "
                    "would have no effect there; use structure='dense' or drop stats_dtype"
                )
            elif any(x in (torch.float16, torch.bfloat16) for x in pair):
                out.append(
                    f"{grams}, but factor_dtype={f!r} keeps a factor in 16 bits, whose grams already run in its own "
                    "dtype: it would have no effect there; drop stats_dtype or keep the factors in float32"
                )
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
