#!/usr/bin/env python
r"""Time to compute the K-FAC factors of one batch: curvkit vs. peers vs. a plain-torch floor.

This is a script, not a test. It runs in one process, on one CPU thread, in float32, and
prints one table per case: the median time of each contender, its ratio to the floor of
its case and Fisher type, and the relative error of its factors against curvlinops
(checked once, untimed, so that no wrong answer is ever benchmarked).

Cases (``--quick`` shrinks them for a smoke run):

* ``mlp``: MLP 784-512-512-10 (ReLU), batch 256, ``CrossEntropyLoss``;
* ``cnn``: Conv2d(3→32, k3, padding 1), ReLU, Conv2d(32→64, k3, padding 1), ReLU,
  AvgPool2d(4), Flatten, Linear(4096→10); input 3×32×32, batch 128, ``CrossEntropyLoss``.
  The pooling layer is not in the issue's spec: without it the final Linear has
  64·32·32 = 65,536 inputs and its ``A`` factor alone would be 17 GB;
* ``seq``: Linear(256→256), ReLU, Linear(256→10) applied to every token of a
  ``(32, 128, 256)`` batch, logits transposed to ``(N, C, T)`` for a per-token
  ``CrossEntropyLoss`` (mean over the 4,096 tokens); ``kfac_approx="expand"``.

Fisher types: ``empirical``, ``mc`` (1 sample) and ``type-2``.

Contenders:

* ``floor``: plain torch written for these architectures, no hooks.
  empirical/MC: forward, ``autograd.grad`` of the loss w.r.t. all parameters *and* the layer
  outputs, then the factor GEMMs (``XᵀX`` of the layer inputs — of the ``F.unfold``
  patches for a convolution — and ``gᵀg`` of the output gradients).
  type-2: forward without autograd, then the ``C`` columns of the loss-Hessian square root
  are pushed as one ``(C·N, ...)`` batch through a hand-written backward that forms input
  gradients only (``g @ W``, ReLU masks, ``torch.nn.grad.conv2d_input``, pooling), and the
  factor GEMMs over ``C·N`` rows. ``floor[per-column]`` runs the same code one column at a
  time (large convolution batches turned out slower per row); the floor of a type-2 case,
  which the ratios refer to, is the faster of the two;
* ``curvkit[hooks]``, ``curvkit[backpack]``, ``curvkit[asdl]``: :func:`curvkit.kronecker_factors`
  with that backend (the latter two only when their plugin is installed and claims the
  case, else ``n/a``);
* ``backpack``: BackPACK called directly, ``KFAC(mc_samples=1)`` for MC and ``KFLR`` for
  type-2 (it has no empirical-Fisher KFAC);
* ``asdl``: ASDL called directly (``FisherMaker`` with ``SHAPE_KRON``);
* ``curvlinops``: ``KFACLinearOperator.compute_kronecker_factors`` (built once,
  ``check_deterministic=False``).

Timing: every contender runs once untimed (the correctness check) and once as warm-up;
then ``--repeats`` rounds, each running every contender once in a rotated (round-robin)
order so background load hits all of them alike; the table shows medians.

Usage::

    python benchmarks/factors.py                       # full run
    python benchmarks/factors.py --quick --repeats 2   # smoke run
    python benchmarks/factors.py --cases cnn --fishers type-2 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FISHERS = ("empirical", "mc", "type-2")
CASES = ("mlp", "cnn", "seq")
SEED = 1234
#: relative error (of the Kronecker product G ⊗ A, float32) above which a result is wrong
TOLERANCE = 1e-3


class Transpose(nn.Module):
    """``(N, T, C) -> (N, C, T)``: token logits in the layout ``CrossEntropyLoss`` wants."""

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2)


# ----------------------------------------------------------------------------------------
# cases
# ----------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    description: str
    model: nn.Sequential
    X: Tensor
    y: Tensor
    num_classes: int
    #: loss terms per datum (tokens)
    terms_per_datum: int = 1
    loss_fn: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    pristine: nn.Sequential | None = None

    def __post_init__(self) -> None:
        self.pristine = copy.deepcopy(self.model)

    def fresh_model(self) -> nn.Sequential:
        """A copy of the model with the same weights that no library has touched yet.

        BackPACK and ASDL get their own copies: both leave marks on modules (ASDL's
        ``register_backward_hook`` flags a module as using non-full backward hooks, after
        which BackPACK's full backward hooks are refused)."""
        return copy.deepcopy(self.pristine)


def make_case(name: str, quick: bool) -> Case:
    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    c = 10
    if name == "mlp":
        d_in, width, n = (784, 64, 32) if quick else (784, 512, 256)
        model = nn.Sequential(
            nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, c)
        )
        X = torch.randn(n, d_in, generator=g)
        y = torch.randint(0, c, (n,), generator=g)
        desc = f"MLP {d_in}-{width}-{width}-{c} ReLU, batch {n}, CE"
        return Case(name, desc, model, X, y, c)
    if name == "cnn":
        c1, c2, hw, n = (8, 16, 16, 16) if quick else (32, 64, 32, 128)
        pool = 4
        feat = c2 * (hw // pool) ** 2
        model = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(feat, c),
        )
        X = torch.randn(n, 3, hw, hw, generator=g)
        y = torch.randint(0, c, (n,), generator=g)
        desc = (
            f"Conv(3→{c1},k3,p1)-ReLU-Conv({c1}→{c2},k3,p1)-ReLU-AvgPool({pool})-Linear({feat}→{c}), "
            f"input 3×{hw}×{hw}, batch {n}, CE"
        )
        return Case(name, desc, model, X, y, c)
    if name == "seq":
        n, t, width = (8, 16, 32) if quick else (32, 128, 256)
        model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, c), Transpose())
        X = torch.randn(n, t, width, generator=g)
        y = torch.randint(0, c, (n, t), generator=g)
        desc = f"Linear({width}→{width})-ReLU-Linear({width}→{c}) per token, batch {n}×{t} tokens, per-token CE, expand"
        return Case(name, desc, model, X, y, c, terms_per_datum=t)
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(CASES)}")


