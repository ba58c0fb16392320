"""An embedding tied to its LM head (GPT-2's ``wte``/``lm_head``): one block, two layouts.

References, in float64:

* the tied block's per-example gradients against ``torch.func`` per-sample gradients of the
  shared weight;
* its ``(A, G)`` against the nearest Kronecker product computed independently: each use's
  factors from an *untied* copy of the model (same values), their sum formed densely in the
  block's layout, rearranged (Van Loan & Pitsianis) and decomposed by a float64 SVD;
* a data set streamed in batches: the product of the data set's per-layout sums, not the
  factor-wise sum of the batches' products;
* the optimizers: K-FAC's first step is the dense damped solve with the block's factors
  (layout mapping of the transposed weight included), EKFAC trains, and methods that need
  per-row statistics move the tied weight by exactly the first-order rule, as ``summary()``
  says.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import assert_matrix_close
from torch import nn
from torch.func import functional_call, grad, vmap

import curvkit
import curvkit.optim
from curvkit.config import KFACApprox
from curvkit.linalg import ExactDamping
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.plan import make_plan

V, D, T = 7, 3, 4
DT = torch.float64
SEED = 11


class TinyLM(nn.Module):
    """``lm_head(tanh(mix(wte(ids))))`` with the head's weight tied to the embedding's.
    ``head_first`` defines the head first, so the block takes the head's layout."""

    def __init__(self, tie: bool = True, head_first: bool = False, pad: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        if head_first:
            self.lm_head = nn.Linear(D, V, bias=False)
            self.wte = nn.Embedding(V, D, padding_idx=pad)
        else:
            self.wte = nn.Embedding(V, D, padding_idx=pad)
            self.lm_head = nn.Linear(D, V, bias=False)
        self.mix = nn.Linear(D, D)
        with torch.no_grad():
            self.wte.weight.normal_()
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mix(self.wte(ids))))  # (N, T, V) language-model logits


def _untied(model: TinyLM) -> TinyLM:
    copy_ = copy.deepcopy(model)
    copy_.lm_head.weight = nn.Parameter(model.wte.weight.detach().clone())
    return copy_


def _data(n: int = 6, seed: int = 3, pad: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=gen)
    if pad is not None:
        ids[0, :2] = pad
    return ids, torch.randint(0, V, (n, T), generator=gen)


