"""KLD-WRM (SO, Q, QE) vs. K-FAC on digits: test accuracy against steps and wall-clock.

Two models on scikit-learn's 8×8 digits (stratified 75/25 split, ``random_state=0``, inputs/16,
batch 64, float32, CPU, one thread): the MLP 64-128-10 (10 epochs) and a small CNN
Conv(1→16,3)-ReLU-Conv(16→32,3)-ReLU-AvgPool(2)-Linear(512→10) (5 epochs).

Each optimizer runs twice per model:

* ``same``: the settings of ``tests/methods/test_kldwrm.py`` for all four (heavy-ball 0.9,
  ``ExactDamping(0.1)`` with the ``eigh`` inverter, ρ = 0.95, T_stats 1, T_inv 10, no KL clip, no
  weight decay, ω = 0.5 for KLD-WRM; lr 0.05 for the MLP, 0.02 for the CNN);
* ``tuned``: the same, with the learning rate picked from ``--lr-grid`` by final test accuracy
  (the only thing tuned; selecting on the test split flatters every optimizer alike).

Test accuracy is evaluated every ``--every`` steps; the clock counts only optimizer work (forward,
backward, step), not evaluation. Prints one table per model (final accuracy, steps and seconds to
95% and 97%, ms/step, seconds relative to K-FAC) and writes a PNG (2×2: accuracy vs. steps and vs.
seconds, per model, tuned runs solid, ``same`` runs dashed).

    python benchmarks/kldwrm.py                       # ~2 min on one CPU thread
    python benchmarks/kldwrm.py --quick               # no tuning, ~20 s
    python benchmarks/kldwrm.py --plot docs/_static/kldwrm_digits.png
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from curvkit.bench.tasks import digits_cnn, digits_mlp
from curvkit.demo import digits_split

NAMES = ["KFAC", "SOKLDWRM", "QKLDWRM", "QEKLDWRM"]
LABELS = {"KFAC": "K-FAC", "SOKLDWRM": "SO-KLD-WRM", "QKLDWRM": "Q-KLD-WRM", "QEKLDWRM": "QE-KLD-WRM"}
COLORS = {"KFAC": "k", "SOKLDWRM": "tab:blue", "QKLDWRM": "tab:orange", "QEKLDWRM": "tab:green"}


def digits(image: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X_train, X_test, y_train, y_test)``: the split of ``curvkit demo`` and ``curvkit bench``."""
    X_tr, y_tr, X_te, y_te = digits_split()
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return X_tr.reshape(shape), X_te.reshape(shape), y_tr, y_te


mlp, cnn = digits_mlp, digits_cnn


MODELS: dict[str, tuple[Callable[[], nn.Module], bool, int, float]] = {
    # name: (factory, image input, epochs, lr of the "same" settings)
    "mlp": (mlp, False, 10, 0.05),
    "cnn": (cnn, True, 5, 0.02),
}


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    import curvkit_kldwrm

    import curvkit.optim
    from curvkit.linalg import ExactDamping

    options: dict[str, Any] = dict(
        lr=lr,
        momentum=0.9,
        damping=ExactDamping(value=0.1),
        inverter="eigh",
        ema_decay=0.95,
        T_stats=1,
        T_inv=10,
        kl_clip=None,
        weight_decay=0.0,
    )
    if name == "KFAC":
        return curvkit.optim.KFAC(model, **options)
    return getattr(curvkit_kldwrm, name)(model, wake_decay=0.5, **options)


