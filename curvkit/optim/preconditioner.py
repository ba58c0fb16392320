r"""The preconditioner: a method's blocks on a model, fed by the capture and the schedule.

:class:`Preconditioner` installs forward hooks on the tracked layers of a model. On a
statistics step (every ``T_stats``) a hook records the layer's input and puts a tensor
hook on its output, so the ordinary ``loss.backward()`` delivers the output gradients of
the **empirical Fisher**. For the MC and type-2 Fisher, one extra call,
:meth:`Preconditioner.curvature_backward`, backpropagates the sampled vectors (or the
columns of the loss Hessian's square root) through the retained graph first, exactly as
:func:`curvkit.kronecker_factors` would. ``step()`` then folds the statistics into each
layer's block, refreshes inverses every ``T_inv`` steps and rewrites every tracked
parameter's ``.grad`` with the preconditioned direction — so it composes with any torch
optimizer::

    precond = curvkit.optim.Preconditioner(model, "kfac", damping=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for X, y in loader:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        precond.step()     # .grad ← (G ⊗ A + damping)⁻¹ .grad for tracked layers
        opt.step()

It is composed of four parts, one concept each: the **capture** of statistics
(:mod:`curvkit.optim.capture`), the **schedule** (:mod:`curvkit.optim.schedule`), the
**blocks** and their gated statistics updates (:mod:`curvkit.optim.blockset`), and the
**distribution** over processes (:mod:`curvkit.distributed`); the gradients' matrix form is
:mod:`curvkit.optim.layers`. One step (:meth:`Preconditioner.compute_directions`) runs these
stages in order: gradients as matrices, gradient guard, statistics, layers without
statistics, refresh, precondition, direction guard, commit (``docs/plugins.md``, "The step,
in order").

Guarantees (each counted in :attr:`counters` or by the block; :mod:`curvkit.optim.guards`,
``docs/robustness.md``): a non-finite gradient, an outlier gradient or a non-finite
direction skips the whole step and leaves the state as it was; a non-finite or outlier
statistics batch skips that statistics update for every layer; a failed decomposition is
retried in float64, then keeps the last good inverse; a block declines an update whose new
state would not be finite.
"""


from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.blocks import CurvatureBlock, GradientStats, LayerStats
from curvkit.config import FisherType
from curvkit.distributed.base import Distributor, resolve_distributor
from curvkit.methods import MethodConfig, MethodSpec, StatisticsConfig
from curvkit.optim.blockset import build_blocks, fold_statistics, precondition_blocks
from curvkit.optim.capture import StatisticsCapture
from curvkit.optim.checkpoint import (
    check_preconditioner_state,
    load_preconditioner_state,
    preconditioner_state,
    preconditioner_summary,
)
from curvkit.optim.checks import check_directions
from curvkit.optim.guards import (
    COUNTERS,
    OutlierGates,
    describe_counters,
    direction_reductions,
    finite_from_squares,
    gradient_squares,
)
from curvkit.optim.layers import (
    Batched,
    StepMatrices,
    layer_matrix,
    plan_stacks,
    split_directions,
    split_layer_matrix,
    step_matrices,
)
from curvkit.optim.schedule import StepSchedule
from curvkit.registry import using_registry
from curvkit.stats.plan import LayerPlan, TrackingPlan, make_plan

__all__ = ["Preconditioner", "layer_matrix", "split_layer_matrix"]


def resolve_method(method: str | MethodSpec, registry: Any) -> MethodSpec:
    if isinstance(method, MethodSpec):
        return method
    if not isinstance(method, str):
        raise TypeError(f"method={method!r} must be a registered method name or a MethodSpec.")
    return registry.methods.get(method.lower())


