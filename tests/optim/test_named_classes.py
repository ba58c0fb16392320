"""Named optimizer classes come from the registry: ``curvkit.optim.KFAC`` is built from the
``kfac`` spec's ``class_name``, and a third-party method gets ``curvkit.optim.<Name>``
without a core edit."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import curvkit
import curvkit.optim
from curvkit.blocks import KroneckerBlock
from curvkit.errors import DuplicateComponentError
from curvkit.methods import KroneckerConfig, MethodSpec
from curvkit.optim.named import class_names, named_class

BUNDLED = {
    "KFAC": "kfac",
    "EKFAC": "ekfac",
    "TKFAC": "tkfac",
    "TEKFAC": "tekfac",
    "SINGD": "singd",
    "IKFAC": "ikfac",
    "INGD": "ingd",
    "RSKFAC": "rs-kfac",
    "SREKFAC": "sre-kfac",
    "SKFAC": "skfac",
    "BKFAC": "b-kfac",
    "BRKFAC": "b-r-kfac",
    "BKFACC": "b-kfac-c",
}


def test_the_core_defines_no_named_class():
    import curvkit.optim.optimizer as module

    assert not [name for name in BUNDLED if name in vars(module)]
    assert not [name for name in BUNDLED if name in curvkit.optim.__all__]


def test_bundled_names_resolve_from_their_specs():
    assert {k: v for k, v in class_names().items() if k in BUNDLED} == BUNDLED
    for name, method in BUNDLED.items():
        cls = getattr(curvkit.optim, name)
        assert cls is getattr(curvkit.optim, name)  # cached: one class per name
        assert issubclass(cls, curvkit.optim.CurvatureOptimizer)
        assert cls.method == method and cls.__module__ == "curvkit.optim" and cls.__qualname__ == name
        assert method in cls.__doc__
    from curvkit_singd.optim import SINGD as PluginSINGD

    from curvkit.optim import KFAC, SINGD

    assert KFAC is curvkit.optim.KFAC and SINGD is PluginSINGD
    assert {"KFAC", "SINGD"} <= set(dir(curvkit.optim))


def test_instances_pickle_deepcopy_and_isinstance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = curvkit.optim.KFAC(model, lr=0.1, damping=0.1)
    nn.functional.cross_entropy(model(torch.randn(8, 3)), torch.randint(0, 2, (8,))).backward()
    opt.step()
    assert isinstance(opt, curvkit.optim.KFAC) and isinstance(opt, curvkit.optim.CurvatureOptimizer)
    assert type(copy.deepcopy(opt)) is curvkit.optim.KFAC
    assert type(pickle.loads(pickle.dumps(opt))) is curvkit.optim.KFAC
    assert type(curvkit.optim.create("kfac", nn.Linear(2, 2))) is curvkit.optim.CurvatureOptimizer


def test_unknown_name_is_an_attribute_error_listing_the_named_classes():
    with pytest.raises(AttributeError, match=r"'Shampoo'.*named classes: BKFAC, .*KFAC.*create\("):
        curvkit.optim.Shampoo  # noqa: B018
    with pytest.raises(ImportError):
        from curvkit.optim import NotAMethod  # noqa: F401
    with pytest.raises(AttributeError):
        curvkit.optim.lowercase  # noqa: B018


@dataclass(frozen=True, kw_only=True)
class _ThirdPartyConfig(KroneckerConfig):
    pass


def _spec(name: str, class_name: str) -> MethodSpec:
    return MethodSpec(
        name=name,
        class_name=class_name,
        config_cls=_ThirdPartyConfig,
        block_factory=lambda info, config, registry: KroneckerBlock(
            info, structure=config.structure_classes(registry), inverter=config.inverter_object(registry)
        ),
        summary="a third-party method",
    )


class _Plugin:
    def __init__(self, *specs: MethodSpec) -> None:
        self.specs = specs

    @curvkit.hookimpl
    def curvkit_register_methods(self, register):
        for spec in self.specs:
            register.add(spec)


def test_a_third_party_method_gets_a_named_class():
    import curvkit_kfac

    registry = curvkit.build_registry(
        autoload=False, plugins=[("kfac", curvkit_kfac), ("third", _Plugin(_spec("third-kfac", "ThirdKFAC")))]
    )
    cls = named_class("ThirdKFAC", registry)
    assert cls.method == "third-kfac" and cls.__name__ == "ThirdKFAC" and "a third-party method" in cls.__doc__
    model = nn.Linear(3, 2)
    opt = cls(model, lr=0.1, registry=registry)
    assert opt.preconditioner.spec.name == "third-kfac"


def test_two_methods_with_one_class_name_are_refused():
    registry = curvkit.build_registry(
        autoload=False, plugins=[("a", _Plugin(_spec("a-kfac", "Same"))), ("b", _Plugin(_spec("b-kfac", "Same")))]
    )
    with pytest.raises(DuplicateComponentError, match=r"'a-kfac' \(plugin 'a'\) and 'b-kfac' \(plugin 'b'\).*'Same'"):
        class_names(registry)


@pytest.mark.parametrize("bad", ["kfac", "K FAC", "", 3])
def test_bad_class_names_are_refused(bad):
    with pytest.raises(ValueError, match="class_name="):
        _spec("x", bad)


def test_curvkit_plugins_shows_the_class():
    from curvkit.cli import _details

    assert "class: curvkit.optim.KFAC" in _details("methods", curvkit.default_registry().methods.get("kfac"))
    assert "class:" not in _details("methods", dataclasses.replace(_spec("x", "X"), class_name=None))
