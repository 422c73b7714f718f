"""Structural and compositional validity (CDVAE / DiffCSP ``eval_utils.py``).

Structural validity
    The periodic (minimum-image) distance between every pair of *distinct*
    sites is at least ``cutoff`` = 0.5 Angstrom and the cell volume is at least
    0.1 Angstrom^3.  Exactly as the reference code, the distance of a site to its
    own periodic image is not tested (pymatgen ``distance_matrix`` with the
    diagonal padded by ``cutoff + 10``), so a one-atom cell is always
    structurally valid.

Compositional validity (SMACT)
    On the elements and the gcd-reduced atom counts:

    1. valid if there is one element;
    2. valid if every element is in ``smact.metals`` (alloys);
    3. otherwise valid if some combination of SMACT oxidation states is charge
       neutral (``smact.neutral_ratios(ox, stoichs=[(c,) for c in counts],
       threshold=max(counts))``) and passes the Pauling electronegativity test
       (``smact.screening.pauling_test``; missing electronegativity data, a
       ``TypeError``, counts as a pass).  Compositions with more than 1e7
       oxidation-state combinations are invalid (DiffCSP's guard).

    With smact 4.x ``neutral_ratios`` returns a list (empty = not neutral)
    instead of the older ``(bool, ratios)`` pair; both are handled.
    Results are cached per reduced composition (``functools.lru_cache``).
"""
from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from ._utils import as_structures, parallel_map

__all__ = [
    "structure_validity",
    "composition_validity",
    "validity",
    "smact_validity",
    "reduced_composition",
    "STRUCT_MIN_DISTANCE",
    "STRUCT_MIN_VOLUME",
]

#: Minimum allowed distance between two distinct sites, Angstrom.
STRUCT_MIN_DISTANCE = 0.5
#: Minimum allowed cell volume, Angstrom^3.
STRUCT_MIN_VOLUME = 0.1
#: DiffCSP: more oxidation-state combinations than this -> invalid.
MAX_OX_COMBINATIONS = 1e7


def _struct_valid_one(structure, cutoff: float, min_volume: float) -> bool:
    if structure is None:
        return False
    try:
        volume = float(structure.volume)
        if not np.isfinite(volume) or volume < min_volume:
            return False
        dist = np.asarray(structure.distance_matrix, dtype=float)
    except Exception:  # construction failure counts as invalid, as in the reference
        return False
    if dist.size == 0:
        return False
    dist = dist + np.diag(np.full(dist.shape[0], cutoff + 10.0))
    return bool(np.all(np.isfinite(dist)) and dist.min() >= cutoff)


def structure_validity(
    structures: Sequence[Any],
    *,
    cutoff: float = STRUCT_MIN_DISTANCE,
    min_volume: float = STRUCT_MIN_VOLUME,
    n_jobs: int | None = None,
    verbose: bool = False,
) -> np.ndarray:
    """Structural validity of each structure.

    Parameters
    ----------
    structures : sequence of ase.Atoms / pymatgen Structure / None
        ``None`` (a failed generation) is invalid.
    cutoff : float
        Minimum periodic distance between distinct sites, Angstrom (0.5).
    min_volume : float
        Minimum cell volume, Angstrom^3 (0.1).
    n_jobs : int, optional
        joblib workers (``None``: the active backend's default).
    verbose : bool
        tqdm progress bar.

    Returns
    -------
    numpy.ndarray of bool, shape (n,)

    Examples
    --------
    >>> from ase import Atoms
    >>> a = Atoms("Cu2", cell=[5, 5, 5], positions=[[0, 0, 0], [0.3, 0, 0]], pbc=True)
    >>> structure_validity([a]).tolist()
    [False]
    """
    structs = as_structures(structures, "structures")
    out = parallel_map(
        _struct_valid_one, [(s, cutoff, min_volume) for s in structs], n_jobs=n_jobs, verbose=verbose,
        desc="structure validity",
    )
    return np.asarray(out, dtype=bool).reshape(len(structs))


