"""The kit's step checks catch what they are for: a block that counts its own updates
twice (statistics period), a step that does not follow the documented weight-decay rule,
and a Shampoo-style block that rebuilds the gradient from the captured features
(two processes differ from one; passes every single-process check)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import curvkit
from curvkit.blocks import KroneckerBlock
from curvkit.testing import (
    check_data_parallel,
    check_sample_configs_train,
    check_statistics_period,
    check_weight_decay_modes,
)

SRC = Path(__file__).resolve().parents[1] / "docs" / "plugin-template" / "src"


def _kfac_spec(block_cls, name):
    import curvkit_kfac

    base = curvkit_kfac.KFAC_SPEC
    import dataclasses

    return dataclasses.replace(
        base,
        name=name,
        class_name=None,
        block_factory=lambda info, config, registry: block_cls(
            info, structure=config.structure_classes(registry), inverter=config.inverter_object(registry)
        ),
    )


class _DoubleCounting(KroneckerBlock):
    """Counts a skipped period as an update (as a block that kept its own step counter would)."""

    def update(self, stats, decay):
        super().update(stats, decay)
        self.num_updates += 2


def test_the_period_check_catches_a_block_counting_its_own_updates():
    with pytest.raises(AssertionError, match=r"'double-counting'.*blocks updated \{.*\} times, expected 12"):
        check_statistics_period(_kfac_spec(_DoubleCounting, "double-counting"))


def test_the_weight_decay_check_holds_the_step_to_the_documented_rule(monkeypatch):
    """'after' and 'decoupled' must move the parameters exactly by the documented rule from
    the step without decay; an optimizer that applied the decay twice fails it."""
    check_weight_decay_modes(_kfac_spec(KroneckerBlock, "plain"))
    import curvkit.optim.optimizer as optimizer_module

    original = optimizer_module.apply_updates

    def decays_twice(state, params, directions, groups, *rest):
        for i, p in params.items():
            group = groups[i]
            if group["weight_decay_mode"] == "after":
                directions[i] = directions[i] + group["weight_decay"] * p
        return original(state, params, directions, groups, *rest)

    monkeypatch.setattr(optimizer_module, "apply_updates", decays_twice)
    with pytest.raises(AssertionError, match=r"'plain': the first step with weight_decay_mode='after' \(γ=0.1\)"):
        check_weight_decay_modes(_kfac_spec(KroneckerBlock, "plain"))


def test_the_data_parallel_check_catches_a_gradient_rebuilt_from_features():
    sys.path.insert(0, str(SRC))
    try:
        broken = importlib.import_module("curvkit_plugin_template.broken")
    finally:
        sys.path.remove(str(SRC))
    registry = curvkit.build_registry(autoload=False)
    check_sample_configs_train(broken.FEATURES_SHAMPOO_SPEC, registry=registry)  # fine on one process
    with pytest.raises(
        AssertionError,
        match=r"'template-shampoo-features'.*two processes.*parameter 0 on rank 0 differs from one process on the "
        r"whole batch by .* \(relative 0\.\d+",
    ):
        check_data_parallel(broken.FEATURES_SHAMPOO_SPEC, registry=registry)


def test_kfac_passes_the_data_parallel_check_and_ranks_really_communicate(monkeypatch):
    """The check is not vacuous: with the processes' communication cut (each keeps to
    itself), K-FAC's two halves differ from the whole."""
    import curvkit.testing.distributed as dist_check

    check_data_parallel("kfac")
    original = dist_check._run

    def local_statistics(spec, registry, options, steps, rank, world):
        if world > 1:  # DDP still averages the gradients; the statistics stay per process
            options = {**options, "distributor": False}
        return original(spec, registry, options, steps, rank, world)

    monkeypatch.setattr(dist_check, "_run", local_statistics)
    with pytest.raises(AssertionError, match=r"'kfac'.*differs from one process"):
        check_data_parallel("kfac")
