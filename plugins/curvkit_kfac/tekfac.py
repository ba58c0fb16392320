r"""TEKFAC (Gao, Liu, Huang, Wang, Wang, Xu & Yu 2020, arXiv:2011.13609): EKFAC
(:mod:`curvkit_kfac.ekfac`) in the eigenbasis of TKFAC's trace-normalised factors Φ, Ψ
(:mod:`curvkit_kfac.tkfac`); without the correction its eigenvalues are
:math:`\delta\lambda_\Psi\lambda_\Phi^\top`. Optionally (``conv_damping="trace"``)
convolution layers use the trace-adaptive damping
:math:`\lambda = \max(\operatorname{tr}\Theta, \vartheta)/\dim\Theta` of Gao et al.'s
Eq. 3.5 (reconstructed from secondary notes, see ``docs/methods/tekfac.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit.blocks import BlockInfo, LayerStats
from curvkit.config import check_number
from curvkit.errors import ConfigError
from curvkit.linalg.basis import warm_eigensolver
from curvkit.methods import MethodSpec
from curvkit_kfac.ekfac import EIGEN_BAD_CONFIGS, EKFACBlock, EKFACConfig
from curvkit_kfac.kfac import GRAD_RATIO_CLIP, KL_CLIP
from curvkit_kfac.tkfac import trace_weighted_statistics

__all__ = ["CONV_DAMPINGS", "TEKFACBlock", "TEKFACConfig", "TEKFAC_SPEC", "tekfac_block"]


#: Legal values of :attr:`TEKFACConfig.conv_damping`.
CONV_DAMPINGS = ("fixed", "trace")


@dataclass(frozen=True, kw_only=True)
class TEKFACConfig(EKFACConfig):
    r"""TEKFAC's options: those of :class:`EKFACConfig` (the eigenbasis now comes from TKFAC's
    trace-normalised factors) plus:

    Args:
        conv_damping: ``"fixed"`` (default): every layer adds the damping's shift λ to
            Θ. ``"trace"``: convolution layers use
            :math:`\lambda = \max(\operatorname{tr}\Theta, \vartheta)/\dim\Theta` instead
            (Gao et al. 2020, Eq. 3.5 — reconstructed, see the docs).
        trace_floor: :math:`\vartheta > 0` of ``conv_damping="trace"``.
    """

    conv_damping: str = "fixed"
    trace_floor: float = 1e-3

    def problems(self) -> list[str]:
        out = super().problems()
        if self.conv_damping not in CONV_DAMPINGS:
            out.append(f"conv_damping={self.conv_damping!r} must be one of {', '.join(map(repr, CONV_DAMPINGS))}")
        check_number(out, "trace_floor", self.trace_floor, low=0.0, low_open=True)
        return out


class TEKFACBlock(EKFACBlock):
    r"""TEKFAC's block: :class:`EKFACBlock` whose factors are TKFAC's un-normalised
    numerators :math:`\delta\Phi` (``A``) and :math:`\delta\Psi` (``G``) with an EMA of
    :math:`\delta`; the eigenbasis is that of :math:`\Phi, \Psi`, and the uncorrected
    eigenvalues are :math:`\delta\lambda_\Psi\lambda_\Phi^\top =
    \lambda_{\delta\Psi}\lambda_{\delta\Phi}^\top/\delta`.

    Args:
        trace_damping: Use :math:`\max(\operatorname{tr}\Theta, \vartheta)/\dim\Theta` as
            the shift instead of the damping's (``conv_damping="trace"`` on a conv layer).
        trace_floor: :math:`\vartheta`.
        **kwargs: As :class:`EKFACBlock`.
    """

    honours_stats_dtype: ClassVar[bool | None] = False  # TKFAC's trace-weighted statistics

    def __init__(self, info: BlockInfo, *, trace_damping: bool = False, trace_floor: float = 1e-3, **kwargs: Any):
        super().__init__(info, **kwargs)
        self.trace_damping = bool(trace_damping)
        self.trace_floor = float(trace_floor)
        self.delta: Tensor | None = None
        self._delta_batch: Tensor | None = None

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        super().init(dtype=dtype, device=device)
        assert self.A is not None
        self.delta = torch.zeros((), dtype=self.A.dtype, device=device)

    def batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        delta, phi, psi = trace_weighted_statistics(stats)
        self._delta_batch = delta
        return phi, psi

    def update(self, stats: LayerStats, decay: float) -> None:
        super().update(stats, decay)
        assert self.delta is not None and self._delta_batch is not None
        self.delta.mul_(decay).add_(self._delta_batch.to(self.delta.dtype), alpha=1 - decay)
        self._delta_batch = None

    def kronecker_eigenvalues(self) -> Tensor:
        assert self.delta is not None
        d = float(self.delta)
        outer = super().kronecker_eigenvalues()
        return outer / d if d > 0 and math.isfinite(d) else torch.zeros_like(outer)

    def damping_shift(self, S: Tensor) -> float:
        if self.trace_damping:
            return max(float(S.sum()), self.trace_floor) / S.numel()
        return self.shift

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.delta is not None:
            out["delta"] = self.delta
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.delta = state["delta"].clone() if "delta" in state else None


def _is_conv(info: BlockInfo) -> bool:
    return issubclass(info.module_type, nn.modules.conv._ConvNd)


def tekfac_block(info: BlockInfo, config: TEKFACConfig, registry: Any) -> TEKFACBlock:
    return TEKFACBlock(
        info,
        structure=config.structure_classes(registry),
        correct_eigenvalues=config.correct_eigenvalues,
        scale_decay=config.scale_ema,
        factor_dtype=config.factor_dtype,
        trace_damping=config.conv_damping == "trace" and _is_conv(info),
        trace_floor=config.trace_floor,
        refresh_tolerance=config.refresh_tolerance,
        eigensolver=warm_eigensolver(config),
        precondition_dtype=config.precondition_dtype,
    )


TEKFAC_SPEC = MethodSpec(
    name="tekfac",
    class_name="TEKFAC",
    config_cls=TEKFACConfig,
    block_factory=tekfac_block,
    summary="TEKFAC: EKFAC's eigenvalue correction in the eigenbasis of TKFAC's trace-normalised factors",
    reference="Gao et al. (2020), Eigenvalue-corrected Natural Gradient Based on a New Approximation, arXiv:2011.13609",
    sample_configs=(
        {"damping": 1e-2},
        {"damping": 1e-2, "fisher": "type-2", "T_inv": 3},
        {"damping": 1e-2, "fisher": "mc", "conv_damping": "trace"},
    ),
    recommended={"lr": 0.03, "momentum": 0.9, "damping": 0.3, "kl_clip": KL_CLIP, "grad_ratio_clip": GRAD_RATIO_CLIP},
    bad_configs=(
        *EIGEN_BAD_CONFIGS,
        ({"conv_damping": "huge"}, ConfigError),
        ({"trace_floor": 0.0}, ConfigError),
    ),
)
