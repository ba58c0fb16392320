r"""The preconditioner: statistics capture, the method's blocks and their schedule.

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

Guarantees (each counted in :attr:`counters` or by the block; :mod:`curvkit.optim.guards`,
``docs/robustness.md``): a non-finite gradient, an outlier gradient or a non-finite
direction skips the whole step and leaves the state as it was; a non-finite or outlier
statistics batch skips that statistics update for every layer; a failed decomposition is
retried in float64, then keeps the last good inverse; a block declines an update whose new
state would not be finite.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.blocks import BlockInfo, CurvatureBlock, GradientStats, LayerStats, SharedLayerStats
from curvkit.config import FisherType
from curvkit.distributed.base import Distributor, resolve_distributor
from curvkit.errors import UnsupportedModuleError, UnsupportedRequestError
from curvkit.methods import MethodConfig, MethodSpec, StatisticsConfig
from curvkit.optim.guards import (
    COUNTERS,
    OutlierGates,
    describe_counters,
    finite_from_squares,
    inner_products,
    squared_norms,
)
from curvkit.stats.backend import UnitwiseFactors
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.handlers import weight_from_matrix, weight_matrix
from curvkit.stats.losses import loss_adapter
from curvkit.stats.plan import LayerPlan, TrackingPlan, make_plan
from curvkit.stats.subsample import configure_engine

__all__ = ["Preconditioner", "layer_matrix", "split_layer_matrix"]


def layer_matrix(layer: LayerPlan, weight_tensor: Tensor, bias_tensor: Tensor | None) -> Tensor:
    """A layer's weight-shaped tensor (and bias) as one ``(d_out, d_in [+1])`` matrix (through
    the handler's weight layout, :func:`curvkit.stats.handlers.weight_matrix`)."""
    mat = weight_matrix(layer.handler, layer.module, weight_tensor)
    if layer.has_bias:
        assert bias_tensor is not None
        mat = torch.cat([mat, bias_tensor.reshape(-1, 1)], dim=1)
    return mat


