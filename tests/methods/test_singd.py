"""SINGD/IKFAC/INGD behaviour beyond the package comparison (test_singd_reference.py).

* IKFAC's theorem: with ``kfac_like`` and a small β₁, ``K Kᵀ`` tracks ``(S_K + λI)⁻¹``
  for K-FAC's EMA factor ``S_K ← (1−β₁) S_K + β₁ U`` (and ``C Cᵀ`` likewise);
* the update schedule (steps 0, T, 2T, ...), ``refresh`` doing nothing;
* non-finite intermediate statistics skip the update, leaving K, C and momenta untouched;
* bf16 factors and momenta (``factor_dtype``) train a small MLP to finite, lower loss;
* configuration errors name the option.
"""

from __future__ import annotations

import math

import pytest
import torch
from curvkit_singd.optim import IKFAC, INGD, SINGD
from curvkit_singd.singd import IKFACConfig, SINGDBlock, SINGDConfig
from torch import nn

from curvkit.errors import ConfigError


class _Stats:
    """The part of ``LayerStats`` a SINGD block reads."""

    shared = None  # one process's own batch (LayerStats.shared)

    def __init__(self, a_rows: torch.Tensor, g_rows: torch.Tensor) -> None:
        self.a_rows, self.g_rows = a_rows, g_rows
        self.inputs = a_rows
        self.dtype, self.device = a_rows.dtype, a_rows.device

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a_rows, self.g_rows


def _block(config: SINGDConfig, d_in: int = 5, d_out: int = 3) -> SINGDBlock:
    import curvkit
    from curvkit.blocks import BlockInfo

    info = BlockInfo("layer", nn.Linear, d_in, d_out, False)
    return SINGDBlock(info, config, config.structure_classes(curvkit.default_registry()))


