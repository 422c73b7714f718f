"""crystalfit: crystal-structure generative models as scikit-learn estimators.

Estimators are imported lazily, so ``import crystalfit`` stays cheap::

    from crystalfit import XRDGuidedDiffusion
"""
__version__ = "0.1.0"

_LAZY = {
    "XRDGuidedDiffusion": "crystalfit.estimators.xrd_diffusion",
    "PropertyRegressor": "crystalfit.estimators.property_regressor",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'crystalfit' has no attribute {name!r}")
