r"""K-FAC's preconditioned step agrees with ASDL's ``KfacGradientMaker`` for equal settings.

ASDL (``asdfghjkl==0.1a4``, import name ``asdl``) is an independent K-FAC implementation.
What its ``KfacGradientMaker`` does, read from its source, and how we match it:

* **Factors.** Without EMA (``ema_decay`` left at -1) every ``forward_and_backward()``
  recomputes the batch factors from scratch with ``scale = 1/data_size``:
  ``A = Σ_n a aᵀ / data_size`` (for a convolution, additionally divided by the number of
  output positions, i.e. KFC "expand"), ``B = Σ g gᵀ / data_size`` with ``g`` the output
  gradients of the *summed* loss (empirical Fisher) or of
  ``Σ_n √p_c · nll(x_n, c)`` per class ``c`` (``fisher_exact``, which is the type-2
  Fisher of cross-entropy). With ``data_size = N`` (the batch size) these are exactly
  curvkit's factors for a batch-mean loss: ``A`` is averaged over the data, and the
  empirical ``G = N·Σ ĝ ĝᵀ`` of the mean-loss gradients ``ĝ = g/N`` (``loss_average=
  "batch"``) equals ``Σ g gᵀ / N``. Our EMA's first update ``min(1 - 1/1, ρ) = 0`` takes
  the batch factors as they are, so one step from a fresh state is comparable.
  ASDL's EMA path calls ``torch.cuda.nvtx`` (unusable with CPU-only torch), so we stay off it.
* **Damping.** ASDL always applies factored Tikhonov damping with the π correction,
  ``A + max(√λ·π, 1e-7) I`` and ``B + max(√λ/π, 1e-7) I`` with
  ``π = √((tr A / d_A) / (tr B / d_B))`` — curvkit's :class:`~curvkit.linalg.PiDamping`
  (the ``1e-7`` floor never binds here). Both invert by Cholesky.
* **Gradient.** ASDL's loss is summed and the gradients divided by ``data_size``
  afterwards: the batch-mean gradient, as ``loss.backward()`` with
  ``CrossEntropyLoss()`` gives ours.
* **Bias.** ASDL does *not* fold the bias into ``A``: its ``A`` is over the weight's
  inputs only, and it preconditions the bias gradient by ``B⁻¹`` alone. curvkit appends
  the bias as a constant input (``A`` is ``(d_in+1)²``). The two therefore differ on layers
  with a bias, so the direct comparisons use bias-free layers, and
  :func:`test_bias_folding_equals_asdl_on_a_constant_input` checks our folding against
  ASDL run on the equivalent bias-free network that appends a constant 1 to each layer's
  input.
* **MC Fisher** is left out: ASDL samples targets from torch's global generator inside
  its own loop (and scales by ``1/n_mc_samples`` per backward pass), so the draws cannot
  be matched with ours; the empirical and type-2 Fishers are deterministic.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.linalg import ConstantDamping, FactoredInverse, PiDamping
from curvkit.optim import KFAC, Preconditioner

asdl = pytest.importorskip("asdl")

pytestmark = pytest.mark.filterwarnings(
    # ASDL registers (non-full) module backward hooks
    "ignore:Using a non-full backward hook:FutureWarning"
)

DTYPE = torch.float64
N = 8
C = 4
LAM = 1e-2
RTOL = 1e-8
FISHERS = {"empirical": "fisher_emp", "type-2": "fisher_exact"}


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 7, bias=False),
        nn.Tanh(),
        nn.Linear(7, 6, bias=False),
        nn.ReLU(),
        nn.Linear(6, C, bias=False),
    )


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=2, bias=False),
        nn.ReLU(),
        nn.Conv2d(3, 2, 2, bias=False),
        nn.Flatten(),
        nn.Linear(2 * 3 * 3, C, bias=False),
    )


MODELS = {"mlp": (_mlp, (5,)), "cnn": (_cnn, (2, 8, 8))}


def _problem(name: str, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    make, shape = MODELS[name]
    model = make().to(DTYPE)
    X = torch.randn(N, *shape, dtype=DTYPE)
    y = torch.randint(0, C, (N,))
    return model, X, y


def _curvkit_step(model: nn.Module, X: Tensor, y: Tensor, fisher: str, **options) -> Preconditioner:
    """One step of our preconditioner from a fresh state; ``.grad`` holds the result."""
    loss_fn = nn.CrossEntropyLoss()
    options = {"damping": PiDamping(value=LAM), "inverter": "cholesky", **options}
    precond = Preconditioner(model, "kfac", fisher=fisher, T_inv=1, loss_fn=loss_fn, **options)
    model.zero_grad()
    out = model(X)
    precond.curvature_backward(out, y)
    loss_fn(out, y).backward()
    assert precond.step()
    return precond


def _asdl_step(model: nn.Module, X: Tensor, y: Tensor, fisher: str) -> None:
    """One step of ASDL's K-FAC (no EMA); ``.grad`` holds the result."""
    config = asdl.PreconditioningConfig(data_size=N, damping=LAM)
    maker = asdl.KfacGradientMaker(model, config, fisher_type=FISHERS[fisher], loss_type="cross_entropy")
    model.zero_grad()
    dummy_y = maker.setup_model_call(model, X)
    maker.setup_loss_call(F.cross_entropy, dummy_y, y)
    maker.forward_and_backward()