def tracked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


# ----------------------------------------------------------------------------------------
# floors (plain torch, these architectures only)
# ----------------------------------------------------------------------------------------


def _input_factor(module: nn.Module, x: Tensor) -> Tensor:
    """``A`` with the bias column: Gram matrix of the rows/patches, divided by their count.

    For a convolution the input is unfolded a few data at a time (``F.unfold``, which
    keeps the patches in cache) and each datum's ``(d, T)`` patch matrix goes through one
    ``addmm_``; this was the fastest plain-torch variant measured here (unfolding the whole
    batch at once and transposing it to ``(N·T, d)`` rows costs two passes over 150 MB)."""
    if isinstance(module, nn.Conv2d):
        d = module.in_channels * math.prod(module.kernel_size)
        a = x.new_zeros(d + 1, d + 1)
        xtx = a[:d, :d]
        col = x.new_zeros(d)
        for start in range(0, x.shape[0], 8):
            cols = F.unfold(x[start : start + 8], module.kernel_size, module.dilation, module.padding, module.stride)
            for u in cols:
                xtx.addmm_(u, u.t())
            col += cols.sum((0, 2))
        count = x.shape[0] * cols.shape[2]
    else:
        f = x.reshape(-1, x.shape[-1])
        d = f.shape[1]
        a = f.new_empty(d + 1, d + 1)
        a[:d, :d].addmm_(f.t(), f, beta=0)
        col = f.sum(0)
        count = f.shape[0]
    a[:d, d] = col
    a[d, :d] = col
    a[d, d] = count
    return a.div_(count)


def _output_gram(module: nn.Module, g: Tensor) -> Tensor:
    """``Σ g gᵀ`` over the rows (and, for a convolution, positions) of an output gradient.

    A convolution's ``(B, C_out, T)`` gradient is contracted per datum with batched GEMMs
    (in chunks), which is faster than transposing it to ``(B·T, C_out)`` rows first."""
    if isinstance(module, nn.Conv2d):
        g = g.flatten(2)
        out = g.new_zeros(g.shape[1], g.shape[1])
        for start in range(0, g.shape[0], 256):
            block = g[start : start + 256]
            out += torch.bmm(block, block.transpose(1, 2)).sum(0)
        return out
    rows = g.reshape(-1, g.shape[-1])
    return rows.t() @ rows


