"""Every gallery example (``examples/*.py``) runs, through the same runner the documentation
build uses (``docs/_ext/curvkit_gallery.py``), with ``CURVKIT_EXAMPLES_QUICK=1`` (shorter
training loops). The docs build (``tox -e docs``) runs them at full size."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("curvkit_gallery", ROOT / "docs" / "_ext" / "curvkit_gallery.py")
gallery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gallery)
SCRIPTS = gallery.example_scripts(ROOT / "examples")


def test_there_are_examples():
    assert {p.stem for p in SCRIPTS} >= {
        "kfac_digits",
        "choosing_components",
        "singd_structured",
        "laplace_digits",
        "kronecker_vs_curvlinops",
        "plugin_conformance",
        "char_lm",
    }


def _run(script: Path, tmp_path: Path, monkeypatch) -> tuple[str, list[str]]:
    monkeypatch.setenv("CURVKIT_EXAMPLES_QUICK", "1")
    monkeypatch.setattr(sys, "path", list(sys.path))  # an example may extend sys.path; undo it
    result = gallery.run_example(script, tmp_path)
    assert result["doc"].splitlines()[0].strip(), f"{script.name} has no title in its docstring"
    stdout = "".join(cell["stdout"] for cell in result["cells"])
    figures = [f for cell in result["cells"] for f in cell["figures"]]
    return stdout, figures


def test_examples_are_self_contained():
    """A reader who copies an example can run it: no example imports a module of the
    examples folder (only curvkit's public API, torch and third-party packages)."""
    import ast

    examples = ROOT / "examples"
    local = {p.stem for p in examples.glob("*.py")}
    for script in examples.glob("*.py"):
        tree = ast.parse(script.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            bad = [n for n in names if n in local or n.startswith("_")]
            assert not bad, f"{script.name} imports {bad}; inline what it needs so a copy of it runs alone"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_example_runs(script, tmp_path, monkeypatch):
    stdout, figures = _run(script, tmp_path, monkeypatch)
    assert stdout.strip(), f"{script.name} printed nothing"
    for figure in figures:
        assert Path(figure).stat().st_size > 1000, figure


def test_factors_agree_with_curvlinops_in_the_example(tmp_path, monkeypatch):
    stdout, figures = _run(ROOT / "examples" / "kronecker_vs_curvlinops.py", tmp_path, monkeypatch)
    rows = re.findall(r"^(type-2|mc|empirical)\s+(expand|reduce)\s+\S+\s+(\S+)\s+(\S+)$", stdout, re.MULTILINE)
    assert len(rows) == 12, stdout  # 3 Fisher types x 2 approximations x 2 layers
    assert max(float(x) for row in rows for x in row[2:]) < 1e-10, stdout
    assert len(figures) == 1


def test_the_conformance_example_shows_the_three_messages_and_shampoo_learning(tmp_path, monkeypatch):
    stdout, _ = _run(ROOT / "examples" / "plugin_conformance.py", tmp_path, monkeypatch)
    assert "'methods': ['template-kfac', 'template-shampoo']" in stdout
    accuracy = float(re.search(r"TemplateShampoo, epoch 1: test accuracy (\S+)", stdout).group(1))
    assert accuracy >= 0.9, stdout
    assert "AssertionError: method 'template-shampoo-features'" in stdout
    assert "differs from one process on the whole batch" in stdout
    assert "AssertionError: structure 'template_scaled_identity_swapped_ema': ema_(other, decay=0.7)" in stdout
    assert "AssertionError: method 'template-kfac-unchecked': bad config {'ns_max_iter': 0} was accepted" in stdout


def test_the_runner_splits_cells_and_prose():
    doc, cells = gallery.split_cells('"""\nTitle\n=====\n\nIntro.\n"""\n\nx = 1\n\n# %%\n# Some *prose*.\n\nprint(x)\n')
    assert doc == "Title\n=====\n\nIntro."
    assert cells == [("", "x = 1"), ("Some *prose*.", "print(x)")]
