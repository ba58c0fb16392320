"""Sphinx configuration of curvkit's documentation.

Build with warnings as errors: ``sphinx-build -W --keep-going --fresh-env -b html docs docs/_build/html``
(``tox -e docs``). The build also fails when a name in ``curvkit.__all__`` has no entry in
the API reference.
"""

from __future__ import annotations

import os
import re

import curvkit

project = "curvkit"
author = "the curvkit developers"
copyright = "2026, the curvkit developers"
release = curvkit.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "plugin-template/**", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# The README and CHANGELOG are included from the repository root; their links to files
# outside docs/ are plain text in the HTML build.
suppress_warnings = ["myst.xref_missing"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

html_theme = "alabaster"
html_title = f"curvkit {release}"

_DOCS = os.path.dirname(os.path.abspath(__file__))
#: laplace-torch is not in the docs env; the adapter classes subclass its interface.
autodoc_mock_imports = ["laplace"]

#: Pages written by others that appear in the toctree only once they exist.
_OPTIONAL_PAGES = [
    "benchmarks",
    "benchmarks-step",
    "laplace",
    "methods/ekfac",
    "methods/tkfac",
    "methods/tekfac",
    "methods/singd",
    "methods/lowrank",
    "methods/kldwrm",
]


def _drop_missing_optional_pages(app, docname, source):  # type: ignore[no-untyped-def]
    if docname != root_doc:
        return
    for page in _OPTIONAL_PAGES:
        if not any(os.path.exists(os.path.join(_DOCS, page + ext)) for ext in source_suffix):
            source[0] = re.sub(rf"^{page}\n", "", source[0], flags=re.MULTILINE)


def _check_public_api_documented(app, env):  # type: ignore[no-untyped-def]
    from sphinx.util import logging

    documented = set(env.get_domain("py").objects)
    missing = [name for name in curvkit.__all__ if f"curvkit.{name}" not in documented]
    if missing:
        logging.getLogger(__name__).warning(
            "public names of curvkit without an entry in the API reference (docs/api.rst): %s", ", ".join(missing)
        )


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("env-check-consistency", _check_public_api_documented)
