r"""Curvature blocks: the per-layer state of a second-order method.

A :class:`CurvatureBlock` owns everything a method keeps for one layer and exposes five
verbs (the kfac-jax split between a fresh estimate and a cached inverse):

* :meth:`~CurvatureBlock.init` — allocate the state;
* :meth:`~CurvatureBlock.update` — fold in one batch's statistics (:class:`LayerStats`),
  every ``T_stats`` steps;
* :meth:`~CurvatureBlock.refresh` — recompute the cached inverse or decomposition, every
  ``T_inv`` steps;
* :meth:`~CurvatureBlock.precondition` — map a gradient in matrix form
  ``(d_out, d_in [+1])`` (bias as last column) to the preconditioned direction, every step;
* :meth:`~CurvatureBlock.as_operator` — the (undamped) curvature estimate as a linear
  operator, for tests, the Levenberg–Marquardt quadratic model and Laplace tools.

Most methods are a :class:`KroneckerBlock`: a factor structure × an inverter × a damping
strategy. Methods that do not decompose that way (EKFAC's eigenvalue correction, SINGD's
inverse-free update) subclass :class:`CurvatureBlock` directly.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit.config import KFACApprox
from curvkit.linalg.damping import Damping
from curvkit.linalg.inverters import Inverter, KroneckerInverse, damping_only_inverse, inverse_from_state, inverse_state
from curvkit.stats.factors import output_gram
from curvkit.stats.handlers import weight_matrix
from curvkit.stats.hooks_backend import layer_input_factor
from curvkit.stats.plan import LayerPlan
from curvkit.structures.base import FactorStructure

__all__ = ["BlockInfo", "CurvatureBlock", "KroneckerBlock", "KroneckerOperator", "LayerStats", "SharedLayerStats"]


@dataclass(frozen=True)
class BlockInfo:
    """What a block knows about its layer.

    Attributes:
        name: Qualified module name.
        module_type: The module's class.
        d_in: Input dimension **including** the bias column when there is one.
        d_out: Output dimension.
        has_bias: Whether the last column of the matrix form is the bias.
    """

    name: str
    module_type: type[nn.Module]
    d_in: int
    d_out: int
    has_bias: bool

    @classmethod
    def from_plan(cls, layer: LayerPlan) -> BlockInfo:
        d_out, d_in = weight_matrix(layer.handler, layer.module, layer.weight.detach()).shape
        return cls(layer.name, type(layer.module), int(d_in) + (1 if layer.has_bias else 0), int(d_out), layer.has_bias)


class LayerStats:
    r"""One batch's statistics of one layer, computed lazily on request.

    Built by the optimizer from the captured layer input ``x`` and the ``P`` captured
    output gradients (``P = 1`` for the empirical Fisher, ``M`` MC samples, or ``C``
    columns of the type-2 Hessian root). With :math:`\bar a_{n,r}` the input features
    (bias column appended) and :math:`g_{p,n,r}` the output features:

    * :meth:`A`, :meth:`G`: the batch's Kronecker factors, scaled exactly as
      :func:`curvkit.kronecker_factors` scales them, ``G = g_scale · Σ_p Σ g gᵀ``;
    * :meth:`rows`: ``(a_rows, g_rows)`` with ``A = a_rowsᵀ a_rows`` and
      ``G = Σ_p g_rows[p]ᵀ g_rows[p]``, row ``i`` of ``a_rows`` paired with row ``i`` of
      every ``g_rows[p]`` (expand: one row per ``(n, r)``; reduce: one per ``n``);
    * :meth:`per_example_gradients`: ``J_{p,n} = √g_scale Σ_r g_{p,n,r} ā_{n,r}ᵀ``, so
      that :math:`\sum_{p,n}\operatorname{vec}J_{p,n}\operatorname{vec}J_{p,n}^\top` is the
      batch's (empirical, MC or type-2) Fisher block the factors approximate.

    Args:
        layer: The tracked layer.
        inputs: Its captured (detached) input.
        grads: Captured gradients w.r.t. its output, one per backpropagated vector.
        approx: Expand or reduce.
        g_scale: Multiplier of ``Σ g gᵀ`` in ``G`` (``N`` for the empirical Fisher of a
            batch-mean loss, ``1/Z`` for sampled vectors, see :mod:`curvkit.optim`).
    """

    #: The reduced :meth:`CurvatureBlock.batch_statistics` of a distributed step
    #: (:class:`SharedLayerStats`); ``None`` for one process's own batch.
    shared: dict[str, Tensor] | None = None

    def __init__(self, layer: LayerPlan, inputs: Tensor, grads: list[Tensor], approx: KFACApprox, g_scale: float):
        self.layer = layer
        self.inputs = inputs
        self.grads = grads
        self.approx = approx
        self.g_scale = float(g_scale)

    @property
    def num_data(self) -> int:
        return int(self.inputs.shape[0])

    @cached_property
    def in_features(self) -> Tensor:
        """``(N, R, d_in)`` input features **without** the bias column (what the layer
        handler extracts from the captured input; computed once per batch)."""
        return self._in_features

    @cached_property
    def _in_features(self) -> Tensor:
        return self.layer.handler.input_features(self.layer.module, self.inputs)

    @cached_property
    def g_features(self) -> Tensor:
        """``(P, N, R, d_out)`` output features."""
        h, m = self.layer.handler, self.layer.module
        return torch.stack([h.output_features(m, g) for g in self.grads])

    @cached_property
    def a_features(self) -> Tensor:
        """``(N, R, d_in [+1])`` input features, the bias column of ones appended."""
        x = self._in_features
        if self.layer.has_bias:
            x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
        return x

    def A(self) -> Tensor:
        """The batch's input factor."""
        return self._A

    @cached_property
    def _A(self) -> Tensor:
        return layer_input_factor(self.layer, self.inputs, self.approx)

    def G(self) -> Tensor:
        """The batch's output-gradient factor."""
        return self._G

    @cached_property
    def _G(self) -> Tensor:
        h, m = self.layer.handler, self.layer.module
        total: Tensor | None = None
        for g in self.grads:
            s = output_gram(h.output_features(m, g), self.approx)
            total = s if total is None else total.add_(s)
        assert total is not None
        return total.mul_(self.g_scale)

    def rows(self) -> tuple[Tensor, Tensor]:
        """``(a_rows (K, d_in), g_rows (P, K, d_out))``; see the class docstring (computed
        once per batch)."""
        return self._rows

    @cached_property
    def _rows(self) -> tuple[Tensor, Tensor]:
        a, g = self.a_features, self.g_features
        n, r = a.shape[0], a.shape[1]
        if self.approx is KFACApprox.EXPAND or r == 1:
            a_rows = a.reshape(n * r, -1) / math.sqrt(n * r)
            g_rows = g.reshape(g.shape[0], n * r, -1) * math.sqrt(self.g_scale)
        else:
            a_rows = a.mean(1) / math.sqrt(n)
            g_rows = g.sum(2) * math.sqrt(self.g_scale)
        return a_rows, g_rows

    def per_example_gradients(self) -> Tensor:
        """``(P·N, d_out, d_in [+1])`` scaled per-example gradients (class docstring)."""
        a, g = self.a_features, self.g_features
        p = g.shape[0]
        # the true per-example gradient for both expand and reduce (as curvlinops' EKFAC)
        j = torch.einsum("pnro,nri->pnoi", g, a)
        return (j * math.sqrt(self.g_scale)).reshape(p * a.shape[0], *j.shape[2:])


