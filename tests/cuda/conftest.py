"""Fixtures of the CUDA tests (see _cuda_common.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_tf32():
    """Float32 matmuls and convolutions in full float32 (cuDNN's default for convolutions is
    TF32, 10 mantissa bits), so that the device is compared with the CPU at float32
    precision; restored afterwards."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
