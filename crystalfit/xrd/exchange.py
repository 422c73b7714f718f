"""Site-exchange refinement against single-crystal intensities.

Guided diffusion moves atoms continuously, so it cannot exchange two atoms of
different elements once both have settled on their sites; and when two light
elements of close atomic number share a structure (O and N: Z = 8 and 7), the
intensities change little when they trade places, so the guidance hardly pulls
them apart early on.  The crystallographer's remedy is to try the exchange and keep
it when it fits the data better.  :func:`exchange_sites` does this greedily: in
every round, each crystal takes the one swap of two atoms of different elements
that lowers its R-factor most (``crystalfit.metrics.r_factor`` with the
least-squares scale), until no swap lowers it.

The set of occupied positions never changes, only which element sits on which of
them, so interatomic distances (as a set) and the lattice stay as they were.

For a swap of atoms ``i`` and ``j`` (form factors ``f_i``, ``f_j``, phases
``e_v = exp(2 pi i h . x_v)``) the structure factor changes by
``(f_i - f_j) (e_j - e_i)``, so every candidate swap of every crystal is scored
from one evaluation of the per-atom terms.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ..exceptions import CrystalfitError, ShapeError
from .intensities import miller_indices, reflection_form_factors

__all__ = ["exchange_sites", "exchange_site_positions"]


def _pairs(numbers: Tensor, batch: Tensor, num_crystals: int) -> tuple[Tensor, Tensor]:
    """All atom pairs ``i < j`` of one crystal with different elements (atoms stored crystal by crystal).

    Built per crystal from one ``m x m`` upper triangle (``m`` the largest atom count),
    so the cost is ``B m^2``, not ``N^2`` over the whole batch.
    """
    counts = torch.bincount(batch, minlength=num_crystals)
    m = int(counts.max()) if counts.numel() else 0
    if m < 2:
        empty = torch.zeros(0, dtype=torch.long, device=numbers.device)
        return empty, empty
    starts = torch.cumsum(counts, 0) - counts
    li, lj = torch.triu_indices(m, m, offset=1, device=numbers.device)
    valid = lj[None, :] < counts[:, None]  # (B, m(m-1)/2)
    i = (starts[:, None] + li[None, :])[valid]
    j = (starts[:, None] + lj[None, :])[valid]
    keep = numbers[i] != numbers[j]
    return i[keep], j[keep]


def _r_factor(calc: Tensor, obs: Tensor) -> Tensor:
    """R-factor with the least-squares scale, per row (as ``crystalfit.metrics.r_factor(fit_scale=True)``)."""
    cc = (calc * calc).sum(-1)
    s = torch.where(cc > 0, (calc * obs).sum(-1) / torch.where(cc > 0, cc, torch.ones_like(cc)), torch.zeros_like(cc))
    return ((s[..., None] * calc - obs) ** 2).sum(-1) / (obs * obs).sum(-1)


#: Pair x reflection elements scored at once (bounds the memory of large batches).
_CHUNK_ELEMENTS = 1 << 22


def _swap_r_factors(f, cos, sin, re, im, target, i, j, b) -> Tensor:
    """R-factor of crystal ``b`` after swapping the positions of atoms ``i`` and ``j``: the structure
    factor changes by ``(f_i - f_j) (e_j - e_i)``."""
    df = f[i] - f[j]
    re_p = re[b] + df * (cos[j] - cos[i])
    im_p = im[b] + df * (sin[j] - sin[i])
    return _r_factor(re_p * re_p + im_p * im_p, target[b])


@torch.no_grad()
def exchange_site_positions(
    frac: Tensor,
    numbers: Tensor,
    lattice: Tensor,
    batch: Tensor,
    hkl: Any,
    target: Tensor,
    *,
    max_rounds: int | None = None,
    rtol: float = 1e-9,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Greedy site exchange on batched tensors (the core of :func:`exchange_sites`).

    Parameters
    ----------
    frac : Tensor, shape (N, 3)
        Fractional coordinates.
    numbers : Tensor, shape (N,), long
        Atomic numbers; they keep their order, the positions move between atoms.
    lattice : Tensor, shape (B, 3, 3)
        Rows in Angstrom.
    batch : Tensor, shape (N,), long
        Crystal of each atom.
    hkl : array-like, shape (M, 3)
        Miller indices of the columns of ``target``.
    target : Tensor, shape (B, M)
        Observed intensities (any scale), not all zero per crystal.
    max_rounds : int, optional
        At most this many swaps per crystal (default: the number of atoms of the
        largest crystal).  Any assignment of the species is at most ``N - 1`` swaps
        away, but the greedy path need not be the shortest, so this is a cap, not a
        guarantee that the search has stopped; the R-factor never increases either way.
    rtol : float
        A swap must lower the R-factor by more than ``rtol`` times its value.

    Returns
    -------
    frac : Tensor, shape (N, 3)
        Positions after the exchanges (a new tensor).
    r_before, r_after : Tensor, shape (B,)
        R-factors before and after.  ``r_after <= r_before`` crystal by crystal.
    n_swaps : Tensor, shape (B,), long
        Swaps made per crystal.
    """
    B = lattice.shape[0]
    if frac.ndim != 2 or frac.shape[1] != 3 or numbers.shape != frac.shape[:1] or batch.shape != frac.shape[:1]:
        raise ShapeError(f"frac must be (N, 3) with numbers and batch (N,); got {tuple(frac.shape)}, "
                         f"{tuple(numbers.shape)}, {tuple(batch.shape)}")
    hkl_t = torch.as_tensor(np.asarray(hkl) if not isinstance(hkl, Tensor) else hkl).to(frac)
    if target.shape != (B, hkl_t.shape[0]):
        raise ShapeError(f"target must have shape (n_crystals, n_reflections) = {(B, hkl_t.shape[0])}, "
                         f"got {tuple(target.shape)}; pass one intensity per Miller index and crystal")
    if batch.numel() > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise CrystalfitError("batch must list the atoms crystal by crystal (non-decreasing); sort the atoms by crystal")
    frac = frac.clone()
    target = target.to(frac)
    f = reflection_form_factors(numbers, lattice.to(frac), batch, hkl_t)  # (N, M): fixed, follows the atom
    pi, pj = _pairs(numbers, batch, B)
    pb = batch[pi]

    def phases(x):
        ph = (2.0 * math.pi) * (x @ hkl_t.T)
        return torch.cos(ph), torch.sin(ph)

    def intensities(cos, sin):
        re = torch.zeros((B, hkl_t.shape[0]), dtype=frac.dtype, device=frac.device).index_add(0, batch, f * cos)
        im = torch.zeros_like(re).index_add(0, batch, f * sin)
        return re, im

    cos, sin = phases(frac)
    re, im = intensities(cos, sin)
    r_before = _r_factor(re * re + im * im, target)
    r_now = r_before.clone()
    n_swaps = torch.zeros(B, dtype=torch.long, device=frac.device)
    n_atoms_max = int(torch.bincount(batch, minlength=B).max()) if batch.numel() else 0
    rounds = n_atoms_max if max_rounds is None else int(max_rounds)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, hkl_t.shape[0]))  # pairs scored at once
    for _ in range(rounds):
        if pi.numel() == 0:
            break
        r_p = torch.cat([_swap_r_factors(f, cos, sin, re, im, target, pi[c], pj[c], pb[c])
                         for c in torch.split(torch.arange(pi.numel(), device=pi.device), chunk)])
        best = torch.full((B,), float("inf"), dtype=r_p.dtype, device=r_p.device).scatter_reduce(
            0, pb, r_p, reduce="amin")
        improves = best < r_now * (1.0 - rtol)
        if not bool(improves.any()):
            break
        # the first pair reaching its crystal's minimum, for the crystals that improve
        is_best = (r_p == best[pb]) & improves[pb]
        first = torch.full((B,), pi.numel(), dtype=torch.long, device=r_p.device).scatter_reduce(
            0, pb[is_best], torch.nonzero(is_best).squeeze(1), reduce="amin")
        chosen = first[improves]
        a, b = pi[chosen], pj[chosen]
        frac[a], frac[b] = frac[b].clone(), frac[a].clone()
        r_now = torch.where(improves, best, r_now)
        n_swaps += improves.long()
        cos, sin = phases(frac)
        re, im = intensities(cos, sin)
    return frac, r_before, r_now, n_swaps


