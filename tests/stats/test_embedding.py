"""nn.Embedding as a Kronecker layer: s = Wᵀ onehot(id), A diagonal (token frequencies).

References, all in float64:

* curvlinops' ``KFACLinearOperator`` on a *twin* model in which the embedding is an
  ``nn.Linear(V, D, bias=False)`` fed explicit one-hot rows (zero at padding positions, the
  padding row added as a constant): its ``G`` must equal ours and its ``A`` must be
  diagonal (expand) with our ``A`` as its diagonal (expand and reduce), for every Fisher type
  (MC with the same seed), both reductions, with and without ``padding_idx``;
* the definitions from ``torch.func`` per-datum quantities (backpropagated vectors at the
  embedding output, one-hot rows built here);
* the exact GGN block (one datum, one position: ``G ⊗ A`` is exact);
* ``torch.func`` per-sample gradients of the weight (per-example gradients).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _reference import assert_matrix_close, curvlinops_factors, g_factor_from_vectors, reference_output_vectors
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

import curvkit
from curvkit.errors import UnsupportedModuleError
from curvkit.stats.embedding import ONE_HOT_LIMIT

V, D, T, C = 9, 4, 3, 5
PAD = 2
SEED = 5
DT = torch.float64


class Net(nn.Module):
    """``head(tanh(mix(emb(ids))).flatten(1))``; with ``twin=True`` the embedding is a
    bias-free Linear on one-hot rows (the padding row added where a row is all zero)."""

    def __init__(self, pad: int | None, twin: bool = False, positions: int = T):
        super().__init__()
        torch.manual_seed(0)
        self.twin = twin
        self.emb = nn.Linear(V, D, bias=False) if twin else nn.Embedding(V, D, padding_idx=pad)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(positions * D, C)
        self.register_buffer("pad_row", torch.zeros(D))

    def forward(self, x):
        if self.twin:
            h = self.emb(x) + (x.sum(-1, keepdim=True) == 0).to(x.dtype) * self.pad_row
        else:
            h = self.emb(x)
        return self.head(torch.tanh(self.mix(h)).flatten(1))


def _pair(pad: int | None, positions: int = T):
    net = Net(pad, positions=positions).double()
    with torch.no_grad():
        net.emb.weight.normal_()  # the padding row too: it must not matter
    twin = Net(pad, twin=True, positions=positions).double()
    twin.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("emb")}, strict=False)
    with torch.no_grad():
        twin.emb.weight.copy_(net.emb.weight.t())
        if pad is not None:
            twin.pad_row.copy_(net.emb.weight[pad])
    return net, twin


def _one_hot(ids: torch.Tensor, pad: int | None) -> torch.Tensor:
    rows = F.one_hot(ids, V).to(DT)
    if pad is not None:
        rows = rows * (ids != pad).unsqueeze(-1).to(DT)
    return rows


def _data(n: int = 7, positions: int = T, pad: int | None = PAD):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (n, positions), generator=gen)
    if pad is not None:
        ids[0, 0] = pad  # padding present for sure
        ids[1, :] = pad  # and a datum of padding only
    ids[2, :] = 4  # a token repeated within a datum (reduce's off-diagonal co-occurrences)
    y = torch.randint(0, C, (n,), generator=gen)
    return ids, y


def _loss(reduction: str, kind: str = "ce"):
    return nn.CrossEntropyLoss(reduction=reduction) if kind == "ce" else nn.MSELoss(reduction=reduction)


@pytest.mark.parametrize("pad", [None, PAD])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_factors_equal_curvlinops_on_the_one_hot_twin(fisher, approx, reduction, pad):
    net, twin = _pair(pad)
    ids, y = _data(pad=pad)
    loss_fn = _loss(reduction)
    gen = torch.Generator().manual_seed(SEED) if fisher == "mc" else None
    ours = curvkit.kronecker_factors(net, loss_fn, ids, y, fisher=fisher, kfac_approx=approx, generator=gen)
    ref, _ = curvlinops_factors(twin, loss_fn, [(_one_hot(ids, pad), y)], fisher=fisher, approx=approx, seed=SEED)
    assert set(ours) == set(ref) == {"emb", "mix", "head"}
    a, g = ours["emb"]
    a_ref, g_ref = ref["emb"]
    assert a.shape == (V,), "an embedding's A is returned as its diagonal"
    assert_matrix_close(a, torch.diagonal(a_ref), rtol=1e-10, msg="diag A")
    if approx == "expand":  # expand's A of one-hot rows is diagonal: nothing is dropped
        assert torch.count_nonzero(a_ref - torch.diag(torch.diagonal(a_ref))) == 0
    else:  # reduce's exact A has the co-occurrences off the diagonal; curvkit keeps its diagonal
        assert torch.count_nonzero(a_ref - torch.diag(torch.diagonal(a_ref))) > 0
    assert_matrix_close(g, g_ref, rtol=1e-10, msg="G")
    if pad is not None:
        assert float(a[pad]) == 0.0, "the padding token has no gradient, so no curvature"
    for name in ("mix", "head"):
        assert_matrix_close(ours[name].A, ref[name][0], rtol=1e-10, msg=f"A of {name}")
        assert_matrix_close(ours[name].G, ref[name][1], rtol=1e-10, msg=f"G of {name}")


@pytest.mark.parametrize("pad", [None, PAD])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_factors_equal_their_definitions_from_torch_func(fisher, approx, pad):
    """A from one-hot rows built here, G from torch.func vectors at the embedding output."""
    net, _ = _pair(pad)
    ids, y = _data(pad=pad)
    loss_fn = nn.CrossEntropyLoss()
    tail = nn.Sequential(net.mix, nn.Tanh(), nn.Flatten(1), net.head)
    vecs, _, z = reference_output_vectors(net.emb, tail, loss_fn, ids, y, fisher)
    rows = _one_hot(ids, pad)
    n, r = rows.shape[:2]
    if approx == "expand":
        a_def = torch.diagonal(rows.reshape(-1, V).t() @ rows.reshape(-1, V)) / (n * r)
    else:
        mean = rows.mean(1)
        a_def = torch.diagonal(mean.t() @ mean) / n
    ours = curvkit.kronecker_factors(net, loss_fn, ids, y, fisher=fisher, kfac_approx=approx)
    assert_matrix_close(ours["emb"].A, a_def, rtol=1e-10, msg="A")
    assert_matrix_close(ours["emb"].G, g_factor_from_vectors(vecs, approx, z), rtol=1e-10, msg="G")


@pytest.mark.parametrize("kind", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("token", [6, PAD])
def test_one_datum_one_position_type2_is_the_exact_ggn_block(token, reduction, kind):
    """G ⊗ diag(A) = Jᵀ H J for the block matrix Wᵀ (row-major), J from torch.func."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(V, D, padding_idx=PAD), nn.Tanh(), nn.Linear(D, C)).double()
    with torch.no_grad():
        model[0].weight.normal_()
    ids = torch.tensor([token])
    y = torch.randint(0, C, (1,)) if kind == "ce" else torch.randn(1, C, dtype=DT)
    loss_fn = _loss(reduction, kind)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def out(w):
        return functional_call(model, {**params, "0.weight": w}, (ids,)).squeeze(0)

    jac = jacrev(out)(params["0.weight"])  # (C, V, D)
    J = jac.transpose(1, 2).reshape(C, D * V)  # w.r.t. vec_row(Wᵀ)
    f = out(params["0.weight"]).detach()
    H = hessian(lambda o: loss_fn(o.unsqueeze(0), y))(f).reshape(C, C)
    ours = curvkit.kronecker_factors(model, loss_fn, ids, y, fisher="type-2")
    A, G = ours["0"]
    block = torch.kron(G, torch.diag(A))
    assert_matrix_close(block, J.t() @ H @ J, rtol=1e-10)
    if token == PAD:
        assert torch.count_nonzero(block) == 0


