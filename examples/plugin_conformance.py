"""
The conformance kit on the plugin template
==========================================

:mod:`curvkit.testing` checks a plugin's components the way curvkit checks its own:
structures and inverters against dense float64 algebra, methods by training, by their
bad configurations, by a ``state_dict`` round trip and by a step with a NaN gradient.
This script runs it on the plugin template in ``docs/plugin-template`` and on two
deliberately broken variants of it.
"""

import importlib.util
import sys
from pathlib import Path

import curvkit
from curvkit.testing import check_bad_configs, check_plugin, check_structure

if importlib.util.find_spec("curvkit_plugin_template") is None:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "plugin-template" / "src"))
from curvkit_plugin_template import plugin
from curvkit_plugin_template.broken import UNCHECKED_TEMPLATE_KFAC_SPEC, SwappedEmaScaledIdentity

registry = curvkit.build_registry()  # the installed plugins
if "plugin_template" not in registry.plugins:  # the template is not installed: pass it explicitly
    registry = curvkit.build_registry(plugins=[("plugin_template", plugin)])

# %%
# Everything the template registers passes: ``check_plugin`` runs ``check_structure``,
# ``check_inverter`` and ``check_method`` on each structure, inverter and method the
# plugin registered, and returns what it checked.

print(check_plugin("plugin_template", registry=registry))

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
