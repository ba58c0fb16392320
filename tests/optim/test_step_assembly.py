"""The step's directions reach the right rows of the right parameters, scaled once.

The hot path scales each layer's matrix by its trust-region factor before splitting it
into weight and bias, and assembles a parameter shared by several blocks (an attention's
in-projection: query, key and value rows) with one copy. These tests rebuild the update
by hand, in float64, from each block's own preconditioned direction and the trust-region
formulas, and compare it with the optimizer's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import curvkit.optim
import curvkit.optim.optimizer as optimizer_module
from curvkit.linalg.inverters import EigenInverse


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mid = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.att(x, x, x, need_weights=False)[0]
        return self.head(self.norm(torch.tanh(self.mid(h))).mean(1))


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, 8, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)


def _layer_matrix(layer, grads: dict[int, torch.Tensor]) -> torch.Tensor:
    """A layer's gradient as ``[W | b]`` rows, by hand."""
    w_ref, b_ref = layer.weight_ref, layer.bias_ref
    rows = w_ref.rows or (0, w_ref.param.shape[0])
    gw = grads[id(w_ref.param)][rows[0] : rows[1]].reshape(rows[1] - rows[0], -1)
    if not layer.has_bias:
        return gw
    b_rows = b_ref.rows or (0, b_ref.param.shape[0])
    return torch.cat([gw, grads[id(b_ref.param)][b_rows[0] : b_rows[1]].reshape(-1, 1)], 1)


@pytest.mark.parametrize("clips", [{"kl_clip": 1e-4}, {"kl_clip": 1e-4, "grad_ratio_clip": 0.5}, {"rms_clip": 1e-3}])
def test_update_is_each_blocks_direction_scaled_once_in_its_rows(clips):
    torch.manual_seed(0)
    model = _Attention().double()
    lr = 0.3
    opt = curvkit.optim.create("kfac", model, lr=lr, momentum=0.0, damping=0.1, **clips)
    pre = opt.preconditioner
    assert any(layer.weight_ref.rows is not None for layer in pre.layers.values()), "q, k, v share a parameter"
    for step in range(3):
        x, y = _batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step < 2:
            opt.step()
            continue
        # the last step, rebuilt by hand from the blocks' own directions
        before = {id(p): p.detach().clone() for p in model.parameters()}
        grads = {id(p): p.grad.detach().clone() for p in model.parameters()}
        dirs = {name: pre.blocks[name].precondition(_layer_matrix(layer, grads)) for name, layer in pre.layers.items()}
        mats = {name: _layer_matrix(layer, grads) for name, layer in pre.layers.items()}
        scale = {name: 1.0 for name in dirs}
        for name, d in dirs.items():
            if "rms_clip" in clips:
                scale[name] = min(1.0, clips["rms_clip"] / (float(d.norm()) / math.sqrt(d.numel())))
            if "grad_ratio_clip" in clips:
                scale[name] = min(scale[name], clips["grad_ratio_clip"] * float(mats[name].norm()) / float(d.norm()))
        tracked = {id(r.param) for layer in pre.layers.values() for r in (layer.weight_ref, layer.bias_ref) if r}
        others = [p for p in model.parameters() if id(p) not in tracked]
        nu = 1.0
        if "kl_clip" in clips:
            total = sum(lr**2 * scale[n] * float((dirs[n] * mats[n]).sum()) for n in dirs)
            total += sum(lr**2 * float((grads[id(p)] ** 2).sum()) for p in others)
            nu = min(1.0, math.sqrt(clips["kl_clip"] / total))
            assert nu < 1.0, "the KL clip is active"
        expected = {i: b.clone() for i, b in before.items()}
        for name, layer in pre.layers.items():
            d = dirs[name] * scale[name] * nu
            w_ref, b_ref = layer.weight_ref, layer.bias_ref
            rows = w_ref.rows or (0, w_ref.param.shape[0])
            w_part = d[:, :-1] if layer.has_bias else d
            expected[id(w_ref.param)][rows[0] : rows[1]] -= lr * w_part.reshape(
                expected[id(w_ref.param)][rows[0] : rows[1]].shape
            )
            if layer.has_bias:
                b_rows = b_ref.rows or (0, b_ref.param.shape[0])
                expected[id(b_ref.param)][b_rows[0] : b_rows[1]] -= lr * d[:, -1]
        for p in others:
            expected[id(p)] -= lr * nu * grads[id(p)]
        opt.step()
        assert opt.preconditioner.counters["skipped_steps"] == 0
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected[id(p)], rtol=1e-12, atol=1e-14, msg=name)


