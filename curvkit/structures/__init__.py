"""Factor structures (how a Kronecker factor is stored); see :mod:`curvkit.structures.base`."""

from curvkit.structures.base import DenseStructure, DiagonalStructure, FactorStructure, StructureFallbackWarning

__all__ = ["DenseStructure", "DiagonalStructure", "FactorStructure", "StructureFallbackWarning"]
