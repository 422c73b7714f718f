"""Output heads of the periodic backbone and the Cartesian -> fractional conversion.

Conventions (as everywhere in crystalfit): lattice rows are the lattice
vectors, ``r = frac @ L``, and an orthogonal ``R`` acts on the right:
``L -> L R``, ``r -> r R``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..geometry import polar_factor

__all__ = [
    "cartesian_to_fractional_gradient",
    "segment_mean",
    "ScalarMLP",
    "LatticeHead",
]


def cartesian_to_fractional_gradient(vectors: Tensor, lattice: Tensor, batch: Tensor | None = None) -> Tensor:
    """Convert per-atom Cartesian gradient-like vectors to fractional ones: ``g = v @ L^T``.

    If ``v = dE/dr`` for a scalar ``E`` of Cartesian positions ``r = frac @ L``
    then the chain rule gives ``dE/dfrac_k = sum_j dE/dr_j L_kj``, i.e.
    ``dE/dfrac = v @ L^T``.  The result is rotation invariant: with
    ``L -> L R`` and an equivariant ``v -> v R``,
    ``v R (L R)^T = v R R^T L^T = v L^T``.

    Parameters
    ----------
    vectors : Tensor, shape (N, 3)
        Cartesian vectors (units of ``E`` per Angstrom for a gradient).
    lattice : Tensor, shape (B, 3, 3) (or (3, 3) when ``batch`` is None)
        Rows are lattice vectors (Angstrom).
    batch : Tensor, shape (N,), long, optional
        Crystal index of each atom.

    Returns
    -------
    Tensor, shape (N, 3)
        Fractional-coordinate gradients (units of ``E``).

    Examples
    --------
    >>> L = torch.diag(torch.tensor([2.0, 3.0, 4.0]))
    >>> cartesian_to_fractional_gradient(torch.tensor([[1.0, 1.0, 1.0]]), L)
    tensor([[2., 3., 4.]])
    """
    if batch is None:
        return vectors @ lattice.transpose(-1, -2)
    return torch.einsum("nj,nkj->nk", vectors, lattice[batch])


def segment_mean(values: Tensor, index: Tensor, num_segments: int) -> Tensor:
    """Mean of ``values`` rows per segment (empty segments give 0).

    Parameters
    ----------
    values : Tensor, shape (M, F)
    index : Tensor, shape (M,), long, segment of each row in ``[0, num_segments)``.
    num_segments : int

    Returns
    -------
    Tensor, shape (num_segments, F)
    """
    out = values.new_zeros((num_segments, values.shape[1]))
    out.index_add_(0, index, values)
    count = torch.bincount(index, minlength=num_segments).clamp_min(1).to(values.dtype)
    return out / count[:, None]


class ScalarMLP(nn.Module):
    """``Linear -> SiLU -> Linear`` on invariant features.

    Parameters
    ----------
    n_in, n_hidden, n_out : int
        Feature sizes; ``n_out = 0`` gives an empty ``(M, 0)`` output.
    """

    def __init__(self, n_in: int, n_hidden: int, n_out: int):
        super().__init__()
        self.n_out = int(n_out)
        self.net = nn.Sequential(nn.Linear(n_in, n_hidden), nn.SiLU(), nn.Linear(n_hidden, n_out)) if n_out else None

    def forward(self, x: Tensor) -> Tensor:
        """``(M, n_in) -> (M, n_out)``."""
        if self.net is None:
            return x.new_zeros((x.shape[0], 0))
        return self.net(x)


class LatticeHead(nn.Module):
    """O(3)-equivariant lattice output ``M @ L`` (DiffCSP), optionally ``+ M2 @ U(L)``.

    ``M`` (B, 3, 3) is an invariant function of pooled scalar features, so
    ``L -> L R`` maps the output to ``M L R``, i.e. it rotates like the
    lattice.  Any equivariant function of a full-rank ``L`` can be written
    this way (``F(L) L^{-1}`` is invariant), so no separate symmetric term is
    needed for expressiveness.

    With ``polar=True`` a second term ``M2 @ U`` is added, ``U`` the orthogonal polar
    factor of ``L`` (:func:`crystalfit.geometry.polar_factor`), which rotates like
    ``L`` too.  Expressiveness is the same, but a clean lattice ``L_0 = a U`` in the
    frame of a noisy ``L_t`` -- and so the DDPM noise
    ``(L_t - sqrt(abar) L_0) / sqrt(1 - abar)`` of a dataset of cubic cells -- needs
    only ``M, M2`` proportional to the identity, instead of ``M`` computing
    ``(L_t L_t^T)^{-1/2}`` from invariants.

    Parameters
    ----------
    n_in : int
        Size of the pooled invariant features.
    polar : bool
        Add the ``M2 @ U(L)`` term.
    """

    def __init__(self, n_in: int, polar: bool = False):
        super().__init__()
        self.polar = bool(polar)
        self.linear = nn.Linear(n_in, 18 if self.polar else 9, bias=False)

    def forward(self, pooled: Tensor, lattice: Tensor) -> Tensor:
        """``pooled`` (B, n_in), ``lattice`` (B, 3, 3) -> (B, 3, 3), units of ``L``."""
        m = self.linear(pooled).reshape(-1, 2 if self.polar else 1, 3, 3)
        out = m[:, 0] @ lattice
        if self.polar:
            out = out + m[:, 1] @ polar_factor(lattice)
        return out
