"""Invariant input features of the periodic backbone (pure torch).

Everything here is invariant under rotations/reflections of the lattice
(``L -> L R``), under common translations of the fractional coordinates and
under integer shifts of single atoms, because it only depends on
fractional displacements (through periodic functions) or on the metric
``G = L L^T``.

=============================  ===========================================
function / class               what
=============================  ===========================================
SinusoidalTimeEmbedding        DiffCSP time embedding of a (B,) time tensor
fourier_features               sin/cos(2 pi k dx), k = 1..n_freqs
periodic_envelope              smooth periodic weight, 1 at dx = 0, 0 at
                               dx = +-1/2 (the minimum-image discontinuity)
GaussianRadialBasis            Gaussians of the edge length |d| (Angstrom)
lattice_invariants             upper triangle of L L^T / r_max^2 and the
                               three angle cosines
=============================  ===========================================
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..exceptions import CrystalfitError

__all__ = [
    "SinusoidalTimeEmbedding",
    "fourier_features",
    "periodic_envelope",
    "GaussianRadialBasis",
    "lattice_invariants",
    "N_LATTICE_INVARIANTS",
]

#: Number of values returned per crystal by :func:`lattice_invariants`.
N_LATTICE_INVARIANTS = 9


class SinusoidalTimeEmbedding(nn.Module):
    """Sinusoidal embedding of diffusion times (DiffCSP ``SinusoidalTimeEmbeddings``).

    ``emb(t) = [sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ..., cos(t w_{h-1})]``
    with ``h = dim // 2`` and ``w_k = exp(-ln(10^4) k / (h - 1))`` (``w_0 = 1``).
    DiffCSP applies it to the integer step ``t`` (1..1000); floats work too.

    Parameters
    ----------
    dim : int
        Even embedding size >= 2.

    Examples
    --------
    >>> emb = SinusoidalTimeEmbedding(8)
    >>> emb(torch.tensor([0.0, 5.0])).shape
    torch.Size([2, 8])
    """

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) != dim or dim < 2 or dim % 2:
            raise CrystalfitError(
                f"time_dim is {dim!r}; the sinusoidal time embedding needs an even integer >= 2 "
                "(sin and cos halves); pass e.g. time_dim=64, or time_dim=0 for a network without time input"
            )
        self.dim = int(dim)

    def forward(self, t: Tensor) -> Tensor:
        """Embed times.

        Parameters
        ----------
        t : Tensor, shape (B,), any real dtype (integers are converted).

        Returns
        -------
        Tensor, shape (B, dim), float dtype of ``t`` (float32 for integer ``t``).
        """
        dtype = t.dtype if t.is_floating_point() else torch.get_default_dtype()
        half = self.dim // 2
        denom = max(half - 1, 1)
        k = torch.arange(half, device=t.device, dtype=dtype)
        freqs = torch.exp(-math.log(10000.0) * k / denom)
        arg = t.to(dtype)[:, None] * freqs[None, :]
        return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def fourier_features(dfrac: Tensor, n_freqs: int) -> Tensor:
    """Periodic Fourier features of fractional displacements.

    Parameters
    ----------
    dfrac : Tensor, shape (E, 3)
        Fractional displacements (dimensionless).
    n_freqs : int
        Frequencies ``k = 1..n_freqs`` (DiffCSP uses k = 0..127; k = 0 only
        gives constants and is dropped).

    Returns
    -------
    Tensor, shape (E, 6 * n_freqs)
        ``[sin(2 pi k dx_c) for c, k] + [cos(2 pi k dx_c) for c, k]``; unchanged
        when ``dfrac`` moves by an integer vector.
    """
    k = torch.arange(1, n_freqs + 1, device=dfrac.device, dtype=dfrac.dtype)
    arg = 2.0 * math.pi * dfrac[:, :, None] * k  # (E, 3, n_freqs)
    arg = arg.reshape(dfrac.shape[0], -1)
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def reciprocal_vectors(max_index: int) -> Tensor:
    """Integer vectors ``G`` in ``{-K..K}^3``, one of each pair ``+-G`` (first non-zero component positive), no 0.

    Parameters
    ----------
    max_index : int
        ``K >= 0`` (0 gives no vectors).

    Returns
    -------
    Tensor, shape (((2K + 1)^3 - 1) / 2, 3), int64.  ``K = 2`` gives the 62 vectors behind
    :func:`crystalfit.xrd.miller_indices`'s 124 non-zero reflections.
    """
    if isinstance(max_index, bool) or int(max_index) != max_index or max_index < 0:
        raise CrystalfitError(f"max_index is {max_index!r}; it must be an integer >= 0; pass e.g. max_index=2")
    r = torch.arange(-int(max_index), int(max_index) + 1)
    g = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    first = torch.where(g[:, 0] != 0, g[:, 0], torch.where(g[:, 1] != 0, g[:, 1], g[:, 2]))
    return g[first > 0]


def joint_fourier_features(dfrac: Tensor, vectors: Tensor) -> Tensor:
    """Plane-wave features ``sin / cos(2 pi G . dx)`` of fractional displacements for integer vectors ``G``.

    Unlike :func:`fourier_features` (one axis at a time) these couple the axes, e.g. ``G = (1, 1, 1)``
    tells whether two atoms lie on the same (111) plane family, which a per-axis feature set only
    gives through products; they are the pair terms of the structure factor ``|F(G)|^2``.

    Parameters
    ----------
    dfrac : Tensor, shape (E, 3)
    vectors : Tensor, shape (M, 3), integer (:func:`reciprocal_vectors`)

    Returns
    -------
    Tensor, shape (E, 2 M), ``[sin(2 pi G_m . dx)] + [cos(2 pi G_m . dx)]``; unchanged when ``dfrac``
    moves by an integer vector.
    """
    arg = 2.0 * math.pi * dfrac @ vectors.to(device=dfrac.device, dtype=dfrac.dtype).T
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def periodic_envelope(dfrac: Tensor) -> Tensor:
    """Smooth periodic edge weight ``prod_c (1 - sin^4(pi dx_c))``.

    It is 1 at ``dx = 0``, vanishes together with its first derivative at
    ``dx_c = +-1/2`` where the minimum-image convention switches image, and is
    periodic with period 1, so anything multiplied by it is continuous (and
    C^1) in the fractional coordinates even if it uses minimum-image Cartesian
    vectors.

    Parameters
    ----------
    dfrac : Tensor, shape (E, 3)

    Returns
    -------
    Tensor, shape (E, 1), values in [0, 1].
    """
    s = torch.sin(math.pi * dfrac)
    return torch.prod(1.0 - s**4, dim=-1, keepdim=True)


class GaussianRadialBasis(nn.Module):
    """Gaussian radial basis of edge lengths.

    ``phi_k(r) = exp(-((r - mu_k) / w)^2 / 2)`` with ``mu_k`` evenly spaced on
    ``[0, r_max]`` and ``w = r_max / (n - 1)`` (``r_max`` for ``n = 1``).

    Parameters
    ----------
    n : int
        Number of basis functions.
    r_max : float
        Largest centre (Angstrom).
    """

    def __init__(self, n: int, r_max: float):
        super().__init__()
        if n < 1 or r_max <= 0:
            raise CrystalfitError(
                f"radial basis got n_radial={n!r}, r_max={r_max!r}; need n_radial >= 1 and r_max > 0 Angstrom; "
                "pass e.g. n_radial=16, r_max=8.0"
            )
        self.n = int(n)
        self.r_max = float(r_max)

    def forward(self, r: Tensor) -> Tensor:
        """Evaluate the basis.

        Parameters
        ----------
        r : Tensor, shape (E,), Angstrom.

        Returns
        -------
        Tensor, shape (E, n).
        """
        mu = torch.linspace(0.0, self.r_max, self.n, device=r.device, dtype=r.dtype)
        width = self.r_max / (self.n - 1) if self.n > 1 else self.r_max
        return torch.exp(-0.5 * ((r[:, None] - mu[None, :]) / width) ** 2)


def lattice_invariants(lattice: Tensor, scale: float) -> Tensor:
    """O(3)-invariant features of lattices.

    Parameters
    ----------
    lattice : Tensor, shape (B, 3, 3)
        Rows are the lattice vectors (Angstrom).
    scale : float
        Length scale (Angstrom) that divides the metric: ``G / scale^2``.

    Returns
    -------
    Tensor, shape (B, 9)
        ``G_aa, G_bb, G_cc, G_ab, G_ac, G_bc`` of ``G = L L^T / scale^2`` and
        ``cos(alpha), cos(beta), cos(gamma)`` (0 for zero-length vectors).
    """
    g = lattice @ lattice.transpose(-1, -2)
    iu = torch.tensor([0, 1, 2, 0, 0, 1], device=lattice.device)
    ju = torch.tensor([0, 1, 2, 1, 2, 2], device=lattice.device)
    metric = g[:, iu, ju] / scale**2
    tiny = torch.finfo(lattice.dtype).tiny ** 0.5
    norms = torch.sqrt(torch.diagonal(g, dim1=-2, dim2=-1).clamp_min(tiny))  # (B, 3)
    cos_alpha = g[:, 1, 2] / (norms[:, 1] * norms[:, 2])
    cos_beta = g[:, 0, 2] / (norms[:, 0] * norms[:, 2])
    cos_gamma = g[:, 0, 1] / (norms[:, 0] * norms[:, 1])
    return torch.cat([metric, torch.stack([cos_alpha, cos_beta, cos_gamma], dim=-1)], dim=-1)