class SharedLayerStats(LayerStats):
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

    def __init__(self, layer: LayerPlan, shared: dict[str, Tensor], num_data: int, like: Tensor, approx: KFACApprox):
        super().__init__(layer, like.new_empty((0,)), [], approx, 1.0)
        self.shared = shared
        self._num_data = int(num_data)

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

    @property
    def in_features(self) -> Tensor:  # type: ignore[override]
        raise self._missing("in_features")

    @property
    def a_features(self) -> Tensor:  # type: ignore[override]
        raise self._missing("a_features")

    @property
    def g_features(self) -> Tensor:  # type: ignore[override]
        raise self._missing("g_features")


def _trace(factor: Tensor) -> Tensor:
    """Trace of a dense factor, or sum of a diagonal one (a vector), as a 0-d tensor."""
    return factor.sum() if factor.ndim == 1 else factor.diagonal().sum()


class KroneckerOperator:
    r"""The linear operator :math:`G\otimes A` on row-major ``vec`` of ``(d_out, d_in)``
    matrices: ``op @ M = G M A`` for a matrix, ``op @ v`` for a flat vector."""

    def __init__(self, A: Tensor, G: Tensor) -> None:
        self.A, self.G = A, G

    @property
    def shape(self) -> tuple[int, int]:
        n = self.A.shape[0] * self.G.shape[0]
        return n, n

    def __matmul__(self, x: Tensor) -> Tensor:
        d_o, d_i = self.G.shape[0], self.A.shape[0]
        if x.ndim == 1:
            return (self.G @ x.reshape(d_o, d_i) @ self.A).reshape(-1)
        return self.G @ x @ self.A

    def to_dense(self) -> Tensor:
        return torch.kron(self.G, self.A)


