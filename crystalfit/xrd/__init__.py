"""Differentiable X-ray diffraction: form factors, structure factors, intensities.

Conventions: Miller indices are ordered as :func:`miller_indices` (h slowest);
``s = |G|/2`` with reciprocal vectors without 2 pi (no wavelength needed for
single-crystal intensities); intensities are on the absolute ``|F|^2`` scale.
"""
from .exchange import exchange_site_positions, exchange_sites
from .form_factors import form_factor_table, form_factors
from .intensities import (
    miller_indices,
    single_crystal_intensities,
    structure_factor_intensities,
    structure_factors,
)

__all__ = [
    "exchange_site_positions",
    "exchange_sites",
    "form_factor_table",
    "form_factors",
    "miller_indices",
    "single_crystal_intensities",
    "structure_factor_intensities",
    "structure_factors",
]
