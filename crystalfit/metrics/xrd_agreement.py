"""Agreement between diffraction data.

R-factor (intensity sets on the same reflections)
    ``R = sum_h (s I_calc(h) - I_obs(h))^2 / sum_h I_obs(h)^2``
    with ``s = 1``, or, with ``fit_scale=True``, the least-squares scale
    ``s = sum I_calc I_obs / sum I_calc^2`` (minimises the numerator; use it
    when the observed intensities have an arbitrary scale).  This is a
    squared-residual, intensity-based R (no square root), the form used by
    cdvae_xrd's ``calc_r_factor``; it is not the crystallographic
    ``R1 = sum |F_o - F_c| / sum |F_o|``.  0 means perfect agreement, 1 is what
    predicting zero intensities gives.

Powder-pattern similarity
    pymatgen ``XRDCalculator`` gives the peak positions (2 theta, degrees) and
    intensities of each structure; the peaks are broadened with Gaussians of
    full width at half maximum ``fwhm`` (degrees) onto a common 2 theta grid,
    and the cosine similarity of the two profiles is returned (1 = identical
    profiles, 0 = no overlapping intensity).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError, ShapeError
from ._utils import as_structure_or_none, as_structures, check_same_length, parallel_map
from .validity import STRUCT_MIN_DISTANCE

__all__ = ["r_factor", "best_candidates", "powder_pattern", "broaden_peaks", "pattern_similarity", "powder_similarity"]


def r_factor(calc: Any, obs: Any, *, fit_scale: bool = False):
    """Intensity R-factor ``sum (s I_calc - I_obs)^2 / sum I_obs^2``.

    Parameters
    ----------
    calc, obs : array, shape (n_reflections,) or (n_sets, n_reflections)
        Calculated and observed intensities on the same reflections (the same
        Miller indices, in the same order).
    fit_scale : bool
        Use the least-squares scale ``s`` (per set) instead of ``s = 1``.

    Returns
    -------
    float or numpy.ndarray of shape (n_sets,)

    Examples
    --------
    >>> r_factor([2.0, 4.0], [1.0, 2.0], fit_scale=True)
    0.0
    """
    c = np.asarray(calc, dtype=float)
    o = np.asarray(obs, dtype=float)
    if c.shape != o.shape or c.ndim not in (1, 2) or c.shape[-1] == 0:
        raise ShapeError(
            f"calc has shape {c.shape} and obs {o.shape}; expected equal shapes (n_reflections,) or "
            "(n_sets, n_reflections); pass one intensity per Miller index in both"
        )
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(o))):
        raise CrystalfitError("calc or obs contains NaN or inf; pass finite intensities")
    denom = np.sum(o * o, axis=-1)
    if np.any(denom <= 0):
        raise CrystalfitError(
            "obs is all zeros for at least one set; the R-factor is normalised by sum obs^2, so pass non-zero "
            "observed intensities"
        )
    if fit_scale:
        cc = np.sum(c * c, axis=-1)
        s = np.where(cc > 0, np.sum(c * o, axis=-1) / np.where(cc > 0, cc, 1.0), 0.0)
        c = c * np.expand_dims(s, -1)
    r = np.sum((c - o) ** 2, axis=-1) / denom
    return float(r) if np.ndim(r) == 0 else r


def best_candidates(r_factors: Any, min_distances: Any, n_candidates: int, *,
                    min_distance: float = STRUCT_MIN_DISTANCE) -> np.ndarray:
    """Index of the candidate to keep in each group of ``n_candidates`` consecutive ones.

    The rule of ``XRDGuidedDiffusion.sample(n_candidates=k)``: among the group's
    structurally valid candidates (no two atoms closer than ``min_distance``, the
    0.5 Angstrom of CDVAE's structural validity) the one whose intensities fit the
    data best (smallest R-factor); if none is valid, the smallest R-factor.  Guided
    diffusion can pull atoms onto each other where the data barely see them (light
    atoms next to heavy ones); such a structure may fit the intensities well and is
    still not a crystal.

    Parameters
    ----------
    r_factors, min_distances : array, shape (G * n_candidates,)
        Per candidate, groups stored one after the other.
    n_candidates : int
    min_distance : float
        Angstrom.

    Returns
    -------
    numpy.ndarray, shape (G,), int
        Indices into the candidates (not into the group).

    Examples
    --------
    >>> # group 1: the valid candidate beats a better-fitting overlap; group 2: none valid
    >>> best_candidates([0.1, 0.01, 0.2, 0.3], [2.0, 0.3, 0.2, 0.1], 2).tolist()
    [0, 2]
    """
    r = np.asarray(r_factors, dtype=float).ravel()
    d = np.asarray(min_distances, dtype=float).ravel()
    k = int(n_candidates)
    if k < 1 or r.shape != d.shape or r.size % k:
        raise ShapeError(
            f"r_factors has {r.size} entries and min_distances {d.size}; expected two equal lengths that are a "
            f"multiple of n_candidates={n_candidates!r} (groups of candidates stored one after the other)"
        )
    r = np.where(np.isfinite(r), r, np.inf)
    invalid = ~(d >= min_distance)  # NaN counts as invalid
    key = np.lexsort((r.reshape(-1, k), invalid.reshape(-1, k)), axis=-1)[:, 0] if r.size else np.zeros(0, int)
    return key + k * np.arange(r.size // k)


def broaden_peaks(two_theta: Any, intensity: Any, grid: np.ndarray, fwhm: float) -> np.ndarray:
    """Sum of Gaussians ``I_k exp(-(x - x_k)^2 / (2 sigma^2))`` on ``grid``.

    Parameters
    ----------
    two_theta, intensity : array, shape (n_peaks,)
        Peak positions (degrees) and heights.
    grid : array, shape (n_grid,)
        2 theta values (degrees).
    fwhm : float
        Full width at half maximum, degrees; ``sigma = fwhm / (2 sqrt(2 ln 2))``.

    Returns
    -------
    numpy.ndarray, shape (n_grid,)
    """
    x = np.asarray(two_theta, dtype=float).reshape(-1)
    h = np.asarray(intensity, dtype=float).reshape(-1)
    if x.shape != h.shape:
        raise ShapeError(f"two_theta has shape {x.shape} but intensity {h.shape}; give one height per peak")
    if fwhm <= 0:
        raise CrystalfitError(f"fwhm={fwhm} must be > 0 degrees")
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    out = np.zeros(len(grid))
    for start in range(0, len(x), 256):  # bounded memory for many peaks
        d = (grid[None, :] - x[start : start + 256, None]) / sigma
        out += h[start : start + 256] @ np.exp(-0.5 * d * d)
    return out


def powder_pattern(
    structure: Any,
    *,
    wavelength: str | float = "CuKa",
    two_theta_range: tuple[float, float] = (5.0, 90.0),
    step: float = 0.02,
    fwhm: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """Broadened powder pattern of a structure.

    Parameters
    ----------
    structure : ase.Atoms or pymatgen Structure
    wavelength : str or float
        pymatgen XRDCalculator wavelength (``"CuKa"`` = 1.54184 Angstrom, or Angstrom).
    two_theta_range : (float, float)
        Degrees.
    step : float
        Grid spacing, degrees.
    fwhm : float
        Gaussian full width at half maximum, degrees.

    Returns
    -------
    grid : numpy.ndarray, shape (n_grid,)
        2 theta, degrees.
    profile : numpy.ndarray, shape (n_grid,)
        Intensity scaled to a maximum of 1 (all zeros if no peak in range).
    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator

    s = as_structure_or_none(structure)
    if s is None:
        raise CrystalfitError(
            f"cannot compute a powder pattern of {type(structure).__name__} (None or an invalid structure); "
            "pass a valid ase.Atoms or pymatgen Structure"
        )
    lo, hi = two_theta_range
    if not 0 <= lo < hi <= 180 or step <= 0:
        raise CrystalfitError(
            f"two_theta_range={two_theta_range} / step={step} are invalid; need 0 <= lo < hi <= 180 and step > 0"
        )
    grid = np.arange(lo, hi + 0.5 * step, step)
    # peaks slightly outside the range still contribute tails
    pad = 4.0 * fwhm
    pat = XRDCalculator(wavelength=wavelength).get_pattern(s, scaled=False,
                                                           two_theta_range=(max(lo - pad, 0.0), min(hi + pad, 180.0)))
    profile = broaden_peaks(pat.x, pat.y, grid, fwhm)
    m = profile.max() if profile.size else 0.0
    return grid, profile / m if m > 0 else profile


def pattern_similarity(profile_a: Any, profile_b: Any) -> float:
    """Cosine similarity of two profiles on the same grid, in [0, 1] for non-negative profiles.

    Returns 0 when either profile is all zeros.
    """
    a = np.asarray(profile_a, dtype=float).reshape(-1)
    b = np.asarray(profile_b, dtype=float).reshape(-1)
    if a.shape != b.shape:
        raise ShapeError(f"profiles have shapes {a.shape} and {b.shape}; compute both on the same 2theta grid")
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b / (na * nb))


