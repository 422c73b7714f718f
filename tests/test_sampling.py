"""Tests of crystalfit.sampling.predictor_corrector_sample with analytic (exact-score) models."""
from __future__ import annotations

import math

import pytest
import torch

from crystalfit.diffusion import LatticeDDPM, WrappedNormalTorus
from crystalfit.exceptions import CrystalfitError, ShapeError
from crystalfit.sampling import Guidance, PCSampleResult, make_time_grid, predictor_corrector_sample

F64 = torch.float64


@pytest.fixture(scope="module")
def procs():
    return LatticeDDPM(), WrappedNormalTorus()


def torus_dist(a, b):
    d = a - b
    return (d - torch.round(d)).abs()


def make_problem(sizes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.as_tensor(sizes)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), sizes).to(device)
    n, b = int(sizes.sum()), len(sizes)
    x0 = torch.rand(n, 3, generator=g, dtype=F64).to(device)
    mu = (torch.randn(b, 3, 3, generator=g, dtype=F64) * 3).to(device)
    return batch, x0, mu


def analytic_model(procs, batch, x0, mu, tau=0.0, tau_l=0.0, calls=None):
    """Exact network outputs for data x ~ WN(x0, tau^2) per coordinate and L ~ N(mu, tau_l^2) per entry.

    p_t(x) = WN(x0, tau^2 + sigma_t^2), so the score is exact in closed form; for the lattice,
    E[eps | L_t] = sqrt(1-abar) (L_t - sqrt(abar) mu) / (abar tau_l^2 + 1 - abar).
    """
    lat, tor = procs

    def model_fn(L, F, t):
        if calls is not None:
            calls.append((L.detach().clone(), F.detach().clone(), t.clone()))
        ta = t[batch]
        sig = tor.sigma_at(ta, F)
        score = tor.score(F - x0, torch.sqrt(tau**2 + sig**2))
        ab = lat.schedule.alphas_cumprod.to(L.dtype)[t].view(-1, 1, 1)
        eps = (1 - ab).sqrt() * (L - ab.sqrt() * mu) / (ab * tau_l**2 + 1 - ab)
        return eps, tor.prediction_from_score(score, ta)

    return model_fn


def run(procs, model_fn, batch, n_crystals, seed=1, **kw):
    lat, tor = procs
    g = torch.Generator().manual_seed(seed)
    LT = lat.prior_sample((n_crystals, 3, 3), generator=g, dtype=F64, device=batch.device)
    FT = tor.prior_sample((len(batch), 3), generator=g, dtype=F64, device=batch.device)
    return predictor_corrector_sample(model_fn, LT, FT, batch, lattice_process=lat, torus_process=tor,
                                      generator=g, **kw)


# ------------------------------------------------------------------ time grid
def test_time_grid():
    torch.testing.assert_close(make_time_grid(1000), torch.arange(1000, 0, -1))
    torch.testing.assert_close(make_time_grid(1000, 1000), torch.arange(1000, 0, -1))
    for n in (1, 2, 7, 100, 999):
        g = make_time_grid(1000, n)
        assert len(g) == n and g[0] == 1000 and g.dtype == torch.long
        assert torch.all(g[1:] < g[:-1])
        if n > 1:
            assert g[-1] == 1
            steps = (g[:-1] - g[1:]).double()
            assert steps.max() - steps.min() <= 1  # evenly spaced up to rounding
    with pytest.raises(CrystalfitError, match=r"n_steps=0 is outside \[1, 1000\]"):
        make_time_grid(1000, 0)
    with pytest.raises(CrystalfitError, match=r"n_steps=1001 is outside"):
        make_time_grid(1000, 1001)


