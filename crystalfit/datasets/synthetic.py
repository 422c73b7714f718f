"""Synthetic data sets of the XRD-guided diffusion paper (xrd-guided-diffusion.md).

Two families of toy crystals, each augmented with Gaussian noise on the
fractional coordinates (``N(0, noise^2)``, default ``noise = 0.01`` as in the
paper) and wrapped back into ``[0, 1)``:

* **Perovskite-cell arrangements of CoN2OTl** ("Selective Generation" and
  "Generation of Unlearned Crystals"): a cubic cell, ``a = 4.24596`` Angstrom,
  with five sites :data:`PEROVSKITE_SITES`; an *arrangement* says which element
  sits on which site (:data:`PEROVSKITE_ARRANGEMENTS`).
* **Cu3Au supercells** (Appendix D): two FCC cells stacked along ``c``
  (``a x a x 2a``, 8 sites), 6 Cu + 2 Au, all 28 Au placements; 4 of them are
  the L1_2 superlattice (Cu3Au ordered phase).

Everything returns plain ``ase.Atoms`` (periodic, site order = the site tables
below) with provenance in ``atoms.info``.
"""
from __future__ import annotations

import itertools
import numbers as _numbers
from typing import Any, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from ..exceptions import CrystalfitError, UnknownElementError

__all__ = [
    "PEROVSKITE_A",
    "PEROVSKITE_SITES",
    "PEROVSKITE_ARRANGEMENTS",
    "CU3AU_A",
    "CU3AU_SITES",
    "make_perovskite",
    "make_perovskite_arrangements",
    "cu3au_placements",
    "make_cu3au",
    "make_cu3au_supercells",
]

#: Cubic lattice constant (Angstrom) of Crystal-1/2/3.  It is the lattice
#: constant of Perov-5 entry 6334 (CoTlON2, a = 4.24596403 A, in the CDVAE
#: perov_5 train split), from which the paper evidently built its toy crystals.
PEROVSKITE_A = 4.24596

#: The five sites of the cubic cell in fractional coordinates, shape (5, 3):
#: corner, body centre, and the three face centres (xz, xy, yz) -- the site
#: order of the Perov-5 CIFs (A, B, X, X, X for a real ABX3 perovskite).
PEROVSKITE_SITES = np.array(
    [[0.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
)

#: Named arrangements: element on each site of :data:`PEROVSKITE_SITES`.
#:
#: * ``crystal-1`` = [O, N, N, Tl, Co] and ``crystal-2`` = [Tl, O, N, N, Co]
#:   (paper, Figure 1).
#: * ``crystal-3`` = [Co, Tl, N, N, O]: the real perovskite ordering of
#:   CoTlON2 (Co on the A site, Tl on the B site, anions on the faces), i.e.
#:   Perov-5 entry 6334 with its small relaxations removed.  The paper takes
#:   its Crystal-3 "from the Perov-5 dataset" and this entry is the one whose
#:   lattice constant the paper uses, so this is our reconstruction of it.
#:   We checked that it is clearly different from both others: of the 60
#:   orderings of CoN2OTl, which fall into 13 classes under pymatgen's
#:   StructureMatcher, it is in a class of its own (no match with crystal-1
#:   or crystal-2, even at stol=0.5), and with intensities
#:   ``I(hkl) = |sum_j Z_j exp(2 pi i h.x_j)|^2`` (f = Z, the 125 h, k, l in
#:   -2..2) and the distance ``d = min_R ||I_a/||I_a|| - I_b(R h)/||I_b||||_2``
#:   (minimum over the 48 cubic point operations R, so a rotated copy counts
#:   as the same pattern; d lies in [0, sqrt 2]) it has
#:   d(crystal-3, crystal-1) = 0.520 and d(crystal-3, crystal-2) = 0.449,
#:   whereas d(crystal-1, crystal-2) = 0.160.  Its smaller distance (0.449)
#:   is the third largest of the 11 classes that contain neither crystal-1
#:   nor crystal-2; the largest is 0.460 ([O, Tl, Co, N, N]).
PEROVSKITE_ARRANGEMENTS: dict[str, tuple[str, ...]] = {
    "crystal-1": ("O", "N", "N", "Tl", "Co"),
    "crystal-2": ("Tl", "O", "N", "N", "Co"),
    "crystal-3": ("Co", "Tl", "N", "N", "O"),
}

#: Cubic lattice constant (Angstrom) of the Cu3Au FCC cell: 3.75 A, the room
#: temperature value of ordered (L1_2) Cu3Au (3.74-3.75 A in the literature).
#: The paper does not state the value it used.
CU3AU_A = 3.75

_FCC = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])
#: The 8 FCC sites of the ``a x a x 2a`` supercell in fractional coordinates,
#: shape (8, 3): sites 0-3 are the lower FCC cell, sites 4-7 = sites 0-3
#: shifted by one FCC cell (fractional z + 1/2).
CU3AU_SITES = np.vstack([_FCC * [1.0, 1.0, 0.5], _FCC * [1.0, 1.0, 0.5] + [0.0, 0.0, 0.5]])


