#!/usr/bin/env python
r"""Step time and optimizer state of K-FAC, EKFAC and SINGD on a Hugging Face GPT-2, beside
AdamW, ASDL and the ``singd`` package — in one process, interleaved.

This is a script, not a test. The model is ``GPT2LMHeadModel`` built from a config with
random weights (never downloaded; its ``wte`` is tied to ``lm_head``), trained as a
language model on one fixed batch of random tokens (next-token cross-entropy, the mean over
``N·T`` tokens), on one CPU thread, in float32. Contenders, each on its own copy of the
same initial weights:

* ``adamw``: ``torch.optim.AdamW``;
* ``curvkit:kfac``, ``curvkit:ekfac``, ``curvkit:singd``: the named optimizers with the
  empirical Fisher, statistics every step, ``T_inv = 10`` (K-FAC, EKFAC) / ``T = 10``
  (SINGD), ``loss_average="batch+sequence"``, ``unsupported="skip"``. ``Conv1D`` is
  preconditioned through the bundled ``transformers`` plugin; what each method
  preconditions is read from ``summary()`` (:func:`curvkit.testing.models.coverage`);
* ``asdl:kfac``, ``asdl:ekfac``: ASDL 0.1a4's ``KfacGradientMaker`` / ``EkfacGradientMaker``
  (empirical Fisher, ``preconditioner_upd_interval = 10``) followed by ``torch.optim.SGD``;
  ASDL's ``torch.cuda.nvtx`` calls are replaced by no-ops in this process (they raise on a
  CPU build of torch). What it preconditions: the modules it attached a Fisher to. The
  ``[no-embedding]`` row passes ``ignore_modules=[nn.Embedding]``, the ``[linear-only]`` row
  ``[nn.Embedding, nn.LayerNorm]`` (what the plain rows fail on);
* ``singd-package``: ``singd.optim.optimizer.SINGD`` (``T = 10``,
  ``loss_average="batch+sequence"``); what it preconditions: its ``module_names``.

A contender that fails to build or to step is reported with the exception, where it
happened, and goes no further. Timing: one untimed warm-up block, then ``--rounds`` rounds
in which every contender runs one block of 10 steps (one refresh each), in a rotated order;
reported: the median over rounds of the mean per step, and its ratio to AdamW's. State:
bytes of every tensor the optimizer (and ASDL's gradient maker) holds, each storage once;
its ratio to AdamW's.

    .venv/bin/python benchmarks/transformer.py                 # d=128, 4 layers, 64 tokens × 8
    .venv/bin/python benchmarks/transformer.py --quick         # a tiny config, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import sys
import time
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# this folder holds a singd.py benchmark that would shadow the ``singd`` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import curvkit  # noqa: E402
import curvkit.optim  # noqa: E402
from curvkit.testing.models import coverage  # noqa: E402

LR, MOMENTUM, DAMPING, PERIOD, SEED = 1e-4, 0.9, 1e-3, 10, 0


@dataclass
class Setup:
    vocab: int
    d: int
    layers: int
    heads: int
    tokens: int
    batch: int

    def describe(self) -> str:
        return (
            f"GPT-2 (vocab {self.vocab}, d={self.d}, {self.layers} layers, {self.heads} heads), "
            f"batch {self.batch} × {self.tokens} tokens"
        )


def build_model(s: Setup) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=s.vocab,
        n_positions=s.tokens,
        n_embd=s.d,
        n_layer=s.layers,
        n_head=s.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(SEED)
    return GPT2LMHeadModel(config)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TokenCrossEntropy(nn.CrossEntropyLoss):
    """``lm_loss`` as a loss module (ASDL wants one with a ``reduction``)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return super().forward(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def tensor_bytes(obj: Any, seen: set[tuple[int, int]] | None = None) -> int:
    """Bytes of every tensor reachable in ``obj`` (dicts, lists, tuples, objects with
    ``named_tensors``), each storage once."""
    seen = set() if seen is None else seen
    total = 0
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += obj.untyped_storage().nbytes()
    elif isinstance(obj, dict):
        total += sum(tensor_bytes(v, seen) for v in obj.values())
    elif isinstance(obj, (list, tuple)):
        total += sum(tensor_bytes(v, seen) for v in obj)
    elif hasattr(obj, "named_tensors"):
        total += sum(tensor_bytes(t, seen) for _, t in obj.named_tensors())
    return total


@dataclass
class Result:
    name: str
    times: list[float] = field(default_factory=list)
    state: int | None = None
    fraction: float | None = None
    error: str | None = None
    note: str = ""


class Runner:
    """One contender: ``step()`` runs one training step; ``state_bytes()``; ``fraction``."""

    note = ""

    def __init__(self, setup: Setup, X: torch.Tensor, Y: torch.Tensor) -> None:
        self.model = build_model(setup)
        self.X, self.Y = X, Y
        self.total = sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def state_bytes(self) -> int:  # pragma: no cover - overridden
        raise NotImplementedError

    def fraction(self) -> float:  # pragma: no cover - overridden
        raise NotImplementedError


class AdamWRunner(Runner):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)

    def step(self) -> None:
        self.opt.zero_grad()
        lm_loss(self.model(input_ids=self.X).logits, self.Y).backward()
        self.opt.step()

    def state_bytes(self) -> int:
        return tensor_bytes(self.opt.state_dict()["state"])

    def fraction(self) -> float:
        return 0.0


