"""The plugin template (docs/plugin-template), imported from its source tree without
installing it, passes the conformance kit, and the kit catches its broken variants.

``tox -e plugin-template`` installs the template as its own distribution and runs its own
tests (which also check the entry point); this module runs the same conformance checks
in the main suite, with the template passed to ``curvkit.build_registry`` explicitly, so
CI covers it without an install.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import curvkit
from curvkit.structures import DenseStructure, DiagonalStructure
from curvkit.testing import check_bad_configs, check_inverter, check_method, check_plugin, check_structure

SRC = Path(__file__).resolve().parents[1] / "docs" / "plugin-template" / "src"
PLUGIN = "plugin_template"


def _import_template():
    sys.path.insert(0, str(SRC))
    try:
        return (
            importlib.import_module("curvkit_plugin_template"),
            importlib.import_module("curvkit_plugin_template.plugin"),
            importlib.import_module("curvkit_plugin_template.broken"),
        )
    finally:
        sys.path.remove(str(SRC))


template, template_plugin, broken = _import_template()


@pytest.fixture(scope="module")
def registry():
    """The core, the bundled K-FAC plugin (the reference) and the template, nothing else."""
    import curvkit_kfac

    return curvkit.build_registry(autoload=False, plugins=[("kfac", curvkit_kfac), (PLUGIN, template_plugin)])


def test_the_template_registers_a_handler_a_structure_an_inverter_and_a_method(registry):
    for table, name in (
        (registry.layer_handlers, "transposed_linear"),
        (registry.structures, "template_scaled_identity"),
        (registry.inverters, "template_newton_schulz"),
        (registry.methods, "template-kfac"),
        (registry.methods, "template-shampoo"),
    ):
        assert table.plugin_of(name) == PLUGIN


def test_structure_conforms():
    check_structure(template.ScaledIdentityStructure)


def test_inverter_conforms():
    check_inverter(
        template.NewtonSchulzInverter(),
        structures=(DenseStructure, DiagonalStructure, template.ScaledIdentityStructure),
    )


def test_method_conforms(registry):
    check_method("template-kfac", registry=registry)


def test_check_plugin_covers_the_template(registry):
    # every method: the single-process kit, statistics every 2 steps, every weight-decay
    # mode, the operator protocol, and two gloo processes against one
    assert check_plugin(PLUGIN, registry=registry) == {
        "structures": ["template_scaled_identity"],
        "inverters": ["template_newton_schulz"],
        "methods": ["template-kfac", "template-shampoo"],
    }


def test_check_plugin_names_a_plugin_that_is_not_loaded(registry):
    with pytest.raises(AssertionError, match="plugin 'not_there' is not loaded; loaded plugins: curvkit, kfac"):
        check_plugin("not_there", registry=registry)


def test_the_kit_names_the_swapped_ema():
    with pytest.raises(AssertionError) as caught:
        check_structure(broken.SwappedEmaScaledIdentity)
    assert str(caught.value).startswith(
        "structure 'template_scaled_identity_swapped_ema': ema_(other, decay=0.7) at d=1 (expected 0.7·self + "
        "0.3·other) differs from the same operation on dense float64 matrices"
    ), caught.value


def test_the_kit_names_the_unchecked_option(registry):
    with pytest.raises(AssertionError) as caught:
        check_bad_configs(broken.UNCHECKED_TEMPLATE_KFAC_SPEC, registry=registry)
    assert str(caught.value) == (
        "method 'template-kfac-unchecked': bad config {'ns_max_iter': 0} was accepted when the optimizer was built; "
        "expected ConfigError naming 'ns_max_iter'. Validate it in the config's problems()."
    )


def test_the_correct_method_rejects_the_option_by_name(registry):
    import curvkit.optim

    with pytest.raises(curvkit.ConfigError, match=r"ns_max_iter=0 must be an integer in \[1"):
        curvkit.optim.create("template-kfac", nn.Linear(2, 2), lr=0.1, ns_max_iter=0, registry=registry)


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_template_kfac_takes_the_steps_of_kfac_with_cholesky(registry, structure):
    """Newton-Schulz and Cholesky invert the same damped factors: same steps as curvkit's kfac."""
    import curvkit.optim

    def train(method, **options):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        X, y = torch.randn(32, 5, dtype=torch.float64), torch.randint(0, 3, (32,))
        opt = curvkit.optim.create(
            method,
            model,
            lr=0.1,
            damping=1e-2,
            T_inv=1,
            structure=structure,
            registry=registry,
            recommended=False,  # the raw methods: only the inverters differ
            **options,
        )
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for ours, reference in zip(train("template-kfac"), train("kfac", inverter="cholesky")):
        torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)


