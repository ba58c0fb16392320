r"""The distribution interface: what a preconditioner asks of the processes it runs on.

A :class:`Distributor` stands between the maths (blocks, which know nothing about
processes) and the communication. The preconditioner calls it at four points of a step:

1. :meth:`~Distributor.reduce_gradients` — average the gradients over processes when
   nothing else does (a plain model in a process group; a
   :class:`~torch.nn.parallel.DistributedDataParallel` model has done it in its backward);
2. :meth:`~Distributor.all_ok` — agree whether every process's gradients are finite, so
   all of them skip the same steps;
3. :meth:`~Distributor.share_statistics` — turn each process's batch statistics into the
   statistics of the whole batch (every block sees the same update on every process);
4. :meth:`~Distributor.refresh` — run the due refreshes (inversions, eigendecompositions,
   randomized SVDs), each on one process where the block can share its result, and install
   the results everywhere.

:class:`LocalDistributor` is the one-process case (every call is the identity).
:class:`curvkit.distributed.TorchDistributor` implements them with ``torch.distributed``
(gloo, NCCL); a later FSDP distributor implements the same five methods without touching
any method's block.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from curvkit.blocks import CurvatureBlock, LayerStats

__all__ = ["Distributor", "LocalDistributor", "assign_refreshes", "shares_refresh"]


def _defining_class(cls: type, attr: str) -> type:
    return next(c for c in cls.__mro__ if attr in vars(c))


def shares_refresh(block: CurvatureBlock) -> bool:
    """Whether ``block``'s refresh can be computed on one process and installed on the
    others: its class implements :meth:`~curvkit.blocks.CurvatureBlock.refresh_state`, in
    the class that defines its :meth:`~curvkit.blocks.CurvatureBlock.refresh` or a
    subclass of it (a subclass that overrides ``refresh`` but inherits ``refresh_state``
    may produce state the inherited one does not know, so it is refreshed on every rank)."""
    cls = type(block)
    owner = _defining_class(cls, "refresh_state")
    if owner is CurvatureBlock:
        return False
    return issubclass(owner, _defining_class(cls, "refresh"))


def assign_refreshes(costs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """A cost-balanced plan: ``{block name: rank}`` so every rank's total refresh cost is
    about equal.

    Greedy longest-processing-time first: blocks in decreasing cost (ties by name) each go
    to the rank with the least cost so far (ties to the lower rank). Deterministic, so
    every process computes the same plan. Its makespan is at most 4/3 of the optimum.

    Args:
        costs: ``{block name: relative refresh cost}``.
        world_size: Number of ranks (≥ 1).
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be at least 1.")
    load = [0.0] * world_size
    plan: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-float(costs[n]), n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        plan[name] = rank
        load[rank] += float(costs[name])
    return {name: plan[name] for name in costs}


class Distributor(ABC):
    """How a preconditioner's statistics and refreshes are shared between processes.

    Attributes:
        rank: This process's rank.
        world_size: Number of processes.
        plan: ``{layer name: rank}``, the rank that computes each block's refresh (every
            block is listed; a block whose refresh is not shared is refreshed by every rank,
            see :attr:`shared_refreshes`).
        bytes_communicated: Payload bytes this process has sent or contributed, by kind
            (``"gradients"``, ``"statistics"``, ``"refresh"``, ``"control"``).
    """

    rank: int = 0
    world_size: int = 1

    def __init__(self) -> None:
        self.plan: dict[str, int] = {}
        self.shared_refreshes: set[str] = set()
        self.bytes_communicated: dict[str, int] = {"gradients": 0, "statistics": 0, "refresh": 0, "control": 0}

    def attach(self, model: nn.Module, blocks: Mapping[str, CurvatureBlock]) -> None:
        """Called once by the preconditioner with its model and blocks (builds the plan)."""
        del model
        self.shared_refreshes = {name for name, block in blocks.items() if shares_refresh(block)}
        self.plan = assign_refreshes({name: block.refresh_cost() for name, block in blocks.items()}, self.world_size)

    @abstractmethod
    def reduce_gradients(self, params: Iterable[Tensor]) -> None:
        """Average ``.grad`` of ``params`` over processes in place (a no-op where they are
        averaged already)."""

    @abstractmethod
    def all_ok(self, ok: bool) -> bool:
        """``True`` if ``ok`` is true on every process."""

    @abstractmethod
    def share_statistics(
        self, stats: Mapping[str, LayerStats], blocks: Mapping[str, CurvatureBlock]
    ) -> dict[str, LayerStats]:
        """Each present layer's statistics of the whole batch (all processes' data)."""

    @abstractmethod
    def refresh(self, due: list[str], blocks: Mapping[str, CurvatureBlock], run: Callable[[str], None]) -> None:
        """Refresh the blocks named in ``due``: ``run(name)`` where this process computes it,
        then install the results computed elsewhere."""

    def describe(self) -> str:
        return f"{type(self).__name__}(rank {self.rank} of {self.world_size})"


class LocalDistributor(Distributor):
    """One process: every operation is the identity, and every refresh runs here."""

    def reduce_gradients(self, params: Iterable[Tensor]) -> None:
        del params

    def all_ok(self, ok: bool) -> bool:
        return bool(ok)

    def share_statistics(
        self, stats: Mapping[str, LayerStats], blocks: Mapping[str, CurvatureBlock]
    ) -> dict[str, LayerStats]:
        del blocks
        return dict(stats)

    def refresh(self, due: list[str], blocks: Mapping[str, CurvatureBlock], run: Callable[[str], None]) -> None:
        del blocks
        for name in due:
            run(name)


def resolve_distributor(distributor: Any) -> Distributor:
    """``None``: a :class:`~curvkit.distributed.TorchDistributor` when a
    ``torch.distributed`` process group with more than one process is initialised,
    otherwise local; ``False``: local; ``True``: torch (the group must exist); or a
    :class:`Distributor`."""
    if isinstance(distributor, Distributor):
        return distributor
    if distributor is False:
        return LocalDistributor()
    if distributor is None or distributor is True:
        import torch.distributed as dist

        active = dist.is_available() and dist.is_initialized()
        if distributor is True and not active:
            raise RuntimeError(
                "distributor=True needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group(...) first (torchrun sets up the environment for it)."
            )
        if active and dist.get_world_size() > 1:
            from curvkit.distributed.torch_dist import TorchDistributor

            return TorchDistributor()
        return LocalDistributor()
    raise TypeError(
        f"distributor={distributor!r} must be None (automatic), True, False or a curvkit.distributed.Distributor."
    )
