"""Dense float64 references for normalisation layers (unit-wise blocks).

The Jacobian of the whole batch's output w.r.t. a layer's ``γ`` (and ``β``) comes from
autograd (``torch.autograd.functional.jacobian``, so a train-mode BatchNorm's batch
statistics are differentiated through), the loss Hessian from ``torch.func.hessian``,
per-datum loss gradients from ``torch.func.grad``, and MC targets are drawn with torch's
``multinomial`` from an identically seeded generator (the order curvkit's loss adapter and
curvlinops draw them in). Cross-entropy only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.func import functional_call, grad, hessian

DT = torch.float64


def layer_params(model: nn.Module, name: str) -> list[str]:
    module = model.get_submodule(name)
    return [f"{name}.{p}" for p in ("weight", "bias") if getattr(module, p, None) is not None]


def jacobian(model: nn.Module, X: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``(N, C, P)``: d output / d [γ, β] of the whole batch (autograd; BatchNorm's batch
    statistics are part of the function), parameters flattened and concatenated."""
    model = copy.deepcopy(model)  # a train-mode BatchNorm updates its running statistics
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(*sub):
        return functional_call(model, {**params, **dict(zip(names, sub))}, (X,))

    jac = torch.autograd.functional.jacobian(f, tuple(params[n] for n in names))
    n, c = f(*[params[k] for k in names]).shape
    return torch.cat([j.reshape(n, c, -1) for j in jac], dim=2)


def dense_fisher(model, name, X, y, loss_fn, fisher, *, seed=0, mc_samples=1):
    """The dense Fisher / GGN of ``loss_fn`` over the layer's ``[γ(.flatten()), β]``."""
    names = layer_params(model, name)
    J = jacobian(model, X, names)  # (N, C, P)
    with torch.no_grad():
        out = copy.deepcopy(model)(X)
    n, c = out.shape
    z = n if loss_fn.reduction == "mean" else 1

    def term(f, t):  # one datum's loss term, summed
        return nn.functional.cross_entropy(f.unsqueeze(0), t.unsqueeze(0), reduction="sum")

    total = torch.zeros(J.shape[2], J.shape[2], dtype=DT)
    if fisher == "type-2":
        for i in range(n):
            H = hessian(term)(out[i], y[i])
            total += J[i].t() @ H @ J[i]
    elif fisher == "empirical":
        for i in range(n):
            g = J[i].t() @ grad(term)(out[i], y[i])
            total += torch.outer(g, g)
    else:  # MC: targets drawn as the loss adapter draws them, from an identically seeded generator
        gen = torch.Generator().manual_seed(seed)
        probs = out.softmax(1)
        for _ in range(mc_samples):
            sampled = probs.multinomial(num_samples=1, generator=gen).squeeze(-1)
            for i in range(n):
                g = J[i].t() @ grad(term)(out[i], sampled[i])
                total += torch.outer(g, g) / mc_samples
    return total / z


def unit_blocks(dense: torch.Tensor, k: int) -> torch.Tensor:
    """``(D, k, k)``: the per-unit blocks of a dense matrix over ``[γ (D), β (D)]``."""
    d = dense.shape[0] // k
    idx = torch.arange(d).unsqueeze(1) + d * torch.arange(k).unsqueeze(0)  # (D, k): unit i's γ_i, β_i
    return dense[idx.unsqueeze(2), idx.unsqueeze(1)]
