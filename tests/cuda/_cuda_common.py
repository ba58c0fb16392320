"""What the tests under tests/cuda share: the device, the marks, comparisons.

Every test here is marked with :data:`CUDA` (``pytestmark = CUDA`` or ``@cuda_test``): marked ``cuda``
(``pytest -m cuda`` selects them) and skip cleanly where ``torch.cuda.is_available()`` is
false, which is every CI machine. ``benchmarks/gpu_check.py`` runs them on a GPU.

``CURVKIT_CUDA_TESTS_ON_CPU=1`` runs them with the CPU standing in for the device, to check
the test code itself without a GPU (every device-vs-CPU comparison is then trivially equal;
``gpu_check.py --dry-run`` does this for a few of them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor

ON_CPU = os.environ.get("CURVKIT_CUDA_TESTS_ON_CPU") == "1"
#: The device under test.
DEVICE = torch.device("cpu") if ON_CPU else torch.device("cuda")
HAVE_DEVICE = ON_CPU or torch.cuda.is_available()

CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_DEVICE, reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


def cuda_test(fn: Any) -> Any:
    """Decorator: the marks of :data:`CUDA` on one test."""
    for mark in reversed(CUDA):
        fn = mark(fn)
    return fn


def on_device(t: Tensor) -> bool:
    """Whether ``t`` is on the device under test (any index of its type)."""
    return t.device.type == DEVICE.type


def tensors_in(obj: Any, path: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor in nested dicts, lists and tuples."""
    if isinstance(obj, Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors_in(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from tensors_in(v, f"{path}[{i}]")


#: CPU tensors of at most this many elements are allowed in optimizer state on the device:
#: scalars read back with ``tolist()`` (low-rank shifts, generator states are uint8 and
#: exempt by dtype). Anything larger (factors, inverses, momentum) must be on the device.
SMALL = 4


def off_device_state(state: Any) -> list[str]:
    """Paths of floating-point state tensors larger than :data:`SMALL` that are not on the
    device under test."""
    return [
        f"{path}: {tuple(t.shape)} {t.dtype} on {t.device}"
        for path, t in tensors_in(state)
        if t.is_floating_point() and t.numel() > SMALL and not on_device(t)
    ]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``‖actual − expected‖ / ‖expected‖`` in float64 on the CPU."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((a - e).norm() / e.norm().clamp_min(1e-300))


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
