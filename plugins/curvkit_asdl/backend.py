r"""The ``asdl`` statistics backend: Kronecker factors from ASDL 0.1a4's Fisher makers.

ASDL (``asdfghjkl``, import name ``asdl``) computes, with ``fisher_shapes=[SHAPE_KRON]``
and ``data_size=N``, per module ``module.<fisher_attr>.kron.A`` and ``.kron.B``:

* ``A = (1/N) Σ_rows a aᵀ`` over the rows ASDL forms from the layer input — ``N`` rows for
  a ``Linear`` on 2-D inputs, ``N·R`` rows for a ``Linear`` on ``(N, *, d)`` inputs (it
  flattens the leading dimensions), and ``(1/(N·T)) Σ`` over the ``T`` im2col patches of a
  ``Conv2d``. The bias is **not** folded in.
* ``B = (1/N) Σ_rows g gᵀ`` over the backpropagated output gradients (all positions),
  where ``g`` is the gradient of a *summed* loss: ``nll`` at every class weighted by
  ``√p_c`` (exact CE), at sampled classes divided by ``mc_samples`` (MC CE), ``½‖f − y‖²``
  (MSE: exact, and MC with ``y ~ N(f, 1)``), or the user's loss with ``reduction="sum"``
  (empirical).

Conversion to curvkit's convention (that of curvlinops'
``KFACLinearOperator(separate_weight_and_bias=False)``, expand):

* ``A ← A / R`` for a ``Linear`` with ``R`` shared positions (``R = 1`` otherwise), then
  the bias row/column ``[mean input; 1]`` appended; the mean input is ASDL's own
  ``OP_MEAN_INPUTS`` over the same rows.
* ``G ← B · M`` (MC; ASDL divides each sample's gradient by ``M``, squaring it away)
  ``· 2`` (MSE exact/MC: ASDL's MSE Hessian is that of ``½‖·‖²``)
  ``· 1/C`` (MSE/BCE with ``reduction="mean"``: PyTorch also averages over features)
  ``· N`` (``reduction="sum"``: undo ASDL's ``1/N``).

ASDL draws MC targets from the *global* RNG; the backend forks it and seeds it from
``request.generator``, so the result is reproducible from the generator and the caller's
global RNG state is left untouched. ASDL records attributes on modules and parameters and
marks modules as having non-full backward hooks; all of that is undone afterwards.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox
from curvkit.errors import UnsupportedRequestError, WeightTyingError
from curvkit.stats.backend import BackendCapabilities, FactorRequest, KroneckerFactors

__all__ = ["AsdlBackend"]

#: Attribute names under which ASDL stores its results; unusual so no user attribute clashes.
_FISHER_ATTR = "_curvkit_asdl_fisher"
_FVP_ATTR = "_curvkit_asdl_fvp"
#: The attribute ASDL sets on every parameter it visits (``asdl.utils``).
_REQUIRES_GRAD_ATTR = "_original_requires_grad"
#: Module types ASDL 0.1a4 attaches operations to (``asdl.core._supported_module_classes``).
_ASDL_MODULE_NAMES = ("Linear", "Conv2d", "BatchNorm1d", "BatchNorm2d", "LayerNorm", "Embedding", "Bias", "Scale")


def _import_asdl() -> Any:
    with warnings.catch_warnings():
        # asdl's import runs torch.jit.script, which recent torch deprecates.
        warnings.simplefilter("ignore", DeprecationWarning)
        import asdl
    return asdl


# --- capabilities -----------------------------------------------------------------------


def _extra_reasons(request: FactorRequest) -> list[str]:
    """Requests ASDL cannot compute exactly, beyond the declared fields."""
    out = []
    loss_fn = request.loss_fn
    if isinstance(loss_fn, nn.BCEWithLogitsLoss) and request.fisher is not FisherType.EMPIRICAL:
        out.append(
            f"BCEWithLogitsLoss with fisher={request.fisher.value!r} (ASDL's exact and MC Fisher know only "
            "cross-entropy and MSE; BCEWithLogitsLoss works with fisher='empirical')"
        )
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if request.targets.ndim != 1:
            out.append(
                f"CrossEntropyLoss with targets of shape {tuple(request.targets.shape)} (ASDL treats the last "
                "output dimension as the classes; only (N, C) outputs with (N,) targets are supported)"
            )
        elif request.targets.is_floating_point():
            out.append("CrossEntropyLoss with class-probability targets (pass integer class indices)")
    elif request.targets.ndim != 2:
        out.append(
            f"{type(loss_fn).__name__} with targets of shape {tuple(request.targets.shape)} (ASDL's MSE Fisher "
            "indexes logits[:, i]; only (N, C) outputs are supported)"
        )
    for layer in request.plan:
        module = layer.module
        if not isinstance(module, nn.Conv2d):
            continue
        bad = []
        if tuple(module.dilation) != (1, 1):
            bad.append(f"dilation={tuple(module.dilation)}")
        if isinstance(module.padding, str):
            bad.append(f"padding={module.padding!r}")
        if module.padding_mode != "zeros":
            bad.append(f"padding_mode={module.padding_mode!r}")
        if bad:
            out.append(
                f"Conv2d {layer.name!r} with {', '.join(bad)} (ASDL's im2col supports only dilation 1 and "
                "explicit zero padding)"
            )
    return out


def asdl_capabilities() -> BackendCapabilities:
    """What the ``asdl`` backend computes exactly (checked against curvlinops)."""
    return BackendCapabilities(
        fisher_types=frozenset(FisherType),
        # ASDL treats a weight-sharing axis as extra samples: expand only.
        approximations=frozenset({KFACApprox.EXPAND}),
        module_types=(nn.Linear, nn.Conv2d),
        losses=(nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss),
        reductions=frozenset({"mean", "sum"}),
        extra_check=_extra_reasons,
    )


# --- state restoration --------------------------------------------------------------------


class _ModelState:
    """What ASDL may change on the user's model, saved so it can be restored exactly."""

    _MISSING = object()

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = getattr(loss_fn, "reduction", None)
        params = list(model.parameters())
        self.params = [(p, p.requires_grad, p.grad, getattr(p, _REQUIRES_GRAD_ATTR, self._MISSING)) for p in params]
        self.modules = [(m, m.__dict__.get("_is_full_backward_hook", self._MISSING)) for m in model.modules()]

    def restore(self) -> None:
        if self.reduction is not None:
            self.loss_fn.reduction = self.reduction
        for p, requires_grad, grad, recorded in self.params:
            p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
            if recorded is self._MISSING:
                if hasattr(p, _REQUIRES_GRAD_ATTR):
                    delattr(p, _REQUIRES_GRAD_ATTR)
            else:
                setattr(p, _REQUIRES_GRAD_ATTR, recorded)
        for m, full_flag in self.modules:
            for attr in (_FISHER_ATTR, _FVP_ATTR):
                if attr in m.__dict__:
                    delattr(m, attr)
            # register_backward_hook marks a module as using non-full backward hooks, which
            # would forbid register_full_backward_hook on it later; undo that.
            if full_flag is not self._MISSING and not m._backward_hooks:
                m._is_full_backward_hook = full_flag


