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
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit.linalg.basis import WarmEigensolver, warm_eigensolver
from curvkit.linalg.damping import Damping
from curvkit.linalg.inverters import (
    EigenInverse,
    EigenInverter,
    Inverter,
    KroneckerInverse,
    damping_only_inverse,
    inverse_from_state,
    inverse_state,
)
from curvkit.linalg.kronecker import KroneckerOperator
from curvkit.linalg.operator import CurvatureOperator
from curvkit.stats.handlers import weight_matrix
from curvkit.stats.layer_stats import GradientStats, LayerStats, SharedLayerStats
from curvkit.stats.plan import LayerPlan
from curvkit.structures.base import DiagonalStructure, FactorStructure

__all__ = [
    "BlockInfo",
    "CurvatureBlock",
    "GradientStats",
    "KroneckerBlock",
    "KroneckerOperator",
    "LayerStats",
    "SharedLayerStats",
    "as_structure",
    "input_structure",
]


@dataclass(frozen=True)
class BlockInfo:
    """What a block knows about its layer.

    Attributes:
        name: Qualified module name.
        module_type: The layer type the block behaves as: the module's class, or
            ``nn.Linear`` for attention's projections.
        d_in: Input dimension **including** the bias column when there is one.
        d_out: Output dimension.
        has_bias: Whether the last column of the matrix form is the bias.
        tied: The weight is used in transposed layouts (an embedding tied to an output
            layer): the block's statistics have ``A()``, ``G()`` and
            ``per_example_gradients()`` but no per-row quantities (``rows()``, features).
            Only methods whose spec sets ``tied_blocks=True`` get such blocks.
        unitwise: The layer is a normalisation layer's scale and shift (its handler's
            ``kind`` is ``"unitwise"``, :mod:`curvkit.stats.norms`): ``d_out = D`` units,
            ``d_in = k`` (scale, and shift when ``has_bias``); every method gets the core's
            exact per-unit :class:`~curvkit.unitwise.UnitwiseBlock` for it (or its spec's
            ``unitwise_block``).
        diagonal_input: The layer's input features are one-hot (``nn.Embedding``), so
            ``A`` is diagonal: ``stats.A()`` is its 1-D diagonal and a
            :class:`KroneckerBlock` stores ``A`` in the ``diagonal`` structure, whatever
            structure the method was configured with (exactly: nothing is projected away).
            Methods whose spec sets ``diagonal_inputs=False`` need one-hot rows and serve
            such a layer only up to :data:`curvkit.stats.embedding.ONE_HOT_LIMIT` rows.
    """

    name: str
    module_type: type[nn.Module]
    d_in: int
    d_out: int
    has_bias: bool
    tied: bool = False
    unitwise: bool = False
    diagonal_input: bool = False

    @classmethod
    def from_plan(cls, layer: LayerPlan) -> BlockInfo:
        d_out, d_in = weight_matrix(layer.handler, layer.module, layer.weight.detach()).shape
        tied = any(site.transposed for site in layer.sites)
        diagonal = (
            not tied
            and not layer.has_bias
            and getattr(layer.handler, "diagonal_input", False)
            and all(type(site.handler) is type(layer.handler) for site in layer.sites)
        )
        unitwise = getattr(layer.handler, "kind", None) == "unitwise"
        module_type = layer.module_type if layer.module_type is not None else type(layer.module)
        return cls(
            layer.name,
            module_type,
            int(d_in) + (1 if layer.has_bias else 0),
            int(d_out),
            layer.has_bias,
            tied,
            unitwise,
            bool(diagonal),
        )


def input_structure(info: BlockInfo, structure: type[FactorStructure]) -> type[FactorStructure]:
    """The structure a Kronecker block stores ``A`` in: :class:`DiagonalStructure` for a
    layer with one-hot inputs (:attr:`BlockInfo.diagonal_input`), else ``structure``."""
    return DiagonalStructure if info.diagonal_input else structure


def as_structure(structure: type[FactorStructure], factor: Tensor) -> FactorStructure:
    """A batch factor in ``structure``: a 2-D factor is projected (``from_dense``); a 1-D
    one is the diagonal of a matrix (an embedding's ``A``), taken as it is by a diagonal
    structure and never made dense for it."""
    if factor.ndim == 2:
        return structure.from_dense(factor)
    if issubclass(structure, DiagonalStructure):
        return structure(factor)
    return structure.from_dense(torch.diag(factor))


