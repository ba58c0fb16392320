r"""SKFAC (Tang et al., CVPR 2021): Kronecker factors of the current batch only, inverted by
the Woodbury identity.

A batch factor is :math:`X = R^\top R` with ``R`` the ``n×d`` row matrix of the batch
(:meth:`curvkit.blocks.LayerStats.rows`: ``n = N`` for a Linear layer), so

.. math:: (R^\top R + s I_d)^{-1} = \tfrac1s\big[I_d - R^\top (R R^\top + s I_n)^{-1} R\big]

needs only an ``n×n`` Cholesky factorisation. Without an EMA the factor stays rank ``≤ n``.
The step is :math:`\Delta = (G_b + \sqrt\lambda I)^{-1}\nabla(A_b + \sqrt\lambda I)^{-1}`
(:class:`EqualSplitDamping`, the official code's ``damping = sqrt(damping_step)`` on both
factors), applied lean in :math:`O(n\,d_i d_o)` without forming a ``d×d`` inverse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit.blocks import BlockInfo, CurvatureBlock, KroneckerOperator, LayerStats
from curvkit.config import check_number
from curvkit.errors import ConfigError, IncompatibleComponentsError, UnsupportedModuleError
from curvkit.linalg.damping import ConstantDamping, Damping, ExactDamping, PiDamping, ScalarDamping
from curvkit.linalg.inverters import KroneckerInverse, compute_dtype, inverse_from_state, inverse_state
from curvkit.methods import MethodSpec, Schedule, StatisticsConfig, names_a_damping
from curvkit.numerics import all_finite
from curvkit.structures.base import DenseStructure

__all__ = [
    "EqualSplitDamping",
    "SKFACBlock",
    "SKFACConfig",
    "SKFAC_SPEC",
    "WoodburyFactor",
    "conv_rows",
    "subsample_indices",
    "WoodburyInverse",
]


@dataclass(frozen=True, kw_only=True)
class EqualSplitDamping(ScalarDamping):
    r""":math:`\sqrt\lambda` on each factor, :math:`(A + \sqrt\lambda I)^{-1}\otimes(G + \sqrt\lambda I)^{-1}`
    (π = 1; SKFAC's official code).

    Args:
        value: :math:`\lambda > 0`.
    """

    name: ClassVar[str] = "equal-split"

    def factor_shifts(self, A: Any, G: Any, lam: float) -> tuple[float, float]:
        root = math.sqrt(lam)
        return root, root


class WoodburyFactor:
    r"""The damped inverse of :math:`R^\top R + sI` for the ``n×d`` row matrix ``R``.

    With ``n < d`` it keeps ``R`` and the Cholesky factor ``L`` of :math:`R R^\top + s I_n`
    (Woodbury, ``O(n²d)`` to build). With ``n ≥ d`` Woodbury saves nothing (SKFAC's own
    caveat), so it keeps an empty ``R`` (``0×d``) and the Cholesky factor of
    :math:`R^\top R + s I_d`.
    """

    def __init__(self, R: Tensor, L: Tensor, shift: float) -> None:
        self.R, self.L, self.shift = R, L, float(shift)

    @property
    def woodbury(self) -> bool:
        """Whether the Woodbury form (rather than the direct ``d×d`` one) is used."""
        return self.R.shape[0] > 0

    @classmethod
    def build(cls, R: Tensor, shift: float) -> WoodburyFactor | None:
        """Factorise in float32 at least, retrying in float64; ``None`` on failure."""
        if not (shift > 0 and math.isfinite(shift)):
            return None
        dtype = compute_dtype(R.dtype)
        n, d = R.shape
        for attempt in (dtype, torch.float64) if dtype != torch.float64 else (torch.float64,):
            r = R.to(attempt)
            gram = r @ r.t() if n < d else r.t() @ r
            gram.diagonal().add_(shift)
            L, info = torch.linalg.cholesky_ex(gram)
            if int(info) == 0 and all_finite(L):
                kept = r.to(dtype) if n < d else r.new_zeros(0, d, dtype=dtype)
                return cls(kept, L.to(dtype), shift)
        return None

    @classmethod
    def damping_only(cls, d: int, shift: float, like: Tensor) -> WoodburyFactor:
        """:math:`(sI)^{-1}`, built without a factorisation (one zero row; a shift that is not
        finite and positive counts as 1): the fallback of a first refresh that failed."""
        if not (shift > 0 and math.isfinite(shift)):
            shift = 1.0
        dtype = compute_dtype(like.dtype)
        R = torch.zeros(1, d, dtype=dtype, device=like.device)
        L = torch.full((1, 1), math.sqrt(shift), dtype=dtype, device=like.device)
        return cls(R, L, shift)

    def solve_left(self, M: Tensor) -> Tensor:
        """:math:`(R^\top R + sI)^{-1} M`."""
        if not self.woodbury:
            return torch.cholesky_solve(M, self.L)
        return (M - self.R.t() @ torch.cholesky_solve(self.R @ M, self.L)) / self.shift

    def solve_right(self, M: Tensor) -> Tensor:
        """:math:`M (R^\top R + sI)^{-1}`."""
        if not self.woodbury:
            return torch.cholesky_solve(M.t(), self.L).t()
        return (M - torch.cholesky_solve(self.R @ M.t(), self.L).t() @ self.R) / self.shift

    def to_dense_inverse(self) -> Tensor:
        return self.solve_left(
            torch.eye(
                self.L.shape[0] if not self.woodbury else self.R.shape[1], dtype=self.L.dtype, device=self.L.device
            )
        )


class WoodburyInverse(KroneckerInverse):
    r""":math:`\Delta = (R_G^\top R_G + s_G I)^{-1}\nabla(R_A^\top R_A + s_A I)^{-1}` by Woodbury."""

    kind = "woodbury"

    def __init__(self, A: WoodburyFactor, G: WoodburyFactor) -> None:
        self.A, self.G = A, G

    def apply(self, grad: Tensor) -> Tensor:
        m = grad.to(self.A.R.dtype)
        return self.A.solve_right(self.G.solve_left(m)).to(grad.dtype)

    def tensors(self) -> dict[str, Tensor]:
        shifts = torch.tensor([self.A.shift, self.G.shift], dtype=torch.float64, device="cpu")
        return {"R_A": self.A.R, "L_A": self.A.L, "R_G": self.G.R, "L_G": self.G.L, "shifts": shifts}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> WoodburyInverse:
        s = tensors["shifts"].tolist()
        return cls(
            WoodburyFactor(tensors["R_A"], tensors["L_A"], s[0]), WoodburyFactor(tensors["R_G"], tensors["L_G"], s[1])
        )


CONV_STRATEGIES = ("reduce_sum", "subsample", "kfac")
SUBSAMPLE_MODES = ("random", "strided")


def subsample_indices(n: int, t: int, s: int, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """``(n, min(s, t))`` output-location indices kept per sample: ``"strided"`` takes the same
    evenly spaced locations ``⌊k t / s⌋`` for every sample, ``"random"`` a uniformly random
    subset (without replacement) per sample drawn from ``generator``."""
    s = min(s, t)
    if mode == "strided":
        return (torch.arange(s, device="cpu") * t // s).expand(n, s)
    if mode == "random":
        return torch.rand(n, t, generator=generator, dtype=torch.float64, device="cpu").argsort(dim=1)[:, :s]
    raise ValueError(f"subsample mode {mode!r} must be one of {SUBSAMPLE_MODES}")


def conv_rows(stats: Any, strategy: str, indices: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""SKFAC's dimension-reduced rows of a conv layer: ``(a_rows (n, d_in), g_rows (P, n, d_out))``
    with ``A_b = a_rowsᵀ a_rows`` and ``G_b = Σ_p g_rows[p]ᵀ g_rows[p]``.

    * ``"reduce_sum"`` (official code): ``n = N``, :math:`\hat a_n = \operatorname{mean}_t a_{n,t}/\sqrt N`,
      :math:`\hat g_n = \sqrt{	ext{g\_scale}}\,\operatorname{mean}_t g_{n,t}` (the code's
      ``mean_t(N·dout)/√N`` for a mean loss). ``G_b`` is K-FAC-reduce's divided by ``T²``.
    * ``"subsample"`` (inferred): ``n = N|S|``, the columns at the kept locations ``indices``
      (``(N, |S|)``), :math:`a_{n,t}/\sqrt{N|S|}` and :math:`\sqrt{	ext{g\_scale}\,T/|S|}\,g_{n,t}`,
      so each factor is an unbiased estimate of K-FAC-expand's (equal to it for ``S`` = all).
    """
    a, g = stats.a_features, stats.g_features
    n, t = a.shape[0], a.shape[1]
    if strategy == "reduce_sum":
        return a.mean(1) / math.sqrt(n), g.mean(2) * math.sqrt(stats.g_scale)
    if strategy == "subsample":
        if indices is None:
            raise ValueError("conv_rows(strategy='subsample') needs the kept location indices")
        s = indices.shape[1]
        idx = indices.to(a.device)
        a_sel = torch.gather(a, 1, idx[:, :, None].expand(n, s, a.shape[2]))
        g_sel = torch.gather(g, 2, idx[None, :, :, None].expand(g.shape[0], n, s, g.shape[3]))
        a_rows = a_sel.reshape(n * s, -1) / math.sqrt(n * s)
        g_rows = g_sel.reshape(g.shape[0], n * s, -1) * math.sqrt(stats.g_scale * t / s)
        return a_rows, g_rows
    raise ValueError(f"conv strategy {strategy!r} must be 'reduce_sum' or 'subsample'")


class SKFACBlock(CurvatureBlock):
    """SKFAC's per-layer state: the rows of the most recent statistics batch (no EMA) and
    their Woodbury inverse, recomputed every ``T_inv`` steps.

    For a conv layer the rows come from ``conv_strategy`` (:func:`conv_rows`); Linear layers
    (and ``conv_strategy="kfac"``) use the framework's :meth:`LayerStats.rows`. The random
    subsample of update ``k`` is drawn from a generator seeded with ``(seed, k)``, so a resumed
    run draws the same locations.
    """

    def __init__(
        self,
        info: BlockInfo,
        conv_strategy: str = "kfac",
        subsample_locations: int = 1,
        subsample_mode: str = "random",
        subsample_seed: int = 0,
    ) -> None:
        super().__init__(info)
        self.conv_strategy = conv_strategy
        self.subsample_locations = subsample_locations
        self.subsample_mode = subsample_mode
        self.subsample_seed = subsample_seed
        self.R_A: Tensor | None = None
        self.R_G: Tensor | None = None
        self.inverse: WoodburyInverse | None = None

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        pass

    def update(self, stats: LayerStats, decay: float) -> None:
        """Replace the stored batch by this one (``decay`` is ignored: SKFAC uses no EMA)."""
        a_rows, g_rows = self._rows(stats)
        self.R_A = a_rows.detach().clone()
        self.R_G = g_rows.reshape(-1, g_rows.shape[-1]).detach().clone()
        self.num_updates += 1

    @property
    def reduces(self) -> bool:
        """Whether this block applies a conv dimension-reduction strategy."""
        return self.conv_strategy != "kfac" and issubclass(self.info.module_type, (nn.Conv1d, nn.Conv2d, nn.Conv3d))

    def _rows(self, stats: LayerStats) -> tuple[Tensor, Tensor]:
        if not self.reduces:
            return stats.rows()
        indices = None
        if self.conv_strategy == "subsample":
            n, t = stats.a_features.shape[:2]
            gen = torch.Generator(device="cpu").manual_seed(self.subsample_seed * 1_000_003 + self.num_updates)
            indices = subsample_indices(n, t, self.subsample_locations, self.subsample_mode, gen)
        return conv_rows(stats, self.conv_strategy, indices)

    def _shifts(self, damping: Damping, lam: float) -> tuple[float, float]:
        assert self.R_A is not None and self.R_G is not None
        if isinstance(damping, (EqualSplitDamping, ConstantDamping)):
            unused: Any = None  # these shifts do not look at the factors
            return damping.factor_shifts(unused, unused, lam)
        # dampings that look at the factors (π, relative) get them densely (d² cost)
        A = DenseStructure.from_dense(self.R_A.t() @ self.R_A)
        G = DenseStructure.from_dense(self.R_G.t() @ self.R_G)
        return damping.factor_shifts(A, G, lam)

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.R_A is not None and self.R_G is not None, "refresh() before the first update()"
        s_a, s_g = self._shifts(damping, lam)
        a = WoodburyFactor.build(self.R_A, s_a)
        g = WoodburyFactor.build(self.R_G, s_g)
        if a is None or g is None:
            self.inverse_failures += 1
            if self.inverse is None:  # no good inverse yet: the damping alone, no decomposition
                self.inverse = WoodburyInverse(
                    WoodburyFactor.damping_only(self.info.d_in, s_a, self.R_A),
                    WoodburyFactor.damping_only(self.info.d_out, s_g, self.R_G),
                )
            return
        self.inverse = WoodburyInverse(a, g)

    def precondition(self, grad: Tensor) -> Tensor:
        if self.inverse is None:
            raise RuntimeError(f"block {self.info.name!r}: precondition() before a successful refresh()")
        return self.inverse.apply(grad)

    def as_operator(self) -> KroneckerOperator:
        assert self.R_A is not None and self.R_G is not None
        return KroneckerOperator(self.R_A.t() @ self.R_A, self.R_G.t() @ self.R_G, label=self.info.name)

    # --- data-parallel training: one rank builds the Woodbury inverse, the others install it --

    def refresh_state(self) -> dict[str, Any] | None:
        return {"inverse_failures": self.inverse_failures, **inverse_state(self.inverse)}

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        self.inverse_failures = int(state["inverse_failures"])
        self.inverse = inverse_from_state(state, clone=False)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_updates": self.num_updates, "inverse_failures": self.inverse_failures}
        if self.R_A is not None and self.R_G is not None:
            out["R_A"], out["R_G"] = self.R_A, self.R_G
        if self.inverse is not None:
            out["inverse"] = dict(self.inverse.tensors())
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        self.R_A = state["R_A"].clone() if "R_A" in state else None
        self.R_G = state["R_G"].clone() if "R_G" in state else None
        self.inverse = None
        if "inverse" in state:
            self.inverse = WoodburyInverse.from_tensors({k: v.clone() for k, v in state["inverse"].items()})

    def describe(self) -> str:
        how = ""
        if self.reduces:
            how = (
                ", conv: reduce sum"
                if self.conv_strategy == "reduce_sum"
                else (f", conv: {self.subsample_mode} subsample of {self.subsample_locations} locations")
            )
        return f"SKFACBlock(Woodbury on the current batch, A: {self.info.d_in}, G: {self.info.d_out}{how})"


@dataclass(frozen=True, kw_only=True)
class SKFACConfig(StatisticsConfig):
    r"""SKFAC's options.

    Args:
        T_stats: Statistics every ``T_stats`` steps (only a refresh step's batch is used).
        T_inv: Inverses every ``T_inv`` steps from that step's batch (the official code's
            ``frequency``, 834 on ImageNet; default 1 here).
        damping: :math:`\lambda`; a float means :class:`EqualSplitDamping`, :math:`\sqrt\lambda`
            per factor (official ``damping_init`` 0.03, decayed by the caller as
            :math:`0.03\cdot0.87^{\text{epoch}/10}`).
        conv_strategy: Conv layers' dimension reduction: ``"reduce_sum"`` (SKFAC's Reduce Sum,
            the official code's: per sample the mean patch and the mean output gradient, ``N``
            columns), ``"subsample"`` (Spatial Subsampling, our reconstruction: the columns at
            ``subsample_locations`` output locations per sample, rescaled by ``T/|S|``), or
            ``"kfac"`` (the framework's rows under ``kfac_approx``: expand ``N·T`` columns,
            reduce ``N`` columns with summed gradients).
        subsample_locations: :math:`|S|`, locations kept per sample (all when ``≥ T``).
        subsample_mode: ``"random"`` (a fresh seeded subset per sample and update) or
            ``"strided"`` (evenly spaced, the same for every sample).
        subsample_seed: Seed of the random subsets.
    """

    T_stats: int = 1
    T_inv: int = 1
    damping: Damping | float | str | Mapping[str, Any] = field(default_factory=lambda: EqualSplitDamping(value=0.03))
    conv_strategy: str = "reduce_sum"
    subsample_locations: int = 16
    subsample_mode: str = "random"
    subsample_seed: int = 0

    def normalise(self) -> list[str]:
        out = super().normalise()
        if isinstance(self.damping, (int, float)) and not isinstance(self.damping, bool):
            try:
                self._set("damping", EqualSplitDamping(value=float(self.damping)))
            except ConfigError as err:
                out.extend(f"damping: {p}" for p in err.problems)
        return out

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "T_stats", self.T_stats, low=1, integer=True)
        check_number(out, "T_inv", self.T_inv, low=1, integer=True)
        check_number(out, "subsample_locations", self.subsample_locations, low=1, integer=True)
        check_number(out, "subsample_seed", self.subsample_seed, low=0, integer=True)
        if self.conv_strategy not in CONV_STRATEGIES:
            out.append(f"conv_strategy={self.conv_strategy!r} must be one of {', '.join(map(repr, CONV_STRATEGIES))}")
        if self.subsample_mode not in SUBSAMPLE_MODES:
            out.append(f"subsample_mode={self.subsample_mode!r} must be one of {', '.join(map(repr, SUBSAMPLE_MODES))}")
        if not isinstance(self.damping, Damping) and not names_a_damping(self.damping):
            out.append(
                f"damping={self.damping!r} must be a damping strategy (e.g. EqualSplitDamping(value=0.03)), "
                "a float > 0 or a registered damping's name"
            )
        return out

    def check_components(self, registry: Any) -> None:
        if self.damping.kind != "factored":  # type: ignore[union-attr]
            raise IncompatibleComponentsError(
                f"SKFAC applies factored dampings only (EqualSplitDamping, ConstantDamping, PiDamping, "
                f"RelativeDamping(on='factors')); got {type(self.damping).__name__} (a {self.damping.kind!r} damping)"  # type: ignore[union-attr]
            )


