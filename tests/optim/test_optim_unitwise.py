"""The optimizers on normalisation layers: the core's UnitwiseBlock under every method.

The step of a normalisation layer is checked exactly against ``(F_i + shift·I)⁻¹ g_i`` per
unit, with ``F`` the dense float64 empirical Fisher's per-unit blocks
(tests/_norm_reference.py) and the shift each damping strategy documents; the block's own
mechanics (checkpoints, shared refreshes, bf16, failures) are unit-tested.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _norm_reference import dense_fisher, unit_blocks
from _reference import assert_matrix_close
from torch import nn

import curvkit
from curvkit.blocks import BlockInfo
from curvkit.linalg.damping import ConstantDamping, ExactDamping, PiDamping, RelativeDamping
from curvkit.optim import EKFAC, KFAC, RSKFAC, SINGD, Preconditioner
from curvkit.unitwise import DEFAULT_EMA_DECAY, UnitwiseBlock, unitwise_shift

DT = torch.float64


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(6, dtype=DT))
        model[1].bias.copy_(torch.randn(6, dtype=DT))
    return model


def _batch(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize(
    ("method", "options", "shift"),
    [
        ("kfac", {"damping": 0.1}, lambda lam, ev: 0.1),  # PiDamping: λ
        ("kfac", {"damping": ExactDamping(value=0.05), "inverter": "eigh"}, lambda lam, ev: 0.05),
        ("kfac", {"damping": ConstantDamping(a=0.2, g=0.5)}, lambda lam, ev: 0.2 * 0.5),  # a·g·λ², λ = 1
        ("rs-kfac", {"damping": 0.1, "rank": 2}, lambda lam, ev: 0.1 * float(ev.max())),  # relative: λ·λ_max
        ("singd", {"damping": 0.1}, lambda lam, ev: 0.1),  # SINGD's λ
        ("skfac", {"damping": 0.1}, lambda lam, ev: 0.1),  # equal split: λ
    ],
    ids=["kfac-pi", "kfac-exact", "kfac-constant", "rs-kfac-relative", "singd", "skfac"],
)
def test_the_step_is_the_damped_inverse_of_the_exact_unit_blocks(method, options, shift):
    model = _model()
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    F = unit_blocks(dense_fisher(model, "1", X, y, loss_fn, "empirical"), 2)  # (6, 2, 2)
    pre = Preconditioner(model, method, **options)
    model.zero_grad()
    loss_fn(model(X), y).backward()
    g = torch.stack([model[1].weight.grad, model[1].bias.grad], 1).clone()  # (D, 2): [γ_i, β_i]
    assert pre.step()
    block = pre.blocks["1"]
    assert isinstance(block, UnitwiseBlock) and block.num_updates == 1
    assert_matrix_close(block.F, F, rtol=1e-10)  # the first update (decay 0) is the batch's Fisher
    s = shift(pre.damping_value, torch.linalg.eigvalsh(F))
    expected = torch.linalg.solve(F + s * torch.eye(2, dtype=DT), g.unsqueeze(-1)).squeeze(-1)
    got = torch.stack([model[1].weight.grad, model[1].bias.grad], 1)
    assert_matrix_close(got, expected, rtol=1e-9)


def test_ema_follows_the_method_or_the_fallback():
    info = BlockInfo("ln", nn.LayerNorm, 2, 4, True, unitwise=True)
    assert UnitwiseBlock.from_config(info, KFAC(_model(), ema_decay=0.7).config).stat_decay == 0.7
    assert UnitwiseBlock.from_config(info, SINGD(_model()).config).stat_decay == DEFAULT_EMA_DECAY
    # the preconditioner folds batches in with min(1 - 1/k, ρ)
    model = _model()
    X, y = _batch()
    batches = [(X[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4]) for k in range(3)]
    # references first: a deep copy of a model carries the optimizer's hooks along
    fs = [unit_blocks(dense_fisher(model, "1", xb, yb, nn.CrossEntropyLoss(), "empirical"), 2) for xb, yb in batches]
    opt = KFAC(model, lr=0.0, damping=0.1, ema_decay=0.6)
    for xb, yb in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    expected = fs[0]
    for k, f in enumerate(fs[1:], start=2):
        rho = min(1 - 1 / k, 0.6)
        expected = rho * expected + (1 - rho) * f
    assert_matrix_close(opt.preconditioner.blocks["1"].F, expected, rtol=1e-10)


@pytest.mark.parametrize("cls", [KFAC, EKFAC, SINGD, RSKFAC])
def test_named_optimizers_train_normalised_models_and_say_so(cls):
    """An MLP with LayerNorm and a CNN with BatchNorm2d: the normalisation layers are
    preconditioned (summary() shows their unit-wise blocks), and the loss falls."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(96, 1, 6, 6, generator=g)
    y = (X.flatten(1) @ torch.randn(36, 4, generator=g)).argmax(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 36, 16),
        nn.LayerNorm(16),
        nn.Tanh(),
        nn.Linear(16, 4),
    )
    extra = {"rank": 8, "damping": 0.1} if cls is RSKFAC else {}  # RS-KFAC: its sample config's λ
    opt = cls(model, lr=0.05, **extra)
    loss_fn = nn.CrossEntropyLoss()
    with torch.no_grad():
        before = float(loss_fn(model(X), y))
    for step in range(30):
        xb, yb = X[(step * 32) % 96 :][:32], y[(step * 32) % 96 :][:32]
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_fn(model(X), y))
    assert after < 0.7 * before
    summary = opt.summary()
    for name in ("1", "5"):
        line = next(ln for ln in summary.splitlines() if ln.strip().startswith(f"{name}:"))
        assert "UnitwiseBlock" in line and "first-order" not in line, summary
        assert opt.preconditioner.blocks[name].num_updates > 0
    assert "first-order" not in summary


