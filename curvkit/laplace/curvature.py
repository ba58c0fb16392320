r"""Kronecker-factored curvature of a model over a whole data set, as a linear operator.

:class:`KroneckerCurvature` is the block-diagonal matrix

.. math:: C = \mathrm{blockdiag}_\ell\big(G_\ell \otimes A_\ell\big)

(K-FAC, Martens & Grosse, 2015; KFC for convolutions, Grosse & Martens, 2016; expand and
reduce for weight sharing, Eschenhagen et al., 2023), or its eigenvalue-corrected version
(EKFAC, George et al., 2018), over the flat parameter vector
``θ = [p.flatten() for p in tracked parameters]`` (each parameter once, whole, in the order
of the blocks: ``model.parameters()`` order when every trainable parameter is tracked). A
block's matrix may be a row range of a parameter (attention's query/key/value blocks) or its
transpose (an embedding, a tied LM head); each block knows where its entries sit in ``θ``
(:mod:`curvkit.laplace.layout`), so the operator is block-diagonal up to that permutation.
An embedding's ``A`` stays diagonal (a 1-D tensor). Every spectral quantity is exact and
cheap because each block is diagonal in the basis :math:`Q_G \otimes Q_A`:

* :math:`\mathrm{tr}\,C = \sum_\ell \mathrm{tr}\,G_\ell\,\mathrm{tr}\,A_\ell`;
* :math:`\log\det(C + P_0) = \sum_{\ell,i,j}\log(\lambda_{G,i}\lambda_{A,j} + \delta_\ell)`;
* :math:`(C + P_0)^{p}` for any power ``p`` (inverse, inverse square root);
* samples :math:`\theta \sim \mathcal N(\mu, (C + P_0)^{-1})` as
  :math:`\mu + (Q_G\otimes Q_A)\,(S+\delta)^{-1/2}\odot z`.

The prior precision :math:`P_0` may be a scalar, one value per block, or a diagonal (see
:mod:`curvkit.laplace.prior`).

A normalisation layer (``LayerNorm``, ``RMSNorm``, ``BatchNorm*``, ``GroupNorm``) is an
exact unit-wise block :math:`\mathrm{blockdiag}_i(F_i)` over its ``(γ_i, β_i)``
(:class:`~curvkit.laplace.unitwise.UnitwiseBlock`), diagonal in the basis of its ``D``
small eigendecompositions; every quantity above is exact for it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, as_enum
from curvkit.laplace.blocks import OperatorBlock
from curvkit.laplace.layout import FlatLayout, parameter_order
from curvkit.laplace.operator import BlockDiagonalEigen, FlatOperator
from curvkit.laplace.prior import PriorMode, block_priors, factored_shifts
from curvkit.linalg.kronecker import EigenbasisOperator, KroneckerOperator, UnitwiseOperator
from curvkit.linalg.operator import BlockOperator, DenseEigen, OperatorEigen, SpectralOperator
from curvkit.stats.backend import KroneckerFactors, UnitwiseFactors
from curvkit.stats.plan import make_plan

__all__ = ["KroneckerCurvature", "KroneckerPower"]

#: Largest block (in parameters) made dense when a non-constant diagonal prior is added exactly.
DENSE_BLOCK_LIMIT = 4096


class KroneckerCurvature(FlatOperator):
    r"""Block-diagonal Kronecker-factored curvature ``blockdiag(G_ℓ ⊗ A_ℓ)`` as a linear operator.

    Build it from a data loader with :meth:`from_data` (streams the data once, or twice
    for EKFAC), or from precomputed factors with :meth:`from_factors`. The flat layout is
    that of the tracked parameters, each flattened (weight before bias).

    Args:
        blocks: The blocks, in flat order.

    Example:
        >>> import torch
        >>> from curvkit.laplace import KroneckerCurvature
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
        >>> X, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 2, (32,))
        >>> data = [(X[:16], y[:16]), (X[16:], y[16:])]
        >>> loss = torch.nn.CrossEntropyLoss(reduction="sum")
        >>> C = KroneckerCurvature.from_data(model, loss, data, fisher="type-2", progress=False)
        >>> C.shape
        (26, 26)
        >>> bool(torch.allclose(C.logdet(prior_precision=1.0), torch.logdet(C.to_dense() + torch.eye(26))))
        True
    """

    def __init__(self, blocks: Sequence[OperatorBlock]) -> None:
        blocks = list(blocks)
        if not blocks:
            raise ValueError("a KroneckerCurvature needs at least one block; the model has no tracked layer.")
        if not all(isinstance(b, OperatorBlock) for b in blocks):
            raise TypeError(
                f"blocks must be OperatorBlock instances, got {sorted({type(b).__name__ for b in blocks})}; build "
                "them with OperatorBlock(name, param_names, param_shapes, operator, ...) or OperatorBlock.kronecker."
            )
        dtypes = {b.dtype for b in blocks}
        if len(dtypes) != 1:
            raise ValueError(f"all factors must share one dtype; got {sorted(map(str, dtypes))}.")
        # the flat vector: every parameter the blocks touch, once, in order of appearance
        shapes: dict[str, torch.Size] = {}
        for b in blocks:
            for name, shape in zip(b.param_names, b.param_shapes):
                if shapes.setdefault(name, torch.Size(shape)) != torch.Size(shape):
                    raise ValueError(
                        f"parameter {name!r} is given with shapes {tuple(shapes[name])} and {tuple(shape)} by "
                        f"different blocks (block {b.name!r}); one parameter has one shape."
                    )
        self.param_names: list[str] = list(shapes)
        self.param_shapes = list(shapes.values())
        offsets, total = {}, 0
        for name, shape in shapes.items():
            offsets[name] = total
            total += shape.numel()
        device = blocks[0].device
        #: Per block, the ``(d_out, k)`` positions of its matrix entries in the flat vector.
        self.indices: list[Tensor] = []
        for b in blocks:
            # the block's own layout (positions within its parameters, concatenated) -> the flat vector
            lookup = torch.cat(
                [
                    torch.arange(offsets[n], offsets[n] + torch.Size(shape).numel(), device="cpu")
                    for n, shape in zip(b.param_names, b.param_shapes)
                ]
            )
            self.indices.append(lookup[b.local_index().cpu()].to(device))
        covered = torch.bincount(torch.cat([i.reshape(-1) for i in self.indices]).cpu(), minlength=total)
        if covered.numel() != total or not bool((covered == 1).all()):
            raise ValueError(
                f"the blocks {[b.name for b in blocks]} must cover every entry of their parameters "
                f"{self.param_names} exactly once ({int((covered == 0).sum())} entries uncovered, "
                f"{int((covered > 1).sum())} covered more than once); pass one block per part of each parameter."
            )
        self.blocks: list[OperatorBlock] = blocks

    # --- construction -----------------------------------------------------------------

    @classmethod
    def from_factors(
        cls,
        model: nn.Module,
        factors: dict[str, KroneckerFactors | UnitwiseFactors],
        *,
        separate_bias: bool = False,
        unsupported: UnsupportedPolicy | str = "warn",
        registry: Any = None,
    ) -> KroneckerCurvature:
        """Assemble the operator from ``{layer name: KroneckerFactors(A, G)}`` (and
        ``UnitwiseFactors(F)`` for normalisation layers, which become exact
        :class:`~curvkit.laplace.unitwise.UnitwiseBlock` blocks).

        Args:
            model: The model the factors belong to.
            factors: As returned by :func:`curvkit.kronecker_factors` or
                :func:`curvkit.accumulate_kronecker_factors` (bias folded into ``A``).
            separate_bias: Split each layer into a weight block ``G ⊗ A_W`` and a bias block
                ``G ⊗ [a_bb]``, dropping the weight–bias cross terms. This is the layout of
                laplace-torch's ``Kron`` and of curvlinops' ``separate_weight_and_bias=True``.
                A normalisation layer is split likewise into a scale and a shift block (the
                ``γ_i``–``β_i`` cross terms dropped).
            unsupported, registry: As for :func:`curvkit.kronecker_factors`.

        Raises:
            ValueError: A tracked layer has no factors (it did not run).
        """
        if registry is None:
            from curvkit.plugins import default_registry

            registry = default_registry()
        names = {id(p): n for n, p in model.named_parameters()}
        plan = make_plan(model, registry, unsupported)
        layout = FlatLayout(plan, parameter_order(plan))
        blocks: list[OperatorBlock] = []
        for layer in plan:
            if layer.name not in factors:
                raise ValueError(
                    f"no factors for tracked layer {layer.name!r}; did it run in the forward pass (or on a batch "
                    f"of one, broadcast over the data, which curvkit warned about)? Factors were given for "
                    f"{sorted(factors)}."
                )
            entry = factors[layer.name]
            unitwise = getattr(layer.handler, "kind", None) == "unitwise"
            if unitwise != isinstance(entry, UnitwiseFactors):
                want = "UnitwiseFactors(F)" if unitwise else "KroneckerFactors(A, G)"
                raise TypeError(
                    f"layer {layer.name!r} ({type(layer.module).__name__}) needs {want}, got {type(entry).__name__}; "
                    "pass the factors kronecker_factors / accumulate_kronecker_factors returned for this model."
                )
            if isinstance(entry, UnitwiseFactors):
                if entry.F.shape[1] != len(layer.params):
                    raise ValueError(
                        f"layer {layer.name!r}: UnitwiseFactors.F has shape {tuple(entry.F.shape)} but the layer has "
                        f"{len(layer.params)} trainable parameter(s) per unit; "
                        "pass the factors computed for this model."
                    )
                op: BlockOperator = UnitwiseOperator(entry.F, label=layer.name)
            else:
                a, g = entry
                op = KroneckerOperator(a, g, label=layer.name)
            blocks.extend(layer_blocks(layer, op, names, layout, separate_bias))
        return cls(blocks)

    @classmethod
    def from_optimizer(
        cls,
        optimizer: Any,
        *,
        num_data: int | None = None,
        scale: float | None = None,
        num_outputs: int | None = None,
        separate_bias: bool = False,
        unsupported: UnsupportedPolicy | str = "warn",
        dtype: torch.dtype | None = None,
    ) -> KroneckerCurvature:
        r"""The curvature a trained optimizer holds, as a whole-model operator.

        Each preconditioned layer's block gives its undamped curvature estimate
        (``as_operator()``: K-FAC's ``G ⊗ A``, EKFAC's eigenvalue-corrected operator, a
        normalisation layer's exact unit-wise blocks, ...), copied, multiplied by the
        scale that turns the optimizer's per-datum mean into the sum over the data set, and
        placed with the layouts of :meth:`from_factors` (row ranges, transposed and tied
        weights). See :mod:`curvkit.laplace.from_optimizer` for what the stored statistics
        mean and when the result equals a fresh :meth:`from_data` fit.

        Args:
            optimizer: A :class:`~curvkit.optim.CurvatureOptimizer` (``KFAC``, ``EKFAC``,
                ...) or a :class:`~curvkit.optim.Preconditioner`, after training.
            num_data: ``N``, the number of training data (loss terms): the operators are
                multiplied by ``N`` (times ``num_outputs`` for a loss averaged over its
                outputs). Valid when the statistics are per-datum means (a
                ``reduction="mean"`` loss or ``loss_average="batch"``).
            scale: Any other factor, instead of ``num_data`` (e.g. ``N / batch_size``
                for a sum-reduced training loss).
            num_outputs: ``C`` for an ``MSELoss``/``BCEWithLogitsLoss`` averaged over its
                ``C`` outputs (``reduction="mean"``).
            separate_bias: Split each layer into weight and bias blocks (as
                :meth:`from_factors`); only for operators that can drop the cross terms
                (Kronecker and unit-wise ones, not EKFAC's). Default ``False``: the
                optimizer's own layout, one block per layer with the bias folded in.
            unsupported: Parameters the optimizer takes first-order steps for (no handler,
                a layer the method cannot serve, a block that never received statistics):
                ``"warn"`` (default) or ``"skip"`` leave them out (fixed at their trained
                values); ``"error"`` refuses.
            dtype: The operator's dtype (default: the blocks' common one).

        Raises:
            ValueError: No block has statistics yet; the scale is missing or ambiguous.
            UnsupportedModuleError: A block cannot give an operator (names the method and
                the layer); ``unsupported="error"`` and a first-order parameter.
        """
        from curvkit.laplace.from_optimizer import optimizer_curvature

        return optimizer_curvature(
            cls,
            optimizer,
            num_data=num_data,
            scale=scale,
            num_outputs=num_outputs,
            separate_bias=separate_bias,
            unsupported=unsupported,
            dtype=dtype,
        )

    @classmethod
    def from_data(
        cls,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[tuple[Tensor, Tensor]],
        *,
        fisher: FisherType | str,
        kfac_approx: KFACApprox | str = "expand",
        backend: str = "hooks",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        separate_bias: bool = False,
        correct_eigenvalues: bool = False,
        progress: bool = True,
        unsupported: UnsupportedPolicy | str = "warn",
        registry: Any = None,
        output_fn: Any = None,
    ) -> KroneckerCurvature:
        r"""K-FAC (or EKFAC) curvature of ``loss_fn`` over the whole data set.

        The factors are accumulated with :func:`curvkit.accumulate_kronecker_factors`, so
        ``C`` is the curvature of the loss over all ``N`` data as its ``reduction`` defines
        it: for ``reduction="sum"`` (what a Laplace approximation needs) the sum over data,
        for ``"mean"`` the mean — equal to curvlinops' ``KFACLinearOperator`` on the same
        loader.

        With ``correct_eigenvalues=True`` a second pass replaces the spectrum
        :math:`\lambda_G\lambda_A^\top` by the EKFAC correction
        :math:`E = \frac1Z\sum_{n,m}(Q_G^\top \nabla_{V} \ell_{n,m} Q_A)^{\odot 2}` over the
        per-datum gradients of the backpropagated vectors (George et al., 2018), as
        curvlinops' ``EKFACLinearOperator`` does.

        Args:
            model, loss_fn, fisher, kfac_approx, backend, mc_samples, generator, unsupported, registry: As
                :func:`curvkit.accumulate_kronecker_factors`.
            data: Iterable of ``(inputs, targets)`` batches; iterated twice for EKFAC.
            separate_bias: See :meth:`from_factors`.
            correct_eigenvalues: Compute EKFAC instead of K-FAC.
            progress: Show a progress bar over the batches.

        Returns:
            The operator.
        """
        from curvkit.stats.api import accumulate_kronecker_factors

        if correct_eigenvalues and not isinstance(data, Sequence) and iter(data) is data:
            raise TypeError(
                "correct_eigenvalues=True iterates the data twice; pass a re-iterable (a DataLoader or a list), "
                "not a one-shot iterator."
            )
        if registry is None:
            from curvkit.plugins import default_registry

            registry = default_registry()
        if generator is None and as_enum(FisherType, fisher, "fisher") is FisherType.MC and correct_eigenvalues:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
            # on the model's device: MC targets are drawn where the outputs are
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            generator = torch.Generator(device=device).manual_seed(seed)
        state = generator.get_state() if generator is not None else None
        factors = accumulate_kronecker_factors(
            model,
            loss_fn,
            data,
            fisher=fisher,
            kfac_approx=kfac_approx,
            backend=backend,
            mc_samples=mc_samples,
            generator=generator,
            unsupported=unsupported,
            registry=registry,
            progress=progress,
            output_fn=output_fn,
        )
        curvature = cls.from_factors(
            model, factors, separate_bias=separate_bias, unsupported=unsupported, registry=registry
        )
        if not correct_eigenvalues:
            return curvature
        from curvkit.laplace.ekfac import eigenvalue_correction

        if generator is not None and state is not None:
            generator.set_state(state)  # the same MC targets as the factor pass
        return eigenvalue_correction(
            curvature,
            model,
            loss_fn,
            data,
            fisher=fisher,
            mc_samples=mc_samples,
            generator=generator,
            unsupported=unsupported,
            registry=registry,
            progress=progress,
            output_fn=output_fn,
        )

    # --- linear operator --------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    def gather(self, i: int, x: Tensor) -> Tensor:
        """Flat rows ``x`` ``(P, K)`` to block ``i``'s matrices ``(K, d_out, k)``."""
        block = self.blocks[i]
        return x[self.indices[i].reshape(-1)].reshape(block.d_out, block.k, -1).permute(2, 0, 1)

    def scatter(self, out: Tensor, i: int, v: Tensor) -> None:
        """Write block ``i``'s matrices ``v`` ``(K, d_out, k)`` into their rows of ``out`` ``(P, K)``."""
        out[self.indices[i].reshape(-1)] = v.permute(1, 2, 0).reshape(self.blocks[i].numel, -1)

    def _matmat(self, x: Tensor) -> Tensor:
        out = torch.empty_like(x)
        for i, block in enumerate(self.blocks):
            self.scatter(out, i, block.apply(self.gather(i, x)))
        return out

    def to_dense(self) -> Tensor:
        """The operator as a dense ``(P, P)`` matrix: ``blockdiag(G ⊗ A)`` permuted to the
        flat parameter order (for small models and tests)."""
        out = torch.zeros(self.num_params, self.num_params, dtype=self.dtype, device=self.device)
        for b, index in zip(self.blocks, self.indices):
            i = index.reshape(-1)
            out[i.unsqueeze(1), i.unsqueeze(0)] = b.kron()
        return out

    def diagonal(self) -> Tensor:
        """``diag(C)`` ``(P,)``: ``diag(G) ⊗ diag(A)`` per block (or its EKFAC counterpart)."""
        out = torch.empty(self.num_params, dtype=self.dtype, device=self.device)
        for i, b in enumerate(self.blocks):
            self.scatter(out.unsqueeze(1), i, b.diagonal().unsqueeze(0))
        return out

    def trace(self) -> Tensor:
        """``tr C = Σ_ℓ tr G_ℓ · tr A_ℓ`` (or the sum of the corrected eigenvalues)."""
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for b in self.blocks:
            total = total + b.trace()
        return total

    def _with_blocks(self, blocks: list[OperatorBlock], cls: type[KroneckerCurvature] | None = None) -> Any:
        """A curvature of the same layout with other blocks (the same parameters, one for one)."""
        new = object.__new__(cls or type(self))
        new.param_names, new.param_shapes, new.indices = self.param_names, self.param_shapes, self.indices
        new.blocks = blocks
        return new

    def __mul__(self, scale: float | Tensor) -> KroneckerCurvature:
        """``scale · C`` (a non-negative number)."""
        value = float(scale)
        if value < 0:
            raise ValueError(f"scale={value} must be non-negative to keep the curvature positive semi-definite.")
        return KroneckerCurvature([b.scaled(value) for b in self.blocks])

    __rmul__ = __mul__

    # --- spectral quantities ----------------------------------------------------------

    def eigendecomposition(self) -> list[OperatorEigen]:
        """Per block, its operator's eigendecomposition (cached): for a Kronecker block
        ``G = Q_G diag(λ_G) Q_Gᵀ`` and ``A = Q_A diag(λ_A) Q_Aᵀ``
        (:class:`~curvkit.linalg.kronecker.KroneckerEigen`); for a normalisation layer's
        block, ``F_i = Q_i diag(λ_i) Q_iᵀ`` per unit
        (:class:`~curvkit.linalg.kronecker.UnitwiseEigen`)."""
        return [b.eigen() for b in self.blocks]

    def eigenvalues(self) -> Tensor:
        """All ``P`` eigenvalues of ``C``, block by block (``λ_G ⊗ λ_A`` row-major, or the
        EKFAC spectrum)."""
        return torch.cat([b.spectrum().reshape(-1) for b in self.blocks])

    def eigen(self) -> BlockDiagonalEigen:
        """``C = Q diag(λ) Qᵀ`` over the flat vector (the protocol's ``eigen()``): the
        blocks' eigendecompositions placed at their parameters' positions."""
        return BlockDiagonalEigen(self, self.eigendecomposition())

    def _priors(self, prior_precision: float | Tensor, mode: PriorMode | str) -> tuple[list[Tensor], PriorMode]:
        mode = as_enum(PriorMode, mode, "prior_mode")
        priors = block_priors(prior_precision, self.blocks, self.dtype, self.device, self.indices)
        for block, delta in zip(self.blocks, priors):
            if delta.ndim == 0:
                continue
            if mode is PriorMode.FACTORED:
                raise ValueError(
                    f"prior_mode='factored' needs a prior precision that is constant on each block, but it varies "
                    f"within block {block.name!r}; pass a scalar or one value per block, or use prior_mode='exact'."
                )
            if block.numel > DENSE_BLOCK_LIMIT:
                raise ValueError(
                    f"a diagonal prior that varies within block {block.name!r} ({block.numel} parameters) makes the "
                    f"block dense, which is allowed up to {DENSE_BLOCK_LIMIT} parameters; pass a scalar or one "
                    "value per block instead."
                )
        return priors, mode

    def _shifted_spectrum(self, block: OperatorBlock, delta: Tensor, mode: PriorMode, pi: bool) -> Tensor:
        op = block.operator
        if mode is PriorMode.EXACT or isinstance(op, UnitwiseOperator):  # nothing to factor: exact
            return block.spectrum() + delta
        if isinstance(op, EigenbasisOperator):
            raise ValueError(
                f"prior_mode='factored' is undefined for the eigenvalue-corrected block {block.name!r}; "
                "use prior_mode='exact'."
            )
        if not isinstance(op, KroneckerOperator):
            raise ValueError(
                f"prior_mode='factored' adds the prior to the Kronecker factors, but block {block.name!r} is a "
                f"{type(op).__name__}, not a Kronecker product; use prior_mode='exact'."
            )
        eig = op.eigen()
        assert eig.lambda_G is not None and eig.lambda_A is not None
        shift_g, shift_a = factored_shifts(op, delta, pi)
        return torch.outer(eig.lambda_G + shift_g, eig.lambda_A + shift_a)

    def _shifted_basis(self, block: OperatorBlock, delta: Tensor, mode: PriorMode, pi: bool) -> tuple[Any, Tensor]:
        """The eigenbasis of ``block + prior`` and its eigenvalues ``(d_out, k)``: the block's
        own basis for a constant prior, the dense ``block + diag(δ)``'s for a varying one."""
        if delta.ndim == 2:  # non-constant diagonal prior: dense block
            evals, evecs = torch.linalg.eigh(block.kron() + torch.diag(delta.reshape(-1)))
            return DenseEigen(evecs, evals, (block.d_out, block.k)), evals.reshape(block.d_out, block.k)
        return block.eigen(), self._shifted_spectrum(block, delta, mode, pi)

    def logdet(
        self, prior_precision: float | Tensor = 0.0, prior_mode: PriorMode | str = "exact", pi_correction: bool = True
    ) -> Tensor:
        r"""``log det(C + P_0)``, exact in the eigenbasis (or under the factored approximation).

        Differentiable in ``prior_precision``.

        Args:
            prior_precision: Scalar, per block, or diagonal (see :mod:`curvkit.laplace.prior`);
                the protocol's ``shift``.
            prior_mode: ``"exact"`` or ``"factored"``.
            pi_correction: Use the π heuristic in factored mode.
        """
        priors, mode = self._priors(prior_precision, prior_mode)
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        for block, delta in zip(self.blocks, priors):
            if delta.ndim == 2:
                total = total + torch.linalg.slogdet(block.kron() + torch.diag(delta.reshape(-1)))[1]
            else:
                total = total + self._shifted_spectrum(block, delta, mode, pi_correction).log().sum()
        return total

    def power(
        self,
        exponent: float,
        prior_precision: float | Tensor = 0.0,
        prior_mode: PriorMode | str = "exact",
        pi_correction: bool = True,
    ) -> KroneckerPower:
        """``(C + P_0)^exponent`` as an operator (e.g. ``-1`` inverse, ``-0.5`` inverse root);
        itself a block-diagonal curvature operator in the same layout.

        Raises:
            ValueError: A negative exponent of a singular block + prior (the message names it).
        """
        priors, mode = self._priors(prior_precision, prior_mode)
        exponent = float(exponent)
        blocks = []
        for block, delta in zip(self.blocks, priors):
            basis, shifted = self._shifted_basis(block, delta, mode, pi_correction)
            if exponent < 0 and not bool(shifted.min() > 0):
                raise ValueError(
                    f"block {block.name!r} + prior is singular (smallest eigenvalue {float(shifted.min()):.3g}); "
                    "a negative power needs a positive prior precision."
                )
            blocks.append(block.replace(operator=SpectralOperator(basis, shifted.pow(exponent), label=block.name)))
        power = self._with_blocks(blocks, KroneckerPower)
        power.exponent = exponent
        return power  # type: ignore[no-any-return]

    def inverse(
        self, prior_precision: float | Tensor = 0.0, prior_mode: PriorMode | str = "exact", pi_correction: bool = True
    ) -> KroneckerPower:
        """The damped inverse ``(C + P_0)^{-1}`` as an operator (a posterior covariance)."""
        return self.power(-1.0, prior_precision, prior_mode, pi_correction)

    def sample(
        self,
        num_samples: int,
        prior_precision: float | Tensor = 0.0,
        prior_mode: PriorMode | str = "exact",
        *,
        mean: Tensor | None = None,
        generator: torch.Generator | None = None,
        pi_correction: bool = True,
    ) -> Tensor:
        r"""Draw ``θ ~ N(mean, (C + P_0)^{-1})``, ``(num_samples, P)``.

        Computed as :math:`\theta = \mu + (Q_G\otimes Q_A)\,(S + \delta)^{-1/2}\odot z` with
        :math:`z\sim\mathcal N(0, I)`, one rotation per block and sample.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples={num_samples!r} must be an integer >= 1.")
        priors, mode = self._priors(prior_precision, prior_mode)
        flat = torch.empty(self.num_params, num_samples, dtype=self.dtype, device=self.device)
        for i, (block, delta) in enumerate(zip(self.blocks, priors)):
            z = torch.randn(
                num_samples, block.d_out, block.k, dtype=self.dtype, device=self.device, generator=generator
            )
            basis, shifted = self._shifted_basis(block, delta, mode, pi_correction)
            self.scatter(flat, i, basis.unrotate(_inverse_sqrt(block.name)(shifted) * z))
        samples = flat.t()
        if mean is not None:
            if mean.shape != (self.num_params,):
                raise ValueError(f"mean must have shape ({self.num_params},), got {tuple(mean.shape)}.")
            samples = samples + mean
        return samples


def _local_index(layout: FlatLayout, layer: Any) -> Tensor:
    """The layer's ``(d_out, k)`` matrix positions within its own parameters (concatenated,
    each flattened, in ``layer.params`` order): the layout a block's ``index`` describes."""
    flat_to_local = torch.full((layout.num_params,), -1, dtype=torch.long, device="cpu")
    start = 0
    for p in layer.params:
        offset = layout.offsets[id(p)]
        flat_to_local[offset : offset + p.numel()] = torch.arange(start, start + p.numel(), device="cpu")
        start += p.numel()
    return flat_to_local[layout.indices[layer.name]]


