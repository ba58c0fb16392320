r"""K-FAC and KFC (Martens & Grosse 2015; Grosse & Martens 2016), with expand/reduce for
weight sharing (Eschenhagen et al. 2023).

Per layer, :math:`F \approx G\otimes A` with EMA factors
:math:`A \leftarrow \rho A + (1-\rho)A_{\text{batch}}`,
:math:`G \leftarrow \rho G + (1-\rho)G_{\text{batch}}`, and the step direction
:math:`\Delta = (G\otimes A + \text{damping})^{-1}\nabla`, i.e.
:math:`\tilde G^{-1}\nabla\tilde A^{-1}` under factored damping (default: Tikhonov with the π
correction, inverted by Cholesky every ``T_inv`` steps) or
:math:`Q_G[(Q_G^\top\nabla Q_A)\oslash(\lambda_G\lambda_A^\top+\lambda)]Q_A^\top` under exact
damping (``inverter="eigh"``, ``damping=ExactDamping(value=λ)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from curvkit.blocks import BlockInfo, KroneckerBlock
from curvkit.errors import ConfigError, IncompatibleComponentsError, UnknownComponentError
from curvkit.linalg.basis import check_eigensolver
from curvkit.linalg.damping import ExactDamping
from curvkit.methods import KroneckerConfig, MethodSpec, check_precondition_dtype

__all__ = ["GRAD_RATIO_CLIP", "KFACConfig", "KFAC_SPEC", "KL_CLIP", "kfac_block"]

#: The K-FAC family's default trust region (its recommended settings): the KL clip κ (Ba et
#: al. 2017), :math:`\eta^2\nu\langle\Delta, \nabla\rangle \le \kappa` over all layers, ...
KL_CLIP = 1e-2
#: ... and the per-layer norm constraint :math:`\lVert\Delta_l\rVert \le 100\lVert\nabla_l\rVert`
#: that every bundled method carries (at the recommended damping K-FAC's direction stays
#: below 10× the gradient, so it binds only when a step would be orders of magnitude larger).
GRAD_RATIO_CLIP = 100.0


@dataclass(frozen=True, kw_only=True)
class KFACConfig(KroneckerConfig):
    """K-FAC's options: those of :class:`curvkit.methods.KroneckerConfig` (Fisher type,
    ``kfac_approx``, ``ema_decay`` ρ, ``T_stats``, ``T_inv``, ``damping`` λ, ``inverter``,
    ``structure``, ``factor_dtype``) plus:

    Args:
        eigensolver: With ``inverter="eigh"``: ``"exact"`` (default) decomposes every factor
            at every refresh; ``"warm"`` starts from the previous eigenbasis (up to
            ``warm_iterations`` steps of orthogonal iteration) and falls back to ``eigh``
            when the result reproduces the factor worse than ``warm_tolerance``
            (:class:`curvkit.linalg.basis.WarmEigensolver`).
        warm_tolerance: The largest relative reconstruction error
            ``‖F − Q diag(λ) Qᵀ‖_F/‖F‖_F`` a warm start may leave, in ``(0, 1)``.
        warm_iterations: Steps of orthogonal iteration (one QR each) at most, ``>= 0``
            (0: keep the previous basis when it passes the check, else ``eigh``).
        precondition_dtype: dtype of the preconditioning products' operands, ``G̃⁻¹∇Ã⁻¹``
            (or the eigenbasis rotations of ``inverter="eigh"``): ``None`` (default: the
            inverses' own, float32 for float32 factors) or ``torch.bfloat16`` (bf16
            operands, float32 accumulation; the inverses are computed and stored in
            float32 or wider and cast once per refresh; a relative error of about 0.5 %
            in the direction, where bf16 GEMMs are several times faster than float32).
    """

    eigensolver: str = "exact"
    warm_tolerance: float = 0.05
    warm_iterations: int = 1
    precondition_dtype: torch.dtype | None = None

    def problems(self) -> list[str]:
        out = super().problems()
        check_eigensolver(out, self.eigensolver, self.warm_tolerance, self.warm_iterations)
        if self.eigensolver == "warm" and self.inverter != "eigh":
            out.append(
                f"eigensolver='warm' warm-starts the eigendecompositions of inverter='eigh', but inverter="
                f"{self.inverter!r} does not decompose: set inverter='eigh' too, or drop eigensolver"
            )
        check_precondition_dtype(out, self.precondition_dtype, self.structure)
        if self.precondition_dtype is not None and self.inverter not in ("cholesky", "eigh"):
            out.append(
                f"precondition_dtype={self.precondition_dtype} runs the products of inverter='cholesky' or 'eigh' in "
                f"bf16; inverter={self.inverter!r} has none: use one of those two, or drop precondition_dtype"
            )
        return out


def kfac_block(info: BlockInfo, config: KFACConfig, registry: Any) -> KroneckerBlock:
    return KroneckerBlock.from_config(info, config, registry)


KFAC_SPEC = MethodSpec(
    name="kfac",
    class_name="KFAC",
    config_cls=KFACConfig,
    block_factory=kfac_block,
    factor_statistics=True,
    tied_blocks=True,
    diagonal_inputs=True,
    summary="K-FAC / KFC: EMA Kronecker factors, damped inverse every T_inv steps",
    reference="Martens & Grosse (2015), arXiv:1503.05671; Grosse & Martens (2016), arXiv:1602.01407",
    sample_configs=(
        {"damping": 1e-2},
        {"damping": ExactDamping(value=1e-2), "inverter": "eigh", "T_inv": 3},
        {"structure": "diagonal", "damping": 1e-2},
        {"fisher": "type-2", "damping": 1e-2},
        {"damping": ExactDamping(value=1e-2), "inverter": "eigh", "eigensolver": "warm", "T_inv": 2},
        {"damping": 1e-2, "precondition_dtype": torch.bfloat16},
    ),
    recommended={"lr": 0.03, "momentum": 0.9, "damping": 0.1, "kl_clip": KL_CLIP, "grad_ratio_clip": GRAD_RATIO_CLIP},
    bad_configs=(
        ({"ema_decay": 1.5, "T_inv": 0}, ConfigError),
        ({"damping": -1.0}, ConfigError),
        ({"inverter": "cholesky", "damping": ExactDamping(value=1e-3)}, IncompatibleComponentsError),
        ({"inverter": "no-such-inverter"}, UnknownComponentError),
        ({"not_an_option": 1}, ConfigError),
        ({"eigensolver": "warm"}, ConfigError),
        ({"inverter": "eigh", "eigensolver": "lanczos"}, ConfigError),
        ({"precondition_dtype": torch.float16}, ConfigError),
        ({"precondition_dtype": torch.bfloat16, "inverter": "identity"}, ConfigError),
    ),
)