@pytest.mark.parametrize("structure", ["dense", "diagonal"])
def test_ikfac_tracks_damped_inverse_of_kfac_factor(structure):
    beta1, lam, steps = 1e-3, 1e-1, 3000
    cfg = IKFACConfig(damping=lam, lr_cov=beta1, T=1, structure=structure)
    block = _block(cfg)
    gen = torch.Generator().manual_seed(0)
    mix_a = torch.randn(5, 5, generator=gen, dtype=torch.float64) / 3
    mix_g = torch.randn(3, 3, generator=gen, dtype=torch.float64) / 2
    # K = I at the start is K-FAC with S + λI = I
    s_k = (1 - lam) * torch.eye(5, dtype=torch.float64)
    s_c = (1 - lam) * torch.eye(3, dtype=torch.float64)
    project = block.structure_K.from_dense
    for _ in range(steps):
        a = torch.randn(8, 5, generator=gen, dtype=torch.float64) @ mix_a
        g = torch.randn(1, 8, 3, generator=gen, dtype=torch.float64) @ mix_g
        block.update(_Stats(a, g), 0.0)  # type: ignore[arg-type]
        s_k = (1 - beta1) * s_k + beta1 * project(a.T @ a).to_dense()
        s_c = (1 - beta1) * s_c + beta1 * project(g[0].T @ g[0]).to_dense()
    kk, cc = block.preconditioner_dense()
    eye_k, eye_c = torch.eye(5, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    for got, s, eye in ((kk, s_k, eye_k), (cc, s_c, eye_c)):
        target = torch.linalg.inv(s + lam * eye)
        rel = float(torch.linalg.matrix_norm(got - target) / torch.linalg.matrix_norm(target))
        assert rel < 2e-3, rel  # measured ≈ 2e-4 to 4e-4
        # and the factor moved far from its start: the test is not vacuous
        assert float(torch.linalg.matrix_norm(target - eye) / torch.linalg.matrix_norm(target)) > 0.2


def test_update_schedule_and_refresh_is_a_no_op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    opt = SINGD(model, lr=0.1, T=3, lr_cov=0.1)
    X, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    counts = []
    for _ in range(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        counts.append(opt.preconditioner.blocks["0"].num_updates)
    assert counts == [1, 1, 1, 2, 2, 2, 3]  # updates at steps 0, 3, 6
    block = opt.preconditioner.blocks["0"]
    before = {k: v.clone() for k, v in block.K.tensors().items()}  # type: ignore[union-attr]
    block.refresh(opt.preconditioner.damping, 1.0)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in block.K.tensors().items())  # type: ignore[union-attr]


@pytest.mark.parametrize("structure", ["dense", "block3diagonal", "triltoeplitz"])
def test_overflowing_statistics_skip_the_update(structure):
    cfg = SINGDConfig(damping=1e-3, lr_cov=0.1, T=1, structure=structure)
    block = _block(cfg)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(1, 8, 3, generator=gen, dtype=torch.float64)
    block.update(_Stats(a, g), 0.0)  # type: ignore[arg-type]
    state = {k: {n: t.clone() for n, t in v.items()} for k, v in block.state_dict().items() if isinstance(v, dict)}
    assert set(state) == {"K", "C", "m_K", "m_C"}
    block.update(_Stats(a * 1e200, g), 0.0)  # finite rows, but H_K overflows to inf
    assert block.skipped_updates == 1 and block.num_updates == 1
    after = block.state_dict()
    for name, tensors in state.items():
        for n, t in tensors.items():
            assert torch.equal(after[name][n], t), (name, n)


@pytest.mark.parametrize("structure", ["dense", "diagonal", "block3diagonal", "hierarchical3_2", "triltoeplitz"])
def test_bf16_factors_train(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(256, 8, generator=gen)
    y = (X @ torch.randn(8, 3, generator=gen)).argmax(1)
    opt = SINGD(model, lr=0.05, T=1, lr_cov=0.05, damping=1e-2, structure=structure, factor_dtype=torch.bfloat16)
    with torch.no_grad():
        start = float(nn.functional.cross_entropy(model(X), y))
    for step in range(60):
        xb, yb = X[(step * 32) % 256 :][:32], y[(step * 32) % 256 :][:32]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    block = opt.preconditioner.blocks["0"]
    assert block.K.dtype == torch.bfloat16 and block.m_K.dtype == torch.bfloat16  # type: ignore[union-attr]
    assert block.num_updates == 60
    with torch.no_grad():
        end = float(nn.functional.cross_entropy(model(X), y))
    assert math.isfinite(end) and end < 0.6 * start, (start, end)


def test_named_optimizers_and_defaults():
    model = nn.Sequential(nn.Linear(3, 2))
    opt = SINGD(model)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["momentum"] == 0.9
    cfg = opt.config
    assert isinstance(cfg, SINGDConfig)
    assert (cfg.lam, cfg.alpha1, cfg.T, cfg.lr_cov, cfg.structure) == (1e-3, 0.5, 10, 1e-2, "dense")
    ikfac = IKFAC(nn.Sequential(nn.Linear(3, 2)))
    assert ikfac.config.kfac_like and ikfac.config.alpha1 == 0.0  # type: ignore[attr-defined]
    ingd = INGD(nn.Sequential(nn.Linear(3, 2)))
    assert ingd.config.structure == "dense"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="structure"):
        INGD(nn.Sequential(nn.Linear(3, 2)), structure="diagonal")


@pytest.mark.parametrize(
    "options,named",
    [
        ({"T": 0}, "T="),
        ({"damping": 0.0}, "damping"),
        ({"alpha1": 1.0}, "alpha1"),
        ({"kfac_like": True, "alpha1": 0.3}, "alpha1"),
        ({"lr_cov": -1.0}, "lr_cov"),
        ({"factor_dtype": (torch.bfloat16, "x")}, "factor_dtype"),
        ({"T_stats": 2}, "T_stats"),
    ],
)
def test_bad_options_name_the_option(options, named):
    with pytest.raises(ConfigError, match=named):
        SINGD(nn.Sequential(nn.Linear(3, 2)), **options)
