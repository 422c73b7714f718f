"""DDIM lattice step and Tweedie clipping used by the sampler (against independent references)."""
import torch

from crystalfit.diffusion import LatticeDDPM


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    proc = LatticeDDPM().double()
    L0 = torch.randn(4, 3, 3, generator=g, dtype=torch.float64) * 3
    eps = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    return proc, L0, eps


def test_ddim_with_exact_noise_stays_on_the_forward_path():
    proc, L0, eps = _setup()
    for t, tp in ((1000, 900), (500, 499), (37, 0)):
        tt = torch.full((4,), t)
        tpp = torch.full((4,), tp)
        L_t = proc.q_sample(L0, tt, eps)
        expected = proc.q_sample(L0, tpp, eps) if tp > 0 else L0
        assert torch.allclose(proc.ddim_step(L_t, eps, tt, tpp), expected, atol=1e-6 * (1 + L0.abs().max()))


def test_clip_eps_identity_inside_and_norm_outside():
    proc, L0, eps = _setup(1)
    t = torch.full((4,), 300)
    L_t = proc.q_sample(L0, t, eps)
    big = float(torch.linalg.matrix_norm(L0).max()) * 2
    assert torch.allclose(proc.clip_eps(L_t, eps, t, big), eps, atol=1e-9)
    small = 1.0
    eps_c = proc.clip_eps(L_t, eps, t, small)
    x0 = proc.tweedie_x0(L_t, eps_c, t)
    assert torch.allclose(torch.linalg.matrix_norm(x0), torch.full((4,), small, dtype=torch.float64), atol=1e-9)
    # direction of the estimate is kept
    cos = (x0 * L0).sum((1, 2)) / (torch.linalg.matrix_norm(x0) * torch.linalg.matrix_norm(L0))
    assert torch.allclose(cos, torch.ones(4, dtype=torch.float64), atol=1e-9)


def test_clip_and_ddim_are_rotation_equivariant():
    proc, L0, eps = _setup(2)
    Q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    t, tp = torch.full((4,), 700), torch.full((4,), 600)
    L_t = proc.q_sample(L0, t, eps)
    a = proc.clip_eps(L_t, eps, t, 2.0) @ Q
    b = proc.clip_eps(L_t @ Q, eps @ Q, t, 2.0)
    assert torch.allclose(a, b, atol=1e-9)
    assert torch.allclose(proc.ddim_step(L_t, eps, t, tp) @ Q, proc.ddim_step(L_t @ Q, eps @ Q, t, tp), atol=1e-9)
