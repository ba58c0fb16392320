r"""The capture engine: the one place where curvkit records what its statistics need.

Every consumer of statistics goes through :class:`CaptureEngine`:
:func:`curvkit.kronecker_factors` (the ``hooks`` backend), the optimizers'
:class:`~curvkit.optim.Preconditioner` and :mod:`curvkit.laplace`. One forward pass
records, for every *use* of a tracked weight (see :mod:`curvkit.stats.plan`), the input
(detached) and the output (in the graph), and puts a tensor hook on the output. Gradients
w.r.t. the outputs then arrive in those hooks from whatever backward runs next:

* the user's own ``loss.backward()`` (the empirical Fisher of the optimizers; kept when
  :attr:`CaptureEngine.keep_loss_grads` is set);
* :meth:`CaptureEngine.backpropagate`, which pushes the vectors of a Fisher type (MC
  samples, columns of the loss Hessian's square root, loss gradients) back from the model
  output one after the other (``torch.autograd.grad`` to the use outputs only: no
  parameter gradient is formed).

Tensor hooks registered when an output is produced see its gradient *before* any in-place
change to it (``ReLU(inplace=True)``), so in-place activations need no second forward; in
that case the backward is taken w.r.t. the parameters instead, so that it flows through
every use.

How uses are seen
-----------------
A module with a layer handler gets a forward hook: its input and output are the use
(``Linear``, ``Conv``, ``Embedding``, the normalisation layers, HF ``Conv1D``); a handler
with ``capture_input(module, x)`` stores what that returns instead of the input (the
normalisation layers store their normalised input ``x̂``, :mod:`curvkit.stats.norms`). A module
whose handler declares ``functional = ("linear",)`` (``nn.MultiheadAttention``) computes
with its parameters through ``torch.nn.functional`` calls inside its forward; while that
forward runs, the engine wraps ``torch.nn.functional.linear`` and records every call whose
weight is a tracked parameter, or a range of its rows (the query, key and value parts of
``in_proj_weight``). Interception is scoped to those forwards only, so the rest of the
model runs untouched (docs/statistics.md explains why this, and not tracing or a
``__torch_function__`` mode, which cannot see inside ``multi_head_attention_forward``).

Lifetime
--------
The hooks hold only weak references to the engine: an engine that is garbage-collected
records nothing and its hooks remove themselves (immediately, through a finaliser).
:meth:`CaptureEngine.detach` removes them explicitly. A model carries at most one
persistent engine (an optimizer's): attaching a second detaches the first (with a
warning), and one-shot engines (``kronecker_factors``) suspend it while they run.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvkit.config import KFACApprox
from curvkit.stats.layer_stats import LayerStats, Part
from curvkit.stats.plan import LayerPlan, Site, TrackingPlan

__all__ = ["CaptureEngine", "Record", "attached_engine"]

_LOCK = threading.RLock()
#: model -> its persistent engine (weakly on both sides)
_PERSISTENT: weakref.WeakKeyDictionary[nn.Module, weakref.ref[CaptureEngine]] = weakref.WeakKeyDictionary()


def attached_engine(model: nn.Module) -> CaptureEngine | None:
    """The persistent engine (an optimizer's) attached to ``model``, if any."""
    ref = _PERSISTENT.get(model)
    return ref() if ref is not None else None


def _is_functorch_wrapped(t: Tensor) -> bool:
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


class Record:
    """One call that used tracked weights: its input, its output, and the gradients the
    output received.

    Attributes:
        inputs: The input, detached, batch first.
        output: The output (in the autograd graph), until the engine no longer needs it.
        version: The output's version counter right after it was produced.
        forward: Number of the model forward pass the call belongs to.
        loss_grads: Gradients from the user's backward (``phase == "loss"``).
        fisher_grads: Gradients of :meth:`CaptureEngine.backpropagate`'s vectors.
        to_batch_first: Maps a tensor laid out like the output to batch-first (sequence-
            first calls inside ``nn.MultiheadAttention``), or ``None``.
    """

    __slots__ = (
        "inputs",
        "output",
        "version",
        "forward",
        "loss_grads",
        "fisher_grads",
        "to_batch_first",
        "__weakref__",
    )

    def __init__(self, inputs: Tensor, output: Tensor, forward: int, to_batch_first: Any = None) -> None:
        self.inputs = inputs
        self.output: Tensor | None = output
        self.version = output._version
        self.forward = forward
        self.loss_grads: list[Tensor] = []
        self.fisher_grads: list[Tensor] = []
        self.to_batch_first = to_batch_first

    @property
    def intact(self) -> bool:
        return self.output is None or self.output._version == self.version


class _Use:
    __slots__ = ("record", "site", "cols")

    def __init__(self, record: Record, site: Site, cols: tuple[int, int] | None) -> None:
        self.record, self.site, self.cols = record, site, cols

    def part(self, which: str, first: int = 0) -> Part:
        grads = self.record.loss_grads if which == "loss" else self.record.fisher_grads
        grads = grads[first:]
        if self.cols is not None:
            c0, c1 = self.cols
            grads = [g[..., c0:c1] for g in grads]
        return Part(self.site.handler, self.site.module, self.record.inputs, list(grads), self.site.transposed)


def _make_grad_hook(
    engine_ref: weakref.ref[CaptureEngine], record_ref: weakref.ref[Record]
) -> Callable[[Tensor], None]:
    def hook(g: Tensor) -> None:
        engine, record = engine_ref(), record_ref()
        if engine is None or record is None or engine.phase is None:
            return
        if engine.phase == "loss" and not engine.keep_loss_grads:
            return
        g = g.detach()
        if record.to_batch_first is not None:
            g = record.to_batch_first(g)
        (record.loss_grads if engine.phase == "loss" else record.fisher_grads).append(g)

    return hook


class CaptureEngine:
    """Records the uses of a plan's blocks during forward passes (see the module docstring).

    Args:
        plan: The blocks and their sites.
        model: The model whose forward passes are counted (micro-batches of gradient
            accumulation are separate data, uses within one forward are positions).
        active: Called at every use; the use is recorded only when it returns true (the
            optimizers record on statistics steps only). Held weakly when a bound method.
        keep_loss_grads: Keep the gradients of the user's backward (empirical Fisher).
        persistent: This engine stays attached across steps (an optimizer's): a model
            takes only one such engine.
    """

    def __init__(
        self,
        plan: TrackingPlan,
        model: nn.Module | None = None,
        *,
        active: Callable[[], bool] | None = None,
        keep_loss_grads: bool = False,
        persistent: bool = False,
    ) -> None:
        self.plan = plan
        self.blocks: dict[str, LayerPlan] = {layer.name: layer for layer in plan}
        self.keep_loss_grads = keep_loss_grads
        self.persistent = persistent
        self.phase: str | None = "loss"
        self.uses: dict[str, list[_Use]] = {}
        self.records: list[Record] = []
        self._model_ref = weakref.ref(model) if model is not None else None
        if active is not None and hasattr(active, "__self__"):
            weak = weakref.WeakMethod(active)  # type: ignore[arg-type]

            def check() -> bool:
                fn = weak()
                return bool(fn()) if fn is not None else False

            self._active: Callable[[], bool] = check
        else:
            self._active = active if active is not None else (lambda: True)
        self._suspended = 0
        self._forward = 0
        self._handles: list[RemovableHandle] = []
        self._paused = False
        self._finalizer: Any = None
        # functional interception: id(param) -> [(block, site, row range of the block's weight)]
        self._functional: dict[int, list[tuple[LayerPlan, Site, tuple[int, int]]]] = {}
        self._function_depth = 0
        self._batch: list[int] = []
        #: Batch size of the current model call (``None``: unknown, or no model given).
        self._forward_batch: int | None = None
        #: Blocks a use of which ran on a batch of one inside a model call on ``N > 1`` data
        #: (its output broadcast over the batch): they have no per-datum statistics.
        self.broadcast: set[str] = set()
        #: Detached because another persistent engine was attached to the same model.
        self.displaced = False
        #: Subsampled statistics (:class:`~curvkit.stats.subsample.Subsample`) applied by
        #: :meth:`layer_stats`; ``None``: every datum and position.
        self.subsample: Any = None
        #: dtype of the factor products of :meth:`layer_stats`' statistics
        #: (:attr:`~curvkit.stats.layer_stats.LayerStats.product_dtype`; ``None``: the features').
        self.product_dtype: torch.dtype | None = None

    # --- attaching -----------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed (or only paused, :meth:`pause`)."""
        return bool(self._handles) or self._paused

    def attach(self) -> CaptureEngine:
        """Install the hooks (idempotent)."""
        if self._handles:
            return self
        model = self._model_ref() if self._model_ref is not None else None
        if self.persistent and model is not None:
            with _LOCK:
                other = attached_engine(model)
                if other is not None and other is not self:
                    # the newest optimizer records; the older one is detached (not both: each
                    # would record every forward, and one that never steps again would keep
                    # every graph alive)
                    other.detach()
                    other.displaced = True
                    warnings.warn(
                        "this model already had a curvkit optimizer's hooks attached; they are detached now, so that "
                        "optimizer collects no more statistics (its layers take first-order steps). Call "
                        "old_optimizer.remove_hooks() (or delete it) before building a new one to silence this.",
                        stacklevel=4,
                    )
                _PERSISTENT[model] = weakref.ref(self)
        self._install()
        return self

    def _install(self) -> None:
        model = self._model_ref() if self._model_ref is not None else None
        ref = weakref.ref(self)
        handles: list[RemovableHandle] = []
        try:
            if model is not None:
                handles.append(model.register_forward_pre_hook(_count_forward(ref), with_kwargs=True))
            for site, blocks in self.plan.sites().values():
                if site.functional:
                    for layer in blocks:
                        self._register_functional(layer, site)
                    handles.append(site.module.register_forward_pre_hook(_enter_functional(ref, site)))
                    handles.append(site.module.register_forward_hook(_exit_functional(ref, site), always_call=True))
                else:
                    handles.append(
                        site.module.register_forward_hook(_record_module(ref, site, blocks), with_kwargs=True)
                    )
        except BaseException:
            for h in handles:
                h.remove()
            raise
        self._handles = handles
        self._paused = False
        if self._finalizer is not None:
            self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _remove_all, list(handles))

    def pause(self) -> None:
        """Remove the hooks while no forward pass is to be recorded (an optimizer's steps
        without statistics: a module with hooks takes PyTorch's slower call path); the
        engine stays the model's attached one, and :meth:`resume` puts them back. Does
        nothing unless attached."""
        if not self._handles:
            return
        _remove_all(self._handles)
        self._functional.clear()
        self._paused = True

    def resume(self) -> None:
        """Reinstall the hooks removed by :meth:`pause` (nothing otherwise)."""
        if self._paused and not self.displaced:
            self._install()

    @property
    def paused(self) -> bool:
        return self._paused

    def _register_functional(self, layer: LayerPlan, site: Site) -> None:
        ref = layer.weight_ref
        rows = ref.rows if ref.rows is not None else (0, int(ref.param.shape[0]))
        self._functional.setdefault(id(ref.param), []).append((layer, site, rows))

    def detach(self) -> None:
        """Remove every hook; the engine records nothing afterwards."""
        self._paused = False
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        _remove_all(self._handles)
        self._handles = []
        self._functional.clear()
        model = self._model_ref() if self._model_ref is not None else None
        if model is not None:
            with _LOCK:
                if attached_engine(model) is self:
                    del _PERSISTENT[model]

    def __enter__(self) -> CaptureEngine:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    @contextmanager
    def attached_for(self) -> Iterator[CaptureEngine]:
        """Attach for the block (suspending the model's persistent engine, if any)."""
        model = self._model_ref() if self._model_ref is not None else None
        other = attached_engine(model) if model is not None else None
        if other is not None and other is not self:
            other._suspended += 1
        try:
            with self:
                yield self
        finally:
            if other is not None and other is not self:
                other._suspended -= 1

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """A block in which forward passes record nothing."""
        self._suspended += 1
        try:
            yield
        finally:
            self._suspended -= 1

    def recording(self) -> bool:
        return self._suspended == 0 and torch.is_grad_enabled() and self._active()

    # --- recording (called by the hooks) ---------------------------------------------------

    def _add(self, record: Record, site: Site, layer: LayerPlan, cols: tuple[int, int] | None) -> None:
        self.uses.setdefault(layer.name, []).append(_Use(record, site, cols))

    def _new_record(self, x: Tensor, output: Tensor, to_batch_first: Any = None) -> Record:
        record = Record(x.detach() if to_batch_first is None else to_batch_first(x.detach()), output, self._forward)
        record.to_batch_first = to_batch_first
        self.records.append(record)
        output.register_hook(_make_grad_hook(weakref.ref(self), weakref.ref(record)))
        return record

    def _record_call(
        self, site: Site, blocks: list[LayerPlan], args: tuple[Any, ...], kwargs: dict, output: Any
    ) -> None:
        if not isinstance(output, Tensor) or not output.requires_grad or not self.recording():
            return
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        if not isinstance(x, Tensor) or _is_functorch_wrapped(x):
            return  # a forward inside torch.func transforms (vmap/grad) is not a training step
        capture = getattr(site.handler, "capture_input", None)
        if capture is not None:  # e.g. a normalisation layer's x̂, as this forward pass computed it
            x = capture(site.module, x)
        record = self._new_record(x, output)
        n = self._forward_batch
        if n is not None and n > 1 and x.ndim >= 1 and x.shape[0] == 1:
            # e.g. Hugging Face position ids (1, T): the output is broadcast over the batch, so
            # the gradient it receives is already summed over the data
            for layer in blocks:
                self._flag_broadcast(layer.name, site.name, tuple(x.shape), n)
        for layer in blocks:
            self._add(record, site, layer, None)

    def _functional_linear(self, x: Tensor, weight: Tensor, output: Tensor) -> None:
        if not isinstance(output, Tensor) or not output.requires_grad or not self.recording():
            return
        param = weight if id(weight) in self._functional else weight._base
        if param is None or id(param) not in self._functional:
            return
        if param is weight:
            start, stop = 0, int(weight.shape[0])
        else:  # a range of rows (split / chunk of in_proj_weight)
            if weight.stride() != param.stride():
                return
            start = (weight.storage_offset() - param.storage_offset()) // param.stride(0)
            stop = start + int(weight.shape[0])
        batch = self._batch[-1] if self._batch else None
        record: Record | None = None
        for layer, site, (r0, r1) in self._functional[id(param)]:
            if r0 >= start and r1 <= stop:
                if record is None:
                    record = self._new_record(x, output, _seq_first_to_batch_first(batch, x))
                self._add(record, site, layer, (r0 - start, r1 - start))

    def _flag_broadcast(self, block: str, site: str, shape: tuple[int, ...], n: int) -> None:
        if block in self.broadcast:
            return
        self.broadcast.add(block)
        warnings.warn(
            f"curvkit: module {site!r} (block {block!r}) was called on a batch of one (input {shape}) inside a "
            f"model call on {n} data, so its output is broadcast over the batch (as Hugging Face models do with "
            "position ids of shape (1, T)) and the gradient it receives is already summed over the data: it has no "
            "per-datum statistics. It gets no curvature (the optimizers move it by the first-order rule; "
            "kronecker_factors leaves it out). Pass the ids expanded to the batch (e.g. "
            "position_ids=torch.arange(T).expand(N, T)) to precondition it.",
            stacklevel=4,
        )

    # --- backward passes -----------------------------------------------------------------

    @property
    def outputs_intact(self) -> bool:
        """False if an in-place operation changed a recorded output after it was produced."""
        return all(r.intact for r in self.records)

    def backpropagate(
        self,
        output: Tensor,
        vectors: Iterable[Tensor],
        *,
        num_passes: int | None = None,
        retain_graph: bool = False,
        on_pass: Callable[[int], None] | None = None,
    ) -> int:
        """Push each of ``vectors`` (shaped like ``output``) back to the recorded uses.

        The gradients land in every record's ``fisher_grads``. ``on_pass(i)`` runs after
        pass ``i`` (to consume and drop them, as the hooks backend does).

        Args:
            num_passes: How many vectors there are, so the last pass can free the graph
                (unless ``retain_graph``).
            retain_graph: Keep the graph after the last pass (a backward follows).

        Returns:
            The number of passes run.
        """
        live = [r for r in self.records if r.output is not None]
        if not live:
            return 0
        if all(r.intact for r in live):
            wrt = [r.output for r in live]
        else:  # the outputs were changed in place: take the gradient w.r.t. the parameters
            seen: dict[int, Tensor] = {}
            for name in self.uses:
                for p in self.blocks[name].params:
                    seen.setdefault(id(p), p)
            wrt = list(seen.values())
        previous, self.phase = self.phase, "fisher"
        count = 0
        try:
            for i, v in enumerate(vectors):
                keep = retain_graph or num_passes is None or i < num_passes - 1
                torch.autograd.grad(output, wrt, v, retain_graph=keep, allow_unused=True)  # type: ignore[arg-type]
                count += 1
                if on_pass is not None:
                    on_pass(i)
        finally:
            self.phase = previous
        return count

    # --- statistics ----------------------------------------------------------------------

    def layer_stats(
        self,
        name: str,
        which: str,
        approx: KFACApprox,
        g_scale: Callable[[LayerStats], float] | float,
        *,
        allow_broadcast: bool = False,
    ) -> LayerStats | None:
        """The block's statistics from its recorded uses (``which``: ``"loss"`` or
        ``"fisher"`` gradients); ``None`` if no use has gradients, or if a use was
        broadcast over the batch (:attr:`broadcast`; ``allow_broadcast=True`` returns its
        batch-of-one statistics, for callers that check the rows themselves).

        Uses of one forward pass are positions of the weight-sharing axis; forward passes
        (micro-batches) are data, concatenated along the batch axis where their positions
        agree (else only the last forward pass is used).
        """
        if name in self.broadcast and not allow_broadcast:
            return None
        uses = [
            u for u in self.uses.get(name, []) if (u.record.loss_grads if which == "loss" else u.record.fisher_grads)
        ]
        if not uses:
            return None
        layer = self.blocks[name]
        by_forward: dict[int, list[_Use]] = {}
        for u in uses:
            by_forward.setdefault(u.record.forward, []).append(u)
        groups = list(by_forward.values())
        if len(groups) == 1:
            parts = [u.part(which) for u in groups[0]]
        else:
            parts = _concat_forwards([[u.part(which) for u in g] for g in groups])
        stats = LayerStats(layer, approx=approx, parts=parts)
        stats.g_scale = float(g_scale(stats) if callable(g_scale) else g_scale)
        stats.product_dtype = self.product_dtype
        if self.subsample is not None and self.subsample.active:
            stats = self.subsample(stats)
        return stats

    def layer_stats_inputs(self, name: str) -> LayerStats | None:
        """The block's uses without gradients (for its input features only)."""
        uses = self.uses.get(name)
        if not uses:
            return None
        parts = [Part(u.site.handler, u.site.module, u.record.inputs, [], u.site.transposed) for u in uses]
        return LayerStats(self.blocks[name], approx=KFACApprox.EXPAND, parts=parts)

    def clear(self) -> None:
        """Forget every record (their outputs, and with them the graph, are released)."""
        for record in self.records:
            record.output = None
            record.loss_grads.clear()
            record.fisher_grads.clear()
        self.records.clear()
        self.uses.clear()

    def drop_outputs(self) -> None:
        """Release the recorded outputs (the graph) but keep inputs and gradients."""
        for record in self.records:
            record.output = None