def floor_gradient(
    case: Case, model: nn.Sequential, fisher: str, generator: torch.Generator | None
) -> dict[str, tuple[Tensor, Tensor]]:
    """empirical / MC floor: forward, loss backward (all parameter gradients), factor GEMMs."""
    layers: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    x = case.X
    names = {id(m): n for n, m in model.named_modules()}
    for m in model:
        if isinstance(m, nn.Linear):
            out = F.linear(x, m.weight, m.bias)
            layers.append((names[id(m)], m, x, out))
            x = out
        elif isinstance(m, nn.Conv2d):
            out = F.conv2d(x, m.weight, m.bias, m.stride, m.padding)
            layers.append((names[id(m)], m, x, out))
            x = out
        elif isinstance(m, nn.ReLU):
            x = F.relu(x)
        elif isinstance(m, nn.AvgPool2d):
            x = F.avg_pool2d(x, m.kernel_size)
        elif isinstance(m, nn.Flatten):
            x = x.flatten(1)
        elif isinstance(m, Transpose):
            x = x.transpose(1, 2)
    logits = x
    rows = logits.movedim(1, -1).reshape(-1, case.num_classes)
    targets = case.y.reshape(-1)
    if fisher == "mc":
        with torch.no_grad():
            targets = rows.softmax(1).multinomial(1, generator=generator).squeeze(1)
    loss = F.cross_entropy(rows, targets)
    params = [p for _, m, _, _ in layers for p in (m.weight, m.bias)]
    grads = torch.autograd.grad(loss, params + [out for *_, out in layers])[len(params) :]
    z = rows.shape[0]  # loss terms: g = g_raw / z, G = Σ g_raw g_rawᵀ / z
    result = {}
    for (name, m, inp, _), g in zip(layers, grads):
        result[name] = (_input_factor(m, inp.detach()), _output_gram(m, g).mul_(z))
    return result


def _ce_hessian_sqrt(rows: Tensor) -> Tensor:
    """``(C, rows, C)``: column ``k`` of the symmetric square root of ``diag(p) − ppᵀ``."""
    p = rows.softmax(1)
    root = p.sqrt()
    cols = -root.t().unsqueeze(-1) * p.unsqueeze(0)
    idx = torch.arange(rows.shape[1])
    cols[idx, :, idx] += root.t()
    return cols


@torch.no_grad()
def floor_type2(case: Case, model: nn.Sequential, per_column: bool = False) -> dict[str, tuple[Tensor, Tensor]]:
    """type-2 floor: forward without autograd, then a hand-written input-gradient backward
    of the ``C`` Hessian-square-root columns — as one ``(C·N, ...)`` batch, or (with
    ``per_column``) one ``(N, ...)`` batch per column, accumulating the ``G`` Gram matrices.
    Which is faster depends on the case (large convolution batches run slower per row)."""
    names = {id(m): n for n, m in model.named_modules()}
    tape: list[tuple[nn.Module, Any]] = []  # module, what its backward needs
    x = case.X
    for m in model:
        if isinstance(m, nn.Linear):
            tape.append((m, x))
            x = F.linear(x, m.weight, m.bias)
        elif isinstance(m, nn.Conv2d):
            tape.append((m, x))
            x = F.conv2d(x, m.weight, m.bias, m.stride, m.padding)
        elif isinstance(m, nn.ReLU):
            x = F.relu(x)
            tape.append((m, x > 0))
        elif isinstance(m, nn.AvgPool2d):
            tape.append((m, x.shape[1:]))
            x = F.avg_pool2d(x, m.kernel_size)
        elif isinstance(m, (nn.Flatten, Transpose)):
            tape.append((m, x.shape[1:]))
            x = x.flatten(1) if isinstance(m, nn.Flatten) else x.transpose(1, 2)
    c = case.num_classes
    n = case.X.shape[0]
    rows = x.movedim(1, -1).reshape(-1, c)
    z = rows.shape[0]
    # backpropagated quantity: (C, N, *output shape[1:]) in the model's output layout
    columns = _ce_hessian_sqrt(rows).reshape(c, *x.movedim(1, -1).shape).movedim(-1, 2)
    batches = list(columns) if per_column else [columns.flatten(0, 1)]
    first = model[0]
    g_sums: dict[str, Tensor] = {}
    for g in batches:
        m_count = g.shape[0] // n
        for m, saved in reversed(tape):
            if isinstance(m, Transpose):
                g = g.transpose(1, 2)
            elif isinstance(m, nn.Flatten):
                g = g.reshape(g.shape[0], *saved)
            elif isinstance(m, nn.AvgPool2d):
                b = g.shape[0]
                k = m.kernel_size
                g = (g * (1.0 / (k * k)))[:, :, :, None, :, None].expand(
                    b, saved[0], saved[1] // k, k, saved[2] // k, k
                )
                g = g.reshape(b, *saved)
            elif isinstance(m, nn.ReLU):
                g = g.contiguous()
                g.view(m_count, n, *g.shape[1:]).mul_(saved)
            elif isinstance(m, (nn.Linear, nn.Conv2d)):
                name = names[id(m)]
                gg = _output_gram(m, g)
                if name in g_sums:
                    g_sums[name] += gg
                else:
                    g_sums[name] = gg
                if m is first:
                    continue
                if isinstance(m, nn.Linear):
                    g = g @ m.weight
                else:
                    g = torch.nn.grad.conv2d_input(
                        (g.shape[0], *saved.shape[1:]), m.weight, g, m.stride, m.padding, m.dilation
                    )
    layers = {names[id(m)]: (m, saved) for m, saved in tape if isinstance(m, (nn.Linear, nn.Conv2d))}
    return {name: (_input_factor(*layers[name]), g_sums[name].div_(z)) for name in g_sums}


