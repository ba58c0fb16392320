r"""KLD-WRM: KL-divergence wake-regularised models (Puiu 2022, arXiv:2204.04718).

Three instantiations on K-FAC's platform (same EMA factors :math:`\bar A, \bar G`, same
inverter and damping), following the author's code (``ConstantinPuiu/Rethinking-EA-of-the-Fisher``):

* ``so-kldwrm`` — modified gradient :math:`\hat g_k = g_k - \omega\,(\eta_{k-1}/\eta_k)\,g_{k-1}`,
  step :math:`(\bar G\otimes\bar A + \text{damping})^{-1}\hat g_k`;
* ``q-kldwrm`` — :math:`\hat g_k = g_k + \omega r_k(\hat g_{k-1} - g_{k-1}) - \omega r_k \hat M_{k-1}\hat g_{k-1}`
  (:math:`r_k = \eta_{k-1}/\eta_k`), inverted with the factors augmented by the newest
  un-averaged estimate, :math:`\bar A + \zeta A^{\text{loc}}_k` (:math:`\zeta = \eta_k` by default);
* ``qe-kldwrm`` — the Q block plus an inner loop over a symmetrised KL to stored past networks
  (:class:`curvkit_kldwrm.optim.QEKLDWRM`; the block alone takes Q steps).

:math:`\omega` (``wake_decay``) defaults to :math:`\rho` (``ema_decay``) as in the author's code;
``wake_decay=0`` (and ``local_weight=0`` for Q/QE) switches the wake off and leaves K-FAC.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from curvkit.blocks import BlockInfo, KroneckerBlock, LayerStats, as_structure
from curvkit.config import check_number
from curvkit.errors import ConfigError, IncompatibleComponentsError, UnknownComponentError
from curvkit.linalg.damping import Damping, ExactDamping
from curvkit.methods import KroneckerConfig, MethodSpec

#: The step size Q/QE assume when neither the optimizer nor ``eta=`` supplies one (the author's MNIST lr).
FALLBACK_ETA = 0.01

__all__ = [
    "QEKLDWRMConfig",
    "QE_KLDWRM_SPEC",
    "QKLDWRMConfig",
    "Q_KLDWRM_SPEC",
    "SOKLDWRMConfig",
    "SO_KLDWRM_SPEC",
    "QEKLDWRMBlock",
    "QKLDWRMBlock",
    "SOKLDWRMBlock",
]


@dataclass(frozen=True, kw_only=True)
class _KLDWRMConfig(KroneckerConfig):
    """Shared KLD-WRM options (see the subclasses)."""

    ema_decay: float = 0.5
    T_stats: int = 30
    T_inv: int = 30
    damping: Damping | float = field(default_factory=lambda: ExactDamping(value=1e-2))
    inverter: str = "eigh"
    wake_decay: float | None = None
    eta: float | None = None

    default_damping: Any = field(default=ExactDamping, init=False, repr=False, compare=False)

    @property
    def omega(self) -> float:
        """The wake's decay ω (``wake_decay``, or ρ = ``ema_decay`` when unset)."""
        return float(self.ema_decay if self.wake_decay is None else self.wake_decay)

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "wake_decay", self.wake_decay, low=0.0, high=1.0, high_open=True, optional=True)
        check_number(out, "eta", self.eta, low=0.0, low_open=True, optional=True)
        return out


@dataclass(frozen=True, kw_only=True)
class SOKLDWRMConfig(_KLDWRMConfig):
    r"""SO-KLD-WRM's options: K-FAC's (:class:`curvkit.methods.KroneckerConfig`) with the
    author's MNIST defaults (ρ = ``ema_decay`` = 0.33, ``T_stats`` = ``T_inv`` = 30, exact
    damping 1e-2 with the ``"eigh"`` inverter), plus

    Args:
        wake_decay: ω, the weight of the previous gradient in
            :math:`\hat g_k = g_k - \omega(\eta_{k-1}/\eta_k) g_{k-1}`; ``None`` = ρ (the
            author's code); 0 switches the wake off (K-FAC).
        eta: The step size :math:`\eta = 1/\lambda` the wake assumes when the optimizer does
            not pass its learning rate (the named optimizers pass it every step); with neither,
            SO assumes a constant step size (ratio 1).
    """

    ema_decay: float = 0.33


