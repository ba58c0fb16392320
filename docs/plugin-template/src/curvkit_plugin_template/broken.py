r"""Deliberately broken variants of this plugin's components, for the conformance kit to catch.

Nothing here is registered. The template's tests (and the tutorial in curvkit's
documentation) run :mod:`curvkit.testing` on these and check that each mistake is reported
with a message that names it:

* :class:`SwappedEmaScaledIdentity` mixes the running average the wrong way round —
  ``decay · other + (1 − decay) · self`` instead of ``decay · self + (1 − decay) · other`` —
  a bug that trains (badly) without any error; ``check_structure`` reports ``ema_``;
* :data:`UNCHECKED_TEMPLATE_KFAC_SPEC` forgets to validate ``ns_max_iter``, so
  ``ns_max_iter=0`` is accepted and the method would silently never invert anything;
  ``check_bad_configs`` reports the option that was accepted;
* :data:`FEATURES_SHAMPOO_SPEC` is Shampoo that captures layer statistics and rebuilds the
  gradient from them (the per-example gradients' sum over :math:`\sqrt{s}`, ``s = g_scale``) instead of
  reading ``stats.gradient``. On one process that *is* the gradient (for the empirical
  Fisher), so it trains and passes every single-process check; on two processes the
  gathered features rescale it, and ``check_data_parallel`` reports the parameters that
  differ from one process on the whole batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from curvkit.methods import KroneckerConfig, StatisticsConfig
from curvkit.structures import FactorStructure
from curvkit_plugin_template.method import TEMPLATE_KFAC_SPEC, TemplateKFACConfig
from curvkit_plugin_template.shampoo import SHAMPOO_SPEC, ShampooBlock, ShampooConfig
from curvkit_plugin_template.structures import ScaledIdentityStructure

__all__ = [
    "FEATURES_SHAMPOO_SPEC",
    "UNCHECKED_TEMPLATE_KFAC_SPEC",
    "FeaturesShampooBlock",
    "SwappedEmaScaledIdentity",
    "UncheckedTemplateKFACConfig",
]


class SwappedEmaScaledIdentity(ScaledIdentityStructure):
    """WRONG: the EMA weights are swapped."""

    name = "template_scaled_identity_swapped_ema"

    def ema_(self, other: FactorStructure, decay: float) -> SwappedEmaScaledIdentity:
        new = other.trace().to(self.scale.dtype) / self.dim
        self.scale.mul_(1 - decay).add_(new, alpha=decay)  # the bug: the weights belong the other way round
        return self


@dataclass(frozen=True, kw_only=True)
class UncheckedTemplateKFACConfig(TemplateKFACConfig):
    """WRONG: skips TemplateKFACConfig's own validation (``ns_max_iter``)."""

    def problems(self) -> list[str]:
        return KroneckerConfig.problems(self)  # the bug: TemplateKFACConfig.problems is bypassed


UNCHECKED_TEMPLATE_KFAC_SPEC = dataclasses.replace(
    TEMPLATE_KFAC_SPEC, name="template-kfac-unchecked", config_cls=UncheckedTemplateKFACConfig
)


@dataclass(frozen=True, kw_only=True)
class FeaturesShampooConfig(ShampooConfig, StatisticsConfig):
    """Shampoo's options plus the capture options (it asks for layer statistics)."""


class FeaturesShampooBlock(ShampooBlock):
    """WRONG: rebuilds the gradient from the captured features."""

    def update(self, stats: Any, decay: float) -> None:
        rebuilt = stats.per_example_gradients().sum(0) / math.sqrt(stats.g_scale)  # the bug: use stats.gradient

        class _Rebuilt:
            gradient = rebuilt

        super().update(_Rebuilt(), decay)


FEATURES_SHAMPOO_SPEC = dataclasses.replace(
    SHAMPOO_SPEC,
    name="template-shampoo-features",
    class_name=None,
    config_cls=FeaturesShampooConfig,
    statistics="layer",
    block_factory=lambda info, config, registry: FeaturesShampooBlock(info, epsilon=config.epsilon),
    unitwise_block=None,
)
