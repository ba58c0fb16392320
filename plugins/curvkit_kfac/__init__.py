"""curvkit's bundled ``kfac`` plugin: K-FAC/KFC, EKFAC, TKFAC and TEKFAC.

Registered through the ``curvkit`` entry-point group; use the methods by name
(``curvkit.optim.create("kfac", model)``) or through the named optimizers
(``curvkit.optim.KFAC``, ...).
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.registry import MethodRegister
from curvkit_kfac.kfac import KFAC_SPEC, KFACConfig

__all__ = ["KFAC_SPEC", "KFACConfig", "curvkit_register_methods", "method_specs"]


def method_specs() -> list:
    """Every method this plugin provides."""
    specs = [KFAC_SPEC]
    try:
        from curvkit_kfac.ekfac import EKFAC_SPEC, TEKFAC_SPEC

        specs += [EKFAC_SPEC, TEKFAC_SPEC]
    except ImportError:  # pragma: no cover - while the module is being written
        pass
    try:
        from curvkit_kfac.tkfac import TKFAC_SPEC

        specs.append(TKFAC_SPEC)
    except ImportError:  # pragma: no cover
        pass
    return specs


@hookimpl
def curvkit_register_methods(register: MethodRegister) -> None:
    for spec in method_specs():
        register.add(spec)
