"""``benchmarks/task_step.py`` runs and reports every contender with its ratios (a smoke
test of the script, not a timing: no figure is asserted)."""

from __future__ import annotations

import math

from _scripts import load_benchmark


def test_task_step_reports_every_contender_with_ratios(capsys):
    bench = load_benchmark("task_step.py", "task_step_bench")
    assert bench.main(["--tasks", "sequence", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    for label in ("sgd", "adamw", "kfac plain", "kfac T10/T50"):
        assert f"sequence    {label}" in out
    rows = bench.measure(["sequence"], 1)
    assert [r["contender"] for r in rows] == ["sgd", "adamw", "kfac plain", "kfac T10/T50"]
    assert rows[0]["step_x"] == 1.0 and rows[0]["whole_x"] == 1.0
    assert all(math.isfinite(r["step_us"]) and r["step_us"] > 0 for r in rows)
