"""
SINGD with a structured factor
==============================

SINGD (Lin et al., 2024) keeps the Kronecker factors' *inverse roots* :math:`K` and
:math:`C` and updates them with a Riemannian step instead of inverting anything, so it
runs in low precision and lets the factors be sparse. The ``structure`` option picks
how :math:`K` and :math:`C` are stored — dense, diagonal, block-diagonal, triangular,
Toeplitz, hierarchical — and with it the memory of the optimizer state.
"""

import os

import matplotlib.pyplot as plt
import torch
from torch import nn

import curvkit.optim
from curvkit.demo import digits_split

# --- helpers (each example is self-contained: copy it and run it) -------------------------

#: Epochs (1 when CURVKIT_EXAMPLES_QUICK is set, as the test suite does).
EPOCHS = 1 if os.environ.get("CURVKIT_EXAMPLES_QUICK") else 3


def mlp(seed: int = 0, hidden: int = 64) -> nn.Module:
    """A 64-hidden-10 MLP for the 8×8 digits, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def batches(n: int, batch_size: int = 64, epochs: int = EPOCHS, seed: int = 0) -> list[torch.Tensor]:
    """Index batches for ``epochs`` shuffled passes over ``n`` examples."""
    gen = torch.Generator().manual_seed(seed)
    return [idx for _ in range(epochs) for idx in torch.randperm(n, generator=gen).split(batch_size)]


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


# --- the example ------------------------------------------------------------------------

X_train, y_train, X_test, y_test = digits_split()
order = batches(len(X_train))
curves = {}
print(f"{'structure':18s} {'test acc':>8s} {'state KiB':>9s}")
for structure in ("dense", "diagonal", "block30diagonal", "hierarchical15_15", "triltoeplitz"):
    model = mlp(seed=0)
    opt = curvkit.optim.SINGD(model, lr=0.05, momentum=0.9, damping=1e-3, lr_cov=1e-2, T=2, structure=structure)
    losses = []
    for idx in order:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    curves[structure] = losses
    print(f"{structure:18s} {accuracy(model, X_test, y_test):8.3f} {opt.state_bytes() / 1024:9.1f}")

# %%
# The structure can differ between the two factors: a pair ``(K's, C's)``. Here the
# input-side factor of each layer is diagonal and the output side dense.

model = mlp(seed=0)
opt = curvkit.optim.SINGD(model, lr=0.05, momentum=0.9, damping=1e-3, structure=("diagonal", "dense"))
print(opt.summary())

# %%
# Training loss per step for each structure.

fig, ax = plt.subplots(figsize=(6, 3.5))
for structure, losses in curves.items():
    ax.plot(losses, label=structure, lw=1)
ax.set_xlabel("step")
ax.set_ylabel("training loss (batch)")
ax.set_yscale("log")
ax.legend()
fig.tight_layout()
plt.show()
