"""One call that runs the whole conformance kit over everything a plugin registered."""

from __future__ import annotations

from typing import Any

from curvkit.testing.components import check_inverter, check_structure
from curvkit.testing.distributed import check_data_parallel
from curvkit.testing.methods import check_method

__all__ = ["check_plugin"]


def check_plugin(plugin: str, *, registry: Any = None, data_parallel: bool = True) -> dict[str, list[str]]:
    """Run :func:`check_structure`, :func:`check_inverter` and :func:`check_method` on every
    structure, inverter and method that the plugin named ``plugin`` registered, and
    :func:`~curvkit.testing.distributed.check_data_parallel` on every method.

    For a method that is: training with each sample configuration, the bad configurations
    refused, a ``state_dict`` round trip, a NaN gradient skipped, normalisation layers
    preconditioned, every block's ``as_operator()`` against the curvature-operator
    protocol, statistics every 2 steps (``T_stats > 1``), every weight-decay mode, and two
    gloo processes equal to one on the whole batch.

    Args:
        plugin: The plugin's name: its entry-point name in the ``curvkit`` group (what
            ``curvkit plugins`` shows), or the name it was passed under to
            :func:`curvkit.build_registry`.
        registry: The registry to look in (default: :func:`curvkit.default_registry`).
        data_parallel: Run the two-process check (it forks two processes; ``False``
            where ``fork`` or gloo is not available).

    Returns:
        The names checked, by kind: ``{"structures": [...], "inverters": [...],
        "methods": [...]}``. Layer handlers, statistics backends and dampings have no
        generic check; test them against a reference of your own.

    Raises:
        AssertionError: The plugin is not loaded, or one of its components fails a
            check (the message names the component and the problem).
    """
    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    if plugin not in registry.plugins:
        blocked = f" It is blocked ({', '.join(registry.blocked)})." if plugin in registry.blocked else ""
        raise AssertionError(
            f"plugin {plugin!r} is not loaded; loaded plugins: {', '.join(registry.plugins)}.{blocked} Install its "
            "distribution (its entry point must be in the 'curvkit' group), or pass it to "
            f"curvkit.build_registry(plugins=[({plugin!r}, module)]) and that registry as registry=."
        )

    def own(table: Any) -> list[str]:
        return [name for name in table.names() if table.plugin_of(name) == plugin]

    checked = {"structures": own(registry.structures), "inverters": own(registry.inverters), "methods": []}
    for name in checked["structures"]:
        check_structure(registry.structures.get(name))
    for name in checked["inverters"]:
        inverter = registry.inverters.get(name)
        check_inverter(inverter() if isinstance(inverter, type) else inverter)
    checked["methods"] = own(registry.methods)
    for name in checked["methods"]:
        check_method(name, registry=registry)
        if data_parallel:
            check_data_parallel(name, registry=registry)
    return checked
