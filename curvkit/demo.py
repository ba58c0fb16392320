r"""The ``curvkit demo``: Kronecker factors of a small network on scikit-learn's digits.

The demo builds a small network (an MLP 64-32-32-10 or a small CNN, both with ReLU) at
its seeded initialisation, computes every layer's Kronecker factors ``(A, G)`` over the
whole data set with :func:`curvkit.accumulate_kronecker_factors`, and summarises them:
shapes, trace, extreme eigenvalues and condition number. As a live correctness check it
computes the same factors with curvlinops' ``KFACLinearOperator`` (with
``separate_weight_and_bias=False``, the convention curvkit follows) and with every other
registered statistics backend that can serve the request, and reports the relative
difference :math:`\lVert X - X_{\text{ref}}\rVert_F / \lVert X_{\text{ref}}\rVert_F` of
each factor against curvlinops'.

The data are the 1797 8x8 images of :func:`sklearn.datasets.load_digits`, standardised
per pixel; no network access is needed. Use it from the command line
(``curvkit demo --help``) or from Python::

    from curvkit.demo import DemoConfig, run_demo, format_summary
    summary = run_demo(DemoConfig(model="cnn", fisher="mc", subset=256))
    print(format_summary(summary))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from curvkit.config import FisherType, KFACApprox, as_enum
from curvkit.errors import UnsupportedRequestError
from curvkit.stats.api import accumulate_kronecker_factors, factor_request
from curvkit.stats.backend import KroneckerFactors

__all__ = [
    "MODELS",
    "DemoConfig",
    "build_model",
    "digits_data",
    "factor_summary",
    "format_summary",
    "relative_difference",
    "run_demo",
]

REFERENCE = "curvlinops"


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


#: Model name -> factory of a fresh, untrained network taking ``(N, 64)`` inputs.
MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": _mlp, "cnn": _cnn}


_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run.

    Attributes:
        model: ``"mlp"`` (64-32-32-10, ReLU) or ``"cnn"`` (two 3x3 convolutions, average
            pooling, a linear read-out).
        fisher: Fisher type, see :class:`curvkit.FisherType`.
        kfac_approx: ``"expand"`` or ``"reduce"`` (matters for the CNN only).
        mc_samples: Samples per datum for ``fisher="mc"``.
        backend: The statistics backend whose factors are summarised.
        seed: Seeds the network's initialisation and the MC targets.
        batch_size: Batch size of the data loader.
        subset: Use only the first ``subset`` images (``None``: all 1797).
        dtype: ``"float32"`` or ``"float64"`` (in float64 the backends agree with
            curvlinops to about 1e-15, in float32 to rounding, about 1e-7).
        compare: Also compute the factors with curvlinops and the other backends.
        progress: Show tqdm progress bars.
    """

    model: str = "mlp"
    fisher: str = "type-2"
    kfac_approx: str = "expand"
    mc_samples: int = 1
    backend: str = "hooks"
    seed: int = 0
    batch_size: int = 128
    subset: int | None = None
    dtype: str = "float32"
    compare: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.model not in MODELS:
            problems.append(f"model={self.model!r} (choose one of {', '.join(map(repr, MODELS))})")
        for attr, enum_cls in (("fisher", FisherType), ("kfac_approx", KFACApprox)):
            try:
                object.__setattr__(self, attr, as_enum(enum_cls, getattr(self, attr), attr).value)
            except ValueError as err:
                problems.append(str(err).rstrip("."))
        if self.mc_samples < 1 or (self.mc_samples != 1 and self.fisher != FisherType.MC.value):
            problems.append(f"mc_samples={self.mc_samples} (>= 1, and 1 unless fisher='mc')")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (must be >= 1)")
        if self.subset is not None and self.subset < 1:
            problems.append(f"subset={self.subset} (must be >= 1, or None for all data)")
        if self.dtype not in _DTYPES:
            problems.append(f"dtype={self.dtype!r} (choose one of {', '.join(map(repr, _DTYPES))})")
        if problems:
            raise ValueError("invalid demo settings: " + "; ".join(problems) + ".")


def digits_data(subset: int | None = None) -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(X, y)``: ``X`` ``(N, 64)`` float32 standardised per
    pixel (constant pixels stay 0), ``y`` ``(N,)`` class indices."""
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    if subset is not None:
        X, y = X[:subset], y[:subset]
    X = StandardScaler().fit_transform(X)
    return torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)


def build_model(name: str, seed: int) -> nn.Module:
    """A fresh network from :data:`MODELS`, initialised under ``torch.manual_seed(seed)``
    without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name]()


