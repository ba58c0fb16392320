"""Shared linear-operator plumbing: input formats, dense view, SciPy and curvlinops export.

Operators here act on the flat parameter vector ``θ = [p_1.flatten(), p_2.flatten(), ...]``.
They accept

* a flat vector ``(P,)`` or matrix ``(P, K)``;
* a list of parameter-shaped tensors (a vector), or of tensors with a trailing column
  dimension ``(*p.shape, K)`` (a matrix, curvlinops' tensor-list convention);

and answer in the same format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["BlockDiagonalEigen", "FlatOperator"]


class FlatOperator:
    """Base of the symmetric operators of :mod:`curvkit.laplace` (subclasses define
    :meth:`_matmat` on ``(P, K)`` tensors, :attr:`param_shapes`, :attr:`dtype`, :attr:`device`)."""

    param_shapes: list[torch.Size]

    @property
    def dtype(self) -> torch.dtype:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    def _matmat(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def num_params(self) -> int:
        """``P``, the number of parameters the operator acts on."""
        return sum(s.numel() for s in self.param_shapes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def __matmul__(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Multiply onto a flat vector/matrix or a list of parameter-shaped tensors."""
        flat, restore = self._prepare(x)
        return restore(self._matmat(flat))

    def matmat(self, x: Tensor | Sequence[Tensor]) -> Tensor | list[Tensor]:
        """Same as ``self @ x``."""
        return self @ x

    def to_dense(self) -> Tensor:
        """The operator as a dense ``(P, P)`` matrix (for small models)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def _prepare(self, x: Tensor | Sequence[Tensor]) -> tuple[Tensor, Callable[[Tensor], Any]]:
        p = self.num_params
        if isinstance(x, Tensor):
            if x.ndim not in (1, 2) or x.shape[0] != p:
                raise ValueError(
                    f"a tensor multiplied onto this operator must have shape ({p},) or ({p}, K); got {tuple(x.shape)}. "
                    "Pass a list of parameter-shaped tensors for the structured format."
                )
            self._check_dtype(x)
            if x.ndim == 1:
                return x.unsqueeze(1), lambda y: y.squeeze(1)
            return x, lambda y: y
        if not isinstance(x, (list, tuple)) or not all(isinstance(t, Tensor) for t in x):
            raise TypeError(
                f"expected a tensor or a list of tensors, got {type(x).__name__}; pass a flat ({p},) or ({p}, K) "
                "tensor or a list of parameter-shaped tensors."
            )
        shapes = self.param_shapes
        if len(x) != len(shapes):
            raise ValueError(f"expected a list of {len(shapes)} tensors (one per parameter), got {len(x)}.")
        for t in x:
            self._check_dtype(t)
        if all(t.shape == s for t, s in zip(x, shapes)):
            flat = torch.cat([t.reshape(-1, 1) for t in x])

            def restore_vec(y: Tensor) -> list[Tensor]:
                return [part.reshape(s) for part, s in zip(y.split([s.numel() for s in shapes]), shapes)]

            return flat, restore_vec
        cols = {t.shape[-1] for t in x if t.ndim > 0}
        if len(cols) == 1 and all(t.ndim == len(s) + 1 and t.shape[:-1] == s for t, s in zip(x, shapes)):
            k = cols.pop()
            flat = torch.cat([t.reshape(-1, k) for t in x])

            def restore_mat(y: Tensor) -> list[Tensor]:
                parts = y.split([s.numel() for s in shapes])
                return [part.reshape(*s, k) for part, s in zip(parts, shapes)]

            return flat, restore_mat
        raise ValueError(
            f"list entries must have the parameter shapes {[tuple(s) for s in shapes]} (a vector) or those shapes "
            f"plus one common trailing dimension K (a matrix); got {[tuple(t.shape) for t in x]}."
        )

    def _check_dtype(self, x: Tensor) -> None:
        if x.dtype != self.dtype:
            raise ValueError(f"input dtype {x.dtype} differs from the operator's {self.dtype}; cast it with .to().")

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` that calls this operator (float64 NumPy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def apply(v: Any) -> Any:
            t = torch.as_tensor(np.asarray(v), dtype=self.dtype, device=self.device)
            one = t.ndim == 1
            out = self._matmat(t.reshape(self.num_params, -1))
            out = out.squeeze(1) if one else out
            return out.detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply, dtype=np.float64)

    def to_curvlinops(self) -> Any:
        """This operator as a curvlinops ``PyTorchLinearOperator`` (self-adjoint), usable
        wherever curvlinops accepts one (e.g. ``curvlinops.hutchinson_trace``, ``@`` chains,
        ``.to_scipy()``). Imports curvlinops on call."""
        from curvkit.laplace.interop import as_curvlinops

        return as_curvlinops(self)


class BlockDiagonalEigen:
    """``C = Q diag(λ) Qᵀ`` of a block-diagonal flat operator
    (:class:`~curvkit.laplace.KroneckerCurvature`): each block's eigendecomposition placed
    at its entries' positions in the flat vector (the protocol's ``eigen()``).

    Attributes:
        blocks: Per block, its operator's eigendecomposition.
    """

    def __init__(self, curvature: Any, blocks: list[Any]) -> None:
        self.curvature = curvature
        self.blocks = blocks

    @property
    def values(self) -> Tensor:
        """The ``P`` eigenvalues, each at its block's entry of the flat vector."""
        c = self.curvature
        out = torch.empty(c.num_params, 1, dtype=c.dtype, device=c.device)
        for i, eig in enumerate(self.blocks):
            c.scatter(out, i, eig.values.unsqueeze(0))
        return out[:, 0]

    def _map(self, x: Tensor | Sequence[Tensor], forward: bool) -> Any:
        c = self.curvature
        flat, restore = c._prepare(x)
        out = torch.empty_like(flat)
        for i, eig in enumerate(self.blocks):
            v = c.gather(i, flat)
            c.scatter(out, i, eig.rotate(v) if forward else eig.unrotate(v))
        return restore(out)

    def rotate(self, x: Tensor | Sequence[Tensor]) -> Any:
        """``Qᵀ x`` (flat ``(P,)``/``(P, K)`` or a list of parameter-shaped tensors)."""
        return self._map(x, True)

    def unrotate(self, x: Tensor | Sequence[Tensor]) -> Any:
        """``Q x``."""
        return self._map(x, False)

    def to_dense(self) -> tuple[Tensor, Tensor]:
        """``(λ (P,), Q (P, P))`` in the flat order (small models)."""
        c = self.curvature
        q = torch.zeros(c.num_params, c.num_params, dtype=c.dtype, device=c.device)
        lam = torch.zeros(c.num_params, dtype=c.dtype, device=c.device)
        for index, eig in zip(c.indices, self.blocks):
            i = index.reshape(-1)
            values, vectors = eig.to_dense()
            q[i.unsqueeze(1), i.unsqueeze(0)] = vectors.to(c.dtype)
            lam[i] = values.to(c.dtype)
        return lam, q
