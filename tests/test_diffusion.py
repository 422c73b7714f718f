"""Tests of crystalfit.diffusion: schedules, lattice DDPM, wrapped-normal torus process."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crystalfit.diffusion import (
    CosineBetaSchedule,
    LatticeDDPM,
    WrappedNormalTorus,
    perturbed_noise_scale,
    sample_timesteps,
    wrap01,
    wrapped_normal_d2_log_p,
    wrapped_normal_d_log_p,
    wrapped_normal_kernel_moments,
    wrapped_normal_log_density,
    wrapped_normal_sigma_norm,
)
from crystalfit.exceptions import CrystalfitError, ShapeError

F64 = torch.float64


@pytest.fixture(scope="module")
def torus():
    return WrappedNormalTorus()


@pytest.fixture(scope="module")
def ddpm():
    return LatticeDDPM(CosineBetaSchedule())


# ----------------------------------------------------------------- references
def naive_p(x, sigma, n=10):
    """DiffCSP's literal ``p_wrapped_normal`` (unnormalised), loop over images."""
    p = 0
    for i in range(-n, n + 1):
        p = p + torch.exp(-((x + i) ** 2) / 2 / sigma**2)
    return p


def naive_d_log_p(x, sigma, n=10):
    """DiffCSP's literal ``d_log_p_wrapped_normal``."""
    p = 0
    for i in range(-n, n + 1):
        p = p + (x + i) / sigma**2 * torch.exp(-((x + i) ** 2) / 2 / sigma**2)
    return p / naive_p(x, sigma, n)


def gaussian_posterior(m0, v0, c, v1, xt):
    """Posterior of y ~ N(m0, v0) given xt = c y + N(0, v1) (generic Gaussian conditioning)."""
    prec = 1.0 / v0 + c * c / v1
    var = 1.0 / prec
    return var * (m0 / v0 + c * xt / v1), var


