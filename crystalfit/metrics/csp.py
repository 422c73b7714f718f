"""Crystal structure prediction (CSP) metrics: match rate and RMS distance.

``generated[i]`` is compared with ``reference[i]`` through pymatgen's
``StructureMatcher(stol, angle_tol, ltol)`` (defaults 0.5, 10, 0.3: the same
for every dataset in DiffCSP and CDVAE).  The RMS distance is the first value
of ``StructureMatcher.get_rms_dist``: the root-mean-square displacement of the
matched sites normalised by ``(V / N) ** (1 / 3)`` (dimensionless).  A pair is
matched when that RMS is below ``stol`` (DiffCSP's and CDVAE's criterion); note that
``StructureMatcher.fit`` tests the largest displacement instead and is stricter at
the same ``stol`` (one O of cubic SrTiO3 moved by 1.6 A: normalised RMS 0.31, largest
displacement 0.55 after the best translation; it matches at stol 0.5 here and fails
``fit``, tests/test_metrics_csp.py).

Modes
    * 1-sample: ``generated[i]`` is one structure (or ``None``).
    * best-of-k: ``generated[i]`` is a list of k candidates; the pair counts as
      matched if any candidate matches and its RMS is the smallest over the
      matching candidates (DiffCSP ``RecEvalBatch``).

Validity gating (``gate``)
    ``valid`` means SMACT composition validity AND structural validity
    (:mod:`crystalfit.metrics.validity`).

    * ``None`` (default): no gating, a purely geometric match.
    * ``"pred"``: only valid candidates can match (CDVAE ``RecEval``; also
      DiffCSP's best-of-k ``RecEvalBatch``).
    * ``"both"``: the candidate AND the reference must be valid (DiffCSP's
      1-sample ``RecEval``; a reference composition that fails SMACT can never
      be matched).
    * ``"diffcsp"``: ``"both"`` in 1-sample mode, ``"pred"`` in best-of-k mode,
      i.e. what DiffCSP's ``compute_metrics.py`` does.
    * ``"cdvae"``: same as ``"pred"``.

Match rate = #matched / #reference (unmatched, failed (``None``) and gated
pairs count in the denominator); RMSE = mean RMS over matched pairs only.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError
from ._utils import as_structures, check_same_length, parallel_map
from .validity import validity

__all__ = ["match_rms", "match_rate", "rms_distance", "GATES"]

#: Accepted values of ``gate``.
GATES = (None, "pred", "both", "diffcsp", "cdvae")


@lru_cache(maxsize=32)
def _matcher(stol: float, angle_tol: float, ltol: float):
    from pymatgen.analysis.structure_matcher import StructureMatcher

    return StructureMatcher(stol=stol, angle_tol=angle_tol, ltol=ltol)


def _rms_one(pred, gt, stol: float, angle_tol: float, ltol: float) -> float:
    """RMS of one pair, NaN when not matched (or the matcher raised)."""
    if pred is None or gt is None:
        return np.nan
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _matcher(stol, angle_tol, ltol).get_rms_dist(pred, gt)
    except Exception:  # the reference code counts matcher errors as no match
        return np.nan
    return np.nan if res is None else float(res[0])


def _split_candidates(generated: Sequence[Any]) -> tuple[list[list[Any]], bool]:
    """Return candidate lists per reference and whether the input was best-of-k."""
    multi = any(isinstance(g, (list, tuple)) for g in generated)
    if not multi:
        return [[g] for g in generated], False
    return [list(g) if isinstance(g, (list, tuple)) else [g] for g in generated], True


def _resolve_gate(gate: str | None, multi: bool) -> str | None:
    if gate not in GATES:
        raise CrystalfitError(
            f"gate={gate!r} is not a known validity gate; use one of {GATES} "
            "(None: no gating, 'pred': CDVAE, 'both': DiffCSP 1-sample, 'diffcsp': DiffCSP's choice per mode)"
        )
    if gate == "diffcsp":
        return "pred" if multi else "both"
    if gate == "cdvae":
        return "pred"
    return gate


def match_rms(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    gate: str | None = None,
    n_jobs: int | None = None,
    verbose: bool = False,
) -> np.ndarray:
    """Best RMS distance of each reference structure, NaN where unmatched.

    Parameters
    ----------
    generated : sequence, length n
        ``generated[i]`` is a structure (ase.Atoms / pymatgen Structure /
        ``None``) or a list of k candidates for ``reference[i]``.
    reference : sequence of structures, length n
    stol, angle_tol, ltol : float
        ``StructureMatcher`` site tolerance (fraction of ``(V/N)^(1/3)``),
        angle tolerance (degrees) and length tolerance (fraction).
    gate : {None, "pred", "both", "diffcsp", "cdvae"}
        Validity gating, see the module docstring.
    n_jobs : int, optional
        joblib workers (``None``: the active backend's default).
    verbose : bool
        tqdm progress bar.

    Returns
    -------
    numpy.ndarray, shape (n,)
        Normalised RMS distance (dimensionless) of the best matching
        candidate, NaN when none matches.
    """
    cands, multi = _split_candidates(generated)
    check_same_length(cands, reference, "generated", "reference")
    gate = _resolve_gate(gate, multi)
    refs = as_structures(reference, "reference")
    flat_idx = [i for i, c in enumerate(cands) for _ in c]
    flat = as_structures([g for c in cands for g in c], "generated candidates")
    if gate is not None:
        ok = validity(flat, n_jobs=n_jobs, verbose=verbose)
        if gate == "both":
            ref_ok = validity(refs, n_jobs=n_jobs, verbose=verbose)
            ok = ok & ref_ok[np.asarray(flat_idx, dtype=int)]
        flat = [s if v else None for s, v in zip(flat, ok)]
    tasks = [(s, refs[i], stol, angle_tol, ltol) for s, i in zip(flat, flat_idx) if s is not None and refs[i] is not None]
    where = [k for k, (s, i) in enumerate(zip(flat, flat_idx)) if s is not None and refs[i] is not None]
    values = np.full(len(flat), np.nan)
    values[where] = parallel_map(_rms_one, tasks, n_jobs=n_jobs, verbose=verbose, desc="StructureMatcher")
    best = np.full(len(refs), np.nan)
    if len(values):
        idx = np.asarray(flat_idx, dtype=int)
        finite = np.isfinite(values)
        np.fmin.at(best, idx[finite], values[finite])
    return best


def match_rate(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    gate: str | None = None,
    n_jobs: int | None = None,
    verbose: bool = False,
) -> float:
    """Fraction of reference structures matched by their generated structure(s).

    Parameters are those of :func:`match_rms`.

    Returns
    -------
    float
        In [0, 1] (the papers report it in percent).

    Examples
    --------
    >>> from ase.build import bulk
    >>> cu = bulk("Cu", "fcc", a=3.6)
    >>> match_rate([cu], [cu])
    1.0
    """
    best = match_rms(generated, reference, stol=stol, angle_tol=angle_tol, ltol=ltol, gate=gate,
                     n_jobs=n_jobs, verbose=verbose)
    return float(np.mean(np.isfinite(best))) if len(best) else float("nan")


def rms_distance(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    gate: str | None = None,
    n_jobs: int | None = None,
    verbose: bool = False,
    return_per_pair: bool = False,
):
    """Mean normalised RMS distance over the matched pairs (the papers' RMSE).

    Parameters are those of :func:`match_rms`, plus

    return_per_pair : bool
        Also return the per-reference array of :func:`match_rms`.

    Returns
    -------
    float or (float, numpy.ndarray of shape (n,))
        NaN when nothing matches.
    """
    best = match_rms(generated, reference, stol=stol, angle_tol=angle_tol, ltol=ltol, gate=gate,
                     n_jobs=n_jobs, verbose=verbose)
    matched = best[np.isfinite(best)]
    mean = float(matched.mean()) if len(matched) else float("nan")
    return (mean, best) if return_per_pair else mean
