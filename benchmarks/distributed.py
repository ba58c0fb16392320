"""Data-parallel preconditioning: ms per step and bytes communicated on 1 and 2 ranks.

Every case trains the wide MLP (784-1024-1024-10, float32, cross-entropy) on a fixed whole
batch of ``2B`` rows: one process with all of it, and ``world`` processes with ``2B/world``
rows each (the same work split across processes). Methods: SGD (DDP, the floor), K-FAC
(T_inv 1 and 10; statistics sent in bf16), EKFAC, SINGD and RS-KFAC, each with sharded refreshes (one rank computes
each decomposition and broadcasts it) and without (every rank computes every refresh).

    OMP_NUM_THREADS=1 python benchmarks/distributed.py            # gloo on CPU, 1 and 2 ranks
    python benchmarks/distributed.py --world 1 2 4 --backend nccl  # on a multi-GPU machine

Printed per case: median ms per step on each world size, the speed-up over one process,
and the payload bytes one rank sends per step (statistics, refresh results, gradients,
control), with the ratio of statistics bytes to what sending the dense factors would cost.
With ``--json`` the figures are written to a file.

What a 2-core machine can show: the bytes (exact, any machine), and that sharded refreshes
halve each rank's inversion work; two processes on two cores also compute in parallel.
What it cannot: communication time over a real network or NVLink (gloo here runs over
loopback), or NCCL; the same script runs there unchanged with ``--backend nccl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("sgd", "sgd", {"lr": 0.01, "momentum": 0.9}),
    ("kfac T_inv=1", "kfac", {"lr": 0.01, "damping": 1e-2, "T_inv": 1}),
    ("kfac T_inv=10", "kfac", {"lr": 0.01, "damping": 1e-2, "T_inv": 10}),
    ("kfac T_inv=10 bf16 comm", "kfac", {"lr": 0.01, "damping": 1e-2, "T_inv": 10, "_comm": "bfloat16"}),
    ("ekfac T_inv=10", "ekfac", {"lr": 0.01, "damping": 1e-2, "T_inv": 10}),
    ("singd dense T=1", "singd", {"lr": 0.03, "T": 1, "structure": "dense", "damping": 0.1, "lr_cov": 0.05}),
    ("singd diagonal T=1", "singd", {"lr": 0.03, "T": 1, "structure": "diagonal", "damping": 0.1, "lr_cov": 0.05}),
    # with damping 1e-2 (relative to the largest eigenvalue) RS-KFAC's rank-64 inverse
    # diverges on this task within 5 steps; 0.1 trains
    ("rs-kfac T_inv=10", "rs-kfac", {"lr": 0.01, "T_stats": 1, "T_inv": 10, "rank": 64, "damping": 0.1}),
]


def wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def _dense_factor_bytes(model: nn.Module) -> int:
    """Bytes of every layer's dense A and G in float32 (what a naive all-reduce sends)."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += ((m.in_features + 1) ** 2 + m.out_features**2) * 4
    return total


