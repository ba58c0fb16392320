"""Load a script under ``benchmarks/`` as a module, for the tests of its helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(filename: str, module_name: str) -> ModuleType:
    """``benchmarks/<filename>`` imported as ``module_name`` (registered in ``sys.modules``,
    so dataclasses and pickling inside it resolve)."""
    spec = importlib.util.spec_from_file_location(module_name, BENCHMARKS / filename)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
