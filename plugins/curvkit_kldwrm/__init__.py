"""curvkit's bundled ``kldwrm`` plugin: KL-divergence wake-regularised models (Puiu 2022).

Registers ``so-kldwrm``, ``q-kldwrm`` and ``qe-kldwrm`` through the ``curvkit`` entry-point
group. Use the named optimizers :class:`SOKLDWRM`, :class:`QKLDWRM`, :class:`QEKLDWRM` (they
pass the learning rate to the wake recursions every step and, for QE, run the inner loop over
past networks); ``curvkit.optim.create("q-kldwrm", model, eta=...)`` also works (QE then takes
Q steps only). See ``docs/methods/kldwrm.md``.
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.methods import MethodSpec
from curvkit.registry import MethodRegister
from curvkit_kldwrm.kldwrm import (
    Q_KLDWRM_SPEC,
    QE_KLDWRM_SPEC,
    SO_KLDWRM_SPEC,
    QEKLDWRMBlock,
    QEKLDWRMConfig,
    QKLDWRMBlock,
    QKLDWRMConfig,
    SOKLDWRMBlock,
    SOKLDWRMConfig,
)
from curvkit_kldwrm.optim import QEKLDWRM, QKLDWRM, SOKLDWRM, symmetric_kl

__all__ = [
    "QEKLDWRM",
    "QEKLDWRMBlock",
    "QEKLDWRMConfig",
    "QE_KLDWRM_SPEC",
    "QKLDWRM",
    "QKLDWRMBlock",
    "QKLDWRMConfig",
    "Q_KLDWRM_SPEC",
    "SOKLDWRM",
    "SOKLDWRMBlock",
    "SOKLDWRMConfig",
    "SO_KLDWRM_SPEC",
    "curvkit_register_methods",
    "method_specs",
    "symmetric_kl",
]


def method_specs() -> list[MethodSpec]:
    """Every method this plugin provides."""
    return [SO_KLDWRM_SPEC, Q_KLDWRM_SPEC, QE_KLDWRM_SPEC]


@hookimpl
def curvkit_register_methods(register: MethodRegister) -> None:
    for spec in method_specs():
        register.add(spec)
