"""``curvkit bench``'s bundled tasks: digits (MLP, CNN) and a synthetic sequence task (see
:mod:`curvkit.bench`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
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
    )
}
