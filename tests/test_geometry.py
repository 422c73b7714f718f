"""Lattice reduction and periodic minimum distances, against pymatgen."""
import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystalfit.exceptions import ShapeError
from crystalfit.geometry import min_pair_distance, reduce_lattice


def _skewed_lattices(n, seed=0):
    """Random cells, many of them very skewed (angles down to a few degrees), as an untrained model makes."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 3, 3)) * 3.0
    shear = np.eye(3) + np.triu(rng.integers(-6, 7, size=(n, 3, 3)), 1)  # unimodular: same lattice, skewed basis
    return base, shear @ base


def test_reduce_lattice_spans_the_same_lattice_and_shortens():
    base, skewed = _skewed_lattices(40)
    red, U = reduce_lattice(torch.tensor(skewed))
    red, U = red.numpy(), U.numpy()
    np.testing.assert_allclose(U, np.round(U))
    np.testing.assert_allclose(np.abs(np.linalg.det(U)), 1.0)
    np.testing.assert_allclose(red, U @ skewed, atol=1e-9)
    np.testing.assert_allclose(np.abs(np.linalg.det(red)), np.abs(np.linalg.det(skewed)), rtol=1e-9)
    # pairwise size-reduced: |b_i . b_j| <= |b_j|^2 / 2
    for i in range(3):
        for j in range(3):
            if i != j:
                dots = np.abs(np.einsum("bk,bk->b", red[:, i], red[:, j]))
                assert np.all(dots <= 0.5 * np.einsum("bk,bk->b", red[:, j], red[:, j]) + 1e-9)
    # as short as pymatgen's LLL basis (its longest vector)
    lll = np.array([Lattice(m).get_lll_reduced_lattice().abc for m in skewed])
    assert np.all(np.linalg.norm(red, axis=-1).max(-1) <= lll.max(-1) * (1 + 1e-9) + 1e-9)


def test_min_pair_distance_matches_pymatgen_on_skewed_cells():
    _, skewed = _skewed_lattices(30, seed=1)
    rng = np.random.default_rng(2)
    counts = rng.integers(1, 7, size=len(skewed))
    frac = [rng.random((c, 3)) for c in counts]
    got = min_pair_distance(torch.tensor(np.concatenate(frac)), torch.tensor(skewed),
                            torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))).numpy()
    for k, (L, f) in enumerate(zip(skewed, frac)):
        if len(f) < 2:
            assert got[k] == np.inf
            continue
        d = Structure(Lattice(L), ["H"] * len(f), f).distance_matrix
        assert got[k] == pytest.approx((d + 1e9 * np.eye(len(f))).min(), rel=1e-9)


def test_min_pair_distance_empty_and_single():
    out = min_pair_distance(torch.zeros((0, 3)), torch.eye(3)[None].repeat(2, 1, 1), torch.zeros(0, dtype=torch.long))
    assert out.tolist() == [float("inf")] * 2


def test_degenerate_cells_do_not_break_the_reduction():
    L = torch.stack([torch.zeros(3, 3), torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1]]), 4 * torch.eye(3)])
    red, U = reduce_lattice(L)
    assert torch.isfinite(red).all() and torch.isfinite(U).all()
    d = min_pair_distance(torch.rand(6, 3), L, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert d[0] == 0 and torch.isfinite(d).all()


def test_min_pair_distance_chunking_is_exact():
    _, skewed = _skewed_lattices(25, seed=3)
    rng = np.random.default_rng(4)
    counts = torch.tensor(rng.integers(2, 9, size=len(skewed)))
    frac = torch.tensor(rng.random((int(counts.sum()), 3)))
    batch = torch.repeat_interleave(torch.arange(len(counts)), counts)
    whole = min_pair_distance(frac, torch.tensor(skewed), batch)
    for chunk in (1, 8 * 8 * 81 * 3, 10**9):  # one crystal per chunk, three per chunk, all at once
        torch.testing.assert_close(min_pair_distance(frac, torch.tensor(skewed), batch, chunk_elements=chunk), whole)


def test_min_pair_distance_shape_errors():
    from crystalfit.exceptions import ShapeError

    frac, batch = torch.rand(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ShapeError, match=r"lattice has shape \(1, 3, 3\), expected \(2, 3, 3\)"):
        min_pair_distance(frac, torch.eye(3)[None], batch, num_crystals=2)
    with pytest.raises(ShapeError, match=r"batch has values in \[0, 1\], expected crystal indices in \[0, 0\]"):
        min_pair_distance(frac, torch.eye(3)[None], batch)
    with pytest.raises(ShapeError, match=r"must be \(N, 3\) and \(N,\)"):
        min_pair_distance(frac, torch.eye(3)[None].repeat(2, 1, 1), batch[:3])


def test_reduce_lattice_shape_error():
    from crystalfit.exceptions import ShapeError

    with pytest.raises(ShapeError, match=r"lattice has shape \(3, 3\), expected \(B, 3, 3\)"):
        reduce_lattice(torch.eye(3))


def test_signed_permutations_are_the_cube_group():
    from crystalfit.geometry import signed_permutations

    P = signed_permutations()
    assert P.shape == (48, 3, 3)
    torch.testing.assert_close(P[0], torch.eye(3, dtype=torch.float64))
    assert torch.unique(P.reshape(48, 9), dim=0).shape[0] == 48
    eye = torch.eye(3, dtype=torch.float64).expand(48, 3, 3)
    torch.testing.assert_close(P @ P.transpose(-1, -2), eye)
    assert set(torch.linalg.det(P).round().tolist()) == {-1.0, 1.0}
    prods = (P[:, None] @ P[None]).reshape(-1, 9)  # closed under products
    assert torch.unique(torch.cat([prods, P.reshape(48, 9)]), dim=0).shape[0] == 48


def test_relabel_basis_describes_the_same_crystal():
    """Against pymatgen: same distances, same volume and handedness, Cartesian positions turned by P,
    and the relabelled crystal matches the original (StructureMatcher)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from crystalfit.geometry import relabel_basis, signed_permutations

    _, skewed = _skewed_lattices(6, seed=3)
    rng = np.random.default_rng(4)
    counts = np.array([3, 5, 2, 4, 1, 6])
    frac = np.concatenate([rng.random((c, 3)) for c in counts])
    batch = torch.repeat_interleave(torch.arange(6), torch.tensor(counts))
    ops = signed_permutations()[torch.tensor([0, 5, 17, 30, 41, 47])]
    lat2, frac2 = relabel_basis(torch.tensor(skewed), torch.tensor(frac), ops, batch)
    lat2, frac2 = lat2.numpy(), frac2.numpy()
    assert frac2.min() >= 0 and frac2.max() < 1
    np.testing.assert_allclose(np.linalg.det(lat2), np.linalg.det(skewed), rtol=1e-9)
    species = ["Si", "O", "Na", "Cl", "Fe", "K"]
    start = np.concatenate([[0], np.cumsum(counts)])
    matcher = StructureMatcher(primitive_cell=False, scale=False, attempt_supercell=False)
    for k in range(6):
        sl = slice(start[k], start[k + 1])
        names = [species[i % 6] for i in range(counts[k])]
        a = Structure(Lattice(skewed[k]), names, frac[sl])
        b = Structure(Lattice(lat2[k]), names, frac2[sl])
        np.testing.assert_allclose(a.distance_matrix, b.distance_matrix, atol=1e-8)
        assert matcher.fit(a, b)
        # Cartesian positions turned by P, up to lattice translations of the new cell
        d = (frac[sl] @ skewed[k] @ ops[k].numpy().T - frac2[sl] @ lat2[k]) @ np.linalg.inv(lat2[k])
        np.testing.assert_allclose(d, np.round(d), atol=1e-9)
    with pytest.raises(ShapeError, match="ops must have the lattice's shape"):
        relabel_basis(torch.tensor(skewed), torch.tensor(frac), ops[:2], batch)
