"""``curvkit bench``'s bundled tasks: digits (MLP, CNN), a synthetic sequence task and a
character-level transformer language model on Python standard-library sources (see
:mod:`curvkit.bench`)."""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

# --- tasks ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The demo's split of digits (75/25, stratified, ``random_state=0``), loaded once."""
    from curvkit.demo import digits_split

    return digits_split()


def _digits_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    X_tr, y_tr, X_te, y_te = _digits()
    return X_tr.reshape(-1, 1, 8, 8), y_tr, X_te.reshape(-1, 1, 8, 8), y_te


def digits_mlp() -> nn.Module:
    """The ``digits-mlp`` model: 64-128-10 with ReLU."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def digits_cnn() -> nn.Module:
    """The ``digits-cnn`` model (see :mod:`curvkit.bench`)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


class CausalMean(nn.Module):
    """Token mixing without parameters: position ``t`` becomes the mean of positions
    ``0..t`` of a ``(N, T, C)`` input."""

    def forward(self, x: Tensor) -> Tensor:
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).reshape(1, -1, 1)
        return x.cumsum(1) / counts


_SEQ_TOKENS, _SEQ_FEATURES, _SEQ_CLASSES = 8, 16, 4


def _sequence_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(_SEQ_FEATURES, 32),
        nn.GELU(),
        CausalMean(),
        nn.Linear(32, 32),
        nn.GELU(),
        nn.Linear(32, _SEQ_CLASSES),
    )


@functools.lru_cache(maxsize=1)
def _sequences() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """2048 + 512 sequences ``(8, 16)`` labelled per token by a fixed random teacher (data
    seed 0, independent of the benchmark's seeds)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2560, _SEQ_TOKENS, _SEQ_FEATURES, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        teacher = _sequence_model()
    with torch.no_grad():
        z = teacher(X)
        z = (z - z.mean((0, 1))) / z.std((0, 1))  # balance the classes
        y = z.argmax(-1)
    return X[:2048], y[:2048], X[2048:], y[2048:]


#: Pure-Python standard-library modules (present in every CPython since 3.8), read in this order.
STDLIB_FILES = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "fnmatch.py",
    "colorsys.py",
    "shlex.py",
    "glob.py",
    "keyword.py",
)
#: The character vocabulary: newline and printable ASCII; anything else reads as ``"?"``.
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_CHAR_CONTEXT = 32


def stdlib_text() -> str:
    """:data:`STDLIB_FILES` from this Python's standard library, concatenated, with every
    character outside :data:`CHARS` replaced by ``"?"``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((root / name).read_text(encoding="utf-8") for name in STDLIB_FILES if (root / name).exists())
    if not text:
        raise FileNotFoundError(f"none of {STDLIB_FILES} found in {root}")
    return "".join(c if c in CHARS else "?" for c in text)


class CharTransformer(nn.Module):
    """The ``charlm`` model: token and position embeddings (d = 32), one causal pre-norm
    ``nn.TransformerEncoderLayer`` (2 heads, feed-forward 128), a LayerNorm and a linear
    read-out to the 96 characters; ``(N, T)`` ids to ``(N, T, 96)`` logits."""

    def __init__(self, d: int = 32, heads: int = 2, layers: int = 1) -> None:
        super().__init__()
        self.tokens = nn.Embedding(len(CHARS), d)
        self.positions = nn.Embedding(_CHAR_CONTEXT, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, len(CHARS))
        self.mask: Tensor
        self.register_buffer(
            "mask", nn.Transformer.generate_square_subsequent_mask(_CHAR_CONTEXT, device=torch.device("cpu"))
        )

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.tokens(x) + self.positions(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


@functools.lru_cache(maxsize=1)
def _char_windows() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """384 training and 128 test windows of 32 characters with their next characters; the
    first 90 % of :func:`stdlib_text` for training, the rest for testing, windows evenly
    spaced."""
    index = {c: i for i, c in enumerate(CHARS)}
    data = torch.tensor([index[c] for c in stdlib_text()], device="cpu")
    split = int(0.9 * len(data))

    def windows(source: Tensor, n: int) -> tuple[Tensor, Tensor]:
        starts = torch.linspace(0, len(source) - _CHAR_CONTEXT - 2, n, device="cpu").long()
        chunk = source[starts[:, None] + torch.arange(_CHAR_CONTEXT + 1, device="cpu")]
        return chunk[:, :-1], chunk[:, 1:]

    return (*windows(data[:split], 384), *windows(data[split:], 128))


@dataclass(frozen=True)
class Task:
    """A bundled benchmark task.

    Attributes:
        name: Name used by ``--tasks``.
        description: One line for the table and the docs.
        model: Builds a fresh model (called under the run's seed).
        data: ``() -> (X_train, y_train, X_test, y_test)`` in float32 / int64 on the CPU.
        steps: Steps per run by default.
        quick_steps: Steps per run with ``quick=True``.
        target_accuracy: Test accuracy whose time and steps are reported.
        batch_size: Mini-batch size.
        evals: Evaluation points per run (besides step 0).
        method_options: Options every curvature method gets on this task (where its
            configuration has them), e.g. ``loss_average``.
        per_token: The model returns ``(N, T, classes)`` logits and ``y`` is ``(N, T)``.
    """

    name: str
    description: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]
    steps: int
    quick_steps: int
    target_accuracy: float
    batch_size: int = 64
    evals: int = 20
    method_options: dict[str, Any] = field(default_factory=dict)
    per_token: bool = False

    def logits(self, output: Tensor) -> Tensor:
        """The model output in the layout ``CrossEntropyLoss`` expects (classes on dim 1)."""
        return output.transpose(1, 2) if self.per_token else output


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "digits-mlp",
            "sklearn digits, MLP 64-128-10 (ReLU)",
            digits_mlp,
            _digits,
            steps=210,
            quick_steps=60,
            target_accuracy=0.9,
        ),
        Task(
            "digits-cnn",
            "sklearn digits 1x8x8, Conv16-Conv32-AvgPool-Linear",
            digits_cnn,
            _digits_images,
            steps=105,
            quick_steps=50,
            target_accuracy=0.9,
        ),
        Task(
            "sequence",
            "synthetic teacher, 8 tokens x 16 features, per-token 4 classes, Linear on (N, T, C)",
            _sequence_model,
            _sequences,
            steps=320,
            quick_steps=128,
            target_accuracy=0.8,
            method_options={"loss_average": "batch+sequence"},
            per_token=True,
        ),
        Task(
            "charlm",
            "next character of Python stdlib sources, causal transformer (1 layer, d=32), 96 chars",
            CharTransformer,
            _char_windows,
            steps=150,
            quick_steps=20,
            target_accuracy=0.3,
            evals=5,
            method_options={"loss_average": "batch+sequence", "unsupported": "skip"},
            per_token=True,
        ),
    )
}
