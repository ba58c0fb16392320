"""The core's own components, registered like any plugin under the name ``curvkit``.

The core registers what every method can build on: the ``hooks`` statistics backend, the
layer handlers for ``Linear``, ``Conv1d/2d/3d``, ``Embedding`` and ``MultiheadAttention``
(Kronecker blocks) and for ``LayerNorm``, ``RMSNorm``, ``BatchNorm1d/2d/3d`` and
``GroupNorm`` (unit-wise blocks), the ``dense`` and ``diagonal`` factor structures, the
``cholesky``, ``eigh`` and ``identity`` inverters and the inverse kinds they return, and the
damping strategies. Methods come
from plugins in the ``curvkit`` entry-point group.
"""

from __future__ import annotations

from curvkit.hookspecs import hookimpl
from curvkit.linalg.damping import ConstantDamping, ExactDamping, LevenbergMarquardtDamping, PiDamping, RelativeDamping
from curvkit.linalg.inverters import (
    CholeskyInverter,
    EigenInverse,
    EigenInverter,
    FactoredInverse,
    IdentityInverse,
    IdentityInverter,
)
from curvkit.registry import (
    BackendRegister,
    DampingRegister,
    InverseRegister,
    InverterRegister,
    LayerHandlerRegister,
    StructureRegister,
)
from curvkit.stats.attention import MultiheadAttentionHandler
from curvkit.stats.embedding import EmbeddingHandler
from curvkit.stats.handlers import ConvHandler, LinearHandler
from curvkit.stats.hooks_backend import HooksBackend
from curvkit.stats.norms import BatchNormHandler, GroupNormHandler, LayerNormHandler, RMSNormHandler
from curvkit.structures.base import DenseStructure, DiagonalStructure


@hookimpl
def curvkit_register_layer_handlers(register: LayerHandlerRegister) -> None:
    register.add(LinearHandler())
    register.add(ConvHandler())
    register.add(EmbeddingHandler())
    register.add(MultiheadAttentionHandler())
    for handler in (LayerNormHandler(), RMSNormHandler(), BatchNormHandler(), GroupNormHandler()):
        register.add(handler)


@hookimpl
def curvkit_register_statistics_backends(register: BackendRegister) -> None:
    register.add(HooksBackend())


@hookimpl
def curvkit_register_structures(register: StructureRegister) -> None:
    register.add(DenseStructure)
    register.add(DiagonalStructure)


@hookimpl
def curvkit_register_inverters(register: InverterRegister) -> None:
    register.add(CholeskyInverter())
    register.add(EigenInverter())
    register.add(IdentityInverter())


@hookimpl
def curvkit_register_inverses(register: InverseRegister) -> None:
    for cls in (FactoredInverse, EigenInverse, IdentityInverse):
        register.add(cls)


@hookimpl
def curvkit_register_dampings(register: DampingRegister) -> None:
    for cls in (ConstantDamping, PiDamping, ExactDamping, RelativeDamping, LevenbergMarquardtDamping):
        register.add(cls)
