r"""Variance-exploding diffusion on the unit torus with the wrapped-normal kernel.

This is DiffCSP's process for fractional coordinates (SPEC 1.2 and 1.5):
``x_t = (x_0 + sigma_t * eps) mod 1`` with a geometric sigma schedule.  All
functions act element-wise on tensors of any shape and know nothing about
crystals.

Sign conventions (as in DiffCSP):

* ``d_log_p(x, sigma)`` is **minus** the score, ``-d/dx log p(x)``;
* ``score(x, sigma) = +d/dx log p(x) = -d_log_p``;
* ``d2_log_p(x, sigma) = +d^2/dx^2 log p(x)`` (the true second derivative,
  i.e. ``d score / dx``; note the sign differs from ``d_log_p``'s convention).

The wrapped normal density of period 1,
:math:`p(x) = \sum_{i=-n}^{n} \mathcal N(x + i; 0, \sigma^2)`, is truncated to
``n_images`` images on each side (DiffCSP: 10).  Inputs are first reduced to
``[-0.5, 0.5]`` so the truncated sum is centred on the nearest image, and the
sums are evaluated with softmax weights (log-sum-exp), which stays finite
where DiffCSP's literal ``sum(exp)/sum(exp)`` gives ``0/0`` (e.g. ``sigma=0.005``,
``x=0.5``).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor, nn

from crystalfit.diffusion.schedules import check_time_index
from crystalfit.exceptions import CrystalfitError, ShapeError

__all__ = [
    "wrap01",
    "wrapped_normal_log_density",
    "wrapped_normal_d_log_p",
    "wrapped_normal_d2_log_p",
    "wrapped_normal_kernel_moments",
    "wrapped_normal_sigma_norm",
    "WrappedNormalTorus",
]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def wrap01(x: Tensor) -> Tensor:
    """Wrap values into the half-open interval ``[0, 1)`` (entries rounding to 1.0 become 0.0).

    Parameters
    ----------
    x : Tensor, any shape

    Returns
    -------
    Tensor, same shape and dtype.
    """
    out = x - torch.floor(x)
    return torch.where(out >= 1.0, out - 1.0, out)


def _etas(x: Tensor, sigma: Tensor | float, n_images: int) -> tuple[Tensor, Tensor]:
    """Scaled image displacements ``eta_k = (y + k) / sigma``, ``k = -n..n``, on a leading axis.

    ``y`` is ``x`` reduced to [-0.5, 0.5] (the gradient of round is zero, so
    ``dy/dx = 1``).  Returns ``eta`` (2n+1, *shape) and ``sigma`` broadcast to ``x``.
    Images on the leading axis give contiguous slabs, ~5x faster than a tiny last axis.
    """
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    x, sigma = torch.broadcast_tensors(x, sigma)
    y = x - torch.round(x)
    k = torch.arange(-n_images, n_images + 1, dtype=x.dtype, device=x.device).view(-1, *([1] * x.dim()))
    return (y + k) / sigma, sigma


def wrapped_normal_kernel_moments(x: Tensor, sigma: Tensor | float, n_images: int = 10
                                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Moments of the image weights of ``WN(0, sigma^2)`` at ``x``: the one image sum behind
    the score, its derivative (here) and the periodic Tweedie formulas (:mod:`crystalfit.guidance.tweedie`).

    With ``eta_k = (y + k) / sigma`` and softmax weights ``w_k ~ exp(-eta_k^2 / 2)``
    (``y`` = x reduced to [-0.5, 0.5]): returns ``mu = E_w[eta]``, ``var = Var_w[eta]``,
    ``k3 = E_w[(eta - mu)^3]`` (centred, free of cancellation) and ``sigma`` broadcast to ``x``.
    Then ``d/dx log p = -mu / sigma`` and ``d^2/dx^2 log p = (var - 1) / sigma^2``.

    Parameters
    ----------
    x : Tensor, any shape, fractional units (any real value; periodic)
    sigma : Tensor or float, broadcastable to ``x``, > 0 (fractional units)
    n_images : int
        Images on each side of the truncated sum (``2 n + 1`` terms).

    Returns
    -------
    mu, var, k3 : Tensor, broadcast shape of ``x`` and ``sigma``, dimensionless
        (``eta`` is in units of ``sigma``).
    sigma : Tensor, ``sigma`` broadcast to that shape.
    """
    eta, sigma = _etas(x, sigma, n_images)
    a = -0.5 * eta * eta
    w = torch.exp(a - a.max(0).values)
    w = w / w.sum(0)
    mu = (w * eta).sum(0)
    d = eta - mu
    wd = w * d
    var = (wd * d).sum(0)
    k3 = (wd * d * d).sum(0)
    return mu, var, k3, sigma


