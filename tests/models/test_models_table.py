"""docs/models.md is what ``benchmarks/models_table.py`` writes today (so it tells the truth
about which parameters each method preconditions; regenerate it when a handler lands)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "models_table.py"

pytestmark = [
    pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not part of this checkout"),
    pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="the table includes the HF models"),
]


def test_docs_models_table_is_current(tmp_path):
    out = tmp_path / "models.md"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    fresh = out.read_text(encoding="utf-8")
    current = (ROOT / "docs" / "models.md").read_text(encoding="utf-8")
    assert current == fresh, "docs/models.md is stale; regenerate it with: .venv/bin/python benchmarks/models_table.py"
    for name in ("gpt2", "bert", "llama", "transformer_encoder", "resnet", "lstm"):
        assert f"## {name}" in fresh
