r"""Adaptive optimisation by the quadratic model (Martens & Grosse 2015, sections 6.5 and 7).

Both adaptations read the model
:math:`M(\delta) = \nabla^\top\delta + \tfrac12\delta^\top(C + \lambda I)\delta` of the
loss's change, with ``C`` each block's curvature
(:meth:`~curvkit.blocks.CurvatureBlock.quadratic`, :meth:`~curvkit.blocks.CurvatureBlock.gram`).

**Levenberg–Marquardt damping** (:func:`adapt_damping`): after a step :math:`\delta`, the
reduction ratio :math:`\rho = (L(\theta + \delta) - L(\theta)) / M(\delta)` compares the
loss's change with the model's; :class:`~curvkit.linalg.damping.LevenbergMarquardtDamping`
turns it into the next λ.

**Adaptive step size and momentum** (:func:`adaptive_update`, the optimizer's
``adaptive_step=``; kfac-jax's "adaptive learning rate and momentum"): the step is
:math:`\delta = \alpha\Delta + \mu\delta_{\text{prev}}` with :math:`\Delta` the
preconditioned direction and :math:`\delta_{\text{prev}}` the previous step, and
:math:`(\alpha, \mu)` minimise :math:`M` in that plane — a 2×2 linear system
(:func:`solve_coefficients`); ``"lr"`` solves for α alone with μ the group's momentum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvkit.linalg.damping import ConstantDamping, RelativeDamping
from curvkit.optim.layers import layer_matrix
from curvkit.optim.update import apply_updates

if TYPE_CHECKING:
    from curvkit.optim.optimizer import CurvatureOptimizer
    from curvkit.optim.preconditioner import Preconditioner

__all__ = [
    "ADAPTIVE_KL_CLIP",
    "ADAPTIVE_STEPS",
    "adapt_damping",
    "adaptive_update",
    "describe_adaptive",
    "model_shift",
    "rows_of",
    "solve_coefficients",
]

#: Values of the optimizer's ``adaptive_step`` option (``None``: off).
ADAPTIVE_STEPS = ("lr", "lr-momentum")
#: The previous step :math:`\delta_{\text{prev}}`, in ``optimizer.state[p]``.
PREVIOUS = "previous_update"


def adapt_damping(
    pre: Preconditioner,
    loss: Any,
    closure: Callable[[], Any],
    old: dict[int, Tensor],
    params: dict[int, Tensor],
    raw: dict[str, Tensor],
) -> None:
    """Measure the step just taken and set ``pre.damping_value`` to the next λ.

    Args:
        pre: The preconditioner (its blocks give the quadratic model).
        loss: The loss before the step (the closure's value).
        closure: Re-evaluates the loss after the step (run with capture suspended).
        old: ``{id(parameter): its value before the step}``.
        params: ``{id(parameter): parameter}`` of the step.
        raw: ``{layer: the raw gradient in matrix form}`` (before preconditioning).
    """
    del params
    lam = pre.damping_value
    change = 0.0
    for name, g in raw.items():
        layer = pre.layers[name]
        delta_w = rows_of(layer.weight_ref, layer.weight_ref.param.detach() - old[id(layer.weight_ref.param)])
        delta_b = None
        if layer.bias is not None and layer.bias_ref is not None:
            delta_b = rows_of(layer.bias_ref, layer.bias_ref.param.detach() - old[id(layer.bias_ref.param)])
        delta = layer_matrix(layer, delta_w, delta_b)
        quad = pre.blocks[name].quadratic(delta) + lam * float((delta * delta).sum())
        change += float((g * delta).sum()) + 0.5 * quad
    with pre.suspended(), torch.enable_grad():
        new_loss = closure()
    # a step the quadratic model itself predicts to increase the loss counts as a bad step
    rho = (float(new_loss) - float(loss)) / change if change < 0 else float("-inf")
    pre.damping_value = pre.damping.adapt(lam, rho)  # type: ignore[union-attr]
    pre.counters["last_reduction_ratio"] = rho  # type: ignore[assignment]


def rows_of(ref: Any, t: Tensor) -> Tensor:
    """The rows of ``t`` a :class:`~curvkit.stats.plan.ParamRef` covers."""
    return t if ref.rows is None else t[ref.rows[0] : ref.rows[1]]


# --- adaptive step size and momentum ---------------------------------------------------------


def model_shift(damping: Any, lam: float, trace: Callable[[], float] | None = None) -> float:
    """The shift :math:`\\lambda_M` of the quadratic model's :math:`C + \\lambda_M I` for a
    layer, from the method's damping strategy and its current λ: λ itself for π, exact,
    Levenberg–Marquardt and the methods' own scalar dampings (each shifts ``G ⊗ A`` by about
    λ); :math:`a g \\lambda^2` for :class:`~curvkit.linalg.damping.ConstantDamping`;
    :math:`\\lambda\\operatorname{tr} C_l` for
    :class:`~curvkit.linalg.damping.RelativeDamping` (``trace``: the layer's
    :math:`\\operatorname{tr} C_l`; at least the shift
    :math:`\\lambda\\lambda_{\\max}(C_l)` of ``on="product"``, so the model errs on the
    cautious side; an approximation for ``on="factors"``); 0 without damping."""
    if damping is None:
        return 0.0
    if isinstance(damping, ConstantDamping):
        return float(damping.a) * float(damping.g) * float(lam) ** 2
    if isinstance(damping, RelativeDamping):
        return float(lam) * (trace() if trace is not None else 1.0)
    return float(lam)


def solve_coefficients(
    curvature: Tensor, gradient: Tensor, momentum: float | None = None
) -> tuple[float, float, float]:
    r"""The minimiser :math:`(\alpha, \mu)` of
    :math:`M(\alpha, \mu) = b^\top c + \tfrac12 c^\top K c`, :math:`c = (\alpha, \mu)`.

    Args:
        curvature: :math:`K`, ``(1, 1)`` (no previous step) or ``(2, 2)``: the damped
            curvature's Gram matrix of :math:`(\Delta, \delta_{\text{prev}})`.
        gradient: :math:`b = (\nabla^\top\Delta, \nabla^\top\delta_{\text{prev}})`.
        momentum: A fixed μ (then only α is solved for:
            :math:`\alpha = -(b_0 + \mu K_{01}) / K_{00}`); ``None``: both.

    Returns:
        ``(α, μ, M(α, μ))`` as floats (μ = 0 without a previous step). Where the 2×2 system
        is singular (:math:`\delta_{\text{prev}}` parallel to :math:`\Delta`), the 1-D
        minimiser along :math:`\Delta` (μ = 0). Not checked: the caller refuses a
        non-finite or non-negative :math:`M`.
    """
    K = curvature.double().tolist()
    b = gradient.double().tolist()
    k = len(b)
    if not K[0][0] > 0:  # a zero direction (or a broken curvature): no model
        return math.nan, math.nan, math.nan
    cross = 0.5 * (K[0][1] + K[1][0]) if k == 2 else 0.0
    if k == 1:
        alpha, mu = -b[0] / K[0][0], 0.0
    elif momentum is not None:
        mu = float(momentum)
        alpha = -(b[0] + mu * cross) / K[0][0]
    else:
        det = K[0][0] * K[1][1] - cross * cross
        if det > 1e-12 * abs(K[0][0] * K[1][1]) and math.isfinite(det):  # Cramer's rule
            alpha = (-b[0] * K[1][1] + b[1] * cross) / det
            mu = (-b[1] * K[0][0] + b[0] * cross) / det
        else:
            alpha, mu = -b[0] / K[0][0], 0.0
    if k == 1:
        m = b[0] * alpha + 0.5 * K[0][0] * alpha * alpha
    else:
        m = b[0] * alpha + b[1] * mu + 0.5 * (K[0][0] * alpha * alpha + 2 * cross * alpha * mu + K[1][1] * mu * mu)
    return alpha, mu, m


def _euclid(vectors: list[Tensor]) -> Tensor:
    """The ``(k, k)`` float64 Gram matrix of plain inner products."""
    x = torch.stack([v.reshape(-1) for v in vectors])
    return (x @ x.t()).double().cpu()


def _flat_gram(vectors: list[dict[int, Tensor]], ids: list[int]) -> Tensor:
    """The plain Gram matrix of per-parameter ``vectors`` over the parameters ``ids``
    (each vector flattened into one, one product)."""
    return _euclid([torch.cat([v[i].reshape(-1) for i in ids]) for v in vectors])


def _trace(block: Any) -> float:
    return float(block.as_operator().trace())


def _model_grams(pre: Preconditioner, vectors: list[dict[int, Tensor]], ids: list[int]) -> tuple[Tensor, Tensor | None]:
    """``(curvature Gram, damping-shift Gram)`` of the per-parameter ``vectors``: each
    tracked layer's block :meth:`~curvkit.blocks.CurvatureBlock.gram`; a layer without
    statistics yet and the parameters without a block count with the identity as their
    curvature (as the KL clip counts them). The shift Gram is ``None`` when every layer has
    the same :func:`model_shift` (it is then that shift times the plain Gram of all
    parameters, which the caller forms anyway); relative damping shifts each layer by its
    own."""
    k = len(vectors)
    curv = torch.zeros(k, k, dtype=torch.float64, device="cpu")
    damping, lam = pre.damping, pre.damping_value
    relative = isinstance(damping, RelativeDamping)
    shift = torch.zeros(k, k, dtype=torch.float64, device="cpu") if relative else None
    covered: set[int] = set()
    identity: list[int] = []
    first = vectors[0]
    for name, layer in pre.layers.items():
        w_ref = layer.weight_ref
        wid = id(w_ref.param)
        if wid not in first:
            continue
        b_ref = layer.bias_ref if layer.has_bias else None
        own = [wid] if b_ref is None else [wid, id(b_ref.param)]
        covered.update(own)
        block = pre.blocks[name]
        if block.num_updates == 0:  # no statistics yet: a first-order layer
            identity += [i for i in own if i not in identity]
            continue
        mats = [
            layer_matrix(layer, rows_of(w_ref, v[wid]), None if b_ref is None else rows_of(b_ref, v[id(b_ref.param)]))
            for v in vectors
        ]
        curv += block.gram(mats)
        if shift is not None:
            shift += model_shift(damping, lam, functools.partial(_trace, block)) * _euclid(mats)
    identity += [i for i in ids if i not in covered]
    if identity:
        plain = _flat_gram(vectors, identity)
        curv += plain
        if shift is not None:
            shift += float(lam) * plain
    return curv, shift


#: The bound κ of the adaptive step's curvature norm :math:`\delta^\top C\delta` when the
#: optimizer has no ``kl_clip`` (its methods' recommended trust region is a per-layer clip of
#: the direction, which the solved step length would undo).
ADAPTIVE_KL_CLIP = 0.01


def adaptive_update(
    opt: CurvatureOptimizer,
    params: dict[int, Tensor],
    direction: dict[int, Tensor],
    groups: dict[int, dict[str, Any]],
    scales: dict[int, float] | None = None,
) -> bool:
    r"""The optimizer's step with ``adaptive_step`` set, written to the parameters.

    The direction :math:`\Delta` (preconditioned, per-layer clips applied, plus
    :math:`\gamma\theta` in ``weight_decay_mode="after"``) and the previous step
    :math:`\delta_{\text{prev}}` span the plane; the model uses the loss's gradient
    :math:`\nabla` (plus :math:`\gamma\theta` in the modes ``"before"`` and ``"after"``, whose
    curvature then holds :math:`\gamma I` too) and :math:`C + \lambda_M I`
    (:func:`model_shift`). ``"lr-momentum"``: α and μ solved; ``"lr"``: α, with μ each
    group's momentum. A non-finite or non-descent model (:math:`M \ge 0`) takes the plain
    step :math:`\delta = -\eta\Delta + \mu\delta_{\text{prev}}` (the group's ``lr`` and
    ``momentum``), counted ``adaptive_fallbacks``. The KL clip κ then bounds the step's
    curvature norm, :math:`\delta \leftarrow \min(1, \sqrt{\kappa / \delta^\top C\delta})\,\delta`
    — always: without a ``kl_clip``, κ = :data:`ADAPTIVE_KL_CLIP` (the model's α is
    :math:`\approx 1` for a method whose preconditioner inverts the model's curvature, a
    step far longer than its fixed learning rate's; RS-KFAC without a bound diverged).
    ``weight_decay_mode="decoupled"`` shrinks :math:`\theta \leftarrow (1 - \eta\gamma)\theta`
    outside the model. The update is guarded as the plain one
    (:func:`~curvkit.optim.update.apply_updates`); :math:`\delta` is kept in
    ``state[p]["previous_update"]``.

    Args:
        opt: The optimizer.
        params, direction, groups: ``{id: parameter}``, ``{id: its direction}``,
            ``{id: its group}`` of the step.
        scales: ``{id: factor}`` (default 1) of the per-layer clips, applied to the
            directions first.

    Returns:
        ``False`` (nothing written) if the update would not be finite.
    """
    pre = opt.preconditioner
    state = opt.state
    ids = list(direction)
    fixed_mu = opt.adaptive_step == "lr"
    d_vec: dict[int, Tensor] = {}
    g_vec: dict[int, Tensor] = {}
    prev: dict[int, Tensor] = {}
    decays: dict[float, list[int]] = {}
    have_prev = False
    for i in ids:
        p = params[i]
        group = groups[i]
        wd, mode = group["weight_decay"], group["weight_decay_mode"]
        d = direction[i]
        if scales and scales.get(i, 1.0) != 1.0:
            d = d * scales[i]
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if wd != 0 and mode != "decoupled":
            g = g.add(p.detach(), alpha=wd)
            decays.setdefault(float(wd), []).append(i)
            if mode == "after":
                d = d.add(p.detach(), alpha=wd)
        d_vec[i], g_vec[i] = d, g
        st = state.get(p)
        old = None if st is None else st.get(PREVIOUS)
        if old is not None:
            have_prev = True
            prev[i] = old
    if have_prev:
        for i in ids:
            v = prev.get(i)
            if v is None:
                v = torch.zeros_like(d_vec[i])
            prev[i] = v * groups[i]["momentum"] if fixed_mu else v
        if fixed_mu and all(groups[i]["momentum"] == 0 for i in ids):
            have_prev = False
    vectors = [d_vec, prev] if have_prev else [d_vec]
    k = len(vectors)
    # one product for the plain Gram of (Δ, δ_prev) and their inner products with ∇
    plain_and_grad = _flat_gram([*vectors, g_vec], ids)
    plain, b = plain_and_grad[:k, :k], plain_and_grad[k, :k]
    curv, shift = _model_grams(pre, vectors, ids)
    damped = curv + (model_shift(pre.damping, pre.damping_value) * plain if shift is None else shift)
    for wd, members in decays.items():
        damped += wd * (plain if len(members) == len(ids) else _flat_gram(vectors, members))
    alpha, mu, m = solve_coefficients(damped, b, 1.0 if fixed_mu else None)
    adaptive = math.isfinite(alpha) and math.isfinite(mu) and math.isfinite(m) and m < 0
    ps = [params[i] for i in ids]
    steps: list[Tensor]
    if adaptive:
        coef = [alpha, mu][:k]
        c = curv.tolist()
        norm = sum(coef[r] * c[r][s] * coef[s] for r in range(k) for s in range(k))
        ds = [d_vec[i] for i in ids]
        steps = list(torch._foreach_mul(ds, alpha))
        if have_prev:
            torch._foreach_add_(steps, [prev[i] for i in ids], alpha=mu)
    else:
        steps = []
        for i, p in zip(ids, ps):
            group = groups[i]
            s = d_vec[i] * (-group["lr"])
            v = state.get(p, {}).get(PREVIOUS)
            if v is not None and group["momentum"] != 0:
                s = s.add(v, alpha=group["momentum"])
            steps.append(s)
        norm = float(_model_grams(pre, [dict(zip(ids, steps))], ids)[0][0, 0])
    kappa = opt.kl_clip if opt.kl_clip is not None else ADAPTIVE_KL_CLIP
    nu = 1.0
    if math.isfinite(norm) and norm > kappa:
        nu = math.sqrt(kappa / norm)
        torch._foreach_mul_(steps, nu)
    # the step is added as it is: lr = -1 (θ ← θ - lr·δ), and the decoupled decay's
    # (1 - lr·wd) = (1 - ηγ) with wd = -ηγ
    shadows: dict[int, dict[str, Any]] = {}
    step_groups: dict[int, dict[str, Any]] = {}
    for i in ids:
        group = groups[i]
        shadow = shadows.get(id(group))
        if shadow is None:
            decoupled = group["weight_decay_mode"] == "decoupled" and group["weight_decay"] != 0
            shadow = shadows[id(group)] = {
                "lr": -1.0,
                "momentum": 0.0,
                "weight_decay": -group["lr"] * group["weight_decay"] if decoupled else 0.0,
                "weight_decay_mode": "decoupled" if decoupled else "after",
                "kahan_sum": group.get("kahan_sum", True),
            }
        step_groups[i] = shadow
    if not apply_updates(state, params, dict(zip(ids, steps)), step_groups):
        return False
    for p, s in zip(ps, steps):
        state[p][PREVIOUS] = s  # formed out of place above: no other reference
    counters = pre.counters
    counters["adaptive_steps"] = counters.get("adaptive_steps", 0) + 1
    if not adaptive:
        counters["adaptive_fallbacks"] = counters.get("adaptive_fallbacks", 0) + 1
    counters["last_adaptive_lr"] = -alpha if adaptive else math.nan
    shown_mu = groups[ids[0]]["momentum"] if fixed_mu else mu  # "lr": μ is the group's
    counters["last_adaptive_momentum"] = shown_mu if adaptive else math.nan
    counters["last_adaptive_clip"] = nu
    return True


def describe_adaptive(mode: str | None, counters: dict[str, Any]) -> str:
    """The adaptive step in one line for the optimizer's summary (``""`` when off)."""
    if mode is None:
        return ""
    taken, fallbacks = counters.get("adaptive_steps", 0), counters.get("adaptive_fallbacks", 0)
    last = ""
    if taken:
        last = (
            f"; last step: -α={counters.get('last_adaptive_lr', math.nan):.3g}, "
            f"μ={counters.get('last_adaptive_momentum', math.nan):.3g}, "
            f"clip {counters.get('last_adaptive_clip', 1.0):.3g}"
        )
    what = "step size and momentum" if mode == "lr-momentum" else "step size (fixed momentum)"
    return (
        f"adaptive {what} from the quadratic model ({mode!r}): {taken} steps, {fallbacks} fell back to the "
        f"fixed lr (non-finite or non-descent model){last}"
    )
