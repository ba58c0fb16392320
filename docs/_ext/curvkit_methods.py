"""Sphinx directive ``curvkit-method-reference``: one section per registered method, with
its summary, citation, optimizer class, recommended settings (the defaults), documentation
page and a table of every option (name, default, description) generated from the
configuration dataclass and the ``Args:`` sections of its docstrings (the most derived
class's entry wins). An option the spec recommends shows the recommended value first and
the configuration's field default (the paper's value, ``recommended=False``) in brackets.

The build warns when a bundled method has no page in :data:`METHOD_PAGES` (so every
method is documented) or an option has no description in any docstring.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

#: Method name -> documentation page (docname) with its maths.
METHOD_PAGES = {
    "kfac": "methods/kfac",
    "ekfac": "methods/ekfac",
    "tkfac": "methods/tkfac",
    "tekfac": "methods/tekfac",
    "singd": "methods/singd",
    "ikfac": "methods/singd",
    "ingd": "methods/singd",
    "rs-kfac": "methods/lowrank",
    "sre-kfac": "methods/lowrank",
    "b-kfac": "methods/lowrank",
    "b-r-kfac": "methods/lowrank",
    "b-kfac-c": "methods/lowrank",
    "skfac": "methods/lowrank",
    "so-kldwrm": "methods/kldwrm",
    "q-kldwrm": "methods/kldwrm",
    "qe-kldwrm": "methods/kldwrm",
}

_ENTRY = re.compile(r"^(?P<names>[A-Za-z_][\w]*(?:\s*,\s*[A-Za-z_][\w]*)*)\s*(?:\([^)]*\))?:\s*(?P<text>.*)$")


def option_docs(cls: type) -> dict[str, str]:
    """``{option: description}`` from the ``Args:`` sections along ``cls``'s MRO."""
    out: dict[str, str] = {}
    for klass in cls.__mro__:
        doc = inspect.cleandoc(klass.__dict__.get("__doc__") or "")
        lines = doc.splitlines()
        try:
            start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
        except StopIteration:
            continue
        current: list[str] = []
        entries: dict[str, str] = {}
        indent = None
        for line in lines[start + 1 :]:
            if not line.strip():
                continue
            width = len(line) - len(line.lstrip())
            if indent is None:
                indent = width
            if width < indent or (width == 0 and line.rstrip().endswith(":")):
                break
            match = _ENTRY.match(line.strip()) if width == indent else None
            if match:
                current = [match["text"].strip()]
                for name in re.split(r"\s*,\s*", match["names"]):
                    entries[name] = current  # type: ignore[assignment]
            elif current is not None:
                current.append(line.strip())
        for name, words in entries.items():
            out.setdefault(name, " ".join(words))  # type: ignore[arg-type]
    return out


def _default(field: Any) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "(required)"
    if hasattr(value, "value") and type(value).__module__.startswith("curvkit.config"):
        value = value.value  # str-Enum: show the string users pass
    return f"``{value!r}``"


def _cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "\\|")


def _optimizer_class(name: str) -> str | None:
    import curvkit.optim

    for attr in curvkit.optim.__all__:
        obj = getattr(curvkit.optim, attr)
        if isinstance(obj, type) and getattr(obj, "method", None) == name:
            return f"curvkit.optim.{attr}"
    return None


def method_reference(registry: Any, warn: Any) -> list[str]:
    lines: list[str] = []
    # An option documented only on a sibling configuration of the same plugin module (a
    # shared private base without an Args: section) is described from that sibling.
    siblings: dict[str, dict[str, str]] = {}
    for other in registry.methods.names():
        config_cls = registry.methods.get(other).config_cls
        for option, text in option_docs(config_cls).items():
            siblings.setdefault(config_cls.__module__, {}).setdefault(option, text)
    for name in sorted(registry.methods.names()):
        spec = registry.methods.get(name)
        plugin = registry.methods.plugin_of(name)
        page = METHOD_PAGES.get(name)
        if page is None and spec.config_cls.__module__.startswith("curvkit"):  # a bundled method
            warn(
                f"method {name!r} (plugin {plugin!r}) has no documentation page; add it to METHOD_PAGES "
                "in docs/_ext/curvkit_methods.py"
            )
        title = f"``{name}``"
        lines += [title, "-" * len(title), ""]
        if spec.summary:
            lines += [_cell(spec.summary), ""]
        cls = _optimizer_class(name)
        lines += [
            f"* plugin: ``{plugin}``; configuration ``{spec.config_cls.__module__}.{spec.config_cls.__name__}``",
            f"* optimizer: :class:`{cls}` or ``curvkit.optim.create({name!r}, model, ...)``"
            if cls
            else f"* optimizer: ``curvkit.optim.create({name!r}, model, ...)``",
        ]
        settings = spec.recommended_settings() if spec.recommended else {}
        if settings:
            from curvkit.cli import recommended_text
            from curvkit.methods import OPTIMIZER_OPTIONS

            step = {k: v for k, v in settings.items() if k in OPTIMIZER_OPTIONS}
            lines.append(
                f"* defaults (the recommended settings; method options below): ``{recommended_text(step)}``"
                if step
                else "* defaults: the recommended settings of the options below"
            )
            tasks = (spec.recommended.get("tasks") or {}) if hasattr(spec.recommended, "get") else {}
            for task, over in tasks.items():
                lines.append(f"* ``curvkit bench`` task ``{task}``: ``{recommended_text(dict(over))}``")
        if page:
            lines.append(f"* maths and provenance: :doc:`/{page}`")
        if spec.reference:
            lines.append(f"* reference: {_cell(spec.reference)}")
        lines += [
            "",
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 18 22 60",
            "",
            "   * - option",
            "     - default (field default)",
            "     - meaning",
        ]
        docs = option_docs(spec.config_cls)
        for field in dataclasses.fields(spec.config_cls):
            if not field.init:
                continue
            text = docs.get(field.name) or siblings.get(spec.config_cls.__module__, {}).get(field.name)
            if text is None:
                warn(
                    f"option {field.name!r} of method {name!r} ({spec.config_cls.__name__}) has no description "
                    "in an Args: section of the configuration's docstrings"
                )
                text = ""
            default = _default(field)
            if field.name in settings:
                default = f"``{settings[field.name]!r}`` ({default})"
            lines += [f"   * - ``{field.name}``", f"     - {_cell(default)}", f"     - {_cell(text)}"]
        lines.append("")
    return lines


def setup(app: Any) -> dict[str, Any]:
    from sphinx.util import logging
    from sphinx.util.docutils import SphinxDirective

    logger = logging.getLogger(__name__)

    class MethodReference(SphinxDirective):
        has_content = False

        def run(self) -> list[Any]:
            import curvkit

            location = self.get_location()
            lines = method_reference(curvkit.default_registry(), lambda msg: logger.warning(msg, location=location))
            self.state_machine.insert_input(lines, "curvkit-method-reference")
            return []

    app.add_directive("curvkit-method-reference", MethodReference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
