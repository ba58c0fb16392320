"""What each process of the data-parallel tests runs (spawned by test_distributed.py).

Every scenario trains a float64 model for ``STEPS`` steps. The whole batch of step ``t`` has
``2B`` rows drawn from a generator seeded with ``t``; with ``world`` processes, rank ``r``
trains on rows ``[r·2B/world, (r+1)·2B/world)``. ``run(rank=0, world=1)`` without a
process group is the single-process reference on the whole batch.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

import curvkit
from curvkit.optim import create

B = 8  # rows per rank with two ranks; the whole batch has 2B
STEPS = 10

#: (label, method, options, model kind)
CASES: list[tuple[str, str, dict[str, Any], str]] = [
    ("kfac", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "mlp"),
    ("kfac-cnn-reduce", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 2, "kfac_approx": "reduce"}, "cnn"),
    ("ekfac", "ekfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "mlp"),
    ("ekfac-cnn", "ekfac", {"lr": 0.05, "damping": 1e-2, "T_inv": 2}, "cnn"),
    ("singd", "singd", {"lr": 0.05, "T": 1, "structure": "dense"}, "mlp"),
    ("singd-diag", "singd", {"lr": 0.05, "T": 1, "structure": "diagonal"}, "mlp"),
    (
        "rs-kfac",
        "rs-kfac",
        {"lr": 0.1, "rank": 4, "oversampling": 2, "niter": 1, "T_stats": 1, "T_inv": 3, "damping": 1e-2},
        "mlp",
    ),
    ("kfac-type2", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3, "fisher": "type-2"}, "mlp"),
    ("ekfac-type2-cnn", "ekfac", {"lr": 0.05, "damping": 1e-2, "T_inv": 2, "fisher": "type-2"}, "cnn"),
    ("tkfac", "tkfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 2}, "mlp"),
    ("skfac", "skfac", {"lr": 0.1, "damping": 1e-2}, "mlp"),
    ("b-kfac", "b-kfac", {"lr": 0.1, "rank": 4, "T_stats": 1, "T_inv": 2, "damping": 1e-2}, "mlp"),
    ("b-r-kfac", "b-r-kfac", {"lr": 0.1, "rank": 4, "T_stats": 1, "T_inv": 2, "damping": 1e-2}, "mlp"),
    # an embedding: A all-reduced as its 1-D diagonal (K-FAC); ids gathered (EKFAC, SINGD)
    ("kfac-emb", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "emb"),
    ("ekfac-emb", "ekfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "emb"),
    ("singd-emb", "singd", {"lr": 0.05, "T": 1, "structure": "dense"}, "emb"),
    # normalisation layers (unit-wise blocks: LayerNorm, an eval-mode BatchNorm1d)
    ("kfac-norm", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "norm"),
    ("singd-norm", "singd", {"lr": 0.05, "T": 1, "structure": "dense"}, "norm"),
    # statistics sent in float32 (half the bytes); every refresh on every rank
    (
        "kfac-fp32-comm",
        "kfac",
        {"lr": 0.1, "damping": 1e-2, "T_inv": 3, "distributor": {"comm_dtype": "float32"}},
        "mlp",
    ),
    (
        "kfac-no-shard",
        "kfac",
        {"lr": 0.1, "damping": 1e-2, "T_inv": 3, "distributor": {"shard_inversions": False}},
        "mlp",
    ),
]
#: Methods the non-finite and checkpoint scenarios use.
NAN_CASE = ("kfac-nan", "kfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "mlp")
NAN_STEP, NAN_RANK = 4, 1
RESUME_CASE = ("ekfac-resume", "ekfac", {"lr": 0.1, "damping": 1e-2, "T_inv": 3}, "mlp")
RESUME_AT = 5


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))
    elif kind == "emb":
        model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3, 3))
    elif kind == "norm":
        # per-datum normalisation only (a train-mode BatchNorm normalises each rank's share by
        # its own statistics, so no run on fewer rows reproduces it)
        model = nn.Sequential(
            nn.Linear(6, 7), nn.LayerNorm(7), nn.Tanh(), nn.Linear(7, 5), nn.BatchNorm1d(5).eval(), nn.Linear(5, 3)
        )
    else:
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(3, 2, 2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        )
    return model.double()


def batch(kind: str, step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    if kind == "emb":
        X = torch.randint(0, 10, (2 * B, 3), generator=g)
    else:
        shape = (2 * B, 2, 5, 5) if kind == "cnn" else (2 * B, 6)
        X = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (2 * B,), generator=g)
    rows = slice(rank * 2 * B // world, (rank + 1) * 2 * B // world)
    return X[rows], y[rows]


def _train(
    case: tuple[str, str, dict[str, Any], str],
    rank: int,
    world: int,
    *,
    ddp: bool,
    steps: range,
    nan_step: int | None = None,
    model: nn.Module | None = None,
    opt: Any = None,
) -> tuple[nn.Module, Any]:
    _, method, options, kind = case
    if model is None:
        model = make_model(kind)
        if ddp:
            model = nn.parallel.DistributedDataParallel(model)
        opt = create(method, model, loss_fn=nn.CrossEntropyLoss(), **_resolve(options, world))
    loss_fn = nn.CrossEntropyLoss()
    for t in steps:
        X, y = batch(kind, t, rank, world)
        opt.zero_grad()
        out = model(X)
        opt.curvature_backward(out, y)  # does nothing for the empirical Fisher
        loss_fn(out, y).backward()
        if nan_step is not None and t == nan_step and (world == 1 or rank == NAN_RANK):
            # after DDP's averaging: only this rank's gradient is non-finite
            next(iter(model.parameters())).grad[0, 0] = float("nan")
        opt.step()
    return model, opt


def _resolve(options: dict[str, Any], world: int) -> dict[str, Any]:
    """``distributor={...}`` → a TorchDistributor with those options (on one process:
    none)."""
    options = dict(options)
    spec = options.pop("distributor", None)
    if spec is not None and world > 1:
        from curvkit.distributed import TorchDistributor

        spec = dict(spec)
        if "comm_dtype" in spec:
            spec["comm_dtype"] = getattr(torch, spec["comm_dtype"])
        options["distributor"] = TorchDistributor(**spec)
    return options


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def run(rank: int, world: int, out_dir: str | None = None) -> dict[str, Any]:
    """Every scenario on this process; returns (and, with ``out_dir``, saves) the results."""
    distributed = world > 1
    results: dict[str, Any] = {}
    for case in CASES:
        model, opt = _train(case, rank, world, ddp=distributed, steps=range(STEPS))
        pre = opt.preconditioner
        results[case[0]] = {
            "params": _params(model),
            "refresh_counts": dict(pre.refresh_counts),
            "plan": pre.distribution_plan,
            "bytes": dict(pre.distributor.bytes_communicated),
        }
    # a plain model in the process group (no DDP): the distributor averages the gradients
    case = CASES[0]
    model, opt = _train(case, rank, world, ddp=False, steps=range(STEPS))
    results["kfac-plain"] = {"params": _params(model), "bytes": dict(opt.preconditioner.distributor.bytes_communicated)}
    # a non-finite gradient on one rank skips the step everywhere
    model, opt = _train(NAN_CASE, rank, world, ddp=distributed, steps=range(STEPS), nan_step=NAN_STEP)
    results["kfac-nan"] = {"params": _params(model), "counters": dict(opt.preconditioner.counters)}
    # a checkpoint saved on rank 0 after RESUME_AT steps resumes on every rank
    if out_dir is not None:
        path = os.path.join(out_dir, "checkpoint.pt")
        model, opt = _train(RESUME_CASE, rank, world, ddp=distributed, steps=range(RESUME_AT))
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
        if distributed:
            torch.distributed.barrier()
        state = torch.load(path, weights_only=False)
        fresh = make_model(RESUME_CASE[3])
        if distributed:
            fresh = nn.parallel.DistributedDataParallel(fresh)
        fresh.load_state_dict(state["model"])
        fresh_opt = create(RESUME_CASE[1], fresh, **_resolve(RESUME_CASE[2], world))
        fresh_opt.load_state_dict(state["opt"])
        model, opt = _train(
            RESUME_CASE, rank, world, ddp=distributed, steps=range(RESUME_AT, STEPS), model=fresh, opt=fresh_opt
        )
        results["ekfac-resume"] = {"params": _params(model)}
    else:
        model, _ = _train(RESUME_CASE, rank, world, ddp=False, steps=range(STEPS))
        results["ekfac-resume"] = {"params": _params(model)}
    if out_dir is not None:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    return results


def worker(rank: int, world: int, out_dir: str) -> None:
    """Entry point of ``torch.multiprocessing.spawn``."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank, world_size=world
    )
    try:
        run(rank, world, out_dir)
    finally:
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()


__all__ = ["CASES", "run", "worker", "curvkit"]
