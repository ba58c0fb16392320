r"""``curvkit bench``: every registered method beside SGD and AdamW on small bundled tasks.

Each *run* trains one model (one task, one method, one seed) for a fixed number of steps
with the ordinary loop ``zero_grad(); curvature_backward(output, y); loss.backward();
step()`` (``curvature_backward`` does nothing for the empirical Fisher, the default) and
records:

* the mini-batch loss of every step, and at evaluation points (every ``eval_every`` steps,
  and at step 0 and the last step) the mean loss on the **whole training set**, the test
  accuracy, and the training time so far (seconds of forward/backward/step only: the
  evaluations are not counted);
* the final training loss and test accuracy, the median milliseconds per step, the bytes of
  optimizer state (curvature blocks plus momentum or Adam buffers), and the steps and
  seconds to reach the task's target test accuracy (``None`` if never reached; checked at
  the evaluation points).

A method that raises while it is built or while it trains (a configuration it refuses, a
dtype it does not support, a numerical error) is recorded as ``"failed"`` with its error
message and the benchmark goes on; a run whose loss becomes non-finite stops and is
recorded as ``"diverged"``.

Tasks (:data:`TASKS`):

``digits-mlp``
    scikit-learn's 8×8 digits as 64-vectors (pixels/16; stratified 75/25 split,
    ``random_state=0``: 1347 training, 450 test images), MLP 64-128-10 with ReLU.
``digits-cnn``
    The same images as 1×8×8, Conv2d(1→16, k3, p1), ReLU, Conv2d(16→32, k3, p1), ReLU,
    AvgPool2d(2), Flatten, Linear(512→10).
``sequence``
    Synthetic per-token classification: 2048 training and 512 test sequences of 8 tokens
    with 16 Gaussian features; the labels (4 classes per token) are the argmax of a fixed
    random *teacher* network of the student's own shape, Linear(16→32), GELU, causal mean
    over the tokens so far, Linear(32→32), GELU, Linear(32→4), so the task is learnable
    exactly. Every Linear sees 3-D inputs ``(N, T, C)``; the loss is the cross-entropy mean
    over all ``N·T`` tokens (methods get ``loss_average="batch+sequence"``).

Hyperparameters: :data:`HYPERPARAMETERS` holds one entry per bundled method (the settings
the method tests train digits with; per-task overrides under ``"tasks"``); a method with no
entry, e.g. one from a third-party plugin, gets :data:`GENERIC_HYPERPARAMETERS`, from which
the options its configuration does not have are dropped. The methods run through their
named optimizer class when there is one (e.g. ``curvkit_kldwrm.QEKLDWRM``, whose inner
loop the generic :class:`~curvkit.optim.CurvatureOptimizer` lacks), otherwise through
:class:`~curvkit.optim.CurvatureOptimizer` with ``method=name``.

Use it from the command line (``curvkit bench --help``) or from Python::

    from curvkit.bench import run_bench, format_table
    results = run_bench(methods=["kfac", "singd"], tasks=["digits-mlp"], quick=True, out="bench-out")
    print(format_table(results))
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError

__all__ = [
    "BASELINES",
    "DTYPES",
    "GENERIC_HYPERPARAMETERS",
    "HYPERPARAMETERS",
    "TASKS",
    "Task",
    "format_table",
    "hyperparameters_for",
    "plot_results",
    "run_bench",
]

#: First-order baselines that run beside the registered methods (reserved names).
BASELINES = ("sgd", "adamw")
#: Legal ``dtype`` values.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
#: Options of :class:`~curvkit.optim.CurvatureOptimizer` itself (the rest go to the method's
#: configuration).
OPTIMIZER_OPTIONS = frozenset({"lr", "momentum", "weight_decay", "weight_decay_mode", "kl_clip", "rms_clip"})
#: Default output directory of ``curvkit bench``.
DEFAULT_OUT = "curvkit-bench"
#: Name of the JSON file inside the output directory.
JSON_NAME = "results.json"
_PLOT_DPI = 100


def _exact(value: float) -> Any:
    from curvkit.linalg.damping import ExactDamping

    return ExactDamping(value=value)


_KLDWRM = {
    "lr": 0.05,
    "momentum": 0.9,
    "damping": ("exact", 0.1),
    "ema_decay": 0.95,
    "T_stats": 1,
    "T_inv": 10,
    "kl_clip": None,
    "weight_decay": 0.0,
    "wake_decay": 0.5,
    "tasks": {"digits-cnn": {"lr": 0.02}},
}
_LOWRANK = {"lr": 0.03, "momentum": 0.9, "damping": 0.1, "rank": 20, "T_stats": 1, "T_inv": 10, "rms_clip": 0.07}
_SINGD = {"lr": 0.03, "momentum": 0.9, "damping": 0.1, "lr_cov": 0.05, "T": 1}

#: Per-method default hyperparameters: optimizer options (:data:`OPTIMIZER_OPTIONS`) and
#: method options together; ``"tasks"`` maps a task name to overrides. A damping written
#: ``("exact", λ)`` becomes :class:`~curvkit.linalg.damping.ExactDamping`; a bare float is
#: the method's default damping strategy with that value. Sources: tests/methods (digits
#: MLP to ≥ 95 % in 10 epochs; the CNN settings of test_kldwrm.py and
#: test_lowrank_skfac_conv.py). SINGD, IKFAC and INGD: a sweep on these three tasks (lr
#: {0.01, 0.02, 0.03, 0.05} × λ {1e-3, 1e-2, 0.1} × lr_cov {1e-3, 1e-2, 0.05}, default steps,
#: seed 0): λ 1e-3 (test_singd_bf16.py's) left SINGD's digits loss at 0.4 and diverged
#: with lr_cov 0.05; λ 0.1, lr_cov 0.05, lr 0.03 reached 96.7-97.8 % on digits and 0.89 on
#: the sequence task. SGD lr 0.1 and AdamW lr 1e-2 were the better of {0.03, 0.1} and
#: {3e-3, 1e-2} on all three tasks.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-2},
    "kfac": {"lr": 0.03, "momentum": 0.9, "damping": 0.1},
    "ekfac": {"lr": 0.03, "momentum": 0.9, "damping": 0.3},
    "tkfac": {"lr": 0.03, "momentum": 0.9, "damping": 0.1},
    "tekfac": {"lr": 0.03, "momentum": 0.9, "damping": 0.3},
    "so-kldwrm": _KLDWRM,
    "q-kldwrm": _KLDWRM,
    "qe-kldwrm": _KLDWRM,
    "rs-kfac": _LOWRANK,
    "sre-kfac": _LOWRANK,
    "b-kfac": _LOWRANK,
    "b-r-kfac": {**_LOWRANK, "B_R_period": 5},
    "b-kfac-c": {**_LOWRANK, "B_R_period": 5, "correction_period": 5},
    "skfac": {
        "lr": 0.03,
        "momentum": 0.9,
        "damping": 0.03,
        "tasks": {"digits-cnn": {"lr": 0.1, "damping": 0.3, "conv_strategy": "reduce_sum"}},
    },
    "singd": _SINGD,
    "ikfac": _SINGD,
    "ingd": _SINGD,
}

#: Hyperparameters of a method without an entry in :data:`HYPERPARAMETERS` (method options
#: its configuration lacks are dropped).
GENERIC_HYPERPARAMETERS: dict[str, Any] = {"lr": 0.03, "momentum": 0.9, "damping": 0.1}


# --- tasks ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The demo's split of digits (75/25, stratified, ``random_state=0``), loaded once."""
    from curvkit.demo import digits_split

    return digits_split()