def exchange_sites(structures: Sequence[Any], intensities: Any, *, hkl_range: int = 2,
                   max_rounds: int | None = None, validate: bool = True) -> list:
    """Swap atoms of different elements while the swap improves the fit to the intensities.

    Parameters
    ----------
    structures : list of ase.Atoms (or anything :func:`crystalfit.io.to_atoms` reads)
    intensities : array, shape (M,) or (len(structures), M)
        Single-crystal intensities for ``miller_indices(hkl_range)`` in each
        structure's own cell basis; one row for all structures or one per structure.
    hkl_range : int
    max_rounds : int, optional
        At most this many swaps per structure (default: its number of atoms).
    validate : bool
        Check the structures as every reader does (:func:`crystalfit.io.to_atoms`).
        False refines them as they are, e.g. generated candidates of an
        undertrained model whose cells may be degenerate.

    Returns
    -------
    list of ase.Atoms
        Copies with the exchanged positions; ``info["r_factor_before_exchange"]``,
        ``info["r_factor"]`` (after) and ``info["n_exchanges"]`` are set.
        Species order, the cell and the set of positions are unchanged.
    """
    from ase import Atoms

    from ..data import CrystalBatch
    from ..io import to_atoms

    structures = [structures] if isinstance(structures, Atoms) else list(structures)
    if not structures:
        raise CrystalfitError("structures is empty; pass at least one structure")
    atoms_list = [to_atoms(s, i, validate=validate) for i, s in enumerate(structures)]
    batch = CrystalBatch.from_arrays([a.cell[:] for a in atoms_list], [a.get_scaled_positions() for a in atoms_list],
                                     [a.numbers for a in atoms_list])
    hkl = miller_indices(hkl_range)
    target = np.asarray(intensities, dtype=float)
    if target.ndim == 1:
        target = np.tile(target, (len(structures), 1))
    if target.shape != (len(structures), len(hkl)):
        raise ShapeError(
            f"intensities has shape {np.shape(intensities)}; expected ({len(hkl)},) or ({len(structures)}, {len(hkl)}) "
            f"for the {len(hkl)} reflections of hkl_range={hkl_range}"
        )
    if not np.all(np.isfinite(target)) or np.any(target < 0):
        raise CrystalfitError("intensities must be finite and >= 0; clip background-subtracted negatives to 0")
    if np.any(target.sum(-1) <= 0):
        raise CrystalfitError("intensities are all zero for a structure; the R-factor needs non-zero observations")
    frac = batch.frac.double()
    new, r0, r1, n_swaps = exchange_site_positions(frac, batch.numbers, batch.lattice.double(), batch.batch, hkl,
                                          torch.as_tensor(target, dtype=torch.float64), max_rounds=max_rounds)
    out = []
    starts = np.concatenate([[0], np.cumsum(batch.num_atoms.numpy())])
    for k, atoms in enumerate(atoms_list):
        a = atoms.copy()
        a.set_scaled_positions(new[starts[k]:starts[k + 1]].numpy())
        a.info.update(r_factor_before_exchange=float(r0[k]), r_factor=float(r1[k]), n_exchanges=int(n_swaps[k]))
        out.append(a)
    return out
