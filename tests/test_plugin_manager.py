"""Plugin manager factory: entry points, autoload switch, block lists, load and
registration errors, and independence of plugin managers and registries."""

from __future__ import annotations

import types

import pluggy
import pytest

import curvkit
import curvkit.plugins as plugins_mod
from curvkit.plugins import AUTOLOAD_ENV, BLOCK_ENV, make_plugin_manager


class FakeBackend:
    def __init__(self, name):
        self.name = name
        self.capabilities = object()

    def compute(self, request):  # pragma: no cover - never dispatched to
        raise AssertionError


def backend_module(module_name, backend_name, calls=None):
    """A plugin module registering one fake backend; counts hook calls in ``calls``."""

    @curvkit.hookimpl
    def curvkit_register_statistics_backends(register):
        if calls is not None:
            calls.append(module_name)
        register.add(FakeBackend(backend_name))

    module = types.ModuleType(module_name)
    module.curvkit_register_statistics_backends = curvkit_register_statistics_backends
    return module


class FakeEntryPoint:
    """Stands in for ``importlib.metadata.EntryPoint``; records whether it was loaded."""

    def __init__(self, name, target=None, error=None):
        self.name = name
        self.value = f"fake_pkg_{name}.plugin"
        self.group = "curvkit"
        self.dist = None
        self._target = target
        self._error = error
        self.loaded = 0

    def load(self):
        self.loaded += 1
        if self._error is not None:
            raise self._error
        return self._target


@pytest.fixture
def fake_entry_points(clean_plugin_env):
    """Replace the entry-point discovery of ``curvkit.plugins`` with a controllable list."""
    eps: list[FakeEntryPoint] = []

    def entry_points(*, group=None, **kwargs):
        assert group == "curvkit"
        return list(eps)

    clean_plugin_env.setattr(plugins_mod, "entry_points", entry_points)
    return eps


# --- autoloading -----------------------------------------------------------------------


def test_entry_points_are_loaded_by_default(fake_entry_points):
    ep = FakeEntryPoint("thirdparty", backend_module("thirdparty_mod", "tp-backend"))
    fake_entry_points.append(ep)
    registry = curvkit.build_registry()
    assert ep.loaded == 1
    assert "tp-backend" in registry.backends
    assert registry.backends.plugin_of("tp-backend") == "thirdparty"
    assert "thirdparty" in registry.plugins and "curvkit" in registry.plugins


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_disable_autoload_env(fake_entry_points, clean_plugin_env, value):
    ep = FakeEntryPoint("thirdparty", backend_module("thirdparty_mod", "tp-backend"))
    fake_entry_points.append(ep)
    clean_plugin_env.setenv(AUTOLOAD_ENV, value)
    registry = curvkit.build_registry()
    assert ep.loaded == 0
    assert registry.plugins == ["curvkit"]
    assert "tp-backend" not in registry.backends


@pytest.mark.parametrize("value", ["0", "", "false", "no"])
def test_autoload_env_false_values_load(fake_entry_points, clean_plugin_env, value):
    ep = FakeEntryPoint("thirdparty", backend_module("thirdparty_mod", "tp-backend"))
    fake_entry_points.append(ep)
    clean_plugin_env.setenv(AUTOLOAD_ENV, value)
    registry = curvkit.build_registry()
    assert ep.loaded == 1 and "tp-backend" in registry.backends


def test_explicit_autoload_argument_wins_over_env(fake_entry_points, clean_plugin_env):
    ep = FakeEntryPoint("thirdparty", backend_module("thirdparty_mod", "tp-backend"))
    fake_entry_points.append(ep)
    registry = curvkit.build_registry(autoload=False)
    assert ep.loaded == 0 and "tp-backend" not in registry.backends
    clean_plugin_env.setenv(AUTOLOAD_ENV, "1")
    registry = curvkit.build_registry(autoload=True)
    assert ep.loaded == 1 and "tp-backend" in registry.backends


def test_explicit_plugins_are_registered_without_autoload(fake_entry_points, clean_plugin_env):
    clean_plugin_env.setenv(AUTOLOAD_ENV, "1")
    fake_entry_points.append(FakeEntryPoint("thirdparty", error=AssertionError("must not load")))
    registry = curvkit.build_registry(plugins=[backend_module("explicit_mod", "explicit")])
    assert "explicit" in registry.backends
    assert sorted(registry.plugins) == ["curvkit", "explicit_mod"]


def test_duplicate_entry_point_names_load_once(fake_entry_points):
    first = FakeEntryPoint("same", backend_module("same_a", "a-backend"))
    second = FakeEntryPoint("same", backend_module("same_b", "b-backend"))
    fake_entry_points.extend([first, second])
    registry = curvkit.build_registry()
    assert (first.loaded, second.loaded) == (1, 0)
    assert "a-backend" in registry.backends and "b-backend" not in registry.backends


# --- block lists ------------------------------------------------------------------------