def skfac_block(info: BlockInfo, config: SKFACConfig, registry: Any) -> SKFACBlock:
    if not issubclass(info.module_type, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
        raise UnsupportedModuleError(
            f"SKFAC serves Linear, Conv and Embedding layers; {info.name!r} is a {info.module_type.__name__}"
        )
    return SKFACBlock(
        info,
        conv_strategy=config.conv_strategy,
        subsample_locations=config.subsample_locations,
        subsample_mode=config.subsample_mode,
        subsample_seed=config.subsample_seed,
    )


SKFAC_SPEC = MethodSpec(
    name="skfac",
    class_name="SKFAC",
    config_cls=SKFACConfig,
    block_factory=skfac_block,
    schedule=Schedule(ema_decay=None),  # the current batch's factors: no EMA
    summary="SKFAC: current-batch Kronecker factors (no EMA) inverted by Woodbury with n×n Cholesky solves",
    reference="Tang, Jiang, Gong, Li, Wu, Yu, Wang, Wang (2021), SKFAC, CVPR 2021",
    sample_configs=(
        {"damping": 0.01},
        {"damping": PiDamping(value=0.03), "T_inv": 3, "kfac_approx": "reduce"},
        {"fisher": "type-2", "damping": 0.003},
        {"damping": 0.01, "conv_strategy": "subsample", "subsample_locations": 5},
        {"damping": 0.01, "conv_strategy": "subsample", "subsample_locations": 3, "subsample_mode": "strided"},
        {"damping": 0.01, "conv_strategy": "kfac", "kfac_approx": "expand"},
    ),
    bad_configs=(
        ({"T_inv": 0}, ConfigError),
        ({"damping": -1.0}, ConfigError),
        ({"damping": ExactDamping(value=1e-3)}, IncompatibleComponentsError),
        ({"not_an_option": 1}, ConfigError),
        ({"conv_strategy": "mean"}, ConfigError),
        ({"subsample_locations": 0}, ConfigError),
        ({"subsample_mode": "grid"}, ConfigError),
    ),
    recommended={
        "lr": 0.03,
        "momentum": 0.9,
        "damping": 0.03,
        "kl_clip": 1e-2,
        "grad_ratio_clip": 100.0,
        "tasks": {"digits-cnn": {"lr": 0.1, "damping": 0.3, "conv_strategy": "reduce_sum"}},
    },
)