@contextmanager
def _record_inputs(request: FactorRequest) -> Iterator[dict[str, torch.Size]]:
    """Record the input shape of every tracked layer; refuse a layer run twice."""
    shapes: dict[str, torch.Size] = {}
    handles = []

    def make_hook(name: str):  # type: ignore[no-untyped-def]
        def hook(module, args, output):  # type: ignore[no-untyped-def]
            if name in shapes:
                raise WeightTyingError(
                    f"module {name!r} ran twice in one forward pass (a module reused at two places shares "
                    "its weight); its Kronecker factors are not defined per use, so curvkit refuses it. Use "
                    "a separate module for each place."
                )
            if len(args) != 1 or not isinstance(args[0], Tensor):
                raise UnsupportedRequestError(f"module {name!r} must be called with exactly one tensor input.")
            x = args[0]
            if isinstance(module, nn.Conv2d) and x.ndim != 4:
                raise UnsupportedRequestError(
                    f"Conv2d {name!r} got an input of shape {tuple(x.shape)}; the asdl backend needs batched "
                    "(N, C, H, W) inputs."
                )
            if isinstance(module, nn.Linear) and x.ndim < 2:
                raise UnsupportedRequestError(
                    f"Linear {name!r} got an input of shape {tuple(x.shape)} without a batch dimension."
                )
            shapes[name] = x.shape

        return hook

    try:
        for layer in request.plan:
            handles.append(layer.module.register_forward_hook(make_hook(layer.name)))
        yield shapes
    finally:
        for handle in handles:
            handle.remove()


# --- the backend ----------------------------------------------------------------------------


