"""The ``transformers`` plugin's RMSNorm handler (Llama style ``w·x̂`` and Gemma style
``(1 + w)·x̂``) against the dense float64 GGN / empirical Fisher from ``torch.func``, and
its refusal of a module whose forward is something else."""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
from _reference import assert_matrix_close
from torch import nn
from torch.func import functional_call, hessian, jacrev

import curvkit
import curvkit.optim

pytest.importorskip("transformers")
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

REGISTRY = curvkit.build_registry()


class Net(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = norm
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x)))).mean(1)


def _net(cls):
    torch.manual_seed(0)
    norm = cls(6, eps=1e-5)
    norm.double()
    with torch.no_grad():
        norm.weight.normal_()
    return Net(norm).double()


def _dense_blocks(model, x, y, loss_fn, fisher):
    """``diag`` of the dense GGN (type-2) or empirical Fisher w.r.t. ``norm.weight``."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    rows = []
    for i in range(x.shape[0]):

        def f(p, i=i):
            return functional_call(model, p, (x[i : i + 1],))

        out = f(params).detach()
        J = jacrev(f)(params)["norm.weight"].reshape(out.shape[-1], -1)  # (C, D)
        if fisher == "type-2":
            H = hessian(lambda o, i=i: loss_fn(o, y[i : i + 1]))(out).reshape(out.shape[-1], out.shape[-1])
            rows.append(J.t() @ H @ J)
        else:
            grad = jacrev(lambda o, i=i: loss_fn(o, y[i : i + 1]))(out).reshape(1, -1) @ J
            rows.append(grad.t() @ grad)
    total = torch.stack(rows).sum(0)
    return total / x.shape[0] if loss_fn.reduction == "mean" else total


def _exact_classes():
    """Llama- and Gemma-style RMSNorm classes computing in float64 throughout, defined in a
    stand-in ``transformers.models`` module (the real ones upcast to float32 inside, so they
    agree with a float64 reference to float32 precision only)."""
    mod = types.ModuleType("transformers.models.exact64.modeling_exact64")

    class Exact64RMSNorm(nn.Module):
        offset = False

        def __init__(self, d, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.variance_epsilon = eps

        def forward(self, x):
            xhat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return ((1 + self.weight) if self.offset else self.weight) * xhat

    class Exact64GemmaRMSNorm(Exact64RMSNorm):
        offset = True

    for cls in (Exact64RMSNorm, Exact64GemmaRMSNorm):
        cls.__module__ = mod.__name__
        setattr(mod, cls.__name__, cls)
    return mod, Exact64RMSNorm, Exact64GemmaRMSNorm


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("style", ["scale", "offset"])
def test_unitwise_factors_equal_dense_fisher(style, fisher, monkeypatch):
    """float64 ground truth, rtol 1e-10 (w·x̂ and (1 + w)·x̂)."""
    mod, llama, gemma = _exact_classes()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    model = _net(gemma if style == "offset" else llama)
    x, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    handler = REGISTRY.handler_for(model.norm)
    assert handler.name == "hf_rms_norm" and handler.style(model.norm) == style
    factors = curvkit.kronecker_factors(model, loss_fn, x, y, fisher=fisher, registry=REGISTRY)
    F = factors["norm"].F  # (D, 1, 1): the scale only
    dense = _dense_blocks(model, x, y, loss_fn, fisher)
    assert_matrix_close(F[:, 0, 0], dense.diagonal(), rtol=1e-10, msg=f"{style} {fisher}")


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
@pytest.mark.parametrize("cls", [LlamaRMSNorm, GemmaRMSNorm], ids=["llama", "gemma"])
def test_hugging_face_classes_to_their_precision(cls, fisher):
    """The real classes (float32 inside): equal to the dense Fisher of the model as they
    compute it, to float32 precision."""
    model = _net(cls)
    x, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    loss_fn = nn.CrossEntropyLoss()
    handler = REGISTRY.handler_for(model.norm)
    assert handler.name == "hf_rms_norm"
    assert handler.style(model.norm) == ("offset" if cls is GemmaRMSNorm else "scale")
    F = curvkit.kronecker_factors(model, loss_fn, x, y, fisher=fisher, registry=REGISTRY)["norm"].F
    assert_matrix_close(F[:, 0, 0], _dense_blocks(model, x, y, loss_fn, fisher).diagonal(), rtol=1e-5)


def test_llama_norm_equals_torch_rmsnorm_block(monkeypatch):
    """The same weights in nn.RMSNorm (the core's handler): the same unit-wise factors."""
    mod, llama, _ = _exact_classes()
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    model = _net(llama)
    twin = _net(llama)
    core = nn.RMSNorm(6, eps=1e-5).double()
    with torch.no_grad():
        core.weight.copy_(model.norm.weight)
    twin.norm = core
    x, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.tensor([0, 2, 1, 2])
    ours = curvkit.kronecker_factors(model, nn.CrossEntropyLoss(), x, y, fisher="type-2", registry=REGISTRY)
    ref = curvkit.kronecker_factors(twin, nn.CrossEntropyLoss(), x, y, fisher="type-2", registry=REGISTRY)
    assert_matrix_close(ours["norm"].F, ref["norm"].F, rtol=1e-10)


def test_a_module_named_rmsnorm_with_another_forward_is_refused(monkeypatch):
    """Matching by name is only a candidate list: the forward is checked on a probe."""
    fake = types.ModuleType("transformers.models.fake.modeling_fake")

    class FakeRMSNorm(nn.Module):  # scales without normalising
        def __init__(self, d):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(d))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight * x

    FakeRMSNorm.__module__ = fake.__name__
    fake.FakeRMSNorm = FakeRMSNorm
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    model = nn.Sequential(nn.Linear(3, 4), FakeRMSNorm(4), nn.Linear(4, 2))
    assert REGISTRY.handler_for(model[1]).name == "hf_rms_norm"
    with pytest.raises(curvkit.UnsupportedModuleError, match="neither weight \\* x̂ nor \\(1 \\+ weight\\) \\* x̂"):
        curvkit.kronecker_factors(
            model,
            nn.CrossEntropyLoss(),
            torch.randn(4, 3),
            torch.tensor([0, 1, 1, 0]),
            fisher="type-2",
            registry=REGISTRY,
            unsupported="error",
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.KFAC(model, registry=REGISTRY)
    assert "1.weight: first-order" in opt.summary()
