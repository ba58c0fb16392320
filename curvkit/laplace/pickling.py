"""Pickling of objects that hold a curvkit registry (``torch.save`` of a fitted Laplace object).

A :class:`~curvkit.registry.Registry` holds plugin validators and hooks that do not pickle.
The default registry (:func:`curvkit.plugins.default_registry`) is therefore stored as a
marker and looked up again when the object is loaded (in the loading process's plugin
environment); a registry given explicitly is stored as it is and must be picklable.
"""

from __future__ import annotations

import pickle
from typing import Any

__all__ = ["registry_from_state", "registry_to_state"]

#: Stands for curvkit's default registry in a pickled object.
DEFAULT_REGISTRY = "curvkit:default-registry"


def registry_to_state(registry: Any, owner: str) -> Any:
    """What to pickle in place of ``registry``.

    Raises:
        TypeError: ``registry`` is not the default one and does not pickle.
    """
    from curvkit.plugins import default_registry

    if registry is None or registry is default_registry():
        return DEFAULT_REGISTRY
    try:
        pickle.dumps(registry)
    except Exception as err:  # noqa: BLE001 - re-raised with what to do
        raise TypeError(
            f"cannot pickle this {owner}: it was built with an explicit registry= that does not pickle "
            f"({type(err).__name__}: {err}). Build it with registry=None (the default registry, stored as a "
            "marker and looked up again on load), or set its .registry to None before saving and back after "
            "loading."
        ) from err
    return registry


def registry_from_state(value: Any) -> Any:
    """The registry stored by :func:`registry_to_state`."""
    if isinstance(value, str) and value == DEFAULT_REGISTRY:
        from curvkit.plugins import default_registry

        return default_registry()
    return value
