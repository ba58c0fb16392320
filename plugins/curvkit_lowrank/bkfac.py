r"""B-KFAC, B-R-KFAC and B-KFAC-c (Puiu 2022b, "Brand New K-FACs", arXiv:2210.08494; the
author's code github:ConstantinPuiu/Distributed_Brand_and_Randomized_KFACs).

For a fully connected layer the batch factor :math:`A_b = \bar a^\top \bar a` has rank at most
the number of rows ``n`` (the batch size), so the EMA factor
:math:`A \leftarrow \rho A + (1-\rho) A_b` receives a rank-``n`` update every statistics step.
B-KFAC keeps only a truncated eigendecomposition :math:`A \approx U\,\mathrm{diag}(D)\,U^\top`
(rank ``r``) and updates it online with Brand's algorithm (:func:`~curvkit_lowrank.brand.
brand_update`) from the batch's rows, never forming the ``d×d`` factor: :math:`O(d(r+n)^2)`
per update, linear in ``d``. The step is RS-KFAC's low-rank damped inverse,
:math:`\Delta = (G_r + \lambda_G I)^{-1}\nabla(A_r + \lambda_A I)^{-1}`.

The B-update applies to a K-factor only where it pays off — the author's "LL" test: the layer is
``nn.Linear`` and :math:`r + n < d` for that factor (decided per factor at the first update,
when ``n`` is known). Every other factor (conv layers, small linear factors) keeps the full EMA
factor and is decomposed every ``T_inv`` steps by the configured randomized inverter (RS-KFAC's
RSVD by default; with ``rank ≥ d`` this is exact, i.e. K-FAC). :meth:`BrandKroneckerBlock.describe`
(shown by the optimizer's ``summary()``) names the choice for each factor.

Variants (``B_R_period``, ``correction_period``):

* **B-R-KFAC** also keeps the exact EMA factor of the Brand factors and, every ``B_R_period``
  inverse refreshes (including the first), overwrites their Brand representation by an RSVD of
  the exact factor (the code's ``B_R_period``, in units of ``T_inv``).
* **B-KFAC-c** (the code's B-R-C optimizer) additionally, every ``correction_period``
  statistics updates, corrects a random fraction φ of the eigenpairs: pick ``round(φ r + 1)``
  columns :math:`Q_s` of ``U``, eigendecompose :math:`Q_s^\top A Q_s = W \Lambda W^\top` with
  the exact factor ``A``, set :math:`Q_s \leftarrow Q_s W`, their eigenvalues to Λ, and re-sort
  (``perform_C_correction`` in the code's ``B_R_C_utils_for_C.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.blocks import BlockInfo, CurvatureBlock, KroneckerOperator, LayerStats
from curvkit.config import check_number
from curvkit.errors import ConfigError, IncompatibleComponentsError
from curvkit.linalg.damping import Damping, ExactDamping
from curvkit.linalg.inverters import (
    IdentityInverse,
    KroneckerInverse,
    compute_dtype,
    inverse_from_state,
    inverse_state,
)
from curvkit.methods import MethodSpec
from curvkit.numerics import all_finite
from curvkit.structures.base import DenseStructure
from curvkit_lowrank.brand import brand_update_with_retry
from curvkit_lowrank.lowrank import (
    LowRankEigenInverse,
    LowRankFactor,
    LowRankInverse,
    RandomizedInverter,
    decompose_with_retry,
    low_rank_shifts,
    randomized_svd,
)
from curvkit_lowrank.rskfac import RECOMMENDED, RSKFACConfig

__all__ = [
    "BKFACCConfig",
    "BKFACConfig",
    "BRKFACConfig",
    "B_KFAC_C_SPEC",
    "B_KFAC_SPEC",
    "B_R_KFAC_SPEC",
    "BrandKroneckerBlock",
    "correct_eigenpairs",
]

_SIDES = ("A", "G")


def correct_eigenpairs(low: LowRankFactor, exact: Tensor, fraction: float, generator: torch.Generator) -> LowRankFactor:
    r"""B-KFAC-c's correction: Rayleigh–Ritz of the exact factor on ``round(fraction·k + 1)``
    randomly chosen columns of ``U`` (``k`` = kept pairs, at most ``k``), then re-sorted,
    largest first."""
    k = low.rank
    m = min(k, round(fraction * k + 1))
    if m == 0:
        return low
    idx = torch.randperm(k, generator=generator, device="cpu")[:m].to(low.U.device)
    Qs = low.U[:, idx]
    B = Qs.t() @ exact.to(Qs.dtype) @ Qs
    lam, W = torch.linalg.eigh((B + B.t()) / 2)
    U, d = low.U.clone(), low.d.clone()
    U[:, idx] = Qs @ W
    d[idx] = lam.clamp_min(0).to(d.dtype)
    d, order = torch.sort(d, descending=True)
    return LowRankFactor(U[:, order].contiguous(), d)


def _correct_with_retry(
    low: LowRankFactor, exact: Tensor, fraction: float, generator: torch.Generator
) -> LowRankFactor | None:
    """:func:`correct_eigenpairs` in the factor's dtype, retried in float64 (with the same
    random columns) when its ``eigh`` fails; ``None`` when both fail."""
    dtype = low.U.dtype
    for attempt in (dtype, torch.float64) if dtype != torch.float64 else (torch.float64,):
        state = generator.get_state()
        try:
            cast = LowRankFactor(low.U.to(attempt), low.d.to(attempt))
            out = correct_eigenpairs(cast, exact.to(attempt), fraction, generator)
        except RuntimeError:  # torch.linalg.LinAlgError
            generator.set_state(state)
            continue
        if all_finite(out.U) and all_finite(out.d):
            return LowRankFactor(out.U.to(dtype), out.d.to(dtype))
        generator.set_state(state)
    return None


class BrandKroneckerBlock(CurvatureBlock):
    """The per-layer state of B-KFAC / B-R-KFAC / B-KFAC-c (see the module docstring).

    Args:
        info: The layer.
        inverter: Randomized inverter for the factors the B-update does not apply to (its
            ``rank`` is also the Brand rank ``r``).
        refresh_period: B-R: RSVD of the exact factor every this many refreshes (0: never).
        correction_period: B-c: correct every this many statistics updates (0: never).
        correction_fraction: φ.
        factor_dtype: dtype of the state (default: the layer's, at least float32).
    """

    def __init__(
        self,
        info: BlockInfo,
        *,
        inverter: RandomizedInverter,
        refresh_period: int = 0,
        correction_period: int = 0,
        correction_fraction: float = 0.2,
        factor_dtype: torch.dtype | None = None,
        variant: str = "b-kfac",
    ) -> None:
        super().__init__(info)
        self.inverter = inverter
        self.rank = inverter.rank
        self.refresh_period = int(refresh_period)
        self.correction_period = int(correction_period)
        self.correction_fraction = float(correction_fraction)
        self.factor_dtype = factor_dtype
        self.variant = variant
        self.keeps_exact = self.refresh_period > 0 or self.correction_period > 0
        self.dims = {"A": info.d_in, "G": info.d_out}
        #: per side: True where the B-update applies (decided at the first update).
        self.brand: dict[str, bool] = {}
        self.low: dict[str, LowRankFactor] = {}  # Brand representations
        self.exact: dict[str, Tensor] = {}  # full EMA factors (fallback sides; B-R / B-c Brand sides)
        self.inverse: KroneckerInverse | None = None
        self.refreshes = 0
        self.corrections = 0

    # --- statistics ---------------------------------------------------------------------

    def init(self, *, dtype: torch.dtype, device: torch.device) -> None:
        self._dtype = self.factor_dtype or compute_dtype(dtype)
        self._device = device

    def batch_is_finite(self, stats: LayerStats) -> bool:
        a_rows, g_rows = stats.rows()  # never form the d×d batch factors
        return all_finite(a_rows) and all_finite(g_rows)

    def _eligible(self, side: str, n: int) -> bool:
        return issubclass(self.info.module_type, nn.Linear) and self.rank + n < self.dims[side]

    def update(self, stats: LayerStats, decay: float) -> bool | None:
        """Fold in one batch: every new value (Brand factors, the exact factors' batch
        Gram) is computed first and checked; a Brand update that fails even in float64, or
        a non-finite result, declines the whole update (counted in ``skipped_updates``,
        state unchanged)."""
        if not hasattr(self, "_dtype"):
            self.init(dtype=stats.dtype, device=stats.device)
        a_rows, g_rows = stats.rows()
        rows = {"A": a_rows, "G": g_rows.reshape(-1, g_rows.shape[-1])}
        brand: dict[str, bool] = {}
        new_low: dict[str, LowRankFactor] = {}
        grams: dict[str, Tensor] = {}
        for side in _SIDES:
            R = rows[side].detach().to(self._dtype)
            brand[side] = self.brand[side] if side in self.brand else self._eligible(side, R.shape[0])
            if brand[side]:
                d = self.dims[side]
                low = self.low.get(side) or LowRankFactor(
                    torch.zeros(d, 0, dtype=self._dtype, device=R.device),
                    torch.zeros(0, dtype=self._dtype, device=R.device),
                )
                updated = brand_update_with_retry(low, R.t(), decay, self.rank)
                if updated is None:
                    self.skipped_updates += 1
                    return False
                new_low[side] = updated
            if not brand[side] or self.keeps_exact:
                grams[side] = R.t() @ R
        if not all(all_finite(x) for x in grams.values()):
            self.skipped_updates += 1
            return False
        for side in _SIDES:
            self.brand[side] = brand[side]
            if side in new_low:
                self.low[side] = new_low[side]
            if side in grams:
                if side not in self.exact:
                    d = self.dims[side]
                    self.exact[side] = torch.zeros(d, d, dtype=self._dtype, device=grams[side].device)
                self.exact[side].mul_(decay).add_(grams[side], alpha=1.0 - decay)
        self.num_updates += 1
        if self.correction_period and self.num_updates % self.correction_period == 0:
            gen = torch.Generator(device="cpu").manual_seed(self.inverter.seed * 1_000_003 + 500_009 + self.corrections)
            for side in _SIDES:
                if self.brand[side]:
                    corrected = _correct_with_retry(self.low[side], self.exact[side], self.correction_fraction, gen)
                    if corrected is None:
                        self.inverse_failures += 1  # the correction's eigh failed: keep the factor
                    else:
                        self.low[side] = corrected
            self.corrections += 1

    # --- inversion ----------------------------------------------------------------------

    def _factor(self, side: str, gen: torch.Generator) -> LowRankFactor | None:
        if self.brand[side]:
            if self.refresh_period and self.refreshes % self.refresh_period == 0:
                X = self.exact[side]
                inv = self.inverter
                low = decompose_with_retry(
                    lambda M, g: randomized_svd(
                        M, self.rank, oversampling=inv.oversampling, niter=inv.niter, generator=g
                    ),
                    X,
                    gen,
                )
                if low is None:
                    return None
                self.low[side] = LowRankFactor(low.U.to(X.dtype), low.d.to(X.dtype))
            return self.low[side]
        return self.inverter.factor(DenseStructure.from_dense(self.exact[side]), gen)

    def _dense(self, side: str) -> Tensor:
        return self.exact[side] if side in self.exact else self.low[side].to_dense()

    def refresh(self, damping: Damping, lam: float) -> None:
        assert self.brand, "refresh() before the first update()"
        gen = torch.Generator(device="cpu").manual_seed(self.inverter.seed * 1_000_003 + self.refreshes)
        a, g = self._factor("A", gen), self._factor("G", gen)
        self.refreshes += 1
        inverse: KroneckerInverse | None = None
        if a is not None and g is not None:
            try:
                if damping.kind == "eigenbasis":
                    inverse = LowRankEigenInverse(a, g, damping.product_shift(a.d, g.d, lam))
                else:
                    # relative damping looks at the kept eigenvalues only; other factored
                    # dampings get the (d² cost) dense factors
                    A, G = DenseStructure.from_dense(self._dense("A")), DenseStructure.from_dense(self._dense("G"))
                    s_a, s_g = low_rank_shifts(damping, A, G, a, g, lam)
                    inverse = LowRankInverse(a, g, s_a, s_g)
            except ValueError:  # a zero factor under relative damping: no valid shift
                inverse = None
        if inverse is None:
            self.inverse_failures += 1
            if self.inverse is None:
                self.inverse = IdentityInverse()
            return
        self.inverse = inverse

    def precondition(self, grad: Tensor) -> Tensor:
        if self.inverse is None:
            raise RuntimeError(f"block {self.info.name!r}: precondition() before the first refresh()")
        return self.inverse.apply(grad)

    def as_operator(self) -> KroneckerOperator:
        """The curvature estimate: the Brand representation (densified) where it applies,
        the exact EMA factor elsewhere."""
        assert self.brand, "as_operator() before the first update()"
        pick = {s: self.low[s].to_dense() if self.brand[s] else self.exact[s] for s in _SIDES}
        return KroneckerOperator(pick["A"], pick["G"], label=self.info.name)

    # --- state --------------------------------------------------------------------------

    # --- data-parallel training: one rank refreshes, the others install its result -----------

    def refresh_state(self) -> dict[str, Any] | None:
        """The inverse, the refresh counters and the low-rank factors (B-R-KFAC's periodic
        RSVD correction replaces them in a refresh)."""
        return {
            "inverse_failures": self.inverse_failures,
            "refreshes": self.refreshes,
            "low": {side: {"U": low.U, "d": low.d} for side, low in self.low.items()},
            **inverse_state(self.inverse),
        }

    def load_refresh_state(self, state: dict[str, Any]) -> None:
        self.inverse_failures = int(state["inverse_failures"])
        self.refreshes = int(state["refreshes"])
        self.low = {side: LowRankFactor(low["U"], low["d"]) for side, low in state["low"].items()}
        self.inverse = inverse_from_state(state, clone=False)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_updates": self.num_updates,
            "inverse_failures": self.inverse_failures,
            "refreshes": self.refreshes,
            "corrections": self.corrections,
        }
        for side, flag in self.brand.items():
            out[f"brand_{side}"] = flag
        for side, low in self.low.items():
            out[f"low_{side}"] = {"U": low.U, "d": low.d}
        for side, X in self.exact.items():
            out[f"exact_{side}"] = X
        out.update(inverse_state(self.inverse))
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_updates = int(state["num_updates"])
        self.inverse_failures = int(state["inverse_failures"])
        self.refreshes = int(state["refreshes"])
        self.corrections = int(state["corrections"])
        self.brand = {s: bool(state[f"brand_{s}"]) for s in _SIDES if f"brand_{s}" in state}
        self.low = {
            s: LowRankFactor(state[f"low_{s}"]["U"].clone(), state[f"low_{s}"]["d"].clone())
            for s in _SIDES
            if f"low_{s}" in state
        }
        self.exact = {s: state[f"exact_{s}"].clone() for s in _SIDES if f"exact_{s}" in state}
        if self.low or self.exact:
            some = next(iter(self.low.values())).U if self.low else next(iter(self.exact.values()))
            self.init(dtype=some.dtype, device=some.device)
        self.inverse = inverse_from_state(state)

    def side_description(self, side: str) -> str:
        d = self.dims[side]
        if side not in self.brand:
            linear = issubclass(self.info.module_type, nn.Linear)
            rule = f"Brand if r + n < {d}" if linear else "RSVD of the EMA factor (not a Linear layer)"
            return f"{side} {d}: pending first batch ({rule})"
        if self.brand[side]:
            extra = " + exact EMA" if self.keeps_exact else ""
            return f"{side} {d}: Brand rank {min(self.rank, d)}{extra}"
        why = "not a Linear layer" if not issubclass(self.info.module_type, nn.Linear) else f"r + n ≥ {d}"
        return f"{side} {d}: {self.inverter.name} of the EMA factor ({why})"

    def describe(self) -> str:
        return (
            f"{type(self).__name__}({self.variant}; {self.side_description('A')}; {self.side_description('G')}; "
            f"{self.inverter.describe()})"
        )


@dataclass(frozen=True, kw_only=True)
class BKFACConfig(RSKFACConfig):
    r"""B-KFAC's options: RS-KFAC's (:class:`~curvkit_lowrank.rskfac.RSKFACConfig`; ``rank`` is
    both the Brand rank :math:`r_B` — the code's ``brand_r_target_excess = 0`` — and the RSVD
    rank of the factors the B-update does not apply to), B-updates every ``T_stats`` steps (the
    code's ``brand_update_multiplier_to_TCov = 1``)."""


@dataclass(frozen=True, kw_only=True)
class BRKFACConfig(BKFACConfig):
    r"""B-R-KFAC's options: B-KFAC's plus

    Args:
        B_R_period: RSVD of the exact EMA factor of the Brand factors every ``B_R_period``
            inverse refreshes, i.e. every ``B_R_period · T_inv`` steps (the author's run
            scripts: 5; the optimizer class's default is 10).
    """

    B_R_period: int = 5

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "B_R_period", self.B_R_period, low=1, integer=True)
        return out


@dataclass(frozen=True, kw_only=True)
class BKFACCConfig(BKFACConfig):
    r"""B-KFAC-c's options (the code's B-R-C optimizer): B-KFAC's plus

    Args:
        B_R_period: as B-R-KFAC's (5); 0 switches the RSVD overwrite off (correction only).
        correction_period: correct every ``correction_period`` statistics updates (the code's
            ``correction_multiplier_TCov``, 5).
        correction_fraction: φ, fraction of the ``r`` eigenpairs corrected (``brand_corection_dim_frac``, 0.2).
    """

    B_R_period: int = 5
    correction_period: int = 5
    correction_fraction: float = 0.2

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "B_R_period", self.B_R_period, low=0, integer=True)
        check_number(out, "correction_period", self.correction_period, low=1, integer=True)
        check_number(out, "correction_fraction", self.correction_fraction, low=0.0, high=1.0, low_open=True)
        return out


