"""Conformance checks every registered method must pass (curvkit runs them over all of them).

* :func:`check_sample_configs_train`: each of the spec's ``sample_configs`` trains a small
  MLP and a small CNN on a synthetic task to clearly lower loss, with finite parameters;
* :func:`check_bad_configs`: each of the spec's ``bad_configs`` raises its documented
  exception when the optimizer is built, with a message that names the bad option;
* :func:`check_state_dict_roundtrip`: a run resumed from ``state_dict`` continues bit for
  bit like the uninterrupted run;
* :func:`check_nonfinite_gradient_skips`: a NaN gradient leaves parameters and state
  untouched;
* :func:`check_unitwise_layers`: on an MLP with ``LayerNorm`` and a CNN with
  ``BatchNorm2d`` the normalisation layers are preconditioned by unit-wise blocks (not
  first-order), the sample config trains, and ``state_dict`` round-trips their state;
* :func:`~curvkit.testing.operators.check_block_operators`: every block's
  ``as_operator()`` satisfies the curvature-operator protocol, each operation checked
  against a dense float64 reference;
* :func:`~curvkit.testing.steps.check_statistics_period` (statistics every 2 steps) and
  :func:`~curvkit.testing.steps.check_weight_decay_modes` (every ``weight_decay_mode``).

:func:`~curvkit.testing.check_plugin` adds the two-process data-parallel check
(:func:`~curvkit.testing.distributed.check_data_parallel`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvkit.methods import MethodSpec

__all__ = [
    "check_bad_configs",
    "check_method",
    "check_nonfinite_gradient_skips",
    "check_sample_configs_train",
    "check_state_dict_roundtrip",
    "check_unitwise_layers",
]


def _spec(method: str | MethodSpec, registry: Any) -> MethodSpec:
    if isinstance(method, MethodSpec):
        return method
    if registry is None:
        from curvkit.plugins import default_registry

        registry = default_registry()
    return registry.methods.get(method)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 4)
    )


def _norm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 4))


def _norm_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 4),
    )


def _task(kind: str, generator: torch.Generator, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable synthetic classification task (labels from a random teacher)."""
    if kind == "mlp":
        X = torch.randn(n, 6, generator=generator)
        W = torch.randn(6, 4, generator=generator)
        return X, (X @ W).argmax(1)
    X = torch.randn(n, 1, 6, 6, generator=generator)
    W = torch.randn(36, 4, generator=generator)
    return X, (X.flatten(1) @ W).argmax(1)


def _make(spec: MethodSpec, model: nn.Module, options: dict[str, Any], registry: Any, lr: float = 0.05) -> Any:
    """The raw method with ``options`` (``recommended=False``: a sample configuration is
    complete by itself; :func:`curvkit.testing.check_robustness` checks the defaults)."""
    from curvkit.optim.optimizer import CurvatureOptimizer

    return CurvatureOptimizer(
        model, method=spec, lr=lr, loss_fn=nn.CrossEntropyLoss(), registry=registry, recommended=False, **options
    )


def _train(opt: Any, model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int, batch: int = 32) -> list[float]:
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    for step in range(steps):
        start = (step * batch) % X.shape[0]
        xb, yb = X[start : start + batch], y[start : start + batch]
        opt.zero_grad()
        out = model(xb)
        loss = loss_fn(out, yb)
        opt.curvature_backward(out, yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _full_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(X), y))


def check_sample_configs_train(
    method: str | MethodSpec, *, registry: Any = None, steps: int = 40, lr: float = 0.05
) -> None:
    """Every sample config lowers the full-batch loss to at most 70% of its start on an MLP
    and a CNN, and leaves finite parameters."""
    spec = _spec(method, registry)
    for options in spec.sample_configs:
        for kind, build in (("mlp", _mlp), ("cnn", _cnn)):
            torch.manual_seed(0)
            gen = torch.Generator().manual_seed(1)
            model = build()
            X, y = _task(kind, gen)
            before = _full_loss(model, X, y)
            opt = _make(spec, model, dict(options), registry, lr)
            _train(opt, model, X, y, steps)
            after = _full_loss(model, X, y)
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            if not finite or not after <= 0.7 * before:
                raise AssertionError(
                    f"method {spec.name!r} with {options!r} on the {kind.upper()}: full-batch loss {before:.4f} -> "
                    f"{after:.4f} after {steps} steps at lr={lr} (expected <= 70% of the start; finite parameters: "
                    f"{finite})."
                )


