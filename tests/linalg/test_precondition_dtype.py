"""K-FAC's, EKFAC's and TEKFAC's ``precondition_dtype``: the preconditioning products take
bf16 operands (float32 accumulation) while the inverses are computed and stored in float32. Checked against the
float64 ground truth ``G̃⁻¹ V Ã⁻¹``, and shown to really run in bf16 (its result differs from
float32's by the bf16 rounding, not by nothing)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from curvkit.errors import ConfigError
from curvkit.linalg.inverters import EigenInverse, FactoredInverse, IdentityInverse, KroneckerInverse
from curvkit.optim import EKFAC, KFAC, SINGD, TEKFAC

BF16 = torch.bfloat16


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64)
    return x.t() @ x / (4 * n) + 0.1 * torch.eye(n, dtype=torch.float64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def pair():
    a, g = _spd(40, 0), _spd(24, 1)
    v = torch.randn(24, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = torch.linalg.inv(g) @ v @ torch.linalg.inv(a)
    return a, g, v, exact


def _factored(a: torch.Tensor, g: torch.Tensor) -> FactoredInverse:
    return FactoredInverse(torch.linalg.inv(a).float(), torch.linalg.inv(g).float())


def _eigen(a: torch.Tensor, g: torch.Tensor) -> EigenInverse:
    la, qa = torch.linalg.eigh(a)
    lg, qg = torch.linalg.eigh(g)
    return EigenInverse(qa.float(), qg.float(), torch.outer(lg, la).float())


@pytest.mark.parametrize("build", [_factored, _eigen], ids=["factored", "eigen"])
def test_bf16_products_match_float64_to_bf16_accuracy(pair, build):
    a, g, v, exact = pair
    full = build(a, g)
    low = full.with_product_dtype(BF16)
    assert low is not None and low.product_dtype == BF16
    grad = v.float()
    out = low.apply(grad)
    assert out.dtype == torch.float32  # the gradient's dtype comes back
    err_low, err_full = _rel(out, exact), _rel(full.apply(grad), exact)
    assert err_full < 1e-5
    # bf16 keeps 8 bits of mantissa: ~0.4 % per rounding; the products really ran in bf16
    assert 1e-4 < err_low < 2e-2, (err_low, err_full)
    # the stored inverse is untouched (float32): state_dict round trips keep full precision
    assert all(t.dtype == torch.float32 for t in low.tensors().values())
    assert low.tensors().keys() == full.tensors().keys()


@pytest.mark.parametrize("build", [_factored, _eigen], ids=["factored", "eigen"])
def test_batched_bf16_products_equal_one_at_a_time(build):
    invs, grads = [], []
    for k in range(3):
        a, g = _spd(16, 10 + k), _spd(8, 20 + k)
        invs.append(build(a, g).with_product_dtype(BF16))
        grads.append(torch.randn(8, 16, generator=torch.Generator().manual_seed(k)))
    keys = {inv.batch_key() for inv in invs}
    assert len(keys) == 1 and BF16 in next(iter(keys))
    # a float32 inverse of the same shapes is never stacked with a bf16 one
    assert build(_spd(16, 10), _spd(8, 20)).batch_key() not in keys
    many = type(invs[0]).apply_many(invs, torch.stack(grads))
    for inv, gr, out in zip(invs, grads, many.unbind(0)):
        assert _rel(out, inv.apply(gr)) < 1e-2


def test_diagonal_factors_stay_elementwise(pair):
    a, g, v, _ = pair
    diag_a = torch.diagonal(a).reciprocal().float()
    inv = FactoredInverse(diag_a, torch.linalg.inv(g).float()).with_product_dtype(BF16)
    exact = torch.linalg.inv(g) @ v * diag_a.double()
    assert 1e-4 < _rel(inv.apply(v.float()), exact) < 2e-2


def test_inverses_without_products():
    assert IdentityInverse().with_product_dtype(BF16) is not None

    class Opaque(KroneckerInverse):
        kind = "opaque-test"

    assert Opaque().with_product_dtype(None) is not None
    assert Opaque().with_product_dtype(BF16) is None  # no silent float32 fallback


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 5))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(64, 20, generator=g), torch.randint(0, 5, (64,), generator=g)


def _one_step(model: nn.Module, cls=KFAC, **options) -> tuple[KFAC, list[torch.Tensor]]:
    before = [p.detach().clone() for p in model.parameters()]
    opt = cls(model, lr=0.1, damping=0.01, T_inv=1, **options)
    X, y = _batch()
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    return opt, [p.detach() - b for p, b in zip(model.parameters(), before)]


@pytest.mark.parametrize("inverter", ["cholesky", "eigh"])
def test_kfac_step_with_bf16_products_is_the_float32_step_to_bf16_accuracy(inverter):
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt, low = _one_step(model, precondition_dtype=BF16, inverter=inverter)
    ref_opt, full = _one_step(ref_model, inverter=inverter)
    for block in opt.preconditioner.blocks.values():
        assert block.inverse.product_dtype == BF16
        assert "products in bfloat16" in block.describe()
    for block in ref_opt.preconditioner.blocks.values():
        assert block.inverse.product_dtype is None
    for d, r in zip(low, full):
        assert 1e-5 < _rel(d, r) < 3e-2
    # every parameter stays float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("cls", [EKFAC, TEKFAC], ids=["ekfac", "tekfac"])
def test_eigenbasis_methods_with_bf16_rotations(cls):
    model = _mlp()
    ref_model = copy.deepcopy(model)
    opt, low = _one_step(model, cls, precondition_dtype=BF16)
    ref_opt, full = _one_step(ref_model, cls)
    for block in opt.preconditioner.blocks.values():
        assert block._ready_inverse().product_dtype == BF16
        assert block.Q_A.dtype == torch.float32  # the basis is stored in float32
        assert "products in bfloat16" in block.describe()
    for block in ref_opt.preconditioner.blocks.values():
        assert block._ready_inverse().product_dtype is None
    for d, r in zip(low, full):
        assert 1e-5 < _rel(d, r) < 3e-2
    with pytest.raises(ConfigError, match="precondition_dtype=torch.float16"):
        cls(_mlp(), precondition_dtype=torch.float16)
    with pytest.raises(ConfigError, match="structure='diagonal'"):
        cls(_mlp(), precondition_dtype=BF16, structure="diagonal")


def test_state_dict_round_trip_keeps_the_product_dtype():
    model = _mlp()
    opt, _ = _one_step(model, precondition_dtype=BF16)
    state = opt.state_dict()
    other = KFAC(copy.deepcopy(model), lr=0.1, damping=0.01, T_inv=1, precondition_dtype=BF16)
    other.load_state_dict(state)
    for name, block in other.preconditioner.blocks.items():
        assert block.inverse.product_dtype == BF16
        assert block.inverse.A_inv.dtype == torch.float32
        torch.testing.assert_close(block.inverse.A_inv, opt.preconditioner.blocks[name].inverse.A_inv)
    # loaded into an optimizer without the option, the same state preconditions in float32
    plain = KFAC(copy.deepcopy(model), lr=0.1, damping=0.01, T_inv=1)
    plain.load_state_dict(state)
    assert all(b.inverse.product_dtype is None for b in plain.preconditioner.blocks.values())


def test_bf16_products_train_on_digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = KFAC(model, precondition_dtype=BF16)  # the defaults otherwise
    first = last = None
    for step in range(60):
        idx = torch.arange(step * 32, step * 32 + 32) % len(X)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
        last = float(loss.detach())
    with torch.no_grad():
        acc = float((model(X).argmax(1) == y).float().mean())
    assert last < 0.5 * first and acc > 0.85, (first, last, acc)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"precondition_dtype": torch.float16}, ["precondition_dtype=torch.float16", "torch.bfloat16"]),
        ({"precondition_dtype": "bf16"}, ["precondition_dtype='bf16'", "torch.bfloat16"]),
        (
            {"precondition_dtype": BF16, "inverter": "identity"},
            ["inverter='identity'", "'cholesky' or 'eigh'", "drop precondition_dtype"],
        ),
        ({"precondition_dtype": BF16, "structure": "diagonal"}, ["structure='diagonal'", "drop precondition_dtype"]),
    ],
)
def test_bad_precondition_dtype_is_refused_with_the_fix(options, words):
    with pytest.raises(ConfigError) as err:
        KFAC(_mlp(), **options)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("T", [1, 3])
def test_dense_singd_with_bf16_products(T):
    """``C Cᵀ ∇ K Kᵀ`` with bf16 operands against float64's, for both product paths (the
    squares kept, T = 3; ``K`` and ``C`` applied twice, T = 1 on layers wider than tall),
    after a few updates have moved ``K`` and ``C`` away from the identity."""
    model = _mlp()
    opt = SINGD(model, structure="dense", T=T, lr=0.1, precondition_dtype=BF16)
    X, y = _batch()
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    for name, block in opt.preconditioner.blocks.items():
        assert "products in bfloat16" in block.describe()
        assert block.K.dtype == torch.float32 and block.C.dtype == torch.float32
        kk, cc = (t.double() for t in block.preconditioner_dense())
        g = torch.randn(block.info.d_out, block.info.d_in, generator=torch.Generator().manual_seed(5))
        err = _rel(block.precondition(g), cc @ g.double() @ kk)
        assert 1e-5 < err < 3e-2, (name, err)


def test_bf16_products_need_dense_singd():
    with pytest.raises(ConfigError, match="structure='dense'"):
        SINGD(_mlp(), structure="diagonal", precondition_dtype=BF16)


@pytest.mark.parametrize(
    ("method", "honoured"),
    [("kfac", True), ("ekfac", True), ("rs-kfac", True), ("so-kldwrm", True), ("singd", True), ("ikfac", True)]
    + [(m, False) for m in ("tkfac", "tekfac", "skfac", "b-kfac")],
)
def test_stats_dtype_is_honoured_or_refused_never_ignored(method, honoured):
    """A method either runs its statistics' products in bf16 with ``stats_dtype`` (its state
    after two steps differs from float32's) or refuses the option when built."""
    from curvkit.optim import create

    X, y = _batch()

    def state(**options):
        model = _mlp()
        opt = create(method, model, **options)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X), y).backward()
            opt.step()
        out = []
        for block in opt.preconditioner.blocks.values():
            for value in block.state_dict().values():
                if isinstance(value, torch.Tensor):
                    out.append(value.double().flatten())
                elif isinstance(value, dict):
                    out += [v.double().flatten() for v in value.values() if isinstance(v, torch.Tensor)]
        return torch.cat(out)

    if honoured:
        assert not torch.equal(state(), state(stats_dtype=BF16))
    else:
        with pytest.raises(ConfigError, match="stats_dtype=torch.bfloat16.*no effect"):
            create(method, _mlp(), stats_dtype=BF16)