def relative_difference(x: Tensor, reference: Tensor) -> float:
    r""":math:`\lVert x - r\rVert_F / \lVert r\rVert_F` (in float64; 0 if both vanish)."""
    x, reference = x.double(), reference.double()
    denom = float(reference.norm())
    diff = float((x - reference).norm())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def factor_summary(factor: Tensor) -> dict[str, Any]:
    """Shape, trace, largest and smallest eigenvalue and condition number of a
    symmetric factor.

    The condition number is ``eig_max / eig_min``; it is infinite when ``eig_min`` is
    not above the numerical-rank threshold ``eig_max * d * eps`` (``eps`` of the
    factor's dtype), i.e. when the factor is singular to working precision (the ``G``
    of a softmax output layer always is: the loss Hessian annihilates the all-ones
    vector).
    """
    eigs = torch.linalg.eigvalsh(factor.double())
    eig_max, eig_min = eigs[-1].item(), eigs[0].item()
    threshold = abs(eig_max) * factor.shape[0] * torch.finfo(factor.dtype).eps
    cond = eig_max / eig_min if eig_min > threshold else math.inf
    return {
        "shape": list(factor.shape),
        "trace": factor.double().trace().item(),
        "eig_max": eig_max,
        "eig_min": eig_min,
        "cond": cond,
    }


def _curvlinops_factors(
    model: nn.Module, loss_fn: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], config: DemoConfig
) -> dict[str, KroneckerFactors]:
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    kfac = KFACLinearOperator(
        model,
        loss_fn,
        params,
        loader,
        check_deterministic=False,
        seed=config.seed,
        fisher_type=config.fisher,
        mc_samples=config.mc_samples,
        kfac_approx=config.kfac_approx,
        separate_weight_and_bias=False,
    )
    kfac.compute_kronecker_factors()
    state = kfac.state_dict()
    a_s, g_s = state["input_covariances"], state["gradient_covariances"]
    return {name: KroneckerFactors(a_s[name], g_s[name]) for name in g_s}


def _curvkit_factors(
    model: nn.Module,
    loss_fn: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    config: DemoConfig,
    backend: str,
    registry: Any,
) -> dict[str, KroneckerFactors]:
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed) if config.fisher == FisherType.MC.value else None
    return accumulate_kronecker_factors(
        model,
        loss_fn,
        tqdm(loader, desc=f"curvkit ({backend})", unit="batch", disable=not config.progress, leave=False),
        fisher=config.fisher,
        kfac_approx=config.kfac_approx,
        backend=backend,
        mc_samples=config.mc_samples,
        generator=generator,
        registry=registry,
    )


def _measure(
    compute: Callable[[nn.Module, Iterable[tuple[Tensor, Tensor]]], dict[str, KroneckerFactors]],
    model: nn.Module,
    loader: DataLoader[Any],
) -> tuple[dict[str, KroneckerFactors], float]:
    """Run ``compute`` on a private copy of ``model`` (so hooks or extensions one engine
    leaves behind cannot change what the next computes), after an untimed warm-up on the
    first batch (so one-off costs such as lazy set-up are not timed)."""
    net = copy.deepcopy(model)
    compute(net, [next(iter(loader))])
    start = time.perf_counter()
    out = compute(net, loader)
    return out, time.perf_counter() - start


