"""Differentiable single-crystal structure factors and intensities (torch).

For crystal ``b`` with atoms ``v`` (fractional coordinates ``x_v``, atomic number
``Z_v``) and a Miller index ``h = (h, k, l)``:

.. math::

    F_b(\\mathbf h) = \\sum_{v \\in b} f_v(s_{b,\\mathbf h})
        \\exp\\big(2\\pi i\\, \\mathbf x_v \\cdot \\mathbf h
        - 2\\pi^2\\, \\mathbf c_v \\cdot \\mathbf h^{2}\\big),
    \\qquad I_b(\\mathbf h) = |F_b(\\mathbf h)|^2 ,

where ``h^2 = (h^2, k^2, l^2)`` element-wise and ``c_v`` (N, 3) is an optional
per-coordinate variance of the atom position in fractional units (a diagonal
Gaussian smearing, paper Eq. 39; ``c = 0`` gives the ordinary structure factor,
Eq. 31).  ``s = |G|/2`` with ``G = h a* + k b* + l c*`` (reciprocal vectors
without 2 pi); see :mod:`crystalfit.xrd.form_factors` for the wavelength-free
convention.  Intensities are on the absolute ``|F|^2`` scale (electrons^2, unit
cell volume dropped), so ``I(000) = (sum Z)^2``.

Everything is real arithmetic (cos/sin), batched over crystals with
``index_add_`` over the ``batch`` vector, and differentiable with respect to
``frac``, ``variance`` and ``lattice`` (the form factors depend on the lattice
through ``s``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crystalfit.exceptions import ShapeError
from crystalfit.geometry import reciprocal_lattice

from .form_factors import check_numbers, form_factors_s2

__all__ = ["miller_indices", "structure_factors", "structure_factor_intensities", "single_crystal_intensities"]


def miller_indices(hkl_range: int = 2) -> np.ndarray:
    """All Miller indices with every component in ``-hkl_range..hkl_range``.

    Order: lexicographic with ``h`` slowest and ``l`` fastest, i.e. the order of
    ``itertools.product(range(-r, r + 1), repeat=3)``.  Row ``i`` of an intensity
    array computed with these indices belongs to ``hkl[i]``; for ``r = 2`` the
    row of ``(0, 0, 0)`` is 62 (the centre), ``(h, k, l)`` sits at
    ``((h + r) * (2r + 1) + (k + r)) * (2r + 1) + (l + r)``.

    Parameters
    ----------
    hkl_range : int
        Largest absolute Miller index ``r >= 0`` (the paper uses 2).

    Returns
    -------
    np.ndarray, shape ((2r+1)^3, 3), int64
    """
    r = int(hkl_range)
    if r < 0 or r != hkl_range:
        raise ShapeError(f"hkl_range = {hkl_range!r} is invalid, expected a non-negative integer such as 2")
    axis = np.arange(-r, r + 1, dtype=np.int64)
    h, k, l = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.stack([h.ravel(), k.ravel(), l.ravel()], axis=1)


def _check_shapes(frac, numbers, lattice, batch, hkl, variance) -> None:
    n = frac.shape[0] if frac.dim() >= 1 else -1
    if frac.dim() != 2 or frac.shape[1] != 3:
        raise ShapeError(f"frac has shape {tuple(frac.shape)}, expected (N, 3) fractional coordinates")
    if numbers.shape != (n,):
        raise ShapeError(f"numbers has shape {tuple(numbers.shape)}, expected ({n},) = one atomic number per atom")
    if batch.shape != (n,):
        raise ShapeError(f"batch has shape {tuple(batch.shape)}, expected ({n},) = one crystal index per atom")
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        raise ShapeError(f"lattice has shape {tuple(lattice.shape)}, expected (B, 3, 3) with lattice vectors as rows")
    if hkl.dim() != 2 or hkl.shape[1] != 3:
        raise ShapeError(f"hkl has shape {tuple(hkl.shape)}, expected (M, 3) Miller indices")
    if variance is not None and variance.shape != (n, 3):
        raise ShapeError(
            f"variance has shape {tuple(variance.shape)}, expected ({n}, 3) = one variance per coordinate "
            f"(fractional units); pass None for point atoms"
        )


def reflection_form_factors(numbers: Tensor, lattice: Tensor, batch: Tensor, hkl: Tensor) -> Tensor:
    """Form factor of every atom at every reflection of its crystal.

    ``f_Z(s)`` at ``s^2 = |G|^2 / 4`` (smooth at ``G = 0``, unlike ``|G|``), ``G = hkl @ a*``
    per crystal.  Shared by :func:`structure_factors` and the site exchange
    (:mod:`crystalfit.xrd.exchange`); tested through :func:`structure_factors`.

    Parameters
    ----------
    numbers : Tensor, shape (N,), long
        Atomic numbers.
    lattice : Tensor, shape (B, 3, 3)
        Lattice vectors as rows, Angstrom.
    batch : Tensor, shape (N,), long
        Crystal of each atom.
    hkl : Tensor, shape (M, 3)
        Miller indices as floats of the lattice's dtype.

    Returns
    -------
    Tensor, shape (N, M), electrons
    """
    recip = reciprocal_lattice(lattice)  # (B, 3, 3) rows a*, b*, c*
    g = torch.einsum("mi,bij->bmj", hkl, recip)  # (B, M, 3)
    return form_factors_s2(numbers, 0.25 * (g * g).sum(-1)[batch])


def structure_factors(
    frac: Tensor,
    numbers: Tensor,
    lattice: Tensor,
    batch: Tensor,
    hkl: Any,
    variance: Tensor | None = None,
    *,
    validate: bool = True,
    return_incoherent: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Real and imaginary parts of the structure factors ``F_b(h)``.

    Parameters
    ----------
    frac : Tensor, shape (N, 3)
        Fractional coordinates (any real values; ``F`` is periodic in them).
    numbers : Tensor, shape (N,), long
        Atomic numbers (1..98).
    lattice : Tensor, shape (B, 3, 3)
        Lattice vectors as rows, Angstrom.
    batch : Tensor, shape (N,), long
        Crystal index of each atom in ``0..B-1``.
    hkl : array-like, shape (M, 3), integer
        Miller indices (e.g. :func:`miller_indices`).
    variance : Tensor, shape (N, 3), optional
        Per-coordinate positional variance in fractional units^2 (``>= 0``);
        None means point atoms.
    validate : bool
        Check shapes and atomic numbers (costs a host sync; the guidance skips it
        after validating once).
    return_incoherent : bool
        Also return ``sum_v f_v^2 (1 - D_v^2)`` per crystal and reflection, with
        ``D_v = exp(-2 pi^2 c_v . h^2)``: the part of ``E|F|^2`` that the damped
        ``|E F|^2`` misses for independent Gaussian atoms (0 without ``variance``).

    Returns
    -------
    re, im : Tensor, shape (B, M) each, electrons
    incoherent : Tensor, shape (B, M), electrons^2 (only with ``return_incoherent``)
    """
    hkl_t = torch.as_tensor(np.asarray(hkl) if not isinstance(hkl, Tensor) else hkl)
    hkl_t = hkl_t.to(device=frac.device, dtype=frac.dtype)
    if validate:
        _check_shapes(frac, numbers, lattice, batch, hkl_t, variance)
        check_numbers(numbers)
    lattice = lattice.to(frac.dtype)
    num_crystals = lattice.shape[0]
    f = reflection_form_factors(numbers, lattice, batch, hkl_t)  # (N, M)
    shape = (num_crystals, hkl_t.shape[0])
    if return_incoherent:
        incoherent = torch.zeros(shape, dtype=frac.dtype, device=frac.device)
    if variance is not None:
        damping = torch.exp(-2.0 * math.pi**2 * (variance.to(frac.dtype) @ (hkl_t * hkl_t).T))
        if return_incoherent:
            incoherent = incoherent.index_add(0, batch, f * f * (1.0 - damping * damping))
        f = f * damping
    phase = (2.0 * math.pi) * (frac @ hkl_t.T)  # (N, M)
    re_atom = f * torch.cos(phase)
    im_atom = f * torch.sin(phase)
    re = torch.zeros(shape, dtype=frac.dtype, device=frac.device).index_add(0, batch, re_atom)
    im = torch.zeros(shape, dtype=frac.dtype, device=frac.device).index_add(0, batch, im_atom)
    if return_incoherent:
        return re, im, incoherent
    return re, im


