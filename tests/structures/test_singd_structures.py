"""The singd plugin's structures against dense float64 algebra and the ``singd`` package.

* ``curvkit.testing.check_structure`` (the public conformance kit) for each;
* hypothesis property tests against the dense projection: ``Π̂`` is idempotent; matmul,
  rmatmul, the structured product, sums (``add_``), ``Π̂(S Sᵀ)`` (``gram``) and
  ``Π̂(KᵀK)`` (``inner``) and ``K Kᵀ`` applied from either side (``square_right``,
  ``square_left``, ``square``) agree with dense algebra; trace, diagonal, Frobenius and max
  norms agree with the dense matrix's;
* ``from_dense`` of a symmetric matrix equals the package's ``from_dense(...).to_dense()``
  for every structure the package has;
* the fast paths never warn (no dense fallback).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from curvkit_singd.structures import (
    GroupStructure,
    block_diagonal,
    bundled_structures,
    hierarchical,
    s_gram,
    s_inner,
    s_product,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from curvkit.structures import StructureFallbackWarning
from curvkit.testing import check_structure

STRUCTURES = [*bundled_structures(), block_diagonal(3), block_diagonal(1), hierarchical(3, 2), hierarchical(1, 4)]
IDS = [cls.name for cls in STRUCTURES]
DIMS = (1, 2, 5, 8, 13)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", STRUCTURES, ids=IDS)
def test_conformance_kit(cls):
    check_structure(cls, dims=DIMS)


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("cls", STRUCTURES, ids=IDS)
@settings(max_examples=15, deadline=None)
@given(d=st.integers(1, 17), n=st.integers(1, 6), seed=st.integers(0, 2**16), symmetric=st.booleans())
def test_properties_against_dense(cls, d, n, seed, symmetric):
    gen = torch.Generator().manual_seed(seed)
    m = _rand(gen, d, d)
    if symmetric:
        m = m + m.T
    with warnings.catch_warnings():
        warnings.simplefilter("error", StructureFallbackWarning)
        a = cls.from_dense(m)
        b = cls.from_dense(_rand(gen, d, d))
        A, B = a.to_dense(), b.to_dense()
        assert A.shape == (d, d)
        _close(cls.from_dense(A).to_dense(), A)  # idempotent
        x = _rand(gen, d, n)
        _close(a.matmul(x), A @ x)
        _close(a.rmatmul(x.T), x.T @ A)
        _close(s_product(a, b).to_dense(), A @ B)  # closed under products
        _close(s_gram(cls, x).to_dense(), cls.from_dense(x @ x.T).to_dense())
        _close(s_inner(a).to_dense(), cls.from_dense(A.T @ A).to_dense())
        _close(a.trace().reshape(()), A.trace())
        _close(a.diagonal(), A.diagonal())
        assert isinstance(a, GroupStructure)
        _close(a.frobenius_norm(), torch.linalg.matrix_norm(A))
        _close(a.max_abs(), A.abs().max())
        total = a.clone().add_(b, alpha=-0.5)
        _close(total.to_dense(), A - 0.5 * B)  # sums stay in the structure
        _close(a.clone().add_identity_(2.0).to_dense(), A + 2 * torch.eye(d, dtype=A.dtype))
        # K Kᵀ as SINGD's preconditioning applies it (fused FFTs for Toeplitz, arrowhead for
        # hierarchical, block-diagonal K Kᵀ, preallocated buffers for block-diagonal rmatmul)
        _close(a.square_right(x.T), x.T @ A @ A.T)
        _close(a.square_left(x), A @ A.T @ x)
        if hasattr(a, "square"):
            P = a.square()
            _close(P.rmatmul(x.T), x.T @ A @ A.T)
            _close(P.matmul(x), A @ A.T @ x)
        if hasattr(a, "sandwich_gram"):
            _close(a.sandwich_gram(x.T).to_dense(), cls.from_dense(A.T @ x @ x.T @ A).to_dense())
        if hasattr(a, "blocks"):
            out, work = torch.full((n, d), float("nan"), dtype=A.dtype), torch.empty(a.blocks.shape[0], n, a.BLOCK)
            _close(a.rmatmul(x.T, out=out, work=work.to(A.dtype)), x.T @ A)


# --- against the singd package ---------------------------------------------------------------

singd_structures = pytest.importorskip("singd.structures.blockdiagonal")


def _package_pairs():
    from singd.structures.blockdiagonal import Block3DiagonalMatrix, Block30DiagonalMatrix
    from singd.structures.dense import DenseMatrix
    from singd.structures.diagonal import DiagonalMatrix
    from singd.structures.hierarchical import Hierarchical3_2Matrix, Hierarchical15_15Matrix
    from singd.structures.trilbottomrightdiag import TrilBottomRightDiagonalMatrix
    from singd.structures.triltoeplitz import TrilToeplitzMatrix
    from singd.structures.triltopleftdiag import TrilTopLeftDiagonalMatrix
    from singd.structures.triubottomrightdiag import TriuBottomRightDiagonalMatrix
    from singd.structures.triutoeplitz import TriuToeplitzMatrix
    from singd.structures.triutopleftdiag import TriuTopLeftDiagonalMatrix

    import curvkit

    reg = curvkit.default_registry()
    return [
        ("dense", reg.structures.get("dense"), DenseMatrix),
        ("diagonal", reg.structures.get("diagonal"), DiagonalMatrix),
        ("block30diagonal", reg.structures.get("block30diagonal"), Block30DiagonalMatrix),
        ("block3diagonal", block_diagonal(3), Block3DiagonalMatrix),
        ("hierarchical15_15", reg.structures.get("hierarchical15_15"), Hierarchical15_15Matrix),
        ("hierarchical3_2", hierarchical(3, 2), Hierarchical3_2Matrix),
        ("triltoeplitz", reg.structures.get("triltoeplitz"), TrilToeplitzMatrix),
        ("triutoeplitz", reg.structures.get("triutoeplitz"), TriuToeplitzMatrix),
        ("triltopleftdiag", reg.structures.get("triltopleftdiag"), TrilTopLeftDiagonalMatrix),
        ("trilbottomrightdiag", reg.structures.get("trilbottomrightdiag"), TrilBottomRightDiagonalMatrix),
        ("triutopleftdiag", reg.structures.get("triutopleftdiag"), TriuTopLeftDiagonalMatrix),
        ("triubottomrightdiag", reg.structures.get("triubottomrightdiag"), TriuBottomRightDiagonalMatrix),
    ]


@pytest.mark.parametrize("name,ours,theirs", _package_pairs(), ids=[p[0] for p in _package_pairs()])
def test_from_dense_matches_package(name, ours, theirs):
    gen = torch.Generator().manual_seed(0)
    for d in (1, 2, 4, 7, 16, 33, 40):
        m = _rand(gen, d, d)
        m = (m + m.T).float()  # the package's sparse structures run in float32 (and lower) only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = theirs.from_dense(m).to_dense()
        torch.testing.assert_close(ours.from_dense(m).to_dense(), expected, rtol=1e-6, atol=1e-6)


def test_registered_with_the_plugin():
    import curvkit

    names = set(curvkit.default_registry().structures.names())
    assert {cls.name for cls in bundled_structures()} <= names
    assert {"dense", "diagonal"} <= names


def test_parameterised_names_resolve():
    from curvkit_singd.structures import resolve_structure

    import curvkit

    reg = curvkit.default_registry()
    assert resolve_structure("block7diagonal", reg).BLOCK == 7  # type: ignore[attr-defined]
    h = resolve_structure("hierarchical4_6", reg)
    assert (h.K1, h.K2) == (4, 6)  # type: ignore[attr-defined]
    with pytest.raises(Exception, match="nonesuch"):
        resolve_structure("nonesuch", reg)
    with pytest.raises(ValueError, match="block=0"):
        block_diagonal(0)


def test_s_all_finite_tells_overflow_from_non_finite():
    from curvkit_singd.structures import s_all_finite

    from curvkit.structures.base import DenseStructure, DiagonalStructure

    huge = DenseStructure(torch.full((3, 3), 3e38))  # finite, but its 2-norm overflows
    assert s_all_finite(huge, DiagonalStructure(torch.ones(2)))
    for bad in (float("nan"), float("inf"), -float("inf")):
        m = torch.eye(2)
        m[1, 0] = bad
        assert not s_all_finite(DiagonalStructure(torch.ones(2)), DenseStructure(m))
    h = hierarchical(1, 1).identity(2)  # an empty middle block is skipped
    assert s_all_finite(h)


@pytest.mark.parametrize("d", [5, 287, 300, 450, 785])
def test_symmetric_mm_equals_the_product(d):
    """``symmetric_mm`` (blocks on and above the diagonal, the rest mirrored) against one
    GEMM in float64, for ``Fᵀ F``, ``F Fᵀ`` and ``Fᵀ (A F)``; off the diagonal blocks the
    result is exactly symmetric."""
    from curvkit_singd.structures.base import symmetric_mm

    gen = torch.Generator().manual_seed(d)
    F = torch.randn(d, d, generator=gen, dtype=torch.float64)
    X = torch.randn(2 * d + 1, d, generator=gen, dtype=torch.float64)
    A = X.T @ X
    for left, right in [(F.T, F), (F, F.T), (F.T, A @ F), (X.T, X)]:
        got = symmetric_mm(left, right)
        torch.testing.assert_close(got, left @ right, rtol=1e-12, atol=1e-12 * float((left @ right).abs().max()))
        if d >= 288:
            h = round(d / 2) if d < 448 else round(d / 4)
            assert torch.equal(got[h:, :h], got[:h, h:].T)
