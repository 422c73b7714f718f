"""Tests of crystalfit.xrd against independent references (numpy loops, pymatgen)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from crystalfit.exceptions import ShapeError, UnknownElementError
from crystalfit.xrd import (
    form_factors,
    miller_indices,
    single_crystal_intensities,
    structure_factor_intensities,
)

A_PEROV = 4.24596
PEROV_FRAC = [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]]
PEROV_SPECIES = ["O", "N", "N", "Tl", "Co"]


def _random_lattice(rng, scale=4.0):
    """A well-conditioned random triclinic lattice (rows = vectors, Angstrom)."""
    return scale * (np.eye(3) + 0.25 * rng.standard_normal((3, 3)))


def _slow_intensities(frac, numbers, lattice, hkl, variance=None):
    """Independent reference: explicit loops over reflections and atoms (numpy, complex)."""
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS
    from pymatgen.core import Element

    recip = np.linalg.inv(lattice).T  # rows a*, b*, c*
    out = np.zeros(len(hkl))
    for m, h in enumerate(hkl):
        g = h[0] * recip[0] + h[1] * recip[1] + h[2] * recip[2]
        s = np.linalg.norm(g) / 2
        F = 0j
        for v in range(len(frac)):
            coeff = ATOMIC_SCATTERING_PARAMS[Element.from_Z(int(numbers[v])).symbol]
            f = numbers[v] - 41.78214 * s**2 * sum(a * math.exp(-b * s**2) for a, b in coeff)
            dw = 1.0
            if variance is not None:
                dw = math.exp(-2 * math.pi**2 * sum(variance[v][i] * h[i] ** 2 for i in range(3)))
            phase = 2 * math.pi * np.dot(frac[v], h)
            F += f * dw * complex(math.cos(phase), math.sin(phase))
        out[m] = abs(F) ** 2
    return out


def _t(x, dtype=torch.float64):
    return torch.as_tensor(np.array(x), dtype=dtype)


def test_miller_indices_order_and_count():
    hkl = miller_indices(2)
    assert hkl.shape == (125, 3) and hkl.dtype == np.int64
    assert [tuple(r) for r in hkl] == list(itertools.product(range(-2, 3), repeat=3))
    assert tuple(hkl[62]) == (0, 0, 0)
    assert miller_indices(0).tolist() == [[0, 0, 0]]
    with pytest.raises(ShapeError, match="hkl_range"):
        miller_indices(-1)


@pytest.mark.parametrize("symbol", ["H", "O", "Co", "Tl", "Au"])
def test_form_factors_match_pymatgen_formula(symbol):
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS
    from pymatgen.core import Element

    z = Element(symbol).Z
    s = np.linspace(0.0, 1.2, 13)
    coeff = np.asarray(ATOMIC_SCATTERING_PARAMS[symbol])
    ref = z - 41.78214 * s**2 * (coeff[:, 0] * np.exp(-coeff[:, 1] * s[:, None] ** 2)).sum(1)
    got = form_factors(torch.tensor([z]), _t(s))[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    assert got[0] == z  # f(0) = Z


@pytest.mark.parametrize("z", [0, 99, 150])
def test_form_factors_unknown_element(z):
    with pytest.raises(UnknownElementError, match=rf"numbers\[1\] = {z} has no X-ray form factor"):
        form_factors(torch.tensor([8, z]), torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("with_variance", [False, True])
def test_intensities_match_slow_loop(with_variance):
    rng = np.random.default_rng(0)
    lattice = _random_lattice(rng)
    frac = rng.random((4, 3))
    numbers = np.array([8, 27, 81, 7])
    variance = 0.002 * rng.random((4, 3)) if with_variance else None
    hkl = miller_indices(2)
    ref = _slow_intensities(frac, numbers, lattice, hkl, variance)
    got = structure_factor_intensities(
        _t(frac), torch.as_tensor(numbers), _t(lattice)[None], torch.zeros(4, dtype=torch.long), hkl,
        None if variance is None else _t(variance),
    )[0].numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-8)


def test_intensities_match_pymatgen_xrdcalculator_with_anisotropic_dw():
    """pymatgen's powder pattern: peak = 2 |F|^2 * Lorentz-polarisation for a P1 crystal.

    The variance c (fractional units) is passed to pymatgen as U_cif = c / |a*_i|^2,
    whose Debye-Waller factor exp(-2 pi^2 h^T U* h) equals our exp(-2 pi^2 c . h^2).
    """
    from pymatgen.analysis.diffraction.xrd import XRDCalculator
    from pymatgen.core import Lattice, Structure

    rng = np.random.default_rng(3)
    lat = Lattice.from_parameters(4.1, 4.7, 5.3, 81.0, 97.0, 104.0)
    frac = rng.random((3, 3))
    species = ["Cu", "O", "Ba"]
    var = 0.003 * rng.random((3, 3))
    recip_len = np.linalg.norm(np.linalg.inv(lat.matrix).T, axis=1)
    ucif = var / recip_len**2
    props = {f"U{i}{i}_cif": list(ucif[:, i - 1]) for i in (1, 2, 3)}
    props.update({k: [0.0] * 3 for k in ("U23_cif", "U13_cif", "U12_cif")})
    structure = Structure(lat, species, frac, site_properties=props)
    wavelength = 1.0
    pattern = XRDCalculator(wavelength=wavelength).get_pattern(structure, scaled=False, two_theta_range=None)
    hkl_all = miller_indices(2)
    ours = structure_factor_intensities(
        _t(frac), torch.tensor([29, 8, 56]), _t(lat.matrix)[None], torch.zeros(3, dtype=torch.long), hkl_all,
        _t(var),
    )[0].numpy()
    index = {tuple(h): i for i, h in enumerate(hkl_all)}
    checked = 0
    for two_theta, inten, fams in zip(pattern.x, pattern.y, pattern.hkls):
        if len(fams) != 1 or fams[0]["multiplicity"] != 2:
            continue  # accidental overlap of two reflections: skip
        hkl = tuple(int(v) for v in fams[0]["hkl"])
        if hkl not in index:
            continue
        theta = math.radians(two_theta / 2)
        lorentz = (1 + math.cos(2 * theta) ** 2) / (math.sin(theta) ** 2 * math.cos(theta))
        assert inten / (2 * lorentz) == pytest.approx(ours[index[hkl]], rel=1e-8)
        checked += 1
    assert checked > 40


def test_perovskite_crystal1_forward_beam():
    from ase import Atoms
    from pymatgen.core import Lattice, Structure

    atoms = Atoms(PEROV_SPECIES, scaled_positions=PEROV_FRAC, cell=[A_PEROV] * 3, pbc=True)
    intens = single_crystal_intensities(atoms)
    assert intens.shape == (125,) and intens.dtype == np.float64
    assert intens[62] == pytest.approx(130.0**2, rel=1e-12)  # (8+7+7+81+27)^2 = 16900
    structure = Structure(Lattice.cubic(A_PEROV), PEROV_SPECIES, PEROV_FRAC)
    np.testing.assert_allclose(single_crystal_intensities(structure), intens, rtol=1e-12)
    # cubic symmetry of this structure: I(h,k,l) = I(-h,k,l) since all coordinates are 0 or 1/2
    hkl = miller_indices(2)
    idx = {tuple(h): i for i, h in enumerate(hkl)}
    for h, k, l in hkl:
        assert intens[idx[(h, k, l)]] == pytest.approx(intens[idx[(-h, k, l)]], rel=1e-10)


def _random_batch(rng, sizes, dtype=torch.float64):
    fracs = [rng.random((n, 3)) for n in sizes]
    nums = [rng.choice([1, 6, 8, 26, 56, 79], size=n) for n in sizes]
    lats = np.stack([_random_lattice(rng) for _ in sizes])
    frac = _t(np.concatenate(fracs), dtype)
    numbers = torch.as_tensor(np.concatenate(nums), dtype=torch.long)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(sizes))
    return frac, numbers, _t(lats, dtype), batch


def test_invariances_and_friedel():
    rng = np.random.default_rng(1)
    frac, numbers, lattice, batch = _random_batch(rng, [5])
    hkl = miller_indices(2)
    var = _t(0.001 * rng.random((5, 3)))
    ref = structure_factor_intensities(frac, numbers, lattice, batch, hkl, var)
    shifted = frac.clone()
    shifted[2] += torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)  # integer lattice shift of one atom
    np.testing.assert_allclose(structure_factor_intensities(shifted, numbers, lattice, batch, hkl, var), ref,
                               rtol=1e-10)
    translated = frac + torch.tensor([0.123, -0.377, 0.61], dtype=torch.float64)  # common origin shift
    np.testing.assert_allclose(structure_factor_intensities(translated, numbers, lattice, batch, hkl, var), ref,
                               rtol=1e-10)
    neg = [list(map(tuple, hkl)).index(tuple(-h)) for h in hkl]
    np.testing.assert_allclose(ref[:, neg], ref, rtol=1e-12)  # Friedel I(h) = I(-h)
    # atom permutation
    perm = torch.tensor([3, 0, 4, 1, 2])
    np.testing.assert_allclose(
        structure_factor_intensities(frac[perm], numbers[perm], lattice, batch, hkl, var[perm]), ref, rtol=1e-10
    )


def test_batch_equals_separate_calls():
    rng = np.random.default_rng(2)
    frac, numbers, lattice, batch = _random_batch(rng, [3, 6])
    hkl = miller_indices(1)
    var = _t(0.002 * rng.random((9, 3)))
    both = structure_factor_intensities(frac, numbers, lattice, batch, hkl, var)
    for b, sl in enumerate([slice(0, 3), slice(3, 9)]):
        n = sl.stop - sl.start
        one = structure_factor_intensities(frac[sl], numbers[sl], lattice[b:b + 1], torch.zeros(n, dtype=torch.long),
                                           hkl, var[sl])
        np.testing.assert_allclose(both[b:b + 1], one, rtol=1e-12)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(4)
    frac, numbers, lattice, batch = _random_batch(rng, [2, 3])
    hkl = torch.as_tensor(miller_indices(1)[::3])
    var = _t(0.002 * rng.random((5, 3)))
    frac.requires_grad_(True)
    var.requires_grad_(True)
    lattice.requires_grad_(True)

    def fn(x, c, lat):
        return structure_factor_intensities(x, numbers, lat, batch, hkl, c)

    assert torch.autograd.gradcheck(fn, (frac, var, lattice), eps=1e-6, atol=1e-5, rtol=1e-6)


def test_float32_close_to_float64():
    rng = np.random.default_rng(5)
    frac, numbers, lattice, batch = _random_batch(rng, [5, 5])
    hkl = miller_indices(2)
    ref = structure_factor_intensities(frac, numbers, lattice, batch, hkl)
    got = structure_factor_intensities(frac.float(), numbers, lattice.float(), batch, hkl)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double(), ref, rtol=1e-3, atol=1e-3 * ref.max().item())


def test_shape_errors():
    frac = torch.zeros(3, 3)
    numbers = torch.tensor([8, 8, 8])
    lattice = torch.eye(3)[None]
    batch = torch.zeros(3, dtype=torch.long)
    hkl = miller_indices(1)
    with pytest.raises(ShapeError, match=r"numbers has shape \(2,\), expected \(3,\)"):
        structure_factor_intensities(frac, numbers[:2], lattice, batch, hkl)
    with pytest.raises(ShapeError, match=r"lattice has shape \(3, 3\), expected \(B, 3, 3\)"):
        structure_factor_intensities(frac, numbers, lattice[0], batch, hkl)
    with pytest.raises(ShapeError, match=r"variance has shape \(3,\), expected \(3, 3\)"):
        structure_factor_intensities(frac, numbers, lattice, batch, hkl, torch.zeros(3))
    with pytest.raises(ShapeError, match=r"hkl has shape \(27, 2\)"):
        structure_factor_intensities(frac, numbers, lattice, batch, hkl[:, :2])


def test_expected_intensity_matches_monte_carlo():
    """E|F|^2 over independent Gaussian atoms (expected=True) and |E F|^2 (Eq. 40) against sampling.

    The Monte Carlo reference draws positions x_v + sqrt(c_v) z and averages point-atom
    intensities (and structure factors); the damped-form-factor formulas are not used.
    """
    from crystalfit.xrd.intensities import structure_factors

    rng = np.random.default_rng(3)
    lattice = _t(_random_lattice(rng))[None]
    numbers = torch.tensor([8, 27, 81, 7])
    frac = _t(rng.random((4, 3)))
    variance = _t(0.004 + 0.01 * rng.random((4, 3)))
    batch = torch.zeros(4, dtype=torch.long)
    hkl = miller_indices(1)
    n_mc = 40000
    gen = torch.Generator().manual_seed(0)
    z = torch.randn((n_mc, 4, 3), generator=gen, dtype=torch.float64)
    pos = (frac + variance.sqrt() * z).reshape(-1, 3)
    mc_batch = torch.arange(n_mc).repeat_interleave(4)
    re, im = structure_factors(pos, numbers.repeat(n_mc), lattice.expand(n_mc, 3, 3), mc_batch, hkl)
    mc_expected = (re**2 + im**2).mean(0)
    mc_coherent = re.mean(0) ** 2 + im.mean(0) ** 2
    expected = structure_factor_intensities(frac, numbers, lattice, batch, hkl, variance, expected=True)[0]
    coherent = structure_factor_intensities(frac, numbers, lattice, batch, hkl, variance)[0]
    scale = float(expected.max())
    assert float((expected - mc_expected).abs().max()) < 0.01 * scale
    assert float((coherent - mc_coherent).abs().max()) < 0.01 * scale
    # the incoherent part is what Eq. 40 misses: positive away from h = 0, zero at h = 0
    gap = expected - coherent
    h0 = int(np.flatnonzero((hkl == 0).all(1))[0])
    assert abs(float(gap[h0])) < 1e-9 * scale
    assert bool((np.delete(gap.numpy(), h0) > 0).all())
    # without a variance, expected=True changes nothing
    point = structure_factor_intensities(frac, numbers, lattice, batch, hkl)
    assert torch.equal(point, structure_factor_intensities(frac, numbers, lattice, batch, hkl, expected=True))