def run_demo(config: DemoConfig | None = None, *, registry: Any = None) -> dict[str, Any]:
    """Run the demo and return its summary.

    Args:
        config: Settings; ``None`` uses the defaults of :class:`DemoConfig`.
        registry: Registry for backend and handler lookup; ``None`` uses
            :func:`curvkit.default_registry`.

    Returns:
        A JSON-ready dictionary: ``config``, ``data`` (number of data and batches),
        ``layers`` (per layer and factor: the :func:`factor_summary` entries plus
        ``rel_diff``, backend name -> relative difference to curvlinops' factor),
        ``backends`` (``compared``: the backend summarised and the other registered
        backends that claim the request; ``refused``: those that declined it after
        seeing a batch; ``errors``: those that failed) and ``timings`` in seconds (each
        engine after an untimed one-batch warm-up; ``total`` includes everything).

    Raises:
        UnknownComponentError, UnsupportedRequestError: ``config.backend`` is not
            registered or cannot serve the request.
    """
    from curvkit.plugins import default_registry

    config = config or DemoConfig()
    registry = registry if registry is not None else default_registry()
    registry.backends.get(config.backend)  # fail before any work if it is not registered
    start = time.perf_counter()
    dtype = _DTYPES[config.dtype]
    X, y = digits_data(config.subset)
    X = X.to(dtype)
    model = build_model(config.model, config.seed).to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(X, y), batch_size=config.batch_size, shuffle=False)

    def engine(backend: str) -> Callable[[nn.Module, Any], dict[str, KroneckerFactors]]:
        return lambda net, data: _curvkit_factors(net, loss_fn, data, config, backend, registry)

    factors, seconds = _measure(engine(config.backend), model, loader)
    timings = {f"curvkit ({config.backend})": seconds}
    others: list[str] = []
    refused: dict[str, str] = {}
    errors: dict[str, str] = {}
    results: dict[str, dict[str, KroneckerFactors]] = {config.backend: factors}
    reference: dict[str, KroneckerFactors] = {}
    if config.compare:
        reference, timings[REFERENCE] = _measure(
            lambda net, data: _curvlinops_factors(net, loss_fn, data, config), model, loader
        )
        # Which other backends can serve this request: asked once, on the first batch
        # (a backend's check may run the model, so it gets a copy too).
        inputs, targets = next(iter(loader))
        probe = copy.deepcopy(model)
        request = factor_request(
            probe,
            loss_fn,
            inputs,
            targets,
            fisher=config.fisher,
            kfac_approx=config.kfac_approx,
            mc_samples=config.mc_samples,
            generator=torch.Generator().manual_seed(config.seed) if config.fisher == FisherType.MC.value else None,
            registry=registry,
        )
        others = [name for name in registry.backends_supporting(request) if name != config.backend]
        for name in others:
            try:
                results[name], timings[f"curvkit ({name})"] = _measure(engine(name), model, loader)
            except UnsupportedRequestError as err:
                # A backend may refuse a request only once it has seen a batch.
                refused[name] = str(err)
            except Exception as err:  # noqa: BLE001 - a failing backend is reported, not fatal
                errors[name] = f"{type(err).__name__}: {err}"

    layers = []
    for name, module in model.named_modules():
        if name not in factors:
            continue
        entry: dict[str, Any] = {"name": name, "module": type(module).__name__}
        for index, key in enumerate(("A", "G")):
            summary = factor_summary(factors[name][index])
            if config.compare:
                summary["rel_diff"] = {
                    backend: relative_difference(result[name][index], reference[name][index])
                    for backend, result in results.items()
                    if name in result and name in reference
                }
            entry[key] = summary
        layers.append(entry)
    timings["total"] = time.perf_counter() - start
    return {
        "config": asdict(config),
        "data": {"dataset": "sklearn digits (standardised)", "num_data": len(X), "num_batches": len(loader)},
        "reference": REFERENCE if config.compare else None,
        "backends": {"compared": [config.backend, *others], "refused": refused, "errors": errors},
        "layers": layers,
        "timings": timings,
    }


def _number(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.3e}"


def format_summary(summary: dict[str, Any]) -> str:
    """The per-layer table of :func:`run_demo`'s summary, as printed by ``curvkit demo``."""
    cfg = summary["config"]
    backends = summary["backends"]
    compared = [b for b in backends["compared"] if b not in backends["errors"] and b not in backends["refused"]]
    compare = summary["reference"] is not None
    head = ["layer", "module", "factor", "shape", "trace", "eig max", "eig min", "cond"]
    if compare:
        head += [f"vs {REFERENCE} [{b}]" for b in compared]
    rows = []
    for layer in summary["layers"]:
        for key in ("A", "G"):
            f = layer[key]
            row = [
                layer["name"] if key == "A" else "",
                layer["module"] if key == "A" else "",
                key,
                "x".join(map(str, f["shape"])),
                _number(f["trace"]),
                _number(f["eig_max"]),
                _number(f["eig_min"]),
                _number(f["cond"]),
            ]
            if compare:
                row += [_number(f["rel_diff"][b]) if b in f["rel_diff"] else "-" for b in compared]
            rows.append(row)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = set(range(4, len(head)))

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    data = summary["data"]
    lines = [
        f"curvkit demo: {cfg['model']} on {data['dataset']}, {data['num_data']} images in "
        f"{data['num_batches']} batches of {cfg['batch_size']}; fisher={cfg['fisher']!r}, "
        f"kfac_approx={cfg['kfac_approx']!r}, {cfg['dtype']}"
        + (f", mc_samples={cfg['mc_samples']}" if cfg["fisher"] == FisherType.MC.value else "")
        + f", seed={cfg['seed']}, backend={cfg['backend']!r}",
        "",
        fmt(head),
        fmt(["-" * w for w in widths]),
        *map(fmt, rows),
        "",
    ]
    if compare:
        lines.append(
            f"vs {REFERENCE} [b]: relative Frobenius difference of backend b's factor to that of "
            "curvlinops' KFACLinearOperator(separate_weight_and_bias=False) on the same data."
        )
        if cfg["fisher"] == FisherType.MC.value and len(compared) > 1:
            lines.append(
                "  fisher='mc': only backends that draw targets like curvlinops from the same seed "
                "agree to rounding; the others differ by Monte-Carlo noise."
            )
        for name, message in backends["refused"].items():
            lines.append(f"backend {name!r} refused the request: {message}")
        for name, message in backends["errors"].items():
            lines.append(f"backend {name!r} FAILED: {message}")
    lines.append("cond = eig max / eig min; inf where the factor is singular to working precision.")
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in summary["timings"].items() if k != "total")
    lines.append(f"time (after a one-batch warm-up): {timing}; total {summary['timings']['total']:.2f} s")
    return "\n".join(lines)
