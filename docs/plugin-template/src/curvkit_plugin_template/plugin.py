"""The hook implementations curvkit calls when it builds a registry.

Every curvkit hook is a *set-up time* hook: it runs once, when a registry is built (by
``curvkit.default_registry()`` on first use, or ``curvkit.build_registry()``), never in a
training step. A hook receives a typed register object as a keyword argument and adds
components to it; the name of the argument must match the hook specification. A plugin
implements only the hooks it needs.
"""

from __future__ import annotations

import curvkit
from curvkit.registry import InverterRegister, LayerHandlerRegister, MethodRegister, StructureRegister
from curvkit_plugin_template.inverters import NewtonSchulzInverter
from curvkit_plugin_template.layers import TransposedLinearHandler
from curvkit_plugin_template.method import TEMPLATE_KFAC_SPEC
from curvkit_plugin_template.shampoo import SHAMPOO_SPEC
from curvkit_plugin_template.structures import ScaledIdentityStructure


@curvkit.hookimpl
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    # Registered under the handler's ``name`` attribute ("transposed_linear"); the
    # registry records this plugin's entry-point name ("plugin_template") as its provider.
    register.add(TransposedLinearHandler())


@curvkit.hookimpl
def curvkit_register_structures(register: StructureRegister) -> None:
    # Structures are registered as classes (a method builds one instance per factor).
    register.add(ScaledIdentityStructure)


@curvkit.hookimpl
def curvkit_register_inverters(register: InverterRegister) -> None:
    # Inverters are registered as instances; a method may also build its own (see method.py).
    register.add(NewtonSchulzInverter())


@curvkit.hookimpl
def curvkit_register_methods(register: MethodRegister) -> None:
    # Once registered: curvkit.optim.create("template-kfac", model, lr=...), `curvkit plugins`.
    register.add(TEMPLATE_KFAC_SPEC)
    # A gradient-based method; its spec's class_name also makes curvkit.optim.TemplateShampoo.
    register.add(SHAMPOO_SPEC)