class CurvatureBlock(ABC):
    """Per-layer state of a method (see the module docstring for the five verbs).

    Attributes:
        info: The layer.
        inverse_failures: Refreshes whose decomposition failed even in float64 (the
            previous inverse was kept).
        skipped_updates: Statistics updates the block declined because its new state
            would not have been finite (the state was left as it was).
    """

    skipped_updates = 0  # a class default too, for blocks that do not call this __init__

    def __init__(self, info: BlockInfo) -> None:
        self.info = info
        self.inverse_failures = 0
        self.num_updates = 0
        self.skipped_updates = 0

    @abstractmethod
    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate the state (called once, before the first update)."""

    @abstractmethod
    def update(self, stats: LayerStats, decay: float) -> None:
        """Fold in one batch: ``state ← decay · state + (1 − decay) · batch estimate``."""

    @abstractmethod
    def refresh(self, damping: Damping, lam: float) -> None:
        """Recompute the cached inverse with damping strength ``lam``."""

    @abstractmethod
    def precondition(self, grad: Tensor) -> Tensor:
        """The preconditioned direction for a gradient in matrix form."""

    @abstractmethod
    def as_operator(self) -> Any:
        """The undamped curvature estimate as a linear operator (``@`` on matrices)."""

    def step_state(self) -> Any:
        """What :meth:`precondition` is about to change, for a step that may be refused
        (``None``, the default: :meth:`precondition` changes nothing a skipped step must
        undo). Blocks with step-time state (KLD-WRM's previous gradient) return it —
        references suffice if :meth:`precondition` replaces rather than mutates it — and
        :meth:`restore_step_state` puts it back when the preconditioner or the optimizer
        refuses the step (non-finite direction or update), so a skipped step leaves the
        block as it was."""
        return None

    def restore_step_state(self, state: Any) -> None:
        """Undo :meth:`precondition` (see :meth:`step_state`)."""
        del state

    def set_step_size(self, lr: float) -> None:
        """Told the learning rate of the coming step (its parameter group's ``lr``) by
        :class:`~curvkit.optim.CurvatureOptimizer` before every step. Methods whose
        recursions depend on the step size (KLD-WRM's wake) override it; the default
        ignores it."""
        del lr

    # --- data-parallel training (curvkit.distributed) ----------------------------------------

    #: Names of :meth:`batch_statistics` entries that are symmetric matrices; they travel as
    #: packed upper triangles.
    symmetric_statistics: ClassVar[frozenset[str]] = frozenset()

    def batch_statistics(self, stats: LayerStats) -> dict[str, Tensor] | None:
        """What :meth:`update` needs from a batch, when all of it is **averaged over the
        batch's data**, so that the mean over processes, weighted by their numbers of data,
        is the value for the whole batch (``A``, ``G``, or SINGD's ``Π̂(Kᵀ A K)``).

        In data-parallel training each process computes this for its share of the batch,
        the distributor averages it (in buckets, symmetric matrices as triangles) and the
        block's :meth:`update` gets a :class:`SharedLayerStats` holding the average. The
        default, ``None``, means the update needs per-example quantities: the processes'
        inputs and output gradients are then gathered, and the update sees the whole batch
        as one :class:`LayerStats` (exact for any block, but more to send).
        """
        del stats
        return None

    def refresh_cost(self) -> float:
        """Relative cost of :meth:`refresh`, for the plan that assigns each block's refresh
        to one process (default: an eigendecomposition of both factors, ``d_in³ + d_out³``)."""
        return float(self.info.d_in) ** 3 + float(self.info.d_out) ** 3

    def refresh_state(self) -> dict[str, Any] | None:
        """Everything :meth:`refresh` produced (tensors and plain values), so that a refresh
        computed by one process can be installed on the others with
        :meth:`load_refresh_state`. ``None`` (the default) means the refresh cannot be
        shared this way and every process runs it."""
        return None

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        """Install a :meth:`refresh_state` computed by another process, as if
        :meth:`refresh` had run here."""
        raise NotImplementedError(f"{type(self).__name__} shares no refresh state (refresh_state() is None).")

    def batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor] | None:
        """The batch's factor pair ``(A, G)`` this block folds in, or ``None`` for a block
        that folds in something else (SINGD's rows, a Brand update). Kronecker blocks
        return ``stats.A(), stats.G()``; TKFAC returns its trace-weighted pair."""
        return None

    def batch_is_finite(self, stats: LayerStats) -> bool:
        """Whether the batch estimate this block would fold in is finite. Called for every
        block before any is updated, so one non-finite layer skips the update of all.

        The default: the :meth:`batch_magnitudes` are finite. For a block with
        :meth:`batch_factors` those are the traces of exactly that pair (Gram matrices, so
        a finite trace proves every entry finite; computed once and handed to
        :meth:`take_batch_factors` in the update); other blocks get the norms of the
        layer's input and output features. Override it (and :meth:`batch_magnitudes`) for
        a batch estimate that is not a pair of Gram matrices. The preconditioner calls an
        override; for the default it checks the magnitudes directly.
        """
        return all(math.isfinite(float(v)) for v in self.batch_magnitudes(stats))

    def batch_magnitudes(self, stats: LayerStats) -> tuple[float | Tensor, ...]:
        """Scalar sizes of the parts of the batch estimate (floats or 0-d tensors), for the
        finiteness check and the outlier gate of the statistics
        (:meth:`curvkit.optim.Preconditioner._update_statistics`): a batch with a
        non-finite part is refused, one with a part far above that part's running size is
        skipped.

        The default: the traces ``(tr A_b, tr G_b)`` of the batch factors (from
        :meth:`batch_factors`, or the reduced ``"A"``/``"G"`` of a distributed step), else
        the squared norms ``(‖ā‖², ‖g‖²)`` of the batch's features (a reduction over the
        diagonals or the features, no more). Each factor on its own: an outlier input makes
        ``A_b`` huge while a saturated activation may make ``G_b`` vanish.
        """
        if stats.shared is not None:
            a, g = stats.shared.get("A"), stats.shared.get("G")
            if a is not None and g is not None:
                return _trace(a), _trace(g)
            return tuple(torch.linalg.vector_norm(t.float()) ** 2 for t in stats.shared.values())
        factors = self._batch_factors_once(stats)
        if factors is not None:
            return _trace(factors[0]), _trace(factors[1])
        a, g = stats.a_features, stats.g_features
        return torch.linalg.vector_norm(a) ** 2, torch.linalg.vector_norm(g) ** 2 * stats.g_scale

    def take_batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        """:meth:`batch_factors` for ``stats``, reusing the pair :meth:`batch_is_finite`
        computed (and releasing it)."""
        factors = self._batch_factors_once(stats)
        self._batch_cache = None
        if factors is None:
            raise TypeError(f"{type(self).__name__} folds in no factor pair (batch_factors returns None).")
        return factors

    _batch_cache: tuple[LayerStats, tuple[Tensor, Tensor] | None] | None = None

    def _batch_factors_once(self, stats: LayerStats) -> tuple[Tensor, Tensor] | None:
        cached = self._batch_cache
        if cached is not None and cached[0] is stats:
            return cached[1]
        factors = self.batch_factors(stats)
        self._batch_cache = (stats, factors)
        return factors

    def quadratic(self, direction: Tensor) -> float:
        """:math:`\\delta^\\top \\hat F \\delta` for ``direction`` in matrix form."""
        op = self.as_operator()
        d = direction.to(op.A.dtype) if hasattr(op, "A") else direction
        return float((d * (op @ d)).sum())

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Tensors and counters; ``load_state_dict`` of it restores the block exactly."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""

    def state_bytes(self) -> int:
        """Bytes of the tensors this block keeps."""
        total = 0
        for value in self.state_dict().values():
            if isinstance(value, Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                total += sum(t.numel() * t.element_size() for t in value.values() if isinstance(t, Tensor))
        return total

    def describe(self) -> str:
        """One line for the optimizer's summary."""
        return type(self).__name__


class KroneckerBlock(CurvatureBlock):
    r"""K-FAC's block: EMA factors ``A``, ``G`` in a structure, inverted by an inverter
    under a damping strategy, :math:`\Delta = (G\otimes A + \text{damping})^{-1}\nabla`.

    Args:
        info: The layer.
        structure: Factor structure class for both factors, or a pair ``(A's, G's)``.
        inverter: The inverter.
    """

    def __init__(
        self,
        info: BlockInfo,
        *,
        structure: type[FactorStructure] | tuple[type[FactorStructure], type[FactorStructure]],
        inverter: Inverter,
        factor_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(info)
        self.structure_A, self.structure_G = structure if isinstance(structure, tuple) else (structure, structure)
        self.inverter = inverter
        self.factor_dtype = factor_dtype
        self.A: FactorStructure | None = None
        self.G: FactorStructure | None = None
        self.inverse: KroneckerInverse | None = None

    @classmethod
    def from_config(cls, info: BlockInfo, config: Any, registry: Any) -> KroneckerBlock:
        """A block factory for :class:`~curvkit.methods.MethodSpec`: structure, inverter
        and factor dtype from a :class:`~curvkit.methods.KroneckerConfig`."""
        return cls(
            info,
            structure=config.structure_classes(registry),
            inverter=config.inverter_object(registry),
            factor_dtype=config.factor_dtype,
        )

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        dtype = self.factor_dtype or dtype
        self.A = self.structure_A.zeros(self.info.d_in, dtype=dtype, device=device)
        self.G = self.structure_G.zeros(self.info.d_out, dtype=dtype, device=device)

    def batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        """The batch's ``(A, G)`` this block folds in (TKFAC overrides it)."""
        return stats.A(), stats.G()

    symmetric_statistics: ClassVar[frozenset[str]] = frozenset({"A", "G"})

    def batch_statistics(self, stats: LayerStats) -> dict[str, Tensor] | None:
        """``{"A", "G"}``, the batch's factors, unless a subclass folds in something else
        (it overrides :meth:`update` or :meth:`batch_factors`; then ``None``, the gathered
        batch)."""
        cls = type(self)
        if cls.update is not KroneckerBlock.update or cls.batch_factors is not KroneckerBlock.batch_factors:
            return None
        a, g = self.batch_factors(stats)
        return {"A": a, "G": g}

    def refresh_state(self) -> dict[str, Any] | None:
        return {"inverse_failures": self.inverse_failures, **inverse_state(self.inverse)}

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        self.inverse_failures = int(state["inverse_failures"])
        self.inverse = inverse_from_state(state, clone=False)

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.A is None:
            self.init(dtype=stats.inputs.dtype, device=stats.inputs.device)
        assert self.A is not None and self.G is not None
        a, g = self.take_batch_factors(stats)
        self.A.ema_(self.structure_A.from_dense(a.to(self.A.dtype)), decay)
        self.G.ema_(self.structure_G.from_dense(g.to(self.G.dtype)), decay)
        self.num_updates += 1

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.A is not None and self.G is not None, "refresh() before the first update()"
        self.refresh_from(self.A, self.G, damping, lam)

    def refresh_from(self, a: FactorStructure, g: FactorStructure, damping: Damping, lam: float) -> None:
        """Install the inverter's inverse of ``(a, g)`` (the block's factors, or factors a
        method derived from them). A failed decomposition is counted in
        ``inverse_failures`` and keeps the last good inverse; with none yet, the damping
        alone is inverted, without a decomposition
        (:func:`~curvkit.linalg.inverters.damping_only_inverse`)."""
        inverse = self.inverter.prepare(a, g, damping, lam)
        if inverse is None:
            self.inverse_failures += 1
            if self.inverse is not None:
                return
            inverse = damping_only_inverse(
                self.info.d_in, self.info.d_out, damping, lam, dtype=a.dtype, device=a.device
            )
        self.inverse = inverse

    def precondition(self, grad: Tensor) -> Tensor:
        if self.inverse is None:
            raise RuntimeError(f"block {self.info.name!r}: precondition() before the first refresh()")
        return self.inverse.apply(grad)

    def as_operator(self) -> KroneckerOperator:
        assert self.A is not None and self.G is not None
        return KroneckerOperator(self.A.to_dense(), self.G.to_dense())

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_updates": self.num_updates, "inverse_failures": self.inverse_failures}
        if self.A is not None and self.G is not None:
            out["A"] = dict(self.A.tensors())
            out["G"] = dict(self.G.tensors())
        out.update(inverse_state(self.inverse))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        if "A" in state:
            self.A = self.structure_A.from_tensors({k: v.clone() for k, v in state["A"].items()})
            self.G = self.structure_G.from_tensors({k: v.clone() for k, v in state["G"].items()})
        self.inverse = inverse_from_state(state)

    def describe(self) -> str:
        return (
            f"{type(self).__name__}(A: {self.structure_A.name} {self.info.d_in}², "
            f"G: {self.structure_G.name} {self.info.d_out}², inverter {self.inverter.name!r})"
        )
