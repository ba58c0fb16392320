"""
Kronecker factors: curvkit against curvlinops
=============================================

:func:`curvkit.kronecker_factors` returns, per layer, the Kronecker factors
:math:`A` (over the layer's inputs, with a constant 1 appended for the bias) and
:math:`G` (over the gradients of the loss with respect to the layer's outputs). They are
scaled exactly as curvlinops' ``KFACLinearOperator`` scales its factors, so the two agree
to rounding error for the exact (type-2) Fisher, the Monte-Carlo Fisher (same seed) and
the empirical Fisher, with the expand and the reduce approximation for weight sharing.
This example computes both on a small CNN and compares them.
"""

import matplotlib.pyplot as plt
import torch
from curvlinops import KFACLinearOperator
from torch import nn

import curvkit

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)
).double()
X, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
loss = nn.CrossEntropyLoss()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


print(f"{'fisher':10s} {'approx':7s} {'layer':6s} {'|ΔA|/|A|':>9s} {'|ΔG|/|G|':>9s}")
for fisher in ("type-2", "mc", "empirical"):
    for approx in ("expand", "reduce"):
        # a seeded generator draws the same MC targets, in the same order, as curvlinops with that seed
        generator = torch.Generator().manual_seed(7) if fisher == "mc" else None
        ours = curvkit.kronecker_factors(model, loss, X, y, fisher=fisher, kfac_approx=approx, generator=generator)
        reference = KFACLinearOperator(
            model,
            loss,
            list(model.parameters()),
            [(X, y)],
            fisher_type=fisher,
            kfac_approx=approx,
            mc_samples=1,
            seed=7,
            separate_weight_and_bias=False,
            check_deterministic=False,
        )
        reference.compute_kronecker_factors()
        state = reference.state_dict()
        A_ref, G_ref = state["input_covariances"], state["gradient_covariances"]
        for layer, factors in ours.items():
            dA = relative_difference(factors.A, A_ref[layer])
            dG = relative_difference(factors.G, G_ref[layer])
            print(f"{fisher:10s} {approx:7s} {layer:6s} {dA:9.1e} {dG:9.1e}")

# %%
# The convolution's factors (type-2 Fisher, expand): :math:`A` is the second moment of the
# unfolded 3×3 patches plus the bias input, :math:`G` that of the output gradients over
# the 4 channels.

factors = curvkit.kronecker_factors(model, loss, X, y, fisher="type-2")["0"]
fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
for ax, (name, matrix) in zip(axes, (("A (10 × 10)", factors.A), ("G (4 × 4)", factors.G))):
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-matrix.abs().max(), vmax=matrix.abs().max())
    ax.set_title(name)
    fig.colorbar(image, ax=ax, shrink=0.8)
fig.tight_layout()
plt.show()
