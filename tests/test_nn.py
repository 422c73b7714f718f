"""Periodic equivariant backbone: features, graph, heads and numerics against independent references."""
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from ase.build import bulk
from e3nn import o3

from crystalfit.data import CrystalBatch
from crystalfit.exceptions import CrystalfitError, ShapeError, UnknownElementError
from crystalfit.geometry import frac_to_cart, minimum_image_frac
from crystalfit.io import structures_to_batch
from crystalfit.nn import (
    GaussianRadialBasis,
    PeriodicEquivariantNetwork,
    SinusoidalTimeEmbedding,
    cartesian_to_fractional_gradient,
    fourier_features,
    fully_connected_edges,
    lattice_invariants,
    periodic_envelope,
    segment_mean,
)
from crystalfit.testing import random_orthogonal

TINY = dict(hidden_scalars=16, hidden_vectors=4, n_layers=2, n_freqs=4, n_radial=4, time_dim=8)


def _random_batch(sizes, dtype=torch.float64, seed=0):
    rng = np.random.default_rng(seed)
    lattices = [np.diag(rng.uniform(3.0, 6.0, 3)) + rng.normal(0, 0.6, (3, 3)) for _ in sizes]
    fracs = [rng.random((n, 3)) for n in sizes]
    numbers = [rng.integers(1, 90, n) for n in sizes]
    return CrystalBatch.from_arrays(lattices, fracs, numbers, dtype=dtype)


def _net(dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return PeriodicEquivariantNetwork(**{**TINY, **kw}).to(dtype)


# ----------------------------------------------------------------- features
def test_fully_connected_edges_matches_python_loop():
    num_atoms = torch.tensor([1, 3, 0, 2])
    src, dst, crystal = fully_connected_edges(num_atoms)
    expected, start = [], 0
    for b, n in enumerate(num_atoms.tolist()):
        for i in range(n):
            for j in range(n):
                expected.append((start + j, start + i, b))
        start += n
    assert list(zip(src.tolist(), dst.tolist(), crystal.tolist())) == expected


def test_fourier_features_match_loop_and_are_periodic():
    dx = torch.rand(5, 3, dtype=torch.float64) - 0.5
    got = fourier_features(dx, 3)
    ref = np.zeros((5, 18))
    for e in range(5):
        col = 0
        for fn in (np.sin, np.cos):
            for c in range(3):
                for k in range(1, 4):
                    ref[e, col] = fn(2 * np.pi * k * dx[e, c].item())
                    col += 1
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    shifted = fourier_features(dx + torch.tensor([3.0, -2.0, 1.0], dtype=torch.float64), 3)
    torch.testing.assert_close(shifted, got, atol=1e-12, rtol=0)


def test_periodic_envelope_values_derivative_and_period():
    dx = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.1, 0.2], [-0.5, 0.0, 0.0], [0.25, 0.0, 0.0]],
                      dtype=torch.float64, requires_grad=True)
    env = periodic_envelope(dx)
    assert env[0].item() == pytest.approx(1.0)
    assert abs(env[1].item()) < 1e-15 and abs(env[2].item()) < 1e-15
    assert env[3].item() == pytest.approx(1 - math.sin(math.pi / 4) ** 4)
    (grad,) = torch.autograd.grad(env.sum(), dx)
    assert grad[1].abs().max() < 1e-12 and grad[2].abs().max() < 1e-12  # C^1 at the image switch
    torch.testing.assert_close(periodic_envelope(dx.detach() + 1.0), env.detach(), atol=1e-12, rtol=0)


def test_time_embedding_matches_diffcsp_formula():
    dim, t = 8, torch.tensor([0, 1, 37, 999])
    got = SinusoidalTimeEmbedding(dim)(t.double())
    half = dim // 2
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    arg = t.numpy()[:, None] * freqs[None, :]
    np.testing.assert_allclose(got.numpy(), np.concatenate([np.sin(arg), np.cos(arg)], -1), atol=1e-12)
    with pytest.raises(CrystalfitError, match="time_dim is 7"):
        SinusoidalTimeEmbedding(7)


