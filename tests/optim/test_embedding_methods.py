"""Every registered method on a model with an ``nn.Embedding``.

* Small vocabulary: every method preconditions the embedding (K-FAC and EKFAC from its
  diagonal ``A``, the others from one-hot rows), the padding row never moves, and the loss
  falls.
* A vocabulary above :data:`~curvkit.stats.embedding.ONE_HOT_LIMIT`: K-FAC and EKFAC still
  precondition it (``A`` stored as ``V`` numbers); the other methods move it by the
  first-order rule, warn, and say why in ``summary()``.
* A small language model (embedding, hidden layer, LM head, ``(N, T, V)`` logits): K-FAC,
  EKFAC, SINGD and RS-KFAC end below SGD with the same learning rate, momentum and number of
  steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
import curvkit.optim
from curvkit.bench.settings import HYPERPARAMETERS
from curvkit.linalg import ExactDamping
from curvkit.stats.embedding import ONE_HOT_LIMIT

METHODS = curvkit.default_registry().methods.names()
PAD = 0


def _options(method: str, **overrides) -> dict:
    """``curvkit bench``'s hyperparameters for ``method`` (its defaults everywhere)."""
    options = {k: v for k, v in HYPERPARAMETERS[method].items() if k != "tasks"}
    if isinstance(options.get("damping"), tuple):
        options["damping"] = ExactDamping(value=options["damping"][1])
    options.update(overrides)
    return options


class Net(nn.Module):
    def __init__(self, vocab: int, dim: int = 4, positions: int = 3, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, dim, padding_idx=PAD)
        self.head = nn.Linear(positions * dim, classes)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).flatten(1))


def _batch(vocab: int, n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, 3), generator=g)
    ids[:4, 0] = PAD
    return ids, (ids.sum(1) % 3)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_preconditions_a_small_embedding(method):
    model = Net(12).double()
    ids, y = _batch(12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qe-kldwrm's inner-loop note
        opt = curvkit.optim.create(method, model, **_options(method, lr=0.05))
    assert "emb" in opt.preconditioner.blocks, opt.summary()
    assert "emb.weight: first-order" not in opt.summary()
    pad_row = model.emb.weight[PAD].detach().clone()
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(12):
            opt.zero_grad()
            loss = F.cross_entropy(model(ids), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert opt.preconditioner.blocks["emb"].num_updates > 0
    assert torch.equal(model.emb.weight[PAD], pad_row), "the padding row has no gradient and must not move"
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    opt.remove_hooks()


@pytest.mark.parametrize("method", METHODS)
def test_a_large_vocabulary_is_preconditioned_only_by_diagonal_methods(method):
    vocab = ONE_HOT_LIMIT + 1
    model = Net(vocab, dim=2)
    ids, y = _batch(vocab, n=8)
    spec = curvkit.default_registry().methods.get(method)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = curvkit.optim.create(method, model, **_options(method, lr=0.01))
    summary = opt.summary()
    if spec.diagonal_inputs:
        assert "emb" in opt.preconditioner.blocks
        assert "A: diagonal" in summary
    else:
        assert "emb" not in opt.preconditioner.blocks
        assert f"emb: first-order (it is an embedding with {vocab} rows" in summary
        assert any("ONE_HOT_LIMIT" in str(w.message) for w in caught)
    before = model.emb.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.zero_grad()
        F.cross_entropy(model(ids), y).backward()
        opt.step()
    moved = (model.emb.weight.detach() - before).abs().sum(1) > 0
    used = torch.zeros(vocab, dtype=torch.bool)
    used[ids.reshape(-1)] = True
    used[PAD] = False
    assert bool(moved[used].all()) and not bool(moved[~used].any())  # moved exactly where it has a gradient
    opt.remove_hooks()


V_LM, D_LM, T_LM = 16, 8, 6


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V_LM, D_LM)
        self.mix = nn.Linear(D_LM, D_LM)
        self.head = nn.Linear(D_LM, V_LM)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def _language(n: int, seed: int):
    """Sequences whose next token is ``(3 t + 1) mod V``, with 10 % of tokens random."""
    g = torch.Generator().manual_seed(seed)
    seq = [torch.randint(0, V_LM, (n, 1), generator=g)]
    for _ in range(T_LM):
        nxt = (3 * seq[-1] + 1) % V_LM
        noise = torch.rand(n, 1, generator=g) < 0.1
        seq.append(torch.where(noise, torch.randint(0, V_LM, (n, 1), generator=g), nxt))
    s = torch.cat(seq, 1)
    return s[:, :-1], s[:, 1:]


def _train(model, opt, X, Y, steps: int = 30) -> float:
    gen = torch.Generator().manual_seed(2)
    for _ in range(steps):
        idx = torch.randint(0, X.shape[0], (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(X[idx]).reshape(-1, V_LM), Y[idx].reshape(-1)).backward()
        opt.step()
    with torch.no_grad():
        return float(F.cross_entropy(model(X).reshape(-1, V_LM), Y.reshape(-1)))


@pytest.mark.parametrize("method", ["kfac", "ekfac", "singd", "rs-kfac"])
def test_a_language_model_with_an_embedding_trains_below_sgd(method):
    X, Y = _language(512, seed=1)
    lr, momentum = 0.1, 0.9
    sgd_model = TinyLM()
    sgd = _train(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=lr, momentum=momentum), X, Y)
    model = TinyLM()
    start = float(F.cross_entropy(model(X).reshape(-1, V_LM), Y.reshape(-1)))
    opt = curvkit.optim.create(
        method, model, **_options(method, lr=lr, momentum=momentum), loss_average="batch+sequence"
    )
    assert "emb" in opt.preconditioner.blocks
    ours = _train(model, opt, X, Y)
    assert ours < 0.5 * start
    assert ours < sgd, f"{method}: {ours:.4f} vs SGD {sgd:.4f} after 30 steps"
    opt.remove_hooks()
