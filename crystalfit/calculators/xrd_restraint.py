"""An ASE calculator restraining a structure toward target XRD intensities.

Energy (eV)::

    E = weight * sum_h (s * I_calc(h) - I_obs(h))^2

with ``I_calc = |F(h)|^2`` from :func:`crystalfit.xrd.structure_factor_intensities`
(point atoms, pymatgen form factors at ``s = |G|/2``, absolute ``|F|^2``
scale, electrons^2) and ``s`` the scale between the two patterns:

* ``scale="fit"``: the least-squares scale ``s* = <I_calc, I_obs> /
  <I_calc, I_calc>``, re-fitted at every evaluation.  The energy is then the
  *profiled* misfit ``E(x) = min_s E(x, s)``.  By the envelope theorem
  ``dE/dx = dE/dx|_{s = s*}`` because ``dE/ds = 0`` at ``s*``, so ``s`` is
  detached from the autograd graph and the forces and stress are the exact
  gradients of the profiled energy (checked against finite differences of the
  profiled energy in the tests).
* ``scale=<float>``: a fixed scale.

Use ``scale="fit"`` for measured intensities (arbitrary units) and
``scale=1.0`` for intensities computed by :func:`crystalfit.xrd.single_crystal_intensities`.

Units: ``weight`` is in eV per intensity unit squared.  Intensities on the
``|F|^2`` scale are large (``I(000) = (sum Z)^2``), so a useful weight is of
order ``k / sum(I_obs^2)``, making ``E`` a relative misfit times ``k`` eV;
:meth:`XRDRestraint.relative_misfit` returns that dimensionless misfit.

Forces and stress come from torch autograd in float64:

* positions ``r = frac @ L`` (rows of ``L`` are lattice vectors), so
  ``frac = r @ L^-1`` and ``F = -dE/dr`` at fixed cell;
* stress ``sigma = (1/V) dE/d(eps)`` for a symmetric strain applied as
  ``L -> L (I + eps)`` with the atoms moving affinely (``frac`` fixed, the
  form factors change through ``|G|``), returned in Voigt order
  ``(xx, yy, zz, yz, xz, xy)`` in eV/Angstrom^3 (ASE's convention, what
  ``FrechetCellFilter`` expects).

Combine it with a physical calculator::

    from ase.calculators.mixing import SumCalculator
    atoms.calc = SumCalculator([EMT(), XRDRestraint(I_obs, weight=...)])
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from ..exceptions import CrystalfitError, NonFiniteError, ShapeError
from ..xrd import miller_indices, structure_factor_intensities

__all__ = ["XRDRestraint"]


class XRDRestraint(Calculator):
    """Intensity-misfit restraint with autograd forces and stress.

    Parameters
    ----------
    intensities : array-like, shape (M,)
        Target (observed) intensities ``I_obs``, one per Miller index of
        ``hkl``; finite and non-negative.
    hkl : array-like of int, shape (M, 3), optional
        Miller indices of ``intensities``; default
        ``crystalfit.xrd.miller_indices(hkl_range)`` (h slowest).
    hkl_range : int
        Used when ``hkl`` is None: all indices in ``-hkl_range..hkl_range``
        (``M = (2 hkl_range + 1)^3``).
    weight : float
        ``>= 0``, eV per intensity unit squared.
    scale : "fit" or float
        ``"fit"``: least-squares scale re-fitted at every call (see the module
        docstring); a float: fixed scale ``s``.
    device : str or torch.device
        Where the autograd runs (``"cpu"`` default; ``"cuda"`` works).

    Attributes
    ----------
    implemented_properties : list of str
        ``["energy", "forces", "stress"]``.
    results : dict
        ``energy`` (eV), ``forces`` (N, 3) eV/Angstrom, ``stress`` (6,)
        eV/Angstrom^3, plus ``scale`` (the ``s`` used) and
        ``relative_misfit``.

    Examples
    --------
    >>> from ase.build import bulk
    >>> from crystalfit.xrd import single_crystal_intensities
    >>> atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    >>> I_obs = single_crystal_intensities(atoms)
    >>> atoms.calc = XRDRestraint(I_obs, weight=1.0 / float((I_obs**2).sum()), scale=1.0)
    >>> round(atoms.get_potential_energy(), 12)
    0.0
    >>> atoms.positions[1] += [0.05, 0.0, 0.0]
    >>> atoms.get_potential_energy() > 0
    True
    """

    implemented_properties = ["energy", "forces", "stress"]

    def __init__(
        self,
        intensities: Any,
        hkl: Any = None,
        hkl_range: int = 2,
        weight: float = 1.0,
        scale: str | float = "fit",
        device: Any = "cpu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hkl = np.asarray(miller_indices(hkl_range) if hkl is None else hkl)
        self.hkl_range = hkl_range
        self.intensities = self._check_intensities(intensities, self.hkl, hkl is None, hkl_range)
        w = weight
        if not isinstance(w, (int, float, np.floating)) or not math.isfinite(w) or w < 0:
            raise CrystalfitError(f"weight must be a finite float >= 0 (eV per intensity unit^2), got {w!r}")
        self.weight = float(w)
        if isinstance(scale, str):
            if scale != "fit":
                raise CrystalfitError(f"scale must be 'fit' or a positive float, got {scale!r}")
        elif not isinstance(scale, (int, float, np.floating)) or not math.isfinite(scale) or scale <= 0:
            raise CrystalfitError(f"scale must be 'fit' or a positive finite float, got {scale!r}")
        self.scale = scale
        self.device = torch.device(device)

    @staticmethod
    def _check_intensities(intensities: Any, hkl: np.ndarray, default_hkl: bool, hkl_range: int) -> np.ndarray:
        if hkl.ndim != 2 or hkl.shape[1] != 3 or not np.issubdtype(hkl.dtype, np.integer):
            raise ShapeError(
                f"hkl has shape {hkl.shape} and dtype {hkl.dtype}, expected an integer array of shape (M, 3); "
                "pass Miller indices such as crystalfit.xrd.miller_indices(2)"
            )
        try:
            arr = np.asarray(intensities, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise CrystalfitError(f"intensities could not be converted to a float array ({exc})") from exc
        m = len(hkl)
        if arr.shape != (m,):
            src = f"for hkl_range={hkl_range}" if default_hkl else "of the hkl given"
            raise ShapeError(
                f"intensities has shape {arr.shape}, expected ({m},) = len(hkl) {src}; "
                "pass one intensity per Miller index (ordered as hkl)"
            )
        bad = np.flatnonzero(~np.isfinite(arr))
        if len(bad):
            raise NonFiniteError(
                f"intensities contain {len(bad)} non-finite values (first at index {bad[0]}, hkl "
                f"{tuple(int(v) for v in hkl[bad[0]])}: {arr[bad[0]]}); drop those reflections from intensities and hkl"
            )
        neg = np.flatnonzero(arr < 0)
        if len(neg):
            raise CrystalfitError(
                f"intensities must be >= 0, got {len(neg)} negative values (first at index {neg[0]}, hkl "
                f"{tuple(int(v) for v in hkl[neg[0]])}: {arr[neg[0]]}); clip noise with np.clip(intensities, 0, None)"
            )
        return arr

    # ------------------------------------------------------------------ core
    def _energy_graph(self, atoms):
        """Build E(r, eps) at eps = 0; return (E, pos, eps, I_calc, s)."""
        dt, dev = torch.float64, self.device
        cell = torch.as_tensor(np.asarray(atoms.cell[:], dtype=float), dtype=dt, device=dev)
        pos = torch.as_tensor(atoms.get_positions(), dtype=dt, device=dev).requires_grad_(True)
        eps = torch.zeros(3, 3, dtype=dt, device=dev, requires_grad=True)
        deform = torch.eye(3, dtype=dt, device=dev) + eps
        lattice = cell @ deform  # L (I + eps)
        frac = (pos @ deform) @ torch.linalg.inv(lattice)  # affine: frac independent of eps
        numbers = torch.as_tensor(atoms.numbers, dtype=torch.long, device=dev)
        batch = torch.zeros(len(atoms), dtype=torch.long, device=dev)
        i_calc = structure_factor_intensities(frac, numbers, lattice[None], batch, self.hkl)[0]
        i_obs = torch.as_tensor(self.intensities, dtype=dt, device=dev)
        if self.scale == "fit":
            with torch.no_grad():  # envelope theorem: dE/ds = 0 at the optimum, so s can be detached
                den = (i_calc * i_calc).sum()
                s = (i_calc * i_obs).sum() / den if den > 0 else torch.zeros((), dtype=dt, device=dev)
        else:
            s = torch.tensor(float(self.scale), dtype=dt, device=dev)
        energy = self.weight * ((s * i_calc - i_obs) ** 2).sum()
        return energy, pos, eps, i_calc, s

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        """Fill ``self.results`` with energy (eV), forces (N, 3) and stress (6,)."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if not np.isfinite(atoms.positions).all() or not np.isfinite(atoms.cell[:]).all():
            raise NonFiniteError("XRDRestraint: the structure has non-finite positions or cell")
        energy, pos, eps, i_calc, s = self._energy_graph(atoms)
        g_pos, g_eps = torch.autograd.grad(energy, (pos, eps))
        volume = abs(float(np.linalg.det(atoms.cell[:])))
        sym = 0.5 * (g_eps + g_eps.T) / volume
        sym = sym.detach().cpu().numpy()
        i_obs = self.intensities
        self.results = {
            "energy": float(energy.detach()),
            "forces": -g_pos.detach().cpu().numpy(),
            "stress": np.array([sym[0, 0], sym[1, 1], sym[2, 2], sym[1, 2], sym[0, 2], sym[0, 1]]),
            "scale": float(s),
            "relative_misfit": self._relative(i_calc.detach().cpu().numpy(), float(s), i_obs),
        }

    @staticmethod
    def _relative(i_calc: np.ndarray, s: float, i_obs: np.ndarray) -> float:
        den = float((i_obs**2).sum())
        return float(((s * i_calc - i_obs) ** 2).sum() / den) if den > 0 else float("nan")

    def relative_misfit(self, atoms) -> float:
        """Dimensionless misfit ``sum_h (s I_calc - I_obs)^2 / sum_h I_obs^2`` of ``atoms``.

        Uses this restraint's ``hkl`` and ``scale`` rule; independent of ``weight``.

        Parameters
        ----------
        atoms : ase.Atoms

        Returns
        -------
        float
        """
        with torch.no_grad():
            _, _, _, i_calc, s = self._energy_graph(atoms)
        return self._relative(i_calc.cpu().numpy(), float(s), self.intensities)
