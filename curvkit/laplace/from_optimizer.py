r"""A trained optimizer's curvature as a Laplace approximation.

Every optimizer block returns its curvature estimate as a block operator
(:meth:`~curvkit.blocks.CurvatureBlock.as_operator`): K-FAC's
:class:`~curvkit.linalg.kronecker.KroneckerOperator` ``G ⊗ A``, EKFAC's
:class:`~curvkit.linalg.kronecker.EigenbasisOperator`, a normalisation layer's exact
:class:`~curvkit.linalg.kronecker.UnitwiseOperator`, or whatever a method's block returns.
:func:`optimizer_curvature` places those operators at their layers' positions in the flat
parameter vector with the same layouts as :meth:`KroneckerCurvature.from_factors
<curvkit.laplace.KroneckerCurvature.from_factors>` (:func:`~curvkit.laplace.curvature.layer_blocks`:
row ranges of a parameter for attention's query/key/value blocks, the transpose for an
embedding or a tied LM head), so the result is a :class:`~curvkit.laplace.KroneckerCurvature`.

**What the optimizer's operators mean.** A block's operator is an exponential moving
average, over the statistics steps, of the batch curvature of the *training loss*
``L = (1/Z) Σ_t ℓ_t`` (one term per datum, or per datum and sequence position), without
the damping (the Laplace prior plays that role). For a mean-reduced loss
(``CrossEntropyLoss()``, ``Z`` the batch's number of terms) that is the **per-term mean**
curvature; a Laplace approximation needs the **sum** over the ``N`` training data
(:meth:`~curvkit.laplace.KroneckerCurvature.from_data` of the loss with
``reduction="sum"``), so the operators are multiplied by a scale:

* ``num_data=N`` (the usual case): scale ``N``, for statistics that are per-term means
  (``fisher="type-2"``/``"mc"`` with a ``reduction="mean"`` loss, or the empirical Fisher
  with ``loss_average="batch"``/``"batch+sequence"``; for sequence losses averaged over
  positions ``N`` counts the terms, data × positions). A loss that also averages over its
  ``C`` output features (``MSELoss``/``BCEWithLogitsLoss`` with ``"mean"``) needs
  ``num_outputs=C``: the scale is ``N·C`` (``N·C²`` under the empirical Fisher, whose
  output gradients carry ``1/C`` each).
* ``scale=s``: any other normalisation, e.g. a sum-reduced training loss, whose statistics
  are per-batch sums (``s = N / batch size``).

With statistics of the final parameters over the whole data set in the optimizer (e.g.
``ema_decay=0`` and a last statistics step on the full data), the result equals a fresh
:meth:`~curvkit.laplace.KroneckerCurvature.from_data` fit; after ordinary training it is
the EMA over the last statistics steps, at the parameters of those steps, which is the
approximation a user takes by reusing the optimizer's curvature.

Layers and parameters the optimizer does not precondition (modules without a layer
handler, layers the method cannot serve, blocks that never received statistics) are left
out of the curvature — fixed at their MAP values, as
:meth:`~curvkit.laplace.KroneckerCurvature.from_data` leaves out modules without a
handler — under ``unsupported="warn"`` (named in a warning) or ``"skip"``;
``"error"`` refuses them. A block whose method cannot give an operator is refused with
an error naming the method and the layer, and so is an optimizer none of whose blocks has
statistics yet.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from curvkit.config import FisherType, UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedModuleError
from curvkit.laplace.blocks import OperatorBlock
from curvkit.laplace.layout import FlatLayout, parameter_order
from curvkit.linalg.operator import BlockOperator

if TYPE_CHECKING:
    from curvkit.laplace.curvature import KroneckerCurvature

__all__ = ["curvature_scale", "optimizer_curvature", "optimizer_preconditioner", "statistics_normalisation"]

_FEATURE_AVERAGING = (nn.MSELoss, nn.BCEWithLogitsLoss)


def optimizer_preconditioner(optimizer: Any) -> Any:
    """The :class:`~curvkit.optim.Preconditioner` of ``optimizer`` (a
    :class:`~curvkit.optim.CurvatureOptimizer`), or ``optimizer`` itself if it is one.

    Raises:
        TypeError: Neither.
    """
    pre = getattr(optimizer, "preconditioner", optimizer)
    if not callable(getattr(pre, "curvature_blocks", None)):
        raise TypeError(
            f"expected a curvkit optimizer (curvkit.optim.CurvatureOptimizer, e.g. KFAC) or a "
            f"curvkit.optim.Preconditioner, got {type(optimizer).__name__}."
        )
    return pre


def statistics_normalisation(optimizer: Any) -> tuple[str, int, str]:
    """How the optimizer's statistics are normalised: ``(reduction, feature_power, what)``.

    ``reduction`` is ``"mean"`` (per-term means: each batch's curvature is divided by its
    number of loss terms), ``"sum"`` (per-batch sums) or ``"unknown"`` (a gradient-based
    method, ``MethodSpec(statistics="gradient")``: its blocks normalise what they keep
    themselves); ``feature_power`` is the power of
    ``1/C`` the statistics carry from a loss that also averages over its ``C`` output
    features (0: none; 1: MC/type-2 with ``MSELoss``/``BCEWithLogitsLoss`` ``"mean"``; 2:
    the empirical Fisher of such a loss); ``what`` describes the source for messages.
    """
    pre = optimizer_preconditioner(optimizer)
    loss_fn = pre.loss_fn
    features = isinstance(loss_fn, _FEATURE_AVERAGING) and getattr(loss_fn, "reduction", None) == "mean"
    config = pre.statistics_config
    if config is None:  # a gradient-based method: its blocks' normalisation is its own
        return "unknown", 0, f"method {pre.spec.name!r} builds its blocks from the step's gradient"
    if pre.fisher is FisherType.EMPIRICAL:
        average = config.loss_average
        what = f"the empirical Fisher with loss_average={average!r}"
        return ("sum" if average is None else "mean"), (2 if features and average is not None else 0), what
    reduction = getattr(loss_fn, "reduction", "mean")
    what = f"fisher={pre.fisher.value!r} with {type(loss_fn).__name__}(reduction={reduction!r})"
    return reduction, (1 if features else 0), what


def curvature_scale(
    optimizer: Any, num_data: int | None = None, scale: float | None = None, num_outputs: int | None = None
) -> float:
    """The factor that turns the optimizer's curvature into the curvature of the
    sum-reduced loss over the data set (see the module docstring).

    Raises:
        ValueError: Neither or both of ``num_data`` and ``scale``; ``num_data`` for
            statistics that are per-batch sums, or for a feature-averaging loss without
            ``num_outputs``; a value that is not positive.
    """
    if (num_data is None) == (scale is None):
        raise ValueError(
            "pass exactly one of num_data= (the number of training data N: the optimizer's per-datum mean curvature "
            f"is multiplied by N) or scale= (any other factor); got num_data={num_data!r}, scale={scale!r}."
        )
    if scale is not None:
        value = float(scale)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"scale={scale!r} must be a finite number > 0.")
        return value
    if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 1:
        raise ValueError(f"num_data={num_data!r} must be an integer >= 1 (the number of training data).")
    reduction, power, what = statistics_normalisation(optimizer)
    if reduction == "unknown":
        raise ValueError(
            f"{what}, so how its curvature is normalised is the method's own; pass scale= (the factor to the "
            "curvature of the sum-reduced loss over the data set) instead of num_data=."
        )
    if reduction == "sum":
        raise ValueError(
            f"the optimizer's statistics ({what}) are sums over each batch, so their scale depends on the batch size; "
            "pass scale=N / batch_size instead of num_data= (or train with a mean-reduced loss)."
        )
    if power:
        if num_outputs is None:
            raise ValueError(
                f"the optimizer's statistics ({what}) are also averaged over the loss's C output features; pass "
                f"num_outputs=C, or scale=num_data*C{'**2' if power == 2 else ''} directly."
            )
        return float(num_data) * float(num_outputs) ** power
    return float(num_data)


def _operator(pre: Any, layer: Any, block: Any) -> BlockOperator:
    """A snapshot of the block's operator (later optimizer steps do not change it)."""
    method = pre.spec.name
    try:
        op = block.as_operator()
    except (NotImplementedError, AttributeError, AssertionError, RuntimeError) as err:
        raise UnsupportedModuleError(
            f"method {method!r}, layer {layer.name!r}: its block ({type(block).__name__}) cannot give its curvature as "
            f"an operator ({type(err).__name__}: {err}); a Laplace approximation from this optimizer is not possible. "
            "Fit one from data with KroneckerLaplace / KroneckerCurvature.from_data."
        ) from err
    if not isinstance(op, BlockOperator):
        raise UnsupportedModuleError(
            f"method {method!r}, layer {layer.name!r}: as_operator() returned a {type(op).__name__}, not a block "
            "operator on the layer's (d_out, d_in [+1]) matrices (a curvkit.linalg.operator.BlockOperator), so it "
            "cannot be placed in the model's flat parameter vector."
        )
    return copy.deepcopy(op)