def wrapped_normal_log_density(x: Tensor, sigma: Tensor | float, n_images: int = 10) -> Tensor:
    """Log-density of the period-1 wrapped normal ``WN(0, sigma^2)`` at ``x``.

    Parameters
    ----------
    x : Tensor, any shape, fractional units (any real value; periodic)
    sigma : Tensor or float, broadcastable to ``x``, > 0
    n_images : int
        Images on each side of the truncated sum (``2 n + 1`` terms).

    Returns
    -------
    Tensor, broadcast shape: ``log sum_i N(x + i; 0, sigma^2)`` (normalised on [0, 1)).
    """
    eta, sigma = _etas(x, sigma, n_images)
    return torch.logsumexp(-0.5 * eta * eta, dim=0) - torch.log(sigma) - _LOG_SQRT_2PI


def wrapped_normal_d_log_p(x: Tensor, sigma: Tensor | float, n_images: int = 10) -> Tensor:
    r"""DiffCSP's ``d_log_p_wrapped_normal``: **minus** the score, :math:`-\partial_x \log p(x)`.

    :math:`\sum_i \frac{x+i}{\sigma^2} w_i` with :math:`w_i \propto e^{-(x+i)^2/2\sigma^2}`.

    Parameters
    ----------
    x : Tensor, any shape (periodic argument)
    sigma : Tensor or float, broadcastable to ``x``, > 0
    n_images : int

    Returns
    -------
    Tensor, broadcast shape, units 1/(fractional length).
    """
    mu, _, _, sigma = wrapped_normal_kernel_moments(x, sigma, n_images)
    return mu / sigma


def wrapped_normal_d2_log_p(x: Tensor, sigma: Tensor | float, n_images: int = 10) -> Tensor:
    r"""Second derivative :math:`\partial_x^2 \log p(x)` of the wrapped normal (true sign).

    :math:`-1/\sigma^2 + \mathrm{Var}_w[(x+i)]/\sigma^4`, with the softmax weights
    :math:`w_i` of :func:`wrapped_normal_d_log_p` (variance computed in the
    centred, cancellation-free form).

    Parameters
    ----------
    x : Tensor, any shape
    sigma : Tensor or float, broadcastable to ``x``, > 0
    n_images : int

    Returns
    -------
    Tensor, broadcast shape, units 1/(fractional length)^2.  Equals ``d score / dx``
    and ``-d(d_log_p)/dx``.
    """
    _, var, _, sigma = wrapped_normal_kernel_moments(x, sigma, n_images)
    return (var - 1.0) / (sigma * sigma)


