r"""Tweedie's formula on the torus: posterior moments from the score (paper Eqs. 32-38).

For one fractional coordinate the forward kernel is the period-1 wrapped normal
:math:`q(x_t|x_0) = \mathrm{WN}(x_t - x_0; 0, \sigma^2)`; write
:math:`g(y) = \log \mathrm{WN}(y; 0, \sigma^2)`.  The posterior is modelled as
:math:`p(x_0|x_t) \approx \mathrm{WN}(x_0; m, c)` (Eq. 33).  With
:math:`\delta = x_t - m` and :math:`u \sim N(0, c)` the two moment identities
(Eqs. 36 and 38, SPEC section 9) read

.. math::

    F_1(\delta, c) = E_u[g'(\delta - u)] = s, \qquad
    F_2(\delta, c) = E_u[g''(\delta - u) + g'(\delta - u)^2] = s^2 + s',

where :math:`s = \partial_{x_t}\log p_t` is the (unconditional) score and
:math:`s' = \partial s / \partial x_t`.  The paper drops :math:`s'`
(``ds = None`` here means 0).  For :math:`\sigma \to 0` the solution is ordinary
Tweedie: :math:`\delta = -\sigma^2 s`, :math:`c = \sigma^2(1 + \sigma^2 s')`.

How the equations are solved (and where this differs from the paper)
----------------------------------------------------------------------
* **Exact kernel, no sawtooth asymptotics.**  The paper's Appendix A replaces
  :math:`g'` by its :math:`\sigma \to 0` sawtooth limit (Eqs. A3-A7) and finds
  :math:`(m, c)` by a table search.  Here :math:`g', g''` are the exact image
  sums of the wrapped normal (images truncated where their weight drops below
  ``exp(-40)``, at most -10..10 as in DiffCSP), so the method is also right at
  large :math:`\sigma` where the sawtooth limit is wrong.
* **Gauss-Hermite quadrature** (``n_quad`` nodes, default 32) over
  :math:`u \sim N(0, c)`.  Measured error of :math:`(\sigma F_1, \sigma^2 F_2)`
  (O(1) scaled units) against a fine periodic grid: ~1e-16 where only the nearest
  image matters, <= 1e-6 while :math:`|\delta| + 5\sqrt c < 1/2` and for smooth kernels
  (:math:`\sigma \gtrsim 0.3`).  When a small-:math:`\sigma` posterior spreads over the
  antipode :math:`\delta \pm 1/2`, where :math:`g'` jumps by :math:`1/\sigma^2` over a
  width :math:`\sigma^2`, it grows to 1e-3..1e-1 (a few % of :math:`F_1`; more nodes
  help slowly).  The equations solved are those of the discretised expectation;
  they stay smooth, so Newton and the gradients below are consistent with them.
* **Solver.**  Dimensionless unknowns :math:`\tilde\delta = \delta/\sigma` and
  :math:`\ell = \log(c/\sigma^2)` (so ``c > 0`` always), residuals
  :math:`\sigma F_1 - \sigma s` and :math:`\sigma^2 F_2 - \sigma^2(s^2 + s')`, which are
  O(1) at every noise level, solved by vectorised Levenberg-Marquardt (damped
  Newton with the exact 2x2 Jacobian of the quadrature; steps limited to a
  quarter period in :math:`\delta` and a factor ``e^2`` in ``c``; ``c`` kept in
  ``[1e-6 sigma^2, min(100 sigma^2, c_max)]``).  Two starts: the small-noise one
  (:math:`\tilde\delta = -\sigma s`, :math:`c = \sigma^2(1+\sigma^2 s')`; in the Gaussian
  regime it *is* the root and the quadrature is skipped) and a first-harmonic
  inversion that is right at large :math:`\sigma`; the better one is used first and
  the other one retried where that fails.
* **No solution.**  The equations have no root when the score is not one a
  wrapped-normal posterior can produce (e.g. :math:`|s|` above
  :math:`\max|g'| \approx 1/(2\sigma^2)`, or at large :math:`\sigma` with the paper's
  ``ds = 0``).  Then the result is the saturated least-squares point (``c`` at its
  lower bound, ``delta`` near the maximiser of :math:`|g'|` on the side the score
  points to; scores above :math:`\max|g'|` are sent there without iterating),
  which is continuous with the solutions at the edge of the solvable set; those
  entries are flagged ``converged = False`` and carry no
  gradient with respect to the score (the least-squares point is saturated, its
  sensitivity is ill-defined).
* **Gradients: implicit-function theorem.**  The iterations run without
  autograd; one final Newton step :math:`z = z^* - J^{-1}(F(z^*) - b(s, s'))` with
  :math:`J` and :math:`F(z^*)` detached gives exactly
  :math:`dz/d(s, s') = J^{-1}\, db/d(s, s')` at the root, with no graph through
  the iterations.  ``sigma`` is treated as a constant (no gradient).

Large-:math:`\sigma` caveat of the paper's ``ds = 0``: for :math:`\sigma \gtrsim 0.3`
the kernel is close to uniform, :math:`F_2 - F_1^2 = O(e^{-2\pi^2\sigma^2})`, and
``ds = 0`` forces :math:`\cos 2\pi\delta \approx 0`, i.e. :math:`\delta \approx \pm 1/4`
(the mean a quarter period from :math:`x_t` in the direction of the score) with
a ``c`` that shrinks as :math:`|s|` grows.  Pass an estimate of ``ds`` to avoid it.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from crystalfit.diffusion.torus import wrapped_normal_kernel_moments
from crystalfit.exceptions import CrystalfitError

__all__ = ["periodic_tweedie_moments", "tweedie_lhs", "wrapped_normal_log_derivatives"]

_LOG_C_MIN = math.log(1e-6)
_LOG_C_TILDE_MAX = math.log(100.0)


def _n_images(sigma_max: float) -> int:
    """Images per side so that dropped terms weigh < exp(-40) relative (at most 10)."""
    # image k weighs at most exp(-(k^2 - |k|) / (2 sigma^2)) relative to the nearest one
    k = math.ceil(math.sqrt(80.0 * sigma_max**2 + 0.25) - 0.5)
    return int(min(max(k, 1), 10))


@lru_cache(maxsize=8)
def _gauss_hermite_np(n: int) -> tuple[np.ndarray, np.ndarray]:
    z, w = np.polynomial.hermite_e.hermegauss(n)
    return z, w / w.sum()


def _gauss_hermite(n: int, device) -> tuple[Tensor, Tensor]:
    z, w = _gauss_hermite_np(int(n))
    return (torch.tensor(z, dtype=torch.float64, device=device),
            torch.tensor(w, dtype=torch.float64, device=device))


def _kernel_terms(y: Tensor, sigma: Tensor, n_images: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dimensionless derivatives of ``g = log WN(y; 0, sigma^2)`` (image sums).

    With ``eta_k = (y + k)/sigma`` and softmax weights ``w_k ~ exp(-eta_k^2/2)``
    (moments from :func:`crystalfit.diffusion.torus.wrapped_normal_kernel_moments`):
    ``Q1 = sigma g' = -E_w[eta]``, ``Q2 = sigma^2 (g'' + g'^2) = E_w[eta^2] - 1`` and
    their derivatives with respect to ``eta = y/sigma``:
    ``Q1' = Var_w - 1`` and ``Q2' = -kappa3 - 2 mu Var_w + 2 mu`` (centred moments,
    free of cancellation).
    """
    mu, var, k3, _ = wrapped_normal_kernel_moments(y, sigma, n_images)
    q1 = -mu
    q2 = var + mu * mu - 1.0
    dq1 = var - 1.0
    dq2 = -k3 - 2.0 * mu * var + 2.0 * mu
    return q1, q2, dq1, dq2