def brand_block(info: BlockInfo, config: BKFACConfig, registry: Any) -> BrandKroneckerBlock:
    if config.structure != "dense":
        raise IncompatibleComponentsError(
            f"structure={config.structure!r}: the B-KFAC family keeps dense or low-rank factors; use structure='dense'"
        )
    refresh = int(getattr(config, "B_R_period", 0))
    correction = int(getattr(config, "correction_period", 0))
    variant = "b-kfac-c" if correction else "b-r-kfac" if refresh else "b-kfac"
    return BrandKroneckerBlock(
        info,
        inverter=config.inverter_object(registry),
        refresh_period=refresh,
        correction_period=correction,
        correction_fraction=float(getattr(config, "correction_fraction", 0.2)),
        factor_dtype=config.factor_dtype,
        variant=variant,
    )


_SAMPLES: tuple[dict[str, Any], ...] = (
    {"damping": 0.1, "T_stats": 1, "T_inv": 3, "rank": 4},  # rank 4: Brand on the CNN Linear A (4 + 32 < 37)
    {"damping": ExactDamping(value=0.03), "T_stats": 1, "T_inv": 2, "rank": 4},
    {"fisher": "type-2", "damping": 0.2, "T_stats": 2, "T_inv": 2, "rank": 4, "oversampling": 2},
)
_BAD: tuple[tuple[dict[str, Any], type[Exception]], ...] = (
    ({"rank": 0}, ConfigError),
    ({"damping": -1.0}, ConfigError),
    ({"inverter": "cholesky"}, IncompatibleComponentsError),
    ({"not_an_option": 1}, ConfigError),
)