@pytest.mark.parametrize("pad", [None, PAD])
def test_per_example_gradients_equal_torch_func(pad):
    """The block's per-example gradients (dense and sparse form) equal torch.func per-sample
    gradients of the weight, transposed (empirical Fisher vectors of a sum loss)."""
    from curvkit.config import KFACApprox
    from curvkit.stats.engine import CaptureEngine
    from curvkit.stats.plan import make_plan

    net, _ = _pair(pad)
    ids, y = _data(pad=pad)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_one(w, x, t):
        return loss_fn(functional_call(net, {**params, "emb.weight": w}, (x.unsqueeze(0),)), t.unsqueeze(0))

    ref = vmap(grad(loss_one), in_dims=(None, 0, 0))(params["emb.weight"], ids, y).transpose(1, 2)  # (N, D, V)
    plan = make_plan(net, curvkit.default_registry())
    engine = CaptureEngine(plan, net)
    with engine.attached_for():
        out = net(ids)
    loss = loss_fn(out, y)
    (v,) = torch.autograd.grad(loss, out, retain_graph=True)
    engine.backpropagate(out, [v], num_passes=1)
    stats = engine.layer_stats("emb", "fisher", KFACApprox.EXPAND, 1.0)
    assert stats is not None and stats.diagonal_input
    assert_matrix_close(stats.per_example_gradients(), ref, rtol=1e-10, msg="dense")
    cols, values, d_in = stats.per_example_gradient_columns()
    assert d_in == V
    assert values.shape[0] == 1 and values.shape[1] == cols.numel() <= ids.numel()
    # the sparse entries sum, per token, to the column sums of the per-example gradients
    summed = torch.zeros(V, D, dtype=DT).index_add_(0, cols, values[0])
    assert_matrix_close(summed.t(), ref.sum(0), rtol=1e-10, msg="sparse")
    if pad is not None:
        assert torch.count_nonzero(ref[:, :, pad]) == 0
    engine.clear()