class AsdlBackend:
    """Kronecker factors from ASDL's ``FisherMaker`` (``fisher_shapes=[SHAPE_KRON]``).

    Supports every Fisher type with the ``expand`` approximation on ``Linear`` (any
    number of leading input dimensions) and ``Conv2d`` (dilation 1, explicit zero
    padding) layers, for cross-entropy and MSE (all Fisher types) and BCE-with-logits
    (empirical), with ``(N, C)`` model outputs and either reduction.
    """

    name = "asdl"

    def __init__(self) -> None:
        self.capabilities = asdl_capabilities()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def compute(self, request: FactorRequest) -> dict[str, KroneckerFactors]:
        asdl = _import_asdl()
        model, loss_fn = request.model, request.loss_fn
        n = request.inputs.shape[0]
        tracked = {id(layer.module) for layer in request.plan}
        asdl_types = tuple(getattr(nn, t, None) or getattr(asdl, t) for t in _ASDL_MODULE_NAMES)
        ignore = [m for m in model.modules() if isinstance(m, asdl_types) and id(m) not in tracked]

        fisher_type = {
            FisherType.EMPIRICAL: asdl.FISHER_EMP,
            FisherType.MC: asdl.FISHER_MC,
            FisherType.TYPE2: asdl.FISHER_EXACT,
        }[request.fisher]
        loss_type = asdl.LOSS_CROSS_ENTROPY if isinstance(loss_fn, nn.CrossEntropyLoss) else asdl.LOSS_MSE
        config = asdl.FisherConfig(
            fisher_type=fisher_type,
            fisher_shapes=[asdl.SHAPE_KRON],
            loss_type=loss_type,
            n_mc_samples=request.mc_samples,
            var=1.0,
            fisher_attr=_FISHER_ATTR,
            fvp_attr=_FVP_ATTR,
            ignore_modules=ignore,
            data_size=n,
        )
        maker = asdl.get_fisher_maker(model, config)
        dummy_output = maker.setup_model_call(model, request.inputs)
        if request.fisher is FisherType.EMPIRICAL:
            maker.setup_loss_call(loss_fn, dummy_output, request.targets)

        # ASDL's own mean of the layer input rows: the bias column of A.
        mean_rules = [(layer.module, asdl.OP_MEAN_INPUTS) for layer in request.plan if layer.has_bias]

        state = _ModelState(model, loss_fn)
        raw: dict[str, tuple[Tensor, Tensor]] = {}
        means: dict[str, Tensor] = {}
        try:
            with ExitStack() as stack:
                stack.enter_context(warnings.catch_warnings())
                # ASDL uses Module.register_backward_hook, which torch deprecates.
                warnings.filterwarnings("ignore", message=".*non-full backward hook.*")
                warnings.filterwarnings("ignore", message=".*register_backward_hook.*")
                shapes = stack.enter_context(_record_inputs(request))
                mean_cxt = stack.enter_context(asdl.extend(model, *mean_rules)) if mean_rules else None
                stack.enter_context(self._rng(request))
                maker.forward_and_backward(data_size=n)
                if mean_cxt is not None:
                    for layer in request.plan:
                        if layer.has_bias and layer.name in shapes:
                            means[layer.name] = mean_cxt.get_result(layer.module, asdl.OP_MEAN_INPUTS)
            for layer in request.plan:
                fisher = getattr(layer.module, _FISHER_ATTR, None)
                kron = getattr(fisher, "kron", None)
                if kron is None or kron.A is None or kron.B is None:
                    continue  # did not run, or does not influence the output
                raw[layer.name] = (kron.A, kron.B)
        finally:
            state.restore()

        g_scale = self._g_scale(request)
        result: dict[str, KroneckerFactors] = {}
        for layer in request.plan:
            if layer.name not in raw:
                continue
            a, b = raw[layer.name]
            if isinstance(layer.module, nn.Linear):
                shape = shapes[layer.name]
                r = math.prod(shape[1:-1])  # positions sharing the weight (1 for 2-D inputs)
                if r != 1:
                    a = a / r
            if layer.has_bias:
                a = _append_bias(a, means[layer.name])
            result[layer.name] = KroneckerFactors(a.detach().clone(), (b * g_scale).detach())
        return result

    @staticmethod
    def _g_scale(request: FactorRequest) -> float:
        loss_fn = request.loss_fn
        scale = 1.0
        if request.fisher is FisherType.MC:
            scale *= request.mc_samples
        if isinstance(loss_fn, nn.MSELoss) and request.fisher is not FisherType.EMPIRICAL:
            scale *= 2.0
        if loss_fn.reduction == "mean":
            if not isinstance(loss_fn, nn.CrossEntropyLoss):
                scale /= request.targets.shape[-1]
        else:
            scale *= request.inputs.shape[0]
        return scale

    @staticmethod
    def _rng(request: FactorRequest) -> Any:
        """Fork the global RNG (ASDL samples from it) and seed it from the request."""
        if request.fisher is not FisherType.MC:
            return nullcontext()

        @contextmanager
        def forked() -> Iterator[None]:
            gen = request.generator
            if gen is None:
                seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
            else:
                seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
            device = request.inputs.device
            if device.type == "cuda":
                index = device.index if device.index is not None else torch.cuda.current_device()
                with torch.random.fork_rng(devices=[index]), torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
                    yield
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(seed)
                    yield

        return forked()


def _append_bias(a: Tensor, mean: Tensor) -> Tensor:
    """``[[A, m], [mᵀ, 1]]``: the input factor of ``[a; 1]``."""
    d = a.shape[0]
    out = a.new_empty(d + 1, d + 1)
    out[:d, :d] = a
    out[:d, d] = mean
    out[d, :d] = mean
    out[d, d] = 1.0
    return out
