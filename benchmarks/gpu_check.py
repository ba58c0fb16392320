#!/usr/bin/env python
r"""The one prepared device check: CUDA tests and GPU timings in one command.

A GPU machine is lent now and then, for about 15 minutes, without network. This script is
everything to run there, in one process call, in under 8 minutes of device time:

1. **environment**: device, torch / CUDA / cuDNN versions, the peer libraries' versions,
   and whether the installed curvkit wheel matches this source tree (a stale wheel is
   reported, not fatal);
2. **tests**: ``pytest -m cuda -x -q`` on ``tests/`` in a subprocess (its log is written
   beside the results);
3. **steps**: milliseconds per optimizer step of AdamW, K-FAC (``T_inv=10``), SINGD dense
   and SINGD diagonal (their default period ``T=10``), in float32 (TF32 matmuls allowed,
   as in training) and bf16, in one process with interleaved rounds (every configuration
   runs a block of 10 consecutive steps per round, in a rotated order; the median over
   rounds of the per-step mean is reported, timed with CUDA events), on
   * ``linear``: a stack of 24 Linear 2048→2048 layers with ReLU (~100M parameters), a
     batch of 32×512 tokens as 16,384 rows, cross-entropy over the 2048 outputs;
   * ``transformer``: a 6-layer pre-LN ``nn.TransformerEncoder`` language model (d=512,
     8 heads, vocabulary 4096, causal), batch 32×512 tokens;
   * ``gpt2``: a 6-layer GPT-2 from a ``transformers`` config with random weights (d=512,
     vocabulary 4096, untied embeddings), when ``transformers`` is installed.
   The curvature optimizers run with ``unsupported="skip"``; the share of parameters they
   precondition is reported (layers without a handler, and layers whose forward is a
   functional call such as attention's output projection, take the first-order step).
   Also per configuration: resident GPU memory and the host-device synchronisations of
   one step without refresh (``torch.cuda.set_sync_debug_mode``);
4. **factors**: ``curvkit.kronecker_factors`` (MC with one sample, and empirical) against
   one plain gradient (forward + backward) and curvlinops' ``KFACLinearOperator``
   (``compute_kronecker_factors``) on the ``linear`` model in float32, interleaved.

Results go to ``gpu_check.json`` (every figure, every error) and ``gpu_check.md`` (the
tables) in ``--out`` (default ``$OUT`` if set, else ``gpu-check-out``), rewritten after
each section so that a run stopped early still leaves what it measured. Each section
records its own error and the run goes on; a time budget (``--budget``, default 450 s)
stops the measurements before it is spent.

``--dry-run`` runs all of it on the CPU at tiny sizes in well under a minute (the tests
step then runs a few of the CUDA tests with ``CURVKIT_CUDA_TESTS_ON_CPU=1``), so that the
script cannot be broken on the day a GPU is there; ``tests/test_gpu_check.py`` runs it.

The device command (after ``benchmarks/gpu_prepare.sh`` here; see docs/benchmarks.md,
"GPU")::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site && \
        PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
JSON_NAME = "gpu_check.json"
MD_NAME = "gpu_check.md"
LOG_NAME = "gpu_check_pytest.log"
OPTIMIZERS = ("adamw", "kfac", "singd-dense", "singd-diag")
DTYPES = {"float32": torch.float32, "bf16": torch.bfloat16}
PEERS = (
    "curvlinops-for-pytorch",
    "backpack-for-pytorch",
    "asdfghjkl",
    "singd",
    "laplace-torch",
    "pluggy",
    "pytest",
    "numpy",
    "transformers",
)


@dataclass(frozen=True)
class Sizes:
    """Model and batch sizes of a run (full on the GPU, tiny for ``--dry-run``)."""

    linear_width: int
    linear_depth: int
    rows: int  # batch × tokens of the linear model
    tf_vocab: int
    tf_dim: int
    tf_heads: int
    tf_layers: int
    tf_batch: int
    tf_tokens: int
    block: int  # steps per timed block
    rounds: int
    warmup: int


FULL = Sizes(2048, 24, 32 * 512, 4096, 512, 8, 6, 32, 512, block=10, rounds=3, warmup=2)
DRY = Sizes(32, 3, 64, 50, 16, 2, 2, 4, 8, block=2, rounds=2, warmup=1)


# --- bookkeeping ------------------------------------------------------------------------------


class Budget:
    """Seconds left of the run's time budget."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Report:
    """The results, rewritten to ``out`` after every section."""

    def __init__(self, out: Path, data: dict[str, Any]) -> None:
        self.out = out
        self.data = data
        out.mkdir(parents=True, exist_ok=True)

    def section(self, name: str) -> dict[str, Any]:
        entry = self.data["sections"].setdefault(name, {"status": "running", "error": None})
        return entry

    def write(self) -> None:
        self.data["elapsed_s"] = round(time.perf_counter() - self.data["_t0"], 2)
        public = {k: v for k, v in self.data.items() if not k.startswith("_")}
        (self.out / JSON_NAME).write_text(json.dumps(_jsonable(public), indent=1, allow_nan=False) + "\n")
        (self.out / MD_NAME).write_text(markdown(public))


