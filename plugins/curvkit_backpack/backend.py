r"""The ``backpack`` statistics backend: Kronecker factors from BackPACK's KFAC/KFLR.

What BackPACK (1.7.x) returns, measured against curvlinops (float64, agreement ~1e-16):

* ``Linear`` weight: ``p.kflr == [G, A₀]`` (``kfac`` likewise) with
  ``G = Σ_{v,n} s_{v,n} s_{v,n}ᵀ`` (``s`` the backpropagated loss-Hessian square root,
  already carrying the ``1/√Z`` of a ``mean`` loss) and ``A₀ = (1/N) Σ_n x_n x_nᵀ`` —
  exactly curvlinops' ``G`` and the weight block of its ``A``. The bias gets ``[G]``
  alone, so the bias row/column of curvkit's ``A`` (the input mean, and ``1``) is
  completed from the layer input BackPACK records (``module.input0``).
* ``Conv1d/2d/3d``: ``[G, Ω]`` with ``G = Σ_{v,n} ĝ ĝᵀ``, ``ĝ = Σ_t g_t`` summed over the
  output positions — exactly curvkit's/curvlinops' **reduce** ``G`` (neither ``expand``'s
  ``G`` nor a rescaling of it) — and ``Ω = (1/N) Σ_{n,t} a_{n,t} a_{n,t}ᵀ = T · A_expand``.
  No ``G`` of ``expand`` can be recovered, so convolutions are served for
  ``kfac_approx="reduce"`` only; ``A`` of reduce (patches averaged per datum before the
  outer product) is formed from the recorded layer input, as BackPACK's ``Ω`` is not it.
* MC (``KFAC``): gradients at sampled targets, divided by ``√mc_samples`` and ``√Z`` —
  the same estimator as curvlinops' MC Fisher (unbiased for type-2), but drawn from
  torch's *global* RNG in BackPACK's own order; the backend seeds it from a number drawn
  from ``request.generator`` inside :func:`torch.random.fork_rng`, so results are
  reproducible from the generator, never equal to curvlinops' draws, and the caller's
  global RNG state is left untouched (dropout masks of that forward pass come from the
  same seeded RNG).

Side effects and clean-up: ``backpack.extend`` installs forward/backward hooks on every
module and sets a ``_backpack_extend`` flag. The backend extends the model and the loss
for the duration of one call, then removes exactly the hook handles that call added
(also from BackPACK's global handle list), clears the flags it set, the recorded
``input0``/``output`` attributes and the ``kfac``/``kflr`` attributes on parameters
(restoring any the caller had), and restores every parameter's ``.grad``. A model the
user extended beforehand keeps its own hooks. BackPACK's context is process-global, so
calls must not run concurrently in several threads.

BackPACK only follows a *chain* of supported modules: every module input that needs a
backpropagated quantity must be the previous module's output. The capability check
therefore runs one extra gradient-free forward pass (under a forked RNG; the real pass
repeats the check) and refuses a model whose leaf modules do not form such a chain,
Linear layers on inputs with more than two dimensions, and outputs with extra (e.g.
sequence) dimensions, naming the reason. Also refused: in-place modules, grouped or
non-zero-padded convolutions, and ``AvgPool2d`` when the model's dtype is not torch's
default dtype (BackPACK builds its Jacobian's transposed convolution in the default
dtype and fails).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox
from curvkit.errors import UnsupportedRequestError
from curvkit.stats.backend import BackendCapabilities, FactorRequest, KroneckerFactors
from curvkit.stats.factors import input_factor

__all__ = ["BackpackBackend"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRACKED = (nn.Linear, *_CONV)
#: Parameter-free modules BackPACK's KFAC/KFLR backpropagate through (verified here).
_PASS_THROUGH = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Flatten,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.ZeroPad2d,
)
_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
_SAVEFIELD = {FisherType.MC: "kfac", FisherType.TYPE2: "kflr"}
_HOOK_WARNING = r"Full backward hook is firing when gradients are computed with respect to module outputs"


def _is_leaf(module: nn.Module) -> bool:
    return next(module.children(), None) is None


# --- the capability check -------------------------------------------------------------


def _static_reasons(request: FactorRequest) -> list[str]:
    """Reasons visible without running the model."""
    out: list[str] = []
    bad_leaves = sorted(
        {
            type(m).__name__
            for m in request.model.modules()
            if _is_leaf(m) and not isinstance(m, (*_TRACKED, *_PASS_THROUGH))
        }
    )
    if bad_leaves:
        allowed = ", ".join(c.__name__ for c in (*_TRACKED, *_PASS_THROUGH))
        out.append(f"module type(s) {', '.join(bad_leaves)} in the model (BackPACK KFAC/KFLR path supports {allowed})")
    with_params = sorted(
        name
        for name, m in request.model.named_modules()
        if not _is_leaf(m) and any(True for _ in m.parameters(recurse=False))
    )
    if with_params:
        out.append(f"container module(s) {', '.join(map(repr, with_params))} with parameters of their own")
    inplace = sorted(name for name, m in request.model.named_modules() if getattr(m, "inplace", False))
    if inplace:
        out.append(
            f"in-place module(s) {', '.join(map(repr, inplace))} (BackPACK's backward hooks forbid in-place "
            "outputs; set inplace=False)"
        )
    for name, m in request.model.named_modules():
        if isinstance(m, _CONV) and m.groups != 1 and any(p.requires_grad for p in m.parameters()):
            out.append(f"convolution {name!r} with groups={m.groups} (BackPACK's KFAC/KFLR need groups=1)")
        if isinstance(m, _CONV):
            if m.padding_mode != "zeros":
                out.append(f"convolution {name!r} with padding_mode={m.padding_mode!r} (BackPACK needs 'zeros')")
            if isinstance(m.padding, str):
                out.append(f"convolution {name!r} with padding={m.padding!r} (BackPACK needs explicit integers)")
    dtype = next((layer.weight.dtype for layer in request.plan), torch.get_default_dtype())
    pools = sorted(name for name, m in request.model.named_modules() if isinstance(m, nn.AvgPool2d))
    if pools and dtype != torch.get_default_dtype():
        # BackPACK builds the transposed convolution of AvgPool2d's Jacobian in the default dtype.
        out.append(
            f"AvgPool2d {', '.join(map(repr, pools))} in a {dtype} model while torch's default dtype is "
            f"{torch.get_default_dtype()} (BackPACK's AvgPool2d backward uses the default dtype)"
        )
    convs = [layer.name for layer in request.plan if isinstance(layer.module, _CONV)]
    if convs and request.kfac_approx is KFACApprox.EXPAND:
        out.append(
            f"kfac_approx='expand' for convolution(s) {', '.join(map(repr, convs))} (BackPACK sums output "
            "gradients over positions before the outer product, which is 'reduce'; use kfac_approx='reduce')"
        )
    loss = request.loss_fn
    if isinstance(loss, nn.CrossEntropyLoss) and loss.ignore_index != -100:
        out.append(f"CrossEntropyLoss(ignore_index={loss.ignore_index}) (BackPACK needs the default -100)")
    return out


def _same_tensor(x: Tensor, ref: Tensor, version: int) -> bool:
    """``x`` is ``ref``, unmodified since ``version``, or an identical view of it (a module
    with backward hooks hands on such a view of its output)."""
    if x._version != version:
        return False
    return x is ref or (
        x.data_ptr() == ref.data_ptr() and x.shape == ref.shape and x.stride() == ref.stride() and x.dtype == ref.dtype
    )


@dataclass
class _ChainTrace:
    """Forward hooks that check the leaf modules run as one chain.

    BackPACK passes backpropagated quantities from a module's output to the module that
    consumes it, keyed by tensor storage; anything computed functionally in between (a
    ``view``, an arithmetic operation, an in-place change) breaks or silently corrupts
    that hand-over. The chain condition is: the first leaf module reads the model input,
    each further one reads the unmodified output of the previous one, and the model
    returns the unmodified output of the last one.
    """

    inputs: Tensor
    problems: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    last: tuple[Tensor, int] | None = None
    linear_dims: dict[str, int] = field(default_factory=dict)

    def pre_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name in self.order:
            self.problems.append(f"module {name!r} called more than once in a forward pass")
        self.order.append(name)
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            self.problems.append(f"module {name!r} called with other than one tensor argument")
            return
        x = args[0]
        if isinstance(module, nn.Linear):
            self.linear_dims[name] = x.ndim
        if (x is not self.inputs) if self.last is None else not _same_tensor(x, *self.last):
            what = "the model input" if self.last is None else "the unmodified output of the previous module"
            self.problems.append(f"module {name!r} does not read {what}")

    def post_hook(self, name: str, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if isinstance(output, Tensor):
            self.last = (output, output._version)
        else:
            self.problems.append(f"module {name!r} returns a {type(output).__name__}, not a tensor")
            self.last = None

    def check_output(self, output: Any) -> None:
        if not isinstance(output, Tensor):
            self.problems.append(f"the model returns a {type(output).__name__}, not a tensor")
        elif self.last is None or not _same_tensor(output, *self.last):
            self.problems.append("the model output is not the unmodified output of its last module")

    def reasons(self) -> list[str]:
        out = []
        if self.problems:
            out.append(
                "a model whose modules do not form a chain BackPACK can follow: "
                + "; ".join(dict.fromkeys(self.problems))
            )
        deep = sorted(name for name, nd in self.linear_dims.items() if nd != 2)
        if deep:
            out.append(f"Linear layer(s) {', '.join(map(repr, deep))} on inputs that are not 2-D (N, d_in)")
        return out


@contextlib.contextmanager
def _trace_chain(model: nn.Module, inputs: Tensor) -> Iterator[_ChainTrace]:
    trace = _ChainTrace(inputs)
    handles = []
    try:
        for name, module in model.named_modules():
            if _is_leaf(module):
                handles.append(
                    module.register_forward_pre_hook(
                        lambda m, a, k, n=name: trace.pre_hook(n, m, a, k), with_kwargs=True
                    )
                )
                handles.append(module.register_forward_hook(lambda m, a, o, n=name: trace.post_hook(n, m, a, o)))
        yield trace
    finally:
        for h in handles:
            h.remove()


def _output_reasons(request: FactorRequest, output: Any) -> list[str]:
    loss = request.loss_fn
    if isinstance(loss, nn.BCEWithLogitsLoss) and request.fisher is FisherType.MC:
        t = request.targets
        if not bool(((t == 0) | (t == 1)).all()):
            return ["BCEWithLogitsLoss with non-binary targets and fisher='mc' (BackPACK samples only for 0/1 targets)"]
    if not isinstance(output, Tensor):
        return []
    if output.ndim != 2:
        return [
            f"model output of shape {tuple(output.shape)} (BackPACK's {type(loss).__name__} needs (N, C); "
            "outputs with extra dimensions are not supported)"
        ]
    if isinstance(loss, nn.BCEWithLogitsLoss) and output.shape[1] != 1:
        return [f"BCEWithLogitsLoss on output of shape {tuple(output.shape)} (BackPACK needs (N, 1))"]
    return []


def _rng_devices(device: torch.device) -> list[Any]:
    return [device] if device.type == "cuda" else []


def _extra_check(request: FactorRequest) -> list[str]:
    reasons = _static_reasons(request)
    if reasons:
        return reasons
    # One gradient-free forward pass; the forked RNG keeps dropout draws from showing.
    with torch.random.fork_rng(devices=_rng_devices(request.inputs.device)), torch.no_grad():
        with _trace_chain(request.model, request.inputs) as trace:
            output = request.model(request.inputs)
        trace.check_output(output)
    return trace.reasons() + _output_reasons(request, output)


# --- clean extension ------------------------------------------------------------------


@contextlib.contextmanager
def _extended(*modules: nn.Module) -> Iterator[None]:
    """``backpack.extend`` the modules for the duration of the block, then undo it."""
    from backpack import extend, memory_cleanup
    from backpack.context import CTX

    flag = "_backpack_extend"
    flagged_before = {id(m) for root in modules for m in root.modules() if getattr(m, flag, False)}
    # register_full_backward_hook marks a module for good; ASDL's plain backward hooks (or
    # the user's) would then be refused on it, so the mark is restored with the hooks.
    hook_kind_before = {
        id(m): m.__dict__.get("_is_full_backward_hook", _MISSING) for root in modules for m in root.modules()
    }
    n_before = len(CTX.hook_handles)
    added: list[Any] = []
    try:
        for module in modules:
            extend(module)
        added = CTX.hook_handles[n_before:]
        yield
    finally:
        added = added or CTX.hook_handles[n_before:]
        ids = {id(h) for h in added}
        for handle in added:
            handle.remove()
        CTX.hook_handles = [h for h in CTX.hook_handles if id(h) not in ids]
        for root in modules:
            for m in root.modules():
                if id(m) not in flagged_before and flag in m.__dict__:
                    delattr(m, flag)
                before = hook_kind_before.get(id(m), _MISSING)
                if before is _MISSING:
                    m.__dict__.pop("_is_full_backward_hook", None)
                else:
                    m._is_full_backward_hook = before
                memory_cleanup(m)


@contextlib.contextmanager
def _preserved_param_state(model: nn.Module, savefield: str) -> Iterator[list[nn.Parameter]]:
    """Keep ``.grad`` and any ``savefield`` attribute of the parameters as they were."""
    params = list(model.parameters())
    grads = [p.grad for p in params]
    saved = [p.__dict__.get(savefield, _MISSING) for p in params]
    try:
        for p in params:
            p.grad = None
            p.__dict__.pop(savefield, None)  # a stale value must not pass for a fresh one
        yield params
    finally:
        for p, g, s in zip(params, grads, saved, strict=True):
            p.grad = g
            p.__dict__.pop(savefield, None)
            if s is not _MISSING:
                setattr(p, savefield, s)


_MISSING = object()


# --- the backend ----------------------------------------------------------------------


class BackpackBackend:
    """Statistics backend on BackPACK's ``KFAC`` (MC Fisher) and ``KFLR`` (type-2).

    Serves ``Linear`` (2-D inputs) and ``Conv1d/2d/3d`` (``kfac_approx="reduce"`` only)
    in chains of supported modules, with ``CrossEntropyLoss``, ``MSELoss`` and
    ``BCEWithLogitsLoss`` (one output) on ``(N, C)`` outputs, ``mean`` or ``sum``
    reduction. No empirical Fisher: BackPACK has no Kronecker-factored empirical
    extension. See the module docstring for the conversion to curvkit's convention.
    """

    name = "backpack"

    def __init__(self) -> None:
        self.capabilities = BackendCapabilities(
            fisher_types=frozenset({FisherType.MC, FisherType.TYPE2}),
            approximations=frozenset(KFACApprox),
            module_types=_TRACKED,
            losses=_LOSSES,
            reductions=frozenset({"mean", "sum"}),
            extra_check=_extra_check,
        )

    def __repr__(self) -> str:
        return "BackpackBackend()"

    def compute(self, request: FactorRequest) -> dict[str, KroneckerFactors]:
        from backpack import backpack
        from backpack.extensions import KFAC, KFLR

        savefield = _SAVEFIELD[request.fisher]
        extension = KFAC(mc_samples=request.mc_samples) if request.fisher is FisherType.MC else KFLR()
        layers = {id(layer.module): layer for layer in request.plan}
        result: dict[str, KroneckerFactors] = {}

        def collect(module: nn.Module) -> None:
            # Runs on each module right after BackPACK's extension, before it frees input0.
            layer = layers.get(id(module))
            if layer is None or not hasattr(module.weight, savefield):
                return
            g, a0 = getattr(module.weight, savefield)
            x = module.input0.detach()
            if isinstance(module, nn.Linear):
                a = _fold_bias(a0, x) if layer.has_bias else a0
            else:  # BackPACK's Ω is T·A_expand; reduce's A comes from the recorded input
                a = input_factor(layer.handler.input_features(module, x), KFACApprox.REDUCE, layer.has_bias)
            result[layer.name] = KroneckerFactors(a.detach(), g.detach())
            for p in (module.weight, module.bias):
                if p is not None:
                    p.__dict__.pop(savefield, None)

        device = request.inputs.device
        with contextlib.ExitStack() as stack:
            stack.enter_context(_preserved_param_state(request.model, savefield))
            stack.enter_context(_extended(request.model, request.loss_fn))
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", message=_HOOK_WARNING)
            if request.fisher is FisherType.MC:
                gen = request.generator
                seed = int(
                    torch.randint(0, 2**62, (1,), generator=gen, device=gen.device if gen is not None else "cpu")
                )
                stack.enter_context(torch.random.fork_rng(devices=_rng_devices(device)))
                if device.type == "cuda":
                    index = device.index if device.index is not None else torch.cuda.current_device()
                    torch.cuda.default_generators[index].manual_seed(seed)
                else:
                    torch.random.default_generator.manual_seed(seed)
            with torch.enable_grad():
                with _trace_chain(request.model, request.inputs) as trace:
                    output = request.model(request.inputs)
                trace.check_output(output)
                reasons = trace.reasons() + _output_reasons(request, output)
                if reasons:  # the capability check saw another batch (accumulation)
                    raise UnsupportedRequestError(
                        f"backend 'backpack' cannot serve this batch: it does not support {'; '.join(reasons)}. "
                        "Use backend='hooks'."
                    )
                loss = request.loss_fn(output, request.targets)
                with backpack(extension, extension_hook=collect):
                    loss.backward()
        return {layer.name: result[layer.name] for layer in request.plan if layer.name in result}


def _fold_bias(a0: Tensor, x: Tensor) -> Tensor:
    """``[[A₀, m], [mᵀ, 1]]`` with ``m`` the mean input: ``A`` of ``[x; 1]``."""
    d = a0.shape[0]
    out = a0.new_empty(d + 1, d + 1)
    out[:d, :d] = a0
    mean = x.reshape(x.shape[0], -1).mean(0)
    out[:d, d] = mean
    out[d, :d] = mean
    out[d, d] = 1.0
    return out
