"""Named optimizer classes from the registry: ``curvkit.optim.KFAC``, ``curvkit.optim.SINGD``, ...

A method declares the name of its optimizer class in
:attr:`MethodSpec.class_name <curvkit.methods.MethodSpec.class_name>`; the first time
``curvkit.optim.<that name>`` is looked up (an attribute access or ``from curvkit.optim
import <name>``), :func:`named_class` builds a :class:`~curvkit.optim.CurvatureOptimizer`
subclass whose ``method`` is the spec's name, caches it, and returns the same class on every
later lookup. So a third-party plugin's method gets a named class (``curvkit.optim.Shampoo``)
without an edit of the core, and the core names no bundled method.

The classes live in the module ``curvkit.optim`` under their name, so ``isinstance`` checks,
``pickle`` and ``copy.deepcopy`` of an optimizer work as for a class written in that module
(unpickling looks the class up again, which finds the cached one).
"""

from __future__ import annotations

import threading
from typing import Any

from curvkit.errors import DuplicateComponentError

__all__ = ["class_names", "named_class"]

#: class name -> the class built for it (one per process: the same object on every lookup).
_CLASSES: dict[str, type] = {}
_LOCK = threading.Lock()


def _registry(registry: Any) -> Any:
    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    return registry


def class_names(registry: Any = None) -> dict[str, str]:
    """``{class name: method name}`` of the registered methods that declare a class name.

    Raises:
        DuplicateComponentError: two methods declare the same class name (naming both and
            their plugins).
    """
    registry = _registry(registry)
    out: dict[str, str] = {}
    for reg in registry.methods.registrations():
        name = getattr(reg.component, "class_name", None)
        if name is None:
            continue
        if name in out:
            first = out[name]
            raise DuplicateComponentError(
                f"methods {first!r} (plugin {registry.methods.plugin_of(first)!r}) and {reg.name!r} (plugin "
                f"{reg.plugin!r}) both declare the optimizer class name {name!r}; rename one "
                "(MethodSpec(class_name=...))."
            )
        out[name] = reg.name
    return out


def _docstring(spec: Any) -> str:
    cfg = spec.config_cls
    text = spec.summary or spec.name
    if spec.reference:
        text += f" ({spec.reference})"
    return (
        f"{text}.\n\nThe optimizer of the registered method ``{spec.name!r}`` (options: "
        f":class:`{cfg.__module__}.{cfg.__qualname__}`): :class:`~curvkit.optim.CurvatureOptimizer` with "
        f"``method={spec.name!r}``, built from the registry by :func:`curvkit.optim.named.named_class`."
    )


def named_class(name: str, registry: Any = None) -> type:
    """The :class:`~curvkit.optim.CurvatureOptimizer` subclass of the method whose spec has
    ``class_name == name`` (built on the first call, then cached).

    Raises:
        AttributeError: No registered method declares ``name`` (the message lists those
            that do).
    """
    from curvkit.optim.optimizer import CurvatureOptimizer

    registry = _registry(registry)
    names = class_names(registry)
    method = names.get(name)
    if method is None:
        known = ", ".join(sorted(names)) or "none"
        raise AttributeError(
            f"module 'curvkit.optim' has no attribute {name!r}: no registered method declares the optimizer class "
            f"name {name!r} (named classes: {known}). A method gets one with MethodSpec(class_name=...); any "
            "registered method works with curvkit.optim.create(<method name>, model)."
        )
    with _LOCK:
        cls = _CLASSES.get(name)
        if cls is not None and getattr(cls, "method", None) == method:
            return cls
        spec = registry.methods.get(method)
        cls = type(
            name,
            (CurvatureOptimizer,),
            {"method": method, "__module__": "curvkit.optim", "__qualname__": name, "__doc__": _docstring(spec)},
        )
        _CLASSES[name] = cls
        return cls