# ----------------------------------------------------------------------------------------
# contenders
# ----------------------------------------------------------------------------------------


class NotApplicable(Exception):
    """The contender cannot run this case; the message says why."""


@dataclass
class Contender:
    name: str
    #: ``(case, fisher) -> (run, check)``: ``run()`` computes the factors (timed);
    #: ``check()`` runs once more and returns ``(factors, layout)`` for the comparison.
    #: Every contender works on its own copy of the model (``Case.fresh_model``), so no
    #: library's leftovers on modules can affect another.
    setup: Callable[[Case, str], tuple[Callable[[], Any], Callable[[], tuple[dict, str]]]]


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def setup_floor(case: Case, fisher: str):
    model = case.fresh_model()
    if fisher == "type-2":
        run = lambda: floor_type2(case, model)  # noqa: E731
    else:
        run = lambda: floor_gradient(case, model, fisher, _generator() if fisher == "mc" else None)  # noqa: E731
    return run, lambda: (run(), "folded")


def setup_floor_per_column(case: Case, fisher: str):
    if fisher != "type-2":
        raise NotApplicable("type-2 only")
    model = case.fresh_model()
    run = lambda: floor_type2(case, model, per_column=True)  # noqa: E731
    return run, lambda: (run(), "folded")


def _registry():
    import curvkit

    try:
        return curvkit.default_registry()
    except curvkit.CurvkitError as err:  # a plugin under construction failed to load
        print(f"# default_registry() failed ({err}); using the core registry only", file=sys.stderr)
        return curvkit.build_registry(autoload=False)


def make_curvkit_setup(backend: str):
    def setup(case: Case, fisher: str):
        import curvkit
        from curvkit.stats import factor_request

        registry = _registry()
        model = case.fresh_model()
        if backend not in registry.backends:
            raise NotApplicable(f"backend {backend!r} not registered")
        request = factor_request(
            model,
            case.loss_fn,
            case.X,
            case.y,
            fisher=fisher,
            kfac_approx="expand",
            generator=_generator(),
            registry=registry,
        )
        if backend not in registry.backends_supporting(request):
            reasons = registry.backends.get(backend).capabilities.reasons(request, registry)
            raise NotApplicable("; ".join(reasons) or "not claimed")

        def run():
            return curvkit.kronecker_factors(
                model,
                case.loss_fn,
                case.X,
                case.y,
                fisher=fisher,
                kfac_approx="expand",
                backend=backend,
                generator=_generator() if fisher == "mc" else None,
                registry=registry,
            )

        return run, lambda: ({k: (v.A, v.G) for k, v in run().items()}, "folded")

    return setup


