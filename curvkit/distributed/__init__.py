"""Data-parallel training: statistics and refreshes shared between processes.

A :class:`~curvkit.optim.Preconditioner` (and every curvature optimizer) takes
``distributor=``: by default a :class:`TorchDistributor` when a ``torch.distributed``
process group with more than one process is initialised, else a :class:`LocalDistributor`.
See ``docs/distributed.md`` for a ``torchrun`` example.
"""

from curvkit.distributed.base import (
    Distributor,
    LocalDistributor,
    assign_refreshes,
    resolve_distributor,
    shares_refresh,
)
from curvkit.distributed.torch_dist import TorchDistributor, pack_symmetric, unpack_symmetric

__all__ = [
    "Distributor",
    "LocalDistributor",
    "TorchDistributor",
    "assign_refreshes",
    "pack_symmetric",
    "resolve_distributor",
    "shares_refresh",
    "unpack_symmetric",
]
