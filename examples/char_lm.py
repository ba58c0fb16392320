"""
A character-level transformer on Python's own source code
=========================================================

A small causal transformer (``nn.TransformerEncoder`` with a causal mask) learns to predict
the next character of a few modules of the Python standard library — text that ships with
every Python, so no download. K-FAC and SINGD train it beside AdamW, from the same
initialisation and batches; the validation loss is plotted against steps and against
seconds of training.

The logits are ``(N, T, V)``: one prediction per position. The curvature methods are told
that the loss is a mean over batch *and* sequence positions (``loss_average=
"batch+sequence"``). The attention projections, the feed-forward layers and the output
layer are preconditioned; the embeddings and LayerNorms take first-order steps unless a
handler for them is registered — ``summary()`` lists which.
"""

import os
import sysconfig
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import curvkit.optim

QUICK = bool(os.environ.get("CURVKIT_EXAMPLES_QUICK"))
STEPS = 40 if QUICK else 200
torch.set_num_threads(1)  # a small model: one thread is fastest, and the seconds compare fairly
CONTEXT, BATCH = 32, 32

# A fixed list of pure-Python modules present in every CPython since 3.8, read in this order.
FILES = ("textwrap.py", "heapq.py", "bisect.py", "fnmatch.py", "colorsys.py", "shlex.py", "glob.py", "keyword.py")
stdlib = Path(sysconfig.get_paths()["stdlib"])
text = "".join((stdlib / name).read_text(encoding="utf-8") for name in FILES if (stdlib / name).exists())
text = "".join(c if (" " <= c <= "~" or c == "\n") else "?" for c in text)  # printable ASCII and newlines
chars = sorted(set(text))
vocab = {c: i for i, c in enumerate(chars)}
data = torch.tensor([vocab[c] for c in text])
split = int(0.9 * len(data))
train, val = data[:split], data[split:]
print(f"{len(text):,} characters from {len(FILES)} standard-library modules, {len(chars)} distinct")


def windows(source: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(N, CONTEXT)`` and next-character targets ``(N, CONTEXT)``."""
    idx = starts[:, None] + torch.arange(CONTEXT + 1)
    chunk = source[idx]
    return chunk[:, :-1], chunk[:, 1:]


val_x, val_y = windows(val, torch.linspace(0, len(val) - CONTEXT - 2, 256).long())


class CharTransformer(nn.Module):
    """Token and position embeddings, a causal pre-norm ``nn.TransformerEncoder``, a
    LayerNorm and a linear read-out to the characters."""

    def __init__(self, vocab_size: int, d: int = 48, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d)
        self.positions = nn.Embedding(CONTEXT, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab_size)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tokens(x) + self.positions(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))  # (N, T, V)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def make(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """Each optimizer with the best of a small grid at 200 steps (AdamW lr {3e-3, 1e-2};
    K-FAC and SINGD lr {0.1, 0.3} × damping {0.01, 0.1} × kl_clip {None, 1e-3, 1e-2})."""
    if name == "AdamW":
        return torch.optim.AdamW(model.parameters(), lr=1e-2)
    common = dict(momentum=0.9, damping=0.1, kl_clip=1e-2, loss_average="batch+sequence", unsupported="skip")
    if name == "K-FAC":
        return curvkit.optim.KFAC(model, lr=0.3, T_inv=5, **common)
    return curvkit.optim.SINGD(model, lr=0.3, lr_cov=0.05, T=1, **common)


# %%
# Train the three optimizers on the same batches, evaluating every few steps (the
# evaluation is not counted in the seconds).

gen = torch.Generator().manual_seed(0)
starts = [torch.randint(0, len(train) - CONTEXT - 1, (BATCH,), generator=gen) for _ in range(STEPS)]
every = max(1, STEPS // 20)
curves: dict[str, list[tuple[int, float, float]]] = {}
optimizers = {}
for name in ("K-FAC", "SINGD", "AdamW"):
    torch.manual_seed(0)
    model = CharTransformer(len(chars))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the nested-tensor note of nn.TransformerEncoder
        opt = make(name, model)
    seconds, curve = 0.0, []
    for step in range(STEPS + 1):
        if step % every == 0 or step == STEPS:
            with torch.no_grad():
                curve.append((step, seconds, lm_loss(model(val_x), val_y).item()))
        if step == STEPS:
            break
        x, y = windows(train, starts[step])
        tic = time.perf_counter()
        opt.zero_grad()
        lm_loss(model(x), y).backward()
        opt.step()
        seconds += time.perf_counter() - tic
    curves[name], optimizers[name] = curve, opt
    per_step = 1e3 * seconds / STEPS
    print(f"{name:6s} validation loss {curve[-1][2]:.3f} after {STEPS} steps, {seconds:.1f} s ({per_step:.0f} ms/step)")

# %%
# What K-FAC preconditions (its Kronecker blocks) and what it leaves to first-order steps.

print(optimizers["K-FAC"].summary())

# %%
# Validation loss (nats per character) against steps and against seconds of training.

fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
for name, curve in curves.items():
    steps, secs, losses = zip(*curve)
    axes[0].plot(steps, losses, label=name)
    axes[1].plot(secs, losses, label=name)
axes[0].set_xlabel("step")
axes[1].set_xlabel("seconds of training")
axes[0].set_ylabel("validation loss")
axes[0].legend()
fig.suptitle("character-level transformer on Python standard-library sources")
fig.tight_layout()
plt.show()
