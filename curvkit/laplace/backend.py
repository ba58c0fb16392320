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
from torch import Tensor, nn

from curvkit.config import FisherType, UnsupportedPolicy, as_enum
from curvkit.errors import UnsupportedModuleError
from curvkit.laplace.backend_kron import KronMethods, kron_entry
from curvkit.laplace.curvature import KroneckerCurvature
from curvkit.laplace.gradients import fisher_gradients, per_sample_gradients
from curvkit.laplace.layout import FlatLayout
from curvkit.laplace.pickling import registry_from_state, registry_to_state
from curvkit.stats.plan import TrackingPlan, make_plan

__all__ = ["CurvkitEF", "CurvkitGGN", "kron_entry"]

_KRON_KWARGS = {"N", "kfac_approx", "mc_samples", "seed", "generator"}


class _RowsAreNotData(Exception):
    """A tracked layer's input rows are not the data points (see the module docstring)."""


class _CurvkitInterface(KronMethods, CurvatureInterface):
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
