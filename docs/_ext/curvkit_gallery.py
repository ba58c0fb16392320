"""A small executed gallery for Sphinx: run each script under ``examples/`` at build time
and show its code, its printed output and its figures.

An example is a Python script whose module docstring is its reST title and introduction.
Lines ``# %%`` split it into cells; the comment lines right after a ``# %%`` are prose
(reST, ``# `` stripped) shown between the cells. ``plt.show()`` is where figures appear:
the runner saves every open figure at that point and closes it.

In a page (reST)::

    .. curvkit-example:: kfac_digits.py

(option ``:body-only:`` leaves out the title and introduction) runs
``examples/kfac_digits.py`` in a fresh Python process (so examples cannot affect each
other or the build), with the matplotlib backend ``Agg``, and inserts the result. An
example that raises fails the build with its traceback. Every ``examples/*.py`` (except
``_*.py`` helpers) must have a page; the build warns otherwise.

The same runner is importable (:func:`run_example`), which is how the test suite executes
the examples (``tests/test_examples.py``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def example_scripts(directory: Path = EXAMPLES) -> list[Path]:
    """The gallery's scripts: ``*.py`` files not starting with an underscore."""
    return sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))


def split_cells(source: str) -> tuple[str, list[tuple[str, str]]]:
    """``(docstring, [(prose, code), ...])`` of an example's source."""
    tree = ast.parse(source)
    doc = ast.get_docstring(tree, clean=True) or ""
    lines = source.splitlines()
    body_start = 0
    if (
        tree.body
        and isinstance(tree.body[0], ast.Expr)
        and isinstance(getattr(tree.body[0], "value", None), ast.Constant)
    ):
        body_start = tree.body[0].end_lineno or 0
    cells: list[tuple[str, str]] = []
    prose: list[str] = []
    code: list[str] = []
    in_prose = False
    for line in lines[body_start:]:
        if line.strip() == "# %%":
            cells.append(("\n".join(prose), "\n".join(code).strip("\n")))
            prose, code, in_prose = [], [], True
            continue
        if in_prose and line.startswith("#"):
            prose.append(line[2:] if line.startswith("# ") else line[1:])
            continue
        in_prose = False
        code.append(line)
    cells.append(("\n".join(prose), "\n".join(code).strip("\n")))
    return doc, [(p, c) for p, c in cells if p.strip() or c.strip()]


def run_example(script: Path | str, figure_dir: Path | str) -> dict[str, Any]:
    """Execute an example cell by cell in this process; return its docstring and, per cell,
    the prose, code, printed output and saved figure files.

    The script's directory is put first on ``sys.path`` for the run (as ``python script.py``
    would); ``plt.show()`` saves the open figures into ``figure_dir`` and closes them.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    script, figure_dir = Path(script).resolve(), Path(figure_dir)
    figure_dir.mkdir(parents=True, exist_ok=True)
    doc, cells = split_cells(script.read_text())
    namespace: dict[str, Any] = {"__name__": "__main__", "__file__": str(script)}
    figures: list[str] = []

    def show(*args: Any, **kwargs: Any) -> None:
        for number in plt.get_fignums():
            path = figure_dir / f"{script.stem}_{len(figures) + 1}.png"
            plt.figure(number).savefig(path, dpi=90)
            figures.append(str(path))
        plt.close("all")

    results = []
    original_show = plt.show
    sys.path.insert(0, str(script.parent))
    plt.show = show
    try:
        for prose, code in cells:
            before = len(figures)
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(code, str(script), "exec"), namespace)  # noqa: S102 - running the example is the point
            results.append({"prose": prose, "code": code, "stdout": out.getvalue(), "figures": figures[before:]})
        show()  # figures left open at the end
        if results and len(figures) > sum(len(r["figures"]) for r in results):
            results[-1]["figures"] += figures[sum(len(r["figures"]) for r in results) :]
    finally:
        plt.show = original_show
        sys.path.remove(str(script.parent))
        plt.close("all")
    return {"doc": doc, "cells": results}


def _run_in_subprocess(script: Path, figure_dir: Path) -> dict[str, Any]:
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, __file__, str(script), str(figure_dir)], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        raise RuntimeError(f"example {script.name} failed (exit status {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.splitlines()[-1])


def _indent(text: str) -> list[str]:
    return ["   " + line if line.strip() else "" for line in text.splitlines()]


def to_rst(result: dict[str, Any], script: Path, page_dir: Path, body_only: bool = False) -> list[str]:
    """The reST of an executed example (figures referenced relative to the page);
    ``body_only`` leaves out the docstring (title and introduction)."""
    lines = [] if body_only else result["doc"].splitlines() + [""]
    for cell in result["cells"]:
        if cell["prose"].strip():
            lines += textwrap.dedent(cell["prose"]).splitlines() + [""]
        if cell["code"].strip():
            lines += [".. code-block:: python", ""] + _indent(cell["code"]) + [""]
        if cell["stdout"].strip():
            lines += [".. code-block:: text", "   :class: curvkit-example-output", ""]
            lines += _indent(cell["stdout"].rstrip()) + [""]
        for figure in cell["figures"]:
            rel = os.path.relpath(figure, page_dir).replace(os.sep, "/")
            lines += [f".. image:: {rel}", f"   :alt: figure of {script.name}", ""]
    lines += [
        f"The script: ``examples/{script.name}`` in the repository; it runs as it stands "
        "(``python examples/" + script.name + "``).",
        "",
    ]
    return lines


def setup(app: Any) -> dict[str, Any]:
    from docutils.parsers.rst import directives
    from sphinx.util import logging
    from sphinx.util.docutils import SphinxDirective

    logger = logging.getLogger(__name__)

    class ExampleDirective(SphinxDirective):
        required_arguments = 1
        has_content = False
        option_spec = {"body-only": directives.flag}

        def run(self) -> list[Any]:
            script = EXAMPLES / self.arguments[0]
            if not script.is_file():
                raise self.error(f"curvkit-example: no such example {script}")
            figure_dir = Path(self.env.app.outdir) / "_gallery"
            result = _run_in_subprocess(script, figure_dir)
            self.env.note_dependency(str(script))
            shown = getattr(self.env, "curvkit_examples", set())
            shown.add(script.name)
            self.env.curvkit_examples = shown  # type: ignore[attr-defined]
            page_dir = Path(self.env.doc2path(self.env.docname)).parent
            lines = to_rst(result, script, page_dir, body_only="body-only" in self.options)
            self.state_machine.insert_input(lines, str(script))
            return []

    def check_every_example_has_a_page(app: Any, env: Any) -> None:
        shown = getattr(env, "curvkit_examples", set())
        missing = [p.name for p in example_scripts() if p.name not in shown]
        if missing:
            logger.warning(
                "examples without a gallery page (add `.. curvkit-example:: NAME` to docs/gallery/): %s",
                ", ".join(missing),
            )

    def merge(app: Any, env: Any, docnames: Any, other: Any) -> None:
        env.curvkit_examples = getattr(env, "curvkit_examples", set()) | getattr(other, "curvkit_examples", set())

    app.add_directive("curvkit-example", ExampleDirective)
    app.connect("env-check-consistency", check_every_example_has_a_page)
    app.connect("env-merge-info", merge)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True, "env_version": 1}


if __name__ == "__main__":  # the subprocess the directive starts: run one example, print JSON
    print(json.dumps(run_example(sys.argv[1], sys.argv[2])))