def _left_out(pre: Any, policy: UnsupportedPolicy, idle: list[str]) -> None:
    """Apply the unsupported-module policy to what the optimizer does not precondition
    (``idle``: layers whose block never received statistics, which take first-order steps)."""
    reasons = {f"layer {name!r}": reason for name, reason in pre.first_order_layers.items()}
    reasons.update(
        {
            f"layer {name!r}": "its block has no statistics (it never ran on a statistics step, or its module was "
            "called on a batch of one and broadcast), so it took first-order steps"
            for name in idle
        }
    )
    reasons.update({f"parameter {name!r}": reason for name, reason in pre.plan.first_order.items()})
    if not reasons or policy is UnsupportedPolicy.SKIP:
        return
    listed = "; ".join(f"{what}: {reason}" for what, reason in reasons.items())
    if policy is UnsupportedPolicy.ERROR:
        raise UnsupportedModuleError(
            f"the {pre.spec.name} optimizer has no curvature for: {listed}. They cannot be part of a Laplace "
            "approximation from it; pass unsupported='warn' or 'skip' to leave them out (fixed at their trained "
            "values), or fit from data with KroneckerLaplace, whose policy applies to modules without a handler only."
        )
    warnings.warn(
        f"the {pre.spec.name} optimizer has no curvature for: {listed}; they are left out of the Laplace "
        "approximation (fixed at their trained values). Pass unsupported='skip' to silence this.",
        stacklevel=4,
    )


