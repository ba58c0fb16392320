"""KroneckerCurvature.from_optimizer / KroneckerLaplace.from_optimizer against fresh fits.

"The same factors": the optimizers train on mini-batches of sklearn's digits with
``ema_decay=0`` (each statistics step replaces the factors) and ``T_inv=1`` (EKFAC's basis
and corrected eigenvalues restart every step), then take one last statistics step on the
whole training set, after which the parameters are put back to the values that step saw.
The optimizer then holds the K-FAC (EKFAC) curvature of the final parameters over the data,
as per-datum means of its ``CrossEntropyLoss()`` — while a fresh fit (``KroneckerLaplace.fit``,
``KroneckerCurvature.from_data``) accumulates sums of a ``reduction="sum"`` loss over
several batches. Equality (rtol 1e-6) therefore needs the scale (``N``), the layout of every
block in the flat vector and EKFAC's eigenbasis/eigenvalues to be right; a wrong scale is
shown to be detected, and the curvature is also compared with curvlinops' dense
(E)KFAC matrices.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import curvkit.optim
from curvkit.blocks import BlockInfo, CurvatureBlock
from curvkit.demo import digits_split
from curvkit.errors import UnsupportedModuleError
from curvkit.laplace import KroneckerCurvature, KroneckerLaplace
from curvkit.linalg.kronecker import EigenbasisOperator, KroneckerOperator, UnitwiseOperator
from curvkit.methods import MethodConfig, MethodSpec, Schedule

DT = torch.float64


@pytest.fixture(scope="module")
def digits():
    X, y, X_test, _ = digits_split()
    return X.to(DT), y, X_test[:40].to(DT)


def _mlp(norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(64, 16), nn.LayerNorm(16)] if norm else [nn.Linear(64, 16)]
    return nn.Sequential(*layers, nn.Tanh(), nn.Linear(16, 10)).to(DT)


def _train(model, X, y, method="kfac", steps=4, batch=128, loss_fn=None, last_full=True, **options):
    """A few mini-batch steps, then (``last_full``) one statistics step on all of ``(X, y)``
    whose parameter update is undone: the optimizer's factors are those of the final
    parameters over the data."""
    loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()
    settings = dict(lr=0.1, fisher="type-2", ema_decay=0.0, T_inv=1, damping=0.1)
    settings.update(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.CurvatureOptimizer(model, method=method, loss_fn=loss_fn, **settings)

    def step(xb, yb):
        opt.zero_grad()
        out = model(xb)
        opt.curvature_backward(out, yb)
        loss_fn(out, yb).backward()
        opt.step()

    for i in range(steps):
        step(X[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch])
    if last_full:
        saved = [p.detach().clone() for p in model.parameters()]
        step(X, y)
        with torch.no_grad():
            for p, s in zip(model.parameters(), saved):
                p.copy_(s)
    return opt


def _loader(X, y, batch=500):
    return DataLoader(TensorDataset(X, y), batch_size=batch)


def _close(actual, expected, rtol=1e-6):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_laplace_from_optimizer_equals_a_fresh_fit_on_digits(digits, method):
    X, y, X_test = digits
    model = _mlp()
    opt = _train(model, X, y, method)
    loader = _loader(X, y)
    prior = torch.tensor([0.3, 2.0, 0.7, 1.5], dtype=DT)  # one per block (separate_bias=False: 2 layers)
    la = KroneckerLaplace.from_optimizer(opt, "classification", loader, prior_precision=prior[:2])
    ekfac = method == "ekfac"
    ref = KroneckerLaplace(
        model, "classification", separate_bias=False, correct_eigenvalues=ekfac, prior_precision=prior[:2]
    )
    ref.fit(loader, progress=False)
    assert la.n_data == ref.n_data == len(y)
    kinds = {type(b.operator) for b in la.curvature.blocks}
    assert kinds == ({EigenbasisOperator} if ekfac else {KroneckerOperator})
    assert la.correct_eigenvalues is ekfac
    for p0 in (None, 0.05, 4.0):
        _close(la.log_marginal_likelihood(p0), ref.log_marginal_likelihood(p0))
    _close(la.predictive(X_test), ref.predictive(X_test))
    f, var = la.functional_variance(X_test)
    f_ref, var_ref = ref.functional_variance(X_test)
    _close(var, var_ref)
    # EKFAC: the optimizer's corrected eigenvalues (restarted from the full batch at its last
    # refresh, in the basis of that step's factors) are the fresh correction's spectrum
    _close(la.curvature.eigenvalues().sort().values, ref.curvature.eigenvalues().sort().values)
    # the test can fail: a wrong scale (2N) changes the marginal likelihood
    wrong = KroneckerLaplace.from_optimizer(opt, "classification", loader, num_data=2 * len(y))
    assert abs(float(wrong.log_marginal_likelihood() - ref.log_marginal_likelihood(1.0))) > 1.0


def test_empirical_fisher_the_optimizers_default(digits):
    """K-FAC's default statistics, the empirical Fisher from the user's own backward of a
    batch-mean loss (loss_average="batch"), against a fresh empirical-Fisher fit."""
    X, y, X_test = digits
    X, y = X[:500], y[:500]
    model = _mlp()
    opt = _train(model, X, y, steps=2, fisher="empirical")
    loader = _loader(X, y, 200)
    la = KroneckerLaplace.from_optimizer(opt, "classification", loader)
    assert la.fisher.value == "empirical"
    ref = KroneckerLaplace(model, "classification", fisher="empirical", separate_bias=False)
    ref.fit(loader, progress=False)
    _close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    _close(la.predictive(X_test), ref.predictive(X_test))


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_curvature_from_optimizer_equals_curvlinops(digits, method):
    """The optimizer's curvature, scaled by N, against curvlinops' dense (E)KFAC of the
    sum-reduced loss over the data set (someone else's accumulation and layout)."""
    from curvlinops import EKFACLinearOperator, KFACLinearOperator

    X, y, _ = digits
    X, y = X[:400], y[:400]
    model = _mlp()
    opt = _train(model, X, y, method, steps=2)
    ours = KroneckerCurvature.from_optimizer(opt, num_data=len(y))
    cls = EKFACLinearOperator if method == "ekfac" else KFACLinearOperator
    ref = cls(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        list(model.parameters()),
        _loader(X, y, 150),
        fisher_type="type-2",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    dense = ref @ torch.eye(ref.shape[1], dtype=DT)
    _close(ours.to_dense(), dense)
    _close(ours.logdet(prior_precision=0.5), torch.logdet(dense + 0.5 * torch.eye(dense.shape[0], dtype=DT)))


def test_separate_bias_and_curvature_from_factors(digits):
    """With separate_bias=True (laplace-torch's layout) K-FAC's blocks split as from_factors
    splits them; the same operator as KroneckerCurvature.from_data(separate_bias=True)."""
    X, y, _ = digits
    X, y = X[:300], y[:300]
    model = _mlp()
    opt = _train(model, X, y, steps=2)
    ours = KroneckerCurvature.from_optimizer(opt, num_data=len(y), separate_bias=True)
    ref = KroneckerCurvature.from_data(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        _loader(X, y, 100),
        fisher="type-2",
        separate_bias=True,
        progress=False,
    )
    assert [b.name for b in ours.blocks] == [b.name for b in ref.blocks] == ["0", "0.bias", "2", "2.bias"]
    _close(ours.to_dense(), ref.to_dense())


def test_layernorm_unitwise_blocks(digits):
    X, y, X_test = digits
    X, y = X[:500], y[:500]
    model = _mlp(norm=True)
    opt = _train(model, X, y, steps=3)
    loader = _loader(X, y, 200)
    la = KroneckerLaplace.from_optimizer(opt, "classification", loader)
    assert any(isinstance(b.operator, UnitwiseOperator) for b in la.curvature.blocks)
    ref = KroneckerLaplace(model, "classification", separate_bias=False)
    ref.fit(loader, progress=False)
    _close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    _close(la.predictive(X_test), ref.predictive(X_test))
    # split into scale and shift blocks too, as from_data does
    split = KroneckerLaplace.from_optimizer(opt, "classification", loader, separate_bias=True)
    ref_split = KroneckerLaplace(model, "classification", separate_bias=True)
    ref_split.fit(loader, progress=False)
    _close(split.log_marginal_likelihood(), ref_split.log_marginal_likelihood())


# --- row ranges (attention) and a tied embedding ---------------------------------------------


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(2, 4)
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.mem = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.inp(x)
        m = torch.tanh(self.mem(h))  # cross-attention: the query, key and value blocks are row ranges
        return self.head(self.att(h, m, m, need_weights=False)[0].mean(1))


class TiedNet(nn.Module):
    """``lm_head(tanh(mix(mean_t wte(ids))))`` with ``lm_head.weight`` tied to ``wte.weight``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(6, 3)
        self.mix = nn.Linear(3, 3)
        self.lm_head = nn.Linear(3, 6, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mix(self.wte(ids).mean(1))))


def _sequence_data(kind: str, n: int = 48):
    g = torch.Generator().manual_seed(1)
    if kind == "attention":
        return AttnNet().to(DT), torch.randn(n, 3, 2, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)
    return TiedNet().to(DT), torch.randint(0, 6, (n, 3), generator=g), torch.randint(0, 6, (n,), generator=g)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
@pytest.mark.parametrize("kind", ["attention", "tied"])
def test_row_range_and_tied_layouts(kind, method):
    model, X, y = _sequence_data(kind)
    opt = _train(model, X, y, method, steps=3, batch=16)
    if kind == "attention":
        assert {layer.name for layer, _ in opt.preconditioner.curvature_blocks()} >= {"att.q", "att.k", "att.v"}
    else:
        tied = [layer for layer, _ in opt.preconditioner.curvature_blocks() if layer.name == "wte"]
        assert tied and len(tied[0].sites) == 2
    ours = KroneckerCurvature.from_optimizer(opt, num_data=len(y))
    # the tie's nearest Kronecker pair is per batch: the fresh fit sees the data as one batch
    ref = KroneckerCurvature.from_data(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        [(X, y)],
        fisher="type-2",
        correct_eigenvalues=method == "ekfac",
        progress=False,
    )
    assert ours.param_names == ref.param_names
    _close(ours.to_dense(), ref.to_dense())
    la = KroneckerLaplace.from_optimizer(opt, "classification", [(X[:20], y[:20]), (X[20:], y[20:])])
    fresh = KroneckerLaplace(model, "classification", separate_bias=False, correct_eigenvalues=method == "ekfac")
    fresh.fit([(X, y)], progress=False)
    _close(la.log_marginal_likelihood(), fresh.log_marginal_likelihood())
    _close(la.predictive(X[:5]), fresh.predictive(X[:5]))


# --- every bundled method whose blocks give an operator ---------------------------------------


def _methods():
    from curvkit.plugins import default_registry

    return default_registry().methods.names()


@pytest.mark.parametrize("method", _methods())
def test_every_bundled_method_places_its_block_operators(method):
    """For each method: its blocks' operators (a LayerNorm's unit-wise block included), times
    N, at their layers' flat positions — checked entry by entry against each block's own
    dense operator — and the log-determinant against the dense matrix's."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 5, generator=g, dtype=DT), torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.create(method, model, loss_fn=loss_fn, lr=0.05)
        for i in range(3):
            opt.zero_grad()
            out = model(X[i * 16 : (i + 1) * 16])
            opt.curvature_backward(out, y[i * 16 : (i + 1) * 16])
            loss_fn(out, y[i * 16 : (i + 1) * 16]).backward()
            opt.step()
    curvature = KroneckerCurvature.from_optimizer(opt, num_data=64, unsupported="skip")
    dense = curvature.to_dense()
    for (_, block), index in zip(opt.preconditioner.curvature_blocks(), curvature.indices):
        i = index.reshape(-1)
        expected = 64 * block.as_operator().to(DT).to_dense()
        _close(dense[i.unsqueeze(1), i.unsqueeze(0)], expected, rtol=1e-10)
    covered = torch.cat([i.reshape(-1) for i in curvature.indices])
    assert covered.numel() == dense.shape[0]
    eye = torch.eye(dense.shape[0], dtype=DT)
    _close(curvature.logdet(prior_precision=1.0), torch.logdet(dense + eye), rtol=1e-8)


# --- errors and policies -------------------------------------------------------------------------


def test_scale_errors_and_sum_reduced_losses(digits):
    X, y, _ = digits
    X, y = X[:200], y[:200]
    model = _mlp()
    opt = _train(model, X, y, steps=1)
    with pytest.raises(ValueError, match="exactly one of num_data"):
        KroneckerCurvature.from_optimizer(opt)
    with pytest.raises(ValueError, match="exactly one of num_data"):
        KroneckerCurvature.from_optimizer(opt, num_data=10, scale=2.0)
    with pytest.raises(ValueError, match="scale=-1.0 must be"):
        KroneckerCurvature.from_optimizer(opt, scale=-1.0)
    with pytest.raises(ValueError, match="pass data="):
        KroneckerLaplace.from_optimizer(opt, "classification")
    # a sum-reduced training loss: per-batch sums, so N alone cannot say the scale
    summed = _train(_mlp(), X, y, steps=1, loss_fn=nn.CrossEntropyLoss(reduction="sum"), last_full=False)
    with pytest.raises(ValueError, match="sums over each batch.*scale=N / batch_size"):
        KroneckerCurvature.from_optimizer(summed, num_data=200)
    # ... and its scale: one full batch of a sum-reduced loss is the sum over the data
    full = _train(_mlp(), X, y, steps=0, loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    ref = KroneckerCurvature.from_data(
        full.preconditioner.model, nn.CrossEntropyLoss(reduction="sum"), [(X, y)], fisher="type-2", progress=False
    )
    _close(KroneckerCurvature.from_optimizer(full, scale=1.0).to_dense(), ref.to_dense())
    # the likelihood must be the optimizer's loss's
    with pytest.raises(ValueError, match="needs an optimizer trained with MSELoss"):
        KroneckerLaplace.from_optimizer(opt, "regression", num_data=200)


def test_regression_with_mean_squared_error_over_outputs():
    """MSELoss(reduction='mean') averages over the C outputs as well: the scale is N·C; the
    Laplace approximation equals a fresh regression fit."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(60, 4, generator=g, dtype=DT), torch.randn(60, 2, generator=g, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)
    opt = _train(model, X, Y, steps=2, batch=20, loss_fn=nn.MSELoss())
    with pytest.raises(ValueError, match="num_outputs=C"):
        KroneckerCurvature.from_optimizer(opt, num_data=60)
    data = [(X[:30], Y[:30]), (X[30:], Y[30:])]
    la = KroneckerLaplace.from_optimizer(opt, "regression", data, sigma_noise=0.8)
    ref = KroneckerLaplace(model, "regression", sigma_noise=0.8, separate_bias=False)
    ref.fit(data, progress=False)
    _close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    _close(la.predictive(X[:5])[1], ref.predictive(X[:5])[1])


def test_without_data_the_predictive_works_and_the_evidence_asks_for_data(digits):
    X, y, X_test = digits
    X, y = X[:200], y[:200]
    model = _mlp()
    opt = _train(model, X, y, steps=1)
    la = KroneckerLaplace.from_optimizer(opt, "classification", num_data=200)
    ref = KroneckerLaplace(model, "classification", separate_bias=False)
    ref.fit([(X, y)], progress=False)
    _close(la.predictive(X_test), ref.predictive(X_test))
    with pytest.raises(RuntimeError, match="Pass data= to KroneckerLaplace.from_optimizer"):
        la.log_marginal_likelihood()


def test_blocks_without_statistics_or_operator_are_named(digits):
    X, y, _ = digits
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = curvkit.optim.KFAC(model)
    with pytest.raises(ValueError, match="method 'kfac', layer '0': the block has no statistics yet"):
        KroneckerCurvature.from_optimizer(fresh, num_data=10)
    # a layer that never ran on a statistics step took first-order steps: left out (warned) or refused
    torch.manual_seed(0)
    partial = nn.ModuleDict({"used": nn.Linear(64, 10), "unused": nn.Linear(64, 10)}).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.KFAC(partial, fisher="type-2", loss_fn=nn.CrossEntropyLoss())
        out = partial["used"](X[:50])
        opt.curvature_backward(out, y[:50])
        nn.functional.cross_entropy(out, y[:50]).backward()
        opt.step()
    with pytest.warns(UserWarning, match="layer 'unused': its block has no statistics"):
        C = KroneckerCurvature.from_optimizer(opt, num_data=50)
    assert C.param_names == ["used.weight", "used.bias"]
    with pytest.raises(UnsupportedModuleError, match="layer 'unused'"):
        KroneckerCurvature.from_optimizer(opt, num_data=50, unsupported="error")
    opt = _train(_mlp(), X[:100], y[:100], steps=1, last_full=False)
    block = opt.preconditioner.blocks["2"]

    def no_operator():
        raise NotImplementedError("this method keeps no curvature estimate")

    block.as_operator = no_operator
    with pytest.raises(UnsupportedModuleError, match="method 'kfac', layer '2'.*cannot give its curvature"):
        KroneckerCurvature.from_optimizer(opt, num_data=100)
    block.as_operator = lambda: torch.eye(3)
    with pytest.raises(UnsupportedModuleError, match="method 'kfac', layer '2': as_operator\\(\\) returned a Tensor"):
        KroneckerCurvature.from_optimizer(opt, num_data=100)
    with pytest.raises(TypeError, match="expected a curvkit optimizer"):
        KroneckerCurvature.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), num_data=10)
    ekfac = _train(_mlp(), X[:100], y[:100], "ekfac", steps=1, last_full=False)
    with pytest.raises(ValueError, match="method 'ekfac'.*separate_bias=False"):
        KroneckerCurvature.from_optimizer(ekfac, num_data=100, separate_bias=True)


class _Scaled(nn.Module):
    """A module with a parameter and no layer handler."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(16, dtype=DT))

    def forward(self, x):
        return x * self.s


def test_first_order_parameters_follow_the_policy(digits):
    X, y, X_test = digits
    X, y = X[:300], y[:300]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), _Scaled(), nn.Tanh(), nn.Linear(16, 10)).to(DT)
    opt = _train(model, X, y, steps=2)
    with pytest.warns(UserWarning, match="parameter '1.s'.*left out of the Laplace approximation"):
        C = KroneckerCurvature.from_optimizer(opt, num_data=300)
    assert "1.s" not in C.param_names
    with pytest.raises(UnsupportedModuleError, match="parameter '1.s'"):
        KroneckerCurvature.from_optimizer(opt, num_data=300, unsupported="error")
    # a fresh fit leaves the module without a handler out as well: the same approximation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = KroneckerLaplace.from_optimizer(opt, "classification", [(X, y)], unsupported="skip")
        ref = KroneckerLaplace(model, "classification", separate_bias=False, unsupported="skip")
        ref.fit([(X, y)], progress=False)
    _close(la.log_marginal_likelihood(), ref.log_marginal_likelihood())
    _close(la.predictive(X_test), ref.predictive(X_test))


