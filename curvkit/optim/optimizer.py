r"""Curvature optimizers: a :class:`torch.optim.Optimizer` around a :class:`Preconditioner`.

One step, for every parameter group (``lr``, ``momentum``, ``weight_decay``,
``weight_decay_mode`` may differ per group, and LR schedulers work as usual):

1. ``weight_decay_mode="before"``: :math:`\nabla \leftarrow \nabla + \gamma\theta` (the
   decay term is preconditioned, as in KLD-WRM);
2. :math:`\Delta = (G\otimes A + \text{damping})^{-1}\nabla` for tracked layers (the
   method's block); :math:`\Delta = \nabla` for the parameters of other modules (the
   first-order fallback);
3. the trust region, when set (every bundled method sets one by default): per-layer RMS
   clip :math:`\Delta_l \leftarrow \min(1, \kappa_{\text{rms}} /
   \operatorname{rms}(\Delta_l))\,\Delta_l`, per-layer norm constraint
   :math:`\Delta_l \leftarrow \min(1, c\lVert\nabla_l\rVert/\lVert\Delta_l\rVert)\,\Delta_l`
   (``grad_ratio_clip`` c) and KL clip
   :math:`\Delta \leftarrow \min(1, \sqrt{\kappa / \sum_l \eta^2\langle\Delta_l,
   \nabla_l\rangle})\,\Delta` (Ba et al. 2017);
4. ``weight_decay_mode="after"`` (default; alecwangcq's K-FAC, SINGD):
   :math:`\Delta \leftarrow \Delta + \gamma\theta`; ``"decoupled"``:
   :math:`\theta \leftarrow (1 - \eta\gamma)\theta`;
5. heavy-ball momentum :math:`m \leftarrow \mu m + \Delta` and
   :math:`\theta \leftarrow \theta - \eta m` — op for op what ``torch.optim.SGD`` does, so
   with the identity inverter this optimizer *is* SGD. The operations run as one
   multi-tensor (``torch._foreach_*``) call per group and dtype.

With ``adaptive_step="lr-momentum"`` (or ``"lr"``) steps 3 (the KL clip) to 5 are replaced
by the quadratic model's step :math:`\delta = \alpha\Delta + \mu\delta_{\text{prev}}`
(:func:`curvkit.optim.adaptive.adaptive_update`): the per-layer clips shape
:math:`\Delta` first, the KL clip bounds :math:`\delta` afterwards, and ``lr`` is only the
fallback step's size (and the decoupled decay's η).

16-bit parameters (bf16, fp16) get a **compensated update** by default (``kahan_sum=True``;
Kahan summation, as in Zamirai et al. 2020, *Revisiting BFloat16 Training*): the increment
:math:`-\eta m` (and the decoupled decay) is added in float32 together with the rounding
error the last update left, the result is rounded to the parameter's dtype, and the new
rounding error is kept in a 16-bit buffer (``state[p]["kahan_comp"]``, one more tensor of
the parameter's size). Without it, increments below half an ulp of :math:`\theta` are lost
(with :math:`\eta m \approx 10^{-3}\theta`, most of them in bf16). Float32/64 parameters
are updated as above whatever the flag.

Defaults: every option left out takes the method's recommended value
(:attr:`MethodSpec.recommended <curvkit.methods.MethodSpec.recommended>`), trust region
included, so the named classes, :func:`create` and ``CurvatureOptimizer(method=...)`` agree.

Guards (``docs/robustness.md``): the hyperparameters are checked at every step (a NaN or
negative value from a scheduler raises); a non-finite or outlier gradient, a non-finite
direction or an increment that is not finite or would overflow the parameter skips the
step, leaving parameters and momenta byte-identical (counted in
``optimizer.preconditioner.counters``); a :class:`~curvkit.optim.monitor.DivergenceMonitor`
warns once when a run diverges.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit.config import check_number
from curvkit.errors import ConfigError
from curvkit.methods import MethodConfig, MethodSpec
from curvkit.numerics import all_finite_many
from curvkit.optim.adaptive import ADAPTIVE_STEPS, adapt_damping, adaptive_update, describe_adaptive
from curvkit.optim.directions import decay_before, parameter_directions
from curvkit.optim.layers import layer_matrix
from curvkit.optim.monitor import DivergenceMonitor
from curvkit.optim.options import (
    FALLBACK_DEFAULTS,
    MONITOR_KEY,
    RECOMMENDED,
    STATE_KEY,
    WEIGHT_DECAY_MODES,
    check_group,
    plainly_valid,
)
from curvkit.optim.preconditioner import Preconditioner, resolve_method
from curvkit.optim.trust_region import TrustRegion
from curvkit.optim.trust_region import scales as trust_region_scales
from curvkit.optim.update import apply_updates

__all__ = [
    "CurvatureOptimizer",
    "available_methods",
    "create",
]

# re-exported: their home is curvkit.optim.options
_ = (FALLBACK_DEFAULTS, MONITOR_KEY, STATE_KEY, WEIGHT_DECAY_MODES)


class CurvatureOptimizer(torch.optim.Optimizer):
    """A second-order optimizer over any registered method.

    Every option left out takes the method's **recommended** value
    (:attr:`MethodSpec.recommended <curvkit.methods.MethodSpec.recommended>`: settings that
    train, with a trust region), so ``KFAC(model)``, ``create("kfac", model)`` and
    ``CurvatureOptimizer(model, method="kfac")`` are the same optimizer; ``curvkit plugins``
    and the method pages list them. Options the recommended settings do not set fall back
    to :data:`FALLBACK_DEFAULTS`.

    Args:
        model: The model (its tracked layers get curvature blocks).
        params: Parameters or parameter groups (default: ``model.parameters()``); every
            parameter must belong to ``model``. Groups may set ``lr``, ``momentum``,
            ``weight_decay``, ``weight_decay_mode``, ``kahan_sum``.
        method: Registered method name or :class:`~curvkit.methods.MethodSpec` (the named
            subclasses fix it).
        lr: Learning rate :math:`\\eta`.
        momentum: Heavy-ball momentum :math:`\\mu \\in [0, 1)`.
        weight_decay: :math:`\\gamma \\ge 0`.
        weight_decay_mode: ``"after"`` preconditioning, ``"before"`` it, or
            ``"decoupled"`` (AdamW-style).
        kahan_sum: Compensated (Kahan) update of bf16/fp16 parameters (see the module
            docstring); no effect on float32/64 parameters.
        kl_clip: KL-clip bound :math:`\\kappa` (``None``: off).
        rms_clip: Per-layer RMS-clip bound of the direction (``None``: off).
        grad_ratio_clip: Per-layer norm constraint :math:`\\lVert\\Delta_l\\rVert \\le
            c\\,\\lVert\\nabla_l\\rVert` (``None``: off).
        adaptive_step: ``None`` (off, the default), ``"lr-momentum"`` (step size α and
            momentum μ minimise the quadratic model in the plane of the direction and the
            previous step; the groups' ``lr`` and ``momentum`` are then only the fallback
            step's) or ``"lr"`` (α alone, μ the group's momentum); see
            :func:`curvkit.optim.adaptive.adaptive_update` and ``docs/optimizers.md``.
        loss_fn: The training loss module (needed for ``fisher="mc"`` / ``"type-2"``).
        registry, config, generator, distributor: As :class:`Preconditioner` (``distributor``:
            data-parallel training, automatic under an initialised process group).
        recommended: ``False`` ignores the method's recommended settings: the options left
            out take :data:`FALLBACK_DEFAULTS` (no trust region) and the configuration
            class's own defaults (the paper's values) — the raw method.
        **options: Method options (``damping``, ``T_inv``, ``fisher``, ...).

    Example:
        >>> import torch, curvkit.optim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> opt = curvkit.optim.KFAC(model, lr=0.1, damping=1e-2)
        >>> X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(X), y).backward()
        ...     opt.step()
    """

    method: ClassVar[str | None] = None

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        *,
        method: str | MethodSpec | None = None,
        lr: float = RECOMMENDED,
        momentum: float = RECOMMENDED,
        weight_decay: float = RECOMMENDED,
        weight_decay_mode: str = RECOMMENDED,
        kahan_sum: bool = RECOMMENDED,
        kl_clip: float | None = RECOMMENDED,
        rms_clip: float | None = RECOMMENDED,
        grad_ratio_clip: float | None = RECOMMENDED,
        adaptive_step: str | None = RECOMMENDED,
        loss_fn: nn.Module | None = None,
        registry: Any = None,
        config: MethodConfig | None = None,
        generator: torch.Generator | None = None,
        distributor: Any = None,
        recommended: bool = True,
        **options: Any,
    ) -> None:
        method = method if method is not None else type(self).method
        if method is None:
            raise TypeError("CurvatureOptimizer needs method= (a registered name such as 'kfac').")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"the first argument must be the model (an nn.Module), got {type(model).__name__}; "
                "curvature optimizers hook into the model's layers. Pass parameters as params=."
            )
        if not isinstance(recommended, bool):
            raise TypeError(f"recommended={recommended!r} must be True or False.")
        if registry is None:
            from curvkit.plugins import default_registry

            registry = default_registry()
        spec = resolve_method(method, registry)
        given = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "weight_decay_mode": weight_decay_mode,
            "kahan_sum": kahan_sum,
            "kl_clip": kl_clip,
            "rms_clip": rms_clip,
            "grad_ratio_clip": grad_ratio_clip,
            "adaptive_step": adaptive_step,
        }
        settings = spec.recommended_settings() if recommended else {}
        resolved: dict[str, Any] = {
            k: (v if v is not RECOMMENDED else settings.get(k, FALLBACK_DEFAULTS[k])) for k, v in given.items()
        }
        defaults = {k: resolved[k] for k in ("lr", "momentum", "weight_decay", "weight_decay_mode", "kahan_sum")}
        problems = check_group(defaults, "")
        for clip in ("kl_clip", "rms_clip", "grad_ratio_clip"):
            check_number(problems, clip, resolved[clip], low=0.0, low_open=True, optional=True)
        if resolved["adaptive_step"] is not None and resolved["adaptive_step"] not in ADAPTIVE_STEPS:
            problems.append(
                f"adaptive_step={resolved['adaptive_step']!r} must be None (off) or one of "
                f"{', '.join(map(repr, ADAPTIVE_STEPS))}"
            )
        if problems:
            raise ConfigError(f"{type(self).__name__} options", problems)
        super().__init__(model.parameters() if params is None else params, defaults)
        group_problems = [p for i, g in enumerate(self.param_groups) for p in check_group(g, f"param_groups[{i}].")]
        if group_problems:
            raise ConfigError(f"{type(self).__name__} parameter groups", group_problems)
        self._check_params_in_model(model)
        self.kl_clip: float | None = resolved["kl_clip"]
        self.rms_clip: float | None = resolved["rms_clip"]
        self.grad_ratio_clip: float | None = resolved["grad_ratio_clip"]
        self.adaptive_step: str | None = resolved["adaptive_step"]
        if config is None:
            config = spec.make_config(use_recommended=recommended, **options)
            options = {}
        self.preconditioner = Preconditioner(
            model,
            spec,
            loss_fn=loss_fn,
            config=config,
            registry=registry,
            generator=generator,
            distributor=distributor,
            **options,
        )
        self._check_layer_groups()
        damping = self.preconditioner.damping
        self._adaptive = bool(getattr(damping, "adaptive", False))
        self.monitor = DivergenceMonitor(self._describe_settings)

    def _describe_settings(self) -> str:
        group = self.param_groups[0]
        damping = self.preconditioner.damping
        lam = "" if damping is None else f", damping {type(damping).__name__}(λ={self.preconditioner.damping_value:g})"
        adaptive = "" if self.adaptive_step is None else f", adaptive step {self.adaptive_step!r}"
        return (
            f"{self.preconditioner.spec.name}: lr {group['lr']:g}, momentum {group['momentum']:g}{lam}{adaptive}, "
            f"{self.trust_region_description()}"
        )

    def trust_region_description(self) -> str:
        """The trust region in words (``"no trust region"`` when every clip is off)."""
        return TrustRegion(self.kl_clip, self.rms_clip, self.grad_ratio_clip).describe()

    def _check_params_in_model(self, model: nn.Module) -> None:
        """Refuse parameters that are not the model's: the curvature hooks see only the
        model, so such a parameter would be moved by gradients nobody computes (with
        ``params=`` from another model, nothing would train)."""
        own = {id(p) for p in model.parameters()}
        names = {id(p): n for n, p in model.named_parameters()}
        stray = [
            (i, j, tuple(p.shape))
            for i, g in enumerate(self.param_groups)
            for j, p in enumerate(g["params"])
            if id(p) not in own
        ]
        if stray:
            listed = ", ".join(f"param_groups[{i}]['params'][{j}] (shape {list(s)})" for i, j, s in stray[:5])
            more = f" and {len(stray) - 5} more" if len(stray) > 5 else ""
            raise ValueError(
                f"{len(stray)} parameter(s) in params are not parameters of the model: {listed}{more}. "
                "Pass parameters of the model given as the first argument (e.g. params=model.parameters(), or "
                "groups of them); to optimize several models, wrap them in one nn.Module."
                + ("" if names else " (The model has no parameters at all.)")
            )

    def _group_of(self) -> dict[int, dict[str, Any]]:
        return {id(p): g for g in self.param_groups for p in g["params"]}

    def _check_layer_groups(self) -> None:
        groups = self._group_of()
        for layer in self.preconditioner.plan:
            params = layer.params
            inside = [id(p) in groups for p in params]
            if any(inside) and not all(inside):
                raise ValueError(
                    f"layer {layer.name!r}: its weight and bias must both be optimized by this optimizer (they share "
                    "one curvature block); add the missing one to params or freeze it (requires_grad=False)."
                )

    @property
    def config(self) -> MethodConfig:
        """The method's validated configuration."""
        return self.preconditioner.config

    def collect_statistics(self, inputs: Any, targets: Tensor) -> None:
        """This step's statistics from an external backend (``backend="backpack"`` /
        ``"asdl"``); see :meth:`Preconditioner.collect_statistics`."""
        self.preconditioner.collect_statistics(inputs, targets)

    def curvature_backward(self, output: Tensor, targets: Tensor) -> None:
        """The one extra call of ``fisher="mc"`` / ``"type-2"``; see
        :meth:`Preconditioner.curvature_backward`."""
        self.preconditioner.curvature_backward(output, targets)

    def summary(self) -> str:
        """The preconditioner's table (layers, counters) plus the step settings, the trust
        region and the divergence monitor's state."""
        group = self.param_groups[0]
        lines = [
            self.preconditioner.summary(),
            f"step: lr {group['lr']:g}, momentum {group['momentum']:g}, weight decay {group['weight_decay']:g} "
            f"({group['weight_decay_mode']}); {self.trust_region_description()}",
            self.monitor.describe(),
        ]
        if self.adaptive_step is not None:
            lines.insert(2, describe_adaptive(self.adaptive_step, self.preconditioner.counters))
        return "\n".join(lines)

    def remove_hooks(self) -> None:
        """Detach from the model: its forward passes are no longer recorded. The optimizer
        keeps its state; later steps are first-order for layers that need statistics. A
        deleted optimizer detaches itself (its hooks hold it only weakly)."""
        self.preconditioner.remove_hooks()

    def __enter__(self) -> CurvatureOptimizer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove_hooks()

    def state_bytes(self) -> int:
        """Bytes of optimizer state: curvature blocks plus momentum buffers."""
        total = self.preconditioner.state_bytes()
        for state in self.state.values():
            for v in state.values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
        return total

    # --- the step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One optimization step (see the module docstring).

        Every write is guarded: the hyperparameters of every group are checked first (a
        non-finite or negative value, e.g. from a scheduler, raises
        :class:`~curvkit.errors.ConfigError` before anything changes); a non-finite
        gradient, preconditioned direction or parameter increment skips the step, leaving
        parameters and momenta byte-identical (counted in ``preconditioner.counters``); a
        call without any gradient does nothing and does not advance the step counter.

        Args:
            closure: Re-evaluates the model and returns the loss. Required with
                :class:`~curvkit.linalg.damping.LevenbergMarquardtDamping`, which
                evaluates it again after the update to measure the reduction ratio. Its
                loss also feeds the divergence monitor.
        """
        try:
            self._check_step_hyperparameters()
        except ConfigError:
            self.preconditioner.clear_records()  # this step's captured batch is not used
            raise
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            self.monitor.loss(loss)
        pre = self.preconditioner
        adapt_now = self._adaptive and pre.steps % pre.damping.every == 0  # type: ignore[union-attr]
        if adapt_now and closure is None:
            raise RuntimeError(
                "LevenbergMarquardtDamping adapts λ from the loss before and after a step: call "
                "optimizer.step(closure) with a closure that recomputes the loss (and its gradient)."
            )
        pre.distributor.reduce_gradients(p for g in self.param_groups for p in g["params"])
        groups = self._group_of()
        grads, raw, fallback = self._gradients(groups, adapt_now)
        if not grads and not fallback:
            # nothing to do: no gradient anywhere (e.g. step() before any backward)
            pre.counters["empty_steps"] = pre.counters.get("empty_steps", 0) + 1
            pre.clear_records()
            return loss
        fallback_ok = all_finite_many([p.grad for p in fallback])  # type: ignore[misc]
        # the per-layer clips need ‖Δ_l‖: the preconditioner's direction guard computes them
        norms = self.rms_clip is not None or self.grad_ratio_clip is not None
        dirs = pre.compute_directions(grads, others_finite=fallback_ok, direction_norms=norms)
        if dirs is None:
            self.monitor.skipped(pre.steps, pre.counters)
            return loss
        scales = self._trust_region(dirs, fallback, groups)
        params, direction, factors, bounds = parameter_directions(pre, dirs, scales, fallback, groups)
        old = {i: p.detach().clone() for i, p in params.items()} if adapt_now else None
        if self.adaptive_step is not None:
            applied = adaptive_update(self, params, direction, groups, factors)
        else:
            applied = apply_updates(self.state, params, direction, groups, factors, bounds)
        if not applied:
            pre.revert_step("nonfinite_updates")
            self.monitor.skipped(pre.steps, pre.counters)
            return loss
        self.monitor.applied(pre.grad_norms_sq, list(params.values()))
        if adapt_now:
            assert old is not None and closure is not None
            adapt_damping(pre, loss, closure, old, params, raw)
        return loss

    def _gradients(
        self, groups: dict[int, dict[str, Any]], adapt_now: bool
    ) -> tuple[dict[str, tuple[Tensor, Tensor | None]], dict[str, Tensor], list[Tensor]]:
        """Stage 1: the tracked layers' gradients (weight decay added for
        ``weight_decay_mode="before"``), the raw ones in matrix form for the LM quadratic
        model, and the other parameters with a gradient (the first-order fallback)."""
        pre = self.preconditioner
        tracked: set[int] = set()
        grads: dict[str, tuple[Tensor, Tensor | None]] = {}
        raw: dict[str, Tensor] = {}
        blocks = pre.blocks
        for name, layer in pre.layers.items():
            w_ref, b_ref = layer.weight_ref, layer.bias_ref if layer.has_bias else None
            group = groups.get(id(w_ref.param))
            if group is None:
                continue
            tracked.add(id(w_ref.param))
            if b_ref is not None:
                tracked.add(id(b_ref.param))
            blocks[name].set_step_size(group["lr"])
            gw = w_ref.param.grad if w_ref.rows is None else w_ref.grad()
            gb = None if b_ref is None else (b_ref.param.grad if b_ref.rows is None else b_ref.grad())
            if gw is None and gb is None:
                continue
            if gw is None:
                gw = torch.zeros_like(w_ref.view())
            if b_ref is not None and gb is None:
                gb = torch.zeros_like(b_ref.view())
            if adapt_now:  # the LM quadratic model reads the raw gradient
                raw[name] = layer_matrix(layer, gw, gb)
            gw = decay_before(group, w_ref.view(), gw)
            if b_ref is not None and gb is not None:
                gb = decay_before(groups[id(b_ref.param)], b_ref.view(), gb)
            grads[name] = (gw, gb)
        fallback = [p for g in self.param_groups for p in g["params"] if id(p) not in tracked and p.grad is not None]
        return grads, raw, fallback

    def _check_step_hyperparameters(self) -> None:
        """Refuse non-finite or out-of-range hyperparameters met at step time (set after
        construction, e.g. by a learning-rate scheduler) before anything changes."""
        if all(plainly_valid(g) for g in self.param_groups) and all(
            c is None or (isinstance(c, float) and 0.0 < c < math.inf)
            for c in (self.kl_clip, self.rms_clip, self.grad_ratio_clip)
        ):
            return
        problems = [p for i, g in enumerate(self.param_groups) for p in check_group(g, f"param_groups[{i}].")]
        for clip in ("kl_clip", "rms_clip", "grad_ratio_clip"):
            check_number(problems, clip, getattr(self, clip), low=0.0, low_open=True, optional=True)
        if problems:
            raise ConfigError(
                f"{type(self).__name__} at step {self.preconditioner.steps} (values set after construction, e.g. by a "
                "learning-rate scheduler; nothing was changed)",
                problems,
            )

    def _trust_region(
        self, dirs: dict[str, Tensor], fallback: list[Tensor], groups: dict[int, dict[str, Any]]
    ) -> dict[str, float]:
        """Per-layer scale factors of the directions (:func:`~curvkit.optim.trust_region.scales`)."""
        kl_clip = self.kl_clip if self.adaptive_step is None else None  # the adaptive step clips δ itself
        if kl_clip is None and self.rms_clip is None and self.grad_ratio_clip is None:
            return {}
        pre = self.preconditioner
        layers = pre.layers
        return trust_region_scales(
            TrustRegion(kl_clip, self.rms_clip, self.grad_ratio_clip),
            dirs,
            {name: groups[id(layers[name].weight_ref.param)]["lr"] for name in dirs},
            pre.grad_norms_sq,
            pre.inner_products,
            [(p, groups[id(p)]["lr"]) for p in fallback],
            pre.direction_norms_sq,
        )

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out[STATE_KEY] = self.preconditioner.state_dict()
        out[MONITOR_KEY] = self.monitor.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pre_state = state_dict.pop(STATE_KEY, None)
        monitor_state = state_dict.pop(MONITOR_KEY, None)
        if pre_state is None:
            raise ValueError(
                f"this state_dict has no {STATE_KEY!r} entry (curvature state); it was not saved by a "
                "curvkit optimizer."
            )
        self.preconditioner.check_state_dict(pre_state)
        self._check_state_shapes(state_dict)
        self.preconditioner.load_state_dict(pre_state)
        # own copies of the per-parameter tensors: the update writes the momentum buffers in
        # place, so buffers shared with a live optimizer's state_dict() would couple the two
        state_dict["state"] = {
            k: {n: v.clone() if isinstance(v, Tensor) else v for n, v in entry.items()}
            for k, entry in state_dict.get("state", {}).items()
        }
        super().load_state_dict(state_dict)
        if monitor_state is not None:
            self.monitor.load_state_dict(monitor_state)

    def _check_state_shapes(self, state_dict: dict[str, Any]) -> None:
        """Refuse per-parameter state (momentum, Kahan buffers) whose shapes differ from the
        parameters', naming the parameter and both shapes (torch.optim would accept it and
        fail later)."""
        names = {id(p): n for n, p in self.preconditioner.model.named_parameters()}
        ours = [p for g in self.param_groups for p in g["params"]]
        saved_groups = state_dict.get("param_groups", [])
        saved_ids = [i for g in saved_groups for i in g.get("params", [])]
        if len(saved_ids) != len(ours):
            return  # torch.optim reports the count mismatch itself
        problems = []
        for key, p in zip(saved_ids, ours):
            for field_name, value in state_dict.get("state", {}).get(key, {}).items():
                if isinstance(value, Tensor) and value.ndim and value.shape != p.shape:
                    problems.append(
                        f"parameter {names.get(id(p), key)!r}: saved {field_name} has shape {list(value.shape)}, "
                        f"the parameter has shape {list(p.shape)}"
                    )
        if problems:
            raise ValueError(
                "this state_dict does not fit the model (was it saved from a model of other widths?): "
                + "; ".join(problems)
            )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_decay_mode", "after")
            group.setdefault("momentum", 0.0)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("kahan_sum", True)


def available_methods(registry: Any = None) -> list[str]:
    """Names of the registered methods."""
    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    return registry.methods.names()


def create(method: str, model: nn.Module, params: Iterable[Any] | None = None, **kwargs: Any) -> CurvatureOptimizer:
    """Build the optimizer of a registered method by name (``create("ekfac", model, lr=0.1)``).

    Raises:
        UnknownComponentError: ``method`` is not registered (the message lists those that are).
    """
    return CurvatureOptimizer(model, params, method=method, **kwargs)
