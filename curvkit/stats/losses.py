r"""Fisher sources: the vectors backpropagated from the model output, per loss.

Write the loss as :math:`L = \frac{1}{Z}\sum_t \ell_t` over its *loss terms* ``t`` (one per
datum, or one per datum and sequence position when the output has extra dimensions),
with ``Z = N · R_loss`` for ``reduction="mean"`` and ``Z = 1`` for ``"sum"``. For
``MSELoss`` and ``BCEWithLogitsLoss`` with ``"mean"`` reduction PyTorch also averages
over the ``C`` output features, so :math:`\ell_t = \kappa \sum_c (\cdot)` with
``κ = 1/C`` (else ``κ = 1``).

For every loss term a Fisher type supplies ``M`` vectors :math:`v_{t,m}` with
:math:`\mathbb{E}\sum_m v_{t,m} v_{t,m}^\top = \nabla^2_{f}\ell_t`:

* empirical: ``M = 1``, :math:`\sqrt\kappa\,\nabla_f \ell^{\text{raw}}(f_t, y_t)`;
* MC: ``M = mc_samples``, the same at targets drawn from the model's predictive
  distribution (categorical, Gaussian with variance 1/2, Bernoulli), divided by
  :math:`\sqrt M`;
* type-2: ``M = C``, the columns of a symmetric square root of :math:`\nabla^2_f\ell_t`.

This reproduces curvlinops' ``KFACLinearOperator`` exactly, including the order in which
MC targets are drawn from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from curvkit.config import FisherType
from curvkit.errors import UnsupportedRequestError

__all__ = ["LossAdapter", "SUPPORTED_LOSSES", "loss_adapter"]

SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)


@dataclass(frozen=True)
class LossAdapter:
    """Per-loss knowledge needed to build backpropagated vectors.

    Attributes:
        loss_fn: The loss module.
        reduction: ``"mean"`` or ``"sum"``.
    """

    loss_fn: nn.Module
    reduction: str

    @property
    def is_cross_entropy(self) -> bool:
        return isinstance(self.loss_fn, nn.CrossEntropyLoss)

    # --- shapes -----------------------------------------------------------------------

    def class_dim(self, output: Tensor, target: Tensor) -> int:
        """Where the classes are in ``output``: ``1`` for PyTorch's ``(N, C, ...)`` layout,
        ``-1`` for class-last outputs (``MSELoss``/``BCEWithLogitsLoss``, and language-model
        logits ``(N, T, C)`` with targets ``(N, T)``, as Hugging Face models return them).

        When the shapes fit both layouts (``T`` equal to the number of classes), PyTorch's
        is taken, as ``CrossEntropyLoss`` itself does.

        Raises:
            UnsupportedRequestError: The shapes fit neither layout.
        """
        if not self.is_cross_entropy:
            if output.shape != target.shape:
                raise UnsupportedRequestError(
                    f"{type(self.loss_fn).__name__} needs targets shaped like the output; got "
                    f"output {tuple(output.shape)} and target {tuple(target.shape)}."
                )
            return -1
        if output.ndim < 2:
            raise UnsupportedRequestError(
                f"CrossEntropyLoss output of shape {tuple(output.shape)} has no batch "
                "dimension; pass outputs of shape (N, C, ...)."
            )
        if target.is_floating_point():
            raise UnsupportedRequestError(
                "CrossEntropyLoss with class-probability targets is not supported; pass "
                "integer class indices of shape (N, ...)."
            )
        first = output.ndim == target.ndim + 1 and output.shape[:1] == target.shape[:1]
        first = first and output.shape[2:] == target.shape[1:]
        last = output.ndim >= 3 and output.ndim == target.ndim + 1 and output.shape[:-1] == target.shape
        if first:
            return 1
        if last:
            return -1
        raise UnsupportedRequestError(
            f"CrossEntropyLoss output {tuple(output.shape)} does not fit targets {tuple(target.shape)}: with targets "
            "(N, *) the output must be (N, C, *) (PyTorch's layout) or (N, *, C) (language-model logits)."
        )

    def to_rows(self, output: Tensor, target: Tensor, class_dim: int | None = None) -> tuple[Tensor, Tensor]:
        """Flatten output and target to ``(N·R_loss, C)`` rows (and matching targets)."""
        dim = self.class_dim(output, target) if class_dim is None else class_dim
        if self.is_cross_entropy:
            moved = output.movedim(1, -1) if dim == 1 else output
            return moved.reshape(-1, output.shape[dim]), target.reshape(-1)
        return output.reshape(-1, output.shape[-1]), target.reshape(-1, target.shape[-1])

    def from_rows(self, rows: Tensor, output: Tensor, class_dim: int = 1) -> Tensor:
        """Inverse of :meth:`to_rows` for a stack ``(M, N·R_loss, C)`` of row vectors."""
        m = rows.shape[0]
        if self.is_cross_entropy and class_dim == 1:
            moved = output.movedim(1, -1).shape
            return rows.reshape(m, *moved).movedim(-1, 2)
        return rows.reshape(m, *output.shape)

    def output_vectors(
        self,
        output: Tensor,
        target: Tensor,
        fisher: FisherType,
        mc_samples: int,
        generator: torch.Generator | None,
    ) -> Iterator[Tensor]:
        """The Fisher type's vectors (:meth:`vector_passes`), each shaped like ``output``."""
        dim = self.class_dim(output, target)
        rows, target_rows = self.to_rows(output, target, dim)
        for v in self.vector_passes(rows, target_rows, fisher, mc_samples, generator):
            yield self.from_rows(v.unsqueeze(0), output, dim)[0]

    def num_loss_terms(self, output: Tensor, target: Tensor) -> int:
        """``N · R_loss``: the number of terms a ``mean`` reduction divides by (per C)."""
        if self.is_cross_entropy:
            return target.numel()
        return target.shape[:-1].numel()

    def normaliser(self, output: Tensor, target: Tensor) -> float:
        """``Z``: what the loss is divided by, feature averaging excluded."""
        return float(self.num_loss_terms(output, target)) if self.reduction == "mean" else 1.0

    def kappa(self, num_features: int) -> float:
        if self.reduction == "mean" and not self.is_cross_entropy:
            return 1.0 / num_features
        return 1.0

    # --- vectors ----------------------------------------------------------------------

    def num_passes(self, num_features: int, fisher: FisherType, mc_samples: int) -> int:
        """``M``: how many vectors per loss term :meth:`vector_passes` yields."""
        if fisher == FisherType.TYPE2:
            return num_features
        return mc_samples if fisher == FisherType.MC else 1

    def vector_passes(
        self,
        rows: Tensor,
        target_rows: Tensor,
        fisher: FisherType,
        mc_samples: int,
        generator: torch.Generator | None,
    ) -> Iterator[Tensor]:
        """The ``M`` backpropagated vectors, one ``(N·R_loss, C)`` tensor at a time.

        Generated lazily, so that no ``(M, N·R_loss, C)`` stack is ever built (for type-2
        with many classes it would be large). MC targets are drawn in the same order as
        curvlinops draws them.
        """
        f = rows.detach()
        c = f.shape[-1]
        root_kappa = math.sqrt(self.kappa(c))
        if fisher == FisherType.TYPE2:
            probs = self._probabilities(f)
            for k in range(c):
                column = self._hessian_sqrt_column(f, probs, k)
                yield column if root_kappa == 1.0 else column.mul_(root_kappa)
            return
        if fisher == FisherType.EMPIRICAL:
            grad = self._raw_gradient(f, target_rows)
            yield grad if root_kappa == 1.0 else grad.mul_(root_kappa)
            return
        if generator is not None and generator.device.type != f.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the model's outputs are on {f.device}: MC targets are "
                f"drawn where the outputs are; create it with torch.Generator(device={str(f.device)!r})."
            )
        probs = self._probabilities(f)
        scale = root_kappa / math.sqrt(mc_samples)
        for _ in range(mc_samples):
            grad = self._raw_gradient(f, self.sample(f, generator, probs), probs)
            yield grad if scale == 1.0 else grad.mul_(scale)

    def _probabilities(self, f: Tensor) -> Tensor | None:
        """The predictive probabilities (softmax / sigmoid), shared by sampling and
        gradients so they are computed once; ``None`` for MSE."""
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            return f.softmax(dim=1)
        if isinstance(self.loss_fn, nn.BCEWithLogitsLoss):
            return f.sigmoid()
        return None

    def sample(self, f: Tensor, generator: torch.Generator | None, probs: Tensor | None = None) -> Tensor:
        """Targets drawn from the predictive distribution the loss implies (``probs``:
        :meth:`_probabilities` of ``f``, if already computed)."""
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            p = f.softmax(dim=1) if probs is None else probs
            return p.multinomial(num_samples=1, generator=generator).squeeze(-1)
        if isinstance(self.loss_fn, nn.MSELoss):
            noise = torch.randn(f.shape, device=f.device, dtype=f.dtype, generator=generator)
            return f + math.sqrt(0.5) * noise
        p = f.sigmoid() if probs is None else probs
        return p.bernoulli(generator=generator)

    def _raw_gradient(self, f: Tensor, y: Tensor, probs: Tensor | None = None) -> Tensor:
        """Gradient of the un-averaged per-term loss w.r.t. the output row (a new tensor)."""
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            grad = f.softmax(dim=1) if probs is None else probs.clone()
            grad[torch.arange(f.shape[0], device=f.device), y] -= 1.0
            return grad
        if isinstance(self.loss_fn, nn.MSELoss):
            return 2.0 * (f - y.to(f.dtype))
        return (f.sigmoid() if probs is None else probs) - y.to(f.dtype)

    def _hessian_sqrt_column(self, f: Tensor, probs: Tensor | None, k: int) -> Tensor:
        """Column ``k`` ``(rows, C)`` of a symmetric square root of the raw per-term Hessian
        (``probs``: :meth:`_probabilities` of ``f``, if already computed)."""
        rows, c = f.shape
        if isinstance(self.loss_fn, nn.MSELoss):
            column = f.new_zeros(rows, c)
            column[:, k] = math.sqrt(2.0)
            return column
        p = self._probabilities(f) if probs is None else probs
        assert p is not None
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            # H = diag(p) - p pᵀ = S Sᵀ with S[:, k] = √p_k (e_k − p)
            root = p[:, k : k + 1].sqrt()
            column = -root * p
            column[:, k] += root[:, 0]
            return column
        column = f.new_zeros(rows, c)
        s = p[:, k]
        column[:, k] = (s * (1 - s)).sqrt()
        return column


