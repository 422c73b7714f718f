"""Data model, conversion round trips and input validation messages."""
import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk

from crystalfit.data import CrystalBatch
from crystalfit.exceptions import (
    CIFParseError,
    DegenerateCellError,
    DisorderedStructureError,
    EmptyStructureError,
    NonFiniteError,
    NonPeriodicError,
    TooManyAtomsError,
    UnknownElementError,
)
from crystalfit.geometry import (
    cart_to_frac,
    frac_to_cart,
    lattice_matrix_to_params,
    lattice_params_to_matrix,
    wrap_frac,
)
from crystalfit.io import (
    batch_to_atoms,
    parse_composition,
    read_structures,
    structures_to_batch,
    to_atoms,
    to_structure,
)


def _triclinic(seed=0):
    rng = np.random.default_rng(seed)
    cell = np.array([[4.1, 0.2, 0.1], [0.5, 3.8, -0.3], [0.4, 0.6, 5.2]])
    return Atoms("NaClO", cell=cell, scaled_positions=rng.random((3, 3)) * 3 - 1, pbc=True)


def test_round_trip_atoms_exact():
    atoms = [_triclinic(0), bulk("Cu", "fcc", a=3.6, cubic=True), bulk("NaCl", "rocksalt", a=5.64)]
    batch = structures_to_batch(atoms)
    assert batch.lattice.shape == (3, 3, 3)
    assert batch.frac.shape == (3 + 4 + 2, 3)
    assert batch.num_atoms.tolist() == [3, 4, 2]
    assert batch.batch.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert float(batch.frac.min()) >= 0.0 and float(batch.frac.max()) < 1.0
    back = batch_to_atoms(batch)
    for a, b in zip(atoms, back):
        assert np.all(b.pbc)
        assert np.allclose(a.cell[:], b.cell[:], atol=1e-12)
        assert a.get_chemical_symbols() == b.get_chemical_symbols()
        wrapped = a.copy()
        wrapped.wrap()
        # wrapped positions agree to 1e-6 Angstrom (modulo an exact lattice vector at the boundary)
        d = b.get_scaled_positions(wrap=False) - wrapped.get_scaled_positions(wrap=False)
        d -= np.round(d)
        assert np.abs(d @ a.cell[:]).max() < 1e-6
        assert "source_id" in b.info


def test_round_trip_pymatgen_cif_and_files(tmp_path):
    atoms = _triclinic(1)
    s = to_structure(atoms)
    a2 = to_atoms(s)
    assert np.allclose(a2.cell[:], atoms.cell[:])
    cif = s.to(fmt="cif")
    a3 = to_atoms(cif)
    assert a3.get_chemical_formula() == atoms.get_chemical_formula()
    d = a3.get_scaled_positions() - atoms.get_scaled_positions()
    d -= np.round(d)
    assert np.abs(d).max() < 1e-5  # CIF stores ~8 digits
    import ase.io

    for name, fmt in (("x.extxyz", "extxyz"), ("POSCAR", "vasp"), ("x.cif", "cif")):
        ase.io.write(tmp_path / name, atoms, format=fmt)
        back = to_atoms(tmp_path / name)
        assert back.get_chemical_formula() == atoms.get_chemical_formula()
        assert np.allclose(back.get_volume(), atoms.get_volume(), rtol=1e-5)
    ase.io.write(tmp_path / "many.extxyz", [atoms, bulk("Cu", cubic=True)], format="extxyz")
    assert len(read_structures(tmp_path / "many.extxyz")) == 2


def test_provenance_kept():
    a = bulk("Cu", cubic=True)
    a.info["source_id"] = "mp-30"
    a.info["properties"] = {"energy": -1.0}
    out = batch_to_atoms(structures_to_batch([a]))[0]
    assert out.info["source_id"] == "mp-30"
    assert out.info["properties"] == {"energy": -1.0}


def test_select_matches_loop():
    atoms = [bulk("Cu", cubic=True), _triclinic(2), bulk("NaCl", "rocksalt", a=5.6)]
    batch = structures_to_batch(atoms)
    sub = batch.select([2, 0])
    ref = structures_to_batch([atoms[2], atoms[0]])
    assert torch.equal(sub.numbers, ref.numbers)
    assert torch.allclose(sub.frac, ref.frac)
    assert torch.equal(sub.batch, ref.batch)


def test_geometry_helpers():
    lengths = torch.tensor([[4.0, 5.0, 6.0]], dtype=torch.float64)
    angles = torch.tensor([[80.0, 95.0, 110.0]], dtype=torch.float64)
    L = lattice_params_to_matrix(lengths, angles)
    l2, a2 = lattice_matrix_to_params(L)
    assert torch.allclose(l2, lengths) and torch.allclose(a2, angles)
    # c along z, a in the xz-plane
    assert abs(float(L[0, 2, 0])) < 1e-12 and abs(float(L[0, 2, 1])) < 1e-12 and abs(float(L[0, 0, 1])) < 1e-12
    frac = torch.rand(5, 3, dtype=torch.float64)
    assert torch.allclose(cart_to_frac(frac_to_cart(frac, L[0]), L[0]), frac)
    w = wrap_frac(torch.tensor([-1e-20, 1.0, 2.5, -0.25], dtype=torch.float64))
    assert w.tolist() == [0.0, 0.0, 0.5, 0.75]