def test_identity_eigenbasis_leaves_the_callers_gradient_alone():
    """An eigenbasis inverse without bases (the damping alone, a block's fallback before
    its first decomposition works) divides a new tensor, never the gradient it is given
    (which, for a layer without bias, is the parameter's own ``.grad``)."""
    grad = torch.randn(4, 5, dtype=torch.float64)
    kept = grad.clone()
    empty = torch.empty(0, dtype=torch.float64)
    inverse = EigenInverse(empty, empty.clone(), torch.full((4, 5), 4.0, dtype=torch.float64))
    out = inverse.apply(grad)
    assert torch.equal(grad, kept)
    torch.testing.assert_close(out, kept / 4.0, rtol=0, atol=0)


def test_optimizer_step_leaves_gradients_unchanged_with_a_damping_only_eigen_inverse():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False)).double()
    opt = curvkit.optim.create("kfac", model, lr=0.1, inverter="eigh", damping=0.1, kl_clip=None)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    for block in opt.preconditioner.blocks.values():  # as after a failed first decomposition
        empty = torch.empty(0, dtype=torch.float64)
        shape = (block.info.d_out, block.info.d_in)
        block.inverse = EigenInverse(empty, empty.clone(), torch.full(shape, 2.0, dtype=torch.float64))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    for p, g, b in zip(model.parameters(), grads, before):
        assert torch.equal(p.grad, g), "the step must not write into .grad"
        assert not torch.equal(p.detach(), b)


def test_update_guard_reuses_the_direction_guards_norms_as_valid_bounds(monkeypatch):
    """With a per-layer clip the direction guard has ``‖Δ_l‖``; the update's guard takes it
    as the bound of each parameter's direction instead of a norm of its own. The bound
    must hold (no smaller than the parameter's direction, rows assembled from parts
    included) and still refuse an update that would overflow."""
    torch.manual_seed(0)
    model = _Attention().double()
    lr = 0.3
    opt = curvkit.optim.create("kfac", model, lr=lr, momentum=0.0, damping=0.1, grad_ratio_clip=0.5, kl_clip=1e-3)
    x, y = _batch(0)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    x, y = _batch(1)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    before = {id(p): p.detach().clone() for p in model.parameters()}
    seen: dict[int, float] = {}
    original = optimizer_module.apply_updates

    def spy(state, params, directions, groups, scales=None, direction_bounds=None):
        seen.update(direction_bounds or {})
        return original(state, params, directions, groups, scales, direction_bounds)

    monkeypatch.setattr(optimizer_module, "apply_updates", spy)
    opt.step()
    in_proj = model.att.in_proj_weight
    assert id(in_proj) in seen, "a parameter tiled by q, k and v gets a bound"
    layer_params = {
        id(r.param) for layer in opt.preconditioner.layers.values() for r in (layer.weight_ref, layer.bias_ref) if r
    }
    assert set(seen) == layer_params, "every tracked parameter gets a bound"
    for p in model.parameters():
        if id(p) in seen:
            moved = float((before[id(p)] - p.detach()).norm()) / lr
            assert moved <= seen[id(p)] * (1 + 1e-12), (moved, seen[id(p)])
    # an update that would overflow a parameter is still refused
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():  # after the backward: gradient and direction stay finite
        model.head.weight[0, 0] = torch.finfo(torch.float64).max
    kept = {n: p.detach().clone() for n, p in model.named_parameters()}
    skipped = opt.preconditioner.counters["skipped_steps"]
    opt.step()
    assert opt.preconditioner.counters["skipped_steps"] == skipped + 1
    assert opt.preconditioner.counters["nonfinite_updates"] >= 1
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), kept[n]), n
