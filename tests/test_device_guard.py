"""CPU-side guards against device bugs (code that only breaks on CUDA).

Two checks, because each catches what the other cannot:

* **static**: an AST scan of ``curvkit/`` and ``plugins/`` for tensor factories
  (``torch.zeros``, ``torch.eye``, ``torch.tensor``, ``torch.Generator``, ...) called without
  a ``device=`` keyword. Such a tensor lands on the default device (the CPU), and on CUDA it
  meets the model's tensors in an op that raises, or worse, it silently moves work to the
  CPU. The scan sees every line, also paths no test runs (distributed, error branches).
  Tensors that are on the CPU on purpose (seed draws, sketches drawn on the CPU so that CPU
  and CUDA runs use the same random numbers) say ``device="cpu"``. ``*_like`` and
  ``Tensor.new_*`` take their device from a tensor and are fine.
* **runtime**: the core paths (a few steps of every registered method, factors from every
  backend, Laplace fit and predictive) run on CPU tensors under
  ``torch.set_default_device("meta")``: any tensor created without its device lands on
  ``meta`` and the first op that mixes it with the model's tensors raises. This catches
  what the scan cannot: ``device=None`` passed down from a caller, factories reached through
  aliases or third-party helpers, ``torch.Tensor(...)``.

Both checks prove they can fail (a snippet with planted bugs for the scan; a planted
device-less ``torch.zeros`` in a real block for the runtime check).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import curvkit

#: The repository root (the tests run against an installed curvkit, so not its __file__).
ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("curvkit", "plugins")

#: torch functions that create a tensor (or a generator) on the default device unless given
#: ``device=``. The ``*_like`` family and ``Tensor.new_*`` take the device of a tensor.
FACTORIES = frozenset(
    {
        "arange",
        "as_tensor",
        "empty",
        "empty_strided",
        "eye",
        "full",
        "Generator",
        "linspace",
        "logspace",
        "ones",
        "rand",
        "randint",
        "randn",
        "randperm",
        "scalar_tensor",
        "tensor",
        "tril_indices",
        "triu_indices",
        "zeros",
    }
)

#: Files whose tensors live on the CPU by design (path relative to the repository root ->
#: reason). Keep this short; anywhere else, write ``device=`` (``device="cpu"`` if meant).
EXCEPTIONS = {
    "curvkit/demo.py": "the demo builds its digits data and model on the CPU (it is a CPU demo)",
    "curvkit/bench/tasks.py": "bench data sets are built on the CPU once; the runner moves them to --device",
    "curvkit/testing/components.py": "the conformance kit checks components on its own float64 CPU matrices",
    "curvkit/testing/methods.py": "the conformance kit trains its own small CPU models on CPU data",
}


def _torch_aliases(tree: ast.AST) -> set[str]:
    names = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch" and a.asname}
    return names


def scan_source(source: str, path: str = "<snippet>") -> list[str]:
    """Findings in ``source``: ``"path:line: call"`` for each device-less factory call, and
    each ``from torch import <factory>`` (a bare ``zeros(...)`` would escape the scan)."""
    tree = ast.parse(source)
    aliases = _torch_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            for a in node.names:
                if a.name in FACTORIES:
                    found.append(f"{path}:{node.lineno}: from torch import {a.name} (call torch.{a.name} with device=)")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr in FACTORIES):
            continue
        if not (isinstance(func.value, ast.Name) and func.value.id in aliases):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def _scanned_files() -> list[Path]:
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_source_tree_is_scanned():
    files = {p.relative_to(ROOT).as_posix() for p in _scanned_files()}
    # the checkout beside tests/, with plugins/: the scan must see the core and the plugins
    assert "curvkit/optim/preconditioner.py" in files and any(f.startswith("plugins/curvkit_kfac/") for f in files)


def test_no_tensor_factory_without_device():
    findings = []
    for path in _scanned_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in EXCEPTIONS:
            continue
        findings += scan_source(path.read_text(encoding="utf-8"), rel)
    assert not findings, (
        "tensor factories without device= (take it from an input: device=x.device, dtype=x.dtype, or use "
        "x.new_zeros / torch.zeros_like; write device='cpu' where the CPU is meant):\n  " + "\n  ".join(findings)
    )


def test_every_exception_is_still_needed():
    """An exception whose file no longer has findings (or no longer exists) is removed."""
    for rel, reason in EXCEPTIONS.items():
        path = ROOT / rel
        assert path.exists(), f"EXCEPTIONS lists {rel} ({reason}), which does not exist; remove it"
        assert scan_source(path.read_text(encoding="utf-8"), rel), f"{rel} has no findings; remove it from EXCEPTIONS"


def test_the_scanner_flags_planted_bugs():
    snippet = """
import torch
import torch as th
from torch import zeros

def f(x):
    a = torch.eye(x.shape[0], dtype=x.dtype)          # bug: device-less
    b = th.randn(3)                                    # bug: through an alias
    g = torch.Generator()                              # bug: CPU generator
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)  # bug
    ok1 = torch.zeros(3, device=x.device)
    ok2 = torch.zeros_like(x)
    ok3 = x.new_zeros(3)
    ok4 = torch.randint(0, 10, (1,), device="cpu")
    ok5 = torch.linalg.eigh(x)
    return a, b, g, c, ok1, ok2, ok3, ok4, ok5
