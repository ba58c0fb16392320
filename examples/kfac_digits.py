"""
K-FAC on digits in an ordinary training loop
============================================

:class:`curvkit.optim.KFAC` is a ``torch.optim.Optimizer``: build it from the model, and
train with the loop you already have — ``zero_grad``, ``backward``, ``step``. With the
default empirical Fisher, the Kronecker factors come from the ``loss.backward()`` you
call anyway. Here a 64-64-10 MLP learns scikit-learn's 8×8 digits with K-FAC and, from
the same initialisation and batches, with AdamW.
"""

import matplotlib.pyplot as plt
import torch
from _common import accuracy, batches, digits, mlp
from torch import nn

import curvkit.optim

X_train, y_train, X_test, y_test = digits()
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
