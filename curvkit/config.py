"""User choices as string enums, normalised once at the outer API.

Strings are accepted wherever an enum is expected; :func:`as_enum` converts them and
raises an error that lists the valid values.
"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar

__all__ = ["FisherType", "KFACApprox", "UnsupportedPolicy", "as_enum"]

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