def test_transposed_linear_factors_equal_nn_linear(registry):
    torch.manual_seed(0)
    ours = template.TransposedLinear(5, 3).double()
    plain = nn.Linear(5, 3).double()
    with torch.no_grad():
        plain.weight.copy_(ours.weight.T)
        plain.bias.copy_(ours.bias)
    X, y = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    got = curvkit.kronecker_factors(ours, nn.MSELoss(), X, y, fisher="type-2", registry=registry)[""]
    want = curvkit.kronecker_factors(plain, nn.MSELoss(), X, y, fisher="type-2", registry=registry)[""]
    torch.testing.assert_close(got.A, want.A, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.G, want.G, rtol=1e-12, atol=0)


def test_the_kit_catches_shampoo_rebuilding_the_gradient_from_features(registry):
    """Right on one process, wrong on two: only the data-parallel check sees it."""
    from curvkit.testing import check_data_parallel, check_sample_configs_train

    check_sample_configs_train(broken.FEATURES_SHAMPOO_SPEC, registry=registry)
    with pytest.raises(AssertionError, match=r"'template-shampoo-features'.*differs from one process on the whole"):
        check_data_parallel(broken.FEATURES_SHAMPOO_SPEC, registry=registry)


_INSTALLED_SCRIPT = r"""
import json, sys
import torch
from torch import nn
from sklearn.datasets import load_digits
import curvkit, curvkit.optim
from curvkit.testing import check_plugin

registry = curvkit.default_registry()      # found through the installed entry point
checked = check_plugin("plugin_template")  # everything it registered, data-parallel included
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
opt = curvkit.optim.TemplateShampoo(model)  # the named class, built from the plugin's spec
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
for _ in range(4):
    for i in range(0, len(train), 64):
        idx = train[i : i + 64]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
with torch.no_grad():
    accuracy = float((model(X[test]).argmax(1) == y[test]).float().mean())
print(json.dumps({"checked": checked, "accuracy": accuracy, "plugins": registry.plugins,
                  "module": sys.modules["curvkit_plugin_template"].__file__}))
"""


def test_the_installed_template_passes_check_plugin_and_its_shampoo_learns_digits(tmp_path):
    """The tutorial's path: ``pip install`` the template as its own distribution (offline:
    ``--no-deps --no-build-isolation``, into a folder put on ``PYTHONPATH``), then curvkit
    finds it through its entry point, ``check_plugin`` passes for all of it (the Shampoo
    method on two data-parallel processes too), and ``curvkit.optim.TemplateShampoo`` trains
    on digits."""
    import json
    import subprocess

    pytest.importorskip("setuptools", minversion="77")  # the template's build backend, used offline
    import shutil

    # build from a copy: an in-tree build leaves build/ and src/*.egg-info, whose entry point
    # would then register the template in any process with src/ on sys.path
    source = tmp_path / "plugin-template"
    shutil.copytree(SRC.parent, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    env.pop("CURVKIT_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run(
        [sys.executable, "-c", _INSTALLED_SCRIPT], capture_output=True, text=True, timeout=900, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["module"].startswith(str(target))  # the installed copy, not the source tree
    assert PLUGIN in result["plugins"]
    assert result["checked"] == {
        "structures": ["template_scaled_identity"],
        "inverters": ["template_newton_schulz"],
        "methods": ["template-kfac", "template-shampoo"],
    }
    assert result["accuracy"] >= 0.93, result