def _similarity_one(a, b, kwargs) -> float:
    if a is None or b is None:
        return 0.0
    try:
        return pattern_similarity(powder_pattern(a, **kwargs)[1], powder_pattern(b, **kwargs)[1])
    except Exception:  # XRDCalculator failure on a broken generated structure: no agreement
        return 0.0


def powder_similarity(
    generated: Sequence[Any],
    reference: Sequence[Any],
    *,
    wavelength: str | float = "CuKa",
    two_theta_range: tuple[float, float] = (5.0, 90.0),
    step: float = 0.02,
    fwhm: float = 0.1,
    n_jobs: int | None = None,
    verbose: bool = False,
) -> np.ndarray:
    """Cosine similarity of the broadened powder patterns of paired structures.

    Parameters
    ----------
    generated, reference : sequence of structures, length n
        ``generated[i]`` is compared with ``reference[i]``; a ``None``
        (failed) generated entry scores 0.
    wavelength, two_theta_range, step, fwhm
        See :func:`powder_pattern`.
    n_jobs : int, optional
        joblib workers.
    verbose : bool
        tqdm progress bar.

    Returns
    -------
    numpy.ndarray, shape (n,)
        In [0, 1].
    """
    check_same_length(generated, reference, "generated", "reference")
    gen = as_structures(generated, "generated")
    ref = as_structures(reference, "reference")
    kwargs = dict(wavelength=wavelength, two_theta_range=two_theta_range, step=step, fwhm=fwhm)
    return np.asarray(
        parallel_map(_similarity_one, [(g, r, kwargs) for g, r in zip(gen, ref)], n_jobs=n_jobs, verbose=verbose,
                     desc="powder patterns"),
        dtype=float,
    )
