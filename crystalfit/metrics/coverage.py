"""Coverage COV-R / COV-P (CDVAE / DiffCSP ``eval_utils.py::compute_cov``).

Fingerprints
    * structure: matminer ``CrystalNNFingerprint.from_preset("ops")`` of every
      site (61 features), averaged over sites; not normalised.
    * composition: matminer ``ElementProperty.from_preset("magpie")`` (132
      features), standardised feature-wise.

Standardisation (a documented substitution)
    The reference code standardises composition fingerprints with 132 FIXED
    constants (``CompScalerMeans/Stds`` in CDVAE ``common/constants.py``) that
    are not available here.  By default we standardise with the mean and the
    population standard deviation (ddof=0) of the *reference* set; features
    that are constant over the reference set get std 1 (scikit-learn's
    convention).  Pass ``comp_means`` / ``comp_stds`` (132 numbers each) to use
    other constants, e.g. CDVAE's, for numbers comparable with the papers.
    As in CDVAE, a NaN feature becomes 0 after standardisation.
    The published cut-offs (``COV_CUTOFFS``) were calibrated with CDVAE's
    constants, so COV numbers obtained with reference-set statistics are close
    to, but not identical with, the papers' protocol.

Coverage (distances are Euclidean; structural and compositional minima are
taken independently, so they may come from different crystals)
    * COV-R = mean over reference crystals of
      [min_gen d_struct <= struct_cutoff AND min_gen d_comp <= comp_cutoff];
    * COV-P = count over generated crystals of
      [min_ref d_struct <= struct_cutoff AND min_ref d_comp <= comp_cutoff]
      divided by the number of generated entries *before* filtering (failed
      generations, ``None``, and crystals whose CrystalNN fingerprint raised
      count in the denominator only).
    Reference crystals whose fingerprint fails are dropped with a warning.

Cache
    Fingerprints are cached in memory, keyed by :func:`structure_hash` (the
    lattice, the species and the wrapped fractional coordinates rounded to 6
    decimals), so evaluating the same structures again (another metric, a
    second model against the same reference set) does not recompute them.
    The parent process holds the cache; only misses are sent to workers.
"""
from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict, namedtuple
from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError
from ._utils import as_structures, parallel_map

__all__ = [
    "COV_CUTOFFS",
    "CoverageResult",
    "coverage",
    "fingerprints",
    "structure_fingerprints",
    "composition_fingerprints",
    "structure_hash",
    "clear_fingerprint_cache",
    "fingerprint_cache_size",
    "resolve_cutoffs",
]

#: (struct_cutoff, comp_cutoff) per dataset, CDVAE/DiffCSP ``COV_Cutoffs``.
COV_CUTOFFS = {
    "mp20": (0.4, 10.0),
    "mp_20": (0.4, 10.0),
    "carbon": (0.2, 4.0),
    "carbon_24": (0.2, 4.0),
    "perovskite": (0.2, 4.0),
    "perov_5": (0.2, 4.0),
}

N_STRUCT_FEATURES = 61
N_COMP_FEATURES = 132
_CACHE_MAX = 200_000
_CACHE: "OrderedDict[str, tuple[np.ndarray | None, np.ndarray | None]]" = OrderedDict()
_FEATURIZERS: dict = {}

#: Result of :func:`coverage`: COV-R/COV-P (fractions in [0, 1]) and the mean
#: minimum structural (amsd) / compositional (amcd) distances.
CoverageResult = namedtuple(
    "CoverageResult",
    ["recall", "precision", "amsd_recall", "amsd_precision", "amcd_recall", "amcd_precision"],
)


def _featurizers():
    if not _FEATURIZERS:
        from matminer.featurizers.composition import ElementProperty
        from matminer.featurizers.site import CrystalNNFingerprint

        _FEATURIZERS["struct"] = CrystalNNFingerprint.from_preset("ops")
        _FEATURIZERS["comp"] = ElementProperty.from_preset("magpie")
    return _FEATURIZERS["struct"], _FEATURIZERS["comp"]


