"""Benchmark data sets (CDVAE csv format) and the synthetic sets of the papers.

* :func:`load_dataset` -- Perov-5, Carbon-24, MP-20, MPTS-52 splits as
  ``ase.Atoms`` plus property arrays (files from ``data_home``,
  ``$CRYSTALFIT_DATA``, the user cache, or downloaded).
* :func:`make_perovskite_arrangements`, :func:`make_cu3au_supercells` -- the
  toy crystals of the XRD-guided diffusion paper (Crystal-1/2/3, Cu3Au).
"""
from .cdvae import DATASETS, SPLITS, DatasetNotFoundError, dataset_url, get_cache_dir, load_dataset
from .synthetic import (
    CU3AU_A,
    CU3AU_SITES,
    PEROVSKITE_A,
    PEROVSKITE_ARRANGEMENTS,
    PEROVSKITE_SITES,
    cu3au_placements,
    make_cu3au,
    make_cu3au_supercells,
    make_perovskite,
    make_perovskite_arrangements,
)

__all__ = [
    "CU3AU_A",
    "CU3AU_SITES",
    "DATASETS",
    "DatasetNotFoundError",
    "PEROVSKITE_A",
    "PEROVSKITE_ARRANGEMENTS",
    "PEROVSKITE_SITES",
    "SPLITS",
    "cu3au_placements",
    "dataset_url",
    "get_cache_dir",
    "load_dataset",
    "make_cu3au",
    "make_cu3au_supercells",
    "make_perovskite",
    "make_perovskite_arrangements",
]
