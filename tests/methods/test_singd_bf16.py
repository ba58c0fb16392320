"""SINGD in bfloat16: parameters, gradients and the factors ``K``, ``C``, ``m_K``, ``m_C``
all in bf16, 500 steps, finite loss throughout, and a test accuracy within 1 percentage
point of the same run in float32 (same seeds, data and hyperparameters).

Tasks:

* sklearn's digits with the 64-128-10 ReLU MLP (dense and block-diagonal factors);
* a transformer-style model (Linear 16→32, GELU, Linear 32→16 on 8-token sequences, mean
  over the sequence, Linear 16→4) on a synthetic task labelled by a random teacher of the
  same shape, dense factors, ``loss_average="batch+sequence"`` (the per-token gradients
  carry the model's 1/R from the sequence mean; with ``loss_average="batch"`` the curvature
  is mis-scaled by R).

Both train with the learning rate decayed linearly to 0 over the 500 steps. At a constant
learning rate the test accuracy at the last step is a draw from the SGD noise: float32
itself moves by ±1.5 points between steps 400 and 500 on the sequence task, which made a
bf16 − fp32 comparison at one step a coin toss (gaps of −2.7 to +0.9 points over eight
data seeds). With the decay the last iterate settles; over sixteen data seeds the
sequence gap was −0.9 to +1.1 points (mean +0.15): no seed more than 1 point below; on
digits, over eight seeds (initialisation and batch order), −1.6 to +1.3 (dense, mean
−0.1) and −2.0 to +0.9 (block-diagonal, mean 0.0): there a single seed is not within 1
point reliably (2 and 1 of 8 seeds beyond), the mean is. The single-seed tests below use
seed 0 (gaps −0.2, −0.4, 0.0); :func:`test_bf16_gap_over_seeds` (slow) checks the mean
over seeds 0–3.

``K`` and ``C`` are stored in bf16 with their rounding error carried to the next update
(:meth:`SINGDBlock._step_factor`); :func:`test_bf16_factor_update_is_compensated` shows
what that buys.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvkit.optim import SINGD

STEPS = 500
HYPER = {"lr": 0.02, "momentum": 0.9, "damping": 1e-3, "lr_cov": 1e-2, "T": 1}


def _digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X_tr, X_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=0.25, stratify=data.target, random_state=0
    )
    return (
        torch.tensor(X_tr / 16, dtype=torch.float32),
        torch.tensor(y_tr),
        torch.tensor(X_te / 16, dtype=torch.float32),
        torch.tensor(y_te),
    )


class _SeqMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(1)


def _seq_block() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))


def _sequences(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """3072 sequences (8 tokens × 16 features), 4 balanced-ish classes from a random teacher."""
    X = torch.randn(3072, 8, 16, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(123 + seed)
    teacher = _seq_block()
    W = torch.randn(16, 4, generator=torch.Generator().manual_seed(7 + seed))
    with torch.no_grad():
        z = teacher(X).mean(1) @ W
        y = ((z - z.mean(0)) / z.std(0)).argmax(1)
    return X[:2048], y[:2048], X[2048:], y[2048:]


def _model(task: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if task == "sequence":
        return nn.Sequential(_seq_block(), _SeqMean(), nn.Linear(16, 4))
    assert task == "digits"
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(task: str, dtype: torch.dtype, structure: str, seed: int = 0) -> tuple[float, list[float], SINGD]:
    X_tr, y_tr, X_te, y_te = _digits() if task == "digits" else _sequences(seed)
    X_tr, X_te = X_tr.to(dtype), X_te.to(dtype)
    model = _model(task, seed).to(dtype)
    extra = {"loss_average": "batch+sequence"} if task == "sequence" else {}
    opt = SINGD(model, structure=structure, factor_dtype=dtype, **HYPER, **extra)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / STEPS)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    perm = torch.randperm(len(X_tr), generator=gen)
    pos = 0
    for _ in range(STEPS):
        if pos + 64 > len(X_tr):
            perm, pos = torch.randperm(len(X_tr), generator=gen), 0
        idx = perm[pos : pos + 64]
        pos += 64
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx])
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        acc = float((model(X_te).argmax(1) == y_te).float().mean())
    return acc, losses, opt


@pytest.mark.parametrize(
    ("task", "structure", "tolerance"),
    [("digits", "dense", 0.01), ("digits", "block30diagonal", 0.01), ("sequence", "dense", 0.01)],
)
def test_bf16_matches_fp32_accuracy(task, structure, tolerance):
    acc32, losses32, _ = _train(task, torch.float32, structure)
    acc16, losses16, opt = _train(task, torch.bfloat16, structure)
    assert all(math.isfinite(v) for v in losses16), "bf16 SINGD produced a non-finite loss"
    # the state really is bf16 and was updated on every step
    block = next(iter(opt.preconditioner.blocks.values()))
    assert block.K.dtype == torch.bfloat16 and block.C.dtype == torch.bfloat16
    assert block.num_updates == STEPS and block.skipped_updates == 0
    assert acc32 > (0.9 if task == "digits" else 0.75), f"fp32 run did not learn (accuracy {acc32:.3f})"
    assert acc16 >= acc32 - tolerance, (
        f"bf16 accuracy {acc16:.4f} is more than {100 * tolerance:g} pp below fp32's {acc32:.4f}"
    )


def test_bf16_factor_update_is_compensated():
    """500 steps ``K ← K − β₁ K m`` with ``β₁ = 10⁻²`` (SINGD's default): stored in bf16 with
    the carried rounding error, ``K`` stays within 0.5 % of the float64 recursion; rounding
    each step (most steps are below half an ulp of ``K``) drifts by ~15 %."""
    from curvkit_singd.singd import SINGDBlock

    from curvkit.structures.base import DenseStructure

    gen = torch.Generator().manual_seed(0)
    d = 32
    exact = torch.eye(d, dtype=torch.float64)
    K, err = DenseStructure(torch.eye(d, dtype=torch.bfloat16)), None
    naive = torch.eye(d, dtype=torch.bfloat16)
    for _ in range(500):
        m = torch.randn(d, d, generator=gen, dtype=torch.float64) / 10 + torch.eye(d, dtype=torch.float64) / 20
        exact = exact - 1e-2 * exact @ m
        K, err = SINGDBlock._step_factor(K, DenseStructure(K.matrix @ m.bfloat16()), -1e-2, err)
        naive = naive.add(naive @ m.bfloat16(), alpha=-1e-2)
    assert K.matrix.dtype == torch.bfloat16 and err is not None and err["matrix"].dtype == torch.bfloat16

    def rel(a: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(a.double() - exact) / torch.linalg.matrix_norm(exact))

    assert rel(K.matrix) < 5e-3, rel(K.matrix)
    assert rel(naive) > 5e-2, rel(naive)  # the recursion really loses the small steps without it


def test_bf16_rounding_errors_round_trip_through_state_dict():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    opt = SINGD(model, factor_dtype=torch.bfloat16, **HYPER)
    X, y = torch.randn(16, 6, dtype=torch.bfloat16), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    block = opt.preconditioner.blocks["0"]
    state = block.state_dict()
    assert set(state["err_K"]) == {"matrix"} and state["err_K"]["matrix"].abs().sum() > 0
    other = type(block)(block.info, block.config, (block.structure_K, block.structure_C))
    other.load_state_dict(state)
    assert other.err_K is not None and torch.equal(other.err_K["matrix"], block.err_K["matrix"])
    assert other.err_C is not None and torch.equal(other.err_C["matrix"], block.err_C["matrix"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("task", "structure"), [("digits", "dense"), ("digits", "block30diagonal"), ("sequence", "dense")]
)
def test_bf16_gap_over_seeds(task, structure):
    """The robust form of the 1-point claim: over seeds 0–3 (model initialisation and batch
    order; for the sequences also the data and the teacher) the mean bf16 − fp32 gap is
    within 1 point, and no single seed loses more than 2.5 (a single seed scatters: on
    digits −1.6 to +1.3 points over eight seeds, one test sample being 0.22 points).
    Measured: digits dense −0.22, +0.22, −1.56, +0.22; block-diagonal −0.44, −0.67, +0.44,
    +0.89; sequences 0.00, +0.49, +0.49, +0.10 points."""
    gaps = []
    for seed in range(4):
        acc32, _, _ = _train(task, torch.float32, structure, seed)
        acc16, losses16, _ = _train(task, torch.bfloat16, structure, seed)
        assert all(math.isfinite(v) for v in losses16), f"seed {seed}: bf16 SINGD produced a non-finite loss"
        gaps.append(acc16 - acc32)
    assert sum(gaps) / len(gaps) >= -0.01, f"mean bf16 − fp32 gap {gaps} below −1 point"
    assert min(gaps) >= -0.025, f"a seed lost more than 2.5 points: {gaps}"
