"""Conformance kits for plugin authors: test your structures, inverters and methods exactly
as curvkit tests its own.

Each ``check_*`` function raises :class:`AssertionError` with a message that names the
component and what went wrong; call them from your test suite (pytest or anything else)::

    from curvkit.testing import check_method, check_structure

    def test_my_method():
        check_method("my-method")          # by registered name, or pass the MethodSpec

    def test_my_method_survives_faults():
        check_robustness("my-method")      # NaN gradients, outliers, failing decompositions, ...

    def test_my_method_curvature_is_an_operator():
        check_block_operators("my-method")  # every block's as_operator(), every operation

    def test_my_structure():
        check_structure(MyStructure)

    def test_my_method_under_data_parallel_training():
        check_data_parallel("my-method")   # two gloo processes equal one on the whole batch

    def test_everything_my_plugin_registers():
        check_plugin("my_plugin")          # its entry-point name: all of the above

curvkit's own test suite runs these over every registered component.
"""

from curvkit.testing.components import check_inverter, check_structure
from curvkit.testing.distributed import check_data_parallel
from curvkit.testing.methods import (
    check_bad_configs,
    check_method,
    check_nonfinite_gradient_skips,
    check_sample_configs_train,
    check_state_dict_roundtrip,
    check_unitwise_layers,
)
from curvkit.testing.operators import check_block_operators, check_operator
from curvkit.testing.plugin import check_plugin
from curvkit.testing.robustness import FAULTS, FaultResult, check_robustness, failing_decompositions, robustness_report
from curvkit.testing.steps import check_statistics_period, check_weight_decay_modes

__all__ = [
    "FAULTS",
    "FaultResult",
    "check_bad_configs",
    "check_block_operators",
    "check_data_parallel",
    "check_inverter",
    "check_method",
    "check_nonfinite_gradient_skips",
    "check_operator",
    "check_plugin",
    "check_robustness",
    "check_sample_configs_train",
    "check_state_dict_roundtrip",
    "check_statistics_period",
    "check_structure",
    "check_unitwise_layers",
    "check_weight_decay_modes",
    "failing_decompositions",
    "robustness_report",
]
