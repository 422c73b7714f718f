"""The only boundary between user objects (ase.Atoms, pymatgen Structure, CIF
text, structure files) and the internal :class:`~crystalfit.data.CrystalBatch`.
"""
from .convert import (
    batch_to_atoms,
    parse_composition,
    read_structures,
    structures_to_batch,
    to_atoms,
    to_structure,
    validate_atoms,
)

__all__ = [
    "batch_to_atoms",
    "parse_composition",
    "read_structures",
    "structures_to_batch",
    "to_atoms",
    "to_structure",
    "validate_atoms",
]
