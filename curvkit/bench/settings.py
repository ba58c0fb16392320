"""``curvkit bench``'s settings: the baselines, dtypes and the hyperparameters of each run."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from curvkit.methods import OPTIMIZER_OPTIONS as _OPTIMIZER_OPTIONS

#: First-order baselines that run beside the registered methods (reserved names).
BASELINES = ("sgd", "adamw")
#: Legal ``dtype`` values.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
#: Options of :class:`~curvkit.optim.CurvatureOptimizer` itself (the rest go to the method's
#: configuration).
OPTIMIZER_OPTIONS = _OPTIMIZER_OPTIONS
#: Default output directory of ``curvkit bench``.
DEFAULT_OUT = "curvkit-bench"
#: Name of the JSON file inside the output directory.
JSON_NAME = "results.json"


def _exact(value: float) -> Any:
    from curvkit.linalg.damping import ExactDamping

    return ExactDamping(value=value)


#: The baselines' hyperparameters: SGD lr 0.1 and AdamW lr 1e-2 were the better of {0.03, 0.1}
#: and {3e-3, 1e-2} on all three tasks. The registered methods' settings are their
#: recommended settings (:attr:`curvkit.methods.MethodSpec.recommended`, with per-task
#: overrides under ``"tasks"``), the defaults of their optimizers.
HYPERPARAMETERS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adamw": {"lr": 1e-2, "weight_decay": 1e-2},
}

#: Hyperparameters of a method whose spec recommends nothing (method options its
#: configuration lacks are dropped).
GENERIC_HYPERPARAMETERS: dict[str, Any] = {"lr": 0.03, "momentum": 0.9, "damping": 0.1}


def hyperparameters_for(
    method: str, task: str, spec: Any = None, overrides: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The hyperparameters ``method`` gets on ``task``: a baseline's :data:`HYPERPARAMETERS`
    entry, or the method's recommended settings with the task's overrides
    (:meth:`~curvkit.methods.MethodSpec.recommended_settings`; a spec without any gets
    :data:`GENERIC_HYPERPARAMETERS` minus the options its configuration lacks), with
    ``overrides[method]`` merged on top."""
    extra = copy.deepcopy((overrides or {}).get(method, {}))
    if spec is None and method not in HYPERPARAMETERS:
        from curvkit.plugins import default_registry

        registry = default_registry()
        if method in registry.methods.names():
            spec = registry.methods.get(method)
    if method in HYPERPARAMETERS:
        entry = copy.deepcopy(HYPERPARAMETERS[method])
    elif spec is not None and getattr(spec, "recommended", None):
        entry = spec.recommended_settings(task)
    else:
        entry = copy.deepcopy(GENERIC_HYPERPARAMETERS)
        if spec is not None:
            fields = _config_fields(spec)
            entry = {k: v for k, v in entry.items() if k in OPTIMIZER_OPTIONS or k in fields}
    entry.update(extra)
    return entry


def _config_fields(spec: Any) -> set[str]:
    config_cls = getattr(spec, "config_cls", None)
    if config_cls is None or not dataclasses.is_dataclass(config_cls):
        return set()
    return {f.name for f in dataclasses.fields(config_cls) if f.init}