def _trace(factor: Tensor) -> Tensor:
    """Trace of a dense factor, or sum of a diagonal one (a vector), as a 0-d tensor."""
    return factor.sum() if factor.ndim == 1 else factor.diagonal().sum()


def products_note(dtype: torch.dtype | None) -> str:
    """The ``describe()`` suffix of a block whose preconditioning products run in ``dtype``
    (``precondition_dtype``; nothing for ``None``)."""
    return "" if dtype is None else f", products in {str(dtype).removeprefix('torch.')}"


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
    def update(self, stats: LayerStats, decay: float) -> bool | None:
        """Fold in one batch: ``state ← decay · state + (1 − decay) · batch estimate``.

        Return ``False`` to decline the batch (its new state would not be finite; count it
        in :attr:`skipped_updates`): the core then leaves :attr:`num_updates` alone. Any
        other return (``None``) is an accepted update, which the core counts — a block need
        not increment :attr:`num_updates` itself (one that does is not counted twice).
        ``stats.gradient`` holds the step's gradient in matrix form."""

    @abstractmethod
    def refresh(self, damping: Damping, lam: float) -> None:
        """Recompute the cached inverse with damping strength ``lam``."""

    @abstractmethod
    def precondition(self, grad: Tensor) -> Tensor:
        """The preconditioned direction for a gradient in matrix form."""

    @abstractmethod
    def as_operator(self) -> CurvatureOperator:
        """The (undamped) curvature estimate of the layer as a block operator on its matrix
        form ``(d_out, d_in [+1])``: an object satisfying
        :class:`~curvkit.linalg.operator.CurvatureOperator` (``shape``, ``dtype``,
        ``device``, ``@`` on matrices, stacks and flat vectors, ``to_dense``, ``trace``,
        ``logdet``, ``power``, ``eigen``), most easily a
        :class:`~curvkit.linalg.operator.BlockOperator` subclass such as
        :class:`~curvkit.linalg.kronecker.KroneckerOperator`. Checked by
        :func:`curvkit.testing.check_block_operators`."""

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

    def batch_key(self) -> Hashable | None:
        """Blocks of one class with equal keys (not ``None``) are preconditioned together by
        :meth:`precondition_many` on the hot path (layers of equal shapes in one batched
        product). ``None`` (the default): :meth:`precondition`, one layer at a time. A key
        must change whenever what :meth:`precondition` computes would differ in kind (e.g.
        the inverse's form after a refresh)."""
        return None

    @classmethod
    def precondition_many(cls, blocks: Sequence[CurvatureBlock], grads: Tensor) -> Tensor:
        """:meth:`precondition` of each block to its slice of a ``(B, d_out, d_in)`` stack,
        as one ``(B, d_out, d_in)`` tensor; called only for blocks with equal
        :meth:`batch_key`. Must equal the one-at-a-time result (to rounding)."""
        return torch.stack([b.precondition(g) for b, g in zip(blocks, grads.unbind(0))])

    def set_step_size(self, lr: float) -> None:
        """Told the learning rate of the coming step (its parameter group's ``lr``) by
        :class:`~curvkit.optim.CurvatureOptimizer` before every step. Methods whose
        recursions depend on the step size (KLD-WRM's wake) override it; the default
        ignores it."""
        del lr

    #: Whether the block's statistics come from the batch factors ``LayerStats.A()`` /
    #: ``G()``, whose Gram products ``stats_dtype`` runs in bf16: ``True``; ``False`` (the
    #: default) for a block that computes its own statistics, which ``stats_dtype`` would not
    #: reach — a method with such blocks refuses ``stats_dtype`` when it is built instead
    #: of ignoring it; ``None`` for a block without Kronecker-factor statistics (unit-wise
    #: blocks), which the option does not concern.
    honours_stats_dtype: ClassVar[bool | None] = False

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
        diagonals or the features, no more); for a gradient-based method's
        :class:`GradientStats`, ``(‖∇‖²,)``. Each factor on its own: an outlier input makes
        ``A_b`` huge while a saturated activation may make ``G_b`` vanish.
        """
        if isinstance(stats, GradientStats):  # a gradient-based method: the gradient's size
            assert stats.gradient is not None
            return (torch.linalg.vector_norm(stats.gradient.float()) ** 2,)
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
        """:math:`\\delta^\\top \\hat F \\delta` for ``direction`` in matrix form (cast to
        the operator's dtype)."""
        op = self.as_operator()
        d = direction.to(op.dtype)
        return float((d * (op @ d)).sum())

    def bilinear(self, a: Tensor, b: Tensor) -> float:
        """:math:`a^\\top \\hat F b` for two directions in matrix form (the curvature is
        symmetric, so the order does not matter); :meth:`gram` of the pair."""
        return float(self.gram([a, b])[0, 1])

    def gram(self, directions: Sequence[Tensor]) -> Tensor:
        """The ``(k, k)`` float64 matrix :math:`G_{ij} = d_i^\\top \\hat F d_j` of ``k``
        directions in matrix form (symmetric up to rounding): what the adaptive step's quadratic model needs
        (:func:`curvkit.optim.adaptive.solve_coefficients`).

        The default applies :meth:`as_operator` once to the stack of the directions. A
        block that overrides :meth:`quadratic` (and not this method) gets the off-diagonal
        entries from its override by polarisation,
        :math:`a^\\top \\hat F b = \\tfrac14(q(a + b) - q(a - b))`, so a plugin that
        provides only :meth:`quadratic` is served by its own curvature."""
        k = len(directions)
        out = torch.zeros(k, k, dtype=torch.float64, device="cpu")
        if type(self).quadratic is not CurvatureBlock.quadratic:
            for i in range(k):
                out[i, i] = self.quadratic(directions[i])
                for j in range(i):
                    a, b = directions[i], directions[j]
                    out[i, j] = out[j, i] = 0.25 * (self.quadratic(a + b) - self.quadratic(a - b))
            return out
        op = self.as_operator()
        x = torch.stack([d.to(op.dtype) for d in directions])
        flat = x.reshape(k, -1)
        return (flat @ (op @ x).reshape(k, -1).t()).double().cpu()

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
            For a layer with one-hot inputs (:attr:`BlockInfo.diagonal_input`, an
            ``nn.Embedding``) ``A`` is stored diagonal whatever is given here (it is
            diagonal, so this loses nothing and never forms a ``V × V`` matrix).
        inverter: The inverter.
        eigensolver: With the ``"eigh"`` inverter, a
            :class:`~curvkit.linalg.basis.WarmEigensolver` that starts each refresh's
            decompositions from the current inverse's eigenbasis (``None``, the default: the
            exact ``eigh`` every time). Its counters say how many decompositions were warm.
        precondition_dtype: dtype of the preconditioning products' operands (``None``, the
            default: the inverse's own; ``torch.bfloat16``: bf16 operands with float32
            accumulation, the stored inverse kept in float32,
            :meth:`~curvkit.linalg.inverters.KroneckerInverse.with_product_dtype`).
    """

    def __init__(
        self,
        info: BlockInfo,
        *,
        structure: type[FactorStructure] | tuple[type[FactorStructure], type[FactorStructure]],
        inverter: Inverter,
        factor_dtype: torch.dtype | None = None,
        eigensolver: WarmEigensolver | None = None,
        precondition_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(info)
        if eigensolver is not None and not isinstance(inverter, EigenInverter):
            raise ValueError(
                f"block {info.name!r}: a warm eigensolver needs the 'eigh' inverter, got {inverter.name!r}; "
                "use inverter='eigh' or drop the eigensolver"
            )
        self.eigensolver = eigensolver
        self.structure_A, self.structure_G = structure if isinstance(structure, tuple) else (structure, structure)
        self.structure_A = input_structure(info, self.structure_A)
        self.inverter = inverter
        self.factor_dtype = factor_dtype
        self.precondition_dtype = precondition_dtype
        self.A: FactorStructure | None = None
        self.G: FactorStructure | None = None
        self.inverse: KroneckerInverse | None = None

    def _install(self, inverse: KroneckerInverse | None) -> None:
        """Set :attr:`inverse`, with the block's product dtype."""
        if inverse is not None and self.precondition_dtype is not None:
            lowered = inverse.with_product_dtype(self.precondition_dtype)
            if lowered is None:
                raise TypeError(
                    f"block {self.info.name!r}: precondition_dtype={self.precondition_dtype} needs an inverse with "
                    f"low-precision products, and {type(inverse).__name__} (kind {inverse.kind!r}) has none; use "
                    "inverter='cholesky' or 'eigh', or drop precondition_dtype"
                )
            inverse = lowered
        self.inverse = inverse

    @classmethod
    def from_config(cls, info: BlockInfo, config: Any, registry: Any) -> KroneckerBlock:
        """A block factory for :class:`~curvkit.methods.MethodSpec`: structure, inverter
        and factor dtype from a :class:`~curvkit.methods.KroneckerConfig` (and its
        ``eigensolver`` options where it has them, :func:`~curvkit.linalg.basis.warm_eigensolver`)."""
        return cls(
            info,
            structure=config.structure_classes(registry),
            inverter=config.inverter_object(registry),
            factor_dtype=config.factor_dtype,
            eigensolver=warm_eigensolver(config),
            precondition_dtype=getattr(config, "precondition_dtype", None),
        )

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        dtype = self.factor_dtype or dtype
        self.A = self.structure_A.zeros(self.info.d_in, dtype=dtype, device=device)
        self.G = self.structure_G.zeros(self.info.d_out, dtype=dtype, device=device)

    def batch_factors(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        """The batch's ``(A, G)`` this block folds in (TKFAC overrides it)."""
        return stats.A(), stats.G()

    symmetric_statistics: ClassVar[frozenset[str]] = frozenset({"A", "G"})
    honours_stats_dtype: ClassVar[bool | None] = True  # batch_factors: stats.A(), stats.G()

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
        self._install(inverse_from_state(state, clone=False))

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.A is None:
            self.init(dtype=stats.dtype, device=stats.device)
        assert self.A is not None and self.G is not None
        a, g = self.take_batch_factors(stats)
        self.A.ema_(as_structure(self.structure_A, a.to(self.A.dtype)), decay)
        self.G.ema_(as_structure(self.structure_G, g.to(self.G.dtype)), decay)
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
        solver = self.eigensolver
        if solver is not None:  # warm-started from the current inverse's eigenbasis
            old = self.inverse if isinstance(self.inverse, EigenInverse) else None
            ea = solver.decompose(a, None if old is None else old.Q_A)
            eg = solver.decompose(g, None if old is None else old.Q_G)
            inverse: KroneckerInverse | None = EigenInverter.from_eigen(a, g, ea, eg, damping, lam)
        else:
            inverse = self.inverter.prepare(a, g, damping, lam)
        if inverse is None:
            self.inverse_failures += 1
            if self.inverse is not None:
                return
            inverse = damping_only_inverse(
                self.info.d_in, self.info.d_out, damping, lam, dtype=a.dtype, device=a.device
            )
        self._install(inverse)

    def precondition(self, grad: Tensor) -> Tensor:
        if self.inverse is None:
            raise RuntimeError(f"block {self.info.name!r}: precondition() before the first refresh()")
        return self.inverse.apply(grad)

    def batch_key(self) -> Hashable | None:
        # a subclass with its own precondition() (or step-time state) runs it layer by layer
        cls = type(self)
        if self.inverse is None or cls.precondition is not KroneckerBlock.precondition:
            return None
        if cls.step_state is not CurvatureBlock.step_state:
            return None
        key = self.inverse.batch_key()
        return None if key is None else (type(self.inverse), key)

    @classmethod
    def precondition_many(cls, blocks: Sequence[CurvatureBlock], grads: Tensor) -> Tensor:
        inverses = [b.inverse for b in blocks]  # type: ignore[attr-defined]
        return type(inverses[0]).apply_many(inverses, grads)

    def as_operator(self) -> KroneckerOperator:
        """The EMA factors' ``G ⊗ A``."""
        assert self.A is not None and self.G is not None
        return KroneckerOperator(self.A.to_dense(), self.G.to_dense(), label=self.info.name)

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
        self._install(inverse_from_state(state))

    def describe(self) -> str:
        return (
            f"{type(self).__name__}(A: {self.structure_A.name} {self.info.d_in}², "
            f"G: {self.structure_G.name} {self.info.d_out}², inverter {self.inverter.name!r}"
            + (f", {self.eigensolver.describe()}" if self.eigensolver is not None else "")
            + products_note(self.precondition_dtype)
            + ")"
        )
