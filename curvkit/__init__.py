"""curvkit: Kronecker-factored curvature for PyTorch.

The public API: Kronecker statistics (:func:`kronecker_factors`,
:func:`accumulate_kronecker_factors`), the plugin registry (:func:`build_registry`,
:func:`default_registry`, :data:`hookimpl`), the user-facing enums, and the subpackages
:mod:`curvkit.optim` (optimizers), :mod:`curvkit.methods` (the method API),
:mod:`curvkit.blocks`, :mod:`curvkit.linalg` (dampings, inverters) and
:mod:`curvkit.structures`.
"""

from curvkit import blocks, linalg, methods, optim, structures  # noqa: E402  (subpackages)
from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy
from curvkit.errors import (  # noqa: E402
    ConfigError,
    CurvkitError,
    DuplicateComponentError,
    IncompatibleComponentsError,
    PluginLoadError,
    PluginRegistrationError,
    TiedStatisticsError,
    UnitwiseStatisticsError,
    UnknownComponentError,
    UnsupportedModuleError,
    UnsupportedRequestError,
    WeightTyingError,
)
from curvkit.hookspecs import hookimpl
from curvkit.plugins import build_registry, default_registry
from curvkit.registry import Registry
from curvkit.stats import KroneckerFactors, UnitwiseFactors, accumulate_kronecker_factors, kronecker_factors

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "CurvkitError",
    "DuplicateComponentError",
    "FisherType",
    "IncompatibleComponentsError",
    "KFACApprox",
    "KroneckerFactors",
    "PluginLoadError",
    "PluginRegistrationError",
    "Registry",
    "TiedStatisticsError",
    "UnitwiseFactors",
    "UnitwiseStatisticsError",
    "UnknownComponentError",
    "UnsupportedModuleError",
    "UnsupportedPolicy",
    "UnsupportedRequestError",
    "WeightTyingError",
    "__version__",
    "accumulate_kronecker_factors",
    "build_registry",
    "default_registry",
    "hookimpl",
    "kronecker_factors",
    "blocks",
    "linalg",
    "methods",
    "optim",
    "structures",
]