"""
    found = scan_source(snippet)
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [4, 7, 8, 9, 10], found


# --- runtime: the core paths under torch.set_default_device("meta") ---------------------------


class _MetaDefault:
    """``torch.set_default_device("meta")`` for a block (restores the previous default)."""

    def __enter__(self) -> None:
        self._previous = torch.get_default_device()
        torch.set_default_device("meta")

    def __exit__(self, *exc: object) -> None:
        torch.set_default_device(self._previous)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    norm = nn.Sequential(  # unit-wise blocks (BatchNorm in training mode, LayerNorm)
        nn.Conv2d(1, 2, 3, padding=1),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * 36, 8),
        nn.LayerNorm(8),
        nn.Tanh(),
        nn.Linear(8, 4),
    )
    y = torch.randint(0, 4, (16,), generator=gen, device="cpu")
    return {
        "mlp": (mlp, torch.randn(16, 6, generator=gen, device="cpu"), y),
        "cnn": (cnn, torch.randn(16, 1, 6, 6, generator=gen, device="cpu"), y),
        "norm": (norm, torch.randn(16, 1, 6, 6, generator=gen, device="cpu"), y),
    }


def _train_under_meta(name: str, options: dict, model: nn.Module, X: torch.Tensor, y: torch.Tensor, registry) -> None:
    from curvkit.optim import CurvatureOptimizer

    opt = CurvatureOptimizer(model, method=name, lr=0.05, loss_fn=nn.CrossEntropyLoss(), registry=registry, **options)
    with _MetaDefault():
        for _ in range(2):
            opt.zero_grad()
            out = model(X)
            loss = nn.functional.cross_entropy(out, y)
            opt.curvature_backward(out, y)
            loss.backward()
            opt.step()
        opt.state_dict()
    for p in model.parameters():
        assert p.device.type == "cpu" and bool(torch.isfinite(p).all())


REGISTRY = curvkit.default_registry()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", REGISTRY.methods.names())
def test_every_method_trains_under_a_meta_default_device(name):
    spec = REGISTRY.methods.get(name)
    for options in spec.sample_configs:
        for kind, (model, X, y) in _models().items():
            try:
                _train_under_meta(name, dict(options), model, X, y, REGISTRY)
            except (RuntimeError, NotImplementedError) as err:
                raise AssertionError(
                    f"method {name!r} with {options!r} on the {kind}: a tensor was created without its device "
                    f"(under torch.set_default_device('meta')): {err}"
                ) from err


@pytest.mark.parametrize("backend", REGISTRY.backends.names())
def test_factors_under_a_meta_default_device(backend):
    from curvkit.errors import UnsupportedRequestError

    served = 0
    for model, X, y in _models().values():
        for fisher, seeded in (("type-2", False), ("mc", True), ("mc", False), ("empirical", False)):
            gen = torch.Generator(device="cpu").manual_seed(0) if seeded else None
            try:
                with _MetaDefault():
                    factors = curvkit.kronecker_factors(
                        model,
                        nn.CrossEntropyLoss(),
                        X,
                        y,
                        fisher=fisher,
                        backend=backend,
                        generator=gen,
                        registry=REGISTRY,
                    )
            except UnsupportedRequestError:
                continue
            served += 1
            assert all(t.device.type == "cpu" for pair in factors.values() for t in pair)
    assert served, f"backend {backend!r} served none of the requests"


@pytest.mark.parametrize("fisher", ["type-2", "mc"])
def test_laplace_under_a_meta_default_device(fisher):
    from curvkit.laplace import KroneckerLaplace

    torch.manual_seed(0)
    gen = torch.Generator(device="cpu").manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))  # a unit-wise block too
    X, y = torch.randn(24, 3, generator=gen, device="cpu"), torch.randint(0, 3, (24,), generator=gen, device="cpu")
    targets = torch.randn(24, 3, generator=gen, device="cpu")
    data = [(X[:12], y[:12]), (X[12:], y[12:])]
    with _MetaDefault():
        for correct in (False, True):
            la = KroneckerLaplace(model, "classification", fisher=fisher, correct_eigenvalues=correct)
            la.fit(data, progress=False)
            la.optimize_prior_precision(n_steps=3)
            la.log_marginal_likelihood()
            la.predictive(X[:4])
            la.predictive(X[:4], link_approx="mc", n_samples=4)
            la.predictive(X[:4], link_approx="mc", n_samples=4, generator=torch.Generator(device="cpu").manual_seed(0))
            la.sample(2, generator=torch.Generator(device="cpu").manual_seed(0))
        reg = KroneckerLaplace(model, "regression", fisher=fisher)
        reg.fit([(X, targets)], progress=False)
        reg.predictive(X[:4])
        reg.log_marginal_likelihood()


def test_the_meta_check_catches_a_planted_bug(monkeypatch):
    """A block that adds a device-less ``torch.zeros`` (harmless on the CPU, a crash on
    CUDA) fails the runtime check."""
    from curvkit.blocks import KroneckerBlock

    original = KroneckerBlock.precondition

    def buggy(self, grad):
        return original(self, grad) + torch.zeros(grad.shape, dtype=grad.dtype)  # device-less on purpose

    monkeypatch.setattr(KroneckerBlock, "precondition", buggy)
    model, X, y = _models()["mlp"]
    with pytest.raises(RuntimeError, match="meta"):
        _train_under_meta("kfac", {"damping": 0.01}, model, X, y, REGISTRY)