# ------------------------------------------------------------------ errors
def test_error_empty():
    with pytest.raises(EmptyStructureError, match=r"structure 1 has no atoms \(0 sites\).*remove it"):
        structures_to_batch([bulk("Cu"), Atoms(cell=np.eye(3), pbc=True)])
    with pytest.raises(EmptyStructureError, match="no structures were given"):
        structures_to_batch([])


def test_error_non_periodic():
    a = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=np.eye(3) * 5, pbc=[True, True, False])
    with pytest.raises(NonPeriodicError, match=r"structure 0 is not periodic.*pbc=\[True, True, False\].*atoms.pbc = True"):
        structures_to_batch([a])


def test_error_nan():
    a = bulk("Cu", cubic=True)
    pos = a.get_positions()
    pos[2, 1] = np.nan
    a.set_positions(pos)
    with pytest.raises(NonFiniteError, match=r"structure 0: atom 2 has a non-finite position.*must be finite"):
        structures_to_batch([a])
    b = bulk("Cu", cubic=True)
    b.cell[0, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"the cell contains NaN or inf"):
        to_atoms(b, 4)


def test_error_degenerate_cell():
    a = Atoms("Cu", cell=[[1, 0, 0], [0, 1, 0], [1, 1, 0]], pbc=True)
    with pytest.raises(DegenerateCellError, match=r"structure 0: the cell is singular or degenerate \(volume 0 A\^3.*linearly independent"):
        structures_to_batch([a])
    flat = Atoms("Cu", cell=[[5, 0, 0], [0, 5, 0], [0, 0, 1e-4]], pbc=True)
    with pytest.raises(DegenerateCellError, match="volume"):
        to_atoms(flat)


def test_error_disordered():
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(3.6), [{"Cu": 0.5, "Au": 0.5}, "Cu"], [[0, 0, 0], [0.5, 0.5, 0]])
    with pytest.raises(DisorderedStructureError, match=r"structure 0: site 0 is disordered or partially occupied.*OrderDisorderedStructureTransformation"):
        to_atoms(s, 0)
    cif = s.to(fmt="cif")
    with pytest.raises(DisorderedStructureError, match=r"structure 0: site \d is disordered.*Cu0.5 Au0.5"):
        structures_to_batch([cif])


def test_error_unknown_element():
    a = Atoms("X", cell=np.eye(3) * 3, pbc=True)
    with pytest.raises(UnknownElementError, match=r"structure 0: atom 0 has an unknown element \(atomic number 0, symbol 'X'\)"):
        structures_to_batch([a])
    with pytest.raises(UnknownElementError, match=r"unknown element symbol 'Xx' in formula 'CoXx2'"):
        parse_composition("CoXx2")
    cif = to_structure(bulk("Cu", cubic=True)).to(fmt="cif").replace("Cu", "Qq")
    with pytest.raises(UnknownElementError, match=r"site 0 has an unknown element symbol 'Qq'"):
        to_atoms(cif)


def test_error_malformed_cif(tmp_path):
    bad = "data_broken\n_cell_length_a 3.0\n_cell_length_b\nloop_\n_atom_site_label\nnonsense here\n"
    with pytest.raises(CIFParseError, match=r"structure 3: CIF text could not be parsed.*data_broken.*_atom_site loop"):
        to_atoms(bad, 3)
    p = tmp_path / "bad.cif"
    p.write_text(bad)
    with pytest.raises(CIFParseError, match="could not be parsed"):
        to_atoms(p)
    with pytest.raises(CIFParseError, match=r"file '.*missing.cif' does not exist"):
        to_atoms(tmp_path / "missing.cif")
    with pytest.raises(CIFParseError, match="neither CIF text"):
        to_atoms("hello\nworld")


def test_error_too_many_atoms():
    with pytest.raises(TooManyAtomsError, match=r"structure 1 has 8 atoms, more than the limit of 5.*max_atoms"):
        structures_to_batch([bulk("Cu"), bulk("NaCl", "rocksalt", a=5.6, cubic=True)], max_atoms=5)


def test_parse_composition():
    from pymatgen.core import Composition

    assert parse_composition("CoN2OTl") == [27, 7, 7, 8, 81]
    assert len(parse_composition(Composition("Cu3Au"))) == 4
    assert parse_composition(["Na", 17]) == [11, 17]
    assert parse_composition(bulk("NaCl", "rocksalt", a=5.6)) == [11, 17]
    with pytest.raises(UnknownElementError, match="cannot parse formula"):
        parse_composition("co2")
    with pytest.raises(TypeError, match="cannot read a composition"):
        parse_composition(3.5)


def test_batch_to_device_dtype():
    b = structures_to_batch([bulk("Cu", cubic=True)])
    b32 = b.to(dtype=torch.float32)
    assert b32.frac.dtype == torch.float32 and b32.numbers.dtype == torch.long
    assert isinstance(b32, CrystalBatch)