def setup_curvlinops(case: Case, fisher: str):
    from curvlinops import KFACLinearOperator

    model = case.fresh_model()
    params = [p for p in model.parameters()]
    op = KFACLinearOperator(
        model,
        case.loss_fn,
        params,
        [(case.X, case.y)],
        fisher_type=fisher,
        mc_samples=1,
        kfac_approx="expand",
        separate_weight_and_bias=False,
        check_deterministic=False,
        seed=SEED,
        num_data=case.X.shape[0],
        num_per_example_loss_terms=case.terms_per_datum,
    )

    def run():
        op._input_covariances, op._gradient_covariances = {}, {}  # it accumulates otherwise
        op.compute_kronecker_factors()
        return op

    def check():
        run()
        return {k: (op._input_covariances[k], op._gradient_covariances[k]) for k in op._input_covariances}, "folded"

    return run, check


def setup_backpack(case: Case, fisher: str):
    if fisher == "empirical":
        raise NotApplicable("BackPACK has no empirical-Fisher KFAC")
    if case.terms_per_datum != 1:
        raise NotApplicable("BackPACK's KFAC/KFLR support 2-D Linear inputs only")
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = extend(case.fresh_model())
        loss_fn = extend(nn.CrossEntropyLoss())
    make_ext = (lambda: KFAC(mc_samples=1)) if fisher == "mc" else KFLR

    def run():
        torch.manual_seed(SEED)
        loss = loss_fn(model(case.X), case.y)
        with backpack(make_ext()), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "full backward hook is firing ..." (input needs no grad)
            loss.backward()
        return model

    def check():
        run()
        out = {}
        for name, m in tracked_layers(model):
            key = "kfac" if fisher == "mc" else "kflr"
            g, a = getattr(m.weight, key)
            out[name] = (a, g)
        return out, "weight-only"

    return run, check