def wrapped_normal_log_derivatives(
    y: Tensor, sigma: Tensor | float, n_images: int | None = None
) -> tuple[Tensor, Tensor]:
    """``g'(y)`` and ``g''(y) + g'(y)^2`` of ``g = log WN(y; 0, sigma^2)`` (period 1).

    Parameters
    ----------
    y : Tensor, any shape, fractional units (periodic)
    sigma : Tensor or float, broadcastable to ``y``
    n_images : int, optional
        Images per side (default: enough for ``exp(-40)`` accuracy, at most 10).

    Returns
    -------
    d1 : Tensor
        ``g'(y)`` (1/length; the score of the kernel with respect to ``x_t``).
    p2 : Tensor
        ``g''(y) + g'(y)^2`` (1/length^2).
    """
    sigma = torch.as_tensor(sigma, dtype=y.dtype, device=y.device)
    y, sigma = torch.broadcast_tensors(y, sigma)
    if n_images is None:
        n_images = _n_images(float(sigma.max()))
    q1, q2, _, _ = _kernel_terms(y, sigma, n_images)
    return q1 / sigma, q2 / sigma**2


def _lhs_and_jacobian(dt: Tensor, lc: Tensor, sig: Tensor, z: Tensor, w: Tensor, n_images: int):
    """Scaled moments ``(sigma F1, sigma^2 F2)`` and their Jacobian in ``(delta/sigma, log(c/sigma^2))``."""
    sc = torch.exp(0.5 * lc)  # sqrt(c / sigma^2)
    eta = dt.unsqueeze(-1) - sc.unsqueeze(-1) * z  # (P, n) in units of sigma
    q1, q2, dq1, dq2 = _kernel_terms(sig.unsqueeze(-1) * eta, sig.unsqueeze(-1), n_images)
    f1 = (q1 * w).sum(-1)
    f2 = (q2 * w).sum(-1)
    dl = -0.5 * sc.unsqueeze(-1) * z * w  # d eta / d log c * weights
    j11 = (dq1 * w).sum(-1)
    j21 = (dq2 * w).sum(-1)
    j12 = (dq1 * dl).sum(-1)
    j22 = (dq2 * dl).sum(-1)
    return f1, f2, j11, j12, j21, j22