def loss_adapter(loss_fn: nn.Module) -> LossAdapter:
    """Validate ``loss_fn`` and return its :class:`LossAdapter`.

    Raises:
        UnsupportedRequestError: For other losses, other reductions, or options that
            change the likelihood (class weights, ``ignore_index`` in use, label
            smoothing, ``pos_weight``); the message says what is supported.
    """
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise UnsupportedRequestError(
            f"loss_fn={loss_fn!r} is not supported; use one of {names} (reduction 'mean' or 'sum')."
        )
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in ("mean", "sum"):
        raise UnsupportedRequestError(
            f"{type(loss_fn).__name__}(reduction={reduction!r}) is not supported; use "
            "reduction='mean' or reduction='sum'."
        )
    bad = []
    if getattr(loss_fn, "weight", None) is not None:
        bad.append("weight")
    if getattr(loss_fn, "pos_weight", None) is not None:
        bad.append("pos_weight")
    if getattr(loss_fn, "label_smoothing", 0.0):
        bad.append("label_smoothing")
    if bad:
        raise UnsupportedRequestError(
            f"{type(loss_fn).__name__} with {', '.join(bad)} set is not supported: it changes "
            "the likelihood the Fisher is taken of. Leave these options at their defaults."
        )
    return LossAdapter(loss_fn, reduction)
