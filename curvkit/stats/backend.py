"""The statistics-backend contract: requests, capabilities, results.

A backend computes, for one batch, the Kronecker factors of every tracked layer,
normalised exactly as :func:`curvkit.kronecker_factors` documents (the batch is the whole
data set). It declares what it supports in a :class:`BackendCapabilities`; the core checks
a request against it before calling :meth:`StatisticsBackend.compute`, so a backend never
sees a request it did not claim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox
from curvkit.stats.plan import TrackingPlan

__all__ = [
    "BackendCapabilities",
    "FactorRequest",
    "KroneckerFactors",
    "StatisticsBackend",
    "TiedKroneckerFactors",
    "UnitwiseFactors",
]


class KroneckerFactors(NamedTuple):
    """The factor pair of one layer: ``G ⊗ A`` approximates its curvature block.

    Attributes:
        A: Input factor, ``(d_in + 1, d_in + 1)`` with a bias (the last row/column belongs
            to the appended constant input), else ``(d_in, d_in)``. For a layer with
            one-hot inputs (``nn.Embedding``, see :mod:`curvkit.stats.embedding`) ``A`` is
            diagonal and given as its diagonal, a 1-D ``(d_in,)`` tensor: ``G ⊗ diag(A)``.
        G: Output-gradient factor, ``(d_out, d_out)``.
    """

    A: Tensor
    G: Tensor


class TiedKroneckerFactors(KroneckerFactors):
    """The pair of a block whose weight is used in transposed layouts (a tied embedding
    and LM head), with the factors of each layout it was formed from.

    ``A``, ``G`` are the batch's nearest Kronecker product; :attr:`layouts` is
    :meth:`LayerStats.layout_factors` (each layout's ``(transposed, A_u, G_u)``, scaled like
    an untied block's), which :func:`curvkit.accumulate_kronecker_factors` adds up over
    batches before forming the data set's nearest Kronecker product.
    """

    layouts: list[tuple[bool, Tensor, Tensor]]


class UnitwiseFactors(NamedTuple):
    r"""The curvature of a unit-wise layer (a normalisation layer's scale and shift,
    :mod:`curvkit.stats.norms`): ``D`` exact ``k × k`` blocks, no Kronecker pair.

    ``F[i]`` is the block of unit ``i``'s parameters ``(γ_i, β_i)`` (``k = 2``, the shift
    last, like a bias column) or ``(γ_i,)`` (``k = 1``); units in the order of
    ``weight.flatten()``. It is scaled like ``G``: the Fisher of the loss as its
    ``reduction`` defines it, so ``blockdiag(F)`` is exactly the layer's diagonal blocks of
    the dense Fisher/GGN (per unit; the couplings between units are not part of it).
    ``kfac_approx`` does not apply (the blocks are exact). Test for it with
    ``isinstance(entry, UnitwiseFactors)`` before unpacking an ``(A, G)`` pair.

    Attributes:
        F: ``(D, k, k)``, symmetric positive semi-definite per unit.
    """

    F: Tensor


@dataclass(frozen=True)
class FactorRequest:
    """Everything a backend needs to compute the factors of one batch.

    Attributes:
        inputs: A tensor (``model(inputs)``), a mapping (``model(**inputs)``) or a tuple
            (``model(*inputs)``); see :mod:`curvkit.stats.model_io`.
        output_fn: Picks the logits from the model's output (``None``: the output itself,
            or its ``"logits"`` entry).
    """

    model: nn.Module
    loss_fn: nn.Module
    inputs: Any
    targets: Tensor
    fisher: FisherType
    kfac_approx: KFACApprox
    mc_samples: int
    generator: torch.Generator | None
    plan: TrackingPlan
    output_fn: Callable[[Any], Tensor] | None = None


def _names(values: Any) -> str:
    return ", ".join(repr(getattr(v, "value", getattr(v, "__name__", v))) for v in values)


@dataclass(frozen=True)
class BackendCapabilities:
    """What a backend can compute.

    Attributes:
        fisher_types: Supported Fisher types.
        approximations: Supported expand/reduce approximations.
        module_types: Module types it computes factors for (subclasses included).
        losses: Supported loss classes.
        reductions: Supported loss reductions.
        extra_check: Optional callable ``request -> list[str]`` of further reasons a
            request is refused (e.g. "Linear on 3-D inputs").
        model_io: Whether it accepts mapping/tuple inputs and an ``output_fn``.
        sites: Whether it handles blocks whose weight is used by several modules (tied
            weights), through functional calls, or split by rows (attention).
    """

    fisher_types: frozenset[FisherType]
    approximations: frozenset[KFACApprox]
    module_types: tuple[type[nn.Module], ...]
    losses: tuple[type[nn.Module], ...]
    reductions: frozenset[str] = frozenset({"mean", "sum"})
    extra_check: Callable[[FactorRequest], list[str]] | None = field(default=None, compare=False)
    model_io: bool = False
    sites: bool = False

    def reasons(self, request: FactorRequest, registry: Any = None) -> list[str]:
        """Why this backend cannot serve ``request`` (empty if it can)."""
        out = []
        if request.fisher not in self.fisher_types:
            out.append(f"fisher={request.fisher.value!r} (supports {_names(sorted(self.fisher_types))})")
        if request.kfac_approx not in self.approximations:
            out.append(
                f"kfac_approx={request.kfac_approx.value!r} (supports {_names(sorted(self.approximations))})"
            )
        if not isinstance(request.loss_fn, self.losses):
            out.append(f"loss {type(request.loss_fn).__name__} (supports {_names(self.losses)})")
        elif getattr(request.loss_fn, "reduction", None) not in self.reductions:
            out.append(f"reduction={request.loss_fn.reduction!r} (supports {_names(sorted(self.reductions))})")
        bad = sorted({type(layer.module).__name__ for layer in request.plan if not isinstance(layer.module, self.module_types)})
        if bad:
            out.append(f"module type(s) {', '.join(bad)} (supports {_names(self.module_types)})")
        if not self.model_io and (not isinstance(request.inputs, torch.Tensor) or request.output_fn is not None):
            out.append("inputs given as a mapping or tuple, or an output_fn (supports a tensor in, a tensor out)")
        if not self.sites:
            special = sorted(
                layer.name
                for layer in request.plan
                if len(layer.sites) > 1 or layer.is_part or any(s.functional for s in layer.sites)
            )
            if special:
                out.append(f"tied, shared or functionally used weights ({', '.join(map(repr, special))})")
        if self.extra_check is not None and not out:
            out.extend(self.extra_check(request))
        return out


@runtime_checkable
class StatisticsBackend(Protocol):
    """Contract of a statistics backend.

    Attributes:
        name: Registered name (``"hooks"``, ``"backpack"``, ``"asdl"``, ...).
        capabilities: What it supports.
    """

    name: str
    capabilities: BackendCapabilities

    def compute(self, request: FactorRequest) -> dict[str, KroneckerFactors | UnitwiseFactors]:
        """Factors of every tracked layer that ran in the forward pass, by name
        (:class:`UnitwiseFactors` for unit-wise layers, where the backend serves them)."""
