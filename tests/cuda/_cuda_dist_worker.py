"""What each process of the NCCL test runs (spawned by test_cuda_distributed.py).

Each scenario trains a float64 model for ``STEPS`` steps on the device; the whole batch of
step ``t`` has ``2B`` rows, rank ``r`` of ``world`` trains on its ``2B/world`` rows.
``run(rank=0, world=1, device)`` without a process group is the one-process reference.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from curvkit.optim import create

B = 32  # rows per rank; 2B = 64 rows make every factor full rank (EKFAC's stale eigenbasis is
#        arbitrary within a factor's null space, so rank-deficient factors make it chaotic)
STEPS = 6

#: (label, method, options, wrap in DistributedDataParallel)
CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("kfac", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 2}, True),
    ("kfac-plain", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 2}, False),
    ("ekfac", "ekfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 2}, True),
    ("singd", "singd", {"lr": 0.05, "T": 1, "structure": "dense"}, True),
    ("rs-kfac", "rs-kfac", {"lr": 0.1, "rank": 4, "T_stats": 1, "T_inv": 2, "damping": 1e-2}, True),
    ("skfac", "skfac", {"lr": 0.1, "damping": 1e-2}, True),
]


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 9, 6), nn.Tanh(), nn.Linear(6, 3))
    return model.to(device=device, dtype=torch.float64)


def batch(step: int, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1000 + step)
    X = torch.randn(2 * B, 2, 5, 5, generator=g, dtype=torch.float64, device="cpu")
    y = torch.randint(0, 3, (2 * B,), generator=g, device="cpu")
    rows = slice(rank * 2 * B // world, (rank + 1) * 2 * B // world)
    return X[rows].to(device), y[rows].to(device)


def run(rank: int, world: int, device: torch.device) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, method, options, ddp in CASES:
        model = make_model(device)
        if ddp and world > 1:
            ids = [device.index] if device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        opt = create(method, model, loss_fn=nn.CrossEntropyLoss(), **options)
        for t in range(STEPS):
            X, y = batch(t, rank, world, device)
            opt.zero_grad()
            out = model(X)
            opt.curvature_backward(out, y)
            nn.functional.cross_entropy(out, y).backward()
            opt.step()
        results[label] = {
            "params": [p.detach().cpu().clone() for p in model.parameters()],
            "devices": sorted({str(p.device) for p in model.parameters()}),
            "plan": opt.preconditioner.distribution_plan,
        }
    return results


def worker(rank: int, world: int, out_dir: str, backend: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn``: one process per device."""
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group(
        backend, init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world
    )
    try:
        torch.save(run(rank, world, device), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
