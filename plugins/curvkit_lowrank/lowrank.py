r"""Low-rank-plus-damping factors and the randomized inverters of RS-KFAC and SRE-KFAC.

A Kronecker factor :math:`X` (``d×d``, PSD) is represented by its top-``k`` eigenpairs,
:math:`X \approx U\,\mathrm{diag}(d)\,U^\top` with ``U`` (``d×k``) orthonormal. Its damped
inverse is applied exactly (for the low-rank matrix) in :math:`O(k\,d\,m)`:

.. math:: (U\,\mathrm{diag}(d)\,U^\top + \lambda I)^{-1} M
   = U\,\mathrm{diag}\!\big(\tfrac{1}{d+\lambda} - \tfrac{1}{\lambda}\big)\,U^\top M + \tfrac{1}{\lambda} M

and likewise from the right (Puiu 2022, ``X_reg_inverse_M`` / ``M_X_reg_inverse`` in
github:ConstantinPuiu/Randomized-KFACs). Directions outside ``span(U)`` get ``1/λ``.

Two decompositions produce ``(U, d)``:

* :func:`randomized_svd` (RS-KFAC): Halko–Martinsson–Tropp randomized range finder with
  ``niter`` power iterations re-orthonormalised by QR, then a small SVD — the algorithm of
  ``torch.svd_lowrank`` the author calls, re-implemented here with an explicit seeded
  generator; the right singular vectors and singular values serve as eigenpairs (valid for
  PSD factors).
* :func:`randomized_eigh` (SRE-KFAC): sketch, ``niter`` power iterations, QR, and a
  Rayleigh–Ritz step ``eigh(Qᵀ X Q)``.

Both keep ``k = min(d, rank)`` pairs from an ``ℓ = min(d, rank + oversampling)`` sketch and
zero eigenvalues below ``1e-10`` (the author's ``eps``). With ``rank ≥ d`` they are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from curvkit.linalg.damping import Damping, RelativeDamping
from curvkit.linalg.inverters import Inverter, KroneckerInverse, compute_dtype
from curvkit.numerics import all_finite
from curvkit.structures.base import FactorStructure

__all__ = [
    "EIGENVALUE_FLOOR",
    "LowRankEigenInverse",
    "LowRankFactor",
    "LowRankInverse",
    "RandomizedEighInverter",
    "RandomizedInverter",
    "RandomizedSVDInverter",
    "decompose_with_retry",
    "randomized_eigh",
    "randomized_svd",
]

#: Eigenvalues below this fraction of the largest are set to zero (Puiu's codes use an
#: absolute ``eps = 1e-10``; relative, so that a factor of tiny scale — a layer whose
#: statistics are small, or float64 factors of a few samples — keeps its spectrum).
EIGENVALUE_FLOOR = 1e-10


@dataclass
class LowRankFactor:
    r""":math:`X \approx U\,\mathrm{diag}(d)\,U^\top` with ``U`` (``dim×k``) orthonormal and
    ``d`` (``k``) the kept eigenvalues, largest first."""

    U: Tensor
    d: Tensor

    @property
    def dim(self) -> int:
        return int(self.U.shape[0])

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])

    def to_dense(self) -> Tensor:
        return (self.U * self.d) @ self.U.t()

    def largest(self) -> float:
        """The largest kept eigenvalue (0 for an empty factor)."""
        return float(self.d.max()) if self.d.numel() else 0.0

    def _coefficients(self, shift: float) -> Tensor:
        return 1.0 / (self.d + shift) - 1.0 / shift

    def solve_left(self, M: Tensor, shift: float) -> Tensor:
        """:math:`(X + sI)^{-1} M` for ``M`` of shape ``(dim, m)``."""
        _check_shift(shift)
        return self.U @ (self._coefficients(shift).unsqueeze(1) * (self.U.t() @ M)) + M / shift

    def solve_right(self, M: Tensor, shift: float) -> Tensor:
        """:math:`M (X + sI)^{-1}` for ``M`` of shape ``(m, dim)``."""
        _check_shift(shift)
        return ((M @ self.U) * self._coefficients(shift)) @ self.U.t() + M / shift


def _check_shift(shift: float) -> None:
    if not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"the damping shift of a low-rank factor must be finite and > 0, got {shift!r}")


def _floor(d: Tensor) -> Tensor:
    d = d.clamp_min(0)
    top = d.max() if d.numel() else d.new_zeros(())
    return torch.where(d > EIGENVALUE_FLOOR * top, d, torch.zeros_like(d))


def _sizes(dim: int, rank: int, oversampling: int) -> tuple[int, int]:
    return min(dim, rank + oversampling), min(dim, rank)


def _sketch(X: Tensor, width: int, generator: torch.Generator | None) -> Tensor:
    omega = torch.randn(X.shape[0], width, generator=generator, dtype=X.dtype, device="cpu")
    return X @ omega.to(X.device)


def randomized_svd(
    X: Tensor, rank: int, *, oversampling: int = 10, niter: int = 3, generator: torch.Generator | None = None
) -> LowRankFactor:
    """Top-``rank`` eigenpairs of a symmetric PSD ``X`` by randomized SVD (the algorithm of
    ``torch.svd_lowrank``: each power iteration multiplies by ``Xᵀ`` and ``X`` with a QR after
    each product); singular values and right singular vectors, largest first."""
    width, keep = _sizes(X.shape[0], rank, oversampling)
    Q = torch.linalg.qr(_sketch(X, width, generator)).Q
    for _ in range(niter):
        Q = torch.linalg.qr(X.t() @ Q).Q
        Q = torch.linalg.qr(X @ Q).Q
    B = Q.t() @ X  # width × dim
    _, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return LowRankFactor(Vh[:keep].t().contiguous(), _floor(S[:keep]))


def randomized_eigh(
    X: Tensor,
    rank: int,
    *,
    oversampling: int = 10,
    niter: int = 3,
    generator: torch.Generator | None = None,
    reorthonormalise: bool = True,
) -> LowRankFactor:
    """Top-``rank`` eigenpairs of a symmetric PSD ``X`` by a randomized range finder and a
    Rayleigh–Ritz step (SRE-KFAC's ``srevd_lowrank``). ``reorthonormalise=False`` reproduces
    the author's power iterations without QR in between (same subspace in exact arithmetic,
    less accurate in float32)."""
    width, keep = _sizes(X.shape[0], rank, oversampling)
    Y = _sketch(X, width, generator)
    for _ in range(niter):
        if reorthonormalise:
            Y = torch.linalg.qr(Y).Q
        Y = X @ Y
    Q = torch.linalg.qr(Y).Q
    B = Q.t() @ X @ Q
    evals, W = torch.linalg.eigh((B + B.t()) / 2)
    evals, W = evals.flip(0)[:keep], W.flip(1)[:, :keep]
    return LowRankFactor((Q @ W).contiguous(), _floor(evals))


def decompose_with_retry(
    decompose: Callable[[Tensor, torch.Generator], LowRankFactor], X: Tensor, generator: torch.Generator
) -> LowRankFactor | None:
    """``decompose(X, generator)`` in float32 at least, retried in float64 when it raises
    (a failed QR, SVD or eigh) or returns non-finite values; the result in the compute
    dtype, or ``None`` if both fail. A failed attempt leaves ``generator`` as it found it,
    so the retry draws the same sketch."""
    dtype = compute_dtype(X.dtype)
    for attempt in (dtype, torch.float64) if dtype != torch.float64 else (torch.float64,):
        state = generator.get_state()
        try:
            low = decompose(X.to(attempt), generator)
        except RuntimeError:  # a failed QR / SVD / eigh (torch.linalg.LinAlgError)
            generator.set_state(state)
            continue
        if all_finite(low.U) and all_finite(low.d):
            return LowRankFactor(low.U.to(dtype), low.d.to(dtype))
        generator.set_state(state)
    return None


class LowRankInverse(KroneckerInverse):
    r""":math:`\Delta = (G_k + s_G I)^{-1}\,\nabla\,(A_k + s_A I)^{-1}` with low-rank
    ``A_k``, ``G_k`` (factored damping)."""

    kind = "lowrank"

    def __init__(self, A: LowRankFactor, G: LowRankFactor, shift_A: float, shift_G: float) -> None:
        _check_shift(shift_A)
        _check_shift(shift_G)
        self.A, self.G = A, G
        self.shift_A, self.shift_G = float(shift_A), float(shift_G)

    def apply(self, grad: Tensor) -> Tensor:
        m = grad.to(self.A.U.dtype)
        return self.A.solve_right(self.G.solve_left(m, self.shift_G), self.shift_A).to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        shifts = torch.tensor([self.shift_A, self.shift_G], dtype=torch.float64, device="cpu")  # read with tolist()
        return {"U_A": self.A.U, "d_A": self.A.d, "U_G": self.G.U, "d_G": self.G.d, "shifts": shifts}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> LowRankInverse:
        s = tensors["shifts"].tolist()
        return cls(
            LowRankFactor(tensors["U_A"], tensors["d_A"]), LowRankFactor(tensors["U_G"], tensors["d_G"]), s[0], s[1]
        )


class LowRankEigenInverse(KroneckerInverse):
    r""":math:`(G_k\otimes A_k + \lambda I)^{-1}\nabla` (eigenbasis damping of the product):
    with :math:`C = U_G^\top\nabla U_A`,
    :math:`\Delta = \nabla/\lambda + U_G\big[C\oslash(d_G d_A^\top + \lambda) - C/\lambda\big]U_A^\top`."""

    kind = "lowrank-eigen"

    def __init__(self, A: LowRankFactor, G: LowRankFactor, lam_eff: float) -> None:
        _check_shift(lam_eff)
        self.A, self.G, self.lam_eff = A, G, float(lam_eff)

    def apply(self, grad: Tensor) -> Tensor:
        m = grad.to(self.A.U.dtype)
        c = self.G.U.t() @ m @ self.A.U
        inner = c / (torch.outer(self.G.d, self.A.d) + self.lam_eff) - c / self.lam_eff
        return (m / self.lam_eff + self.G.U @ inner @ self.A.U.t()).to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        lam = torch.tensor([self.lam_eff], dtype=torch.float64, device="cpu")  # read with tolist()
        return {"U_A": self.A.U, "d_A": self.A.d, "U_G": self.G.U, "d_G": self.G.d, "lam_eff": lam}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> LowRankEigenInverse:
        return cls(
            LowRankFactor(tensors["U_A"], tensors["d_A"]),
            LowRankFactor(tensors["U_G"], tensors["d_G"]),
            float(tensors["lam_eff"][0]),
        )


def low_rank_shifts(
    damping: Damping, A: FactorStructure, G: FactorStructure, a: LowRankFactor, g: LowRankFactor, lam: float
) -> tuple[float, float]:
    r"""Per-factor shifts for a factored damping. :class:`RelativeDamping` (``on="factors"``)
    is taken relative to the largest **kept** eigenvalue, :math:`s = \lambda\max(d)` (Puiu's
    codes; no extra eigenvalue computation); any other factored damping uses its own
    ``factor_shifts``."""
    if isinstance(damping, RelativeDamping):
        return lam * a.largest(), lam * g.largest()
    return damping.factor_shifts(A, G, lam)


class RandomizedInverter(Inverter):
    """Base of the randomized low-rank inverters.

    Args:
        rank: Target rank ``r`` (kept eigenpairs, at most the factor's size).
        oversampling: Extra sketch columns ``p`` (sketch width ``min(d, r + p)``).
        niter: Power iterations ``q``.
        seed: Seed of the Gaussian sketches; refresh ``i`` of a
            :class:`~curvkit_lowrank.rskfac.LowRankKroneckerBlock` uses ``seed`` and ``i``
            (see :meth:`prepare`), so runs and resumed runs are reproducible.
    """

    supports: ClassVar[frozenset[str]] = frozenset({"factored", "eigenbasis"})

    def __init__(self, rank: int = 220, oversampling: int = 10, niter: int = 3, seed: int = 0) -> None:
        for label, value, low in (("rank", rank, 1), ("oversampling", oversampling, 0), ("niter", niter, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{label}={value!r} must be an integer >= {low}")
        self.rank, self.oversampling, self.niter, self.seed = rank, oversampling, niter, int(seed)

    def decompose(self, X: Tensor, generator: torch.Generator) -> LowRankFactor:
        raise NotImplementedError

    def factor(self, factor: FactorStructure, generator: torch.Generator) -> LowRankFactor | None:
        """The low-rank representation of one factor (float32 at least, retried in float64);
        ``None`` if it is not finite."""
        return decompose_with_retry(lambda X, gen: self.decompose(X, gen), factor.to_dense(), generator)

    def prepare(
        self, A: FactorStructure, G: FactorStructure, damping: Damping, lam: float, *, seed: int | None = None
    ) -> KroneckerInverse | None:
        """Decompose both factors and build the damped low-rank inverse. ``seed`` (given by
        :class:`~curvkit_lowrank.rskfac.LowRankKroneckerBlock` from its refresh counter)
        varies the sketches between refreshes; without it every call draws the same sketches
        (deterministic, so a registered instance shared by several optimizers stays reproducible)."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + (seed or 0))
        a = self.factor(A, gen)
        g = self.factor(G, gen)
        if a is None or g is None:
            return None
        try:
            if damping.kind == "eigenbasis":
                return LowRankEigenInverse(a, g, damping.product_shift(a.d, g.d, lam))
            s_a, s_g = low_rank_shifts(damping, A, G, a, g, lam)
            return LowRankInverse(a, g, s_a, s_g)
        except ValueError:  # a zero factor under relative damping: no valid shift
            return None

    def describe(self) -> str:
        return f"{self.name}(rank={self.rank}, oversampling={self.oversampling}, niter={self.niter})"


class RandomizedSVDInverter(RandomizedInverter):
    """RS-KFAC's inverter: randomized SVD to rank ``r`` of each factor (:func:`randomized_svd`)."""

    name = "rsvd"

    def decompose(self, X: Tensor, generator: torch.Generator) -> LowRankFactor:
        return randomized_svd(X, self.rank, oversampling=self.oversampling, niter=self.niter, generator=generator)


class RandomizedEighInverter(RandomizedInverter):
    """SRE-KFAC's inverter: symmetric randomized eigendecomposition to rank ``r``
    (:func:`randomized_eigh`).

    Args:
        reorthonormalise: QR between power iterations (default; the author's code has none).
    """

    name = "sre"

    def __init__(
        self, rank: int = 220, oversampling: int = 10, niter: int = 3, seed: int = 0, reorthonormalise: bool = True
    ) -> None:
        super().__init__(rank, oversampling, niter, seed)
        self.reorthonormalise = bool(reorthonormalise)

    def decompose(self, X: Tensor, generator: torch.Generator) -> LowRankFactor:
        return randomized_eigh(
            X,
            self.rank,
            oversampling=self.oversampling,
            niter=self.niter,
            generator=generator,
            reorthonormalise=self.reorthonormalise,
        )
