"""Structural and SMACT compositional validity (SPEC 2.2)."""
import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from pymatgen.core import Lattice, Structure

from crystalfit.exceptions import CrystalfitError
from crystalfit.metrics import composition_validity, smact_validity, structure_validity, validity
from crystalfit.metrics.validity import reduced_composition
from _data import perov_rows





def brute_force_min_distance(cell, frac):
    """Minimum distance between distinct sites over the 5x5x5 neighbouring images (slow loop)."""
    cell = np.asarray(cell, float)
    best = np.inf
    for i, j in itertools.combinations(range(len(frac)), 2):
        for shift in itertools.product(range(-2, 3), repeat=3):
            d = (np.asarray(frac[j]) + shift - np.asarray(frac[i])) @ cell
            best = min(best, float(np.linalg.norm(d)))
    return best


def test_close_atoms_are_invalid_including_through_the_boundary():
    close = Atoms("Cu2", cell=[5, 5, 5], positions=[[0, 0, 0], [0.3, 0, 0]], pbc=True)
    apart = Atoms("Cu2", cell=[5, 5, 5], positions=[[0, 0, 0], [0.6, 0, 0]], pbc=True)
    across = Atoms("Cu2", cell=[5, 5, 5], positions=[[0.1, 1, 1], [4.8, 1, 1]], pbc=True)  # 0.3 A via the image
    np.testing.assert_array_equal(structure_validity([close, apart, across, None]), [False, True, False, False])


def test_volume_rule_and_single_atom_cells():
    tiny = Atoms("H", cell=np.eye(3) * 0.4, positions=[[0, 0, 0]], pbc=True)  # V = 0.064 A^3 < 0.1
    ok = Atoms("H", cell=np.eye(3) * 0.47, positions=[[0, 0, 0]], pbc=True)  # V = 0.104: the reference
    # ignores a site's own images, so a one-atom cell passes whatever its size
    np.testing.assert_array_equal(structure_validity([tiny, ok]), [False, True])
    broken = Atoms("Cu", cell=[3, 3, 3], positions=[[np.nan, 0, 0]], pbc=True)
    assert not structure_validity([broken])[0]


def test_structure_validity_matches_brute_force_on_random_cells():
    rng = np.random.default_rng(3)
    cells, fracs, expected = [], [], []
    for _ in range(12):
        cell = np.diag(rng.uniform(2.5, 3.5, 3)) + rng.normal(scale=0.3, size=(3, 3))
        frac = rng.random((6, 3))
        cells.append(cell)
        fracs.append(frac)
        expected.append(brute_force_min_distance(cell, frac) >= 0.5)
    structs = [Structure(Lattice(c), ["C"] * 6, f) for c, f in zip(cells, fracs)]
    assert 0 < sum(expected) < len(expected)  # both outcomes occur
    np.testing.assert_array_equal(structure_validity(structs), expected)
    np.testing.assert_array_equal(structure_validity(structs, n_jobs=2), expected)


def test_smact_cases():
    nacl = bulk("NaCl", "rocksalt", a=5.64)
    nacl2 = Structure(Lattice.cubic(5.0), ["Na", "Cl", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])
    na2cl2 = Structure(Lattice.cubic(5.0), ["Na", "Na", "Cl", "Cl"],
                       [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0.5, 0.5], [0, 0, 0.5]])
    kf2 = Structure(Lattice.cubic(5.0), ["K", "F", "F"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0]])
    o2 = Structure(Lattice.cubic(5.0), ["O", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])  # one element
    cu3au = bulk("Cu", "fcc", a=3.75, cubic=True)
    cu3au.symbols[0] = "Au"  # all metals
    srtio3 = Structure(Lattice.cubic(3.9), ["Sr", "Ti", "O", "O", "O"],
                       [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])
    got = composition_validity([nacl, nacl2, na2cl2, kf2, o2, cu3au, srtio3, None])
    np.testing.assert_array_equal(got, [True, False, True, False, True, True, True, False])
    assert reduced_composition(na2cl2) == (("Na", "Cl"), (1, 1))


def test_smact_follows_the_spec_procedure_independently():
    """Re-derive NaCl / NaCl2 / CaTiO3 / CaTiO2 with a direct charge-balance loop."""
    import smact
    from smact.screening import pauling_test

    def direct(symbols, counts):
        els = [smact.Element(s) for s in symbols]
        for ox in itertools.product(*[e.oxidation_states for e in els]):
            if sum(o * c for o, c in zip(ox, counts)) == 0 and pauling_test(ox, [e.pauling_eneg for e in els]):
                return True
        return False

    for symbols, counts in [(("Na", "Cl"), (1, 1)), (("Na", "Cl"), (1, 2)), (("Ca", "Ti", "O"), (1, 1, 3)),
                            (("Ca", "Ti", "O"), (1, 1, 2)), (("Li", "Fe", "P", "O"), (1, 1, 1, 4))]:
        assert smact_validity(symbols, counts) == direct(symbols, counts), symbols


def test_composition_cache_is_used():
    s = bulk("NaCl", "rocksalt", a=5.64)
    composition_validity([s])
    before = smact_validity.cache_info().hits
    composition_validity([s, s.copy()])
    assert smact_validity.cache_info().hits >= before + 1


def test_perov_rows_validity_and_parallel():
    rows = perov_rows(40)
    comp1 = composition_validity(rows, n_jobs=1)
    comp2 = composition_validity(rows, n_jobs=2)
    np.testing.assert_array_equal(comp1, comp2)
    assert comp1.mean() >= 0.9  # SPEC 8: about 98% of Perov-5 compositions pass
    assert structure_validity(rows).all()
    np.testing.assert_array_equal(validity(rows), comp1)


def test_single_structure_instead_of_a_list_is_refused():
    with pytest.raises(CrystalfitError, match="must be a list of structures"):
        structure_validity(bulk("Cu"))
