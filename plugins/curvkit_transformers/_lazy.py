"""Finding Hugging Face classes without importing ``transformers``.

Importing ``transformers`` takes seconds. A model can only contain a ``Conv1D`` (or any
other class) once the module that defines it has been imported, so the handlers look the
class up in :data:`sys.modules` when they are asked for their module types, and never
import anything themselves: a process that builds a curvkit registry but no Hugging Face
model pays nothing for this plugin.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

__all__ = ["defined_class", "transformers_available"]


def transformers_available() -> bool:
    """Whether ``transformers`` can be imported (looked up, not imported)."""
    if "transformers" in sys.modules:
        return sys.modules["transformers"] is not None
    try:
        return importlib.util.find_spec("transformers") is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as absent
        return False


def defined_class(module_name: str, class_name: str) -> type[Any] | None:
    """The class ``module_name.class_name`` if that module is already imported, else ``None``."""
    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls if isinstance(cls, type) else None
