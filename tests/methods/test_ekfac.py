"""EKFAC and TEKFAC (plugins/curvkit_kfac/ekfac.py) against references.

* Without the eigenvalue correction EKFAC is K-FAC with ``inverter="eigh"`` and exact
  damping (curvkit's K-FAC block): parameters after several optimizer steps agree to
  float64 rounding; without it TEKFAC is TKFAC with exact damping.
* The eigenbases and corrected eigenvalues of one batch equal those of curvlinops'
  ``EKFACLinearOperator`` (written independently; bias folded into the weight) for the
  empirical, type-2 and MC Fisher, an MLP and a CNN with expand and reduce.
* The corrected eigenvalues are the dense per-example second moments in the basis
  (``torch.func`` per-sample gradients), also across an EMA between two refreshes.
* TEKFAC's basis is that of TKFAC's trace-weighted factors, built densely in the test.
* Each method trains the digits MLP to at least 95% test accuracy.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _models import build_case
from curvkit_kfac.ekfac import EKFACBlock
from curvkit_kfac.tekfac import TEKFACBlock
from torch import nn

import curvkit.optim
from curvkit.errors import ConfigError
from curvkit.linalg.damping import ExactDamping, PiDamping

SEED = 7


def _train(model, X, y, steps, loss_fn=None, **options):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    opt = curvkit.optim.CurvatureOptimizer(
        model, lr=0.2, momentum=0.5, loss_fn=loss_fn, generator=torch.Generator().manual_seed(SEED), **options
    )
    for step in range(steps):
        xb, yb = X[(step * 8) % 32 :][:16], y[(step * 8) % 32 :][:16]
        opt.zero_grad()
        out = model(xb)
        opt.curvature_backward(out, yb)
        loss_fn(out, yb).backward()
        opt.step()
    return opt


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_uncorrected_ekfac_is_kfac_with_exact_damping(kind, fisher):
    model, X, y = build_case(kind, "ce", n=48)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    common = {"fisher": fisher, "T_inv": 2, "ema_decay": 0.8, "damping": ExactDamping(value=0.05)}
    opt = _train(ours, X, y, 6, method="ekfac", correct_eigenvalues=False, **common)
    _train(ref, X, y, 6, method="kfac", inverter="eigh", **common)
    assert all(isinstance(b, EKFACBlock) for b in opt.preconditioner.blocks.values())
    moved = False
    for p, q, p0 in zip(ours.parameters(), ref.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        moved |= not torch.allclose(p, p0)
    assert moved


def test_corrected_ekfac_differs_from_kfac():
    """Guard: the comparison above would pass vacuously if the flag were ignored."""
    model, X, y = build_case("mlp", "ce", n=48)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    _train(ours, X, y, 3, method="ekfac", damping=ExactDamping(value=0.05))
    _train(ref, X, y, 3, method="kfac", inverter="eigh", damping=ExactDamping(value=0.05))
    diff = max(float((p - q).detach().abs().max()) for p, q in zip(ours.parameters(), ref.parameters(), strict=True))
    assert diff > 1e-3


def test_uncorrected_tekfac_is_tkfac_with_exact_damping():
    model, X, y = build_case("cnn", "ce", n=48)
    ours, ref = copy.deepcopy(model), copy.deepcopy(model)
    common = {"T_inv": 2, "ema_decay": 0.8, "damping": ExactDamping(value=0.05)}
    _train(ours, X, y, 6, method="tekfac", correct_eigenvalues=False, **common)
    _train(ref, X, y, 6, method="tkfac", inverter="eigh", **common)
    for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# --- one batch against curvlinops ------------------------------------------------------------


def _one_step(model, X, y, method="ekfac", **options):
    """Our blocks after one statistics step with T_inv=1 (so the state is that batch's)."""
    loss_fn = nn.CrossEntropyLoss()
    pre = curvkit.optim.Preconditioner(
        model, method, loss_fn=loss_fn, T_inv=1, generator=torch.Generator().manual_seed(SEED), **options
    )
    model.zero_grad()
    out = model(X)
    pre.curvature_backward(out, y)
    loss_fn(out, y).backward()
    assert pre.step()
    pre.remove()
    return pre.blocks


def _assert_same_basis(Q, Q_ref, what):
    """Eigenvectors agree up to sign: |Qᵀ Q_ref| = I (simple spectra)."""
    overlap = (Q.t() @ Q_ref).abs()
    torch.testing.assert_close(overlap, torch.eye(Q.shape[0], dtype=Q.dtype), atol=1e-6, rtol=0, msg=what)


def _reduce_cnn_case(n):
    """A CNN whose reduce-factors have simple spectra (the shared ``cnn`` has a 10-dimensional
    null space in its first layer's reduced A, where eigenvectors are arbitrary)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 2, 3, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)
    ).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, 2, 7, 7, generator=gen, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (n,), generator=gen)


CASES = {
    "mlp": ("mlp", "expand"),
    "cnn-expand": ("cnn", "expand"),
    "cnn-reduce": ("reduce-cnn", "reduce"),
}


@pytest.mark.parametrize("fisher", ["empirical", "type-2", "mc"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_batch_matches_curvlinops(case, fisher):
    from curvlinops import EKFACLinearOperator

    kind, approx = CASES[case]
    model, X, y = _reduce_cnn_case(40) if kind == "reduce-cnn" else build_case(kind, "ce", n=40)
    blocks = _one_step(model, X, y, fisher=fisher, kfac_approx=approx)
    op = EKFACLinearOperator(
        model,
        nn.CrossEntropyLoss(),
        [p for p in model.parameters() if p.requires_grad],
        [(X, y)],
        fisher_type=fisher,
        kfac_approx=approx,
        seed=SEED,
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    op.compute_kronecker_factors()
    op.compute_eigenvalue_correction()
    assert set(blocks) == set(op._corrected_eigenvalues)
    for name, block in blocks.items():
        assert isinstance(block, EKFACBlock) and block.Q_A is not None and block.Q_G is not None
        _assert_same_basis(block.Q_A, op._input_covariances_eigenvectors[name], f"Q_A of {name}")
        _assert_same_basis(block.Q_G, op._gradient_covariances_eigenvectors[name], f"Q_G of {name}")
        assert float(block.eig_A.min()) > 1e-8 * float(block.eig_A.max()) or name == "5", "degenerate A"
        ref = op._corrected_eigenvalues[name]
        if isinstance(ref, dict):  # curvlinops keys a layer without bias by parameter position
            (ref,) = ref.values()
        assert block.S is not None and block.S.shape == ref.shape
        torch.testing.assert_close(block.S, ref, rtol=1e-7, atol=1e-9 * float(ref.abs().max()))


# --- dense per-example ground truth ---------------------------------------------------------


def _per_example_grads(model, X, y):
    """``{layer: (N, d_out, d_in+1)}`` gradients of the per-example losses (torch.func)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, x, t):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, t.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = g[f"{name}.weight"].flatten(2)
            b = g.get(f"{name}.bias")
            out[name] = torch.cat([w, b.unsqueeze(2)], 2) if b is not None else w
    return out