# ------------------------------------------------------------------ schedule
def test_sample_timesteps_uniform_is_randint():
    a = sample_timesteps(500, 1000, torch.Generator().manual_seed(3))
    b = torch.randint(1, 1001, (500,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("T", [1, 10])
def test_sample_timesteps_linear_distribution(T):
    n = 200_000
    t = sample_timesteps(n, T, torch.Generator().manual_seed(0), density="linear")
    assert t.dtype == torch.long and t.shape == (n,)
    assert int(t.min()) >= 1 and int(t.max()) <= T
    counts = torch.bincount(t, minlength=T + 1)[1:].double().numpy()
    k = np.arange(1, T + 1)
    p = (2 * k - 1) / T**2  # P(t = k) = (k^2 - (k - 1)^2) / T^2
    assert abs(p.sum() - 1) < 1e-12
    # each count within 5 binomial standard deviations of n p
    assert np.all(np.abs(counts - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1e-9)
    if T == 10:  # and clearly not uniform
        assert counts[-1] > 15 * counts[0]


def test_sample_timesteps_rejects_unknown_density():
    with pytest.raises(CrystalfitError, match="timestep density 'cosine' is not supported"):
        sample_timesteps(3, 10, density="cosine")


def test_perturbed_noise_scale_distribution():
    """sqrt(1 + (gamma u)^2) with u uniform: recover u and check its quantiles; gamma 0 gives ones."""
    n, gamma = 100_000, 2.0
    s = perturbed_noise_scale(n, gamma, torch.Generator().manual_seed(1), dtype=F64)
    assert s.shape == (n,) and s.dtype == F64
    assert float(s.min()) >= 1.0 and float(s.max()) < math.sqrt(1 + gamma**2)
    u = torch.sqrt(s**2 - 1) / gamma
    q = torch.quantile(u, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64))
    assert torch.allclose(q, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=F64), atol=0.01)
    # mean variance factor 1 + gamma^2 / 3
    assert abs(float((s**2).mean()) - (1 + gamma**2 / 3)) < 0.02
    assert torch.equal(perturbed_noise_scale(5, 0.0), torch.ones(5))


@pytest.mark.parametrize("sigma", [0.005, 0.01, 0.05])
def test_perturbed_input_regression_minimiser(torus, sigma):
    """The docstring's minimiser: data x0 ~ N(0, tau^2), input x0 + s sigma eps, target the wrapped-normal
    score at sigma of the applied displacement.  The least-squares fit of the target on the input has
    slope -s^2 / (tau^2 + s^2 sigma^2) = s^2 (tau^2 + sigma^2) / (tau^2 + s^2 sigma^2) times the exact
    score's slope -1 / (tau^2 + sigma^2)."""
    g = torch.Generator().manual_seed(5)
    n, tau, s = 400_000, 0.01, 2.0
    x0 = tau * torch.randn(n, generator=g, dtype=F64)
    disp = s * sigma * torch.randn(n, generator=g, dtype=F64)
    target = torus.score(disp, sigma)  # the score the network is trained to (its output's sign aside)
    x = x0 + disp
    slope = float((x * target).sum() / (x * x).sum())
    expected = -s**2 / (tau**2 + s**2 * sigma**2)
    assert slope == pytest.approx(expected, rel=0.01)
    ratio = slope / (-1 / (tau**2 + sigma**2))
    assert ratio == pytest.approx(s**2 * (tau**2 + sigma**2) / (tau**2 + s**2 * sigma**2), rel=0.01)
    assert 1 < ratio <= s**2


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_perturbed_noise_scale_rejects_bad_gamma(bad):
    with pytest.raises(CrystalfitError, match="input perturbation gamma must be a finite float >= 0"):
        perturbed_noise_scale(3, bad)


def test_cosine_schedule_values():
    sch = CosineBetaSchedule()
    assert sch.betas.shape == (1001,) and sch.betas[0] == 0
    assert float(sch.betas[1]) == pytest.approx(1e-4, rel=1e-12)
    assert float(sch.alphas_cumprod[500]) == pytest.approx(0.494, abs=5e-4)
    assert float(sch.alphas_cumprod[1000]) == pytest.approx(2.4e-10, rel=0.02)
    assert float(sch.betas.max()) == pytest.approx(0.9999)
    # independent numpy recomputation of the clipped cosine schedule
    T, s = 1000, 0.008
    x = np.arange(T + 1)
    f = np.cos((x / T + s) / (1 + s) * np.pi / 2) ** 2
    b = np.clip(1 - f[1:] / f[:-1], 1e-4, 0.9999)
    abar = np.cumprod(1 - b)
    np.testing.assert_allclose(sch.alphas_cumprod[1:].numpy(), abar, rtol=1e-12)
    post = np.sqrt(b[1:] * (1 - abar[:-1]) / (1 - abar[1:]))
    np.testing.assert_allclose(sch.sigmas[2:].numpy(), post, rtol=1e-12)
    assert sch.sigmas[0] == 0 and sch.sigmas[1] == 0  # abar_0 = 1 -> no posterior noise at t=1


def test_schedule_buffers_move_and_validate():
    sch = CosineBetaSchedule(T=10)
    assert {n for n, _ in sch.named_buffers()} == {"betas", "alphas", "alphas_cumprod", "sigmas"}
    assert sch.to(torch.float32).betas.dtype == torch.float32
    with pytest.raises(CrystalfitError, match="T=0 is not a positive integer"):
        CosineBetaSchedule(T=0)


# -------------------------------------------------------------- lattice DDPM
def test_lattice_q_sample_and_tweedie(ddpm):
    g = torch.Generator().manual_seed(0)
    L0 = torch.randn(6, 3, 3, generator=g, dtype=F64)
    eps = torch.randn(6, 3, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 10, 200, 500, 900, 1000])
    Lt = ddpm.q_sample(L0, t, eps)
    abar = ddpm.schedule.alphas_cumprod[t]
    ref = abar.sqrt()[:, None, None] * L0 + (1 - abar).sqrt()[:, None, None] * eps
    torch.testing.assert_close(Lt, ref)
    torch.testing.assert_close(ddpm.tweedie_x0(Lt[:5], eps[:5], t[:5]), L0[:5], rtol=1e-9, atol=1e-9)
    assert ddpm.training_target(eps) is eps


def test_lattice_prior_reached(ddpm):
    g = torch.Generator().manual_seed(1)
    n = 20000
    L0 = (5.0 * torch.eye(3, dtype=F64) + 2.0).expand(n, 3, 3)
    LT = ddpm.q_sample(L0, torch.full((n,), 1000), torch.randn(n, 3, 3, generator=g, dtype=F64))
    se = 1 / math.sqrt(n)
    assert LT.mean(0).abs().max() < 4 * se
    assert (LT.std(0) - 1).abs().max() < 4 * se