def _concat_forwards(groups: list[list[Part]]) -> list[Part]:
    """The parts of several forward passes as one batch: each use position concatenated
    along the batch axis, when every forward pass used the block the same way."""
    shapes = [[(p.inputs.shape[1:], p.transposed, id(p.module)) for p in g] for g in groups]
    if any(s != shapes[0] for s in shapes[1:]):
        return groups[-1]
    out = []
    for i, first in enumerate(groups[0]):
        inputs = torch.cat([g[i].inputs for g in groups])
        passes = min(len(g[i].grads) for g in groups)
        grads = [torch.cat([g[i].grads[p] for g in groups]) for p in range(passes)]
        out.append(Part(first.handler, first.module, inputs, grads, first.transposed))
    return out


def _seq_first_to_batch_first(batch: int | None, x: Tensor) -> Callable[[Tensor], Tensor] | None:
    """Inside ``multi_head_attention_forward`` tensors are ``(L, N, E)``, or ``(L·N, E)``
    rows ordered ``l·N + n`` (the output projection): a batch-first view of either."""
    if batch is None:
        return None
    if x.ndim == 3:
        return lambda t: t.movedim(1, 0)
    if x.ndim == 2:
        return lambda t: t.reshape(-1, batch, t.shape[-1]).movedim(1, 0)
    return None