def test_one_position_per_datum_1d_ids_and_accumulation():
    """(N,) ids (one position each), and a data set streamed in batches equals one batch."""
    model = nn.Sequential(nn.Embedding(V, D), nn.Tanh(), nn.Linear(D, C)).double()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (12,), generator=gen)
    y = torch.randint(0, C, (12,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    whole = curvkit.kronecker_factors(model, loss_fn, ids, y, fisher="type-2")
    parts = curvkit.accumulate_kronecker_factors(model, loss_fn, [(ids[:5], y[:5]), (ids[5:], y[5:])], fisher="type-2")
    counts = torch.bincount(ids, minlength=V).to(DT) / 12
    assert_matrix_close(whole["0"].A, counts, rtol=1e-12)
    for name in whole:
        assert_matrix_close(parts[name].A, whole[name].A, rtol=1e-10)
        assert_matrix_close(parts[name].G, whole[name].G, rtol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"sparse": True}, "sparse=True"),
        ({"max_norm": 1.0}, "max_norm=1.0"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq=True"),
    ],
)
def test_unsupported_configurations_are_refused_clearly(kwargs, words):
    model = nn.Sequential(nn.Embedding(V, D, **kwargs), nn.Flatten(1), nn.Linear(T * D, C))
    ids, y = torch.randint(0, V, (4, T)), torch.randint(0, C, (4,))
    with pytest.raises(UnsupportedModuleError, match=words):
        curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), ids, y, fisher="type-2", unsupported="error")
    with pytest.warns(UserWarning, match=words):
        factors = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), ids, y, fisher="type-2")
    assert set(factors) == {"2"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.KFAC(model, lr=0.1)
    assert "0.weight: first-order" in opt.summary()


def test_a_large_vocabulary_never_forms_one_hot_rows(monkeypatch):
    """V = 100 000: factors, K-FAC and EKFAC steps run without one-hot features or a V×V
    matrix (one_hot is made to fail); A is stored as V numbers."""
    big = 100_000
    import curvkit.stats.embedding as emb_module

    def forbidden(*args, **kwargs):
        raise AssertionError("one-hot features were formed")

    monkeypatch.setattr(emb_module.F, "one_hot", forbidden)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(big, 3, padding_idx=0), nn.Flatten(1), nn.Linear(2 * 3, C))
    ids = torch.randint(0, big, (16, 2))
    y = torch.randint(0, C, (16,))
    for approx in ("expand", "reduce"):
        A, G = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), ids, y, fisher="type-2", kfac_approx=approx)["0"]
        assert A.shape == (big,) and G.shape == (3, 3)
    for cls in (curvkit.optim.KFAC, curvkit.optim.EKFAC):
        opt = cls(model, lr=0.01, T_inv=1)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(ids), y).backward()
            opt.step()
        block = opt.preconditioner.blocks["0"]
        assert block.A.to_dense is not None and block.A.name == "diagonal" and block.A.dim == big
        assert opt.preconditioner.state_bytes() < 40 * big * 8  # O(V) per factor, not O(V²)
        opt.remove_hooks()


