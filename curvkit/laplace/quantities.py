r"""A Kronecker-factored Laplace approximation without laplace-torch.

For a network with MAP parameters :math:`\theta_*`, data :math:`\mathcal D` of size ``N``
and a Gaussian prior :math:`\mathcal N(\mu_0, P_0^{-1})`, :math:`P_0 = \mathrm{diag}(p_0)`,
the Laplace approximation (MacKay, 1992; Ritter et al., 2018; Daxberger et al., 2021) is
:math:`\mathcal N(\theta_*, P^{-1})` with the posterior precision

.. math:: P = \frac{1}{\sigma^2 T}\, C + P_0,

where ``C`` is the K-FAC (or EKFAC) GGN of the unit-noise negative log-likelihood
(cross-entropy summed over data for classification, ½·SSE for regression), ``σ`` the
observation noise (regression) and ``T`` a temperature. The log marginal likelihood is

.. math::
    \log p(\mathcal D) \approx \log p(\mathcal D\mid\theta_*)
    - \tfrac12\big(\log\det P - \log\det P_0 + (\theta_*-\mu_0)^\top P_0 (\theta_*-\mu_0)\big),

with :math:`\log p(\mathcal D\mid\theta_*) = -\frac{1}{\sigma^2 T}\,\ell(\theta_*) - c`,
:math:`c = N\,C_{out}\log(\sigma\sqrt{2\pi})` for regression and 0 for classification.
The linearised (GLM) predictive uses :math:`f(x) \sim \mathcal N(f_*(x), J(x) P^{-1}
J(x)^\top)` (Immer et al., 2021), with the probit approximation
(:math:`\mathrm{softmax}(f/\sqrt{1 + \frac\pi8 \mathrm{diag}\,\Sigma_f})`) or MC for
classification.

The conventions are those of laplace-torch 0.3, so every quantity here equals its
``KronLaplace`` with the same prior.

What is refused, and why (see :mod:`curvkit.laplace.checks`): :meth:`KroneckerLaplace.fit`
refuses non-finite parameters or buffers (naming them), batches with non-finite inputs or
targets, and batches whose loss or curvature is non-finite in the working dtype although
their inputs are finite (naming the batch); the log marginal likelihood refuses a zero prior
precision (``log det P_0 = -∞``: the evidence under an improper prior is not defined); a
prior precision must be finite and non-negative and fit the curvature's layout; sample
counts must be positive integers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.config import FisherType, KFACApprox, UnsupportedPolicy, as_enum
from curvkit.laplace.checks import (
    CheckedBatches,
    NonFiniteInputError,
    check_batch_loss,
    check_count,
    check_parameters,
    check_positive,
    check_prior_mean,
    check_prior_precision,
    curvature_is_finite,
    locate_nonfinite_curvature,
)
from curvkit.laplace.curvature import KroneckerCurvature
from curvkit.laplace.gradients import output_jacobians
from curvkit.laplace.layout import FlatLayout
from curvkit.laplace.pickling import registry_from_state, registry_to_state
from curvkit.laplace.prior import PriorMode, block_priors
from curvkit.stats.model_io import call_model, model_logits
from curvkit.stats.plan import TrackingPlan, make_plan

__all__ = ["KroneckerLaplace"]

_LIKELIHOODS = ("classification", "regression")
_STRUCTURES = ("scalar", "layerwise", "diag")
_LINK_APPROX = ("probit", "mc")


class KroneckerLaplace:
    r"""Kronecker-factored Laplace approximation over all tracked parameters.

    Args:
        model: The trained network (its parameters are the MAP).
        likelihood: ``"classification"`` (softmax cross-entropy) or ``"regression"``
            (Gaussian with noise ``sigma_noise``).
        prior_precision: Scalar, per block, or diagonal (see :mod:`curvkit.laplace.prior`).
        prior_mean: Scalar or ``(P,)``.
        sigma_noise: Observation noise standard deviation (regression only).
        temperature: Posterior temperature ``T``.
        fisher: ``"type-2"`` (exact GGN, default), ``"mc"`` or ``"empirical"``.
        kfac_approx: ``"expand"`` or ``"reduce"`` for weight-sharing layers.
        correct_eigenvalues: EKFAC instead of K-FAC.
        separate_bias: Separate weight and bias blocks (laplace-torch's layout; default),
            or one block per layer with the bias folded into ``A``.
        prior_mode: ``"exact"`` (eigenbasis) or ``"factored"`` addition of the prior.
        mc_samples, generator: For ``fisher="mc"``.
        unsupported: Modules with trainable parameters and no layer handler: ``"warn"``
            (default) or ``"skip"`` leave their parameters out of the posterior (fixed at
            their MAP values, as in a subnetwork Laplace); ``"error"`` refuses. The same
            policy and default as :func:`curvkit.kronecker_factors` and the optimizers.
        output_fn: Picks the logits from the model's output (see
            :mod:`curvkit.stats.model_io`).
        backend: Statistics backend for the factors (``"hooks"``, ``"backpack"``,
            ``"asdl"``, ...); a request it cannot serve raises the backend's error, naming
            those that can. The EKFAC correction always uses the capture engine.

    Example:
        >>> import torch
        >>> from curvkit.laplace import KroneckerLaplace
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        >>> X, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 2, (40,))
        >>> la = KroneckerLaplace(model, "classification")
        >>> la.fit([(X[:20], y[:20]), (X[20:], y[20:])], progress=False)
        >>> prior = la.optimize_prior_precision(n_steps=50)
        >>> probs = la.predictive(X[:4])
        >>> probs.shape, bool(torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64)))
        (torch.Size([4, 2]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        *,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        fisher: FisherType | str = "type-2",
        kfac_approx: KFACApprox | str = "expand",
        correct_eigenvalues: bool = False,
        separate_bias: bool = True,
        prior_mode: PriorMode | str = "exact",
        mc_samples: int = 1,
        generator: torch.Generator | None = None,
        registry: Any = None,
        unsupported: UnsupportedPolicy | str = "warn",
        output_fn: Any = None,
        backend: str = "hooks",
    ) -> None:
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r} is not valid; choose one of {_LIKELIHOODS}.")
        if likelihood != "regression" and sigma_noise != 1.0:
            raise ValueError(f"sigma_noise={sigma_noise} applies to regression only; leave it at 1 for classification.")
        for name, value in (("sigma_noise", sigma_noise), ("temperature", temperature)):
            check_positive(name, value)
        check_prior_precision(prior_precision)
        check_prior_mean(prior_mean)
        check_count("mc_samples", mc_samples, 1, "Pass the number of sampled targets per datum, e.g. 1.")
        if registry is None:
            from curvkit.plugins import default_registry

            registry = default_registry()
        self.model = model
        self.likelihood = likelihood
        self.prior_precision: float | Tensor = prior_precision
        self.prior_mean = prior_mean
        self.sigma_noise = float(sigma_noise)
        self.temperature = float(temperature)
        self.fisher = as_enum(FisherType, fisher, "fisher")
        self.kfac_approx = as_enum(KFACApprox, kfac_approx, "kfac_approx")
        self.correct_eigenvalues = correct_eigenvalues
        self.separate_bias = separate_bias
        self.prior_mode = as_enum(PriorMode, prior_mode, "prior_mode")
        self.mc_samples = mc_samples
        self.generator = generator
        self.registry = registry
        self.unsupported = as_enum(UnsupportedPolicy, unsupported, "unsupported")
        if not isinstance(backend, str):
            raise TypeError(f"backend={backend!r} must be a registered statistics backend name (e.g. 'hooks').")
        self.backend = backend
        self.output_fn = output_fn
        self.curvature: KroneckerCurvature | None = None
        #: The training loss at the MAP (sum-reduced, times ½ for regression); ``None`` when
        #: built :meth:`from_optimizer` without data.
        self.loss: float | None = 0.0
        self.n_data = 0
        self.n_outputs = 0

    # --- pickling (torch.save) ---------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["registry"] = registry_to_state(state.get("registry"), type(self).__name__)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["registry"] = registry_from_state(state.get("registry"))
        state.setdefault("backend", "hooks")
        state.setdefault("unsupported", UnsupportedPolicy.WARN)
        state.setdefault("output_fn", None)
        self.__dict__.update(state)

    # --- from a trained optimizer -----------------------------------------------------

    @classmethod
    def from_optimizer(
        cls,
        optimizer: Any,
        likelihood: str,
        data: Iterable[tuple[Tensor, Tensor]] | None = None,
        *,
        num_data: int | None = None,
        scale: float | None = None,
        prior_precision: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        sigma_noise: float = 1.0,
        temperature: float = 1.0,
        separate_bias: bool = False,
        prior_mode: PriorMode | str = "exact",
        unsupported: UnsupportedPolicy | str = "warn",
        output_fn: Any = None,
    ) -> KroneckerLaplace:
        r"""A Laplace approximation from a trained optimizer's curvature (no curvature pass).

        The curvature is :meth:`KroneckerCurvature.from_optimizer
        <curvkit.laplace.KroneckerCurvature.from_optimizer>` of the optimizer (its blocks'
        undamped operators, times the data-set size), the MAP the model's current
        parameters. ``data`` (optional) is used for one forward pass: the training loss at
        the MAP (needed by :meth:`log_likelihood` and :meth:`log_marginal_likelihood`, not
        by the predictive), the number of data ``N`` and of outputs. The result equals
        :meth:`fit` on ``data`` when the optimizer's statistics are those of the final
        parameters over the same data (see :mod:`curvkit.laplace.from_optimizer`); for
        EKFAC, :meth:`fit` with ``correct_eigenvalues=True``.

        Args:
            optimizer: A trained :class:`~curvkit.optim.CurvatureOptimizer` or
                :class:`~curvkit.optim.Preconditioner`; its model is the network.
            likelihood: ``"classification"`` or ``"regression"``; must match the
                optimizer's loss where it has one (``CrossEntropyLoss`` / ``MSELoss``).
            data: Re-iterable ``(inputs, targets)`` batches of the training data, or ``None``.
            num_data: ``N`` (default: counted from ``data``); see
                :meth:`KroneckerCurvature.from_optimizer
                <curvkit.laplace.KroneckerCurvature.from_optimizer>`.
            scale: Instead of ``num_data``: the factor from the optimizer's statistics to
                the curvature of the sum-reduced loss over the data set.
            separate_bias: Default ``False``: the optimizer's layout (one block per layer).
            prior_precision, prior_mean, sigma_noise, temperature, prior_mode, output_fn:
                As :class:`KroneckerLaplace`.
            unsupported: Parameters the optimizer has no curvature for: left out (fixed
                at their trained values) under ``"warn"``/``"skip"``, refused under
                ``"error"``.

        Raises:
            ValueError: The likelihood does not match the optimizer's loss; no way to know
                ``N`` (neither ``data`` nor ``num_data``/``scale``); see
                :meth:`KroneckerCurvature.from_optimizer
                <curvkit.laplace.KroneckerCurvature.from_optimizer>`.
        """
        from curvkit.laplace.from_optimizer import curvature_scale, optimizer_preconditioner

        pre = optimizer_preconditioner(optimizer)
        loss_fn = pre.loss_fn
        expected = {"classification": nn.CrossEntropyLoss, "regression": nn.MSELoss}.get(likelihood)
        if loss_fn is not None and expected is not None and not isinstance(loss_fn, expected):
            raise ValueError(
                f"likelihood={likelihood!r} needs an optimizer trained with {expected.__name__}, but its loss is "
                f"{type(loss_fn).__name__}; the curvature would belong to another likelihood."
            )
        la = cls(
            pre.model,
            likelihood,
            prior_precision=prior_precision,
            prior_mean=prior_mean,
            sigma_noise=sigma_noise,
            temperature=temperature,
            fisher=pre.fisher,
            kfac_approx=getattr(pre.statistics_config, "kfac_approx", KFACApprox.EXPAND),
            separate_bias=separate_bias,
            prior_mode=prior_mode,
            registry=pre.registry,
            unsupported=unsupported,
            output_fn=output_fn,
        )
        total: float | None = None
        count, outputs = 0, 0
        if data is not None:
            if iter(data) is data:  # type: ignore[comparison-overlap]
                raise TypeError("pass data as a DataLoader or a list, not an iterator.")
            check_parameters(la.model)
            total, count, outputs = la._loss_pass(CheckedBatches(data), la._loss_fn())
        if scale is None and num_data is None:
            if data is None:
                raise ValueError(
                    "pass data= (the training batches: N is counted and the loss at the MAP computed), num_data=N, "
                    "or scale=; the optimizer's curvature is a per-datum mean and the Laplace approximation needs "
                    "the sum over the N training data."
                )
            num_data = count
        if (
            likelihood == "regression"
            and loss_fn is None
            and pre.fisher is FisherType.EMPIRICAL
            and scale is None
            and (data is None or outputs > 1)
        ):
            raise ValueError(
                "regression from an empirical-Fisher optimizer without its loss_fn: whether the training loss "
                "averaged over the outputs (MSELoss(reduction='mean') does) is unknown; pass the optimizer's "
                "loss_fn= when building it, or scale= here."
            )
        num_outputs = outputs if data is not None else None
        factor = curvature_scale(pre, num_data, scale, num_outputs)
        curvature = KroneckerCurvature.from_optimizer(
            pre, scale=factor, separate_bias=separate_bias, unsupported=unsupported
        )
        la.correct_eigenvalues = any(b.corrected_eigenvalues is not None for b in curvature.blocks)
        la._install(curvature, total, count if data is not None else int(num_data or 0), outputs)
        return la

    # --- fitting ----------------------------------------------------------------------

    def _loss_fn(self) -> nn.Module:
        return (
            nn.CrossEntropyLoss(reduction="sum") if self.likelihood == "classification" else nn.MSELoss(reduction="sum")
        )

    @property
    def _factor(self) -> float:
        """½ turns the sum-reduced MSE into the unit-noise Gaussian negative log-likelihood."""
        return 0.5 if self.likelihood == "regression" else 1.0

    def fit(self, data: Iterable[tuple[Tensor, Tensor]], progress: bool = True) -> None:
        """Compute the curvature and the training loss at the current parameters.

        Args:
            data: Re-iterable ``(inputs, targets)`` batches (a ``DataLoader`` or a list).
            progress: Show progress bars.

        Raises:
            NonFiniteInputError: A parameter or buffer is non-finite (named); a batch has
                non-finite inputs or targets, or a non-finite loss or curvature in the
                working dtype although its inputs are finite (``.batch`` is its index in
                iteration order). Nothing is stored then.
            ValueError: A regression target's shape differs from the output's; the prior
                does not fit the curvature's layout.
        """
        if iter(data) is data:  # type: ignore[comparison-overlap]
            raise TypeError("data is iterated more than once; pass a DataLoader or a list, not an iterator.")
        check_parameters(self.model)
        batches = CheckedBatches(data)
        loss_fn = self._loss_fn()
        # the loss pass first: a batch that overflows is named before any curvature is computed
        total, count, outputs = self._loss_pass(batches, loss_fn)
        curvature = self._curvature(batches, loss_fn, progress)
        self._install(curvature, total, count, outputs)

    def _loss_pass(self, batches: Iterable[tuple[Tensor, Tensor]], loss_fn: nn.Module) -> tuple[float, int, int]:
        """The sum-reduced loss over ``batches``, the number of data and of outputs."""
        total, count, outputs = 0.0, 0, 0
        with torch.no_grad():
            for index, (inputs, targets) in enumerate(batches):
                out = model_logits(call_model(self.model, inputs), self.output_fn)
                if self.likelihood == "regression" and out.shape != targets.shape:
                    raise ValueError(
                        f"batch {index}: the model's output has shape {tuple(out.shape)} but the targets "
                        f"{tuple(targets.shape)}; MSELoss would broadcast them into a wrong loss. Give targets of "
                        "the output's shape (e.g. y.unsqueeze(-1) for one output)."
                    )
                loss = loss_fn(out, targets)
                check_batch_loss(index, loss, inputs, out)
                total += float(loss)
                count += len(targets)
                outputs = out.shape[-1]
        return total, count, outputs

    def _install(self, curvature: KroneckerCurvature, total: float | None, count: int, outputs: int) -> None:
        """Store a fitted curvature (of the sum-reduced loss) and the loss at the MAP."""
        params = dict(self.model.named_parameters())
        mean = torch.cat([params[n].detach().reshape(-1) for n in curvature.param_names])
        block_priors(  # fits the layout?
            self.prior_precision, curvature.blocks, curvature.dtype, curvature.device, curvature.indices
        )
        check_prior_mean(self.prior_mean, mean.numel())
        self.curvature = curvature * self._factor
        self.loss = None if total is None else self._factor * total
        self.n_data = count
        self.n_outputs = outputs
        self.mean = mean

    def _curvature(self, batches: CheckedBatches, loss_fn: nn.Module, progress: bool) -> KroneckerCurvature:
        """The curvature over ``batches``; a non-finite one is refused, naming the batch."""
        factor_kwargs = dict(
            fisher=self.fisher,
            kfac_approx=self.kfac_approx,
            mc_samples=self.mc_samples,
            registry=self.registry,
            unsupported=self.unsupported,
            output_fn=self.output_fn,
            backend=self.backend,
        )
        state = self.generator.get_state() if self.generator is not None else None
        try:
            curvature = KroneckerCurvature.from_data(
                self.model,
                loss_fn,
                batches,
                generator=self.generator,
                separate_bias=self.separate_bias,
                correct_eigenvalues=self.correct_eigenvalues,
                progress=progress,
                **factor_kwargs,  # type: ignore[arg-type]
            )
        except torch.linalg.LinAlgError as err:  # EKFAC's eigenbasis of non-finite factors?
            from curvkit.stats.api import accumulate_kronecker_factors

            error = self._locate(batches, loss_fn, state, factor_kwargs)
            if error.batch is None:  # no batch on its own: is it their sum, or the eigensolver?
                generator = self._replay(state)
                factors = accumulate_kronecker_factors(
                    self.model, loss_fn, batches, generator=generator, **factor_kwargs
                )
                if all(bool(torch.isfinite(t).all()) for pair in factors.values() for t in pair):
                    raise
            raise error from err
        if not curvature_is_finite(curvature):
            raise self._locate(batches, loss_fn, state, factor_kwargs)
        return curvature

    def _locate(
        self, batches: CheckedBatches, loss_fn: nn.Module, state: Tensor | None, factor_kwargs: dict[str, Any]
    ) -> NonFiniteInputError:
        dtype = next(iter(self.model.parameters())).dtype
        generator = self._replay(state)
        return locate_nonfinite_curvature(self.model, loss_fn, batches, dtype, generator=generator, **factor_kwargs)

    def _replay(self, state: Tensor | None) -> torch.Generator | None:
        """A generator in the state the failed pass started from (the same MC targets)."""
        if self.generator is None or state is None:
            return None
        generator = torch.Generator(device=self.generator.device)
        generator.set_state(state)
        return generator

    def _fitted(self) -> KroneckerCurvature:
        if self.curvature is None:
            raise RuntimeError("the Laplace approximation is not fitted; call fit(data) first.")
        return self.curvature

    # --- quantities -------------------------------------------------------------------

    @property
    def _h_factor(self) -> float:
        return 1.0 / (self.sigma_noise**2 * self.temperature)

    def prior_precision_diag(self, prior_precision: float | Tensor | None = None) -> Tensor:
        """The prior precision as a ``(P,)`` diagonal."""
        curvature = self._fitted()
        prior = self.prior_precision if prior_precision is None else prior_precision
        parts = block_priors(prior, curvature.blocks, curvature.dtype, curvature.device, curvature.indices)
        out = torch.empty(curvature.num_params, 1, dtype=curvature.dtype, device=curvature.device)
        for i, (b, p) in enumerate(zip(curvature.blocks, parts)):
            curvature.scatter(out, i, p.expand(b.d_out, b.k).unsqueeze(0))
        return out[:, 0]

    def posterior_precision(self, prior_precision: float | Tensor | None = None) -> Tensor:
        """The posterior precision ``P = C/(σ²T) + P_0`` as a dense ``(P, P)`` matrix (small models)."""
        curvature = self._fitted()
        return curvature.to_dense() * self._h_factor + torch.diag(self.prior_precision_diag(prior_precision))

    def posterior_covariance(self, prior_precision: float | Tensor | None = None) -> Any:
        """``P^{-1}`` as an operator (:class:`~curvkit.laplace.KroneckerPower`)."""
        prior = self.prior_precision if prior_precision is None else prior_precision
        return (self._fitted() * self._h_factor).inverse(prior, self.prior_mode)

    def log_det_posterior_precision(self, prior_precision: float | Tensor | None = None) -> Tensor:
        """``log det P``, differentiable in the prior precision."""
        prior = self.prior_precision if prior_precision is None else prior_precision
        return (self._fitted() * self._h_factor).logdet(prior, self.prior_mode)

    def log_likelihood(self) -> Tensor:
        """``log p(D | θ_*)`` at the fitted parameters.

        Raises:
            RuntimeError: Built by :meth:`from_optimizer` without ``data``: the training
                loss at the MAP is unknown.
        """
        curvature = self._fitted()
        if self.loss is None:
            raise RuntimeError(
                "the training loss at the MAP is unknown: this Laplace approximation was built from an optimizer "
                "without data. Pass data= to KroneckerLaplace.from_optimizer (one forward pass over the training "
                "data) for the log likelihood and the marginal likelihood; the predictive does not need it."
            )
        value = torch.tensor(-self._h_factor * self.loss, dtype=curvature.dtype, device=curvature.device)
        if self.likelihood == "regression":
            value = value - self.n_data * self.n_outputs * math.log(self.sigma_noise * math.sqrt(2 * math.pi))
        return value

    def log_marginal_likelihood(self, prior_precision: float | Tensor | None = None) -> Tensor:
        """The Laplace approximation of ``log p(D)`` (see the module docstring); differentiable
        in ``prior_precision``.

        Raises:
            ValueError: A prior precision entry is 0. Then ``log det P_0 = -∞``: the prior is
                improper and its evidence is not defined (laplace-torch returns NaN or -inf).
                Also raised when a term overflows the working dtype (the message names it).
        """
        p0 = self.prior_precision_diag(prior_precision)
        if not bool((p0 > 0).all()):
            zeros = int((p0 == 0).sum())
            raise ValueError(
                f"the log marginal likelihood needs a positive prior precision, but {zeros} of {p0.numel()} entries "
                "are 0: log det P_0 = -inf, the prior is improper and the Laplace evidence is not defined (it would "
                "be NaN or -inf). Pass a positive prior_precision (e.g. 1e-4 for a nearly flat prior), or let "
                "optimize_prior_precision() choose one."
            )
        delta = self.mean - self.prior_mean
        scatter = (delta * p0) @ delta
        log_det_posterior = self.log_det_posterior_precision(prior_precision)
        log_det_prior = p0.log().sum()
        log_likelihood = self.log_likelihood()
        value = log_likelihood - 0.5 * (log_det_posterior - log_det_prior + scatter)
        if not bool(torch.isfinite(value)):
            terms = {
                "log p(D|θ)": log_likelihood,
                "log det P": log_det_posterior,
                "log det P_0": log_det_prior,
                "scatter": scatter,
            }
            shown = ", ".join(f"{k} = {float(v):.6g}" for k, v in terms.items())
            raise ValueError(
                f"the log marginal likelihood is {float(value)} in {value.dtype} ({shown}): a term overflows. "
                "Use a smaller prior precision, or fit a float64 copy of the model."
            )
        return value

    def optimize_prior_precision(
        self, structure: str = "scalar", n_steps: int = 100, lr: float = 0.1, init_prior_prec: float = 1.0
    ) -> Tensor:
        """Maximise the log marginal likelihood over the prior precision.

        Adam on ``log p_0`` from ``init_prior_prec``, as laplace-torch's
        ``optimize_prior_precision(method="marglik")`` does, so the result matches its.

        Args:
            structure: ``"scalar"``, ``"layerwise"`` (one per block) or ``"diag"``.
            n_steps, lr: Adam steps and learning rate.
            init_prior_prec: Starting value.

        Returns:
            The optimised prior precision (also stored in :attr:`prior_precision`).
        """
        curvature = self._fitted()
        if structure not in _STRUCTURES:
            raise ValueError(f"structure={structure!r} is not valid; choose one of {_STRUCTURES}.")
        check_count("n_steps", n_steps, 0, "Pass the number of Adam steps, e.g. 100.")
        check_positive("lr", lr, "Pass Adam's learning rate on log p_0, e.g. 0.1.")
        check_positive("init_prior_prec", init_prior_prec, "Pass the starting prior precision, e.g. 1.0.")
        size = {"scalar": 1, "layerwise": len(curvature.blocks), "diag": curvature.num_params}[structure]
        log_prior = torch.full(
            (size,), math.log(init_prior_prec), dtype=curvature.dtype, device=curvature.device, requires_grad=True
        )
        optimizer = torch.optim.Adam([log_prior], lr=lr)
        for _ in range(n_steps):
            optimizer.zero_grad()
            neg = -self.log_marginal_likelihood(log_prior.exp())
            neg.backward()
            optimizer.step()
        self.prior_precision = log_prior.detach().exp()
        return self.prior_precision

    # --- predictive -------------------------------------------------------------------

    def jacobians(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Jacobians ``(M, C, P)`` of the model output w.r.t. the curvature's parameters, and ``f (M, C)``."""
        curvature = self._fitted()
        plan = make_plan(self.model, self.registry, UnsupportedPolicy.SKIP)
        params = dict(self.model.named_parameters())
        covered = set(curvature.param_names)
        names = {id(p): n for n, p in params.items()}
        # the layers of the curvature (from an optimizer: without those it left to first-order steps)
        layers = tuple(layer for layer in plan if all(names[id(p)] in covered for p in layer.params))
        plan = TrackingPlan(layers, plan.skipped, plan.first_order)
        layout = FlatLayout(plan, [params[n] for n in curvature.param_names])
        rows, out = [], None
        for out, grads in output_jacobians(self.model, plan, inputs, self.output_fn):
            rows.append(layout.stack(grads, out.shape[0]))
        assert out is not None
        return torch.stack(rows, dim=1).detach(), out.detach()

    def functional_variance(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """GLM predictive mean ``f_*(x)`` ``(M, C)`` and covariance ``J P^{-1} Jᵀ`` ``(M, C, C)``."""
        js, f = self.jacobians(inputs)
        return f, self.posterior_covariance().square_form(js)

    def predictive(
        self,
        inputs: Tensor,
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Linearised (GLM) predictive.

        Args:
            inputs: A batch ``(M, ...)``.
            link_approx: Classification only: ``"probit"`` or ``"mc"``.
            n_samples, generator: For ``"mc"``.

        Returns:
            Classification: class probabilities ``(M, C)``. Regression: the mean ``(M, C)``
            and the functional covariance ``(M, C, C)`` (add ``σ²`` for the predictive
            of ``y``), as laplace-torch returns them.
        """
        if link_approx not in _LINK_APPROX:
            raise ValueError(f"link_approx={link_approx!r} is not valid; choose one of {_LINK_APPROX}.")
        check_count(
            "n_samples",
            n_samples,
            1,
            "The 'mc' predictive averages that many softmax samples (0 would give NaN probabilities); pass e.g. 100.",
        )
        if isinstance(inputs, Tensor) and not bool(torch.isfinite(inputs).all()):
            raise NonFiniteInputError(
                f"predictive() got inputs {tuple(inputs.shape)} with non-finite entries; their predictions would be "
                "NaN. Drop or repair those rows first."
            )
        f, f_var = self.functional_variance(inputs)
        if self.likelihood == "regression":
            return f, f_var
        if link_approx == "probit":
            kappa = 1 / torch.sqrt(1.0 + math.pi / 8 * torch.diagonal(f_var, dim1=1, dim2=2))
            return torch.softmax(kappa * f, dim=-1)
        jitter = 1e-12 * torch.eye(f.shape[-1], dtype=f.dtype, device=f.device)
        dist = torch.distributions.MultivariateNormal(f, f_var + jitter)
        if generator is not None:
            chol = torch.linalg.cholesky(dist.covariance_matrix)
            z = torch.randn(n_samples, *f.shape, dtype=f.dtype, device=f.device, generator=generator)
            samples = f + torch.einsum("mij,smj->smi", chol, z)
        else:
            samples = dist.sample((n_samples,))
        return torch.softmax(samples, dim=-1).mean(0)

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """Parameter samples ``(num_samples, P)`` from ``N(θ_*, P^{-1})``."""
        check_count("num_samples", num_samples, 1, "Pass the number of parameter samples to draw, e.g. 10.")
        curvature = self._fitted() * self._h_factor
        return curvature.sample(num_samples, self.prior_precision, self.prior_mode, mean=self.mean, generator=generator)
