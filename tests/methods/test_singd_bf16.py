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

Both train with the learning rate decayed linearly to 0 over the 500 steps, and the
parameters get curvkit's compensated (Kahan) update in bf16 (``kahan_sum=True``, the
default: :mod:`curvkit.optim.optimizer`).

What "within 1 point" can mean here, measured (bf16 − fp32 test accuracy, points, seeds
0–15, initialisation and batch order; for the sequences also data and teacher):

* sequences, dense: −0.59 to +1.37 (mean +0.05): every seed within 1 point below, so it is
  checked per seed (seeds 0–7) and at seed 0;
* digits (450 test images, one image = 0.22 points), dense: −1.56 to +2.00 (mean +0.12);
  block-diagonal: −2.00 to +0.22 (mean −0.51). That scatter is the floor of the
  comparison, not bf16: **float64 − float32** on the same seeds scatters as much (dense
  −1.11 to +2.00, block-diagonal −1.33 to +1.78), so no precision can be held to 1 point
  on one digits seed. Checked: the mean over seeds 0–7 within 1 point, no seed more than
  2 points below (the float64/float32 floor). A single seed is fragile: reordering two
  float32 additions of the bf16 update (the same exact sum) moved dense seed 4 from −1.11
  to −2.67 points; the mean is the robust figure.

The compensated update removes a bias, not that scatter: at a *constant* learning rate
(where the small late steps matter most) the mean gap over 16 seeds moved from −0.63 to
+0.10 points on the sequences and from −0.51 to −0.22 on digits (dense) when it was turned
on; with the decay the means were already within 1 point without it (+0.26, +0.01, −0.08).

``K`` and ``C`` are stored in bf16 with their rounding error carried to the next update
(:meth:`SINGDBlock._step_factor`); :func:`test_bf16_factor_update_is_compensated` shows
what that buys.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvkit.bench.tasks import digits_mlp
from curvkit.demo import digits_split
from curvkit.optim import SINGD

STEPS = 500
HYPER = {"lr": 0.02, "momentum": 0.9, "damping": 1e-3, "lr_cov": 1e-2, "T": 1}


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
    return digits_mlp()


def _train(task: str, dtype: torch.dtype, structure: str, seed: int = 0) -> tuple[float, list[float], SINGD]:
    X_tr, y_tr, X_te, y_te = digits_split() if task == "digits" else _sequences(seed)
    X_tr, X_te = X_tr.to(dtype), X_te.to(dtype)
    model = _model(task, seed).to(dtype)
    extra = {"loss_average": "batch+sequence"} if task == "sequence" else {}
    # the raw method (recommended=False: no trust region, no factor-step bound), whose gaps the
    # module docstring and docs/methods/singd.md report
    opt = SINGD(model, structure=structure, factor_dtype=dtype, recommended=False, **HYPER, **extra)
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


@pytest.mark.parametrize(("task", "structure", "tolerance"), [("sequence", "dense", 0.01)])
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
    opt = SINGD(model, factor_dtype=torch.bfloat16, recommended=False, **HYPER)
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


@pytest.mark.parametrize(
    ("task", "structure", "mean_tolerance", "seed_tolerance"),
    [
        ("sequence", "dense", 0.01, 0.01),
        ("digits", "dense", 0.01, 0.02),
        ("digits", "block30diagonal", 0.01, 0.02),
    ],
)
def test_bf16_gap_over_seeds(task, structure, mean_tolerance, seed_tolerance):
    """Seeds 0–7: the mean bf16 − fp32 gap within 1 point, and every seed within
    ``seed_tolerance`` (sequences: 1 point; digits: 2 points, the float64 − float32 floor of
    one seed, see the module docstring). Measured on seeds 0–7: sequences −0.59 to +0.49
    (mean +0.00); digits dense −1.56 to +1.33 (mean −0.31), block-diagonal −1.56 to +0.22
    (mean −0.39)."""
    gaps = []
    for seed in range(8):
        acc32, _, _ = _train(task, torch.float32, structure, seed)
        acc16, losses16, _ = _train(task, torch.bfloat16, structure, seed)
        assert all(math.isfinite(v) for v in losses16), f"seed {seed}: bf16 SINGD produced a non-finite loss"
        gaps.append(acc16 - acc32)
    shown = ", ".join(f"{100 * g:+.2f}" for g in gaps)
    assert sum(gaps) / len(gaps) >= -mean_tolerance, (
        f"mean bf16 − fp32 gap below −{100 * mean_tolerance:g} points: {shown}"
    )
    assert min(gaps) >= -seed_tolerance - 1e-6, f"a seed lost more than {100 * seed_tolerance:g} points: {shown}"
