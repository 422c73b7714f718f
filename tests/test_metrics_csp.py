"""CSP metrics: StructureMatcher match rate and RMS distance."""

import numpy as np
import pytest
from ase import Atoms
from joblib import parallel_backend
from pymatgen.core import Lattice, Structure

from crystalfit.exceptions import CrystalfitError
from crystalfit.metrics import evaluate_csp, match_rate, match_rms, rms_distance
from _data import perov_rows





def perovskite(a=3.9):
    """Cubic SrTiO3, 5 atoms."""
    return Structure(
        Lattice.cubic(a), ["Sr", "Ti", "O", "O", "O"],
        [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]],
    )


def displaced(s, index, cart_shift):
    s = s.copy()
    s.translate_sites([index], cart_shift, frac_coords=False, to_unit_cell=True)
    return s


def far_structure(s):
    """Zero-mean 1.5 A displacements of four sites (beyond stol=0.5 for a = 4 A)."""
    far = s.copy()
    shifts = 1.5 * np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 0.0]])
    for i, d in enumerate(shifts):
        far.translate_sites([i], d, frac_coords=False)
    return far, shifts


def test_matches_itself_and_translated_rotated_permuted_copies():
    s = perovskite()
    shifted = s.copy()
    shifted.translate_sites(list(range(len(s))), [0.13, 0.27, 0.41], frac_coords=True, to_unit_cell=True)
    permuted = Structure(s.lattice, [site.specie for site in s][::-1], s.frac_coords[::-1])
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])  # 90 degrees about z (Cartesian)
    rotated = Structure(Lattice(s.lattice.matrix @ rot.T), s.species, s.frac_coords)
    gen = [s, shifted, permuted, rotated]
    best = match_rms(gen, [s] * 4)
    assert np.all(np.isfinite(best))
    np.testing.assert_allclose(best, 0.0, atol=1e-8)
    assert match_rate(gen, [s] * 4) == 1.0


def test_rms_of_small_displacement_matches_closed_form():
    # one of N atoms moved by d; pymatgen removes the mean translation, so
    # rms = |d| sqrt(N - 1) / N, normalised by (V / N)^(1/3).
    s = perovskite(a=4.0)
    d = np.array([0.06, -0.03, 0.02])
    moved = displaced(s, 2, d)
    n = len(s)
    expected = np.linalg.norm(d) * np.sqrt(n - 1) / n / (s.volume / n) ** (1 / 3)
    mean, per_pair = rms_distance([moved], [s], return_per_pair=True)
    assert mean == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(per_pair, [expected], rtol=1e-6)


def test_perturbation_beyond_tolerance_does_not_match():
    s = perovskite(a=4.0)
    # zero-mean displacements of 1.5 A on four sites: normalised RMS 0.57 > stol
    # (pymatgen accepts a match when the RMS, after the best translation, is < stol)
    far, shifts = far_structure(s)
    assert np.sqrt((shifts**2).sum(1).mean()) / (s.volume / 5) ** (1 / 3) > 0.5
    assert match_rate([far], [s]) == 0.0
    assert np.isnan(rms_distance([far], [s]))
    # a looser tolerance accepts it: the tolerances are honoured
    assert match_rate([far], [s], stol=1.0) == 1.0
    # lattice strained beyond ltol (after pymatgen's volume rescaling c/a = 1.57 -> lengths differ by > 30%)
    strained = Structure(Lattice.tetragonal(4.0, 6.3), s.species, s.frac_coords)
    assert match_rate([strained], [s]) == 0.0
    assert match_rate([strained], [s], ltol=0.6) == 1.0


