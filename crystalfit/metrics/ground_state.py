"""Ground-state metrics: how close generated structures are to their relaxed
counterparts (DP-CDVAE paper, Sec. III C and Table III).

``generated[i]`` is a structure produced by a model and ``relaxed[i]`` the
result of relaxing it (DFT in the paper; e.g.
:func:`crystalfit.calculators.relax` here).  Four numbers:

match rate
    Fraction of pairs for which pymatgen's
    ``StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)`` (the
    reconstruction criteria of the paper) matches the generated structure to
    the relaxed one, ``get_rms_dist(generated[i], relaxed[i]) is not None``
    (the relaxed structure is the reference, "base", structure).  In [0, 1];
    the paper prints percent.
<delta_rms>
    Mean over the matched pairs of the first value of ``get_rms_dist``: the
    RMS displacement between matched sites normalised by ``(V/N)^(1/3)``
    (dimensionless).  pymatgen rescales both lattices to a common volume
    before matching, so this measures shape and positions; the volume change
    is measured separately by ``Delta V_rms``.
Delta V_rms (Angstrom^3/atom)
    ``dV_i = V_gen_i / N_gen_i - V_rel_i / N_rel_i``, the change of the volume
    per atom, and ``Delta V_rms = sqrt(mean_i dV_i^2)``.
Delta E_rms (eV/atom; the paper prints meV/atom)
    ``dE_i = E_gen_i / N_gen_i - E_rel_i / N_rel_i`` with both energies from
    the same method, ``Delta E_rms = sqrt(mean_i dE_i^2)``.

The paper's text ("the root mean square differences in volume and energy ...
between the generated structures and the relaxed structures") does not say
whether the RMS runs over all relaxed pairs or only the matched ones; its
Fig. S2 histograms all relaxed pairs.  Default here: ``subset="all"``, every
pair where both structures exist (and both energies are finite, for ``dE``);
``subset="matched"`` restricts ``dV`` and ``dE`` to matched pairs.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..exceptions import CrystalfitError
from ._utils import as_float_array, as_structures, check_same_length, parallel_map

__all__ = ["ground_state_metrics"]


def _rms_dist(gen, rel, stol: float, angle_tol: float, ltol: float) -> float:
    from pymatgen.analysis.structure_matcher import StructureMatcher

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = StructureMatcher(stol=stol, angle_tol=angle_tol, ltol=ltol).get_rms_dist(gen, rel)
    except Exception:  # matcher failures count as "no match", as in the CDVAE/DiffCSP metric code
        return np.nan
    return np.nan if res is None else float(res[0])


def _rms(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.sqrt(np.mean(x**2))) if len(x) else float("nan")


def ground_state_metrics(
    generated: Sequence[Any],
    relaxed: Sequence[Any],
    generated_energies: Sequence[float] | None = None,
    relaxed_energies: Sequence[float] | None = None,
    stol: float = 0.5,
    angle_tol: float = 10,
    ltol: float = 0.3,
    *,
    energies_per_atom: bool = False,
    subset: str = "all",
    n_jobs: int | None = None,
    verbose: bool = False,
) -> dict:
    """Match rate, <delta_rms>, Delta V_rms and Delta E_rms of generated vs relaxed structures.

    Parameters
    ----------
    generated : sequence of structures, length n
        ase.Atoms / pymatgen Structure / anything :func:`crystalfit.io.to_structure`
        reads, or ``None`` (a failed generation: unmatched, no dV / dE).
    relaxed : sequence of structures, length n
        ``relaxed[i]`` is ``generated[i]`` after relaxation (``None`` if it failed).
    generated_energies, relaxed_energies : sequence of float, length n, optional
        Energies of the generated and relaxed structures from one method, in eV
        per structure (or eV/atom with ``energies_per_atom=True``); ``None``
        entries or NaN are skipped.  Without both, ``delta_energy_rms`` is NaN.
        :func:`crystalfit.calculators.relax` returns them as
        ``initial_energies`` and ``energies``.
    stol, angle_tol, ltol : float
        ``StructureMatcher`` tolerances (paper: 0.5, 10 degrees, 0.3).
    energies_per_atom : bool
        The energies given are already per atom.
    subset : {"all", "matched"}
        Pairs over which ``Delta V_rms`` and ``Delta E_rms`` are taken.
    n_jobs : int, optional
        joblib workers for the matcher.
    verbose : bool
        tqdm progress bar.

    Returns
    -------
    dict
        ``match_rate`` (float in [0, 1]), ``mean_rms_dist`` (<delta_rms>,
        dimensionless, NaN if nothing matched), ``delta_volume_rms``
        (Angstrom^3/atom), ``delta_energy_rms`` (eV/atom), ``n_pairs``,
        ``n_matched``, and per-pair arrays of shape (n,): ``rms_dist`` (NaN
        where unmatched), ``delta_volume`` (Angstrom^3/atom, generated minus
        relaxed), ``delta_energy`` (eV/atom, generated minus relaxed).

    Examples
    --------
    >>> from ase.build import bulk
    >>> gen, rel = bulk("Cu", a=3.7), bulk("Cu", a=3.6)  # V/N = a^3/4
    >>> m = ground_state_metrics([gen], [rel], [0.10], [0.05])
    >>> m["match_rate"], round(m["delta_volume_rms"], 3), round(m["delta_energy_rms"], 3)
    (1.0, 0.999, 0.05)
    """
    if subset not in ("all", "matched"):
        raise CrystalfitError(f"subset must be 'all' or 'matched', got {subset!r}")
    gens = as_structures(generated, "generated")
    rels = as_structures(relaxed, "relaxed")
    check_same_length(gens, rels, "generated", "relaxed")
    n = len(gens)
    if (generated_energies is None) != (relaxed_energies is None):
        raise CrystalfitError(
            "pass both generated_energies and relaxed_energies (or neither); Delta E compares the two"
        )
    if n == 0:
        raise CrystalfitError("generated and relaxed are empty; pass at least one pair of structures")

    both = np.array([g is not None and r is not None for g, r in zip(gens, rels)], dtype=bool)
    idx = np.flatnonzero(both)
    rms = np.full(n, np.nan)
    if len(idx):
        rms[idx] = parallel_map(
            _rms_dist, [(gens[i], rels[i], stol, angle_tol, ltol) for i in idx],
            n_jobs=n_jobs, verbose=verbose, desc="StructureMatcher",
        )
    matched = np.isfinite(rms)

    nat_g = np.array([len(s) if s is not None else np.nan for s in gens], dtype=float)
    nat_r = np.array([len(s) if s is not None else np.nan for s in rels], dtype=float)
    vol_g = np.array([s.volume if s is not None else np.nan for s in gens], dtype=float)
    vol_r = np.array([s.volume if s is not None else np.nan for s in rels], dtype=float)
    d_vol = vol_g / nat_g - vol_r / nat_r

    d_e = np.full(n, np.nan)
    if generated_energies is not None:
        e_g = as_float_array(generated_energies, "generated_energies")
        e_r = as_float_array(relaxed_energies, "relaxed_energies")
        check_same_length(e_g, gens, "generated_energies", "generated")
        check_same_length(e_r, rels, "relaxed_energies", "relaxed")
        d_e = e_g - e_r if energies_per_atom else e_g / nat_g - e_r / nat_r
        d_e = np.where(both, d_e, np.nan)

    use = matched if subset == "matched" else both
    return {
        "match_rate": float(matched.mean()),
        "mean_rms_dist": float(rms[matched].mean()) if matched.any() else float("nan"),
        "delta_volume_rms": _rms(d_vol[use]),
        "delta_energy_rms": _rms(d_e[use]),
        "n_pairs": int(n),
        "n_matched": int(matched.sum()),
        "rms_dist": rms,
        "delta_volume": d_vol,
        "delta_energy": d_e,
    }
