"""Conversion and validation of crystal structures.

Accepted inputs everywhere a structure is expected:

* ``ase.Atoms`` (periodic in all three directions),
* ``pymatgen.core.Structure`` (ordered),
* CIF text (a string containing ``data_`` and ``_cell_length_a``),
* a path (``str`` or ``pathlib.Path``) to a CIF, extxyz or POSCAR file.

Every structure is validated (:func:`validate_atoms`); a bad one raises a
:class:`~crystalfit.exceptions.CrystalfitError` subclass whose message names its
index in the input, the rule, the value and the fix.
"""
from __future__ import annotations


import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from ..data import CrystalBatch
from ..exceptions import (
    CIFParseError,
    DegenerateCellError,
    DisorderedStructureError,
    EmptyStructureError,
    NonFiniteError,
    NonPeriodicError,
    TooManyAtomsError,
    UnknownElementError,
)

#: Cells whose volume is below this fraction of ``a*b*c`` are degenerate
#: (all angles within ~0.06 degrees of coplanar).
MIN_NORMALISED_VOLUME = 1e-3
#: Cells with volume below this (Angstrom^3) are degenerate (the validity metric's cut-off).
MIN_VOLUME = 0.1
#: Lattice vectors shorter than this (Angstrom) make a cell degenerate.
MIN_LENGTH = 0.1
#: Largest atomic number accepted (ase.data knows 1..118).
MAX_Z = 118


def _where(index: int | None) -> str:
    return "structure" if index is None else f"structure {index}"


def _is_cif_text(s: str) -> bool:
    return "\n" in s and ("_cell_length_a" in s or s.lstrip().startswith("data_"))


def _structure_to_atoms(structure, index: int | None) -> Atoms:
    """pymatgen Structure -> Atoms, refusing disorder."""
    if not structure.is_ordered:
        for i, site in enumerate(structure):
            if not site.is_ordered or any(abs(occ - 1.0) > 1e-8 for occ in site.species.values()):
                raise DisorderedStructureError(
                    f"{_where(index)}: site {i} is disordered or partially occupied "
                    f"(species {site.species.formula!r}, occupancies {dict((str(k), v) for k, v in site.species.items())}); "
                    "crystalfit models need ordered structures with one element per site at full occupancy; "
                    "order it first, e.g. pymatgen's OrderDisorderedStructureTransformation, or pick one ordering by hand"
                )
    numbers = []
    for i, site in enumerate(structure):
        sym = getattr(site.specie, "symbol", str(site.specie))
        z = getattr(site.specie, "Z", 0)
        if type(site.specie).__name__.startswith("Dummy") or sym not in atomic_numbers or not 1 <= z <= MAX_Z:
            raise UnknownElementError(
                f"{_where(index)}: site {i} has an unknown element symbol {sym!r}; elements must be H..Og; "
                "fix the species label in the input (CIF _atom_site_type_symbol)"
            )
        numbers.append(z)
    atoms = Atoms(
        numbers=numbers,
        cell=np.array(structure.lattice.matrix),
        scaled_positions=np.array(structure.frac_coords),
        pbc=True,
    )
    props = dict(getattr(structure, "properties", {}) or {})
    if props:
        atoms.info["properties"] = props
    return atoms


def _parse_cif_text(text: str, index: int | None):
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            structure = Structure.from_str(text, fmt="cif")
    except Exception as exc:  # pymatgen raises ValueError, KeyError, IndexError ...
        first = text.strip().splitlines()[0][:60] if text.strip() else ""
        raise CIFParseError(
            f"{_where(index)}: CIF text could not be parsed ({type(exc).__name__}: {exc}); "
            f"the text starts with {first!r}; a CIF needs a data_ block with _cell_length_a/b/c, "
            "_cell_angle_alpha/beta/gamma and an _atom_site loop with fractional coordinates; "
            "check the file, or load it yourself into ase.Atoms"
        ) from exc
    return structure


