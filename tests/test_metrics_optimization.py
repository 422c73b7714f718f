"""Success rates (SR5/10/15) and top-k hit ratios on hand-computed cases."""
import numpy as np
import pytest
from ase.build import bulk
from pymatgen.core import Lattice, Structure

from crystalfit.exceptions import CrystalfitError, ShapeError
from crystalfit.metrics import SR_THRESHOLDS, hit_ratio, optimization_success_rate, success_rate, success_thresholds


def test_success_rate_hand_computed():
    # best per start: 0.5, 1.0, 2.0, inf (all invalid)
    values = [[3.0, 0.5], [1.0, np.nan], [2.0, 2.5], [None, np.inf]]
    sr = success_rate(values, thresholds=[0.5, 1.0, 2.0])
    assert sr == {"sr5": 0.25, "sr10": 0.5, "sr15": 0.75}
    # 2-D array input and a 1-D (one candidate per start) input
    assert success_rate(np.array([[3.0, 0.5], [1.0, 4.0]]), thresholds=[0.4, 0.6, 1.0]) == {
        "sr5": 0.0, "sr10": 0.5, "sr15": 1.0}
    assert success_rate(np.array([0.1, 0.9]), thresholds=[0.0, 0.5, 1.0]) == {"sr5": 0.0, "sr10": 0.5, "sr15": 1.0}


def test_thresholds_from_reference_percentiles_and_datasets():
    ref = np.arange(101, dtype=float)  # percentile p is exactly p
    np.testing.assert_allclose(success_thresholds(reference=ref), [5, 10, 15])
    np.testing.assert_allclose(success_thresholds(reference=ref, minimize=False), [95, 90, 85])
    sr = success_rate([[4.0], [9.0], [14.0], [50.0]], reference=ref)
    assert sr == {"sr5": 0.25, "sr10": 0.5, "sr15": 0.75}
    sr = success_rate([[96.0], [91.0]], reference=ref, minimize=False)
    assert sr == {"sr5": 0.5, "sr10": 1.0, "sr15": 1.0}
    np.testing.assert_allclose(success_thresholds(dataset="perov_5"), [0.43924842, 0.61202443, 0.7364607])
    assert SR_THRESHOLDS["mp_20"][0] == pytest.approx(-3.17562208)
    sr = success_rate([[0.4], [0.6], [0.7], [0.8]], dataset="perovskite")
    assert sr == {"sr5": 0.25, "sr10": 0.5, "sr15": 0.75}
    with pytest.raises(CrystalfitError, match="give exactly one of reference="):
        success_thresholds()
    with pytest.raises(CrystalfitError, match="no published success thresholds"):
        success_thresholds(dataset="qm9")
    with pytest.raises(ShapeError, match="thresholds has 2 values but percentiles has 3"):
        success_rate([[1.0]], thresholds=[1, 2])


class VolumePerAtom:
    def predict(self, atoms):
        return np.array([a.get_volume() / len(a) for a in atoms])


def test_optimization_success_rate_with_model_and_validity():
    small = bulk("Cu", "fcc", a=3.0, cubic=True)  # 6.75 A^3/atom
    big = bulk("Cu", "fcc", a=4.0, cubic=True)  # 16 A^3/atom
    clash = Structure(Lattice.cubic(1.2), ["Cu", "Cu"], [[0, 0, 0], [0.1, 0, 0]])  # 0.12 A apart: invalid
    cands = [[big, small], [big, clash], [None, clash]]
    sr = optimization_success_rate(cands, VolumePerAtom(), thresholds=[7.0, 10.0, 20.0])
    assert sr == {"sr5": pytest.approx(1 / 3), "sr10": pytest.approx(1 / 3), "sr15": pytest.approx(2 / 3)}
    sr = optimization_success_rate(cands, VolumePerAtom(), thresholds=[1.0, 10.0, 20.0], check_validity=False)
    assert sr["sr5"] == pytest.approx(2 / 3)  # the clash (0.86 A^3/atom) now counts


def test_hit_ratio_hand_computed():
    sim = np.array([
        [0.9, 0.1, 0.0],  # true (0) ranked 1st
        [0.8, 0.2, 0.5],  # true (1) ranked 3rd
        [0.3, 0.6, 0.6],  # true (2) tied with 1 -> rank 2 (ties count against)
    ])
    assert hit_ratio(sim, k=1) == pytest.approx(1 / 3)
    assert hit_ratio(sim, k=[1, 2, 3]) == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0}
    assert hit_ratio(sim, k=1, targets=[0, 0, 1]) == pytest.approx(2 / 3)
    assert hit_ratio(np.ones((4, 4)), k=3) == 0.0  # constant scores are no better than chance
    assert hit_ratio(np.ones((4, 4)), k=4) == 1.0
    with pytest.raises(ShapeError, match="targets must hold one candidate index"):
        hit_ratio(sim, k=1, targets=[0, 5, 1])
    with pytest.raises(CrystalfitError, match="k=0 must be >= 1"):
        hit_ratio(sim, k=0)


def test_hit_ratio_matches_argsort_reference_without_ties():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(50, 80))
    targets = rng.integers(0, 80, 50)
    order = np.argsort(-sim, axis=1)
    for k in (1, 5, 10):
        ref = np.mean([targets[q] in order[q, :k] for q in range(50)])
        assert hit_ratio(sim, k=k, targets=targets) == pytest.approx(ref)