def check_bad_configs(method: str | MethodSpec, *, registry: Any = None) -> None:
    """Every ``bad_configs`` entry raises its declared exception naming the bad option."""
    spec = _spec(method, registry)
    for options, error in spec.bad_configs:
        try:
            _make(spec, _mlp(), dict(options), registry)
        except error as err:
            message = str(err)
            named = [k for k in options if k in message]
            if not named:
                raise AssertionError(
                    f"method {spec.name!r}: {options!r} raised {type(err).__name__} but the message names none of "
                    f"the options: {message!r}"
                ) from err
            continue
        except Exception as err:  # noqa: BLE001 - report the wrong type
            raise AssertionError(
                f"method {spec.name!r}: {options!r} raised {type(err).__name__} ({err}), expected {error.__name__}."
            ) from err
        raise AssertionError(
            f"method {spec.name!r}: bad config {options!r} was accepted when the optimizer was built; expected "
            f"{error.__name__} naming {', '.join(map(repr, options))}. Validate it in the config's problems()."
        )


def _snapshot(model: nn.Module, opt: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def check_state_dict_roundtrip(
    method: str | MethodSpec, *, registry: Any = None, options: dict[str, Any] | None = None
) -> None:
    """Train 5 steps, checkpoint, train 7 more; a fresh model and optimizer loaded from the
    checkpoint must reach bit-identical parameters after the same 7 steps."""
    spec = _spec(method, registry)
    options = dict(spec.sample_configs[0] if options is None else options)
    if "T_inv" in spec.config_cls.__dataclass_fields__:
        options.setdefault("T_inv", 3)  # stale inverses between refreshes must survive the round trip
    gen = torch.Generator().manual_seed(3)
    X, y = _task("mlp", gen, n=96)

    def fresh() -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        model = _mlp()
        return model, _make(spec, model, dict(options), registry)

    model, opt = fresh()
    _train(opt, model, X, y, 5)
    saved_model, saved_opt = _snapshot(model, opt)
    torch.manual_seed(42)
    _train(opt, model, X[32:], y[32:], 7)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2 = fresh()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    torch.manual_seed(42)
    _train(opt2, model2, X[32:], y[32:], 7)
    for i, (a, b) in enumerate(zip(expected, model2.parameters())):
        if not torch.equal(a, b.detach()):
            raise AssertionError(
                f"method {spec.name!r}: parameter {i} after resuming from state_dict differs from the uninterrupted "
                f"run (max abs difference {float((a - b.detach()).abs().max()):.3g}); some state is missing from "
                "state_dict."
            )


def check_nonfinite_gradient_skips(method: str | MethodSpec, *, registry: Any = None) -> None:
    """A NaN in one gradient skips the step: parameters and optimizer state unchanged."""
    spec = _spec(method, registry)
    gen = torch.Generator().manual_seed(4)
    X, y = _task("mlp", gen, n=64)
    torch.manual_seed(0)
    model = _mlp()
    opt = _make(spec, model, dict(spec.sample_configs[0]), registry)
    _train(opt, model, X, y, 3)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    out = model(X[:32])
    loss = nn.functional.cross_entropy(out, y[:32])
    opt.curvature_backward(out, y[:32])
    loss.backward()
    first = next(model.parameters())
    assert first.grad is not None
    first.grad.view(-1)[0] = float("nan")
    opt.step()
    for i, (a, b) in enumerate(zip(params, model.parameters())):
        if not torch.equal(a, b.detach()):
            raise AssertionError(
                f"method {spec.name!r}: a NaN gradient changed parameter {i}; the step must be skipped."
            )
    _assert_same_state(spec.name, state, opt.state_dict())


#: ``state_dict`` entries that count events (skips, warnings): a skipped step may change them.
BOOKKEEPING_KEYS = frozenset({"counters", "curvkit_monitor"})


def _assert_same_state(name: str, a: Any, b: Any, path: str = "state") -> None:
    if isinstance(a, dict):
        if set(a) != set(b):
            raise AssertionError(f"method {name!r}: {path} keys changed after a skipped step.")
        for k in a:
            if k in BOOKKEEPING_KEYS:
                continue
            _assert_same_state(name, a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(name, x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        if not torch.equal(a, b):
            raise AssertionError(f"method {name!r}: {path} changed after a skipped step.")
    elif a != b and not (isinstance(a, float) and a != a and b != b):
        raise AssertionError(f"method {name!r}: {path} changed after a skipped step ({a!r} -> {b!r}).")


def check_unitwise_layers(method: str | MethodSpec, *, registry: Any = None, steps: int = 30, lr: float = 0.05) -> None:
    """Normalisation layers get unit-wise blocks under every method.

    With the spec's first sample config, an MLP with ``LayerNorm`` and a CNN with
    ``BatchNorm2d`` (training mode): the normalisation layer's block is unit-wise and has
    statistics, ``summary()`` lists it as preconditioned, its parameters move, the full-batch
    loss falls to at most 70% of its start; and a run resumed from ``state_dict`` continues
    bit for bit on the ``LayerNorm`` MLP.
    """
    spec = _spec(method, registry)
    options = dict(spec.sample_configs[0])
    for kind, build, norm in (("mlp", _norm_mlp, "1"), ("cnn", _norm_cnn, "1")):
        torch.manual_seed(0)
        gen = torch.Generator().manual_seed(1)
        model = build()
        X, y = _task(kind, gen)
        before = _full_loss(model, X, y)
        layer = model.get_submodule(norm)
        start = [p.detach().clone() for p in layer.parameters()]
        opt = _make(spec, model, dict(options), registry, lr)
        block = opt.preconditioner.blocks.get(norm)
        if block is None or not getattr(block.info, "unitwise", False):
            raise AssertionError(
                f"method {spec.name!r}: the {type(layer).__name__} layer {norm!r} has no unit-wise block "
                f"(blocks: {sorted(opt.preconditioner.blocks)}; first-order: {opt.preconditioner.first_order_layers})."
            )
        _train(opt, model, X, y, steps)
        after = _full_loss(model, X, y)
        line = next((ln for ln in opt.summary().splitlines() if ln.strip().startswith(f"{norm}:")), "")
        moved = all(not torch.equal(a, b.detach()) for a, b in zip(start, layer.parameters()))
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        problems = []
        if block.num_updates == 0:
            problems.append("its block never got statistics")
        if "first-order" in line or "no statistics" in line or not line:
            problems.append(f"summary() says {line.strip()!r}")
        if not moved:
            problems.append("its parameters did not move")
        if not finite or not after <= 0.7 * before:
            problems.append(f"full-batch loss {before:.4f} -> {after:.4f} (finite parameters: {finite})")
        if problems:
            raise AssertionError(
                f"method {spec.name!r} with {options!r} on the {kind.upper()} with a normalisation layer: "
                + "; ".join(problems)
                + "."
            )

    gen = torch.Generator().manual_seed(3)
    X, y = _task("mlp", gen, n=96)
    if "T_inv" in spec.config_cls.__dataclass_fields__:
        options.setdefault("T_inv", 3)

    def fresh() -> tuple[nn.Module, Any]:
        torch.manual_seed(0)
        model = _norm_mlp()
        return model, _make(spec, model, dict(options), registry)

    model, opt = fresh()
    _train(opt, model, X, y, 5)
    saved_model, saved_opt = _snapshot(model, opt)
    torch.manual_seed(42)
    _train(opt, model, X[32:], y[32:], 7)
    expected = [p.detach().clone() for p in model.parameters()]
    model2, opt2 = fresh()
    model2.load_state_dict(saved_model)
    opt2.load_state_dict(saved_opt)
    torch.manual_seed(42)
    _train(opt2, model2, X[32:], y[32:], 7)
    for (name, _), a, b in zip(model.named_parameters(), expected, model2.parameters()):
        if not torch.equal(a, b.detach()):
            raise AssertionError(
                f"method {spec.name!r}: parameter {name!r} of the LayerNorm MLP after resuming from state_dict differs "
                "from the uninterrupted run; some unit-wise state is missing from state_dict."
            )


CHECKS: tuple[Callable[..., None], ...] = (
    check_sample_configs_train,
    check_bad_configs,
    check_state_dict_roundtrip,
    check_nonfinite_gradient_skips,
    check_unitwise_layers,
)


def check_method(method: str | MethodSpec, *, registry: Any = None) -> None:
    """Run every single-process method check (:data:`CHECKS`, the operator check, the
    statistics period and the weight-decay modes)."""
    from curvkit.testing.operators import check_block_operators
    from curvkit.testing.steps import check_statistics_period, check_weight_decay_modes

    checks: tuple[Callable[..., None], ...] = (
        *CHECKS,
        check_block_operators,
        check_statistics_period,
        check_weight_decay_modes,
    )
    for check in checks:
        check(method, registry=registry)
