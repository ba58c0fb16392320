"""Conformance of a method under data-parallel training: two processes equal one.

:func:`check_data_parallel` trains a small float64 MLP for a few steps on two CPU processes
(``torch.distributed`` with gloo, the model wrapped in ``DistributedDataParallel``, each
process on its half of every batch) and in this process on the whole batches, and requires
the same parameters (rtol 1e-7) on both ranks. It is what catches a block that computes
from what only one process sees — e.g. a Shampoo-style method that rebuilds the gradient
from the captured features instead of reading ``stats.gradient`` (off by the batch-size
factor, with both ranks agreeing bit for bit) — and a block whose shared statistics or
refresh state miss something.

The processes are forked (so a registry built in the test, with plugins passed
explicitly, is theirs too); on a platform without ``fork`` the check raises
:class:`NotImplementedError`.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import traceback
from typing import Any

import torch
from torch import nn

from curvkit.methods import MethodSpec

__all__ = ["check_data_parallel"]

#: Rows per process; the whole batch of a step has ``2 * ROWS``.
ROWS = 8


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1000 + step)
    X = torch.randn(2 * ROWS, 6, generator=g, dtype=torch.float64, device="cpu")
    y = torch.randint(0, 3, (2 * ROWS,), generator=g, device="cpu")
    rows = slice(rank * 2 * ROWS // world, (rank + 1) * 2 * ROWS // world)
    return X[rows], y[rows]


def _run(spec: MethodSpec, registry: Any, options: dict[str, Any], steps: int, rank: int, world: int) -> list[Any]:
    from curvkit.optim.optimizer import CurvatureOptimizer

    model = _model()
    trained: nn.Module = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = CurvatureOptimizer(
        trained, method=spec, loss_fn=nn.CrossEntropyLoss(), registry=registry, recommended=False, **options
    )
    for t in range(steps):
        X, y = _batch(t, rank, world)
        opt.zero_grad()
        out = trained(X)
        opt.curvature_backward(out, y)
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank: int, world: int, folder: str, spec: MethodSpec, registry: Any, options: Any, steps: int) -> None:
    torch.set_num_threads(1)
    store = f"file://{os.path.join(folder, 'store')}"
    try:
        torch.distributed.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
        try:
            result: Any = _run(spec, registry, options, steps, rank, world)
        finally:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent, with the traceback
        result = traceback.format_exc()
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))


def check_data_parallel(
    method: str | MethodSpec,
    *,
    registry: Any = None,
    options: dict[str, Any] | None = None,
    steps: int = 6,
    rtol: float = 1e-7,
    timeout: float = 120.0,
) -> None:
    """Two forked gloo processes (DDP, half the batch each) reach the parameters of one
    process on the whole batches after ``steps`` steps, on both ranks (float64, the
    method's first sample configuration with ``lr=0.05``; empirical Fisher).

    Raises:
        AssertionError: The parameters differ (naming the parameter, the rank and the
            relative error) or a process failed (with its traceback).
        NotImplementedError: ``torch.distributed`` or the ``fork`` start method is not
            available here.
    """
    from curvkit.testing.methods import _spec

    if not torch.distributed.is_available() or "fork" not in multiprocessing.get_all_start_methods():
        raise NotImplementedError("check_data_parallel needs torch.distributed (gloo) and the 'fork' start method.")
    spec = _spec(method, registry)
    opts = {"lr": 0.05, **dict(spec.sample_configs[0] if options is None else options)}
    reference = _run(spec, registry, opts, steps, 0, 1)
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory() as folder:
        procs = [
            context.Process(target=_worker, args=(rank, 2, folder, spec, registry, opts, steps), daemon=True)
            for rank in range(2)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if hung:
            raise AssertionError(f"method {spec.name!r}: data-parallel ranks {hung} did not finish in {timeout:.0f} s.")
        results = []
        for rank in range(2):
            path = os.path.join(folder, f"rank{rank}.pt")
            if not os.path.exists(path):
                raise AssertionError(
                    f"method {spec.name!r}: data-parallel rank {rank} died (exit code {procs[rank].exitcode})."
                )
            results.append(torch.load(path, weights_only=False))
    for rank, result in enumerate(results):
        if isinstance(result, str):
            raise AssertionError(f"method {spec.name!r}: data-parallel rank {rank} failed:\n{result}")
        for i, (got, want) in enumerate(zip(result, reference, strict=True)):
            err = float((got - want).abs().max())
            scale = max(float(want.abs().max()), 1e-300)
            if not err <= rtol * scale:
                raise AssertionError(
                    f"method {spec.name!r} with {opts!r}: after {steps} steps on two processes (half the batch "
                    f"each), parameter {i} on rank {rank} differs from one process on the whole batch by {err:.3g} "
                    f"(relative {err / scale:.3g}, allowed {rtol:g}). A block must compute from what the core hands "
                    "it — stats.gradient (already averaged over the processes), batch_statistics() that are "
                    "averages over data, refresh_state() holding all of the refresh — not from per-process "
                    "quantities (e.g. a gradient rebuilt from the captured features)."
                )
