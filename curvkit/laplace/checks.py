"""What the Laplace tools refuse, and why: non-finite data and parameters, bad priors and counts.

A Laplace approximation is a function of the parameters, every batch and the prior; one
non-finite value in any of them makes the curvature, the log marginal likelihood and every
prediction NaN, and the error that finally surfaces (an eigensolver that does not converge,
a prior that "does not fit") names the wrong culprit. These checks run where the value
enters and name it:

* :func:`check_parameters`: every parameter and floating buffer of the model is finite
  (one reduction per tensor);
* :class:`CheckedBatches`: every batch's inputs and targets are finite, as it is read;
* :func:`check_batch_loss`: a batch whose loss is non-finite although its inputs are finite
  (its values overflow the working dtype) is refused, naming the batch;
* :func:`locate_nonfinite_curvature`: when the accumulated curvature is non-finite, the batch
  whose own curvature is non-finite is found (only then: no cost on the normal path);
* :func:`check_prior_precision`, :func:`check_prior_mean`, :func:`check_count`,
  :func:`check_positive`: user values, with what is allowed and the fix.

Large but finite inputs that give a finite loss and curvature are accepted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import CurvkitError

__all__ = [
    "CheckedBatches",
    "NonFiniteInputError",
    "check_batch_loss",
    "check_count",
    "check_parameters",
    "check_positive",
    "check_prior_mean",
    "check_prior_precision",
    "locate_nonfinite_curvature",
]


class NonFiniteInputError(CurvkitError, ValueError):
    """A batch, parameter or buffer that is (or makes the curvature) non-finite.

    Attributes:
        batch: Index of the offending batch in the data's iteration order, or ``None``.
        name: Name of the offending parameter or buffer, or ``None``.
    """

    def __init__(self, message: str, *, batch: int | None = None, name: str | None = None) -> None:
        super().__init__(message)
        self.batch = batch
        self.name = name


def _census(t: Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return f"{nan + inf} of {t.numel()} entries non-finite ({nan} NaN, {inf} ±inf)"


def _is_finite(t: Tensor) -> bool:
    if not (t.is_floating_point() or t.is_complex()):
        return True  # integer class labels / token ids cannot be non-finite
    return bool(torch.isfinite(t).all())


def check_parameters(model: nn.Module) -> None:
    """Refuse a model with a non-finite parameter or floating buffer, naming it.

    Frozen parameters and buffers (e.g. BatchNorm running statistics) are checked too: they
    enter every output.
    """
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, tensor in items:
            if not _is_finite(tensor.detach()):
                raise NonFiniteInputError(
                    f"{kind} {name!r} {tuple(tensor.shape)} has {_census(tensor.detach())}; a Laplace approximation "
                    "around non-finite parameters is undefined (the curvature, the marginal likelihood and every "
                    "prediction would be NaN). Restore the model from a checkpoint taken before training diverged, "
                    "then fit.",
                    name=name,
                )


def _batch_tensors(batch: Any) -> tuple[Any, Any] | None:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return None


class CheckedBatches:
    """Re-iterable view of ``data`` that checks each ``(inputs, targets)`` batch as it is read.

    A batch with a non-finite input or target raises :class:`NonFiniteInputError` naming its
    index (in iteration order) and what is wrong. The check is one reduction per tensor.
    """

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.data):
            pair = _batch_tensors(batch)
            if pair is not None:
                for what, tensor in zip(("inputs", "targets"), pair):
                    if isinstance(tensor, Tensor) and not _is_finite(tensor):
                        raise NonFiniteInputError(
                            f"batch {index}: its {what} {tuple(tensor.shape)} have {_census(tensor)}. fit() refuses "
                            "them: one non-finite value makes the whole curvature and the log marginal likelihood "
                            "NaN. Drop or repair that batch (e.g. keep the rows where torch.isfinite(x) holds) "
                            "before fitting.",
                            batch=index,
                        )
            yield batch


def _largest(t: Any) -> str:
    if isinstance(t, Tensor) and t.numel() and (t.is_floating_point() or t.is_complex()):
        return f"{float(t.detach().abs().max()):.3g}"
    return "n/a"


def check_batch_loss(index: int, loss: Tensor, inputs: Any, outputs: Tensor) -> None:
    """Refuse a batch whose loss is non-finite although its inputs and the parameters are finite."""
    if bool(torch.isfinite(loss)):
        return
    dtype = outputs.dtype
    limit = f" (largest finite value {torch.finfo(dtype).max:.3g})" if dtype.is_floating_point else ""
    raise NonFiniteInputError(
        f"batch {index}: its loss is {float(loss)} in {dtype}{limit} although its inputs and the parameters are "
        f"finite — the largest |input| is {_largest(inputs)} and the largest |output| {_largest(outputs)}: the "
        f"values overflow {dtype}. fit() refuses the batch rather than record a non-finite loss. Rescale or "
        "normalise the inputs, drop the batch, or fit a float64 copy of the model.",
        batch=index,
    )


def curvature_is_finite(curvature: Any) -> bool:
    """Whether every tensor of every block operator of a ``KroneckerCurvature`` (factors,
    a corrected spectrum, a unit-wise ``F``) is finite."""
    for block in curvature.blocks:
        if not all(bool(torch.isfinite(t).all()) for t in block.tensors()):
            return False
    return True


def locate_nonfinite_curvature(
    model: nn.Module, loss_fn: nn.Module, data: Iterable[Any], dtype: torch.dtype, **factor_kwargs: Any
) -> NonFiniteInputError:
    """The error to raise when the curvature over ``data`` came out non-finite.

    Recomputes the Kronecker factors batch by batch (only on this failure path) and names the
    first batch whose own factors are non-finite; if every batch is finite on its own, says
    that their sum overflows ``dtype``.
    """
    from curvkit.stats.api import accumulate_kronecker_factors

    for index, batch in enumerate(data):
        factors = accumulate_kronecker_factors(model, loss_fn, [batch], progress=False, **factor_kwargs)
        for layer, entry in factors.items():
            labels = ("F (per-unit blocks)",) if len(entry) == 1 else ("A (inputs)", "G (output gradients)")
            for which, t in zip(labels, entry):
                if not bool(torch.isfinite(t).all()):
                    inputs = _batch_tensors(batch)
                    largest = _largest(inputs[0]) if inputs is not None else "n/a"
                    return NonFiniteInputError(
                        f"batch {index}: its curvature is non-finite in {dtype} (layer {layer!r}, factor {which}: "
                        f"{_census(t)}) although its inputs, its loss and the parameters are finite — the largest "
                        f"|input| is {largest}, and products of such values overflow {dtype} (largest finite value "
                        f"{torch.finfo(dtype).max:.3g}). fit() refuses the batch. Rescale or normalise the inputs, "
                        "drop the batch, or fit a float64 copy of the model.",
                        batch=index,
                    )
    return NonFiniteInputError(
        f"the curvature summed over all batches is non-finite in {dtype}, although every batch's own curvature, "
        "every loss and the parameters are finite: the sum overflows. Rescale or normalise the inputs, or fit a "
        "float64 copy of the model."
    )


def _as_tensor(value: Any) -> Tensor:
    """A user's number or tensor as a tensor to check (a number on the CPU, where it is)."""
    if isinstance(value, Tensor):
        return value.detach()
    return torch.as_tensor(value, device="cpu")


