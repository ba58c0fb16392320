"""The ``curvkit`` command.

Subcommands:

``curvkit plugins``
    Every registered component (layer handlers, statistics backends, structures,
    inverters, dampings, inverse kinds, methods) by kind, with the plugin that provided it, and the
    loaded and blocked plugins. Honours ``CURVKIT_DISABLE_PLUGIN_AUTOLOAD`` and
    ``CURVKIT_BLOCK_PLUGINS``. A plugin that fails to load or register is reported in
    one message (exit status 1); ``--traceback`` shows the full traceback.
``curvkit demo``
    Kronecker factors of a small network on scikit-learn's digits, checked live against
    curvlinops and the other registered backends (see :mod:`curvkit.demo`).
``curvkit bench``
    Every registered method beside SGD and AdamW on bundled tasks (digits MLP and CNN, a
    synthetic sequence task): a results table, a JSON file and PNG plots (see
    :mod:`curvkit.bench`).

Every subcommand returns exit status 0 on success, 1 on an error curvkit reports
(:class:`~curvkit.errors.CurvkitError`, or invalid settings), and 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from curvkit.errors import CurvkitError

__all__ = ["build_parser", "main"]


def _version() -> str:
    from curvkit import __version__

    return __version__


# --- curvkit plugins ------------------------------------------------------------------


def _names(values: Any) -> str:
    return ", ".join(str(getattr(v, "value", getattr(v, "__name__", v))) for v in values)


def _details(attr: str, component: Any) -> str:
    """One line describing a component, by kind."""
    if attr == "layer_handlers":
        return _names(getattr(component, "module_types", ()))
    if attr == "backends":
        caps = component.capabilities
        return (
            f"fisher: {_names(sorted(caps.fisher_types))}; approx: {_names(sorted(caps.approximations))}; "
            f"modules: {_names(caps.module_types)}; losses: {_names(caps.losses)}"
        )
    if attr == "methods":
        config = getattr(component, "config_cls", None)
        where = f" (options: {config.__module__}.{config.__qualname__})" if config is not None else ""
        settings = component.recommended_settings() if hasattr(component, "recommended_settings") else {}
        defaults = "; defaults: " + recommended_text(settings) if settings else "; no recommended settings"
        schedule = getattr(component, "schedule", None)
        plan = ""
        if schedule is not None:
            fields = schedule.fields()
            names = ("statistics_period", "refresh_period", "ema_decay", "damping")
            plan = "; schedule: " + ", ".join(f"{k}={fields.get(k, '-')}" for k in names)
        stats = getattr(component, "statistics", "layer")
        cls_name = getattr(component, "class_name", None)
        named = f"; class: curvkit.optim.{cls_name}" if cls_name else ""
        return f"{getattr(component, 'summary', '')}{where}{named}{defaults}{plan}; statistics: {stats}".strip()
    kind = component if isinstance(component, type) else type(component)
    where = f"{kind.__module__}.{kind.__qualname__}"
    if attr == "inverters":
        return f"{where}; dampings: {', '.join(sorted(getattr(component, 'supports', ())))}"
    if attr == "dampings":
        kinds = getattr(component, "kind", "")
        return f"{where}; kind: {kinds}" if isinstance(kinds, str) else f"{where}; kind: depends on options"
    return where


def recommended_text(settings: dict[str, Any]) -> str:
    """A method's recommended settings in one line (``lr=0.03, momentum=0.9, ...``)."""

    def show(value: Any) -> str:
        damping = getattr(value, "value", None)
        if damping is not None and type(value).__name__.endswith("Damping"):
            return f"{type(value).__name__}({damping:g})"
        return f"{value:g}" if isinstance(value, float) else repr(value)

    return ", ".join(f"{k}={show(v)}" for k, v in settings.items())


def _plugin_sources() -> dict[str, str]:
    """Entry-point name -> ``"module (distribution version)"`` for the ``curvkit`` group."""
    from curvkit.hookspecs import PROJECT_NAME

    out: dict[str, str] = {}
    for ep in entry_points(group=PROJECT_NAME):
        dist = getattr(ep, "dist", None)
        where = f" ({dist.name} {dist.version})" if dist is not None else ""
        out.setdefault(ep.name, f"{ep.value}{where}")
    return out