def _asdl_factors(model: nn.Module, X: Tensor, y: Tensor, fisher: str) -> dict[str, tuple[Tensor, Tensor]]:
    """ASDL's undamped batch factors ``{layer: (A, B)}`` from the Fisher maker the grad
    maker delegates to (the grad maker itself keeps only the inverses)."""
    from asdl.fisher import get_fisher_maker

    config = asdl.FisherConfig(fisher_type=FISHERS[fisher], fisher_shapes=["kron"], loss_type="cross_entropy")
    maker = get_fisher_maker(model, config)
    dummy_y = maker.setup_model_call(model, X)
    maker.setup_loss_call(F.cross_entropy, dummy_y, y)
    maker.forward_and_backward(data_size=N)
    return {
        name: (m.fisher.kron.A, m.fisher.kron.B)
        for name, m in model.named_modules()
        if getattr(m, "fisher", None) is not None
    }


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _rel(actual: Tensor, expected: Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def _assert_close(actual: Tensor, expected: Tensor, rtol: float = RTOL, msg: str = "") -> None:
    assert _rel(actual, expected) < rtol, f"{msg}: relative difference {_rel(actual, expected):.3e}"


@pytest.mark.parametrize("inverter", ["cholesky", "eigh"])
@pytest.mark.parametrize("fisher", list(FISHERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_preconditioned_gradient_matches_asdl(model_name, fisher, inverter):
    model, X, y = _problem(model_name)
    raw_model = copy.deepcopy(model)
    F.cross_entropy(raw_model(X), y).backward()
    raw = _grads(raw_model)

    ours_model = copy.deepcopy(model)
    _curvkit_step(ours_model, X, y, fisher, inverter=inverter)
    ours = _grads(ours_model)

    asdl_model = copy.deepcopy(model)
    _asdl_step(asdl_model, X, y, fisher)
    theirs = _grads(asdl_model)

    assert ours.keys() == theirs.keys() == raw.keys() and len(ours) == 3
    for name in ours:
        # the preconditioning is far from the identity (else agreement would prove little)
        assert _rel(theirs[name], raw[name]) > 0.1, name
        _assert_close(ours[name], theirs[name], msg=name)


@pytest.mark.parametrize("fisher", list(FISHERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_optimizer_step_matches_asdl_with_sgd(model_name, fisher):
    """The whole update: ``curvkit.optim.KFAC`` (no momentum) moves the parameters exactly
    as ASDL's preconditioned gradient followed by ``torch.optim.SGD``."""
    lr = 0.05
    model, X, y = _problem(model_name)
    ours_model = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    opt = KFAC(ours_model, lr=lr, damping=PiDamping(value=LAM), T_inv=1, fisher=fisher, loss_fn=loss_fn)
    opt.zero_grad()
    out = ours_model(X)
    opt.curvature_backward(out, y)
    loss_fn(out, y).backward()
    opt.step()

    asdl_model = copy.deepcopy(model)
    sgd = torch.optim.SGD(asdl_model.parameters(), lr=lr)
    _asdl_step(asdl_model, X, y, fisher)
    sgd.step()

    start = dict(model.named_parameters())
    theirs = dict(asdl_model.named_parameters())
    for name, p in ours_model.named_parameters():
        moved = theirs[name].detach() - start[name].detach()
        _assert_close(p.detach() - start[name].detach(), moved, msg=name)


@pytest.mark.parametrize("fisher", list(FISHERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_factors_and_damped_inverses_match_asdl(model_name, fisher):
    model, X, y = _problem(model_name)
    ours_model = copy.deepcopy(model)
    precond = _curvkit_step(ours_model, X, y, fisher)

    ref = _asdl_factors(copy.deepcopy(model), X, y, fisher)
    assert set(ref) == set(precond.blocks)
    for name, (A_ref, B_ref) in ref.items():
        block = precond.blocks[name]
        _assert_close(block.A.to_dense(), A_ref, msg=f"{name}: A")
        _assert_close(block.G.to_dense(), B_ref, msg=f"{name}: G")

    # the grad maker's damped inverses (π-corrected shifts, Cholesky) equal ours
    asdl_model = copy.deepcopy(model)
    _asdl_step(asdl_model, X, y, fisher)
    for name, module in asdl_model.named_modules():
        if getattr(module, "fisher", None) is None:
            continue
        inverse = precond.blocks[name].inverse
        assert isinstance(inverse, FactoredInverse)
        _assert_close(inverse.A_inv, module.fisher.kron.A_inv, msg=f"{name}: A⁻¹")
        _assert_close(inverse.G_inv, module.fisher.kron.B_inv, msg=f"{name}: G⁻¹")


def test_damping_convention_matters():
    """ASDL's π-corrected shifts, not a plain shift of each factor by √λ: with
    ``ConstantDamping(a=√λ, g=√λ)`` (same product of shifts) the steps differ, so the
    agreement above pins the damping convention down."""
    model, X, y = _problem("mlp")
    ours_model = copy.deepcopy(model)
    _curvkit_step(ours_model, X, y, "empirical", damping=ConstantDamping(a=LAM**0.5, g=LAM**0.5))
    asdl_model = copy.deepcopy(model)
    _asdl_step(asdl_model, X, y, "empirical")
    ours, theirs = _grads(ours_model), _grads(asdl_model)
    assert max(_rel(ours[n], theirs[n]) for n in ours) > 1e-3


class _AppendOne(nn.Module):
    """``x ↦ [x, 1]``: a bias as a constant input feature."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


@pytest.mark.parametrize("fisher", list(FISHERS))
def test_bias_folding_equals_asdl_on_a_constant_input(fisher):
    """curvkit folds a bias into ``A`` as a constant input; ASDL keeps biases apart. On
    the bias-free network that appends a 1 to each layer's input (weights ``[W b]``),
    ASDL's step equals ours on the network with biases, weight and bias alike."""
    torch.manual_seed(1)
    biased = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, C)).to(DTYPE)
    X = torch.randn(N, 5, dtype=DTYPE)
    y = torch.randint(0, C, (N,))
    layers: list[nn.Module] = []
    for module in biased:
        if isinstance(module, nn.Linear):
            folded = nn.Linear(module.in_features + 1, module.out_features, bias=False).to(DTYPE)
            with torch.no_grad():
                folded.weight.copy_(torch.cat([module.weight, module.bias[:, None]], dim=1))
            layers += [_AppendOne(), folded]
        else:
            layers.append(copy.deepcopy(module))
    augmented = nn.Sequential(*layers)
    torch.testing.assert_close(augmented(X), biased(X), rtol=1e-14, atol=1e-14)

    _curvkit_step(biased, X, y, fisher)
    _asdl_step(augmented, X, y, fisher)
    linears = [m for m in biased if isinstance(m, nn.Linear)]
    folded_layers = [m for m in augmented if isinstance(m, nn.Linear)]
    for i, (ours, theirs) in enumerate(zip(linears, folded_layers, strict=True)):
        assert ours.weight.grad is not None and ours.bias.grad is not None and theirs.weight.grad is not None
        ours_matrix = torch.cat([ours.weight.grad, ours.bias.grad[:, None]], dim=1)
        _assert_close(ours_matrix, theirs.weight.grad, msg=f"layer {i}")