def _read_path(path: Path, index: int | None, frame: int | slice = 0):
    if not path.exists():
        raise CIFParseError(
            f"{_where(index)}: file {str(path)!r} does not exist; pass an existing CIF/extxyz/POSCAR path, "
            "CIF text, an ase.Atoms or a pymatgen Structure"
        )
    suffix = path.suffix.lower()
    if suffix in (".cif", ".mcif"):
        text = path.read_text()
        structure = _parse_cif_text(text, index)
        return [_structure_to_atoms(structure, index)] if isinstance(frame, slice) else _structure_to_atoms(structure, index)
    import ase.io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = ase.io.read(str(path), index=frame)
    except Exception as exc:
        raise CIFParseError(
            f"{_where(index)}: file {str(path)!r} could not be read by ase.io ({type(exc).__name__}: {exc}); "
            "supported: .cif, .extxyz/.xyz (extended XYZ with a Lattice), POSCAR/CONTCAR/.vasp"
        ) from exc
    return got


def to_atoms(obj: Any, index: int | None = None, *, validate: bool = True) -> Atoms:
    """Convert one structure-like object to a validated periodic ``ase.Atoms``.

    Parameters
    ----------
    obj : ase.Atoms, pymatgen Structure, str or pathlib.Path
        An Atoms, a Structure, CIF text, or a path to a CIF / extxyz / POSCAR
        file (the first frame is used).
    index : int, optional
        Position of ``obj`` in the caller's input; used in error messages.
    validate : bool
        Run :func:`validate_atoms` (default True).

    Returns
    -------
    ase.Atoms
        A copy; the input is never modified.

    Examples
    --------
    >>> from ase.build import bulk
    >>> to_atoms(bulk("Cu", cubic=True)).get_chemical_formula()
    'Cu4'
    """
    if isinstance(obj, Atoms):
        atoms = obj.copy()
    elif type(obj).__name__ in ("Structure", "IStructure") and hasattr(obj, "lattice"):
        atoms = _structure_to_atoms(obj, index)
    elif isinstance(obj, (str, os.PathLike)):
        if isinstance(obj, str) and _is_cif_text(obj):
            atoms = _structure_to_atoms(_parse_cif_text(obj, index), index)
        elif isinstance(obj, str) and ("\n" in obj or len(obj) > 4096):
            raise CIFParseError(
                f"{_where(index)}: the string is neither CIF text (no data_ block / _cell_length_a) nor a file path; "
                f"it starts with {obj.strip()[:60]!r}; pass CIF text, a path, an ase.Atoms or a pymatgen Structure"
            )
        else:
            atoms = _read_path(Path(obj), index)
    else:
        raise TypeError(
            f"{_where(index)}: cannot convert an object of type {type(obj).__name__} to a crystal; "
            "pass an ase.Atoms, a pymatgen Structure, CIF text or a path to a CIF/extxyz/POSCAR file"
        )
    if validate:
        validate_atoms(atoms, index)
    return atoms


def read_structures(path: str | os.PathLike) -> list[Atoms]:
    """Read every frame of a structure file (CIF, extxyz, POSCAR) as validated Atoms."""
    got = _read_path(Path(path), None, frame=slice(None))
    got = got if isinstance(got, list) else [got]
    return [to_atoms(a, i) for i, a in enumerate(got)]


