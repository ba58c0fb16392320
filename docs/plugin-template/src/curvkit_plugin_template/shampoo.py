r"""A gradient-based method: Shampoo (Gupta, Koren & Singer 2018), on curvkit's public API only.

Shampoo keeps, per layer with gradient :math:`G_t` in matrix form ``(d_out, d_in [+1])``,
two statistics of the gradients themselves — no forward-pass capture:

.. math:: L_t = \rho L_{t-1} + (1-\rho)\,G_t G_t^\top, \qquad
          R_t = \rho R_{t-1} + (1-\rho)\,G_t^\top G_t,

and steps along :math:`\Delta_t = (L_t + \epsilon I)^{-1/4}\,G_t\,(R_t + \epsilon I)^{-1/4}`
(the EMA instead of the paper's sum, as most implementations do now). What curvkit gives
such a method:

* ``MethodSpec(statistics="gradient")``: the block's ``update(stats, decay)`` gets a
  :class:`~curvkit.blocks.GradientStats` whose ``stats.gradient`` is exactly the matrix it
  will precondition — the step's gradient, **already averaged over the processes** in
  data-parallel training — and no hooks are put on the model. (Do not rebuild the gradient
  from captured features: that is the loss gradient only for the empirical Fisher, and it is
  off by the batch-size factor under data-parallel training; ``check_plugin``'s
  data-parallel check catches it.)
* The core owns the schedule (:class:`~curvkit.methods.Schedule`): statistics every
  ``T_stats`` steps with ``decay = min(1 − 1/k, ema_decay)`` for the ``k``-th update (so the
  first gradient initialises ``L`` and ``R``), a refresh every ``T_inv`` steps and right
  after the first update; the block never counts steps.
* :func:`curvkit.linalg.inverse_root`: :math:`(M + \epsilon I)^{-1/4}` by a symmetric
  eigendecomposition in float32 at least, retried in float64, ``None`` on failure (the
  block then keeps its last roots and counts the failure).

The curvature the block stands for is :math:`L^{1/4}\otimes R^{1/4}` in curvkit's
``G ⊗ A`` convention (``op @ M = L^{1/4} M R^{1/4}``; its damped inverse is the step),
returned by :meth:`ShampooBlock.as_operator` as a
:class:`~curvkit.linalg.kronecker.KroneckerOperator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit import ConfigError
from curvkit.blocks import BlockInfo, CurvatureBlock
from curvkit.config import check_number
from curvkit.linalg import inverse_root, matrix_power
from curvkit.linalg.kronecker import KroneckerOperator
from curvkit.methods import MethodConfig, MethodSpec, Schedule

__all__ = ["SHAMPOO_SPEC", "ShampooBlock", "ShampooConfig", "shampoo_block"]


@dataclass(frozen=True, kw_only=True)
class ShampooConfig(MethodConfig):
    """Shampoo's options. A gradient-based method subclasses
    :class:`~curvkit.methods.MethodConfig` (no Fisher type or capture options to inherit).

    Args:
        T_stats: Statistics (``L``, ``R``) every ``T_stats`` steps.
        ema_decay: ρ of the statistics' running average, in ``[0, 1)``.
        T_inv: Inverse fourth roots every ``T_inv`` steps (stale in between).
        epsilon: ε added to every eigenvalue of ``L`` and ``R`` before the root (> 0).
    """

    T_stats: int = 1
    ema_decay: float = 0.95
    T_inv: int = 1
    epsilon: float = 1e-4

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "T_stats", self.T_stats, low=1, integer=True)
        check_number(out, "ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        check_number(out, "T_inv", self.T_inv, low=1, integer=True)
        check_number(out, "epsilon", self.epsilon, low=0.0, low_open=True)
        return out


class ShampooBlock(CurvatureBlock):
    """Per-layer ``L``, ``R`` and their damped inverse fourth roots."""

    def __init__(self, info: BlockInfo, *, epsilon: float) -> None:
        super().__init__(info)
        self.epsilon = float(epsilon)
        self.L: Tensor | None = None
        self.R: Tensor | None = None
        self.L_root: Tensor | None = None
        self.R_root: Tensor | None = None

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        self.L = torch.zeros(self.info.d_out, self.info.d_out, dtype=dtype, device=device)
        self.R = torch.zeros(self.info.d_in, self.info.d_in, dtype=dtype, device=device)

    def update(self, stats: Any, decay: float) -> None:
        grad = stats.gradient  # (d_out, d_in [+1]): the step's gradient, reduced over processes
        if self.L is None:
            self.init(dtype=grad.dtype, device=grad.device)
        assert self.L is not None and self.R is not None
        self.L.mul_(decay).add_(grad @ grad.T, alpha=1.0 - decay)
        self.R.mul_(decay).add_(grad.T @ grad, alpha=1.0 - decay)
        # the core counts the update (num_updates); return False to decline a batch

    def refresh(self, damping: Any, lam: float) -> None:
        del damping, lam  # the schedule declares no damping: ε is the method's own option
        assert self.L is not None and self.R is not None
        L_root = inverse_root(self.L, 4, shift=self.epsilon)
        R_root = inverse_root(self.R, 4, shift=self.epsilon)
        if L_root is None or R_root is None:  # keep the last good roots, count the failure
            self.inverse_failures += 1
            return
        self.L_root, self.R_root = L_root.to(self.L.dtype), R_root.to(self.R.dtype)

    def precondition(self, grad: Tensor) -> Tensor:
        if self.L_root is None or self.R_root is None:  # every refresh failed so far
            return grad
        return (self.L_root @ grad.to(self.L_root.dtype) @ self.R_root).to(grad.dtype)

    def as_operator(self) -> KroneckerOperator:
        """:math:`L^{1/4}\\otimes R^{1/4}` (undamped), whose ε-damped inverse is the step."""
        assert self.L is not None and self.R is not None
        G, A = matrix_power(self.L, 0.25), matrix_power(self.R, 0.25)
        if G is None or A is None:
            raise RuntimeError(f"ShampooBlock {self.info.name!r}: the fourth roots of L and R failed.")
        return KroneckerOperator(A.to(self.L.dtype), G.to(self.L.dtype), label=self.info.name)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_updates": self.num_updates, "inverse_failures": self.inverse_failures}
        for key in ("L", "R", "L_root", "R_root"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        for key in ("L", "R", "L_root", "R_root"):
            value = state.get(key)
            setattr(self, key, None if value is None else value.clone())


def shampoo_block(info: BlockInfo, config: ShampooConfig, registry: Any) -> ShampooBlock:
    """One :class:`ShampooBlock` per layer; also used for normalisation layers (their
    ``(units, k)`` gradient gets a ``units × units`` ``L`` and a ``k × k`` ``R``)."""
    del registry
    return ShampooBlock(info, epsilon=config.epsilon)


SHAMPOO_SPEC = MethodSpec(
    name="template-shampoo",
    class_name="TemplateShampoo",  # curvkit.optim.TemplateShampoo, built from this spec
    config_cls=ShampooConfig,
    block_factory=shampoo_block,
    unitwise_block=shampoo_block,
    statistics="gradient",
    # the core reads these fields for the schedule; Shampoo has no damping *strategy*
    schedule=Schedule(statistics_period="T_stats", refresh_period="T_inv", ema_decay="ema_decay", damping=None),
    summary="template plugin: Shampoo, (L + εI)^(-1/4) G (R + εI)^(-1/4) with EMA statistics of the gradient",
    reference="Gupta, Koren & Singer (2018), arXiv:1802.09568",
    sample_configs=({"epsilon": 1e-3}, {"epsilon": 1e-3, "T_stats": 2, "T_inv": 3}),
    bad_configs=(({"epsilon": 0.0}, ConfigError), ({"ema_decay": 1.0}, ConfigError)),
    recommended={"lr": 0.03, "momentum": 0.9, "epsilon": 1e-3, "kl_clip": 1e-2, "grad_ratio_clip": 100.0},
)