class CurvkitRunner(Runner):
    def __init__(self, method: str, *args: Any) -> None:
        super().__init__(*args)
        period = {"singd": {"T": PERIOD}}.get(method, {"T_inv": PERIOD})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = curvkit.optim.CurvatureOptimizer(
                self.model,
                method=method,
                lr=LR,
                momentum=MOMENTUM,
                damping=DAMPING,
                loss_average="batch+sequence",
                unsupported="skip",
                **period,
            )

    def step(self) -> None:
        self.opt.zero_grad()
        lm_loss(self.model(input_ids=self.X).logits, self.Y).backward()
        self.opt.step()

    def state_bytes(self) -> int:
        return int(self.opt.state_bytes())  # curvature blocks and momentum buffers

    def fraction(self) -> float:
        said = coverage(self.opt, self.model)
        line, what = said.get("transformer.wte.weight", ("", ""))
        if line == "lm_head" and "tied" not in what:
            self.note = (
                "transformer.wte.weight counts as preconditioned: it is lm_head's weight, whose block has the head's "
                "statistics alone while no nn.Embedding handler is registered"
            )
        params = dict(self.model.named_parameters())
        return sum(params[n].numel() for n, (_, w) in said.items() if not w.startswith("first-order")) / self.total


def _patch_asdl_nvtx() -> None:
    noop = types.SimpleNamespace(range=lambda *a, **k: contextlib.nullcontext())
    for modname in ("asdl.precondition.natural_gradient", "asdl.operations.operation", "asdl.utils"):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(modname)
            if hasattr(mod, "nvtx"):
                mod.nvtx = noop  # type: ignore[attr-defined]


class AsdlRunner(Runner):
    note = "ASDL has no Conv1D support (it warns and leaves them out)"

    def __init__(self, ekfac: bool, ignore: tuple[type[nn.Module], ...], *args: Any) -> None:
        super().__init__(*args)
        import asdl

        _patch_asdl_nvtx()
        config = asdl.PreconditioningConfig(
            data_size=self.X.shape[0],
            damping=DAMPING,
            ema_decay=0.05,
            curvature_upd_interval=1,
            preconditioner_upd_interval=PERIOD,
            ignore_modules=list(ignore) or None,
        )
        maker_cls = asdl.EkfacGradientMaker if ekfac else asdl.KfacGradientMaker
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.maker = maker_cls(self.model, config, fisher_type=asdl.FISHER_EMP)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(self) -> None:
        self.opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dummy = self.maker.setup_model_call(lambda x: self.model(input_ids=x).logits, self.X)
            self.maker.setup_loss_call(TokenCrossEntropy(), dummy, self.Y)
            self.maker.forward_and_backward()
        self.opt.step()

    def _fisher_modules(self) -> list[nn.Module]:
        attr = self.maker.fisher_maker.config.fisher_attr
        return [m for m in self.model.modules() if getattr(m, attr, None) is not None]

    def state_bytes(self) -> int:
        attr = self.maker.fisher_maker.config.fisher_attr
        seen: set[tuple[int, int]] = set()
        fishers = tensor_bytes([vars(getattr(m, attr)) for m in self._fisher_modules()], seen)
        return fishers + tensor_bytes(self.opt.state_dict()["state"], seen)

    def fraction(self) -> float:
        seen: set[int] = set()
        n = 0
        for m in self._fisher_modules():
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n / self.total


