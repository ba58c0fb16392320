"""The hook implementations curvkit calls when it builds a registry.

Every curvkit hook is a *set-up time* hook: it runs once, when a registry is built (by
``curvkit.default_registry()`` on first use, or ``curvkit.build_registry()``), never in a
training step. A hook receives a typed register object as a keyword argument and adds
components to it; the name of the argument must match the hook specification.
"""

from __future__ import annotations

import curvkit
from curvkit.registry import LayerHandlerRegister
from curvkit_plugin_template.layers import TransposedLinearHandler


@curvkit.hookimpl
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    # Registered under the handler's ``name`` attribute ("transposed_linear"); the
    # registry records this plugin's entry-point name ("plugin_template") as its provider.
    register.add(TransposedLinearHandler())