# --------------------------------------------------------------------------- helpers
def _check_random_state(random_state: Any):
    """None / int / np.random.RandomState / np.random.Generator -> an RNG with ``normal``, ``permutation``."""
    if random_state is None or isinstance(random_state, (np.random.RandomState, np.random.Generator)):
        return np.random.mtrand._rand if random_state is None else random_state
    if isinstance(random_state, _numbers.Integral) and not isinstance(random_state, bool):
        return np.random.RandomState(int(random_state))
    raise CrystalfitError(
        f"random_state must be None, an int, a numpy RandomState or Generator, got {random_state!r} "
        f"(type {type(random_state).__name__}); pass e.g. random_state=0"
    )


def _check_n_noise(n_samples: Any, noise: Any) -> tuple[int, float]:
    if isinstance(n_samples, bool) or not isinstance(n_samples, _numbers.Integral) or n_samples < 1:
        raise CrystalfitError(
            f"n_samples must be a positive integer, got {n_samples!r}; pass e.g. n_samples=100"
        )
    try:
        noise_f = float(noise)
    except (TypeError, ValueError):
        noise_f = float("nan")
    if not np.isfinite(noise_f) or noise_f < 0:
        raise CrystalfitError(
            f"noise must be a finite number >= 0 (standard deviation in fractional coordinates), got {noise!r}; "
            "pass e.g. noise=0.01 as in the paper, or 0 for ideal positions"
        )
    return int(n_samples), noise_f


def _wrap01(frac: np.ndarray) -> np.ndarray:
    """Map fractional coordinates into [0, 1) (also for -1e-17 -> 0.0)."""
    out = frac - np.floor(frac)
    out[out >= 1.0] -= 1.0
    return out


def _noisy(sites: np.ndarray, n: int, noise: float, rng) -> np.ndarray:
    """(n, S, 3) wrapped ``sites + N(0, noise^2)``; draws nothing when noise == 0."""
    frac = np.broadcast_to(sites, (n,) + sites.shape).copy()
    if noise > 0:
        frac += rng.normal(0.0, noise, size=frac.shape)
    return _wrap01(frac)


def _symbols(arr: Sequence[Any], where: str) -> tuple[str, ...]:
    out = []
    for s in arr:
        if not isinstance(s, str) or s not in atomic_numbers or atomic_numbers[s] < 1:
            raise UnknownElementError(
                f"{where}: {s!r} is not an element symbol; an arrangement is 5 element symbols, one per site "
                f"of PEROVSKITE_SITES, e.g. ['O', 'N', 'N', 'Tl', 'Co']"
            )
        out.append(s)
    if len(out) != len(PEROVSKITE_SITES):
        raise CrystalfitError(
            f"{where} has {len(out)} symbols, expected {len(PEROVSKITE_SITES)} (one per site of PEROVSKITE_SITES); "
            "pass 5 element symbols, e.g. ['O', 'N', 'N', 'Tl', 'Co']"
        )
    return tuple(out)


