"""KLD-WRM (Puiu 2022): wake-off equivalence to K-FAC and dense references of the recursions."""

from __future__ import annotations

import pytest
import torch
from curvkit_kldwrm import QEKLDWRM, QKLDWRM, SOKLDWRM, QKLDWRMBlock, QKLDWRMConfig, SOKLDWRMBlock, SOKLDWRMConfig
from torch import nn

import curvkit.optim
from curvkit.bench.tasks import digits_cnn, digits_mlp
from curvkit.blocks import BlockInfo
from curvkit.demo import digits_split
from curvkit.linalg.damping import ExactDamping
from curvkit.plugins import default_registry

RTOL = 1e-10


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _run(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (40,), generator=gen)
    for i in range(steps):
        xb, yb = X[(i * 8) % 40 :][:8], y[(i * 8) % 40 :][:8]
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("schedule", [{"T_stats": 1, "T_inv": 1}, {"T_stats": 3, "T_inv": 3}])
@pytest.mark.parametrize(
    "cls, off",
    [
        (SOKLDWRM, {"wake_decay": 0.0}),
        (QKLDWRM, {"wake_decay": 0.0, "local_weight": 0.0}),
        (QEKLDWRM, {"wake_decay": 0.0, "local_weight": 0.0, "inner_steps": 0}),
    ],
)
def test_wake_off_is_kfac(cls, off, schedule):
    common = dict(lr=0.1, weight_decay=1e-3, weight_decay_mode="before", kl_clip=None, rms_clip=None)
    kw = dict(damping=ExactDamping(value=1e-2), inverter="eigh", ema_decay=0.5, **schedule)
    model = _mlp()
    ref_model = _mlp()
    ref = _run(curvkit.optim.KFAC(ref_model, **common, **kw), ref_model)
    got = _run(cls(model, **common, **kw, **off), model)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL)
    # and the wake does change the trajectory when on
    model_on = _mlp()
    on = _run(cls(model_on, **common, **kw), model_on)
    assert max(float((a - b).abs().max()) for a, b in zip(on, ref)) > 1e-6


class _Stats:
    def __init__(self, A: torch.Tensor, G: torch.Tensor) -> None:
        self._a, self._g, self.inputs = A, G, A
        self.dtype, self.device = A.dtype, A.device

    def A(self) -> torch.Tensor:
        return self._a

    def G(self) -> torch.Tensor:
        return self._g


def _spd(d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(d, 2, dtype=torch.float64, generator=gen)  # rank-deficient, like a small batch
    return x @ x.T


def _solve(A: torch.Tensor, G: torch.Tensor, lam: float, grad: torch.Tensor) -> torch.Tensor:
    dense = torch.kron(G, A) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype)
    return torch.linalg.solve(dense, grad.reshape(-1)).reshape(grad.shape)


def _sequence(steps: int, d_in: int, d_out: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            _spd(d_in, gen),
            _spd(d_out, gen),
            torch.randn(d_out, d_in, dtype=torch.float64, generator=gen),
            0.05 * (1 + (k % 3)),  # a changing step size η_k
            k % 2 == 0 or k < 2,  # statistics on some steps only
        )
        for k in range(steps)
    ]


def _drive(block, seq, lam, T_inv):
    out = []
    for k, (a, g, grad, eta, stats) in enumerate(seq):
        if stats:
            block.update(_Stats(a, g), min(1 - 1 / (block.num_updates + 1), block_rho))
        if k % T_inv == 0 or k == 0:
            block.refresh(ExactDamping(value=lam), lam)
        block.set_step_size(eta)
        out.append(block.precondition(grad))
    return out


block_rho = 0.6


def _info(d_in: int, d_out: int) -> BlockInfo:
    return BlockInfo("layer", nn.Linear, d_in, d_out, True)


