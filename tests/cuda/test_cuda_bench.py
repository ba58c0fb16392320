"""``curvkit bench --quick --device cuda``: every registered method and the baselines train
on every bench task on the device, in float32 and bf16, with no run failing or diverging.

``--steps 12`` keeps the run short (the quick step counts cost minutes on a GPU, where
these tiny models are bound by kernel launches); a device error inside a method shows up
as a failed run, whose message this test prints.
"""

from __future__ import annotations

import json

import pytest
from _cuda_common import CUDA, DEVICE

from curvkit.cli import main

pytestmark = CUDA


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_quick_on_the_device(tmp_path, dtype, capsys):
    argv = ["bench", "--quick", "--steps", "12", "--device", DEVICE.type, "--dtype", dtype]
    argv += ["--no-plots", "--no-progress", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["device"].startswith(DEVICE.type)
    assert results["config"]["dtype"] == dtype
    if DEVICE.type == "cuda":
        assert results["environment"]["device_name"]
    bad = [f"{r['task']}/{r['method']}: {r['status']} ({r['error']})" for r in results["runs"] if r["status"] != "ok"]
    assert not bad, "runs that did not finish:\n  " + "\n  ".join(bad)
    assert {r["method"] for r in results["runs"]} >= {"sgd", "adamw", "kfac"}
