"""Property-optimisation success rates and retrieval hit ratios.

Success rate (CDVAE / DiffCSP ``compute_metrics.py::OptEval``)
    Each of ``n_starts`` optimisation runs yields candidates with property
    values (invalid candidates get +inf).  The best value of a run is the
    minimum over its candidates.  ``SR_p`` = fraction of runs whose best value
    is <= the threshold of percentile ``p`` (5, 10, 15) of the reference
    property distribution (lower is better).  Thresholds come from a
    reference distribution (``np.percentile``), from the published per-dataset
    constants (``SR_THRESHOLDS``), or are given explicitly.

Top-k hit ratio (XtalNet database retrieval)
    For query ``q`` the true candidate ``targets[q]`` is a hit at k when fewer
    than k other candidates have a similarity >= its own (ties count against
    the query, so a constant similarity matrix scores no better than chance).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError, ShapeError
from ._utils import as_structures
from .distribution import predict_property
from .validity import validity

__all__ = ["SR_THRESHOLDS", "success_rate", "success_thresholds", "optimization_success_rate", "hit_ratio"]

#: Published SR5/SR10/SR15 thresholds (property to minimise), SPEC 2.5:
#: MP-20 formation energy (eV/atom), Carbon-24 energy (eV/atom), Perov-5 heat_ref (eV).
SR_THRESHOLDS = {
    "mp20": (-3.17562208, -2.82196882, -2.52814761),
    "mp_20": (-3.17562208, -2.82196882, -2.52814761),
    "carbon": (-154.527093, -154.45865733, -154.44206825),
    "carbon_24": (-154.527093, -154.45865733, -154.44206825),
    "perovskite": (0.43924842, 0.61202443, 0.7364607),
    "perov_5": (0.43924842, 0.61202443, 0.7364607),
}


def success_thresholds(
    *, reference: Sequence[float] | None = None, dataset: str | None = None,
    percentiles: Sequence[float] = (5, 10, 15), minimize: bool = True,
) -> np.ndarray:
    """Thresholds for SR_p from a reference distribution or a dataset name.

    Parameters
    ----------
    reference : sequence of float, optional
        Reference property values; threshold_p = ``np.percentile(reference, p)``
        (``100 - p`` when ``minimize`` is False).  NaN values are ignored.
    dataset : str, optional
        Use ``SR_THRESHOLDS[dataset]`` (only for percentiles (5, 10, 15)).
    percentiles : sequence of float
    minimize : bool

    Returns
    -------
    numpy.ndarray, shape (len(percentiles),)
    """
    if (reference is None) == (dataset is None):
        raise CrystalfitError(
            "give exactly one of reference= (property values of the reference set) or dataset= "
            f"(one of {sorted(SR_THRESHOLDS)}) to define the success thresholds"
        )
    if dataset is not None:
        key = str(dataset).lower()
        if key not in SR_THRESHOLDS:
            raise CrystalfitError(
                f"dataset={dataset!r} has no published success thresholds; known: {sorted(SR_THRESHOLDS)}; "
                "pass reference= property values instead"
            )
        if tuple(percentiles) != (5, 10, 15) or not minimize:
            raise CrystalfitError(
                f"the published thresholds are for percentiles (5, 10, 15) of a minimised property, got "
                f"percentiles={tuple(percentiles)}, minimize={minimize}; pass reference= values instead"
            )
        return np.asarray(SR_THRESHOLDS[key], dtype=float)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0:
        raise CrystalfitError("reference has no finite property values; pass at least one number")
    q = np.asarray(percentiles, dtype=float)
    return np.percentile(ref, q if minimize else 100.0 - q)


def _best_per_start(values: Any, minimize: bool) -> np.ndarray:
    rows = values if isinstance(values, (list, tuple)) else np.asarray(values, dtype=object)
    if isinstance(rows, np.ndarray) and rows.ndim == 1:
        rows = [[v] for v in rows]
    bad = np.inf if minimize else -np.inf
    best = []
    for r in rows:
        r = [r] if np.isscalar(r) or r is None else list(r)
        arr = np.asarray([bad if v is None else float(v) for v in r], dtype=float)
        arr = np.where(np.isfinite(arr), arr, bad)
        best.append((arr.min() if minimize else arr.max()) if len(arr) else bad)
    return np.asarray(best, dtype=float)


def success_rate(
    values: Any,
    *,
    thresholds: Sequence[float] | None = None,
    reference: Sequence[float] | None = None,
    dataset: str | None = None,
    percentiles: Sequence[float] = (5, 10, 15),
    minimize: bool = True,
) -> dict[str, float]:
    """Success rates SR_p of property optimisation runs.

    Parameters
    ----------
    values : array (n_starts,) or (n_starts, n_candidates), or list of lists
        Property values of the candidates of each run; NaN, inf or None mark
        invalid candidates (they never succeed).
    thresholds : sequence of float, optional
        One threshold per percentile; otherwise from ``reference`` or ``dataset``
        (:func:`success_thresholds`).
    reference, dataset, percentiles, minimize
        See :func:`success_thresholds`.

    Returns
    -------
    dict
        ``{"sr5": ..., "sr10": ..., "sr15": ...}`` (keys ``f"sr{p:g}"``),
        fractions in [0, 1].

    Examples
    --------
    >>> success_rate([[3.0, 0.5], [2.0, 1.0]], thresholds=[0.6, 1.0, 1.5])
    {'sr5': 0.5, 'sr10': 1.0, 'sr15': 1.0}
    """
    if thresholds is None:
        thresholds = success_thresholds(reference=reference, dataset=dataset, percentiles=percentiles,
                                        minimize=minimize)
    thresholds = np.asarray(thresholds, dtype=float).reshape(-1)
    if len(thresholds) != len(percentiles):
        raise ShapeError(
            f"thresholds has {len(thresholds)} values but percentiles has {len(percentiles)}; give one "
            "threshold per percentile"
        )
    best = _best_per_start(values, minimize)
    if len(best) == 0:
        raise CrystalfitError("values is empty; pass the candidates' property values of at least one run")
    ok = best[:, None] <= thresholds[None, :] if minimize else best[:, None] >= thresholds[None, :]
    return {f"sr{p:g}": float(v) for p, v in zip(percentiles, ok.mean(axis=0))}


def optimization_success_rate(
    candidates: Sequence[Sequence[Any]],
    model: Any,
    *,
    check_validity: bool = True,
    n_jobs: int | None = None,
    **kwargs,
) -> dict[str, float]:
    """Success rates from candidate structures and a property model (OptEval).

    Parameters
    ----------
    candidates : list of lists of structures
        ``candidates[s]`` holds the structures produced by run ``s``
        (``None`` = failed).
    model : object with ``.predict(list_of_atoms) -> (n,)``
    check_validity : bool
        Invalid candidates (structural AND SMACT) get +inf, as in OptEval.
    n_jobs : int, optional
        joblib workers for the validity checks.
    **kwargs
        ``thresholds``, ``reference``, ``dataset``, ``percentiles``,
        ``minimize`` of :func:`success_rate`.

    Returns
    -------
    dict
        As :func:`success_rate`.
    """
    sizes = [len(c) for c in candidates]
    flat = as_structures([s for c in candidates for s in c], "candidates")
    keep = validity(flat, n_jobs=n_jobs) if check_validity else np.array([s is not None for s in flat])
    flat = [s if k else None for s, k in zip(flat, keep)]
    vals = predict_property(model, flat)
    rows = np.split(vals, np.cumsum(sizes)[:-1]) if sizes else []
    return success_rate([list(r) for r in rows], **kwargs)


def hit_ratio(similarity: Any, k: int | Sequence[int] = 10, targets: Sequence[int] | None = None):
    """Top-k hit ratio of a retrieval (XtalNet CPCP database search).

    Parameters
    ----------
    similarity : array, shape (n_queries, n_candidates)
        Higher means more similar (e.g. cosine similarity of PXRD and crystal
        embeddings); NaN counts as -inf.
    k : int or sequence of int
        Cut-off(s).
    targets : sequence of int, shape (n_queries,), optional
        Index of the true candidate of each query; default ``arange(n_queries)``
        (the diagonal).

    Returns
    -------
    float or dict
        Fraction of queries whose true candidate ranks in the top k; a dict
        ``{k: ratio}`` when ``k`` is a sequence.

    Examples
    --------
    >>> import numpy as np
    >>> hit_ratio(np.array([[0.9, 0.1], [0.8, 0.2]]), k=1)
    0.5
    """
    s = np.asarray(similarity, dtype=float)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise ShapeError(f"similarity has shape {s.shape}, expected (n_queries, n_candidates) with both > 0")
    s = np.where(np.isnan(s), -np.inf, s)
    q = np.arange(s.shape[0])
    t = q if targets is None else np.asarray(targets, dtype=int).reshape(-1)
    if t.shape != q.shape or np.any(t < 0) or np.any(t >= s.shape[1]):
        raise ShapeError(
            f"targets must hold one candidate index in [0, {s.shape[1]}) per query ({s.shape[0]}), got shape "
            f"{t.shape} with range [{t.min() if t.size else None}, {t.max() if t.size else None}]"
        )
    true = s[q, t]
    rank = (s >= true[:, None]).sum(axis=1) - 1  # other candidates at least as similar
    ks = [k] if np.isscalar(k) else list(k)
    for kk in ks:
        if int(kk) < 1:
            raise CrystalfitError(f"k={kk} must be >= 1; pass the number of top-ranked candidates to consider")
    out = {int(kk): float(np.mean(rank < int(kk))) for kk in ks}
    return out[int(k)] if np.isscalar(k) else out