@dataclass(frozen=True, kw_only=True)
class QKLDWRMConfig(_KLDWRMConfig):
    r"""Q-KLD-WRM's options: those of :class:`SOKLDWRMConfig` (default ρ = 0.5), plus

    Args:
        local_weight: ζ in the augmented factors :math:`\bar A + \zeta A^{\text{loc}}`,
            :math:`\bar G + \zeta G^{\text{loc}}`; ``None`` = the step size :math:`\eta_k` (the
            author's code: :math:`1/\lambda_k`); 0 with ``wake_decay=0`` gives K-FAC.

    The step size :math:`\eta_k` comes from a named optimizer or ``eta``; with neither (a generic
    ``curvkit.optim.create("q-kldwrm", ...)``) the block warns once and assumes
    :math:`\eta = 0.01`, the author's MNIST learning rate.
    """

    local_weight: float | None = None

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "local_weight", self.local_weight, low=0.0, optional=True)
        return out


@dataclass(frozen=True, kw_only=True)
class QEKLDWRMConfig(QKLDWRMConfig):
    r"""QE-KLD-WRM's options: those of :class:`QKLDWRMConfig`, plus the inner loop's (run by
    :class:`curvkit_kldwrm.optim.QEKLDWRM`; author's MNIST values as defaults)

    Args:
        capacity: Past networks kept (FIFO; memory ``capacity × #parameters``); the inner
            loop starts once ``capacity`` are stored.
        inner_steps: Inner SGD steps per outer step.
        inner_lr_factor: Inner learning rate as a multiple of η.
        inner_momentum: Inner heavy-ball momentum.
        kappa: κ in the inner loss :math:`(\lambda/2)\kappa^{-1}D_{\text{sym}}`.
        inner_rms_clip: Per-parameter RMS clip of the inner gradient (``None``: off).
    """

    capacity: int = 3
    inner_steps: int = 7
    inner_lr_factor: float = 0.1
    inner_momentum: float = 0.5
    kappa: float = 330.0
    inner_rms_clip: float | None = 2.0

    def problems(self) -> list[str]:
        out = super().problems()
        check_number(out, "capacity", self.capacity, low=1, integer=True)
        check_number(out, "inner_steps", self.inner_steps, low=0, integer=True)
        check_number(out, "inner_lr_factor", self.inner_lr_factor, low=0.0)
        check_number(out, "inner_momentum", self.inner_momentum, low=0.0, high=1.0, high_open=True)
        check_number(out, "kappa", self.kappa, low=0.0, low_open=True)
        check_number(out, "inner_rms_clip", self.inner_rms_clip, low=0.0, low_open=True, optional=True)
        return out


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clone()