def structure_factor_intensities(
    frac: Tensor,
    numbers: Tensor,
    lattice: Tensor,
    batch: Tensor,
    hkl: Any,
    variance: Tensor | None = None,
    *,
    validate: bool = True,
    expected: bool = False,
) -> Tensor:
    """Single-crystal intensities ``I_b(h) = |F_b(h)|^2`` (paper Eqs. 31, 39-40).

    Parameters
    ----------
    frac : Tensor, shape (N, 3)
        Fractional coordinates.
    numbers : Tensor, shape (N,), long
        Atomic numbers (1..98).
    lattice : Tensor, shape (B, 3, 3)
        Lattice vectors as rows, Angstrom.
    batch : Tensor, shape (N,), long
        Crystal index of each atom.
    hkl : array-like, shape (M, 3), integer
        Miller indices; row order of the output columns.
    variance : Tensor, shape (N, 3), optional
        Per-coordinate positional variance (fractional units^2); the factor
        ``exp(-2 pi^2 c_v . h^2)`` multiplies each atom's form factor.
    validate : bool
        Check shapes and atomic numbers.
    expected : bool
        With ``variance``: return the expectation ``E|F|^2`` over independent
        Gaussian atoms, ``|E F|^2 + sum_v f_v^2 (1 - D_v^2)``, instead of the
        paper's ``|E F|^2`` (Eq. 40, whose ``v = xi`` terms are damped too, so it
        underestimates high-order intensities of blurred atoms).

    Returns
    -------
    Tensor, shape (B, M)
        Intensities in electrons^2 (absolute ``|F|^2`` scale), differentiable
        with respect to ``frac``, ``variance`` and ``lattice``.

    Examples
    --------
    >>> import torch
    >>> frac = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    >>> I = structure_factor_intensities(frac, torch.tensor([55, 17]), 4.1 * torch.eye(3, dtype=torch.float64)[None],
    ...                                  torch.zeros(2, dtype=torch.long), [[0, 0, 0], [1, 0, 0]])
    >>> I[0, 0].item()  # (55 + 17)^2
    5184.0
    """
    incoherent = expected and variance is not None
    re, im, *rest = structure_factors(frac, numbers, lattice, batch, hkl, variance, validate=validate,
                                      return_incoherent=incoherent)
    intensities = re * re + im * im
    return intensities + rest[0] if incoherent else intensities


