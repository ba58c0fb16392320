r"""The ``curvkit demo``: K-FAC and AdamW side by side on scikit-learn's digits.

The demo trains the same small network (an MLP 64-128-10 with ReLU, from the same seeded
initialisation, on the same mini-batches in the same order) twice: once with
:class:`curvkit.optim.KFAC` and once with :class:`torch.optim.AdamW`. After every epoch it
records the loss on the whole training set and the accuracy on the held-out test set; at
the end it prints both histories as a table with the wall-clock training time of each
optimizer, and draws them (loss and accuracy against epochs) into a PNG.

As a live correctness check it also compares the Kronecker factors K-FAC built on its
first mini-batch with those of curvlinops' ``KFACLinearOperator`` (with
``separate_weight_and_bias=False``, the convention curvkit follows) on that batch, and
reports the largest relative Frobenius difference (float32 rounding, about 1e-7).

The data are the 1797 8x8 images of :func:`sklearn.datasets.load_digits`, pixel values
divided by 16, split 75/25 stratified with ``random_state=0``; no network access is needed.
With the defaults (10 epochs) the whole demo takes a few seconds on one CPU thread. Use it
from the command line (``curvkit demo --help``) or from Python::

    from curvkit.demo import DemoConfig, run_demo, format_summary
    summary = run_demo(DemoConfig(epochs=5, out="digits.png"))
    print(format_summary(summary))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, as_enum

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_OUT",
    "QUICK_EPOCHS",
    "DemoConfig",
    "History",
    "build_model",
    "check_factors",
    "digits_split",
    "format_summary",
    "plot_histories",
    "relative_difference",
    "run_demo",
]

#: Epochs per optimizer by default.
DEFAULT_EPOCHS = 10
#: Where ``curvkit demo`` writes its plot unless told otherwise (relative to the cwd).
DEFAULT_OUT = "curvkit-demo.png"
#: Epochs of ``--quick``: K-FAC's test accuracy after 3 epochs was 0.942-0.973 over
#: seeds 0-19 (after 1 epoch it can still be below 0.9).
QUICK_EPOCHS = 3
#: Largest relative difference to curvlinops' factors the factor check accepts (float32).
CHECK_TOLERANCE = 1e-4
#: Size of the plot in pixels, ``(width, height)``.
PLOT_SIZE = (1100, 420)
_PLOT_DPI = 100

KFAC_NAME = "K-FAC"
ADAMW_NAME = "AdamW"


@dataclass(frozen=True)
class DemoConfig:
    """Settings of one demo run.

    Attributes:
        epochs: Passes over the training set, per optimizer.
        seed: Seeds the initialisation (shared by both runs), the order of the
            mini-batches (the same for both) and K-FAC's MC targets.
        batch_size: Mini-batch size.
        hidden: Width of the MLP's hidden layer.
        kfac_lr: :class:`curvkit.optim.KFAC`'s learning rate (its options not set here
            stay at their defaults: EMA decay 0.95, inverses every 10 steps).
        momentum: K-FAC's heavy-ball momentum.
        damping: K-FAC's damping λ (π-corrected Tikhonov).
        fisher: K-FAC's Fisher type: ``"empirical"`` (default), ``"type-2"`` or ``"mc"``
            (the latter two make one extra call per step, ``curvature_backward``).
        adamw_lr: :class:`torch.optim.AdamW`'s learning rate (other options at their
            defaults).
        check: Compare K-FAC's first factors with curvlinops' (skipped for ``"mc"``,
            whose samples differ).
        progress: Show tqdm progress bars (on stderr).
        out: Path of the PNG plot; ``None`` draws none.
    """

    epochs: int = DEFAULT_EPOCHS
    seed: int = 0
    batch_size: int = 64
    hidden: int = 128
    kfac_lr: float = 0.03
    momentum: float = 0.9
    damping: float = 0.1
    fisher: str = "empirical"
    adamw_lr: float = 3e-3
    check: bool = True
    progress: bool = True
    out: str | None = DEFAULT_OUT

    def __post_init__(self) -> None:
        problems = []
        for attr in ("epochs", "batch_size", "hidden"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{attr}={value!r} (must be an integer >= 1)")
        for attr in ("kfac_lr", "damping", "adamw_lr"):
            value = getattr(self, attr)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                problems.append(f"{attr}={value!r} (must be a finite number > 0)")
        if not (isinstance(self.momentum, int | float) and 0 <= self.momentum < 1):
            problems.append(f"momentum={self.momentum!r} (must be in [0, 1))")
        try:
            object.__setattr__(self, "fisher", as_enum(FisherType, self.fisher, "fisher").value)
        except ValueError as err:
            problems.append(str(err).rstrip("."))
        if problems:
            raise ValueError("invalid demo settings: " + "; ".join(problems) + ".")


@dataclass
class History:
    """What one optimizer's run recorded.

    Attributes:
        name: ``"K-FAC"`` or ``"AdamW"``.
        train_loss: Mean cross-entropy on the whole training set after each epoch
            (index 0: at initialisation).
        test_accuracy: Test-set accuracy after each epoch (index 0: at initialisation).
        seconds: Wall-clock time of the training steps (forward, backward, optimizer
            step; the evaluations after each epoch are not counted).
    """

    name: str
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0


def digits_split() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits as ``(X_train, y_train, X_test, y_test)``: float32 inputs
    ``(N, 64)`` with pixel values divided by 16 (so in ``[0, 1]``), class indices, split
    75/25 stratified by class with ``random_state=0`` (1347 / 450 images)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25, stratify=y, random_state=0)
    return (
        torch.as_tensor(X_train, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.long),
        torch.as_tensor(X_test, dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.long),
    )


def build_model(seed: int, hidden: int = 128) -> nn.Module:
    """A fresh MLP ``64-hidden-10`` (ReLU), initialised under ``torch.manual_seed(seed)``
    without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def relative_difference(x: Tensor, reference: Tensor) -> float:
    r""":math:`\lVert x - r\rVert_F / \lVert r\rVert_F` (in float64; 0 if both vanish)."""
    x, reference = x.double(), reference.double()
    denom = float(reference.norm())
    diff = float((x - reference).norm())
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def _batches(n: int, batch_size: int, seed: int, epochs: int) -> list[list[Tensor]]:
    """The index batches of every epoch: one permutation per epoch from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [list(torch.randperm(n, generator=gen).split(batch_size)) for _ in range(epochs)]


@torch.no_grad()
def _evaluate(model: nn.Module, data: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[float, float]:
    X_train, y_train, X_test, y_test = data
    loss = nn.functional.cross_entropy(model(X_train), y_train).item()
    accuracy = (model(X_test).argmax(dim=1) == y_test).double().mean().item()
    return loss, accuracy


def _kfac(model: nn.Module, config: DemoConfig) -> Any:
    from curvkit.optim import KFAC

    return KFAC(
        model,
        lr=config.kfac_lr,
        momentum=config.momentum,
        damping=config.damping,
        fisher=config.fisher,
        loss_fn=nn.CrossEntropyLoss(),
        generator=torch.Generator().manual_seed(config.seed),
    )


def _train(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    batches: list[list[Tensor]],
    progress: bool,
    after_first_step: Callable[[], None] | None = None,
) -> History:
    from tqdm.auto import tqdm

    X_train, y_train = data[0], data[1]
    loss_fn = nn.CrossEntropyLoss()
    curvature_backward = getattr(optimizer, "curvature_backward", None)
    history = History(name)
    loss, accuracy = _evaluate(model, data)
    history.train_loss.append(loss)
    history.test_accuracy.append(accuracy)
    total = sum(len(epoch) for epoch in batches)
    with tqdm(total=total, desc=name, unit="step", disable=not progress, leave=False) as bar:
        for epoch, epoch_batches in enumerate(batches, start=1):
            start = time.perf_counter()
            for index in epoch_batches:
                X, y = X_train[index], y_train[index]
                optimizer.zero_grad()
                output = model(X)
                if curvature_backward is not None:
                    curvature_backward(output, y)  # does nothing for the empirical Fisher
                loss_fn(output, y).backward()
                optimizer.step()
                if after_first_step is not None:
                    history.seconds += time.perf_counter() - start
                    after_first_step()
                    after_first_step = None
                    start = time.perf_counter()
                bar.update()
            history.seconds += time.perf_counter() - start
            loss, accuracy = _evaluate(model, data)
            history.train_loss.append(loss)
            history.test_accuracy.append(accuracy)
            bar.set_postfix_str(f"epoch {epoch}: loss {loss:.3f}, test acc {accuracy:.3f}")
    return history


def check_factors(
    model: nn.Module, X: Tensor, y: Tensor, blocks: dict[str, Any], fisher: str, seed: int = 0
) -> dict[str, tuple[float, float]]:
    """``{layer: (rel. difference of A, of G)}`` between the blocks' factors and those of
    curvlinops' ``KFACLinearOperator(separate_weight_and_bias=False)`` for ``model`` on
    the batch ``(X, y)`` with a mean cross-entropy loss.

    ``blocks`` are a K-FAC preconditioner's blocks right after its first step on that
    batch (the first EMA update takes the batch factors as they are)."""
    from curvlinops import KFACLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        params,
        [(X, y)],
        fisher_type=fisher,
        seed=seed,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    state = op.state_dict()
    a_s, g_s = state["input_covariances"], state["gradient_covariances"]
    return {
        name: (
            relative_difference(block.A.to_dense(), a_s[name]),
            relative_difference(block.G.to_dense(), g_s[name]),
        )
        for name, block in blocks.items()
    }


def run_demo(config: DemoConfig | None = None) -> dict[str, Any]:
    """Run the demo (and draw the plot unless ``config.out`` is ``None``).

    Returns:
        A JSON-ready dictionary: ``config``; ``data`` (sizes); ``histories``
        (optimizer name -> :class:`History` as a dictionary); ``factor_check``
        (``None`` when skipped, else ``{"layers": {name: [rel A, rel G]}, "max":
        float, "ok": bool}``); ``plot`` (path written or ``None``); ``seconds`` (total).
    """
    config = config or DemoConfig()
    start = time.perf_counter()
    data = digits_split()
    model = build_model(config.seed, config.hidden)
    batches = _batches(len(data[0]), config.batch_size, config.seed, config.epochs)

    check: dict[str, Any] | None = None
    kfac_model = copy.deepcopy(model)
    kfac = _kfac(kfac_model, config)
    after_first_step: Callable[[], None] | None = None
    if config.check and config.fisher != FisherType.MC.value:
        first = batches[0][0]

        def compare() -> None:
            nonlocal check
            layers = check_factors(
                copy.deepcopy(model), data[0][first], data[1][first], kfac.preconditioner.blocks, config.fisher
            )
            worst = max(max(pair) for pair in layers.values())
            check = {"layers": {k: list(v) for k, v in layers.items()}, "max": worst, "ok": worst < CHECK_TOLERANCE}

        after_first_step = compare

    histories = [
        _train(KFAC_NAME, kfac_model, kfac, data, batches, config.progress, after_first_step),
    ]
    adamw_model = copy.deepcopy(model)
    adamw = torch.optim.AdamW(adamw_model.parameters(), lr=config.adamw_lr)
    histories.append(_train(ADAMW_NAME, adamw_model, adamw, data, batches, config.progress))

    summary: dict[str, Any] = {
        "config": asdict(config),
        "data": {
            "dataset": "sklearn digits (pixels / 16)",
            "num_train": len(data[0]),
            "num_test": len(data[2]),
            "steps_per_epoch": len(batches[0]) if batches else 0,
        },
        "model": f"MLP 64-{config.hidden}-10 (ReLU)",
        "histories": {h.name: asdict(h) for h in histories},
        "factor_check": check,
        "plot": None,
    }
    if config.out is not None:
        summary["plot"] = str(plot_histories(summary, config.out))
    summary["seconds"] = time.perf_counter() - start
    return summary


def plot_histories(summary: dict[str, Any], path: str | Path) -> Path:
    """Draw training loss and test accuracy against epochs for every optimizer of a
    :func:`run_demo` summary into a PNG of :data:`PLOT_SIZE` pixels; returns the path.

    Uses matplotlib's Agg canvas directly (no pyplot, no change to the global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    width, height = PLOT_SIZE
    fig = Figure(figsize=(width / _PLOT_DPI, height / _PLOT_DPI), dpi=_PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    styles = {KFAC_NAME: ("tab:blue", "o"), ADAMW_NAME: ("tab:orange", "s")}
    for name, h in summary["histories"].items():
        color, marker = styles.get(name, (None, "."))
        epochs = range(len(h["train_loss"]))
        ax_loss.plot(epochs, h["train_loss"], marker=marker, color=color, label=f"{name} ({h['seconds']:.1f} s)")
        final = f"{name}: {h['test_accuracy'][-1]:.3f}"
        ax_acc.plot(epochs, h["test_accuracy"], marker=marker, color=color, label=final)
    ax_loss.set_yscale("log")
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy", ylim=(0.0, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend()
    cfg = summary["config"]
    fig.suptitle(
        f"curvkit demo: {summary['model']} on scikit-learn digits "
        f"({summary['data']['num_train']} train / {summary['data']['num_test']} test), "
        f"batch {cfg['batch_size']}, seed {cfg['seed']}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=_PLOT_DPI)
    return path


def format_summary(summary: dict[str, Any]) -> str:
    """The text ``curvkit demo`` prints for a :func:`run_demo` summary."""
    cfg, data = summary["config"], summary["data"]
    histories = summary["histories"]
    names = list(histories)
    head = ["epoch"] + [f"{n} {what}" for n in names for what in ("loss", "test acc")]
    epochs = max(len(h["train_loss"]) for h in histories.values())
    rows = []
    for e in range(epochs):
        row = [str(e)]
        for n in names:
            h = histories[n]
            done = e < len(h["train_loss"])
            row += [f"{h['train_loss'][e]:.4f}", f"{h['test_accuracy'][e]:.4f}"] if done else ["-", "-"]
        rows.append(row)
    rows.append(["time"] + [c for n in names for c in (f"{histories[n]['seconds']:.2f} s", "")])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells).rstrip()

    lines = [
        f"curvkit demo: {summary['model']} on {data['dataset']}, {data['num_train']} train / "
        f"{data['num_test']} test images, batches of {cfg['batch_size']} ({data['steps_per_epoch']} steps per "
        f"epoch), {cfg['epochs']} epochs, seed {cfg['seed']}",
        f"  {KFAC_NAME}: curvkit.optim.KFAC(lr={cfg['kfac_lr']}, momentum={cfg['momentum']}, "
        f"damping={cfg['damping']}, fisher={cfg['fisher']!r})",
        f"  {ADAMW_NAME}: torch.optim.AdamW(lr={cfg['adamw_lr']})",
        "",
        fmt(head),
        fmt(["-" * w for w in widths]),
        *map(fmt, rows[:-1]),
        fmt(["-" * w for w in widths]),
        fmt(rows[-1]),
        "",
        "loss: mean cross-entropy on the training set; test acc: accuracy on the test set (epoch 0: at "
        "initialisation); time: wall clock of the training steps.",
    ]
    check = summary["factor_check"]
    if check is not None:
        verdict = "agree" if check["ok"] else f"DISAGREE (tolerance {CHECK_TOLERANCE:g})"
        lines.append(
            f"factor check: {KFAC_NAME}'s factors on its first batch vs curvlinops' KFACLinearOperator: "
            f"largest relative difference {check['max']:.1e} ({verdict})"
        )
    elif cfg["check"]:
        lines.append("factor check: skipped for fisher='mc' (curvlinops draws other samples)")
    if summary["plot"] is not None:
        lines.append(f"plot written to {summary['plot']}")
    lines.append(f"total {summary['seconds']:.1f} s")
    return "\n".join(lines)
