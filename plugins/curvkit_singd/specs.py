"""The method specs of the ``singd`` plugin: SINGD, IKFAC and INGD (their blocks are
:class:`curvkit_singd.singd.SINGDBlock`), with their recommended settings."""

from __future__ import annotations

from typing import Any

import torch

from curvkit.blocks import BlockInfo
from curvkit.errors import ConfigError
from curvkit.methods import MethodSpec, Schedule
from curvkit_singd.config import IKFACConfig, INGDConfig, SINGDConfig
from curvkit_singd.singd import SINGDBlock

__all__ = ["IKFAC_SPEC", "INGD_SPEC", "RECOMMENDED", "SINGD_SCHEDULE", "SINGD_SPEC", "singd_block"]


def singd_block(info: BlockInfo, config: SINGDConfig, registry: Any) -> SINGDBlock:
    return SINGDBlock(info, config, config.structure_classes(registry))


#: SINGD's, IKFAC's and INGD's recommended settings: a sweep on ``curvkit bench``'s tasks (lr
#: {0.01, 0.02, 0.03, 0.05} × λ {1e-3, 1e-2, 0.1} × lr_cov {1e-3, 1e-2, 0.05}, seed 0): λ 1e-3
#: (the package's default) left SINGD's digits loss at 0.4 and diverged with lr_cov 0.05;
#: λ 0.1, lr_cov 0.05, lr 0.03 reached 96.7-97.8 % on digits and 0.89 on the sequence task.
RECOMMENDED: dict[str, Any] = {
    "lr": 0.03,
    "momentum": 0.9,
    "damping": 0.1,
    "lr_cov": 0.05,
    "T": 1,
    "max_factor_step": 0.5,
    "kl_clip": 1e-2,
    "grad_ratio_clip": 100.0,
}

_BAD: tuple[tuple[dict[str, Any], type[Exception]], ...] = (
    ({"damping": -1.0}, ConfigError),
    ({"alpha1": 1.5}, ConfigError),
    ({"lr_cov": 0.0}, ConfigError),
    ({"T": 0}, ConfigError),
    ({"factor_dtype": "bf16"}, ConfigError),
    ({"kfac_approx": "sideways"}, ConfigError),
    ({"precondition_dtype": torch.bfloat16, "structure": "diagonal"}, ConfigError),
    ({"stats_dtype": torch.bfloat16, "structure": "diagonal"}, ConfigError),
    ({"stats_dtype": torch.bfloat16, "factor_dtype": torch.bfloat16}, ConfigError),
)

#: SINGD updates K and C every T steps; nothing is refreshed (K, C are the preconditioner)
#: and there is no EMA (the Riemannian momentum α₁ lives in the block).
SINGD_SCHEDULE = Schedule(statistics_period="T", refresh_period=None, ema_decay=None, damping="damping")

SINGD_SPEC = MethodSpec(
    name="singd",
    class_name="SINGD",
    config_cls=SINGDConfig,
    block_factory=singd_block,
    schedule=SINGD_SCHEDULE,
    summary="SINGD: inverse-free natural gradient with structured Kronecker factors K, C (bf16-friendly)",
    reference="Lin, Dangel, Eschenhagen, Neklyudov, Kristiadi, Turner & Makhzani (2024), Structured Inverse-Free "
    "Natural Gradient Descent: Memory-Efficient & Numerically-Stable KFAC, ICML, arXiv:2312.05705",
    sample_configs=(
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2},
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2, "structure": ("block3diagonal", "triltoeplitz")},
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2, "structure": "hierarchical3_2", "fisher": "mc"},
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2, "structure": "dense", "precondition_dtype": torch.bfloat16},
        {"T": 1, "lr_cov": 0.1, "damping": 1e-2, "structure": "dense", "stats_dtype": torch.bfloat16},
    ),
    bad_configs=(*_BAD, ({"structure": "nonesuch"}, Exception), ({"kfac_like": True, "alpha1": 0.5}, ConfigError)),
    recommended=RECOMMENDED,
)

IKFAC_SPEC = MethodSpec(
    name="ikfac",
    class_name="IKFAC",
    config_cls=IKFACConfig,
    block_factory=singd_block,
    schedule=SINGD_SCHEDULE,
    summary="IKFAC: inverse-free K-FAC (SINGD with kfac_like=True): K Kᵀ tracks (S_K + λI)⁻¹ without inverses",
    reference="Lin et al. (2024), arXiv:2312.05705, Theorem 1 / Fig. 3",
    sample_configs=({"T": 1, "lr_cov": 0.1, "damping": 1e-2},),
    bad_configs=(*_BAD, ({"alpha1": 0.5}, ConfigError)),
    recommended=RECOMMENDED,
)

INGD_SPEC = MethodSpec(
    name="ingd",
    class_name="INGD",
    config_cls=INGDConfig,
    block_factory=singd_block,
    schedule=SINGD_SCHEDULE,
    summary="INGD: inverse-free natural gradient with dense K, C and Riemannian momentum (SINGD, dense)",
    reference="Lin, Duruisseaux, Leok, Nielsen, Khan & Schmidt (2023), Simplifying Momentum-based "
    "Positive-definite Submanifold Optimization with Applications to Deep Learning, ICML, arXiv:2302.09738",
    sample_configs=({"T": 1, "lr_cov": 0.1, "damping": 1e-2},),
    bad_configs=_BAD,
    recommended=RECOMMENDED,
)
