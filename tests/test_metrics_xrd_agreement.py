"""R-factor and powder-pattern similarity."""
import numpy as np
import pytest
from ase.build import bulk
from scipy.optimize import minimize_scalar

from crystalfit.exceptions import CrystalfitError, ShapeError
from crystalfit.metrics import broaden_peaks, pattern_similarity, powder_pattern, powder_similarity, r_factor


def test_r_factor_hand_computed():
    assert r_factor([1.0, 2.0], [1.0, 1.0]) == pytest.approx(0.5)  # (0 + 1) / 2
    # least-squares scale s = (1 + 2) / (1 + 4) = 0.6: ((0.6-1)^2 + (1.2-1)^2) / 2 = 0.1
    assert r_factor([1.0, 2.0], [1.0, 1.0], fit_scale=True) == pytest.approx(0.1)
    assert r_factor([2.0, 4.0, 6.0], [1.0, 2.0, 3.0], fit_scale=True) == pytest.approx(0.0, abs=1e-15)
    batch = r_factor([[1.0, 2.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(batch, [0.5, 0.0])


def test_fitted_scale_minimises_the_r_factor():
    rng = np.random.default_rng(0)
    calc, obs = rng.uniform(0, 10, 125), rng.uniform(0, 10, 125)
    best = minimize_scalar(lambda s: np.sum((s * calc - obs) ** 2) / np.sum(obs**2)).fun
    assert r_factor(calc, obs, fit_scale=True) == pytest.approx(best, rel=1e-8)


def test_r_factor_errors():
    with pytest.raises(ShapeError, match=r"calc has shape \(124,\) and obs \(125,\)"):
        r_factor(np.ones(124), np.ones(125))
    with pytest.raises(CrystalfitError, match="obs is all zeros"):
        r_factor(np.ones(3), np.zeros(3))


def test_gaussian_broadening_height_and_fwhm():
    grid = np.linspace(20, 40, 20001)
    prof = broaden_peaks([30.0], [2.0], grid, fwhm=0.5)
    assert prof.max() == pytest.approx(2.0)
    half = grid[prof >= 1.0]
    assert half.max() - half.min() == pytest.approx(0.5, abs=2e-3)
    two = broaden_peaks([25.0, 35.0], [1.0, 3.0], grid, fwhm=0.5)
    np.testing.assert_allclose(two, broaden_peaks([25.0], [1.0], grid, 0.5) + broaden_peaks([35.0], [3.0], grid, 0.5))


def test_powder_similarity_of_identical_translated_and_different_crystals():
    nacl = bulk("NaCl", "rocksalt", a=5.64)
    moved = nacl.copy()
    moved.positions += [0.7, -0.3, 1.1]  # a translation does not change the powder pattern
    kcl = bulk("KCl", "rocksalt", a=6.29)
    cu = bulk("Cu", "fcc", a=3.6)
    sim = powder_similarity([nacl, moved, kcl, None], [nacl, nacl, nacl, nacl])
    assert sim[0] == pytest.approx(1.0) and sim[1] == pytest.approx(1.0, abs=1e-9)
    assert sim[2] < 0.5 and sim[3] == 0.0
    grid, p = powder_pattern(cu)
    assert p.max() == pytest.approx(1.0) and grid[0] == pytest.approx(5.0) and grid[-1] == pytest.approx(90.0)
    # strongest fcc peak (111): Bragg's law with d = a / sqrt(3), Cu K-alpha 1.54184 A
    bragg = 2 * np.degrees(np.arcsin(1.54184 / (2 * 3.6 / np.sqrt(3))))
    assert grid[np.argmax(p)] == pytest.approx(bragg, abs=0.02)
    assert pattern_similarity(p, p) == pytest.approx(1.0)
    assert pattern_similarity(p, np.zeros_like(p)) == 0.0


def test_best_candidates_prefers_valid_then_smallest_r():
    from crystalfit.metrics import best_candidates

    r = [0.10, 0.01, 0.05, 0.20, 0.30, 0.02, np.nan, 0.4, 0.5]
    d = [2.00, 0.30, 1.00, 0.10, 0.20, 0.49, 1.0, np.nan, 0.6]
    # group 0: the overlap (0.3 A) loses to valid ones, best valid R is 0.05 -> index 2
    # group 1: none valid (0.1, 0.2, 0.49 A) -> smallest R -> index 5
    # group 2: NaN R ranks last, NaN distance counts as invalid -> index 8
    assert best_candidates(r, d, 3).tolist() == [2, 5, 8]
    assert best_candidates(r, d, 3, min_distance=0.0).tolist() == [1, 5, 8]
    assert best_candidates([0.3, 0.1], [1.0, 1.0], 1).tolist() == [0, 1]
    with pytest.raises(ShapeError, match="multiple of n_candidates=2"):
        best_candidates([0.1, 0.2, 0.3], [1.0, 1.0, 1.0], 2)
