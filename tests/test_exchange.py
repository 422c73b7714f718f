"""Site-exchange refinement (crystalfit.xrd.exchange) against brute force."""
import itertools

import numpy as np
import pytest
import torch

from crystalfit.datasets import make_perovskite, make_perovskite_arrangements
from crystalfit.exceptions import CrystalfitError, ShapeError
from crystalfit.metrics import r_factor
from crystalfit.xrd import (
    exchange_site_positions,
    exchange_sites,
    miller_indices,
    single_crystal_intensities,
    structure_factor_intensities,
)


def _swapped(atoms, i, j):
    out = atoms.copy()
    pos = out.get_scaled_positions()
    pos[[i, j]] = pos[[j, i]]
    out.set_scaled_positions(pos)
    return out


def _brute_force_best_swap(atoms, target):
    """R-factor of every swap of two atoms of different elements, by recomputing the intensities."""
    best = (r_factor(single_crystal_intensities(atoms), target, fit_scale=True), None)
    for i, j in itertools.combinations(range(len(atoms)), 2):
        if atoms.numbers[i] != atoms.numbers[j]:
            r = r_factor(single_crystal_intensities(_swapped(atoms, i, j)), target, fit_scale=True)
            if r < best[0]:
                best = (r, (i, j))
    return best


def test_first_swap_is_the_brute_force_best():
    """The structure-factor update (f_i - f_j)(e_j - e_i) scores swaps as recomputing |F|^2 does."""
    rng = np.random.default_rng(0)
    target = single_crystal_intensities(make_perovskite("crystal-2"))
    structures = make_perovskite_arrangements(["crystal-1", "crystal-3"], 6, noise=0.05, random_state=1)
    for atoms in structures:
        atoms.set_scaled_positions(atoms.get_scaled_positions() + rng.normal(0, 0.02, (len(atoms), 3)))
        r_best, pair = _brute_force_best_swap(atoms, target)
        one = exchange_sites([atoms], target, max_rounds=1)[0]
        assert one.info["r_factor"] == pytest.approx(r_best, rel=1e-9, abs=1e-12)
        if pair is None:
            assert one.info["n_exchanges"] == 0
        else:
            assert one.info["n_exchanges"] == 1
            np.testing.assert_allclose(one.get_scaled_positions(), _swapped(atoms, *pair).get_scaled_positions(),
                                       atol=1e-12)


def test_recovers_crystal2_from_its_o_n_swap_and_keeps_the_sites():
    truth = make_perovskite("crystal-2")  # Tl, O, N, N, Co
    wrong = _swapped(truth, 1, 2)  # body-centre N, face O: nearly the same intensities
    target = single_crystal_intensities(truth)
    assert r_factor(single_crystal_intensities(wrong), target, fit_scale=True) > 5e-4  # R = 0.00095
    fixed = exchange_sites(wrong, target)[0]
    assert fixed.info["n_exchanges"] == 1
    assert fixed.info["r_factor"] < 1e-12 < fixed.info["r_factor_before_exchange"]
    np.testing.assert_allclose(fixed.get_scaled_positions(), truth.get_scaled_positions(), atol=1e-12)
    assert list(fixed.numbers) == list(wrong.numbers)
    np.testing.assert_allclose(fixed.cell[:], wrong.cell[:])
    # already the best: nothing moves
    same = exchange_sites([truth], target)[0]
    assert same.info["n_exchanges"] == 0
    np.testing.assert_array_equal(same.get_scaled_positions(), truth.get_scaled_positions())


