r"""Data-parallel preconditioning on ``torch.distributed`` (gloo on CPU, NCCL on CUDA).

:class:`TorchDistributor` makes every process hold the same curvature state as one process
that saw the whole batch:

* **statistics**: a block whose update needs only data averages
  (:meth:`~curvkit.blocks.CurvatureBlock.batch_statistics`: K-FAC's ``A`` and ``G``,
  SINGD's ``Π̂(Kᵀ A K)`` and ``Π̂(Cᵀ G C)``) has them averaged with one ``all_reduce`` per
  bucket, each weighted by the process's number of data; symmetric matrices travel as
  packed upper triangles, optionally in a lower ``comm_dtype``. A block that needs
  per-example quantities (EKFAC's eigenvalue correction, TKFAC's traces, SKFAC's rows)
  gets the processes' layer inputs and output gradients gathered instead (exact, more to
  send);
* **refreshes**: each block's refresh is assigned to one rank by a cost-balanced plan
  (:func:`~curvkit.distributed.assign_refreshes`, :attr:`plan`); the owner computes it and
  broadcasts what it produced (:meth:`~curvkit.blocks.CurvatureBlock.refresh_state`), so
  each decomposition is computed once per refresh. ``shard_inversions=False`` computes
  every refresh on every rank instead (no refresh traffic);
* **gradients**: for a plain model in a process group they are averaged here (bucketed
  ``all_reduce``); a :class:`~torch.nn.parallel.DistributedDataParallel` model has
  averaged them in its backward, and they are left alone;
* **skips**: one small ``all_reduce`` per step agrees whether every rank's gradients are
  finite, so a non-finite gradient on one rank skips the step on all.

What a process sends (payload bytes) is counted in :attr:`bytes_communicated`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvkit.blocks import CurvatureBlock, LayerStats, SharedLayerStats
from curvkit.distributed.base import Distributor
from curvkit.stats.layer_stats import Part

__all__ = ["TorchDistributor", "pack_symmetric", "unpack_symmetric"]


_TRIANGLES: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}


def _triangle(d: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Flat indices of the upper triangle of a ``(d, d)`` matrix, row by row, and of its
    mirror image (cached per size and device: building them costs more than using them)."""
    key = (d, str(device))
    found = _TRIANGLES.get(key)
    if found is None:
        rows, cols = torch.triu_indices(d, d, device=device)
        found = (rows * d + cols, cols * d + rows)
        if len(_TRIANGLES) > 64:
            _TRIANGLES.clear()
        _TRIANGLES[key] = found
    return found


def pack_symmetric(t: Tensor) -> Tensor:
    """The upper triangle (diagonal included) of a symmetric ``(d, d)`` matrix, row by row:
    ``d (d + 1) / 2`` numbers."""
    upper, _ = _triangle(t.shape[0], t.device)
    return t.reshape(-1).index_select(0, upper)


def unpack_symmetric(v: Tensor, d: int) -> Tensor:
    """Inverse of :func:`pack_symmetric`: the symmetric ``(d, d)`` matrix."""
    upper, lower = _triangle(d, v.device)
    out = v.new_empty(d, d)
    flat = out.view(-1)
    flat.index_copy_(0, upper, v)
    flat.index_copy_(0, lower, v)
    return out


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


