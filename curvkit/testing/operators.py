"""Conformance of curvature operators (:class:`curvkit.linalg.operator.CurvatureOperator`).

* :func:`check_operator`: every operation of one operator against a dense float64
  reference built from its ``to_dense()``: products in every input format, ``trace``,
  ``logdet(shift)`` against ``slogdet``, ``power(-1, shift)`` against a solve (and
  ``power(1/2, shift)`` squared), ``eigen()`` reconstructing the matrix with an orthogonal
  basis, and the matrix symmetric positive semi-definite;
* :func:`check_block_operators`: a method's optimizer trained a few steps on small
  float64 models (an MLP with a ``LayerNorm`` and a CNN), then :func:`check_operator` on
  ``as_operator()`` of every block.

An operation an operator cannot do may raise :class:`NotImplementedError` whose message
names the operator's class and the operation; it is then reported as not checked.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from curvkit.linalg.operator import CurvatureOperator
from curvkit.methods import MethodSpec

__all__ = ["check_block_operators", "check_operator"]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-9, torch.float32: 2e-4}.get(dtype, 2e-2)


def _close(what: str, name: str, got: Tensor, want: Tensor, rtol: float, scale: float | None = None) -> None:
    got = got.detach().to(torch.float64).cpu()
    want = want.detach().to(torch.float64).cpu()
    if got.shape != want.shape:
        raise AssertionError(f"{name}: {what} has shape {tuple(got.shape)}, expected {tuple(want.shape)}.")
    size = float(want.abs().max()) if want.numel() else 0.0
    ref = max(size, scale if scale is not None else 0.0, 1e-300)
    err = float((got - want).abs().max()) if want.numel() else 0.0
    if not err <= rtol * ref:  # also catches NaN
        raise AssertionError(f"{name}: {what} is off by {err:.3g} (relative {err / ref:.3g}, allowed {rtol:.1g}).")


def _unsupported(err: NotImplementedError, op: Any, operation: str, name: str) -> str:
    text = str(err)
    # an operation built on another (logdet on eigen) may pass on that one's error
    if type(op).__name__ not in text or not any(o in text for o in (operation, "logdet", "power", "eigen")):
        raise AssertionError(
            f"{name}: {operation}() raised NotImplementedError({text!r}), which must name the operator "
            f"({type(op).__name__}) and the operation ({operation!r})."
        ) from err
    return operation


def _formats(op: Any, n: int, generator: torch.Generator) -> list[tuple[str, Any, Tensor, Any]]:
    """``(label, input, its flat columns (n, K), how to flatten the answer)`` per input format."""
    dtype, device = op.dtype, op.device

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, device="cpu").to(
            dtype=dtype, device=device
        )

    out: list[tuple[str, Any, Tensor, Any]] = []
    flat1, flat2 = rand(n), rand(n, 3)
    out.append(("a flat vector", flat1, flat1.reshape(n, 1), lambda y: y.reshape(n, 1)))
    out.append(("flat columns", flat2, flat2, lambda y: y))
    matrix_shape = getattr(op, "matrix_shape", None)
    if matrix_shape is not None:
        d_out, k = matrix_shape
        m, stack = rand(d_out, k), rand(2, d_out, k)
        out.append(("a matrix", m, m.reshape(n, 1), lambda y: y.reshape(n, 1)))
        out.append(("a stack of matrices", stack, stack.reshape(2, n).t(), lambda y: y.reshape(2, n).t()))
    param_shapes = getattr(op, "param_shapes", None)
    if param_shapes is not None:
        shapes = [torch.Size(s) for s in param_shapes]
        vec = [rand(*s) for s in shapes]
        mat = [rand(*s, 2) for s in shapes]
        out.append(
            (
                "a list of parameter-shaped tensors",
                vec,
                torch.cat([t.reshape(-1, 1) for t in vec]),
                lambda y: torch.cat([t.reshape(-1, 1) for t in y]),
            )
        )
        out.append(
            (
                "a list of tensors with a trailing column dimension",
                mat,
                torch.cat([t.reshape(-1, 2) for t in mat]),
                lambda y: torch.cat([t.reshape(-1, 2) for t in y]),
            )
        )
    return out


def check_operator(op: Any, *, name: str | None = None, shift: float | None = None, seed: int = 0) -> list[str]:
    """Check every operation of ``op`` against a dense float64 reference.

    Args:
        op: The operator (a block's ``as_operator()``, a
            :class:`~curvkit.laplace.KroneckerCurvature`, a power of one, ...).
        name: How to name it in failures (default: its class).
        shift: The shift for ``logdet``/``power`` (default: a tenth of the mean diagonal,
            or 1 for a zero operator).
        seed: Seed of the random inputs.

    Returns:
        The operations that raised a well-formed :class:`NotImplementedError` (not checked).

    Raises:
        AssertionError: An operation disagrees with the reference, or ``op`` lacks a member
            of the protocol (the message names ``name`` and the operation).
    """
    name = name or type(op).__name__
    if not isinstance(op, CurvatureOperator):
        missing = [
            m
            for m in ("shape", "dtype", "device", "__matmul__", "to_dense", "trace", "logdet", "power", "eigen")
            if not hasattr(op, m)
        ]
        raise AssertionError(f"{name}: {type(op).__name__} does not satisfy CurvatureOperator (missing {missing}).")
    rtol = _tolerance(op.dtype)
    skipped: list[str] = []
    n, m = op.shape
    if n != m:
        raise AssertionError(f"{name}: shape {op.shape} is not square.")
    dense = op.to_dense()
    if tuple(dense.shape) != (n, n) or dense.dtype != op.dtype or dense.device != op.device:
        raise AssertionError(
            f"{name}: to_dense() is {tuple(dense.shape)} {dense.dtype} on {dense.device}; expected {(n, n)} {op.dtype} "
            f"on {op.device}."
        )
    ref = dense.detach().to(torch.float64).cpu()
    scale = float(ref.abs().max()) if n else 0.0
    _close("to_dense() (its symmetry)", name, ref, ref.t(), rtol, scale)
    evals = torch.linalg.eigvalsh(ref) if n else ref.new_zeros(0)
    if n and float(evals.min()) < -rtol * max(scale, 1e-300) * n:
        raise AssertionError(f"{name}: to_dense() is not positive semi-definite (eigenvalue {float(evals.min()):.3g}).")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for label, x, cols, flatten in _formats(op, n, generator):
        y = op @ x
        _close(f"op @ x for {label}", name, flatten(y), ref @ cols.to(torch.float64).cpu(), rtol, scale * n)
    _close("trace()", name, op.trace().reshape(()), ref.trace(), rtol, scale * n)
    mean_diag = float(ref.diagonal().mean()) if n else 0.0
    s = float(shift) if shift is not None else (0.1 * mean_diag if mean_diag > 0 else 1.0)
    shifted = ref + s * torch.eye(n, dtype=torch.float64, device="cpu")
    try:
        _close(
            f"logdet({s:.3g})", name, op.logdet(s).reshape(()), torch.linalg.slogdet(shifted)[1], rtol * max(n, 1), 1.0
        )
    except NotImplementedError as err:
        skipped.append(_unsupported(err, op, "logdet", name))
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64, device="cpu")
    try:
        inv = op.power(-1.0, s)
        if not isinstance(inv, CurvatureOperator):
            raise AssertionError(f"{name}: power(-1, shift) returned {type(inv).__name__}, not a CurvatureOperator.")
        got = inv @ x.to(dtype=op.dtype, device=op.device)
        cond = float(evals.max() + s) / s if n else 1.0
        _close(f"power(-1, {s:.3g}) @ x (the damped inverse)", name, got, torch.linalg.solve(shifted, x), rtol * cond)
        root = op.power(0.5, s)
        _close(
            f"power(0.5, {s:.3g}) squared",
            name,
            root @ (root @ x.to(dtype=op.dtype, device=op.device)),
            shifted @ x,
            rtol * cond,
            (scale + s) * n,
        )
        _close(
            f"power(-1, {s:.3g}).to_dense() @ (op + shift)",
            name,
            inv.to_dense().to(torch.float64).cpu() @ shifted,
            torch.eye(n, dtype=torch.float64, device="cpu"),
            rtol * cond,
            1.0,
        )
    except NotImplementedError as err:
        skipped.append(_unsupported(err, op, "power", name))
    try:
        eig = op.eigen()
        lam, q = eig.to_dense()
        lam, q = lam.to(torch.float64).cpu(), q.to(torch.float64).cpu()
        if lam.shape != (n,) or q.shape != (n, n):
            raise AssertionError(f"{name}: eigen().to_dense() gave {tuple(lam.shape)}, {tuple(q.shape)}.")
        _close("eigen(): Q diag(λ) Qᵀ", name, (q * lam) @ q.t(), ref, rtol * max(n, 1), scale)
        _close(
            "eigen(): QᵀQ = I", name, q.t() @ q, torch.eye(n, dtype=torch.float64, device="cpu"), rtol * max(n, 1), 1.0
        )
        if eig.values.numel() != n:
            raise AssertionError(f"{name}: eigen().values has {eig.values.numel()} entries, the operator {n} rows.")
        _close("eigen().values", name, eig.values.reshape(-1), lam, rtol, scale)
        one = _formats(op, n, generator)[2 if getattr(op, "matrix_shape", None) is not None else 0]
        rotated = eig.rotate(one[1])
        _close("eigen().rotate(x) = Qᵀ x", name, one[3](rotated), q.t() @ one[2].to(torch.float64).cpu(), rtol * n, 1.0)
        _close("eigen().unrotate(rotate(x))", name, one[3](eig.unrotate(rotated)), one[2], rtol * n, 1.0)
    except NotImplementedError as err:
        skipped.append(_unsupported(err, op, "eigen", name))
    return skipped


def _blocks_of(optimizer: Any) -> dict[str, Any]:
    pre = getattr(optimizer, "preconditioner", optimizer)
    return dict(pre.blocks)


def check_block_operators(method: str | MethodSpec, *, registry: Any = None, steps: int = 3) -> None:
    """Train ``method``'s optimizer (its first sample configuration, float64) for a few steps
    on an MLP with a ``LayerNorm`` and on a small CNN, then check ``as_operator()`` of every
    block: a :class:`~curvkit.linalg.operator.CurvatureOperator` of the block's shape
    ``(d_out · d_in[+1])²`` whose every operation passes :func:`check_operator`."""
    from curvkit.testing.methods import _make, _spec, _task, _train

    spec = _spec(method, registry)
    options = dict(spec.sample_configs[0]) if spec.sample_configs else {}
    for kind, build in (
        ("mlp", lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 4))),
        (
            "cnn",
            lambda: nn.Sequential(
                nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(3 * 3 * 3, 4)
            ),
        ),
    ):
        generator = torch.Generator(device="cpu").manual_seed(0)
        torch.manual_seed(0)
        model = build().double()
        X, y = _task(kind, generator, n=64)
        opt = _make(spec, model, options, registry)
        _train(opt, model, X.double(), y, steps, batch=32)
        blocks = _blocks_of(opt)
        if not blocks:
            raise AssertionError(f"method {spec.name!r}: no block was built on the {kind} model.")
        for layer, block in blocks.items():
            label = f"method {spec.name!r}, {kind} layer {layer!r}"
            op = block.as_operator()
            info = block.info
            n = info.d_out * info.d_in
            if not isinstance(op, CurvatureOperator):
                raise AssertionError(
                    f"{label}: as_operator() returned {type(op).__name__}, which does not satisfy "
                    "curvkit.linalg.operator.CurvatureOperator; return a BlockOperator (e.g. KroneckerOperator)."
                )
            if tuple(op.shape) != (n, n):
                raise AssertionError(
                    f"{label}: as_operator().shape is {op.shape}, the block's matrix form needs {(n, n)}."
                )
            shape = getattr(op, "matrix_shape", None)
            if shape is not None and tuple(shape) != (info.d_out, info.d_in):
                raise AssertionError(
                    f"{label}: as_operator().matrix_shape is {shape}, expected {(info.d_out, info.d_in)}."
                )
            check_operator(op, name=label)
