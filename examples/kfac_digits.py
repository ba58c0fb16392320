"""
K-FAC on digits in an ordinary training loop
============================================

:class:`curvkit.optim.KFAC` is a ``torch.optim.Optimizer``: build it from the model, and
train with the loop you already have — ``zero_grad``, ``backward``, ``step``. With the
default empirical Fisher, the Kronecker factors come from the ``loss.backward()`` you
call anyway. Here a 64-64-10 MLP learns scikit-learn's 8×8 digits with K-FAC and, from
the same initialisation and batches, with AdamW.
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
loss_fn = nn.CrossEntropyLoss()
order = batches(len(X_train))

curves, optimizers = {}, {}
for name in ("K-FAC", "AdamW"):
    model = mlp(seed=0)
    if name == "K-FAC":
        opt = curvkit.optim.KFAC(model, lr=0.05, momentum=0.9, damping=0.1, T_inv=5)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for idx in order:  # the ordinary loop: nothing curvkit-specific in it
        opt.zero_grad()
        loss = loss_fn(model(X_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    curves[name], optimizers[name] = losses, opt
    print(f"{name:6s} final batch loss {losses[-1]:.3f}   test accuracy {accuracy(model, X_test, y_test):.3f}")


# %%
# What the optimizer built: one Kronecker block per ``nn.Linear``, with factors ``A`` over
# the layer's inputs (plus the bias column) and ``G`` over its output gradients.

print(optimizers["K-FAC"].summary())
print(f"optimizer state: {optimizers['K-FAC'].state_bytes() / 1024:.0f} KiB")

# %%
# The loss per step. K-FAC's steps are preconditioned by the inverse of the (damped)
# Kronecker-factored Fisher, so it makes faster progress per step than AdamW at this size.

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, losses in curves.items():
    ax.plot(losses, label=name)
ax.set_xlabel("step")
ax.set_ylabel("training loss (batch)")
ax.set_yscale("log")
ax.legend()
fig.tight_layout()
plt.show()