class Preconditioner:
    """Second-order preconditioning of a model's gradients, in place.

    Args:
        model: The model. Tracked layers are those with a registered layer handler;
            parameters of other modules are left alone (first-order).
        method: Registered method name (``"kfac"``, ``"ekfac"``, ...) or a
            :class:`~curvkit.methods.MethodSpec`.
        loss_fn: The training loss module; required for ``fisher="mc"`` / ``"type-2"``.
        config: A ready configuration object; otherwise ``**options`` build one.
        registry: Registry to resolve names in (default: the plugins installed).
        generator: Random generator for MC targets, on the model's device. By default one
            is created on the device of the first output :meth:`curvature_backward` sees,
            seeded from torch's global generator when the preconditioner is built (plus
            the process's rank in data-parallel training, so ranks draw independent
            samples), so ``torch.manual_seed`` makes runs reproducible.
        distributor: Data-parallel training (:mod:`curvkit.distributed`): ``None``
            (default) shares statistics and refreshes over the ``torch.distributed``
            process group when one with several processes is initialised; ``False`` keeps
            every process to itself; or a :class:`~curvkit.distributed.Distributor`
            (e.g. ``TorchDistributor(comm_dtype=torch.bfloat16)``).
        recommended: Options left out take the method's recommended values
            (:attr:`~curvkit.methods.MethodSpec.recommended`, as the optimizers do);
            ``False``: the configuration class's own defaults (the paper's values).
        **options: Method options (see the method's config class), e.g. ``damping=1e-3``,
            ``T_inv=10``, ``fisher="mc"``.

    Raises:
        ConfigError: Invalid options (all of them are listed).
        IncompatibleComponentsError: The inverter cannot apply the damping.
    """

    def __init__(
        self,
        model: nn.Module,
        method: str | MethodSpec = "kfac",
        *,
        loss_fn: nn.Module | None = None,
        config: MethodConfig | None = None,
        registry: Any = None,
        generator: torch.Generator | None = None,
        distributor: Any = None,
        recommended: bool = True,
        **options: Any,
    ) -> None:
        if registry is None:
            from curvkit.plugins import default_registry

            registry = default_registry()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        self.model = model
        self.registry = registry
        self.spec = resolve_method(method, registry)
        if config is not None and options:
            raise TypeError("pass either config= or keyword options, not both.")
        self.config = config if config is not None else self.spec.make_config(use_recommended=recommended, **options)
        self.spec.check(self.config, registry)
        values = self.spec.schedule.read(self.config)
        #: The statistics options (``None`` for a gradient-based method).
        self.statistics_config: StatisticsConfig | None = (
            self.config if isinstance(self.config, StatisticsConfig) else None
        )
        if (
            self.statistics_config is not None
            and self.statistics_config.fisher is not FisherType.EMPIRICAL
            and loss_fn is None
        ):
            fisher = FisherType(self.statistics_config.fisher)
            raise ValueError(
                f"fisher={fisher.value!r} draws vectors from the loss's likelihood; pass loss_fn= "
                "(the training loss module, e.g. nn.CrossEntropyLoss())."
            )
        self.plan = make_plan(model, registry, self.config.unsupported)
        built = build_blocks(self.spec, self.plan, self.config, registry)
        self.blocks: dict[str, CurvatureBlock] = built.blocks
        self.layers: dict[str, LayerPlan] = built.layers
        #: Layers this method cannot precondition (first-order), with the reason.
        self.first_order_layers: dict[str, str] = built.first_order
        if self.first_order_layers:
            warnings.warn(
                "; ".join(f"layer {n!r} takes first-order steps: {r}" for n, r in self.first_order_layers.items()),
                stacklevel=3,
            )
        self._first_order_columns = built.first_order_columns
        self._shapes_to_check = set(self.blocks)  # precondition() shapes, checked on each block's first step
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r} must be a torch.Generator or None.")
        self.distributor: Distributor = resolve_distributor(distributor)
        if self.distributor.world_size > 1 and getattr(values.damping, "adaptive", False):
            raise ValueError(
                f"{type(values.damping).__name__} adapts λ from this process's loss, which differs between processes "
                "in data-parallel training; use a fixed damping (e.g. damping=1e-3) or distributor=False."
            )
        self.distributor.attach(model, self.blocks)
        seed = int(torch.randint(0, 2**62, (1,), device="cpu").item()) + self.distributor.rank
        #: The core's schedule (:class:`~curvkit.optim.schedule.StepSchedule`): steps,
        #: periods, refreshes, damping.
        self.schedule = StepSchedule(values, self.blocks)
        self.counters: dict[str, Any] = dict(COUNTERS)
        #: The running levels of the outlier gates (:mod:`curvkit.optim.guards`).
        self.gates = OutlierGates()
        #: Per layer, the last step's ``⟨Δ_l, ∇_l⟩`` and ``‖∇_l‖²`` (the guard's reductions,
        #: reused by the optimizer's trust region), and ``‖Δ_l‖²`` when
        #: :meth:`compute_directions` is asked for them (``direction_norms=True``).
        self.inner_products: dict[str, float] = {}
        self.grad_norms_sq: dict[str, float] = {}
        self.direction_norms_sq: dict[str, float] = {}
        #: Where the statistics come from (:class:`~curvkit.optim.capture.StatisticsCapture`).
        self.capture = StatisticsCapture(
            model,
            self.spec,
            TrackingPlan(tuple(self.layers.values()), self.plan.skipped, self.plan.first_order),
            self.statistics_config,
            loss_fn,
            registry,
            self.distributor,
            generator,
            seed,
            self._capturing,
        )
        self._stacks, _ = plan_stacks(self.layers, self._first_order_columns)
        #: The batched calls of the last step (their directions, for :meth:`layer_directions`).
        self._last: list[Batched] | None = None

    # --- the parts' state, as attributes ------------------------------------------------------

    @property
    def steps(self) -> int:
        """Accepted steps so far."""
        return self.schedule.steps

    @steps.setter
    def steps(self, value: int) -> None:
        self.schedule.steps = value

    @property
    def damping(self) -> Any:
        """The damping strategy (``None`` for a method without one)."""
        return self.schedule.damping

    @property
    def damping_value(self) -> float:
        """The current damping λ."""
        return self.schedule.damping_value

    @damping_value.setter
    def damping_value(self, value: float) -> None:
        self.schedule.damping_value = value

    @property
    def refresh_counts(self) -> dict[str, int]:
        """Refreshes this process computed, per layer (not saved in checkpoints)."""
        return self.schedule.refresh_counts

    @property
    def engine(self) -> Any:
        """The capture engine (:mod:`curvkit.stats.engine`)."""
        return self.capture.engine

    @property
    def generator(self) -> torch.Generator | None:
        """The MC generator (made on first use)."""
        return self.capture.generator

    @generator.setter
    def generator(self, value: torch.Generator | None) -> None:
        self.capture.generator = value

    @property
    def fisher(self) -> FisherType:
        return self.capture.fisher

    @property
    def loss_fn(self) -> nn.Module | None:
        return self.capture.loss_fn

    @property
    def backend(self) -> Any:
        """The external statistics backend (``None``: the capture engine)."""
        return self.capture.backend

    @property
    def stats_due(self) -> bool:
        """Whether the current step collects statistics (every ``statistics_period`` steps)."""
        return self.schedule.stats_due

    @property
    def refresh_due(self) -> bool:
        """Whether the current step refreshes every block (every ``refresh_period`` steps)."""
        return self.schedule.refresh_due

    def _capturing(self) -> bool:
        return self.schedule.stats_due

    # --- capture ------------------------------------------------------------------------------

    def collect_statistics(self, inputs: Any, targets: Tensor) -> None:
        """Compute this step's statistics with the external backend (``backend=`` other than
        ``"hooks"``): it runs its own forward and backward on ``(inputs, targets)``.

        Call it before ``step()`` on every step; it does nothing on steps without
        statistics. With the default backend it is not needed (the hooks record your own
        forward and backward) and raises.
        """
        self.capture.collect_statistics(inputs, targets)

    def curvature_backward(self, output: Tensor, targets: Tensor) -> None:
        """Backpropagate the Fisher's vectors for ``fisher="mc"`` or ``"type-2"``.

        Call it after the forward pass and **before** ``loss.backward()`` (it keeps the
        graph alive for it). It does nothing for the empirical Fisher or on steps that
        collect no statistics, so a loop can call it unconditionally.

        Args:
            output: The logits of this step's forward pass: ``(N, C, ...)``, or
                ``(N, ..., C)`` (language-model logits) for cross-entropy.
            targets: The targets (used for shapes; MC samples its own).
        """
        self.capture.curvature_backward(output, targets)

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """A block in which forward passes record nothing (evaluation, line searches)."""
        with self.capture.suspended():
            yield

    @property
    def is_suspended(self) -> bool:
        """Whether forward passes record nothing now (inside :meth:`suspended`)."""
        return self.capture.is_suspended

    def clear_records(self) -> None:
        """Forget what the hooks recorded since the last step."""
        self.capture.clear()

    # --- the step, in stages ------------------------------------------------------------------

    @torch.no_grad()
    def compute_directions(
        self,
        grads: dict[str, tuple[Tensor, Tensor | None]],
        *,
        others_finite: bool = True,
        direction_norms: bool = False,
    ) -> dict[str, Tensor] | None:
        """Advance one step: fold in statistics, refresh, precondition.

        The stages, in order: the gradients as matrices (equal-shaped layers as one stack,
        :mod:`curvkit.optim.layers`); the **gradient guard** (``‖∇_l‖²`` per layer, checked
        finite and against the running norm); the **statistics** on a statistics step
        (:func:`~curvkit.optim.blockset.fold_statistics`, all layers or none); layers
        **without statistics** yet take the first-order step ``Δ = ∇``; the **refresh** of
        the due blocks (a failed refresh keeps the last good inverse; a block's very first
        is retried every step until it works); **precondition** (one batched call per stack
        of blocks with equal :meth:`~curvkit.blocks.CurvatureBlock.batch_key`, one call per
        other layer); the **direction guard** (``⟨Δ_l, ∇_l⟩`` per layer, finite only if
        ``Δ_l`` is); **commit** (the step counter advances). A non-finite gradient or
        direction returns ``None`` with the state as it was, the skip counted in
        :attr:`counters`. The two reductions are kept in :attr:`grad_norms_sq` and
        :attr:`inner_products` for the optimizer's trust region.

        Args:
            grads: ``{layer name: (weight gradient, bias gradient or None)}`` for the
                tracked layers (a caller may have added weight decay to them already).
            others_finite: Whether the caller's other gradients (untracked parameters)
                are finite; ``False`` skips the step like a non-finite tracked gradient
                (on every process).
            direction_norms: Also keep ``‖Δ_l‖²`` per layer in :attr:`direction_norms_sq`
                (the per-layer trust-region clips need them; one reduction per stack).

        Returns:
            ``{layer name: preconditioned direction in matrix form}``, or ``None`` if the
            step was skipped.
        """
        self._last_step_state = None
        self._last = None
        try:
            step = self._matrices(grads)
            sq = self._gradient_guard(step, others_finite)
            if sq is None:
                return None
            if self.schedule.stats_due:
                self._fold_statistics(step.mats)
            first_order = self._without_statistics(step.mats)
            self._refresh()
            saved = {n: self.blocks[n].step_state() for n in step.mats if n not in first_order}
            out = self._precondition(step, first_order)
            if not self._direction_guard(step, out, saved, direction_norms):
                return None
            self.grad_norms_sq = sq
            if sq:
                self.gates.track_gradient(sum(sq.values()))
            self._last_step_state = saved
            # keep only what layer_directions needs (not the stacked gradients)
            self._last = [dataclasses.replace(b, grads=None) for b in step.batched]
            self.schedule.steps += 1
            return out
        finally:
            self.clear_records()
            self.capture.follow_schedule()

    def _matrices(self, grads: dict[str, tuple[Tensor, Tensor | None]]) -> StepMatrices:
        """Stage 1: the gradients in matrix form (stacks of equal-shaped layers)."""
        return step_matrices(self._stacks, self.layers, grads)

    def _gradient_guard(self, step: StepMatrices, others_finite: bool) -> dict[str, float] | None:
        """Stage 2: ``{layer: ‖∇_l‖²}``, or ``None`` (step skipped) for a non-finite or
        outlier gradient."""
        sq = gradient_squares(step)
        ok = others_finite and finite_from_squares(list(sq.values()), list(step.mats.values()))
        if not self.distributor.all_ok(ok):
            self._count_skip("nonfinite_gradients")
            return None
        if sq:
            outlier, accepted = self.gates.gradient_outlier(sum(sq.values()))
            self.counters["accepted_outlier_levels"] += accepted
            if outlier:
                self._count_skip("outlier_gradients")
                return None
        return sq

    def _fold_statistics(self, mats: dict[str, Tensor]) -> None:
        """Stage 3: this step's statistics (shared over processes) into the blocks."""
        if self.spec.statistics == "gradient":  # the gradient is all such a method sees (already reduced)
            present: dict[str, LayerStats] = {n: GradientStats(self.layers[n], m) for n, m in mats.items()}
        else:
            stats = {name: self.capture.layer_stats(name) for name in self.blocks}
            present = self.distributor.share_statistics(
                {n: s for n, s in stats.items() if s is not None}, self.blocks
            )
            for name, s in present.items():
                s.gradient = mats.get(name)
        fold_statistics(self.blocks, present, self.schedule.ema_decay, self.gates, self.counters)

    def _without_statistics(self, mats: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 4: a layer with no statistics yet (it did not run on a statistics step, or
        its parameters are used outside its forward) takes the first-order step ``Δ = ∇``."""
        missing = [n for n, b in self.blocks.items() if b.num_updates == 0 and n in mats]
        if not missing:
            return {}
        self.capture.explain_missing(missing, self.steps)
        return {n: mats[n] for n in missing}

    def _refresh(self) -> None:
        """Stage 5: refresh the due blocks (each on its rank in data-parallel training)."""
        due = self.schedule.due_refreshes(self.blocks)
        if not due:
            return
        failures = {name: self.blocks[name].inverse_failures for name in due}
        with using_registry(self.registry):  # refresh states from other ranks name their inverse kinds
            self.distributor.refresh(due, self.blocks, self._refresh_block)
        self.schedule.mark_refreshed(due, self.blocks, failures)

    def _refresh_block(self, name: str) -> None:
        self.schedule.refresh(self.blocks, name)

    def _precondition(self, step: StepMatrices, first_order: dict[str, Tensor]) -> dict[str, Tensor]:
        """Stage 6: the directions, batched where blocks allow (each block's first one
        checked to have its gradient's shape: an error names the method and the layer)."""
        out = precondition_blocks(self.blocks, step, first_order, self._first_order_columns)
        if self._shapes_to_check:
            self._shapes_to_check = check_directions(self.spec.name, self.blocks, out, step.mats, self._shapes_to_check)
        return out

    def _direction_guard(
        self, step: StepMatrices, out: dict[str, Tensor], saved: dict[str, Any], want_norms: bool
    ) -> bool:
        """Stage 7: ``⟨Δ_l, ∇_l⟩`` per layer (and ``‖Δ_l‖²`` if wanted); a non-finite one
        undoes the blocks' step state and skips the step."""
        dots, norms = direction_reductions(step, out, want_norms)
        ok = all(math.isfinite(d) for d in dots.values())
        if not self.distributor.all_ok(ok):
            self._restore_step_state(saved)
            self._count_skip("nonfinite_directions")
            return False
        self.inner_products = dots
        self.direction_norms_sq = norms
        return True

    def layer_directions(
        self, dirs: dict[str, Tensor], scales: dict[str, float] | None = None
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """The directions of :meth:`compute_directions` (``dirs``, as returned) in the layers'
        weight and bias shapes, each scaled by ``scales[layer]`` (default 1): one batched
        split per stack, one per other layer (:func:`~curvkit.optim.layers.split_directions`).
        Call it once per step, after :meth:`compute_directions`."""
        batched, self._last = self._last or [], None  # consumed: no direction outlives its step here
        return split_directions(batched, self.layers, dirs, scales)

    def _count_skip(self, reason: str) -> None:
        self.counters["skipped_steps"] += 1
        self.counters[reason] = self.counters.get(reason, 0) + 1

    def _restore_step_state(self, saved: dict[str, Any]) -> None:
        for name, state in saved.items():
            if state is not None:
                self.blocks[name].restore_step_state(state)

    def revert_step(self, reason: str = "nonfinite_updates") -> None:
        """Undo the last :meth:`compute_directions` as far as the step goes: the blocks'
        step-time state (:meth:`~curvkit.blocks.CurvatureBlock.step_state`, e.g.
        KLD-WRM's previous gradient) is restored and the step counter goes back; the
        statistics folded in on that step (checked finite) are kept. The optimizer calls it
        when it refuses the parameter update; counted as a skipped step (``reason``)."""
        saved, self._last_step_state = self._last_step_state, None
        if saved is None:
            return
        self._restore_step_state(saved)
        self.schedule.steps -= 1
        self._count_skip(reason)
        self.capture.follow_schedule()

    _last_step_state: dict[str, Any] | None = None

    def step(self, *, weight_decay: float = 0.0) -> bool:
        """Rewrite ``.grad`` of every tracked parameter with its preconditioned direction.

        Args:
            weight_decay: Added to the gradients *before* preconditioning (``wd · θ``); use
                your optimizer's own weight decay for the usual placement after it.

        Returns:
            ``False`` if the step was skipped (a non-finite or outlier gradient, a non-finite
            direction) or there was no gradient at all; ``.grad`` is then left as it was, and
            so is the preconditioner's state (the step counter does not advance).
        """
        self.distributor.reduce_gradients(p for p in self.model.parameters() if p.requires_grad)
        grads = self._collect_grads(weight_decay)
        if not grads:
            self.counters["empty_steps"] = self.counters.get("empty_steps", 0) + 1
            self.clear_records()
            return False
        dirs = self.compute_directions(grads)
        if dirs is None:
            return False
        targets: list[Tensor] = []
        sources: list[Tensor] = []
        for name, (w, b) in self.layer_directions(dirs).items():
            layer = self.layers[name]
            targets.append(layer.weight_ref.grad())  # type: ignore[arg-type]
            sources.append(w)
            if b is not None:
                assert layer.bias_ref is not None
                targets.append(layer.bias_ref.grad())  # type: ignore[arg-type]
                sources.append(b)
        with torch.no_grad():
            torch._foreach_copy_(targets, sources)
        return True

    def _collect_grads(self, weight_decay: float = 0.0) -> dict[str, tuple[Tensor, Tensor | None]]:
        out: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name, layer in self.layers.items():
            w = layer.weight
            b = layer.bias
            gw = layer.weight_ref.grad()
            gb = layer.bias_ref.grad() if b is not None and layer.bias_ref is not None else None
            if gw is None or (b is not None and gb is None):
                continue
            if weight_decay:
                gw = gw.add(w, alpha=weight_decay)
                gb = gb.add(b, alpha=weight_decay) if gb is not None and b is not None else gb
            out[name] = (gw, gb)
        return out

    # --- bookkeeping ------------------------------------------------------------------------

    def remove_hooks(self) -> None:
        """Detach from the model: remove every hook (the preconditioner records nothing
        afterwards, and another optimizer may be attached to the model)."""
        self.capture.detach()

    remove = remove_hooks

    def curvature_blocks(self) -> list[tuple[LayerPlan, CurvatureBlock]]:
        """Every preconditioned layer with its block, in plan order: what
        :meth:`curvkit.laplace.KroneckerCurvature.from_optimizer` reads (the layers taking
        first-order steps are :attr:`first_order_layers` and ``plan.first_order``)."""
        return [(layer, self.blocks[layer.name]) for layer in self.plan if layer.name in self.blocks]

    def tracked_parameters(self) -> list[nn.Parameter]:
        """The parameters with a curvature block (each once)."""
        out: dict[int, nn.Parameter] = {}
        for layer in self.layers.values():
            for p in layer.params:
                out.setdefault(id(p), p)
        return list(out.values())

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only, so ``torch.load(..., weights_only=True)``
        reads a checkpoint (:func:`curvkit.optim.checkpoint.preconditioner_state`)."""
        return preconditioner_state(self)

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (changing nothing) unless ``state`` is a
        :meth:`state_dict` of this method for layers this model tracks, with the same
        shapes (the message names the layer and both shapes)."""
        check_preconditioner_state(self, state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, after :meth:`check_state_dict`."""
        load_preconditioner_state(self, state)
        self.capture.follow_schedule()

    @property
    def distribution_plan(self) -> dict[str, int | None]:
        """``{layer name: rank that computes its refresh}``; ``None`` for a layer every rank
        refreshes itself (its block shares no refresh state, or sharding is off)."""
        dist = self.distributor
        return {name: (dist.plan[name] if name in dist.shared_refreshes else None) for name in self.blocks}

    def state_bytes(self) -> int:
        return sum(block.state_bytes() for block in self.blocks.values())

    def summary(self) -> str:
        """A table of what runs where: one line per tracked layer, plus skipped modules
        (:func:`curvkit.optim.checkpoint.preconditioner_summary`)."""
        return preconditioner_summary(self)

    def describe_counters(self) -> str:
        """The guards' counters in one line (:func:`curvkit.optim.guards.describe_counters`)."""
        return describe_counters(self.steps, self.counters, self.blocks.values())

    def __del__(self) -> None:
        try:
            self.capture.engine.detach()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

