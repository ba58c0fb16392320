"""Sphinx configuration of curvkit's documentation.

Build with warnings as errors: ``sphinx-build -W --keep-going --fresh-env -b html docs docs/_build/html``
(``tox -e docs``). The build also fails when a public name (``__all__``) of ``curvkit``,
``curvkit.optim``, ``curvkit.testing``, ``curvkit.laplace`` or ``curvkit.distributed`` has no entry in the API
reference, when a registered method has no page or an option without a description
(``docs/_ext/curvkit_methods.py``), and when an example under ``examples/`` fails or has no
gallery page (``docs/_ext/curvkit_gallery.py``, which runs every example at build time).
"""

from __future__ import annotations

import os
import re
import sys

import curvkit

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

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
    "curvkit_gallery",
    "curvkit_methods",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "plugin-template/**", "Thumbs.db", ".DS_Store"]

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
# The code is written to 120 columns (ruff's line length): give the body room for it, and
# let a longer line scroll rather than the whole page.
html_theme_options = {"page_width": "min(1320px, 96vw)", "body_max_width": "none", "sidebar_width": "220px"}
html_static_path = ["_static"]
html_css_files = ["curvkit.css"]

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
    "bench",
    "distributed",
]


def _drop_missing_optional_pages(app, docname, source):  # type: ignore[no-untyped-def]
    if docname != root_doc:
        return
    for page in _OPTIONAL_PAGES:
        if not any(os.path.exists(os.path.join(_DOCS, page + ext)) for ext in source_suffix):
            source[0] = re.sub(rf"^{page}\n", "", source[0], flags=re.MULTILINE)


#: Modules whose ``__all__`` must be documented in docs/api.rst.
_PUBLIC_MODULES = ["curvkit", "curvkit.optim", "curvkit.testing", "curvkit.laplace", "curvkit.distributed"]


def _undocumented(module_name: str, documented: set[str]) -> list[str]:
    """Names in ``module.__all__`` with no entry, neither as ``module.name`` nor where the
    object is defined (``curvkit.laplace.backend.CurvkitGGN`` documents
    ``curvkit.laplace.CurvkitGGN``)."""
    import importlib

    module = importlib.import_module(module_name)
    missing = []
    for name in module.__all__:
        qualified = f"{module_name}.{name}"
        if qualified in documented:
            continue
        try:
            obj = getattr(module, name)
        except ImportError:  # an optional peer (laplace-torch) is missing: any submodule's entry will do
            if any(entry.startswith(module_name + ".") and entry.endswith("." + name) for entry in documented):
                continue
        else:
            if f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}" in documented:
                continue
        missing.append(qualified)
    return missing


def _check_public_api_documented(app, env):  # type: ignore[no-untyped-def]
    from sphinx.util import logging

    documented = set(env.get_domain("py").objects)
    missing = [name for module in _PUBLIC_MODULES for name in _undocumented(module, documented)]
    if missing:
        logging.getLogger(__name__).warning(
            "public names without an entry in the API reference (docs/api.rst): %s", ", ".join(missing)
        )


def setup(app):  # type: ignore[no-untyped-def]
    app.connect("source-read", _drop_missing_optional_pages)
    app.connect("env-check-consistency", _check_public_api_documented)
