"""XRD guidance: periodic Tweedie moments, conditional score, score-ratio scaling.

- :func:`periodic_tweedie_moments`: wrapped-normal posterior ``WN(m, c)`` of each
  fractional coordinate from the score (paper Eqs. 32-38, solved exactly).
- :class:`XRDGuidance`: the sampler's guidance object (Eqs. 39-46).
"""
from .tweedie import periodic_tweedie_moments, tweedie_lhs, wrapped_normal_log_derivatives
from .xrd_guidance import XRDGuidance, rescale_to_score_ratio

__all__ = [
    "XRDGuidance",
    "periodic_tweedie_moments",
    "rescale_to_score_ratio",
    "tweedie_lhs",
    "wrapped_normal_log_derivatives",
]
