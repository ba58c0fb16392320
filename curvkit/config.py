"""User choices as string enums, normalised once at the outer API.

Strings are accepted wherever an enum is expected; :func:`as_enum` converts them and
raises an error that lists the valid values.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["FisherType", "KFACApprox", "UnsupportedPolicy", "ValidatedConfig", "as_enum", "check_number"]

E = TypeVar("E", bound=Enum)


class FisherType(str, Enum):
    """Which vectors are backpropagated to form the output-gradient factor ``G``.

    * ``EMPIRICAL``: the gradient of the loss at the true targets (empirical Fisher).
    * ``MC``: gradients at targets sampled from the model's predictive distribution
      (``mc_samples`` per loss term); an unbiased estimate of ``TYPE2``.
    * ``TYPE2``: the columns of a symmetric square root of the loss Hessian with respect
      to the model output (exact Fisher / generalised Gauss-Newton).
    """

    EMPIRICAL = "empirical"
    MC = "mc"
    TYPE2 = "type-2"


class KFACApprox(str, Enum):
    """How a weight-sharing axis (sequence positions, conv patches) is treated.

    See Eschenhagen et al. (2023), *Kronecker-Factored Approximate Curvature for Modern
    Neural Network Architectures*: ``EXPAND`` treats every shared position as an extra
    sample (equal to KFC for convolutions); ``REDUCE`` averages the inputs and sums the
    output gradients over the sharing axis before forming the outer products.
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class UnsupportedPolicy(str, Enum):
    """What to do with a module that has parameters but no layer handler."""

    ERROR = "error"
    WARN = "warn"
    SKIP = "skip"


_ALIASES = {"type2": "type-2", "type_2": "type-2", "ggn": "type-2", "exact": "type-2", "emp": "empirical"}


def as_enum(enum_cls: type[E], value: object, argument: str) -> E:
    """Return ``value`` as a member of ``enum_cls``.

    Args:
        enum_cls: The target enum.
        value: An enum member or its string value (case-insensitive).
        argument: The name of the argument, used in the error message.

    Raises:
        ValueError: If ``value`` names no member; the message lists the valid values.
    """
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        key = _ALIASES.get(key, key) if enum_cls is FisherType else key
        for member in enum_cls:
            if member.value == key:
                return member
    valid = ", ".join(repr(m.value) for m in enum_cls)
    raise ValueError(f"{argument}={value!r} is not valid; choose one of {valid}.")


# --- self-validating frozen configuration ---------------------------------------------------


def _fmt_interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    left = "(" if low_open or low is None else "["
    right = ")" if high_open or high is None else "]"
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    return f"{left}{lo}, {hi}{right}"


def check_number(
    problems: list[str],
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Append a message to ``problems`` unless ``value`` is a number in the interval.

    The message names the field, the bad value and the legal range, e.g.
    ``ema_decay=1.5 must be a float in [0.0, 1.0)``.
    """
    import math

    if optional and value is None:
        return
    kind = "an integer" if integer else "a float"
    legal = f"{kind} in {_fmt_interval(low, high, low_open, high_open)}" + (" or None" if optional else "")
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        problems.append(f"{name}={value!r} must be {legal}")
        return
    v = float(value)  # type: ignore[arg-type]
    if not math.isfinite(v):
        problems.append(f"{name}={value!r} must be {legal}")
        return
    if low is not None and (v < low or (low_open and v == low)):
        problems.append(f"{name}={value!r} must be {legal}")
    elif high is not None and (v > high or (high_open and v == high)):
        problems.append(f"{name}={value!r} must be {legal}")


class ValidatedConfig:
    """Mixin for frozen, keyword-only configuration dataclasses that validate themselves.

    Subclasses implement :meth:`problems` returning one message per bad value (with its
    legal range); ``__post_init__`` raises :class:`~curvkit.errors.ConfigError` listing
    them all. Subclasses that normalise fields (strings to enums) do it in
    :meth:`normalise`, which runs first.
    """

    def normalise(self) -> list[str]:
        """Convert outer-API values (strings) to their canonical types; return problems."""
        return []

    def problems(self) -> list[str]:
        """Every bad value, with its legal range."""
        return []

    def __post_init__(self) -> None:
        from curvkit.errors import ConfigError

        found = self.normalise()
        found += self.problems()
        if found:
            raise ConfigError(type(self).__name__, found)

    def _set(self, name: str, value: object) -> None:
        """Set a field on the frozen instance (normalisation only)."""
        object.__setattr__(self, name, value)

    def _enum_field(self, problems: list[str], name: str, enum_cls: type[E]) -> None:
        try:
            self._set(name, as_enum(enum_cls, getattr(self, name), name))
        except ValueError as err:
            problems.append(str(err).rstrip("."))