def layer_blocks(
    layer: Any, op: BlockOperator, names: dict[int, str], layout: FlatLayout, separate_bias: bool
) -> list[OperatorBlock]:
    """The blocks of one tracked layer whose curvature is ``op`` on its ``(d_out, k)``
    matrix: one block, or (``separate_bias`` and a layer with a bias or shift) a weight
    block and a ``"<layer>.bias"`` block, the cross terms dropped (``op.split_columns``:
    :class:`~curvkit.linalg.kronecker.KroneckerOperator` and
    :class:`~curvkit.linalg.kronecker.UnitwiseOperator` have it).

    Raises:
        ValueError: ``op`` does not fit the layer's matrix, or cannot be split.
    """
    index = _local_index(layout, layer)  # positions within the layer's own parameters
    if tuple(op.matrix_shape) != tuple(index.shape):
        raise ValueError(
            f"layer {layer.name!r}: its curvature acts on {tuple(op.matrix_shape)} matrices but the layer's matrix "
            f"[W b] is {tuple(index.shape)}."
        )
    params = layer.params
    pnames = tuple(names[id(p)] for p in params)
    pshapes = tuple(p.shape for p in params)
    k = index.shape[1]
    if layer.bias is None or not separate_bias:
        return [OperatorBlock(layer.name, pnames, pshapes, op, index, layer.name, (0, k))]
    split = getattr(op, "split_columns", None)
    if split is None:
        raise ValueError(
            f"layer {layer.name!r}: separate_bias=True drops the weight-bias cross terms of a block, which needs a "
            f"Kronecker or unit-wise block; this layer's curvature is a {type(op).__name__}. Use separate_bias=False."
        )
    d = k - 1
    weight_op, bias_op = split(d)
    return [
        OperatorBlock(layer.name, pnames[:1], pshapes[:1], weight_op, index[:, :d], layer.name, (0, d)),
        OperatorBlock(
            f"{layer.name}.bias",
            pnames[1:],
            pshapes[1:],
            bias_op,
            index[:, d:] - pshapes[0].numel(),  # positions within the bias alone
            layer.name,
            (d, k),
        ),
    ]