@pytest.mark.parametrize("T_inv", [1, 3])
def test_so_matches_dense_recursion(T_inv):
    d_in, d_out, lam, omega = 4, 3, 0.1, 0.3
    seq = _sequence(9, d_in, d_out)
    cfg = SOKLDWRMConfig(ema_decay=block_rho, wake_decay=omega, T_inv=T_inv, damping=ExactDamping(value=lam))
    got = _drive(SOKLDWRMBlock(_info(d_in, d_out), cfg, default_registry()), seq, lam, T_inv)
    A = G = None
    n = 0
    g_prev, eta_prev = None, None
    inv_A = inv_G = None
    for k, (a, g, grad, eta, stats) in enumerate(seq):
        if stats:
            n += 1
            d = min(1 - 1 / n, block_rho)
            A = a.clone() if A is None else d * A + (1 - d) * a
            G = g.clone() if G is None else d * G + (1 - d) * g
        if k % T_inv == 0:
            inv_A, inv_G = A.clone(), G.clone()
        ghat = grad if g_prev is None else grad - omega * (eta_prev / eta) * g_prev
        expected = _solve(inv_A, inv_G, lam, ghat)
        torch.testing.assert_close(got[k], expected, rtol=1e-9, atol=1e-9)
        g_prev, eta_prev = grad, eta


@pytest.mark.parametrize("T_inv", [1, 3])
def test_q_matches_dense_recursion(T_inv):
    d_in, d_out, lam, omega = 4, 3, 0.1, 0.4
    seq = _sequence(10, d_in, d_out, seed=1)
    cfg = QKLDWRMConfig(ema_decay=block_rho, wake_decay=omega, T_inv=T_inv, damping=ExactDamping(value=lam))
    got = _drive(QKLDWRMBlock(_info(d_in, d_out), cfg, default_registry()), seq, lam, T_inv)
    A = G = A_old = G_old = None
    n = 0
    g_prev = ghat_prev = s_prev = eta_prev = None
    aug = None
    for k, (a, g, grad, eta, stats) in enumerate(seq):
        A_old, G_old = (None, None) if A is None else (A.clone(), G.clone())  # Ā_{k-1}
        if stats:
            n += 1
            d = min(1 - 1 / n, block_rho)
            A = a.clone() if A is None else d * A + (1 - d) * a
            G = g.clone() if G is None else d * G + (1 - d) * g
            a_loc, g_loc = a, g  # = (Ā_k − ρĀ_{k−1})/(1−ρ) of the author's code
        else:
            a_loc, g_loc = A, G
        if k % T_inv in (0, 1):
            aug = (A + eta * a_loc, G + eta * g_loc)
        if k == 0:
            ghat = grad
        else:
            r = eta_prev / eta
            if k == 1 or k % T_inv >= 2 or (k % T_inv == 0 and T_inv >= 2):
                m = ghat_prev / (1 + eta_prev)
            else:
                m = G_old @ s_prev @ A_old
            ghat = grad + omega * r * (ghat_prev - g_prev) - omega * r * m
        s = _solve(aug[0], aug[1], lam, ghat)
        torch.testing.assert_close(got[k], s, rtol=1e-9, atol=1e-9)
        g_prev, ghat_prev, s_prev, eta_prev = grad, ghat, s, eta


def test_generic_optimizer_passes_the_learning_rate_to_q():
    """CurvatureOptimizer tells every block its group's lr (CurvatureBlock.set_step_size), so
    ``create("q-kldwrm", ...)`` takes the named QKLDWRM's steps, and a different lr changes them."""
    common = dict(T_stats=1, T_inv=2)
    model, named_model, other_model = _mlp(), _mlp(), _mlp()
    got = _run(curvkit.optim.create("q-kldwrm", model, lr=0.1, **common), model)
    ref = _run(QKLDWRM(named_model, lr=0.1, kl_clip=None, rms_clip=None, weight_decay=0.0, **common), named_model)
    other = _run(curvkit.optim.create("q-kldwrm", other_model, lr=0.01, **common), other_model)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL)
    assert max(float((a - b).abs().max()) for a, b in zip(got, other)) > 1e-6


