"""Small models and data used across the statistics tests (float64 unless noted)."""

from __future__ import annotations

import torch
from torch import nn

LOSSES = {
    "ce": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
    "bce": nn.BCEWithLogitsLoss,
}


class Transpose(nn.Module):
    """Swap two dimensions: turns sequence outputs ``(N, T, C)`` into ``(N, C, T)``."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


def make_loss(name: str, reduction: str = "mean") -> nn.Module:
    return LOSSES[name](reduction=reduction)


def mlp(act: str = "relu", bias: bool = True, d_in: int = 5, hidden: tuple[int, ...] = (6, 4), d_out: int = 3):
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    layers: list[nn.Module] = []
    sizes = [d_in, *hidden]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b, bias=bias), acts[act]()]
    layers.append(nn.Linear(sizes[-1], d_out, bias=bias))
    return nn.Sequential(*layers).double()


def cnn(d_out: int = 3) -> nn.Sequential:
    """Conv2d with stride/padding/dilation, an in-place ReLU, Flatten and Linear.

    Input ``(N, 2, 7, 7)``.
    """
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(3, 4, (2, 3), stride=1, padding=(1, 0), dilation=(2, 1), bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 2, d_out),
    ).double()


def seq_model(d_out: int = 3, classes_first: bool = False) -> nn.Sequential:
    """Linear layers on ``(N, T, D)`` inputs; outputs ``(N, T, C)`` or ``(N, C, T)``."""
    layers: list[nn.Module] = [nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, d_out)]
    if classes_first:
        layers.append(Transpose(1, 2))
    return nn.Sequential(*layers).double()


def inputs_for(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    shapes = {"mlp": (n, 5), "cnn": (n, 2, 7, 7), "seq": (n, 3, 4)}
    return torch.randn(*shapes[kind], generator=generator, dtype=torch.float64)


def targets_for(loss: str, output: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Targets shaped for ``loss`` given a model output (classes in dim 1 for CE)."""
    if loss == "ce":
        shape = (output.shape[0], *output.shape[2:])
        return torch.randint(0, output.shape[1], shape, generator=generator)
    if loss == "mse":
        return torch.randn(output.shape, generator=generator, dtype=output.dtype)
    return torch.rand(output.shape, generator=generator, dtype=output.dtype).round()


def build_case(kind: str, loss: str, n: int = 6, seed: int = 0, **model_kwargs):
    """Model and one batch ``(X, y)`` for model ``kind`` and loss ``loss``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "mlp":
        model = mlp(**model_kwargs)
    elif kind == "cnn":
        model = cnn()
    elif kind == "seq":
        model = seq_model(classes_first=loss == "ce")
    else:  # pragma: no cover - test bug
        raise ValueError(kind)
    X = inputs_for(kind, n, gen)
    with torch.no_grad():
        out = model(X)
    y = targets_for(loss, out, gen)
    return model, X, y
