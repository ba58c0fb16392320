r"""laplace-torch backends computed by curvkit: :class:`CurvkitGGN` and :class:`CurvkitEF`.

Use them like laplace-torch's own backends::

    from laplace import Laplace
    from curvkit.laplace import CurvkitGGN

    la = Laplace(model, "classification", hessian_structure="kron", backend=CurvkitGGN)
    la.fit(train_loader)

What each method returns (laplace-torch 0.3's curvature interface; ``ℓ`` is the
sum-reduced loss, ``factor`` ½ for regression and 1 for classification, ``M`` the batch
size, ``N`` the data-set size):

* ``kron(x, y, N)``: ``(factor·ℓ, Kron)`` with, per trainable parameter in
  ``self.params`` order, ``[G, A·M/N]`` for a weight and ``[G·a_bb]`` for a bias, times
  ``factor`` (``G`` summed over the batch, ``A`` averaged; K-FAC-expand or reduce,
  Eschenhagen et al., 2023). Summed over batches this is the K-FAC of the whole data set,
  equal to the curvlinops backend's. A normalisation layer's scale and shift (unit-wise
  layers, :mod:`curvkit.stats.norms`) get one single-factor block each,
  ``[diag(F_{i,γγ})]`` and ``[diag(F_{i,ββ})]`` (times ``factor``): the exact diagonal of
  their curvature, summed over batches exactly. Its ``γ_i``–``β_i`` cross terms are
  dropped, as ``Kron`` holds one block per parameter (the same split as a linear layer's
  weight and bias).
* ``diag`` / ``full``: the exact diagonal / dense GGN (``stochastic=True``: its MC
  estimate; :class:`CurvkitEF`: the empirical Fisher) from per-datum gradients of the
  backpropagated vectors (see :mod:`curvkit.laplace.gradients`), summed over the batch.
* ``jacobians`` ``(M, C, P)`` and ``gradients`` ``(M, P)``: from the same per-datum
  gradients, without ``torch.func``.

Block layouts: an ``nn.Embedding`` (and an embedding tied to its LM head, and any layer
whose handler stores the weight transposed) is a block on the parameter's transpose; its
``Kron`` entry is ``[A·M/N, G]``, which is ``G ⊗ A`` on the transpose. laplace-torch
initialises every weight's ``Kron`` entry with dense factors and adds each batch's to them,
so an embedding's diagonal ``A`` is handed over as a dense ``V × V`` matrix (as laplace-torch
allocates it anyway; :class:`~curvkit.laplace.KroneckerLaplace` keeps it diagonal). For a
weight tied in transposed layouts, each batch's pair is a nearest Kronecker product and
laplace-torch adds the pairs factor by factor, which is exact for one batch and an
approximation of :class:`~curvkit.laplace.KroneckerLaplace`'s data-set pair over several.
``nn.MultiheadAttention``'s query, key and value blocks are row ranges of one parameter,
which ``Kron`` (one Kronecker pair per parameter) cannot express: ``kron`` refuses such a
model with an error naming the blocks, and ``diag``/``full``/Jacobians work (their
per-datum gradients are placed in laplace-torch's flat layout by
:class:`~curvkit.laplace.layout.FlatLayout`).

Frozen parameters, last-layer and subnetwork Laplace are supported. Where a trainable
parameter sits in a module curvkit has no layer handler for, the unsupported-module policy
applies (``unsupported=``, default ``"warn"``, as everywhere in curvkit): the dense methods
fall back to laplace-torch's ``torch.func`` implementations and ``kron`` gives that
parameter its exact dense block; ``"error"`` refuses when the backend is built. The
per-datum gradients need row ``n`` of every tracked layer's input to belong to datum ``n``;
a model that folds data into the layer's batch
dimension (a reward model that runs ``(B, 2, D)`` preference pairs as ``(2B, D)``) breaks
that, which is detected on the first pass, and the dense methods then use laplace-torch's
``torch.func`` versions for this backend instance.

The backends pickle (``torch.save`` of a fitted Laplace object): the default curvkit
registry is stored as a marker and looked up again on load; a custom ``registry=`` is
stored as it is and must itself be picklable.

``kron`` builds its entries from the same :class:`~curvkit.laplace.OperatorBlock` s as
:meth:`KroneckerCurvature.from_factors <curvkit.laplace.KroneckerCurvature.from_factors>`
(:func:`~curvkit.laplace.curvature.layer_blocks`, weight and bias split;
:func:`kron_entry`), and with ``curvature=`` (a :class:`~curvkit.laplace.KroneckerCurvature`
or a trained curvkit optimizer, see :class:`CurvkitGGN`) it uses that curvature instead of
computing one: the laplace-torch side of
:meth:`KroneckerCurvature.from_optimizer <curvkit.laplace.KroneckerCurvature.from_optimizer>`.

Keyword arguments of ``kron``/``diag`` (laplace-torch forwards ``asdl_fisher_kwargs`` to
them): ``kfac_approx`` (``"expand"``/``"reduce"``), ``mc_samples``, ``seed`` or
``generator`` (for ``stochastic=True``; ``seed`` draws the same targets as curvlinops with
that seed), and ``N``.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from laplace.curvature import CurvatureInterface, EFInterface, GGNInterface
from laplace.utils import Kron
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedModuleError
from curvkit.laplace.blocks import OperatorBlock
from curvkit.laplace.curvature import KroneckerCurvature, layer_blocks
from curvkit.laplace.gradients import fisher_gradients, per_sample_gradients
from curvkit.laplace.layout import FlatLayout, storage_kind
from curvkit.laplace.pickling import registry_from_state, registry_to_state
from curvkit.linalg.kronecker import KroneckerOperator, UnitwiseOperator
from curvkit.stats.api import resolve_backend
from curvkit.stats.backend import FactorRequest, UnitwiseFactors
from curvkit.stats.plan import TrackingPlan, make_plan

__all__ = ["CurvkitEF", "CurvkitGGN", "kron_entry"]

_KRON_KWARGS = {"N", "kfac_approx", "mc_samples", "seed", "generator"}


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


class _RowsAreNotData(Exception):
    """A tracked layer's input rows are not the data points (see the module docstring)."""