def reduced_composition(structure) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Elements (sorted by atomic number) and gcd-reduced integer counts.

    Parameters
    ----------
    structure : pymatgen Structure

    Returns
    -------
    symbols : tuple of str
    counts : tuple of int
        ``counts / gcd(counts)``; e.g. Na2Cl2 -> (('Na', 'Cl'), (1, 1)).
    """
    numbers = np.asarray(structure.atomic_numbers, dtype=int)
    z, counts = np.unique(numbers, return_counts=True)  # sorted by Z, like the reference
    counts = counts // np.gcd.reduce(counts)
    from pymatgen.core.periodic_table import Element

    symbols = tuple(Element.from_Z(int(x)).symbol for x in z)
    return symbols, tuple(int(c) for c in counts)


def _is_neutral(ratios) -> bool:
    # smact >= 3: list of ratios; older: (bool, ratios)
    if isinstance(ratios, tuple) and len(ratios) == 2 and isinstance(ratios[0], (bool, np.bool_)):
        return bool(ratios[0])
    return len(ratios) > 0


@lru_cache(maxsize=65536)
def smact_validity(symbols: tuple[str, ...], counts: tuple[int, ...], use_pauling_test: bool = True,
                   include_alloys: bool = True) -> bool:
    """SMACT charge-neutrality + electronegativity test of one composition.

    Parameters
    ----------
    symbols : tuple of str
        Element symbols, e.g. ``("Na", "Cl")``.
    counts : tuple of int
        Atom counts in the same order (reduce them by their gcd first to
        match the reference; :func:`reduced_composition` does).
    use_pauling_test : bool
        Apply the Pauling electronegativity ordering test (True).
    include_alloys : bool
        All-metal compositions are valid (True).

    Returns
    -------
    bool
    """
    import smact
    from smact.screening import pauling_test

    if len(set(symbols)) == 1:
        return True
    if include_alloys and all(s in smact.metals for s in symbols):
        return True
    try:
        space = smact.element_dictionary(symbols)
    except Exception:  # element unknown to SMACT
        return False
    elems = [space[s] for s in symbols]
    electronegs = [e.pauling_eneg for e in elems]
    ox_combos = [e.oxidation_states for e in elems]
    n_comb = 1
    for ox in ox_combos:
        n_comb *= len(ox)
    if n_comb > MAX_OX_COMBINATIONS or n_comb == 0:
        return False
    threshold = int(max(counts))
    stoichs = [(int(c),) for c in counts]
    for ox_states in itertools.product(*ox_combos):
        if not _is_neutral(smact.neutral_ratios(ox_states, stoichs=stoichs, threshold=threshold)):
            continue
        if not use_pauling_test:
            return True
        try:
            if pauling_test(ox_states, electronegs):
                return True
        except TypeError:  # missing electronegativity data: counts as a pass
            return True
    return False


def _comp_valid_one(structure) -> bool:
    if structure is None:
        return False
    symbols, counts = reduced_composition(structure)
    return smact_validity(symbols, counts)


def composition_validity(
    structures: Sequence[Any], *, n_jobs: int | None = None, verbose: bool = False
) -> np.ndarray:
    """SMACT compositional validity of each structure (see module docstring).

    Parameters
    ----------
    structures : sequence of ase.Atoms / pymatgen Structure / None
        ``None`` is invalid.
    n_jobs : int, optional
        joblib workers.  Each distinct reduced composition is tested once
        per call; the tests are spread over the workers, and each process
        keeps its own ``lru_cache`` of results.
    verbose : bool
        tqdm progress bar.

    Returns
    -------
    numpy.ndarray of bool, shape (n,)

    Examples
    --------
    >>> from pymatgen.core import Lattice, Structure
    >>> nacl = Structure(Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    >>> composition_validity([nacl]).tolist()
    [True]
    """
    structs = as_structures(structures, "structures")
    keys = [None if s is None else reduced_composition(s) for s in structs]
    distinct = sorted({k for k in keys if k is not None})
    results = parallel_map(smact_validity, distinct, n_jobs=n_jobs, verbose=verbose, desc="SMACT validity")
    table = dict(zip(distinct, results))
    return np.asarray([False if k is None else table[k] for k in keys], dtype=bool).reshape(len(structs))


def validity(structures: Sequence[Any], *, n_jobs: int | None = None, verbose: bool = False) -> np.ndarray:
    """Structural AND compositional validity, shape (n,) bool."""
    structs = as_structures(structures, "structures")
    return structure_validity(structs, n_jobs=n_jobs, verbose=verbose) & composition_validity(
        structs, n_jobs=n_jobs, verbose=verbose
    )
