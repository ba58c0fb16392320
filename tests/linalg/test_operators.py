"""The core's block operators against dense float64 ground truth (torch.kron, block_diag,
eigh, slogdet, solve), and the conformance check catching broken operators."""

from __future__ import annotations

import pytest
import torch

from curvkit.linalg.kronecker import EigenbasisOperator, KroneckerOperator, UnitwiseOperator
from curvkit.linalg.operator import BlockOperator, CurvatureOperator, DenseOperator, SpectralOperator
from curvkit.testing import check_operator

DT = torch.float64


def _spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, rank or n, generator=g, dtype=DT)
    return m @ m.t()


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q.contiguous()


def _operators() -> dict[str, BlockOperator]:
    A, G = _spd(4, 0), _spd(3, 1)
    S = torch.rand(3, 4, generator=torch.Generator().manual_seed(2), dtype=DT) + 0.1
    F = torch.stack([_spd(2, 10 + i) for i in range(5)])
    return {
        "kronecker": KroneckerOperator(A, G),
        "kronecker, diagonal A": KroneckerOperator(torch.rand(4, dtype=DT) + 0.2, G),
        "kronecker, singular factors": KroneckerOperator(_spd(4, 3, rank=2), _spd(3, 4, rank=1)),
        "eigenbasis": EigenbasisOperator(_orthogonal(4, 5), _orthogonal(3, 6), S),
        "eigenbasis, identity Q_A": EigenbasisOperator(torch.empty(0, dtype=DT), _orthogonal(3, 6), S),
        "eigenbasis of a kronecker": EigenbasisOperator.from_kronecker(KroneckerOperator(A, G), S),
        "unitwise": UnitwiseOperator(F),
        "dense": DenseOperator(_spd(12, 7), (3, 4)),
        "spectral (a power)": KroneckerOperator(A, G).power(0.5, 0.3),
        "scaled": KroneckerOperator(A, G).scaled(2.5),
        "scaled default": DenseOperator(_spd(6, 8), (2, 3)).scaled(0.5),
    }


def _reference(name: str, op: BlockOperator) -> torch.Tensor:
    """The operator's matrix built by hand, independently of its own to_dense."""
    if isinstance(op, KroneckerOperator):
        a = torch.diag(op.A) if op.A.ndim == 1 else op.A
        return torch.kron(op.G, a)
    if isinstance(op, EigenbasisOperator):
        qg = op.Q_G if op.Q_G.numel() else torch.eye(op.S.shape[0], dtype=DT)
        qa = op.Q_A if op.Q_A.numel() else torch.eye(op.S.shape[1], dtype=DT)
        q = torch.kron(qg.contiguous(), qa.contiguous())
        return q @ torch.diag(op.S.reshape(-1)) @ q.t()
    if isinstance(op, UnitwiseOperator):
        return torch.block_diag(*op.F)
    if isinstance(op, DenseOperator):
        return op.matrix
    if name == "spectral (a power)":
        A, G = _spd(4, 0), _spd(3, 1)
        evals, evecs = torch.linalg.eigh(torch.kron(G, A) + 0.3 * torch.eye(12, dtype=DT))
        return evecs @ torch.diag(evals.sqrt()) @ evecs.t()
    if name == "scaled":
        return 2.5 * torch.kron(_spd(3, 1), _spd(4, 0))
    return 0.5 * _spd(6, 8)


@pytest.mark.parametrize("name", list(_operators()))
def test_operator_against_dense_ground_truth(name):
    op = _operators()[name]
    assert isinstance(op, CurvatureOperator)
    ref = _reference(name, op)
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-11, atol=1e-11)
    d_out, k = op.matrix_shape
    n = d_out * k
    g = torch.Generator().manual_seed(3)
    m = torch.randn(d_out, k, generator=g, dtype=DT)
    torch.testing.assert_close(op @ m, (ref @ m.reshape(-1)).reshape(d_out, k))
    stack = torch.randn(2, 3, d_out, k, generator=g, dtype=DT)
    torch.testing.assert_close(op @ stack, (stack.reshape(6, n) @ ref).reshape(stack.shape))
    cols = torch.randn(n, 5, generator=g, dtype=DT)
    torch.testing.assert_close(op @ cols, ref @ cols)
    torch.testing.assert_close(op @ cols[:, 0], ref @ cols[:, 0])
    torch.testing.assert_close(op.trace(), ref.trace())
    torch.testing.assert_close(op.diagonal().reshape(-1), ref.diagonal())
    for shift in (0.7, 2.0):
        shifted = ref + shift * torch.eye(n, dtype=DT)
        torch.testing.assert_close(op.logdet(shift), torch.linalg.slogdet(shifted)[1])
        torch.testing.assert_close(op.power(-1, shift) @ cols, torch.linalg.solve(shifted, cols))
        evals, evecs = torch.linalg.eigh(shifted)
        root = evecs @ torch.diag(evals.rsqrt()) @ evecs.t()
        torch.testing.assert_close(op.power(-0.5, shift).to_dense(), root)
    lam, q = op.eigen().to_dense()
    torch.testing.assert_close(q @ torch.diag(lam) @ q.t(), ref)
    torch.testing.assert_close(lam.sort().values, torch.linalg.eigvalsh(ref).clamp_min(0), atol=1e-10, rtol=1e-10)
    # a shift that varies over the entries (laid out like the matrix form) goes through the dense matrix
    diag = torch.linspace(0.5, 1.5, n, dtype=DT)
    torch.testing.assert_close(op.logdet(diag.reshape(d_out, k)), torch.logdet(ref + torch.diag(diag)))
    torch.testing.assert_close(
        op.power(-1, diag.reshape(d_out, k)) @ cols, torch.linalg.solve(ref + torch.diag(diag), cols)
    )
    assert not check_operator(op, name=name)


