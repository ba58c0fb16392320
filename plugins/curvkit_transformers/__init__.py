"""curvkit's bundled ``transformers`` plugin: layer handlers for Hugging Face modules.

* ``hf_conv1d``: ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear layer),
  a Kronecker block like ``nn.Linear`` (:mod:`curvkit_transformers.conv1d`).

The plugin registers its handlers only where ``transformers`` is installed, and never
imports it: the handlers find the Hugging Face classes among the modules already imported
(a model holding one has imported it), so a process without Hugging Face models pays
nothing, and an environment without ``transformers`` gets no handler, no error and no
warning.
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.registry import LayerHandlerRegister
from curvkit_transformers._lazy import transformers_available
from curvkit_transformers.conv1d import Conv1DHandler

__all__ = ["Conv1DHandler", "curvkit_register_layer_handlers", "layer_handlers"]


def layer_handlers() -> list[object]:
    """The handlers this plugin registers (none without ``transformers``)."""
    if not transformers_available():
        return []
    return [Conv1DHandler()]


@hookimpl
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    for handler in layer_handlers():
        register.add(handler)