# --------------------------------------------------- reference implementation
def literal_diffcsp_loop(procs, model_fn, LT, FT, step_lr, g, guide=None, guide_corrector=False):
    """SPEC 1.5 written out literally (full grid), drawing noise in the sampler's order.

    ``guide(F, sigma) -> g`` (optional) is added to the score in the predictor (Eqs. 45-46) and, with
    ``guide_corrector``, in the corrector too."""
    lat, tor = procs
    sch, sig, norm = lat.schedule, tor.sigmas, tor.sigma_norm
    L, F = LT.clone(), FT.clone()
    B = L.shape[0]
    for t in range(tor.T, 0, -1):
        tt = torch.full((B,), t)
        last = t == 1
        _, pred = model_fn(L, F, tt)
        step = step_lr * (sig[t] / sig[1]) ** 2
        z = torch.zeros_like(F) if last else torch.randn(F.shape, generator=g, dtype=F.dtype)
        gc = guide(F, sig[t]) if guide is not None and guide_corrector else 0.0
        F = (F + step * (-pred * torch.sqrt(norm[t]) + gc) + torch.sqrt(2 * step) * z) % 1.0
        eps_l, pred = model_fn(L, F, tt)
        zx = torch.zeros_like(F) if last else torch.randn(F.shape, generator=g, dtype=F.dtype)
        zl = torch.zeros_like(L) if last else torch.randn(L.shape, generator=g, dtype=L.dtype)
        dsig = sig[t] ** 2 - sig[t - 1] ** 2
        gp = guide(F, sig[t]) if guide is not None else 0.0
        F = (F + dsig * (-pred * torch.sqrt(norm[t]) + gp)
             + torch.sqrt(sig[t - 1] ** 2 * dsig / sig[t] ** 2) * zx) % 1.0
        c0 = 1.0 / torch.sqrt(sch.alphas[t])
        c1 = sch.betas[t] / torch.sqrt(1 - sch.alphas_cumprod[t])
        L = c0 * (L - c1 * eps_l) + sch.sigmas[t] * zl
    return L, F


def test_matches_literal_spec_loop(procs):
    batch, x0, mu = make_problem([2, 3])
    model_fn = analytic_model(procs, batch, x0, mu, tau=0.05, tau_l=0.5)
    g = torch.Generator().manual_seed(5)
    LT, FT = torch.randn(2, 3, 3, generator=g, dtype=F64), torch.rand(5, 3, generator=g, dtype=F64)
    res = predictor_corrector_sample(model_fn, LT, FT, batch, lattice_process=procs[0], torus_process=procs[1],
                                     step_lr=1e-5, generator=torch.Generator().manual_seed(11))
    L_ref, F_ref = literal_diffcsp_loop(procs, model_fn, LT, FT, 1e-5, torch.Generator().manual_seed(11))
    torch.testing.assert_close(res.lattice, L_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torus_dist(res.frac, F_ref), torch.zeros_like(F_ref), rtol=0, atol=1e-9)
    assert res.n_model_calls == 2000 and isinstance(res, PCSampleResult)
    L, F = res  # unpacks as (lattice, frac)
    assert L is res.lattice and F is res.frac