class SOKLDWRMBlock(KroneckerBlock):
    r"""K-FAC's block applied to the modified gradient
    :math:`\hat g_k = g_k - \omega (\eta_{k-1}/\eta_k) g_{k-1}` (:math:`g_{-1} = 0`).

    Extra state: :math:`g_{k-1}` (one copy of the layer's gradient) and :math:`\eta_{k-1}`.
    ``set_step_size(η_k)`` (called by the named optimizers before each step) supplies the step
    size; otherwise the config's ``eta`` is used.
    """

    def __init__(self, info: BlockInfo, config: _KLDWRMConfig, registry: Any) -> None:
        base = KroneckerBlock.from_config(info, config, registry)
        super().__init__(
            info,
            structure=(base.structure_A, base.structure_G),
            inverter=base.inverter,
            factor_dtype=config.factor_dtype,
        )
        self.omega = config.omega
        self.T_inv = config.T_inv
        self.default_eta = config.eta
        self.eta_next: float | None = None  # set by the optimizer before a step; not state
        self.eta_prev: float | None = None
        self.k = 0  # preconditioned steps taken
        self.g_prev: Tensor | None = None

    def set_step_size(self, eta: float) -> None:
        """The step size :math:`\\eta_k` of the coming step (the optimizer's learning rate)."""
        self.eta_next = float(eta)

    def _eta(self) -> float | None:
        return self.eta_next if self.eta_next is not None else self.default_eta

    def _ratio(self, eta: float | None) -> float:
        if self.eta_prev is None or eta is None or eta == 0:
            return 1.0
        return self.eta_prev / eta

    def modified_gradient(self, grad: Tensor, eta: float | None) -> Tensor:
        if self.g_prev is None or self.omega == 0:
            return grad
        return grad - (self.omega * self._ratio(eta)) * self.g_prev.to(grad.dtype)

    def precondition(self, grad: Tensor) -> Tensor:
        eta = self._eta()
        ghat = self.modified_gradient(grad, eta)
        out = super().precondition(ghat)
        self.g_prev = grad.detach().clone()
        self.eta_prev = eta
        self.k += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["kldwrm"] = {"k": self.k, "eta_prev": self.eta_prev}
        if self.g_prev is not None:
            out["wake"] = {"g_prev": self.g_prev}
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.k = int(state["kldwrm"]["k"])
        self.eta_prev = state["kldwrm"]["eta_prev"]
        self.g_prev = _clone(state.get("wake", {}).get("g_prev"))


_Q_STATE = ("ghat_prev", "s_prev", "A_prev", "G_prev", "A_loc", "G_loc", "B_A", "B_G")


