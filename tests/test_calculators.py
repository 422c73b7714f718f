"""Tests of crystalfit.calculators: XRDRestraint and DenoiserCalculator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress
from ase.calculators.mixing import SumCalculator

from crystalfit.calculators import DenoiserCalculator, XRDRestraint, quiet_optimizer, relax
from crystalfit.exceptions import CrystalfitError, NonFiniteError, ShapeError
from crystalfit.xrd import miller_indices, single_crystal_intensities


def cu3au_superlattice(a: float = 3.75) -> Atoms:
    """Two L1_2 Cu3Au cells stacked along c: 6 Cu + 2 Au (Au at the cube corners)."""
    cell = Atoms("Cu3Au", scaled_positions=[[0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0, 0]],
                 cell=[a, a, a], pbc=True)
    return cell.repeat((1, 1, 2))


def _distorted(seed: int = 0) -> Atoms:
    at = cu3au_superlattice()
    at.rattle(0.1, seed=seed)
    strain = np.eye(3) + 0.02 * np.random.default_rng(seed).normal(size=(3, 3))
    at.set_cell(at.cell[:] @ strain, scale_atoms=True)
    return at


@pytest.fixture(scope="module")
def target():
    return single_crystal_intensities(cu3au_superlattice())


# ------------------------------------------------------------ XRDRestraint
@pytest.mark.parametrize("scale", ["fit", 1.0, 0.7])
def test_forces_and_stress_match_finite_differences(target, scale):
    atoms = _distorted()
    atoms.calc = XRDRestraint(target, weight=10.0 / float((target**2).sum()), scale=scale)
    forces, stress = atoms.get_forces(), atoms.get_stress()
    num_f = calculate_numerical_forces(atoms, eps=1e-5)
    num_s = calculate_numerical_stress(atoms, eps=1e-5, force_consistent=False)
    assert np.abs(forces).max() > 1e-3 and np.abs(stress).max() > 1e-5  # not trivially zero
    assert np.abs(forces - num_f).max() / np.abs(forces).max() < 1e-4
    assert np.abs(stress - num_s).max() / np.abs(stress).max() < 1e-4


def test_energy_formula_and_fitted_scale_is_the_minimum(target):
    atoms = _distorted(1)
    w = 1.0 / float((target**2).sum())
    calc = XRDRestraint(target, weight=w)
    atoms.calc = calc
    e_fit = atoms.get_potential_energy()
    i_calc = single_crystal_intensities(atoms)
    s = float(i_calc @ target / (i_calc @ i_calc))  # numpy least-squares scale
    assert calc.results["scale"] == pytest.approx(s, rel=1e-12)
    assert e_fit == pytest.approx(w * ((s * i_calc - target) ** 2).sum(), rel=1e-10)
    assert calc.relative_misfit(atoms) == pytest.approx(e_fit, rel=1e-10)  # w = 1/sum(I_obs^2)
    for ds in (-1e-3, 1e-3):  # profiled energy: any fixed scale does worse
        other = atoms.copy()
        other.calc = XRDRestraint(target, weight=w, scale=s + ds)
        assert other.get_potential_energy() > e_fit
    ideal = cu3au_superlattice()
    ideal.calc = XRDRestraint(target, weight=w, scale=1.0)
    assert ideal.get_potential_energy() == pytest.approx(0.0, abs=1e-20)
    assert np.abs(ideal.get_forces()).max() < 1e-12


def test_invariances(target):
    """|F|^2 is invariant under a rigid shift (forces sum to zero) and atom permutation."""
    atoms = _distorted(2)
    atoms.calc = XRDRestraint(target, weight=1e-6)
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    np.testing.assert_allclose(f.sum(axis=0), 0.0, atol=1e-10 * np.abs(f).max())
    shifted = atoms.copy()
    shifted.positions += [0.37, -1.1, 2.3]
    shifted.calc = XRDRestraint(target, weight=1e-6)
    assert shifted.get_potential_energy() == pytest.approx(e, rel=1e-10)
    perm = np.random.default_rng(0).permutation(len(atoms))
    permuted = atoms[perm]
    permuted.calc = XRDRestraint(target, weight=1e-6)
    assert permuted.get_potential_energy() == pytest.approx(e, rel=1e-10)
    np.testing.assert_allclose(permuted.get_forces(), f[perm], rtol=1e-9, atol=1e-14)


def test_sum_calculator_adds_emt(target):
    atoms = _distorted(3)
    restraint = XRDRestraint(target, weight=100.0 / float((target**2).sum()))
    atoms.calc = SumCalculator([EMT(), restraint])
    f_sum, s_sum, e_sum = atoms.get_forces(), atoms.get_stress(), atoms.get_potential_energy()
    parts = []
    for calc in (EMT(), XRDRestraint(target, weight=100.0 / float((target**2).sum()))):
        a = atoms.copy()
        a.calc = calc
        parts.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    assert e_sum == pytest.approx(parts[0][0] + parts[1][0])
    np.testing.assert_allclose(f_sum, parts[0][1] + parts[1][1], atol=1e-12)
    np.testing.assert_allclose(s_sum, parts[0][2] + parts[1][2], atol=1e-12)


@pytest.mark.parametrize("relax_cell", [False, True])
def test_emt_plus_restraint_fits_intensities_better_than_emt(target, relax_cell):
    """Perturbed Cu3Au superlattice: EMT + restraint ends closer to the target pattern, EMT energy
    within 0.05 eV/atom of the EMT-alone minimum.

    With a fixed cell both return to the ideal sites and the restraint only tightens the fit; with
    cell relaxation EMT alone moves to its own lattice (a ~ 3.71 A) and the restraint pulls the cell
    back toward the target's 3.75 A (measured: misfit 1.1e-5 -> 1.1e-6, +2.5 meV/atom EMT energy).
    """
    start = cu3au_superlattice()
    start.rattle(0.1, seed=3)
    probe = XRDRestraint(target, weight=1.0)  # for the relative misfit only
    weight = 1e4 / float((target**2).sum())  # misfit 1e-4 (relative) costs 1 eV
    emt = relax([start], "emt", fmax=0.05, relax_cell=relax_cell)
    both = relax([start], lambda: SumCalculator([EMT(), XRDRestraint(target, weight=weight)]),
                 fmax=0.05, relax_cell=relax_cell)
    assert emt.converged[0] and both.converged[0]
    m_start, m_emt, m_both = (probe.relative_misfit(a) for a in (start, emt.atoms[0], both.atoms[0]))
    assert m_emt < m_start and m_both < 0.2 * m_emt
    check = both.atoms[0].copy()
    check.calc = EMT()
    e_emt_of_both = check.get_potential_energy() / len(check)
    assert e_emt_of_both - emt.energies_per_atom[0] < 0.05
    assert e_emt_of_both >= emt.energies_per_atom[0] - 1e-3  # EMT alone is (near) its minimum


def test_intensity_validation(target):
    with pytest.raises(ShapeError, match=r"intensities has shape \(124,\), expected \(125,\) = len\(hkl\) for hkl_range=2"):
        XRDRestraint(target[:-1])
    bad = target.copy()
    bad[7] = np.nan
    with pytest.raises(NonFiniteError, match=r"1 non-finite values \(first at index 7, hkl \(-2, -1, 0\)"):
        XRDRestraint(bad)
    bad = target.copy()
    bad[3] = -1.0
    with pytest.raises(CrystalfitError, match=r"intensities must be >= 0.*np.clip"):
        XRDRestraint(bad)
    with pytest.raises(ShapeError, match=r"hkl has shape \(125, 2\)"):
        XRDRestraint(target, hkl=miller_indices(2)[:, :2])
    with pytest.raises(CrystalfitError, match="weight must be a finite float >= 0"):
        XRDRestraint(target, weight=-1.0)
    with pytest.raises(CrystalfitError, match="scale must be 'fit' or a positive float"):
        XRDRestraint(target, scale="auto")
    # explicit hkl subset, consistent with the full pattern
    hkl = miller_indices(1)
    sub = XRDRestraint(single_crystal_intensities(cu3au_superlattice(), hkl_range=1), hkl=hkl, scale=1.0)
    ideal = cu3au_superlattice()
    ideal.calc = sub
    assert ideal.get_potential_energy() == pytest.approx(0.0, abs=1e-20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(target):  # pragma: no cover - needs a GPU
    atoms = _distorted(4)
    out = []
    for dev in ("cpu", "cuda"):
        a = atoms.copy()
        a.calc = XRDRestraint(target, weight=1e-6, device=dev)
        out.append((a.get_potential_energy(), a.get_forces(), a.get_stress()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-10)
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(out[1][2], out[0][2], rtol=1e-8, atol=1e-16)


# ------------------------------------------------------- DenoiserCalculator
class PointMassEstimator:
    """Exact score of a point mass at x0 smeared by a Gaussian of std sigma (fractional)."""

    def __init__(self, x0: np.ndarray):
        self.x0 = np.asarray(x0, dtype=float)
        self.calls = 0

    def predict_score(self, structures, noise_level):
        self.calls += 1
        out = []
        for atoms in structures:
            d = atoms.get_scaled_positions(wrap=False) - self.x0
            out.append(-(d - np.round(d)) / noise_level**2)  # minimum image
        return out


def _min_image_dist(a: Atoms, b: Atoms) -> np.ndarray:
    d = a.get_scaled_positions(wrap=False) - b.get_scaled_positions(wrap=False)
    d -= np.round(d)
    return np.linalg.norm(d @ a.cell[:], axis=1)


def test_denoiser_forces_are_tweedie_springs():
    ref = _distorted(5)  # triclinic cell: checks the fractional -> Cartesian map
    noisy = ref.copy()
    noisy.rattle(0.05, seed=1)
    noisy.positions[0] += ref.cell[0]  # a lattice translation must not matter (minimum image)
    k, sigma = 2.5, 0.02
    noisy.calc = DenoiserCalculator(PointMassEstimator(ref.get_scaled_positions()), noise_level=sigma, stiffness=k)
    disp = ref.positions - noisy.positions
    disp[0] += ref.cell[0]
    np.testing.assert_allclose(noisy.get_forces(), k * disp, atol=1e-12)
    with pytest.raises(PropertyNotImplementedError):
        noisy.get_potential_energy()
    with pytest.raises(PropertyNotImplementedError):
        noisy.get_stress()


def test_fire_pulls_noisy_structure_back():
    ref = cu3au_superlattice()
    noisy = ref.copy()
    noisy.rattle(0.15, seed=2)
    est = PointMassEstimator(ref.get_scaled_positions())
    calc = DenoiserCalculator(est, noise_level=0.01, stiffness=1.0)
    # documented ASE behaviour: Optimizer.log asks for the energy even with logfile=None
    from ase.optimize import FIRE

    plain = noisy.copy()
    plain.calc = calc
    with pytest.raises(PropertyNotImplementedError):
        FIRE(plain, logfile=None).run(fmax=0.01, steps=5)
    # the quiet optimizer and relax() work with forces only
    quiet = noisy.copy()
    quiet.calc = DenoiserCalculator(est, noise_level=0.01)
    assert quiet_optimizer("FIRE")(quiet, logfile=None).run(fmax=1e-3, steps=300)
    assert _min_image_dist(quiet, ref).max() < 2e-3
    res = relax([noisy], calculator=DenoiserCalculator(est, noise_level=0.01), relax_cell=False,
                fmax=1e-3, steps=300, optimizer="MDMin")
    assert res.converged[0] and np.isnan(res.energies[0])
    assert _min_image_dist(res.atoms[0], ref).max() < 2e-3 < _min_image_dist(noisy, ref).max()
    with pytest.raises(CrystalfitError, match="relax_cell=True needs the stress"):
        relax([noisy], calculator=DenoiserCalculator(est), relax_cell=True)
    with pytest.raises(PropertyNotImplementedError, match="force-only calculators work with FIRE"):
        relax([noisy], calculator=DenoiserCalculator(est), relax_cell=False, optimizer="BFGSLineSearch")


def test_denoiser_validation():
    atoms = cu3au_superlattice()

    class WrongShape:
        def predict_score(self, structures, noise_level):
            return [np.zeros((3, 3))]

    class NaNScore:
        def predict_score(self, structures, noise_level):
            return [np.full((len(structures[0]), 3), np.nan)]

    atoms.calc = DenoiserCalculator(WrongShape())
    with pytest.raises(ShapeError, match=r"score of shape \(3, 3\), expected \(8, 3\)"):
        atoms.get_forces()
    atoms.calc = DenoiserCalculator(NaNScore())
    with pytest.raises(NonFiniteError, match="non-finite values"):
        atoms.get_forces()
    atoms.calc = DenoiserCalculator(object())
    with pytest.raises(CrystalfitError, match="has no predict_score"):
        atoms.get_forces()
    atoms.calc = DenoiserCalculator(PointMassEstimator(atoms.get_scaled_positions()), noise_level=-0.1)
    with pytest.raises(CrystalfitError, match="noise_level must be a positive finite float"):
        atoms.get_forces()
