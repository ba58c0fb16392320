"""
A Laplace approximation with curvkit
====================================

After training, a Laplace approximation puts a Gaussian around the trained weights
:math:`\\theta_*` whose precision is the curvature of the loss plus the prior's,
:math:`P = \\sum_n \\nabla^2_\\theta \\ell_n + P_0`, here with the Kronecker-factored GGN.
:class:`curvkit.laplace.KroneckerLaplace` builds it from curvkit's statistics in one
pass over the data, tunes the prior precision on the marginal likelihood, and gives a
linearised predictive. If laplace-torch is installed, curvkit also serves as its
curvature backend (:class:`curvkit.laplace.CurvkitGGN`).
"""

import importlib.util
import os

import torch
from torch import nn

import curvkit.optim
from curvkit.demo import digits_split
from curvkit.laplace import KroneckerLaplace

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
model = mlp(seed=0)
opt = curvkit.optim.KFAC(model, lr=0.05, momentum=0.9, damping=0.1, T_inv=5)  # any optimizer will do
for idx in batches(len(X_train)):
    opt.zero_grad()
    nn.functional.cross_entropy(model(X_train[idx]), y_train[idx]).backward()
    opt.step()
print(f"MAP test accuracy {accuracy(model, X_test, y_test):.3f}")

# %%
# Fit the Kronecker-factored Laplace approximation on the training set (in batches), then
# tune one prior precision per layer by maximising the log marginal likelihood.

loader = [(X_train[idx], y_train[idx]) for idx in torch.arange(len(X_train)).split(256)]
la = KroneckerLaplace(model, "classification", prior_precision=1.0)
la.fit(loader, progress=False)
print(f"log marginal likelihood, prior precision 1:  {float(la.log_marginal_likelihood()):.1f}")
prior = la.optimize_prior_precision("layerwise")
print("tuned prior precisions:", [round(float(p), 2) for p in prior.flatten()])
print(f"log marginal likelihood, tuned:              {float(la.log_marginal_likelihood()):.1f}")

# %%
# The linearised (probit) predictive against the MAP network's softmax: the test negative
# log-likelihood and the expected calibration error (ECE, 10 bins).


def ece(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> float:
    confidence, prediction = probs.max(1)
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            gap = (prediction[in_bin] == y[in_bin]).float().mean() - confidence[in_bin].mean()
            total += float(in_bin.float().mean() * gap.abs())
    return total


with torch.no_grad():
    map_probs = model(X_test).softmax(-1)
la_probs = la.predictive(X_test)
for name, probs in (("MAP", map_probs), ("Laplace", la_probs)):
    nll = float(nn.functional.nll_loss(probs.clamp_min(1e-12).log(), y_test))
    print(f"{name:8s} test NLL {nll:.3f}   ECE {ece(probs, y_test):.3f}")

# %%
# The same approximation through laplace-torch, with curvkit as its curvature backend:
# ``KronLaplace`` with ``backend=CurvkitGGN`` reaches the same log marginal likelihood.
# (laplace-torch is an optional peer; where it is not installed — as in the environment
# that builds this documentation — this step is skipped.)

if importlib.util.find_spec("laplace") is None:
    print("laplace-torch is not installed: skipped")
else:
    from laplace import Laplace

    from curvkit.laplace import CurvkitGGN

    peer = Laplace(model, "classification", subset_of_weights="all", hessian_structure="kron", backend=CurvkitGGN)
    peer.fit(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_train, y_train), batch_size=256))
    peer.prior_precision = prior.clone()
    ours = float(la.log_marginal_likelihood())
    theirs = float(peer.log_marginal_likelihood())
    print(f"log marginal likelihood: KroneckerLaplace {ours:.3f}, laplace-torch + CurvkitGGN {theirs:.3f}")