class SingdPackageRunner(Runner):
    note = "the package handles nn.Linear and nn.Conv2d only: Conv1D, Embedding and LayerNorm stay untouched"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        from singd.optim.optimizer import SINGD

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = SINGD(
                self.model, lr=LR, momentum=MOMENTUM, damping=DAMPING, T=PERIOD, loss_average="batch+sequence"
            )

    def step(self) -> None:
        self.opt.zero_grad()
        lm_loss(self.model(input_ids=self.X).logits, self.Y).backward()
        self.opt.step()

    def state_bytes(self) -> int:
        seen: set[tuple[int, int]] = set()
        return tensor_bytes(self.opt.state_dict()["state"], seen) + tensor_bytes(
            [getattr(self.opt, a, None) for a in ("Ks", "Cs", "m_Ks", "m_Cs")], seen
        )

    def fraction(self) -> float:
        seen: set[int] = set()
        n = 0
        for m in self.opt.module_names:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    n += p.numel()
        return n / self.total


CONTENDERS: dict[str, Callable[..., Runner]] = {
    "adamw": AdamWRunner,
    "curvkit:kfac": lambda *a: CurvkitRunner("kfac", *a),
    "curvkit:ekfac": lambda *a: CurvkitRunner("ekfac", *a),
    "curvkit:singd": lambda *a: CurvkitRunner("singd", *a),
    "asdl:kfac": lambda *a: AsdlRunner(False, (), *a),
    "asdl:ekfac": lambda *a: AsdlRunner(True, (), *a),
    "asdl:kfac[no-embedding]": lambda *a: AsdlRunner(False, (nn.Embedding,), *a),
    "asdl:ekfac[linear-only]": lambda *a: AsdlRunner(True, (nn.Embedding, nn.LayerNorm), *a),
    "singd-package": SingdPackageRunner,
}


def _failure(stage: str, err: BaseException) -> str:
    frame = traceback.extract_tb(err.__traceback__)[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}"
    return f"{stage}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} (at {where})"


def run(setup: Setup, rounds: int, names: list[str]) -> list[Result]:
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, setup.vocab, (setup.batch, setup.tokens + 1), generator=gen)
    X, Y = tokens[:, :-1], tokens[:, 1:]
    results = {n: Result(n) for n in names}
    runners: dict[str, Runner] = {}
    for name in names:
        try:
            runner = CONTENDERS[name](setup, X, Y)
        except Exception as err:  # noqa: BLE001 - reported, the benchmark goes on
            results[name].error = _failure("build", err)
            continue
        results[name].note = runner.note
        try:
            for _ in range(PERIOD):  # warm-up block (untimed)
                runner.step()
            results[name].fraction = runner.fraction()
            results[name].state = runner.state_bytes()
            results[name].note = runner.note
        except Exception as err:  # noqa: BLE001
            results[name].error = _failure("step", err)
            continue
        runners[name] = runner
    order = list(runners)
    for r in range(rounds):
        for name in order[r % len(order) :] + order[: r % len(order)] if order else []:
            runner = runners[name]
            try:
                tic = time.perf_counter()
                for _ in range(PERIOD):
                    runner.step()
                results[name].times.append((time.perf_counter() - tic) / PERIOD)
            except Exception as err:  # noqa: BLE001
                results[name].error = _failure("step", err)
                runners.pop(name)
        order = list(runners)
    return list(results.values())


def report(setup: Setup, results: list[Result], rounds: int) -> str:
    base = next((r for r in results if r.name == "adamw" and r.times), None)
    base_ms = statistics.median(base.times) * 1e3 if base else None
    base_state = base.state if base else None
    lines = [
        f"{setup.describe()}; {rounds} rounds of {PERIOD} steps, torch {torch.__version__}, 1 thread",
        "",
        "| contender | ms/step | × AdamW | state MiB | × AdamW | preconditioned |",
        "|---|---|---|---|---|---|",
    ]
    failures, notes = [], []
    for r in results:
        if r.note:
            notes.append(f"- `{r.name}`: {r.note}")
        if r.error is not None:
            lines.append(f"| {r.name} | failed | | | | |")
            failures.append(f"- `{r.name}`: {r.error}")
            continue
        ms = statistics.median(r.times) * 1e3
        ratio = f"{ms / base_ms:.2f}" if base_ms else ""
        assert r.state is not None and r.fraction is not None
        sratio = f"{r.state / base_state:.2f}" if base_state else ""
        lines.append(
            f"| {r.name} | {ms:.1f} | {ratio} | {r.state / 2**20:.2f} | {sratio} | {r.fraction:.1%} of parameters |"
        )
    if failures:
        lines += ["", "Failures:", *failures]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny config (d=32, 2 layers, 16 tokens × 4)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; 2 with --quick)")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated subset")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setup = Setup(64, 32, 2, 2, 16, 4) if args.quick else Setup(512, 128, 4, 4, 64, 8)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    print(report(setup, run(setup, rounds, names), rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
