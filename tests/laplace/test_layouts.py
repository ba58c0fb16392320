"""Laplace on blocks that are not whole parameters reshaped: row ranges (attention's query,
key and value blocks over ``in_proj_weight``), transposes (an embedding, an embedding tied to
its LM head) and a diagonal ``A`` (an embedding's token frequencies).

References, float64:

* a *twin* model whose blocks are whole parameters (attention from four ``nn.Linear``, an
  embedding as a bias-free ``nn.Linear`` on one-hot rows): the curvature, log marginal
  likelihood, Jacobians and predictive must be the twin's, with the flat vector permuted;
* ``torch.func``: Jacobians of the output w.r.t. the flat parameters, the EKFAC spectrum
  from per-datum gradients;
* laplace-torch's own backends (``CurvlinopsGGN``: exact GGN for ``diag``/``full``) and its
  ``Kron`` (our ``kron`` entries, transposed ones included, against our curvature).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

from curvkit.errors import UnsupportedModuleError
from curvkit.laplace import KroneckerCurvature, KroneckerLaplace

DT = torch.float64
E, HEADS, T, C = 4, 2, 3, 3
V, D, PAD = 6, 3, 1
N = 10


# --- models and their twins ---------------------------------------------------------------


class AttnNet(nn.Module):
    """``head(mean_t attn(q=x', k=v=m))`` with ``x' = inp(x)``; ``m = x'`` (self-attention:
    one linear call on ``in_proj_weight``) or ``tanh(mem(x'))`` (row ranges of it)."""

    def __init__(self, cross: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(2, E)
        self.att = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.mem = nn.Linear(E, E) if cross else None
        self.head = nn.Linear(E, C)
        self.cross = cross

    def forward(self, x):
        h = self.inp(x)
        m = torch.tanh(self.mem(h)) if self.mem is not None else h
        return self.head(self.att(h, m, m, need_weights=False)[0].mean(1))


class _Explicit(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(E, E) for _ in range(4))
        with torch.no_grad():
            for i, lin in enumerate((self.q, self.k, self.v)):
                lin.weight.copy_(mha.in_proj_weight[i * E : (i + 1) * E])
                lin.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            self.out.weight.copy_(mha.out_proj.weight)
            self.out.bias.copy_(mha.out_proj.bias)

    def forward(self, q, k, v, need_weights=False):
        n, lq, _ = q.shape

        def heads(t):
            return t.reshape(n, t.shape[1], HEADS, E // HEADS).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(self.q(q)), heads(self.k(k)), heads(self.v(v)))
        return (self.out(att.transpose(1, 2).reshape(n, lq, E)),)


def _attention_twin(model: AttnNet) -> AttnNet:
    twin = copy.deepcopy(model)
    twin.att = _Explicit(model.att).to(DT)
    return twin


def _attention_labels(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The twin's labelled parameters arranged as the attention model's."""
    out = {k: v for k, v in labels.items() if not k.startswith("att.")}
    out["att.in_proj_weight"] = torch.cat([labels[f"att.{p}.weight"] for p in "qkv"])
    out["att.in_proj_bias"] = torch.cat([labels[f"att.{p}.bias"] for p in "qkv"])
    out["att.out_proj.weight"] = labels["att.out.weight"]
    out["att.out_proj.bias"] = labels["att.out.bias"]
    return out


class EmbNet(nn.Module):
    """``head(mean_t tanh(emb(ids)))``; ``twin=True``: the embedding as a bias-free Linear on
    one-hot rows (zero at padding, where the padding row is added as a constant)."""

    def __init__(self, twin: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.twin = twin
        self.emb = nn.Linear(V, D, bias=False) if twin else nn.Embedding(V, D, padding_idx=PAD)
        self.head = nn.Linear(D, C)
        self.register_buffer("pad_row", torch.zeros(D))
        if not twin:
            with torch.no_grad():
                self.emb.weight.normal_()

    def forward(self, x):
        if self.twin:
            h = self.emb(x) + (x.sum(-1, keepdim=True) == 0).to(x.dtype) * self.pad_row
        else:
            h = self.emb(x)
        return self.head(torch.tanh(h).mean(1))


def _embedding_twin(model: EmbNet) -> EmbNet:
    twin = EmbNet(twin=True).to(DT)
    with torch.no_grad():
        twin.emb.weight.copy_(model.emb.weight.t())
        twin.pad_row.copy_(model.emb.weight[PAD])
        twin.head.load_state_dict(model.head.state_dict())
    return twin


def _one_hot(ids: torch.Tensor) -> torch.Tensor:
    return F.one_hot(ids, V).to(DT) * (ids != PAD).unsqueeze(-1).to(DT)


class TiedNet(nn.Module):
    """``lm_head(tanh(mix(mean_t wte(ids))))`` with ``lm_head.weight`` tied to ``wte.weight``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.mix(self.wte(ids).mean(1))))


def _ids(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    ids[0, 0] = PAD
    return ids, torch.randint(0, C, (n,), generator=g)


def _seq(n: int = N, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, T, 2, generator=g, dtype=DT), torch.randint(0, C, (n,), generator=g)


# --- helpers -------------------------------------------------------------------------------


def _permutation(ours: KroneckerCurvature, twin: KroneckerCurvature, arrange) -> torch.Tensor:
    """``p`` with ``θ_ours = θ_twin[p]``: label every twin entry by its flat position and
    arrange the labels as the model's parameters."""
    labels, offset = {}, 0
    for name, shape in zip(twin.param_names, twin.param_shapes):
        labels[name] = torch.arange(offset, offset + shape.numel()).reshape(shape)
        offset += shape.numel()
    mine = arrange(labels)
    return torch.cat([mine[name].reshape(-1) for name in ours.param_names])


def _flat_jacobians(model: nn.Module, X: torch.Tensor, names: list[str]) -> torch.Tensor:
    """``(M, C, P)`` Jacobians of the output w.r.t. the named parameters, torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(*values):
        return functional_call(model, {**params, **dict(zip(names, values))}, (X,))

    jac = jacrev(f, argnums=tuple(range(len(names))))(*[params[n] for n in names])
    return torch.cat([j.reshape(X.shape[0], -1, params[n].numel()) for j, n in zip(jac, names)], dim=2)


def _curvature(model, X, y, **kwargs) -> KroneckerCurvature:
    loader = [(X[:6], y[:6]), (X[6:], y[6:])]
    return KroneckerCurvature.from_data(
        model, nn.CrossEntropyLoss(reduction="sum"), loader, fisher="type-2", progress=False, **kwargs
    )


def _close(actual, expected, rtol=1e-10):
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


# --- row ranges: attention ---------------------------------------------------------------


@pytest.mark.parametrize("ekfac", [False, True], ids=["kfac", "ekfac"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_row_range_blocks_equal_the_explicit_twin(cross, ekfac):
    model = AttnNet(cross).to(DT)
    twin = _attention_twin(model)
    X, y = _seq()
    ours = _curvature(model, X, y, correct_eigenvalues=ekfac)
    ref = _curvature(twin, X, y, correct_eigenvalues=ekfac)
    assert [b.name for b in ours.blocks if b.name.startswith("att")] == ["att.q", "att.k", "att.v", "att.out_proj"]
    p = _permutation(ours, ref, _attention_labels)
    _close(ours.to_dense(), ref.to_dense()[p][:, p])
    v = torch.randn(ours.num_params, 2, dtype=DT)
    _close(ours @ v, (ref.to_dense() @ v[torch.argsort(p)])[p])
    _close(ours.diagonal(), ref.diagonal()[p])
    prior = torch.rand(ours.num_params, dtype=DT) + 0.5  # a diagonal prior, in the flat order
    inverse = ours.inverse(prior_precision=prior) @ v
    dense = ours.to_dense() + torch.diag(prior)
    _close(inverse, torch.linalg.solve(dense, v), rtol=1e-8)
    _close(ours.logdet(prior_precision=prior), torch.logdet(dense))


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_laplace_on_row_range_blocks(cross):
    model = AttnNet(cross).to(DT)
    twin = _attention_twin(model)
    X, y = _seq()
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    ours = KroneckerLaplace(model, "classification", prior_precision=0.7)
    ref = KroneckerLaplace(twin, "classification", prior_precision=0.7)
    ours.fit(loader, progress=False)
    ref.fit(loader, progress=False)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
    assert ours.curvature is not None
    js, f = ours.jacobians(X[:4])
    _close(js, _flat_jacobians(model, X[:4], ours.curvature.param_names))
    _close(ours.predictive(X[:4]), ref.predictive(X[:4]))


def _ggn(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The exact GGN of the summed cross-entropy over ``model.parameters()`` (laplace-torch's
    flat order), ``Σ_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n`` from torch.func Jacobians."""
    names = [n for n, _ in model.named_parameters()]
    J = _flat_jacobians(model, X, names)
    with torch.no_grad():
        p = torch.softmax(model(X), dim=-1)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def test_laplace_torch_kron_refuses_row_ranges_and_diag_full_work():
    """laplace-torch's own backends cannot run attention here (their torch.func path needs
    forward-mode AD, which PyTorch's attention kernels lack), so diag/full are checked against
    the torch.func GGN."""
    from laplace import Laplace

    from curvkit.laplace import CurvkitGGN

    model = AttnNet(cross=True).to(DT)
    X, y = _seq()
    loader = DataLoader(TensorDataset(X, y), batch_size=6)
    la = Laplace(
        copy.deepcopy(model), "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvkitGGN
    )
    with pytest.raises(UnsupportedModuleError, match=r"'att.q', 'att.k', 'att.v'.*row ranges"):
        la.fit(loader)
    ggn = _ggn(model, X)
    for structure in ("diag", "full"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la = Laplace(
                copy.deepcopy(model),
                "classification",
                subset_of_weights="all",
                hessian_structure=structure,
                backend=CurvkitGGN,
            )
            la.fit(loader)
        _close(la.H, torch.diagonal(ggn) if structure == "diag" else ggn)


# --- transposes and a diagonal A: the embedding --------------------------------------------


def _embedding_labels(labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**labels, "emb.weight": labels["emb.weight"].t()}


def test_embedding_curvature_equals_the_one_hot_twin():
    model = EmbNet().to(DT)
    twin = _embedding_twin(model)
    ids, y = _ids()
    ours = _curvature(model, ids, y)
    ref = _curvature(twin, _one_hot(ids), y)
    (block,) = [b for b in ours.blocks if b.name == "emb"]
    assert block.diagonal_A and block.A.shape == (V,)
    p = _permutation(ours, ref, _embedding_labels)
    _close(ours.to_dense(), ref.to_dense()[p][:, p])
    _close(ours.diagonal(), ref.diagonal()[p])
    _close(ours.trace(), ref.trace())
    prior = torch.rand(ours.num_params, dtype=DT) + 0.5
    _close(ours.logdet(prior_precision=prior), ref.logdet(prior_precision=prior[torch.argsort(p)]))
    v = torch.randn(ours.num_params, 2, dtype=DT)
    _close(ours.power(-0.5, prior_precision=0.3) @ v, (ref.power(-0.5, prior_precision=0.3) @ v[torch.argsort(p)])[p])
    samples = ours.sample(3, prior_precision=0.3, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, ours.num_params) and bool(torch.isfinite(samples).all())


def test_embedding_ekfac_spectrum_equals_its_definition():
    """E = Σ_{n,c} (Q_Gᵀ J_{n,c})² with Q_A = I, J_{n,c} the per-datum gradients of the
    type-2 vectors w.r.t. the block matrix Wᵀ, from torch.func."""
    model = EmbNet().to(DT)
    ids, y = _ids()
    ekfac = _curvature(model, ids, y, correct_eigenvalues=True)
    ((pos, block),) = [(i, b) for i, b in enumerate(ekfac.blocks) if b.name == "emb"]
    eig = block.eigen()
    assert eig.QA.numel() == 0  # a diagonal A: its eigenbasis is the identity
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total = torch.zeros(D, V, dtype=DT)
    for n in range(N):

        def f(w, n=n):
            return functional_call(model, {**params, "emb.weight": w}, (ids[n : n + 1],)).squeeze(0)

        jac = jacrev(f)(params["emb.weight"]).transpose(1, 2)  # (C, D, V): w.r.t. Wᵀ
        out = f(params["emb.weight"]).detach()
        h = hessian(lambda o, n=n: loss_fn(o.unsqueeze(0), y[n : n + 1]))(out)
        evals, evecs = torch.linalg.eigh(h)
        root = evecs * evals.clamp_min(0).sqrt()  # h = root rootᵀ
        for c in range(C):
            j = torch.einsum("k,kdv->dv", root[:, c], jac)
            total += (eig.QG.t() @ j) ** 2
    _close(block.corrected_eigenvalues, total)
    dense = torch.kron(eig.QG.contiguous(), torch.eye(V, dtype=DT))
    expected = (dense * total.reshape(1, -1)) @ dense.t()  # in vec_row(Wᵀ) order
    i = ekfac.indices[pos].reshape(-1)
    _close(ekfac.to_dense()[i][:, i], expected)


def test_embedding_laplace_and_jacobians():
    model = EmbNet().to(DT)
    twin = _embedding_twin(model)
    ids, y = _ids()
    loader = DataLoader(TensorDataset(ids, y), batch_size=6)
    twin_loader = DataLoader(TensorDataset(_one_hot(ids), y), batch_size=6)
    ours = KroneckerLaplace(model, "classification", prior_precision=0.4)
    ref = KroneckerLaplace(twin, "classification", prior_precision=0.4)
    ours.fit(loader, progress=False)
    ref.fit(twin_loader, progress=False)
    torch.testing.assert_close(ours.log_marginal_likelihood(), ref.log_marginal_likelihood(), rtol=1e-10, atol=0)
    assert ours.curvature is not None and ours.curvature.param_names == ["emb.weight", "head.weight", "head.bias"]
    js, _ = ours.jacobians(ids[:4])
    _close(js, _flat_jacobians(model, ids[:4], ours.curvature.param_names))
    _close(ours.predictive(ids[:4]), ref.predictive(_one_hot(ids[:4])))


# --- a tie in transposed layouts ---------------------------------------------------------------


def _tied_dense(model: TiedNet, ids, y) -> torch.Tensor:
    """The tied model's K-FAC matrix built here from kronecker_factors (the tie's pair is
    checked against an SVD in tests/stats/test_tied_embedding.py): the tied block is
    G ⊗ A on vec_row(Wᵀ), permuted to vec_row(W)."""
    import curvkit

    f = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(reduction="sum"), ids, y, fisher="type-2")
    A, G = f["wte"]
    block = torch.kron(G, A)  # (D·V)², rows (d, v)
    perm = torch.arange(D * V).reshape(D, V).t().reshape(-1)  # vec_row(W)[i] = vec_row(Wᵀ)[perm[i]]
    tied = block[perm][:, perm]
    a, g = f["mix"]
    mix = torch.kron(g, a)  # (D·(D+1))², [W b] row-major: separate weight and bias later
    idx_w = torch.tensor([i * (D + 1) + j for i in range(D) for j in range(D)])
    idx_b = torch.tensor([i * (D + 1) + D for i in range(D)])
    mix_w, mix_b = mix[idx_w][:, idx_w], mix[idx_b][:, idx_b]
    return torch.block_diag(tied, mix_w, mix_b)


def test_tied_curvature_jacobians_and_laplace_torch_kron():
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    from curvkit.laplace import CurvkitGGN

    model = TiedNet().to(DT)
    ids, y = _ids(seed=2)
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(4))
    ours = KroneckerCurvature.from_data(
        model, nn.CrossEntropyLoss(reduction="sum"), [(ids, y)], fisher="type-2", separate_bias=True, progress=False
    )
    assert ours.param_names == ["wte.weight", "mix.weight", "mix.bias"]
    expected = _tied_dense(model, ids, y)
    _close(ours.to_dense(), expected)
    la = KroneckerLaplace(model, "classification", prior_precision=0.5)
    la.fit([(ids, y)], progress=False)
    js, _ = la.jacobians(ids[:3])
    _close(js, _flat_jacobians(model, ids[:3], ours.param_names))
    dense_precision = expected + 0.5 * torch.eye(expected.shape[0], dtype=DT)
    _close(la.log_det_posterior_precision(), torch.logdet(dense_precision))
    loader = DataLoader(TensorDataset(ids, y), batch_size=N)  # one batch: laplace-torch adds Kron pairs per batch
    fitted = {}
    for structure, backend in (("kron", CurvkitGGN), ("full", CurvkitGGN), ("full", CurvlinopsGGN)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lt = Laplace(
                copy.deepcopy(model),
                "classification",
                subset_of_weights="all",
                hessian_structure=structure,
                backend=backend,
            )
            lt.fit(loader)
        fitted[(structure, backend.__name__)] = lt
    _close(fitted[("kron", "CurvkitGGN")].H.to_matrix(), expected)  # the tie's entry is [A·M/N, G]
    _close(fitted[("full", "CurvkitGGN")].H, fitted[("full", "CurvlinopsGGN")].H, rtol=1e-7)


def test_embedding_laplace_torch_kron_equals_our_curvature():
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    from curvkit.laplace import CurvkitGGN

    model = EmbNet().to(DT)
    ids, y = _ids()
    loader = DataLoader(TensorDataset(ids, y), batch_size=6)
    ours = _curvature(model, ids, y, separate_bias=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt = Laplace(
            copy.deepcopy(model),
            "classification",
            subset_of_weights="all",
            hessian_structure="kron",
            backend=CurvkitGGN,
        )
        lt.fit(loader)
    _close(lt.H.to_matrix(), ours.to_dense())
    # the padding row: PyTorch's backward gives it no gradient (so no curvature here), while
    # laplace-torch's torch.func path differentiates the lookup in forward mode, which does not
    # mask it; compare everything else, and check ours is zero there
    pad = torch.zeros(ours.num_params, dtype=torch.bool)
    pad[PAD * D : (PAD + 1) * D] = True
    for structure in ("diag", "full"):
        results = []
        for backend in (CurvkitGGN, CurvlinopsGGN):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                la = Laplace(
                    copy.deepcopy(model),
                    "classification",
                    subset_of_weights="all",
                    hessian_structure=structure,
                    backend=backend,
                )
                la.fit(loader)
            results.append(la.H)
        ours_h, ref_h = results
        if structure == "diag":
            _close(ours_h[~pad], ref_h[~pad], rtol=1e-7)
            assert torch.count_nonzero(ours_h[pad]) == 0
        else:
            _close(ours_h[~pad][:, ~pad], ref_h[~pad][:, ~pad], rtol=1e-7)
            assert torch.count_nonzero(ours_h[pad]) == 0 and torch.count_nonzero(ours_h[:, pad]) == 0
