"""curvkit's bundled ``singd`` plugin: SINGD, IKFAC, INGD and structured factors.

Registered through the ``curvkit`` entry-point group. Methods: ``"singd"``, ``"ikfac"``,
``"ingd"`` (``curvkit.optim.create("singd", model, structure="block30diagonal")`` or the
named optimizers in :mod:`curvkit_singd.optim`). Structures (usable by any method):
``block30diagonal`` (any ``block{k}diagonal``), ``hierarchical15_15`` (any
``hierarchical{k1}_{k2}``), ``tril``, ``triu``, ``triltoeplitz``, ``triutoeplitz`` and the
rank-1 triangular ``triltopleftdiag``, ``trilbottomrightdiag``, ``triutopleftdiag``,
``triubottomrightdiag``; dense and diagonal are curvkit's own.
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.methods import MethodSpec
from curvkit.registry import DampingRegister, MethodRegister, StructureRegister
from curvkit_singd.singd import IKFACConfig, INGDConfig, SINGDBlock, SINGDConfig, SINGDDamping
from curvkit_singd.specs import IKFAC_SPEC, INGD_SPEC, SINGD_SPEC
from curvkit_singd.structures import block_diagonal, bundled_structures, hierarchical

__all__ = [
    "IKFACConfig",
    "IKFAC_SPEC",
    "INGDConfig",
    "INGD_SPEC",
    "SINGDBlock",
    "SINGDConfig",
    "SINGDDamping",
    "SINGD_SPEC",
    "block_diagonal",
    "curvkit_register_dampings",
    "curvkit_register_methods",
    "curvkit_register_structures",
    "hierarchical",
    "method_specs",
]


def method_specs() -> list[MethodSpec]:
    """Every method this plugin provides."""
    return [SINGD_SPEC, IKFAC_SPEC, INGD_SPEC]


@hookimpl
def curvkit_register_methods(register: MethodRegister) -> None:
    for spec in method_specs():
        register.add(spec)


@hookimpl
def curvkit_register_structures(register: StructureRegister) -> None:
    for cls in bundled_structures():
        register.add(cls)


@hookimpl
def curvkit_register_dampings(register: DampingRegister) -> None:
    register.add(SINGDDamping)
