"""Atomic X-ray form factors (the pymatgen / XRDCalculator parametrisation).

pymatgen's :class:`~pymatgen.analysis.diffraction.xrd.XRDCalculator` uses

.. math::

    f(s) = Z - 41.78214\\, s^2 \\sum_{i=1}^{4} a_i \\exp(-b_i s^2),
    \\qquad s = \\frac{\\sin\\theta}{\\lambda} = \\frac{|\\mathbf G|}{2},

with ``G = h a* + k b* + l c*`` built from reciprocal vectors **without** the
factor 2 pi (Angstrom^-1).  The coefficients ``(a_i, b_i)`` come from
``pymatgen.analysis.diffraction.xrd.ATOMIC_SCATTERING_PARAMS`` (keyed by element
symbol; elements 1..98 are tabulated).

Wavelength-free convention: for single-crystal intensities ``s = |G|/2`` is fixed
by the lattice and the Miller index alone, so no wavelength enters (the
wavelength only decides which reflections are inside the limiting sphere,
``|G| <= 2/lambda``, and the 2 theta positions of a powder pattern).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from crystalfit.exceptions import UnknownElementError

__all__ = ["FORM_FACTOR_PREFACTOR", "form_factor_table", "form_factors", "form_factors_s2"]

#: The constant of pymatgen's form-factor formula (``f = Z - 41.78214 s^2 sum ...``).
FORM_FACTOR_PREFACTOR = 41.78214

_MAX_Z = 118


@lru_cache(maxsize=1)
def form_factor_table() -> tuple[np.ndarray, np.ndarray]:
    """Coefficient table indexed by atomic number (built once, cached).

    Returns
    -------
    coeffs : np.ndarray, shape (119, 4, 2), float64
        ``coeffs[Z, i] = (a_i, b_i)`` for ``Z = 1..98``; zeros elsewhere.
    known : np.ndarray, shape (119,), bool
        True where pymatgen tabulates the element.
    """
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS
    from pymatgen.core.periodic_table import Element

    coeffs = np.zeros((_MAX_Z + 1, 4, 2), dtype=np.float64)
    known = np.zeros(_MAX_Z + 1, dtype=bool)
    for z in range(1, _MAX_Z + 1):
        symbol = Element.from_Z(z).symbol
        params = ATOMIC_SCATTERING_PARAMS.get(symbol)
        if params is None:
            continue
        arr = np.asarray(params, dtype=np.float64)
        coeffs[z, : arr.shape[0]] = arr
        known[z] = True
    coeffs.setflags(write=False)
    known.setflags(write=False)
    return coeffs, known


_TORCH_TABLES: dict = {}


def _torch_table(dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (dtype, str(device))
    table = _TORCH_TABLES.get(key)
    if table is None:
        table = torch.tensor(np.array(form_factor_table()[0]), dtype=dtype, device=device)
        _TORCH_TABLES[key] = table
    return table


def check_numbers(numbers: Tensor, name: str = "numbers") -> None:
    """Raise :class:`UnknownElementError` unless every Z has form-factor coefficients.

    Parameters
    ----------
    numbers : Tensor, integer dtype, any shape
        Atomic numbers.
    name : str
        Name used in the error message.
    """
    if numbers.dtype.is_floating_point or numbers.dtype == torch.bool:
        raise UnknownElementError(
            f"{name} has dtype {numbers.dtype}, expected integer atomic numbers; pass a torch.long tensor of Z"
        )
    if numbers.numel() == 0:
        return
    _, known = form_factor_table()
    z = numbers.detach().cpu().numpy().astype(np.int64).ravel()
    bad = (z < 1) | (z > _MAX_Z)
    bad[~bad] = ~known[z[~bad]]
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UnknownElementError(
            f"{name}[{i}] = {int(z[i])} has no X-ray form factor: pymatgen's ATOMIC_SCATTERING_PARAMS "
            f"covers Z = 1..98; remove or replace that element"
        )


def form_factors_s2(numbers: Tensor, s2: Tensor) -> Tensor:
    """Form factors as a function of ``s^2`` (no validation; smooth at ``s = 0``).

    Parameters
    ----------
    numbers : Tensor, shape (N,), long
        Atomic numbers (must be tabulated; see :func:`check_numbers`).
    s2 : Tensor, shape (N, M) or (M,)
        ``s^2 = |G|^2 / 4`` in Angstrom^-2.

    Returns
    -------
    Tensor, shape (N, M), dtype of ``s2``
        Form factors in electrons.
    """
    table = _torch_table(s2.dtype, s2.device)  # (119, 4, 2)
    c = table[numbers]  # (N, 4, 2)
    a, b = c[..., 0], c[..., 1]  # (N, 4)
    if s2.dim() == 1:
        s2 = s2.unsqueeze(0)
    expo = torch.exp(-b.unsqueeze(1) * s2.unsqueeze(-1))  # (N, M, 4)
    total = (a.unsqueeze(1) * expo).sum(-1)  # (N, M)
    z = numbers.to(s2.dtype).unsqueeze(-1)
    return z - FORM_FACTOR_PREFACTOR * s2 * total


def form_factors(numbers: Tensor, s: Tensor) -> Tensor:
    """Atomic X-ray form factors ``f(s)`` (pymatgen parametrisation).

    Parameters
    ----------
    numbers : Tensor, shape (N,), long
        Atomic numbers ``Z`` (1..98).
    s : Tensor, shape (N, M) or (M,)
        ``s = sin(theta)/lambda = |G|/2`` in Angstrom^-1, per atom (N, M) or
        shared by all atoms (M,).

    Returns
    -------
    Tensor, shape (N, M)
        ``f(s) = Z - 41.78214 s^2 sum_i a_i exp(-b_i s^2)`` in electrons; ``f(0) = Z``.

    Raises
    ------
    UnknownElementError
        If some ``Z`` has no tabulated coefficients.

    Examples
    --------
    >>> import torch
    >>> form_factors(torch.tensor([8, 29]), torch.zeros(1)).squeeze(-1)
    tensor([ 8., 29.])
    """
    numbers = torch.as_tensor(numbers)
    if not isinstance(s, Tensor):
        s = torch.as_tensor(s, dtype=torch.get_default_dtype())
    check_numbers(numbers)
    return form_factors_s2(numbers.to(s.device).long(), s * s)
