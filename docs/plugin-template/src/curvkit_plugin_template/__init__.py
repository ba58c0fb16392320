"""curvkit plugin template: Kronecker factors for a GPT-2 style ``TransposedLinear`` layer.

curvkit finds this plugin through the entry point ``plugin_template`` in the ``curvkit``
group (see ``pyproject.toml``), which points at :mod:`curvkit_plugin_template.plugin`.
"""

from curvkit_plugin_template.layers import TransposedLinear, TransposedLinearHandler

__all__ = ["TransposedLinear", "TransposedLinearHandler"]