@pytest.mark.parametrize("guide_corrector", [False, True])
def test_guided_sampler_matches_literal_loop(procs, guide_corrector):
    """Guidance in the predictor only (the paper's Eqs. 45-46) or in the corrector as well
    (``guide_corrector=True``), against the literal SPEC 1.5 loop with the guidance written in."""
    lat, tor = procs
    batch, x0, mu = make_problem([2, 3], seed=3)
    x1 = torch.rand(5, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    model_fn = analytic_model(procs, batch, x0, mu, tau=0.05, tau_l=0.5)

    def guide_fn(F, sigma):
        return 0.5 * tor.score(F - x1, sigma)

    calls = []

    def guidance(*, frac, score, sigma, t, lattice):
        calls.append(int(t[0]))
        return guide_fn(frac.detach(), sigma)

    g = torch.Generator().manual_seed(5)
    LT, FT = torch.randn(2, 3, 3, generator=g, dtype=F64), torch.rand(5, 3, generator=g, dtype=F64)
    res = predictor_corrector_sample(model_fn, LT, FT, batch, lattice_process=lat, torus_process=tor, step_lr=1e-5,
                                     generator=torch.Generator().manual_seed(11), guidance=guidance,
                                     guide_corrector=guide_corrector)
    L_ref, F_ref = literal_diffcsp_loop(procs, model_fn, LT, FT, 1e-5, torch.Generator().manual_seed(11),
                                        guide=guide_fn, guide_corrector=guide_corrector)
    torch.testing.assert_close(res.lattice, L_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torus_dist(res.frac, F_ref), torch.zeros_like(F_ref), rtol=0, atol=1e-9)
    assert res.n_model_calls == 2000
    assert len(calls) == (2000 if guide_corrector else 1000)  # once per network call that uses it
    # the corrector's guidance changes the result (it is not a no-op)
    _, F_other = literal_diffcsp_loop(procs, model_fn, LT, FT, 1e-5, torch.Generator().manual_seed(11),
                                      guide=guide_fn, guide_corrector=not guide_corrector)
    assert torus_dist(F_other, F_ref).max() > 1e-4


@pytest.mark.parametrize("guide_corrector", [False, True])
def test_guidance_without_score_graph_skips_the_network_graph(procs, guide_corrector):
    """A guidance with ``needs_score_graph = False`` gets the score without a graph (the network runs under
    no_grad, no activations kept); one that uses the score only as a constant gives the same samples either
    way.  Without the attribute (a plain function) the graph is built, as before."""
    lat, tor = procs
    batch, x0, mu = make_problem([2, 3], seed=3)
    x1 = torch.rand(5, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    base = analytic_model(procs, batch, x0, mu, tau=0.05, tau_l=0.5)
    grad_enabled = []

    def model_fn(L, F, t):
        grad_enabled.append(torch.is_grad_enabled())
        return base(L, F, t)

    class Guide:
        def __init__(self, needs_graph):
            if needs_graph is not None:
                self.needs_score_graph = needs_graph
            self.score_has_graph = []

        def __call__(self, *, frac, score, sigma, t, lattice):
            self.score_has_graph.append(score.requires_grad)
            # the score enters as a constant: the result cannot depend on its graph
            return 0.5 * tor.score(frac.detach() - x1, sigma) - 0.1 * score.detach()

    out = {}
    for needs in (True, False, None):
        grad_enabled.clear()
        guide = Guide(needs)
        g = torch.Generator().manual_seed(5)
        LT, FT = torch.randn(2, 3, 3, generator=g, dtype=F64), torch.rand(5, 3, generator=g, dtype=F64)
        out[needs] = predictor_corrector_sample(
            model_fn, LT, FT, batch, lattice_process=lat, torus_process=tor, step_lr=1e-5, n_steps=50,
            generator=torch.Generator().manual_seed(11), guidance=guide, guide_corrector=guide_corrector)
        n_guided = 100 if guide_corrector else 50
        assert len(guide.score_has_graph) == n_guided
        assert all(guide.score_has_graph) == (needs is not False)
        assert not any(guide.score_has_graph) == (needs is False)
        # guided calls run with grad only when the graph is wanted; unguided corrector calls never
        assert sum(grad_enabled) == (0 if needs is False else n_guided)
    for needs in (False, None):
        torch.testing.assert_close(out[needs].frac, out[True].frac, rtol=0, atol=1e-12)
        torch.testing.assert_close(out[needs].lattice, out[True].lattice, rtol=0, atol=1e-12)


# ------------------------------------------------------ convergence to data
@pytest.mark.parametrize("n_steps", [None, 100, 20])
def test_point_mass_is_recovered(procs, n_steps):
    batch, x0, mu = make_problem([1, 4, 2, 6], seed=2)
    tau = 1e-3
    model_fn = analytic_model(procs, batch, x0, mu, tau=tau)
    res = run(procs, model_fn, batch, 4, n_steps=n_steps)
    assert torus_dist(res.frac, x0).max() < 5 * tau
    assert torch.all((res.frac >= 0) & (res.frac < 1))
    torch.testing.assert_close(res.lattice, mu, rtol=1e-9, atol=1e-9)
    assert res.n_model_calls == 2 * (n_steps or 1000)
    det = run(procs, model_fn, batch, 4, n_steps=n_steps, zero_variance=True)
    assert torus_dist(det.frac, x0).max() < 1e-4  # noiseless reverse flow of a point mass lands on it


@pytest.mark.parametrize("step_lr", [1e-5, 0.0])
def test_gaussian_data_statistics(procs, step_lr):
    """Sampled distribution matches the exact linear-Gaussian recursion of the strided sampler.

    With step_lr=1e-5 about 90 % of the final coordinate variance comes from the corrector
    noise; with step_lr=0 all of it comes from the predictor noise, so both are checked.
    """
    lat, tor = procs
    sizes = torch.randint(1, 9, (400,), generator=torch.Generator().manual_seed(3))
    batch, x0, mu = make_problem(sizes, seed=3)
    tau, tau_l = 0.05, 0.5
    model_fn = analytic_model(procs, batch, x0, mu, tau=tau, tau_l=tau_l)
    res = run(procs, model_fn, batch, len(sizes), n_steps=100, step_lr=step_lr)
    grid = res.time_grid
    prev = torch.cat([grid[1:], torch.zeros(1, dtype=torch.long)])
    # independent variance recursion (wrapping negligible: early variance is damped by tau^2/(tau^2+sigma^2))
    v_x, v_l = 1 / 12, 1.0
    ab = lat.schedule.alphas_cumprod
    for t, tp in zip(grid.tolist(), prev.tolist()):
        st, sp, s1 = (float(tor.sigmas[i]) for i in (t, tp, 1))
        noisy = tp > 0
        gam = step_lr * (st / s1) ** 2
        v_x = (1 - gam / (tau**2 + st**2)) ** 2 * v_x + (2 * gam if noisy else 0.0)
        zeta = st**2 - sp**2
        v_x = (1 - zeta / (tau**2 + st**2)) ** 2 * v_x + (sp**2 * zeta / st**2 if noisy else 0.0)
        at, ap = float(ab[t]), float(ab[tp])
        a = at / ap
        A = (1 - (1 - a) / (at * tau_l**2 + 1 - at)) / math.sqrt(a)
        v_l = A * A * v_l + (1 - a) * (1 - ap) / (1 - at)
    d = res.frac - x0
    d = d - torch.round(d)
    e = res.lattice - mu
    for dev, v_ref in ((d, v_x), (e, v_l)):
        n = dev.numel()
        assert abs(float(dev.mean())) < 4 * math.sqrt(v_ref / n)
        assert abs(float(dev.var()) / v_ref - 1) < 4 * math.sqrt(2 / n)
    assert abs(v_x / tau**2 - 1) < 0.1 and abs(v_l / tau_l**2 - 1) < 0.1  # and close to the data


# ----------------------------------------------------------- reproducibility
def test_reproducibility(procs):
    batch, x0, mu = make_problem([3, 2], seed=4)
    model_fn = analytic_model(procs, batch, x0, mu, tau=0.05, tau_l=0.5)
    a = run(procs, model_fn, batch, 2, seed=7, n_steps=30)
    b = run(procs, model_fn, batch, 2, seed=7, n_steps=30)
    c = run(procs, model_fn, batch, 2, seed=8, n_steps=30)
    assert torch.equal(a.frac, b.frac) and torch.equal(a.lattice, b.lattice)
    assert not torch.equal(a.frac, c.frac)
    # zero variance: the result depends on the initial state only
    lat, tor = procs
    LT, FT = torch.randn(2, 3, 3, dtype=F64), torch.rand(5, 3, dtype=F64)
    kw = dict(lattice_process=lat, torus_process=tor, n_steps=30, zero_variance=True)
    d1 = predictor_corrector_sample(model_fn, LT, FT, batch, generator=torch.Generator().manual_seed(1), **kw)
    d2 = predictor_corrector_sample(model_fn, LT, FT, batch, **kw)
    assert torch.equal(d1.frac, d2.frac) and torch.equal(d1.lattice, d2.lattice)


def test_fixed_lattice(procs):
    batch, x0, mu = make_problem([2, 2], seed=5)
    calls = []
    model_fn = analytic_model(procs, batch, x0, mu, tau=1e-3, calls=calls)
    fixed = torch.randn(2, 3, 3, dtype=F64)
    res = predictor_corrector_sample(model_fn, None, torch.rand(4, 3, dtype=F64), batch,
                                     lattice_process=procs[0], torus_process=procs[1], n_steps=10,
                                     fixed_lattice=fixed)
    assert res.lattice is fixed
    assert len(calls) == 20 and all(torch.equal(L, fixed) for L, _, _ in calls)
    assert torus_dist(res.frac, x0).max() < 5e-3


def test_step_lr_zero_skips_corrector(procs):
    batch, x0, mu = make_problem([2], seed=6)
    calls = []
    res = run(procs, analytic_model(procs, batch, x0, mu, calls=calls), batch, 1, n_steps=10, step_lr=0.0)
    assert res.n_model_calls == 10 == len(calls)
    assert [int(t[0]) for _, _, t in calls] == make_time_grid(1000, 10).tolist()


# ----------------------------------------------------------------- guidance
class RecordingGuidance:
    """Returns the exact point-mass score towards ``x1`` and records what it was given."""

    def __init__(self, tor, batch, x1):
        self.tor, self.batch, self.x1, self.log = tor, batch, x1, []

    def __call__(self, *, frac, score, sigma, t, lattice):
        dscore = torch.autograd.grad(score.sum(), frac, retain_graph=True)[0] if score.requires_grad else None
        self.log.append(dict(frac_grad=frac.requires_grad, dscore=dscore, frac=frac.detach().clone(),
                             sigma=sigma, t=t, lattice=lattice))
        return self.tor.score(frac - self.x1, sigma)


def test_guidance_protocol_and_effect(procs):
    lat, tor = procs
    batch, x0, mu = make_problem([3, 1, 2], seed=7)
    x1 = torch.rand(6, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    guide = RecordingGuidance(tor, batch, x1)
    assert isinstance(guide, Guidance)
    tau = 0.02
    model_fn = analytic_model(procs, batch, x0, mu, tau=tau)
    res = run(procs, model_fn, batch, 3, n_steps=25, guidance=guide, zero_variance=True)
    base = run(procs, model_fn, batch, 3, n_steps=25, zero_variance=True)
    assert len(guide.log) == 25 and res.n_model_calls == 50
    assert not torch.allclose(res.frac, base.frac)
    grid = make_time_grid(1000, 25)
    for rec, t in zip(guide.log, grid.tolist()):
        assert rec["frac_grad"] and rec["t"].shape == (3,) and torch.all(rec["t"] == t)
        assert rec["sigma"].shape == (6, 1) and torch.all(rec["sigma"] == tor.sigmas[t])
        # the score kept its graph: d score / d frac = d^2 log p_t (analytic)
        ref = tor.d2_log_p(rec["frac"] - x0, math.sqrt(tau**2 + float(tor.sigmas[t]) ** 2))
        torch.testing.assert_close(rec["dscore"], ref, rtol=1e-9, atol=1e-9)
        # Tweedie lattice estimate of a point-mass lattice model is the point itself
        torch.testing.assert_close(rec["lattice"], mu, rtol=1e-6, atol=1e-6)
    assert not res.frac.requires_grad and not res.lattice.requires_grad


def test_guidance_alone_drives_sampler_to_target(procs):
    """Unconditional score 0 (uniform data) + guidance = exact score of a point mass at x1 -> x1."""
    lat, tor = procs
    batch = torch.tensor([0, 0, 1, 1, 1])
    x1 = torch.rand(5, 3, dtype=F64, generator=torch.Generator().manual_seed(10))

    def uniform_model(L, F, t):
        return torch.zeros_like(L), torch.zeros_like(F)

    guide = RecordingGuidance(tor, batch, x1)
    fixed = torch.eye(3, dtype=F64).expand(2, 3, 3) * 4
    FT = torch.rand(5, 3, dtype=F64)
    kw = dict(lattice_process=lat, torus_process=tor, fixed_lattice=fixed, n_steps=50, zero_variance=True)
    res = predictor_corrector_sample(uniform_model, None, FT, batch, guidance=guide, **kw)
    assert torus_dist(res.frac, x1).max() < 1e-6
    assert all(torch.equal(r["lattice"], fixed) for r in guide.log)  # the fixed lattice is what guidance sees
    plain = predictor_corrector_sample(uniform_model, None, FT, batch, **kw)
    torch.testing.assert_close(plain.frac, FT)  # zero score, no noise: nothing moves


# ------------------------------------------------------------------- errors
def test_errors(procs):
    lat, tor = procs
    batch = torch.tensor([0, 0, 1])
    LT, FT = torch.zeros(2, 3, 3), torch.zeros(3, 3)
    kw = dict(lattice_process=lat, torus_process=tor, n_steps=2)

    def model(L, F, t):
        return torch.zeros_like(L), torch.zeros_like(F)

    with pytest.raises(ShapeError, match=r"batch has shape \(2,\).*expected \(3,\) long"):
        predictor_corrector_sample(model, LT, FT, torch.tensor([0, 1]), **kw)
    with pytest.raises(CrystalfitError, match=r"batch has values in \[0, 2\], expected crystal indices in \[0, 1\]"):
        predictor_corrector_sample(model, LT, FT, torch.tensor([0, 1, 2]), **kw)
    with pytest.raises(ShapeError, match=r"frac_T has shape \(3, 2\)"):
        predictor_corrector_sample(model, LT, torch.zeros(3, 2), batch, **kw)
    with pytest.raises(CrystalfitError, match="lattice_T is None and no fixed_lattice"):
        predictor_corrector_sample(model, None, FT, batch, **kw)
    with pytest.raises(CrystalfitError, match="lattice_process has T=1000 but torus_process has T=10"):
        predictor_corrector_sample(model, LT, FT, batch, lattice_process=lat,
                                   torus_process=WrappedNormalTorus(T=10))
    with pytest.raises(ShapeError, match=r"guidance returned \(3,\), expected a tensor of shape \(3, 3\)"):
        predictor_corrector_sample(model, LT, FT, batch, guidance=lambda **k: torch.zeros(3), **kw)
    with pytest.raises(CrystalfitError, match="step_lr=-1.0 is negative"):
        predictor_corrector_sample(model, LT, FT, batch, step_lr=-1.0, **kw)


def test_progress_bar_runs(procs, capsys):
    batch = torch.tensor([0])

    def model(L, F, t):
        return torch.zeros_like(L), torch.zeros_like(F)

    res = predictor_corrector_sample(model, torch.zeros(1, 3, 3), torch.zeros(1, 3), batch,
                                     lattice_process=procs[0], torus_process=procs[1], n_steps=3, progress=True)
    assert res.n_model_calls == 6
    assert "sampling" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(procs):
    lat, tor = (p.to("cuda") for p in procs)
    batch, x0, mu = make_problem([2, 3], seed=8, device="cuda")
    model_fn = analytic_model((lat, tor), batch, x0, mu, tau=1e-3)
    g = torch.Generator().manual_seed(0)  # a CPU generator also works with CUDA data
    res = predictor_corrector_sample(model_fn, torch.randn(2, 3, 3, dtype=F64, device="cuda"),
                                     torch.rand(5, 3, dtype=F64, device="cuda"), batch, lattice_process=lat,
                                     torus_process=tor, n_steps=50, generator=g)
    assert res.frac.device.type == "cuda" and res.lattice.device.type == "cuda"
    assert torus_dist(res.frac, x0).max() < 5e-3
    torch.testing.assert_close(res.lattice, mu, rtol=1e-9, atol=1e-9)
    for p in procs:
        p.to("cpu")


def test_float32_dtype_preserved(procs):
    lat, tor = procs
    batch, x0, mu = make_problem([2, 3], seed=12)
    x0, mu = x0.float(), mu.float()
    model_fn = analytic_model(procs, batch, x0, mu, tau=1e-3)
    res = predictor_corrector_sample(model_fn, torch.randn(2, 3, 3), torch.rand(5, 3), batch,
                                     lattice_process=lat, torus_process=tor, n_steps=200)
    assert res.frac.dtype == torch.float32 and res.lattice.dtype == torch.float32
    assert torus_dist(res.frac, x0).max() < 5e-3
    torch.testing.assert_close(res.lattice, mu, rtol=1e-4, atol=1e-4)