def test_lattice_reverse_step_equals_spec_formula(ddpm):
    g = torch.Generator().manual_seed(2)
    t = torch.tensor([1, 2, 50, 500, 999, 1000])
    Lt = torch.randn(6, 3, 3, generator=g, dtype=F64)
    eps = torch.randn(6, 3, 3, generator=g, dtype=F64)
    z = torch.randn(6, 3, 3, generator=g, dtype=F64)
    out = ddpm.reverse_step(Lt, eps, t, t - 1, z)
    sch = ddpm.schedule
    for i, ti in enumerate(t.tolist()):  # literal SPEC 1.5 formula, one sample at a time
        a, b, ab = sch.alphas[ti], sch.betas[ti], sch.alphas_cumprod[ti]
        sig = torch.sqrt(b * (1 - sch.alphas_cumprod[ti - 1]) / (1 - ab))
        ref = (1 / torch.sqrt(a)) * (Lt[i] - (b / torch.sqrt(1 - ab)) * eps[i]) + sig * z[i]
        torch.testing.assert_close(out[i], ref, rtol=1e-14, atol=1e-14)


def test_lattice_strided_step_is_gaussian_posterior(ddpm):
    """With the exact eps of a point mass L0, the t -> t' step is q(L_t' | L_t, L0)."""
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([1000, 1000, 700, 300, 50, 10])
    tp = torch.tensor([990, 0, 400, 299, 1, 0])
    L0 = torch.randn(6, 3, 3, generator=g, dtype=F64) * 3
    Lt = ddpm.q_sample(L0, t, torch.randn(6, 3, 3, generator=g, dtype=F64))
    ab = ddpm.schedule.alphas_cumprod
    at, ap = ab[t][:, None, None], ab[tp][:, None, None]
    eps = (Lt - at.sqrt() * L0) / (1 - at).sqrt()
    mean = ddpm.reverse_step(Lt, eps, t, tp)  # noise=None -> mean
    z = torch.ones(6, 3, 3, dtype=F64)
    std = ddpm.reverse_step(Lt, eps, t, tp, z) - mean
    # independent: prior L_t' ~ N(sqrt(ap) L0, 1-ap); L_t = sqrt(at/ap) L_t' + N(0, 1 - at/ap)
    k = tp > 0
    m_ref, v_ref = gaussian_posterior(ap[k].sqrt() * L0[k], 1 - ap[k], (at[k] / ap[k]).sqrt(), 1 - at[k] / ap[k], Lt[k])
    torch.testing.assert_close(mean[k], m_ref, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(std[k], v_ref.sqrt().expand_as(std[k]), rtol=1e-7, atol=1e-9)
    # t' = 0: the step returns L0 itself (Tweedie), with no noise
    torch.testing.assert_close(mean[~k], L0[~k], rtol=1e-9, atol=1e-9)
    assert torch.all(std[~k] == 0)


def test_lattice_strided_step_preserves_marginal(ddpm):
    g = torch.Generator().manual_seed(4)
    n = 20000
    L0 = torch.full((n, 3, 3), 2.0, dtype=F64)
    t, tp = torch.full((n,), 600), torch.full((n,), 350)
    Lt = ddpm.q_sample(L0, t, torch.randn(n, 3, 3, generator=g, dtype=F64))
    at = ddpm.schedule.alphas_cumprod[600]
    eps = (Lt - at.sqrt() * L0) / (1 - at).sqrt()
    out = ddpm.reverse_step(Lt, eps, t, tp, torch.randn(n, 3, 3, generator=g, dtype=F64))
    ap = ddpm.schedule.alphas_cumprod[350]
    se = math.sqrt((1 - ap) / n)
    assert (out.mean(0) - ap.sqrt() * 2.0).abs().max() < 4 * se
    assert (out.std(0) / (1 - ap).sqrt() - 1).abs().max() < 4 / math.sqrt(2 * n)


def test_lattice_errors(ddpm):
    L = torch.zeros(2, 3, 3)
    with pytest.raises(ShapeError, match=r"t has shape \(3,\), expected \(2,\)"):
        ddpm.q_sample(L, torch.tensor([1, 2, 3]), L)
    with pytest.raises(CrystalfitError, match=r"t has values in \[1, 1001\], expected diffusion times in \[0, 1000\]"):
        ddpm.q_sample(L, torch.tensor([1, 1001]), L)
    with pytest.raises(CrystalfitError, match="t has dtype torch.float32"):
        ddpm.q_sample(L, torch.tensor([1.0, 2.0]), L)
    with pytest.raises(CrystalfitError, match="t_prev must be smaller than t"):
        ddpm.reverse_step(L, L, torch.tensor([5, 5]), torch.tensor([4, 5]))


# -------------------------------------------------------- wrapped normal math
@pytest.mark.parametrize("sigma", [0.005, 0.03, 0.2, 0.5, 1.0])
def test_d_log_p_matches_diffcsp_and_autograd(sigma):
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(400, generator=g, dtype=F64) - 0.5) * 5  # periodic: any real x
    # DiffCSP's literal formula underflows (0/0) far from an image when sigma is tiny
    near = x[(x - torch.round(x)).abs() < 30 * sigma] if sigma < 0.05 else x
    torch.testing.assert_close(wrapped_normal_d_log_p(near, sigma), naive_d_log_p(near, sigma),
                               rtol=1e-9, atol=1e-9 / sigma)
    xr = x.clone().requires_grad_(True)
    logp = wrapped_normal_log_density(xr, sigma)
    (grad,) = torch.autograd.grad(logp.sum(), xr, create_graph=True)
    torch.testing.assert_close(-wrapped_normal_d_log_p(x, sigma), grad.detach(), rtol=1e-9, atol=1e-9 / sigma**2)
    tor = WrappedNormalTorus(T=5)
    torch.testing.assert_close(tor.score(x, sigma), grad.detach(), rtol=1e-9, atol=1e-9 / sigma**2)
    (hess,) = torch.autograd.grad(grad.sum(), xr)
    torch.testing.assert_close(wrapped_normal_d2_log_p(x, sigma), hess, rtol=1e-8, atol=1e-8 / sigma**3)
    assert torch.isfinite(wrapped_normal_d_log_p(torch.tensor([0.5], dtype=F64), sigma)).all()


