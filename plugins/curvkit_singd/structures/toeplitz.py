"""Lower and upper triangular Toeplitz structures, with FFT fast paths."""

from __future__ import annotations

from functools import cache
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.structures.base import FactorStructure
from curvkit_singd.structures.base import GroupStructure, _compute_dtype

# ==========================================================================================
# Triangular Toeplitz
# ==========================================================================================


@cache
def _fft_len(d: int) -> int:
    """The smallest ``2^a 3^b 5^c >= 2d − 1`` (no wrap-around into the first ``d`` outputs
    of a circular convolution; smooth sizes are 1.5–2× faster than the next power of two)."""
    target = max(1, 2 * d - 1)
    best = 1 << (target - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            n = p35
            while n < target:
                n *= 2
            best = min(best, n)
            p35 *= 3
        p5 *= 5
    return best


def _conv_last(v: Tensor, x: Tensor, lower: bool) -> Tensor:
    """Along the last axis of ``x`` (length ``d``): ``y_i = Σ_{j ≤ i} v[i−j] x_j`` (``lower``:
    a lower-triangular Toeplitz product) or ``y_i = Σ_{j ≥ i} v[j−i] x_j`` (upper). FFTs run
    along the last (contiguous) axis, in float32 for half-precision inputs."""
    d = v.shape[0]
    if d == 0:
        return x.clone()
    ct = _compute_dtype(torch.promote_types(v.dtype, x.dtype))
    n = _fft_len(d)
    vf = torch.fft.rfft(v.to(ct), n=n)
    if not lower:  # correlation: v[(j − i) mod n], zero where it wraps since n >= 2d − 1
        vf = vf.conj()
    f = torch.fft.rfft(x.to(ct), n=n, dim=-1)
    y = torch.fft.irfft(f.mul_(vf), n=n, dim=-1)[..., :d]  # in place: one spectrum-sized buffer less
    return y.to(x.dtype)


def _padded(x: Tensor, n: int, dtype: torch.dtype) -> Tensor:
    """``x`` (``(m, d)``, any strides: a transposed view is copied only once, here) in a
    zeroed ``(m, n)`` buffer: the FFTs then transform a contiguous array of their own length
    instead of padding a copy of it (``rfft(x, n=n)`` fills and copies a second buffer)."""
    m, d = x.shape
    buf = torch.empty((m, n), dtype=dtype, device=x.device)
    buf[:, :d].copy_(x)
    buf[:, d:].zero_()
    return buf


def _sandwich_rows(v: Tensor, x: Tensor, lower: bool) -> Tensor:
    """``x T Tᵀ`` for a 2-D ``x`` of any strides (``T``: lower/upper triangular Toeplitz of
    ``v``): ``Tᵀ`` then ``T`` along the rows, in one zero-padded buffer whose tail is
    re-zeroed in place for the truncation between the two products, with one spectrum of
    ``v`` for both."""
    d = v.shape[0]
    if d == 0:
        return x.clone()
    ct = _compute_dtype(torch.promote_types(v.dtype, x.dtype))
    n = _fft_len(d)
    vf = torch.fft.rfft(v.to(ct), n=n)
    first, second = (vf.conj(), vf) if lower else (vf, vf.conj())
    y = torch.fft.irfft(torch.fft.rfft(_padded(x, n, ct)).mul_(first), n=n)
    y[:, d:].zero_()
    z = torch.fft.irfft(torch.fft.rfft(y).mul_(second), n=n)[:, :d]
    return z.to(x.dtype)


def _causal(v: Tensor, x: Tensor) -> Tensor:
    """``y_i = Σ_{j ≤ i} v[i−j] x_j`` along dim 0 (a lower-triangular Toeplitz product)."""
    return _conv_last(v, x.movedim(0, -1), lower=True).movedim(-1, 0)


def _diag_sums(S: Tensor) -> Tensor:
    """``t_j = Σ_i (S Sᵀ)_{i+j, i}`` for ``j = 0..d−1`` (autocorrelation of the rows)."""
    d = S.shape[0]
    ct = _compute_dtype(S.dtype)
    n = _fft_len(d)
    f = torch.view_as_real(torch.fft.rfft(S.T.to(ct), n=n, dim=-1))  # along the rows' axis
    power = f.square().sum(0).sum(-1)  # over rows first: contiguous reductions (10× faster than dim=(0, 2))
    return torch.fft.irfft(power, n=n)[:d].to(S.dtype)


class _Toeplitz(GroupStructure):
    LOWER: ClassVar[bool] = True

    def __init__(self, diags: Tensor) -> None:
        if diags.ndim != 1:
            raise ValueError(f"a {self.name} factor is stored as its {1}-D diagonal values, got {tuple(diags.shape)}.")
        self.diags = diags

    @classmethod
    def _from_sums(cls, t: Tensor) -> _Toeplitz:
        """From ``t_j`` = sum of the ``j``-th sub- plus super-diagonal (``t_0``: main)."""
        d = t.shape[0]
        counts = torch.arange(d, 0, -1, dtype=t.dtype, device=t.device)
        return cls(t / counts)

    @classmethod
    def from_dense(cls, matrix: Tensor) -> _Toeplitz:
        d = matrix.shape[0]
        t = (
            torch.stack([matrix.diagonal(-j).sum() + (matrix.diagonal(j).sum() if j else 0) for j in range(d)])
            if d
            else (matrix.new_zeros(0))
        )
        return cls._from_sums(t)

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float32, device: Any = None) -> _Toeplitz:
        v = torch.zeros(dim, dtype=dtype, device=device)
        if dim:
            v[0] = 1
        return cls(v)

    def to_dense(self) -> Tensor:
        d = self.dim
        i = torch.arange(d, device=self.diags.device)
        lag = i.unsqueeze(1) - i.unsqueeze(0)  # i - j
        if not self.LOWER:
            lag = -lag
        out = self.diags[lag.clamp(min=0)]
        return torch.where(lag >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))

    def tensors(self) -> dict[str, Tensor]:
        return {"diags": self.diags}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> _Toeplitz:
        return cls(tensors["diags"])

    @property
    def dim(self) -> int:
        return int(self.diags.shape[0])

    def matmul(self, other: Tensor) -> Tensor:
        # K X along X's columns: convolve the rows of Xᵀ (the FFTs run along the last axis)
        return _conv_last(self.diags, other.T, self.LOWER).T

    def rmatmul(self, other: Tensor) -> Tensor:
        # X K = (Kᵀ Xᵀ)ᵀ, Kᵀ is the mirrored Toeplitz matrix: along the last axis of X
        return _conv_last(self.diags, other, not self.LOWER)

    def square_right(self, x: Tensor) -> Tensor:
        """``x K Kᵀ`` (two FFT products along ``x``'s rows, one spectrum of ``K``)."""
        # x K = (Kᵀ xᵀ)ᵀ, then (x K) Kᵀ = (K (x K)ᵀ)ᵀ: along the last axis, Kᵀ then K
        return _sandwich_rows(self.diags, x.reshape(-1, x.shape[-1]), self.LOWER).reshape(x.shape)

    def square_left(self, x: Tensor) -> Tensor:
        """``K Kᵀ x`` (along ``x``'s columns; FFTs along a strided axis are 1.5–2× slower than
        along the contiguous one, so ``xᵀ`` is copied once, into the padded buffer, and the
        result is returned as a transposed view)."""
        return _sandwich_rows(self.diags, x.T, self.LOWER).T

    def sandwich_gram(self, x: Tensor) -> _Toeplitz:
        """Π̂(Kᵀ Xᵀ X K) from the rows ``X`` (``(m, d)``): the rows of
        ``X K`` by FFT, truncated in place, transformed again and their power spectra summed
        (the autocorrelation of the rows, :func:`_diag_sums`), without the copies of
        ``rmatmul`` followed by :meth:`gram`."""
        v, d = self.diags, self.dim
        if d == 0:
            return type(self)(v.clone())
        ct = _compute_dtype(torch.promote_types(v.dtype, x.dtype))
        n = _fft_len(d)
        vf = torch.fft.rfft(v.to(ct), n=n)
        if self.LOWER:  # X K = (Kᵀ Xᵀ)ᵀ: Kᵀ is upper triangular, a correlation
            vf = vf.conj()
        y = torch.fft.irfft(torch.fft.rfft(_padded(x, n, ct)).mul_(vf), n=n)
        y[:, d:].zero_()
        f = torch.view_as_real(torch.fft.rfft(y))
        t = torch.fft.irfft(f.square_().sum(0).sum(-1), n=n)[:d].to(v.dtype)
        return type(self)._from_sums(torch.cat([t[:1], 2 * t[1:]]))

    def trace(self) -> Tensor:
        return self.diags[:1].sum() * self.dim

    def diagonal(self) -> Tensor:
        return self.diags[:1].expand(self.dim).clone() if self.dim else self.diags.clone()

    def product(self, other: FactorStructure) -> _Toeplitz:
        assert isinstance(other, _Toeplitz)
        # triangular Toeplitz matrices commute; the product's values are a causal convolution
        return type(self)(_causal(self.diags, other.diags.to(self.diags.dtype)))

    @classmethod
    def gram(cls, S: Tensor) -> _Toeplitz:
        t = _diag_sums(S)
        return cls._from_sums(torch.cat([t[:1], 2 * t[1:]]))

    def inner(self) -> _Toeplitz:
        # t_j = Σ_{q ≥ j} (d − q) v_q v_{q−j}, for Kᵀ K and K Kᵀ alike
        v, d = self.diags, self.dim
        if d == 0:
            return type(self)(v.clone())
        w = torch.arange(d, 0, -1, dtype=v.dtype, device=v.device) * v
        ct = _compute_dtype(v.dtype)
        n = _fft_len(d)
        t = torch.fft.irfft(torch.fft.rfft(w.to(ct), n=n) * torch.fft.rfft(v.to(ct), n=n).conj(), n=n)[:d].to(v.dtype)
        return type(self)._from_sums(torch.cat([t[:1], 2 * t[1:]]))

    def frobenius_norm(self) -> Tensor:
        counts = torch.arange(self.dim, 0, -1, dtype=self.diags.dtype, device=self.diags.device)
        return torch.sqrt((counts * self.diags * self.diags).sum())

    def add_identity_(self, value: float) -> _Toeplitz:
        if self.dim:
            self.diags[0] += value
        return self


class TrilToeplitzStructure(_Toeplitz):
    """Lower-triangular Toeplitz (``d`` values, one per sub-diagonal); :math:`\\hat\\Pi`:
    the mean of the main diagonal, and for ``j ≥ 1`` the sum of the ``j``-th sub- and
    super-diagonals over their length (2 × the mean of the sub-diagonal for a symmetric ``M``)."""

    name = "triltoeplitz"
    LOWER = True


class TriuToeplitzStructure(_Toeplitz):
    """Upper-triangular Toeplitz; the mirror of :class:`TrilToeplitzStructure`."""

    name = "triutoeplitz"
    LOWER = False