def plugins_report(registry: Any, *, autoload: bool) -> dict[str, Any]:
    """What ``curvkit plugins`` shows, as a JSON-ready dictionary."""
    from curvkit.plugins import CORE_PLUGIN_NAME

    sources = {CORE_PLUGIN_NAME: f"curvkit core ({_version()})", **_plugin_sources()}
    not_loaded = sorted(set(sources) - set(registry.plugins) - set(registry.blocked))
    return {
        "version": _version(),
        "autoload": autoload,
        "plugins": [{"name": name, "source": sources.get(name, "passed explicitly")} for name in registry.plugins],
        "blocked": list(registry.blocked),
        "not_loaded": not_loaded,
        "components": {
            attr: [
                {
                    "name": reg.name,
                    "plugin": reg.plugin,
                    "details": _details(attr, reg.component),
                }
                for reg in table.registrations()
            ]
            for attr, table in registry.tables().items()
        },
        "kinds": {attr: table.kind for attr, table in registry.tables().items()},
    }


def _plural(kind: str) -> str:
    return kind[:-1] + "ies" if kind.endswith("y") else kind + "s"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def format_plugins_report(report: dict[str, Any]) -> str:
    """The text ``curvkit plugins`` prints."""
    from curvkit.plugins import AUTOLOAD_ENV, BLOCK_ENV

    autoload = "on" if report["autoload"] else f"off ({AUTOLOAD_ENV} is set)"
    lines = [f"curvkit {report['version']}", f"plugin autoload: {autoload}", ""]
    lines.append(f"loaded plugins ({len(report['plugins'])}):")
    lines += _table([[p["name"], p["source"]] for p in report["plugins"]])
    blocked = ", ".join(report["blocked"]) or "none"
    lines.append(f"blocked plugins ({BLOCK_ENV}): {blocked}")
    if report["not_loaded"]:
        lines.append(f"installed but not loaded: {', '.join(report['not_loaded'])}")
    for attr, entries in report["components"].items():
        kind = report["kinds"][attr]
        lines.append("")
        if not entries:
            lines.append(f"{_plural(kind)} (0): none")
            continue
        lines.append(f"{_plural(kind)} ({len(entries)}):")
        lines += _table([["name", "plugin", "details"]] + [[e["name"], e["plugin"], e["details"]] for e in entries])
    return "\n".join(lines)


def _cmd_plugins(args: argparse.Namespace) -> int:
    from curvkit.plugins import _autoload_from_env, build_registry

    autoload = False if args.no_autoload else _autoload_from_env()
    registry = build_registry(autoload=autoload, block=args.block)
    report = plugins_report(registry, autoload=autoload)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_plugins_report(report))
    return 0


# --- curvkit demo ---------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    """Replace non-finite floats by ``None`` so the output is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def _cmd_demo(args: argparse.Namespace) -> int:
    from curvkit.demo import DEFAULT_EPOCHS, QUICK_EPOCHS, DemoConfig, format_summary, run_demo

    epochs = args.epochs if args.epochs is not None else (QUICK_EPOCHS if args.quick else DEFAULT_EPOCHS)
    try:
        config = DemoConfig(
            epochs=epochs,
            seed=args.seed,
            fisher=args.fisher,
            check=not args.no_check,
            progress=not args.no_progress,
            out=args.out,
        )
    except ValueError as err:
        print(f"curvkit demo: error: {err}", file=sys.stderr)
        return 1
    summary = run_demo(config)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(_json_safe(summary), fh, indent=2, allow_nan=False)
            fh.write("\n")
        print(f"summary written to {args.json}")
    check = summary["factor_check"]
    return 1 if check is not None and not check["ok"] else 0


# --- curvkit bench --------------------------------------------------------------------


def _cmd_bench(args: argparse.Namespace) -> int:
    from curvkit.bench import format_table, run_bench

    results = run_bench(
        methods=args.methods,
        tasks=args.tasks,
        seeds=args.seeds,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        epochs=args.epochs,
        out=args.out,
        quick=args.quick,
        target_accuracy=args.target_accuracy,
        baselines=not args.no_baselines,
        threads=args.threads or None,
        progress=not args.no_progress,
        plots=not args.no_plots,
    )
    print(format_table(results))
    files = results["files"]
    if files["json"]:
        print(f"results written to {files['json']}")
    for path in files["plots"].values():
        print(f"plot written to {path}")
    return 0


