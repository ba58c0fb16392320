"""The typed registry: registration, duplicates, look-ups, handler matching, and
third-party layer handlers and backends used by the statistics API."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import curvkit
from curvkit.stats.backend import BackendCapabilities

# --- small plugins ----------------------------------------------------------------------


class FakeBackend:
    """A backend that returns a fixed result; records the requests it gets."""

    def __init__(self, name="fake", fisher_types=frozenset(curvkit.FisherType)):
        self.name = name
        self.requests = []
        self.capabilities = BackendCapabilities(
            fisher_types=frozenset(fisher_types),
            approximations=frozenset(curvkit.KFACApprox),
            module_types=(nn.Linear,),
            losses=(nn.CrossEntropyLoss,),
        )

    def compute(self, request):
        self.requests.append(request)
        return {"sentinel": curvkit.KroneckerFactors(torch.eye(1), torch.eye(1))}


def module_plugin(name, **hooks):
    """A plugin module called ``name`` carrying the given ``@hookimpl`` functions."""
    module = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(module, hook_name, fn)
    return module


def backend_plugin(*backends, plugin_name="backend_plugin"):
    """A plugin module that registers ``backends``."""

    @curvkit.hookimpl
    def curvkit_register_statistics_backends(register):
        for b in backends:
            register.add(b)

    return module_plugin(plugin_name, curvkit_register_statistics_backends=curvkit_register_statistics_backends)


class ScaledLinear(nn.Linear):
    """A Linear subclass (its handler is more specific than the core's)."""


class Affine(nn.Module):
    """A custom module computing ``x @ Wᵀ + b`` that is not an ``nn.Linear``."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.b = nn.Parameter(torch.zeros(d_out))

    def forward(self, x):
        return x @ self.w.t() + self.b


class AffineHandler:
    name = "affine"
    module_types = (Affine,)

    def __init__(self):
        self.calls = 0

    def check(self, module):
        return None

    def weight(self, module):
        return module.w

    def bias(self, module):
        return module.b

    def input_features(self, module, x):
        self.calls += 1
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def output_features(self, module, g):
        return g.reshape(g.shape[0], -1, g.shape[-1])


class CountingLinearHandler(AffineHandler):
    name = "scaled-linear"
    module_types = (ScaledLinear,)

    def weight(self, module):
        return module.weight

    def bias(self, module):
        return module.bias


def handler_plugin(*handlers):
    class HandlerPlugin:
        @staticmethod
        @curvkit.hookimpl
        def curvkit_register_layer_handlers(register):
            for h in handlers:
                register.add(h)

    return HandlerPlugin


# --- tables -----------------------------------------------------------------------------


def test_core_registry_contents(core_registry):
    assert core_registry.plugins == ["curvkit"]
    assert core_registry.backends.names() == ["hooks"]
    assert set(core_registry.layer_handlers.names()) == {
        "linear",
        "conv",
        "embedding",
        "multihead_attention",
        "layer_norm",
        "rms_norm",
        "batch_norm",
        "group_norm",
    }
    assert core_registry.backends.plugin_of("hooks") == "curvkit"
    assert "hooks" in core_registry.backends and "nope" not in core_registry.backends
    assert len(core_registry.backends) == 1
    assert list(core_registry.tables()) == [
        "layer_handlers",
        "backends",
        "structures",
        "inverters",
        "dampings",
        "inverses",
        "methods",
    ]


def test_unknown_name_lists_registered_names():
    registry = curvkit.build_registry(autoload=False, plugins=[backend_plugin(FakeBackend("fake"))])
    with pytest.raises(curvkit.UnknownComponentError) as info:
        registry.backends.get("hook")
    msg = str(info.value)
    assert "'hook'" in msg and "'fake'" in msg and "'hooks'" in msg
    assert "Did you mean 'hooks'" in msg
    assert isinstance(info.value, KeyError) and isinstance(info.value, curvkit.CurvkitError)
    with pytest.raises(curvkit.UnknownComponentError, match="registered: none"):
        registry.methods.get("kfac")
    with pytest.raises(curvkit.UnknownComponentError):
        registry.backends.plugin_of("nope")


def test_duplicate_between_two_plugins_names_both():
    p1 = backend_plugin(FakeBackend("dup"), plugin_name="first_plugin")
    p2 = backend_plugin(FakeBackend("dup"), plugin_name="second_plugin")
    with pytest.raises(curvkit.DuplicateComponentError) as info:
        curvkit.build_registry(autoload=False, plugins=[p1, p2])
    msg = str(info.value)
    assert "'dup'" in msg and "'first_plugin'" in msg and "'second_plugin'" in msg
    assert isinstance(info.value, ValueError)


def test_duplicate_with_the_core_names_the_core():
    plugin = backend_plugin(FakeBackend("hooks"), plugin_name="shadow")
    with pytest.raises(curvkit.DuplicateComponentError) as info:
        curvkit.build_registry(autoload=False, plugins=[plugin])
    assert "'curvkit'" in str(info.value) and "'shadow'" in str(info.value)


def test_duplicate_message_blames_the_later_plugin():
    """The first registration wins; the message says who registered first."""
    p1 = backend_plugin(FakeBackend("dup"), plugin_name="first_plugin")
    p2 = backend_plugin(FakeBackend("dup"), plugin_name="second_plugin")
    with pytest.raises(
        curvkit.DuplicateComponentError, match=r"by plugin 'first_plugin' and by plugin 'second_plugin'"
    ):
        curvkit.build_registry(autoload=False, plugins=[p1, p2])


def test_duplicate_within_one_plugin():
    plugin = backend_plugin(FakeBackend("x"), FakeBackend("x"), plugin_name="twice")
    with pytest.raises(curvkit.DuplicateComponentError, match="'twice'"):
        curvkit.build_registry(autoload=False, plugins=[plugin])


def test_same_name_in_different_kinds_is_allowed():
    @curvkit.hookimpl
    def curvkit_register_inverters(register):
        register.add(curvkit.linalg.IdentityInverter(), name="hooks")

    registry = curvkit.build_registry(
        autoload=False, plugins=[module_plugin("inv", curvkit_register_inverters=curvkit_register_inverters)]
    )
    assert "hooks" in registry.inverters and "hooks" in registry.backends


def test_component_without_name_is_refused():
    @curvkit.hookimpl
    def curvkit_register_dampings(register):
        register.add(object())

    plugin = module_plugin("nameless", curvkit_register_dampings=curvkit_register_dampings)
    with pytest.raises(curvkit.PluginRegistrationError, match="'nameless'.*without a name"):
        curvkit.build_registry(autoload=False, plugins=[plugin])


@pytest.mark.parametrize("bad_name", ["", "   ", 3])
def test_invalid_component_name_is_refused(bad_name):
    @curvkit.hookimpl
    def curvkit_register_structures(register):
        register.add(object(), name=bad_name)

    plugin = module_plugin("badname", curvkit_register_structures=curvkit_register_structures)
    with pytest.raises(curvkit.PluginRegistrationError, match="'badname'"):
        curvkit.build_registry(autoload=False, plugins=[plugin])


def test_backend_missing_attributes_is_refused():
    incomplete = types.SimpleNamespace(name="incomplete")  # no capabilities, no compute
    with pytest.raises(curvkit.PluginRegistrationError, match=r"'broken_backend'.*capabilities.*compute"):
        curvkit.build_registry(autoload=False, plugins=[backend_plugin(incomplete, plugin_name="broken_backend")])


def test_layer_handler_missing_attributes_is_refused():
    bad = types.SimpleNamespace(name="half", module_types=(nn.Linear,))
    with pytest.raises(curvkit.PluginRegistrationError, match="input_features"):
        curvkit.build_registry(autoload=False, plugins=[handler_plugin(bad)])


def test_hook_that_raises_names_the_plugin():
    class Exploding:
        @staticmethod
        @curvkit.hookimpl
        def curvkit_register_methods(register):
            raise ZeroDivisionError("kaputt")

    with pytest.raises(curvkit.PluginRegistrationError, match=r"'Exploding'.*curvkit_register_methods.*kaputt") as info:
        curvkit.build_registry(autoload=False, plugins=[Exploding])
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_registration_order_is_load_order():
    names = [f"p{i}" for i in range(8)]
    plugins = [backend_plugin(FakeBackend(f"b{i}"), plugin_name=n) for i, n in enumerate(names)]
    registry = curvkit.build_registry(autoload=False, plugins=plugins)
    assert registry.backends.names() == ["hooks"] + [f"b{i}" for i in range(8)]
    assert [r.plugin for r in registry.backends.registrations()] == ["curvkit", *names]


def test_registry_plugins_lists_load_order():
    """``Registry.plugins`` is documented as the plugin names "in load order"."""
    names = [f"p{i}" for i in range(8)]
    plugins = [backend_plugin(FakeBackend(f"b{i}"), plugin_name=n) for i, n in enumerate(names)]
    registry = curvkit.build_registry(autoload=False, plugins=plugins)
    assert registry.plugins == ["curvkit", *names]


# --- handler matching -------------------------------------------------------------------


class GenericHandler(AffineHandler):
    name = "generic"
    module_types = (nn.Module,)


@pytest.mark.parametrize("order", ["specific-first", "generic-first"])
def test_handler_for_picks_most_specific(order):
    specific = CountingLinearHandler()
    generic = GenericHandler()
    handlers = (specific, generic) if order == "specific-first" else (generic, specific)
    registry = curvkit.build_registry(autoload=False, plugins=[handler_plugin(*handlers)])
    core_linear = registry.layer_handlers.get("linear")
    assert registry.handler_for(ScaledLinear(2, 2)) is specific
    assert registry.handler_for(nn.Linear(2, 2)) is core_linear
    assert registry.handler_for(nn.Conv1d(1, 1, 1)) is registry.layer_handlers.get("conv")
    assert registry.handler_for(nn.PReLU(2)) is generic
    assert registry.handler_for(nn.BatchNorm1d(2)) is registry.layer_handlers.get("batch_norm")


def test_handler_for_unknown_is_none(core_registry):
    assert core_registry.handler_for(nn.PReLU(2)) is None
    assert core_registry.handler_for(nn.SyncBatchNorm(2)) is None  # its statistics span processes
    assert core_registry.handler_for(nn.EmbeddingBag(3, 2)) is None
    assert core_registry.handler_for(ScaledLinear(2, 2)) is core_registry.layer_handlers.get("linear")


# --- third-party components used by the statistics API ---------------------------------


def _affine_and_linear_models():
    torch.manual_seed(0)
    affine = nn.Sequential(Affine(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    linear = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        linear[0].weight.copy_(affine[0].w)
        linear[0].bias.copy_(affine[0].b)
        linear[2].load_state_dict(affine[2].state_dict())
    return affine, linear


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_third_party_handler_for_custom_module(fisher, core_registry):
    affine, linear = _affine_and_linear_models()
    X = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(curvkit.UnsupportedModuleError, match="Affine"):
        curvkit.kronecker_factors(affine, loss_fn, X, y, fisher=fisher, unsupported="error", registry=core_registry)
    handler = AffineHandler()
    registry = curvkit.build_registry(autoload=False, plugins=[handler_plugin(handler)])
    ours = curvkit.kronecker_factors(affine, loss_fn, X, y, fisher=fisher, registry=registry)
    ref = curvkit.kronecker_factors(linear, loss_fn, X, y, fisher=fisher, registry=core_registry)
    assert handler.calls == 1
    assert set(ours) == {"0", "2"}
    for name in ref:
        torch.testing.assert_close(ours[name].A, ref[name].A)
        torch.testing.assert_close(ours[name].G, ref[name].G)


def test_third_party_handler_for_linear_subclass_is_used(core_registry):
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    handler = CountingLinearHandler()
    registry = curvkit.build_registry(autoload=False, plugins=[handler_plugin(handler)])
    ours = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=registry)
    ref = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="type-2", registry=core_registry)
    assert handler.calls == 1
    torch.testing.assert_close(ours["0"].A, ref["0"].A)
    torch.testing.assert_close(ours["0"].G, ref["0"].G)


def test_third_party_handler_check_can_refuse(core_registry):
    class Refusing(AffineHandler):
        def check(self, module):
            raise curvkit.UnsupportedModuleError("refused by test handler")

    affine, _ = _affine_and_linear_models()
    registry = curvkit.build_registry(autoload=False, plugins=[handler_plugin(Refusing())])
    X = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    with pytest.raises(curvkit.UnsupportedModuleError, match="'0'.*refused by test handler"):
        curvkit.kronecker_factors(
            affine, nn.CrossEntropyLoss(), X, y, fisher="type-2", unsupported="error", registry=registry
        )
    out = curvkit.kronecker_factors(
        affine, nn.CrossEntropyLoss(), X, y, fisher="type-2", unsupported="skip", registry=registry
    )
    assert set(out) == {"2"}


def test_third_party_backend_is_dispatched_to():
    backend = FakeBackend("fake")
    registry = curvkit.build_registry(autoload=False, plugins=[backend_plugin(backend)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    out = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), X, y, fisher="emp", backend="fake", registry=registry)
    assert list(out) == ["sentinel"]
    (request,) = backend.requests
    assert request.fisher is curvkit.FisherType.EMPIRICAL
    assert request.plan.names == ["0"]


def test_backend_capabilities_refusal_names_able_backends():
    limited = FakeBackend("limited", fisher_types={curvkit.FisherType.TYPE2})
    registry = curvkit.build_registry(autoload=False, plugins=[backend_plugin(limited)])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (4,))
    with pytest.raises(curvkit.UnsupportedRequestError, match=r"'limited'.*fisher='empirical'.*'hooks'"):
        curvkit.kronecker_factors(
            model, nn.CrossEntropyLoss(), X, y, fisher="empirical", backend="limited", registry=registry
        )
    assert not limited.requests
    # a loss the fake backend does not claim is refused too (MSE)
    with pytest.raises(curvkit.UnsupportedRequestError, match="MSELoss"):
        curvkit.kronecker_factors(
            model,
            nn.MSELoss(),
            X,
            torch.randn(4, 2, dtype=torch.float64),
            fisher="type-2",
            backend="limited",
            registry=registry,
        )