def validate_atoms(atoms: Atoms, index: int | None = None) -> None:
    """Check the rules of the crystal data model; raise a documented error on failure.

    Rules: at least one atom; periodic in all three directions; finite cell and
    positions; non-degenerate cell (volume >= 0.1 A^3, >= 1e-3 a*b*c, lattice vectors >= 0.1 A);
    known elements (Z in 1..118).
    """
    where = _where(index)
    if len(atoms) == 0:
        raise EmptyStructureError(
            f"{where} has no atoms (0 sites); a crystal needs at least one atom; remove it from the input"
        )
    if not np.all(atoms.pbc):
        raise NonPeriodicError(
            f"{where} is not periodic in all three directions (pbc={atoms.pbc.tolist()}); crystals need "
            "pbc=[True, True, True] and a full 3x3 cell; set atoms.pbc = True and give it a cell"
        )
    cell = np.asarray(atoms.cell[:], dtype=float)
    if not np.all(np.isfinite(cell)):
        raise NonFiniteError(
            f"{where}: the cell contains NaN or inf ({cell.tolist()}); every cell entry must be finite; fix the input cell"
        )
    pos = atoms.get_positions()
    bad = np.where(~np.all(np.isfinite(pos), axis=1))[0]
    if len(bad):
        raise NonFiniteError(
            f"{where}: atom {int(bad[0])} has a non-finite position {pos[bad[0]].tolist()} "
            f"({len(bad)} atom(s) affected); positions must be finite; fix or drop those atoms"
        )
    vol = abs(float(np.linalg.det(cell)))
    lengths = np.linalg.norm(cell, axis=1)
    norm_vol = vol / max(float(np.prod(lengths)), 1e-300)
    if vol < MIN_VOLUME or norm_vol < MIN_NORMALISED_VOLUME or lengths.min() < MIN_LENGTH:
        raise DegenerateCellError(
            f"{where}: the cell is singular or degenerate (volume {vol:.3g} A^3, volume/(a*b*c) = {norm_vol:.3g}, "
            f"shortest lattice vector {lengths.min():.3g} A; needs volume >= {MIN_VOLUME} A^3, "
            f"volume/(a*b*c) >= {MIN_NORMALISED_VOLUME} and lengths >= {MIN_LENGTH} A); "
            "give three linearly independent lattice vectors"
        )
    z = atoms.numbers
    bad = np.where((z < 1) | (z > MAX_Z))[0]
    if len(bad):
        raise UnknownElementError(
            f"{where}: atom {int(bad[0])} has an unknown element (atomic number {int(z[bad[0]])}, "
            f"symbol {_symbol(int(z[bad[0]]))!r}); elements must be H..Og (Z 1-118); fix the species"
        )


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 <= z < len(chemical_symbols) else "?"


def to_structure(obj: Any, index: int | None = None):
    """Convert a structure-like object to a pymatgen ``Structure`` (validated)."""
    from pymatgen.core import Lattice, Structure

    atoms = to_atoms(obj, index)
    frac = atoms.get_scaled_positions(wrap=True)
    props = dict(atoms.info.get("properties", {}) or {})
    return Structure(
        Lattice(np.asarray(atoms.cell[:], dtype=float)),
        atoms.get_chemical_symbols(),
        frac,
        properties=props,
    )


def _wrap01(frac: np.ndarray) -> np.ndarray:
    out = frac - np.floor(frac)
    out[out >= 1.0] -= 1.0
    return out


def structures_to_batch(
    structures: Iterable[Any],
    max_atoms: int | None = None,
    ids: Sequence[str] | None = None,
) -> CrystalBatch:
    """Validate structures and pack them into a float64 :class:`CrystalBatch`.

    Parameters
    ----------
    structures : iterable of structure-like objects (see module docstring)
    max_atoms : int, optional
        Raise :class:`TooManyAtomsError` for a structure with more atoms.
    ids : sequence of str, optional
        Provenance ids; default ``atoms.info["source_id"]`` or the index.
    """
    if isinstance(structures, (Atoms, str, os.PathLike)) or hasattr(structures, "lattice"):
        structures = [structures]
    lattices, fracs, numbers, out_ids, infos = [], [], [], [], []
    for i, s in enumerate(structures):
        atoms = to_atoms(s, i)
        if max_atoms is not None and len(atoms) > max_atoms:
            raise TooManyAtomsError(
                f"structure {i} has {len(atoms)} atoms, more than the limit of {max_atoms}; "
                "use structures with at most that many atoms, or refit the model with a larger max_atoms"
            )
        lattices.append(np.asarray(atoms.cell[:], dtype=float))
        fracs.append(_wrap01(atoms.get_scaled_positions(wrap=False)))
        numbers.append(atoms.numbers.copy())
        out_ids.append(str(ids[i]) if ids is not None else str(atoms.info.get("source_id", i)))
        infos.append(dict(atoms.info))
    if not lattices:
        raise EmptyStructureError("no structures were given (an empty sequence); pass at least one structure")
    return CrystalBatch.from_arrays(lattices, fracs, numbers, ids=out_ids, info=infos)