def tweedie_lhs(delta: Tensor, c: Tensor, sigma: Tensor | float, n_quad: int = 32) -> tuple[Tensor, Tensor]:
    """Left-hand sides ``F1(delta, c)`` and ``F2(delta, c)`` by the solver's quadrature.

    Parameters
    ----------
    delta : Tensor, any shape
        ``x_t - m`` (fractional units).
    c : Tensor, broadcastable, > 0
        Posterior variance (fractional units^2).
    sigma : Tensor or float, broadcastable
        Kernel noise level.
    n_quad : int
        Gauss-Hermite nodes.

    Returns
    -------
    F1, F2 : Tensor (float64, broadcast shape)
        ``E_u[g'(delta - u)]`` and ``E_u[g'' + g'^2]``, ``u ~ N(0, c)``.
    """
    delta, c, sigma = torch.broadcast_tensors(
        delta.double(), torch.as_tensor(c, dtype=torch.float64, device=delta.device),
        torch.as_tensor(sigma, dtype=torch.float64, device=delta.device))
    shape = delta.shape
    sig = sigma.reshape(-1)
    z, w = _gauss_hermite(n_quad, delta.device)
    f1, f2, *_ = _lhs_and_jacobian(delta.reshape(-1) / sig, torch.log(c.reshape(-1) / sig**2), sig, z, w,
                                   _n_images(float(sig.max())))
    return (f1 / sig).reshape(shape), (f2 / sig**2).reshape(shape)


