r"""Public entry points: Kronecker factors of one batch, or accumulated over a data set.

Convention
----------
For a layer :math:`s = \bar W \bar a` with weight :math:`\bar W = [W\;b]` of shape
``(d_out, d_in [+1])``, flattened **row-major** (PyTorch's ``weight.flatten()``, with the
bias as the last column), the curvature block is approximated by

.. math:: F_{\text{layer}} \approx G \otimes A,

so a preconditioned gradient is :math:`G^{-1}\,\nabla_{\bar W}\,A^{-1}` in matrix form.
``A`` carries the bias as an appended constant input (its last row and column). The
factors are scaled so that ``G ⊗ A`` equals the block of curvlinops'
``KFACLinearOperator(..., separate_weight_and_bias=False)`` for the same Fisher type and
approximation: ``A`` is averaged over data (and, for expand, over the weight-sharing
axis); ``G`` carries the loss scale (``1/(N·R_loss)`` for ``reduction="mean"``).

Normalisation layers (``LayerNorm``, ``RMSNorm``, ``BatchNorm*``, ``GroupNorm``: unit-wise
layers, :mod:`curvkit.stats.norms`) have no Kronecker pair: their entry is a
:class:`~curvkit.stats.backend.UnitwiseFactors` ``(F)``, the exact ``k × k`` block of each
unit's ``(γ_i, β_i)``, scaled like ``G``. Check ``isinstance(entry, UnitwiseFactors)``
before unpacking an ``(A, G)`` pair.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedRequestError
from curvkit.stats.backend import FactorRequest, KroneckerFactors, TiedKroneckerFactors, UnitwiseFactors
from curvkit.stats.layer_stats import combine_layouts
from curvkit.stats.losses import loss_adapter
from curvkit.stats.model_io import batch_size
from curvkit.stats.plan import make_plan

__all__ = ["accumulate_kronecker_factors", "factor_request", "kronecker_factors", "resolve_backend"]


def _registry(registry: Any) -> Any:
    if registry is not None:
        return registry
    from curvkit.plugins import default_registry

    return default_registry()


def resolve_backend(registry: Any, name: str, request: FactorRequest) -> Any:
    """Look up backend ``name`` and check it can serve ``request``.

    Raises:
        UnknownComponentError: ``name`` is not registered (lists what is).
        UnsupportedRequestError: It cannot serve the request; the message says why and
            names the registered backends that can.
    """
    backend = registry.backends.get(name)
    reasons = backend.capabilities.reasons(request, registry)
    if reasons:
        able = registry.backends_supporting(request)
        hint = f"backends that can serve it: {', '.join(map(repr, able))}" if able else "no registered backend can serve it"
        raise UnsupportedRequestError(
            f"backend {name!r} cannot serve this request: it does not support {'; '.join(reasons)}. "
            f"{hint[0].upper()}{hint[1:]}."
        )
    return backend


def _default_generator(device: torch.device) -> torch.Generator:
    """A generator for MC targets, seeded from the global one so ``torch.manual_seed``
    makes results reproducible."""
    seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
    return torch.Generator(device=device).manual_seed(seed)


def _make_request(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Any,
    targets: Tensor,
    fisher: FisherType | str,
    kfac_approx: KFACApprox | str,
    mc_samples: int,
    generator: torch.Generator | None,
    unsupported: UnsupportedPolicy | str,
    registry: Any,
    plan: Any = None,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> FactorRequest:
    fisher = as_enum(FisherType, fisher, "fisher")
    approx = as_enum(KFACApprox, kfac_approx, "kfac_approx")
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"mc_samples={mc_samples!r} must be an integer >= 1.")
    if fisher is not FisherType.MC and mc_samples != 1:
        raise ValueError(
            f"mc_samples={mc_samples} only applies to fisher='mc'; with fisher={fisher.value!r} "
            "leave it at 1."
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator={generator!r} must be a torch.Generator or None.")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn={output_fn!r} must be a callable (model output -> logits tensor) or None.")
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor; got {type(targets).__name__}.")
    if not isinstance(inputs, (Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"inputs must be a tensor, a mapping (model(**inputs)) or a tuple (model(*inputs)); got "
            f"{type(inputs).__name__}."
        )
    if targets.ndim == 0:
        raise ValueError(f"targets {tuple(targets.shape)} need a leading batch dimension N.")
    batch_size(inputs, targets)
    loss_adapter(loss_fn)  # validates the loss early, with a clear message
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if targets.is_floating_point():
            raise UnsupportedRequestError(
                "CrossEntropyLoss with class-probability (floating-point) targets is not supported; "
                "pass integer class indices of shape (N, ...)."
            )
        if bool((targets == loss_fn.ignore_index).any()):
            raise UnsupportedRequestError(
                f"targets contain ignore_index={loss_fn.ignore_index}; ignored positions would change "
                "the number of loss terms per datum. Remove them from the batch first."
            )
    if fisher is FisherType.MC and generator is None:
        generator = _default_generator(targets.device)
    if plan is None:
        plan = make_plan(model, registry, unsupported)
    return FactorRequest(
        model, loss_fn, inputs, targets, fisher, approx, mc_samples, generator, plan, output_fn
    )


def factor_request(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    fisher: FisherType | str,
    kfac_approx: KFACApprox | str = "expand",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    unsupported: UnsupportedPolicy | str = "warn",
    registry: Any = None,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> FactorRequest:
    """Validate arguments and build the :class:`~curvkit.stats.backend.FactorRequest` that
    :func:`kronecker_factors` hands to a backend.

    Useful to ask which backends can serve a computation before running it::

        request = factor_request(model, loss_fn, X, y, fisher="type-2")
        registry.backends_supporting(request)  # e.g. ['hooks', 'backpack', 'asdl']

    Arguments are those of :func:`kronecker_factors`.
    """
    return _make_request(
        model,
        loss_fn,
        inputs,
        targets,
        fisher,
        kfac_approx,
        mc_samples,
        generator,
        unsupported,
        _registry(registry),
        output_fn=output_fn,
    )


def kronecker_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    fisher: FisherType | str,
    kfac_approx: KFACApprox | str = "expand",
    backend: str = "hooks",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    unsupported: UnsupportedPolicy | str = "warn",
    registry: Any = None,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> dict[str, KroneckerFactors | UnitwiseFactors]:
    r"""Kronecker factors ``(A, G)`` of every tracked layer for one batch.

    The batch is treated as the whole data set: ``A`` is averaged over its ``N`` data,
    ``G`` carries the loss's own scale. ``G ⊗ A`` (row-major ``vec`` of the
    ``(d_out, d_in [+1])`` weight with the bias as last column) equals the block of
    curvlinops' ``KFACLinearOperator(..., separate_weight_and_bias=False)``.

    Args:
        model: The network. Tracked layers: every module with trainable parameters for
            which a layer handler is registered (``Linear``, ``Conv1d/2d/3d`` in the core).
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` with
            ``reduction`` ``"mean"`` or ``"sum"``. Outputs may carry extra (e.g. sequence)
            dimensions: ``(N, C, ...)`` or ``(N, ..., C)`` (language-model logits, as
            Hugging Face models return them) for cross-entropy with targets ``(N, ...)``,
            ``(N, ..., C)`` otherwise. A layout that fits neither (or both) raises.
        inputs: Model inputs, batch first: a tensor, a mapping (``model(**inputs)``, e.g.
            a tokenizer's output) or a tuple (``model(*inputs)``).
        targets: Targets, batch first.
        fisher: ``"empirical"``, ``"mc"`` or ``"type-2"`` (see :class:`~curvkit.FisherType`).
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
        backend: Registered statistics backend: ``"hooks"`` (ours), ``"backpack"``,
            ``"asdl"``, or one a plugin adds.
        mc_samples: Samples per loss term for ``fisher="mc"``.
        generator: Random generator for ``fisher="mc"``; seeded identically, it draws the
            same targets as curvlinops with that seed. ``None`` draws a seed from the
            global generator (so ``torch.manual_seed`` makes the result reproducible).
        unsupported: What to do with modules that have trainable parameters but no
            handler: ``"warn"`` (default: warn and leave them out), ``"skip"`` (leave them
            out silently) or ``"error"``. The same policy and default as the optimizers
            and :mod:`curvkit.laplace`.
        output_fn: Picks the logits from the model's output when it is not a tensor or
            a mapping with ``"logits"`` (Hugging Face ``ModelOutput``), e.g.
            ``lambda out: out[0]`` (see :mod:`curvkit.stats.model_io`).
        registry: A :class:`~curvkit.registry.Registry`; ``None`` uses
            :func:`curvkit.plugins.default_registry`.

    Returns:
        ``{module name: KroneckerFactors(A, G)}`` for every tracked layer that ran, and
        ``{module name: UnitwiseFactors(F)}`` (``F`` of shape ``(D, k, k)``) for every
        normalisation layer (see the module docstring).

    Raises:
        UnsupportedRequestError: The backend cannot serve the request (the message names
            those that can), or the loss is unsupported.
        UnsupportedModuleError: A module cannot be handled under ``unsupported="error"``.
        WeightTyingError: A tracked module runs twice in the forward pass, or two tracked
            modules share a parameter.

    Example:
        >>> import torch, curvkit
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> factors = curvkit.kronecker_factors(model, torch.nn.CrossEntropyLoss(), X, y, fisher="type-2")
        >>> {name: (tuple(A.shape), tuple(G.shape)) for name, (A, G) in factors.items()}
        {'0': ((5, 5), (3, 3)), '2': ((4, 4), (2, 2))}
    """
    registry = _registry(registry)
    request = _make_request(
        model,
        loss_fn,
        inputs,
        targets,
        fisher,
        kfac_approx,
        mc_samples,
        generator,
        unsupported,
        registry,
        output_fn=output_fn,
    )
    return resolve_backend(registry, backend, request).compute(request)


def accumulate_kronecker_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    data: Iterable[tuple[Tensor, Tensor]],
    *,
    fisher: FisherType | str,
    kfac_approx: KFACApprox | str = "expand",
    backend: str = "hooks",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    unsupported: UnsupportedPolicy | str = "warn",
    registry: Any = None,
    progress: bool = False,
    output_fn: Callable[[Any], Tensor] | None = None,
) -> dict[str, KroneckerFactors | UnitwiseFactors]:
    r"""Kronecker factors over a whole data set, streamed batch by batch.

    The scaling is that of the data set, not of a batch: with ``N`` data in total,
    :math:`A = \frac{1}{N}\sum_b N_b A_b`, and ``G`` likewise for a ``mean`` loss (summed
    for a ``sum`` loss; a normalisation layer's ``F`` as ``G``) — the curvature of the loss
    over the whole data set, as a ``mean``-reduced loss would average it. A block whose
    weight is tied in transposed layouts (an embedding and its LM head) adds up each
    layout's factors over the batches and forms the nearest Kronecker product of the data
    set's sum at the end (not the sum of the batches' products). This equals curvlinops'
    ``KFACLinearOperator`` on the same data loader (and, for ``fisher="mc"`` with a
    generator seeded like curvlinops' ``seed``, draws the same targets). Memory is that of
    one batch plus the factors.

    Args:
        data: Iterable of ``(inputs, targets)`` batches (e.g. a ``DataLoader``).
        progress: Show a progress bar (tqdm).
        Others: As :func:`kronecker_factors`.

    Returns:
        ``{module name: KroneckerFactors(A, G)}``, and ``{module name: UnitwiseFactors(F)}``
        for normalisation layers.
    """
    from tqdm.auto import tqdm

    registry = _registry(registry)
    plan = make_plan(model, registry, unsupported)
    fisher = as_enum(FisherType, fisher, "fisher")
    sums: dict[str, list[Tensor]] = {}
    #: tied blocks: each layout's (A, G) sums; their nearest Kronecker product at the end
    tied: dict[str, dict[bool, list[Tensor]]] = {}
    total = 0
    for inputs, targets in tqdm(data, desc="Kronecker factors", disable=not progress, unit="batch"):
        if fisher is FisherType.MC and generator is None:
            generator = _default_generator(targets.device)  # one stream for all batches
        request = _make_request(
            model,
            loss_fn,
            inputs,
            targets,
            fisher,
            kfac_approx,
            mc_samples,
            generator,
            unsupported,
            registry,
            plan,
            output_fn=output_fn,
        )
        # every batch is checked: a backend's support can depend on the batch (shapes)
        backend_obj = resolve_backend(registry, backend, request)
        n = int(targets.shape[0])
        g_weight = n if loss_fn.reduction == "mean" else 1
        for name, entry in backend_obj.compute(request).items():
            if isinstance(entry, UnitwiseFactors):  # scaled like G
                if name in sums:
                    sums[name][0].add_(entry.F, alpha=g_weight)
                else:
                    sums[name] = [entry.F.mul(g_weight)]
                continue
            layouts = getattr(entry, "layouts", None)
            if layouts is not None:  # a tie: each layout's factors summed, joined at the end
                for transposed, a_u, g_u in layouts:
                    acc = tied.setdefault(name, {}).get(transposed)
                    if acc is None:
                        tied[name][transposed] = [a_u.mul(n), g_u.mul(g_weight)]
                    else:
                        acc[0].add_(a_u, alpha=n)
                        acc[1].add_(g_u, alpha=g_weight)
                continue
            a, g = entry
            if name in sums:
                sums[name][0].add_(a, alpha=n)
                sums[name][1].add_(g, alpha=g_weight)
            else:
                sums[name] = [a.mul(n), g.mul(g_weight)]
        total += n
    if total == 0:
        raise ValueError("data yielded no batches; pass a non-empty iterable of (inputs, targets).")
    g_div = total if loss_fn.reduction == "mean" else 1
    out: dict[str, KroneckerFactors | UnitwiseFactors] = {}
    for name, parts in sums.items():
        if len(parts) == 1:
            out[name] = UnitwiseFactors(parts[0].div_(g_div))
        else:
            out[name] = KroneckerFactors(parts[0].div_(total), parts[1].div_(g_div))
    for name, by_layout in tied.items():
        layouts = [(t, a.div_(total), g.div_(g_div)) for t, (a, g) in by_layout.items()]
        pair = TiedKroneckerFactors(*combine_layouts(layouts))
        pair.layouts = layouts
        out[name] = pair
    return {layer.name: out[layer.name] for layer in plan if layer.name in out}