def test_block_argument(fake_entry_points):
    blocked = FakeEntryPoint("unwanted", backend_module("unwanted_mod", "unwanted-backend"))
    kept = FakeEntryPoint("wanted", backend_module("wanted_mod", "wanted-backend"))
    fake_entry_points.extend([blocked, kept])
    registry = curvkit.build_registry(block=["unwanted"])
    assert blocked.loaded == 0 and kept.loaded == 1
    assert "unwanted-backend" not in registry.backends and "wanted-backend" in registry.backends
    assert registry.blocked == ["unwanted"]


def test_block_env(fake_entry_points, clean_plugin_env):
    a = FakeEntryPoint("alpha", backend_module("alpha_mod", "alpha-backend"))
    b = FakeEntryPoint("beta", backend_module("beta_mod", "beta-backend"))
    c = FakeEntryPoint("gamma", backend_module("gamma_mod", "gamma-backend"))
    fake_entry_points.extend([a, b, c])
    clean_plugin_env.setenv(BLOCK_ENV, " alpha, ,gamma ")
    registry = curvkit.build_registry()
    assert (a.loaded, b.loaded, c.loaded) == (0, 1, 0)
    assert sorted(registry.blocked) == ["alpha", "gamma"]
    # the argument adds to the environment variable
    registry = curvkit.build_registry(block=["beta"])
    assert set(registry.backends) == {"hooks"}


def test_block_applies_to_named_explicit_plugins(fake_entry_points):
    registry = curvkit.build_registry(
        autoload=False, block=["extra"], plugins=[("extra", backend_module("extra_mod", "extra-backend"))]
    )
    assert "extra-backend" not in registry.backends


def test_blocking_the_bundled_plugins_leaves_only_the_core(clean_plugin_env):
    """Uses the real entry points: blocked plugins are never imported."""
    registry = curvkit.build_registry(block=["backpack", "asdl", "transformers"])
    assert set(registry.backends) == {"hooks"}
    assert set(registry.layer_handlers) == {
        "linear",
        "conv",
        "embedding",
        "multihead_attention",
        "layer_norm",
        "rms_norm",
        "batch_norm",
        "group_norm",
    }


# --- load and registration errors ------------------------------------------------------


def test_broken_entry_point_raises_plugin_load_error(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("brokenplug", error=ImportError("No module named 'nowhere'")))
    with pytest.raises(curvkit.PluginLoadError) as info:
        curvkit.build_registry()
    msg = str(info.value)
    assert "'brokenplug'" in msg and "nowhere" in msg and BLOCK_ENV in msg
    assert isinstance(info.value, ImportError)
    assert isinstance(info.value.__cause__, ImportError)
    # blocking the broken plugin lets the registry build
    registry = curvkit.build_registry(block=["brokenplug"])
    assert "hooks" in registry.backends


def test_broken_entry_point_with_other_exception(fake_entry_points):
    fake_entry_points.append(FakeEntryPoint("crashy", error=RuntimeError("crash at import")))
    with pytest.raises(curvkit.PluginLoadError, match=r"'crashy'.*RuntimeError.*crash at import"):
        curvkit.build_registry()


def test_real_missing_module_entry_point(fake_entry_points):
    """A real EntryPoint whose module does not exist."""
    from importlib.metadata import EntryPoint

    ep = EntryPoint(name="ghost", value="curvkit_tests_no_such_module_xyz", group="curvkit")
    fake_entry_points.append(ep)
    with pytest.raises(curvkit.PluginLoadError, match="'ghost'.*curvkit_tests_no_such_module_xyz"):
        curvkit.build_registry()


def test_entry_point_registered_twice_under_two_names(fake_entry_points):
    module = backend_module("shared_mod", "shared-backend")
    fake_entry_points.extend([FakeEntryPoint("one", module), FakeEntryPoint("two", module)])
    with pytest.raises(curvkit.PluginRegistrationError, match="'two'"):
        curvkit.build_registry()


def test_misspelt_hook_name_is_refused():
    @curvkit.hookimpl
    def curvkit_register_layer_handler(register):  # missing the final "s"
        pass

    module = types.ModuleType("typo_plugin")
    module.curvkit_register_layer_handler = curvkit_register_layer_handler
    with pytest.raises(curvkit.PluginRegistrationError, match=r"typo_plugin|curvkit_register_layer_handler") as info:
        curvkit.build_registry(autoload=False, plugins=[module])
    assert "curvkit_register_layer_handler" in str(info.value)
    assert "spelling" in str(info.value)


def test_unknown_hook_argument_is_refused():
    @curvkit.hookimpl
    def curvkit_register_methods(registry):  # the spec's argument is called "register"
        pass

    module = types.ModuleType("wrong_arg_plugin")
    module.curvkit_register_methods = curvkit_register_methods
    with pytest.raises(curvkit.PluginRegistrationError, match="wrong_arg_plugin"):
        curvkit.build_registry(autoload=False, plugins=[module])


