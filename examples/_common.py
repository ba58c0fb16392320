"""Helpers shared by the gallery examples: the digits data, small models, batches.

Every example runs in a few seconds on a laptop CPU. ``CURVKIT_EXAMPLES_QUICK=1`` (set by
the test suite) shortens the training loops further.
"""

from __future__ import annotations

import os

import torch
from torch import nn

#: Epochs of the training examples (1 when CURVKIT_EXAMPLES_QUICK is set).
EPOCHS = 1 if os.environ.get("CURVKIT_EXAMPLES_QUICK") else 3


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8×8 digits as ``(X_train, y_train, X_test, y_test)``, pixels in [0, 1]."""
    from curvkit.demo import digits_split

    return digits_split()


def mlp(seed: int = 0, hidden: int = 64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def batches(n: int, batch_size: int = 64, epochs: int = EPOCHS, seed: int = 0) -> list[torch.Tensor]:
    """Index batches for ``epochs`` shuffled passes over ``n`` examples."""
    gen = torch.Generator().manual_seed(seed)
    return [idx for _ in range(epochs) for idx in torch.randperm(n, generator=gen).split(batch_size)]


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())
