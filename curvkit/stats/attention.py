r"""``nn.MultiheadAttention``: its input and output projections as Kronecker blocks.

``nn.MultiheadAttention`` keeps the query, key and value projections in one parameter,
``in_proj_weight`` (``3E × E``, or three ``q/k/v_proj_weight`` when ``kdim``/``vdim``
differ from ``E``) with ``in_proj_bias``, and the output projection in ``out_proj``; its
forward never calls a submodule but ``torch.nn.functional.linear`` on these parameters (on
the whole of ``in_proj_weight`` for self-attention, on row ranges of it otherwise).

The handler declares four blocks, each a linear layer with its own Kronecker pair:

* ``<name>.q``, ``<name>.k``, ``<name>.v``: rows ``[0, E)``, ``[E, 2E)``, ``[2E, 3E)`` of
  ``in_proj_weight`` (or the separate weights) with the same rows of ``in_proj_bias``;
* ``<name>.out_proj``: ``out_proj``'s weight and bias.

The capture engine intercepts the ``linear`` calls inside the module's forward
(:mod:`curvkit.stats.engine`). A self-attention call projects query, key and value in one
product; its output columns are split between the three blocks, which share its input.
So the query, key and value projections are block-diagonal — the same treatment as
models with separate ``q_proj``/``k_proj``/``v_proj`` layers (BERT, Llama), whatever
path the module takes. ``bias_k``/``bias_v`` (``add_bias_kv=True``) are left to the
first-order rule.
"""

from __future__ import annotations

from torch import Tensor, nn

from curvkit.errors import UnsupportedModuleError
from curvkit.stats.handlers import LinearHandler
from curvkit.stats.plan import BlockSpec, ParamRef

__all__ = ["MultiheadAttentionHandler"]


class MultiheadAttentionHandler(LinearHandler):
    """Blocks for ``nn.MultiheadAttention``'s projections (see the module docstring).

    Uses are ``F.linear`` calls (``functional = ("linear",)``), whose features are those
    of a linear layer.
    """

    name = "multihead_attention"
    module_types = (nn.MultiheadAttention,)  # type: ignore[assignment]
    functional = ("linear",)

    def check(self, module: nn.Module) -> None:
        if not isinstance(module.out_proj, nn.Linear):  # type: ignore[union-attr]
            raise UnsupportedModuleError(f"{type(module).__name__}.out_proj is not an nn.Linear.")

    def weight(self, module: nn.Module) -> Tensor:
        return module.out_proj.weight  # type: ignore[union-attr, return-value]

    def bias(self, module: nn.Module) -> Tensor | None:
        return module.out_proj.bias  # type: ignore[union-attr, return-value]

    def claims(self, module: nn.Module) -> list[nn.Module]:
        """Submodules whose parameters these blocks cover (not tracked on their own)."""
        return [module.out_proj]  # type: ignore[list-item]

    def blocks(self, name: str, module: nn.Module) -> list[BlockSpec]:
        mha: nn.MultiheadAttention = module  # type: ignore[assignment]
        e = mha.embed_dim
        bias = mha.in_proj_bias
        linear = LinearHandler()
        specs: list[BlockSpec] = []
        if mha._qkv_same_embed_dim:
            weights = [ParamRef(mha.in_proj_weight, (i * e, (i + 1) * e)) for i in range(3)]  # type: ignore[arg-type]
        else:
            weights = [ParamRef(w) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]  # type: ignore[arg-type]
        for i, (part, w) in enumerate(zip("qkv", weights)):
            if not w.param.requires_grad:
                continue
            b = ParamRef(bias, (i * e, (i + 1) * e)) if bias is not None and bias.requires_grad else None  # type: ignore[arg-type]
            specs.append(BlockSpec(part, w, b, linear, mha, module_type=nn.Linear))
        out = mha.out_proj
        if out.weight.requires_grad:
            out_bias = ParamRef(out.bias) if out.bias is not None and out.bias.requires_grad else None  # type: ignore[arg-type]
            specs.append(BlockSpec("out_proj", ParamRef(out.weight), out_bias, linear, out))  # type: ignore[arg-type]
        return specs
