"""Evaluation metrics of crystal generative models (CDVAE / DiffCSP protocol).

Every function takes lists of ``ase.Atoms`` or pymatgen ``Structure``
(``None`` = a failed generation, counted as invalid / unmatched) and returns
floats, numpy arrays or dicts.  Long computations run through
``joblib.Parallel(n_jobs=...)`` without a fixed backend, so
``with joblib.parallel_backend("loky" | "threading" | "dask"):`` applies, and
show a tqdm progress bar with ``verbose=True``.

==============================  ===============================================
CSP                             :func:`match_rate`, :func:`rms_distance`,
                                :func:`match_rms`, :func:`evaluate_csp`
validity                        :func:`structure_validity`,
                                :func:`composition_validity`, :func:`validity`
coverage                        :func:`coverage` (COV-R / COV-P),
                                :func:`fingerprints`
distribution distances          :func:`wasserstein_density`,
                                :func:`wasserstein_n_elements`,
                                :func:`wasserstein_property`,
                                :func:`frechet_distance` (FAD)
generation table                :func:`evaluate_generation`
property optimisation           :func:`success_rate`, :func:`hit_ratio`
ground state                    :func:`ground_state_metrics` (DP-CDVAE Table III)
diffraction agreement           :func:`r_factor`, :func:`best_candidates`, :func:`powder_similarity`
model selection                 :func:`get_scorer`
==============================  ===============================================
"""
from .coverage import (
    COV_CUTOFFS,
    CoverageResult,
    clear_fingerprint_cache,
    composition_fingerprints,
    coverage,
    coverage_from_fingerprints,
    fingerprint_cache_size,
    fingerprints,
    structure_fingerprints,
    structure_hash,
)
from .csp import match_rate, match_rms, rms_distance
from .distribution import (
    densities,
    frechet_distance,
    frechet_distance_gaussian,
    frechet_model_distance,
    n_elements,
    predict_property,
    wasserstein_density,
    wasserstein_n_elements,
    wasserstein_property,
)
from .evaluate import evaluate_csp, evaluate_generation
from .ground_state import ground_state_metrics
from .optimization import SR_THRESHOLDS, hit_ratio, optimization_success_rate, success_rate, success_thresholds
from .scorers import CrystalScorer, get_scorer, get_scorer_names
from .validity import composition_validity, smact_validity, structure_validity, validity
from .xrd_agreement import best_candidates, broaden_peaks, pattern_similarity, powder_pattern, powder_similarity, r_factor

__all__ = [
    "COV_CUTOFFS",
    "CoverageResult",
    "CrystalScorer",
    "SR_THRESHOLDS",
    "best_candidates",
    "broaden_peaks",
    "clear_fingerprint_cache",
    "composition_fingerprints",
    "composition_validity",
    "coverage",
    "coverage_from_fingerprints",
    "densities",
    "evaluate_csp",
    "evaluate_generation",
    "fingerprint_cache_size",
    "fingerprints",
    "frechet_distance",
    "frechet_distance_gaussian",
    "frechet_model_distance",
    "get_scorer",
    "ground_state_metrics",
    "get_scorer_names",
    "hit_ratio",
    "match_rate",
    "match_rms",
    "n_elements",
    "optimization_success_rate",
    "pattern_similarity",
    "powder_pattern",
    "powder_similarity",
    "predict_property",
    "r_factor",
    "rms_distance",
    "smact_validity",
    "structure_fingerprints",
    "structure_hash",
    "structure_validity",
    "success_rate",
    "success_thresholds",
    "validity",
    "wasserstein_density",
    "wasserstein_n_elements",
    "wasserstein_property",
]