# --- parser ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``curvkit`` command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--traceback", action="store_true", help="show the full traceback when an error is reported")
    parser = argparse.ArgumentParser(
        prog="curvkit",
        description="Kronecker-factored curvature for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "plugins",
        parents=[common],
        help="list the loaded plugins and every component they registered",
        description=(
            "List every registered component by kind with the plugin that provided it, and the loaded "
            "and blocked plugins. Honours CURVKIT_DISABLE_PLUGIN_AUTOLOAD and CURVKIT_BLOCK_PLUGINS."
        ),
    )
    p.add_argument("--no-autoload", action="store_true", help="do not load the 'curvkit' entry points")
    p.add_argument(
        "--block", action="append", default=[], metavar="NAME", help="block a plugin by entry-point name (repeatable)"
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_plugins)

    d = sub.add_parser(
        "demo",
        parents=[common],
        help="train a small network on scikit-learn's digits with K-FAC and AdamW side by side",
        description=(
            "Train an MLP 64-128-10 on scikit-learn's digits twice from the same initialisation, with "
            "curvkit.optim.KFAC and with torch.optim.AdamW; print the training loss and test accuracy per epoch "
            "and the training time of each, check K-FAC's first Kronecker factors against curvlinops' "
            "KFACLinearOperator, and plot loss and accuracy against epochs into a PNG."
        ),
    )
    d.add_argument("--epochs", type=int, default=None, help="epochs per optimizer (default: 10; with --quick: 3)")
    d.add_argument("--quick", action="store_true", help="a short run (3 epochs unless --epochs is given)")
    d.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order (default: 0)")
    d.add_argument(
        "--out", metavar="PATH", default="curvkit-demo.png", help="where to write the plot (default: %(default)s)"
    )
    d.add_argument(
        "--fisher",
        choices=["empirical", "type-2", "mc"],
        default="empirical",
        help="K-FAC's Fisher type (default: %(default)s)",
    )
    d.add_argument("--no-check", action="store_true", help="skip the factor check against curvlinops")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    d.add_argument("--json", metavar="PATH", default=None, help="also write the summary to PATH as JSON")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser(
        "bench",
        parents=[common],
        help="benchmark every registered method beside SGD and AdamW on small bundled tasks",
        description=(
            "Train every registered method (or those given by --methods) and SGD and AdamW on scikit-learn's "
            "digits (an MLP and a small CNN) and a synthetic per-token sequence task; print a results table "
            "(final training loss, test accuracy, ms/step, optimizer state, time to a target accuracy) and write "
            "results.json and one PNG per task (loss against steps and against seconds) into --out. A method "
            "that fails is reported with its error and the benchmark goes on."
        ),
    )
    b.add_argument("--methods", default=None, metavar="LIST", help="comma-separated method names (default: all)")
    b.add_argument(
        "--tasks",
        default=None,
        metavar="LIST",
        help="comma-separated tasks among digits-mlp,digits-cnn,sequence (default: all)",
    )
    b.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds (default: %(default)s)")
    b.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    b.add_argument("--dtype", default="float32", help="float32 (default), float64 or bfloat16 (parameters and inputs)")
    length = b.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: per task)")
    length.add_argument("--epochs", type=int, default=None, help="passes over each training set per run")
    b.add_argument("--out", metavar="DIR", default="curvkit-bench", help="output directory (default: %(default)s)")
    b.add_argument("--quick", action="store_true", help="short runs (each task's quick step count)")
    b.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        metavar="ACC",
        help="test accuracy to time (default: per task, 0.9 for digits, 0.8 for sequence)",
    )
    b.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads during the benchmark (default: %(default)s; 0: leave torch's setting)",
    )
    b.add_argument("--no-baselines", action="store_true", help="do not add SGD and AdamW")
    b.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvkit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except BrokenPipeError:
        # The reader went away (``curvkit plugins | head``): not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except CurvkitError as err:
        if args.traceback:
            traceback.print_exc()
        print(f"curvkit {args.command}: error: {err}", file=sys.stderr)
        if not args.traceback:
            print("(run again with --traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
