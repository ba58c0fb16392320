"""
SINGD with a structured factor
==============================

SINGD (Lin et al., 2024) keeps the Kronecker factors' *inverse roots* :math:`K` and
:math:`C` and updates them with a Riemannian step instead of inverting anything, so it
runs in low precision and lets the factors be sparse. The ``structure`` option picks
how :math:`K` and :math:`C` are stored — dense, diagonal, block-diagonal, triangular,
Toeplitz, hierarchical — and with it the memory of the optimizer state.
"""

import matplotlib.pyplot as plt
from _common import accuracy, batches, digits, mlp
from torch import nn

import curvkit.optim

X_train, y_train, X_test, y_test = digits()
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