# --- laplace-torch on the same path ------------------------------------------------------------


def test_laplace_torch_backend_from_an_optimizer(digits):
    """laplace-torch's KronLaplace with CurvkitGGN(curvature=optimizer) equals its own fit with
    CurvkitGGN on the data (laplace-torch's Kron sums and its own evidence and predictive)
    and curvkit's KroneckerLaplace.from_optimizer in laplace-torch's layout."""
    pytest.importorskip("laplace")
    from laplace import Laplace

    from curvkit.laplace import CurvkitGGN

    X, y, X_test = digits
    X, y = X[:600], y[:600]
    model = _mlp()
    opt = _train(model, X, y, steps=2)
    loader = _loader(X, y, 200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curvature = KroneckerCurvature.from_optimizer(opt, num_data=len(y), separate_bias=True)
        via_opt = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=CurvkitGGN,
            backend_kwargs={"curvature": opt},
        )
        via_opt.fit(loader)
        via_curvature = Laplace(
            model,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=CurvkitGGN,
            backend_kwargs={"curvature": curvature},
        )
        via_curvature.fit(loader)
        fresh = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvkitGGN)
        fresh.fit(loader)
    ours = KroneckerLaplace.from_optimizer(opt, "classification", loader, separate_bias=True)
    for la in (via_opt, via_curvature):
        _close(la.log_marginal_likelihood(), fresh.log_marginal_likelihood())
        _close(la.posterior_precision.to_matrix(), fresh.posterior_precision.to_matrix())
        _close(la(X_test, pred_type="glm", link_approx="probit"), fresh(X_test, pred_type="glm", link_approx="probit"))
    _close(ours.log_marginal_likelihood(), fresh.log_marginal_likelihood())
    # EKFAC's blocks are not Kronecker pairs: refused, naming the way out
    ekfac = _train(_mlp(), X, y, "ekfac", steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(
            ekfac.preconditioner.model,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=CurvkitGGN,
            backend_kwargs={"curvature": KroneckerCurvature.from_optimizer(ekfac, num_data=len(y))},
        )
        with pytest.raises(UnsupportedModuleError, match="one Kronecker pair per parameter"):
            la.fit(loader)
        la = Laplace(
            ekfac.preconditioner.model,
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=CurvkitGGN,
            backend_kwargs={"curvature": ekfac},
        )
        with pytest.raises(UnsupportedModuleError, match="KroneckerLaplace.from_optimizer"):
            la.fit(loader)


def test_laplace_torch_kron_goes_through_operator_blocks(digits, monkeypatch):
    """The backend's kron builds its Kron entries from layer_blocks' OperatorBlocks (the path
    of from_factors / from_data / from_optimizer), and the result is from_data's curvature."""
    pytest.importorskip("laplace")
    from laplace import Laplace

    import curvkit.laplace.backend_kron as backend
    from curvkit.laplace import CurvkitGGN

    X, y, _ = digits
    X, y = X[:300], y[:300]
    model = _mlp(norm=True)
    calls = []
    real = backend.layer_blocks

    def spy(layer, op, *args, **kwargs):
        calls.append(layer.name)
        return real(layer, op, *args, **kwargs)

    monkeypatch.setattr(backend, "layer_blocks", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        la = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvkitGGN)
        la.fit(_loader(X, y, 100))
    assert calls[:3] == ["0", "1", "3"] and len(calls) == 9  # three batches, three layers
    ref = KroneckerCurvature.from_data(
        model,
        nn.CrossEntropyLoss(reduction="sum"),
        _loader(X, y, 100),
        fisher="type-2",
        separate_bias=True,
        progress=False,
    )
    # laplace-torch's Kron keeps only the diagonal of a normalisation layer's unit-wise block
    dense = ref.to_dense()
    norm = torch.cat([ref.indices[i].reshape(-1) for i, b in enumerate(ref.blocks) if b.layer == "1"])
    off = torch.ones_like(dense, dtype=torch.bool)
    off[norm.unsqueeze(1), norm.unsqueeze(0)] = False
    got = la.posterior_precision.to_matrix() - torch.eye(dense.shape[0], dtype=DT)  # prior precision 1
    _close(got[off].reshape(-1), dense[off].reshape(-1))
    _close(got.diagonal(), dense.diagonal())


# --- a plugin's gradient-based method ------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _GradientConfig(MethodConfig):
    T_stats: int = 1


class _GradientOuter(CurvatureBlock):
    """Keeps ``G = ∇ ∇ᵀ`` of the last step's gradient (``A = I``), or (``operator=False``) no
    curvature at all."""

    def __init__(self, info: BlockInfo, operator: bool) -> None:
        super().__init__(info)
        self.operator, self.G = operator, None

    def init(self, *, dtype, device):
        pass

    def update(self, stats, decay):
        self.G = stats.gradient @ stats.gradient.t()

    def refresh(self, damping, lam):
        pass

    def precondition(self, grad):
        return grad

    def as_operator(self):
        if not self.operator:
            raise NotImplementedError("no curvature estimate")
        return KroneckerOperator(torch.eye(self.info.d_in, dtype=self.G.dtype), self.G)

    def state_dict(self):
        return {"num_updates": self.num_updates}

    def load_state_dict(self, state):
        self.num_updates = state["num_updates"]


@pytest.mark.parametrize("operator", [True, False])
def test_gradient_based_plugin_method(operator):
    spec = MethodSpec(
        name=f"outer-{operator}",
        config_cls=_GradientConfig,
        block_factory=lambda info, config, registry: _GradientOuter(info, operator),
        statistics="gradient",
        schedule=Schedule(refresh_period=None, ema_decay=None, damping=None),
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    pre = curvkit.optim.Preconditioner(model, spec)
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    nn.functional.cross_entropy(model(X), y).backward()
    assert pre.step()
    if not operator:
        with pytest.raises(UnsupportedModuleError, match="method 'outer-False', layer '0'.*NotImplementedError"):
            KroneckerCurvature.from_optimizer(pre, scale=1.0)
        return
    with pytest.raises(ValueError, match="builds its blocks from the step's gradient.*pass scale="):
        KroneckerCurvature.from_optimizer(pre, num_data=8)
    C = KroneckerCurvature.from_optimizer(pre, scale=3.0)
    # the dense reference from the gradients themselves: 3 · vec(∇)vec(∇)ᵀ ⊗-structured per layer
    for (layer, _), index in zip(pre.curvature_blocks(), C.indices):
        grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        expected = 3.0 * torch.kron(grad @ grad.t(), torch.eye(grad.shape[1], dtype=DT))
        i = index.reshape(-1)
        _close(C.to_dense()[i.unsqueeze(1), i.unsqueeze(0)], expected, rtol=1e-12)
