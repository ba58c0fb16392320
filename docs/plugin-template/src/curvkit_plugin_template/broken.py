"""Deliberately broken variants of this plugin's components, for the conformance kit to catch.

Nothing here is registered. The template's tests (and the tutorial in curvkit's
documentation) run :mod:`curvkit.testing` on these and check that each mistake is reported
with a message that names it:

* :class:`SwappedEmaScaledIdentity` mixes the running average the wrong way round —
  ``decay · other + (1 − decay) · self`` instead of ``decay · self + (1 − decay) · other`` —
  a bug that trains (badly) without any error; ``check_structure`` reports ``ema_``;
* :data:`UNCHECKED_TEMPLATE_KFAC_SPEC` forgets to validate ``ns_max_iter``, so
  ``ns_max_iter=0`` is accepted and the method would silently never invert anything;
  ``check_bad_configs`` reports the option that was accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from curvkit.methods import KroneckerConfig
from curvkit.structures import FactorStructure
from curvkit_plugin_template.method import TEMPLATE_KFAC_SPEC, TemplateKFACConfig
from curvkit_plugin_template.structures import ScaledIdentityStructure

__all__ = ["UNCHECKED_TEMPLATE_KFAC_SPEC", "SwappedEmaScaledIdentity", "UncheckedTemplateKFACConfig"]


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
