"""Data-parallel K-FAC on CPU with torchrun (the example of docs/distributed.md).

Run on two processes (gloo; on GPUs use backend "nccl" and one device per process)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 docs/distributed_train.py

Each process trains on its half of every batch of scikit-learn's digits; curvkit averages
the Kronecker statistics over the processes and computes each layer's inversion on one of
them, so every process holds the same model as one process that saw the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn

import curvkit


def main() -> None:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)

    torch.manual_seed(0)  # the same initial model on every process
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)
    model = nn.parallel.DistributedDataParallel(model)
    # an initialised process group is picked up automatically (distributor=None)
    opt = curvkit.optim.KFAC(model, lr=0.03, momentum=0.9, damping=0.1, T_inv=5)
    if rank == 0:
        print(opt.summary())

    batch = 64  # the whole batch; each process takes batch / world rows of it
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        order = torch.randperm(len(X), generator=g).to(device)
        for start in range(0, len(X) - batch + 1, batch):
            rows = order[start : start + batch].chunk(world)[rank]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X[rows]), y[rows])
            loss.backward()
            opt.step()
        with torch.no_grad():
            acc = (model(X).argmax(1) == y).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}, accuracy on all digits {acc:.3f}")
    sent = opt.preconditioner.distributor.bytes_communicated
    print(f"rank {rank}: plan {opt.preconditioner.distribution_plan}, bytes sent {sent}")
    dist.barrier()  # every rank done before any tears the group down (gloo aborts otherwise)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
