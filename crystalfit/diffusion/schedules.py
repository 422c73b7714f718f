"""Noise schedules shared by the diffusion processes.

Only schedules live here (tables indexed by the integer diffusion time
``t = 0..T``); the processes that use them are in :mod:`.lattice` and
:mod:`.torus`.  All tables are computed in float64 and stored as buffers, so
they follow ``module.to(device)``; the processes cast them to the dtype of the
data they act on.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from crystalfit.exceptions import CrystalfitError

__all__ = ["CosineBetaSchedule", "TIMESTEP_DENSITIES", "check_time_index", "perturbed_noise_scale", "sample_timesteps"]

#: Distributions of the training time ``t`` accepted by :func:`sample_timesteps`.
TIMESTEP_DENSITIES = ("uniform", "linear")


def sample_timesteps(n: int, T: int, generator: torch.Generator | None = None, density: str = "uniform",
                     device=None) -> Tensor:
    """Draw ``n`` training times in ``1..T``.

    Parameters
    ----------
    n, T : int
        Number of draws and number of diffusion steps.
    generator : torch.Generator, optional
    density : {"uniform", "linear"}
        ``"uniform"``: ``P(t) = 1/T`` (DDPM and DiffCSP).  ``"linear"``: ``P(t) = (2t - 1) / T^2``,
        i.e. ``t = ceil(T sqrt(u))`` with ``u`` uniform: the probability grows linearly with ``t``, so
        the high-noise half of the process (where, in a sample, the arrangement of the atoms is
        decided) gets 3/4 of the draws instead of 1/2.  Importance weighting of the noise levels
        in the denoising objective, in the spirit of EDM's choice of ``p(sigma)`` (Karras et al.
        2022); the loss per draw is unchanged, so it changes what the optimiser spends its steps on,
        not the objective's minimiser.
    device : torch device, optional

    Returns
    -------
    Tensor of shape (n,), dtype long, values in ``1..T``.
    """
    if density not in TIMESTEP_DENSITIES:
        raise CrystalfitError(f"timestep density {density!r} is not supported; use one of {TIMESTEP_DENSITIES}")
    if density == "uniform":
        return torch.randint(1, T + 1, (n,), generator=generator, device=device)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return torch.clamp(torch.ceil(T * torch.sqrt(u)).long(), 1, T)


def perturbed_noise_scale(n: int, gamma: float, generator: torch.Generator | None = None, device=None,
                          dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-item factors ``sqrt(1 + (gamma u)^2)``, ``u`` uniform on [0, 1), for input perturbation.

    Denoising score matching trains the network only where the forward process puts its
    inputs: at time ``t`` within a few ``sigma_t`` of the data.  A guided sampler moves
    atoms farther than that, where the learned score has never been fitted and holds them
    back weakly.  Scaling an item's noise by one of these factors (its variance by
    ``1 + (gamma u)^2``, between 1 and ``1 + gamma^2``) while the network is told ``t`` and
    regressed on the score at ``sigma_t`` of the displacement actually applied fits the
    score out to ``sqrt(1 + gamma^2) sigma_t``: there the target points back to the data
    point the input came from, as the score of ``p_t`` does where one data point dominates.
    Near the data the fitted score pulls harder than the exact one: for data of spread
    ``tau`` and a factor ``s`` the minimiser is ``s^2 (tau^2 + sigma_t^2) / (tau^2 + s^2 sigma_t^2)``
    times the exact score, about 1 where ``sigma_t >> tau`` and up to ``s^2`` where
    ``sigma_t << tau`` (samples end closer to the modes' centres).  After input
    perturbation (Ning et al. 2023, DDPM-IP), which perturbs the input the same way but
    keeps the unperturbed noise as target.

    Parameters
    ----------
    n : int
        Number of items (crystals).
    gamma : float
        Largest relative extra noise, >= 0; 0 gives ones.
    generator, device, dtype : as for :func:`torch.rand`.

    Returns
    -------
    Tensor of shape (n,), values in ``[1, sqrt(1 + gamma^2))``.
    """
    gamma = float(gamma)
    if not (math.isfinite(gamma) and gamma >= 0):
        raise CrystalfitError(f"input perturbation gamma must be a finite float >= 0, got {gamma!r}; e.g. 1.0, or 0 to switch it off")
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    return torch.sqrt(1 + (gamma * u) ** 2)


