"""curvkit plugin: the ``backpack`` statistics backend (BackPACK's KFAC and KFLR).

Loaded through the ``curvkit`` entry-point group (``backpack = "curvkit_backpack"``).
Importing this package is cheap: BackPACK itself is imported on the first computation.
When BackPACK is not installed the plugin registers nothing.

Example:
    >>> import torch, curvkit
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    >>> X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    >>> factors = curvkit.kronecker_factors(
    ...     model, torch.nn.CrossEntropyLoss(), X, y, fisher="type-2", backend="backpack"
    ... )
    >>> sorted(factors)
    ['0', '2']
"""

from __future__ import annotations

import importlib.util

import curvkit
from curvkit_backpack.backend import BackpackBackend

__all__ = ["BackpackBackend", "curvkit_register_statistics_backends"]


@curvkit.hookimpl
def curvkit_register_statistics_backends(register) -> None:  # type: ignore[no-untyped-def]
    """Register :class:`BackpackBackend` when BackPACK is installed."""
    if importlib.util.find_spec("backpack") is not None:
        register.add(BackpackBackend())
