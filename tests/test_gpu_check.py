"""``benchmarks/gpu_check.py --dry-run`` (the prepared GPU check, on the CPU at tiny sizes)
runs every section and writes its JSON and markdown, so that it works the day a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not part of this checkout")


def test_the_dry_run_completes_every_section(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--workloads", "linear,transformer"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["dry_run"] is True
    sections = data["sections"]
    assert set(sections) >= {"environment", "tests", "steps:linear", "steps:transformer", "factors"}
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert sections["tests"]["returncode"] == 0 and "passed" in sections["tests"]["summary"]
    for name in ("steps:linear", "steps:transformer"):
        rows = sections[name]["rows"]
        assert {(r["optimizer"], r["dtype"]) for r in rows} == {
            (o, d) for o in ("adamw", "kfac", "singd-dense", "singd-diag") for d in ("float32", "bf16")
        }
        for r in rows:
            assert r["error"] is None and r["ms_per_step"] > 0 and r["finite"], r
            if r["optimizer"] != "adamw":
                assert 0 < r["preconditioned"]["captured"] <= r["preconditioned"]["tracked"] <= 1
    linear = {(r["optimizer"], r["dtype"]): r for r in sections["steps:linear"]["rows"]}
    assert linear[("kfac", "float32")]["preconditioned"]["captured"] == 1.0
    factors = {r["what"]: r for r in sections["factors"]["rows"]}
    assert set(factors) == {"gradient", "curvkit[mc]", "curvkit[empirical]", "curvlinops[mc]", "curvlinops[empirical]"}
    assert all(r["error"] is None and r["ms"] > 0 for r in factors.values())
    table = (tmp_path / "gpu_check.md").read_text()
    assert "## Step time: linear" in table and "## Factor time" in table


def test_without_a_gpu_the_full_run_refuses_clearly(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "--dry-run" in proc.stdout