def setup_asdl(case: Case, fisher: str):
    from asdl import FISHER_EMP, FISHER_EXACT, FISHER_MC, LOSS_CROSS_ENTROPY, SHAPE_KRON, FisherConfig, get_fisher_maker

    ftype = {"empirical": FISHER_EMP, "mc": FISHER_MC, "type-2": FISHER_EXACT}[fisher]
    n_terms = case.y.numel()
    # ASDL divides by data_size; with a summed loss this gives curvlinops' 1/(N·T) scale.
    config = FisherConfig(
        fisher_type=ftype,
        fisher_shapes=[SHAPE_KRON],
        loss_type=LOSS_CROSS_ENTROPY,
        n_mc_samples=1,
        data_size=n_terms,
    )
    model = case.fresh_model()
    # ASDL wants (rows, C) logits: for the seq model, (N, T, C) logits flattened to (N·T, C)
    net = nn.Sequential(*model[:-1], nn.Flatten(0, 1)) if isinstance(model[-1], Transpose) else model
    maker = get_fisher_maker(net, config)
    c = case.num_classes

    def loss_fn(logits, y, reduction="sum"):  # ASDL insists on a ``reduction`` argument
        return F.cross_entropy(logits.reshape(-1, c), y.reshape(-1), reduction=reduction)

    dummy = maker.setup_model_call(net, case.X)
    maker.setup_loss_call(loss_fn, dummy, case.y)

    def run():
        torch.manual_seed(SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            maker.forward_and_backward()
        return maker

    def check():
        run()
        out = {}
        for name, m in tracked_layers(model):
            out[name] = (m.fisher.kron.A, m.fisher.kron.B)  # A without the bias
        return out, "weight-only"

    return run, check


CONTENDERS = [
    Contender("floor", setup_floor),
    Contender("floor[per-column]", setup_floor_per_column),
    Contender("curvkit[hooks]", make_curvkit_setup("hooks")),
    Contender("curvkit[backpack]", make_curvkit_setup("backpack")),
    Contender("curvkit[asdl]", make_curvkit_setup("asdl")),
    Contender("backpack", setup_backpack),
    Contender("asdl", setup_asdl),
    Contender("curvlinops", setup_curvlinops),
]


# ----------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------


def _kron_error(mine: tuple[Tensor, Tensor], ref: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """Relative Frobenius error of ``G ⊗ A`` (invariant to how the scale is split between
    the factors), and the best scalar ``s`` with ``s · mine ≈ ref``."""
    a1, g1 = (t.double() for t in mine)
    a2, g2 = (t.double() for t in ref)
    p11 = (a1 * a1).sum() * (g1 * g1).sum()
    p22 = (a2 * a2).sum() * (g2 * g2).sum()
    p12 = (a1 * a2).sum() * (g1 * g2).sum()
    err = math.sqrt(max(float(p11 + p22 - 2 * p12), 0.0) / float(p22))
    return err, float(p12 / p11)


def compare(factors: dict, layout: str, ref: dict) -> tuple[float, float]:
    """Worst relative error over layers, and the common scale factor (1 if none)."""
    if set(factors) != set(ref):
        raise AssertionError(f"layers differ: {sorted(factors)} vs {sorted(ref)}")
    worst, scales = 0.0, []
    for name, (a_ref, g_ref) in ref.items():
        a, g = factors[name]
        if layout == "weight-only" and a.shape != a_ref.shape:
            a_ref = a_ref[:-1, :-1]
        if a.shape != a_ref.shape or g.shape != g_ref.shape:
            raise AssertionError(
                f"{name}: shapes {tuple(a.shape)}, {tuple(g.shape)} vs {tuple(a_ref.shape)}, {tuple(g_ref.shape)}"
            )
        err, scale = _kron_error((a, g), (a_ref, g_ref))
        worst = max(worst, err)
        scales.append(scale)
    return worst, statistics.median(scales)


def _a_error(factors: dict, layout: str, ref: dict) -> float:
    """Worst relative max-norm error of ``A`` alone (it does not depend on MC draws)."""
    worst = 0.0
    for name, (a_ref, _) in ref.items():
        a = factors[name][0]
        if layout == "weight-only" and a.shape != a_ref.shape:
            a_ref = a_ref[:-1, :-1]
        worst = max(worst, float((a.double() - a_ref.double()).abs().max() / a_ref.double().abs().max()))
    return worst


def describe_check(contender: str, case: Case, fisher: str, err: float, scale: float, a_err: float) -> tuple[str, bool]:
    """Text for the error column, and whether the result counts as correct.

    Known differences that are not errors: BackPACK's convolution factors (``A`` summed
    over positions, ``G`` from position-summed gradients: its own convention), MC targets
    drawn from another random stream (then only ``A`` can be compared), and conventions
    that differ by a scalar (ASDL's MC ``1/mc_samples``)."""
    if err < TOLERANCE:
        return f"{err:.1e}", True
    if contender == "backpack" and case.name == "cnn":
        return f"other conv convention ({err:.0e})", True
    if fisher == "mc" and contender not in ("floor", "curvlinops") and a_err < TOLERANCE:
        return f"A {a_err:.0e}; G: own MC draws", True
    if abs(scale - 1) > 1e-3:
        return f"scale ×{scale:.3g} (convention)", True
    return f"WRONG {err:.1e}", False


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------


def _time(fn: Callable[[], Any]) -> float:
    gc.collect()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def run_case(case: Case, fisher: str, contenders: list[Contender], repeats: int) -> list[dict]:
    ref, _ = setup_curvlinops(case, fisher)[1]()
    ref = {k: (a.clone(), g.clone()) for k, (a, g) in ref.items()}
    rows: list[dict] = []
    runners: list[tuple[dict, Callable[[], Any]]] = []
    for contender in contenders:
        row: dict[str, Any] = {"case": case.name, "fisher": fisher, "contender": contender.name}
        rows.append(row)
        try:
            run, check = contender.setup(case, fisher)
            factors, layout = check()
            err, scale = compare(factors, layout, ref)
            a_err = _a_error(factors, layout, ref)
        except NotApplicable as err:
            row.update(status="n/a", note=str(err))
            continue
        except Exception as err:  # noqa: BLE001 - a peer failing is a result, not a crash
            row.update(status="error", note=f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        text, ok = describe_check(contender.name, case, fisher, err, scale, a_err)
        row.update(status="ok" if ok else "wrong", rel_err=err, scale=scale, check=text)
        del factors
        if ok:
            run()  # warm-up
            runners.append((row, run))
    times: dict[int, list[float]] = {id(r): [] for r, _ in runners}
    for rep in range(repeats):
        k = rep % max(len(runners), 1)
        for row, run in runners[k:] + runners[:k]:  # round-robin start
            times[id(row)].append(_time(run))
    floor = None
    for row, _ in runners:
        row["times"] = times[id(row)]
        row["median_s"] = statistics.median(times[id(row)]) if times[id(row)] else float("nan")
        if row["contender"].startswith("floor"):  # the floor is the faster floor variant
            floor = row["median_s"] if floor is None else min(floor, row["median_s"])
    for row in rows:
        if "median_s" in row and floor:
            row["ratio"] = row["median_s"] / floor
    return rows


def print_table(case: Case, fisher: str, rows: list[dict]) -> None:
    print(f"\n## {case.name} / {fisher}: {case.description}")
    print(f"{'contender':<20} {'median [ms]':>12} {'× floor':>8}  {'check vs curvlinops':<28}")
    for row in rows:
        if "median_s" in row:
            print(
                f"{row['contender']:<20} {row['median_s'] * 1e3:>12.1f} {row.get('ratio', float('nan')):>8.2f}  "
                f"{row['check']:<28}"
            )
        else:
            print(f"{row['contender']:<20} {row['status']:>12} {'':>8}  {row.get('check', row.get('note', '')):<28}")
    sys.stdout.flush()


def print_summary(all_rows: list[dict], contenders: list[str]) -> None:
    keys = sorted({(r["case"], r["fisher"]) for r in all_rows}, key=lambda k: (CASES.index(k[0]), FISHERS.index(k[1])))
    print("\n## Ratio to the floor (median time / floor median time)")
    header = f"{'case / fisher':<18}" + "".join(f"{c:>19}" for c in contenders)
    print(header)
    for case, fisher in keys:
        line = f"{case + ' / ' + fisher:<18}"
        for c in contenders:
            row = next(
                (r for r in all_rows if r["case"] == case and r["fisher"] == fisher and r["contender"] == c), None
            )
            if row is None:
                cell = "-"
            elif "ratio" in row:
                cell = f"{row['ratio']:.2f}"
            elif "median_s" in row:
                cell = f"{row['median_s'] * 1e3:.0f} ms"
            else:
                cell = row["status"]
            line += f"{cell:>19}"
        print(line)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("torch", "curvkit", "backpack-for-pytorch", "asdfghjkl", "curvlinops-for-pytorch"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case (median is reported)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--fishers", default=",".join(FISHERS), help=f"comma-separated subset of {','.join(FISHERS)}")
    parser.add_argument("--contenders", default=None, help="comma-separated subset of contender names")
    parser.add_argument("--json", metavar="PATH", help="also write all timings to PATH")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*register_backward_hook.*")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    fishers = [f.strip() for f in args.fishers.split(",") if f.strip()]
    for f in fishers:
        if f not in FISHERS:
            parser.error(f"unknown fisher {f!r}; choose from {', '.join(FISHERS)}")
    contenders = CONTENDERS
    if args.contenders:
        wanted = [c.strip() for c in args.contenders.split(",")]
        contenders = [c for c in CONTENDERS if c.name in wanted or c.name.startswith("floor")]

    info = machine()
    print(f"# {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}, float32")
    print(f"# versions: {info['versions']}; {info['date']}; repeats={args.repeats}{' (quick)' if args.quick else ''}")
    all_rows: list[dict] = []
    wrong = False
    for name in cases:
        case = make_case(name, args.quick)
        for fisher in fishers:
            rows = run_case(case, fisher, contenders, args.repeats)
            print_table(case, fisher, rows)
            all_rows.extend(rows)
            wrong |= any(r["status"] == "wrong" for r in rows)
    print_summary(all_rows, [c.name for c in contenders if not c.name.startswith("floor")])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "args": vars(args), "results": all_rows}, fh, indent=1)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
