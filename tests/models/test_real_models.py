"""Real architectures end to end: Hugging Face GPT-2 (tied embedding and LM head), BERT and
Llama (RMSNorm, no biases) from tiny configs, ``nn.TransformerEncoder``, a ResNet with
BatchNorm and an LSTM classifier (:mod:`curvkit.testing.models`).

* ``summary()`` tells the truth about every trainable parameter: each is in a block or
  listed as first-order, and the steps show it — a parameter listed as first-order moves
  by exactly ``-lr · grad``, a preconditioned one does not (float64, second step, no
  momentum or clipping). A weight used by several modules and preconditioned says so.
* K-FAC (MC Fisher through ``curvature_backward`` on ``(N, T, V)`` logits for the language
  models), EKFAC, SINGD and RS-KFAC reach a lower training loss than SGD at the same step
  budget, SGD's learning rate tuned over :data:`SGD_LRS` (the best of the grid counts).
* ``kronecker_factors`` returns a finite, symmetric pair for every block under the default
  policy (``"warn"``, naming the modules it leaves out), and under ``unsupported="error"``
  succeeds exactly when every module with trainable parameters has a handler.

Which parameters are preconditioned grows as handlers land; these tests check the truth of
``summary()``, not a fixed list (docs/models.md has today's list, from
``benchmarks/models_table.py``).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import defaultdict

import pytest
import torch
from torch import nn

import curvkit
import curvkit.optim
from curvkit.testing.models import CASES, coverage, model_case, slice_inputs

NAMES = list(CASES)
N, BATCH = 128, 32
#: Steps per model (the same budget for SGD and the curvature methods).
STEPS = {"resnet": 40}
DEFAULT_STEPS = 30
#: SGD (momentum 0.9) learning rates tried; the best final loss is the bar.
SGD_LRS = (0.03, 0.1, 0.3, 1.0)
_CE = nn.CrossEntropyLoss()

#: The curvature methods' settings. K-FAC uses the MC Fisher (``curvature_backward``), the
#: others the empirical Fisher. Per-model overrides below come from a sweep of lr
#: {0.03, 0.1, 0.3} × damping {0.01, 0.1} × kl_clip {None, 1e-3} at the same step budget
#: (docs/models.md, "Training").
METHODS: dict[str, dict] = {
    "kfac": dict(lr=0.1, momentum=0.9, damping=0.1, T_inv=5, kl_clip=1e-3, fisher="mc", loss_fn=_CE),
    "ekfac": dict(lr=0.1, momentum=0.9, damping=0.1, T_inv=5, kl_clip=1e-3),
    "singd": dict(lr=0.1, momentum=0.9, damping=0.1, lr_cov=0.05, T=1, normalize_lr_cov=True, kl_clip=1e-3),
    "rs-kfac": dict(lr=0.1, momentum=0.9, damping=0.1, rank=8, T_stats=1, T_inv=5, kl_clip=1e-3, rms_clip=0.07),
}
_NO_CLIP = {"kl_clip": None}
OVERRIDES: dict[tuple[str, str], dict] = {
    ("gpt2", "kfac"): _NO_CLIP,
    ("gpt2", "ekfac"): {"damping": 0.01},
    ("gpt2", "singd"): {**_NO_CLIP, "damping": 0.01, "lr": 0.03},
    ("gpt2", "rs-kfac"): _NO_CLIP,
    ("llama", "singd"): _NO_CLIP,
    ("llama", "rs-kfac"): _NO_CLIP,
    ("resnet", "ekfac"): {"damping": 0.01},
    ("resnet", "singd"): {"lr": 0.03, "damping": 0.01, "normalize_lr_cov": False},
    ("resnet", "rs-kfac"): _NO_CLIP,
    ("lstm", "kfac"): {**_NO_CLIP, "damping": 0.01},
    ("lstm", "ekfac"): {**_NO_CLIP, "lr": 0.3},
    ("lstm", "singd"): {**_NO_CLIP, "lr": 1.0},
    ("lstm", "rs-kfac"): {**_NO_CLIP, "lr": 0.3},
}


def _case(name):
    case = model_case(name)
    if not case.available:
        pytest.skip(f"model case {name!r} needs {case.needs}")
    return case


def _settings(name: str, method: str) -> dict:
    settings = {**METHODS[method], **OVERRIDES.get((name, method), {})}
    if model_case(name).language_model and settings.get("fisher", "empirical") == "empirical":
        settings["loss_average"] = "batch+sequence"  # the loss is a mean over N·T tokens
    return settings


def _curvature(method: str, name: str):
    def make(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # first-order layers are announced; summary() is checked elsewhere
            return curvkit.optim.CurvatureOptimizer(model, method=method, **_settings(name, method))

    return make


def _train(case, make_optimizer) -> float:
    """Train a fresh model on ``N`` examples in mini-batches; the final loss on all of them."""
    steps = STEPS.get(case.name, DEFAULT_STEPS)
    model = case.build()
    inputs, targets = case.data(N, seed=1)
    torch.manual_seed(0)  # the MC Fisher's generator is seeded from the global one: independent of test order
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, N, (BATCH,), generator=gen)
        xb, yb = slice_inputs(inputs, idx), targets[idx]
        opt.zero_grad()
        logits = case.logits(model, xb)
        if isinstance(opt, curvkit.optim.CurvatureOptimizer):
            opt.curvature_backward(logits, yb)  # MC Fisher: sampled targets; a no-op for the empirical Fisher
        case.loss_of(logits, yb).backward()
        opt.step()
    if isinstance(opt, curvkit.optim.CurvatureOptimizer):
        opt.remove_hooks()
    with torch.no_grad():
        return float(case.loss(model, inputs, targets))


@functools.cache
def _sgd_losses(name: str) -> dict[float, float]:
    case = model_case(name)
    return {lr: _train(case, lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)) for lr in SGD_LRS}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", NAMES)
def test_curvature_method_trains_below_tuned_sgd(name, method):
    case = _case(name)
    loss = _train(case, _curvature(method, name))
    sgd = _sgd_losses(name)
    best = min(v for v in sgd.values() if math.isfinite(v))
    assert math.isfinite(loss), f"{method} on {name}: final loss {loss}"
    assert loss < best, f"{method} on {name}: final loss {loss:.4f}, SGD's best over lr {SGD_LRS}: {sgd}"


# --- summary() tells the truth --------------------------------------------------------------


def _users(model: nn.Module) -> dict[str, list[str]]:
    """``{parameter name: modules holding it}`` for parameters held by several modules."""
    names = {id(p): n for n, p in model.named_parameters()}
    users: dict[int, list[str]] = defaultdict(list)
    for mname, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if mname not in users[id(p)]:
                users[id(p)].append(mname)
    return {names[i]: mods for i, mods in users.items() if len(mods) > 1}


def _inputs64(case, inputs):
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point():
        return inputs.double()
    return inputs


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", NAMES)
def test_summary_matches_what_each_parameter_does(name, method):
    case = _case(name)
    model = case.build().double()
    inputs, targets = case.data(16, seed=2)
    inputs = _inputs64(case, inputs)
    settings = {**_settings(name, method), "momentum": 0.0, "kl_clip": None, "lr": 1e-3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.optim.CurvatureOptimizer(model, method=method, **settings)
    for _ in range(2):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        logits = case.logits(model, inputs)
        opt.curvature_backward(logits, targets)
        case.loss_of(logits, targets).backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    said = coverage(opt, model)  # every trainable parameter is on a line of summary()
    assert "no statistics yet" not in opt.summary()
    params = dict(model.named_parameters())
    blocks = opt.preconditioner.blocks
    for pname, (line, what) in said.items():
        step = params[pname].detach() - before[pname]
        expected = -1e-3 * grads[pname]
        first_order = what.startswith("first-order")
        if first_order:
            torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-15, msg=f"{pname}: {what}")
        elif torch.allclose(step, expected, rtol=1e-6, atol=0.0):
            # a block that applies the identity (every refresh failed) must say so
            if getattr(blocks.get(line), "inverse_failures", 0):
                assert "first-order step" in what, f"{line}: its refreshes failed but summary() says {what!r}"
                continue
            raise AssertionError(f"{pname} is listed as {what!r} but moved by the plain gradient step")
    for pname, modules in _users(model).items():
        what = said[pname][1]
        if what.startswith("first-order"):
            continue
        assert "tied" in what, f"{pname} is used by {modules} but summary() says {what!r}"


# --- kronecker_factors -------------------------------------------------------------------------


def _unhandled(model, registry) -> list[str]:
    """Modules with trainable parameters of their own and no handler (nor covered by a
    composite handler of a parent, as nn.MultiheadAttention's out_proj)."""
    claimed: set[int] = set()
    out = []
    for mname, module in model.named_modules():
        handler = registry.handler_for(module)
        if handler is not None and hasattr(handler, "claims"):
            claimed.update(id(m) for m in handler.claims(module))
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and handler is None and id(module) not in claimed:
            out.append(mname)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_kronecker_factors_on_real_models(name):
    case = _case(name)
    model = case.build().double()
    inputs, targets = case.data(8, seed=3)
    inputs = _inputs64(case, inputs)
    registry = curvkit.default_registry()
    unhandled = _unhandled(model, registry)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        factors = curvkit.kronecker_factors(model, _CE, inputs, targets, fisher="type-2")
    warned = " ".join(str(w.message) for w in caught)
    for mname in unhandled:
        assert repr(mname) in warned, f"module {mname!r} has no handler and was not named in a warning"
    assert factors, f"no block on {name}"
    for block, entry in factors.items():  # KroneckerFactors(A, G), or UnitwiseFactors(F) of a norm layer
        for label, F in zip(entry._fields, entry):
            F = F.to_dense() if hasattr(F, "to_dense") else F
            assert torch.isfinite(F).all(), f"{block}: {label} not finite"
            if F.ndim >= 2:
                FT = F.transpose(-1, -2)
                torch.testing.assert_close(F, FT, rtol=1e-12, atol=1e-14, msg=f"{block}: {label} not symmetric")
    if unhandled:
        with pytest.raises(curvkit.UnsupportedModuleError, match=repr(unhandled[0])):
            curvkit.kronecker_factors(model, _CE, inputs, targets, fisher="type-2", unsupported="error")
    else:
        strict = curvkit.kronecker_factors(model, _CE, inputs, targets, fisher="type-2", unsupported="error")
        assert set(strict) == set(factors)