def structure_hash(structure, decimals: int = 6) -> str:
    """Cache key of a structure: SHA-1 of lattice, species and wrapped coords.

    Parameters
    ----------
    structure : pymatgen Structure
    decimals : int
        Rounding of the lattice matrix (Angstrom) and the fractional
        coordinates before hashing.

    Returns
    -------
    str
        40 hex characters.
    """
    lat = np.round(np.asarray(structure.lattice.matrix, dtype=float), decimals) + 0.0
    frac = np.asarray(structure.frac_coords, dtype=float)
    frac = np.round(np.mod(np.round(frac, decimals), 1.0), decimals) + 0.0
    species = "|".join(str(site.species) for site in structure)
    h = hashlib.sha1()
    h.update(np.ascontiguousarray(lat).tobytes())
    h.update(np.ascontiguousarray(frac).tobytes())
    h.update(species.encode())
    return h.hexdigest()


def _fingerprint_one(structure) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(struct_fp (61,), comp_fp (132,)); both None when CrystalNN raises."""
    struct_fz, comp_fz = _featurizers()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            site_fps = [struct_fz.featurize(structure, i) for i in range(len(structure))]
            sfp = np.asarray(site_fps, dtype=float).mean(axis=0)
        except Exception:
            return None, None
        if sfp.shape != (N_STRUCT_FEATURES,) or not np.all(np.isfinite(sfp)):
            return None, None
        try:
            cfp = np.asarray(comp_fz.featurize(structure.composition), dtype=float)
        except Exception:
            return None, None
    return sfp, cfp


def clear_fingerprint_cache() -> None:
    """Empty the in-memory fingerprint cache."""
    _CACHE.clear()


def fingerprint_cache_size() -> int:
    """Number of structures whose fingerprints are cached."""
    return len(_CACHE)


def fingerprints(
    structures: Sequence[Any], *, n_jobs: int | None = None, verbose: bool = False, use_cache: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Structure and composition fingerprints of each structure.

    Parameters
    ----------
    structures : sequence of ase.Atoms / pymatgen Structure / None
    n_jobs : int, optional
        joblib workers for the cache misses (``None``: backend default).
    verbose : bool
        tqdm progress bar.
    use_cache : bool
        Read and fill the in-memory cache (default True).

    Returns
    -------
    struct_fps : numpy.ndarray, shape (n, 61)
        Site-averaged CrystalNN "ops" fingerprints; NaN rows where the
        structure is ``None`` or the featuriser raised.
    comp_fps : numpy.ndarray, shape (n, 132)
        Raw (not standardised) Magpie fingerprints; NaN rows likewise (a NaN
        inside a valid row is a missing element property).
    """
    structs = as_structures(structures, "structures")
    n = len(structs)
    sfps = np.full((n, N_STRUCT_FEATURES), np.nan)
    cfps = np.full((n, N_COMP_FEATURES), np.nan)
    keys = [None if s is None else structure_hash(s) for s in structs]
    todo: dict[str, int] = {}
    known: dict[str, tuple] = {}
    for i, k in enumerate(keys):
        if k is None or k in known or k in todo:
            continue
        if use_cache and k in _CACHE:
            _CACHE.move_to_end(k)
            known[k] = _CACHE[k]
        else:
            todo[k] = i
    computed = parallel_map(
        _fingerprint_one, [(structs[i],) for i in todo.values()], n_jobs=n_jobs, verbose=verbose,
        desc="fingerprints",
    )
    fresh = dict(zip(todo.keys(), computed))
    if use_cache:
        _CACHE.update(fresh)
        while len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
    known.update(fresh)
    for i, k in enumerate(keys):
        if k is None:
            continue
        sfp, cfp = known[k]
        if sfp is not None:
            sfps[i] = sfp
            cfps[i] = cfp
    return sfps, cfps


def structure_fingerprints(structures: Sequence[Any], **kwargs) -> np.ndarray:
    """Site-averaged CrystalNN "ops" fingerprints, shape (n, 61); see :func:`fingerprints`."""
    return fingerprints(structures, **kwargs)[0]


