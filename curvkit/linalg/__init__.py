"""Linear algebra for Kronecker blocks: damping strategies and inverters."""

from curvkit.linalg.damping import (
    ConstantDamping,
    Damping,
    ExactDamping,
    LevenbergMarquardtDamping,
    PiDamping,
    RelativeDamping,
)
from curvkit.linalg.inverters import (
    CholeskyInverter,
    EigenInverse,
    EigenInverter,
    FactoredInverse,
    IdentityInverter,
    Inverter,
    KroneckerInverse,
    check_compatible,
)

__all__ = [
    "CholeskyInverter",
    "ConstantDamping",
    "Damping",
    "EigenInverse",
    "EigenInverter",
    "ExactDamping",
    "FactoredInverse",
    "IdentityInverter",
    "Inverter",
    "KroneckerInverse",
    "LevenbergMarquardtDamping",
    "PiDamping",
    "RelativeDamping",
    "check_compatible",
]
