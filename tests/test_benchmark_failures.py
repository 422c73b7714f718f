"""The failure classes of ``benchmarks/xrd_guidance.py failures`` (Table 1's guided samples)."""
import itertools

import numpy as np
import pytest

from _data import xrd_benchmark
from crystalfit.datasets import make_perovskite

pytest.importorskip("pymatgen")


@pytest.fixture(scope="module")
def bench():
    return xrd_benchmark()


def test_arrangement_classes_cover_every_site_assignment_once(bench):
    refs = bench.perovskite_arrangement_refs()
    assert len(refs) == 13
    # brute force: all 5!/2 = 60 assignments of Tl, Co, O, N, N to the 5 sites fall in exactly one class
    assignments = sorted(set(itertools.permutations(["Tl", "Co", "O", "N", "N"])))
    assert len(assignments) == 60
    cells = [make_perovskite(list(a)) for a in assignments]
    hits = np.array([np.isfinite(bench.match_rms(cells, [ref] * len(cells), **bench.TOL_TABLE1))
                     for ref in refs.values()])
    assert (hits.sum(axis=0) == 1).all()
    assert (hits.sum(axis=1) >= 1).all()


def test_classify_samples_names_target_collapse_and_off_site(bench):
    refs = bench.perovskite_arrangement_refs()
    c1, c2 = make_perovskite("crystal-1"), make_perovskite("crystal-2")
    collapsed = c2.copy()
    pos = collapsed.get_scaled_positions()
    pos[3] = pos[2] + [0.02, 0.0, 0.0]  # the two N on one face site
    collapsed.set_scaled_positions(pos)
    off = c2.copy()
    pos = off.get_scaled_positions()
    pos[0] += [0.15, 0.0, 0.0]  # Tl 0.64 A off its corner
    off.set_scaled_positions(pos)
    counts = bench.classify_samples([c1, c2, c2, collapsed, off], refs)
    assert counts == {"O|N|CoNTl": 1, "Tl|O|CoNN": 2, "two atoms < 0.5 A": 1, "off-site": 1}


def test_sample_seed_defaults_to_the_training_seed_and_is_reported_when_it_differs(bench):
    from types import SimpleNamespace
    same = SimpleNamespace(seed=40, sample_seed=None)
    assert bench._sample_seed(same) == 40 and bench._sample_seed_note(same) == ""
    fresh = SimpleNamespace(seed=40, sample_seed=200)
    assert bench._sample_seed(fresh) == 200
    assert "Sampling seed 200 (training seed 40)" in bench._sample_seed_note(fresh)


def test_ensemble_prior_is_the_mean_of_its_members(bench, tmp_path):
    """``--ensemble``: the averaged denoiser returns the members' mean output, and models fitted on other data
    (another element set) are refused."""
    import torch

    from crystalfit import XRDGuidedDiffusion
    from crystalfit.datasets import make_perovskite_arrangements
    from crystalfit.io import structures_to_batch

    tiny = dict(hidden_scalars=8, hidden_vectors=2, n_layers=1, n_freqs=4, n_radial=4, time_dim=8)
    data = make_perovskite_arrangements(["crystal-1", "crystal-2"], 16, random_state=0)
    a, b = (XRDGuidedDiffusion(network=dict(tiny), max_epochs=1, batch_size=16, n_steps=2, random_state=s,
                               device="cpu").fit(data) for s in (0, 1))
    b.save(tmp_path / "b")
    batch = structures_to_batch(data[:2]).to(dtype=torch.float32)
    t = torch.tensor([300, 700])
    args = (batch.lattice, batch.frac, batch.numbers, batch.num_atoms, batch.batch, t)
    with torch.no_grad():
        want = [(p + q) / 2 for p, q in zip(a.module_(*args), b.module_(*args))]
        bench._average_priors(a, [tmp_path / "b"])
        got = a.module_(*args)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    assert len(a.sample("CoN2OTl", n_samples=2, random_state=0)) == 2
    batio3 = make_perovskite_arrangements([["Ba", "Ti", "O", "O", "O"]], 16, random_state=0)
    other = XRDGuidedDiffusion(network=dict(tiny), max_epochs=1, batch_size=16, n_steps=2, random_state=0,
                               device="cpu").fit(batio3)
    other.save(tmp_path / "other")
    with pytest.raises(SystemExit, match="elements_"):
        bench._average_priors(b, [tmp_path / "other"])