def check_prior_precision(value: Any, name: str = "prior_precision") -> None:
    """Refuse a prior precision that is not a finite, non-negative scalar or 1-d tensor.

    Its length (one value, one per block, one per parameter) is checked against the fitted
    curvature by :func:`curvkit.laplace.prior.block_priors`.
    """
    allowed = "a finite, non-negative number, or a 1-d tensor of them (one value, one per block, or one per parameter)"
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}; it must be {allowed}.")
    t = _as_tensor(value)
    if t.ndim > 1:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; it must be {allowed}. Flatten a per-parameter prior to (P,)."
        )
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{name} has dtype {t.dtype}; it must be {allowed}.")
    bad = ~torch.isfinite(t.double()) | (t.double() < 0)
    if bool(bad.any()):
        index = int(bad.reshape(-1).nonzero()[0])
        entry = float(t.reshape(-1)[index])
        where = "" if t.ndim == 0 else f" (entry {index} of {t.numel()})"
        raise ValueError(
            f"{name}={entry}{where} is not allowed; it must be {allowed}. A negative precision is not a Gaussian "
            "prior and a non-finite one is undefined. Pass a positive value (e.g. 1.0), or let "
            "optimize_prior_precision() choose it."
        )


def check_prior_mean(value: Any, num_params: int | None = None) -> None:
    """Refuse a prior mean that is not a finite scalar or a finite ``(P,)`` tensor."""
    allowed = "a finite number or a finite 1-d tensor with one entry per parameter"
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"prior_mean={value!r} is a {type(value).__name__}; it must be {allowed}.")
    t = _as_tensor(value)
    if t.ndim > 1 or (num_params is not None and t.ndim == 1 and t.shape[0] not in (1, num_params)):
        expected = "" if num_params is None else f" ({num_params} parameters)"
        raise ValueError(
            f"prior_mean has shape {tuple(t.shape)}; it must be {allowed}{expected}. Pass a scalar, or a "
            "tensor of the flat parameter vector's length."
        )
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"prior_mean has {_census(t)}; it must be {allowed}.")


def check_count(name: str, value: Any, minimum: int, fix: str) -> int:
    """Refuse a count that is not an integer ``>= minimum``; return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is not allowed; it must be an integer >= {minimum}. {fix}")
    return value


def check_positive(name: str, value: Any, fix: str = "") -> float:
    """Refuse a value that is not a finite positive number; return it as a float."""
    number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name}={value!r} is not allowed; it must be a finite positive number. {fix}".rstrip())
    return number