def batch_to_atoms(batch: CrystalBatch, extra_info: Sequence[dict] | None = None) -> list[Atoms]:
    """Convert a batch back to periodic ``ase.Atoms`` with wrapped positions.

    ``atoms.info`` holds the provenance: ``source_id`` and whatever the batch's
    ``info`` dicts carry, updated with ``extra_info[i]``.
    """
    lattice = batch.lattice.detach().cpu().double().numpy()
    frac = _wrap01(batch.frac.detach().cpu().double().numpy())
    numbers = batch.numbers.detach().cpu().numpy()
    ptr = batch.ptr.cpu().numpy()
    out = []
    for i in range(batch.num_crystals):
        sl = slice(ptr[i], ptr[i + 1])
        atoms = Atoms(numbers=numbers[sl], cell=lattice[i], scaled_positions=frac[sl], pbc=True)
        info = dict(batch.info[i]) if i < len(batch.info) else {}
        info["source_id"] = batch.ids[i] if i < len(batch.ids) else str(i)
        if extra_info is not None:
            info.update(extra_info[i])
        atoms.info.update(info)
        out.append(atoms)
    return out


_FORMULA_TOKEN = re.compile(r"([A-Z][a-z]?)(\d*)")


def parse_composition(obj: Any, index: int | None = None) -> list[int]:
    """Atomic numbers of a composition, with counts as written.

    ``"CoN2OTl"`` -> ``[27, 7, 7, 8, 81]`` (5 atoms, in formula order).
    Accepts a formula string, a pymatgen ``Composition`` (integer amounts),
    an ``ase.Atoms`` (its species in order), or a sequence of symbols / atomic numbers.
    """
    where = "composition" if index is None else f"composition {index}"
    if isinstance(obj, Atoms):
        return [int(z) for z in obj.numbers]
    if type(obj).__name__ == "Composition":
        out = []
        for el, amt in obj.items():
            if abs(amt - round(amt)) > 1e-8:
                raise UnknownElementError(
                    f"{where}: element {el} has a non-integer amount {amt}; atom counts must be integers; "
                    "pass e.g. Composition('Fe2O3')"
                )
            out += [el.Z] * int(round(amt))
        return out
    if isinstance(obj, str):
        text = obj.replace(" ", "")
        tokens = _FORMULA_TOKEN.findall(text)
        if not text or "".join(s + n for s, n in tokens) != text:
            raise UnknownElementError(
                f"{where}: cannot parse formula {obj!r}; write element symbols with integer counts as in 'CoN2OTl'"
            )
        out = []
        for sym, n in tokens:
            if sym not in atomic_numbers or atomic_numbers[sym] < 1:
                raise UnknownElementError(
                    f"{where}: unknown element symbol {sym!r} in formula {obj!r}; use symbols H..Og, e.g. 'CoN2OTl'"
                )
            out += [atomic_numbers[sym]] * (int(n) if n else 1)
        if not out:
            raise EmptyStructureError(f"{where}: formula {obj!r} has no atoms; give at least one atom")
        return out
    if isinstance(obj, Sequence):
        out = []
        for s in obj:
            if isinstance(s, str):
                if s not in atomic_numbers or atomic_numbers[s] < 1:
                    raise UnknownElementError(f"{where}: unknown element symbol {s!r}; use symbols H..Og")
                out.append(atomic_numbers[s])
            else:
                z = int(s)
                if not 1 <= z <= MAX_Z:
                    raise UnknownElementError(f"{where}: atomic number {z} is outside 1..118; fix the species")
                out.append(z)
        if not out:
            raise EmptyStructureError(f"{where}: the species list is empty; give at least one atom")
        return out
    raise TypeError(
        f"{where}: cannot read a composition from type {type(obj).__name__}; pass a formula like 'CoN2OTl', "
        "a pymatgen Composition, an ase.Atoms or a list of element symbols"
    )