class TorchDistributor(Distributor):
    """Share statistics and refreshes over a ``torch.distributed`` process group.

    Args:
        group: The process group (default: the default group).
        comm_dtype: dtype in which averaged statistics travel (e.g. ``torch.bfloat16`` or
            ``torch.float32`` to halve or quarter the bytes of float64 statistics);
            ``None`` sends them in their own dtype. Gathered per-example data and
            refresh results always travel in their own dtype.
        bucket_mb: Size of one ``all_reduce`` bucket, in MiB.
        shard_inversions: Compute each shareable refresh on one rank and broadcast it
            (default), or compute every refresh on every rank.
        reduce_gradients: Average gradients here: ``None`` (default) does it unless the
            model is a ``DistributedDataParallel``.

    Raises:
        RuntimeError: No initialised process group.
    """

    def __init__(
        self,
        group: Any = None,
        *,
        comm_dtype: torch.dtype | None = None,
        bucket_mb: float = 25.0,
        shard_inversions: bool = True,
        reduce_gradients: bool | None = None,
    ) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributor needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(backend='gloo' or 'nccl') first."
            )
        if comm_dtype is not None and (not isinstance(comm_dtype, torch.dtype) or not comm_dtype.is_floating_point):
            raise ValueError(f"comm_dtype={comm_dtype!r} must be a floating torch.dtype (e.g. torch.float32) or None.")
        if not (isinstance(bucket_mb, (int, float)) and math.isfinite(bucket_mb) and bucket_mb > 0):
            raise ValueError(f"bucket_mb={bucket_mb!r} must be a positive number of MiB.")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.comm_dtype = comm_dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.shard_inversions = bool(shard_inversions)
        self._reduce_gradients_option = reduce_gradients
        self.averages_gradients = True if reduce_gradients is None else bool(reduce_gradients)
        self.device = torch.device("cpu")

    def attach(self, model: nn.Module, blocks: Mapping[str, CurvatureBlock]) -> None:
        super().attach(model, blocks)
        if self._reduce_gradients_option is None:
            self.averages_gradients = not _is_ddp(model)
        param = next(iter(model.parameters()), None)
        if param is not None:
            self.device = param.device
        if dist.get_backend(self.group) == "nccl" and self.device.type != "cuda":
            raise RuntimeError(
                f"the NCCL backend needs the model on a CUDA device (it is on {self.device}); move it with "
                "model.to(f'cuda:{local_rank}') or use backend='gloo'."
            )
        if not self.shard_inversions:
            self.shared_refreshes = set()

    def describe(self) -> str:
        return (
            f"TorchDistributor(rank {self.rank} of {self.world_size}, backend {dist.get_backend(self.group)}, "
            f"shard_inversions={self.shard_inversions}, comm_dtype={self.comm_dtype}, "
            f"gradients averaged {'here' if self.averages_gradients else 'by DDP'})"
        )

    # --- collectives with accounting ---------------------------------------------------------

    def _all_reduce(self, t: Tensor, kind: str, op: Any = None) -> None:
        self.bytes_communicated[kind] += t.numel() * t.element_size()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)

    def _all_gather(self, t: Tensor, kind: str) -> list[Tensor]:
        self.bytes_communicated[kind] += t.numel() * t.element_size()
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return out

    def _buckets(self, flats: list[Tensor]) -> Iterable[list[int]]:
        """Indices of ``flats`` grouped into buckets of at most ``bucket_bytes`` (one tensor
        larger than that is a bucket of its own)."""
        bucket: list[int] = []
        size = 0
        for i, t in enumerate(flats):
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(i)
            size += nbytes
        if bucket:
            yield bucket

    def _sum_flats(self, flats: list[Tensor], kind: str, comm_dtype: torch.dtype | None) -> list[Tensor]:
        """All-reduce (sum) a list of 1-D tensors in buckets of one dtype each; the sums in
        the order of ``flats``."""
        out: list[Tensor] = list(flats)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, f in enumerate(flats):
            by_dtype.setdefault(f.dtype, []).append(i)
        for same in by_dtype.values():
            for bucket in self._buckets([flats[i] for i in same]):
                idx = [same[j] for j in bucket]
                buf = torch.cat([flats[i] for i in idx]) if len(idx) > 1 else flats[idx[0]].clone()
                dtype = buf.dtype
                if comm_dtype is not None and comm_dtype != dtype:
                    buf = buf.to(comm_dtype)
                self._all_reduce(buf, kind)
                buf = buf.to(dtype)
                offset = 0
                for i in idx:
                    n = flats[i].numel()
                    out[i] = buf[offset : offset + n]
                    offset += n
        return out

    # --- the four calls ----------------------------------------------------------------------

    def reduce_gradients(self, params: Iterable[Tensor]) -> None:
        if not self.averages_gradients:
            return
        grads = [p.grad for p in params if p.grad is not None]
        for g, total in zip(grads, self._sum_flats([g.reshape(-1) for g in grads], "gradients", None)):
            g.copy_(total.view_as(g)).div_(self.world_size)

    def all_ok(self, ok: bool) -> bool:
        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        self._all_reduce(flag, "control", dist.ReduceOp.MAX)
        return bool(flag.item() == 0.0)

    def share_statistics(
        self, stats: Mapping[str, LayerStats], blocks: Mapping[str, CurvatureBlock]
    ) -> dict[str, LayerStats]:
        names = list(blocks)
        local: dict[str, dict[str, Tensor] | None] = {n: blocks[n].batch_statistics(s) for n, s in stats.items()}
        # a block used several times in the forward pass travels as its combined features
        stats = {n: s if local[n] is not None or len(s.parts) == 1 else s.featurized() for n, s in stats.items()}
        # what every rank has: present, N, g_scale, reduced (1) or gathered (0), per-example
        # numels of the input and of one output gradient, number of gradient passes
        meta = torch.zeros(len(names), 7, dtype=torch.float64, device=self.device)
        for i, n in enumerate(names):
            s = stats.get(n)
            if s is None:
                continue
            reduced = local[n] is not None
            per_in = s.inputs[0].numel() if not reduced and s.num_data else 0
            per_g = s.grads[0][0].numel() if not reduced and s.num_data else 0
            meta[i] = torch.tensor(
                [1.0, s.num_data, s.g_scale, 1.0 if reduced else 0.0, per_in, per_g, 0 if reduced else len(s.grads)],
                dtype=torch.float64,
                device=meta.device,
            )
        metas = self._all_gather(meta, "control")
        all_meta = torch.stack(metas).cpu()  # (world, L, 7)
        out: dict[str, LayerStats] = {}
        reduce_names: list[str] = []
        gather_names: list[str] = []
        for i, n in enumerate(names):
            present = all_meta[:, i, 0]
            if not bool(present.any()):
                continue
            if not bool(present.all()):
                ranks = [r for r in range(self.world_size) if present[r] > 0]
                raise RuntimeError(
                    f"layer {n!r} has statistics on rank(s) {ranks} but not on the others at step with statistics: "
                    "every rank must run the tracked layers on the same steps (the same model, the same "
                    "forward path)."
                )
            modes = all_meta[:, i, 3]
            if not bool((modes == modes[0]).all()):
                raise RuntimeError(f"layer {n!r}: the ranks disagree on how its statistics are shared.")
            if bool(modes[0] == 1.0):
                reduce_names.append(n)
            else:
                if not bool((all_meta[:, i, 4:] == all_meta[0, i, 4:]).all()):
                    raise RuntimeError(
                        f"layer {n!r}: the ranks' inputs or output gradients differ in shape per example "
                        f"(per-example sizes by rank: {all_meta[:, i, 4:6].tolist()}); pad sequences to one "
                        "length on every rank."
                    )
                gather_names.append(n)
        if reduce_names:
            out.update(self._reduce(reduce_names, names, stats, blocks, local, all_meta))
        if gather_names:
            out.update(self._gather(gather_names, names, stats, all_meta))
        return out

    def _reduce(
        self,
        reduce_names: list[str],
        names: list[str],
        stats: Mapping[str, LayerStats],
        blocks: Mapping[str, CurvatureBlock],
        local: Mapping[str, dict[str, Tensor] | None],
        all_meta: Tensor,
    ) -> dict[str, LayerStats]:
        index = {n: i for i, n in enumerate(names)}
        totals = {n: int(all_meta[:, index[n], 1].sum()) for n in reduce_names}
        entries: list[tuple[str, str, Tensor, bool]] = []  # (layer, key, local tensor, as a triangle)
        flats: list[Tensor] = []
        for n in reduce_names:
            d = local[n]
            assert d is not None
            symmetric = blocks[n].symmetric_statistics
            weight = stats[n].num_data / totals[n] if totals[n] > 0 else 0.0
            for key in sorted(d):
                t = d[key]
                triangle = key in symmetric and t.ndim == 2
                entries.append((n, key, t, triangle))
                flats.append((pack_symmetric(t) if triangle else t.reshape(-1)) * weight)
        summed = self._sum_flats(flats, "statistics", self.comm_dtype)
        shared: dict[str, dict[str, Tensor]] = {n: {} for n in reduce_names}
        for (n, key, t, triangle), v in zip(entries, summed):
            shared[n][key] = unpack_symmetric(v, t.shape[0]) if triangle else v.reshape(t.shape)
        return {
            n: SharedLayerStats(stats[n].layer, shared[n], totals[n], _like(stats[n]), stats[n].approx)
            for n in reduce_names
        }

    def _gather(
        self, gather_names: list[str], names: list[str], stats: Mapping[str, LayerStats], all_meta: Tensor
    ) -> dict[str, LayerStats]:
        index = {n: i for i, n in enumerate(names)}
        out: dict[str, LayerStats] = {}
        # one all_gather per dtype: every rank pads each layer's data to the largest batch
        pieces: dict[torch.dtype, list[tuple[str, int, Tensor]]] = {}
        for n in gather_names:
            s = stats[n]
            n_max = int(all_meta[:, index[n], 1].max())
            for slot, t in enumerate([s.inputs, *s.grads]):
                padded = t
                if t.shape[0] < n_max:
                    padded = torch.cat([t, t.new_zeros(n_max - t.shape[0], *t.shape[1:])])
                pieces.setdefault(t.dtype, []).append((n, slot, padded))
        gathered: dict[tuple[str, int], list[Tensor]] = {}
        for items in pieces.values():
            flat = torch.cat([p.reshape(-1) for _, _, p in items])
            parts = self._all_gather(flat, "statistics")
            offset = 0
            for n, slot, p in items:
                k = p.numel()
                gathered[(n, slot)] = [part[offset : offset + k].view_as(p) for part in parts]
                offset += k
        for n in gather_names:
            s = stats[n]
            i = index[n]
            counts = [int(c) for c in all_meta[:, i, 1]]
            scales = [float(c) for c in all_meta[:, i, 2]]
            total = sum(counts)
            inputs = torch.cat([x[:c] for x, c in zip(gathered[(n, 0)], counts)])
            grads = []
            for slot in range(1, len(s.grads) + 1):
                # rank r's statistics are the average over its data, g_scale_r Σ g gᵀ; the whole
                # batch's are their mean weighted by N_r: scale rank r's gradients by
                # √(N_r g_scale_r / N) and use g_scale 1
                grads.append(
                    torch.cat(
                        [
                            g[:c] * math.sqrt(c * sc / total)
                            for g, c, sc in zip(gathered[(n, slot)], counts, scales)
                            if c > 0
                        ]
                    )
                )
            part = s.parts[0]
            out[n] = LayerStats(
                s.layer, approx=s.approx, g_scale=1.0, parts=[Part(part.handler, part.module, inputs, grads)]
            )
        return out

    def refresh(self, due: list[str], blocks: Mapping[str, CurvatureBlock], run: Callable[[str], None]) -> None:
        shared = [n for n in due if n in self.shared_refreshes]
        for n in due:
            if n not in self.shared_refreshes or self.plan[n] == self.rank:
                run(n)
        if not shared:
            return
        mine = {n: blocks[n].refresh_state() for n in shared if self.plan[n] == self.rank}
        tensors: list[Tensor] = []
        skeleton = {n: _skeleton(state, tensors) for n, state in mine.items()}
        skeletons: list[Any] = [None] * self.world_size
        dist.all_gather_object(skeletons, skeleton, group=self.group)
        self.bytes_communicated["control"] += len(repr(skeleton))
        for r in range(self.world_size):
            their = skeletons[r]
            specs = _tensor_specs(their)
            by_dtype: dict[torch.dtype, list[int]] = {}
            for i, (_, dtype) in enumerate(specs):
                by_dtype.setdefault(dtype, []).append(i)
            received: list[Tensor | None] = [None] * len(specs)
            for dtype, idx in by_dtype.items():
                if r == self.rank:
                    buf = torch.cat([tensors[i].reshape(-1).to(self.device) for i in idx])
                    self.bytes_communicated["refresh"] += buf.numel() * buf.element_size()
                else:
                    buf = torch.empty(sum(math.prod(specs[i][0]) for i in idx), dtype=dtype, device=self.device)
                src = dist.get_global_rank(self.group, r) if self.group is not None else r
                dist.broadcast(buf, src=src, group=self.group)
                offset = 0
                for i in idx:
                    k = math.prod(specs[i][0])
                    received[i] = buf[offset : offset + k].view(specs[i][0]).clone()
                    offset += k
            for n, skel in their.items():
                state = _fill(skel, received)
                if state is None:  # the owner's block could not share it this time: compute here
                    if r != self.rank:
                        run(n)
                else:
                    # the owner installs the received copies too: the same memory layout on
                    # every rank, so the products that follow agree to the last bit
                    blocks[n].load_refresh_state(state)


_TENSOR = "__curvkit_tensor__"


def _skeleton(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with every tensor replaced by ``(marker, index, shape, dtype)`` (the tensor
    appended to ``tensors``)."""
    if isinstance(value, Tensor):
        tensors.append(value.detach())
        return (_TENSOR, len(tensors) - 1, tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {k: _skeleton(v, tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_skeleton(v, tensors) for v in value)
    return value


def _tensor_specs(skeleton: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    specs: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}

    def walk(v: Any) -> None:
        if isinstance(v, tuple) and len(v) == 4 and v[0] == _TENSOR:
            specs[v[1]] = (v[2], v[3])
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(skeleton)
    return [specs[i] for i in range(len(specs))]


def _fill(skeleton: Any, tensors: list[Tensor | None]) -> Any:
    if isinstance(skeleton, tuple) and len(skeleton) == 4 and skeleton[0] == _TENSOR:
        return tensors[skeleton[1]]
    if isinstance(skeleton, dict):
        return {k: _fill(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_fill(v, tensors) for v in skeleton)
    return skeleton


def _like(stats: LayerStats) -> Tensor:
    """A tensor with the statistics' dtype and device (an Embedding's input is integer)."""
    return torch.empty(0, dtype=stats.dtype, device=stats.device)