def test_log_density_normalised_periodic_and_fourier():
    x = (torch.arange(4000, dtype=F64) + 0.5) / 4000
    for sigma in (0.01, 0.1, 0.5):
        p = wrapped_normal_log_density(x, sigma).exp()
        assert float(p.mean()) == pytest.approx(1.0, abs=1e-12)
        torch.testing.assert_close(wrapped_normal_log_density(x + 3.0, sigma), wrapped_normal_log_density(x, sigma))
    # sigma = 0.5 against the Fourier series p(x) = 1 + 2 sum_k exp(-2 pi^2 k^2 s^2) cos(2 pi k x)
    s = 0.5
    four = 1 + 2 * sum(math.exp(-2 * math.pi**2 * k * k * s * s) * torch.cos(2 * math.pi * k * x) for k in range(1, 8))
    torch.testing.assert_close(wrapped_normal_log_density(x, s).exp(), four, rtol=1e-12, atol=1e-12)
    # The terminal wrapped normal is NOT uniform to 1e-3: max |p - 1| = 2 exp(-2 pi^2 s^2) = 0.0144
    dev = float((four - 1).abs().max())
    assert dev == pytest.approx(2 * math.exp(-2 * math.pi**2 * s * s), rel=1e-3)


def test_wrap01_half_open():
    x = torch.tensor([-1e-9, -1.0, 0.0, 1.0, 2.5, -0.25], dtype=torch.float32)
    w = wrap01(x)
    assert torch.all((w >= 0) & (w < 1))
    torch.testing.assert_close(w, torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5, 0.75]))


# ------------------------------------------------------------- torus process
def test_torus_schedule(torus):
    s = torus.sigmas
    assert s.shape == (1001,) and s[0] == 0
    assert float(s[1]) == pytest.approx(0.005) and float(s[-1]) == pytest.approx(0.5)
    ratios = s[2:] / s[1:-1]
    torch.testing.assert_close(ratios, torch.full_like(ratios, 100 ** (1 / 999)))


def test_sigma_norm_values(torus):
    sn, s = torus.sigma_norm, torus.sigmas
    assert sn[0] == 1
    assert float(sn[1]) == pytest.approx(3.99e4, rel=3e-3)  # SPEC: sigma=0.005 -> 3.99e4
    assert float(sn[-1]) == pytest.approx(0.0041, rel=0.01)  # SPEC: sigma=0.5 -> 0.0041
    at_005 = float(wrapped_normal_sigma_norm(torch.tensor([0.05], dtype=F64))[0])
    assert at_005 == pytest.approx(397, rel=0.01)  # SPEC quotes 397 (a Monte Carlo value); exact ~400
    small = s[1:] <= 0.05  # wrapping effects ~ exp(-1/(8 s^2)): E[(x/s^2)^2] = 1/s^2
    torch.testing.assert_close(sn[1:][small], 1 / s[1:][small] ** 2, rtol=1e-9, atol=0)
    # integration by parts on the circle: E[(d log p)^2] = -E[d^2 log p]
    grid = (torch.arange(2048, dtype=F64) + 0.5) / 2048
    sig = s[1::111][:, None]
    p = torus.log_density(grid[None], sig).exp()
    ibp = -(p * torus.d2_log_p(grid[None], sig)).mean(-1)
    torch.testing.assert_close(sn[1::111], ibp, rtol=1e-9, atol=0)