def test_powers_compose_and_scale():
    A, G = _spd(4, 0), _spd(3, 1)
    op = KroneckerOperator(A, G)
    dense = torch.kron(G, A)
    inv = op.power(-1, 0.5)
    # (C + 0.5)^{-1} is an operator itself: its logdet, trace, power and eigen are closed forms
    torch.testing.assert_close(inv.logdet(), -torch.logdet(dense + 0.5 * torch.eye(12, dtype=DT)))
    torch.testing.assert_close(inv.power(-1).to_dense(), dense + 0.5 * torch.eye(12, dtype=DT))
    torch.testing.assert_close(inv.trace(), torch.linalg.inv(dense + 0.5 * torch.eye(12, dtype=DT)).trace())
    torch.testing.assert_close((op * 3.0).to_dense(), 3 * dense)
    torch.testing.assert_close(op.scaled(2.0).logdet(1.0), torch.logdet(2 * dense + torch.eye(12, dtype=DT)))
    assert isinstance(inv, SpectralOperator) and isinstance(inv, CurvatureOperator)


def test_bad_inputs_are_refused_with_the_operator_named():
    op = KroneckerOperator(_spd(4, 0), _spd(3, 1), label="fc1")
    with pytest.raises(ValueError, match=r"KroneckerOperator 'fc1' acts on matrices \(3, 4\)"):
        op @ torch.zeros(4, 3, dtype=DT)
    with pytest.raises(ValueError, match="input dtype torch.float32 differs"):
        op @ torch.zeros(3, 4)
    with pytest.raises(ValueError, match="shift must be finite and non-negative"):
        op.logdet(-1.0)
    with pytest.raises(ValueError, match=r"shift of shape \(12,\)"):
        op.power(-1, torch.ones(12, dtype=DT))
    singular = KroneckerOperator(_spd(4, 3, rank=2), _spd(3, 1), label="fc2")
    with pytest.raises(ValueError, match="KroneckerOperator 'fc2' \\+ shift is singular.*p=-1"):
        singular.power(-1)
    assert singular.logdet() == float("-inf")
    with pytest.raises(ValueError, match="scale=-1.0 must be finite and non-negative"):
        op.scaled(-1.0)
    with pytest.raises(ValueError, match="A is torch.float32 but G is torch.float64"):
        KroneckerOperator(torch.eye(2), torch.eye(2, dtype=DT))


def test_float32_operator_passes_at_its_precision():
    op = KroneckerOperator(_spd(5, 0).float(), _spd(4, 1).float())
    assert not check_operator(op)


class _NoEigen(DenseOperator):
    def eigen(self):
        raise NotImplementedError("_NoEigen has no eigen(): no structure to exploit")


class _VagueNoEigen(DenseOperator):
    def eigen(self):
        raise NotImplementedError


class _WrongTrace(KroneckerOperator):
    def trace(self):
        return super().trace() * (1 + 1e-6)


class _AsymmetricApply(KroneckerOperator):
    def apply(self, v):
        return self.G @ v @ torch.triu(self.A)


class _WrongInverse(KroneckerOperator):
    def power(self, p, shift=0.0, /):
        return super().power(p, 0.0 if p < 0 else shift)


def test_the_check_catches_broken_operators():
    A, G = _spd(4, 0), _spd(3, 1)
    with pytest.raises(AssertionError, match=r"trace\(\) is off"):
        check_operator(_WrongTrace(A, G))
    with pytest.raises(AssertionError, match="op @ x for a flat vector is off"):
        check_operator(_AsymmetricApply(A, G))
    with pytest.raises(AssertionError, match=r"power\(-1, .*\) @ x \(the damped inverse\) is off"):
        check_operator(_WrongInverse(A, G))
    with pytest.raises(AssertionError, match="does not satisfy CurvatureOperator"):
        check_operator(torch.eye(3))
    # an operation it cannot do: a NotImplementedError naming operator and operation is reported
    assert check_operator(_NoEigen(_spd(6, 2), (2, 3))) == ["logdet", "power", "eigen"]
    with pytest.raises(AssertionError, match="must name the operator"):
        check_operator(_VagueNoEigen(_spd(6, 2), (2, 3)))


def test_the_block_check_catches_a_method_whose_operator_is_wrong():
    """A K-FAC variant whose as_operator drops G's off-diagonal entries fails by name."""
    from dataclasses import replace

    import curvkit
    from curvkit.blocks import KroneckerBlock
    from curvkit.testing import check_block_operators

    class Sloppy(KroneckerBlock):
        def as_operator(self):
            op = super().as_operator()
            return _AsymmetricApply(op.A, op.G)

    spec = replace(curvkit.default_registry().methods.get("kfac"), name="sloppy", block_factory=Sloppy.from_config)
    with pytest.raises(AssertionError, match="method 'sloppy', mlp layer '0': op @ x"):
        check_block_operators(spec)

    class NotAnOperator(KroneckerBlock):
        def as_operator(self):
            return super().as_operator().to_dense()

    spec = replace(spec, block_factory=NotAnOperator.from_config)
    with pytest.raises(AssertionError, match="as_operator\\(\\) returned Tensor, which does not satisfy"):
        check_block_operators(spec)