def train(model_name: str, name: str, lr: float, every: int, seed: int = 0) -> dict[str, Any]:
    factory, image, epochs, _ = MODELS[model_name]
    X_tr, X_te, y_tr, y_te = digits(image)
    torch.manual_seed(seed)
    model = factory()
    opt = make_optimizer(name, model, lr)

    def accuracy() -> float:
        with torch.no_grad():
            return float((model(X_te).argmax(1) == y_te).float().mean())

    steps, seconds, accs = [0], [0.0], [accuracy()]
    gen = torch.Generator().manual_seed(seed)
    clock, step = 0.0, 0
    for _ in range(epochs):
        perm = torch.randperm(len(X_tr), generator=gen)
        for i in range(0, len(X_tr), 64):
            idx = perm[i : i + 64]
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx]).backward()
            opt.step()
            clock += time.perf_counter() - t0
            step += 1
            if step % every == 0:
                steps.append(step)
                seconds.append(clock)
                accs.append(accuracy())
    if steps[-1] != step:
        steps.append(step)
        seconds.append(clock)
        accs.append(accuracy())
    return {"name": name, "lr": lr, "steps": steps, "seconds": seconds, "acc": accs}


def first_reach(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    for s, t, a in zip(run["steps"], run["seconds"], run["acc"]):
        if a >= target:
            return s, t
    return None, None


def table(model_name: str, runs: list[dict[str, Any]]) -> None:
    kfac_time = {r["setting"]: r["seconds"][-1] for r in runs if r["name"] == "KFAC"}
    print(f"\n## {model_name} ({MODELS[model_name][2]} epochs, {runs[0]['steps'][-1]} steps)")
    head = "| optimizer | setting | lr | final acc | steps→95% | s→95% | steps→97% | s→97% | ms/step | time/K-FAC |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in runs:
        cells = []
        for target in (0.95, 0.97):
            s, t = first_reach(r, target)
            cells += ["—" if s is None else str(s), "—" if t is None else f"{t:.2f}"]
        total = r["seconds"][-1]
        print(
            f"| {LABELS[r['name']]} | {r['setting']} | {r['lr']:g} | {100 * r['acc'][-1]:.1f}% | "
            + " | ".join(cells)
            + f" | {1e3 * total / r['steps'][-1]:.1f} | {total / kfac_time[r['setting']]:.2f}× |"
        )


def plot(results: dict[str, list[dict[str, Any]]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(9, 3.2 * len(results)), squeeze=False)
    for row, (model_name, runs) in enumerate(results.items()):
        for col, key in enumerate(("steps", "seconds")):
            ax = axes[row][col]
            for r in runs:
                ax.plot(
                    r[key],
                    [100 * a for a in r["acc"]],
                    color=COLORS[r["name"]],
                    linestyle="-" if r["setting"] == "tuned" else "--",
                    linewidth=1.2,
                    label=f"{LABELS[r['name']]} ({r['setting']}, lr {r['lr']:g})",
                )
            ax.set_ylim(80, 100)
            ax.axhline(95, color="grey", linewidth=0.5)
            ax.axhline(97, color="grey", linewidth=0.5)
            ax.set_xlabel("optimizer steps" if key == "steps" else "wall-clock seconds (training only)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"digits {model_name.upper()}")
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    parser.add_argument("--lr-grid", default="0.01,0.02,0.05,0.1", help="learning rates tried for 'tuned'")
    parser.add_argument("--every", type=int, default=5, help="evaluate test accuracy every N steps")
    parser.add_argument("--quick", action="store_true", help="only the 'same' settings (no tuning)")
    parser.add_argument("--plot", default="kldwrm_digits.png", help="PNG to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    grid = [float(x) for x in args.lr_grid.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    for model_name in args.models.split(","):
        same_lr = MODELS[model_name][3]
        runs = []
        for name in NAMES:
            same = train(model_name, name, same_lr, args.every)
            same["setting"] = "same"
            runs.append(same)
            if args.quick:
                continue
            best = same
            for lr in grid:
                if lr == same_lr:
                    continue
                r = train(model_name, name, lr, args.every)
                print(f"  tuning {model_name} {name} lr {lr:g}: {100 * r['acc'][-1]:.1f}%", flush=True)
                if r["acc"][-1] > best["acc"][-1]:
                    best = r
            runs.append({**best, "setting": "tuned"})
        runs.sort(key=lambda r: (r["setting"] != "same", NAMES.index(r["name"])))
        results[model_name] = runs
        table(model_name, runs)
    plot(results, args.plot)


if __name__ == "__main__":
    main()
