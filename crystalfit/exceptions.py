"""Exception types raised by crystalfit.

Every error a user can trigger with bad input is a :class:`CrystalfitError`
(a :class:`ValueError`, so ``except ValueError`` keeps working).  Messages name
the offending item (its index in the input), the rule that was broken, the
value received and how to fix it.

========================  ====================================================
exception                 raised when
========================  ====================================================
EmptyStructureError       a structure has no atoms
NonPeriodicError          an ``ase.Atoms`` is not periodic in all three axes
NonFiniteError            positions, cell, intensities, ... contain NaN / inf
DegenerateCellError       the cell is singular or nearly flat
DisorderedStructureError  a site is disordered / partially occupied
UnknownElementError       an element symbol or atomic number is not known,
                          or a model never saw it during ``fit``
CIFParseError             CIF text or a structure file cannot be parsed
TooManyAtomsError         a structure has more atoms than the model allows
ShapeError                an array has the wrong shape
========================  ====================================================
"""
from __future__ import annotations

__all__ = [
    "CrystalfitError",
    "InvalidStructureError",
    "EmptyStructureError",
    "NonPeriodicError",
    "NonFiniteError",
    "DegenerateCellError",
    "DisorderedStructureError",
    "UnknownElementError",
    "CIFParseError",
    "TooManyAtomsError",
    "ShapeError",
]


class CrystalfitError(ValueError):
    """Base class of every input error raised by crystalfit."""


class InvalidStructureError(CrystalfitError):
    """A structure violates a rule of the crystal data model."""


class EmptyStructureError(InvalidStructureError):
    """A structure has no atoms."""


class NonPeriodicError(InvalidStructureError):
    """A structure is not periodic along all three lattice vectors."""


class NonFiniteError(InvalidStructureError):
    """An array (positions, cell, intensities, ...) contains NaN or inf."""


class DegenerateCellError(InvalidStructureError):
    """The unit cell is singular or has (nearly) zero volume."""


class DisorderedStructureError(InvalidStructureError):
    """A site is disordered or partially occupied."""


class UnknownElementError(CrystalfitError):
    """An element symbol / atomic number is unknown, or unseen by a model."""


class CIFParseError(CrystalfitError):
    """CIF text or a structure file could not be parsed."""


class TooManyAtomsError(CrystalfitError):
    """A structure has more atoms than a model's limit."""


class ShapeError(CrystalfitError):
    """An array has the wrong shape."""