def split_layer_matrix(layer: LayerPlan, mat: Tensor) -> tuple[Tensor, Tensor | None]:
    """Inverse of :func:`layer_matrix`: ``(weight-shaped, bias-shaped or None)``."""
    w = layer.weight
    if layer.has_bias:
        return weight_from_matrix(layer.handler, layer.module, mat[:, :-1], w.shape), mat[:, -1].reshape(-1)
    return weight_from_matrix(layer.handler, layer.module, mat, w.shape), None


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` (a block's state: nested dicts, lists and tuples) with every tensor on ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        items = [_to_device(v, device) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


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
        #: The schedule the core applies (periods, EMA, damping; :class:`~curvkit.methods.Schedule`).
        self.schedule = self.spec.schedule.read(self.config)
        self.damping = self.schedule.damping
        #: The statistics options (``None`` for a gradient-based method).
        self.statistics_config: StatisticsConfig | None = (
            self.config if isinstance(self.config, StatisticsConfig) else None
        )
        self.fisher: FisherType = (
            self.statistics_config.fisher  # type: ignore[assignment]
            if self.statistics_config is not None
            else FisherType.EMPIRICAL
        )
        if self.fisher is not FisherType.EMPIRICAL:
            if loss_fn is None:
                raise ValueError(
                    f"fisher={self.fisher.value!r} draws vectors from the loss's likelihood; pass loss_fn= "
                    "(the training loss module, e.g. nn.CrossEntropyLoss())."
                )
            loss_adapter(loss_fn)  # validates the loss early
        self.loss_fn = loss_fn
        self.plan = make_plan(model, registry, self.config.unsupported)
        self.layers: dict[str, LayerPlan] = {layer.name: layer for layer in self.plan}
        self.blocks: dict[str, CurvatureBlock] = {}
        #: Layers this method cannot precondition (first-order), with the reason.
        self.first_order_layers: dict[str, str] = {}
        for layer in self.plan:
            info = BlockInfo.from_plan(layer)
            reason = self.spec.unsupported_reason(info)
            if reason is None:
                try:
                    self.blocks[layer.name] = self.spec.make_block(info, self.config, registry)
                    continue
                except UnsupportedModuleError as err:  # the factory declines this layer
                    reason = str(err)
            self.first_order_layers[layer.name] = reason
        if self.first_order_layers:
            warnings.warn(
                "; ".join(f"layer {n!r} takes first-order steps: {r}" for n, r in self.first_order_layers.items()),
                stacklevel=3,
            )
        self.layers = {name: layer for name, layer in self.layers.items() if name in self.blocks}
        #: Columns of a block's matrix that take the first-order step (a handler's
        #: ``first_order_columns``: an untied embedding's padding row, which has no gradient).
        self._first_order_columns: dict[str, list[int]] = {}
        for name, layer in self.layers.items():
            columns = getattr(layer.handler, "first_order_columns", None)
            cols = columns(layer.module) if columns is not None and not layer.tied else []
            if cols:
                self._first_order_columns[name] = cols
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r} must be a torch.Generator or None.")
        self.generator: torch.Generator | None = generator
        self.distributor: Distributor = resolve_distributor(distributor)
        if self.distributor.world_size > 1 and getattr(self.damping, "adaptive", False):
            raise ValueError(
                f"{type(self.damping).__name__} adapts λ from this process's loss, which differs between processes in "
                "data-parallel training; use a fixed damping (e.g. damping=1e-3) or distributor=False."
            )
        self.distributor.attach(model, self.blocks)
        self._seed = int(torch.randint(0, 2**62, (1,), device="cpu").item()) + self.distributor.rank
        self.steps = 0
        self.damping_value = self.damping.initial_value() if self.damping is not None else 0.0
        self.counters: dict[str, Any] = dict(COUNTERS)
        #: The running levels of the outlier gates (:mod:`curvkit.optim.guards`).
        self.gates = OutlierGates()
        #: Per layer, the last step's ``⟨Δ_l, ∇_l⟩`` and ``‖∇_l‖²`` (the guard's reductions,
        #: reused by the optimizer's trust region).
        self.inner_products: dict[str, float] = {}
        self.grad_norms_sq: dict[str, float] = {}
        #: Refreshes this process computed, per layer (not saved in checkpoints).
        self.refresh_counts: dict[str, int] = {name: 0 for name in self.blocks}
        self._warned_missing: set[str] = set()
        self._refreshed: set[str] = set()
        self._fisher_calls = 0
        self._fisher_scale = 1.0
        self.backend = self._resolve_backend(
            self.statistics_config.backend if self.statistics_config is not None else "hooks"
        )
        #: Factors from an external statistics backend (``collect_statistics``) for this step:
        #: ``{"A", "G"}``, or ``{"F"}`` for a unit-wise layer, and the number of data.
        self._external: dict[str, tuple[dict[str, Tensor], int]] = {}
        #: The capture engine (:mod:`curvkit.stats.engine`): records layer inputs and output
        #: gradients on statistics steps; its hooks hold this preconditioner only weakly.
        #: With an external backend it stays detached (the backend runs its own passes).
        self.engine = CaptureEngine(
            TrackingPlan(tuple(self.layers.values()), self.plan.skipped, self.plan.first_order),
            model,
            active=self._capturing,
            keep_loss_grads=self.fisher is FisherType.EMPIRICAL,
            persistent=True,
        )
        configure_engine(self.engine, self.statistics_config, self._seed + 1)  # subsampling, product dtype
        if self.backend is None and self.spec.statistics != "gradient":
            self.engine.attach()

    def _resolve_backend(self, name: str) -> Any:
        """``None`` for the capture engine, else the registered backend ``name``, checked
        against what can be known before any batch (its capabilities are checked again,
        fully, on every batch)."""
        if name == "hooks":
            return None
        backend = self.registry.backends.get(name)
        if not self.spec.factor_statistics:
            able = [repr(n) for n in self.registry.methods.names() if self.registry.methods.get(n).factor_statistics]
            raise UnsupportedRequestError(
                f"backend={name!r} computes only the factors A and G of a batch, but method {self.spec.name!r} needs "
                "per-example statistics (features, rows or per-example gradients). Use backend='hooks' (the default), "
                f"or a method whose blocks need only the factors: {', '.join(able)}."
            )
        if self.loss_fn is None:
            raise ValueError(f"backend={name!r} runs the loss itself; pass loss_fn= (e.g. nn.CrossEntropyLoss()).")
        if self.distributor.world_size > 1:
            raise UnsupportedRequestError(
                f"backend={name!r} is not supported in data-parallel training; use backend='hooks' (the default)."
            )
        return backend

    def collect_statistics(self, inputs: Any, targets: Tensor) -> None:
        """Compute this step's statistics with the external backend (``backend=`` other than
        ``"hooks"``): it runs its own forward and backward on ``(inputs, targets)``.

        Call it before ``step()`` on every step; it does nothing on steps without
        statistics. With the default backend it is not needed (the hooks record your own
        forward and backward) and raises.
        """
        if self.backend is None:
            raise RuntimeError(
                "collect_statistics() is for backend='backpack'/'asdl'; with backend='hooks' (the default) the "
                "statistics come from your own forward and backward (and curvature_backward for fisher='mc'/'type-2')."
            )
        if not self.stats_due:
            return
        from curvkit.stats.api import _make_request, resolve_backend

        if self.fisher is FisherType.MC and self.generator is None:
            self.generator = torch.Generator(device=targets.device).manual_seed(self._seed)
        request = _make_request(
            self.model,
            self.loss_fn,  # type: ignore[arg-type]
            inputs,
            targets,
            self.fisher,
            self._stats_config.kfac_approx,  # type: ignore[arg-type]
            self._stats_config.mc_samples,
            self.generator,
            self.config.unsupported,
            self.registry,
            self.engine.plan,
        )
        factors = resolve_backend(self.registry, self.backend.name, request).compute(request)
        n = int(targets.shape[0])
        self._external = {
            name: ({"F": entry.F} if isinstance(entry, UnitwiseFactors) else {"A": entry[0], "G": entry[1]}, n)
            for name, entry in factors.items()
        }

    # --- capture --------------------------------------------------------------------------

    @property
    def _stats_config(self) -> StatisticsConfig:
        if self.statistics_config is None:  # pragma: no cover - only statistics paths ask
            raise RuntimeError(f"method {self.spec.name!r} captures no layer statistics (statistics='gradient').")
        return self.statistics_config

    @property
    def stats_due(self) -> bool:
        """Whether the current step collects statistics (every ``statistics_period`` steps)."""
        return self.steps % self.schedule.statistics_period == 0

    @property
    def refresh_due(self) -> bool:
        """Whether the current step refreshes every block (every ``refresh_period`` steps)."""
        return self.steps % self.schedule.refresh_period == 0

    def _capturing(self) -> bool:
        return self.stats_due

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """A block in which forward passes record nothing (evaluation, line searches)."""
        with self.engine.suspended():
            yield

    @property
    def is_suspended(self) -> bool:
        """Whether forward passes record nothing now (inside :meth:`suspended`)."""
        return self.engine._suspended > 0

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
        if self.fisher is FisherType.EMPIRICAL or not self.stats_due or not self.engine.records:
            return
        live = [r for r in self.engine.records if r.output is not None]
        if not live:
            raise RuntimeError("curvature_backward() was already called for this forward pass.")
        assert self.loss_fn is not None
        adapter = loss_adapter(self.loss_fn)
        if self.generator is None:
            self.generator = torch.Generator(device=output.device).manual_seed(self._seed)
        vectors = adapter.output_vectors(output, targets, self.fisher, self._stats_config.mc_samples, self.generator)
        self.engine.backpropagate(output, vectors, retain_graph=True)
        self._fisher_scale = 1.0 / adapter.normaliser(output, targets)
        self._fisher_calls += 1
        self.engine.drop_outputs()  # the graph is the caller's again

    # --- the step ---------------------------------------------------------------------------

    def _layer_stats(self, name: str) -> LayerStats | None:
        approx = self._stats_config.kfac_approx
        if self.backend is not None:
            if name not in self._external:
                return None
            shared, n = self._external[name]
            like = next(iter(shared.values()))
            return SharedLayerStats(self.layers[name], shared, n, like, approx)  # type: ignore[arg-type]
        if self._sampled_fisher:
            scale = self._fisher_scale / max(1, self._fisher_calls)
            return self.engine.layer_stats(name, "fisher", approx, scale)  # type: ignore[arg-type]
        return self.engine.layer_stats(name, "loss", approx, self._empirical_scale)  # type: ignore[arg-type]

    @property
    def _sampled_fisher(self) -> bool:
        return self.fisher is not FisherType.EMPIRICAL

    def _empirical_scale(self, stats: LayerStats) -> float:
        average = self._stats_config.loss_average
        if average is None:
            return 1.0
        n = stats.num_data
        if average == "batch":
            return float(n)
        part = stats.parts[0]
        r = part.output_features(part.grads[0]).shape[1]
        return float(n * r)

    @torch.no_grad()
    def compute_directions(
        self, grads: dict[str, tuple[Tensor, Tensor | None]], *, others_finite: bool = True
    ) -> dict[str, Tensor] | None:
        """Advance one step: fold in statistics, refresh, precondition.

        Every write is guarded. The gradient (``‖∇_l‖²`` per layer, one reduction each) and
        the new statistics are checked before anything changes; a block's refresh that fails
        keeps the last good inverse (the very first is retried every step until it works);
        the direction is checked by ``⟨Δ_l, ∇_l⟩`` (one reduction per layer, finite only if
        ``Δ_l`` is). A non-finite gradient or direction returns ``None``: the step counter
        does not advance, and the skip is counted in :attr:`counters`. The two reductions
        are kept in :attr:`grad_norms_sq` and :attr:`inner_products` for the optimizer's
        trust region.

        Args:
            grads: ``{layer name: (weight gradient, bias gradient or None)}`` for the
                tracked layers (a caller may have added weight decay to them already).
            others_finite: Whether the caller's other gradients (untracked parameters)
                are finite; ``False`` skips the step like a non-finite tracked gradient
                (on every process).

        Returns:
            ``{layer name: preconditioned direction in matrix form}``, or ``None`` if the
            step was skipped.
        """
        self._last_step_state = None
        try:
            mats = {name: layer_matrix(self.layers[name], w, b) for name, (w, b) in grads.items()}
            names = list(mats)
            sq = squared_norms(list(mats.values()))
            ok = others_finite and finite_from_squares(sq, list(mats.values()))
            if not self.distributor.all_ok(ok):
                self._count_skip("nonfinite_gradients")
                return None
            if sq:
                outlier, accepted = self.gates.gradient_outlier(sum(sq))
                self.counters["accepted_outlier_levels"] += accepted
                if outlier:
                    self._count_skip("outlier_gradients")
                    return None
            if self.stats_due:
                self._update_statistics(mats)
            # a layer with no statistics yet (it did not run on a statistics step, or its
            # parameters are used outside its forward) takes the first-order step Δ = ∇
            missing = [n for n, b in self.blocks.items() if n in mats and b.num_updates == 0]
            first_order: dict[str, Tensor] = {}
            if missing:
                self._missing_statistics(missing)
                first_order = {n: mats[n] for n in missing}
            due = [
                name
                for name, block in self.blocks.items()
                if block.num_updates > 0 and (self.refresh_due or name not in self._refreshed)
            ]
            if due:
                failures = {name: self.blocks[name].inverse_failures for name in due}
                self.distributor.refresh(due, self.blocks, self._refresh_block)
                # a block whose first refresh failed has no inverse of its own yet: retry it
                # on the next step rather than wait for the schedule
                self._refreshed.update(
                    n for n in due if n in self._refreshed or self.blocks[n].inverse_failures == failures[n]
                )
            saved = {n: self.blocks[n].step_state() for n in mats if n not in first_order}
            out = {
                name: (first_order[name] if name in first_order else self.blocks[name].precondition(m))
                for name, m in mats.items()
            }
            for name, cols in self._first_order_columns.items():
                if name in out and name not in first_order:  # e.g. an embedding's padding row
                    out[name][:, cols] = mats[name][:, cols].to(out[name].dtype)
            dots = inner_products([(out[n], mats[n]) for n in names])
            ok = all(math.isfinite(d) for d in dots)
            if not self.distributor.all_ok(ok):
                self._restore_step_state(saved)
                self._count_skip("nonfinite_directions")
                return None
            self.inner_products = dict(zip(names, dots))
            self.grad_norms_sq = dict(zip(names, sq))
            if sq:
                self.gates.track_gradient(sum(sq))
            self._last_step_state = saved
            self.steps += 1
            return out
        finally:
            self.clear_records()

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
        self.steps -= 1
        self._count_skip(reason)

    _last_step_state: dict[str, Any] | None = None

    def _refresh_block(self, name: str) -> None:
        self.blocks[name].refresh(self.damping, self.damping_value)  # type: ignore[arg-type]
        self.refresh_counts[name] += 1

    def clear_records(self) -> None:
        """Forget what the hooks recorded since the last step."""
        self.engine.clear()
        self._fisher_calls = 0
        self._external = {}

    def _missing_statistics(self, missing: list[str]) -> None:
        if self.backend is not None and self.stats_due and not self._external:
            raise RuntimeError(
                f"no statistics at step {self.steps}: with backend={self.backend.name!r}, call "
                "collect_statistics(inputs, targets) before step() (it does nothing on steps without statistics)."
            )
        if self.engine.displaced:
            if "<displaced>" not in self._warned_missing:
                self._warned_missing.add("<displaced>")
                warnings.warn(
                    f"this {self.spec.name} optimizer's hooks were detached when another curvkit optimizer was built "
                    "on the same model; it collects no statistics, and its layers without any take first-order steps.",
                    stacklevel=4,
                )
            return
        if self._sampled_fisher and self.stats_due and not any(r.fisher_grads for r in self.engine.records):
            raise RuntimeError(
                f"no curvature statistics for layer(s) {', '.join(map(repr, missing))} at step {self.steps}: with "
                f"fisher={self.fisher.value!r}, call curvature_backward(output, targets) after the forward pass and "
                "before loss.backward() (it does nothing on steps without statistics)."
            )
        # a block broadcast over the batch was explained by the engine's own warning
        new = [n for n in missing if n not in self._warned_missing and n not in self.engine.broadcast]
        if new:
            self._warned_missing.update(new)
            warnings.warn(
                f"no statistics captured yet for layer(s) {', '.join(map(repr, new))} (no forward pass with gradients "
                "on a statistics step); they take a first-order step until they have some.",
                stacklevel=4,
            )

    def _update_statistics(self, mats: dict[str, Tensor]) -> None:
        """Fold this step's statistics into the blocks, behind two gates.

        * **Finite**: every block's batch estimate is checked before any block changes
          (:meth:`~curvkit.blocks.CurvatureBlock.batch_is_finite`); one non-finite layer
          skips the update of all (``skipped_stat_updates``).
        * **Outliers**: each layer's batch magnitude
          (:meth:`~curvkit.blocks.CurvatureBlock.batch_magnitudes`, e.g. ``tr A_b`` and
          ``tr G_b``) are compared with the running (log-average) magnitudes of the batches
          it accepted (:class:`~curvkit.optim.guards.OutlierGates`); a part above
          ``OUTLIER_RATIO`` times its running magnitude makes the batch an outlier, and the
          update of all layers is skipped (``outlier_stat_updates``). ``OUTLIER_PATIENCE``
          outliers in a row are taken as a real change of level: the batch is folded in
          (``accepted_outlier_levels``).

        A block may still decline its own update when its new state would not be finite
        (counted by the block, :attr:`~curvkit.blocks.CurvatureBlock.skipped_updates`).
        """
        if self.spec.statistics == "gradient":  # the gradient is all such a method sees (already reduced)
            present: dict[str, LayerStats] = {n: GradientStats(self.layers[n], m) for n, m in mats.items()}
        else:
            stats = {name: self._layer_stats(name) for name in self.blocks}
            present = self.distributor.share_statistics(
                {n: s for n, s in stats.items() if s is not None}, self.blocks
            )
            for name, s in present.items():
                s.gradient = mats.get(name)
        ema = self.schedule.ema_decay
        # check every batch estimate before changing any block: a non-finite one leaves
        # every block untouched
        # blocks with their own check run it; the default check is the magnitudes' finiteness
        own = [n for n in present if type(self.blocks[n]).batch_is_finite is not CurvatureBlock.batch_is_finite]
        if not all(self.blocks[n].batch_is_finite(present[n]) for n in own):
            self.counters["skipped_stat_updates"] += 1
            self._release(present)
            return
        magnitudes = {n: tuple(float(v) for v in self.blocks[n].batch_magnitudes(s)) for n, s in present.items()}
        if any(not math.isfinite(v) for m in magnitudes.values() for v in m):
            self.counters["skipped_stat_updates"] += 1
            self._release(present)
            return
        outliers, accepted = self.gates.statistics_outliers(magnitudes)
        if outliers and not accepted:
            self.counters["outlier_stat_updates"] += 1
            self._release(present)
            return
        self.counters["accepted_outlier_levels"] += accepted
        for name, s in present.items():
            block = self.blocks[name]
            k = block.num_updates + 1
            # a block may carry its own ρ (the unit-wise block, under methods without ema_decay)
            rho = getattr(block, "stat_decay", None)
            before = block.num_updates
            taken = block.update(s, min(1.0 - 1.0 / k, ema if rho is None else rho))
            # the core counts the updates a block accepted (False: it declined this batch);
            # a block that counts itself is left alone
            if taken is not False and block.num_updates == before:
                block.num_updates += 1
            self.gates.track_statistics(name, magnitudes[name])

    def _release(self, present: dict[str, LayerStats]) -> None:
        """Drop what the blocks computed from a batch they will not fold in (it holds the
        batch's features)."""
        for name in present:
            block = self.blocks[name]
            if getattr(block, "_batch_cache", None) is not None:
                block._batch_cache = None

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
        for name, mat in dirs.items():
            layer = self.layers[name]
            w, b = split_layer_matrix(layer, mat)
            layer.weight_ref.grad().copy_(w)  # type: ignore[union-attr]
            if b is not None:
                assert layer.bias_ref is not None
                layer.bias_ref.grad().copy_(b)  # type: ignore[union-attr]
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
        self.engine.detach()
        self.engine.clear()

    remove = remove_hooks

    def tracked_parameters(self) -> list[nn.Parameter]:
        """The parameters with a curvature block (each once)."""
        out: dict[int, nn.Parameter] = {}
        for layer in self.layers.values():
            for p in layer.params:
                out.setdefault(id(p), p)
        return list(out.values())

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python values only, so ``torch.load(..., weights_only=True)``
        reads a checkpoint; with each layer's matrix shape ``[d_out, d_in]`` (bias column
        included), which :meth:`load_state_dict` checks."""
        return {
            "method": self.spec.name,
            "steps": self.steps,
            "damping_value": self.damping_value,
            "counters": dict(self.counters),
            "seed": self._seed,
            "generator": None if self.generator is None else self.generator.get_state(),
            "generator_device": None if self.generator is None else str(self.generator.device),
            "refreshed": sorted(self._refreshed),
            "layer_shapes": {name: [b.info.d_out, b.info.d_in] for name, b in self.blocks.items()},
            "outlier_gates": self.gates.state_dict(),
            "blocks": {name: block.state_dict() for name, block in self.blocks.items()},
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` (changing nothing) unless ``state`` is a
        :meth:`state_dict` of this method for layers this model tracks, with the same
        shapes (the message names the layer and both shapes)."""
        if state.get("method") != self.spec.name:
            raise ValueError(
                f"state_dict is from method {state.get('method')!r}, this preconditioner runs {self.spec.name!r}."
            )
        unknown = set(state["blocks"]) - set(self.blocks)
        if unknown:
            raise ValueError(
                f"state_dict has blocks for layers {sorted(unknown)} that this model does not track; "
                f"tracked: {sorted(self.blocks)}."
            )
        mismatched = []
        for name, shape in state.get("layer_shapes", {}).items():
            info = self.blocks[name].info
            ours = [info.d_out, info.d_in]
            if list(shape) != ours:
                mismatched.append(
                    f"layer {name!r}: the checkpoint's matrix form is {list(shape)} (d_out, d_in incl. bias), "
                    f"this model's is {ours}"
                )
        if mismatched:
            raise ValueError(
                "state_dict does not fit this model (saved from a model with the same layer names but other widths?): "
                + "; ".join(mismatched)
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, after :meth:`check_state_dict`."""
        self.check_state_dict(state)
        self.steps = int(state["steps"])
        self.damping_value = float(state["damping_value"])
        self.counters = {**COUNTERS, **dict(state["counters"])}
        self._seed = int(state["seed"])
        if state["generator"] is not None:
            here = next((p.device for p in self.tracked_parameters()), None)
            saved = torch.device(state["generator_device"])
            if here is not None and saved.type != here.type:
                # CPU and CUDA generator states are not interchangeable: a new stream, seeded
                warnings.warn(
                    f"the MC generator was saved on {saved.type} and the model is on {here.type}: its state "
                    "cannot be restored there, so MC targets continue from a new seeded stream.",
                    stacklevel=2,
                )
                self.generator = torch.Generator(device=here).manual_seed(self._seed + self.steps)
            else:
                if self.generator is None:
                    self.generator = torch.Generator(device=here if here is not None else saved)
                self.generator.set_state(state["generator"].cpu())  # map_location may have moved it
        self._refreshed = set(state["refreshed"])
        self.gates = OutlierGates()
        self.gates.load_state_dict(state.get("outlier_gates", {}))
        self._last_step_state = None
        for name, block_state in state["blocks"].items():
            # a checkpoint from another device (map_location, or CPU -> CUDA): the layer's device
            device = self.layers[name].weight.device
            self.blocks[name].load_state_dict(_to_device(block_state, device))

    @property
    def distribution_plan(self) -> dict[str, int | None]:
        """``{layer name: rank that computes its refresh}``; ``None`` for a layer every rank
        refreshes itself (its block shares no refresh state, or sharding is off)."""
        dist = self.distributor
        return {name: (dist.plan[name] if name in dist.shared_refreshes else None) for name in self.blocks}

    def state_bytes(self) -> int:
        return sum(block.state_bytes() for block in self.blocks.values())

    def summary(self) -> str:
        """A table of what runs where: one line per tracked layer, plus skipped modules."""
        lines = [f"{self.spec.name}: {len(self.blocks)} tracked layer(s), {self.config!r}"]
        dist = self.distributor
        if dist.world_size > 1:
            lines.append(f"  distributed: {dist.describe()}")
        for name, block in self.blocks.items():
            where = ""
            if dist.world_size > 1:
                shared = name in dist.shared_refreshes
                where = f" [refresh on rank {dist.plan[name]}]" if shared else " [refresh on every rank]"
            if name in self.engine.broadcast:  # (the engine warned, with the fix)
                lines.append(
                    f"  {name or '<model>'}: first-order (its module was called on a batch of one and broadcast over "
                    "the data, so it has no per-datum statistics; pass its ids expanded to the batch to precondition "
                    "it)"
                )
                continue
            pending = "" if block.num_updates else " — no statistics yet, first-order steps until it has some"
            tie = self.layers[name].describe_sites()
            lines.append(f"  {name or '<model>'}: {block.describe()}{tie}{where}{pending}")
        for name, reason in self.first_order_layers.items():
            lines.append(f"  {name}: first-order ({reason})")
        for pname, reason in self.plan.first_order.items():
            lines.append(f"  {pname}: first-order ({reason})")
        # not indented: the indented lines are one per block or parameter
        lines.append(f"guards: {self.describe_counters()}")
        return "\n".join(lines)

    def describe_counters(self) -> str:
        """The guards' counters in one line (:func:`curvkit.optim.guards.describe_counters`)."""
        return describe_counters(self.steps, self.counters, self.blocks.values())

    def __del__(self) -> None:
        try:
            self.engine.detach()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass
