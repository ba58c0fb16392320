"""Statistics a block receives without a capture of its own.

* :class:`SharedLayerStats`: a batch's statistics averaged over the processes of
  data-parallel training (what a block's ``batch_statistics`` returned), or the factors an
  external backend (BackPACK, ASDL) computed;
* :class:`GradientStats`: the step's gradient only, for gradient-based methods
  (``MethodSpec(statistics="gradient")``).

Both are :class:`~curvkit.stats.layer_stats.LayerStats`, so a block's ``update`` takes them
alike; what they do not hold raises an error that says so.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.config import KFACApprox
from curvkit.stats.layer_stats import LayerStats

__all__ = ["GradientStats", "SharedLayerStats"]


class _WithoutFeatures(LayerStats):
    """Statistics without the per-example features: asking for them raises ``_missing``'s
    error, which says what the statistics hold instead."""

    def _missing(self, what: str) -> RuntimeError:
        raise NotImplementedError

    def output_features(self, p: int) -> Tensor:
        raise self._missing("output_features()")

    @property
    def in_features(self) -> Tensor:  # type: ignore[override]
        raise self._missing("in_features")

    @property
    def a_features(self) -> Tensor:  # type: ignore[override]
        raise self._missing("a_features")

    @property
    def g_features(self) -> Tensor:  # type: ignore[override]
        raise self._missing("g_features")


class SharedLayerStats(_WithoutFeatures):
    """The statistics of a batch spread over several processes, as a block's update sees
    them in data-parallel training (:mod:`curvkit.distributed`).

    It holds exactly what the block's :meth:`CurvatureBlock.batch_statistics` returned,
    averaged over every process's data (:attr:`shared`); :meth:`A` and :meth:`G` return the
    entries ``"A"`` and ``"G"`` when there are such entries. The per-example quantities
    (:meth:`rows`, the features) are not available: a block that needs them returns
    ``None`` from ``batch_statistics`` and gets the gathered batch instead.

    Args:
        layer: The tracked layer.
        shared: The averaged statistics.
        num_data: Data points of the whole batch (all processes).
        like: A tensor with the statistics' dtype and device (what ``init`` allocates in).
        approx: Expand or reduce.
    """

    def __init__(self, layer: Any, shared: dict[str, Tensor], num_data: int, like: Tensor, approx: KFACApprox):
        super().__init__(layer, like.new_empty((0,)), [], approx, 1.0)
        self.shared = shared
        self._num_data = int(num_data)
        self._dtype = (
            like.dtype
            if like.is_floating_point()
            else next((t.dtype for t in shared.values() if t.is_floating_point()), torch.get_default_dtype())
        )

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def num_data(self) -> int:
        return self._num_data

    def _missing(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"layer {self.layer.name!r}: {what} is not available in a distributed update, whose block declared "
            f"batch_statistics() = {sorted(self.shared or {})}; return None from batch_statistics to get the "
            "gathered batch instead, or add what the update needs to batch_statistics."
        )

    def A(self) -> Tensor:
        if self.shared is None or "A" not in self.shared:
            raise self._missing("A()")
        return self.shared["A"]

    def G(self) -> Tensor:
        if self.shared is None or "G" not in self.shared:
            raise self._missing("G()")
        return self.shared["G"]

    def rows(self) -> tuple[Tensor, Tensor]:
        raise self._missing("rows()")

    def per_example_gradients(self) -> Tensor:
        raise self._missing("per_example_gradients()")

    def unit_features(self) -> Tensor:
        raise self._missing("unit_features()")

    def unit_gradients(self) -> Tensor:
        raise self._missing("unit_gradients()")

    def unit_fisher(self) -> Tensor:
        if self.shared is not None and "F" in self.shared:
            return self.shared["F"]
        raise self._missing("unit_fisher()")


class GradientStats(_WithoutFeatures):
    """What a block of a *gradient-based* method (``MethodSpec.statistics == "gradient"``,
    e.g. Shampoo) gets in ``update()``: the step's gradient in matrix form
    (:attr:`gradient`), already reduced over the processes in data-parallel training, and
    nothing captured from the forward pass (no hooks are installed for such a method).

    Args:
        layer: The block.
        gradient: The gradient ``(d_out, d_in [+1])``.
    """

    def __init__(self, layer: Any, gradient: Tensor) -> None:
        super().__init__(layer, gradient.new_empty((0,)), [], KFACApprox.EXPAND, 1.0)
        self.gradient = gradient
        self._dtype = gradient.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def num_data(self) -> int:
        return 0

    def _missing(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"layer {self.layer.name!r}: {what} is not available to a gradient-based method (its spec has "
            "statistics='gradient', so nothing is captured from the forward pass); use stats.gradient, or declare "
            "statistics='layer' to get the layer's inputs and output gradients."
        )

    def A(self) -> Tensor:
        raise self._missing("A()")

    def G(self) -> Tensor:
        raise self._missing("G()")

    def rows(self) -> tuple[Tensor, Tensor]:
        raise self._missing("rows()")

    def per_example_gradients(self) -> Tensor:
        raise self._missing("per_example_gradients()")