class QKLDWRMBlock(SOKLDWRMBlock):
    r"""Q-KLD-WRM's block (see the module docstring).

    * :math:`\hat M_{k-1}\hat g_{k-1}` is :math:`\bar G_{k-1} s_{k-1}\bar A_{k-1}` on steps
      :math:`k \ge 2` with :math:`k \bmod T_{\text{inv}} = 1` (every step ``k ≥ 2`` when
      ``T_inv = 1``), otherwise :math:`\hat g_{k-1}/(1+\eta_{k-1})`, and 0 at ``k = 0``
      (the author's branch logic); :math:`s_{k-1}` is this block's previous output.
    * The inverse is recomputed from :math:`\bar A + \zeta A^{\text{loc}}`,
      :math:`\bar G + \zeta G^{\text{loc}}` on steps with :math:`k \bmod T_{\text{inv}} \in \{0, 1\}`;
      :math:`A^{\text{loc}}` is the latest batch factor if the factors were updated since the
      previous step, else :math:`\bar A` (what the author's EMA differencing yields).

    Extra state: :math:`g_{k-1}, \hat g_{k-1}, s_{k-1}` (three gradient copies),
    :math:`\bar A_{k-1}, \bar G_{k-1}` and the local factors (four factor copies).
    """

    _warned_eta = False  # warn once per process that the step size is assumed

    def __init__(self, info: BlockInfo, config: QKLDWRMConfig, registry: Any) -> None:
        super().__init__(info, config, registry)
        self.local_weight = config.local_weight
        self.ghat_prev: Tensor | None = None
        self.s_prev: Tensor | None = None
        self.A_prev: Tensor | None = None  # EMA factors before the latest update
        self.G_prev: Tensor | None = None
        self.A_loc: Tensor | None = None  # the latest batch factors
        self.G_loc: Tensor | None = None
        self.fresh = False  # factors updated since the previous step
        self.B_A: Tensor | None = None  # local factors used by the latest decomposition
        self.B_G: Tensor | None = None
        self._damping: Damping | None = None
        self._lam = 0.0

    def update(self, stats: LayerStats, decay: float) -> None:
        if self.A is not None and self.G is not None and self.num_updates > 0:
            self.A_prev, self.G_prev = self.A.to_dense().clone(), self.G.to_dense().clone()
        super().update(stats, decay)
        assert self.A is not None and self.G is not None
        a, g = self.batch_factors(stats)
        self.A_loc = as_structure(self.structure_A, a.to(self.A.dtype)).to_dense().clone()
        self.G_loc = self.structure_G.from_dense(g.to(self.G.dtype)).to_dense().clone()
        if self.num_updates == 1:
            self.A_prev, self.G_prev = self.A.to_dense().clone(), self.G.to_dense().clone()
        self.fresh = True

    def refresh(self, damping: Damping, lam: float) -> None:
        # the decomposition itself waits for precondition(), which knows η_k and k
        self._damping, self._lam = damping, lam

    def local_factors(self) -> tuple[Tensor, Tensor]:
        """:math:`(A^{\\text{loc}}_k, G^{\\text{loc}}_k)` of the current step."""
        assert self.A is not None and self.G is not None
        if self.fresh and self.A_loc is not None and self.G_loc is not None:
            return self.A_loc, self.G_loc
        return self.A.to_dense(), self.G.to_dense()

    def _eta(self) -> float:
        eta = super()._eta()
        if eta is not None:
            return eta
        if not QKLDWRMBlock._warned_eta:
            QKLDWRMBlock._warned_eta = True
            warnings.warn(
                f"q-/qe-kldwrm needs the step size η_k (ζ = η_k augments the factors; the wake uses η_{{k-1}}) and "
                f"this optimizer does not pass its learning rate: assuming η = {FALLBACK_ETA} (the author's MNIST "
                "learning rate). Use curvkit_kldwrm.QKLDWRM / QEKLDWRM (they pass the learning rate) or set eta=.",
                stacklevel=4,
            )
        return FALLBACK_ETA

    def _zeta(self, eta: float | None) -> float:
        if self.local_weight is not None:
            return self.local_weight
        assert eta is not None
        return eta

    def _decompose(self, eta: float | None) -> None:
        assert self.A is not None and self.G is not None and self._damping is not None
        zeta = self._zeta(eta)
        a_loc, g_loc = self.local_factors()
        self.B_A, self.B_G = a_loc.clone(), g_loc.clone()  # the inner loop's local curvature (QE)
        a_aug = self.structure_A.from_dense(self.A.to_dense() + zeta * a_loc)
        g_aug = self.structure_G.from_dense(self.G.to_dense() + zeta * g_loc)
        self.refresh_from(a_aug, g_aug, self._damping, self._lam)

    def wake_product(self, eta_prev: float | None) -> Tensor | None:
        r""":math:`\hat M_{k-1}\hat g_{k-1}` by the author's branch logic (``None`` = 0)."""
        k, T = self.k, self.T_inv
        if k == 0 or self.ghat_prev is None:
            return None
        if k == 1 or k % T >= 2 or (k % T == 0 and T >= 2):
            assert eta_prev is not None
            return self.ghat_prev / (1.0 + eta_prev)
        assert self.s_prev is not None and self.A is not None and self.G is not None
        a_prev = self.A_prev if self.fresh and self.A_prev is not None else self.A.to_dense()
        g_prev = self.G_prev if self.fresh and self.G_prev is not None else self.G.to_dense()
        return g_prev @ self.s_prev @ a_prev

    def modified_gradient(self, grad: Tensor, eta: float | None) -> Tensor:
        if self.k == 0 or self.omega == 0 or self.g_prev is None or self.ghat_prev is None:
            return grad
        c = self.omega * self._ratio(eta)
        out = grad + c * (self.ghat_prev - self.g_prev).to(grad.dtype)
        m = self.wake_product(self.eta_prev)
        if m is not None:
            out = out - c * m.to(grad.dtype)
        return out

    def precondition(self, grad: Tensor) -> Tensor:
        eta = self._eta()
        if self.inverse is None or self.k % self.T_inv in (0, 1):
            if self._damping is None:
                raise RuntimeError(f"block {self.info.name!r}: precondition() before the first refresh()")
            self._decompose(eta)
        ghat = self.modified_gradient(grad, eta)
        assert self.inverse is not None
        out = self.inverse.apply(ghat)
        self.g_prev = grad.detach().clone()
        self.ghat_prev = ghat.detach().clone()
        self.s_prev = out.detach().clone()
        self.eta_prev = eta
        self.fresh = False
        self.k += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["kldwrm"]["fresh"] = self.fresh
        out["kldwrm"]["lam"] = self._lam
        out["kldwrm"]["damping"] = self._damping
        wake = out.setdefault("wake", {})
        for key in _Q_STATE:
            value = getattr(self, key)
            if value is not None:
                wake[key] = value
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fresh = bool(state["kldwrm"]["fresh"])
        self._lam = float(state["kldwrm"]["lam"])
        self._damping = state["kldwrm"]["damping"]
        wake = state.get("wake", {})
        for key in _Q_STATE:
            setattr(self, key, _clone(wake.get(key)))