def single_crystal_intensities(atoms: Any, hkl_range: int = 2) -> np.ndarray:
    """Single-crystal intensities ``|F(h)|^2`` of one structure (numpy, float64).

    Parameters
    ----------
    atoms : ase.Atoms or pymatgen Structure (or anything :func:`crystalfit.io.to_atoms` accepts)
        An ordered periodic crystal.
    hkl_range : int
        Miller indices in ``-hkl_range..hkl_range`` (the paper uses 2 -> 125 reflections).

    Returns
    -------
    np.ndarray, shape ((2 hkl_range + 1)^3,), float64
        Intensities in electrons^2, ordered as :func:`miller_indices` (h slowest);
        point atoms, no thermal factor, no Lorentz-polarisation factor.

    Examples
    --------
    >>> from ase import Atoms
    >>> a = 4.24596
    >>> atoms = Atoms("ON2TlCo", scaled_positions=[[0, 0, 0], [.5, .5, .5], [.5, 0, .5], [.5, .5, 0], [0, .5, .5]],
    ...               cell=[a, a, a], pbc=True)
    >>> I = single_crystal_intensities(atoms)
    >>> round(float(I[62]))  # (0, 0, 0): (8 + 7 + 7 + 81 + 27)^2
    16900
    """
    from crystalfit.io import to_atoms  # lazy: io is the Atoms/Structure boundary

    at = to_atoms(atoms)
    hkl = miller_indices(hkl_range)
    frac = torch.as_tensor(at.get_scaled_positions(wrap=True), dtype=torch.float64)
    numbers = torch.as_tensor(at.numbers, dtype=torch.long)
    lattice = torch.as_tensor(np.asarray(at.cell.array), dtype=torch.float64)[None]
    batch = torch.zeros(len(at), dtype=torch.long)
    with torch.no_grad():
        intensities = structure_factor_intensities(frac, numbers, lattice, batch, hkl)
    return intensities[0].numpy()
