"""The exact Cu3Au prior of ``benchmarks/xrd_guidance.py oracle --d1`` (Table D1 with a perfect prior)."""
import itertools
import math

import numpy as np
import pytest
import torch

from _data import xrd_benchmark
from crystalfit.datasets import cu3au_placements, make_cu3au
from crystalfit.diffusion import WrappedNormalTorus
from crystalfit.diffusion.torus import wrapped_normal_log_density

pytest.importorskip("pymatgen")


@pytest.fixture(scope="module")
def bench():
    return xrd_benchmark()


def test_log_permanent_matches_the_sum_over_permutations(bench):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 3, 5, 6):
        a = torch.rand(3, n, n, generator=gen, dtype=torch.float64) * 3
        brute = [sum(math.prod(float(a[k, i, p[i]]) for i in range(n)) for p in itertools.permutations(range(n)))
                 for k in range(3)]
        assert torch.allclose(bench.log_permanent(a.log()), torch.tensor(brute, dtype=torch.float64).log())
    # far beyond float64's range in linear space: exact in log space (one permutation carries all the weight)
    log_a = torch.full((1, 8, 8), -5000.0, dtype=torch.float64)
    log_a[0, torch.arange(8), (torch.arange(8) + 3) % 8] = -1000.0
    assert torch.allclose(bench.log_permanent(log_a), torch.tensor([-8000.0], dtype=torch.float64))


def test_d1_prior_is_the_mixture_of_the_28_placements(bench):
    sites = torch.tensor(make_cu3au(0).get_scaled_positions(), dtype=torch.float64)
    fn = bench.oracle_d1_model_fn(WrappedNormalTorus().double(), sites)
    gen = torch.Generator().manual_seed(1)
    x = (sites + 0.03 * torch.randn(8, 3, generator=gen, dtype=torch.float64))[torch.randperm(8, generator=gen)]
    sig = torch.tensor([0.04], dtype=torch.float64)
    st = math.sqrt(0.01**2 + 0.04**2)
    # independent reference: atoms ordered Cu x 6, Au x 2 (D1_ORDER); each placement puts the Au atoms on its
    # two Au sites and the Cu atoms on the other six, summed over the orderings of like atoms
    orders = []
    for p in cu3au_placements():
        au = list(p["au_sites"])
        cu = [j for j in range(8) if j not in au]
        orders += [list(pc) + list(pa) for pc in itertools.permutations(cu) for pa in itertools.permutations(au)]
    assert len(orders) == 28 * 720 * 2 == math.factorial(8)
    terms = wrapped_normal_log_density(x[None] - sites[torch.tensor(orders)], st).sum((1, 2))
    ref = float(torch.logsumexp(terms, 0))
    assert float(fn.log_p(x[None], sig)) == pytest.approx(ref, abs=1e-9)


def test_d1_prior_symmetries(bench):
    sites = torch.tensor(make_cu3au(0).get_scaled_positions(), dtype=torch.float64)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 8, 3, generator=gen, dtype=torch.float64)
    sig = torch.full((3,), 0.06, dtype=torch.float64)
    perm = torch.randperm(8, generator=gen)
    fcc = torch.tensor([0.5, 0.0, 0.25], dtype=torch.float64)  # an FCC lattice vector of the supercell
    shift = torch.tensor([0.137, -0.05, 0.31], dtype=torch.float64)  # not one
    fixed = bench.oracle_d1_model_fn(WrappedNormalTorus().double(), sites)
    free = bench.oracle_d1_model_fn(WrappedNormalTorus().double(), sites, translation_invariant=True)
    for fn in (fixed, free):
        ref = fn.log_p(x, sig)
        assert torch.allclose(fn.log_p(x[:, perm], sig), ref)
        assert torch.allclose(fn.log_p((x + fcc) % 1.0, sig), ref)
    assert torch.allclose(free.log_p((x + shift) % 1.0, sig), free.log_p(x, sig))
    assert not torch.allclose(fixed.log_p((x + shift) % 1.0, sig), fixed.log_p(x, sig))


def test_fcc_site_rate(bench):
    sites = torch.tensor(make_cu3au(0).get_scaled_positions(), dtype=torch.float64)
    a = make_cu3au(3)
    moved = a.copy()
    moved.translate([0.4, 0.7, 1.1])  # any rigid translation stays on the (translated) FCC sites
    off = a.copy()
    off.positions[2] += [0.5, 0.0, 0.0]
    assert bench.fcc_site_rate([a, moved, off], sites) == pytest.approx(2 / 3)
    assert np.isfinite(bench.fcc_site_rate([a], sites))


def test_overlapping_share(bench):
    a = make_cu3au(3)
    clash = a.copy()
    clash.positions[1] = clash.positions[0] + [0.3, 0.0, 0.0]  # two atoms 0.3 A apart
    assert bench.overlapping_share([a, clash]) == pytest.approx(0.5)
    assert bench.overlapping_share([a]) == 0.0


def test_edge_envelope_share_counts_half_cell_edges(bench):
    """Every pair of FCC sites of the Cu3Au supercell is half a lattice vector apart along some axis, so the
    default envelope switches off all its edges; atoms at random positions lose about a quarter of theirs."""
    from ase import Atoms

    assert bench.edge_envelope_share([make_cu3au(0)], 0.01) == 1.0
    generic = Atoms("Si8", cell=np.eye(3) * 5.0, pbc=True,
                    scaled_positions=np.random.default_rng(1).uniform(size=(8, 3)))
    assert 0.1 < bench.edge_envelope_share([generic], 0.01) < 0.4
