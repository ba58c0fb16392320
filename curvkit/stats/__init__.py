"""Kronecker statistics: capture, layer handlers, Fisher sources, backends."""

from curvkit.stats.api import accumulate_kronecker_factors, factor_request, kronecker_factors
from curvkit.stats.backend import BackendCapabilities, FactorRequest, KroneckerFactors, StatisticsBackend
from curvkit.stats.capture import capture
from curvkit.stats.handlers import ConvHandler, LayerHandler, LinearHandler
from curvkit.stats.plan import LayerPlan, TrackingPlan, make_plan

__all__ = [
    "BackendCapabilities",
    "ConvHandler",
    "FactorRequest",
    "KroneckerFactors",
    "LayerHandler",
    "LayerPlan",
    "LinearHandler",
    "StatisticsBackend",
    "TrackingPlan",
    "accumulate_kronecker_factors",
    "capture",
    "factor_request",
    "kronecker_factors",
    "make_plan",
]
