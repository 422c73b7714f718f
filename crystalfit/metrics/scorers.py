"""Named scorers for ``sklearn.model_selection.GridSearchCV(scoring=...)``.

A scorer is a picklable callable ``scorer(estimator, X, y=None) -> float``
(higher is better), so it can be passed as ``scoring=get_scorer("match_rate")``
or inside a dict of scorers.  Scorers call the estimator duck-typed; this
module never imports :mod:`crystalfit.estimators`.

Sampling protocol
    *Composition-conditioned* scorers (``match_rate``, ``neg_rmse``,
    ``csp_validity``) call::

        estimator.sample(composition=formulas, n_samples=k)

    with ``formulas[i]`` the full-cell formula of ``X[i]`` (e.g.
    ``"Sr1Ti1O3"``; a 10-atom cell gives ``"Sr2Ti2O6"``) and expect a list of
    ``len(X) * k`` ``ase.Atoms`` (or ``None`` for failures) in entry-major
    order: ``out[i * k + j]`` is the j-th sample for ``X[i]``.  With ``k > 1``
    the match rate is best-of-k.

    *Unconditional* scorers (``validity``, ``valid_struct``, ``valid_comp``,
    ``cov_r``, ``cov_p``, ``neg_d_density``, ``neg_d_n_elements``) call
    ``estimator.sample(n_samples=n)`` with ``n = len(X)`` (or ``n_generate``)
    and compare the samples with ``X``.

    Sampling must be deterministic for a fixed ``random_state`` for scores to
    be reproducible; that is the estimator's job.

Names
    ``match_rate``, ``neg_rmse`` (NaN when nothing matches, which
    GridSearchCV ranks last), ``csp_validity``, ``validity``,
    ``valid_struct``, ``valid_comp``, ``cov_r``, ``cov_p`` (need ``dataset=``
    or both cut-offs), ``neg_d_density``, ``neg_d_n_elements``.
    Keyword arguments given to :func:`get_scorer` are passed to the metric
    (``stol``, ``angle_tol``, ``ltol``, ``gate``, ``n_samples``,
    ``n_generate``, ``dataset``, ``struct_cutoff``, ``comp_cutoff``,
    ``n_jobs``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..exceptions import CrystalfitError
from ._utils import as_structures
from .coverage import coverage
from .csp import match_rms
from .distribution import wasserstein_density, wasserstein_n_elements
from .validity import composition_validity, structure_validity, validity

__all__ = ["get_scorer", "get_scorer_names", "CrystalScorer"]


def _reference(X: Sequence[Any]) -> list:
    ref = as_structures(X, "X")
    bad = [i for i, s in enumerate(ref) if s is None]
    if bad:
        raise CrystalfitError(
            f"X[{bad[0]}] is None or not a valid structure ({len(bad)} such entries); scorers compare samples "
            "with the structures in X, so X must hold valid crystals"
        )
    return ref


def _formula(structure) -> str:
    return structure.composition.formula.replace(" ", "")


def _check_samples(samples: Any, expected: int, call: str) -> list:
    if not isinstance(samples, (list, tuple)) or len(samples) != expected:
        got = f"{type(samples).__name__} of length {len(samples)}" if hasattr(samples, "__len__") else type(samples).__name__
        raise CrystalfitError(
            f"estimator.{call} returned {got}, expected a list of {expected} ase.Atoms (entry-major: out[i*k+j] is "
            "sample j of entry i); see the sampling protocol in crystalfit.metrics.scorers"
        )
    return list(samples)


def _conditional_samples(estimator, ref: list, k: int) -> list[list]:
    if int(k) < 1:
        raise CrystalfitError(f"n_samples={k} must be >= 1 samples per composition")
    formulas = [_formula(s) for s in ref]
    out = _check_samples(estimator.sample(composition=formulas, n_samples=int(k)), len(ref) * int(k),
                         f"sample(composition=[{len(ref)} formulas], n_samples={k})")
    return [out[i * k : (i + 1) * k] for i in range(len(ref))]


def _unconditional_samples(estimator, ref: list, n_generate: int | None) -> list:
    n = len(ref) if n_generate is None else int(n_generate)
    return _check_samples(estimator.sample(n_samples=n), n, f"sample(n_samples={n})")


def _match_rate(estimator, X, y=None, *, n_samples=1, stol=0.5, angle_tol=10, ltol=0.3, gate=None, n_jobs=None):
    ref = _reference(X)
    cands = _conditional_samples(estimator, ref, n_samples)
    gen = cands if n_samples > 1 else [c[0] for c in cands]
    best = match_rms(gen, ref, stol=stol, angle_tol=angle_tol, ltol=ltol, gate=gate, n_jobs=n_jobs)
    return float(np.mean(np.isfinite(best)))


def _neg_rmse(estimator, X, y=None, *, n_samples=1, stol=0.5, angle_tol=10, ltol=0.3, gate=None, n_jobs=None):
    ref = _reference(X)
    cands = _conditional_samples(estimator, ref, n_samples)
    gen = cands if n_samples > 1 else [c[0] for c in cands]
    best = match_rms(gen, ref, stol=stol, angle_tol=angle_tol, ltol=ltol, gate=gate, n_jobs=n_jobs)
    m = best[np.isfinite(best)]
    return -float(m.mean()) if len(m) else float("nan")


def _csp_validity(estimator, X, y=None, *, n_samples=1, n_jobs=None):
    ref = _reference(X)
    flat = [s for c in _conditional_samples(estimator, ref, n_samples) for s in c]
    return float(validity(flat, n_jobs=n_jobs).mean())


def _validity(estimator, X, y=None, *, n_generate=None, n_jobs=None):
    return float(validity(_unconditional_samples(estimator, _reference(X), n_generate), n_jobs=n_jobs).mean())


def _valid_struct(estimator, X, y=None, *, n_generate=None, n_jobs=None):
    gen = _unconditional_samples(estimator, _reference(X), n_generate)
    return float(structure_validity(gen, n_jobs=n_jobs).mean())


def _valid_comp(estimator, X, y=None, *, n_generate=None, n_jobs=None):
    gen = _unconditional_samples(estimator, _reference(X), n_generate)
    return float(composition_validity(gen, n_jobs=n_jobs).mean())


def _cov(which: str):
    def scorer(estimator, X, y=None, *, n_generate=None, n_jobs=None, **kwargs):
        ref = _reference(X)
        res = coverage(_unconditional_samples(estimator, ref, n_generate), ref, n_jobs=n_jobs, **kwargs)
        return float(getattr(res, which))

    scorer.__name__ = f"_cov_{which}"
    return scorer


_cov_recall = _cov("recall")
_cov_precision = _cov("precision")


def _neg_d_density(estimator, X, y=None, *, n_generate=None):
    ref = _reference(X)
    gen = [s for s in as_structures(_unconditional_samples(estimator, ref, n_generate), "samples") if s is not None]
    return -wasserstein_density(gen, ref) if gen else float("nan")


def _neg_d_n_elements(estimator, X, y=None, *, n_generate=None):
    ref = _reference(X)
    gen = [s for s in as_structures(_unconditional_samples(estimator, ref, n_generate), "samples") if s is not None]
    return -wasserstein_n_elements(gen, ref) if gen else float("nan")


_SCORERS: dict[str, Callable] = {
    "match_rate": _match_rate,
    "neg_rmse": _neg_rmse,
    "csp_validity": _csp_validity,
    "validity": _validity,
    "valid_struct": _valid_struct,
    "valid_comp": _valid_comp,
    "cov_r": _cov_recall,
    "cov_p": _cov_precision,
    "neg_d_density": _neg_d_density,
    "neg_d_n_elements": _neg_d_n_elements,
}


class CrystalScorer:
    """``scorer(estimator, X, y=None) -> float`` built by :func:`get_scorer`.

    Parameters
    ----------
    name : str
        One of :func:`get_scorer_names`.
    **kwargs
        Passed to the metric.
    """

    def __init__(self, name: str, **kwargs):
        if name not in _SCORERS:
            raise CrystalfitError(
                f"unknown scorer {name!r}; crystalfit scorers are {sorted(_SCORERS)}; "
                "see crystalfit.metrics.scorers for their sampling protocol"
            )
        self.name = name
        self.kwargs = dict(kwargs)

    def __call__(self, estimator: Any, X: Sequence[Any], y: Any = None) -> float:
        return float(_SCORERS[self.name](estimator, X, y, **self.kwargs))

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"get_scorer({self.name!r}{args})"


def get_scorer_names() -> list[str]:
    """Names accepted by :func:`get_scorer`."""
    return sorted(_SCORERS)


def get_scorer(name: str, **kwargs) -> CrystalScorer:
    """A named scorer for ``GridSearchCV(scoring=...)``.

    Parameters
    ----------
    name : str
        See :func:`get_scorer_names` and the module docstring.
    **kwargs
        Metric options, e.g. ``get_scorer("match_rate", n_samples=20)``
        (best-of-20) or ``get_scorer("cov_r", dataset="perov_5")``.

    Returns
    -------
    CrystalScorer
        Callable ``(estimator, X, y=None) -> float``, higher is better.

    Examples
    --------
    >>> get_scorer("match_rate", stol=0.5)
    get_scorer('match_rate', stol=0.5)
    """
    return CrystalScorer(name, **kwargs)
