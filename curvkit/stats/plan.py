"""Which parameters of a model get a curvature block, and where their uses are captured.

A :class:`TrackingPlan` is built once per model (by :func:`make_plan`) and read by every
consumer of statistics: :func:`curvkit.kronecker_factors`, the optimizers and
:mod:`curvkit.laplace`. It is made of

* **blocks** (:class:`LayerPlan`): one weight (and its bias), or a contiguous range of its
  rows (``nn.MultiheadAttention``'s query, key and value projections share one
  parameter), with the layer handler that defines its ``(d_out, d_in)`` matrix layout;
* **sites** (:class:`Site`): the modules whose forward passes *use* a block's weight. A
  module-level site records its module's input and output (``Linear``, ``Conv``,
  ``Embedding``, ...). A functional site intercepts the ``torch.nn.functional`` calls
  made inside its module's forward on the block's parameter (``F.linear`` on
  ``in_proj_weight`` inside ``nn.MultiheadAttention``). A block has more than one site when
  its weight is tied between modules (GPT-2's embedding and LM head);
* the parameters left to the first-order rule, each with the reason
  (:attr:`TrackingPlan.first_order`).

Uses of one block in one forward pass — a module called several times, tied modules —
are combined by :class:`curvkit.blocks.LayerStats` (see docs/statistics.md).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from curvkit.config import UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedModuleError, WeightTyingError

__all__ = ["BlockSpec", "LayerPlan", "ParamRef", "Site", "TrackingPlan", "make_plan"]


@dataclass(frozen=True)
class ParamRef:
    """A parameter, or a contiguous range ``rows = (start, stop)`` of its first dimension."""

    param: nn.Parameter
    rows: tuple[int, int] | None = None

    def view(self) -> Tensor:
        """The parameter (or its rows, as a view)."""
        return self.param if self.rows is None else self.param[self.rows[0] : self.rows[1]]

    def grad(self) -> Tensor | None:
        """The gradient of :meth:`view` (``None`` before a backward)."""
        g = self.param.grad
        if g is None or self.rows is None:
            return g
        return g[self.rows[0] : self.rows[1]]

    @property
    def shape(self) -> Any:
        return self.view().shape


@dataclass(frozen=True)
class BlockSpec:
    """What a composite handler (one with ``blocks()``) declares for one block.

    Attributes:
        suffix: Appended to the module name (``"q"`` gives ``"attn.q"``); ``""`` keeps it.
        weight, bias: The block's parameters (``bias`` ``None`` without a bias).
        handler: The handler whose feature extraction and matrix layout apply to the
            block's uses (``LinearHandler`` for the projections of attention).
        module: The module handed to that handler (for a child module such as
            ``out_proj``, the child).
        name: Full block name; overrides ``module name + suffix`` when set.
        module_type: The layer type the block behaves as, for methods that treat layer
            types differently (``nn.Linear`` for attention's projections); default: the
            module's type.
    """

    suffix: str
    weight: ParamRef
    bias: ParamRef | None
    handler: Any
    module: nn.Module
    name: str | None = None
    module_type: type[nn.Module] | None = None


@dataclass(frozen=True)
class Site:
    """A module whose forward uses a block's weight.

    Attributes:
        name: Qualified module name.
        module: The module.
        handler: Turns a captured use into features (``input_features`` /
            ``output_features``) in the *site's* own orientation.
        transposed: The site's ``(d_out, d_in)`` is the block's ``(d_in, d_out)`` (an
            embedding tied to an output layer).
        functional: Uses are calls of ``torch.nn.functional`` functions inside the
            module's forward (see :attr:`LayerHandler.functional`), not the module's
            own input and output.
    """

    name: str
    module: nn.Module
    handler: Any
    transposed: bool = False
    functional: bool = False


@dataclass(frozen=True)
class LayerPlan:
    """One curvature block.

    Attributes:
        name: Block name (the module's qualified name, or ``module.suffix`` for a part).
        module: The module whose layout defines the block's matrix (the first site's).
        handler: Its layer handler (``weight_matrix`` / ``weight_from_matrix``).
        has_bias: Whether the bias is folded into ``A`` as an appended constant input.
        weight_ref, bias_ref: The parameters (or row ranges of them).
        sites: The modules whose forwards use the weight (several for a tied weight).
        module_type: The layer type the block behaves as (``None``: ``type(module)``).
    """

    name: str
    module: nn.Module
    handler: Any
    has_bias: bool
    weight_ref: ParamRef
    bias_ref: ParamRef | None = None
    sites: tuple[Site, ...] = ()
    module_type: type[nn.Module] | None = None

    @property
    def weight(self) -> Tensor:
        """The weight (a row view for a part of a parameter)."""
        return self.weight_ref.view()

    @property
    def bias(self) -> Tensor | None:
        return self.bias_ref.view() if self.bias_ref is not None and self.has_bias else None

    @property
    def params(self) -> list[nn.Parameter]:
        """The underlying parameters (weight first)."""
        out = [self.weight_ref.param]
        if self.has_bias and self.bias_ref is not None:
            out.append(self.bias_ref.param)
        return out

    @property
    def is_part(self) -> bool:
        """Whether the block covers only some rows of its parameters."""
        return self.weight_ref.rows is not None or (self.bias_ref is not None and self.bias_ref.rows is not None)

    @property
    def tied(self) -> bool:
        """Whether the weight is used by several modules."""
        return len({id(s.module) for s in self.sites}) > 1

    def describe_sites(self) -> str:
        if not self.tied:
            return ""
        others = [s.name or "<model>" for s in self.sites[1:]]
        how = "transposed" if any(s.transposed for s in self.sites) else "same layout"
        return f" (weight tied with {', '.join(map(repr, others))}, {how})"


@dataclass(frozen=True)
class TrackingPlan:
    """The blocks of a model and what is left out.

    Attributes:
        layers: The blocks, in ``named_modules`` order.
        skipped: Names of modules with trainable parameters that no handler serves (or
            whose configuration their handler refuses).
        first_order: ``{parameter name: reason}`` for every trainable parameter that has
            no block.
    """

    layers: tuple[LayerPlan, ...]
    skipped: tuple[str, ...] = ()
    first_order: dict[str, str] = field(default_factory=dict)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def sites(self) -> dict[int, tuple[Site, list[LayerPlan]]]:
        """``{id(module): (site, blocks it feeds)}`` for every site module."""
        out: dict[int, tuple[Site, list[LayerPlan]]] = {}
        for layer in self.layers:
            for site in layer.sites:
                entry = out.setdefault(id(site.module), (site, []))
                entry[1].append(layer)
        return out


def _known_types(registry: Any) -> str:
    names = {cls.__name__ for n in registry.layer_handlers for cls in registry.layer_handlers.get(n).module_types}
    return ", ".join(sorted(names))


def _orientation(handler: Any, module: nn.Module, weight: Tensor) -> tuple[int, int]:
    from curvkit.stats.handlers import weight_matrix

    rows, cols = weight_matrix(handler, module, weight.detach()).shape
    return int(rows), int(cols)


def _transposed_layouts(h1: Any, m1: nn.Module, h2: Any, m2: nn.Module, weight: Tensor) -> bool | None:
    """Whether two handlers read one weight as transposed matrices (``True``), as the same
    matrix (``False``), or neither (``None``). Decided on a probe tensor of the weight's
    shape holding distinct values, so that a square weight (an embedding tied to an output
    layer with ``V = D``) is not mistaken for a same-layout tie."""
    import torch

    from curvkit.stats.handlers import weight_matrix

    probe = torch.arange(weight.numel(), dtype=torch.float64, device="cpu").reshape(weight.shape)
    first = weight_matrix(h1, m1, probe)
    second = weight_matrix(h2, m2, probe)
    if first.shape == second.shape and torch.equal(first, second):
        return False
    if first.shape == second.shape[::-1] and torch.equal(first.t(), second):
        return True
    return None


def make_plan(model: nn.Module, registry: Any, unsupported: UnsupportedPolicy | str = "warn") -> TrackingPlan:
    """Match every trainable parameter of ``model`` to a block, or to the first-order rule.

    A module is tracked when a handler serves its type and its weight requires grad; its
    bias is folded in when present and trainable. A handler with ``blocks(name, module)``
    (``nn.MultiheadAttention``) declares its blocks itself, possibly covering parameters
    of child modules. A weight already owned by a block (weight tying) adds the module as
    a further *site* of that block: in the same layout (a module called through another
    name, shared layers), or transposed (an embedding tied to an output layer).

    Args:
        model: The model.
        registry: A :class:`~curvkit.registry.Registry` (for the layer handlers).
        unsupported: Policy for modules with trainable parameters and no handler (or a
            configuration their handler refuses): ``"error"`` raises, ``"warn"``
            (default) warns and leaves them to the first-order rule, ``"skip"`` does so
            silently.

    Raises:
        UnsupportedModuleError: Under the ``error`` policy.
        WeightTyingError: A tie that no single block can describe (the message names the
            modules and says why).
    """
    policy = as_enum(UnsupportedPolicy, unsupported, "unsupported")
    layers: dict[str, LayerPlan] = {}
    skipped: list[str] = []
    owners: dict[int, str] = {}  # id(parameter) -> block name (parameters a block owns wholly)
    claimed: set[int] = set()  # modules a composite handler covers
    param_names = {id(p): n for n, p in model.named_parameters()}
    reasons: dict[int, str] = {}

    def refuse(problem: str, name: str, module: nn.Module) -> None:
        if policy is UnsupportedPolicy.ERROR:
            raise UnsupportedModuleError(
                f"{problem} Pass unsupported='warn' or 'skip' to leave its parameters to the first-order rule."
            )
        if policy is UnsupportedPolicy.WARN:
            warnings.warn(
                f"curvkit leaves to the first-order rule: {problem} (unsupported='skip' silences this warning)",
                stacklevel=3,
            )
        skipped.append(name)
        for p in module.parameters(recurse=False):
            reasons.setdefault(id(p), f"module {name!r} ({type(module).__name__}) is not supported")

    for name, module in model.named_modules():
        if id(module) in claimed:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        handler = registry.handler_for(module)
        composite = handler is not None and hasattr(handler, "blocks")
        if not own and not composite:
            continue
        if handler is None:
            refuse(
                f"module {name!r} ({type(module).__name__}) has trainable parameters but no layer handler; "
                f"handled types: {_known_types(registry)}. A plugin can register a layer handler for it.",
                name,
                module,
            )
            continue
        try:
            handler.check(module)
        except UnsupportedModuleError as err:
            refuse(f"module {name!r}: {err}", name, module)
            continue
        if composite:
            specs = handler.blocks(name, module)
            claimed.update(id(m) for m in handler.claims(module))
            if not specs and own:
                refuse(f"module {name!r}: its handler found no trainable weight to precondition", name, module)
            functional = bool(getattr(handler, "functional", ()))
            for spec in specs:
                block_name = spec.name if spec.name is not None else (f"{name}.{spec.suffix}" if spec.suffix else name)
                site = Site(name, module, spec.handler, functional=functional)
                has_bias = spec.bias is not None and spec.bias.param.requires_grad
                layer = LayerPlan(
                    block_name,
                    spec.module,
                    spec.handler,
                    has_bias,
                    spec.weight,
                    spec.bias if has_bias else None,
                    (site,),
                )
                for ref in [spec.weight, spec.bias] if has_bias else [spec.weight]:
                    assert ref is not None
                    if ref.rows is None:
                        if id(ref.param) in owners:
                            raise WeightTyingError(
                                f"block {block_name!r} of module {name!r} uses a parameter that block "
                                f"{owners[id(ref.param)]!r} already owns; curvkit cannot tie a part of attention's "
                                "projections to another module. Untie the weights."
                            )
                        owners[id(ref.param)] = block_name
                    else:
                        owners.setdefault(id(ref.param), "")  # shared by the parts
                layers[block_name] = layer
            continue
        weight = handler.weight(module)
        if not weight.requires_grad:
            refuse(f"module {name!r}: its weight is frozen but its bias is not; freeze both or neither.", name, module)
            continue
        bias = handler.bias(module)
        has_bias = bias is not None and bias.requires_grad
        owner = owners.get(id(weight))
        if owner:  # a tied weight: one more site of an existing block
            _add_tied_site(layers, owner, name, module, handler, bias if has_bias else None, owners)
            continue
        if owner == "":
            raise WeightTyingError(
                f"module {name!r} uses a weight that a multi-head attention block splits into parts; curvkit "
                "cannot tie it. Untie the weights."
            )
        if has_bias and id(bias) in owners:
            raise WeightTyingError(
                f"module {name!r} shares its bias with block {owners[id(bias)]!r} but not its weight; a Kronecker "
                "block covers a weight and its bias together. Tie both or neither."
            )
        layer = LayerPlan(
            name,
            module,
            handler,
            has_bias,
            ParamRef(weight),
            ParamRef(bias) if has_bias and bias is not None else None,
            (Site(name, module, handler),),
        )
        owners[id(weight)] = name
        if has_bias:
            owners[id(bias)] = name
        layers[name] = layer

    covered = {id(p) for layer in layers.values() for p in layer.params}
    first_order: dict[str, str] = {}
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in covered:
            continue
        first_order[pname] = reasons.get(id(p), "not used by its module's layer handler")
    del param_names
    return TrackingPlan(tuple(layers.values()), tuple(skipped), first_order)


def _add_tied_site(
    layers: dict[str, LayerPlan],
    owner: str,
    name: str,
    module: nn.Module,
    handler: Any,
    bias: Tensor | None,
    owners: dict[int, str],
) -> None:
    """Add ``module`` as a site of block ``owner``, whose weight it shares."""
    layer = layers[owner]
    theirs = _orientation(layer.handler, layer.module, layer.weight)
    mine = _orientation(handler, module, handler.weight(module))
    transposed = _transposed_layouts(layer.handler, layer.module, handler, module, layer.weight)
    if transposed is None:
        raise WeightTyingError(
            f"modules {owner!r} and {name!r} share a weight, but their layer handlers read it as "
            f"{theirs[0]}×{theirs[1]} and {mine[0]}×{mine[1]} matrices that are neither equal nor transposes of "
            "each other; no single Kronecker block describes both uses. Untie the weights."
        )
    if transposed and (bias is not None or layer.has_bias):
        raise WeightTyingError(
            f"modules {owner!r} and {name!r} share a weight in transposed layouts ({theirs[0]}×{theirs[1]} and "
            f"{mine[0]}×{mine[1]}) and one of them has a trainable bias; curvkit ties such weights only without "
            "biases (as GPT-2's embedding and LM head). Remove or freeze the bias, or untie the weights."
        )
    if not transposed:
        mine_bias = bias
        theirs_bias = layer.bias_ref.param if layer.bias_ref is not None else None
        if (mine_bias is None) != (theirs_bias is None) or (mine_bias is not None and mine_bias is not theirs_bias):
            raise WeightTyingError(
                f"modules {owner!r} and {name!r} share their weight but not their bias; a Kronecker block covers "
                "a weight and its bias together. Tie both, or give neither a trainable bias."
            )
    site = Site(name, module, handler, transposed=transposed)
    layers[owner] = LayerPlan(
        layer.name,
        layer.module,
        layer.handler,
        layer.has_bias,
        layer.weight_ref,
        layer.bias_ref,
        (*layer.sites, site),
        layer.module_type,
    )
    del owners