def test_square_tie_is_recognised_as_transposed():
    """An embedding tied to an output layer with V = D: the shapes agree both ways, the
    layouts do not (the block's sites say transposed)."""
    emb = nn.Embedding(5, 5)
    head = nn.Linear(5, 5, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head)
    plan = curvkit.stats.make_plan(model, curvkit.default_registry())
    (layer,) = plan.layers
    assert [s.transposed for s in layer.sites] == [False, True]


def test_one_hot_limit_is_documented_in_the_first_order_reason():
    model = nn.Sequential(nn.Embedding(ONE_HOT_LIMIT + 1, 2), nn.Flatten(1), nn.Linear(2, C))
    with pytest.warns(UserWarning, match="ONE_HOT_LIMIT"):
        opt = curvkit.optim.SINGD(model, lr=0.1)
    assert f"embedding with {ONE_HOT_LIMIT + 1} rows" in opt.summary()
    opt.remove_hooks()


class _PositionLM(nn.Module):
    """Token and position embeddings; position ids ``(1, T)`` broadcast over the batch (as
    Hugging Face's GPT-2 passes them) unless ``expand``."""

    def __init__(self, expand: bool):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(T, D)
        self.head = nn.Linear(D, V)
        self.expand = expand

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        if self.expand:
            pos = pos.expand(ids.shape[0], -1)
        return self.head(torch.tanh(self.wte(ids) + self.wpe(pos)).mean(1))


def test_a_use_broadcast_over_the_batch_gets_no_statistics():
    """An embedding called on a batch of one whose output is broadcast receives gradients
    already summed over the data: no Fisher block can be formed from them. It is left out
    of the factors and moved by the first-order rule, with a warning naming the fix; with the
    ids expanded to the batch it is preconditioned."""
    ids = torch.randint(0, V, (6, T), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(1))
    loss_fn = nn.CrossEntropyLoss()
    model = _PositionLM(expand=False).double()
    with pytest.warns(UserWarning, match=r"'wpe'.*batch of one.*position_ids=torch.arange\(T\).expand\(N, T\)"):
        factors = curvkit.kronecker_factors(model, loss_fn, ids, y, fisher="type-2")
    assert set(factors) == {"wte", "head"}
    expanded = curvkit.kronecker_factors(_PositionLM(expand=True).double(), loss_fn, ids, y, fisher="type-2")
    assert_matrix_close(expanded["wpe"].A, torch.full((T,), 1.0 / T, dtype=DT), rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.KFAC(model, lr=0.1)
        before = model.wpe.weight.detach().clone()
        opt.zero_grad()
        loss_fn(model(ids), y).backward()
        g = model.wpe.weight.grad.detach().clone()
        opt.step()
    assert_matrix_close(before - model.wpe.weight.detach(), 0.1 * g, rtol=1e-12)  # the first-order rule
    assert "wpe" in opt.preconditioner.engine.broadcast and "wte" not in opt.preconditioner.engine.broadcast
    assert "wpe: first-order (its module was called on a batch of one and broadcast" in opt.summary()
    opt.remove_hooks()
    from curvkit.laplace import KroneckerLaplace

    la = KroneckerLaplace(model, "classification")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="broadcast"):
            la.fit([(ids, y)], progress=False)
