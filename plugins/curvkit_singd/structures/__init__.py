r"""Structured factors for SINGD: matrix groups closed under multiplication.

Every class here is a :class:`curvkit.structures.FactorStructure` (registered, usable by
any method) that also implements the operations SINGD's inverse-free update needs without
forming a dense ``d × d`` matrix:

* :meth:`GroupStructure.product` — ``self @ other`` for two matrices of the structure
  (the structures are groups, so the product stays in the structure);
* :meth:`GroupStructure.gram` — :math:`\hat\Pi(S S^\top)` from a ``(d, n)`` matrix ``S``
  (SINGD's ``Π̂(Kᵀ U K)`` with ``S = Kᵀ X``);
* :meth:`GroupStructure.inner` — :math:`\hat\Pi(K^\top K)`;
* in-place linear algebra on the parameters (``add_``, ``scale_``, ``add_identity_``).

The projection :math:`\hat\Pi` is SINGD's (Lin et al., 2024, and the ``singd`` package's
``from_dense``): entries of the structure's *symmetric* part are kept, and every entry of a
*triangular* (non-symmetric) part collects both mirror entries, ``M_ij + M_ji`` (which is
SINGD's "2×" for a symmetric ``M``). Written this way the projection is also idempotent on
the structure's own (non-symmetric) matrices.

The structures live in modules by kind: :mod:`~curvkit_singd.structures.base`
(:class:`GroupStructure` and SINGD's operations on any structure),
:mod:`~curvkit_singd.structures.triangular`, :mod:`~curvkit_singd.structures.blocked` and
:mod:`~curvkit_singd.structures.toeplitz`.
"""

from __future__ import annotations

import re
from typing import Any

from curvkit.structures.base import FactorStructure
from curvkit_singd.structures.base import (
    GroupStructure,
    s_add_,
    s_add_identity_,
    s_added,
    s_all_finite,
    s_average_trace,
    s_clone,
    s_gram,
    s_inner,
    s_max_abs,
    s_product,
    s_scale_,
    s_spectral_estimate,
)
from curvkit_singd.structures.blocked import (
    BlockDiagonalStructure,
    HierarchicalSquare,
    HierarchicalStructure,
    block_diagonal,
    hierarchical,
)
from curvkit_singd.structures.toeplitz import TrilToeplitzStructure, TriuToeplitzStructure
from curvkit_singd.structures.triangular import (
    TrilBottomRightDiagStructure,
    TrilStructure,
    TrilTopLeftDiagStructure,
    TriuBottomRightDiagStructure,
    TriuStructure,
    TriuTopLeftDiagStructure,
)

__all__ = [
    "BlockDiagonalStructure",
    "GroupStructure",
    "HierarchicalSquare",
    "HierarchicalStructure",
    "TrilBottomRightDiagStructure",
    "TrilStructure",
    "TrilToeplitzStructure",
    "TrilTopLeftDiagStructure",
    "TriuBottomRightDiagStructure",
    "TriuStructure",
    "TriuToeplitzStructure",
    "TriuTopLeftDiagStructure",
    "block_diagonal",
    "bundled_structures",
    "hierarchical",
    "resolve_structure",
    "s_add_",
    "s_add_identity_",
    "s_added",
    "s_all_finite",
    "s_average_trace",
    "s_clone",
    "s_gram",
    "s_inner",
    "s_max_abs",
    "s_spectral_estimate",
    "s_product",
    "s_scale_",
]


def bundled_structures() -> list[type[FactorStructure]]:
    """The structures this plugin registers (dense and diagonal are curvkit's own)."""
    return [
        BlockDiagonalStructure,
        HierarchicalStructure,
        TrilStructure,
        TriuStructure,
        TrilToeplitzStructure,
        TriuToeplitzStructure,
        TrilTopLeftDiagStructure,
        TrilBottomRightDiagStructure,
        TriuTopLeftDiagStructure,
        TriuBottomRightDiagStructure,
    ]


_BLOCK = re.compile(r"^block(\d+)diagonal$")
_HIER = re.compile(r"^hierarchical(\d+)_(\d+)$")


def resolve_structure(name: str, registry: Any) -> type[FactorStructure]:
    """A registered structure by name; ``block{k}diagonal`` and ``hierarchical{k1}_{k2}``
    also build their parameterised classes for any sizes."""
    if name in registry.structures:
        return registry.structures.get(name)  # type: ignore[no-any-return]
    m = _BLOCK.match(name)
    if m:
        return block_diagonal(int(m.group(1)))
    m = _HIER.match(name)
    if m:
        return hierarchical(int(m.group(1)), int(m.group(2)))
    return registry.structures.get(name)  # type: ignore[no-any-return]  # raises, listing the names