def _harmonic_start(st: Tensor, t2: Tensor, sig: Tensor) -> tuple[Tensor, Tensor]:
    """Start from the first-harmonic (large-sigma) inversion of the equations.

    With ``rho = exp(-2 pi^2 sigma^2)``, ``g' ~ -4 pi rho sin(2 pi y)`` and
    ``g'' + g'^2 ~ -8 pi^2 rho cos(2 pi y)``, so ``F1, F2`` give
    ``exp(-2 pi^2 c) (sin, cos)(2 pi delta)`` directly.
    """
    rho = torch.exp(-2.0 * math.pi**2 * sig**2)
    sn = -(st / sig) / (4.0 * math.pi * rho)
    cs = -(t2 / sig**2) / (8.0 * math.pi**2 * rho)
    delta = torch.atan2(sn, cs) / (2.0 * math.pi)
    amp = torch.clamp(torch.sqrt(sn * sn + cs * cs), min=1e-300, max=1.0 - 1e-9)
    c = -torch.log(amp) / (2.0 * math.pi**2)
    return delta / sig, torch.log(c / sig**2)


def _solve_chunk(st: Tensor, t2: Tensor, sig: Tensor, c_max: float, n_quad: int, max_iter: int, tol: float):
    """Levenberg-Marquardt on one chunk (float64, no autograd). Returns dt, lc, J, F, converged, residual.

    Starts from the better (smaller residual) of the small-noise and the
    first-harmonic start; entries that do not converge are retried from the other
    one and keep whichever end point has the smaller residual.
    """
    lc_max = torch.clamp(torch.log(c_max / sig**2), max=_LOG_C_TILDE_MAX)
    lc_min = torch.full_like(sig, _LOG_C_MIN)
    dt = -st.clone()
    lc = torch.clamp(torch.log1p(torch.clamp(t2 - st * st, min=-1.0 + 1e-3)), lc_min, lc_max)
    # |sigma s| above max|sigma g'| cannot be an average of g': no solution.  Those
    # entries go straight to the saturated least-squares point (c -> lower bound,
    # delta at the extremum of g' on the side the score points to).
    q1_max, y_max = _max_kernel_score(sig)
    hopeless = st.abs() >= q1_max
    dt = torch.where(hopeless, -torch.sign(st) * y_max / sig, dt)
    lc = torch.where(hopeless, lc_min, lc)
    # Gaussian regime: every quadrature node lies where the nearest image alone
    # matters (relative weight of the others < exp(-40)), so g' = -y/sigma^2 there and
    # the small-noise start is the exact root, F = (-dt, dt^2 + c/sigma^2 - 1).
    ct = torch.exp(lc)
    gauss = (sig * (dt.abs() + 9.0 * torch.sqrt(ct)) <= 0.5 - 40.0 * sig**2) & (lc > lc_min) & (lc < lc_max)
    # The other start (first harmonic, right at large sigma); begin from whichever of the
    # two has the smaller residual and retry from the other one where that fails.
    dt_alt, lc_alt = _harmonic_start(st, t2, sig)
    lc_alt = torch.minimum(torch.maximum(lc_alt, lc_min), lc_max)
    # initial values: closed form in the Gaussian regime, quadrature elsewhere
    ct = torch.exp(lc)
    init = [-dt, dt * dt + ct - 1.0, -torch.ones_like(dt), torch.zeros_like(dt), 2.0 * dt, ct]
    other = (~gauss).nonzero().squeeze(-1)
    if other.numel() > 0 and float(sig[other].max()) < 0.15:
        # small sigma: the harmonic start is meaningless (rho ~ 1); keep it for the retry only
        z, w = _gauss_hermite(n_quad, st.device)
        va = _lhs_and_jacobian(dt[other], lc[other], sig[other], z, w, _n_images(float(sig[other].max())))
        for full, xa in zip(init, va):
            full[other] = xa
    elif other.numel() > 0:
        z, w = _gauss_hermite(n_quad, st.device)
        n_img = _n_images(float(sig[other].max()))
        va = _lhs_and_jacobian(dt[other], lc[other], sig[other], z, w, n_img)
        vb = _lhs_and_jacobian(dt_alt[other], lc_alt[other], sig[other], z, w, n_img)
        ma = (va[0] - st[other]) ** 2 + (va[1] - t2[other]) ** 2
        mb = (vb[0] - st[other]) ** 2 + (vb[1] - t2[other]) ** 2
        use_b = (mb < ma) & ~hopeless[other]
        for full, xa, xb in zip(init, va, vb):
            full[other] = torch.where(use_b, xb, xa)
        swap = other[use_b]
        dt[swap], dt_alt[swap] = dt_alt[swap], dt[swap].clone()
        lc[swap], lc_alt[swap] = lc_alt[swap], lc[swap].clone()
    out = _lm(dt, lc, st, t2, sig, lc_min, lc_max, n_quad, max_iter, tol, init=init, frozen=hopeless)
    retry = (~out[4] & ~hopeless).nonzero().squeeze(-1)
    if retry.numel() > 0:
        out2 = _lm(dt_alt[retry], lc_alt[retry], st[retry], t2[retry], sig[retry], lc_min[retry], lc_max[retry],
                   n_quad, max_iter, tol)
        better = out2[5] < out[5][retry]
        sel = retry[better]
        for full, part in zip((out[0], out[1], *out[2], *out[3], out[4], out[5]),
                              (out2[0], out2[1], *out2[2], *out2[3], out2[4], out2[5])):
            full[sel] = part[better]
    return out


