"""Kronecker statistics: the capture engine, layer handlers (Kronecker and unit-wise), Fisher sources, backends."""

from curvkit.stats.api import accumulate_kronecker_factors, factor_request, kronecker_factors
from curvkit.stats.backend import (
    BackendCapabilities,
    FactorRequest,
    KroneckerFactors,
    StatisticsBackend,
    UnitwiseFactors,
)
from curvkit.stats.embedding import EmbeddingHandler
from curvkit.stats.engine import CaptureEngine
from curvkit.stats.handlers import ConvHandler, LayerHandler, LinearHandler
from curvkit.stats.layer_stats import LayerStats
from curvkit.stats.model_io import call_model, model_logits
from curvkit.stats.norms import (
    BatchNormHandler,
    GroupNormHandler,
    LayerNormHandler,
    RMSNormHandler,
    ScaleShiftHandler,
)
from curvkit.stats.plan import LayerPlan, ParamRef, Site, TrackingPlan, make_plan

__all__ = [
    "BackendCapabilities",
    "BatchNormHandler",
    "GroupNormHandler",
    "LayerNormHandler",
    "RMSNormHandler",
    "ScaleShiftHandler",
    "UnitwiseFactors",
    "CaptureEngine",
    "ConvHandler",
    "EmbeddingHandler",
    "FactorRequest",
    "KroneckerFactors",
    "LayerHandler",
    "LayerPlan",
    "LayerStats",
    "LinearHandler",
    "ParamRef",
    "Site",
    "StatisticsBackend",
    "TrackingPlan",
    "accumulate_kronecker_factors",
    "call_model",
    "factor_request",
    "kronecker_factors",
    "make_plan",
    "model_logits",
]
