"""Linear algebra for Kronecker blocks: damping strategies, inverters, and the public
eigendecomposition and inverse-root helpers plugins build on (:mod:`curvkit.linalg.roots`)."""

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
    inverse_from_state,
    inverse_state,
)
from curvkit.linalg.roots import compute_dtype, inverse_root, matrix_power, symmetric_eigh

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
    "compute_dtype",
    "inverse_from_state",
    "inverse_root",
    "inverse_state",
    "matrix_power",
    "symmetric_eigh",
]