def _one_arrangement(arr: Any, where: str) -> tuple[str, tuple[str, ...]]:
    """A name or a 5-symbol sequence -> (name, symbols)."""
    if isinstance(arr, str):
        if arr not in PEROVSKITE_ARRANGEMENTS:
            raise CrystalfitError(
                f"{where}: unknown arrangement {arr!r}; choose one of {sorted(PEROVSKITE_ARRANGEMENTS)} "
                "or give 5 element symbols, one per site of PEROVSKITE_SITES"
            )
        return arr, PEROVSKITE_ARRANGEMENTS[arr]
    symbols = _symbols(arr, where)
    for name, known in PEROVSKITE_ARRANGEMENTS.items():
        if known == symbols:
            return name, symbols
    return "-".join(symbols), symbols


def _resolve(arrangement: Any) -> list[tuple[str, tuple[str, ...]]]:
    """Name | 5 symbols | list of names / symbol lists -> list of (name, symbols)."""
    if isinstance(arrangement, str):
        return [_one_arrangement(arrangement, "arrangement")]
    if not isinstance(arrangement, Sequence) and not isinstance(arrangement, np.ndarray):
        raise CrystalfitError(
            f"arrangement must be a name, a list of 5 element symbols or a list of names, got type "
            f"{type(arrangement).__name__}; choose from {sorted(PEROVSKITE_ARRANGEMENTS)}"
        )
    items = list(arrangement)
    if not items:
        raise CrystalfitError(
            f"arrangement is an empty list; give a name from {sorted(PEROVSKITE_ARRANGEMENTS)}, "
            "5 element symbols, or a non-empty list of names"
        )
    if all(isinstance(s, str) for s in items) and not any(s in PEROVSKITE_ARRANGEMENTS for s in items):
        return [_one_arrangement(items, "arrangement")]  # one arrangement given as symbols
    return [_one_arrangement(a, f"arrangement[{i}]") for i, a in enumerate(items)]


# --------------------------------------------------------------------------- perovskite cells
def make_perovskite(arrangement: str | Sequence[str]) -> Atoms:
    """Noise-free cubic 5-site cell of one arrangement.

    Parameters
    ----------
    arrangement : str or sequence of 5 str
        A key of :data:`PEROVSKITE_ARRANGEMENTS` (``"crystal-1"``, ...) or five
        element symbols, one per site of :data:`PEROVSKITE_SITES`.

    Returns
    -------
    ase.Atoms
        5 atoms, cell ``diag(a, a, a)`` with ``a = PEROVSKITE_A`` Angstrom,
        ``info["arrangement"]`` (name, or the symbols joined by ``-``) and
        ``info["source_id"]``.

    Examples
    --------
    >>> make_perovskite("crystal-1").get_chemical_symbols()
    ['O', 'N', 'N', 'Tl', 'Co']
    """
    name, symbols = _one_arrangement(arrangement, "arrangement")
    atoms = Atoms(symbols, cell=np.eye(3) * PEROVSKITE_A, scaled_positions=PEROVSKITE_SITES, pbc=True)
    atoms.info.update(arrangement=name, source_id=f"perovskite-{name}")
    return atoms