def test_batched_core_matches_independent_r_factors_and_never_worsens():
    structures = make_perovskite_arrangements(["crystal-1", "crystal-2", "crystal-3"], 4, noise=0.03, random_state=2)
    target = np.stack([single_crystal_intensities(make_perovskite(n)) for n in ["crystal-2"] * len(structures)])
    out = exchange_sites(structures, target)
    for a, b in zip(structures, out):
        assert b.info["r_factor"] <= b.info["r_factor_before_exchange"]
        assert b.info["r_factor"] == pytest.approx(
            r_factor(single_crystal_intensities(b), target[0], fit_scale=True), rel=1e-9)
        # the same set of positions, per element counts unchanged
        pa, pb = a.get_scaled_positions(), b.get_scaled_positions()
        np.testing.assert_allclose(pa[np.lexsort(pa.T)], pb[np.lexsort(pb.T)], atol=1e-9)
    # the tensor core directly: a crystal with one element has no swap to make
    frac = torch.rand(4, 3, dtype=torch.float64)
    lat = 3.0 * torch.eye(3, dtype=torch.float64)[None]
    hkl = miller_indices(1)
    numbers = torch.full((4,), 6)
    batch = torch.zeros(4, dtype=torch.long)
    tgt = structure_factor_intensities(torch.rand(4, 3, dtype=torch.float64), numbers, lat, batch, hkl)
    new, r0, r1, n = exchange_site_positions(frac, numbers, lat, batch, hkl, tgt)
    assert torch.equal(new, frac) and int(n) == 0 and torch.equal(r0, r1)


def test_exchange_sites_errors():
    atoms = make_perovskite("crystal-2")
    target = single_crystal_intensities(atoms)
    with pytest.raises(ShapeError, match="expected \\(125,\\)"):
        exchange_sites([atoms], target[:10])
    with pytest.raises(CrystalfitError, match="finite and >= 0"):
        exchange_sites([atoms], np.where(np.arange(125) == 3, np.nan, target))
    with pytest.raises(CrystalfitError, match="finite and >= 0"):
        exchange_sites([atoms], -target)
    with pytest.raises(CrystalfitError, match="all zero"):
        exchange_sites([atoms], np.zeros(125))
    with pytest.raises(CrystalfitError, match="structures is empty"):
        exchange_sites([], target)


def test_validate_false_refines_degenerate_candidates():
    from crystalfit.exceptions import DegenerateCellError

    flat = make_perovskite("crystal-2")
    flat.set_cell(np.diag([4.0, 4.0, 0.004]), scale_atoms=True)
    target = single_crystal_intensities(make_perovskite("crystal-2"))
    with pytest.raises(DegenerateCellError):
        exchange_sites([flat], target)
    out = exchange_sites([flat], target, validate=False)[0]
    assert out.info["r_factor"] <= out.info["r_factor_before_exchange"]


def test_mixed_sizes_and_chunking_agree_with_one_at_a_time(monkeypatch):
    from crystalfit.datasets import make_cu3au
    from crystalfit.xrd import exchange

    rng = np.random.default_rng(3)
    structures = [_swapped(make_perovskite("crystal-2"), 1, 2), make_cu3au(0), make_perovskite("crystal-1")]
    for a in structures:
        a.set_scaled_positions(a.get_scaled_positions() + rng.normal(0, 0.01, (len(a), 3)))
    targets = np.stack([single_crystal_intensities(make_perovskite("crystal-2")),
                        single_crystal_intensities(make_cu3au(3)),
                        single_crystal_intensities(make_perovskite("crystal-3"))])
    alone = [exchange_sites([a], t)[0] for a, t in zip(structures, targets)]
    monkeypatch.setattr(exchange, "_CHUNK_ELEMENTS", 125 * 3)  # 3 pairs scored at a time
    together = exchange_sites(structures, targets)
    for a, b in zip(alone, together):
        assert a.info["n_exchanges"] == b.info["n_exchanges"]
        assert a.info["r_factor"] == pytest.approx(b.info["r_factor"], rel=1e-12)
        np.testing.assert_allclose(a.get_scaled_positions(), b.get_scaled_positions(), atol=1e-12)
    assert sum(b.info["n_exchanges"] for b in together) >= 2
    with pytest.raises(CrystalfitError, match="crystal by crystal"):
        exchange_site_positions(torch.zeros(2, 3, dtype=torch.float64), torch.tensor([8, 7]),
                                torch.eye(3, dtype=torch.float64).repeat(2, 1, 1) * 4, torch.tensor([1, 0]),
                                miller_indices(1), torch.ones(2, 27, dtype=torch.float64))
