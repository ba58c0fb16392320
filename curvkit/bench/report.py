"""``curvkit bench``'s output: the terminal table and the PNG plots."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from curvkit.bench.settings import BASELINES

_PLOT_DPI = 100


# --- output -----------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_table(results: dict[str, Any], *, error_width: int = 60) -> str:
    """The results table ``curvkit bench`` prints: one row per (task, method), means over
    the seeds that finished; failed or diverged methods show their error."""
    header = ["task", "method", "status", "train loss", "test acc", "ms/step", "state", "to target"]
    rows = [header]
    notes: list[str] = []
    for row in results["summary"]:
        target = results["tasks"][row["task"]]["target_accuracy"]
        if row["steps_to_target"] is not None:
            reach = f"{row['steps_to_target']:.0f} st / {row['seconds_to_target']:.2f} s"
            if row["seeds_reaching_target"] < row["seeds"]:
                reach += f" ({row['seeds_reaching_target']}/{row['seeds']})"
        else:
            reach = f"not {target:.2f}" if row["status"] != "failed" else "-"
        status = row["status"]
        if row["error"]:
            notes.append(f"{row['task']}/{row['method']}: {row['error']}")
            msg = row["error"] if len(row["error"]) <= error_width else row["error"][: error_width - 1] + "…"
            status = f"{status}: {msg}"
        rows.append(
            [
                row["task"],
                row["method"],
                status,
                _fmt(row["final_train_loss"], ".4f"),
                _fmt(row["test_accuracy"], ".3f"),
                _fmt(row["ms_per_step"], ".2f"),
                _bytes(row["state_bytes"]),
                reach,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    cfg = results["config"]
    lines.append("")
    lines.append(
        f"{len(results['runs'])} runs on {cfg['device']} in {cfg['dtype']}, seeds {cfg['seeds']}, "
        f"{results['seconds']:.1f} s; loss: whole training set; acc: test set; to target: first evaluation "
        "at or above the task's target accuracy (steps / training seconds)."
    )
    return "\n".join(lines)


def plot_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """One PNG per task (``<out_dir>/<task>.png``): training loss against steps and against
    training seconds, and test accuracy against steps, one line per method and seed.
    Uses matplotlib's Agg canvas directly (the pyplot backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    methods = results["config"]["methods"]
    curvature = [m for m in methods if m not in BASELINES]
    palette = _colours()
    style: dict[str, dict[str, Any]] = {
        "sgd": {"color": "black", "linestyle": "--", "linewidth": 2.2},
        "adamw": {"color": "black", "linestyle": ":", "linewidth": 2.2},
    }
    for i, m in enumerate(curvature):
        style[m] = {
            "color": palette[i % len(palette)],
            "linestyle": ("-", "-.", (0, (5, 1, 1, 1, 1, 1)))[i // len(palette) % 3],
            "linewidth": 1.5,
        }
    paths: dict[str, Path] = {}
    for task, info in results["tasks"].items():
        fig = Figure(figsize=(16, 5.2), dpi=_PLOT_DPI)
        FigureCanvasAgg(fig)
        ax_step, ax_sec, ax_acc = fig.subplots(1, 3)
        drawn = set()
        for run in results["runs"]:
            if run["task"] != task or not run["curve"]["step"]:
                continue
            curve = run["curve"]
            loss = [v if v is not None else math.nan for v in curve["train_loss"]]
            label = None if run["method"] in drawn else run["method"]
            if run["status"] == "diverged" and label is not None:
                label += " (diverged)"
            drawn.add(run["method"])
            kw = {**style.get(run["method"], {}), "label": label}
            ax_step.plot(curve["step"], loss, **kw)
            ax_sec.plot(curve["seconds"], loss, **kw)
            ax_acc.plot(curve["step"], curve["test_accuracy"], **{**kw, "label": None})
        failed = sorted({r["method"] for r in results["runs"] if r["task"] == task and r["status"] == "failed"})
        for ax, xlabel in ((ax_step, "step"), (ax_sec, "training time [s]")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("training loss (whole training set)")
            ax.grid(True, which="both", alpha=0.3)
        ax_acc.set_xlabel("step")
        ax_acc.set_ylabel("test accuracy")
        ax_acc.axhline(info["target_accuracy"], color="red", linewidth=0.8, alpha=0.6)
        ax_acc.grid(True, alpha=0.3)
        ax_step.set_title("loss vs steps")
        ax_sec.set_title("loss vs training time")
        ax_acc.set_title(f"test accuracy (red: target {info['target_accuracy']:.2f})")
        cfg = results["config"]
        title = f"{task}: {info['description']} — {cfg['device']}, {cfg['dtype']}, seeds {cfg['seeds']}"
        if failed:
            title += f"\nfailed (no line): {', '.join(failed)}"
        fig.suptitle(title, fontsize=10)
        handles, labels = ax_step.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="center right", fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0, 0.9, 1))
        path = out_dir / f"{task}.png"
        fig.savefig(path)
        paths[task] = path
    return paths


def _colours() -> list[Any]:
    """tab10 without its grey (kept for nothing: the baselines are black)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i) for i in range(10) if i != 7]