def test_corrected_eigenvalues_are_dense_second_moments_with_ema():
    """Two batches, T_inv=2: S = EMA(ρ_S) of (1/N)Σ_n (Q_Gᵀ ∇ℓ_n Q_A)² in the basis of step 1."""
    model, X, y = build_case("mlp", "ce", n=64)
    loss_fn = nn.CrossEntropyLoss()
    rho = 0.3
    pre = curvkit.optim.Preconditioner(model, "ekfac", T_inv=2, scale_decay=rho, ema_decay=0.9, damping=1e-3)
    batches = [(X[:32], y[:32]), (X[32:], y[32:])]
    moments = []
    for xb, yb in batches:
        model.zero_grad()
        loss_fn(model(xb), yb).backward()
        with pre.suspended():  # the vmapped forward passes must not be captured
            moments.append(_per_example_grads(model, xb, yb))
        assert pre.step()
        if len(moments) == 1:  # the basis of the first (refresh) step
            basis = {n: (b.Q_A.clone(), b.Q_G.clone()) for n, b in pre.blocks.items()}
    for name, block in pre.blocks.items():
        q_a, q_g = basis[name]
        torch.testing.assert_close(block.Q_A, q_a, rtol=0, atol=0)  # no refresh at step 2
        s = [(q_g.t() @ m[name] @ q_a).square().mean(0) for m in moments]
        # second update since the restart: decay min(1 - 1/2, ρ_S) = ρ_S
        expected = rho * s[0] + (1 - rho) * s[1]
        torch.testing.assert_close(block.S, expected, rtol=1e-9, atol=1e-12)
        # and the step preconditions by that S (+ ε) in that basis
        grad_mat = torch.randn(block.S.shape, dtype=torch.float64)
        dense = q_g @ ((q_g.t() @ grad_mat @ q_a) / (expected + 1e-3)) @ q_a.t()
        torch.testing.assert_close(block.precondition(grad_mat), dense, rtol=1e-9, atol=1e-12)
        # the operator is the undamped estimate
        op = block.as_operator().to_dense()
        q = torch.kron(q_g, q_a)
        torch.testing.assert_close(op, q @ torch.diag(expected.reshape(-1)) @ q.t(), rtol=1e-9, atol=1e-12)