def _max_kernel_score(sig: Tensor) -> tuple[Tensor, Tensor]:
    """``max_y sigma |g'(y)|`` and its location ``y* in (0, 1/2]`` for each entry of ``sig``.

    Found on a 2049-point grid over ``[0, 1/2]`` refined by one parabola step,
    once per distinct sigma (usually one or a few per call).
    """
    uniq, inverse = torch.unique(sig, return_inverse=True)
    y = torch.linspace(0.0, 0.5, 2049, dtype=sig.dtype, device=sig.device)
    q1, _, _, _ = _kernel_terms(y.unsqueeze(0).expand(len(uniq), -1), uniq.unsqueeze(-1), _n_images(float(uniq.max())))
    val = q1.abs()
    i = val.argmax(-1).clamp(1, len(y) - 2)
    rows = torch.arange(len(uniq), device=sig.device)
    vm, v0, vp = val[rows, i - 1], val[rows, i], val[rows, i + 1]
    denom = vm - 2.0 * v0 + vp
    shift = torch.where(denom < 0, 0.5 * (vm - vp) / denom, torch.zeros_like(denom)).clamp(-1.0, 1.0)
    h = y[1] - y[0]
    y_star = y[i] + shift * h
    q_star = torch.maximum(v0, v0 - 0.25 * (vm - vp) * shift)
    return q_star[inverse], y_star[inverse]


