"""scikit-learn estimators of crystalfit and their shared base."""
from .base import CrystalEstimator, resolve_device

__all__ = ["CrystalEstimator", "resolve_device"]