class _CurvkitInterface(CurvatureInterface):
    """Shared machinery of :class:`CurvkitGGN` and :class:`CurvkitEF`."""

    _statistics_backend: str = "hooks"
    registry: Any = None
    #: A curvature handed over (``curvature=``): a KroneckerCurvature or a trained optimizer.
    _curvature: Any = None
    #: Set once a pass showed that a tracked layer's rows are not the data points; the
    #: dense methods then use laplace-torch's ``torch.func`` implementations.
    _rows_not_data: bool = False

    def _fisher(self) -> FisherType:
        raise NotImplementedError

    def _num_mc_samples(self) -> int:
        return 1

    # --- set-up -----------------------------------------------------------------------

    def _setup(
        self,
        statistics_backend: str,
        registry: Any,
        unsupported: UnsupportedPolicy | str = "warn",
        curvature: Any = None,
    ) -> None:
        if curvature is not None and not isinstance(curvature, KroneckerCurvature):
            from curvkit.laplace.from_optimizer import optimizer_preconditioner

            optimizer_preconditioner(curvature)  # a curvkit optimizer, or raise
        self._curvature = curvature
        if registry is None:
            from curvkit.plugins import default_registry

            registry = default_registry()
        self.registry = registry
        self._statistics_backend = statistics_backend
        self._generator: torch.Generator | None = None
        self.unsupported = as_enum(UnsupportedPolicy, unsupported, "unsupported")
        # the policy applies when the backend is built: "error" refuses, "warn" names the modules
        if self.unsupported is UnsupportedPolicy.ERROR:
            make_plan(self._model, registry, self.unsupported)
            return
        plan = make_plan(self._model, registry, UnsupportedPolicy.SKIP)
        modules = dict(self._model.named_modules())
        skipped = [f"{n!r} ({type(modules[n]).__name__})" for n in plan.skipped]
        if skipped and self.unsupported is UnsupportedPolicy.WARN:
            import warnings

            warnings.warn(
                f"{type(self).__name__}: curvkit has no layer handler for module(s) {', '.join(skipped)}; their "
                "parameters get an exact dense block in kron (from torch.func Jacobians) and laplace-torch's "
                "torch.func path in diag/full. Pass backend_kwargs={'unsupported': 'skip'} to silence this, or "
                "'error' to refuse.",
                stacklevel=3,
            )

    # --- pickling (torch.save of a fitted Laplace object) -----------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_tracking_cache", None)  # rebuilt on first use
        cached = state.pop("_curvature_cache", None)
        if cached is not None:  # an optimizer handed over: keep the curvature it gave, not the optimizer
            state["_curvature"] = cached[1]
        state["registry"] = registry_to_state(state.get("registry"), type(self).__name__)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["registry"] = registry_from_state(state.get("registry"))
        self.__dict__.update(state)

    def _tracking(self) -> tuple[TrackingPlan, FlatLayout] | None:
        """The plan of ``self._model`` and the layout of ``self.params`` (laplace-torch's
        flat order), or ``None`` when some trainable parameter is in a module curvkit cannot
        handle."""
        model = self._model
        key = (id(model), tuple(id(p) for p in self.params))
        cached = getattr(self, "_tracking_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]  # type: ignore[no-any-return]
        plan = make_plan(model, self.registry, UnsupportedPolicy.SKIP)
        covered = {id(p) for layer in plan for p in layer.params}
        mine = {id(p) for p in self.params}
        result = None
        if all(i in covered for i in mine) and covered <= mine:
            result = (plan, FlatLayout(plan, list(self.params)))
        self._tracking_cache = (key, result)
        return result

    def _require_tracking(self, what: str) -> tuple[TrackingPlan, FlatLayout]:
        tracking = self._tracking()
        if tracking is None:
            plan = make_plan(self._model, self.registry, UnsupportedPolicy.SKIP)
            raise UnsupportedModuleError(
                f"{type(self).__name__}.{what} needs every trainable parameter in a layer curvkit has a handler for; "
                f"modules without one: {list(plan.skipped)}. Freeze their parameters, use hessian_structure='diag' "
                "or 'full', or register a layer handler for them."
            )
        return tracking

    def _inputs(self, x: Tensor | MutableMapping[str, Any]) -> Tensor | MutableMapping[str, Any]:
        """The input of ``self._model``: the features in last-layer mode."""
        if not self.last_layer:
            return x
        with torch.no_grad():
            _, features = self.model.forward_with_features(x)  # type: ignore[operator]
        return features.detach()

    def _mc_generator(self, kwargs: dict[str, Any]) -> torch.Generator | None:
        if "generator" in kwargs and kwargs["generator"] is not None:
            generator = kwargs["generator"]
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator={generator!r} must be a torch.Generator.")
            return generator
        device = self.params[0].device
        if "seed" in kwargs:
            return torch.Generator(device=device).manual_seed(int(kwargs["seed"]))
        if self._generator is None:  # one stream over all batches, seeded from the global RNG
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
            self._generator = torch.Generator(device=device).manual_seed(seed)
        return self._generator

    @staticmethod
    def _check_kwargs(kwargs: dict[str, Any], method: str) -> None:
        unknown = sorted(set(kwargs) - _KRON_KWARGS)
        if unknown:
            raise TypeError(
                f"{method}() got unsupported keyword arguments {unknown} (from asdl_fisher_kwargs?); "
                f"curvkit's backends accept {sorted(_KRON_KWARGS)}."
            )

    # --- Kronecker factors ------------------------------------------------------------

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

    def _fisher_rows(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, fisher: FisherType, mc_samples: int, kwargs: dict
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Per pass: the output and the ``(M, P)`` per-datum gradients (subnetwork columns)."""
        plan, layout = self._require_tracking("full")
        generator = self._mc_generator(kwargs) if fisher is FisherType.MC else None
        n = len(y)
        loss_fn: nn.Module = self.lossfunc  # type: ignore[assignment]
        inputs: Tensor = self._inputs(x)  # type: ignore[assignment]
        for output, grads, _ in fisher_gradients(self._model, plan, loss_fn, inputs, y, fisher, mc_samples, generator):
            self._check_rows(grads, n)
            rows = layout.stack(grads, n)
            if self.subnetwork_indices is not None:
                rows = rows[:, self.subnetwork_indices]
            yield output, rows

    def _check_rows(self, grads: dict[str, Tensor], n: int) -> None:
        """Refuse per-layer gradients whose rows are not the ``n`` data points (they would be
        regrouped into wrong per-datum gradients); the caller falls back to ``torch.func``."""
        if any(g.shape[0] != n for g in grads.values()):
            self._rows_not_data = True
            raise _RowsAreNotData

    def _per_datum(self) -> bool:
        """Whether the per-datum gradient path applies (else: laplace-torch's ``torch.func``)."""
        return not self._rows_not_data and self._tracking() is not None

    def _dense(
        self, x: Tensor | MutableMapping[str, Any], y: Tensor, kwargs: dict[str, Any], diagonal: bool
    ) -> tuple[Tensor, Tensor]:
        fisher = self._fisher()
        mc_samples = int(kwargs.get("mc_samples", self._num_mc_samples())) if fisher is FisherType.MC else 1
        total: Tensor | None = None
        output: Tensor | None = None
        for out, rows in self._fisher_rows(x, y, fisher, mc_samples, kwargs):
            output = out
            part = (rows**2).sum(0) if diagonal else rows.t() @ rows
            total = part if total is None else total + part
        assert total is not None and output is not None
        loss = self.lossfunc(output.detach(), y)
        return self.factor * loss.detach(), self.factor * total.detach()

    def full(self, x: Tensor | MutableMapping[str, Any], y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Dense curvature ``(P, P)`` of this batch (summed), and ``factor·ℓ``."""
        self._check_kwargs(kwargs, "full")
        if self._per_datum():
            try:
                return self._dense(x, y, kwargs, diagonal=False)
            except _RowsAreNotData:
                pass
        return super().full(x, y, **kwargs)  # type: ignore[no-any-return, misc]

    def diag(self, x: Tensor | MutableMapping[str, Any], y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Diagonal ``(P,)`` of this batch's curvature (summed), and ``factor·ℓ``."""
        self._check_kwargs(kwargs, "diag")
        if self._per_datum():
            try:
                return self._dense(x, y, kwargs, diagonal=True)
            except _RowsAreNotData:
                pass
        return super().diag(x, y, **kwargs)  # type: ignore[no-any-return, misc]

    def gradients(self, x: Tensor | MutableMapping[str, Any], y: Tensor) -> tuple[Tensor, Tensor]:
        """Per-datum gradients ``(M, P)`` of the sum-reduced loss (without ``factor``), and the loss."""
        if self._per_datum():
            try:
                (output, rows), *_ = list(self._fisher_rows(x, y, FisherType.EMPIRICAL, 1, {}))
                return rows, self.lossfunc(output.detach(), y)
            except _RowsAreNotData:
                pass
        return super().gradients(x, y)

    def jacobians(self, x: Tensor | MutableMapping[str, Any], enable_backprop: bool = False) -> tuple[Tensor, Tensor]:
        """Jacobians ``(M, C, P)`` of the model output and the output ``(M, C)``."""
        if not (enable_backprop or self.last_layer) and self._per_datum():
            try:
                return self._selected(x, None)
            except _RowsAreNotData:
                pass
        return CurvatureInterface.jacobians(self, x, enable_backprop=enable_backprop)

    def selected_output_jacobians(
        self, x: Tensor | MutableMapping[str, Any], outputs: Tensor, enable_backprop: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Jacobians ``(M, K, P)`` of the output coordinates ``outputs`` ``(M,)`` or ``(M, K)``."""
        if not (enable_backprop or self.last_layer) and self._per_datum():
            try:
                return self._selected(x, outputs[:, None] if outputs.ndim == 1 else outputs)
            except _RowsAreNotData:
                pass
        return super().selected_output_jacobians(x, outputs, enable_backprop)

    def _selected(self, x: Tensor | MutableMapping[str, Any], outputs: Tensor | None) -> tuple[Tensor, Tensor]:
        plan, layout = self._tracking()  # type: ignore[misc]

        def vectors(output: Tensor) -> Iterator[Tensor]:
            if output.ndim != 2:
                raise ValueError(f"Jacobians need a model output (M, C); got {tuple(output.shape)}.")
            if outputs is not None and outputs.shape[0] != output.shape[0]:
                raise ValueError("Output selectors must match the input batch size.")
            count = output.shape[1] if outputs is None else outputs.shape[1]
            rows = torch.arange(output.shape[0], device=output.device)
            for j in range(count):
                unit = torch.zeros_like(output)
                if outputs is None:
                    unit[:, j] = 1.0
                else:
                    unit[rows, outputs[:, j].to(output.device, torch.long)] = 1.0
                yield unit

        js = []
        f: Tensor | None = None
        for f, grads in per_sample_gradients(self.model, plan, x, vectors):  # type: ignore[arg-type]
            n = f.shape[0]
            self._check_rows(grads, n)
            rows = layout.stack(grads, n)
            if self.subnetwork_indices is not None:
                rows = rows[:, self.subnetwork_indices]
            js.append(rows)
        assert f is not None
        return torch.stack(js, dim=1).detach(), f.detach()


class CurvkitGGN(_CurvkitInterface, GGNInterface):
    """laplace-torch backend for the generalised Gauss-Newton (Fisher) computed by curvkit.

    ``stochastic=False`` (default) gives the exact GGN (type-2 Fisher); ``stochastic=True``
    its Monte-Carlo estimate with ``num_samples`` sampled targets (``mc_samples`` in
    ``asdl_fisher_kwargs`` overrides it for ``kron``/``diag``).

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y:
            As laplace-torch's ``GGNInterface``.
        stochastic: MC Fisher instead of the exact GGN.
        num_samples: MC samples per datum.
        statistics_backend: curvkit statistics backend for ``kron`` (``"hooks"``, or
            ``"asdl"``/``"backpack"`` when their plugins can serve the model).
        registry: A curvkit registry (``None``: the default one).
        unsupported: Parameters in modules no layer handler serves: ``"warn"`` (default;
            warned about when the backend is built) or ``"skip"`` give each an exact dense
            block in ``kron`` (from ``torch.func`` Jacobians w.r.t. those parameters) and
            let ``diag``/``full`` use laplace-torch's ``torch.func`` path; ``"error"``
            refuses. Pass it with ``Laplace(..., backend_kwargs={"unsupported": ...})``.
        curvature: A curvature to use instead of computing one (``backend_kwargs={"curvature":
            ...}``): a :class:`~curvkit.laplace.KroneckerCurvature` in laplace-torch's layout
            (one block per parameter, e.g. ``KroneckerCurvature.from_optimizer(opt,
            num_data=N, separate_bias=True)``) or a trained curvkit optimizer (converted with
            ``num_data=N`` on the first batch). ``kron`` then returns each batch's loss and the
            curvature's factors times ``M/N``, which laplace-torch's factor-wise sum over the
            batches turns into the curvature itself. Only Kronecker and unit-wise blocks fit
            in ``Kron`` (EKFAC's are refused); all weights only.

    Example:
        >>> import torch
        >>> from laplace import Laplace
        >>> from curvkit.laplace import CurvkitGGN
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> X, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
        >>> la = Laplace(model, "classification", hessian_structure="kron", backend=CurvkitGGN)
        >>> la.fit(loader)
        >>> bool(torch.isfinite(la.log_marginal_likelihood()))
        True
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        statistics_backend: str = "hooks",
        registry: Any = None,
        unsupported: UnsupportedPolicy | str = "warn",
        curvature: Any = None,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1.")
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic, num_samples
        )
        self._setup(statistics_backend, registry, unsupported, curvature)

    def _fisher(self) -> FisherType:
        return FisherType.MC if self.stochastic else FisherType.TYPE2

    def _num_mc_samples(self) -> int:
        return self.num_samples


class CurvkitEF(_CurvkitInterface, EFInterface):
    """laplace-torch backend for the empirical Fisher computed by curvkit.

    ``kron`` gives the K-FAC of the empirical Fisher (true targets), ``diag``/``full`` the
    exact diagonal / dense empirical Fisher ``factor · Σ_n g_n g_nᵀ`` from per-datum
    gradients ``g_n`` of the sum-reduced loss.

    Args:
        model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y:
            As laplace-torch's ``EFInterface``.
        statistics_backend, registry, unsupported, curvature: As :class:`CurvkitGGN`.

    Example:
        >>> import torch
        >>> from laplace import Laplace
        >>> from curvkit.laplace import CurvkitEF
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> X, y = torch.randn(40, 3), torch.randn(40, 1)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
        >>> la = Laplace(model, "regression", subset_of_weights="all", hessian_structure="diag", backend=CurvkitEF)
        >>> la.fit(loader)
        >>> la.H.shape
        torch.Size([41])
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        statistics_backend: str = "hooks",
        registry: Any = None,
        unsupported: UnsupportedPolicy | str = "warn",
        curvature: Any = None,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self._setup(statistics_backend, registry, unsupported, curvature)

    def _fisher(self) -> FisherType:
        return FisherType.EMPIRICAL
