r"""RS-KFAC and SRE-KFAC (Puiu 2022, "Randomized K-FACs", arXiv:2206.15397).

K-FAC's EMA factors :math:`A \leftarrow \rho A + (1-\rho)A_{\text{batch}}` (and ``G``), but
every ``T_inv`` steps each factor is replaced by its top-``r`` eigenpairs computed by
randomized linear algebra (randomized SVD for RS-KFAC, a symmetric randomized
eigendecomposition for SRE-KFAC) and the step is

.. math:: \Delta = (G_r + \lambda_G I)^{-1}\,\nabla\,(A_r + \lambda_A I)^{-1},
   \qquad \lambda_A = \lambda\max(d_A),\ \lambda_G = \lambda\max(d_G)

applied by the low-rank formula of :mod:`curvkit_lowrank.lowrank` in :math:`O(r\,d_i d_o)`.
The inversion costs :math:`O(q\,d^2\ell)` instead of :math:`O(d^3)`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from curvkit.blocks import BlockInfo, KroneckerBlock
from curvkit.config import check_number
from curvkit.errors import ConfigError, IncompatibleComponentsError, UnknownComponentError
from curvkit.linalg.damping import Damping, ExactDamping, RelativeDamping
from curvkit.linalg.inverters import IdentityInverse
from curvkit.methods import KroneckerConfig, MethodSpec
from curvkit_lowrank.lowrank import RandomizedInverter

__all__ = [
    "RECOMMENDED",
    "LowRankKroneckerBlock",
    "RSKFACConfig",
    "RS_KFAC_SPEC",
    "SREKFACConfig",
    "SRE_KFAC_SPEC",
    "randomized_kfac_block",
]


class LowRankKroneckerBlock(KroneckerBlock):
    """A :class:`~curvkit.blocks.KroneckerBlock` whose inverter is a
    :class:`~curvkit_lowrank.lowrank.RandomizedInverter`.

    It seeds refresh ``i``'s sketches from ``i`` (saved in ``state_dict``, so a resumed run
    draws the same sketches), and, if the very
    first refresh fails (e.g. an all-zero factor under relative damping, which has no
    valid shift), falls back to the identity.
    """

    inverter: RandomizedInverter

    def __init__(self, info: BlockInfo, *, inverter: RandomizedInverter, **kwargs: Any) -> None:
        super().__init__(info, inverter=inverter, **kwargs)
        self.refreshes = 0

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.A is not None and self.G is not None, "refresh() before the first update()"
        inverse = self.inverter.prepare(self.A, self.G, damping, lam, seed=self.refreshes)
        self.refreshes += 1
        if inverse is None:
            self.inverse_failures += 1
            if self.inverse is None:
                self.inverse = IdentityInverse()
            return
        self.inverse = inverse

    def refresh_state(self) -> dict[str, Any] | None:
        out = super().refresh_state()
        assert out is not None
        out["refreshes"] = self.refreshes
        return out

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        super().load_refresh_state(state)
        self.refreshes = int(state["refreshes"])

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["refreshes"] = self.refreshes
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.refreshes = int(state.get("refreshes", 0))

    def describe(self) -> str:
        out = (
            f"{type(self).__name__}(A: {self.info.d_in}², G: {self.info.d_out}², {self.inverter.describe()}, "
            f"kept ranks A {min(self.info.d_in, self.inverter.rank)}, G {min(self.info.d_out, self.inverter.rank)})"
        )
        if isinstance(self.inverse, IdentityInverse) and self.inverse_failures:
            out += f" — every refresh so far failed ({self.inverse_failures}): identity, a first-order step"
        elif self.inverse_failures:
            out += f" — {self.inverse_failures} failed refresh(es), the last good inverse kept"
        return out


_RELATIVE_FACTORS = functools.partial(RelativeDamping, on="factors")


@dataclass(frozen=True, kw_only=True)
class RSKFACConfig(KroneckerConfig):
    r"""RS-KFAC's options (defaults: the author's optimizer class, github:ConstantinPuiu/Randomized-KFACs).

    Args:
        rank: :math:`r`, eigenpairs kept per factor (``rsvd_rank``, 220).
        oversampling: :math:`p`, extra sketch columns (``oversampling_parameter``, 10).
        niter: :math:`q`, power iterations (``rsvd_niter``, 3).
        seed: Seed of the Gaussian sketches.
        ema_decay: :math:`\rho` (``stat_decay``, 0.95).
        T_stats: ``TCov`` (10).
        T_inv: ``TInv`` (100).
        damping: :math:`\lambda`; a float means ``RelativeDamping(value=λ, on="factors")``,
            i.e. :math:`\lambda_A = \lambda\max(d_A)`, :math:`\lambda_G = \lambda\max(d_G)`
            (1e-3; the CIFAR-10 runs used 0.1 → 0.05 → 0.01).
        inverter: ``"rsvd"`` (RS-KFAC) or ``"sre"`` (SRE-KFAC).
    """

    rank: int = 220
    oversampling: int = 10
    niter: int = 3
    seed: int = 0
    T_stats: int = 10
    T_inv: int = 100
    damping: Damping | float = field(default_factory=lambda: RelativeDamping(value=1e-3, on="factors"))
    inverter: str = "rsvd"
    default_damping: Any = field(default=_RELATIVE_FACTORS, init=False, repr=False, compare=False)

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "rank", self.rank, low=1, integer=True)
        check_number(out, "oversampling", self.oversampling, low=0, integer=True)
        check_number(out, "niter", self.niter, low=0, integer=True)
        check_number(out, "seed", self.seed, low=0, integer=True)
        return out

    def inverter_object(self, registry: Any) -> RandomizedInverter:
        registered = registry.inverters.get(self.inverter)
        cls = registered if isinstance(registered, type) else type(registered)
        if not issubclass(cls, RandomizedInverter):
            raise IncompatibleComponentsError(
                f"inverter={self.inverter!r} is not a randomized low-rank inverter; "
                "RS-KFAC and SRE-KFAC need inverter='rsvd' or 'sre'"
            )
        return cls(rank=self.rank, oversampling=self.oversampling, niter=self.niter, seed=self.seed)


@dataclass(frozen=True, kw_only=True)
class SREKFACConfig(RSKFACConfig):
    """SRE-KFAC's options: as :class:`RSKFACConfig` with ``inverter="sre"`` (defaults of the
    author's ``SRE_KFACOptimizer``, identical to RS-KFAC's)."""

    inverter: str = "sre"


def randomized_kfac_block(info: BlockInfo, config: RSKFACConfig, registry: Any) -> LowRankKroneckerBlock:
    return LowRankKroneckerBlock(
        info,
        structure=config.structure_classes(registry),
        inverter=config.inverter_object(registry),
        factor_dtype=config.factor_dtype,
    )


#: The low-rank family's recommended settings (digits MLP to ≥ 95 % in 10 epochs). Trust
#: region: Puiu's per-layer RMS clip, and ‖Δ_l‖ ≤ 100‖∇_l‖ per layer — relative damping
#: (λ·λ_max) has no floor, so without it the direction reached 5·10³× the gradient on
#: ``curvkit bench``'s CNN (the bound changes no accuracy there by more than 0.2 points).
RECOMMENDED: dict[str, Any] = {
    "lr": 0.03,
    "momentum": 0.9,
    "damping": 0.1,
    "rank": 20,
    "T_stats": 1,
    "T_inv": 10,
    "rms_clip": 0.07,
    "grad_ratio_clip": 100.0,
}

_SAMPLES: tuple[dict[str, Any], ...] = (
    {"damping": 0.1, "T_stats": 1, "T_inv": 3, "rank": 4},
    {"damping": ExactDamping(value=1e-2), "T_stats": 1, "T_inv": 3, "rank": 6},
    {"fisher": "type-2", "damping": 0.2, "T_stats": 1, "T_inv": 2, "rank": 3, "oversampling": 2},
)
_BAD: tuple[tuple[dict[str, Any], type[Exception]], ...] = (
    ({"rank": 0, "niter": -1}, ConfigError),
    ({"oversampling": 1.5}, ConfigError),
    ({"damping": -1.0}, ConfigError),
    ({"inverter": "cholesky"}, IncompatibleComponentsError),
    ({"inverter": "no-such-inverter"}, UnknownComponentError),
    ({"not_an_option": 1}, ConfigError),
)

RS_KFAC_SPEC = MethodSpec(
    name="rs-kfac",
    class_name="RSKFAC",
    config_cls=RSKFACConfig,
    block_factory=randomized_kfac_block,
    summary="RS-KFAC: K-FAC with rank-r randomized-SVD factors and relative damping (quadratic-cost inversion)",
    reference="Puiu (2022), Randomized K-FACs, arXiv:2206.15397",
    sample_configs=_SAMPLES,
    bad_configs=_BAD,
    recommended=RECOMMENDED,
)

SRE_KFAC_SPEC = MethodSpec(
    name="sre-kfac",
    class_name="SREKFAC",
    config_cls=SREKFACConfig,
    block_factory=randomized_kfac_block,
    summary="SRE-KFAC: K-FAC with rank-r symmetric randomized eigendecompositions and relative damping",
    reference="Puiu (2022), Randomized K-FACs, arXiv:2206.15397",
    sample_configs=_SAMPLES,
    bad_configs=_BAD,
    recommended=RECOMMENDED,
)