def test_tekfac_basis_is_trace_weighted_and_restart_uses_tkfac_eigenvalues():
    """TEKFAC's basis diagonalises the dense δΦ, δΨ; its uncorrected S is δ λ_Ψ λ_Φᵀ."""
    model, X, y = build_case("mlp", "ce", n=40)
    blocks = _one_step(copy.deepcopy(model), X, y, method="tekfac", correct_eigenvalues=False)
    per_example = _per_example_grads(model, X, y)
    n = X.shape[0]
    for name, block in blocks.items():
        assert isinstance(block, TEKFACBlock)
        j = per_example[name] / n**0.5  # Σ_n vec J vec Jᵀ = (1/N) Σ ∇ℓ_n ∇ℓ_nᵀ
        # J_n = g_n a_nᵀ is rank one: ‖a‖²‖g‖² = ‖J‖², ‖g‖² a aᵀ = Jᵀ J, ‖a‖² g gᵀ = J Jᵀ
        delta = j.square().sum()
        phi = torch.einsum("noi,noj->ij", j, j) / delta
        psi = torch.einsum("noi,nji->oj", j, j) / delta
        torch.testing.assert_close(block.delta, delta, rtol=1e-10, atol=0)
        for q, m in ((block.Q_A, phi), (block.Q_G, psi)):
            rotated = q.t() @ m @ q
            off = rotated - torch.diag(rotated.diagonal())
            assert float(off.abs().max()) < 1e-10 * float(m.abs().max())
        lam_phi = (block.Q_A.t() @ phi @ block.Q_A).diagonal()
        lam_psi = (block.Q_G.t() @ psi @ block.Q_G).diagonal()
        torch.testing.assert_close(block.S, delta * torch.outer(lam_psi, lam_phi), rtol=1e-8, atol=1e-14)


def test_tekfac_trace_damping_on_conv_layers_only():
    model, X, y = build_case("cnn", "ce", n=16)
    blocks = _one_step(model, X, y, method="tekfac", conv_damping="trace", trace_floor=1e-3, damping=1e-3)
    kinds = {name: block.trace_damping for name, block in blocks.items()}
    assert kinds == {"0": True, "2": True, "5": False}
    for block in blocks.values():
        s = block.S
        lam = max(float(s.sum()), 1e-3) / s.numel() if block.trace_damping else 1e-3  # ExactDamping(1e-3)
        g = torch.randn(s.shape, dtype=torch.float64)
        q_a, q_g = block.Q_A, block.Q_G
        expected = q_g @ ((q_g.t() @ g @ q_a) / (s + lam)) @ q_a.t()
        torch.testing.assert_close(block.precondition(g), expected, rtol=1e-9, atol=1e-12)


# --- configuration errors --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ekfac", "tekfac"])
def test_bad_inverter_and_damping_are_refused_with_a_fix(method):
    model = nn.Linear(3, 2)
    with pytest.raises(ConfigError, match="inverter='cholesky'.*needs inverter='eigh'"):
        curvkit.optim.CurvatureOptimizer(model, method=method, inverter="cholesky")
    with pytest.raises(ConfigError, match="damping=PiDamping.*ExactDamping"):
        curvkit.optim.CurvatureOptimizer(model, method=method, damping=PiDamping(value=1e-3))


def test_conformance_checks():
    from curvkit.testing import check_bad_configs, check_nonfinite_gradient_skips, check_state_dict_roundtrip

    for method in ("ekfac", "tekfac"):
        check_bad_configs(method)
        check_state_dict_roundtrip(method)
        check_nonfinite_gradient_skips(method)
