"""The core never imports a bundled plugin (or the heavy libraries they wrap)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import curvkit

CORE_DIR = Path(curvkit.__file__).resolve().parent
IMPORT_OF_PLUGIN = re.compile(r"^\s*(import\s+curvkit_|from\s+curvkit_\S*\s+import)", re.MULTILINE)
DYNAMIC_IMPORT_OF_PLUGIN = re.compile(r"""(import_module|__import__)\(\s*['"]curvkit_""")


def test_core_sources_do_not_import_bundled_plugins():
    sources = sorted(CORE_DIR.rglob("*.py"))
    assert len(sources) >= 10, f"core sources not found under {CORE_DIR}"
    offenders = []
    for path in sources:
        text = path.read_text(encoding="utf-8")
        if "import curvkit_" in text or "from curvkit_" in text:
            offenders.append(str(path.relative_to(CORE_DIR)))
        elif IMPORT_OF_PLUGIN.search(text) or DYNAMIC_IMPORT_OF_PLUGIN.search(text):
            offenders.append(str(path.relative_to(CORE_DIR)))
    assert not offenders, f"core files importing a bundled plugin: {offenders}"


def test_static_check_detects_a_plugin_import():
    """The pattern used above would catch the imports it is meant to catch."""
    for line in ["import curvkit_backpack", "from curvkit_asdl import plugin", "    import curvkit_asdl as a"]:
        assert IMPORT_OF_PLUGIN.search(line)
    assert DYNAMIC_IMPORT_OF_PLUGIN.search("importlib.import_module('curvkit_backpack')")
    assert not IMPORT_OF_PLUGIN.search("import curvkit.stats")


_SCRIPT = r"""
import json, sys
import torch
before = set(sys.modules)
import curvkit
after_import = sorted(set(sys.modules) - before)
torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv1d(2, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(3 * 4, 2)
).double()
X, y = torch.randn(4, 2, 6, dtype=torch.float64), torch.randint(0, 2, (4,))
factors = curvkit.kronecker_factors(model, torch.nn.CrossEntropyLoss(), X, y, fisher="type-2")
acc = curvkit.accumulate_kronecker_factors(
    model, torch.nn.CrossEntropyLoss(), [(X[:2], y[:2]), (X[2:], y[2:])], fisher="mc",
    generator=torch.Generator().manual_seed(0),
)
registry = curvkit.default_registry()
print(json.dumps({
    "names": sorted(factors), "acc": sorted(acc), "plugins": registry.plugins,
    "modules": sorted(sys.modules), "after_import": after_import,
}))
"""


def _run_isolated():
    env = dict(os.environ)
    env["CURVKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env.pop("CURVKIT_BLOCK_PLUGINS", None)
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_runs_without_any_plugin_module():
    result = _run_isolated()
    assert result["names"] == ["0", "3"] and result["acc"] == ["0", "3"]
    assert result["plugins"] == ["curvkit"]
    plugin_modules = [m for m in result["modules"] if m.startswith("curvkit_")]
    assert not plugin_modules, f"bundled plugin modules imported: {plugin_modules}"
    heavy = [
        m
        for m in result["modules"]
        if m.split(".")[0] in {"backpack", "asdl", "asdfghjkl", "torchvision", "curvlinops", "laplace", "singd"}
    ]
    assert not heavy, f"heavy dependencies imported by the core: {heavy}"
    # importing curvkit itself imported curvkit's modules (the check saw the import)
    assert "curvkit" in result["after_import"]
