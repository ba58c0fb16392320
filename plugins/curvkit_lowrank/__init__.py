"""curvkit's bundled ``lowrank`` plugin: RS-KFAC, SRE-KFAC, B-KFAC, B-R-KFAC, B-KFAC-c and SKFAC.

Registered through the ``curvkit`` entry-point group:

* methods ``"rs-kfac"``, ``"sre-kfac"`` (Puiu 2022, randomized low-rank factors) and
  ``"skfac"`` (Tang et al. 2021, Woodbury on the current batch);
* methods ``"b-kfac"``, ``"b-r-kfac"``, ``"b-kfac-c"`` (Puiu 2022b, Brand's online low-rank
  update of the EMA factors of wide Linear layers);
* inverters ``"rsvd"`` and ``"sre"`` (usable by any Kronecker method, e.g.
  ``create("kfac", model, inverter="rsvd")`` with their default rank 220);
* the damping ``"equal-split"`` (:math:`\\sqrt\\lambda` per factor).

"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.methods import MethodSpec
from curvkit.registry import DampingRegister, InverseRegister, InverterRegister, MethodRegister
from curvkit_lowrank.bkfac import (
    B_KFAC_C_SPEC,
    B_KFAC_SPEC,
    B_R_KFAC_SPEC,
    BKFACCConfig,
    BKFACConfig,
    BrandKroneckerBlock,
    BRKFACConfig,
)
from curvkit_lowrank.brand import brand_update
from curvkit_lowrank.lowrank import (
    LowRankEigenInverse,
    LowRankFactor,
    LowRankInverse,
    RandomizedEighInverter,
    RandomizedInverter,
    RandomizedSVDInverter,
    randomized_eigh,
    randomized_svd,
)
from curvkit_lowrank.rskfac import RS_KFAC_SPEC, SRE_KFAC_SPEC, LowRankKroneckerBlock, RSKFACConfig, SREKFACConfig
from curvkit_lowrank.skfac import (
    SKFAC_SPEC,
    EqualSplitDamping,
    SKFACBlock,
    SKFACConfig,
    WoodburyFactor,
    WoodburyInverse,
)

__all__ = [
    "BKFACCConfig",
    "BKFACConfig",
    "BRKFACConfig",
    "B_KFAC_C_SPEC",
    "B_KFAC_SPEC",
    "B_R_KFAC_SPEC",
    "BrandKroneckerBlock",
    "EqualSplitDamping",
    "LowRankEigenInverse",
    "LowRankFactor",
    "LowRankInverse",
    "LowRankKroneckerBlock",
    "RSKFACConfig",
    "RS_KFAC_SPEC",
    "RandomizedEighInverter",
    "RandomizedInverter",
    "RandomizedSVDInverter",
    "SKFACBlock",
    "SKFACConfig",
    "SKFAC_SPEC",
    "SREKFACConfig",
    "SRE_KFAC_SPEC",
    "WoodburyFactor",
    "WoodburyInverse",
    "brand_update",
    "curvkit_register_dampings",
    "curvkit_register_inverses",
    "curvkit_register_inverters",
    "curvkit_register_methods",
    "method_specs",
    "randomized_eigh",
    "randomized_svd",
]


def method_specs() -> list[MethodSpec]:
    """Every method this plugin provides."""
    return [RS_KFAC_SPEC, SRE_KFAC_SPEC, B_KFAC_SPEC, B_R_KFAC_SPEC, B_KFAC_C_SPEC, SKFAC_SPEC]


@hookimpl
def curvkit_register_methods(register: MethodRegister) -> None:
    for spec in method_specs():
        register.add(spec)


@hookimpl
def curvkit_register_inverters(register: InverterRegister) -> None:
    register.add(RandomizedSVDInverter())
    register.add(RandomizedEighInverter())


@hookimpl
def curvkit_register_inverses(register: InverseRegister) -> None:
    for cls in (LowRankInverse, LowRankEigenInverse, WoodburyInverse):
        register.add(cls)


@hookimpl
def curvkit_register_dampings(register: DampingRegister) -> None:
    register.add(EqualSplitDamping)
