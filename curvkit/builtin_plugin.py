"""The core's own components, registered like any plugin under the name ``curvkit``.

The core registers only what it cannot work without: the ``hooks`` statistics backend
and the layer handlers for ``Linear`` and ``Conv1d/2d/3d``. Everything else comes from
plugins in the ``curvkit`` entry-point group.
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.registry import BackendRegister, LayerHandlerRegister
from curvkit.stats.handlers import ConvHandler, LinearHandler
from curvkit.stats.hooks_backend import HooksBackend


@hookimpl
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    register.add(LinearHandler())
    register.add(ConvHandler())


@hookimpl
def curvkit_register_statistics_backends(register: BackendRegister) -> None:
    register.add(HooksBackend())