class QEKLDWRMBlock(QKLDWRMBlock):
    """QE-KLD-WRM's block: the Q block; the inner loop over past networks is run by
    :class:`curvkit_kldwrm.optim.QEKLDWRM`, which sets :attr:`driven`. Driven by any other
    optimizer it takes Q-KLD-WRM steps and warns once."""

    driven = False
    _warned = False

    def precondition(self, grad: Tensor) -> Tensor:
        if not self.driven and not QEKLDWRMBlock._warned:
            QEKLDWRMBlock._warned = True
            warnings.warn(
                "qe-kldwrm's inner loop over past networks needs the model and the batch: this optimizer takes "
                "Q-KLD-WRM steps only. Use curvkit_kldwrm.QEKLDWRM for the full method.",
                stacklevel=3,
            )
        return super().precondition(grad)


def _bad_configs() -> tuple[tuple[dict[str, Any], type[Exception]], ...]:
    return (
        ({"ema_decay": 1.5, "T_inv": 0}, ConfigError),
        ({"wake_decay": -0.1}, ConfigError),
        ({"eta": 0.0}, ConfigError),
        ({"inverter": "cholesky", "damping": ExactDamping(value=1e-3)}, IncompatibleComponentsError),
        ({"inverter": "no-such-inverter"}, UnknownComponentError),
        ({"not_an_option": 1}, ConfigError),
    )


SO_KLDWRM_SPEC = MethodSpec(
    name="so-kldwrm",
    config_cls=SOKLDWRMConfig,
    block_factory=SOKLDWRMBlock,
    factor_statistics=True,
    summary="SO-KLD-WRM: K-FAC on the wake-modified gradient g_k − ω(η_{k−1}/η_k)g_{k−1}",
    reference="Puiu (2022), Rethinking Exponential Averaging of the Fisher, arXiv:2204.04718",
    sample_configs=(
        {"T_stats": 1, "T_inv": 3, "damping": 1e-2},
        {"T_stats": 1, "T_inv": 1, "damping": 1e-2, "ema_decay": 0.9, "wake_decay": 0.5},
    ),
    bad_configs=_bad_configs(),
)

Q_KLDWRM_SPEC = MethodSpec(
    name="q-kldwrm",
    config_cls=QKLDWRMConfig,
    block_factory=QKLDWRMBlock,
    factor_statistics=True,
    summary="Q-KLD-WRM: quadratic wake recursion, factors augmented with the newest local estimate",
    reference="Puiu (2022), Rethinking Exponential Averaging of the Fisher, arXiv:2204.04718",
    sample_configs=(
        {"T_stats": 1, "T_inv": 3, "damping": 1e-2, "eta": 0.05},
        {"T_stats": 2, "T_inv": 2, "damping": 1e-2, "eta": 0.05},
    ),
    bad_configs=(*_bad_configs(), ({"local_weight": -1.0}, ConfigError)),
)

QE_KLDWRM_SPEC = MethodSpec(
    name="qe-kldwrm",
    config_cls=QEKLDWRMConfig,
    block_factory=QEKLDWRMBlock,
    factor_statistics=True,
    summary="QE-KLD-WRM: Q-KLD-WRM plus an inner loop on a symmetric KL to stored past networks",
    reference="Puiu (2022), Rethinking Exponential Averaging of the Fisher, arXiv:2204.04718",
    sample_configs=({"T_stats": 1, "T_inv": 3, "damping": 1e-2, "eta": 0.05},),
    bad_configs=(*_bad_configs(), ({"capacity": 0}, ConfigError), ({"kappa": 0.0}, ConfigError)),
)