def test_qe_inner_loop_and_memory_bound():
    torch.manual_seed(0)
    model = nn.Linear(4, 3, bias=False).double()
    opt = QEKLDWRM(
        model,
        lr=0.1,
        capacity=2,
        inner_steps=3,
        T_stats=1,
        T_inv=1,
        kl_clip=None,
        rms_clip=None,
        weight_decay=0.0,
        inner_rms_clip=None,
    )
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (6,), generator=gen)
    q_model = nn.Linear(4, 3, bias=False).double()
    q_model.load_state_dict(model.state_dict())
    q = QKLDWRM(q_model, lr=0.1, T_stats=1, T_inv=1, kl_clip=None, rms_clip=None, weight_decay=0.0)
    checked = False
    for step in range(4):
        theta_k = model.weight.detach().clone()
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        g_k = model.weight.grad.clone()
        past = [net["weight"].clone() for net in opt.past]
        block = opt.preconditioner.blocks[""]
        q.zero_grad()
        nn.functional.cross_entropy(q_model(X), y).backward()
        q.step()
        opt.step()
        assert len(opt.past) == min(step + 1, 2)  # bounded by capacity
        if len(past) < 2:
            torch.testing.assert_close(model.weight.detach(), q_model.weight.detach(), rtol=RTOL, atol=RTOL)
            continue
        # dense reference of the inner loop, started from the Q step
        w = q_model.weight.detach().clone()
        buf = None
        targets = [X @ p.T for p in past]
        for _ in range(3):
            w_ = w.clone().requires_grad_(True)
            out = X @ w_.T
            lp = torch.log_softmax(out, 1)
            dsum = None
            for t in targets:
                lq = torch.log_softmax(t, 1)
                kl = (0.5 * (lp.exp() - lq.exp()) * (lp - lq)).sum(1).mean()
                dsum = kl if dsum is None else 0.5 * dsum + 0.5 * kl  # ω = ρ = 0.5
            (grad_kl,) = torch.autograd.grad((1 / 0.1) / (2 * 330.0) * dsum, w_)
            s = (w - theta_k).reshape(-1)
            b = (torch.kron(block.B_G, block.B_A) @ s).reshape(w.shape)
            d = grad_kl + g_k + b
            buf = d if buf is None else 0.5 * buf + d
            w = w - 0.1 * 0.1 * buf
        torch.testing.assert_close(model.weight.detach(), w, rtol=RTOL, atol=RTOL)
        q_model.weight.data.copy_(model.weight.detach())
        checked = True
    assert checked
    assert opt.state_bytes() > q.state_bytes()


# --- digits -----------------------------------------------------------------------------------


def _digits(image: bool = False):
    X_tr, y_tr, X_te, y_te = digits_split()
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return X_tr.reshape(shape), X_te.reshape(shape), y_tr, y_te


def _digits_accuracy(name: str, model: nn.Module, epochs: int, image: bool, **options) -> float:
    import curvkit_kldwrm

    X_tr, X_te, y_tr, y_te = _digits(image)
    opt = getattr(curvkit_kldwrm, name)(model, **options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(X_tr), generator=gen)
        for i in range(0, len(X_tr), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx]).backward()
            opt.step()
    with torch.no_grad():
        return float((model(X_te).argmax(1) == y_te).float().mean())


@pytest.mark.parametrize("name", ["SOKLDWRM", "QKLDWRM", "QEKLDWRM"])
def test_trains_digits_to_95_percent(name):
    """lr 0.05, heavy-ball 0.9, exact damping 0.1, ρ = 0.95, ω = 0.5, T_inv = 10, 10 epochs
    (measured: SO 97.1%, Q 97.3%, QE 97.8%; K-FAC with the same settings diverges at lr 0.1)."""
    torch.manual_seed(0)
    model = digits_mlp()
    acc = _digits_accuracy(
        name,
        model,
        epochs=10,
        image=False,
        lr=0.05,
        momentum=0.9,
        damping=ExactDamping(value=0.1),
        ema_decay=0.95,
        T_stats=1,
        T_inv=10,
        kl_clip=None,
        weight_decay=0.0,
        wake_decay=0.5,
    )
    assert acc >= 0.95, f"{name}: {acc:.4f}"


@pytest.mark.parametrize("name", ["SOKLDWRM", "QKLDWRM", "QEKLDWRM"])
def test_trains_digits_cnn_to_95_percent(name):
    """Conv(1→16)-ReLU-Conv(16→32)-ReLU-AvgPool-Linear on 1×8×8 digits, 5 epochs, the MLP's settings
    but lr 0.02 (measured: SO 96.9%, Q 97.1%, QE 97.1%, K-FAC 96.4%; at lr 0.05 SO diverges)."""
    torch.manual_seed(0)
    model = digits_cnn()
    acc = _digits_accuracy(
        name,
        model,
        epochs=5,
        image=True,
        lr=0.02,
        momentum=0.9,
        damping=ExactDamping(value=0.1),
        ema_decay=0.95,
        T_stats=1,
        T_inv=10,
        kl_clip=None,
        weight_decay=0.0,
        wake_decay=0.5,
    )
    assert acc >= 0.95, f"{name}: {acc:.4f}"