def make_perovskite_arrangements(
    arrangement: str | Sequence[Any],
    n_samples: int,
    noise: float = 0.01,
    random_state: Any = None,
) -> list[Atoms]:
    """Noisy copies of perovskite-cell arrangements (paper: 5,000 per crystal).

    Parameters
    ----------
    arrangement : str, sequence of 5 str, or sequence of names
        One arrangement (a key of :data:`PEROVSKITE_ARRANGEMENTS` or 5 element
        symbols), or a list of several (names and/or 5-symbol lists) to mix:
        the samples are split evenly among them (the first ``n_samples % k``
        get one more) and shuffled with ``random_state``.
    n_samples : int
        Number of crystals, >= 1.
    noise : float
        Standard deviation of the Gaussian noise added independently to every
        fractional coordinate (dimensionless; 0.01 is 0.042 Angstrom), as in the
        paper; the result is wrapped into [0, 1).  0 gives ideal cells.
    random_state : None, int, numpy RandomState or Generator
        Seed for the noise and the shuffle.

    Returns
    -------
    list of ase.Atoms, length n_samples
        Each with 5 atoms in the cubic cell ``a = PEROVSKITE_A``, site order as
        :data:`PEROVSKITE_SITES`, ``info["arrangement"]`` (name) and
        ``info["source_id"]`` (``"perovskite-<name>-<i>"``, i = sample index).

    Examples
    --------
    >>> xs = make_perovskite_arrangements(["crystal-1", "crystal-3"], 10, random_state=0)
    >>> sorted(a.info["arrangement"] for a in xs).count("crystal-1")
    5
    """
    n, noise = _check_n_noise(n_samples, noise)
    choices = _resolve(arrangement)
    rng = _check_random_state(random_state)
    k = len(choices)
    which = np.arange(n) % k
    if k > 1:
        which = which[rng.permutation(n)]
    frac = _noisy(PEROVSKITE_SITES, n, noise, rng)
    cell = np.eye(3) * PEROVSKITE_A
    out = []
    for i in range(n):
        name, symbols = choices[which[i]]
        atoms = Atoms(symbols, cell=cell, scaled_positions=frac[i], pbc=True)
        atoms.info.update(arrangement=name, source_id=f"perovskite-{name}-{i}")
        out.append(atoms)
    return out


# --------------------------------------------------------------------------- Cu3Au
def cu3au_placements() -> list[dict]:
    """The 28 ways to put 2 Au on the 8 FCC sites of the ``a x a x 2a`` Cu3Au supercell.

    Returns
    -------
    list of 28 dict
        In ``itertools.combinations(range(8), 2)`` order, each with

        * ``"index"``: 0..27,
        * ``"au_sites"``: (i, j), the Au site indices into :data:`CU3AU_SITES`,
        * ``"min_au_au"``: the shortest Au-Au distance in Angstrom, over all
          periodic images (minimum image),
        * ``"au_isolated"``: no Au has an Au nearest neighbour (min_au_au >
          a/sqrt 2 = 2.652 A, the FCC nearest-neighbour distance),
        * ``"superlattice"``: the L1_2 ordered Cu3Au phase, i.e. the two Au are
          related by the FCC lattice translation c/2 (fractional (0, 0, 1/2)), so
          the supercell is one Cu3Au unit cell (Au on one simple-cubic
          sublattice) repeated -- the paper's definition "one of four Cu atoms
          in the base FCC lattice is replaced with Au ... and this cell is
          periodically repeated".

        Exactly 4 placements are superlattices (4/28 = 14 %, as in the paper).
        Note that 8 placements are ``au_isolated``: besides the 4 L1_2 ones,
        the 4 with Au at e.g. (0,0,0) and (1/2,1/2,1/2) (the D0_22 / Al3Ti-type
        ordering, Au-Au 4.59 A) have no Au-Au nearest neighbours either, so the
        paper's figure caption ("Au atoms are never adjacent") alone would give
        8/28; the paper's count of 4 matches the L1_2 definition used here.
    """
    a = CU3AU_A
    cell = np.diag([a, a, 2 * a])
    images = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=float)  # (27, 3)
    nn = a / np.sqrt(2.0)
    out = []
    for k, (i, j) in enumerate(itertools.combinations(range(len(CU3AU_SITES)), 2)):
        diff = CU3AU_SITES[j] - CU3AU_SITES[i]
        # shortest Au-Au distance: i-j over images, and each Au with its own images (>= a)
        d_ij = np.linalg.norm((diff + images) @ cell, axis=1).min()
        d_self = np.linalg.norm(images[np.any(images != 0, axis=1)] @ cell, axis=1).min()
        d = float(min(d_ij, d_self))
        shift = diff - np.array([0.0, 0.0, 0.5])
        superlattice = bool(np.allclose(shift - np.round(shift), 0.0, atol=1e-9))
        out.append(
            dict(index=k, au_sites=(i, j), min_au_au=d, au_isolated=bool(d > nn + 1e-6), superlattice=superlattice)
        )
    return out


