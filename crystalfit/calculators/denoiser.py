"""An ASE calculator whose forces come from a diffusion model's learned score.

A diffusion model trained on fractional coordinates learns the score
``s(x) = grad_frac log p_sigma(x)`` of the data distribution smeared by a
Gaussian of standard deviation ``sigma`` (in fractional units).  Tweedie's
formula gives the posterior mean of the clean coordinates,
``E[x0 | x] = x + sigma^2 s(x)``, so ``sigma^2 s(x)`` is the displacement
(fractional) that "denoises" the structure, ``(sigma^2 s(x)) @ L`` in
Angstrom.  :class:`DenoiserCalculator` turns it into a spring force

    F = stiffness * (sigma^2 * s_frac(x)) @ L        (eV/Angstrom)

which pulls every atom toward the model's denoised position.  For data
concentrated on one structure ``x0`` the score is exactly
``-(x - x0)/sigma^2`` (minimum image) and ``F = -stiffness (r - r0)``, a
harmonic restraint toward ``x0``.

The field is in general not the gradient of any energy, so no energy (and no
stress) is defined: ``get_potential_energy`` raises
``PropertyNotImplementedError``.

Which ASE optimizers work (checked for ASE 3.23-3.29): FIRE (default
``downhill_check=False``; with ``downhill_check=True`` it compares energies),
MDMin, BFGS and LBFGS (``use_line_search=False``, the default) take steps from
forces alone.  BFGSLineSearch / QuasiNewton, LBFGS with line search and GPMin
need energies.  **But** ``Optimizer.log`` calls ``get_potential_energy`` at
every step even when ``logfile=None``, so a plain ``FIRE(atoms).run()`` fails
with this calculator; use :func:`crystalfit.calculators.relax` (which runs a
quiet subclass) or :func:`crystalfit.calculators.quiet_optimizer`::

    opt = quiet_optimizer("FIRE")(atoms, logfile=None)
    opt.run(fmax=0.01, steps=200)

FIRE is the recommended choice: BFGS/LBFGS build a Hessian model that assumes
a conservative force field.  The cell is not relaxed (``relax_cell=False``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from ..exceptions import CrystalfitError, NonFiniteError, ShapeError

__all__ = ["DenoiserCalculator"]


class DenoiserCalculator(Calculator):
    """Forces from a fitted diffusion estimator's score (Tweedie denoising step).

    Parameters
    ----------
    estimator : object
        Anything with ``predict_score(structures: list[ase.Atoms],
        noise_level: float) -> list[np.ndarray (n_atoms, 3)]`` returning the
        score ``grad_frac log p_sigma(x)`` with respect to the fractional
        coordinates at fractional noise ``sigma = noise_level`` (units
        1/fractional).  The fitted ``XRDGuidedDiffusion`` provides it.
    noise_level : float
        ``sigma`` (fractional units); small (0.005-0.05) so that the smeared
        density's modes are the learned structures.
    stiffness : float
        Spring constant ``k`` in eV/Angstrom^2: ``F = k * displacement``.

    Attributes
    ----------
    implemented_properties : list of str
        ``["forces"]`` only.

    Examples
    --------
    >>> import numpy as np
    >>> from ase.build import bulk
    >>> class Point:  # exact score of a point mass at x0 smeared by sigma
    ...     def __init__(self, x0): self.x0 = x0
    ...     def predict_score(self, structures, noise_level):
    ...         d = structures[0].get_scaled_positions(wrap=False) - self.x0
    ...         return [-(d - np.round(d)) / noise_level**2]
    >>> atoms = bulk("Cu", cubic=True)
    >>> calc = DenoiserCalculator(Point(atoms.get_scaled_positions()), noise_level=0.02)
    >>> atoms.positions[0] += [0.1, 0.0, 0.0]
    >>> atoms.calc = calc
    >>> np.round(atoms.get_forces()[0], 6).tolist()
    [-0.1, 0.0, 0.0]
    """

    implemented_properties = ["forces"]

    def __init__(self, estimator: Any, noise_level: float = 0.01, stiffness: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.estimator = estimator
        self.noise_level = noise_level
        self.stiffness = stiffness

    def _validate(self) -> tuple[float, float]:
        if not callable(getattr(self.estimator, "predict_score", None)):
            raise CrystalfitError(
                f"estimator {type(self.estimator).__name__} has no predict_score(structures, noise_level) "
                "method; pass a fitted diffusion estimator (e.g. XRDGuidedDiffusion)"
            )
        sigma, k = self.noise_level, self.stiffness
        for name, v in (("noise_level", sigma), ("stiffness", k)):
            if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v <= 0:
                raise CrystalfitError(f"{name} must be a positive finite float, got {v!r}")
        return float(sigma), float(k)

    def calculate(self, atoms=None, properties=("forces",), system_changes=all_changes):
        """Compute ``self.results["forces"]`` (n_atoms, 3) in eV/Angstrom."""
        super().calculate(atoms, properties, system_changes)
        sigma, k = self._validate()
        atoms = self.atoms
        scores = self.estimator.predict_score([atoms.copy()], sigma)
        if len(scores) != 1:
            raise ShapeError(
                f"estimator.predict_score returned {len(scores)} score arrays for 1 structure; "
                "it must return one (n_atoms, 3) array per input structure"
            )
        score = np.asarray(scores[0], dtype=float)
        if score.shape != (len(atoms), 3):
            raise ShapeError(
                f"estimator.predict_score returned a score of shape {score.shape}, expected "
                f"({len(atoms)}, 3) = (n_atoms, 3) for {atoms.get_chemical_formula()}; "
                "return one fractional-coordinate score vector per atom"
            )
        if not np.isfinite(score).all():
            raise NonFiniteError(
                f"estimator.predict_score returned non-finite values for {atoms.get_chemical_formula()} "
                f"at noise_level={sigma}; check the model or use a larger noise_level"
            )
        disp_frac = sigma**2 * score  # Tweedie: E[x0|x] - x, fractional
        disp_cart = disp_frac @ np.asarray(atoms.cell[:], dtype=float)  # Angstrom
        self.results["forces"] = k * disp_cart
