r"""Where a preconditioner's statistics come from: the capture engine, or an external backend.

:class:`StatisticsCapture` owns the :class:`~curvkit.stats.engine.CaptureEngine` that
records the tracked layers' inputs and output gradients on statistics steps (the user's
own forward and backward; :meth:`~StatisticsCapture.curvature_backward` adds the MC or
type-2 Fisher's vectors), or the registered backend (``backend="backpack"`` / ``"asdl"``)
that computes a batch's factors itself (:meth:`~StatisticsCapture.collect_statistics`).
It turns what was captured into each layer's :class:`~curvkit.blocks.LayerStats` with the
Fisher's scaling (:meth:`~StatisticsCapture.layer_stats`), and explains a layer that has
none (:meth:`~StatisticsCapture.explain_missing`). When a step is due is the schedule's
business (:mod:`curvkit.optim.schedule`); this class is asked through ``due()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.blocks import LayerStats, SharedLayerStats
from curvkit.config import FisherType
from curvkit.distributed.base import Distributor
from curvkit.errors import UnsupportedRequestError
from curvkit.methods import MethodSpec, StatisticsConfig
from curvkit.stats.backend import UnitwiseFactors
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.losses import loss_adapter
from curvkit.stats.plan import LayerPlan, TrackingPlan
from curvkit.stats.subsample import configure_engine

__all__ = ["StatisticsCapture"]


class StatisticsCapture:
    """A preconditioner's source of layer statistics.

    Args:
        model: The model.
        spec: The method (``spec.statistics == "gradient"``: no hooks at all).
        plan: The blocks to capture (the preconditioner's tracked layers).
        statistics_config: The statistics options (``None`` for a gradient-based method).
        loss_fn: The training loss (needed for ``fisher="mc"`` / ``"type-2"`` and external
            backends).
        registry: Where external backends are looked up.
        distributor: Data-parallel training (an external backend refuses it).
        generator: MC generator (``None``: made on first use, seeded with ``seed``).
        seed: Seed of that generator.
        due: Whether the current step collects statistics.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: MethodSpec,
        plan: TrackingPlan,
        statistics_config: StatisticsConfig | None,
        loss_fn: nn.Module | None,
        registry: Any,
        distributor: Distributor,
        generator: torch.Generator | None,
        seed: int,
        due: Callable[[], bool],
    ) -> None:
        self.model = model
        self.spec = spec
        self.registry = registry
        self.statistics_config = statistics_config
        self.fisher: FisherType = (
            statistics_config.fisher  # type: ignore[assignment]
            if statistics_config is not None
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
        self.layers: dict[str, LayerPlan] = {layer.name: layer for layer in plan}
        self.distributor = distributor
        self.generator = generator
        self.seed = seed
        self.due = due
        self._fisher_calls = 0
        self._fisher_scale = 1.0
        self._warned: set[str] = set()
        self.backend = self._resolve_backend(statistics_config.backend if statistics_config is not None else "hooks")
        #: Factors from an external statistics backend (``collect_statistics``) for this step:
        #: ``{"A", "G"}``, or ``{"F"}`` for a unit-wise layer, and the number of data.
        self.external: dict[str, tuple[dict[str, Tensor], int]] = {}
        #: The capture engine (:mod:`curvkit.stats.engine`); its hooks hold this object only
        #: weakly. With an external backend it stays detached (the backend runs its own passes).
        self.engine = CaptureEngine(
            plan, model, active=due, keep_loss_grads=self.fisher is FisherType.EMPIRICAL, persistent=True
        )
        configure_engine(self.engine, statistics_config, seed + 1)  # subsampling, product dtype
        if self.backend is None and spec.statistics != "gradient":
            self.engine.attach()

    # --- sources ------------------------------------------------------------------------------

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

    @property
    def config(self) -> StatisticsConfig:
        if self.statistics_config is None:  # pragma: no cover - only statistics paths ask
            raise RuntimeError(f"method {self.spec.name!r} captures no layer statistics (statistics='gradient').")
        return self.statistics_config

    @property
    def sampled_fisher(self) -> bool:
        """Whether the Fisher's vectors are drawn or exact (``"mc"`` / ``"type-2"``)."""
        return self.fisher is not FisherType.EMPIRICAL

    def _ensure_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def collect_statistics(self, inputs: Any, targets: Tensor) -> None:
        """See :meth:`curvkit.optim.Preconditioner.collect_statistics`."""
        if self.backend is None:
            raise RuntimeError(
                "collect_statistics() is for backend='backpack'/'asdl'; with backend='hooks' (the default) the "
                "statistics come from your own forward and backward (and curvature_backward for fisher='mc'/'type-2')."
            )
        if not self.due():
            return
        from curvkit.stats.api import _make_request, resolve_backend

        if self.fisher is FisherType.MC:
            self._ensure_generator(targets.device)
        request = _make_request(
            self.model,
            self.loss_fn,  # type: ignore[arg-type]
            inputs,
            targets,
            self.fisher,
            self.config.kfac_approx,  # type: ignore[arg-type]
            self.config.mc_samples,
            self.generator,
            self.config.unsupported,
            self.registry,
            self.engine.plan,
        )
        factors = resolve_backend(self.registry, self.backend.name, request).compute(request)
        n = int(targets.shape[0])
        self.external = {
            name: ({"F": entry.F} if isinstance(entry, UnitwiseFactors) else {"A": entry[0], "G": entry[1]}, n)
            for name, entry in factors.items()
        }

    def curvature_backward(self, output: Tensor, targets: Tensor) -> None:
        """See :meth:`curvkit.optim.Preconditioner.curvature_backward`."""
        if self.fisher is FisherType.EMPIRICAL or not self.due() or not self.engine.records:
            return
        live = [r for r in self.engine.records if r.output is not None]
        if not live:
            raise RuntimeError("curvature_backward() was already called for this forward pass.")
        assert self.loss_fn is not None
        adapter = loss_adapter(self.loss_fn)
        generator = self._ensure_generator(output.device)
        vectors = adapter.output_vectors(output, targets, self.fisher, self.config.mc_samples, generator)
        self.engine.backpropagate(output, vectors, retain_graph=True)
        self._fisher_scale = 1.0 / adapter.normaliser(output, targets)
        self._fisher_calls += 1
        self.engine.drop_outputs()  # the graph is the caller's again

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """A block in which forward passes record nothing (evaluation, line searches)."""
        with self.engine.suspended():
            yield

    @property
    def is_suspended(self) -> bool:
        return self.engine._suspended > 0

    def clear(self) -> None:
        """Forget what was captured since the last step."""
        self.engine.clear()
        self._fisher_calls = 0
        self.external = {}

    def detach(self) -> None:
        self.engine.detach()
        self.engine.clear()

    def follow_schedule(self) -> None:
        """Hooks installed only for a step that collects statistics: paused after a step
        when the next one collects none (a module with hooks takes PyTorch's slower call
        path, ~10–20 µs per module and forward on a 2-core CPU), resumed before the next
        statistics step. Nothing for an external backend or a detached engine."""
        if self.due():
            self.engine.resume()
        else:
            self.engine.pause()

    # --- what was captured -----------------------------------------------------------------

    def layer_stats(self, name: str) -> LayerStats | None:
        """The layer's statistics of this step (``None``: none were captured)."""
        approx = self.config.kfac_approx
        if self.backend is not None:
            if name not in self.external:
                return None
            shared, n = self.external[name]
            like = next(iter(shared.values()))
            return SharedLayerStats(self.layers[name], shared, n, like, approx)  # type: ignore[arg-type]
        if self.sampled_fisher:
            scale = self._fisher_scale / max(1, self._fisher_calls)
            return self.engine.layer_stats(name, "fisher", approx, scale)  # type: ignore[arg-type]
        return self.engine.layer_stats(name, "loss", approx, self._empirical_scale)  # type: ignore[arg-type]

    def _empirical_scale(self, stats: LayerStats) -> float:
        average = self.config.loss_average
        if average is None:
            return 1.0
        n = stats.num_data
        if average == "batch":
            return float(n)
        part = stats.parts[0]
        r = part.output_features(part.grads[0]).shape[1]
        return float(n * r)

    def explain_missing(self, missing: list[str], step: int) -> None:
        """Raise or warn (once per layer) about layers without statistics yet: a missing
        ``collect_statistics`` / ``curvature_backward`` call raises; a layer that did not run
        on a statistics step warns (it takes first-order steps until it has some)."""
        due = self.due()
        if self.backend is not None and due and not self.external:
            raise RuntimeError(
                f"no statistics at step {step}: with backend={self.backend.name!r}, call "
                "collect_statistics(inputs, targets) before step() (it does nothing on steps without statistics)."
            )
        if self.engine.displaced:
            if "<displaced>" not in self._warned:
                self._warned.add("<displaced>")
                warnings.warn(
                    f"this {self.spec.name} optimizer's hooks were detached when another curvkit optimizer was built "
                    "on the same model; it collects no statistics, and its layers without any take first-order steps.",
                    stacklevel=5,
                )
            return
        if self.sampled_fisher and due and not any(r.fisher_grads for r in self.engine.records):
            raise RuntimeError(
                f"no curvature statistics for layer(s) {', '.join(map(repr, missing))} at step {step}: with "
                f"fisher={self.fisher.value!r}, call curvature_backward(output, targets) after the forward pass and "
                "before loss.backward() (it does nothing on steps without statistics)."
            )
        # a block broadcast over the batch was explained by the engine's own warning
        new = [n for n in missing if n not in self._warned and n not in self.engine.broadcast]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"no statistics captured yet for layer(s) {', '.join(map(repr, new))} (no forward pass with gradients "
                "on a statistics step); they take a first-order step until they have some.",
                stacklevel=5,
            )
