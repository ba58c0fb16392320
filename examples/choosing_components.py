"""
Choosing the structure, the inverter and the damping
====================================================

Every K-FAC-family optimizer is assembled from three registered components:

* a **structure** — how each Kronecker factor is stored (``"dense"``, ``"diagonal"``, the
  SINGD plugin's sparse structures, ...), chosen per factor with a pair ``(A's, G's)``;
* an **inverter** — how the damped pair is inverted (``"cholesky"``, ``"eigh"``, the
  low-rank plugin's ``"rsvd"``, ...);
* a **damping** strategy — a frozen dataclass from :mod:`curvkit.linalg` (a bare float
  means the method's default, π-corrected Tikhonov damping).

They are keyword arguments of the optimizer. This example trains the same MLP on digits
with several combinations, and shows the error an incompatible pair raises when the
optimizer is built.
"""

import os

import torch
from torch import nn

import curvkit
import curvkit.optim
from curvkit.demo import digits_split
from curvkit.linalg import ConstantDamping, ExactDamping, PiDamping

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

registry = curvkit.default_registry()
print("structures:", ", ".join(registry.structures.names()))
print("inverters: ", ", ".join(registry.inverters.names()))
print("dampings:  ", ", ".join(registry.dampings.names()))

# %%
# Each combination trains from the same initialisation on the same batches.

X_train, y_train, X_test, y_test = digits_split()
order = batches(len(X_train))
choices = {
    "dense, cholesky, pi": dict(structure="dense", inverter="cholesky", damping=PiDamping(value=0.1)),
    "dense, eigh, exact": dict(structure="dense", inverter="eigh", damping=ExactDamping(value=0.1)),
    "diagonal, cholesky, pi": dict(structure="diagonal", inverter="cholesky", damping=PiDamping(value=0.1)),
    "(diagonal, dense), constant": dict(
        structure=("diagonal", "dense"), inverter="cholesky", damping=ConstantDamping(a=0.3, g=0.3)
    ),
}
print(f"{'structure, inverter, damping':30s} {'test acc':>8s} {'state KiB':>9s}")
for label, options in choices.items():
    model = mlp(seed=0)
    opt = curvkit.optim.KFAC(model, lr=0.05, momentum=0.9, T_inv=5, **options)
    for idx in order:
        opt.zero_grad()
        nn.functional.cross_entropy(model(X_train[idx]), y_train[idx]).backward()
        opt.step()
    print(f"{label:30s} {accuracy(model, X_test, y_test):8.3f} {opt.state_bytes() / 1024:9.0f}")

# %%
# A Cholesky factorisation inverts each damped factor separately, so it can only apply a
# *factored* damping. Exact damping of the product, :math:`(G\otimes A + \lambda I)^{-1}`,
# needs the eigendecompositions of both factors. The pair is checked when the optimizer is
# built, and the error says which pairs work:

try:
    curvkit.optim.KFAC(mlp(), lr=0.05, inverter="cholesky", damping=ExactDamping(value=0.1))
except curvkit.IncompatibleComponentsError as err:
    print(f"{type(err).__name__}: {err}")

# %%
# A misspelt name lists what is registered, with a close match:

try:
    curvkit.optim.KFAC(mlp(), lr=0.05, structure="diagnoal")
except curvkit.UnknownComponentError as err:
    print(f"{type(err).__name__}: {err}")
