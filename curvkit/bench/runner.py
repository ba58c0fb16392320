"""Running ``curvkit bench``: option checks, building each method's optimizer, training
and timing one run, and :func:`run_bench`."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.bench.report import plot_results
from curvkit.bench.settings import (
    BASELINES,
    DEFAULT_OUT,
    DTYPES,
    JSON_NAME,
    _config_fields,
    _exact,
    hyperparameters_for,
)
from curvkit.bench.tasks import TASKS, Task
from curvkit.errors import ConfigError

# --- options ----------------------------------------------------------------------------------


def _split(value: str | Iterable[Any] | None) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def _resolve_methods(methods: Any, registry: Any, baselines: bool) -> list[str]:
    registered = list(registry.methods.names())
    names = _split(methods)
    if names is None:
        names = list(registered)
    bad = [n for n in names if n not in registered and n not in BASELINES]
    if bad:
        raise ConfigError(
            "bench methods",
            [
                f"unknown method {n!r}; registered methods: {', '.join(registered) or 'none'}; "
                f"baselines: {', '.join(BASELINES)} (see `curvkit plugins`)"
                for n in bad
            ],
        )
    if not names:
        raise ConfigError("bench methods", ["methods is empty; give at least one method name"])
    if baselines:
        names = [b for b in BASELINES if b not in names] + names
    seen: list[str] = []
    for n in names:
        if n not in seen:
            seen.append(n)
    return seen


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            "bench options", [f"device={device!r} is not a torch device ({err}); use 'cpu' or 'cuda'"]
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench options", [f"device={device!r}: CUDA is not available here; use device='cpu'"])
    return dev


def _positive_int(problems: list[str], name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        problems.append(f"{name}={value!r} must be an integer >= 1")


# --- optimizers -------------------------------------------------------------------------------


def _top_package(module: str) -> str:
    return module.split(".", 1)[0]


def _optimizer_class(name: str, spec: Any, registry: Any = None) -> type:
    """The most derived loaded :class:`CurvatureOptimizer` subclass whose ``method`` is
    ``name`` and that lives in curvkit or in the package that defined the method's
    configuration (the spec's named class, :attr:`MethodSpec.class_name`, is built first,
    so the choice does not depend on what ran before); :class:`CurvatureOptimizer` itself
    if there is none."""
    from curvkit.errors import DuplicateComponentError
    from curvkit.optim import CurvatureOptimizer
    from curvkit.optim.named import named_class

    if getattr(spec, "class_name", None):
        try:
            named_class(spec.class_name, registry)
        except (AttributeError, DuplicateComponentError):  # not this registry's, or ambiguous: skip it
            pass

    homes = {"curvkit", _top_package(getattr(getattr(spec, "config_cls", None), "__module__", "curvkit"))}
    found: list[type] = []
    todo = list(CurvatureOptimizer.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if getattr(cls, "method", None) == name and _top_package(cls.__module__) in homes:
            found.append(cls)
    leaves = [c for c in found if not any(o is not c and issubclass(o, c) for o in found)]
    return leaves[0] if len(leaves) == 1 else CurvatureOptimizer


def _materialise(options: dict[str, Any]) -> dict[str, Any]:
    out = dict(options)
    damping = out.get("damping")
    if isinstance(damping, tuple) and len(damping) == 2 and damping[0] == "exact":
        out["damping"] = _exact(float(damping[1]))
    return out


def _make_optimizer(
    name: str, model: nn.Module, hyper: dict[str, Any], task: Task, registry: Any, seed: int
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), **hyper)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), **hyper)
    spec = registry.methods.get(name)
    fields = _config_fields(spec)
    options = _materialise(hyper)
    for key, value in task.method_options.items():
        if key in fields:
            options.setdefault(key, value)
    cls = _optimizer_class(name, spec, registry)
    kwargs: dict[str, Any] = {"registry": registry, "loss_fn": nn.CrossEntropyLoss()}
    if cls.__name__ == "CurvatureOptimizer":
        kwargs["method"] = name
    device = next(model.parameters()).device
    kwargs["generator"] = torch.Generator(device=device).manual_seed(seed)
    return cls(model, **kwargs, **options)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    method = getattr(opt, "state_bytes", None)
    if callable(method):
        return int(method())
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
    return total


# --- one run ----------------------------------------------------------------------------------


def _guards(opt: Any) -> dict[str, Any] | None:
    """A curvature optimizer's guard counters (skipped steps by reason, skipped and
    outlier statistics, blocks' declined updates and failed decompositions) and the
    divergence warnings it gave; ``None`` for other optimizers."""
    pre = getattr(opt, "preconditioner", None)
    if pre is None:
        return None
    out: dict[str, Any] = {k: v for k, v in pre.counters.items() if isinstance(v, int)}
    blocks = pre.blocks.values()
    out["block_updates_declined"] = sum(int(getattr(b, "skipped_updates", 0)) for b in blocks)
    out["failed_decompositions"] = sum(int(getattr(b, "inverse_failures", 0)) for b in blocks)
    monitor = getattr(opt, "monitor", None)
    out["divergence_warnings"] = list(monitor.state["warnings"]) if monitor is not None else []
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _evaluate(model: nn.Module, task: Task, data: tuple[Tensor, ...], opt: Any) -> tuple[float, float]:
    X_tr, y_tr, X_te, y_te = data
    pre = getattr(opt, "preconditioner", None)
    suspended = getattr(pre, "suspended", None)
    ctx = suspended() if callable(suspended) else _null()
    with ctx:
        loss = 0.0
        for i in range(0, len(X_tr), 1024):
            out = task.logits(model(X_tr[i : i + 1024])).float()
            loss += float(nn.functional.cross_entropy(out, y_tr[i : i + 1024], reduction="sum"))
        loss /= y_tr.numel()
        out = model(X_te)
        pred = out.argmax(-1)
        acc = float((pred == y_te).double().mean())
    return loss, acc


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return " ".join(text.split())


def _run_one(
    task: Task,
    method: str,
    seed: int,
    steps: int,
    data: tuple[Tensor, ...],
    device: torch.device,
    dtype: torch.dtype,
    registry: Any,
    hyper: dict[str, Any],
    target: float,
    bar: Any,
) -> dict[str, Any]:
    run: dict[str, Any] = {
        "task": task.name,
        "method": method,
        "seed": seed,
        "status": "ok",
        "error": None,
        "stage": None,
        "hyperparameters": _jsonable(hyper),
        "optimizer": None,
        "steps": 0,
        "final_train_loss": None,
        "test_accuracy": None,
        "ms_per_step": None,
        "state_bytes": None,
        "target_accuracy": target,
        "steps_to_target": None,
        "seconds_to_target": None,
        "train_seconds": 0.0,
        "curve": {"step": [], "seconds": [], "train_loss": [], "test_accuracy": []},
        "batch_loss": [],
        "parameter_norm": None,
        "guards": None,
    }
    X_tr, y_tr = data[0], data[1]
    n = len(X_tr)
    eval_every = max(1, steps // task.evals)
    stage = "construction"
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = task.model().to(device=device, dtype=dtype)
            opt = _make_optimizer(method, model, hyper, task, registry, seed)
            run["optimizer"] = f"{type(opt).__module__}.{type(opt).__qualname__}"
            loss_fn = nn.CrossEntropyLoss()
            curvature_backward = getattr(opt, "curvature_backward", None)
            gen = torch.Generator(device="cpu").manual_seed(seed)  # batch order: the same on every device
            perm, pos = torch.randperm(n, generator=gen, device="cpu"), 0
            curve = run["curve"]

            def record(step: int, seconds: float) -> float:
                loss, acc = _evaluate(model, task, data, opt)
                curve["step"].append(step)
                curve["seconds"].append(seconds)
                curve["train_loss"].append(loss)
                curve["test_accuracy"].append(acc)
                if run["steps_to_target"] is None and acc >= target:
                    run["steps_to_target"], run["seconds_to_target"] = step, seconds
                return acc

            stage = "evaluation"
            record(0, 0.0)
            stage = "training"
            times: list[float] = []
            seconds = 0.0
            for step in range(1, steps + 1):
                if pos + task.batch_size > n:
                    perm, pos = torch.randperm(n, generator=gen, device="cpu"), 0
                idx = perm[pos : pos + task.batch_size].to(device)
                pos += task.batch_size
                xb, yb = X_tr[idx], y_tr[idx]
                _sync(device)
                t0 = time.perf_counter()
                opt.zero_grad()
                logits = task.logits(model(xb))
                if curvature_backward is not None:
                    curvature_backward(logits, yb)
                loss = loss_fn(logits, yb)
                loss.backward()
                opt.step()
                _sync(device)
                dt = time.perf_counter() - t0
                times.append(dt)
                seconds += dt
                value = float(loss.detach())
                run["batch_loss"].append(value)
                run["steps"] = step
                if bar is not None:
                    bar.update()
                if not math.isfinite(value):
                    run["status"] = "diverged"
                    run["error"] = f"non-finite training loss at step {step}"
                    if bar is not None:
                        bar.update(steps - step)
                    break
                if step % eval_every == 0 or step == steps:
                    stage = "evaluation"
                    acc = record(step, seconds)
                    stage = "training"
                    if bar is not None:
                        bar.set_postfix_str(f"test acc {acc:.3f}", refresh=False)
            run["train_seconds"] = seconds
            run["ms_per_step"] = 1000.0 * statistics.median(times) if times else None
            run["state_bytes"] = _state_bytes(opt)
            run["parameter_norm"] = float(
                torch.linalg.vector_norm(torch.stack([p.detach().double().norm() for p in model.parameters()]))
            )
            run["guards"] = _guards(opt)
            if run["status"] == "ok":
                run["final_train_loss"] = curve["train_loss"][-1]
                run["test_accuracy"] = curve["test_accuracy"][-1]
                if not math.isfinite(run["final_train_loss"]):
                    run["status"] = "diverged"
                    run["error"] = "non-finite training-set loss"
    except Exception as err:  # noqa: BLE001 - a failing method is reported, not raised
        run["status"] = "failed"
        run["stage"] = stage
        run["error"] = _error_text(err)
        if bar is not None:
            bar.update(max(0, steps - run["steps"]))
    return run


# --- the benchmark ----------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return repr(obj)


def _summarise(runs: list[dict[str, Any]], tasks: Sequence[str], methods: Sequence[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for method in methods:
            group = [r for r in runs if r["task"] == task and r["method"] == method]
            if not group:
                continue
            ok = [r for r in group if r["status"] == "ok"]

            def mean(key: str, among: list[dict[str, Any]] = ok) -> float | None:
                vals = [r[key] for r in among if r[key] is not None]
                return statistics.fmean(vals) if vals else None

            statuses = sorted({r["status"] for r in group})
            errors = [r["error"] for r in group if r["error"]]
            reached = [r for r in group if r["steps_to_target"] is not None]
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "status": statuses[0] if len(statuses) == 1 else "mixed",
                    "error": errors[0] if errors else None,
                    "seeds": len(group),
                    "seeds_ok": len(ok),
                    "final_train_loss": mean("final_train_loss"),
                    "test_accuracy": mean("test_accuracy"),
                    "test_accuracy_min": min((r["test_accuracy"] for r in ok), default=None),
                    "test_accuracy_max": max((r["test_accuracy"] for r in ok), default=None),
                    "ms_per_step": mean("ms_per_step", group),
                    "state_bytes": mean("state_bytes", group),
                    "seeds_reaching_target": len(reached),
                    "steps_to_target": mean("steps_to_target", reached),
                    "seconds_to_target": mean("seconds_to_target", reached),
                }
            )
    return rows


def run_bench(
    methods: str | Iterable[str] | None = None,
    tasks: str | Iterable[str] | None = None,
    seeds: str | Iterable[int] = (0,),
    device: str | torch.device | None = None,
    dtype: str = "float32",
    steps: int | None = None,
    epochs: int | None = None,
    out: str | os.PathLike[str] | None = DEFAULT_OUT,
    quick: bool = False,
    target_accuracy: float | None = None,
    *,
    baselines: bool = True,
    registry: Any = None,
    hyperparameters: dict[str, dict[str, Any]] | None = None,
    threads: int | None = 1,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return every figure as a JSON-ready dictionary.

    Args:
        methods: Method names (a list or a comma-separated string): registered methods
            and/or the baselines ``"sgd"``, ``"adamw"``. Default: every registered method.
        tasks: Task names from :data:`TASKS` (default: all).
        seeds: Seeds of the initialisation, the batch order and the methods' random
            generators; one run per seed.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available, else the CPU).
        dtype: ``"float32"``, ``"float64"`` or ``"bfloat16"`` (model parameters and inputs;
            a method that cannot train in it is reported as failed).
        steps: Optimizer steps per run (default: the task's, fewer with ``quick``).
        epochs: Alternatively, passes over each task's training set.
        out: Directory for ``results.json`` and one PNG per task (``None``: write nothing).
        quick: Use each task's short step count (:attr:`Task.quick_steps`).
        target_accuracy: Test accuracy to time (default: each task's
            :attr:`Task.target_accuracy`).
        baselines: Add SGD and AdamW to the methods.
        registry: Plugin registry (default: :func:`curvkit.plugins.default_registry`).
        hyperparameters: Per-method settings merged over the method's own
            (:func:`~curvkit.bench.hyperparameters_for`), e.g. ``{"kfac": {"lr": 0.1}}``.
        progress: Show a tqdm progress bar on stderr.
        threads: torch's intra-op CPU threads during the benchmark (restored afterwards);
            ``None`` keeps the current setting. The default, 1, suits these small models: on
            a loaded 2-core machine two threads made ``--quick`` five times slower (3 min vs 36 s).
        plots: Draw the PNG plots (when ``out`` is set).

    Returns:
        ``{"config", "environment", "tasks", "runs", "summary", "files"}``; see
        ``docs/bench.md`` for every key.

    Raises:
        ConfigError: An unknown method or task, a bad dtype, device, seed, step count or
            target (the message names the value and the legal ones).
    """
    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    problems: list[str] = []
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    task_names = _split(tasks)
    if task_names is None:
        task_names = list(TASKS)
    for t in task_names:
        if t not in TASKS:
            problems.append(f"unknown task {t!r}; tasks: {', '.join(TASKS)}")
    if not task_names:
        problems.append("tasks is empty; give at least one task name")
    try:
        seed_list = [int(s) for s in (_split(seeds) or [])]
    except (TypeError, ValueError):
        problems.append(f"seeds={seeds!r} must be integers (e.g. '0,1,2')")
        seed_list = []
    if not seed_list and not any(p.startswith("seeds") for p in problems):
        problems.append(f"seeds={seeds!r} is empty; give at least one seed")
    _positive_int(problems, "steps", steps)
    _positive_int(problems, "epochs", epochs)
    _positive_int(problems, "threads", threads)
    if steps is not None and epochs is not None:
        problems.append(f"steps={steps!r} and epochs={epochs!r} were both given; give one of them")
    if target_accuracy is not None and not (isinstance(target_accuracy, int | float) and 0.0 < target_accuracy <= 1.0):
        problems.append(f"target_accuracy={target_accuracy!r} must be a number in (0, 1]")
    if problems:
        raise ConfigError("bench options", problems)
    method_names = _resolve_methods(methods, registry, baselines)
    dev = _resolve_device(device)
    torch_dtype = DTYPES[dtype]

    plan: list[tuple[Task, int]] = []
    for name in task_names:
        task = TASKS[name]
        n_train = len(task.data()[0])
        if steps is not None:
            n_steps = steps
        elif epochs is not None:
            n_steps = epochs * math.ceil(n_train / task.batch_size)
        else:
            n_steps = task.quick_steps if quick else task.steps
        plan.append((task, n_steps))

    from tqdm.auto import tqdm

    total = sum(n_steps for _, n_steps in plan) * len(method_names) * len(seed_list)
    runs: list[dict[str, Any]] = []
    task_info: dict[str, Any] = {}
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        environment = _environment(dev, registry)
        started = time.perf_counter()
        with tqdm(total=total, desc="curvkit bench", unit="step", disable=not progress, dynamic_ncols=True) as bar:
            for task, n_steps in plan:
                cpu = task.data()
                data = tuple(x.to(device=dev, dtype=torch_dtype) if x.is_floating_point() else x.to(dev) for x in cpu)
                target = task.target_accuracy if target_accuracy is None else float(target_accuracy)
                task_info[task.name] = {
                    "description": task.description,
                    "n_train": len(cpu[0]),
                    "n_test": len(cpu[2]),
                    "input_shape": list(cpu[0].shape[1:]),
                    "batch_size": task.batch_size,
                    "steps": n_steps,
                    "eval_every": max(1, n_steps // task.evals),
                    "target_accuracy": target,
                    "method_options": _jsonable(task.method_options),
                }
                for method in method_names:
                    spec = None if method in BASELINES else registry.methods.get(method)
                    hyper = hyperparameters_for(method, task.name, spec, hyperparameters)
                    for seed in seed_list:
                        bar.set_description_str(f"{task.name} {method} s{seed}", refresh=False)
                        runs.append(
                            _run_one(task, method, seed, n_steps, data, dev, torch_dtype, registry, hyper, target, bar)
                        )
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - started
    results: dict[str, Any] = {
        "config": {
            "methods": method_names,
            "tasks": task_names,
            "seeds": seed_list,
            "device": str(dev),
            "dtype": dtype,
            "steps": steps,
            "epochs": epochs,
            "quick": quick,
            "target_accuracy": target_accuracy,
            "threads": threads,
        },
        "environment": environment,
        "tasks": task_info,
        "runs": [_jsonable(r) for r in runs],
        "summary": [_jsonable(r) for r in _summarise(runs, task_names, method_names)],
        "seconds": elapsed,
        "files": {"json": None, "plots": {}},
    }
    if out is not None:
        out_dir = Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plots:
            results["files"]["plots"] = {k: str(v) for k, v in plot_results(results, out_dir).items()}
        path = out_dir / JSON_NAME
        results["files"]["json"] = str(path)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1, allow_nan=False)
            fh.write("\n")
    return results


def _environment(dev: torch.device, registry: Any) -> dict[str, Any]:
    from curvkit import __version__

    env = {
        "curvkit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "method_plugins": {n: registry.methods.plugin_of(n) for n in registry.methods.names()},
    }
    return env