def composition_fingerprints(structures: Sequence[Any], **kwargs) -> np.ndarray:
    """Raw Magpie composition fingerprints, shape (n, 132); see :func:`fingerprints`."""
    return fingerprints(structures, **kwargs)[1]


def resolve_cutoffs(struct_cutoff: float | None, comp_cutoff: float | None, dataset: str | None) -> tuple[float, float]:
    """Explicit cut-offs, else the dataset's ``COV_CUTOFFS`` entry."""
    if dataset is not None:
        key = str(dataset).lower()
        if key not in COV_CUTOFFS:
            raise CrystalfitError(
                f"dataset={dataset!r} has no published coverage cut-offs; known: {sorted(COV_CUTOFFS)}; "
                "pass struct_cutoff= and comp_cutoff= explicitly"
            )
        ds, dc = COV_CUTOFFS[key]
        struct_cutoff = ds if struct_cutoff is None else struct_cutoff
        comp_cutoff = dc if comp_cutoff is None else comp_cutoff
    if struct_cutoff is None or comp_cutoff is None:
        raise CrystalfitError(
            f"coverage needs both cut-offs, got struct_cutoff={struct_cutoff!r}, comp_cutoff={comp_cutoff!r}; "
            f"pass them (e.g. struct_cutoff=0.4, comp_cutoff=10 for MP-20) or dataset= one of {sorted(COV_CUTOFFS)}"
        )
    return float(struct_cutoff), float(comp_cutoff)


def _standardise(ref_c: np.ndarray, gen_c: np.ndarray, means, stds) -> tuple[np.ndarray, np.ndarray]:
    if means is None:
        means = np.nanmean(ref_c, axis=0) if len(ref_c) else np.zeros(N_COMP_FEATURES)
    if stds is None:
        stds = np.nanstd(ref_c, axis=0) if len(ref_c) else np.ones(N_COMP_FEATURES)
        stds = np.where(~np.isfinite(stds) | (stds < 1e-12), 1.0, stds)
    means = np.nan_to_num(np.asarray(means, dtype=float).reshape(-1))
    stds = np.asarray(stds, dtype=float).reshape(-1)
    for name, v in (("comp_means", means), ("comp_stds", stds)):
        if v.shape != (N_COMP_FEATURES,):
            raise CrystalfitError(
                f"{name} has shape {v.shape}, expected ({N_COMP_FEATURES},) = the number of Magpie features; "
                "pass one value per ElementProperty.from_preset('magpie') feature"
            )
    if np.any(stds <= 0) or not np.all(np.isfinite(stds)):
        raise CrystalfitError("comp_stds must be finite and > 0 for every feature; replace zeros by 1")
    out = []
    for x in (ref_c, gen_c):
        z = (x - means) / stds
        out.append(np.where(np.isnan(z), 0.0, z))  # CDVAE StandardScaler(replace_nan_token=0)
    return out[0], out[1]