def test_sigma_norm_against_monte_carlo(torus):
    g = torch.Generator().manual_seed(6)
    idx = torch.tensor([1, 250, 500, 750, 900, 1000])
    sig = torus.sigmas[idx]
    x = (sig * torch.randn(10000, len(idx), generator=g, dtype=F64)) % 1.0
    d2 = naive_d_log_p(x, sig) ** 2  # DiffCSP's estimator with 10,000 samples
    mc, se = d2.mean(0), d2.std(0) / math.sqrt(10000)
    assert torch.all((mc - torus.sigma_norm[idx]).abs() < 4 * se), (mc, torus.sigma_norm[idx], se)


def test_sigma_norm_deterministic_and_grid_converged():
    s = torch.tensor([0.005, 0.02, 0.5], dtype=F64)
    a = wrapped_normal_sigma_norm(s)
    b = wrapped_normal_sigma_norm(s, n_grid=5000)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    with pytest.raises(CrystalfitError, match=r"min\(sigmas\)=0.0"):
        wrapped_normal_sigma_norm(torch.tensor([0.0, 0.1]))


def test_training_target(torus):
    g = torch.Generator().manual_seed(7)
    n = 20000
    for ti in (1, 400, 800, 1000):
        t = torch.full((n,), ti)
        eps = torch.randn(n, 3, generator=g, dtype=F64)
        tar = torus.training_target(eps, t)
        sig = torus.sigmas[ti]
        ref = naive_d_log_p(sig * eps, sig) / torus.sigma_norm[ti].sqrt()
        torch.testing.assert_close(tar, ref, rtol=1e-9, atol=1e-9)
        assert float((tar**2).mean()) == pytest.approx(1.0, abs=0.05)  # unit mean square by construction
        if sig < 0.05:
            torch.testing.assert_close(tar, eps, rtol=1e-6, atol=1e-6)  # no wrapping: target = eps
    # prediction <-> score conversion round trip
    pred = torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.tensor([1, 2, 3, 500, 1000])
    s = torus.score_from_prediction(pred, t)
    torch.testing.assert_close(s, -pred * torus.sigma_norm[t].sqrt()[:, None])
    torch.testing.assert_close(torus.prediction_from_score(s, t), pred)


def test_torus_q_sample_and_prior(torus):
    g = torch.Generator().manual_seed(8)
    n = 20000
    x0 = torch.full((n, 3), 0.3, dtype=F64)
    eps = torch.randn(n, 3, generator=g, dtype=F64)
    sig = torus.sigmas[torch.full((n,), 1000)]
    xT = torus.q_sample(x0, sig, eps)
    torch.testing.assert_close(xT, (0.3 + 0.5 * eps) % 1.0)
    assert torch.all((xT >= 0) & (xT < 1))
    # Kolmogorov-Smirnov against the exact WN(0.3, 0.5^2) CDF (Fourier series); 1% critical value 1.63/sqrt(n)
    def wn_cdf(x, mu, s):
        out = x.clone()
        for k in range(1, 8):
            c = math.exp(-2 * math.pi**2 * k * k * s * s) / (math.pi * k)
            out = out + c * (torch.sin(2 * math.pi * k * (x - mu)) - math.sin(2 * math.pi * k * (0 - mu)))
        return out

    ecdf_hi = torch.arange(1, n + 1, dtype=F64) / n
    for k in range(3):
        u = torch.sort(xT[:, k]).values
        cdf = wn_cdf(u, 0.3, 0.5)
        ks = torch.maximum(ecdf_hi - cdf, cdf - (ecdf_hi - 1 / n)).max()
        assert ks < 1.63 / math.sqrt(n)
        # ... and that CDF is within 2 exp(-2 pi^2 s^2) / pi = 0.0046 of the uniform one (near-uniform prior)
        assert (cdf - u).abs().max() < 1.01 * 2 * math.exp(-2 * math.pi**2 * 0.25) / math.pi
    # a small sigma does not look uniform (the test can fail)
    xs = torus.q_sample(x0[:, :1], 0.05, eps[:, :1])
    u = torch.sort(xs[:, 0]).values
    assert (torch.arange(1, n + 1, dtype=F64) / n - u).abs().max() > 0.2


