"""Exception types raised by curvkit.

Every error names the offending value, what would be allowed instead, and how to fix
it. All inherit from :class:`CurvkitError` so callers can catch them in one place.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CurvkitError",
    "DuplicateComponentError",
    "IncompatibleComponentsError",
    "PluginLoadError",
    "PluginRegistrationError",
    "TiedStatisticsError",
    "UnitwiseStatisticsError",
    "UnknownComponentError",
    "UnsupportedModuleError",
    "UnsupportedRequestError",
    "WeightTyingError",
]


class CurvkitError(Exception):
    """Base class of every error curvkit raises on purpose."""


class UnknownComponentError(CurvkitError, KeyError):
    """A component name that no loaded plugin registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DuplicateComponentError(CurvkitError, ValueError):
    """Two plugins (or one plugin twice) registered the same component name."""


class PluginLoadError(CurvkitError, ImportError):
    """A plugin's entry point could not be imported."""


class PluginRegistrationError(CurvkitError, RuntimeError):
    """A plugin's registration hook raised or registered something invalid."""


class UnsupportedRequestError(CurvkitError, ValueError):
    """A statistics backend was asked for something it does not support."""


class UnsupportedModuleError(CurvkitError, TypeError):
    """A module with parameters that no layer handler can process."""


class WeightTyingError(CurvkitError, RuntimeError):
    """A weight tie that no single curvature block can describe (the message names the
    modules and why)."""


class TiedStatisticsError(CurvkitError, RuntimeError):
    """A per-row statistic asked of a block whose weight is used in transposed layouts
    (an embedding tied to an output layer), for which only the factors and the per-datum
    gradients exist."""


class UnitwiseStatisticsError(CurvkitError, RuntimeError):
    """A Kronecker statistic (``A``, ``G``, per-row features) asked of a unit-wise block
    (a normalisation layer's scale and shift, :mod:`curvkit.stats.norms`), whose curvature
    is an exact per-unit block instead."""


class ConfigError(CurvkitError, ValueError):
    """A method or optimizer configuration with invalid values.

    The message lists *every* bad value with its legal range, not just the first.

    Attributes:
        problems: One line per bad value.
    """

    def __init__(self, owner: str, problems: list[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid {owner} ({len(self.problems)} problem(s)):\n{lines}")


class IncompatibleComponentsError(CurvkitError, ValueError):
    """Components that cannot work together (e.g. an inverter and a damping strategy)."""
