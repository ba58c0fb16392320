"""curvkit's bundled ``kfac`` plugin: K-FAC/KFC, EKFAC, TKFAC and TEKFAC.

Registered through the ``curvkit`` entry-point group; use the methods by name
(``curvkit.optim.create("kfac", model)``) or through the named optimizers
(``curvkit.optim.KFAC``, ``EKFAC``, ``TKFAC``, ``TEKFAC``).
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.methods import MethodSpec
from curvkit.registry import DampingRegister, MethodRegister
from curvkit_kfac.ekfac import EKFAC_SPEC, EKFACConfig
from curvkit_kfac.kfac import KFAC_SPEC, KFACConfig
from curvkit_kfac.tekfac import TEKFAC_SPEC, TEKFACConfig
from curvkit_kfac.tkfac import TKFAC_SPEC, TKFACConfig, TKFACDamping

__all__ = [
    "EKFACConfig",
    "EKFAC_SPEC",
    "KFACConfig",
    "KFAC_SPEC",
    "TEKFACConfig",
    "TEKFAC_SPEC",
    "TKFACConfig",
    "TKFACDamping",
    "TKFAC_SPEC",
    "curvkit_register_dampings",
    "curvkit_register_methods",
    "method_specs",
]


def method_specs() -> list[MethodSpec]:
    """Every method this plugin provides."""
    return [KFAC_SPEC, EKFAC_SPEC, TKFAC_SPEC, TEKFAC_SPEC]


@hookimpl
def curvkit_register_methods(register: MethodRegister) -> None:
    for spec in method_specs():
        register.add(spec)


@hookimpl
def curvkit_register_dampings(register: DampingRegister) -> None:
    register.add(TKFACDamping)