def _run_case(
    label: str, method: str, options: dict[str, Any], shard: bool, rank: int, world: int, args: Any, device: Any
) -> dict[str, Any]:
    import curvkit
    from curvkit.distributed import TorchDistributor

    options = dict(options)
    comm = options.pop("_comm", None)
    model = wide_mlp().to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    if method == "sgd":
        opt: Any = torch.optim.SGD(model.parameters(), **options)
        pre = None
    else:
        comm_dtype = getattr(torch, comm) if comm else None
        distributor = TorchDistributor(shard_inversions=shard, comm_dtype=comm_dtype) if world > 1 else False
        opt = curvkit.optim.create(method, model, distributor=distributor, **options)
        pre = opt.preconditioner
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2 * args.batch, 784, generator=g).to(device)
    y = torch.randint(0, 10, (2 * args.batch,), generator=g).to(device)
    rows = slice(rank * 2 * args.batch // world, (rank + 1) * 2 * args.batch // world)
    Xr, yr = X[rows], y[rows]
    loss_fn = nn.CrossEntropyLoss()
    times = []
    loss = torch.tensor(float("nan"))
    sent_before = dict(pre.distributor.bytes_communicated) if pre is not None else {}
    for step in range(args.warmup + args.steps):
        if world > 1:
            dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = loss_fn(model(Xr), yr)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        if step == args.warmup - 1 and pre is not None:
            sent_before = dict(pre.distributor.bytes_communicated)
    sent = {}
    if pre is not None:
        sent = {k: (v - sent_before[k]) / args.steps for k, v in pre.distributor.bytes_communicated.items()}
    elif world > 1:
        n = sum(p.numel() * p.element_size() for p in model.parameters())
        sent = {"gradients": float(n), "statistics": 0.0, "refresh": 0.0, "control": 0.0}
    skipped = pre.counters["skipped_steps"] if pre is not None else 0
    return {
        "label": label,
        "shard": shard,
        "world": world,
        "ms": 1e3 * statistics.median(times),
        "bytes": sent,
        "final_loss": float(loss.detach()),
        "skipped_steps": int(skipped),
    }


def worker(rank: int, world: int, args: Any, out: str) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device(f"cuda:{rank}")
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(
            args.backend, init_method=f"file://{os.path.join(out, f'store{world}')}", rank=rank, world_size=world
        )
    results = []
    try:
        for label, method, options in CASES:
            if args.methods and not any(label.startswith(m) for m in args.methods):
                continue
            for shard in (True, False) if method != "sgd" and world > 1 else (True,):
                results.append(_run_case(label, method, options, shard, rank, world, args, device))
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()
    if rank == 0:
        torch.save(results, os.path.join(out, f"world{world}.pt"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[1, 2], help="world sizes to run (default 1 2)")
    parser.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    parser.add_argument("--batch", type=int, default=128, help="B: the whole batch is 2B rows (default 128)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--methods", nargs="*", default=None, help="case labels to run, by prefix (default all)")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < max(args.world):
        print(f"--backend nccl needs {max(args.world)} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    by_world: dict[int, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as out:
        for world in args.world:
            mp.spawn(worker, args=(world, args, out), nprocs=world, join=True)
            by_world[world] = torch.load(os.path.join(out, f"world{world}.pt"), weights_only=False)
    dense = _dense_factor_bytes(wide_mlp())
    base = {r["label"]: r["ms"] for r in by_world.get(1, [])}
    print(
        f"wide MLP 784-1024-1024-10, whole batch {2 * args.batch}, backend {args.backend}, "
        f"{args.threads} thread(s) per process; ms/step = median of {args.steps}"
    )
    header = (
        f"{'case':<22} {'ranks':>5} {'sharded':>7} {'ms/step':>9} {'vs 1 rank':>9} "
        f"{'stats KB':>9} {'(/dense)':>8} {'refresh KB':>10} {'grads KB':>9} {'ctrl KB':>8} {'loss':>7} {'skip':>4}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for world in args.world:
        for r in by_world[world]:
            b = r["bytes"]
            speedup = base.get(r["label"], float("nan")) / r["ms"] if world > 1 else 1.0
            stats_kb = b.get("statistics", 0.0) / 1024
            print(
                f"{r['label']:<22} {world:>5} {('yes' if r['shard'] else 'no') if world > 1 else '-':>7} "
                f"{r['ms']:>9.2f} {speedup:>8.2f}× {stats_kb:>9.1f} "
                f"{(b.get('statistics', 0.0) / dense if b else 0.0):>8.2f} {b.get('refresh', 0.0) / 1024:>10.1f} "
                f"{b.get('gradients', 0.0) / 1024:>9.1f} {b.get('control', 0.0) / 1024:>8.2f} "
                f"{r['final_loss']:>7.3f} {r['skipped_steps']:>4}"
            )
            rows.append({**r, "speedup_vs_1_rank": speedup})
    print(
        "'vs 1 rank': one process's ms/step on the whole batch over this one's (>1: faster); bytes are one rank's "
        "payload per step; '(/dense)': statistics bytes over dense float32 factors; loss: rank 0's last training "
        "loss; skip: steps skipped for non-finite gradients (a diverged run)."
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