def _placement(placement: Any) -> dict:
    table = cu3au_placements()
    if isinstance(placement, _numbers.Integral) and not isinstance(placement, bool) and 0 <= placement < len(table):
        return table[int(placement)]
    if isinstance(placement, Sequence) and len(placement) == 2:
        key = tuple(sorted(int(s) for s in placement))
        for p in table:
            if p["au_sites"] == key:
                return p
    raise CrystalfitError(
        f"placement must be an index 0..27 or two distinct Au site indices in 0..7, got {placement!r}; "
        "see cu3au_placements()"
    )


def _cu3au_atoms(frac: np.ndarray, p: dict, source_id: str) -> Atoms:
    symbols = ["Cu"] * len(CU3AU_SITES)
    for s in p["au_sites"]:
        symbols[s] = "Au"
    atoms = Atoms(symbols, cell=np.diag([CU3AU_A, CU3AU_A, 2 * CU3AU_A]), scaled_positions=frac, pbc=True)
    atoms.info.update(
        placement=p["index"],
        au_sites=tuple(p["au_sites"]),
        superlattice=p["superlattice"],
        au_isolated=p["au_isolated"],
        source_id=source_id,
    )
    return atoms


def make_cu3au(placement: int | Sequence[int]) -> Atoms:
    """Noise-free Cu6Au2 supercell for one Au placement.

    Parameters
    ----------
    placement : int or (int, int)
        Index 0..27 into :func:`cu3au_placements`, or the two Au site indices.

    Returns
    -------
    ase.Atoms
        8 atoms on :data:`CU3AU_SITES`, cell ``diag(a, a, 2a)``, a = CU3AU_A
        Angstrom; ``info`` holds ``placement`` (0..27), ``au_sites``,
        ``superlattice``, ``au_isolated`` and ``source_id``.
    """
    p = _placement(placement)
    return _cu3au_atoms(CU3AU_SITES, p, f"cu3au-p{p['index']:02d}")


def make_cu3au_supercells(
    n_samples: int,
    noise: float = 0.01,
    random_state: Any = None,
    superlattice_only: bool = False,
) -> list[Atoms]:
    """Noisy Cu6Au2 supercells over all Au placements (paper Appendix D: 10,000 samples).

    The placements are cycled evenly (sample i gets placement ``i % 28``, or
    ``i % 4`` among the superlattices) and then shuffled with
    ``random_state``, so every placement appears ``n_samples // 28`` or one
    more times and the superlattice fraction is 4/28 up to rounding.

    Parameters
    ----------
    n_samples : int
        Number of crystals, >= 1.
    noise : float
        Standard deviation of the Gaussian noise on each fractional coordinate
        (0.01: 0.0375 A along a and b, 0.075 A along c = 2a), wrapped into [0, 1).
    random_state : None, int, numpy RandomState or Generator
        Seed for the shuffle and the noise.
    superlattice_only : bool
        Use only the 4 L1_2 superlattice placements.

    Returns
    -------
    list of ase.Atoms, length n_samples
        8 atoms each (site order :data:`CU3AU_SITES`), cell diag(a, a, 2a);
        ``info["superlattice"]`` (bool), ``info["placement"]`` (0..27),
        ``info["au_sites"]`` (the two Au site indices), ``info["au_isolated"]``
        and ``info["source_id"]`` (``"cu3au-pKK-<i>"``).
    """
    n, noise = _check_n_noise(n_samples, noise)
    rng = _check_random_state(random_state)
    table = cu3au_placements()
    pool = [p for p in table if p["superlattice"]] if superlattice_only else table
    which = (np.arange(n) % len(pool))[rng.permutation(n)]
    frac = _noisy(CU3AU_SITES, n, noise, rng)
    return [
        _cu3au_atoms(frac[i], pool[which[i]], f"cu3au-p{pool[which[i]]['index']:02d}-{i}") for i in range(n)
    ]
