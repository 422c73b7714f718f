"""Tests of crystalfit.guidance: periodic Tweedie moments and the XRD guidance."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crystalfit.diffusion import wrapped_normal_d2_log_p, wrapped_normal_d_log_p, wrapped_normal_log_density
from crystalfit.exceptions import CrystalfitError, ShapeError
from crystalfit.guidance import (
    XRDGuidance,
    periodic_tweedie_moments,
    rescale_to_score_ratio,
    tweedie_lhs,
    wrapped_normal_log_derivatives,
)
from crystalfit.xrd import miller_indices, structure_factor_intensities

F64 = torch.float64


def _mi(d):
    return d - torch.round(d)


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("sigma", [0.005, 0.05, 0.2, 0.5])
def test_kernel_derivatives_match_diffusion_module_and_autograd(sigma):
    y = torch.linspace(-1.3, 1.7, 301, dtype=F64)
    d1, p2 = wrapped_normal_log_derivatives(y, sigma)
    ref1 = -wrapped_normal_d_log_p(y, sigma)
    ref2 = wrapped_normal_d2_log_p(y, sigma) + ref1**2
    np.testing.assert_allclose(d1, ref1, rtol=1e-10, atol=1e-8 / sigma)
    np.testing.assert_allclose(p2, ref2, rtol=1e-8, atol=1e-8 / sigma**2)
    # autograd of the log density (independent of both image-sum formulas)
    yy = y.clone().requires_grad_(True)
    g = torch.autograd.grad(wrapped_normal_log_density(yy, sigma).sum(), yy, create_graph=True)[0]
    gg = torch.autograd.grad(g.sum(), yy)[0]
    np.testing.assert_allclose(d1, g.detach(), rtol=1e-9, atol=1e-8 / sigma)
    np.testing.assert_allclose(p2, gg + g.detach() ** 2, rtol=1e-7, atol=1e-7 / sigma**2)


# ----------------------------------------------------------------------------- Tweedie solve


@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.02])
def test_small_noise_limit(sigma):
    st = torch.linspace(-3, 3, 13, dtype=F64)
    s = st / sigma
    delta, c = periodic_tweedie_moments(s, sigma)
    np.testing.assert_allclose(delta, -(sigma**2) * s, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(c, torch.full_like(s, sigma**2), rtol=1e-9)
    ds = torch.linspace(-0.5, 0.5, 13, dtype=F64) / sigma**2
    delta, c = periodic_tweedie_moments(s, sigma, ds)
    np.testing.assert_allclose(delta, -(sigma**2) * s, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(c, sigma**2 * (1 + sigma**2 * ds), rtol=1e-9)


def _fine_grid_lhs(delta, c, sigma, n=20001):
    """E_{x0 ~ WN(m, c)}[g'(x_t - x0)], E[g'' + g'^2] on a uniform periodic grid (independent of the GH rule)."""
    v = (torch.arange(n, dtype=F64) + 0.5) / n - 0.5  # v = x0 - m
    w = torch.softmax(wrapped_normal_log_density(v[None], c.sqrt()[:, None]), -1)
    y = delta[:, None] - v[None]  # x_t - x0 = delta - (x0 - m)
    g1 = -wrapped_normal_d_log_p(y, sigma)
    p2 = wrapped_normal_d2_log_p(y, sigma) + g1**2
    return (w * g1).sum(-1), (w * p2).sum(-1)


@pytest.mark.parametrize("tau", [0.03, 0.1, 0.2])
def test_known_wrapped_normal_prior(tau):
    """p0 = WN(mu0, tau^2)  =>  p_t = WN(mu0, tau^2 + sigma^2); compare with the exact posterior on a grid.

    The exact score and its derivative (ds) are passed, so the equations hold for the
    true posterior.  Tolerances: where kernel and prior are both narrow (max(sigma, tau) <= 0.05) the
    posterior is Gaussian to ~exp(-1/(8 max^2)) ~ 1e-20 and (m, c) must equal its mean
    and variance (1e-6).  Elsewhere the posterior is not exactly wrapped normal (worst:
    x_t near the antipode of mu0 at sigma = tau = 0.2, where it wraps around the torus
    and m is 0.18 posterior std off, whatever the quadrature order); the solved m must
    sit within 0.25 posterior std of the circular mean and c within -5%..+15%
    of the circular variance -log|E e^{2 pi i x0}| / (2 pi^2).
    """
    rng = np.random.default_rng(int(tau * 1000))
    n = 10000
    x0 = (torch.arange(n, dtype=F64) + 0.5) / n
    mu0 = 0.3
    for sigma in [0.005, 0.05, 0.1, 0.2, 0.35, 0.5]:
        st = math.sqrt(tau**2 + sigma**2)
        xt = torch.as_tensor((mu0 + st * rng.standard_normal(4)) % 1.0)
        s = -wrapped_normal_d_log_p(xt - mu0, st)
        ds = wrapped_normal_d2_log_p(xt - mu0, st)
        logpost = wrapped_normal_log_density(x0 - mu0, tau)[None] + wrapped_normal_log_density(xt[:, None] - x0, sigma)
        post = torch.softmax(logpost, -1)
        g1, p2 = wrapped_normal_log_derivatives(xt[:, None] - x0, sigma)
        # the identities (Eqs. 36, 38) themselves
        np.testing.assert_allclose((post * g1).sum(-1), s, rtol=1e-9, atol=1e-9 * s.abs().max())
        np.testing.assert_allclose((post * p2).sum(-1), s**2 + ds, rtol=1e-9, atol=1e-9 * (s**2 + ds.abs()).max())
        z = (post * torch.exp(2j * math.pi * x0)).sum(-1)
        m_post = torch.angle(z) / (2 * math.pi)
        c_post = -torch.log(z.abs()) / (2 * math.pi**2)

        delta, c, info = periodic_tweedie_moments(s, sigma, ds, return_info=True)
        assert bool(info["converged"].all()), (sigma, tau)
        # the solution satisfies the equations under an independent (fine-grid) integral
        # (error in the O(1) scaled units sigma F1, sigma^2 F2: ~1e-15 in the Gaussian regime; the
        # 32-node Gauss-Hermite rule loses accuracy where a posterior wider than the kernel,
        # c ~ 2 sigma^2 at sigma = 0.2, reaches the near-jump of g' at the antipode: up to ~1.3e-2)
        f1, f2 = _fine_grid_lhs(delta, c, sigma)
        quad_tol = 1e-9 if max(sigma, tau) <= 0.05 else 2e-2
        assert ((f1 - s).abs() * sigma).max() < quad_tol, (sigma, tau)
        assert ((f2 - s**2 - ds).abs() * sigma**2).max() < quad_tol, (sigma, tau)
        dm = _mi(xt - delta - m_post).abs() / c_post.sqrt()
        if max(sigma, tau) <= 0.05:
            assert dm.max() < 1e-6
            np.testing.assert_allclose(c, c_post, rtol=1e-6)
        else:
            assert dm.max() < 0.25, (sigma, tau, dm)
            assert ((c / c_post) > 0.95).all() and ((c / c_post) < 1.15).all(), (sigma, tau, c / c_post)
        # the paper's ds = 0: right whenever sigma << tau (c -> sigma^2 (1 + O(sigma^2/tau^2)))
        if sigma <= 0.005:
            d0, c0 = periodic_tweedie_moments(s, sigma)
            assert (_mi(xt - d0 - m_post).abs() / c_post.sqrt()).max() < 1e-6
            np.testing.assert_allclose(c0, sigma**2, rtol=1e-9)


@pytest.mark.parametrize("sigma", [0.005, 0.1, 0.3, 0.5])
def test_tweedie_gradients_match_finite_differences(sigma):
    gen = torch.Generator().manual_seed(7)
    scale = {0.005: 1.5, 0.1: 1.5, 0.3: 0.5, 0.5: 0.03}[sigma] / sigma
    s = (torch.randn(12, generator=gen, dtype=F64) * scale).requires_grad_(True)
    ds_scale = {0.005: 0.2, 0.1: 0.2, 0.3: 0.1, 0.5: 0.005}[sigma] / sigma**2
    ds = (ds_scale * torch.randn(12, generator=gen, dtype=F64)).requires_grad_(True)
    delta, c, info = periodic_tweedie_moments(s, sigma, ds, tol=1e-14, return_info=True)
    conv = info["converged"]
    assert conv.float().mean() > 0.5
    s0, ds0 = s.detach(), ds.detach()
    for k, out in enumerate((delta, c)):
        grads = torch.autograd.grad(out.sum(), (s, ds), retain_graph=True)
        for which, g in enumerate(grads):
            x = (s0, ds0)[which]
            h = 1e-6 * x.abs().clamp_min(1.0)
            plus = [s0, ds0]
            minus = [s0, ds0]
            plus[which], minus[which] = x + h, x - h
            fp = periodic_tweedie_moments(plus[0], sigma, plus[1], tol=1e-14)[k]
            fm = periodic_tweedie_moments(minus[0], sigma, minus[1], tol=1e-14)[k]
            fd = (fp - fm) / (2 * h)
            natural = (sigma**2, sigma**3, sigma**4, sigma**5)[k + 2 * which]  # d(delta,c)/d(s,ds) scales
            np.testing.assert_allclose(g[conv], fd[conv], rtol=1e-5, atol=1e-7 * fd[conv].abs().max() + 1e-8 * natural)
            assert (g[~conv] == 0).all()  # unsolvable entries carry no gradient


def test_unsolvable_scores_are_flagged_and_finite():
    sigma = 0.1
    s = torch.tensor([10.0, -30.0, 1.0], dtype=F64) / sigma  # |sigma s| above max|sigma g'| ~ 5 for the first two
    s.requires_grad_(True)
    delta, c, info = periodic_tweedie_moments(s, sigma, return_info=True)
    assert info["converged"].tolist() == [False, False, True]
    assert torch.isfinite(delta).all() and torch.isfinite(c).all()
    np.testing.assert_allclose(c[:2].detach(), 1e-6 * sigma**2, rtol=1e-9)  # saturated at the lower bound
    assert delta[0] < -0.45 and delta[1] > 0.45  # posterior mean pushed the way the score points
    (grad,) = torch.autograd.grad(delta.sum(), s)
    assert grad[0] == 0 and grad[1] == 0 and grad[2] != 0


@pytest.mark.parametrize(
    "sigma, delta, c_over_s2, tol",
    [
        (0.02, 0.01, 1.0, 1e-12),  # one image only: exact up to rounding
        (0.1, -0.03, 0.8, 1e-6),  # |delta| + 5 sqrt(c) < 1/2: documented 1e-6 (scaled units)
        (0.3, 0.2, 0.5, 1e-5),  # smooth kernel
        (0.5, 0.4, 2.0, 1e-4),
        (0.1, 0.4, 1.0, 0.1),  # posterior reaches the antipode of a sharp kernel: documented few %
        (0.2, 0.2, 2.0, 0.05),
    ],
)
def test_tweedie_lhs_quadrature_accuracy(sigma, delta, c_over_s2, tol):
    d = torch.tensor([delta], dtype=F64)
    c = torch.tensor([c_over_s2 * sigma**2], dtype=F64)
    f1, f2 = tweedie_lhs(d, c, sigma)
    r1, r2 = _fine_grid_lhs(d, c, sigma)
    assert ((f1 - r1).abs() * sigma).item() < tol
    assert ((f2 - r2).abs() * sigma**2).item() < tol


def test_sigma_must_be_positive():
    with pytest.raises(CrystalfitError, match="sigma must be finite and > 0"):
        periodic_tweedie_moments(torch.ones(3), torch.tensor([0.1, 0.0, 0.1]))


# ----------------------------------------------------------------------------- XRD guidance

PEROV_SITES = torch.tensor([[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0], [0, 0.5, 0.5]], dtype=F64)
PEROV_Z = torch.tensor([8, 7, 7, 81, 27])  # Crystal-1 order [O, N, N, Tl, Co]


def _smooth_score(x, x0, sigma, amp=0.8):
    """A smooth periodic stand-in for a score network: -amp sin(2 pi (x - x0)) / (2 pi sigma^2)."""
    return -amp * torch.sin(2 * math.pi * (x - x0)) / (2 * math.pi * sigma**2)


def _two_crystals(gen):
    numbers = torch.tensor([8, 29, 56, 26, 8])
    batch = torch.tensor([0, 0, 0, 1, 1])
    lattice = torch.stack([4.0 * torch.eye(3, dtype=F64), 3.0 * torch.eye(3, dtype=F64) + 0.3]) \
        + 0.1 * torch.randn(2, 3, 3, generator=gen, dtype=F64)
    x0 = torch.rand(5, 3, generator=gen, dtype=F64)
    hkl = miller_indices(1)
    target = structure_factor_intensities(x0, numbers, lattice, batch, hkl)
    return numbers, batch, lattice, x0, hkl, target


@pytest.mark.parametrize("sigma", [0.05, 0.2])
@pytest.mark.parametrize("through_network", [True, False])
def test_loss_gradient_matches_finite_differences(sigma, through_network):
    gen = torch.Generator().manual_seed(11)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    guide = XRDGuidance(1.7 * target, numbers, batch, hkl, through_network=through_network, variance_grad=True)
    sig = torch.full((5, 1), sigma, dtype=F64)
    x = _mi(x0 + 0.6 * sigma * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0
    fixed_score = _smooth_score(x, x0, sigma)

    def total_loss(xx):
        score = _smooth_score(xx, x0, sigma) if through_network else fixed_score
        return guide.loss(xx, score, sig, lattice)[0].sum()

    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(total_loss(xr), xr)
    fd = torch.zeros_like(x)
    h = 1e-6
    for i in range(5):
        for j in range(3):
            e = torch.zeros_like(x)
            e[i, j] = h
            fd[i, j] = (total_loss(x + e) - total_loss(x - e)) / (2 * h)
    # the fitted scale is detached; envelope theorem => FD of the scale-minimised loss agrees
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-6 * fd.abs().max())


def test_score_ratio_scaling_is_exact_per_crystal():
    gen = torch.Generator().manual_seed(3)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    sigma = torch.full((5, 1), 0.05, dtype=F64)
    x = (x0 + 0.03 * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0
    score = _smooth_score(x, x0, 0.05)
    score[3:] *= 7.0  # different score magnitude in crystal 1
    for r in (1.0, 3.0, 4.0):
        g = XRDGuidance(target, numbers, batch, hkl, score_ratio=r, through_network=False)(
            frac=x, score=score, sigma=sigma, t=torch.tensor([5, 5]), lattice=lattice)
        for b in (0, 1):
            rows = batch == b
            assert g[rows].abs().max().item() == pytest.approx(r * score[rows].abs().max().item(), rel=1e-12)
    # helper directly: zero gradient or zero score -> zero, NaN -> zero
    g = torch.tensor([[1.0, 2, 3], [0, 0, 0], [float("nan"), 1, 1]], dtype=F64)
    s = torch.tensor([[1.0, 1, 1], [5, 5, 5], [1, 1, 1]], dtype=F64)
    out = rescale_to_score_ratio(g, s, torch.tensor([0, 1, 2]), 3, 2.0)
    np.testing.assert_allclose(out[0], [2 / 3, 4 / 3, 2.0])
    assert (out[1] == 0).all() and (out[2] == 0).all()


def test_prediction_ratio_reference_matches_the_networks_normalisation():
    """ratio_reference="prediction": max|g| = r max|score / sqrt(lambda_t)| per crystal, with lambda_t the
    normalisation the network is trained with (the torus process's sigma_norm table at step t)."""
    from crystalfit.diffusion import WrappedNormalTorus

    gen = torch.Generator().manual_seed(5)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    torus = WrappedNormalTorus().double()
    t_crystal = torch.tensor([40, 990])  # two noise levels: sigma ~ 0.008 and ~ 0.48
    t_atom = t_crystal[batch]
    sigma = torus.sigma_at(t_atom, x0)
    x = (x0 + sigma * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0
    score = _smooth_score(x, x0, 0.05)
    pred = torus.prediction_from_score(score, t_atom)  # the network's normalised output
    kw = dict(frac=x, score=score, sigma=sigma, t=t_crystal, lattice=lattice)
    g_score = XRDGuidance(target, numbers, batch, hkl, score_ratio=4.0, through_network=False)(**kw)
    g_pred = XRDGuidance(target, numbers, batch, hkl, score_ratio=4.0, through_network=False,
                         ratio_reference="prediction")(**kw)
    for b in (0, 1):
        rows = batch == b
        assert g_pred[rows].abs().max().item() == pytest.approx(4.0 * pred[rows].abs().max().item(), rel=1e-9)
        # same direction as the default, another length: the factor is 1/sqrt(lambda_t)
        lam = float(torus.sigma_norm[t_crystal[b]])
        np.testing.assert_allclose(g_pred[rows], g_score[rows] / math.sqrt(lam), rtol=1e-9)
    with pytest.raises(CrystalfitError, match="ratio_reference = 'eps' is not supported"):
        XRDGuidance(target, numbers, batch, hkl, ratio_reference="eps")


def _mixture_logp(x, sig, comps, tau=0.01):
    st = math.sqrt(tau**2 + sig**2)
    logs = torch.stack([wrapped_normal_log_density(x - X, st).sum() for X in comps])
    return torch.logsumexp(logs, 0)


@pytest.mark.parametrize("sigma", [0.02, 0.05, 0.1])
def test_guidance_points_toward_structure_of_target(sigma):
    """Paper's first experiment as an exact-score toy: prior = two perovskites (Crystal-1/2).

    x_t is drawn from the forward process started at crystal k; the guidance toward
    I(crystal k) must point back toward crystal k (positive cosine with the
    minimum-image displacement) in most draws.
    """
    X1 = PEROV_SITES
    X2 = PEROV_SITES[[1, 2, 3, 0, 4]]  # Crystal-2 order [Tl, O, N, N, Co] seen from Crystal-1's atom order
    lattice = 4.24596 * torch.eye(3, dtype=F64)[None]
    b0 = torch.zeros(5, dtype=torch.long)
    hkl = miller_indices(2)
    gen = torch.Generator().manual_seed(0)
    cosines = []
    for _ in range(10):
        for X in (X1, X2):
            target = structure_factor_intensities(X, PEROV_Z, lattice, b0, hkl)
            x = ((X + sigma * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0).requires_grad_(True)
            score = torch.autograd.grad(_mixture_logp(x, sigma, (X1, X2)), x, create_graph=True)[0]
            g = XRDGuidance(target, PEROV_Z, b0, hkl, score_ratio=4.0)(
                frac=x, score=score, sigma=torch.full((5, 1), sigma, dtype=F64), t=torch.tensor([1]), lattice=lattice)
            d = _mi(X - x.detach())
            cosines.append(float((g * d).sum() / (g.norm() * d.norm())))
    cosines = np.array(cosines)
    assert (cosines > 0).mean() >= 0.75, cosines
    assert cosines.mean() > 0.2, cosines


def test_permutation_equivariance():
    gen = torch.Generator().manual_seed(5)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    sigma = torch.tensor([[0.05], [0.05], [0.05], [0.2], [0.2]], dtype=F64)
    x = (x0 + 0.04 * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0
    score = _smooth_score(x, x0, sigma)
    kwargs = dict(t=torch.tensor([3, 3]), lattice=lattice)
    g = XRDGuidance(target, numbers, batch, hkl, through_network=False)(frac=x, score=score, sigma=sigma, **kwargs)
    perm = torch.tensor([2, 0, 1, 4, 3])  # permute atoms within each crystal
    gp = XRDGuidance(target, numbers[perm], batch[perm], hkl, through_network=False)(
        frac=x[perm], score=score[perm], sigma=sigma[perm], **kwargs)
    np.testing.assert_allclose(gp, g[perm], rtol=1e-9, atol=1e-12 * g.abs().max())


def test_fit_scale_is_invariant_to_target_scale_and_crystals_independent():
    gen = torch.Generator().manual_seed(9)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    sigma = torch.full((5, 1), 0.05, dtype=F64)
    x = (x0 + 0.05 * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0
    score = _smooth_score(x, x0, 0.05)
    kw = dict(frac=x, score=score, sigma=sigma, t=torch.tensor([1, 1]), lattice=lattice)
    g1 = XRDGuidance(target, numbers, batch, hkl, through_network=False)(**kw)
    g2 = XRDGuidance(123.4 * target, numbers, batch, hkl, through_network=False)(**kw)
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-12 * g1.abs().max())
    g3 = XRDGuidance(123.4 * target, numbers, batch, hkl, scale="none", through_network=False)(**kw)
    assert not torch.allclose(g1, g3)
    # a crystal with a NaN score gets zero guidance; the other crystal is unaffected
    bad = score.clone()
    bad[3, 1] = float("nan")
    g4 = XRDGuidance(target, numbers, batch, hkl, through_network=False)(**{**kw, "score": bad})
    assert torch.isfinite(g4).all() and (g4[3:] == 0).all()
    np.testing.assert_allclose(g4[:3], g1[:3], rtol=1e-12)


def test_float32_runs_and_agrees_with_float64():
    gen = torch.Generator().manual_seed(2)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    sigma = torch.full((5, 1), 0.05, dtype=F64)
    x = (x0 + 0.05 * torch.randn(5, 3, generator=gen, dtype=F64)) % 1.0
    out = {}
    for dtype in (torch.float32, F64):
        xx = x.to(dtype).requires_grad_(True)
        score = _smooth_score(xx, x0.to(dtype), sigma.to(dtype))
        out[dtype] = XRDGuidance(target.to(dtype), numbers, batch, hkl)(
            frac=xx, score=score, sigma=sigma.to(dtype), t=torch.tensor([1, 1]), lattice=lattice.to(dtype))
    assert out[torch.float32].dtype == torch.float32
    a, b = out[torch.float32].double(), out[F64]
    assert float((a * b).sum() / (a.norm() * b.norm())) > 0.999


def test_guidance_input_errors():
    gen = torch.Generator().manual_seed(1)
    numbers, batch, lattice, x0, hkl, target = _two_crystals(gen)
    with pytest.raises(ShapeError, match=r"intensities has shape \(2, 26\), expected \(B, 27\)"):
        XRDGuidance(target[:, :-1], numbers, batch, hkl)
    with pytest.raises(ShapeError, match=r"batch has values in \[0, 1\], expected crystal indices in \[0, 0\]"):
        XRDGuidance(target[:1], numbers, batch, hkl)
    with pytest.raises(CrystalfitError, match="scale = 'max' is not supported"):
        XRDGuidance(target, numbers, batch, hkl, scale="max")
    guide = XRDGuidance(target, numbers, batch, hkl)
    with pytest.raises(ShapeError, match=r"frac has 4 rows, expected 5"):
        guide(frac=x0[:4], score=x0[:4], sigma=torch.ones(4, 1), t=None, lattice=lattice)
