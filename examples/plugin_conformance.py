"""
The conformance kit on the plugin template
==========================================

:mod:`curvkit.testing` checks a plugin's components the way curvkit checks its own:
structures and inverters against dense float64 algebra, methods by training, by their
bad configurations, by a ``state_dict`` round trip, by a step with a NaN gradient, with
statistics every 2 steps, in every weight-decay mode, through their curvature operators,
and on two data-parallel processes against one. This script runs it on the plugin template
in ``docs/plugin-template``, trains its Shampoo on digits, and shows the kit catching three
deliberately broken variants.
"""

import importlib.util
import os
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvkit
from curvkit.optim.named import named_class
from curvkit.testing import (
    check_bad_configs,
    check_data_parallel,
    check_plugin,
    check_sample_configs_train,
    check_structure,
)

if importlib.util.find_spec("curvkit_plugin_template") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "plugin-template" / "src"))
from curvkit_plugin_template import plugin
from curvkit_plugin_template.broken import (
    FEATURES_SHAMPOO_SPEC,
    UNCHECKED_TEMPLATE_KFAC_SPEC,
    SwappedEmaScaledIdentity,
)

#: Epochs of the digits run (1 when CURVKIT_EXAMPLES_QUICK is set, as the test suite does).
EPOCHS = 1 if os.environ.get("CURVKIT_EXAMPLES_QUICK") else 4

registry = curvkit.build_registry()  # the installed plugins
if "plugin_template" not in registry.plugins:  # the template is not installed: pass it explicitly
    registry = curvkit.build_registry(plugins=[("plugin_template", plugin)])

# %%
# Everything the template registers passes: ``check_plugin`` runs ``check_structure``,
# ``check_inverter`` and ``check_method`` on each structure, inverter and method the
# plugin registered — for a method also ``check_statistics_period``,
# ``check_weight_decay_modes``, ``check_block_operators`` and ``check_data_parallel`` (two
# forked gloo processes) — and returns what it checked.

print(check_plugin("plugin_template", registry=registry))

# %%
# The template's Shampoo (``template-shampoo``, gradient-based, built on the public API
# only) gets a named class from its spec's ``class_name``; with its recommended settings it
# trains an MLP on scikit-learn's digits:

X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
train, test = perm[:1400], perm[1400:]
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
optimizer_cls = named_class("TemplateShampoo", registry)  # curvkit.optim.TemplateShampoo once installed
opt = optimizer_cls(model, registry=registry)
for epoch in range(EPOCHS):
    for i in range(0, len(train), 64):
        idx = train[i : i + 64]
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(X[test]).argmax(1) == y[test]).float().mean())
    print(f"{optimizer_cls.__name__}, epoch {epoch + 1}: test accuracy {accuracy:.3f}")

# %%
# A structure whose running average mixes the wrong way round trains without any error,
# just worse. The kit names the operation, the dimension and what was expected:

try:
    check_structure(SwappedEmaScaledIdentity)
except AssertionError as err:
    print(f"AssertionError: {err}")

# %%
# A configuration that forgets to validate an option accepts ``ns_max_iter=0``; the kit
# builds the optimizer with each of the method's declared ``bad_configs`` and reports the
# one that went through:

try:
    check_bad_configs(UNCHECKED_TEMPLATE_KFAC_SPEC, registry=registry)
except AssertionError as err:
    print(f"AssertionError: {err}")

# %%
# The third variant is Shampoo that captures layer statistics and rebuilds the gradient
# from them instead of reading ``stats.gradient``. On one process that *is* the gradient,
# so it trains and passes every single-process check; on two processes the gathered
# features rescale it. Only the data-parallel check sees it:

check_sample_configs_train(FEATURES_SHAMPOO_SPEC, registry=registry)
print("one process: trains")
try:
    check_data_parallel(FEATURES_SHAMPOO_SPEC, registry=registry)
except AssertionError as err:
    print(f"AssertionError: {err}")
