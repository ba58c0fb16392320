"""curvkit's bundled ``transformers`` plugin: layer handlers for Hugging Face modules.

* ``hf_conv1d``: ``transformers.pytorch_utils.Conv1D`` (GPT-2's transposed linear layer),
  a Kronecker block like ``nn.Linear`` (:mod:`curvkit_transformers.conv1d`);
* ``hf_rms_norm``: the models' RMSNorm classes (``LlamaRMSNorm``, ``GemmaRMSNorm``'s
  ``(1 + weight)``, ...), exact unit-wise blocks, each module's forward verified on a probe
  (:mod:`curvkit_transformers.rmsnorm`).

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

__all__ = ["Conv1DHandler", "HFRMSNormHandler", "curvkit_register_layer_handlers", "layer_handlers"]


def __getattr__(name: str) -> object:
    if name == "HFRMSNormHandler":  # needs curvkit's unit-wise base class; imported on use
        from curvkit_transformers.rmsnorm import HFRMSNormHandler

        return HFRMSNormHandler
    raise AttributeError(f"module 'curvkit_transformers' has no attribute {name!r}")


def layer_handlers() -> list[object]:
    """The handlers this plugin registers (none without ``transformers``)."""
    if not transformers_available():
        return []
    from curvkit_transformers.rmsnorm import HFRMSNormHandler

    return [Conv1DHandler(), HFRMSNormHandler()]


@hookimpl
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    for handler in layer_handlers():
        register.add(handler)