# --- SINGD's update grams in bf16 (stats_dtype) ----------------------------------------------


@pytest.mark.parametrize("rows", [200, 40], ids=["many-rows", "few-rows"])
def test_singd_dense_grams_in_bf16_match_float64_to_bf16_accuracy(rows):
    """``Fᵀ XᵀX F`` of a dense factor with ``stats_dtype``: within bf16's accuracy of the
    float64 product, and farther from it than float32's (the products ran in bf16). Both
    orders: ``Fᵀ (XᵀX) F`` for many rows, ``(X F)ᵀ (X F)`` for few."""
    from curvkit_singd.singd import SINGDBlock

    from curvkit.structures.base import DenseStructure

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 48, generator=gen, dtype=torch.float64)
    m = torch.eye(48, dtype=torch.float64) + 0.1 * torch.randn(48, 48, generator=gen, dtype=torch.float64)
    exact = m.T @ (x.T @ x) @ m
    f = DenseStructure(m.float())
    full = SINGDBlock._gram(DenseStructure, f, x.float())
    low = SINGDBlock._gram(DenseStructure, f, x.float(), BF16)
    assert low.matrix.dtype == torch.float32  # accumulated and stored in float32
    err_full, err_low = _rel(full.matrix, exact), _rel(low.matrix, exact)
    assert err_full < 1e-5
    assert 1e-4 < err_low < 2e-2, (err_low, err_full)


