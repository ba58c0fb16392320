"""curvkit plugin template: a layer handler, a factor structure, an inverter and two methods.

curvkit finds this plugin through the entry point ``plugin_template`` in the ``curvkit``
group (see ``pyproject.toml``), which points at :mod:`curvkit_plugin_template.plugin`.

* :class:`TransposedLinearHandler`: Kronecker factors of a GPT-2 style ``TransposedLinear``;
* :class:`ScaledIdentityStructure`: a factor stored as ``c · I`` (``"template_scaled_identity"``);
* :class:`NewtonSchulzInverter`: damped inverses by Newton–Schulz (``"template_newton_schulz"``);
* :data:`TEMPLATE_KFAC_SPEC`: the method ``"template-kfac"`` built from them;
* :data:`SHAMPOO_SPEC`: the gradient-based method ``"template-shampoo"`` (Shampoo,
  ``curvkit.optim.TemplateShampoo``), on curvkit's public API only.
"""

from curvkit_plugin_template.inverters import NewtonSchulzInverter, newton_schulz_inverse
from curvkit_plugin_template.layers import TransposedLinear, TransposedLinearHandler
from curvkit_plugin_template.method import TEMPLATE_KFAC_SPEC, TemplateKFACConfig, template_kfac_block
from curvkit_plugin_template.shampoo import SHAMPOO_SPEC, ShampooBlock, ShampooConfig, shampoo_block
from curvkit_plugin_template.structures import ScaledIdentityStructure

__all__ = [
    "SHAMPOO_SPEC",
    "TEMPLATE_KFAC_SPEC",
    "NewtonSchulzInverter",
    "ScaledIdentityStructure",
    "ShampooBlock",
    "ShampooConfig",
    "TemplateKFACConfig",
    "TransposedLinear",
    "TransposedLinearHandler",
    "newton_schulz_inverse",
    "shampoo_block",
    "template_kfac_block",
]