def test_checkpoints_and_shared_refreshes():
    model = _model()
    X, y = _batch()
    opt = KFAC(model, lr=0.1, damping=0.1, T_inv=2)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
    block = opt.preconditioner.blocks["1"]
    state = copy.deepcopy(block.state_dict())
    other = UnitwiseBlock(block.info, ema_decay=block.stat_decay)
    other.load_state_dict(state)
    g = torch.randn(6, 2, dtype=DT)
    assert torch.equal(other.precondition(g), block.precondition(g))
    assert torch.equal(other.F, block.F) and other.num_updates == block.num_updates
    # a refresh computed elsewhere, installed here
    third = UnitwiseBlock(block.info)
    third.init(dtype=DT, device=torch.device("cpu"))
    third.load_refresh_state(block.refresh_state())
    assert torch.equal(third.precondition(g), block.precondition(g))
    # the operator and the quadratic model
    op = block.as_operator()
    assert_matrix_close(op @ g, torch.einsum("dij,dj->di", block.F, g), rtol=1e-14)
    assert_matrix_close(op.to_dense() @ g.reshape(-1), (op @ g).reshape(-1), rtol=1e-13)
    assert block.quadratic(g) == pytest.approx(float((g * (op @ g)).sum()), rel=1e-12)


def test_bf16_parameters_keep_float32_state():
    model = _model().to(torch.bfloat16)
    X, y = _batch()
    opt = KFAC(model, lr=0.05, damping=0.1)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X.to(torch.bfloat16)), y).backward()
        opt.step()
    block = opt.preconditioner.blocks["1"]
    assert block.F.dtype == torch.float32 and block.inverse.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    d = block.precondition(torch.ones(6, 2, dtype=torch.bfloat16))
    assert d.dtype == torch.bfloat16


