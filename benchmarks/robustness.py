"""Robust by default: every registered method at its defaults, under faults, and after ``del``.

Three parts (``--parts``, default all):

``grid``
    every method × lr ∈ {1e-3, 1e-2, 1e-1} and its own default lr × the three ``curvkit
    bench`` tasks (digits MLP, digits CNN, sequence), each at the method's recommended
    settings (the optimizer's defaults) with only the lr replaced, one seed, the task's
    default step count (``--variant no-trust-region``: the same with the trust region and
    SINGD's factor-step bound switched off, to see what they do). A run **diverged** if it
    failed, its loss became non-finite, its final training-set loss is above its initial
    one, or the optimizer warned of divergence. Targets: no run diverges; at the default lr every method reaches ≥ 90 %
    test accuracy on digits and ≥ 0.8 on the sequence task.
``faults``
    :func:`curvkit.testing.robustness_report` for every method: one row per method and
    fault with the non-finite parameters and state tensors left and whether an outlier
    batch ended training.
``rss``
    per method, in a fresh process: train 20 steps of the digits MLP, ``del`` the optimizer,
    ``gc.collect()``, then 2000 steps of plain ``torch.optim.SGD`` on the same model; the
    resident set size (``/proc/self/statm``) after 200 and after 2000 SGD steps, and its
    change (target: within ±5 MiB), plus the forward hooks left on the model.

Run (2 cores, as the docs' figures were)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/robustness.py --json robustness.json

It prints Markdown tables (the docs page ``docs/robustness.md`` shows them) and writes
every figure to the JSON file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import warnings
from typing import Any

import torch
from torch import nn

import curvkit
from curvkit.bench import run_bench
from curvkit.testing import FAULTS, robustness_report

LRS = (1e-3, 1e-2, 1e-1)
TARGETS = {"digits-mlp": 0.9, "digits-cnn": 0.9, "sequence": 0.8}


def _diverged(run: dict[str, Any]) -> tuple[bool, str]:
    if run["status"] != "ok":
        return True, run["status"] + (f": {run['error']}" if run.get("error") else "")
    losses = run["curve"]["train_loss"]
    if not losses or any(v is None or not math.isfinite(v) for v in losses):
        return True, "non-finite training-set loss"
    if losses[-1] > losses[0]:
        return True, f"training-set loss rose {losses[0]:.3f} -> {losses[-1]:.3f}"
    guards = run.get("guards") or {}
    if guards.get("divergence_warnings"):
        return True, "divergence warning: " + ", ".join(guards["divergence_warnings"])
    return False, ""


def _no_trust_region(method: str) -> dict[str, Any]:
    """The options that switch a method's trust region (and SINGD's factor-step bound) off."""
    import dataclasses

    spec = curvkit.default_registry().methods.get(method)
    out: dict[str, Any] = {"kl_clip": None, "rms_clip": None, "grad_ratio_clip": None}
    if "max_factor_step" in {f.name for f in dataclasses.fields(spec.config_cls)}:
        out["max_factor_step"] = None
    return out


def grid(
    methods: list[str], tasks: list[str], lrs: tuple[float, ...], steps: int | None, variant: str = "defaults"
) -> list[dict[str, Any]]:
    rows = []
    settings: list[tuple[str, float | None]] = [("default", None)] + [(f"{lr:g}", lr) for lr in lrs]
    extra = {m: _no_trust_region(m) for m in methods} if variant == "no-trust-region" else {m: {} for m in methods}
    for label, lr in settings:
        t0 = time.perf_counter()
        overrides = {m: {**extra[m], **({} if lr is None else {"lr": lr})} for m in methods}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = run_bench(
                methods=methods,
                tasks=tasks,
                seeds=[0],
                steps=steps,
                out=None,
                baselines=False,
                hyperparameters=overrides,
                progress=False,
                plots=False,
            )
        for run in results["runs"]:
            diverged, why = _diverged(run)
            guards = run.get("guards") or {}
            rows.append(
                {
                    "task": run["task"],
                    "method": run["method"],
                    "lr_setting": label,
                    "lr": run["hyperparameters"].get("lr"),
                    "test_accuracy": run["test_accuracy"],
                    "final_train_loss": run["final_train_loss"],
                    "initial_train_loss": run["curve"]["train_loss"][0] if run["curve"]["train_loss"] else None,
                    "parameter_norm": run.get("parameter_norm"),
                    "diverged": diverged,
                    "why": why,
                    "skipped_steps": guards.get("skipped_steps"),
                    "outlier_stat_updates": guards.get("outlier_stat_updates"),
                    "failed_decompositions": guards.get("failed_decompositions"),
                    "ms_per_step": run["ms_per_step"],
                }
            )
        print(f"# grid: lr {label} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return rows


def faults(methods: list[str], names: list[str] | None) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = robustness_report(method, faults=names)
        for r in report:
            rows.append(
                {
                    "method": r.method,
                    "fault": r.fault,
                    "passed": r.passed,
                    "nonfinite_parameters": r.nonfinite_parameters,
                    "nonfinite_state": r.nonfinite_state,
                    "ended_training": r.ended_training,
                    "detail": r.detail,
                    "seconds": r.seconds,
                }
            )
        print(f"# faults: {method} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return rows


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def rss_one(method: str, sgd_steps: int = 2000, warmup: int = 200, remove: bool = False) -> dict[str, Any]:
    """One method, in this (fresh) process: 20 steps of the method on the digits MLP, ``del``
    the optimizer, ``gc.collect()``, then ``sgd_steps`` steps of plain SGD. ``remove``: take
    the hooks off first (``opt.remove_hooks()``), the control that shows what a flat
    line looks like."""
    from curvkit.bench.tasks import digits_mlp
    from curvkit.demo import digits_split
    from curvkit.optim import CurvatureOptimizer

    X, y, _, _ = digits_split()
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    model = digits_mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = CurvatureOptimizer(model, method=method, loss_fn=loss_fn)
        for i in range(20):
            xb, yb = X[64 * i : 64 * (i + 1)], y[64 * i : 64 * (i + 1)]
            opt.zero_grad()
            out = model(xb)
            opt.curvature_backward(out, yb)
            loss_fn(out, yb).backward()
            opt.step()
    if remove:
        opt.remove_hooks()
    del opt
    gc.collect()
    hooks = _hooks(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    start = None
    for i in range(sgd_steps):
        j = (64 * i) % (len(X) - 64)
        sgd.zero_grad()
        loss_fn(model(X[j : j + 64]), y[j : j + 64]).backward()
        sgd.step()
        if i + 1 == warmup:
            gc.collect()
            start = _rss_mib()
    gc.collect()
    end = _rss_mib()
    assert start is not None
    return {
        "method": method + (" (control: hooks removed before del)" if remove else ""),
        "hooks_left": hooks,
        "rss_after_warmup_mib": start,
        "rss_end_mib": end,
        "rss_change_mib": end - start,
        "flat": abs(end - start) <= 5.0,
    }


def rss(methods: list[str], sgd_steps: int = 2000) -> list[dict[str, Any]]:
    """:func:`rss_one` for every method, each in a fresh process (so one method's leak does
    not show up in the next one's figures)."""
    import subprocess

    rows = []
    for method, remove in [*((m, False) for m in methods), (methods[0], True)]:
        cmd = [sys.executable, os.path.abspath(__file__), "--rss-one", method, "--sgd-steps", str(sgd_steps)]
        cmd += ["--rss-remove"] if remove else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        change, hooks = row["rss_change_mib"], row["hooks_left"]
        print(f"# rss: {row['method']}: {change:+.1f} MiB, {hooks} hooks left", file=sys.stderr)
    return rows


# --- tables ------------------------------------------------------------------------------------


def grid_table(rows: list[dict[str, Any]], tasks: list[str]) -> str:
    settings = list(dict.fromkeys(r["lr_setting"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = []
    for task in tasks:
        lines.append(f"\n**{task}** (target at the default lr: ≥ {TARGETS.get(task, 0.9):g}; ✗ = diverged)\n")
        lines.append("| method | " + " | ".join(f"lr {s}" for s in settings) + " |")
        lines.append("|---|" + "---|" * len(settings))
        for m in methods:
            cells = []
            for s in settings:
                r = next((x for x in rows if x["task"] == task and x["method"] == m and x["lr_setting"] == s), None)
                if r is None:
                    cells.append("")
                    continue
                acc = r["test_accuracy"]
                text = "–" if acc is None else f"{acc:.3f}"
                if s == "default":
                    text += f" (lr {r['lr']:g})"
                    if acc is not None and acc < TARGETS.get(task, 0.9):
                        text += " ⚠"
                if r["diverged"]:
                    text += " ✗"
                cells.append(text)
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    diverged = [r for r in rows if r["diverged"]]
    below = [
        r for r in rows if r["lr_setting"] == "default" and (r["test_accuracy"] or 0) < TARGETS.get(r["task"], 0.9)
    ]
    lines.append(
        f"\n{len(rows)} runs, {len(diverged)} diverged; {len(below)} default-lr runs below target."
        + "".join(f"\n- diverged: {r['task']} {r['method']} lr {r['lr_setting']}: {r['why']}" for r in diverged)
    )
    return "\n".join(lines)


def fault_table(rows: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(r["fault"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for m in methods:
        cells = []
        for f in names:
            r = next(x for x in rows if x["method"] == m and x["fault"] == f)
            cells.append("✓" if r["passed"] else "✗")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    bad_params = sum(r["nonfinite_parameters"] for r in rows)
    bad_state = sum(r["nonfinite_state"] for r in rows)
    ended = sum(1 for r in rows if r["ended_training"])
    failed = [r for r in rows if not r["passed"]]
    lines.append(
        f"\n{len(rows)} method × fault checks: {len(failed)} failed; {bad_params} non-finite parameters, "
        f"{bad_state} non-finite stored state tensors, {ended} runs where one outlier batch ended training."
        + "".join(f"\n- {r['method']} {r['fault']}: {r['detail']}" for r in failed)
    )
    return "\n".join(lines)


def rss_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | hooks left after `del` | RSS after 200 SGD steps (MiB) | change over the next 1800 (MiB) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['hooks_left']} | {r['rss_after_warmup_mib']:.1f} | {r['rss_change_mib']:+.1f}"
            + ("" if r["flat"] else " ✗")
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="grid,faults,rss")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every registered method)")
    parser.add_argument("--tasks", default="digits-mlp,digits-cnn,sequence")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS))
    parser.add_argument("--steps", type=int, default=None, help="steps per grid run (default: the task's)")
    parser.add_argument("--faults", default=None, help=f"comma-separated, of: {', '.join(FAULTS)}")
    parser.add_argument("--sgd-steps", type=int, default=2000)
    parser.add_argument("--rss-one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-remove", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument(
        "--variant",
        choices=("defaults", "no-trust-region"),
        default="defaults",
        help="grid: the defaults, or the defaults with the trust region (and SINGD's factor-step bound) off",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.rss_one:
        print(json.dumps(rss_one(args.rss_one, args.sgd_steps, remove=args.rss_remove)))
        return {}
    methods = args.methods.split(",") if args.methods else curvkit.default_registry().methods.names()
    tasks = args.tasks.split(",")
    parts = args.parts.split(",")
    out: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    if "grid" in parts:
        out["grid"] = grid(methods, tasks, tuple(float(x) for x in args.lrs.split(",")), args.steps, args.variant)
        print(f"## Defaults that train ({args.variant})\n" + grid_table(out["grid"], tasks), flush=True)
    if "faults" in parts:
        out["faults"] = faults(methods, args.faults.split(",") if args.faults else None)
        print("\n## Faults\n" + fault_table(out["faults"]), flush=True)
    if "rss" in parts:
        out["rss"] = rss(methods, args.sgd_steps)
        print("\n## RSS after del\n" + rss_table(out["rss"]), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