def test_torus_reverse_step_is_brownian_bridge(torus):
    """For a point mass and small sigmas, the predictor step is q(x_t' | x_t, x0)."""
    g = torch.Generator().manual_seed(9)
    t = torch.tensor([300, 300, 100, 10, 2, 1])
    tp = torch.tensor([299, 0, 20, 5, 1, 0])
    x0 = torch.rand(6, 3, generator=g, dtype=F64) * 0.5 + 0.25
    st, sp = torus.sigmas[t][:, None], torus.sigmas[tp][:, None]
    xt = x0 + st * torch.randn(6, 3, generator=g, dtype=F64).clamp(-2, 2)
    score = -(xt - x0) / st**2
    mean = torus.reverse_step(xt, score, t, tp)
    std = torus.reverse_step(xt, score, t, tp, torch.full((6, 3), 1e-3, dtype=F64)) - mean
    k = tp > 0
    m_ref, v_ref = gaussian_posterior(x0[k], sp[k] ** 2, 1.0, st[k] ** 2 - sp[k] ** 2, xt[k])
    torch.testing.assert_close(mean[k], m_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(std[k] / 1e-3, v_ref.sqrt().expand_as(std[k]), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(mean[~k], x0[~k], rtol=1e-10, atol=1e-12)  # t' = 0 lands on x0, noiselessly
    assert torch.all(std[~k] == 0)


def test_torus_corrector_step(torus):
    x = torch.tensor([[0.1, 0.5, 0.9]], dtype=F64)
    s = torch.tensor([[1.0, -2.0, 3.0]], dtype=F64)
    t = torch.tensor([1000])
    gamma = 1e-5 * (0.5 / 0.005) ** 2
    z = torch.tensor([[0.3, -0.1, 2.0]], dtype=F64)
    out = torus.corrector_step(x, s, t, 1e-5, z)
    torch.testing.assert_close(out, (x + gamma * s + math.sqrt(2 * gamma) * z) % 1.0)


def test_torus_errors(torus):
    with pytest.raises(CrystalfitError, match="sigma_begin=0.5, sigma_end=0.1"):
        WrappedNormalTorus(sigma_begin=0.5, sigma_end=0.1)
    with pytest.raises(ShapeError, match=r"noise has shape \(2, 3\), expected \(4, 3\)"):
        torus.q_sample(torch.zeros(4, 3), 0.1, torch.zeros(2, 3))
    with pytest.raises(ShapeError, match=r"t has shape \(3,\), expected \(4,\)"):
        torus.training_target(torch.zeros(4, 3), torch.tensor([1, 2, 3]))


def test_kernel_moments_match_a_slow_image_loop():
    """The shared image-sum moments (score, its derivative and the Tweedie formulas use them)
    against a plain Python loop over images in float64, at any shift of x by whole periods."""
    rng = np.random.default_rng(3)
    x = rng.uniform(-2.0, 2.0, 40)
    sig = np.exp(rng.uniform(np.log(0.005), np.log(0.5), 40))
    mu, var, k3, s_out = wrapped_normal_kernel_moments(torch.tensor(x), torch.tensor(sig), 10)
    for i in range(len(x)):
        y = x[i] - round(x[i])
        eta = np.array([(y + k) / sig[i] for k in range(-10, 11)])
        w = np.exp(-0.5 * eta**2 - np.max(-0.5 * eta**2))
        w /= w.sum()
        m = float(w @ eta)
        assert mu[i].item() == pytest.approx(m, rel=1e-10, abs=1e-10)
        assert var[i].item() == pytest.approx(float(w @ (eta - m) ** 2), rel=1e-9, abs=1e-12)
        assert k3[i].item() == pytest.approx(float(w @ (eta - m) ** 3), rel=1e-8, abs=1e-10)
    np.testing.assert_allclose(s_out.numpy(), sig)
    # the score and its derivative are these moments
    np.testing.assert_allclose(wrapped_normal_d_log_p(torch.tensor(x), torch.tensor(sig)).numpy(), (mu / s_out).numpy())
    np.testing.assert_allclose(wrapped_normal_d2_log_p(torch.tensor(x), torch.tensor(sig)).numpy(),
                               ((var - 1) / s_out**2).numpy())