def test_hookimpl_without_arguments_is_called():
    calls = []

    @curvkit.hookimpl
    def curvkit_register_inverters():
        calls.append(1)

    module = types.ModuleType("no_arg_plugin")
    module.curvkit_register_inverters = curvkit_register_inverters
    curvkit.build_registry(autoload=False, plugins=[module])
    assert calls == [1]


def test_unmarked_functions_are_ignored():
    def curvkit_register_statistics_backends(register):  # no @hookimpl
        raise AssertionError("must not be called")

    module = types.ModuleType("unmarked")
    module.curvkit_register_statistics_backends = curvkit_register_statistics_backends
    registry = curvkit.build_registry(autoload=False, plugins=[module])
    assert registry.backends.names() == ["hooks"]


def test_plugin_hook_raising_names_plugin():
    @curvkit.hookimpl
    def curvkit_register_structures(register):
        raise KeyError("missing thing")

    module = types.ModuleType("raiser")
    module.curvkit_register_structures = curvkit_register_structures
    with pytest.raises(curvkit.PluginRegistrationError, match=r"'raiser'.*curvkit_register_structures.*KeyError"):
        curvkit.build_registry(autoload=False, plugins=[module])


def test_curvkit_errors_from_hooks_pass_through_unchanged():
    @curvkit.hookimpl
    def curvkit_register_structures(register):
        raise curvkit.UnsupportedRequestError("already a curvkit error")

    module = types.ModuleType("curvkit_error_plugin")
    module.curvkit_register_structures = curvkit_register_structures
    with pytest.raises(curvkit.UnsupportedRequestError, match="already a curvkit error"):
        curvkit.build_registry(autoload=False, plugins=[module])


# --- independence -----------------------------------------------------------------------


def test_each_build_uses_a_fresh_plugin_manager(monkeypatch):
    managers = []
    real = plugins_mod.make_plugin_manager

    def spy(**kwargs):
        pm = real(**kwargs)
        managers.append(pm)
        return pm

    monkeypatch.setattr(plugins_mod, "make_plugin_manager", spy)
    curvkit.build_registry(autoload=False)
    curvkit.build_registry(autoload=False)
    assert len(managers) == 2 and managers[0] is not managers[1]
    assert make_plugin_manager(autoload=False) is not make_plugin_manager(autoload=False)


def test_registries_are_independent():
    calls: list[str] = []
    plugin = backend_module("indep_mod", "indep", calls)
    with_plugin = curvkit.build_registry(autoload=False, plugins=[plugin])
    without = curvkit.build_registry(autoload=False)
    assert "indep" in with_plugin.backends and "indep" not in without.backends
    # the same plugin object can be used for a second registry; its hook runs once per build
    again = curvkit.build_registry(autoload=False, plugins=[plugin])
    assert calls == ["indep_mod", "indep_mod"]
    assert again.backends is not with_plugin.backends
    assert again.backends.get("indep") is not with_plugin.backends.get("indep")
    # mutating one registry's table leaves the others alone
    with_plugin.backends.add("extra", FakeBackend("extra"), "test")
    assert "extra" not in again.backends and "extra" not in without.backends


def test_registering_into_one_manager_does_not_leak():
    pm = make_plugin_manager(autoload=False)
    pm.register(backend_module("late_mod", "late"))
    assert "late" in curvkit.build_registry(plugin_manager=pm).backends
    assert "late" not in curvkit.build_registry(autoload=False).backends
    assert isinstance(pm, pluggy.PluginManager)


def test_lookups_do_not_call_hooks():
    calls: list[str] = []
    registry = curvkit.build_registry(autoload=False, plugins=[backend_module("lookup_mod", "lk", calls)])
    for _ in range(3):
        registry.backends.get("lk")
        registry.handler_for(object())
    assert calls == ["lookup_mod"]


# --- default registry -------------------------------------------------------------------


@pytest.fixture
def fresh_default_registry():
    curvkit.default_registry.cache_clear()
    yield
    curvkit.default_registry.cache_clear()


def test_default_registry_respects_env_and_is_cached(fake_entry_points, clean_plugin_env, fresh_default_registry):
    ep = FakeEntryPoint("thirdparty", backend_module("thirdparty_mod", "tp-backend"))
    fake_entry_points.append(ep)
    clean_plugin_env.setenv(AUTOLOAD_ENV, "1")
    off = curvkit.default_registry()
    assert off.plugins == ["curvkit"] and ep.loaded == 0
    assert curvkit.default_registry() is off
    clean_plugin_env.delenv(AUTOLOAD_ENV)
    on = curvkit.default_registry()
    assert on is not off and "tp-backend" in on.backends and ep.loaded == 1
    clean_plugin_env.setenv(BLOCK_ENV, "thirdparty")
    blocked = curvkit.default_registry()
    assert "tp-backend" not in blocked.backends