def _digits_images() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    X_tr, y_tr, X_te, y_te = _digits()
    return X_tr.reshape(-1, 1, 8, 8), y_tr, X_te.reshape(-1, 1, 8, 8), y_te


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


class CausalMean(nn.Module):
    """Token mixing without parameters: position ``t`` becomes the mean of positions
    ``0..t`` of a ``(N, T, C)`` input."""

    def forward(self, x: Tensor) -> Tensor:
        counts = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).reshape(1, -1, 1)
        return x.cumsum(1) / counts


_SEQ_TOKENS, _SEQ_FEATURES, _SEQ_CLASSES = 8, 16, 4


def _sequence_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(_SEQ_FEATURES, 32),
        nn.GELU(),
        CausalMean(),
        nn.Linear(32, 32),
        nn.GELU(),
        nn.Linear(32, _SEQ_CLASSES),
    )


@functools.lru_cache(maxsize=1)
def _sequences() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """2048 + 512 sequences ``(8, 16)`` labelled per token by a fixed random teacher (data
    seed 0, independent of the benchmark's seeds)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2560, _SEQ_TOKENS, _SEQ_FEATURES, generator=gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        teacher = _sequence_model()
    with torch.no_grad():
        z = teacher(X)
        z = (z - z.mean((0, 1))) / z.std((0, 1))  # balance the classes
        y = z.argmax(-1)
    return X[:2048], y[:2048], X[2048:], y[2048:]


@dataclass(frozen=True)
class Task:
    """A bundled benchmark task.

    Attributes:
        name: Name used by ``--tasks``.
        description: One line for the table and the docs.
        model: Builds a fresh model (called under the run's seed).
        data: ``() -> (X_train, y_train, X_test, y_test)`` in float32 / int64 on the CPU.
        steps: Steps per run by default.
        quick_steps: Steps per run with ``quick=True``.
        target_accuracy: Test accuracy whose time and steps are reported.
        batch_size: Mini-batch size.
        evals: Evaluation points per run (besides step 0).
        method_options: Options every curvature method gets on this task (where its
            configuration has them), e.g. ``loss_average``.
        per_token: The model returns ``(N, T, classes)`` logits and ``y`` is ``(N, T)``.
    """

    name: str
    description: str
    model: Callable[[], nn.Module]
    data: Callable[[], tuple[Tensor, Tensor, Tensor, Tensor]]
    steps: int
    quick_steps: int
    target_accuracy: float
    batch_size: int = 64
    evals: int = 20
    method_options: dict[str, Any] = field(default_factory=dict)
    per_token: bool = False

    def logits(self, output: Tensor) -> Tensor:
        """The model output in the layout ``CrossEntropyLoss`` expects (classes on dim 1)."""
        return output.transpose(1, 2) if self.per_token else output


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "digits-mlp",
            "sklearn digits, MLP 64-128-10 (ReLU)",
            _mlp,
            _digits,
            steps=210,
            quick_steps=60,
            target_accuracy=0.9,
        ),
        Task(
            "digits-cnn",
            "sklearn digits 1x8x8, Conv16-Conv32-AvgPool-Linear",
            _cnn,
            _digits_images,
            steps=105,
            quick_steps=50,
            target_accuracy=0.9,
        ),
        Task(
            "sequence",
            "synthetic teacher, 8 tokens x 16 features, per-token 4 classes, Linear on (N, T, C)",
            _sequence_model,
            _sequences,
            steps=320,
            quick_steps=128,
            target_accuracy=0.8,
            method_options={"loss_average": "batch+sequence"},
            per_token=True,
        ),
    )
}


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


def hyperparameters_for(
    method: str, task: str, spec: Any = None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The hyperparameters ``method`` gets on ``task``: its :data:`HYPERPARAMETERS` entry
    (or :data:`GENERIC_HYPERPARAMETERS`) with the task's overrides and ``overrides[method]``
    on top; for a method without an entry, options its configuration (``spec.config_cls``)
    lacks are dropped."""
    table = {**HYPERPARAMETERS, **(overrides or {})}
    generic = method not in table
    entry = copy.deepcopy(table.get(method, GENERIC_HYPERPARAMETERS))
    per_task = entry.pop("tasks", {})
    entry.update(per_task.get(task, {}))
    if generic and spec is not None:
        fields = _config_fields(spec)
        entry = {k: v for k, v in entry.items() if k in OPTIMIZER_OPTIONS or k in fields}
    return entry


def _config_fields(spec: Any) -> set[str]:
    config_cls = getattr(spec, "config_cls", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        return set()
    return {f.name for f in dataclasses.fields(config_cls) if f.init}


# --- optimizers -------------------------------------------------------------------------------


def _top_package(module: str) -> str:
    return module.split(".", 1)[0]


def _optimizer_class(name: str, spec: Any) -> type:
    """The most derived loaded :class:`CurvatureOptimizer` subclass whose ``method`` is
    ``name`` and that lives in curvkit or in the package that defined the method's
    configuration; :class:`CurvatureOptimizer` itself if there is none."""
    from curvkit.optim import CurvatureOptimizer

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
    cls = _optimizer_class(name, spec)
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
            gen = torch.Generator().manual_seed(seed)
            perm, pos = torch.randperm(n, generator=gen), 0
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
                    perm, pos = torch.randperm(n, generator=gen), 0
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
        hyperparameters: Per-method entries that replace those of :data:`HYPERPARAMETERS`.
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
