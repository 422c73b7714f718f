"""Reverse samplers: loops over a time grid that call a model and optional guidance.

- :func:`predictor_corrector_sample`: DiffCSP's predictor-corrector sampler
  (full or strided grid, zero-variance mode, fixed lattice, guidance hook).
- :class:`Guidance`: the protocol a guidance object implements.
"""
from crystalfit.sampling.predictor_corrector import (
    Guidance,
    ModelFn,
    PCSampleResult,
    make_time_grid,
    predictor_corrector_sample,
)

__all__ = ["Guidance", "ModelFn", "PCSampleResult", "make_time_grid", "predictor_corrector_sample"]
