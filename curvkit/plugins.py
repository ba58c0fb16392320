"""Plugin manager factory: entry-point loading, block list, autoload switch.

A fresh :class:`pluggy.PluginManager` is built for every registry; there is no
module-level manager. The core's own components (the ``hooks`` statistics backend and the
Linear/Conv layer handlers) are registered first under the plugin name ``curvkit``; then
every entry point of the ``curvkit`` group is loaded, unless autoloading is off.

Environment variables:

``CURVKIT_DISABLE_PLUGIN_AUTOLOAD``
    ``1`` (or ``true``/``yes``) skips entry-point loading; only the core's components
    and plugins passed explicitly are registered.
``CURVKIT_BLOCK_PLUGINS``
    Comma-separated entry-point names that are never loaded.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from curvkit import hookspecs
from curvkit.errors import CurvkitError, PluginLoadError, PluginRegistrationError
from curvkit.registry import HOOKS, Registry

__all__ = [
    "AUTOLOAD_ENV",
    "BLOCK_ENV",
    "CORE_PLUGIN_NAME",
    "build_registry",
    "default_registry",
    "make_plugin_manager",
]

AUTOLOAD_ENV = "CURVKIT_DISABLE_PLUGIN_AUTOLOAD"
BLOCK_ENV = "CURVKIT_BLOCK_PLUGINS"
CORE_PLUGIN_NAME = "curvkit"

_TRUE = {"1", "true", "yes", "on"}


def _autoload_from_env() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in _TRUE


def _block_from_env() -> tuple[str, ...]:
    raw = os.environ.get(BLOCK_ENV, "")
    return tuple(sorted({n.strip() for n in raw.split(",") if n.strip()}))


def _describe(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    where = f" from distribution {dist.name!r} {dist.version}" if dist is not None else ""
    return f"plugin {ep.name!r} ({ep.value}){where}"


def make_plugin_manager(
    *,
    autoload: bool | None = None,
    block: Iterable[str] = (),
    plugins: Iterable[Any | tuple[str, Any]] = (),
) -> pluggy.PluginManager:
    """Build a new plugin manager with the core plugin, entry points and extra plugins.

    Args:
        autoload: Load the ``curvkit`` entry-point group. ``None`` reads
            ``CURVKIT_DISABLE_PLUGIN_AUTOLOAD``.
        block: Entry-point names never to load, in addition to ``CURVKIT_BLOCK_PLUGINS``.
        plugins: Extra plugin objects (modules, classes, instances), or ``(name, plugin)``
            pairs, registered after the entry points; useful in tests.

    Raises:
        PluginLoadError: An entry point failed to import; the message names the plugin.
    """
    from curvkit import builtin_plugin

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin_plugin, name=CORE_PLUGIN_NAME)

    blocked = set(block) | set(_block_from_env())
    for name in sorted(blocked):
        pm.set_blocked(name)
    if _autoload_from_env() if autoload is None else autoload:
        seen: set[str] = set()
        for ep in entry_points(group=hookspecs.PROJECT_NAME):
            if ep.name in seen or pm.is_blocked(ep.name):
                continue
            seen.add(ep.name)
            try:
                plugin = ep.load()
            except Exception as err:  # noqa: BLE001 - re-raised with the plugin's name
                raise PluginLoadError(
                    f"{_describe(ep)} failed to load: {type(err).__name__}: {err}. "
                    f"Fix or uninstall it, or block it with {BLOCK_ENV}={ep.name}."
                ) from err
            try:
                pm.register(plugin, name=ep.name)
            except (ValueError, pluggy.PluginValidationError) as err:
                raise PluginRegistrationError(f"{_describe(ep)} could not be registered: {err}") from err
    for extra in plugins:
        name, plugin = extra if isinstance(extra, tuple) else (None, extra)
        if name is not None and pm.is_blocked(name):
            continue
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as err:
            raise PluginRegistrationError(f"plugin {name or plugin!r} could not be registered: {err}") from err
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        raise PluginRegistrationError(
            f"plugin {err.plugin!r} implements a hook curvkit does not define: {err}. "
            "Hook names start with 'curvkit_register_'; check the spelling."
        ) from err
    return pm


def build_registry(
    *,
    autoload: bool | None = None,
    block: Iterable[str] = (),
    plugins: Iterable[Any | tuple[str, Any]] = (),
    plugin_manager: pluggy.PluginManager | None = None,
) -> Registry:
    """Build a :class:`~curvkit.registry.Registry` from a fresh plugin manager.

    Each registration hook is called once per plugin, so an error in one plugin is
    reported with that plugin's name. Arguments are those of :func:`make_plugin_manager`;
    ``plugin_manager`` uses an existing manager instead.
    """
    pm = plugin_manager or make_plugin_manager(autoload=autoload, block=block, plugins=plugins)
    registry = Registry()
    registry.plugins = [name for name, plugin in pm.list_name_plugin() if plugin is not None]
    registry.blocked = [name for name, plugin in pm.list_name_plugin() if plugin is None]
    for hook_name, (attr, register_cls, _kind, _validate) in HOOKS.items():
        table = getattr(registry, attr)
        hook = getattr(pm.hook, hook_name)
        # get_hookimpls() lists implementations in registration (load) order.
        for impl in hook.get_hookimpls():
            register = register_cls(table, impl.plugin_name)
            kwargs = {arg: register for arg in impl.argnames}
            try:
                impl.function(**kwargs)
            except CurvkitError:
                raise
            except Exception as err:  # noqa: BLE001 - re-raised with the plugin's name
                raise PluginRegistrationError(
                    f"plugin {impl.plugin_name!r} raised in {hook_name}: {type(err).__name__}: {err}"
                ) from err
    return registry


@functools.lru_cache(maxsize=8)
def _cached_registry(autoload: bool, block: tuple[str, ...]) -> Registry:
    return build_registry(autoload=autoload, block=block)


def default_registry() -> Registry:
    """The registry used when a function is not given ``registry=``.

    It is built on first use from the installed entry points and the two environment
    variables, and cached per (autoload, block list) setting; pass an explicit registry
    built with :func:`build_registry` to control plugins exactly.
    """
    return _cached_registry(_autoload_from_env(), _block_from_env())


default_registry.cache_clear = _cached_registry.cache_clear  # type: ignore[attr-defined]
