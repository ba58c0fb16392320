"""Conformance kits for plugin authors: test your structures, inverters and methods exactly
as curvkit tests its own.

Each ``check_*`` function raises :class:`AssertionError` with a message that names the
component and what went wrong; call them from your test suite (pytest or anything else)::

    from curvkit.testing import check_method, check_structure

    def test_my_method():
        check_method("my-method")          # by registered name, or pass the MethodSpec

    def test_my_structure():
        check_structure(MyStructure)

    def test_everything_my_plugin_registers():
        check_plugin("my_plugin")          # its entry-point name

curvkit's own test suite runs these over every registered component.
"""

from curvkit.testing.components import check_inverter, check_structure
from curvkit.testing.methods import (
    check_bad_configs,
    check_method,
    check_nonfinite_gradient_skips,
    check_sample_configs_train,
    check_state_dict_roundtrip,
    check_unitwise_layers,
)
from curvkit.testing.plugin import check_plugin

__all__ = [
    "check_bad_configs",
    "check_inverter",
    "check_method",
    "check_nonfinite_gradient_skips",
    "check_plugin",
    "check_sample_configs_train",
    "check_state_dict_roundtrip",
    "check_structure",
    "check_unitwise_layers",
]