def _lm(dt, lc, st, t2, sig, lc_min, lc_max, n_quad, max_iter, tol, init=None, frozen=None):
    """Vectorised Levenberg-Marquardt from ``(dt, lc)``; ``init`` = F and J there if known."""
    z, w = _gauss_hermite(n_quad, st.device)
    n_img = _n_images(float(sig.max()))
    quarter = 0.25 / sig
    f1, f2, a, b, c, d = _lhs_and_jacobian(dt, lc, sig, z, w, n_img) if init is None else init
    r1, r2 = f1 - st, f2 - t2
    merit = r1 * r1 + r2 * r2
    lam = torch.full_like(st, 1e-8)
    active = torch.ones_like(st, dtype=torch.bool) if frozen is None else ~frozen
    for _ in range(max_iter):
        done = torch.maximum(r1.abs(), r2.abs()) <= tol * (1.0 + st.abs() + t2.abs())
        active = active & ~done & (lam < 1e6)  # lam >= 1e6: no descent left (least-squares point)
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(-1)
        ja, jb, jc, jd = a[idx], b[idx], c[idx], d[idx]
        ra, rb, la = r1[idx], r2[idx], lam[idx]
        # normal equations (J^T J + lam diag(J^T J)) step = -J^T r, solved in closed form (2x2)
        h11 = ja * ja + jc * jc
        h12 = ja * jb + jc * jd
        h22 = jb * jb + jd * jd
        g1 = ja * ra + jc * rb
        g2 = jb * ra + jd * rb
        h11d = h11 * (1.0 + la) + 1e-300
        h22d = h22 * (1.0 + la) + 1e-300
        det = h11d * h22d - h12 * h12
        s1 = -(h22d * g1 - h12 * g2) / det
        s2 = -(h11d * g2 - h12 * g1) / det
        shrink = torch.clamp(torch.minimum(quarter[idx] / s1.abs().clamp_min(1e-300), 2.0 / s2.abs().clamp_min(1e-300)),
                             max=1.0)
        ndt = dt[idx] + shrink * s1
        nlc = torch.minimum(torch.maximum(lc[idx] + shrink * s2, lc_min[idx]), lc_max[idx])
        nf1, nf2, na, nb, nc, nd = _lhs_and_jacobian(ndt, nlc, sig[idx], z, w, n_img)
        nr1, nr2 = nf1 - st[idx], nf2 - t2[idx]
        nmerit = nr1 * nr1 + nr2 * nr2
        ok = torch.isfinite(nmerit) & (nmerit < merit[idx])
        acc = idx[ok]
        dt[acc], lc[acc] = ndt[ok], nlc[ok]
        f1[acc], f2[acc], a[acc], b[acc], c[acc], d[acc] = nf1[ok], nf2[ok], na[ok], nb[ok], nc[ok], nd[ok]
        r1[acc], r2[acc], merit[acc] = nr1[ok], nr2[ok], nmerit[ok]
        lam[idx] = torch.where(ok, torch.clamp(la * 0.1, min=1e-12), la * 10.0)
    residual = torch.maximum(r1.abs(), r2.abs())
    converged = residual <= tol * (1.0 + st.abs() + t2.abs())
    det_j = a * d - b * c
    converged = converged & (det_j.abs() > 1e-12 * (a.abs() + b.abs()) * (c.abs() + d.abs()))
    return dt, lc, (a, b, c, d), (f1, f2), converged, residual