def test_a_failed_refresh_keeps_the_last_inverse_and_nonfinite_statistics_are_skipped():
    info = BlockInfo("ln", nn.LayerNorm, 2, 3, True, unitwise=True)
    block = UnitwiseBlock(info)
    block.init(dtype=DT, device=torch.device("cpu"))
    block.F.copy_(torch.eye(2, dtype=DT).expand(3, 2, 2))
    block.refresh(PiDamping(value=0.1), 0.1)
    good = block.inverse.clone()
    block.F[1, 0, 0] = float("nan")
    block.refresh(PiDamping(value=0.1), 0.1)
    assert block.inverse_failures == 1 and torch.equal(block.inverse, good)
    # in the optimizer: a non-finite statistic skips the update of every block
    model = _model()
    X, y = _batch()
    opt = KFAC(model, lr=0.1, damping=0.1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    before = opt.preconditioner.blocks["1"].F.clone()
    opt.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    opt.preconditioner.engine.uses["1"][0].record.inputs[0, 0] = float("nan")  # a corrupted x̂
    opt.step()
    assert opt.preconditioner.counters["skipped_stat_updates"] == 1
    assert torch.equal(opt.preconditioner.blocks["1"].F, before)


def test_shift_rules():
    ev = torch.tensor([[0.0, 2.0], [1.0, 4.0]], dtype=DT)
    assert unitwise_shift(PiDamping(value=0.3), 0.3, ev) == 0.3
    assert unitwise_shift(RelativeDamping(value=0.1), 0.1, ev) == pytest.approx(0.4)
    assert unitwise_shift(ConstantDamping(a=0.5, g=0.2), 2.0, ev) == pytest.approx(0.4)
    tiny = unitwise_shift(ConstantDamping(a=0.0, g=0.2), 1.0, ev)  # a zero shift is raised to eps·λ_max
    assert 0 < tiny == pytest.approx(torch.finfo(torch.float32).eps * 4.0)


def test_a_method_can_bring_its_own_unitwise_block():
    from dataclasses import replace

    class Mine(UnitwiseBlock):
        pass

    registry = curvkit.default_registry()
    spec = replace(registry.methods.get("kfac"), unitwise_block=lambda info, config, reg: Mine(info))
    pre = Preconditioner(_model(), spec, registry=registry)
    assert type(pre.blocks["1"]) is Mine and type(pre.blocks["0"]).__name__ == "KroneckerBlock"


def test_an_external_statistics_backend_feeds_unitwise_blocks():
    """``backend=`` in the optimizers: a backend returning ``UnitwiseFactors`` (here the
    capture engine registered under another name) gives the trajectory of the default
    path; ASDL, which computes Kronecker factors only, refuses the LayerNorm by name."""
    from curvkit.stats.hooks_backend import HooksBackend

    class Mirror(HooksBackend):
        name = "mirror"

    class MirrorPlugin:
        @staticmethod
        @curvkit.hookimpl
        def curvkit_register_statistics_backends(register):
            register.add(Mirror())

    registry = curvkit.build_registry(plugins=[MirrorPlugin])
    X, y = _batch()
    loss_fn = nn.CrossEntropyLoss()
    models = []
    for backend in ("hooks", "mirror"):
        model = _model()
        opt = KFAC(model, lr=0.1, damping=0.1, fisher="type-2", loss_fn=loss_fn, backend=backend, registry=registry)
        for _ in range(3):
            opt.zero_grad()
            if backend != "hooks":
                opt.collect_statistics(X, y)
            out = model(X)
            opt.curvature_backward(out, y)
            loss_fn(out, y).backward()
            opt.step()
        assert isinstance(opt.preconditioner.blocks["1"], UnitwiseBlock)
        models.append(model)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    opt = KFAC(_model(), lr=0.1, fisher="type-2", loss_fn=loss_fn, backend="asdl")
    with pytest.raises(curvkit.UnsupportedRequestError, match=r"LayerNorm.*'hooks'"):
        opt.collect_statistics(X, y)
