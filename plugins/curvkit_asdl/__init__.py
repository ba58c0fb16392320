"""curvkit's bundled ``asdl`` plugin: Kronecker factors computed by ASDL (``asdfghjkl``).

Registered through the ``curvkit`` entry-point group as ``asdl``; select it with
``curvkit.kronecker_factors(..., backend="asdl")``. See :mod:`curvkit_asdl.backend` for
what it supports and how ASDL's factors are converted to curvkit's convention.
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.registry import BackendRegister
from curvkit_asdl.backend import AsdlBackend, asdl_capabilities

__all__ = ["AsdlBackend", "asdl_capabilities", "curvkit_register_statistics_backends"]


@hookimpl
def curvkit_register_statistics_backends(register: BackendRegister) -> None:
    register.add(AsdlBackend())
