"""One-call evaluations shaped like the papers' tables.

* :func:`evaluate_csp`: DiffCSP Tables 1-2 (match rate, RMSE).
* :func:`evaluate_generation`: DiffCSP Table 4 / CDVAE Table 3 (validity,
  COV-R/COV-P, d_rho, d_E, d_elem) plus FAD when an embedding model is given.

All rates are fractions in [0, 1]; multiply by 100 for the papers' percent.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError
from ._utils import as_structures
from .coverage import coverage_from_fingerprints, fingerprints, resolve_cutoffs
from .csp import match_rms
from .distribution import (
    frechet_model_distance,
    predict_property,
    wasserstein_density,
    wasserstein_n_elements,
    wasserstein_property,
)
from .validity import composition_validity, structure_validity

__all__ = ["evaluate_csp", "evaluate_generation"]


def evaluate_csp(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    gate: str | None = "diffcsp",
    n_jobs: int | None = None,
    verbose: bool = False,
) -> dict:
    """Match rate and RMSE of a CSP run (DiffCSP ``RecEval`` / ``RecEvalBatch``).

    Parameters
    ----------
    generated : sequence, length n
        ``generated[i]`` is one structure or a list of k candidates for
        ``reference[i]`` (best-of-k); ``None`` = failed.
    reference : sequence of structures, length n
    stol, angle_tol, ltol : float
        StructureMatcher tolerances.
    gate : {"diffcsp", None, "pred", "both", "cdvae"}
        Validity gating (default: DiffCSP's, i.e. pred AND reference valid in
        1-sample mode, pred valid in best-of-k mode); see
        :mod:`crystalfit.metrics.csp`.
    n_jobs : int, optional
        joblib workers.
    verbose : bool
        tqdm progress bars.

    Returns
    -------
    dict
        ``match_rate`` (fraction), ``rmse`` (mean normalised RMS over matched
        pairs, NaN if none), ``n_reference``, ``n_candidates`` (k, the largest
        number of candidates per reference) and ``rms_per_reference``
        (array (n,), NaN = unmatched).
    """
    best = match_rms(generated, reference, stol=stol, angle_tol=angle_tol, ltol=ltol, gate=gate,
                     n_jobs=n_jobs, verbose=verbose)
    matched = np.isfinite(best)
    k = max((len(g) if isinstance(g, (list, tuple)) else 1 for g in generated), default=0)
    return {
        "match_rate": float(matched.mean()) if len(best) else float("nan"),
        "rmse": float(best[matched].mean()) if matched.any() else float("nan"),
        "n_reference": int(len(best)),
        "n_candidates": int(k),
        "rms_per_reference": best,
    }


def evaluate_generation(
    generated: Sequence[Any],
    reference: Sequence[Any],
    property_model: Any = None,
    *,
    dataset: str | None = None,
    struct_cutoff: float | None = None,
    comp_cutoff: float | None = None,
    comp_means: Sequence[float] | None = None,
    comp_stds: Sequence[float] | None = None,
    n_samples: int = 1000,
    embedding_model: Any = None,
    random_state: int | None = 0,
    n_jobs: int | None = None,
    verbose: bool = False,
) -> dict:
    """Ab initio generation metrics (CDVAE / DiffCSP ``GenEval``).

    Protocol
        * Validity over all generated entries (``None`` = invalid).  ``valid``
          is structural AND compositional AND a computable CrystalNN
          fingerprint (CDVAE marks a crystal whose fingerprint raises as
          invalid).
        * COV-R / COV-P over all generated entries (see
          :func:`crystalfit.metrics.coverage`).
        * ``n_samples`` valid crystals are drawn at random without replacement
          (``random_state``) and compared with ALL reference crystals by the
          Wasserstein distance of density, number of elements and, with
          ``property_model``, the predicted property.  The reference code
          raises when fewer than ``n_samples`` are valid; here all valid
          crystals are used with a warning.
        * With ``embedding_model`` (or a ``property_model`` that has
          ``.transform``) the Frechet distance of the embeddings of the same
          valid samples and the reference set (FAD) is added.

    Parameters
    ----------
    generated : sequence of ase.Atoms / pymatgen Structure / None
    reference : sequence of ase.Atoms / pymatgen Structure
    property_model : object with ``.predict(list_of_atoms)``, optional
    dataset : str, optional
        Name for the coverage cut-offs (``"perov_5"``, ``"carbon_24"``, ``"mp_20"``).
    struct_cutoff, comp_cutoff : float, optional
        Explicit coverage cut-offs (override ``dataset``).
    comp_means, comp_stds : sequence of 132 floats, optional
        Composition-fingerprint standardisation (default: reference statistics).
    n_samples : int
        Valid crystals used for the distribution distances (1000).
    embedding_model : object with ``.transform``, optional
    random_state : int or None
    n_jobs : int, optional
        joblib workers.
    verbose : bool
        tqdm progress bars.

    Returns
    -------
    dict
        ``valid_struct``, ``valid_comp``, ``valid`` (fractions), ``cov_r``,
        ``cov_p`` (fractions), ``amsd_recall``, ``amsd_precision``,
        ``amcd_recall``, ``amcd_precision``, ``d_density`` (g/cm^3),
        ``d_n_elements``, ``d_property`` (property unit; NaN without a model),
        ``fad`` (NaN without an embedding model), ``n_generated``,
        ``n_valid``, ``n_eval``.
    """
    struct_cutoff, comp_cutoff = resolve_cutoffs(struct_cutoff, comp_cutoff, dataset)
    gen = as_structures(generated, "generated")
    ref = as_structures(reference, "reference")
    if len(gen) == 0:
        raise CrystalfitError("generated is empty; pass the generated structures (None for failures)")
    n_ref_none = sum(s is None for s in ref)
    if n_ref_none:
        raise CrystalfitError(
            f"reference has {n_ref_none} entries that are None or not valid structures (first at index "
            f"{next(i for i, s in enumerate(ref) if s is None)}); the reference set must hold real crystals"
        )
    v_struct = structure_validity(gen, n_jobs=n_jobs, verbose=verbose)
    v_comp = composition_validity(gen, n_jobs=n_jobs, verbose=verbose)
    gs, gc = fingerprints(gen, n_jobs=n_jobs, verbose=verbose)
    rs, rc = fingerprints(ref, n_jobs=n_jobs, verbose=verbose)
    fp_ok = np.all(np.isfinite(gs), axis=1)
    valid = v_struct & v_comp & fp_ok
    cov = coverage_from_fingerprints(gs, gc, rs, rc, struct_cutoff=struct_cutoff, comp_cutoff=comp_cutoff,
                                     num_generated=len(gen), comp_means=comp_means, comp_stds=comp_stds)
    valid_idx = np.flatnonzero(valid)
    if len(valid_idx) < n_samples:
        if len(valid_idx):
            warnings.warn(
                f"only {len(valid_idx)} valid generated crystals, fewer than n_samples={n_samples}; the "
                "distribution distances use all of them (the reference code would raise)", RuntimeWarning,
                stacklevel=2,
            )
        chosen = valid_idx
    else:
        rng = np.random.default_rng(random_state)
        chosen = np.sort(rng.choice(valid_idx, n_samples, replace=False))
    samples = [gen[i] for i in chosen]
    nan = float("nan")
    out = {
        "valid_struct": float(v_struct.mean()),
        "valid_comp": float(v_comp.mean()),
        "valid": float(valid.mean()),
        "cov_r": cov.recall,
        "cov_p": cov.precision,
        "amsd_recall": cov.amsd_recall,
        "amsd_precision": cov.amsd_precision,
        "amcd_recall": cov.amcd_recall,
        "amcd_precision": cov.amcd_precision,
        "d_density": wasserstein_density(samples, ref) if samples else nan,
        "d_n_elements": wasserstein_n_elements(samples, ref) if samples else nan,
        "d_property": nan,
        "fad": nan,
        "n_generated": int(len(gen)),
        "n_valid": int(valid.sum()),
        "n_eval": int(len(samples)),
    }
    if property_model is not None and samples:
        out["d_property"] = wasserstein_property(predict_property(property_model, samples),
                                                 predict_property(property_model, ref))
    if embedding_model is None and property_model is not None and hasattr(property_model, "transform"):
        embedding_model = property_model
    if embedding_model is not None and len(samples) >= 2:
        out["fad"] = frechet_model_distance(samples, ref, embedding_model)
    return out