@contextlib.contextmanager
def guarded(report: Report, name: str, budget: Budget, need: float = 0.0) -> Iterator[dict[str, Any]]:
    """Run a section: its exception is recorded (status ``"error"``) and the run goes on; a
    section that needs more seconds than are left is skipped (status ``"skipped"``)."""
    entry = report.section(name)
    if budget.left() < need:
        entry.update(
            status="skipped", error=f"time budget: {budget.left():.0f} s left, the section needs ~{need:.0f} s"
        )
        print(f"[{name}] skipped: {entry['error']}", flush=True)
        report.write()
        yield {"_skip": True}
        return
    print(f"[{name}] start at {budget.elapsed():.0f} s", flush=True)
    t0 = time.perf_counter()
    try:
        yield entry
        if entry["status"] == "running":
            entry["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - one section's failure must not end the run
        entry["status"] = "error"
        entry["error"] = f"{type(err).__name__}: {err}"
        entry["traceback"] = traceback.format_exc(limit=12)
        print(f"[{name}] error: {entry['error']}", flush=True)
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report.write()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    return repr(obj)


# --- 1. environment ---------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _digest(files: list[Path], root: Path) -> dict[str, str]:
    return {f.relative_to(root).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def wheel_freshness() -> dict[str, Any]:
    """Whether the imported curvkit (and its bundled plugins) has the same Python files as
    this source tree: a wheel built before the last edit is reported as stale."""
    import importlib.util

    import curvkit

    installed = Path(curvkit.__file__).resolve().parent
    source = REPO / "curvkit"
    packages = {"curvkit": (source, installed)}
    for plugin in sorted(p.name for p in (REPO / "plugins").glob("curvkit_*") if p.is_dir()):
        spec = importlib.util.find_spec(plugin)
        if spec is not None and spec.origin is not None:
            packages[plugin] = (REPO / "plugins" / plugin, Path(spec.origin).resolve().parent)
    differing: list[str] = []
    for name, (src, inst) in packages.items():
        if src.resolve() == inst:
            continue
        a = _digest(sorted(src.rglob("*.py")), src)
        b = _digest(sorted(inst.rglob("*.py")), inst)
        differing += [f"{name}/{f}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
    return {
        "curvkit_imported_from": str(installed),
        "source_tree": str(source),
        "editable_or_source": installed == source.resolve(),
        "stale_files": differing,
        "stale": bool(differing),
    }


def environment(device: torch.device) -> dict[str, Any]:
    import curvkit

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "curvkit": curvkit.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "versions": {name: _version(name) for name in PEERS},
        "methods": curvkit.default_registry().methods.names(),
        "layer_handlers": curvkit.default_registry().layer_handlers.names(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            device_memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            device_count=torch.cuda.device_count(),
        )
        with contextlib.suppress(Exception):
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["nvidia_smi"] = smi.stdout.strip()
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    env["wheel"] = wheel_freshness()
    return env


# --- 2. tests ---------------------------------------------------------------------------------

#: The CUDA tests a dry run executes on the CPU (one of each kind, to prove the harness).
DRY_RUN_TESTS = (
    "test_every_registered_handler_has_an_example"
    " or (test_factors_on_the_device and linear-Linear-type-2-expand)"
    " or (test_one_step_on_the_device_equals_the_cpu_step and kfac-0 and bf16)"
    " or (test_kronecker_laplace_on_the_device_equals_the_cpu and kfac and classification)"
)


def run_tests(entry: dict[str, Any], out: Path, dry_run: bool, timeout: float) -> None:
    """``pytest -m cuda -x -q`` in a subprocess. ``-P`` keeps the source tree off
    ``sys.path`` (the tests import the installed curvkit); pytest plugins installed on the
    machine are not autoloaded (none is needed, and they need not match this pytest)."""
    cmd = [sys.executable, "-P", "-m", "pytest", "-m", "cuda", "-x", "-q", "-rs", "-p", "no:cacheprovider"]
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONUNBUFFERED="1")
    if dry_run:
        cmd += ["-k", DRY_RUN_TESTS]
        env["CURVKIT_CUDA_TESTS_ON_CPU"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    # a dry run collects tests/cuda only (collecting all of tests/ costs ~10 s on 2 cores)
    cmd.append(str(REPO / "tests" / "cuda" if dry_run else REPO / "tests"))
    entry["command"] = " ".join(cmd[1:])
    log = out / LOG_NAME
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    text = log.read_text(encoding="utf-8", errors="replace")
    entry["returncode"] = rc
    entry["seconds_pytest"] = round(time.perf_counter() - t0, 2)
    entry["summary"] = next((line for line in reversed(text.splitlines()) if line.strip()), "")
    entry["tail"] = text[-3000:]
    entry["log"] = LOG_NAME
    print(f"[tests] {entry['summary']}", flush=True)
    if rc is None:
        entry["status"] = "error"
        entry["error"] = f"pytest did not finish within {timeout:.0f} s (killed)"
    elif rc != 0:
        entry["status"] = "failed"
        entry["error"] = f"pytest exit status {rc}: {entry['summary']}"


# --- models -----------------------------------------------------------------------------------


class LinearStack(nn.Module):
    """``depth`` Linear width→width layers with ReLU between them; logits over ``width``."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers.append(nn.Linear(width, width))
            if i < depth - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyLM(nn.Module):
    """A pre-LN causal ``nn.TransformerEncoder`` language model with learned positions."""

    def __init__(self, vocab: int, dim: int, heads: int, layers: int, tokens: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(tokens, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        self.tokens = tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=x.device, dtype=h.dtype), diagonal=1)
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True)))


class HFLM(nn.Module):
    """A ``transformers`` causal LM returning its logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).logits


def gpt2(sizes: Sizes) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=sizes.tf_vocab,
        n_positions=sizes.tf_tokens,
        n_embd=sizes.tf_dim,
        n_layer=sizes.tf_layers,
        n_head=sizes.tf_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
    )
    return HFLM(GPT2LMHeadModel(config))


@dataclass
class Workload:
    """A model builder and one fixed batch (inputs on the CPU; moved per configuration)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: torch.Tensor
    targets: torch.Tensor  # class indices, one per output row
    float_inputs: bool
    description: str


def workloads(sizes: Sizes, names: list[str]) -> list[Workload]:
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    if "linear" in names:
        w = sizes.linear_width
        out.append(
            Workload(
                "linear",
                lambda: LinearStack(sizes.linear_width, sizes.linear_depth),
                torch.randn(sizes.rows, w, generator=g, device="cpu"),
                torch.randint(0, w, (sizes.rows,), generator=g, device="cpu"),
                True,
                f"{sizes.linear_depth} × Linear {w}→{w} (ReLU), {sizes.rows} rows, CE over {w}",
            )
        )
    tokens = torch.randint(0, sizes.tf_vocab, (sizes.tf_batch, sizes.tf_tokens + 1), generator=g, device="cpu")
    lm_desc = (
        f"{sizes.tf_layers} layers, d={sizes.tf_dim}, {sizes.tf_heads} heads, vocabulary {sizes.tf_vocab}, "
        f"batch {sizes.tf_batch}×{sizes.tf_tokens} tokens"
    )
    if "transformer" in names:
        out.append(
            Workload(
                "transformer",
                lambda: TinyLM(sizes.tf_vocab, sizes.tf_dim, sizes.tf_heads, sizes.tf_layers, sizes.tf_tokens),
                tokens[:, :-1],
                tokens[:, 1:],
                False,
                "nn.TransformerEncoder LM (pre-LN, causal): " + lm_desc,
            )
        )
    if "gpt2" in names:
        out.append(
            Workload(
                "gpt2",
                lambda: gpt2(sizes),
                tokens[:, :-1],
                tokens[:, 1:],
                False,
                "GPT-2 (transformers config, random weights, untied embeddings): " + lm_desc,
            )
        )
    return out


def loss_of(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]).float(), targets.reshape(-1))


# --- 3. step times ----------------------------------------------------------------------------


def make_optimizer(name: str, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    import curvkit.optim

    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    common = {"lr": 1e-4, "momentum": 0.9, "unsupported": "skip"}
    if name == "kfac":
        return curvkit.optim.create("kfac", model, damping=1e-3, T_inv=10, **common)
    if name == "singd-dense":
        return curvkit.optim.create("singd", model, damping=1e-3, structure="dense", **common)
    if name == "singd-diag":
        return curvkit.optim.create("singd", model, damping=1e-3, structure="diagonal", **common)
    raise ValueError(name)


def preconditioned_share(opt: Any, model: nn.Module) -> dict[str, Any] | None:
    """The share of the model's parameters a curvkit optimizer preconditions: tracked by a
    curvature block, and minus the tracked layers that never captured statistics."""
    pre = getattr(opt, "preconditioner", None)
    if pre is None:
        return None
    total = sum(p.numel() for p in model.parameters())
    tracked = {name: layer for name, layer in pre.layers.items()}
    # a block that never received statistics (e.g. attention's out_proj, called functionally)
    # takes the first-order step: it is tracked but not preconditioned
    missing = {name for name, block in pre.blocks.items() if getattr(block, "num_updates", 1) == 0}
    size = {
        name: layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
        for name, layer in tracked.items()
    }
    return {
        "tracked": sum(size.values()) / total,
        "captured": sum(v for n, v in size.items() if n not in missing) / total,
        "layers_tracked": len(tracked),
        "layers_without_statistics": sorted(missing),
        "modules_first_order": list(pre.plan.skipped),
    }


class Config:
    """One (workload, optimizer, dtype): its model, optimizer and batch on the device."""

    def __init__(self, work: Workload, opt_name: str, dtype_name: str, device: torch.device) -> None:
        self.work, self.opt_name, self.dtype_name, self.device = work, opt_name, dtype_name, device
        self.label = f"{work.name}/{opt_name}/{dtype_name}"
        dtype = DTYPES[dtype_name]
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        torch.manual_seed(0)
        self.model = work.build().to(device=device, dtype=dtype)
        self.x = work.inputs.to(device=device, dtype=dtype) if work.float_inputs else work.inputs.to(device)
        self.y = work.targets.to(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.opt = make_optimizer(opt_name, self.model, device)
        self.mem_before = before
        self.losses: list[float] = []
        self.blocks_ms: list[float] = []

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = loss_of(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def run(self, steps: int) -> float:
        """``steps`` steps; the mean milliseconds per step (CUDA events on the GPU)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(self.device)
                start.record()
                for _ in range(steps):
                    loss = self.step()
                end.record()
                torch.cuda.synchronize(self.device)
                ms = start.elapsed_time(end) / steps
            else:
                t0 = time.perf_counter()
                for _ in range(steps):
                    loss = self.step()
                ms = 1000 * (time.perf_counter() - t0) / steps
        self.losses.append(float(loss))
        return ms

    def count_syncs(self) -> int | None:
        """Host-device synchronisations in one step (the next one, which may or may not
        hold a refresh): warnings of ``torch.cuda.set_sync_debug_mode('warn')``."""
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize(self.device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                self.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(self.device)
        return sum("synchroniz" in str(w.message) for w in caught)

    def row(self) -> dict[str, Any]:
        resident = None
        if self.device.type == "cuda":
            resident = (torch.cuda.memory_allocated(self.device) - self.mem_before) / 2**20
        state = getattr(self.opt, "state_bytes", None)
        return {
            "workload": self.work.name,
            "optimizer": self.opt_name,
            "dtype": self.dtype_name,
            "ms_per_step": statistics.median(self.blocks_ms) if self.blocks_ms else None,
            "ms_blocks": [round(v, 3) for v in self.blocks_ms],
            "resident_mib": resident,
            "curvature_state_mib": state() / 2**20 if callable(state) else None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "preconditioned": preconditioned_share(self.opt, self.model),
            "last_loss": self.losses[-1] if self.losses else None,
            "finite": all(math.isfinite(v) for v in self.losses),
            "skipped_steps": getattr(getattr(self.opt, "preconditioner", None), "counters", {}).get("skipped_steps"),
        }


def measure_steps(
    entry: dict[str, Any], work: Workload, sizes: Sizes, device: torch.device, budget: Budget, reserve: float
) -> None:
    """Build every (optimizer, dtype) of ``work``, warm up, then interleaved timed rounds."""
    entry["description"] = work.description
    entry["settings"] = {
        "block_steps": sizes.block,
        "rounds": sizes.rounds,
        "warmup_steps": sizes.warmup,
        "lr": 1e-4,
        "kfac": "T_inv=10, T_stats=1, damping 1e-3 (π), Cholesky, momentum 0.9, unsupported='skip'",
        "singd": "T=10 (default), damping 1e-3, structure dense / diagonal, momentum 0.9, unsupported='skip'",
        "adamw": "torch.optim.AdamW(lr=1e-4), fused on CUDA",
        "tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    configs: list[Config] = []
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    entry["rows"] = rows
    entry["errors"] = errors
    for dtype_name in DTYPES:
        for opt_name in OPTIMIZERS:
            label = f"{work.name}/{opt_name}/{dtype_name}"
            try:
                cfg = Config(work, opt_name, dtype_name, device)
                cfg.run(sizes.warmup)
                configs.append(cfg)
            except Exception as err:  # noqa: BLE001 - recorded per configuration
                errors[label] = f"{type(err).__name__}: {err}"
                print(f"[steps] {label}: {errors[label]}", flush=True)
    done_rounds = 0
    for r in range(sizes.rounds):
        if budget.left() < reserve:
            entry["stopped"] = f"time budget after {done_rounds} round(s)"
            break
        order = configs[r % len(configs) :] + configs[: r % len(configs)] if configs else []
        for cfg in order:
            if cfg.label in errors:
                continue
            try:
                cfg.blocks_ms.append(cfg.run(sizes.block))
            except Exception as err:  # noqa: BLE001
                errors[cfg.label] = f"{type(err).__name__}: {err}"
        done_rounds += 1
    entry["rounds_done"] = done_rounds
    adamw = {c.dtype_name: c for c in configs if c.opt_name == "adamw" and c.blocks_ms}
    for cfg in configs:
        syncs: int | None | str
        try:
            syncs = cfg.count_syncs() if cfg.label not in errors else None
        except Exception as err:  # noqa: BLE001
            syncs = f"{type(err).__name__}: {err}"
        row = cfg.row()
        row["syncs_per_step"] = syncs
        row["error"] = errors.get(cfg.label)
        base = adamw.get(cfg.dtype_name)
        if base is not None and row["ms_per_step"] is not None:
            row["x_adamw"] = row["ms_per_step"] / statistics.median(base.blocks_ms)
        rows.append(row)
    for label, err in errors.items():
        if not any(f"{r['workload']}/{r['optimizer']}/{r['dtype']}" == label for r in rows):
            w_, o_, d_ = label.split("/")
            rows.append({"workload": w_, "optimizer": o_, "dtype": d_, "ms_per_step": None, "error": err})
    if device.type == "cuda":
        entry["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    configs.clear()


# --- 4. factor time ---------------------------------------------------------------------------


def measure_factors(entry: dict[str, Any], sizes: Sizes, device: torch.device, budget: Budget, reserve: float) -> None:
    import curvkit

    torch.manual_seed(0)
    g = torch.Generator(device="cpu").manual_seed(1)
    model = LinearStack(sizes.linear_width, sizes.linear_depth).to(device)
    X = torch.randn(sizes.rows, sizes.linear_width, generator=g, device="cpu").to(device)
    y = torch.randint(0, sizes.linear_width, (sizes.rows,), generator=g, device="cpu").to(device)
    loss_fn = nn.CrossEntropyLoss()
    entry["description"] = (
        f"linear model in float32: {sizes.linear_depth} × Linear {sizes.linear_width}², {sizes.rows} rows"
    )

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    def ours(fisher: str) -> Callable[[], None]:
        def run() -> None:
            gen = torch.Generator(device=device).manual_seed(0) if fisher == "mc" else None
            curvkit.kronecker_factors(model, loss_fn, X, y, fisher=fisher, generator=gen)

        return run

    contenders: dict[str, Callable[[], None]] = {
        "gradient": gradient,
        "curvkit[mc]": ours("mc"),
        "curvkit[empirical]": ours("empirical"),
    }
    errors: dict[str, str] = {}
    try:
        from curvlinops import KFACLinearOperator

        params = [p for p in model.parameters() if p.requires_grad]
        for fisher in ("mc", "empirical"):
            op = KFACLinearOperator(
                model,
                loss_fn,
                params,
                [(X, y)],
                fisher_type=fisher,
                mc_samples=1,
                seed=0,
                separate_weight_and_bias=False,
                check_deterministic=False,
            )
            contenders[f"curvlinops[{fisher}]"] = op.compute_kronecker_factors
    except Exception as err:  # noqa: BLE001
        errors["curvlinops"] = f"{type(err).__name__}: {err}"

    def timed(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return 1000 * (time.perf_counter() - t0)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for name, fn in list(contenders.items()):  # warm-up
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            errors[name] = f"{type(err).__name__}: {err}"
    live = [n for n in contenders if n not in errors]
    for r in range(sizes.rounds + 2):
        if budget.left() < reserve:
            entry["stopped"] = f"time budget after {r} round(s)"
            break
        for name in live[r % len(live) :] + live[: r % len(live)]:
            try:
                times[name].append(timed(contenders[name]))
            except Exception as err:  # noqa: BLE001
                errors[name] = f"{type(err).__name__}: {err}"
    grad_ms = statistics.median(times["gradient"]) if times["gradient"] else None
    entry["rows"] = [
        {
            "what": name,
            "ms": statistics.median(t) if t else None,
            "x_gradient": statistics.median(t) / grad_ms if t and grad_ms else None,
            "ms_rounds": [round(v, 3) for v in t],
            "error": errors.get(name),
        }
        for name, t in times.items()
    ]
    entry["errors"] = errors


# --- report -----------------------------------------------------------------------------------


def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown(data: dict[str, Any]) -> str:
    env = data.get("environment", {})
    lines = [
        f"# curvkit GPU check ({'dry run on the CPU' if data.get('dry_run') else env.get('device_name')})",
        "",
        f"{data.get('started')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Python {env.get('python')}, "
        f"curvkit {env.get('curvkit')}; {data.get('elapsed_s')} s in all.",
        "",
        "| section | status | seconds | error |",
        "|---|---|---|---|",
    ]
    for name, s in data.get("sections", {}).items():
        err = (s.get("error") or "").replace("|", "\\|")[:160]
        lines.append(f"| {name} | {s.get('status')} | {_fmt(s.get('seconds'))} | {err} |")
    wheel = env.get("wheel") or {}
    if wheel.get("stale"):
        lines += ["", f"**The installed curvkit differs from the source tree**: {', '.join(wheel['stale_files'][:10])}"]
    tests = data.get("sections", {}).get("tests")
    if tests and tests.get("summary"):
        lines += ["", f"Tests (`{tests.get('command')}`): {tests['summary']}"]
    for name, s in data.get("sections", {}).items():
        if not name.startswith("steps:") or not s.get("rows"):
            continue
        lines += [
            "",
            f"## Step time: {name.split(':', 1)[1]}",
            "",
            s.get("description", ""),
            "",
            "| optimizer | dtype | ms/step | × AdamW | preconditioned | resident MiB | syncs/step | last loss "
            "| error |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in s["rows"]:
            share = r.get("preconditioned")
            pre = "—" if not share else f"{100 * share['captured']:.0f} % ({100 * share['tracked']:.0f} % tracked)"
            lines.append(
                f"| {r['optimizer']} | {r['dtype']} | {_fmt(r.get('ms_per_step'))} | {_fmt(r.get('x_adamw'))} "
                f"| {pre} | "
                f"{_fmt(r.get('resident_mib'), '.0f')} | {_fmt(r.get('syncs_per_step'))} | "
                f"{_fmt(r.get('last_loss'), '.4f')} | {(r.get('error') or '')[:120]} |"
            )
    factors = data.get("sections", {}).get("factors")
    if factors and factors.get("rows"):
        lines += [
            "",
            "## Factor time",
            "",
            factors.get("description", ""),
            "",
            "| what | ms | × gradient | error |",
            "|---|---|---|---|",
        ]
        for r in factors["rows"]:
            lines.append(
                f"| {r['what']} | {_fmt(r['ms'])} | {_fmt(r['x_gradient'])} | {(r.get('error') or '')[:120]} |"
            )
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="output folder (default: $OUT)")
    p.add_argument("--dry-run", action="store_true", help="everything on the CPU at tiny sizes (< 1 min)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default 450; dry run 120)")
    p.add_argument("--test-timeout", type=float, default=240.0, help="seconds for the pytest step (default 240)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest -m cuda")
    p.add_argument(
        "--workloads",
        default="linear,transformer,gpt2",
        help="comma-separated: linear, transformer, gpt2 (default: all)",
    )
    p.add_argument("--no-factors", action="store_true", help="skip the factor-time section")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); use --dry-run on the CPU.")
        return 2
    device = torch.device("cpu") if dry else torch.device("cuda")
    if dry:
        torch.set_num_threads(1)  # tiny models: threads only add overhead (and CI has 2 cores)
    sizes = DRY if dry else FULL
    budget = Budget(args.budget if args.budget is not None else (120.0 if dry else 450.0))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 training on a GPU uses TF32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    report = Report(
        Path(args.out),
        {
            "_t0": budget.start,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else argv,
            "dry_run": dry,
            "budget_s": budget.seconds,
            "sizes": sizes.__dict__,
            "sections": {},
        },
    )
    with guarded(report, "environment", budget) as entry:
        env = environment(device)
        report.data["environment"] = env
        entry["summary"] = f"{env.get('device_name', env['device'])}, torch {env['torch']}, CUDA {env['torch_cuda']}"
        print(
            f"device {env.get('device_name', env['device'])}; torch {env['torch']} (CUDA {env['torch_cuda']}, "
            f"cuDNN {env['cudnn']}); Python {env['python']}; curvkit {env['curvkit']} from "
            f"{env['wheel']['curvkit_imported_from']}"
            + (f"; STALE wheel: {len(env['wheel']['stale_files'])} file(s) differ" if env["wheel"]["stale"] else ""),
            flush=True,
        )
    if not args.skip_tests:
        # leave the measurements at least 2 minutes of the budget (10 s in a dry run)
        timeout = min(args.test_timeout, budget.left() - (10 if dry else 120))
        with guarded(report, "tests", budget, need=10) as entry:
            if not entry.get("_skip"):
                run_tests(entry, report.out, dry, timeout)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    if "gpt2" in names:
        try:
            import transformers  # noqa: F401
        except ImportError:
            names.remove("gpt2")
            report.section("steps:gpt2").update(status="skipped", error="transformers is not installed")
    reserve = 5 if dry else 25  # seconds kept for the last section's bookkeeping
    for work in workloads(sizes, names):
        with guarded(report, f"steps:{work.name}", budget, need=reserve + (2 if dry else 30)) as entry:
            if not entry.get("_skip"):
                measure_steps(entry, work, sizes, device, budget, reserve)
    if not args.no_factors:
        with guarded(report, "factors", budget, need=reserve + (2 if dry else 20)) as entry:
            if not entry.get("_skip"):
                measure_factors(entry, sizes, device, budget, reserve)
    report.write()
    print((report.out / MD_NAME).read_text(), flush=True)
    print(f"results: {report.out / JSON_NAME}, {report.out / MD_NAME}", flush=True)
    failed = [n for n, s in report.data["sections"].items() if s.get("status") in ("error", "failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
