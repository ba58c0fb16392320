"""Typed registries of the components that plugins provide.

A :class:`Registry` is built from a plugin manager (see :func:`curvkit.plugins.build_registry`)
and holds one :class:`ComponentTable` per component kind. It is a plain object: building
it calls every registration hook once; looking a component up afterwards never calls a
hook.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from curvkit.errors import DuplicateComponentError, PluginRegistrationError, UnknownComponentError

__all__ = [
    "BackendRegister",
    "ComponentTable",
    "DampingRegister",
    "InverseRegister",
    "InverterRegister",
    "LayerHandlerRegister",
    "MethodRegister",
    "Registration",
    "Registry",
    "StructureRegister",
    "active_registry",
    "using_registry",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Registration(Generic[T]):
    """One registered component and the plugin that provided it."""

    kind: str
    name: str
    component: T
    plugin: str


class ComponentTable(Generic[T]):
    """Name -> component table for one kind of component.

    Args:
        kind: Human-readable kind, used in messages (``"statistics backend"``).
        validate: Called with each component before it is added; raises ``TypeError``
            with a message saying what is missing.
    """

    def __init__(self, kind: str, validate: Callable[[Any], None] | None = None) -> None:
        self.kind = kind
        self._validate = validate
        self._entries: dict[str, Registration[T]] = {}

    def add(self, name: str, component: T, plugin: str) -> None:
        """Add ``component`` under ``name``; raise if the name is taken or invalid."""
        if not isinstance(name, str) or not name.strip():
            raise PluginRegistrationError(
                f"plugin {plugin!r} registered a {self.kind} with invalid name {name!r}; "
                "names must be non-empty strings."
            )
        if self._validate is not None:
            try:
                self._validate(component)
            except TypeError as err:
                raise PluginRegistrationError(
                    f"plugin {plugin!r} registered an invalid {self.kind} {name!r}: {err}"
                ) from err
        if name in self._entries:
            first = self._entries[name].plugin
            raise DuplicateComponentError(
                f"{self.kind} {name!r} is registered twice: by plugin {first!r} and by "
                f"plugin {plugin!r}. Rename one, or block one plugin "
                "(CURVKIT_BLOCK_PLUGINS or build_registry(block=...))."
            )
        self._entries[name] = Registration(self.kind, name, component, plugin)

    def get(self, name: str) -> T:
        """Return the component called ``name``.

        Raises:
            UnknownComponentError: listing every registered name (and a close match).
        """
        try:
            return self._entries[name].component
        except KeyError:
            raise UnknownComponentError(self._unknown_message(name)) from None

    def _unknown_message(self, name: object) -> str:
        known = sorted(self._entries)
        msg = f"unknown {self.kind} {name!r}; registered: {', '.join(map(repr, known)) or 'none'}."
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        if not known or len(known) < 2:
            msg += (
                " (Plugins are loaded from the 'curvkit' entry-point group; check that the "
                "providing package is installed and CURVKIT_DISABLE_PLUGIN_AUTOLOAD is unset.)"
            )
        return msg

    def plugin_of(self, name: str) -> str:
        """Name of the plugin that registered ``name``."""
        self.get(name)
        return self._entries[name].plugin

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._entries)

    def registrations(self) -> list[Registration[T]]:
        """All registrations, in registration order."""
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def _require_attrs(*attrs: str) -> Callable[[Any], None]:
    def check(component: Any) -> None:
        missing = [a for a in attrs if not hasattr(component, a)]
        if missing:
            raise TypeError(f"{component!r} lacks required attribute(s) {', '.join(missing)}")

    return check


class _Register(Generic[T]):
    """Base of the register objects handed to the registration hooks.

    ``add(component, name=None)`` registers ``component`` under ``name`` or, if omitted,
    under ``component.name``.
    """

    def __init__(self, table: ComponentTable[T], plugin: str) -> None:
        self._table = table
        self.plugin = plugin

    def add(self, component: T, *, name: str | None = None) -> None:
        if name is None:
            name = getattr(component, "name", None)
            if name is None:
                raise PluginRegistrationError(
                    f"plugin {self.plugin!r} registered {component!r} as a {self._table.kind} "
                    "without a name; give the component a 'name' attribute or pass name=."
                )
        self._table.add(name, component, self.plugin)


class LayerHandlerRegister(_Register[Any]):
    """Register of :class:`curvkit.stats.handlers.LayerHandler` objects."""


class BackendRegister(_Register[Any]):
    """Register of :class:`curvkit.stats.backend.StatisticsBackend` objects."""


class StructureRegister(_Register[Any]):
    """Register of factor-structure classes."""


class InverterRegister(_Register[Any]):
    """Register of inverter classes."""


class DampingRegister(_Register[Any]):
    """Register of damping-strategy classes."""


class InverseRegister(_Register[Any]):
    """Register of :class:`~curvkit.linalg.KroneckerInverse` classes: what a block's
    ``state_dict`` stores as its cached inverse (``"inverse_kind"``), found again by
    :func:`~curvkit.linalg.inverse_from_state`. ``add(cls)`` registers ``cls`` under its
    ``kind``."""

    def add(self, component: Any, *, name: str | None = None) -> None:
        super().add(component, name=name if name is not None else getattr(component, "kind", None))


class MethodRegister(_Register[Any]):
    """Register of method specifications."""


#: hook name -> (registry attribute, register class, component kind, validator)
HOOKS: dict[str, tuple[str, type[_Register[Any]], str, Callable[[Any], None] | None]] = {
    "curvkit_register_layer_handlers": (
        "layer_handlers",
        LayerHandlerRegister,
        "layer handler",
        _require_attrs("module_types", "input_features", "output_features", "check"),
    ),
    "curvkit_register_statistics_backends": (
        "backends",
        BackendRegister,
        "statistics backend",
        _require_attrs("capabilities", "compute"),
    ),
    "curvkit_register_structures": (
        "structures",
        StructureRegister,
        "factor structure",
        _require_attrs("from_dense", "to_dense", "tensors", "from_tensors"),
    ),
    "curvkit_register_inverters": ("inverters", InverterRegister, "inverter", _require_attrs("prepare", "supports")),
    "curvkit_register_dampings": (
        "dampings",
        DampingRegister,
        "damping strategy",
        _require_attrs("kind", "initial_value"),
    ),
    "curvkit_register_inverses": (
        "inverses",
        InverseRegister,
        "inverse kind",
        _require_attrs("kind", "apply", "tensors", "from_tensors"),
    ),
    "curvkit_register_methods": (
        "methods",
        MethodRegister,
        "method",
        _require_attrs("config_cls", "block_factory", "make_config"),
    ),
}


class Registry:
    """Every component registered by the loaded plugins, by kind.

    Attributes:
        layer_handlers, backends, structures, inverters, dampings, inverses, methods: one
            :class:`ComponentTable` each.
        plugins: names of the plugins that were registered, in load order.
        blocked: names of the plugins that were blocked.
    """

    layer_handlers: ComponentTable[Any]
    backends: ComponentTable[Any]
    structures: ComponentTable[Any]
    inverters: ComponentTable[Any]
    dampings: ComponentTable[Any]
    inverses: ComponentTable[Any]
    methods: ComponentTable[Any]

    def __init__(self) -> None:
        for attr, _register_cls, kind, validate in HOOKS.values():
            setattr(self, attr, ComponentTable(kind, validate))
        self.plugins: list[str] = []
        self.blocked: list[str] = []

    def tables(self) -> dict[str, ComponentTable[Any]]:
        """Attribute name -> table, in a fixed order."""
        return {attr: getattr(self, attr) for attr, *_ in HOOKS.values()}

    def handler_for(self, module: Any) -> Any | None:
        """The layer handler for ``module``: the most specific ``module_types`` match."""
        best, best_depth = None, None
        mro = type(module).__mro__
        for reg in self.layer_handlers.registrations():
            for cls in reg.component.module_types:
                if cls in mro:
                    depth = mro.index(cls)
                    if best_depth is None or depth < best_depth:
                        best, best_depth = reg.component, depth
        return best

    def backends_supporting(self, request: Any) -> list[str]:
        """Names of the registered backends that can serve ``request``."""
        return [
            name
            for name in self.backends
            if not self.backends.get(name).capabilities.reasons(request, self)
        ]


_ACTIVE: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("curvkit_active_registry", default=None)


def active_registry() -> Registry:
    """The registry that name lookups made deep inside a component use (e.g. a block's
    ``load_state_dict`` finding its inverse's kind): the one set by :func:`using_registry`
    (a preconditioner sets its own while it loads state), else
    :func:`curvkit.default_registry`."""
    registry = _ACTIVE.get()
    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    return registry


@contextlib.contextmanager
def using_registry(registry: Registry | None) -> Iterator[None]:
    """Make ``registry`` the :func:`active_registry` inside the ``with`` block (``None``:
    leave it as it is)."""
    if registry is None:
        yield
        return
    token = _ACTIVE.set(registry)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
