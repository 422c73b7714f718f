"""Tests of crystalfit.datasets: CDVAE csv loaders (files, cache, download) and synthetic sets."""
from __future__ import annotations

import csv
import io
import itertools
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
from pymatgen.analysis.structure_matcher import StructureMatcher
from pymatgen.core import Lattice, Structure

from crystalfit.datasets import (
    CU3AU_A,
    CU3AU_SITES,
    PEROVSKITE_A,
    PEROVSKITE_SITES,
    DatasetNotFoundError,
    cu3au_placements,
    dataset_url,
    load_dataset,
    make_cu3au,
    make_cu3au_supercells,
    make_perovskite,
    make_perovskite_arrangements,
)
from crystalfit.datasets import cdvae
from crystalfit.exceptions import CIFParseError, CrystalfitError

DATA = Path(os.environ.get("CRYSTALFIT_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(
    not (DATA / "perov_5" / "val.csv").is_file(),
    reason=f"benchmark csv files not found under {DATA}; set CRYSTALFIT_DATA to the folder holding perov_5/val.csv",
)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Cache in tmp_path; the network is never used (urlopen raises unless a test replaces it)."""
    monkeypatch.setenv("CRYSTALFIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CRYSTALFIT_NO_DOWNLOAD", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def _cif(structure: Structure) -> str:
    return structure.to(fmt="cif")


def _mp_structures():
    return [
        Structure(Lattice.cubic(4.0), ["Ba", "Ti", "O", "O", "O"], PEROVSKITE_SITES),
        Structure(Lattice.hexagonal(3.2, 5.1), ["Zn", "Zn", "O", "O"],
                  [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5], [1 / 3, 2 / 3, 0.38], [2 / 3, 1 / 3, 0.88]]),
        Structure(Lattice.from_parameters(3.1, 4.2, 5.3, 80, 95, 100), ["Si", "C"], [[0.1, 0.2, 0.3], [0.6, 0.7, 0.8]]),
    ]


MP_HEADER = ["", "material_id", "formation_energy_per_atom", "band_gap", "pretty_formula", "e_above_hull",
             "elements", "cif", "spacegroup.crystal_system", "spacegroup.crystal_system_int"]


def _write_mp(path: Path, header=MP_HEADER, structures=None, bad_row=None):
    structures = structures or _mp_structures()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r, s in enumerate(structures):
            vals = {"": str(100 + r), "material_id": f"mp-{r + 1}", "formation_energy_per_atom": str(-1.5 + r),
                    "band_gap": str(0.25 * r), "pretty_formula": s.composition.reduced_formula,
                    "e_above_hull": "0.0", "elements": str([e.symbol for e in s.composition]),
                    "cif": bad_row[1] if bad_row and bad_row[0] == r else _cif(s),
                    "spacegroup.crystal_system": "cubic", "spacegroup.crystal_system_int": str(7 - r)}
            w.writerow([vals[h] for h in header])
    return structures


def _assert_same_atoms(atoms, structure):
    np.testing.assert_allclose(atoms.cell[:], structure.lattice.matrix, atol=1e-6)
    np.testing.assert_allclose(atoms.get_scaled_positions(wrap=False), structure.frac_coords, atol=1e-6)
    assert list(atoms.numbers) == [site.specie.Z for site in structure]


# --------------------------------------------------------------------------- full benchmark files
@pytest.fixture
def full_cache(request, monkeypatch):
    """Parsed-structure cache for the full benchmark files, kept between runs in .pytest_cache (keyed by file
    path, size and mtime), so only the first run parses the ~7,000 CIFs (about 20 s on one core)."""
    monkeypatch.setenv("CRYSTALFIT_CACHE", str(request.config.cache.mkdir("crystalfit_datasets_cache")))


@needs_data
def test_perov5_val_full_file(full_cache):
    ds = load_dataset("perov_5", "val")
    assert len(ds.structures) == 3787 and ds.heat_ref.shape == (3787,)
    assert all(len(a) == 5 for a in ds.structures) and np.all(ds.num_atoms == 5)
    assert np.all(np.isfinite(ds.heat_ref)) and ds.formula.dtype == object
    assert ds.structures[7].info["source_id"] == ds.ids[7]
    assert ds.structures[7].info["properties"]["heat_ref"] == ds.heat_ref[7]
    # first and last rows against an independent parse of the csv
    with open(DATA / "perov_5" / "val.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in (0, len(rows) - 1):
        assert ds.ids[r] == rows[r]["material_id"] and ds.heat_ref[r] == float(rows[r]["heat_ref"])
        _assert_same_atoms(ds.structures[r], Structure.from_str(rows[r]["cif"], fmt="cif"))
    head = load_dataset("perov_5", "val", max_rows=4)
    assert len(head.structures) == 4 and np.array_equal(head.heat_ref, ds.heat_ref[:4])


@needs_data
def test_perov5_dev_train_full_file(full_cache):
    ds = load_dataset("perov_5_dev", "train", DATA, download=False)
    assert len(ds.structures) == 1024 == len(ds.ids) == len(ds.heat_all)
    assert ds.filename == str(DATA / "perov_5_dev" / "train.csv")


@needs_data
def test_carbon24_val_full_file(full_cache):
    ds = load_dataset("carbon_24", "val")
    assert len(ds.structures) == 2032 and ds.energy_per_atom.shape == (2032,)
    assert all(set(a.numbers) == {6} for a in ds.structures)
    assert ds.num_atoms.min() >= 6 and ds.num_atoms.max() <= 24
    assert ds.property_names == ["energy_per_atom"]


@needs_data
def test_niggli_reduction_matches_pymatgen():
    raw = load_dataset("carbon_24", "val", max_rows=6)
    red = load_dataset("carbon_24", "val", max_rows=6, reduce="niggli")
    matcher = StructureMatcher(stol=0.05, ltol=0.05, angle_tol=1, primitive_cell=False, scale=False)
    changed = 0
    for a, b in zip(raw.structures, red.structures):
        s = Structure(Lattice(a.cell[:]), a.get_chemical_symbols(), a.get_scaled_positions())
        ref = s.get_reduced_structure().lattice.parameters
        got = Structure(Lattice(b.cell[:]), b.get_chemical_symbols(), b.get_scaled_positions())
        np.testing.assert_allclose(got.lattice.parameters, ref, atol=1e-6)
        assert abs(got.volume - s.volume) < 1e-6 * s.volume and len(b) == len(a)
        assert matcher.fit(s, got)
        changed += not np.allclose(a.cell.cellpar(), b.cell.cellpar(), atol=1e-4)
    assert changed > 0  # Carbon-24 cells are stored unreduced, so reduction must change some


@needs_data
def test_crystal3_is_perov5_entry_6334():
    """crystal-3 is the ideal version of Perov-5 entry 6334 (first row of perov_5_dev train)."""
    ds = load_dataset("perov_5_dev", "train", max_rows=1)
    assert ds.ids[0] == "6334"
    entry = ds.structures[0]
    assert abs(entry.cell.cellpar()[0] - PEROVSKITE_A) < 1e-5
    ideal = make_perovskite("crystal-3")
    # pymatgen's CIF parser may reorder sites: pair each ideal site with the nearest entry atom
    d = _min_image(entry.get_scaled_positions()[:, None, :] - ideal.get_scaled_positions()[None, :, :])
    dist = np.linalg.norm(d, axis=-1)  # (5 entry atoms, 5 ideal sites)
    nearest = dist.argmin(axis=0)
    assert sorted(nearest) == list(range(5)) and dist.min(axis=0).max() < 0.01
    assert [entry.get_chemical_symbols()[k] for k in nearest] == ideal.get_chemical_symbols()


# --------------------------------------------------------------------------- small files written here
def test_mp20_columns_found_by_name(tmp_path):
    structures = _write_mp(tmp_path / "mp_20" / "train.csv")
    ds = load_dataset("mp_20", "train", data_home=tmp_path, download=False)
    assert len(ds.structures) == 3 and list(ds.ids) == ["mp-1", "mp-2", "mp-3"]
    for a, s in zip(ds.structures, structures):
        _assert_same_atoms(a, s)
    np.testing.assert_allclose(ds.formation_energy_per_atom, [-1.5, -0.5, 0.5])
    assert ds.spacegroup_crystal_system_int.dtype == np.int64 and list(ds["spacegroup.crystal_system_int"]) == [7, 6, 5]
    assert ds.pretty_formula.dtype == object and ds.pretty_formula[0] == "BaTiO3"
    assert list(ds.index) == [100, 101, 102]
    assert ds.structures[1].info == {
        "source_id": "mp-2",
        "properties": {"formation_energy_per_atom": -0.5, "band_gap": 0.25, "e_above_hull": 0.0,
                       "spacegroup.crystal_system_int": 6},
    }
    # the cache goes to CRYSTALFIT_CACHE, never into data_home
    assert sorted(p.name for p in tmp_path.joinpath("mp_20").iterdir()) == ["train.csv"]
    assert len(list((tmp_path / "cache" / "parsed").glob("mp_20_train_*.npz"))) == 1


def test_parsed_cache_warm_equals_cold_and_tracks_changes(tmp_path, monkeypatch):
    _write_mp(tmp_path / "mp_20" / "val.csv")
    cold = load_dataset("mp_20", "val", tmp_path)
    real_to_atoms = cdvae.to_atoms

    def no_parse(*a, **k):
        raise AssertionError("to_atoms called although the cache is warm")

    monkeypatch.setattr(cdvae, "to_atoms", no_parse)
    warm = load_dataset("mp_20", "val", tmp_path)
    head = load_dataset("mp_20", "val", tmp_path, max_rows=2)  # served from the full cache too
    assert len(head.structures) == 2
    for a, b in zip(cold.structures, warm.structures):
        assert np.array_equal(a.numbers, b.numbers) and np.array_equal(a.cell[:], b.cell[:])
        assert np.array_equal(a.positions, b.positions) and a.info == b.info
    with pytest.raises(AssertionError, match="cache is warm"):  # reduce is part of the key
        load_dataset("mp_20", "val", tmp_path, reduce="niggli")
    monkeypatch.setattr(cdvae, "to_atoms", real_to_atoms)
    _write_mp(tmp_path / "mp_20" / "val.csv", structures=_mp_structures()[:2])  # file changed -> parsed again
    os.utime(tmp_path / "mp_20" / "val.csv", ns=(1, 1))
    assert len(load_dataset("mp_20", "val", tmp_path).structures) == 2


def test_mpts52_via_env_and_lookup_order(tmp_path, monkeypatch):
    header = ["", "material_id", "cif", "formation_energy_per_atom", "band_gap", "pretty_formula"]
    structures = _mp_structures()
    _write_mp(tmp_path / "env" / "mpts_52" / "test.csv", header=header)
    _write_mp(tmp_path / "home" / "mpts_52" / "test.csv", header=header, structures=structures[:2])
    monkeypatch.setenv("CRYSTALFIT_DATA", str(tmp_path / "env"))
    ds = load_dataset("mpts_52", "test", download=False)
    assert ds.filename == str(tmp_path / "env" / "mpts_52" / "test.csv") and len(ds.structures) == 3
    _assert_same_atoms(ds.structures[2], structures[2])
    assert len(load_dataset("mpts_52", "test", data_home=tmp_path / "home").structures) == 2  # data_home first
    _write_mp(tmp_path / "cache" / "mpts_52" / "val.csv", header=header, structures=structures[:1])
    ds = load_dataset("mpts_52", "val", download=False)  # not under CRYSTALFIT_DATA -> the user cache
    assert ds.filename == str(tmp_path / "cache" / "mpts_52" / "val.csv") and len(ds.structures) == 1


def test_malformed_cif_row_names_file_and_row(tmp_path):
    bad = _cif(_mp_structures()[0]).replace("_cell_length_b   4.00000000", "_cell_length_b   oops")
    _write_mp(tmp_path / "mp_20" / "val.csv", bad_row=(1, bad))
    with pytest.raises(CIFParseError, match=r"mp_20/val\.csv, data row 1 .*material_id 'mp-2'.*could not be parsed"):
        load_dataset("mp_20", "val", tmp_path)
    _write_mp(tmp_path / "mp_20" / "test.csv", bad_row=(2, "not a cif"))
    with pytest.raises(CIFParseError, match=r"test\.csv, data row 2 .*not CIF text.*'not a cif'"):
        load_dataset("mp_20", "test", tmp_path)
    (tmp_path / "mp_20" / "train.csv").write_text(",material_id,band_gap\n0,mp-1,1.0\n")
    with pytest.raises(CIFParseError, match=r"no 'cif' column \(columns: \['', 'material_id', 'band_gap'\]\)"):
        load_dataset("mp_20", "train", tmp_path)


def test_bad_arguments():
    with pytest.raises(CrystalfitError, match=r"unknown dataset name 'perov5'; valid names are \['carbon_24', "):
        load_dataset("perov5", "val")
    with pytest.raises(CrystalfitError, match=r"unknown split 'valid'.*\['train', 'val', 'test'\]"):
        load_dataset("perov_5", "valid")
    with pytest.raises(CrystalfitError, match=r"reduce must be one of \[None, 'niggli'\], got 'lll'"):
        load_dataset("perov_5", "val", reduce="lll")
    with pytest.raises(CrystalfitError, match="max_rows must be None or a positive integer, got 0"):
        load_dataset("perov_5", "val", max_rows=0)


# --------------------------------------------------------------------------- download
class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, length: int | None):
        super().__init__(data)
        self.headers = {} if length is None else {"Content-Length": str(length)}


def _fake_urlopen(data: bytes, length: int | None, calls: list):
    def urlopen(req, timeout=None):
        calls.append((req.full_url, timeout))
        return _FakeResponse(data, length)

    return urlopen


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_download_success(tmp_path, monkeypatch):
    _write_mp(tmp_path / "src" / "x.csv")
    data = (tmp_path / "src" / "x.csv").read_bytes()
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(data, len(data), calls))
    ds = load_dataset("mp_20", "test", data_home=tmp_path / "empty")
    assert calls == [(dataset_url("mp_20", "test"), cdvae._TIMEOUT_S)]
    assert calls[0][0] == "https://raw.githubusercontent.com/txie-93/cdvae/main/data/mp_20/test.csv"
    dest = tmp_path / "cache" / "mp_20" / "test.csv"
    assert ds.filename == str(dest) and dest.read_bytes() == data and len(ds.structures) == 3
    assert not (tmp_path / "empty").exists()
    load_dataset("mp_20", "test", data_home=tmp_path / "empty")  # second call: found in the cache
    assert len(calls) == 1


@pytest.mark.parametrize("length", [10**6, 0])
def test_download_size_mismatch_leaves_no_file(tmp_path, monkeypatch, length):
    data = b"" if length == 0 else b",material_id,cif\n0,x,trunc"
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(data, length, []))
    with pytest.raises(DatasetNotFoundError, match=r"incomplete: received \d+ bytes.*partial file was deleted"):
        load_dataset("carbon_24", "train", data_home=tmp_path / "empty")
    assert _leftovers(tmp_path / "cache") == []


def test_download_offline_message(tmp_path):
    url = "https://raw.githubusercontent.com/txie-93/cdvae/main/data/perov_5/val.csv"
    searched = [str(tmp_path / "nowhere" / "perov_5" / "val.csv"), str(tmp_path / "cache" / "perov_5" / "val.csv")]
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("perov_5", "val", data_home=tmp_path / "nowhere")
    msg = str(info.value)
    assert all(p in msg for p in searched) and url in msg and "URLError" in msg
    assert "set CRYSTALFIT_DATA=/path so that /path/perov_5/val.csv exists, or pass data_home" in msg
    assert isinstance(info.value, CrystalfitError) and _leftovers(tmp_path / "cache") == []
    with pytest.raises(DatasetNotFoundError, match="downloading is disabled"):
        load_dataset("perov_5", "val", data_home=tmp_path / "nowhere", download=False)


# --------------------------------------------------------------------------- synthetic perovskites
def _min_image(d):
    return d - np.round(d)


def test_perovskite_arrangements_shapes_mixing_reproducible():
    a = make_perovskite("crystal-1")
    assert a.get_chemical_symbols() == ["O", "N", "N", "Tl", "Co"]
    np.testing.assert_allclose(a.cell[:], np.eye(3) * 4.24596)
    np.testing.assert_allclose(a.get_scaled_positions(), PEROVSKITE_SITES)
    xs = make_perovskite_arrangements(["crystal-1", "crystal-2", "crystal-3"], 31, random_state=3)
    names = [x.info["arrangement"] for x in xs]
    assert [names.count(n) for n in ("crystal-1", "crystal-2", "crystal-3")] == [11, 10, 10]
    assert names[:11] != ["crystal-1"] * 11  # shuffled
    assert len({x.info["source_id"] for x in xs}) == 31
    for x in xs:
        assert len(x) == 5 and x.get_chemical_formula() == "CoN2OTl"
        fr = x.get_scaled_positions(wrap=False)
        assert fr.min() >= 0.0 and fr.max() < 1.0
    ys = make_perovskite_arrangements(["crystal-1", "crystal-2", "crystal-3"], 31, random_state=3)
    assert all(np.array_equal(x.positions, y.positions) and x.info == y.info for x, y in zip(xs, ys))
    zs = make_perovskite_arrangements(["crystal-1", "crystal-2", "crystal-3"], 31, random_state=4)
    assert not all(np.array_equal(x.positions, z.positions) for x, z in zip(xs, zs))
    custom = make_perovskite_arrangements(["Ba", "Ti", "O", "O", "O"], 2, noise=0.0)
    assert custom[0].info["arrangement"] == "Ba-Ti-O-O-O"
    np.testing.assert_allclose(custom[1].get_scaled_positions(), PEROVSKITE_SITES)
    assert make_perovskite_arrangements(["Tl", "O", "N", "N", "Co"], 1)[0].info["arrangement"] == "crystal-2"
    with pytest.raises(CrystalfitError, match=r"unknown arrangement 'crystal-4'; choose one of \['crystal-1'"):
        make_perovskite_arrangements("crystal-4", 3)
    with pytest.raises(CrystalfitError, match="has 4 symbols, expected 5"):
        make_perovskite(["O", "N", "N", "Tl"])
    with pytest.raises(CrystalfitError, match="n_samples must be a positive integer, got 0"):
        make_perovskite_arrangements("crystal-1", 0)
    with pytest.raises(CrystalfitError, match="noise must be a finite number >= 0.*got -0.1"):
        make_perovskite_arrangements("crystal-1", 2, noise=-0.1)


def test_perovskite_noise_std():
    xs = make_perovskite_arrangements("crystal-2", 2000, noise=0.01, random_state=0)
    d = _min_image(np.stack([x.get_scaled_positions(wrap=False) for x in xs]) - PEROVSKITE_SITES)
    assert d.shape == (2000, 5, 3)
    assert abs(d.std() - 0.01) < 0.0003 and abs(d.mean()) < 0.0003  # 30000 draws: se(std) ~ 4e-5
    assert all(x.get_chemical_symbols() == ["Tl", "O", "N", "N", "Co"] for x in xs)


def _intensities(symbols):
    """|F(hkl)|^2 with f = Z, h,k,l in -2..2 (125), by explicit loops (independent of the module)."""
    from ase.data import atomic_numbers

    hkl = list(itertools.product(range(-2, 3), repeat=3))
    out = np.zeros(len(hkl))
    for n, h in enumerate(hkl):
        F = 0j
        for sym, x in zip(symbols, PEROVSKITE_SITES):
            F += atomic_numbers[sym] * np.exp(2j * np.pi * np.dot(h, x))
        out[n] = abs(F) ** 2
    return np.array(hkl), out


def _distance(sym_a, sym_b):
    """min over the 48 cubic point operations of || I_a/|I_a| - I_b(R h)/|I_b| ||_2."""
    hkl, ia = _intensities(sym_a)
    _, ib = _intensities(sym_b)
    lookup = {tuple(h): v for h, v in zip(hkl, ib / np.linalg.norm(ib))}
    best = np.inf
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            rot = np.array([lookup[tuple(np.array(signs) * h[list(perm)])] for h in hkl])
            best = min(best, np.linalg.norm(ia / np.linalg.norm(ia) - rot))
    return best


def test_crystal3_differs_from_crystal1_and_2():
    s = {k: make_perovskite(k) for k in ("crystal-1", "crystal-2", "crystal-3")}
    st = {k: Structure(Lattice(v.cell[:]), v.get_chemical_symbols(), v.get_scaled_positions()) for k, v in s.items()}
    loose = StructureMatcher(stol=0.5, angle_tol=10, ltol=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not loose.fit(st["crystal-3"], st["crystal-1"]) and not loose.fit(st["crystal-3"], st["crystal-2"])
        noisy = make_perovskite_arrangements("crystal-3", 1, random_state=0)[0]
        assert loose.fit(st["crystal-3"], Structure(Lattice(noisy.cell[:]), noisy.get_chemical_symbols(),
                                                     noisy.get_scaled_positions()))
    sym = {k: v.get_chemical_symbols() for k, v in s.items()}
    d31, d32, d12 = (_distance(sym["crystal-3"], sym["crystal-1"]), _distance(sym["crystal-3"], sym["crystal-2"]),
                     _distance(sym["crystal-1"], sym["crystal-2"]))
    np.testing.assert_allclose([d31, d32, d12], [0.520, 0.449, 0.160], atol=1e-3)  # values in the docstring
    assert min(d31, d32) > 2.5 * d12
    assert _distance(sym["crystal-1"], sym["crystal-1"]) < 1e-12


# --------------------------------------------------------------------------- Cu3Au
def test_cu3au_placements_superlattice_count():
    table = cu3au_placements()
    assert len(table) == 28 and [p["index"] for p in table] == list(range(28))
    assert len({p["au_sites"] for p in table}) == 28
    assert sum(p["superlattice"] for p in table) == 4  # 4/28 = 14 %, as in the paper
    assert sum(p["au_isolated"] for p in table) == 8  # 4 L1_2 + 4 D0_22-type
    l12 = Structure(Lattice.cubic(CU3AU_A), ["Au", "Cu", "Cu", "Cu"], CU3AU_SITES[:4] * [1, 1, 2])
    l12.make_supercell([1, 1, 2])
    matcher = StructureMatcher(stol=0.05, ltol=0.05, angle_tol=1, primitive_cell=False, scale=False)
    nn = CU3AU_A / np.sqrt(2)
    for p in table:
        atoms = make_cu3au(p["index"])
        assert atoms.get_chemical_formula() == "Au2Cu6" and atoms.info["placement"] == p["index"]
        i, j = p["au_sites"]
        # minimum-image Au-Au distance by ase, and the Au-Au distance to its own images (a)
        d = min(atoms.get_distance(i, j, mic=True), CU3AU_A)
        assert abs(d - p["min_au_au"]) < 1e-9 and p["au_isolated"] == (d > nn + 1e-6)
        s = Structure(Lattice(atoms.cell[:]), atoms.get_chemical_symbols(), atoms.get_scaled_positions())
        assert matcher.fit(s, l12) == p["superlattice"]
        if p["superlattice"]:
            assert p["au_isolated"]
    assert make_cu3au((4, 0)).info["placement"] == 3
    with pytest.raises(CrystalfitError, match="placement must be an index 0..27"):
        make_cu3au(28)


def test_cu3au_supercells_counts_noise_reproducible():
    xs = make_cu3au_supercells(56 * 20, noise=0.01, random_state=1)
    assert len(xs) == 1120
    counts = np.bincount([x.info["placement"] for x in xs], minlength=28)
    assert np.all(counts == 40)
    assert sum(x.info["superlattice"] for x in xs) == 160  # 4/28
    frac = np.stack([x.get_scaled_positions(wrap=False) for x in xs])
    assert frac.min() >= 0.0 and frac.max() < 1.0
    d = _min_image(frac - CU3AU_SITES)
    assert abs(d.std() - 0.01) < 0.0003 and abs(d.mean()) < 0.0003
    for x in xs[:30]:
        au = [k for k, z in enumerate(x.numbers) if z == 79]
        assert tuple(au) == x.info["au_sites"] and len(x) == 8
        np.testing.assert_allclose(x.cell[:], np.diag([3.75, 3.75, 7.5]))
    ys = make_cu3au_supercells(10, random_state=np.random.RandomState(5))
    zs = make_cu3au_supercells(10, random_state=np.random.RandomState(5))
    assert all(np.array_equal(y.positions, z.positions) and y.info == z.info for y, z in zip(ys, zs))
    sl = make_cu3au_supercells(12, random_state=0, superlattice_only=True)
    assert all(x.info["superlattice"] for x in sl) and len({x.info["placement"] for x in sl}) == 4
