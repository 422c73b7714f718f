"""The one internal currency: :class:`CrystalBatch`."""
from .batch import CrystalBatch

__all__ = ["CrystalBatch"]