@lru_cache(maxsize=16)
def _sigma_norm_cached(sigmas: tuple[float, ...], n_images: int, n_grid: int) -> Tensor:
    sig = torch.tensor(sigmas, dtype=torch.float64)
    grid = (torch.arange(n_grid, dtype=torch.float64) + 0.5) / n_grid
    chunk = max(1, int(4_000_000 // (n_grid * (2 * n_images + 1))))
    out = []
    for sc in sig.split(chunk):
        s = sc[:, None]
        p = torch.exp(wrapped_normal_log_density(grid[None, :], s, n_images))
        d = wrapped_normal_d_log_p(grid[None, :], s, n_images)
        out.append((p * d * d).sum(-1) / p.sum(-1))
    return torch.cat(out)


def wrapped_normal_sigma_norm(sigmas: Tensor, n_images: int = 10, n_grid: int | None = None) -> Tensor:
    r"""DiffCSP's ``sigma_norm``: :math:`E_x[d\_log\_p(x,\sigma)^2]`, ``x = sigma * eps mod 1``.

    Computed deterministically by quadrature over the wrapped density on a uniform
    midpoint grid of ``[0, 1)``.  The integrand :math:`p\,(\partial\log p)^2` is
    periodic and analytic, so the uniform rule converges spectrally: its error is of
    order :math:`\exp(-2\pi^2\sigma^2 M^2)` for ``M`` grid points.  The default
    ``M = max(256, ceil(5 / min(sigma)))`` makes it exact to float64 rounding
    (the discrete weights are renormalised to sum to one).  DiffCSP estimates the
    same quantity by Monte Carlo with 10,000 samples (about 1.4 % noise).

    Parameters
    ----------
    sigmas : Tensor, shape (S,), > 0
    n_images : int
        Images per side in the truncated sums.
    n_grid : int, optional
        Number of quadrature nodes ``M``.

    Returns
    -------
    Tensor, shape (S,), float64, on ``sigmas.device``.  For small sigma this is
    ``1 / sigma^2``; for sigma = 0.5 it is 4.08e-3.
    """
    if sigmas.dim() != 1 or sigmas.numel() == 0:
        raise ShapeError(f"sigmas has shape {tuple(sigmas.shape)}, expected a non-empty 1-D tensor")
    sig_cpu = sigmas.detach().to("cpu", torch.float64)
    smin = float(sig_cpu.min())
    if not smin > 0.0:
        raise CrystalfitError(f"sigmas must be > 0 to define sigma_norm; got min(sigmas)={smin}")
    if n_grid is None:
        n_grid = max(256, int(math.ceil(5.0 / smin)))
    res = _sigma_norm_cached(tuple(sig_cpu.tolist()), int(n_images), int(n_grid)).clone()
    return res.to(sigmas.device)


def _rows(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` cast to ``like.dtype`` and shaped to broadcast over ``like``'s rows."""
    v = table[t].to(dtype=like.dtype)
    if v.dim() < like.dim():
        v = v.view(*v.shape, *([1] * (like.dim() - v.dim())))
    return v


def _as_sigma(sigma: Tensor | float, like: Tensor) -> Tensor:
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.dim() == 1 and like.dim() == 2 and sigma.shape[0] == like.shape[0]:
        sigma = sigma[:, None]  # (N,) means one sigma per row, even when N == 3
    return sigma


class WrappedNormalTorus(nn.Module):
    r"""DiffCSP's wrapped-normal score-matching process on :math:`[0,1)^d`.

    Geometric schedule :math:`\sigma_t = \exp(\mathrm{linspace}(\log\sigma_1, \log\sigma_T, T))`
    for ``t = 1..T`` with :math:`\sigma_0 = 0` prepended.  Forward:
    :math:`x_t = (x_0 + \sigma_t\varepsilon) \bmod 1`.  Training target (what the
    network ``pred_x`` regresses): ``d_log_p(sigma_t * eps, sigma_t) / sqrt(sigma_norm_t)``;
    the score is recovered as ``-pred_x * sqrt(sigma_norm_t)``.

    Parameters
    ----------
    sigma_begin, sigma_end : float
        :math:`\sigma_1` and :math:`\sigma_T` (DiffCSP config: 0.005 and 0.5).
    T : int
        Number of diffusion steps.
    n_images : int
        Images on each side of the truncated wrapped-normal sums.

    Attributes
    ----------
    sigmas : Tensor, shape (T+1,), float64 buffer, ``sigmas[0] = 0``
    sigma_norm : Tensor, shape (T+1,), float64 buffer, ``sigma_norm[0] = 1``
        :math:`E[d\_log\_p^2]` by quadrature (:func:`wrapped_normal_sigma_norm`).

    Examples
    --------
    >>> proc = WrappedNormalTorus()
    >>> round(float(proc.sigma_norm[1]))
    40000
    """

    sigmas: Tensor
    sigma_norm: Tensor

    def __init__(self, sigma_begin: float = 0.005, sigma_end: float = 0.5, T: int = 1000,
                 n_images: int = 10) -> None:
        super().__init__()
        if int(T) != T or T < 1:
            raise CrystalfitError(f"T={T!r} is not a positive integer; pass the number of diffusion steps, e.g. T=1000")
        if not (0.0 < sigma_begin <= sigma_end and math.isfinite(sigma_end)):
            raise CrystalfitError(
                f"sigma_begin={sigma_begin!r}, sigma_end={sigma_end!r}: need 0 < sigma_begin <= sigma_end "
                "(DiffCSP: 0.005 and 0.5)"
            )
        if int(n_images) != n_images or n_images < 1:
            raise CrystalfitError(f"n_images={n_images!r} must be a positive integer (DiffCSP uses 10)")
        self.T, self.n_images = int(T), int(n_images)
        self.sigma_begin, self.sigma_end = float(sigma_begin), float(sigma_end)
        sig = torch.exp(torch.linspace(math.log(sigma_begin), math.log(sigma_end), self.T, dtype=torch.float64))
        norm = wrapped_normal_sigma_norm(sig, self.n_images)
        self.register_buffer("sigmas", torch.cat([torch.zeros(1, dtype=torch.float64), sig]))
        self.register_buffer("sigma_norm", torch.cat([torch.ones(1, dtype=torch.float64), norm]))

    def extra_repr(self) -> str:
        return f"sigma_begin={self.sigma_begin}, sigma_end={self.sigma_end}, T={self.T}, n_images={self.n_images}"

    # ------------------------------------------------------- kernel functions
    def log_density(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Log wrapped-normal density; see :func:`wrapped_normal_log_density`."""
        return wrapped_normal_log_density(x, sigma, self.n_images)

    def d_log_p(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """DiffCSP's ``-d/dx log p``; see :func:`wrapped_normal_d_log_p`."""
        return wrapped_normal_d_log_p(x, sigma, self.n_images)

    def score(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Score ``d/dx log p(x) = -d_log_p(x, sigma)``, same shape as the broadcast inputs."""
        return -wrapped_normal_d_log_p(x, sigma, self.n_images)

    def d2_log_p(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """``d^2/dx^2 log p`` (true sign); see :func:`wrapped_normal_d2_log_p`."""
        return wrapped_normal_d2_log_p(x, sigma, self.n_images)

    # ----------------------------------------------------------- per-row tables
    def sigma_at(self, t: Tensor, like: Tensor) -> Tensor:
        """``sigmas[t]`` in ``like``'s dtype, shaped to broadcast over ``like``'s rows (e.g. (N, 1))."""
        return _rows(self.sigmas, t, like)

    def score_from_prediction(self, pred: Tensor, t: Tensor) -> Tensor:
        """Score from the network output: ``-pred * sqrt(sigma_norm[t])``.

        Parameters
        ----------
        pred : Tensor, shape (N, 3), normalised prediction (the training target's units)
        t : Tensor, shape (N,), long, per-row time

        Returns
        -------
        Tensor, shape (N, 3), the score ``d/dx log p_t``.
        """
        return -pred * torch.sqrt(_rows(self.sigma_norm, t, pred))

    def prediction_from_score(self, score: Tensor, t: Tensor) -> Tensor:
        """Inverse of :meth:`score_from_prediction`: ``-score / sqrt(sigma_norm[t])``."""
        return -score / torch.sqrt(_rows(self.sigma_norm, t, score))

    # ------------------------------------------------------------------ forward
    def q_sample(self, x0: Tensor, sigma: Tensor | float, noise: Tensor) -> Tensor:
        """Sample ``x_t = (x0 + sigma * noise) mod 1``.

        Parameters
        ----------
        x0 : Tensor, shape (N, 3), fractional coordinates
        sigma : Tensor, shape (N, 1) or (N,) (one sigma per row), or a float
        noise : Tensor, same shape as ``x0``, standard normal

        Returns
        -------
        Tensor, same shape as ``x0``, values in [0, 1).
        """
        if noise.shape != x0.shape:
            raise ShapeError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x0.shape)} = x0.shape")
        return wrap01(x0 + _as_sigma(sigma, x0) * noise)

    def training_target(self, noise: Tensor, t: Tensor) -> Tensor:
        """Target of the coordinate head: ``d_log_p(sigma_t eps, sigma_t) / sqrt(sigma_norm_t)``.

        Parameters
        ----------
        noise : Tensor, shape (N, 3), the ``eps`` used in :meth:`q_sample`
        t : Tensor, shape (N,), long, per-row time (``t_crystal[batch]``), values 1..T

        Returns
        -------
        Tensor, shape (N, 3), dimensionless (unit mean square).
        """
        check_time_index(t, self.T, "t")
        if t.shape != noise.shape[:1]:
            raise ShapeError(f"t has shape {tuple(t.shape)}, expected ({noise.shape[0]},) = one time per row of noise")
        sigma = _rows(self.sigmas, t, noise)
        return self.d_log_p(sigma * noise, sigma) / torch.sqrt(_rows(self.sigma_norm, t, noise))

    @staticmethod
    def prior_sample(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``x_T ~ U[0, 1)`` of the given shape (e.g. ``(N, 3)``)."""
        gdev = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=gdev, dtype=dtype).to(device)

    # ------------------------------------------------------------------ reverse
    def reverse_step(self, x_t: Tensor, score: Tensor, t: Tensor, t_prev: Tensor,
                     noise: Tensor | None = None) -> Tensor:
        r"""Reverse-VE ancestral (predictor) step ``t -> t_prev`` (strided allowed).

        .. math::

            x_{t'} = \big(x_t + (\sigma_t^2-\sigma_{t'}^2)\,s
                     + \sqrt{\sigma_{t'}^2(\sigma_t^2-\sigma_{t'}^2)/\sigma_t^2}\; z\big) \bmod 1 .

        For a point mass (``s = -(x_t - x_0)/\sigma_t^2``, no wrapping) this is the exact
        Brownian-bridge posterior :math:`q(x_{t'}|x_t, x_0)`.

        Parameters
        ----------
        x_t : Tensor, shape (N, 3)
        score : Tensor, shape (N, 3), ``d/dx log p_t`` (add any guidance to it beforehand)
        t, t_prev : Tensor, shape (N,), long, per-row times, ``t_prev < t``
        noise : Tensor, shape (N, 3), optional; ``None`` means ``z = 0``

        Returns
        -------
        Tensor, shape (N, 3), in [0, 1).
        """
        s_t = _rows(self.sigmas, t, x_t)
        s_p = _rows(self.sigmas, t_prev, x_t)
        zeta = s_t ** 2 - s_p ** 2
        out = x_t + zeta * score
        if noise is not None:
            out = out + torch.sqrt(s_p ** 2 * zeta / s_t ** 2) * noise
        return wrap01(out)

    def corrector_step(self, x: Tensor, score: Tensor, t: Tensor, step_lr: float,
                       noise: Tensor | None = None) -> Tensor:
        r"""Langevin corrector step: ``gamma = step_lr (sigma_t / sigma_1)^2``,
        ``x <- (x + gamma s + sqrt(2 gamma) z) mod 1``.

        Parameters
        ----------
        x : Tensor, shape (N, 3)
        score : Tensor, shape (N, 3), ``d/dx log p_t``
        t : Tensor, shape (N,), long
        step_lr : float, >= 0
        noise : Tensor, shape (N, 3), optional; ``None`` means ``z = 0``

        Returns
        -------
        Tensor, shape (N, 3), in [0, 1).
        """
        gamma = step_lr * (_rows(self.sigmas, t, x) / self.sigmas[1].to(x.dtype)) ** 2
        out = x + gamma * score
        if noise is not None:
            out = out + torch.sqrt(2.0 * gamma) * noise
        return wrap01(out)