def _remove_all(handles: list[RemovableHandle]) -> None:
    for h in handles:
        h.remove()
    handles.clear()


def _count_forward(ref: weakref.ref[CaptureEngine]) -> Callable[..., None]:
    def hook(module: nn.Module, args: Any, kwargs: dict) -> None:
        engine = ref()
        if engine is not None and engine._model_ref is not None and module is engine._model_ref():
            engine._forward += 1
            engine._forward_batch = _batch_of(args, kwargs)

    return hook


def _batch_of(args: Any, kwargs: dict) -> int | None:
    """The model call's batch size: the first dimension of its first tensor argument."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.ndim >= 1:
            return int(value.shape[0])
    return None


def _record_module(ref: weakref.ref[CaptureEngine], site: Site, blocks: list[LayerPlan]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict, output: Any) -> None:
        engine = ref()
        # a deep copy of the model carries the hook: its forwards are not this engine's
        if engine is not None and module is site.module:
            engine._record_call(site, blocks, args, kwargs, output)

    return hook


_ORIGINAL_LINEAR = F.linear


def _enter_functional(ref: weakref.ref[CaptureEngine], site: Site) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        engine = ref()
        if engine is None or module is not site.module or not engine.recording():
            return
        q = args[0] if args else None
        batch_first = bool(getattr(module, "batch_first", False))
        if isinstance(q, Tensor) and q.ndim == 3:
            engine._batch.append(int(q.shape[0] if batch_first else q.shape[1]))
        else:
            engine._batch.append(1)  # unbatched input: one datum
        engine._function_depth += 1
        if engine._function_depth == 1:
            _push_linear(engine)

    return hook


def _exit_functional(ref: weakref.ref[CaptureEngine], site: Site) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        engine = ref()
        if engine is None or module is not site.module or engine._function_depth == 0:
            return
        engine._function_depth -= 1
        engine._batch.pop()
        if engine._function_depth == 0:
            _pop_linear(engine)

    return hook


_LINEAR_STACK: list[Any] = []


def _push_linear(engine: CaptureEngine) -> None:
    """Wrap ``torch.nn.functional.linear`` (what ``multi_head_attention_forward`` looks up
    at call time) so that calls on the engine's parameters are recorded."""
    ref = weakref.ref(engine)
    inner = F.linear

    def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        out = inner(input, weight, bias)
        eng = ref()
        if eng is not None:
            eng._functional_linear(input, weight, out)
        return out

    with _LOCK:
        _LINEAR_STACK.append(inner)
        F.linear = linear  # type: ignore[assignment]


def _pop_linear(engine: CaptureEngine) -> None:
    with _LOCK:
        if _LINEAR_STACK:
            F.linear = _LINEAR_STACK.pop()  # type: ignore[assignment]