def test_radial_basis_and_lattice_invariants():
    rbf = GaussianRadialBasis(5, 4.0)(torch.tensor([0.0, 2.0], dtype=torch.float64))
    np.testing.assert_allclose(rbf[1].numpy(), np.exp(-0.5 * ((2.0 - np.linspace(0, 4, 5)) / 1.0) ** 2))
    lat = torch.diag(torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64))[None]
    inv = lattice_invariants(lat, 2.0)
    np.testing.assert_allclose(inv[0].numpy(), [1.0, 2.25, 4.0, 0, 0, 0, 0, 0, 0], atol=1e-12)
    lat = _random_batch([1, 1, 1]).lattice
    rot = random_orthogonal(3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(lattice_invariants(lat @ rot, 5.0), lattice_invariants(lat, 5.0))
    # cosines against ase's cell angles
    cell = bulk("Si").cell
    inv = lattice_invariants(torch.tensor(cell[:])[None], 1.0)
    np.testing.assert_allclose(np.degrees(np.arccos(inv[0, 6:].numpy())), cell.angles(), atol=1e-9)


def test_segment_mean_with_empty_segment():
    out = segment_mean(torch.tensor([[1.0], [3.0], [5.0]]), torch.tensor([0, 0, 2]), 3)
    assert out[:, 0].tolist() == [2.0, 0.0, 5.0]


# --------------------------------------------------------- frac conversion
def test_fractional_gradient_conversion_matches_autograd():
    batch = _random_batch([3, 2])
    k = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    u = torch.tensor([0.2, 0.5, -0.3], dtype=torch.float64)

    def energy(r):
        return (torch.sin(r @ k) + 0.1 * (r * r).sum(-1) + (r @ u) ** 3).sum()

    frac = batch.frac.clone().requires_grad_(True)
    (g_frac,) = torch.autograd.grad(energy(frac_to_cart(frac, batch.lattice, batch.batch)), frac)
    r = frac_to_cart(batch.frac, batch.lattice, batch.batch).requires_grad_(True)
    (g_cart,) = torch.autograd.grad(energy(r), r)
    torch.testing.assert_close(cartesian_to_fractional_gradient(g_cart, batch.lattice, batch.batch), g_frac)
    # single lattice without a batch index
    one = batch.select([0])
    frac = one.frac.clone().requires_grad_(True)
    (g_frac,) = torch.autograd.grad(energy(frac @ one.lattice[0]), frac)
    r = (one.frac @ one.lattice[0]).requires_grad_(True)
    (g_cart,) = torch.autograd.grad(energy(r), r)
    torch.testing.assert_close(cartesian_to_fractional_gradient(g_cart, one.lattice[0]), g_frac)


def test_network_frac_vectors_are_converted_atom_vectors():
    batch = _random_batch([2, 4])
    out = _net()(batch, t=torch.tensor([5, 50]))
    torch.testing.assert_close(out["frac_vectors"],
                               cartesian_to_fractional_gradient(out["atom_vectors"], batch.lattice, batch.batch))


# ----------------------------------------------------------------- network
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_mixed_sizes(dtype):
    batch = _random_batch([1, 3, 5, 8], dtype=dtype)
    net = _net(dtype, n_atom_scalars=3, n_crystal_scalars=2)
    out = net(batch, t=torch.tensor([1, 10, 100, 1000]))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {"atom_vectors": (17, 3), "frac_vectors": (17, 3), "atom_scalars": (17, 3),
                      "crystal_scalars": (4, 2), "lattice": (4, 3, 3)}
    for v in out.values():
        assert v.dtype == dtype and v.device == batch.frac.device and torch.isfinite(v).all()
    assert out["atom_vectors"].abs().max() > 1e-3 and out["lattice"].abs().max() > 1e-3


def test_one_atom_cell_and_coincident_atoms_have_finite_values_and_gradients():
    lat = [np.eye(3) * 3.0, np.array([[3.0, 0, 0], [1.0, 3.5, 0], [0.5, 0.2, 4.0]])]
    batch = CrystalBatch.from_arrays(lat, [np.zeros((1, 3)), np.array([[0.1, 0.2, 0.3]] * 2)], [[6], [8, 8]])
    net = _net()
    frac = batch.frac.clone().requires_grad_(True)
    lattice = batch.lattice.clone().requires_grad_(True)
    out = net(batch.replace(frac=frac, lattice=lattice), t=torch.tensor([3, 4]))
    loss = sum((v**2).sum() for v in out.values())
    loss.backward()
    assert all(torch.isfinite(v).all() for v in out.values())
    assert torch.isfinite(frac.grad).all() and torch.isfinite(lattice.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    # alone, a one-atom cell still gets an equivariant vector from its lattice
    assert out["atom_vectors"][0].abs().max() > 1e-6


def test_gradients_reach_every_parameter():
    batch = _random_batch([2, 5])
    net = _net(cond_dim=2, n_atom_scalars=2, n_crystal_scalars=2)
    out = net(batch, t=torch.tensor([10, 200]), cond=torch.randn(2, 2, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum() for v in out.values())
    loss.backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_network_is_continuous_across_the_minimum_image_switch():
    """At dx = 1/2 the minimum-image vector jumps by a lattice vector; the outputs must not."""
    lattice = np.array([[4.0, 0.0, 0.0], [1.5, 3.8, 0.0], [0.7, -0.9, 4.2]])
    net = _net()
    outs = []
    for delta in (-1e-7, 1e-7):
        frac = np.array([[0.1, 0.2, 0.3], [0.6 + delta, 0.33, 0.47]])  # dx_a = 0.5 + delta
        batch = CrystalBatch.from_arrays([lattice], [frac], [[14, 8]])
        d = minimum_image_frac(batch.frac[1] - batch.frac[0])
        outs.append((d @ batch.lattice[0], net(batch, t=torch.tensor([7]))))
    jump = (outs[0][0] - outs[1][0]).norm()
    assert jump > 3.0  # the raw minimum-image vector really jumps (by about |a| = 4)
    for key, value in outs[0][1].items():
        if value.numel():
            assert (value - outs[1][1][key]).abs().max() < 1e-5, key


def test_time_condition_and_type_probability_inputs():
    batch = _random_batch([2, 3])
    net = _net(cond_dim=3)
    scalar_t = net(batch, t=torch.tensor(42))
    vector_t = net(batch, t=torch.tensor([42, 42]))
    torch.testing.assert_close(scalar_t["lattice"], vector_t["lattice"])
    other_t = net(batch, t=torch.tensor([42, 900]))
    assert (other_t["lattice"][1] - vector_t["lattice"][1]).abs().max() > 1e-6
    torch.testing.assert_close(other_t["lattice"][0], vector_t["lattice"][0])
    zeros = net(batch, t=torch.tensor([42, 42]), cond=torch.zeros(2, 3, dtype=torch.float64))
    torch.testing.assert_close(zeros["atom_scalars"], vector_t["atom_scalars"])
    cond = net(batch, t=torch.tensor([42, 42]), cond=torch.ones(2, 3, dtype=torch.float64))
    assert (cond["atom_scalars"] - zeros["atom_scalars"]).abs().max() > 1e-6
    onehot = torch.nn.functional.one_hot(batch.numbers, net.num_species + 1).double()
    soft = net(batch, t=torch.tensor(42), type_probs=onehot)
    torch.testing.assert_close(soft["atom_vectors"], scalar_t["atom_vectors"])
    assert net(batch)["atom_vectors"].shape == (5, 3)  # t=None is allowed


def test_input_errors_name_the_problem():
    batch = _random_batch([2, 3])
    net = _net()
    with pytest.raises(CrystalfitError, match="batch dtype torch.float32 differs from the network dtype torch.float64"):
        net(batch.to(dtype=torch.float32))
    with pytest.raises(UnknownElementError, match=r"atomic numbers range .*num_species=100"):
        net(batch.replace(numbers=batch.numbers + 50))
    with pytest.raises(ShapeError, match=r"t has shape \(3,\), expected \(2,\)"):
        net(batch, t=torch.tensor([1, 2, 3]))
    with pytest.raises(ShapeError, match="this network takes no condition"):
        net(batch, cond=torch.zeros(2, 4))
    with pytest.raises(ShapeError, match=r"cond has shape \(2, 4\), expected \(2, cond_dim=3\)"):
        _net(cond_dim=3)(batch, cond=torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ShapeError, match=r"type_probs has shape \(5, 3\)"):
        net(batch, type_probs=torch.zeros(5, 3, dtype=torch.float64))
    with pytest.raises(CrystalfitError, match="hidden_scalars is 0"):
        PeriodicEquivariantNetwork(hidden_scalars=0)
    with pytest.raises(CrystalfitError, match="time_dim is 5"):
        PeriodicEquivariantNetwork(time_dim=5)
    with pytest.raises(CrystalfitError, match="cond_dim is -1"):
        PeriodicEquivariantNetwork(cond_dim=-1)


def test_heads_can_be_switched_off_and_parameters_counted():
    batch = _random_batch([2, 1])
    net = _net(n_atom_scalars=0, lattice_head=False)
    out = net(batch)
    assert "lattice" not in out and out["atom_scalars"].shape == (3, 0) and out["crystal_scalars"].shape == (2, 0)
    assert net.n_parameters == sum(p.numel() for p in net.parameters())
    assert PeriodicEquivariantNetwork().n_parameters < 300_000


def test_state_dict_and_pickle_round_trips_reproduce_outputs():
    batch = _random_batch([3, 2])
    net = _net(seed=1)
    fresh = _net(seed=2)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(batch, t=torch.tensor([1, 2]))["lattice"], net(batch, t=torch.tensor([1, 2]))["lattice"])
    unpickled = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(unpickled(batch)["atom_vectors"], net(batch)["atom_vectors"], atol=0, rtol=0)


def test_dtype_cast_restores_exact_wigner_3j_constants():
    net = PeriodicEquivariantNetwork(**TINY)  # built in float32
    net = net.to(torch.float64)
    found = 0
    for name, buf in net.named_buffers():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("_w3j_"):
            ls = [int(v) for v in leaf[5:].split("_")]
            assert buf.dtype == torch.float64
            assert (buf - o3.wigner_3j(*ls, dtype=torch.float64)).abs().max() == 0
            found += 1
    assert found > 0


def test_structures_from_ase_run_in_float32():
    atoms = bulk("NaCl", "rocksalt", a=5.6)
    atoms.rattle(0.05, seed=0)
    batch = structures_to_batch([atoms, bulk("Cu", cubic=True)]).to(dtype=torch.float32)
    out = _net(torch.float32)(batch, t=torch.tensor([5, 6]))
    assert out["frac_vectors"].shape == (6, 3) and torch.isfinite(out["lattice"]).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    batch = _random_batch([2, 3]).to(device="cuda", dtype=torch.float32)
    net = _net(torch.float32).to("cuda")
    out = net(batch, t=torch.tensor([1, 2], device="cuda"))
    assert all(v.device.type == "cuda" for v in out.values())
    cpu = _net(torch.float32)(batch.to(device="cpu"), t=torch.tensor([1, 2]))
    torch.testing.assert_close(out["lattice"].cpu(), cpu["lattice"], atol=1e-4, rtol=1e-4)


def test_polar_factor_matches_svd_and_is_smooth_at_cubic_cells():
    from crystalfit.geometry import polar_factor

    g = torch.Generator().manual_seed(0)
    L = torch.randn(200, 3, 3, generator=g, dtype=torch.float64)
    W, _, Vh = torch.linalg.svd(L)
    U = polar_factor(L)
    torch.testing.assert_close(U, W @ Vh, atol=1e-10, rtol=0)
    torch.testing.assert_close(U @ U.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(200, 3, 3),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(torch.det(U), torch.sign(torch.det(L)))
    R = random_orthogonal(1, torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(polar_factor(L @ R), U @ R, atol=1e-10, rtol=0)
    # finite differences at a cubic cell (repeated singular values: SVD backward is undefined there)
    cubic = (4.2 * torch.eye(3, dtype=torch.float64)).requires_grad_(True)
    w = torch.randn(3, 3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((polar_factor(cubic) * w).sum(), cubic)
    assert torch.all(torch.isfinite(grad))
    E = torch.randn(3, 3, generator=g, dtype=torch.float64)
    h = 1e-6
    fd = ((polar_factor(cubic.detach() + h * E) - polar_factor(cubic.detach() - h * E)) * w).sum() / (2 * h)
    assert abs(float((grad * E).sum() - fd)) < 1e-7
    # analytic: dU = (dL - dL^T) / (2a) at L = a I
    torch.testing.assert_close(grad, (w - w.T) / (2 * 4.2), atol=1e-10, rtol=0)
    with pytest.raises(ShapeError, match=r"\(\.\.\., 3, 3\)"):
        polar_factor(torch.zeros(3, 2))


def test_polar_factor_of_singular_and_ill_conditioned_float32_lattices():
    """A pure-noise lattice of the diffusion prior can be singular in float32 (a training run with
    timestep_density="linear" once stopped on it): no exception; ill-conditioned ones still match SVD."""
    from crystalfit.geometry import polar_factor

    singular = torch.tensor([[1.0, 2, 3], [2, 4, 6], [1, 0, 0]])
    assert int(torch.linalg.inv_ex(singular).info) != 0  # the case the plain iteration raised on
    ill = torch.tensor([[1.0, 2, 3], [2, 4, 6.000001], [1, 0, 0]])  # condition number ~3.5e7
    regular = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(2))
    U = polar_factor(torch.cat([singular[None], ill[None], regular]))
    assert U.dtype == torch.float32 and torch.all(torch.isfinite(U))
    torch.testing.assert_close(U[0], torch.eye(3))  # no unique polar factor: the identity
    W, _, Vh = torch.linalg.svd(ill.double())
    torch.testing.assert_close(U[1].double(), W @ Vh, atol=1e-4, rtol=0)
    torch.testing.assert_close(U[2:], polar_factor(regular), atol=0, rtol=0)  # the others are untouched
    lat = torch.stack([singular, 4.0 * torch.eye(3)]).requires_grad_(True)
    (grad,) = torch.autograd.grad(polar_factor(lat).sum(), lat)
    assert torch.all(torch.isfinite(grad))


def test_polar_lattice_head_is_equivariant_and_represents_a_cubic_target():
    from crystalfit.geometry import polar_factor
    from crystalfit.nn import LatticeHead

    head = LatticeHead(4, polar=True).double()
    g = torch.Generator().manual_seed(2)
    pooled = torch.randn(5, 4, generator=g, dtype=torch.float64)
    L = torch.randn(5, 3, 3, generator=g, dtype=torch.float64)
    R = random_orthogonal(1, torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(head(pooled, L @ R), head(pooled, L) @ R, atol=1e-10, rtol=0)
    # M = c1 I, M2 = c2 I gives c1 L + c2 U exactly: the noise of a cubic dataset in the frame of L_t
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.weight[[0, 4, 8], 0] = 2.0
        head.linear.weight[[9, 13, 17], 0] = -3.0
    one = torch.zeros(5, 4, dtype=torch.float64)
    one[:, 0] = 1.0
    torch.testing.assert_close(head(one, L), 2.0 * L - 3.0 * polar_factor(L))


def test_image_edge_geometry_matches_a_loop_over_images_and_keeps_half_cell_edges():
    """edge_geometry="images": the weighted image mean equals an explicit loop, its weights sum to 1, it is
    continuous where the minimum image switches, and (unlike the envelope) it does not vanish at dx = 1/2."""
    from crystalfit.nn import GaussianRadialBasis, image_edge_geometry
    from e3nn import o3

    gen = torch.Generator().manual_seed(3)
    lattice = torch.tensor([[4.0, 0.0, 0.0], [1.5, 3.8, 0.0], [0.7, -0.9, 4.2]], dtype=torch.float64)
    dfrac = minimum_image_frac(torch.rand(40, 3, generator=gen, dtype=torch.float64) * 2 - 1)
    dfrac[0] = torch.tensor([0.5, 0.0, -0.5], dtype=torch.float64)  # half-cell edge: the envelope's zero
    radial = GaussianRadialBasis(6, 8.0).double()
    sh = o3.SphericalHarmonics([1, 2], normalize=False, normalization="component")
    got_r, got_s, centre = image_edge_geometry(dfrac, lattice.expand(40, 3, 3), radial, sh)
    for e in range(40):
        ref_r, ref_s, total = 0.0, 0.0, 0.0
        for b in itertools.product([0, 1], repeat=3):
            u = [float(dfrac[e, c]) - b[c] * (1.0 if dfrac[e, c] >= 0 else -1.0) for c in range(3)]
            w = float(np.prod([math.cos(math.pi * uc / 2) ** 2 for uc in u]))
            d = torch.tensor(u, dtype=torch.float64) @ lattice
            r = float(d.norm())
            ref_r = ref_r + w * radial(torch.tensor([r], dtype=torch.float64))[0]
            ref_s = ref_s + w * sh(d / r) * (1 - math.exp(-r * r / 0.01))
            total += w
        assert abs(total - 1.0) < 1e-12
        assert torch.allclose(got_r[e], ref_r, atol=1e-10) and torch.allclose(got_s[e], ref_s, atol=1e-10)
        if e == 0:
            assert float(centre[e]) == pytest.approx(0.25) and float(ref_r.max()) > 0.1
    # continuity across the switch of the minimum image along a
    pair = torch.tensor([[0.5 - 1e-9, 0.2, 0.1], [-0.5 + 1e-9, 0.2, 0.1]], dtype=torch.float64)
    a, b = (image_edge_geometry(minimum_image_frac(p[None]), lattice[None], radial, sh) for p in pair)
    for x, y in zip(a, b):
        assert (x - y).abs().max() < 1e-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_image_edges_network_passes_the_symmetry_checks_and_is_continuous(dtype):
    from crystalfit.testing import check_all

    batch = _random_batch([2, 3, 1])
    torch.manual_seed(0)
    net = PeriodicEquivariantNetwork(**{**TINY, "edge_geometry": "images"})
    check_all(net, batch, dtype=dtype, crystal_kwargs=dict(t=torch.tensor([3, 300, 900])))
    lattice = np.array([[4.0, 0.0, 0.0], [1.5, 3.8, 0.0], [0.7, -0.9, 4.2]])
    outs = []
    for delta in (-1e-7, 1e-7):
        frac = np.array([[0.1, 0.2, 0.3], [0.6 + delta, 0.33, 0.47]])
        outs.append(net.double()(CrystalBatch.from_arrays([lattice], [frac], [[14, 8]]), t=torch.tensor([7])))
    for key, value in outs[0].items():
        if value.numel():
            assert (value - outs[1][key]).abs().max() < 1e-5, key
    with pytest.raises(CrystalfitError, match="edge_geometry"):
        PeriodicEquivariantNetwork(edge_geometry="radius")


def test_joint_fourier_features_match_a_loop_and_the_network_stays_symmetric():
    from crystalfit.nn import joint_fourier_features, reciprocal_vectors
    from crystalfit.testing import check_all

    g = reciprocal_vectors(2)
    assert g.shape == (62, 3) and len({tuple(v) for v in g.tolist()} | {tuple(v) for v in (-g).tolist()}) == 124
    dx = torch.rand(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 0.5
    got = joint_fourier_features(dx, g)
    for e in range(5):
        for m, v in enumerate(g.tolist()):
            arg = 2 * math.pi * sum(v[c] * float(dx[e, c]) for c in range(3))
            assert got[e, m] == pytest.approx(math.sin(arg)) and got[e, 62 + m] == pytest.approx(math.cos(arg))
    assert torch.allclose(joint_fourier_features(dx + torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64), g), got)
    assert reciprocal_vectors(0).shape == (0, 3) and reciprocal_vectors(1).shape == (13, 3)
    for bad in (-1, 1.5):
        with pytest.raises(CrystalfitError, match="max_index"):
            reciprocal_vectors(bad)
    torch.manual_seed(0)
    net = PeriodicEquivariantNetwork(**{**TINY, "joint_freqs": 1})
    check_all(net, _random_batch([2, 3, 1]), dtype=torch.float64, crystal_kwargs=dict(t=torch.tensor([3, 300, 900])))