def _min_dists(gen: np.ndarray, ref: np.ndarray, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """(min over ref for each gen row, min over gen for each ref row), chunked cdist."""
    from scipy.spatial.distance import cdist

    prec = np.full(len(gen), np.inf)
    rec = np.full(len(ref), np.inf)
    for start in range(0, len(gen), chunk):
        d = cdist(gen[start : start + chunk], ref)
        if d.size:
            prec[start : start + chunk] = d.min(axis=1)
            np.minimum(rec, d.min(axis=0), out=rec)
    return prec, rec


def coverage_from_fingerprints(
    gen_struct: np.ndarray, gen_comp: np.ndarray, ref_struct: np.ndarray, ref_comp: np.ndarray,
    *, struct_cutoff: float, comp_cutoff: float, num_generated: int | None = None,
    comp_means=None, comp_stds=None,
) -> CoverageResult:
    """Coverage from precomputed raw fingerprints (NaN rows = failed).

    Shapes: gen_struct (n_gen, 61), gen_comp (n_gen, 132), ref_struct
    (n_ref, 61), ref_comp (n_ref, 132).  ``num_generated`` is the COV-P
    denominator (default ``n_gen``).  See :func:`coverage`.
    """
    n_gen = len(gen_struct) if num_generated is None else int(num_generated)
    gen_ok = np.all(np.isfinite(gen_struct), axis=1)
    ref_ok = np.all(np.isfinite(ref_struct), axis=1)
    if not ref_ok.all():
        warnings.warn(
            f"{int((~ref_ok).sum())} reference structure(s) have no fingerprint (None or CrystalNN failed); "
            "they are left out of COV-R", RuntimeWarning, stacklevel=3,
        )
    if not ref_ok.any():
        raise CrystalfitError(
            "no reference structure has a fingerprint (all None or CrystalNN failed); coverage needs a "
            "non-empty reference set of valid structures"
        )
    ref_c, gen_c = _standardise(ref_comp[ref_ok], gen_comp[gen_ok], comp_means, comp_stds)
    s_prec, s_rec = _min_dists(gen_struct[gen_ok], ref_struct[ref_ok])
    c_prec, c_rec = _min_dists(gen_c, ref_c)
    recall = float(np.mean((s_rec <= struct_cutoff) & (c_rec <= comp_cutoff)))
    precision = float(np.sum((s_prec <= struct_cutoff) & (c_prec <= comp_cutoff)) / max(n_gen, 1))

    def _mean(x):
        return float(np.mean(x)) if len(x) else float("nan")

    return CoverageResult(recall, precision, _mean(s_rec), _mean(s_prec), _mean(c_rec), _mean(c_prec))


def coverage(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    struct_cutoff: float | None = None,
    comp_cutoff: float | None = None,
    dataset: str | None = None,
    comp_means: Sequence[float] | None = None,
    comp_stds: Sequence[float] | None = None,
    n_jobs: int | None = None,
    verbose: bool = False,
) -> CoverageResult:
    """COV-R and COV-P of generated structures against a reference set.

    Parameters
    ----------
    generated : sequence of ase.Atoms / pymatgen Structure / None, length n_gen
    reference : sequence of ase.Atoms / pymatgen Structure, length n_ref
    struct_cutoff : float
        Threshold on the Euclidean distance of structure fingerprints.
    comp_cutoff : float
        Threshold on the distance of standardised composition fingerprints.
    dataset : str, optional
        Take missing cut-offs from ``COV_CUTOFFS`` (``"mp_20"`` (0.4, 10),
        ``"carbon_24"`` (0.2, 4), ``"perov_5"`` (0.2, 4)).
    comp_means, comp_stds : sequence of 132 floats, optional
        Standardisation constants; default: statistics of ``reference``
        (see the module docstring for why this differs from CDVAE).
    n_jobs : int, optional
        joblib workers for the fingerprints.
    verbose : bool
        tqdm progress bar.

    Returns
    -------
    CoverageResult
        ``recall`` (COV-R) and ``precision`` (COV-P) as fractions in [0, 1],
        and the mean minimum distances ``amsd_recall``, ``amsd_precision``
        (structure), ``amcd_recall``, ``amcd_precision`` (composition).

    Examples
    --------
    >>> from ase.build import bulk
    >>> crystals = [bulk("Cu", "fcc", a=3.6), bulk("NaCl", "rocksalt", a=5.6)]
    >>> coverage(crystals, crystals, struct_cutoff=0.2, comp_cutoff=4).recall
    1.0
    """
    struct_cutoff, comp_cutoff = resolve_cutoffs(struct_cutoff, comp_cutoff, dataset)
    gen = as_structures(generated, "generated")
    ref = as_structures(reference, "reference")
    if len(gen) == 0:
        raise CrystalfitError("generated is empty; coverage needs at least one generated structure")
    gs, gc = fingerprints(gen, n_jobs=n_jobs, verbose=verbose)
    rs, rc = fingerprints(ref, n_jobs=n_jobs, verbose=verbose)
    return coverage_from_fingerprints(
        gs, gc, rs, rc, struct_cutoff=struct_cutoff, comp_cutoff=comp_cutoff, num_generated=len(gen),
        comp_means=comp_means, comp_stds=comp_stds,
    )
