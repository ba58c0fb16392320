"""benchmarks/tta.py's tuned grids: a best point on the edge of its grid is reported (the
optimum may lie outside), an interior one is not, and the stated grids are what run."""

from __future__ import annotations

import pytest
from _scripts import BENCHMARKS, load_benchmark

pytestmark = pytest.mark.skipif(not (BENCHMARKS / "tta.py").exists(), reason="benchmarks/ is not part of this checkout")


@pytest.fixture(scope="module")
def tta():
    return load_benchmark("tta.py", "tta_bench")


def _row(label: str, grid: str, options: dict, seconds: float | None) -> dict:
    row = {"label": label, "grid": grid, "options": options, "kind": label.split()[0]}
    if seconds is not None:
        row["seconds"] = seconds
    return row


def test_a_best_point_on_the_edge_is_reported(tta):
    rows = [
        _row("adamw lr=0.001", "adamw", {"lr": 0.001}, 3.0),
        _row("adamw lr=0.003", "adamw", {"lr": 0.003}, 2.0),
        _row("adamw lr=0.01", "adamw", {"lr": 0.01}, 1.0),  # fastest, and the largest lr tried
        _row("sgd lr=0.1", "sgd", {"lr": 0.1}, 2.0),
        _row("sgd lr=0.3", "sgd", {"lr": 0.3}, 1.0),  # fastest, inside
        _row("sgd lr=1", "sgd", {"lr": 1.0}, None),  # missed the target
    ]
    notes = tta.grid_edges(rows)
    assert len(notes) == 1 and notes[0].startswith("adamw:") and "lr=0.01" in notes[0]


def test_only_the_options_a_grid_varies_count(tta):
    fixed = {"T_stats": 10, "lr": 0.3}
    rows = [
        _row("kfac a", "kfac grid", {**fixed, "damping": 0.01, "kl_clip": 0.003}, 2.0),
        _row("kfac b", "kfac grid", {**fixed, "damping": 0.03, "kl_clip": 0.003}, 1.0),
        _row("kfac c", "kfac grid", {**fixed, "damping": 0.1, "kl_clip": 0.003}, 3.0),
        _row("kfac d", "kfac grid", {**fixed, "damping": 0.03, "kl_clip": 0.01}, 2.5),
        _row("kfac e", "kfac grid", {**fixed, "damping": 0.03, "kl_clip": 0.001}, 2.5),
        _row("kfac[T_stats=5]", "", {"T_stats": 5}, 0.5),  # a variant, in no grid
    ]
    assert tta.grid_edges(rows) == []  # damping and kl_clip inside; T_stats and lr not varied


def test_the_stated_grids_are_the_contenders(tta):
    chosen = tta.contenders(["kfac", "rs-kfac"], list(tta.TUNED_GRIDS), tta.SGD_GRID, tta.ADAMW_GRID, False)
    grids: dict[str, int] = {}
    for c in chosen:
        grids[c.grid] = grids.get(c.grid, 0) + 1
    assert grids == {"sgd": len(tta.SGD_GRID), "adamw": len(tta.ADAMW_GRID), "kfac grid": 9, "rs-kfac grid": 6}
    # baseline grids about 2x apart, wide enough that the measured optima lie inside them
    for grid in (tta.SGD_GRID, tta.ADAMW_GRID):
        assert all(1.4 <= b / a <= 3.4 for a, b in zip(grid, grid[1:]))
    assert min(tta.ADAMW_GRID) <= 1e-3 and max(tta.ADAMW_GRID) >= 0.1
    assert min(tta.SGD_GRID) <= 0.01 and max(tta.SGD_GRID) >= 1.0