def test_match_criterion_is_the_rms_not_the_largest_displacement():
    """A pair matches when the RMS displacement is below stol (``get_rms_dist``, DiffCSP's and CDVAE's
    metric), even where one site moved further than stol; ``StructureMatcher.fit`` tests the largest
    displacement instead and rejects the same pair."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    s = perovskite(a=4.0)
    n, norm = len(s), (s.volume / len(s)) ** (1 / 3)
    d = np.array([0.0, 0.0, 1.6])  # one O moved by 1.6 A; after the best translation:
    largest, rms = np.linalg.norm(d) * (n - 1) / n / norm, np.linalg.norm(d) * np.sqrt(n - 1) / n / norm
    assert largest > 0.5 > rms  # 0.55 and 0.31
    moved = displaced(s, 2, d)
    assert match_rate([moved], [s]) == 1.0
    assert rms_distance([moved], [s]) == pytest.approx(rms, rel=1e-6)
    assert not StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3).fit(moved, s)


def test_best_of_k_takes_the_min_over_matching_candidates():
    s = perovskite(a=4.0)
    far = far_structure(s)[0]
    small = displaced(s, 2, [0.05, 0.0, 0.0])
    tiny = displaced(s, 2, [0.01, 0.0, 0.0])
    r_small = rms_distance([small], [s])
    r_tiny = rms_distance([tiny], [s])
    best = match_rms([[far, small, tiny], [far, None], [small], []], [s, s, s, s])
    np.testing.assert_allclose(best[[0, 2]], [r_tiny, r_small], rtol=1e-9)
    assert np.isnan(best[1]) and np.isnan(best[3])
    assert match_rate([[far, small], [far, far]], [s, s]) == 0.5


def test_none_counts_as_no_match_and_lengths_are_checked():
    s = perovskite()
    assert match_rate([None, s], [s, s]) == 0.5
    nan_atoms = Atoms("Cu", cell=[3, 3, 3], positions=[[np.nan, 0, 0]], pbc=True)  # failed generation
    assert match_rate([nan_atoms], [s]) == 0.0
    with pytest.raises(CrystalfitError, match="generated has 1 entries but reference has 2"):
        match_rate([s], [s, s])
    with pytest.raises(CrystalfitError, match="gate='bad' is not a known validity gate"):
        match_rate([s], [s], gate="bad")


def test_validity_gates_follow_diffcsp_and_cdvae():
    # reference has two Cu 0.45 A apart (structurally invalid), the prediction 0.55 A (valid)
    lat = Lattice.cubic(3.0)
    ref = Structure(lat, ["Cu", "Cu"], [[0, 0, 0], [0.15, 0, 0]], coords_are_cartesian=False)
    pred = Structure(lat, ["Cu", "Cu"], [[0, 0, 0], [0.55 / 3.0, 0, 0]])
    assert match_rate([pred], [ref]) == 1.0  # geometric match
    assert match_rate([pred], [ref], gate="pred") == 1.0  # CDVAE: only pred.valid
    assert match_rate([pred], [ref], gate="cdvae") == 1.0
    assert match_rate([pred], [ref], gate="both") == 0.0  # DiffCSP 1-sample: pred AND gt valid
    assert match_rate([pred], [ref], gate="diffcsp") == 0.0
    assert match_rate([[pred]], [ref], gate="diffcsp") == 1.0  # DiffCSP best-of-k gates pred only
    # an invalid prediction is never matched when gated
    assert match_rate([ref], [pred], gate="pred") == 0.0
    assert match_rate([ref], [pred]) == 1.0


def test_real_perov_rows_and_parallel_agreement():
    rows = perov_rows(8)
    rng = np.random.default_rng(0)
    gen = []
    for a in rows:
        b = a.copy()
        b.positions += rng.normal(scale=0.05, size=b.positions.shape)
        gen.append(b)
    gen[3] = rows[4]  # a different crystal (different composition): no match
    serial = match_rms(gen, rows, n_jobs=1)
    assert np.isnan(serial[3])
    assert np.isfinite(np.delete(serial, 3)).all()
    assert np.all(serial[np.isfinite(serial)] < 0.1)
    parallel = match_rms(gen, rows, n_jobs=2)
    np.testing.assert_array_equal(np.isnan(serial), np.isnan(parallel))
    np.testing.assert_allclose(serial[np.isfinite(serial)], parallel[np.isfinite(parallel)], rtol=1e-12)
    with parallel_backend("threading", n_jobs=2):  # the backend comes from the context
        threaded = match_rms(gen, rows, verbose=True)
    np.testing.assert_allclose(serial[np.isfinite(serial)], threaded[np.isfinite(threaded)], rtol=1e-12)
    res = evaluate_csp(gen, rows, gate=None)
    assert res["match_rate"] == pytest.approx(7 / 8)
    assert res["rmse"] == pytest.approx(np.nanmean(serial))
    assert res["n_reference"] == 8 and res["n_candidates"] == 1
