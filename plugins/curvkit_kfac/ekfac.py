r"""EKFAC (George, Laurent, Bouthillier, Ballas & Vincent — NeurIPS 2018, arXiv:1806.03884).

EKFAC keeps K-FAC's Kronecker eigenbasis, :math:`A = Q_A\Lambda_AQ_A^\top`,
:math:`G = Q_G\Lambda_GQ_G^\top`, but replaces the eigenvalues
:math:`\lambda_G\lambda_A^\top` of :math:`G\otimes A` by the best diagonal in that basis,
the second moments of the per-example gradients :math:`J_n` rotated into it,

.. math::
    S = \mathbb E\big[(Q_G^\top J_n Q_A)^{\circ 2}\big] \in \mathbb R^{d_\text{out}\times d_\text{in}},
    \qquad
    \Delta = Q_G\big[(Q_G^\top\nabla Q_A)\oslash(S + \varepsilon)\big]Q_A^\top .

Schedule (per layer): the factors are EMAs as in K-FAC; every ``T_inv`` steps
:meth:`EKFACBlock.refresh` re-computes the eigenbasis and **restarts** ``S`` — from the
same step's batch when one is pending, else from K-FAC's eigenvalues
:math:`\lambda_G\lambda_A^\top` (as the authors' code does); between refreshes each
statistics batch is folded into ``S`` as an EMA with weight
:math:`\min(1 - 1/k, \rho_S)`, ``k`` counting the batches since the restart. Because the
preconditioner calls ``update()`` before ``refresh()`` on a step that does both, a batch is
kept pending and projected lazily, after the basis is fresh. ``ε`` is an eigenbasis damping
(default :class:`~curvkit.linalg.damping.ExactDamping`; its shift is added to ``S``).
With ``correct_eigenvalues=False``, ``S = λ_G λ_Aᵀ`` and EKFAC *is* K-FAC with
``inverter="eigh"`` and exact damping.

TEKFAC, EKFAC in TKFAC's eigenbasis, is :mod:`curvkit_kfac.tekfac`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.blocks import BlockInfo, CurvatureBlock, LayerStats, as_structure, input_structure, products_note
from curvkit.config import check_number
from curvkit.errors import ConfigError, UnknownComponentError
from curvkit.linalg.basis import (
    WarmEigensolver,
    check_eigensolver,
    check_refresh_tolerance,
    reuse_basis,
    warm_eigensolver,
)
from curvkit.linalg.damping import Damping, ExactDamping, PiDamping, RelativeDamping
from curvkit.linalg.inverters import EigenInverse, compute_dtype, symmetric_eigh
from curvkit.linalg.kronecker import EigenbasisOperator
from curvkit.methods import KroneckerConfig, MethodSpec, check_precondition_dtype
from curvkit.numerics import all_finite
from curvkit.stats.eigenbasis import rotated_second_moments
from curvkit.structures.base import FactorStructure
from curvkit_kfac.kfac import GRAD_RATIO_CLIP, KL_CLIP

__all__ = [
    "EKFACBlock",
    "EKFACConfig",
    "EKFAC_SPEC",
    "EigenbasisOperator",
    "ekfac_block",
    "rotated_second_moments",
]


@dataclass(frozen=True, kw_only=True)
class EKFACConfig(KroneckerConfig):
    r"""EKFAC's options: those of :class:`curvkit.methods.KroneckerConfig` (Fisher type,
    ``kfac_approx``, ``ema_decay`` ρ of the factors, ``T_stats``, ``T_inv`` — the eigenbasis
    period, ``structure``, ``factor_dtype``) plus:

    Args:
        damping: An **eigenbasis** damping whose shift ε is added to the corrected
            eigenvalues; a float ``ε`` means ``ExactDamping(value=ε)`` (default ``1e-3``).
        inverter: Must be ``"eigh"`` (the default): the method works in the factors'
            eigenbasis.
        correct_eigenvalues: Re-estimate the eigenvalues from per-example gradients
            (EKFAC); ``False`` keeps K-FAC's :math:`\lambda_G\lambda_A^\top`.
        scale_decay: EMA decay :math:`\rho_S` of the corrected eigenvalues between two
            refreshes (``None``: ``ema_decay``).
        refresh_tolerance: Skip a refresh's eigendecompositions while the old eigenbasis
            still diagonalises the new factors: when the relative off-diagonal mass of
            ``QᵀFQ`` is at most this value for both factors, the basis is kept and the
            eigenvalues become ``diag(QᵀFQ)`` (:mod:`curvkit.linalg.basis`). In ``[0, 1)``;
            0 (default) always decomposes.
        eigensolver: ``"exact"`` (default): a refresh that decomposes runs ``eigh``;
            ``"warm"``: it starts from the previous eigenbasis (up to ``warm_iterations``
            steps of orthogonal iteration) and falls back to ``eigh`` when the result
            reproduces the factor worse than ``warm_tolerance``
            (:class:`curvkit.linalg.basis.WarmEigensolver`).
        warm_tolerance: The largest relative reconstruction error
            ``‖F − Q diag(λ) Qᵀ‖_F/‖F‖_F`` a warm start may leave, in ``(0, 1)``.
        warm_iterations: Steps of orthogonal iteration (one QR each) at most, ``>= 0``
            (0: keep the previous basis when it passes the check, else ``eigh``).
        precondition_dtype: dtype of the operands of the preconditioning's rotations into
            and out of the eigenbasis: ``None`` (default: the basis's own) or
            ``torch.bfloat16`` (bf16 operands, float32 accumulation; the division by the
            corrected eigenvalues stays in float32, the basis is stored in float32).
    """

    damping: Damping | float = field(default_factory=lambda: ExactDamping(value=1e-3))
    inverter: str = "eigh"
    correct_eigenvalues: bool = True
    scale_decay: float | None = None
    refresh_tolerance: float = 0.0
    eigensolver: str = "exact"
    warm_tolerance: float = 0.05
    warm_iterations: int = 1
    precondition_dtype: torch.dtype | None = None
    default_damping: Any = field(default=ExactDamping, init=False, repr=False, compare=False)

    def problems(self) -> list[str]:
        out = super().problems()
        method = type(self).__name__.removesuffix("Config")
        if not isinstance(self.correct_eigenvalues, bool):
            out.append(f"correct_eigenvalues={self.correct_eigenvalues!r} must be True or False")
        check_number(out, "scale_decay", self.scale_decay, low=0.0, high=1.0, high_open=True, optional=True)
        check_refresh_tolerance(out, self.refresh_tolerance)
        check_eigensolver(out, self.eigensolver, self.warm_tolerance, self.warm_iterations)
        check_precondition_dtype(out, self.precondition_dtype, self.structure)
        if isinstance(self.inverter, str) and self.inverter != "eigh":
            out.append(
                f"inverter={self.inverter!r} cannot be used by {method}: it divides the gradient by re-estimated "
                "eigenvalues in the factors' eigenbasis, which needs inverter='eigh' (the default); drop the option"
            )
        if isinstance(self.damping, Damping) and self.damping.kind != "eigenbasis":
            out.append(
                f"damping={self.damping!r} is a {self.damping.kind!r} damping, but {method} adds its damping to the "
                "(corrected) eigenvalues of the Kronecker product: use an eigenbasis damping such as "
                "ExactDamping(value=1e-3), RelativeDamping(on='product') or LevenbergMarquardtDamping(inner='exact'), "
                "or a float (meaning ExactDamping)"
            )
        return out

    @property
    def scale_ema(self) -> float:
        """:math:`\\rho_S`."""
        return float(self.ema_decay if self.scale_decay is None else self.scale_decay)


class EKFACBlock(CurvatureBlock):
    r"""EKFAC's block (see the module docstring).

    State: EMA factors ``A``, ``G`` (in their structures), the eigenbasis ``Q_A``, ``Q_G``
    with eigenvalues ``eig_A``, ``eig_G`` (from the last refresh), the ``(d_out, d_in)``
    eigenvalue estimate ``S`` and the number of batches folded into it since the last
    refresh, and the damping shift fixed at the last refresh.

    Args:
        info: The layer.
        structure: Factor structure class(es) of ``A`` and ``G``.
        correct_eigenvalues: Re-estimate ``S`` from per-example gradients.
        scale_decay: :math:`\rho_S`.
        factor_dtype: dtype of the stored factors (default: the statistics').
        refresh_tolerance: Keep the eigenbasis at a refresh while it diagonalises both new
            factors within this relative off-diagonal mass (0: always decompose);
            :attr:`skipped_refreshes` counts the refreshes that kept it.
        eigensolver: A :class:`~curvkit.linalg.basis.WarmEigensolver` for the refreshes
            that decompose (``None``, the default: the exact ``eigh``).
        precondition_dtype: dtype of the rotations' operands (``None``: the basis's own;
            :meth:`~curvkit.linalg.inverters.EigenInverse.with_product_dtype`).
    """

    honours_stats_dtype: ClassVar[bool | None] = True  # batch_factors: stats.A(), stats.G()

    def __init__(
        self,
        info: BlockInfo,
        *,
        structure: type[FactorStructure] | tuple[type[FactorStructure], type[FactorStructure]],
        correct_eigenvalues: bool = True,
        scale_decay: float = 0.95,
        factor_dtype: torch.dtype | None = None,
        refresh_tolerance: float = 0.0,
        eigensolver: WarmEigensolver | None = None,
        precondition_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(info)
        self.eigensolver = eigensolver
        self.precondition_dtype = precondition_dtype
        self.refresh_tolerance = float(refresh_tolerance)
        #: Refreshes that kept the eigenbasis (``refresh_tolerance``).
        self.skipped_refreshes = 0
        self.structure_A, self.structure_G = structure if isinstance(structure, tuple) else (structure, structure)
        self.structure_A = input_structure(info, self.structure_A)  # an embedding's A: diagonal
        self.correct_eigenvalues = bool(correct_eigenvalues)
        self.scale_decay = float(scale_decay)
        self.factor_dtype = factor_dtype
        self.A: FactorStructure | None = None
        self.G: FactorStructure | None = None
        self.Q_A: Tensor | None = None
        self.Q_G: Tensor | None = None
        self.eig_A: Tensor | None = None
        self.eig_G: Tensor | None = None
        self.S: Tensor | None = None
        self.scale_updates = 0
        self.shift = 0.0
        self._pending: LayerStats | None = None
        self._inverse: EigenInverse | None = None

    # --- the statistic (TEKFAC overrides these two) ------------------------------------------

    def batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        """The batch's ``(A, G)`` whose EMAs define the eigenbasis."""
        return stats.A(), stats.G()

    def kronecker_eigenvalues(self) -> Tensor:
        r"""The uncorrected eigenvalues of the block, :math:`\lambda_G\lambda_A^\top`."""
        assert self.eig_A is not None and self.eig_G is not None
        return torch.outer(self.eig_G, self.eig_A)

    def damping_shift(self, S: Tensor) -> float:
        """The shift added to ``S`` (the damping's, fixed at the last refresh)."""
        return self.shift

    # --- the five verbs ------------------------------------------------------------------------

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        dtype = self.factor_dtype or dtype
        self.A = self.structure_A.zeros(self.info.d_in, dtype=dtype, device=device)
        self.G = self.structure_G.zeros(self.info.d_out, dtype=dtype, device=device)

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.A is None:
            self.init(dtype=stats.dtype, device=stats.device)
        assert self.A is not None and self.G is not None
        self._fold_pending()  # a batch nobody preconditioned with goes into the current basis
        a, g = self.take_batch_factors(stats)
        self.A.ema_(as_structure(self.structure_A, a.to(self.A.dtype)), decay)
        self.G.ema_(as_structure(self.structure_G, g.to(self.G.dtype)), decay)
        self.num_updates += 1
        if self.correct_eigenvalues:
            self._pending = stats

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.A is not None and self.G is not None, "refresh() before the first update()"
        self._inverse = None
        kept = self._reused_eigenvalues()
        if kept is not None:
            self.skipped_refreshes += 1
            ea, eg = (kept[0], self.Q_A), (kept[1], self.Q_G)
        elif self.eigensolver is not None:  # warm-started from the current basis
            ea, eg = self.eigensolver.decompose(self.A, self.Q_A), self.eigensolver.decompose(self.G, self.Q_G)
        else:
            ea, eg = symmetric_eigh(self.A), symmetric_eigh(self.G)
        if ea is None or eg is None:
            self.inverse_failures += 1
            if self.Q_A is None:  # no basis yet: the identity, no curvature (the damping alone)
                dtype = compute_dtype(self.A.dtype)
                empty = torch.empty(0, dtype=dtype, device=self.A.device)
                self.Q_A, self.Q_G = empty, empty.clone()
                self.eig_A = torch.zeros(self.info.d_in, dtype=dtype, device=self.A.device)
                self.eig_G = torch.zeros(self.info.d_out, dtype=dtype, device=self.A.device)
                self.S = self.kronecker_eigenvalues()
                self.scale_updates = 1
            assert self.eig_A is not None and self.eig_G is not None
            self.shift = float(damping.product_shift(self.eig_A, self.eig_G, lam))
            return
        (self.eig_A, self.Q_A), (self.eig_G, self.Q_G) = ea, eg
        self.shift = float(damping.product_shift(self.eig_A, self.eig_G, lam))
        pending, self._pending = self._pending, None
        batch = self._batch_scaling(pending) if pending is not None else None
        if batch is not None and all_finite(batch):
            self.S = batch
        else:
            self.skipped_updates += batch is not None
            self.S = self.kronecker_eigenvalues()
        self.scale_updates = 1

    def precondition(self, grad: Tensor) -> Tensor:
        if self.Q_A is None:
            raise RuntimeError(f"block {self.info.name!r}: precondition() before the first refresh()")
        return self._ready_inverse().apply(grad)  # type: ignore[union-attr]

    def _ready_inverse(self) -> EigenInverse | None:
        """The inverse :meth:`precondition` applies (built as it would build it)."""
        if self.Q_A is None:
            return None
        self._fold_pending()
        if self._inverse is None:
            assert self.Q_G is not None and self.S is not None
            denom = self.S + self.damping_shift(self.S)
            # only a zero shift with a direction that never saw a gradient gives 0: leave it unscaled
            denom = torch.where(denom > 0, denom, torch.ones_like(denom))
            self._inverse = EigenInverse(self.Q_A, self.Q_G, denom, product_dtype=self.precondition_dtype)
        return self._inverse

    def batch_key(self) -> Any:
        # blocks of equal shapes are preconditioned together (four batched products), unless a
        # subclass brings its own precondition
        if type(self).precondition is not EKFACBlock.precondition:
            return None
        inverse = self._ready_inverse()
        key = None if inverse is None else inverse.batch_key()
        return None if key is None else ("ekfac", key)

    @classmethod
    def precondition_many(cls, blocks: Any, grads: Tensor) -> Tensor:
        inverses = [b._ready_inverse() for b in blocks]
        return EigenInverse.apply_many(inverses, grads)  # type: ignore[arg-type]

    def as_operator(self) -> EigenbasisOperator:
        """The undamped estimate :math:`(Q_G\\otimes Q_A)\\,\\mathrm{diag}(S)\\,(Q_G\\otimes Q_A)^\\top`
        (the core's :class:`~curvkit.linalg.kronecker.EigenbasisOperator`)."""
        if self.Q_A is None:
            raise RuntimeError(f"block {self.info.name!r}: as_operator() before the first refresh()")
        self._fold_pending()
        assert self.Q_G is not None and self.S is not None
        return EigenbasisOperator(self.Q_A, self.Q_G, self.S, label=self.info.name)

    # --- internals -------------------------------------------------------------------------

    def _reused_eigenvalues(self) -> tuple[Tensor, Tensor] | None:
        """``(eig_A, eig_G)`` in the current basis when it still diagonalises both factors
        within ``refresh_tolerance`` (:func:`curvkit.linalg.basis.reuse_basis`), else ``None``."""
        if self.refresh_tolerance <= 0 or self.Q_A is None or self.Q_G is None:
            return None
        if self.Q_A.numel() == 0 or self.Q_G.numel() == 0:  # a diagonal factor (or none): decomposing is cheap
            return None
        eig_a = reuse_basis(self.A, self.Q_A, self.refresh_tolerance)
        if eig_a is None:
            return None
        eig_g = reuse_basis(self.G, self.Q_G, self.refresh_tolerance)
        return None if eig_g is None else (eig_a.to(self.Q_A.dtype), eig_g.to(self.Q_G.dtype))

    def _batch_scaling(self, stats: LayerStats) -> Tensor:
        assert self.Q_A is not None and self.Q_G is not None and self.eig_A is not None
        return rotated_second_moments(stats, self.Q_A, self.Q_G, self.eig_A.dtype)

    def _fold_pending(self) -> None:
        """Fold a pending batch into ``S`` in the current basis (EMA since the last refresh)."""
        pending, self._pending = self._pending, None
        if pending is None or self.S is None or not self.correct_eigenvalues:
            return
        batch = self._batch_scaling(pending)
        if not all_finite(batch):  # the rotated second moments overflowed: keep S
            self.skipped_updates += 1
            return
        self.scale_updates += 1
        decay = min(1.0 - 1.0 / self.scale_updates, self.scale_decay)
        self.S = self.S * decay + batch * (1.0 - decay)
        self._inverse = None

    # --- data-parallel training: one rank refreshes, the others install its result -----------

    def refresh_state(self) -> dict[str, Any] | None:
        out: dict[str, Any] = {
            "inverse_failures": self.inverse_failures,
            "scale_updates": self.scale_updates,
            "shift": self.shift,
            # a failed decomposition leaves the pending batch for the current basis
            "keeps_pending": self._pending is not None,
        }
        if self.Q_A is not None:
            for key in self._BASIS_KEYS:
                out[key] = getattr(self, key)
        return out

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        self.inverse_failures = int(state["inverse_failures"])
        self.scale_updates = int(state["scale_updates"])
        self.shift = float(state["shift"])
        if not state["keeps_pending"]:
            self._pending = None
        self._inverse = None
        for key in self._BASIS_KEYS:
            if key in state:
                setattr(self, key, state[key])

    # --- checkpoints -----------------------------------------------------------------------

    _BASIS_KEYS = ("Q_A", "Q_G", "eig_A", "eig_G", "S")

    def state_dict(self) -> dict[str, Any]:
        self._fold_pending()
        out: dict[str, Any] = {
            "num_updates": self.num_updates,
            "inverse_failures": self.inverse_failures,
            "scale_updates": self.scale_updates,
            "shift": self.shift,
        }
        if self.A is not None and self.G is not None:
            out["A"] = dict(self.A.tensors())
            out["G"] = dict(self.G.tensors())
        if self.Q_A is not None:
            for key in self._BASIS_KEYS:
                out[key] = getattr(self, key)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        self.scale_updates = int(state["scale_updates"])
        self.shift = float(state["shift"])
        self._pending = None
        self._inverse = None
        if "A" in state:
            self.A = self.structure_A.from_tensors({k: v.clone() for k, v in state["A"].items()})
            self.G = self.structure_G.from_tensors({k: v.clone() for k, v in state["G"].items()})
        for key in self._BASIS_KEYS:
            setattr(self, key, state[key].clone() if key in state else None)

    def describe(self) -> str:
        mode = "corrected eigenvalues" if self.correct_eigenvalues else "K-FAC eigenvalues"
        if self.refresh_tolerance > 0:
            mode += f", basis kept at {self.skipped_refreshes} refresh(es) (tolerance {self.refresh_tolerance:g})"
        if self.eigensolver is not None:
            mode += f", {self.eigensolver.describe()}"
        mode += products_note(self.precondition_dtype)
        return (
            f"{type(self).__name__}(A: {self.structure_A.name} {self.info.d_in}², "
            f"G: {self.structure_G.name} {self.info.d_out}², {mode})"
        )


def ekfac_block(info: BlockInfo, config: EKFACConfig, registry: Any) -> EKFACBlock:
    return EKFACBlock(
        info,
        structure=config.structure_classes(registry),
        correct_eigenvalues=config.correct_eigenvalues,
        scale_decay=config.scale_ema,
        factor_dtype=config.factor_dtype,
        refresh_tolerance=config.refresh_tolerance,
        eigensolver=warm_eigensolver(config),
        precondition_dtype=config.precondition_dtype,
    )


EIGEN_BAD_CONFIGS: tuple[tuple[dict[str, Any], type[Exception]], ...] = (
    ({"ema_decay": 1.5, "T_inv": 0}, ConfigError),
    ({"damping": -1.0}, ConfigError),
    ({"inverter": "cholesky"}, ConfigError),
    ({"damping": PiDamping(value=1e-3)}, ConfigError),
    ({"scale_decay": 1.0}, ConfigError),
    ({"correct_eigenvalues": "yes"}, ConfigError),
    ({"structure": "no-such-structure"}, UnknownComponentError),
    ({"not_an_option": 1}, ConfigError),
    ({"eigensolver": "warm", "warm_tolerance": 0.0}, ConfigError),
    ({"eigensolver": "warm", "warm_iterations": -1}, ConfigError),
    ({"precondition_dtype": torch.float16}, ConfigError),
)

EKFAC_SPEC = MethodSpec(
    name="ekfac",
    class_name="EKFAC",
    config_cls=EKFACConfig,
    block_factory=ekfac_block,
    tied_blocks=True,
    diagonal_inputs=True,
    summary="EKFAC: K-FAC's eigenbasis with eigenvalues re-estimated from per-example gradients (+ ε)",
    reference="George, Laurent, Bouthillier, Ballas & Vincent (2018), Fast Approximate Natural Gradient Descent "
    "in a Kronecker-factored Eigenbasis, NeurIPS, arXiv:1806.03884",
    sample_configs=(
        {"damping": 1e-2},
        {"damping": 1e-2, "fisher": "type-2", "T_inv": 3},
        {"damping": RelativeDamping(value=1e-2, on="product"), "fisher": "mc", "scale_decay": 0.75},
        {"damping": 1e-2, "T_inv": 2, "eigensolver": "warm"},
        {"damping": 1e-2, "precondition_dtype": torch.bfloat16},
    ),
    recommended={"lr": 0.03, "momentum": 0.9, "damping": 0.3, "kl_clip": KL_CLIP, "grad_ratio_clip": GRAD_RATIO_CLIP},
    bad_configs=EIGEN_BAD_CONFIGS,
)
