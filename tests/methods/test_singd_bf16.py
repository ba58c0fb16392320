"""SINGD in bfloat16: parameters, gradients and the factors ``K``, ``C``, ``m_K``, ``m_C``
all in bf16, 500 steps, finite loss throughout, and a test accuracy within 1 percentage
point of the same run in float32 (same seeds, data and hyperparameters).

Task: sklearn's digits with the 64-128-10 ReLU MLP (dense and block-diagonal factors).
The sequence (transformer-style) case of issue 5 does NOT meet the 1-point target yet
(bf16 0.646 vs fp32 0.782 with dense factors on a synthetic task): see docs/methods/singd.md.
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


def _model(task: str) -> nn.Module:
    torch.manual_seed(0)
    assert task == "digits"
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(task: str, dtype: torch.dtype, structure: str) -> tuple[float, list[float], SINGD]:
    X_tr, y_tr, X_te, y_te = _digits()
    X_tr, X_te = X_tr.to(dtype), X_te.to(dtype)
    model = _model(task).to(dtype)
    opt = SINGD(model, structure=structure, factor_dtype=dtype, **HYPER)
    gen = torch.Generator().manual_seed(0)
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
        losses.append(float(loss.detach()))
    with torch.no_grad():
        acc = float((model(X_te).argmax(1) == y_te).float().mean())
    return acc, losses, opt


@pytest.mark.parametrize(
    ("task", "structure"),
    [("digits", "dense"), ("digits", "block30diagonal")],
)
def test_bf16_matches_fp32_accuracy(task, structure):
    acc32, losses32, _ = _train(task, torch.float32, structure)
    acc16, losses16, opt = _train(task, torch.bfloat16, structure)
    assert all(math.isfinite(v) for v in losses16), "bf16 SINGD produced a non-finite loss"
    # the state really is bf16 and was updated on every step
    block = next(iter(opt.preconditioner.blocks.values()))
    assert block.K.dtype == torch.bfloat16 and block.C.dtype == torch.bfloat16
    assert block.num_updates == STEPS and block.skipped_updates == 0
    assert acc32 > 0.9, f"fp32 run did not learn (accuracy {acc32:.3f})"
    assert acc16 >= acc32 - 0.01, f"bf16 accuracy {acc16:.4f} is more than 1 pp below fp32's {acc32:.4f}"
