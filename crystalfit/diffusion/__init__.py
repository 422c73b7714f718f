"""Forward and reverse diffusion processes as pure tensor math.

Nothing here knows about atoms or crystals: the lattice DDPM acts on any
``(B, ...)`` tensor with one time per row, the torus process on any tensor of
periodic coordinates.

- :class:`CosineBetaSchedule`: DiffCSP's cosine beta schedule (T=1000, s=0.008).
- :class:`LatticeDDPM`: variance-preserving DDPM (lattice matrices), strided
  ancestral steps and the Tweedie estimate.
- :class:`WrappedNormalTorus`: wrapped-normal VE process on [0, 1) with the
  DiffCSP geometric sigma schedule, scores, second derivatives and the
  quadrature ``sigma_norm``.
"""
from crystalfit.diffusion.lattice import LatticeDDPM
from crystalfit.diffusion.schedules import (
    TIMESTEP_DENSITIES,
    CosineBetaSchedule,
    check_time_index,
    perturbed_noise_scale,
    sample_timesteps,
)
from crystalfit.diffusion.torus import (
    WrappedNormalTorus,
    wrap01,
    wrapped_normal_d2_log_p,
    wrapped_normal_d_log_p,
    wrapped_normal_kernel_moments,
    wrapped_normal_log_density,
    wrapped_normal_sigma_norm,
)

__all__ = [
    "CosineBetaSchedule",
    "TIMESTEP_DENSITIES",
    "LatticeDDPM",
    "WrappedNormalTorus",
    "check_time_index",
    "perturbed_noise_scale",
    "sample_timesteps",
    "wrap01",
    "wrapped_normal_log_density",
    "wrapped_normal_d_log_p",
    "wrapped_normal_d2_log_p",
    "wrapped_normal_kernel_moments",
    "wrapped_normal_sigma_norm",
]
