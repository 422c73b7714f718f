"""CrystalBatch: a batch of periodic crystals as flat torch tensors.

Field names, shapes and units (one place, as in nequip):

=========  ===========  =====================================================
field      shape        meaning
=========  ===========  =====================================================
lattice    (B, 3, 3)    float, Angstrom, rows are the lattice vectors a, b, c
frac       (N, 3)       float, fractional coordinates in [0, 1)
numbers    (N,)         long, atomic numbers Z
num_atoms  (B,)         long, atoms per crystal
batch      (N,)         long, crystal index of each atom (sorted, contiguous)
=========  ===========  =====================================================

``ids`` (list of str) and ``info`` (list of dict) carry provenance for the
B crystals; they never enter tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ..geometry import frac_to_cart


@dataclass
class CrystalBatch:
    """B crystals with N atoms in total.  See the module docstring for fields.

    Examples
    --------
    >>> import numpy as np
    >>> b = CrystalBatch.from_arrays([np.eye(3) * 4.0], [np.zeros((1, 3))], [[29]])
    >>> b.num_crystals, b.frac.shape
    (1, torch.Size([1, 3]))
    """

    lattice: Tensor
    frac: Tensor
    numbers: Tensor
    num_atoms: Tensor
    batch: Tensor
    ids: list = field(default_factory=list)
    info: list = field(default_factory=list)

    # ------------------------------------------------------------------ build
    @classmethod
    def from_arrays(
        cls,
        lattices: Sequence[np.ndarray],
        fracs: Sequence[np.ndarray],
        numbers_list: Sequence[Sequence[int]],
        ids: Sequence[str] | None = None,
        info: Sequence[dict] | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> "CrystalBatch":
        """Build a batch from per-crystal arrays (no validation here; see crystalfit.io)."""
        lattice = torch.as_tensor(np.stack([np.asarray(l, dtype=float) for l in lattices]), dtype=dtype, device=device)
        counts = [len(z) for z in numbers_list]
        frac = torch.as_tensor(
            np.concatenate([np.asarray(f, dtype=float).reshape(-1, 3) for f in fracs]) if counts else np.zeros((0, 3)),
            dtype=dtype,
            device=device,
        )
        numbers = torch.as_tensor(
            np.concatenate([np.asarray(z, dtype=np.int64) for z in numbers_list]) if counts else np.zeros(0, np.int64),
            dtype=torch.long,
            device=device,
        )
        num_atoms = torch.as_tensor(counts, dtype=torch.long, device=device)
        batch = torch.repeat_interleave(torch.arange(len(counts), device=device), num_atoms)
        n = len(counts)
        return cls(
            lattice=lattice,
            frac=frac,
            numbers=numbers,
            num_atoms=num_atoms,
            batch=batch,
            ids=list(ids) if ids is not None else [str(i) for i in range(n)],
            info=list(info) if info is not None else [{} for _ in range(n)],
        )

    @staticmethod
    def batch_index(num_atoms: Tensor) -> Tensor:
        """Crystal index of each atom, shape (N,), from ``num_atoms`` (B,)."""
        return torch.repeat_interleave(torch.arange(len(num_atoms), device=num_atoms.device), num_atoms)

    # ------------------------------------------------------------- properties
    @property
    def num_crystals(self) -> int:
        return int(self.num_atoms.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.frac.shape[0])

    @property
    def device(self) -> torch.device:
        return self.frac.device

    @property
    def dtype(self) -> torch.dtype:
        return self.frac.dtype

    @property
    def cart(self) -> Tensor:
        """Cartesian positions (N, 3) in Angstrom."""
        return frac_to_cart(self.frac, self.lattice, self.batch)

    @property
    def ptr(self) -> Tensor:
        """Offsets (B+1,) of each crystal's first atom."""
        return torch.cat([self.num_atoms.new_zeros(1), torch.cumsum(self.num_atoms, 0)])

    # -------------------------------------------------------------- transform
    def to(self, device=None, dtype: torch.dtype | None = None) -> "CrystalBatch":
        """Copy to ``device`` and/or floating ``dtype`` (integer fields keep long)."""
        fl = dict(device=device, dtype=dtype) if dtype is not None else dict(device=device)
        return CrystalBatch(
            lattice=self.lattice.to(**fl),
            frac=self.frac.to(**fl),
            numbers=self.numbers.to(device=device),
            num_atoms=self.num_atoms.to(device=device),
            batch=self.batch.to(device=device),
            ids=list(self.ids),
            info=list(self.info),
        )

    def replace(self, **changes) -> "CrystalBatch":
        """A shallow copy with some fields replaced (e.g. ``frac=new_frac``)."""
        fields = dict(
            lattice=self.lattice, frac=self.frac, numbers=self.numbers, num_atoms=self.num_atoms,
            batch=self.batch, ids=self.ids, info=self.info,
        )
        fields.update(changes)
        return CrystalBatch(**fields)

    def select(self, index: Sequence[int]) -> "CrystalBatch":
        """Sub-batch of the crystals ``index`` (in that order)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.device)
        num_atoms = self.num_atoms[idx]
        starts = self.ptr[idx]
        # atom indices without a Python loop: start of each selected crystal + offset inside it
        new_batch = self.batch_index(num_atoms)
        new_ptr = torch.cat([num_atoms.new_zeros(1), torch.cumsum(num_atoms, 0)])
        atom_idx = starts[new_batch] + (torch.arange(int(new_ptr[-1]), device=self.device) - new_ptr[new_batch])
        return CrystalBatch(
            lattice=self.lattice[idx],
            frac=self.frac[atom_idx],
            numbers=self.numbers[atom_idx],
            num_atoms=num_atoms,
            batch=new_batch,
            ids=[self.ids[i] for i in idx.tolist()],
            info=[self.info[i] for i in idx.tolist()],
        )

    def __len__(self) -> int:
        return self.num_crystals