B_KFAC_SPEC = MethodSpec(
    name="b-kfac",
    class_name="BKFAC",
    config_cls=BKFACConfig,
    block_factory=brand_block,
    summary="B-KFAC: Brand online low-rank updates of the EMA factors of wide Linear layers, RSVD elsewhere",
    reference="Puiu (2022), Brand New K-FACs, arXiv:2210.08494",
    sample_configs=_SAMPLES,
    bad_configs=_BAD,
    recommended=RECOMMENDED,
)

B_R_KFAC_SPEC = MethodSpec(
    name="b-r-kfac",
    class_name="BRKFAC",
    config_cls=BRKFACConfig,
    block_factory=brand_block,
    summary="B-R-KFAC: B-KFAC with a periodic RSVD of the exact EMA factor replacing the Brand representation",
    reference="Puiu (2022), Brand New K-FACs, arXiv:2210.08494",
    sample_configs=tuple({**s, "B_R_period": 2} for s in _SAMPLES),
    bad_configs=(*_BAD, ({"B_R_period": 0}, ConfigError)),
    recommended={**RECOMMENDED, "B_R_period": 5},
)

B_KFAC_C_SPEC = MethodSpec(
    name="b-kfac-c",
    class_name="BKFACC",
    config_cls=BKFACCConfig,
    block_factory=brand_block,
    summary="B-KFAC-c: B-KFAC with periodic Rayleigh-Ritz correction of a random fraction of the eigenpairs",
    reference="Puiu (2022), Brand New K-FACs, arXiv:2210.08494",
    sample_configs=tuple({**s, "correction_period": 2, "B_R_period": i % 2} for i, s in enumerate(_SAMPLES)),
    bad_configs=(*_BAD, ({"correction_fraction": 1.5}, ConfigError), ({"correction_period": 0}, ConfigError)),
    recommended={**RECOMMENDED, "B_R_period": 5, "correction_period": 5},
)
