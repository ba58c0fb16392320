"""laplace-torch's ``kron`` for the curvkit backends: each parameter's ``Kron`` entry.

:class:`KronMethods` is the ``kron`` half of :class:`~curvkit.laplace.backend.CurvkitGGN`
and :class:`~curvkit.laplace.backend.CurvkitEF` (see :mod:`curvkit.laplace.backend` for
what it returns): the batch's factors (or a given curvature's, ``curvature=``) as
:class:`~curvkit.laplace.OperatorBlock` s, turned into entries by :func:`kron_entry`, and
the exact dense blocks of parameters no handler serves.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import torch
from laplace.utils import Kron
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedModuleError
from curvkit.laplace.blocks import OperatorBlock
from curvkit.laplace.curvature import KroneckerCurvature, layer_blocks
from curvkit.laplace.layout import FlatLayout, storage_kind
from curvkit.linalg.kronecker import KroneckerOperator, UnitwiseOperator
from curvkit.stats.api import resolve_backend
from curvkit.stats.backend import FactorRequest, UnitwiseFactors
from curvkit.stats.plan import TrackingPlan, make_plan

__all__ = ["KronMethods", "kron_entry"]


def kron_entry(block: OperatorBlock, kind: str, *, g_ratio: float, a_ratio: float, single: float) -> list[Tensor]:
    """laplace-torch's ``Kron`` entry for one parameter's :class:`~curvkit.laplace.OperatorBlock`.

    A Kronecker block ``G ⊗ A`` on the parameter (``kind="standard"``) is ``[G·g_ratio,
    A·a_ratio]``, on its transpose (``"transposed"``: an embedding) ``[A·a_ratio,
    G·g_ratio]``; a bias (``"bias"``, ``A`` 1×1) or a 1×1 weight is the single factor
    ``[G·A·single]``; a normalisation layer's scale or shift (a unit-wise block of one
    column) is ``[diag(F)·single]``.

    Raises:
        UnsupportedModuleError: The block is not a Kronecker product or unit-wise (EKFAC's
            eigenvalue-corrected blocks have no Kronecker pair).
    """
    op = block.operator
    if isinstance(op, UnitwiseOperator):
        return [torch.diag(op.F[:, 0, 0]) * single]
    if not isinstance(op, KroneckerOperator):
        raise UnsupportedModuleError(
            f"block {block.name!r} is a {type(op).__name__}, not a Kronecker product G ⊗ A, so laplace-torch's Kron "
            "cannot hold it (EKFAC's corrected eigenvalues are not a Kronecker pair); use "
            "curvkit.laplace.KroneckerLaplace (e.g. KroneckerLaplace.from_optimizer), which keeps any block operator."
        )
    g, a = op.G, op.A_dense()
    if kind == "bias" or (g.shape[0] == 1 and a.shape[0] == 1):  # one scalar factor, as curvlinops' backend
        return [g * a * single]
    if kind == "transposed":  # the block matrix is the parameter's transpose: A ⊗ G on it
        return [a * a_ratio, g * g_ratio]
    return [g * g_ratio, a * a_ratio]


class KronMethods:
    """The ``kron`` method of the curvkit backends (a mixin of their interface class, whose
    attributes and helpers it uses)."""

    if TYPE_CHECKING:  # provided by the backend's interface class
        _model: nn.Module
        params: list[nn.Parameter]
        factor: float
        lossfunc: Any
        registry: Any
        unsupported: UnsupportedPolicy
        last_layer: bool
        subnetwork_indices: Any
        _curvature: Any
        _curvature_cache: Any
        _statistics_backend: Any

        def _fisher(self) -> FisherType: ...

        def _num_mc_samples(self) -> int: ...

        def _check_kwargs(self, kwargs: dict[str, Any], method: str) -> None: ...

        def _inputs(self, x: Tensor | MutableMapping[str, Any]) -> Tensor | MutableMapping[str, Any]: ...

        def _mc_generator(self, kwargs: dict[str, Any]) -> torch.Generator | None: ...

        def _require_tracking(self, what: str) -> tuple[TrackingPlan, FlatLayout]: ...

        def _tracking(self) -> tuple[TrackingPlan, FlatLayout] | None: ...

    def kron(self, x: Tensor | MutableMapping[str, Any], y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:
        """K-FAC of the sum-reduced loss on this batch, scaled for a data set of ``N`` (with
        ``curvature=``: the given curvature's share ``M/N``)."""
        self._check_kwargs(kwargs, "kron")
        if self._curvature is not None:
            return self._fixed_kron(x, y, N)
        plan, layout, others = self._kron_tracking()
        entries = self._kron_entries(plan, layout)
        mc_samples = int(kwargs.get("mc_samples", self._num_mc_samples()))
        fisher = self._fisher()
        if fisher is not FisherType.MC and mc_samples != 1:
            mc_samples = 1  # laplace-torch may pass the MC sample count to the exact GGN as well
        approx = as_enum(KFACApprox, kwargs.get("kfac_approx", "expand"), "kfac_approx")
        generator = self._mc_generator(kwargs) if fisher is FisherType.MC else None
        inputs = self._inputs(x)
        model = self._model
        request = FactorRequest(model, self.lossfunc, inputs, y, fisher, approx, mc_samples, generator, plan)  # type: ignore[arg-type]
        outputs: list[Tensor] = []
        handle = model.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            factors = resolve_backend(self.registry, self._statistics_backend, request).compute(request)
        finally:
            handle.remove()
        loss = self.lossfunc(outputs[-1].detach(), y)
        ratio = len(y) / N
        # the batch's factors become the same OperatorBlocks as KroneckerCurvature's (layer_blocks,
        # weight and bias split): one path from factors to blocks for from_data, from_optimizer and this
        blocks = self._parameter_blocks(plan, layout, factors)
        exact = self._exact_blocks(inputs, y, others, fisher, mc_samples, generator) if others else {}
        kfacs: list[list[Tensor]] = []
        for layer, kind, _ in entries:
            if layer is None:  # a parameter no handler serves: its exact block
                kfacs.append([exact[kind]])
                continue
            block = blocks[(layer, kind == "bias")]
            # G summed over the batch, A averaged: over batches, G_sum ⊗ A_mean (the bias: G·a_bb, a_bb = 1)
            # (a unit-wise block's F and a bias's G are sums over the batch already: no ratio)
            exact_sum = kind == "bias" or isinstance(block.operator, UnitwiseOperator)
            kfacs.append(kron_entry(block, kind, g_ratio=1.0, a_ratio=ratio, single=1.0 if exact_sum else ratio))
        return self.factor * loss.detach(), Kron(kfacs) * self.factor  # type: ignore[arg-type]

    def _parameter_blocks(
        self, plan: TrackingPlan, layout: FlatLayout, factors: dict[str, Any]
    ) -> dict[tuple[str, bool], OperatorBlock]:
        """``{(layer, is_bias): block}``: each layer's batch factors as
        :class:`~curvkit.laplace.OperatorBlock` s in laplace-torch's layout (weight and bias
        blocks, :func:`~curvkit.laplace.curvature.layer_blocks` with ``separate_bias``)."""
        names = {id(p): n for n, p in self._model.named_parameters()}
        out: dict[tuple[str, bool], OperatorBlock] = {}
        for layer in plan:
            if layer.name not in factors:
                raise ValueError(f"layer {layer.name!r} did not run in the forward pass, so it has no curvature.")
            entry = factors[layer.name]
            if isinstance(entry, UnitwiseFactors):
                op: Any = UnitwiseOperator(entry.F, label=layer.name)
            else:
                a, g = entry
                # a dense A: laplace-torch's Kron initialises every weight with dense factors (V×V for an
                # embedding) and adds ours to them, so a 1-D diagonal would broadcast wrongly
                op = KroneckerOperator(torch.diag(a) if a.ndim == 1 else a, g, label=layer.name)
            for block in layer_blocks(layer, op, names, layout, separate_bias=True):
                out[(layer.name, block.name != layer.name)] = block
        return out

    def _fixed_kron(self, x: Tensor | MutableMapping[str, Any], y: Tensor, N: int) -> tuple[Tensor, Kron]:
        """``kron`` with a curvature handed over (``curvature=``): this batch's loss and the
        curvature's blocks times ``M/N`` in both factors, so that laplace-torch's factor-wise
        sum over the batches is the curvature itself."""
        if self.last_layer or self.subnetwork_indices is not None:
            raise UnsupportedModuleError(
                f"{type(self).__name__}(curvature=...) covers the whole model; use subset_of_weights='all'."
            )
        curvature = self._given_curvature(N)
        with torch.no_grad():
            output = self._model(x)
        loss = self.lossfunc(output.detach(), y)
        ratio = len(y) / N
        names = {id(p): n for n, p in self._model.named_parameters()}
        by_param: dict[str, OperatorBlock] = {}
        for block in curvature.blocks:
            if len(block.param_names) != 1:
                raise UnsupportedModuleError(
                    f"{type(self).__name__}(curvature=...): block {block.name!r} covers {list(block.param_names)}; "
                    "laplace-torch's Kron holds one Kronecker pair per parameter. Build the curvature with "
                    "separate_bias=True (KroneckerCurvature.from_optimizer(..., separate_bias=True))."
                )
            if block.param_names[0] in by_param:
                raise UnsupportedModuleError(
                    f"{type(self).__name__}(curvature=...): parameter {block.param_names[0]!r} is split into several "
                    "blocks (row ranges, as attention's query/key/value), which laplace-torch's Kron cannot hold; "
                    "use curvkit.laplace.KroneckerLaplace."
                )
            by_param[block.param_names[0]] = block
        mine = [names[id(p)] for p in self.params]
        if sorted(mine) != sorted(by_param):
            raise ValueError(
                f"{type(self).__name__}(curvature=...): the curvature covers parameters {sorted(by_param)}, "
                f"laplace-torch fits {sorted(mine)}; they must be the same (freeze the parameters the curvature "
                "leaves out)."
            )
        kfacs = []
        for name, param in zip(mine, self.params):
            block = by_param[name]
            is_bias = block.layer is not None and block.name == f"{block.layer}.bias"  # layer_blocks' bias block
            kind = "bias" if is_bias else storage_kind(block.local_index(), 0, param.shape)
            kfacs.append(kron_entry(block, kind, g_ratio=ratio, a_ratio=ratio, single=ratio))
        return self.factor * loss.detach(), Kron(kfacs) * self.factor  # type: ignore[arg-type]

    def _given_curvature(self, N: int) -> Any:
        """The handed-over curvature; an optimizer becomes one on the first call (``num_data=N``)."""
        given = self._curvature
        if isinstance(given, KroneckerCurvature):
            return given
        cached = getattr(self, "_curvature_cache", None)
        if cached is not None and cached[0] == N:
            return cached[1]
        try:
            curvature = KroneckerCurvature.from_optimizer(given, num_data=int(N), separate_bias=True)
        except ValueError as err:
            if "separate_bias" not in str(err):
                raise
            raise UnsupportedModuleError(
                f"{type(self).__name__}(curvature=optimizer): laplace-torch's Kron holds one Kronecker pair per "
                f"parameter, weight and bias apart, and this optimizer's blocks cannot be split so ({err}). Use "
                "curvkit.laplace.KroneckerLaplace.from_optimizer, which keeps any block operator."
            ) from err
        self._curvature_cache = (N, curvature)
        return curvature

    def _kron_tracking(self) -> tuple[TrackingPlan, FlatLayout, list[nn.Parameter]]:
        """The plan, the layout of the parameters it covers, and the parameters of
        ``self.params`` no handler serves (under ``unsupported="error"``: none, or raise)."""
        tracking = self._tracking()
        if tracking is not None:
            return tracking[0], tracking[1], []
        plan = make_plan(self._model, self.registry, UnsupportedPolicy.SKIP)
        covered = {id(p) for layer in plan for p in layer.params}
        mine = {id(p) for p in self.params}
        if self.unsupported is UnsupportedPolicy.ERROR or not covered <= mine:
            return (*self._require_tracking("kron"), [])
        others = [p for p in self.params if id(p) not in covered]
        return plan, FlatLayout(plan, [p for p in self.params if id(p) in covered]), others

    def _exact_blocks(
        self,
        inputs: Any,
        y: Tensor,
        params: list[nn.Parameter],
        fisher: FisherType,
        mc_samples: int,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """``{parameter name: its dense (numel × numel) curvature block}`` of this batch for
        parameters no layer handler serves, from ``torch.func`` per-datum Jacobians of the
        model output w.r.t. those parameters only and the Fisher type's vectors: the exact
        block (``Σ_n Σ_m (J_nᵀ v_{n,m})(J_nᵀ v_{n,m})ᵀ / Z``, ``Z = 1`` for laplace-torch's
        sum-reduced loss)."""
        from torch.func import functional_call, jacrev, vmap

        from curvkit.stats.losses import loss_adapter

        model = self._model
        names = {id(p): n for n, p in model.named_parameters()}
        mine = {names[id(p)]: p.detach() for p in params}
        rest = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()] if n not in mine}

        def f(theta: dict[str, Tensor], x1: Tensor) -> Tensor:
            return functional_call(model, {**rest, **theta}, (x1.unsqueeze(0),)).squeeze(0)

        if not isinstance(inputs, Tensor):
            raise UnsupportedModuleError(
                f"{type(self).__name__}.kron: parameters {sorted(mine)} have no layer handler, and their exact block "
                "needs tensor inputs; use unsupported='error' to refuse, or register a handler."
            )
        adapter = loss_adapter(self.lossfunc)  # type: ignore[arg-type]
        with torch.no_grad():
            output = model(inputs)
        vectors = [v.reshape(v.shape[0], -1) for v in adapter.output_vectors(output, y, fisher, mc_samples, generator)]
        try:
            jac = vmap(jacrev(f), in_dims=(None, 0))(mine, inputs)  # name -> (N, C, *shape)
            rows = {}
            for name, j in jac.items():
                flat = j.reshape(j.shape[0], j.shape[1], -1)
                rows[name] = [torch.einsum("nc,ncp->np", v.to(flat.dtype), flat) for v in vectors]
        except Exception:  # noqa: BLE001 - a backward without a batching rule (PReLU): one datum at a time
            rows = self._looped_rows(inputs, params, [names[id(p)] for p in params], vectors)
        out: dict[str, Tensor] = {}
        for name, per_vector in rows.items():
            block = sum(g.t() @ g for g in per_vector)
            out[name] = block  # type: ignore[assignment]
        return out

    def _looped_rows(
        self, inputs: Tensor, params: list[nn.Parameter], names: list[str], vectors: list[Tensor]
    ) -> dict[str, list[Tensor]]:
        """Per-datum gradients of ``vᵀ f(x_n)`` w.r.t. ``params``, one backward per datum and
        vector (the fallback of :meth:`_exact_blocks`)."""
        rows: dict[str, list[Tensor]] = {n: [] for n in names}
        with torch.enable_grad():
            output = self._model(inputs)
            for k, v in enumerate(vectors):
                per = {n: [] for n in names}  # type: ignore[var-annotated]
                for i in range(output.shape[0]):
                    last = k == len(vectors) - 1 and i == output.shape[0] - 1
                    grads = torch.autograd.grad(
                        (output[i].reshape(-1) * v[i].to(output.dtype)).sum(), params, retain_graph=not last
                    )
                    for n, g in zip(names, grads):
                        per[n].append(g.reshape(-1))
                for n in names:
                    rows[n].append(torch.stack(per[n]))
        return rows

    def _kron_entries(self, plan: TrackingPlan, layout: FlatLayout) -> list[tuple[Any, str, slice]]:
        """For each of ``self.params``: ``(block, kind, columns of the block's A)`` with kind
        ``"standard"`` (``[G, A]`` on the parameter), ``"transposed"`` (the block matrix is
        the parameter's transpose: ``[A, G]``) or ``"bias"`` (``[G·a_bb]``). A parameter
        that laplace-torch's ``Kron`` cannot express as one Kronecker pair (a row range of
        a parameter, as attention's query/key/value blocks) raises."""
        owners: dict[int, list[Any]] = {}
        for layer in plan:
            owners.setdefault(id(layer.weight_ref.param), []).append((layer, "weight"))
            if layer.bias_ref is not None and layer.has_bias:
                owners.setdefault(id(layer.bias_ref.param), []).append((layer, "bias"))
        names = {id(p): n for n, p in self._model.named_parameters()}
        out: list[tuple[Any, str, slice]] = []
        for param in self.params:
            if id(param) not in owners:  # no handler serves it: an exact dense block (see kron)
                out.append((None, names[id(param)], slice(0)))
                continue
            (layer, role), *more = owners[id(param)]
            index = layout.indices[layer.name]
            d_in = index.shape[1] - (1 if layer.has_bias else 0)
            if more or layer.is_part:
                parts = ", ".join(repr(other.name) for other, _ in [(layer, role), *more])
                raise UnsupportedModuleError(
                    f"{type(self).__name__}.kron cannot express parameter {names[id(param)]!r}: curvkit splits it into "
                    f"the blocks {parts} (row ranges, one Kronecker pair each, as for attention's query, key and value "
                    "projections), and laplace-torch's Kron holds one Kronecker pair per parameter. Use "
                    "hessian_structure='diag' or 'full' with this backend, or curvkit.laplace.KroneckerLaplace, which "
                    "keeps the blocks."
                )
            if role == "bias":
                out.append((layer.name, "bias", slice(d_in, d_in + 1)))
                continue
            kind = storage_kind(index[:, :d_in], layout.offsets[id(param)], param.shape)
            if kind == "other":  # pragma: no cover - every handler's layout is a reshape or a transpose
                raise UnsupportedModuleError(
                    f"{type(self).__name__}.kron cannot express parameter {names[id(param)]!r}: its block matrix is "
                    "neither a reshape of it nor its transpose. Use hessian_structure='diag' or 'full'."
                )
            out.append((layer.name, kind, slice(0, d_in)))
        return out

    # --- per-datum gradients ----------------------------------------------------------
