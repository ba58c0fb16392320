r"""Trust regions: how far one step may go.

Three clips, each off when ``None``; every bundled method's recommended settings switch on
one of the first two and the third, so that no step is orders of magnitude larger than the
gradient unless the user asks:

* **KL clip** κ (Ba et al. 2017): the whole step is scaled by
  :math:`\nu = \min(1, \sqrt{\kappa / \sum_l \eta_l^2 s_l\langle\Delta_l, \nabla_l\rangle})`
  (with the untracked parameters' :math:`\eta^2\lVert\nabla\rVert^2`), which bounds the
  step's Fisher norm, :math:`\eta^2\nu^2\Delta^\top\hat F\Delta \le \kappa`;
* **RMS clip** κ per layer (Puiu 2022's "non-standard" clip):
  :math:`s_l = \min(1, \kappa / \operatorname{rms}(\Delta_l))`;
* **gradient-ratio clip** c per layer: :math:`s_l = \min(1, c\lVert\nabla_l\rVert /
  \lVert\Delta_l\rVert)`, so :math:`\lVert\Delta_l\rVert \le c\lVert\nabla_l\rVert`: a
  preconditioner can amplify the gradient at most c times (damping floors the
  amplification of K-FAC at :math:`1/\lambda`; relative damping, SINGD's learned factors
  and KLD-WRM's wake have no such floor).

:math:`\langle\Delta_l, \nabla_l\rangle` and :math:`\lVert\nabla_l\rVert^2` are the guard's
reductions (:mod:`curvkit.optim.guards`), so the KL clip costs no extra pass; the per-layer
clips cost one fused norm of the directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TrustRegion", "scales"]


@dataclass(frozen=True)
class TrustRegion:
    """The three clips (``None``: off)."""

    kl_clip: float | None = None
    rms_clip: float | None = None
    grad_ratio_clip: float | None = None

    def describe(self) -> str:
        """In words (``"no trust region"`` when every clip is off)."""
        parts = []
        if self.kl_clip is not None:
            parts.append(f"KL clip κ={self.kl_clip:g}")
        if self.rms_clip is not None:
            parts.append(f"per-layer RMS clip {self.rms_clip:g}")
        if self.grad_ratio_clip is not None:
            parts.append(f"per-layer ‖Δ‖ ≤ {self.grad_ratio_clip:g}‖∇‖")
        return "trust region: " + ", ".join(parts) if parts else "no trust region"


def scales(
    region: TrustRegion,
    directions: dict[str, Tensor],
    lrs: dict[str, float],
    grad_norms_sq: dict[str, float],
    inner_products: dict[str, float],
    fallback: list[tuple[Tensor, float]],
    direction_norms_sq: dict[str, float] | None = None,
) -> dict[str, float]:
    """Scale factors of the layers' directions (key ``""``: of the untracked parameters'
    gradients, the KL clip's ν); a layer without an entry is not scaled.

    Args:
        region: The clips.
        directions: ``{layer: Δ_l}`` in matrix form.
        lrs: ``{layer: its group's learning rate}``.
        grad_norms_sq: ``{layer: ‖∇_l‖²}`` of the gradient that was preconditioned.
        inner_products: ``{layer: ⟨Δ_l, ∇_l⟩}``.
        fallback: ``(parameter, learning rate)`` of the untracked parameters with a gradient.
        direction_norms_sq: ``{layer: ‖Δ_l‖²}`` where already computed (the
            preconditioner's direction guard); the others are computed here.
    """
    out: dict[str, float] = {}
    if region.rms_clip is not None or region.grad_ratio_clip is not None:
        known = direction_norms_sq or {}
        todo = [name for name in directions if name not in known]
        computed: dict[str, float] = {}
        if todo:
            computed = dict(zip(todo, (float(n) for n in torch._foreach_norm([directions[n] for n in todo]))))
        norms = [computed[n] if n in computed else math.sqrt(known[n]) for n in directions]
        for (name, d), norm in zip(directions.items(), norms):
            c = 1.0
            if region.rms_clip is not None:
                c = min(c, region.rms_clip / max(norm / math.sqrt(d.numel()), 1e-30))
            if region.grad_ratio_clip is not None and name in grad_norms_sq:
                c = min(c, region.grad_ratio_clip * math.sqrt(grad_norms_sq[name]) / max(norm, 1e-30))
            out[name] = c
    if region.kl_clip is None:
        return out
    total = sum(lrs[name] ** 2 * out.get(name, 1.0) * inner_products.get(name, 0.0) for name in directions)
    if fallback:
        grads = [p.grad.reshape(-1) for p, _ in fallback if p.grad is not None]
        squares = torch.stack([torch.dot(g, g).double() for g in grads]).tolist()
        total += sum(lr**2 * v for (_, lr), v in zip(fallback, squares))
    if not math.isfinite(total) or total <= 0:
        return out
    nu = min(1.0, math.sqrt(region.kl_clip / total))
    if nu != 1.0:
        out = {name: out.get(name, 1.0) * nu for name in directions}
        out[""] = nu
    return out
