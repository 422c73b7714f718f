"""Gaussian DDPM used for the lattice matrix (DiffCSP, SPEC 1.1 and 1.5).

The process acts on any tensor whose first dimension indexes the samples (one
diffusion time per sample), e.g. lattices ``(B, 3, 3)``.  It knows nothing about
crystals.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from crystalfit.diffusion.schedules import CosineBetaSchedule, check_time_index
from crystalfit.exceptions import CrystalfitError, ShapeError

__all__ = ["LatticeDDPM"]


def _per_sample(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` cast to ``like``'s dtype and shaped ``(B, 1, ..., 1)`` to broadcast."""
    return table[t].to(dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


class LatticeDDPM(nn.Module):
    r"""Variance-preserving DDPM on :math:`\mathbb{R}^{3\times 3}` (no normalisation, Angstrom).

    Forward: :math:`L_t = \sqrt{\bar\alpha_t} L_0 + \sqrt{1-\bar\alpha_t}\,\varepsilon`,
    the network predicts :math:`\varepsilon` (training target = the noise).
    The prior at ``t = T`` is :math:`\mathcal N(0, I)` up to
    :math:`\sqrt{\bar\alpha_T}\approx 1.6\times10^{-5}` times ``L_0``.

    Parameters
    ----------
    schedule : CosineBetaSchedule, optional
        Variance schedule (default ``CosineBetaSchedule()``, T=1000, s=0.008).

    Notes
    -----
    Works for any tensor ``x`` of shape ``(B, ...)`` with one time per row;
    coefficients broadcast over the trailing dimensions.

    Examples
    --------
    >>> proc = LatticeDDPM()
    >>> L0 = torch.eye(3).expand(4, 3, 3)
    >>> t = torch.full((4,), 500, dtype=torch.long)
    >>> eps = torch.randn(4, 3, 3)
    >>> Lt = proc.q_sample(L0, t, eps)
    >>> torch.allclose(proc.tweedie_x0(Lt, eps, t), L0, atol=1e-5)
    True
    """

    def __init__(self, schedule: CosineBetaSchedule | None = None) -> None:
        super().__init__()
        self.schedule = schedule if schedule is not None else CosineBetaSchedule()

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return self.schedule.T

    # ------------------------------------------------------------------ checks
    def _check(self, x: Tensor, t: Tensor, name: str = "L_t", other: Tensor | None = None,
               other_name: str = "noise") -> None:
        if x.dim() < 1:
            raise ShapeError(f"{name} is a scalar, expected shape (B, ...) with one row per sample")
        check_time_index(t, self.T, "t")
        if t.shape != (x.shape[0],):
            raise ShapeError(
                f"t has shape {tuple(t.shape)}, expected ({x.shape[0]},) = {name}.shape[0]; "
                "pass one diffusion time per sample"
            )
        if other is not None and other.shape != x.shape:
            raise ShapeError(
                f"{other_name} has shape {tuple(other.shape)}, expected {tuple(x.shape)} = {name}.shape"
            )

    # ----------------------------------------------------------------- forward
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        r"""Sample :math:`q(L_t \mid L_0)`.

        Parameters
        ----------
        x0 : Tensor, shape (B, 3, 3) (or (B, ...)), Angstrom
        t : Tensor, shape (B,), long, values in ``0..T``
        noise : Tensor, same shape as ``x0``, standard normal

        Returns
        -------
        Tensor, same shape as ``x0``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.
        """
        self._check(x0, t, "x0", noise)
        abar = _per_sample(self.schedule.alphas_cumprod, t, x0)
        return torch.sqrt(abar) * x0 + torch.sqrt(1.0 - abar) * noise

    @staticmethod
    def training_target(noise: Tensor) -> Tensor:
        """Regression target of the network: the noise itself (``eps``), shape as given."""
        return noise

    @staticmethod
    def prior_sample(shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``L_T ~ N(0, I)`` of the given shape (e.g. ``(B, 3, 3)``)."""
        gdev = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gdev, dtype=dtype).to(device)

    # ----------------------------------------------------------------- reverse
    def tweedie_x0(self, x_t: Tensor, eps_hat: Tensor, t: Tensor) -> Tensor:
        r"""Tweedie / DDPM estimate :math:`\hat L_0 = (L_t - \sqrt{1-\bar\alpha_t}\hat\varepsilon)/\sqrt{\bar\alpha_t}`.

        Parameters
        ----------
        x_t : Tensor, shape (B, 3, 3)
        eps_hat : Tensor, same shape, predicted noise
        t : Tensor, shape (B,), long

        Returns
        -------
        Tensor, same shape as ``x_t``.  Note the ``1/sqrt(abar_t)`` amplification
        (about 6.4e4 at ``t = T``): the estimate is only informative at small ``t``.
        """
        self._check(x_t, t, "x_t", eps_hat, "eps_hat")
        return self._tweedie_x0(x_t, eps_hat, t)

    def _tweedie_x0(self, x_t: Tensor, eps_hat: Tensor, t: Tensor) -> Tensor:
        """Unchecked :meth:`tweedie_x0` (no host synchronisation; used by samplers)."""
        abar = _per_sample(self.schedule.alphas_cumprod, t, x_t)
        return (x_t - torch.sqrt(1.0 - abar) * eps_hat) / torch.sqrt(abar)

    def reverse_step(self, x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor,
                     noise: Tensor | None = None) -> Tensor:
        r"""One DDPM ancestral step ``t -> t_prev`` (``t_prev < t``; strided allowed).

        With :math:`a = \bar\alpha_t/\bar\alpha_{t'}`, :math:`b = 1 - a`:

        .. math::

            L_{t'} = \frac{1}{\sqrt{a}}\Big(L_t - \frac{b}{\sqrt{1-\bar\alpha_t}}\hat\varepsilon\Big)
                     + \sqrt{b\,\frac{1-\bar\alpha_{t'}}{1-\bar\alpha_t}}\; z .

        For ``t_prev = t - 1`` the schedule's own ``alphas[t]``, ``betas[t]`` and
        ``sigmas[t]`` are used, so the step is exactly DiffCSP's (SPEC 1.5).  With the
        exact noise this is the Gaussian posterior :math:`q(L_{t'} | L_t, L_0)`.
        For ``t_prev = 0`` the noise term vanishes.

        Parameters
        ----------
        x_t : Tensor, shape (B, 3, 3)
        eps_hat : Tensor, same shape, predicted noise
        t, t_prev : Tensor, shape (B,), long, ``0 <= t_prev < t <= T``
        noise : Tensor, same shape as ``x_t``, optional
            Standard normal ``z``; ``None`` means ``z = 0`` (deterministic step).

        Returns
        -------
        Tensor, same shape as ``x_t``.
        """
        self._check(x_t, t, "x_t", eps_hat, "eps_hat")
        check_time_index(t_prev, self.T, "t_prev")
        if t_prev.shape != t.shape:
            raise ShapeError(f"t_prev has shape {tuple(t_prev.shape)}, expected {tuple(t.shape)} = t.shape")
        if bool((t_prev >= t).any()):
            raise CrystalfitError(
                "t_prev must be smaller than t for every sample (reverse steps go down in time); "
                f"got t={t.tolist()[:4]}..., t_prev={t_prev.tolist()[:4]}..."
            )
        if noise is not None and noise.shape != x_t.shape:
            raise ShapeError(f"noise has shape {tuple(noise.shape)}, expected {tuple(x_t.shape)} = x_t.shape")
        return self._reverse_step(x_t, eps_hat, t, t_prev, noise)

    def clip_eps(self, x_t: Tensor, eps_hat: Tensor, t: Tensor, max_norm: float) -> Tensor:
        r"""Noise prediction whose Tweedie estimate has Frobenius norm <= ``max_norm``.

        The DDPM analogue of image models' ``clip_denoised``: :math:`\hat L_0` is
        rescaled (never rotated, so O(3) equivariance is kept) to
        :math:`\hat L_0 \min(1, c/\|\hat L_0\|_F)` and the noise is recomputed from it,
        :math:`\hat\varepsilon = (L_t - \sqrt{\bar\alpha_t}\hat L_0)/\sqrt{1-\bar\alpha_t}`.
        Unchanged when the estimate is inside the ball.  Why: near ``t = T`` the
        estimate carries a ``1/sqrt(abar_t)`` (up to 6.4e4) amplification of the
        network's error, and strided steps (``abar_t/abar_t'`` far from 1) pass it on
        to ``L_t'``; without the clip a slightly wrong eps makes lattices of 1e6 A.

        Parameters
        ----------
        x_t, eps_hat : Tensor, shape (B, 3, 3)
        t : Tensor, shape (B,), long
        max_norm : float, Angstrom (e.g. 1.5 x the largest training ||L||_F)
        """
        abar = _per_sample(self.schedule.alphas_cumprod, t, x_t)
        x0 = (x_t - torch.sqrt(1.0 - abar) * eps_hat) / torch.sqrt(abar)
        norm = torch.linalg.matrix_norm(x0).view(abar.shape)
        x0 = x0 * torch.clamp(max_norm / norm.clamp_min(1e-30), max=1.0)
        return (x_t - torch.sqrt(abar) * x0) / torch.sqrt(1.0 - abar)

    def ddim_step(self, x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
        r"""Deterministic DDIM step (eta = 0): :math:`L_{t'} = \sqrt{\bar\alpha_{t'}}\hat L_0 + \sqrt{1-\bar\alpha_{t'}}\hat\varepsilon`.

        The zero-variance sampler uses this for the lattice instead of the DDPM mean
        with ``z = 0``: the DDPM mean shrinks the noise component at every step, and
        for an O(3)-equivariant denoiser (whose ``\hat L_0`` is ~0 while the
        orientation is still undetermined) that collapses lattices to zero.  DDIM keeps
        the marginals of the forward process.

        Parameters
        ----------
        x_t, eps_hat : Tensor, shape (B, 3, 3)
        t, t_prev : Tensor, shape (B,), long, ``0 <= t_prev < t``

        Returns
        -------
        Tensor, shape (B, 3, 3)
        """
        abar_t = _per_sample(self.schedule.alphas_cumprod, t, x_t)
        abar_p = _per_sample(self.schedule.alphas_cumprod, t_prev, x_t)
        x0 = (x_t - torch.sqrt(1.0 - abar_t) * eps_hat) / torch.sqrt(abar_t)
        return torch.sqrt(abar_p) * x0 + torch.sqrt((1.0 - abar_p).clamp_min(0.0)) * eps_hat

    def _reverse_step(self, x_t: Tensor, eps_hat: Tensor, t: Tensor, t_prev: Tensor,
                      noise: Tensor | None) -> Tensor:
        """Unchecked :meth:`reverse_step` (no host synchronisation; used by samplers)."""
        sch = self.schedule
        abar_t = _per_sample(sch.alphas_cumprod, t, x_t)
        abar_p = _per_sample(sch.alphas_cumprod, t_prev, x_t)
        consecutive = (t_prev == t - 1).view(abar_t.shape)
        alpha = torch.where(consecutive, _per_sample(sch.alphas, t, x_t), abar_t / abar_p)
        beta = torch.where(consecutive, _per_sample(sch.betas, t, x_t), 1.0 - alpha)
        mean = (1.0 / torch.sqrt(alpha)) * (x_t - (beta / torch.sqrt(1.0 - abar_t)) * eps_hat)
        if noise is None:
            return mean
        std = torch.where(
            consecutive,
            _per_sample(sch.sigmas, t, x_t),
            torch.sqrt(beta * (1.0 - abar_p) / (1.0 - abar_t)),
        )
        return mean + std * noise