def check_time_index(t: Tensor, T: int, name: str = "t") -> None:
    """Validate an integer time tensor (dtype and range ``0..T``).

    Parameters
    ----------
    t : Tensor, integer dtype, any shape
    T : int
        Number of diffusion steps; valid times are ``0..T``.
    name : str
        Name used in the error message.

    Raises
    ------
    CrystalfitError
        If ``t`` is not an integer tensor or has values outside ``[0, T]``.
    """
    if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise CrystalfitError(
            f"{name} has dtype {got}, expected an integer (long) tensor of diffusion times; "
            f"pass torch.full((B,), t, dtype=torch.long)"
        )
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi > T:
            raise CrystalfitError(
                f"{name} has values in [{lo}, {hi}], expected diffusion times in [0, {T}]; "
                f"clip or rebuild the time tensor for a schedule with T={T}"
            )


class CosineBetaSchedule(nn.Module):
    r"""Cosine variance schedule of Nichol & Dhariwal, as used by DiffCSP.

    :math:`\bar\alpha(x) = \cos^2\!\big(\tfrac{x/T + s}{1 + s}\tfrac{\pi}{2}\big) / \bar\alpha(0)`,
    :math:`\beta_t = 1 - \bar\alpha(t)/\bar\alpha(t-1)` clipped to ``[1e-4, 0.9999]``,
    then a zero is prepended so that ``betas[0] = 0`` and ``t`` runs ``1..T``.
    ``alphas = 1 - betas`` and ``alphas_cumprod`` is their cumulative product
    (so ``alphas_cumprod[0] = 1``; after clipping it differs slightly from the
    unclipped cosine curve).

    Parameters
    ----------
    T : int
        Number of diffusion steps (default 1000).
    s : float
        Offset of the cosine schedule (default 0.008).

    Attributes
    ----------
    betas : Tensor, shape (T+1,), float64 buffer
    alphas : Tensor, shape (T+1,), float64 buffer
    alphas_cumprod : Tensor, shape (T+1,), float64 buffer (alpha-bar)
    sigmas : Tensor, shape (T+1,), float64 buffer
        Posterior standard deviation ``sqrt(beta_t (1 - abar_{t-1}) / (1 - abar_t))``
        with ``sigmas[0] = 0``.

    Examples
    --------
    >>> sch = CosineBetaSchedule()
    >>> float(sch.betas[1]), round(float(sch.alphas_cumprod[500]), 3)
    (0.0001, 0.494)
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    sigmas: Tensor

    def __init__(self, T: int = 1000, s: float = 0.008) -> None:
        super().__init__()
        if int(T) != T or T < 1:
            raise CrystalfitError(f"T={T!r} is not a positive integer; pass the number of diffusion steps, e.g. T=1000")
        if not (s >= 0.0 and math.isfinite(s)):
            raise CrystalfitError(f"s={s!r} must be a finite non-negative offset; the DiffCSP value is s=0.008")
        self.T = int(T)
        self.s = float(s)
        x = torch.linspace(0, self.T, self.T + 1, dtype=torch.float64)
        abar = torch.cos(((x / self.T) + self.s) / (1 + self.s) * math.pi * 0.5) ** 2
        abar = abar / abar[0]
        betas = torch.clip(1.0 - abar[1:] / abar[:-1], 1e-4, 0.9999)
        betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        sigmas = torch.zeros_like(betas)
        sigmas[1:] = torch.sqrt(betas[1:] * (1.0 - alphas_cumprod[:-1]) / (1.0 - alphas_cumprod[1:]))
        self.register_buffer("betas", betas)
        self.register_buffer("alphas", alphas)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("sigmas", sigmas)

    def extra_repr(self) -> str:
        return f"T={self.T}, s={self.s}"
