"""Tests of crystalfit.calculators.relax and crystalfit.metrics.ground_state."""
from __future__ import annotations

import sys

import numpy as np
import pytest
from ase.build import bulk

from crystalfit.calculators import emt_supported_elements, relax
from crystalfit.exceptions import CrystalfitError, UnknownElementError
from crystalfit.io import to_atoms
from crystalfit.metrics.ground_state import ground_state_metrics
from _data import perov_rows


def _rattled_cu(n=3, amp=0.05):
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.62, cubic=True)
        a.rattle(amp, seed=k)
        a.set_cell(a.cell * (1.0 + 0.01 * k), scale_atoms=True)
        out.append(a)
    return out


# ---------------------------------------------------------------------- relax
def test_emt_cell_relax_matches_eos_minimum():
    """Relaxed FCC Cu lattice constant equals the minimum of an independent E(V) fit."""
    from ase.calculators.emt import EMT
    from ase.eos import EquationOfState

    vols, ens = [], []
    for a in np.linspace(3.52, 3.66, 8):
        at = bulk("Cu", "fcc", a=a)
        at.calc = EMT()
        vols.append(at.get_volume())
        ens.append(at.get_potential_energy())
    v0, e0, _ = EquationOfState(vols, ens).fit()

    start = bulk("Cu", "fcc", a=3.75)
    res = relax([start], calculator="emt", fmax=1e-3, steps=500)
    assert res.converged[0] and res.fmax[0] < 1e-3
    assert res.atoms[0].get_volume() == pytest.approx(v0, rel=1e-3)
    assert res.energies[0] == pytest.approx(e0, abs=1e-4)
    assert res.energies_per_atom[0] == pytest.approx(res.energies[0] / 1)
    assert res.initial_energies[0] > res.energies[0]
    # the input was not modified
    assert np.allclose(start.cell.cellpar()[:3], 3.75 / np.sqrt(2))
    assert start.calc is None


def test_positions_only_relax_keeps_cell_and_converges():
    structs = _rattled_cu(2)
    cells = [s.cell[:].copy() for s in structs]
    pos = [s.positions.copy() for s in structs]
    res = relax(structs, fmax=0.01, relax_cell=False, optimizer="BFGS")
    for s, c, p, r in zip(structs, cells, pos, res.atoms):
        assert np.array_equal(s.cell[:], c) and np.array_equal(s.positions, p)  # inputs untouched
        assert np.allclose(r.cell[:], c)
        assert np.abs(r.get_forces()).max() < 0.01  # SinglePointCalculator holds final forces
    assert res.converged.all()
    assert (res.energies < res.initial_energies).all()
    assert np.allclose(res.energies_per_atom * 4, res.energies)
    assert res["energies"] is res.energies and len(res) == 2
    assert res.atoms[0].info["relax"]["n_steps"] == res.n_steps[0]


def test_instance_and_factory_equal_name():
    from ase.calculators.emt import EMT

    structs = _rattled_cu(2)
    by_name = relax(structs, calculator="emt", steps=30)
    by_inst = relax(structs, calculator=EMT(), steps=30)
    by_fact = relax(structs, calculator=EMT, steps=30)
    for other in (by_inst, by_fact):
        np.testing.assert_array_equal(other.energies, by_name.energies)
        np.testing.assert_array_equal(other.n_steps, by_name.n_steps)


def test_n_jobs_2_equals_n_jobs_1():
    structs = _rattled_cu(3)
    r1 = relax(structs, n_jobs=1, steps=60)
    r2 = relax(structs, n_jobs=2, steps=60, verbose=True)
    np.testing.assert_array_equal(r1.energies, r2.energies)
    np.testing.assert_array_equal(r1.n_steps, r2.n_steps)
    np.testing.assert_array_equal(r1.converged, r2.converged)
    for a, b in zip(r1.atoms, r2.atoms):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell[:], b.cell[:])


def test_emt_unsupported_elements_error_lists_index_and_elements():
    structs = [bulk("Cu"), bulk("Si"), bulk("NaCl", "rocksalt", a=5.64)]
    with pytest.raises(UnknownElementError, match=r"structure 1 \(Si2\): Si; structure 2 \(ClNa\): Cl, Na") as ei:
        relax(structs)
    assert ", ".join(emt_supported_elements()) in str(ei.value)
    assert "chgnet" in str(ei.value)
    from ase.calculators.emt import EMT

    for calc in (EMT, EMT()):  # the EMT class / instance get the same check
        with pytest.raises(UnknownElementError, match=r"structure 1 \(Si2\): Si"):
            relax(structs, calculator=calc)
    from ase.calculators.emt import parameters

    assert set(emt_supported_elements()) == set(parameters)  # read from ase, not hard-coded


def test_bad_arguments():
    with pytest.raises(CrystalfitError, match="optimizer='Newton' is not supported"):
        relax([bulk("Cu")], optimizer="Newton")
    with pytest.raises(CrystalfitError, match="calculator='vasp' is not a known name"):
        relax([bulk("Cu")], calculator="vasp")
    with pytest.raises(CrystalfitError, match="fmax must be a positive number"):
        relax([bulk("Cu")], fmax=0)


def test_chgnet_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "chgnet", None)  # makes `import chgnet` raise ImportError
    with pytest.raises(ImportError, match=r"pip install crystalfit\[relax\]"):
        relax([bulk("Cu")], calculator="chgnet")