def optimizer_curvature(
    cls: type[KroneckerCurvature],
    optimizer: Any,
    *,
    num_data: int | None = None,
    scale: float | None = None,
    num_outputs: int | None = None,
    separate_bias: bool = False,
    unsupported: UnsupportedPolicy | str = "warn",
    dtype: torch.dtype | None = None,
) -> KroneckerCurvature:
    """The body of :meth:`KroneckerCurvature.from_optimizer
    <curvkit.laplace.KroneckerCurvature.from_optimizer>`."""
    from curvkit.laplace.curvature import layer_blocks

    pre = optimizer_preconditioner(optimizer)
    policy = as_enum(UnsupportedPolicy, unsupported, "unsupported")
    factor = curvature_scale(pre, num_data, scale, num_outputs)
    pairs = pre.curvature_blocks()
    if not pairs:
        raise ValueError(f"the {pre.spec.name} optimizer preconditions no layer, so it has no curvature to use.")
    idle = [layer.name for layer, block in pairs if block.num_updates == 0]
    if len(idle) == len(pairs):
        raise ValueError(
            f"method {pre.spec.name!r}, layer {idle[0]!r}: the block has no statistics yet (no statistics step reached "
            "it; nor any other layer's), so there is no curvature; train at least one statistics step first."
        )
    _left_out(pre, policy, idle)
    pairs = [(layer, block) for layer, block in pairs if block.num_updates > 0]
    ops = [(layer, _operator(pre, layer, block)) for layer, block in pairs]
    if dtype is None:
        dtype = ops[0][1].dtype
        for _, op in ops[1:]:
            dtype = torch.promote_types(dtype, op.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32  # eigendecompositions need float32/64
    layers = [layer for layer, _ in pairs]
    layout = FlatLayout(layers, parameter_order(layers))  # type: ignore[arg-type]
    names = {id(p): n for n, p in pre.model.named_parameters()}
    blocks: list[OperatorBlock] = []
    for layer, op in ops:
        op = (op if op.dtype == dtype else op.to(dtype)).scaled(factor)
        try:
            blocks.extend(layer_blocks(layer, op, names, layout, separate_bias))
        except (ValueError, TypeError) as err:
            raise type(err)(f"method {pre.spec.name!r}: {err}") from err
    return cls(blocks)