def periodic_tweedie_moments(
    score: Tensor,
    sigma: Tensor | float,
    ds: Tensor | float | None = None,
    *,
    n_quad: int = 32,
    max_iter: int = 60,
    tol: float = 1e-10,
    c_max: float = 1.0,
    chunk_size: int = 16384,
    return_info: bool = False,
):
    r"""Solve the periodic Tweedie equations for the wrapped-normal posterior ``WN(m, c)``.

    Per coordinate, find ``delta = x_t - m`` and ``c > 0`` with
    ``E_u[g'(delta - u)] = score`` and ``E_u[g'' + g'^2] = score^2 + ds``
    (``u ~ N(0, c)``, ``g = log WN(.; 0, sigma^2)``); see the module docstring for
    the method, the regimes and the handling of scores with no solution.

    Parameters
    ----------
    score : Tensor, any shape
        Unconditional score ``d log p_t / d x_t`` per fractional coordinate, in
        true units (1/fractional length; DiffCSP's network predicts
        ``-score / sqrt(sigma_norm)``: undo that first).  May carry autograd.
    sigma : Tensor or float, broadcastable to ``score``
        Noise level ``sigma_t`` of the wrapped-normal kernel (> 0; no gradient).
    ds : Tensor or float, optional
        ``d score / d x_t`` per coordinate; None means 0 as in the paper.
    n_quad : int
        Gauss-Hermite nodes over ``u``.
    max_iter : int
        Levenberg-Marquardt iterations (the small-noise start converges in 0-3).
    tol : float
        Convergence threshold on the dimensionless residuals.
    c_max : float
        Upper bound on ``c`` (fractional units^2; also ``c <= 100 sigma^2``).
    chunk_size : int
        Coordinates solved at once (bounds the ``chunk x n_quad x images`` work arrays).
    return_info : bool
        Also return a dict with ``converged`` (bool, same shape) and ``residual``.

    Returns
    -------
    delta : Tensor, shape of ``score``, dtype of ``score``
        ``x_t - m`` wrapped into ``[-1/2, 1/2)``; the posterior mean is
        ``m = x_t - delta`` (mod 1).  Differentiable w.r.t. ``score`` and ``ds``
        (implicit-function gradient) where converged.
    c : Tensor, shape of ``score``
        Posterior variance (fractional units^2), > 0.
    info : dict, only if ``return_info``

    Examples
    --------
    >>> import torch
    >>> delta, c = periodic_tweedie_moments(torch.tensor([1000.0]), 0.01)
    >>> [round(v, 6) for v in (delta.item(), c.item())]  # small-noise limit: -sigma^2 s, sigma^2
    [-0.1, 0.0001]
    """
    out_dtype = score.dtype if score.dtype.is_floating_point else torch.get_default_dtype()
    device = score.device
    s64 = score.to(torch.float64)
    sig = (sigma.to(device=device, dtype=torch.float64) if isinstance(sigma, Tensor)
           else torch.tensor(sigma, dtype=torch.float64, device=device)).detach()
    if ds is None:
        ds64 = torch.zeros((), dtype=torch.float64, device=device)
    else:
        ds64 = ds.to(device=device, dtype=torch.float64) if isinstance(ds, Tensor) else \
            torch.tensor(ds, dtype=torch.float64, device=device)
    s64, sig, ds64 = torch.broadcast_tensors(s64, sig, ds64)
    shape = s64.shape
    s_flat, sig_flat, ds_flat = s64.reshape(-1), sig.reshape(-1), ds64.reshape(-1)
    if bool((sig_flat <= 0).any()) or not bool(torch.isfinite(sig_flat).all()):
        raise CrystalfitError(
            f"sigma must be finite and > 0 for every coordinate, got min {float(sig_flat.min()):.3g}; "
            "pass the noise level sigma_t of the wrapped-normal kernel"
        )
    b1 = sig_flat * s_flat  # targets with autograd: sigma s, sigma^2 (s^2 + ds)
    b2 = b1 * b1 + sig_flat**2 * ds_flat
    st, t2 = b1.detach(), b2.detach()
    finite = torch.isfinite(st) & torch.isfinite(t2)
    st = torch.where(finite, st, torch.zeros_like(st))
    t2 = torch.where(finite, t2, torch.zeros_like(t2))

    parts = []
    for start in range(0, st.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        with torch.no_grad():
            parts.append(_solve_chunk(st[sl], t2[sl], sig_flat[sl], float(c_max), n_quad, max_iter, tol))
    if parts:
        dt = torch.cat([p[0] for p in parts])
        lc = torch.cat([p[1] for p in parts])
        ja, jb, jc, jd = (torch.cat([p[2][i] for p in parts]) for i in range(4))
        f1, f2 = (torch.cat([p[3][i] for p in parts]) for i in range(2))
        converged = torch.cat([p[4] for p in parts]) & finite
        residual = torch.cat([p[5] for p in parts])
    else:
        dt = lc = ja = jb = jc = jd = f1 = f2 = residual = st
        converged = finite
    # implicit-function step: z = z* - J^{-1} (F(z*) - b(score, ds)); gradient J^{-1} db
    if b1.requires_grad or b2.requires_grad:
        det = torch.where(converged, ja * jd - jb * jc, torch.ones_like(ja))
        r1 = torch.where(converged, f1 - b1, torch.zeros_like(b1))
        r2 = torch.where(converged, f2 - b2, torch.zeros_like(b2))
        dt = dt - (jd * r1 - jb * r2) / det
        lc = lc - (-jc * r1 + ja * r2) / det
    delta = sig_flat * dt
    delta = delta - torch.round(delta).detach()
    c = sig_flat**2 * torch.exp(lc)
    delta = delta.reshape(shape).to(out_dtype)
    c = c.reshape(shape).to(out_dtype)
    if return_info:
        return delta, c, {"converged": converged.reshape(shape), "residual": residual.reshape(shape)}
    return delta, c
