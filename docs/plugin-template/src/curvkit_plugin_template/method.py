r"""A method: K-FAC whose damped factors are inverted by Newton–Schulz.

A method is a :class:`curvkit.methods.MethodSpec` with three parts:

1. a **frozen, keyword-only configuration dataclass** that validates itself. Subclassing
   :class:`curvkit.methods.KroneckerConfig` inherits the K-FAC family's options (Fisher
   type, expand/reduce, EMA decay, ``T_stats``, ``T_inv``, damping, inverter, structure);
   this one changes two defaults and adds ``ns_max_iter``. ``problems()`` returns one
   message per bad value, naming it and its legal range;
2. a **block factory** ``(BlockInfo, config, registry) -> CurvatureBlock``, here curvkit's
   :class:`~curvkit.blocks.KroneckerBlock` (EMA factors in a structure, inverted by an
   inverter under a damping strategy) with this plugin's inverter;
3. ``sample_configs`` (the conformance kit trains with each) and ``bad_configs`` (each must
   raise the given error with a message naming the bad option).

The maths is K-FAC's: with EMA factors :math:`A`, :math:`G` projected onto their
structures and the damping shifts :math:`s_A s_G = \lambda`, the step direction of a
layer with gradient :math:`\nabla` (matrix form, ``(d_out, d_in)``) is
:math:`(G + s_G I)^{-1}\,\nabla\,(A + s_A I)^{-1}`, the inverses computed every ``T_inv``
steps by :class:`~curvkit_plugin_template.inverters.NewtonSchulzInverter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from curvkit import ConfigError
from curvkit.blocks import KroneckerBlock
from curvkit.config import check_number
from curvkit.methods import KroneckerConfig, MethodSpec
from curvkit_plugin_template.inverters import NewtonSchulzInverter
from curvkit_plugin_template.structures import ScaledIdentityStructure

__all__ = ["TEMPLATE_KFAC_SPEC", "TemplateKFACConfig", "template_kfac_block"]


@dataclass(frozen=True, kw_only=True)
class TemplateKFACConfig(KroneckerConfig):
    """K-FAC with Newton–Schulz inverses.

    Args:
        inverter: Default ``"template_newton_schulz"``; any registered inverter works.
        structure: Default ``"dense"``; ``"template_scaled_identity"`` stores a factor
            as :math:`cI` (one number), and a pair ``(A's, G's)`` mixes them.
        ns_max_iter: Newton–Schulz iterations before an inversion counts as failed (the
            optimizer then keeps its last good inverse).
    """

    inverter: str = NewtonSchulzInverter.name
    ns_max_iter: int = 100

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "ns_max_iter", self.ns_max_iter, low=1, integer=True)
        return out


def template_kfac_block(info: Any, config: TemplateKFACConfig, registry: Any) -> KroneckerBlock:
    """One :class:`~curvkit.blocks.KroneckerBlock` per layer; this plugin's inverter gets
    the configured iteration limit, any other registered inverter is used as registered."""
    if config.inverter == NewtonSchulzInverter.name:
        inverter: Any = NewtonSchulzInverter(max_iter=config.ns_max_iter)
    else:
        inverter = config.inverter_object(registry)
    return KroneckerBlock(
        info, structure=config.structure_classes(registry), inverter=inverter, factor_dtype=config.factor_dtype
    )


TEMPLATE_KFAC_SPEC = MethodSpec(
    name="template-kfac",
    config_cls=TemplateKFACConfig,
    block_factory=template_kfac_block,
    summary="template plugin: K-FAC with Newton-Schulz inverses (optionally scaled-identity factors)",
    reference="Martens & Grosse (2015), arXiv:1503.05671; Pan & Schreiber (1991), SIAM J. Sci. Stat. Comput. 12(5)",
    sample_configs=(
        {"damping": 1e-2, "T_inv": 1},
        {"damping": 1e-2, "T_inv": 1, "structure": (ScaledIdentityStructure.name, "dense")},
    ),
    bad_configs=(
        ({"ns_max_iter": 0}, ConfigError),
        ({"ema_decay": 1.5}, ConfigError),
    ),
    # the defaults of create("template-kfac", model) and of curvkit bench: settings that
    # train, with a trust region (a KL clip and a bound on the direction per layer)
    recommended={"lr": 0.03, "momentum": 0.9, "damping": 0.1, "kl_clip": 1e-2, "grad_ratio_clip": 100.0},
)
