r"""Curvature optimizers: a :class:`torch.optim.Optimizer` around a :class:`Preconditioner`.

One step, for every parameter group (``lr``, ``momentum``, ``weight_decay``,
``weight_decay_mode`` may differ per group, and LR schedulers work as usual):

1. ``weight_decay_mode="before"``: :math:`\nabla \leftarrow \nabla + \gamma\theta` (the
   decay term is preconditioned, as in KLD-WRM);
2. :math:`\Delta = (G\otimes A + \text{damping})^{-1}\nabla` for tracked layers (the
   method's block); :math:`\Delta = \nabla` for the parameters of other modules (the
   first-order fallback);
3. per-layer RMS clip :math:`\Delta_l \leftarrow \min(1, \kappa_{\text{rms}} /
   \operatorname{rms}(\Delta_l))\,\Delta_l` and KL clip
   :math:`\Delta \leftarrow \min(1, \sqrt{\kappa / \sum_l \eta^2\langle\Delta_l,
   \nabla_l\rangle})\,\Delta` (Ba et al. 2017), when set;
4. ``weight_decay_mode="after"`` (default; alecwangcq's K-FAC, SINGD):
   :math:`\Delta \leftarrow \Delta + \gamma\theta`; ``"decoupled"``:
   :math:`\theta \leftarrow (1 - \eta\gamma)\theta`;
5. heavy-ball momentum :math:`m \leftarrow \mu m + \Delta` and
   :math:`\theta \leftarrow \theta - \eta m` — op for op what ``torch.optim.SGD`` does, so
   with the identity inverter this optimizer *is* SGD. The operations run as one
   multi-tensor (``torch._foreach_*``) call per group and dtype.

16-bit parameters (bf16, fp16) get a **compensated update** by default (``kahan_sum=True``;
Kahan summation, as in Zamirai et al. 2020, *Revisiting BFloat16 Training*): the increment
:math:`-\eta m` (and the decoupled decay) is added in float32 together with the rounding
error the last update left, the result is rounded to the parameter's dtype, and the new
rounding error is kept in a 16-bit buffer (``state[p]["kahan_comp"]``, one more tensor of
the parameter's size). Without it, increments below half an ulp of :math:`\theta` are lost
(with :math:`\eta m \approx 10^{-3}\theta`, most of them in bf16). Float32/64 parameters
are updated as above whatever the flag.

A non-finite gradient anywhere skips the step (parameters, momenta and curvature state
untouched; counted in ``optimizer.preconditioner.counters``).
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
from curvkit.numerics import all_finite, compensated_add
from curvkit.optim.preconditioner import Preconditioner, layer_matrix, split_layer_matrix

__all__ = [
    "BKFAC",
    "BKFACC",
    "BRKFAC",
    "EKFAC",
    "IKFAC",
    "INGD",
    "KFAC",
    "RSKFAC",
    "SINGD",
    "SKFAC",
    "SREKFAC",
    "TEKFAC",
    "TKFAC",
    "CurvatureOptimizer",
    "available_methods",
    "create",
]

WEIGHT_DECAY_MODES = ("after", "before", "decoupled")
#: Key of the preconditioner's state inside ``optimizer.state_dict()``.
STATE_KEY = "curvkit"


def _check_group(group: dict[str, Any], where: str) -> list[str]:
    out: list[str] = []
    kahan = group.get("kahan_sum", True)
    if not isinstance(kahan, bool):
        out.append(f"{where}kahan_sum={kahan!r} must be True or False (compensated update of 16-bit parameters)")
    check_number(out, f"{where}lr", group["lr"], low=0.0)
    check_number(out, f"{where}momentum", group["momentum"], low=0.0, high=1.0, high_open=True)
    check_number(out, f"{where}weight_decay", group["weight_decay"], low=0.0)
    if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
        out.append(
            f"{where}weight_decay_mode={group['weight_decay_mode']!r} must be one of "
            f"{', '.join(map(repr, WEIGHT_DECAY_MODES))}"
        )
    return out


class CurvatureOptimizer(torch.optim.Optimizer):
    """A second-order optimizer over any registered method.

    Args:
        model: The model (its tracked layers get curvature blocks).
        params: Parameters or parameter groups (default: ``model.parameters()``). Groups
            may set ``lr``, ``momentum``, ``weight_decay``, ``weight_decay_mode``,
            ``kahan_sum``.
        method: Registered method name or :class:`~curvkit.methods.MethodSpec` (the named
            subclasses fix it).
        lr: Learning rate :math:`\\eta`.
        momentum: Heavy-ball momentum :math:`\\mu \\in [0, 1)`.
        weight_decay: :math:`\\gamma \\ge 0`.
        weight_decay_mode: ``"after"`` preconditioning (default), ``"before"`` it, or
            ``"decoupled"`` (AdamW-style).
        kahan_sum: Compensated (Kahan) update of bf16/fp16 parameters (default ``True``;
            see the module docstring); no effect on float32/64 parameters.
        kl_clip: KL-clip bound :math:`\\kappa` (``None``: off).
        rms_clip: Per-layer RMS-clip bound (``None``: off).
        loss_fn: The training loss module (needed for ``fisher="mc"`` / ``"type-2"``).
        registry, config, generator, distributor: As :class:`Preconditioner` (``distributor``:
            data-parallel training, automatic under an initialised process group).
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
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "after",
        kahan_sum: bool = True,
        kl_clip: float | None = None,
        rms_clip: float | None = None,
        loss_fn: nn.Module | None = None,
        registry: Any = None,
        config: MethodConfig | None = None,
        generator: torch.Generator | None = None,
        distributor: Any = None,
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
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "weight_decay_mode": weight_decay_mode,
            "kahan_sum": kahan_sum,
        }
        problems = _check_group(defaults, "")
        check_number(problems, "kl_clip", kl_clip, low=0.0, low_open=True, optional=True)
        check_number(problems, "rms_clip", rms_clip, low=0.0, low_open=True, optional=True)
        if problems:
            raise ConfigError(f"{type(self).__name__} options", problems)
        super().__init__(model.parameters() if params is None else params, defaults)
        group_problems = [p for i, g in enumerate(self.param_groups) for p in _check_group(g, f"param_groups[{i}].")]
        if group_problems:
            raise ConfigError(f"{type(self).__name__} parameter groups", group_problems)
        self.kl_clip = kl_clip
        self.rms_clip = rms_clip
        self.preconditioner = Preconditioner(
            model,
            method,
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
        """One line per curvature block and per first-order parameter (see
        :meth:`Preconditioner.summary`)."""
        return self.preconditioner.summary()

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

        Args:
            closure: Re-evaluates the model and returns the loss. Required with
                :class:`~curvkit.linalg.damping.LevenbergMarquardtDamping`, which
                evaluates it again after the update to measure the reduction ratio.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre = self.preconditioner
        adapt_now = self._adaptive and pre.steps % pre.damping.every == 0  # type: ignore[union-attr]
        if adapt_now and closure is None:
            raise RuntimeError(
                "LevenbergMarquardtDamping adapts λ from the loss before and after a step: call "
                "optimizer.step(closure) with a closure that recomputes the loss (and its gradient)."
            )
        pre.distributor.reduce_gradients(p for g in self.param_groups for p in g["params"])
        groups = self._group_of()
        need_raw = self.kl_clip is not None or adapt_now
        tracked: set[int] = set()
        grads: dict[str, tuple[Tensor, Tensor | None]] = {}
        raw: dict[str, Tensor] = {}
        for name, layer in pre.layers.items():
            w_param = layer.weight_ref.param
            if id(w_param) not in groups:
                continue
            tracked.update(id(p) for p in layer.params)
            pre.blocks[name].set_step_size(groups[id(w_param)]["lr"])
            w, b = layer.weight, layer.bias
            gw = layer.weight_ref.grad()
            gb = None if b is None or layer.bias_ref is None else layer.bias_ref.grad()
            if gw is None and (b is None or gb is None):
                continue
            gw = gw if gw is not None else torch.zeros_like(w)
            gb = None if b is None else (gb if gb is not None else torch.zeros_like(b))
            if need_raw:  # only the KL clip and the LM quadratic model read the raw gradient
                raw[name] = layer_matrix(layer, gw, gb)
            gw = self._decay_before(w_param, w, gw, groups)
            if b is not None and gb is not None and layer.bias_ref is not None:
                gb = self._decay_before(layer.bias_ref.param, b, gb, groups)
            grads[name] = (gw, gb)
        fallback = [p for g in self.param_groups for p in g["params"] if id(p) not in tracked and p.grad is not None]
        fallback_ok = all(all_finite(p.grad) for p in fallback)  # type: ignore[arg-type]
        dirs = pre.compute_directions(grads, others_finite=fallback_ok)
        if dirs is None:
            return loss
        # per-parameter directions (a parameter split into parts gets its rows from each)
        direction: dict[int, Tensor] = {}
        params: dict[int, Tensor] = {}
        pieces: dict[int, list[tuple[tuple[int, int], Tensor]]] = {}
        layer_dirs = dirs
        if self.rms_clip is not None:
            layer_dirs = {n: d * min(1.0, self.rms_clip / max(_rms(d), 1e-30)) for n, d in dirs.items()}
        nu = self._kl_factor(layer_dirs, raw, fallback, groups)
        for name, mat in layer_dirs.items():
            layer = pre.layers[name]
            w_dir, b_dir = split_layer_matrix(layer, mat * nu if nu != 1.0 else mat)
            refs = [(layer.weight_ref, w_dir)]
            if b_dir is not None and layer.bias_ref is not None:
                refs.append((layer.bias_ref, b_dir))
            for ref, d in refs:
                params[id(ref.param)] = ref.param
                if ref.rows is None:
                    direction[id(ref.param)] = d
                else:
                    pieces.setdefault(id(ref.param), []).append((ref.rows, d))
        for i, parts in pieces.items():
            direction[i] = self._assemble(params[i], parts, groups, nu)
        for p in fallback:
            assert p.grad is not None
            g = self._decay_before(p, p, p.grad, groups)
            direction[id(p)], params[id(p)] = (g * nu if nu != 1.0 else g), p
        old = {i: p.detach().clone() for i, p in params.items()} if adapt_now else None
        self._apply(params, direction, groups)
        if adapt_now:
            assert old is not None and closure is not None
            self._adapt_damping(loss, closure, old, params, raw)
        return loss

    def _decay_before(self, param: Tensor, value: Tensor, g: Tensor, groups: dict[int, dict[str, Any]]) -> Tensor:
        """``g + γ θ`` for ``weight_decay_mode="before"`` (``value``: ``θ``, or the rows of
        ``param`` a block covers)."""
        group = groups[id(param)]
        if group["weight_decay_mode"] == "before" and group["weight_decay"] != 0:
            return g.add(value, alpha=group["weight_decay"])
        return g

    def _assemble(
        self,
        param: Tensor,
        parts: list[tuple[tuple[int, int], Tensor]],
        groups: dict[int, dict[str, Any]],
        nu: float,
    ) -> Tensor:
        """A parameter's direction from the rows its blocks cover; rows no block moved
        (a part without a gradient this step) take the first-order direction."""
        out = torch.empty_like(param)
        covered = torch.zeros(param.shape[0], dtype=torch.bool, device=param.device)
        for (r0, r1), d in parts:
            out[r0:r1] = d
            covered[r0:r1] = True
        if not bool(covered.all()):
            g = param.grad if param.grad is not None else torch.zeros_like(param)
            g = self._decay_before(param, param, g, groups)
            out[~covered] = g[~covered] * nu
        return out

    def _kl_factor(
        self, dirs: dict[str, Tensor], raw: dict[str, Tensor], fallback: list[Tensor], groups: dict[int, dict[str, Any]]
    ) -> float:
        if self.kl_clip is None:
            return 1.0
        total = 0.0
        for name, d in dirs.items():
            lr = groups[id(self.preconditioner.layers[name].weight_ref.param)]["lr"]
            total += lr**2 * float((d * raw[name].to(d.dtype)).sum())
        for p in fallback:
            assert p.grad is not None
            total += groups[id(p)]["lr"] ** 2 * float((p.grad * p.grad).sum())
        if not math.isfinite(total) or total <= 0:
            return 1.0
        return min(1.0, math.sqrt(self.kl_clip / total))

    def _apply(
        self, params: dict[int, Tensor], directions: dict[int, Tensor], groups: dict[int, dict[str, Any]]
    ) -> None:
        """Weight decay (after / decoupled), momentum and the update — SGD's exact ops, one
        multi-tensor call per operation for the parameters of a group that share dtypes."""
        buckets: dict[tuple[int, torch.dtype, torch.dtype, torch.device], list[int]] = {}
        for i, d in directions.items():
            p = params[i]
            buckets.setdefault((id(groups[i]), p.dtype, d.dtype, p.device), []).append(i)
        for (_, dtype, _, _), ids in buckets.items():
            group = groups[ids[0]]
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            mode = group["weight_decay_mode"]
            kahan = group.get("kahan_sum", True) and dtype in (torch.bfloat16, torch.float16)
            ps = [params[i] for i in ids]
            ds = [directions[i] for i in ids]
            if wd != 0 and mode == "after":
                ds = list(torch._foreach_add(ds, ps, alpha=wd))
            elif wd != 0 and mode == "decoupled" and not kahan:
                torch._foreach_mul_(ps, 1 - lr * wd)
            if mu != 0:
                ds = self._momentum(ps, ds, mu)
            if kahan:
                self._compensated_update(ps, ds, lr, wd if mode == "decoupled" else 0.0)
            else:
                torch._foreach_add_(ps, ds, alpha=-lr)

    def _momentum(self, ps: list[Tensor], ds: list[Tensor], mu: float) -> list[Tensor]:
        """``m ← μ m + Δ`` (``m = Δ`` on a parameter's first step); returns the ``m``'s."""
        out: list[Tensor] = []
        bufs: list[Tensor] = []
        incs: list[Tensor] = []
        for p, d in zip(ps, ds):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = torch.clone(d).detach()
                state["momentum_buffer"] = buf
            else:
                bufs.append(buf)
                incs.append(d)
            out.append(buf)
        if bufs:
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, incs)
        return out

    def _compensated_update(self, ps: list[Tensor], ms: list[Tensor], lr: float, decoupled: float) -> None:
        """``θ ← θ − η m − η γ θ`` for 16-bit ``θ`` with the rounding error carried in
        ``state[θ]["kahan_comp"]`` (:func:`curvkit.numerics.compensated_add`)."""
        for p, m in zip(ps, ms):
            state = self.state[p]
            inc = m.to(torch.float32, copy=True).mul_(-lr)
            if decoupled:
                inc.add_(p, alpha=-lr * decoupled)
            carried = state.get("kahan_comp")
            if carried is not None:  # folded into the (small) increment before it meets θ
                inc.add_(carried)
            new, err = compensated_add(p, inc)
            p.copy_(new)
            state["kahan_comp"] = err

    def _adapt_damping(
        self,
        loss: Any,
        closure: Callable[[], Any],
        old: dict[int, Tensor],
        params: dict[int, Tensor],
        raw: dict[str, Tensor],
    ) -> None:
        pre = self.preconditioner
        lam = pre.damping_value
        change = 0.0
        for name, g in raw.items():
            layer = pre.layers[name]
            delta_w = _rows(layer.weight_ref, layer.weight_ref.param.detach() - old[id(layer.weight_ref.param)])
            delta_b = None
            if layer.bias is not None and layer.bias_ref is not None:
                delta_b = _rows(layer.bias_ref, layer.bias_ref.param.detach() - old[id(layer.bias_ref.param)])
            delta = layer_matrix(layer, delta_w, delta_b)
            quad = pre.blocks[name].quadratic(delta) + lam * float((delta * delta).sum())
            change += float((g * delta).sum()) + 0.5 * quad
        with pre.suspended(), torch.enable_grad():
            new_loss = closure()
        # a step the quadratic model itself predicts to increase the loss counts as a bad step
        rho = (float(new_loss) - float(loss)) / change if change < 0 else float("-inf")
        pre.damping_value = pre.damping.adapt(lam, rho)  # type: ignore[union-attr]
        pre.counters["last_reduction_ratio"] = rho  # type: ignore[assignment]

    # --- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out[STATE_KEY] = self.preconditioner.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        pre_state = state_dict.pop(STATE_KEY, None)
        if pre_state is None:
            raise ValueError(
                f"this state_dict has no {STATE_KEY!r} entry (curvature state); it was not saved by a "
                "curvkit optimizer."
            )
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(pre_state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_decay_mode", "after")
            group.setdefault("momentum", 0.0)
            group.setdefault("weight_decay", 0.0)
            group.setdefault("kahan_sum", True)


def _rows(ref: Any, t: Tensor) -> Tensor:
    return t if ref.rows is None else t[ref.rows[0] : ref.rows[1]]


def _rms(t: Tensor) -> float:
    return float(t.norm()) / math.sqrt(t.numel())


class KFAC(CurvatureOptimizer):
    """K-FAC / KFC (Martens & Grosse 2015; Grosse & Martens 2016); options:
    :class:`curvkit_kfac.KFACConfig`."""

    method = "kfac"


class EKFAC(CurvatureOptimizer):
    """EKFAC (George et al. 2018); options: :class:`curvkit_kfac.EKFACConfig`."""

    method = "ekfac"


class TKFAC(CurvatureOptimizer):
    """TKFAC (Gao et al. 2021); options: :class:`curvkit_kfac.TKFACConfig`."""

    method = "tkfac"


class TEKFAC(CurvatureOptimizer):
    """TEKFAC (Gao et al. 2020); options: :class:`curvkit_kfac.TEKFACConfig`."""

    method = "tekfac"


class _SINGDFamily(CurvatureOptimizer):
    """The ``singd`` package's step defaults: ``lr`` β₂ = 1e-3, ``momentum`` α₂ = 0.9,
    weight decay γ applied after preconditioning."""

    def __init__(
        self,
        model: nn.Module,
        params: Iterable[Any] | None = None,
        *,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "after",
        **options: Any,
    ) -> None:
        super().__init__(
            model,
            params,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            weight_decay_mode=weight_decay_mode,
            **options,
        )


class SINGD(_SINGDFamily):
    """SINGD (Lin et al. 2024), from the bundled ``singd`` plugin; options:
    :class:`curvkit_singd.SINGDConfig`."""

    method = "singd"


class IKFAC(_SINGDFamily):
    """IKFAC (SINGD with ``kfac_like=True``); options: :class:`curvkit_singd.IKFACConfig`."""

    method = "ikfac"


class INGD(_SINGDFamily):
    """INGD (dense SINGD, Lin et al. 2023); options: :class:`curvkit_singd.INGDConfig`."""

    method = "ingd"


class RSKFAC(CurvatureOptimizer):
    """RS-KFAC (Puiu 2022a), from the bundled ``lowrank`` plugin; options:
    :class:`curvkit_lowrank.RSKFACConfig`."""

    method = "rs-kfac"


class BKFAC(CurvatureOptimizer):
    """B-KFAC (Puiu 2022b), from the bundled ``lowrank`` plugin; options:
    :class:`curvkit_lowrank.BKFACConfig`."""

    method = "b-kfac"


class BRKFAC(CurvatureOptimizer):
    """B-R-KFAC (Puiu 2022b); options: :class:`curvkit_lowrank.BRKFACConfig`."""

    method = "b-r-kfac"


class BKFACC(CurvatureOptimizer):
    """B-KFAC-c (Puiu 2022b); options: :class:`curvkit_lowrank.BKFACCConfig`."""

    method = "b-kfac-c"


class SREKFAC(CurvatureOptimizer):
    """SRE-KFAC (Puiu 2022a); options: :class:`curvkit_lowrank.SREKFACConfig`."""

    method = "sre-kfac"


class SKFAC(CurvatureOptimizer):
    """SKFAC (Tang et al. 2021); options: :class:`curvkit_lowrank.SKFACConfig`."""

    method = "skfac"


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