def test_singd_stats_dtype_lowers_the_update_and_trains():
    """Dense SINGD with ``stats_dtype``: its factors after three updates stay within bf16's
    accuracy of a float64 run's and differ from float32's (the option is not ignored)."""
    X, y = _batch()

    def factors(dtype, **options):
        torch.manual_seed(0)
        model = _mlp().to(dtype)
        opt = SINGD(model, **options)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(X.to(dtype)), y).backward()
            opt.step()
        assert opt.preconditioner.counters["skipped_steps"] == 0
        return [t.double() for b in opt.preconditioner.blocks.values() for t in (b.K.matrix, b.C.matrix)]

    exact, f32, low = factors(torch.float64), factors(torch.float32), factors(torch.float32, stats_dtype=BF16)
    for e, a, b in zip(exact, f32, low):
        assert not torch.equal(a, b)
        assert _rel(b - torch.eye(len(b), dtype=b.dtype), e - torch.eye(len(e), dtype=e.dtype)) < 5e-2
        assert _rel(a, e) <= _rel(b, e)


@pytest.mark.parametrize("structure", ["diagonal", ("dense", "diagonal"), "block30diagonal"])
def test_singd_stats_dtype_needs_dense_factors(structure):
    with pytest.raises(ConfigError, match="stats_dtype=torch.bfloat16.*structure='dense'"):
        SINGD(_mlp(), structure=structure, stats_dtype=BF16)


@pytest.mark.parametrize("factor_dtype", [torch.bfloat16, torch.float16, (torch.float32, torch.bfloat16)])
def test_singd_stats_dtype_with_16_bit_factors_is_refused(factor_dtype):
    """16-bit factors' grams already run in their own dtype: ``stats_dtype`` would change
    nothing there, so it is refused rather than ignored."""
    with pytest.raises(ConfigError, match="stats_dtype=torch.bfloat16.*factor_dtype=.*no effect"):
        SINGD(_mlp(), factor_dtype=factor_dtype, stats_dtype=BF16)
