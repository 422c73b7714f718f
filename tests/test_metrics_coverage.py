"""Coverage COV-R / COV-P with CrystalNN / Magpie fingerprints (SPEC 2.3)."""
import importlib

import numpy as np
import pytest
from ase.build import bulk
from pymatgen.core import Structure

from crystalfit.exceptions import CrystalfitError
from crystalfit.metrics import (
    clear_fingerprint_cache,
    coverage,
    coverage_from_fingerprints,
    fingerprints,
    structure_hash,
)
from crystalfit.io import to_structure
from _data import perov_rows

# the package attribute `coverage` is the function; fetch the module itself
cov_mod = importlib.import_module("crystalfit.metrics.coverage")




def naive_coverage(gs, gc, rs, rc, ds, dc, n_gen, means, stds):
    """Slow reference: explicit loops over pairs, CDVAE compute_cov semantics."""
    keep = [i for i in range(len(gs)) if np.all(np.isfinite(gs[i]))]
    gcz = [(gc[i] - means) / stds for i in keep]
    rcz = [(c - means) / stds for c in rc]
    dist = lambda a, b: float(np.sqrt(np.sum((np.asarray(a) - np.asarray(b)) ** 2)))
    rec = []
    for j in range(len(rs)):
        smin = min(dist(gs[i], rs[j]) for i in keep)
        cmin = min(dist(g, rcz[j]) for g in gcz)
        rec.append(smin <= ds and cmin <= dc)
    hits = 0
    for k, i in enumerate(keep):
        smin = min(dist(gs[i], r) for r in rs)
        cmin = min(dist(gcz[k], r) for r in rcz)
        hits += smin <= ds and cmin <= dc
    return np.mean(rec), hits / n_gen


def test_coverage_formula_against_naive_loops():
    rng = np.random.default_rng(0)
    gs, gc = rng.normal(size=(9, 61)) * 0.1, rng.normal(size=(9, 132))
    rs, rc = rng.normal(size=(7, 61)) * 0.1, rng.normal(size=(7, 132))
    gs[2] = np.nan  # a failed fingerprint
    gc[2] = np.nan
    gs[:3] = rs[:3] + 0.01  # some close pairs
    gc[:3] = rc[:3] + 0.01
    gs[2] = np.nan
    means, stds = rc.mean(0), rc.std(0)
    for ds, dc in [(0.2, 4.0), (0.5, 16.0), (1.0, 30.0)]:
        res = coverage_from_fingerprints(gs, gc, rs, rc, struct_cutoff=ds, comp_cutoff=dc, num_generated=10)
        rec, prec = naive_coverage(gs, gc, rs, rc, ds, dc, 10, means, stds)
        assert res.recall == pytest.approx(rec)
        assert res.precision == pytest.approx(prec)
    # user constants replace the reference statistics
    res = coverage_from_fingerprints(gs, gc, rs, rc, struct_cutoff=0.5, comp_cutoff=16.0,
                                     comp_means=np.zeros(132), comp_stds=np.ones(132))
    rec, prec = naive_coverage(gs, gc, rs, rc, 0.5, 16.0, 9, np.zeros(132), np.ones(132))
    assert (res.recall, res.precision) == pytest.approx((rec, prec))
    with pytest.raises(CrystalfitError, match=r"comp_means has shape \(3,\), expected \(132,\)"):
        coverage_from_fingerprints(gs, gc, rs, rc, struct_cutoff=0.5, comp_cutoff=1, comp_means=np.zeros(3))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_fingerprint_is_site_average_of_crystalnn():
    from matminer.featurizers.site import CrystalNNFingerprint

    s = to_structure(bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    sfp, cfp = fingerprints([s])
    ref = np.mean([CrystalNNFingerprint.from_preset("ops").featurize(s, i) for i in range(len(s))], axis=0)
    np.testing.assert_allclose(sfp[0], ref)
    assert sfp.shape == (1, 61) and cfp.shape == (1, 132)


def test_coverage_of_a_set_against_itself_is_one_and_none_counts_in_precision():
    rows = perov_rows(5)
    res = coverage(rows, rows, dataset="perov_5")
    assert res.recall == 1.0 and res.precision == 1.0
    assert res.amsd_recall == pytest.approx(0.0, abs=1e-12)
    res = coverage(rows + [None], rows, struct_cutoff=0.2, comp_cutoff=4)
    assert res.recall == 1.0 and res.precision == pytest.approx(5 / 6)
    # a set far from the reference is not covered
    far = [bulk("Cu", "fcc", a=3.6), bulk("Si", "diamond", a=5.43)]
    res = coverage(far, rows[:3], struct_cutoff=0.2, comp_cutoff=4, comp_means=np.zeros(132),
                   comp_stds=np.ones(132))
    assert res.recall == 0.0 and res.precision == 0.0


def test_cache_avoids_recomputation(monkeypatch):
    rows = perov_rows(3)
    clear_fingerprint_cache()
    calls = []
    real = cov_mod._fingerprint_one

    def counting(s):
        calls.append(1)
        return real(s)

    monkeypatch.setattr(cov_mod, "_fingerprint_one", counting)
    first = fingerprints(rows)
    assert len(calls) == 3
    again = fingerprints(rows + [rows[0].copy()])  # a copy has the same hash
    assert len(calls) == 3
    np.testing.assert_array_equal(first[0], again[0][:3])
    np.testing.assert_array_equal(again[0][0], again[0][3])
    assert cov_mod.fingerprint_cache_size() == 3


def test_structure_hash_ignores_integer_shifts_and_sees_changes():
    s = to_structure(bulk("NaCl", "rocksalt", a=5.64, cubic=True))
    shifted = Structure(s.lattice, s.species, s.frac_coords + np.array([1.0, -1.0, 2.0]))
    moved = Structure(s.lattice, s.species, s.frac_coords + 0.01)
    assert structure_hash(s) == structure_hash(shifted)
    assert structure_hash(s) != structure_hash(moved)


def test_parallel_fingerprints_equal_serial():
    rows = perov_rows(6)
    clear_fingerprint_cache()
    a = fingerprints(rows, n_jobs=1, use_cache=False)
    b = fingerprints(rows, n_jobs=2, use_cache=False)
    np.testing.assert_allclose(a[0], b[0], rtol=0, atol=0)
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=0)


def test_cutoff_errors():
    rows = [bulk("Cu", "fcc", a=3.6)]
    with pytest.raises(CrystalfitError, match="coverage needs both cut-offs"):
        coverage(rows, rows)
    with pytest.raises(CrystalfitError, match="dataset='mpts_52' has no published coverage cut-offs"):
        coverage(rows, rows, dataset="mpts_52")