def _inverse_sqrt(name: str) -> Callable[[Tensor], Tensor]:
    def fn(s: Tensor) -> Tensor:
        if bool((s <= 0).any()):
            raise ValueError(f"block {name!r} + prior is singular (a zero eigenvalue); add a positive prior precision.")
        return s.rsqrt()

    return fn


class KroneckerPower(KroneckerCurvature):
    """``(C + P_0)^p`` of a :class:`KroneckerCurvature`: the same layout, each block the
    spectral function of its block of ``C + P_0`` in that block's eigenbasis
    (:class:`~curvkit.linalg.operator.SpectralOperator`), so it is a curvature operator
    itself (``trace``, ``logdet``, ``power``, ``eigen`` in closed form).

    Built by :meth:`KroneckerCurvature.power` / :meth:`KroneckerCurvature.inverse`.

    Attributes:
        exponent: ``p``.
    """

    exponent: float

    def square_form(self, J: Tensor) -> Tensor:
        """``J (C + P_0)^p Jᵀ`` for ``J`` ``(..., M, P)``: e.g. the GLM functional covariance."""
        if J.shape[-1] != self.num_params:
            raise ValueError(f"J must have {self.num_params} columns (parameters), got shape {tuple(J.shape)}.")
        lead = J.shape[:-1]
        flat = J.reshape(-1, self.num_params)
        product = self._matmat(flat.t()).t()  # (rows, P)
        rows = lead[-1] if lead else 1
        batch = flat.shape[0] // rows
        return torch.bmm(flat.view(batch, rows, -1), product.view(batch, rows, -1).transpose(1, 2)).reshape(*lead, rows)