def _nearest_kronecker_by_svd(total: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """``L ⊗ R`` nearest to ``total`` ``(left·right)²`` in Frobenius norm, by the SVD of
    the rearranged matrix (Van Loan & Pitsianis, 1993)."""
    rearranged = total.reshape(left, right, left, right).permute(0, 2, 1, 3).reshape(left * left, right * right)
    u, s, vt = torch.linalg.svd(rearranged)
    return torch.kron(s[0] * u[:, 0].reshape(left, left), vt[0].reshape(right, right))


def _reference_block(untied: dict, head_first: bool) -> torch.Tensor:
    """The sum of both uses' Kronecker terms in the block's layout, from an untied copy."""
    a_e, g_e = untied["wte"]  # embedding layout (D, V): G_e ⊗ diag(A_e)
    a_h, g_h = untied["lm_head"]  # head layout (V, D): G_h ⊗ A_h
    assert a_e.ndim == 1
    if head_first:  # block matrix W (V, D): the embedding's term is diag(A_e) ⊗ G_e
        return torch.kron(g_h, a_h) + torch.kron(torch.diag(a_e), g_e)
    return torch.kron(g_e, torch.diag(a_e)) + torch.kron(a_h, g_h)  # block matrix Wᵀ (D, V)


@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_tied_factors_are_the_nearest_kronecker_product_of_both_uses(fisher, approx, head_first):
    model = TinyLM(head_first=head_first, pad=1).double()
    ids, y = _data(pad=1)
    loss_fn = nn.CrossEntropyLoss()

    def factors(m):
        gen = torch.Generator().manual_seed(SEED) if fisher == "mc" else None
        return curvkit.kronecker_factors(m, loss_fn, ids, y, fisher=fisher, kfac_approx=approx, generator=gen)

    tied = factors(model)
    untied = factors(_untied(model))
    name = "lm_head" if head_first else "wte"
    assert set(tied) == {name, "mix"}
    A, G = tied[name]
    rows, cols = (V, D) if head_first else (D, V)
    assert G.shape == (rows, rows) and A.shape == (cols, cols)  # the tie's A (or G) is V×V dense
    expected = _nearest_kronecker_by_svd(_reference_block(untied, head_first), rows, cols)
    assert_matrix_close(torch.kron(G, A), expected, rtol=1e-10)
    assert_matrix_close(tied["mix"].A, untied["mix"].A, rtol=1e-12)
    assert_matrix_close(tied["mix"].G, untied["mix"].G, rtol=1e-12)


@pytest.mark.parametrize("head_first", [False, True])
def test_tied_per_example_gradients_equal_torch_func(head_first):
    model = TinyLM(head_first=head_first, pad=1).double()
    ids, y = _data(pad=1)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    name = "lm_head" if head_first else "wte"
    params = {k: v.detach() for k, v in model.named_parameters()}
    (shared,) = [k for k in params if k.endswith("weight") and params[k].shape == (V, D)]

    def loss_one(w, x, t):
        out = functional_call(model, {**params, shared: w}, (x.unsqueeze(0),))
        return loss_fn(out.reshape(-1, V), t.reshape(-1))

    ref = vmap(grad(loss_one), in_dims=(None, 0, 0))(params[shared], ids, y)  # (N, V, D)
    if not head_first:
        ref = ref.transpose(1, 2)  # the block matrix is Wᵀ
    engine = CaptureEngine(make_plan(model, curvkit.default_registry()), model)
    with engine.attached_for():
        out = model(ids)
    (v,) = torch.autograd.grad(loss_fn(out.reshape(-1, V), y.reshape(-1)), out, retain_graph=True)
    engine.backpropagate(out, [v], num_passes=1)
    stats = engine.layer_stats(name, "fisher", KFACApprox.EXPAND, 1.0)
    assert stats is not None and stats.tied and not stats.diagonal_input
    assert_matrix_close(stats.per_example_gradients(), ref, rtol=1e-10)
    engine.clear()


def test_streamed_tied_factors_are_the_product_of_the_data_set_sums():
    """Two batches: each layout's factors are summed over the data set first (as an untied
    copy accumulates them), then joined — not the factor-wise sum of per-batch products."""
    model = TinyLM().double()
    ids, y = _data(n=8)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    batches = [(ids[:3], y[:3]), (ids[3:], y[3:])]
    tied = curvkit.accumulate_kronecker_factors(model, loss_fn, batches, fisher="type-2")
    untied = curvkit.accumulate_kronecker_factors(_untied(model), loss_fn, batches, fisher="type-2")
    expected = _nearest_kronecker_by_svd(_reference_block(untied, False), D, V)
    A, G = tied["wte"]
    assert_matrix_close(torch.kron(G, A), expected, rtol=1e-10)
    per_batch = [curvkit.kronecker_factors(model, loss_fn, x, t, fisher="type-2")["wte"] for x, t in batches]
    naive = torch.kron(sum(g for _, g in per_batch), sum(a * len(x) for (a, _), (x, _) in zip(per_batch, batches)) / 8)
    assert float((naive - expected).norm() / expected.norm()) > 1e-3  # the naive sum would be measurably off


def _lm_loss(model, ids, y):
    return F.cross_entropy(model(ids).reshape(-1, V), y.reshape(-1))


@pytest.mark.parametrize("tie", [True, False])
def test_kfac_first_step_is_the_dense_damped_solve(tie):
    """One K-FAC step (exact damping, eigh): Δθ = −η (G ⊗ A + λI)⁻¹ vec(∇) in the block's
    layout, mapped back through the embedding's transpose."""
    model = TinyLM(tie=tie).double()
    ids, y = _data()
    lam, lr = 1e-2, 0.5
    opt = curvkit.optim.KFAC(
        model, lr=lr, damping=ExactDamping(value=lam), inverter="eigh", T_inv=1, loss_average="batch+sequence"
    )
    before = model.wte.weight.detach().clone()
    opt.zero_grad()
    _lm_loss(model, ids, y).backward()
    grad_w = model.wte.weight.grad.detach().clone()
    opt.step()
    block = opt.preconditioner.blocks["wte"]
    op = block.as_operator()
    A, G = op.A, op.G
    if not tie:
        assert block.A.name == "diagonal" and A.shape == (V, V)  # stored as V numbers, dense only here
    dense = torch.kron(G, A) + lam * torch.eye(D * V, dtype=DT)
    step = torch.linalg.solve(dense, grad_w.t().reshape(-1)).reshape(D, V).t()
    assert_matrix_close(before - model.wte.weight.detach(), lr * step, rtol=1e-9)
    text = opt.summary()
    if tie:
        assert "(weight tied with 'lm_head', transposed)" in text
        assert "lm_head.weight" not in text  # one parameter, one block: nothing left over
    opt.remove_hooks()


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_kfac_and_ekfac_train_the_tied_model(method):
    model = TinyLM().double()
    ids, y = _data(n=16)
    sgd_model = copy.deepcopy(model)
    opt = curvkit.optim.create(method, model, lr=0.3, damping=1e-2, T_inv=2, loss_average="batch+sequence")
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.3)
    for _ in range(15):
        for m, o in ((model, opt), (sgd_model, sgd)):
            o.zero_grad()
            _lm_loss(m, ids, y).backward()
            o.step()
    with torch.no_grad():
        assert float(_lm_loss(model, ids, y)) < float(_lm_loss(sgd_model, ids, y))
    assert opt.preconditioner.blocks["wte"].num_updates == 15
    opt.remove_hooks()


@pytest.mark.parametrize("method", ["singd", "rs-kfac", "tkfac", "skfac"])
def test_methods_without_tied_blocks_move_the_tied_weight_first_order(method):
    model = TinyLM().double()
    ids, y = _data()
    lr = 0.1
    with pytest.warns(UserWarning, match="tied in transposed layouts"):
        opt = curvkit.optim.create(method, model, lr=lr)
    assert "wte" not in opt.preconditioner.blocks
    assert "wte: first-order (its weight is tied in transposed layouts" in opt.summary()
    before = model.wte.weight.detach().clone()
    opt.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _lm_loss(model, ids, y).backward()
        g = model.wte.weight.grad.detach().clone()
        opt.step()
    assert_matrix_close(before - model.wte.weight.detach(), lr * g, rtol=1e-12)
    opt.remove_hooks()
