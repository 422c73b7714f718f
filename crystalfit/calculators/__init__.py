"""ASE calculators and the relaxation pipeline.

* :class:`XRDRestraint`: an energy penalising the misfit between computed and
  target single-crystal XRD intensities, with analytic (autograd) forces and
  stress; add it to a physical calculator with
  ``ase.calculators.mixing.SumCalculator``.
* :class:`DenoiserCalculator`: forces from a fitted diffusion model's score
  (a Tweedie denoising step), force-only.
* :func:`relax`: batch relaxation (EMT, CHGNet or any ASE calculator; FIRE and
  friends; optional cell relaxation; joblib parallel).
"""
from .denoiser import DenoiserCalculator
from .relax import RelaxResult, emt_supported_elements, make_calculator, quiet_optimizer, relax
from .xrd_restraint import XRDRestraint

__all__ = [
    "DenoiserCalculator",
    "RelaxResult",
    "emt_supported_elements",
    "make_calculator",
    "quiet_optimizer",
    "relax",
    "XRDRestraint",
]