def test_chgnet_relaxes_perov5_structures():
    pytest.importorskip("chgnet")
    structs = perov_rows(3)
    res = relax(structs, calculator="chgnet", steps=20, fmax=0.05)
    assert len(res.atoms) == 3
    assert (res.n_steps <= 20).all() and (res.n_steps > 0).all()
    assert np.isfinite(res.energies).all() and np.isfinite(res.initial_energies).all()
    # 20 FIRE steps with cell relaxation lower the CHGNet energy of every structure
    assert (res.energies_per_atom < res.initial_energies_per_atom).all()
    for s, a in zip(structs, res.atoms):
        assert len(a) == len(s) == 5
        assert sorted(a.get_atomic_numbers()) == sorted(to_atoms(s).get_atomic_numbers())
    m = ground_state_metrics(structs, res.atoms, res.initial_energies, res.energies)
    assert m["n_pairs"] == 3 and np.isfinite(m["delta_energy_rms"]) and m["delta_energy_rms"] > 0


# ------------------------------------------------------------- ground state
def test_ground_state_closed_forms():
    gen = [bulk("Cu", "fcc", a=3.7, cubic=True), bulk("Au", "fcc", a=4.0, cubic=True)]
    rel = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Au", "fcc", a=4.1, cubic=True)]
    e_gen, e_rel = np.array([1.0, -2.0]), np.array([0.6, -2.4])  # eV per 4-atom cell
    m = ground_state_metrics(gen, rel, e_gen, e_rel)
    dv = np.array([(3.7**3 - 3.6**3) / 4, (4.0**3 - 4.1**3) / 4])
    assert m["match_rate"] == 1.0 and m["n_matched"] == 2
    assert m["mean_rms_dist"] == pytest.approx(0.0, abs=1e-8)  # the matcher rescales volumes
    np.testing.assert_allclose(m["delta_volume"], dv)
    assert m["delta_volume_rms"] == pytest.approx(np.sqrt(np.mean(dv**2)))
    np.testing.assert_allclose(m["delta_energy"], [0.1, 0.1])
    assert m["delta_energy_rms"] == pytest.approx(0.1)
    m2 = ground_state_metrics(gen, rel, e_gen / 4, e_rel / 4, energies_per_atom=True)
    assert m2["delta_energy_rms"] == pytest.approx(0.1)


def test_ground_state_rms_of_one_displaced_atom():
    """One of N atoms moved by d: after removing the mean shift, rms = d sqrt(N-1)/N / (V/N)^(1/3)."""
    a, d = 3.75, 0.1  # L1_2 Cu3Au: 4-atom primitive cell, so pymatgen's primitive reduction keeps it
    rel = _l12(a)
    gen = rel.copy()
    gen.positions[1] += [d, 0.0, 0.0]
    n = len(rel)
    expected = d * np.sqrt(n - 1) / n / (a**3 / n) ** (1 / 3)
    m = ground_state_metrics([gen], [rel])
    assert m["mean_rms_dist"] == pytest.approx(expected, rel=1e-6)
    assert np.isnan(m["delta_energy_rms"])


def test_ground_state_unmatched_and_none():
    rel = [bulk("Cu", "fcc", a=3.6, cubic=True)] * 3
    stretched = rel[0].copy()
    stretched.set_cell(rel[0].cell[:] * np.array([[1.6], [1.0], [1.0]]), scale_atoms=True)  # beyond ltol
    gen = [rel[0].copy(), stretched, None]
    m_all = ground_state_metrics(gen, rel, [0.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    assert m_all["match_rate"] == pytest.approx(1 / 3) and m_all["n_matched"] == 1
    assert np.isnan(m_all["rms_dist"][1]) and np.isnan(m_all["delta_volume"][2])
    dv1 = stretched.get_volume() / 4 - rel[0].get_volume() / 4
    assert m_all["delta_volume_rms"] == pytest.approx(np.sqrt(dv1**2 / 2))
    assert m_all["delta_energy_rms"] == pytest.approx(np.sqrt(0.25**2 / 2))
    m_matched = ground_state_metrics(gen, rel, [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], subset="matched")
    assert m_matched["delta_volume_rms"] == 0.0 and m_matched["delta_energy_rms"] == 0.0


def test_ground_state_errors():
    cu = bulk("Cu")
    with pytest.raises(CrystalfitError, match="generated has 2 entries but relaxed has 1"):
        ground_state_metrics([cu, cu], [cu])
    with pytest.raises(CrystalfitError, match="pass both generated_energies and relaxed_energies"):
        ground_state_metrics([cu], [cu], generated_energies=[0.0])
    with pytest.raises(CrystalfitError, match="subset must be 'all' or 'matched'"):
        ground_state_metrics([cu], [cu], subset="some")


def _l12(a=3.75):
    from ase import Atoms

    return Atoms("AuCu3", scaled_positions=[[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]],
                 cell=np.eye(3) * a, pbc=True)


def test_ground_state_after_emt_relax():
    # L1_2 Cu3Au keeps its 4-atom primitive cell; a rattled FCC Cu would not match its relaxed
    # 1-atom primitive cell (StructureMatcher compares primitive cells without supercells).
    structs = []
    for k in range(3):
        s = _l12(3.7 + 0.05 * k)
        s.rattle(0.1, seed=k)
        structs.append(s)
    res = relax(structs, fmax=0.01)
    m = ground_state_metrics(structs, res.atoms, res.initial_energies, res.energies)
    assert m["match_rate"] == 1.0
    assert (m["delta_energy"] > 0).all()  # relaxation lowered every energy
    np.testing.assert_allclose(m["delta_energy"], res.initial_energies_per_atom - res.energies_per_atom)
