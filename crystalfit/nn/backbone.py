"""E(3)-equivariant message passing over the periodic graph of a unit cell.

Graph
-----
Fully connected within each crystal, self-loops included, with the
minimum-image fractional displacement ``dx_ij = (x_j - x_i) - round(x_j - x_i)``
and the Cartesian edge vector ``d_ij = dx_ij @ L`` (DiffCSP's ``edge_style:
fc``).  For the <= ~52-atom cells of the benchmarks this is cheaper and simpler
than a radius graph with image offsets, needs no cutoff (every atom sees every
other atom, whatever the cell size, including the tiny or huge noisy lattices
of the diffusion prior) and the edge list only depends on ``num_atoms``, so it
is built vectorised from ``num_atoms`` with ``repeat_interleave``.

Edge features
-------------
* invariant and periodic, hence continuous in the coordinates:
  Fourier features ``sin/cos(2 pi k dx)``, ``k = 1..n_freqs`` and the lattice
  invariants (metric ``L L^T`` and angle cosines, via the node input);
* geometric (minimum image): spherical harmonics ``Y_l(d / |d|)`` for
  ``1 <= l <= lmax`` and a Gaussian radial basis of ``|d|``.  The minimum image
  switches images where a component of ``dx`` crosses 1/2, so these parts
  jump there.  Every use of them (radial basis, harmonic messages) is
  multiplied by the smooth periodic envelope ``prod_c (1 - sin^4(pi dx_c))``,
  which vanishes with its derivative at ``dx_c = 1/2``: the whole network is
  therefore C^1 and periodic in the fractional coordinates.  On cells whose
  atoms sit half a lattice vector apart (perovskites, the Cu3Au supercell) that
  envelope switches off nearly every edge's geometry; ``edge_geometry="images"``
  averages it over the 8 nearest images instead (:func:`image_edge_geometry`).
* self-loops and coincident atoms have ``d = 0``: the ``l > 0`` harmonics are
  multiplied by ``1 - exp(-|d|^2 / r0^2)`` (``r0 = 0.1`` Angstrom), which is
  exactly 0 at ``d = 0`` and smooth, and the unit vector uses
  ``|d| = sqrt(|d|^2 + eps^2)``, so there is no 0/0 in values or gradients.

Nodes
-----
Scalars from ``Embedding(Z)``, the sinusoidal time embedding, the per-crystal
condition and the lattice invariants; and the three lattice vectors of the
crystal (rows of ``L / r_max``) as ``3x1o`` features, which lets the network
express any invariant fractional output (``c @ L`` is a Cartesian vector).
Hidden features are ``hidden_scalars x 0e + hidden_vectors x (1o + 2e + ...)``
up to ``lmax``.

Layer
-----
Pre-norm (equivariant RMS norm); per edge an MLP of ``[s_i, s_j, edge
features]`` gives a scalar message (DiffCSP) and per-channel weights of a
PaiNN-style equivariant message ``w_Y env Y_l(d_ij) + w_V (W x_j)_l`` (only
elementwise work per edge: with ``n^2`` edges per crystal, per-edge
Clebsch-Gordan tensor products cost ~5x more and were dropped after
profiling); mean aggregation over the ``n`` incoming edges; per node an e3nn
channel-wise (``uuu``) tensor product between two linear projections of
``[x_i, aggregate]`` (gives bond-angle invariants such as
``sum_jk w_ij w_ik Y(d_ij).Y(d_ik)``), an ``o3.Linear``, a gated nonlinearity
and a residual connection.  Time enters at the input only, as in DiffCSP.

Cost (float32, 1 CPU thread, default sizes, 178k parameters, a busy 2-core
machine): forward of 100 crystals of 5 atoms 26-39 ms, of 20 atoms 0.26-0.32 s;
a CSPNet-size network (512 hidden, 6 layers, 128 frequencies) took 17x / 41x
longer in the same run.  The last layer only outputs ``l <= 1`` (all the
heads need).

Symmetry (checked by :mod:`crystalfit.testing`): ``L -> L R`` for any
orthogonal ``R`` rotates ``atom_vectors`` (``v -> v R``) and ``lattice``
(``-> out R``) and leaves everything else unchanged; outputs are permutation
equivariant within a crystal, invariant under common translations and under
integer shifts of single atoms, and each crystal's outputs do not depend on
the other crystals of the batch.
"""
from __future__ import annotations

import torch
from e3nn import o3
from e3nn.nn import Gate
from torch import Tensor, nn

from ..exceptions import CrystalfitError, ShapeError, UnknownElementError
from ..geometry import minimum_image_frac
from .embeddings import (
    N_LATTICE_INVARIANTS,
    GaussianRadialBasis,
    SinusoidalTimeEmbedding,
    fourier_features,
    joint_fourier_features,
    lattice_invariants,
    periodic_envelope,
    reciprocal_vectors,
)
from .heads import LatticeHead, ScalarMLP, cartesian_to_fractional_gradient, segment_mean

__all__ = ["PeriodicEquivariantNetwork", "fully_connected_edges", "EquivariantRMSNorm", "InteractionBlock",
           "image_edge_geometry", "EDGE_GEOMETRIES"]

#: Length scale (Angstrom) over which the l > 0 harmonics of an edge switch on.
SELF_LOOP_RADIUS = 0.1

#: Choices of ``PeriodicEquivariantNetwork(edge_geometry=...)``.
EDGE_GEOMETRIES = ("envelope", "images")

#: The 8 corner offsets ``b in {0, 1}^3`` of :func:`image_edge_geometry`.
_IMAGE_BITS = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=torch.float64)


def _edge_lengths_and_harmonics(d: Tensor, spherical_harmonics: nn.Module, eps: float) -> tuple[Tensor, Tensor]:
    """Regularised lengths ``sqrt(|d|^2 + eps^2)`` (shape ``d.shape[:-1]``) and the ``l >= 1`` harmonics of
    the unit vectors of Cartesian edge vectors ``d`` (..., 3), multiplied by ``1 - exp(-|d|^2 / r0^2)``
    (``r0 = SELF_LOOP_RADIUS``) so that they vanish smoothly for self-loops and coincident atoms."""
    r2 = (d * d).sum(-1)
    r = torch.sqrt(r2 + eps**2)
    return r, spherical_harmonics(d / r[..., None]) * -torch.expm1(-r2 / SELF_LOOP_RADIUS**2)[..., None]


def image_edge_geometry(dfrac: Tensor, lattice: Tensor, radial: nn.Module, spherical_harmonics: nn.Module,
                        eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Radial basis and spherical harmonics of each edge, averaged over its 8 nearest images.

    For the minimum-image displacement ``dx`` (components in [-1/2, 1/2]) the images
    are ``u = dx - b * sign(dx)``, ``b in {0, 1}^3`` (sign(0) = +1), with weights
    ``w(u) = prod_c cos^2(pi u_c / 2)``.  Per component ``cos^2(pi dx/2) + sin^2(pi dx/2) = 1``,
    so the weights sum to 1; at ``dx_c = +-1/2`` the two images of that component
    swap roles with equal weights 1/2, so every weighted mean is continuous (C^1:
    ``cos^2`` has a double zero at ``u_c = +-1``) and periodic in the fractional
    coordinates, and nothing vanishes where the minimum image switches.  Rotating the
    lattice rotates every image vector, so the harmonics stay equivariant.

    Parameters
    ----------
    dfrac : Tensor, shape (E, 3), minimum-image fractional displacements
    lattice : Tensor, shape (E, 3, 3), each edge's lattice (rows are lattice vectors)
    radial : callable, lengths (M,) -> (M, n_radial)
    spherical_harmonics : callable, vectors (..., 3) -> (..., n_sh), the ``l >= 1`` harmonics
    eps : float, regulariser of ``|d|`` in the unit vector

    Returns
    -------
    radial_mean : Tensor, shape (E, n_radial)
    sh_mean : Tensor, shape (E, n_sh), harmonics masked at ``d = 0`` as for the minimum image
    centre : Tensor, shape (E, 1), the minimum image's weight ``prod_c cos^2(pi dx_c / 2)``
    """
    bits = _IMAGE_BITS.to(device=dfrac.device, dtype=dfrac.dtype)
    sign = torch.where(dfrac >= 0, 1.0, -1.0).to(dfrac.dtype)
    u = dfrac[:, None, :] - bits[None] * sign[:, None, :]  # (E, 8, 3)
    w = torch.cos(0.5 * torch.pi * u).pow(2).prod(-1)  # (E, 8)
    r, sh = _edge_lengths_and_harmonics(torch.einsum("eki,eij->ekj", u, lattice), spherical_harmonics, eps)
    radial_mean = torch.einsum("ek,ekr->er", w, radial(r.reshape(-1)).reshape(*r.shape, -1))
    sh_mean = torch.einsum("ek,eks->es", w, sh)
    return radial_mean, sh_mean, w[:, :1]


def fully_connected_edges(num_atoms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edges ``j -> i`` between all atom pairs of each crystal, self-loops included.

    Parameters
    ----------
    num_atoms : Tensor, shape (B,), long
        Atoms per crystal; atoms are stored crystal after crystal.

    Returns
    -------
    src, dst, edge_crystal : Tensor, shape (E,), long each
        Global index of the sending atom ``j``, the receiving atom ``i`` and
        the crystal of the edge; ``E = sum(num_atoms**2)``.  Edges are sorted
        by crystal, then by ``i``, then by ``j``.

    Examples
    --------
    >>> src, dst, _ = fully_connected_edges(torch.tensor([1, 2]))
    >>> src.tolist(), dst.tolist()
    ([0, 1, 2, 1, 2], [0, 1, 1, 2, 2])
    """
    device = num_atoms.device
    n = num_atoms.long()
    ptr = torch.cumsum(n, 0) - n  # first atom of each crystal
    n_edges = n * n
    total = int(n_edges.sum())
    edge_crystal = torch.repeat_interleave(torch.arange(len(n), device=device), n_edges, output_size=total)
    edge_ptr = torch.cumsum(n_edges, 0) - n_edges
    k = torch.arange(total, device=device) - edge_ptr[edge_crystal]
    n_e = n[edge_crystal]
    offset = ptr[edge_crystal]
    dst = torch.div(k, n_e, rounding_mode="floor") + offset
    src = k % n_e + offset
    return src, dst, edge_crystal


class EquivariantRMSNorm(nn.Module):
    """Equivariant normalisation of e3nn features.

    Scalars (``0e``) get a ``LayerNorm``; every other irrep block ``mul x l``
    is divided by the root mean square of its components over channels and
    scaled by a learnable per-channel factor, which commutes with rotations.

    Parameters
    ----------
    irreps : e3nn.o3.Irreps or str
        Layout of the features, shape ``(M, irreps.dim)``.
    eps : float
        Added to the mean square.
    """

    def __init__(self, irreps, eps: float = 1e-6):
        super().__init__()
        self.irreps = o3.Irreps(irreps)
        self.eps = float(eps)
        norms = []
        for mul, ir in self.irreps:
            if ir.l == 0 and ir.p == 1:
                norms.append(nn.LayerNorm(mul))
            else:
                norms.append(_VectorScale(mul))
        self.norms = nn.ModuleList(norms)
        # plain (start, stop, mul, dim) per block, so that forward touches no e3nn objects
        # (torch.compile cannot guard on Irrep, whose len() raises)
        self._blocks = [(sl.start, sl.stop, int(mul), int(ir.dim)) for (mul, ir), sl in
                        zip(self.irreps, self.irreps.slices())]

    def forward(self, x: Tensor) -> Tensor:
        """``(M, irreps.dim) -> (M, irreps.dim)``."""
        out = []
        for (start, stop, mul, dim), norm in zip(self._blocks, self.norms):
            block = x[:, start:stop]
            if isinstance(norm, nn.LayerNorm):
                out.append(norm(block))
            else:
                block = block.reshape(-1, mul, dim)
                ms = block.pow(2).mean(dim=(1, 2), keepdim=True)
                out.append((norm.weight[None, :, None] * block * torch.rsqrt(ms + self.eps)).reshape(-1, mul * dim))
        return torch.cat(out, dim=-1)


class _VectorScale(nn.Module):
    def __init__(self, mul: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(mul))


def _natural_irreps(lmax: int) -> list[o3.Irrep]:
    """``0e, 1o, 2e, ...`` (the parities of spherical harmonics of a polar vector)."""
    return [o3.Irrep(l, (-1) ** l) for l in range(lmax + 1)]


class InteractionBlock(nn.Module):
    """One gated equivariant message-passing layer (see the module docstring).

    Per edge ``j -> i`` (only cheap elementwise work, no Clebsch-Gordan
    contraction, because the edges dominate the cost of a fully connected
    graph): an MLP of ``[s_i, s_j, edge features]`` gives a scalar message and
    per-channel weights ``w`` for the equivariant message

    ``a_ij[c, l] = w_Y[c, l] env_ij Y_l(d_ij / |d_ij|) + w_V[c, l] (W x_j)[c, l]``,  ``l = 1..lmax``

    (PaiNN-style; ``Y_l`` masked at ``d = 0``).  Messages are averaged over
    the ``n`` incoming edges.  Per node: an e3nn ``uuu`` (channel-wise) tensor product
    (shared weights) between two linear projections of ``[x_i, mean_j m_ij]``
    couples the aggregated directions with each other and with the node's own
    features (bond-angle information), then an ``o3.Linear``, a gate and a
    residual connection.

    Parameters
    ----------
    irreps_in : e3nn.o3.Irreps
        Node features in; must start with the scalar block ``n x 0e``.
    hidden_scalars, hidden_vectors, lmax : int
        Output node features ``hidden_scalars x 0e + hidden_vectors x (1o + 2e + ...)``.
    edge_dim : int
        Size of the invariant edge features.
    lmax_out : int, optional
        Largest degree of the output features (default ``lmax``; the last
        layer only needs ``1`` for the vector head).
    """

    def __init__(self, irreps_in, hidden_scalars: int, hidden_vectors: int, lmax: int, edge_dim: int,
                 lmax_out: int | None = None):
        super().__init__()
        self.irreps_in = o3.Irreps(irreps_in)
        allowed = _natural_irreps(lmax)
        allowed_out = _natural_irreps(lmax if lmax_out is None else min(lmax_out, lmax))
        gated = o3.Irreps([(hidden_vectors, ir) for ir in allowed_out[1:]])
        self.irreps_out = o3.Irreps(f"{hidden_scalars}x0e") + gated
        self.n_scalars_in = self.irreps_in[0].mul
        self.hidden_scalars, self.hidden_vectors, self.lmax = hidden_scalars, hidden_vectors, lmax
        self.norm = EquivariantRMSNorm(self.irreps_in)
        c = hidden_vectors

        # sender features that travel along edges: the l >= 1 irreps present in the input
        self.vec_ls = sorted({ir.l for _, ir in self.irreps_in if ir.l > 0 and ir in allowed})
        self.lin_vec = o3.Linear(self.irreps_in, o3.Irreps([(c, o3.Irrep(l, (-1) ** l)) for l in self.vec_ls]))
        # component slices of l = 1..lmax inside a (.., C, (lmax+1)^2 - 1) message
        if self.vec_ls != list(range(1, len(self.vec_ls) + 1)):
            raise CrystalfitError(
                f"irreps_in {self.irreps_in} carries l = {self.vec_ls}; InteractionBlock needs the l >= 1 irreps "
                "of its input to be 1..k without gaps; add the missing degrees to irreps_in"
            )

        hs = hidden_scalars
        self.n_w = hs + c * lmax + c * len(self.vec_ls)
        self.lin_dst = nn.Linear(self.n_scalars_in, hs)
        self.lin_src = nn.Linear(self.n_scalars_in, hs, bias=False)
        self.lin_edge = nn.Linear(edge_dim, hs, bias=False)
        self.lin_edge_out = nn.Linear(hs, self.n_w)

        irreps_agg = o3.Irreps(f"{hs}x0e") + o3.Irreps([(c, ir) for ir in allowed[1:]])
        irreps_z = self.irreps_in + irreps_agg
        irreps_uv = o3.Irreps([(c, ir) for ir in allowed])
        self.lin_u = o3.Linear(irreps_z, irreps_uv)
        self.lin_v = o3.Linear(irreps_z, irreps_uv)
        tp_out, instructions = [], []
        for i, (mul, ir1) in enumerate(irreps_uv):
            for j, (_, ir2) in enumerate(irreps_uv):
                for ir_out in ir1 * ir2:
                    if ir_out in allowed_out:
                        instructions.append((i, j, len(tp_out), "uuu", True))
                        tp_out.append((mul, ir_out))
        self.tp = o3.TensorProduct(irreps_uv, irreps_uv, o3.Irreps(tp_out), instructions,
                                   shared_weights=True, internal_weights=True)
        n_gates = gated.num_irreps
        self.lin_update = o3.Linear(irreps_z + self.tp.irreps_out, o3.Irreps(f"{hs + n_gates}x0e") + gated)
        self.gate = Gate(f"{hs}x0e", [nn.functional.silu], f"{n_gates}x0e", [torch.sigmoid], gated)
        self.skip = None if self.irreps_in == self.irreps_out else o3.Linear(self.irreps_in, self.irreps_out)

    def _apply(self, fn, *args, **kwargs):
        # e3nn stores its Wigner 3j constants as buffers in the construction dtype; a float32
        # network cast to float64 would keep float32-rounded constants and lose equivariance at
        # the 1e-8 level.  Refill them from the float64 values after every dtype/device move.
        out = super()._apply(fn, *args, **kwargs)
        with torch.no_grad():
            for name, buf in self.tp.named_buffers():
                leaf = name.rsplit(".", 1)[-1]
                if leaf.startswith("_w3j_") and buf.is_floating_point():
                    l1, l2, l3 = (int(v) for v in leaf[len("_w3j_"):].split("_"))
                    buf.copy_(o3.wigner_3j(l1, l2, l3, dtype=torch.float64).to(device=buf.device, dtype=buf.dtype))
        return out

    def forward(self, h: Tensor, src: Tensor, dst: Tensor, edge_feat: Tensor, sh: Tensor,
                envelope: Tensor, inv_degree: Tensor) -> Tensor:
        """Update node features.

        Parameters
        ----------
        h : Tensor, shape (N, irreps_in.dim)
        src, dst : Tensor, shape (E,), long
        edge_feat : Tensor, shape (E, edge_dim)
        sh : Tensor, shape (E, (lmax+1)^2 - 1)
            Spherical harmonics ``l = 1..lmax`` of the unit edge vectors, masked at ``d = 0``.
        envelope : Tensor, shape (E, 1)
        inv_degree : Tensor, shape (N, 1), ``1 / (number of incoming edges)``.

        Returns
        -------
        Tensor, shape (N, irreps_out.dim)
        """
        n, c, hs = h.shape[0], self.hidden_vectors, self.hidden_scalars
        x = self.norm(h)
        xs = x[:, : self.n_scalars_in]
        pre = self.lin_dst(xs).index_select(0, dst) + self.lin_src(xs).index_select(0, src) + self.lin_edge(edge_feat)
        w = self.lin_edge_out(nn.functional.silu(pre))
        m_s = nn.functional.silu(w[:, :hs])
        w_y = (w[:, hs : hs + c * self.lmax] * envelope).reshape(-1, c, self.lmax)
        w_v = w[:, hs + c * self.lmax :].reshape(-1, c, len(self.vec_ls))
        m_v = torch.cat([w_y[:, :, l - 1 : l] * sh[:, None, l * l - 1 : (l + 1) ** 2 - 1]
                         for l in range(1, self.lmax + 1)], dim=-1)  # (E, C, (lmax+1)^2 - 1)
        xv = _e3nn_to_channels(self.lin_vec(x), c, self.vec_ls)  # (N, C, dim of vec_ls)
        xv = xv.index_select(0, src)
        for i, l in enumerate(self.vec_ls):
            m_v[:, :, l * l - 1 : (l + 1) ** 2 - 1] += w_v[:, :, i : i + 1] * xv[:, :, l * l - 1 : (l + 1) ** 2 - 1]
        agg_s = x.new_zeros((n, hs)).index_add_(0, dst, m_s) * inv_degree
        agg_v = x.new_zeros((n, c, m_v.shape[-1])).index_add_(0, dst, m_v) * inv_degree[:, :, None]
        z = torch.cat([x, agg_s, _channels_to_e3nn(agg_v, range(1, self.lmax + 1))], dim=-1)
        tp = self.tp(self.lin_u(z), self.lin_v(z))
        upd = self.gate(self.lin_update(torch.cat([z, tp], dim=-1)))
        skip = h if self.skip is None else self.skip(h)
        return skip + upd


def _e3nn_to_channels(x: Tensor, mul: int, ls) -> Tensor:
    """e3nn layout ``mul x l1 + mul x l2 + ...`` (N, dim) -> (N, mul, sum(2l+1))."""
    out, start = [], 0
    for l in ls:
        d = 2 * l + 1
        out.append(x[:, start : start + mul * d].reshape(-1, mul, d))
        start += mul * d
    return torch.cat(out, dim=-1)


def _channels_to_e3nn(x: Tensor, ls) -> Tensor:
    """(N, mul, sum(2l+1)) -> e3nn layout ``mul x l1 + mul x l2 + ...`` (N, dim)."""
    out, start = [], 0
    for l in ls:
        d = 2 * l + 1
        out.append(x[:, :, start : start + d].reshape(x.shape[0], -1))
        start += d
    return torch.cat(out, dim=-1)


class PeriodicEquivariantNetwork(nn.Module):
    """E(3)-equivariant periodic message-passing backbone with DiffCSP-style heads.

    Parameters
    ----------
    num_species : int
        Atomic numbers ``0..num_species`` are embedded (0 is free, e.g. a mask token).
    hidden_scalars : int
        Scalar (``0e``) channels per atom.
    hidden_vectors : int
        Channels per ``l >= 1`` irrep per atom and of the equivariant messages.
    n_layers : int
        Message-passing layers.
    n_freqs : int
        Fourier frequencies ``k = 1..n_freqs`` of fractional displacements.
    joint_freqs : int
        0 (default): none.  ``K``: also the plane waves ``sin / cos(2 pi G . dx)`` for the integer
        ``G`` in ``{-K..K}^3`` (one of each ``+-G``; :func:`~crystalfit.nn.embeddings.joint_fourier_features`),
        which couple the axes (K = 2: 124 more edge features).
    n_radial : int
        Gaussian radial basis functions on ``[0, r_max]``.
    r_max : float
        Radial basis range and length scale of the lattice features (Angstrom).
    lmax : int
        Largest spherical-harmonic degree (>= 1).
    time_dim : int
        Size of the sinusoidal time embedding (even; 0: no time input).
    cond_dim : int
        Size of the per-crystal condition vector (0: none).
    n_atom_scalars : int
        Invariant per-atom outputs (e.g. species logits).
    n_crystal_scalars : int
        Invariant per-crystal outputs (from mean-pooled scalars).
    lattice_head : bool
        Produce the equivariant ``(B, 3, 3)`` lattice output.
    polar_lattice_head : bool
        Lattice output ``M L + M2 U(L)`` with ``U`` the polar factor
        (:class:`~crystalfit.nn.heads.LatticeHead`); False is DiffCSP's ``M L``.

    Examples
    --------
    >>> from crystalfit.data import CrystalBatch
    >>> import numpy as np
    >>> b = CrystalBatch.from_arrays([np.eye(3) * 4.0], [[[0, 0, 0], [0.5, 0.5, 0.5]]], [[55, 17]],
    ...                              dtype=torch.float32)
    >>> net = PeriodicEquivariantNetwork(hidden_scalars=8, hidden_vectors=4, n_layers=1)
    >>> out = net(b, t=torch.tensor([10]))
    >>> out["frac_vectors"].shape, out["lattice"].shape
    (torch.Size([2, 3]), torch.Size([1, 3, 3]))
    """

    def __init__(self, num_species: int = 100, hidden_scalars: int = 64, hidden_vectors: int = 16,
                 n_layers: int = 3, n_freqs: int = 16, n_radial: int = 16, r_max: float = 8.0, lmax: int = 2,
                 time_dim: int = 64, cond_dim: int = 0, n_atom_scalars: int = 3, n_crystal_scalars: int = 0,
                 lattice_head: bool = True, polar_lattice_head: bool = False, edge_geometry: str = "envelope",
                 joint_freqs: int = 0):
        super().__init__()
        if edge_geometry not in EDGE_GEOMETRIES:
            raise CrystalfitError(f"edge_geometry is {edge_geometry!r}; it must be one of {EDGE_GEOMETRIES}; "
                                  "pass e.g. edge_geometry='images'")
        self.edge_geometry = str(edge_geometry)
        ints = dict(num_species=num_species, hidden_scalars=hidden_scalars, hidden_vectors=hidden_vectors,
                    n_layers=n_layers, lmax=lmax, n_radial=n_radial)
        for name, value in ints.items():
            if int(value) != value or value < 1:
                raise CrystalfitError(f"{name} is {value!r}; it must be an integer >= 1; pass e.g. {name}=2")
        nonneg = dict(n_freqs=n_freqs, joint_freqs=joint_freqs, time_dim=time_dim, cond_dim=cond_dim,
                      n_atom_scalars=n_atom_scalars, n_crystal_scalars=n_crystal_scalars)
        for name, value in nonneg.items():
            if int(value) != value or value < 0:
                raise CrystalfitError(f"{name} is {value!r}; it must be an integer >= 0; pass e.g. {name}=0")
        self.num_species, self.hidden_scalars, self.hidden_vectors = int(num_species), int(hidden_scalars), int(hidden_vectors)
        self.n_layers, self.n_freqs, self.n_radial, self.r_max = int(n_layers), int(n_freqs), int(n_radial), float(r_max)
        self.joint_freqs = int(joint_freqs)
        self.register_buffer("joint_vectors", reciprocal_vectors(self.joint_freqs).double()
                             if self.joint_freqs else torch.zeros(0, 3, dtype=torch.float64), persistent=False)
        self.lmax, self.time_dim, self.cond_dim = int(lmax), int(time_dim), int(cond_dim)
        self.n_atom_scalars, self.n_crystal_scalars, self.lattice_head = int(n_atom_scalars), int(n_crystal_scalars), bool(lattice_head)

        hs = self.hidden_scalars
        self.species_embedding = nn.Embedding(self.num_species + 1, hs)
        self.time_embedding = SinusoidalTimeEmbedding(self.time_dim) if self.time_dim else None
        self.radial = GaussianRadialBasis(self.n_radial, self.r_max)
        self.input_mlp = ScalarMLP(hs + self.time_dim + self.cond_dim + N_LATTICE_INVARIANTS, hs, hs)
        edge_dim = 6 * self.n_freqs + 2 * len(self.joint_vectors) + self.n_radial + 1
        irreps = o3.Irreps(f"{hs}x0e + 3x1o")
        blocks = []
        for layer in range(self.n_layers):
            lmax_out = 1 if layer == self.n_layers - 1 else self.lmax
            block = InteractionBlock(irreps, hs, self.hidden_vectors, self.lmax, edge_dim, lmax_out)
            blocks.append(block)
            irreps = block.irreps_out
        self.blocks = nn.ModuleList(blocks)
        self.irreps_hidden = irreps
        self.norm_out = EquivariantRMSNorm(irreps)
        self.vector_head = o3.Linear(irreps, o3.Irreps("1x1o"))
        self.atom_head = ScalarMLP(hs, hs, self.n_atom_scalars)
        self.crystal_head = ScalarMLP(hs, hs, self.n_crystal_scalars)
        self.polar_lattice_head = bool(polar_lattice_head)
        self.lattice_out = LatticeHead(hs, polar=self.polar_lattice_head) if self.lattice_head else None
        self.sh_eps = 1e-6
        self.spherical_harmonics = o3.SphericalHarmonics(list(range(1, self.lmax + 1)), normalize=False,
                                                         normalization="component")

    @property
    def n_parameters(self) -> int:
        """Number of trainable scalars."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self, lattice, frac, numbers, num_atoms, t, cond, type_probs):
        b, n = num_atoms.shape[0], frac.shape[0]
        if lattice.shape != (b, 3, 3) or frac.shape != (n, 3) or numbers.shape != (n,):
            raise ShapeError(
                f"batch has lattice {tuple(lattice.shape)}, frac {tuple(frac.shape)}, numbers {tuple(numbers.shape)}, "
                f"num_atoms {tuple(num_atoms.shape)}; expected (B, 3, 3), (N, 3), (N,), (B,); build it with "
                "crystalfit.io.structures_to_batch or CrystalBatch.from_arrays"
            )
        param = self.species_embedding.weight
        if frac.dtype != param.dtype or lattice.dtype != param.dtype:
            raise CrystalfitError(
                f"batch dtype {frac.dtype} differs from the network dtype {param.dtype}; "
                f"call network.to({frac.dtype}) or batch.to(dtype={param.dtype})"
            )
        if type_probs is None and n and (int(numbers.min()) < 0 or int(numbers.max()) > self.num_species):
            raise UnknownElementError(
                f"atomic numbers range {int(numbers.min())}..{int(numbers.max())}; this network embeds "
                f"0..num_species={self.num_species}; build it with a larger num_species"
            )
        if type_probs is not None and type_probs.shape != (n, self.num_species + 1):
            raise ShapeError(
                f"type_probs has shape {tuple(type_probs.shape)}, expected (N, num_species + 1) = "
                f"({n}, {self.num_species + 1}); pass one weight per atomic number 0..num_species per atom"
            )
        if t is not None and t.dim() == 1 and t.shape[0] != b:
            raise ShapeError(f"t has shape {tuple(t.shape)}, expected ({b},) = (num_crystals,) or a scalar; "
                             "pass one time per crystal")
        if t is not None and t.dim() > 1:
            raise ShapeError(f"t has shape {tuple(t.shape)}, expected ({b},) or a scalar; pass one time per crystal")
        if cond is not None and (self.cond_dim == 0 or cond.shape != (b, self.cond_dim)):
            raise ShapeError(
                f"cond has shape {tuple(cond.shape)}, expected ({b}, cond_dim={self.cond_dim}); "
                + ("this network takes no condition: build it with cond_dim > 0" if self.cond_dim == 0
                   else "pass one condition vector per crystal")
            )

    def _node_inputs(self, lattice, numbers, node_batch, t, cond, type_probs):
        b = lattice.shape[0]
        if type_probs is None:
            species = self.species_embedding(numbers)
        else:
            species = type_probs.to(lattice.dtype) @ self.species_embedding.weight
        crystal = [lattice_invariants(lattice, self.r_max)]
        if self.time_embedding is not None:
            if t is None:
                crystal.append(lattice.new_zeros((b, self.time_dim)))
            else:
                t = torch.as_tensor(t, device=lattice.device)
                t = t.expand(b) if t.dim() == 0 else t
                crystal.append(self.time_embedding(t.to(lattice.dtype)))
        if self.cond_dim:
            crystal.append(lattice.new_zeros((b, self.cond_dim)) if cond is None else cond.to(lattice.dtype))
        crystal = torch.cat(crystal, dim=-1)
        scalars = self.input_mlp(torch.cat([species, crystal[node_batch]], dim=-1))
        vectors = (lattice / self.r_max)[node_batch].reshape(-1, 9)
        return torch.cat([scalars, vectors], dim=-1)

    def _periodic_features(self, dfrac: Tensor) -> Tensor:
        """Per-axis Fourier features, plus the plane waves of ``joint_freqs`` when set."""
        if not self.joint_freqs:
            return fourier_features(dfrac, self.n_freqs)
        return torch.cat([fourier_features(dfrac, self.n_freqs), joint_fourier_features(dfrac, self.joint_vectors)],
                         dim=-1)

    # ----------------------------------------------------------------- forward
    def forward(self, batch, t: Tensor | None = None, cond: Tensor | None = None,
                type_probs: Tensor | None = None, lattice_basis: Tensor | None = None) -> dict[str, Tensor]:
        """Run the network.

        Parameters
        ----------
        batch : CrystalBatch-like
            Needs ``lattice`` (B, 3, 3) Angstrom, ``frac`` (N, 3), ``numbers`` (N,)
            long, ``num_atoms`` (B,) long; ``batch`` (N,) is rebuilt if absent.
            ``frac`` need not be wrapped.
        t : Tensor, shape (B,) or scalar, optional
            Diffusion time; None gives a zero embedding.  The embedding's
            frequencies suit DiffCSP's integer steps 1..1000: scale a
            continuous ``t`` in [0, 1] by ~1000.
        cond : Tensor, shape (B, cond_dim), optional
            Per-crystal condition; None gives zeros (the null condition).
        type_probs : Tensor, shape (N, num_species + 1), optional
            Soft species weights over ``Z = 0..num_species``; replaces the
            embedding lookup of ``numbers`` by ``type_probs @ embedding``.
        lattice_basis : Tensor, shape (B, 3, 3), optional
            The lattice output is ``M @ lattice_basis`` instead of ``M @ batch.lattice``
            (equivariant as long as both rotate together); used when the geometry
            comes from a lattice estimate but the output refers to another lattice.

        Returns
        -------
        dict of Tensor
            ``atom_vectors`` (N, 3) Cartesian, equivariant;
            ``frac_vectors`` (N, 3) ``= atom_vectors @ L^T``
            (:func:`~crystalfit.nn.heads.cartesian_to_fractional_gradient`), invariant;
            its size grows like ``|L|^2 |atom_vectors|`` (the network sees ``L``
            and learns the scale; divide by a typical ``|L|^2`` if needed);
            ``atom_scalars`` (N, n_atom_scalars), invariant;
            ``crystal_scalars`` (B, n_crystal_scalars), invariant;
            ``lattice`` (B, 3, 3) ``= M L`` (only if ``lattice_head``; ``L`` is
            ``lattice_basis`` when given), equivariant.
        """
        lattice, frac, numbers, num_atoms = batch.lattice, batch.frac, batch.numbers, batch.num_atoms
        node_batch = getattr(batch, "batch", None)
        if node_batch is None:
            node_batch = torch.repeat_interleave(torch.arange(len(num_atoms), device=frac.device), num_atoms)
        self._check_inputs(lattice, frac, numbers, num_atoms, t if t is None else torch.as_tensor(t), cond, type_probs)
        b = num_atoms.shape[0]

        src, dst, edge_crystal = fully_connected_edges(num_atoms)
        dfrac = minimum_image_frac(frac.index_select(0, src) - frac.index_select(0, dst))
        if self.edge_geometry == "images":
            radial, sh, centre = image_edge_geometry(dfrac, lattice.index_select(0, edge_crystal), self.radial,
                                                     self.spherical_harmonics, self.sh_eps)
            envelope = torch.ones_like(centre)
            edge_feat = torch.cat([self._periodic_features(dfrac), radial, centre], dim=-1)
        else:
            d = torch.einsum("ei,eij->ej", dfrac, lattice.index_select(0, edge_crystal))
            r, sh = _edge_lengths_and_harmonics(d, self.spherical_harmonics, self.sh_eps)
            envelope = periodic_envelope(dfrac)
            edge_feat = torch.cat([self._periodic_features(dfrac), self.radial(r) * envelope, envelope], dim=-1)
        inv_degree = (1.0 / num_atoms.clamp_min(1).to(frac.dtype))[node_batch][:, None]

        h = self._node_inputs(lattice, numbers, node_batch, t, cond, type_probs)
        for block in self.blocks:
            h = block(h, src, dst, edge_feat, sh, envelope, inv_degree)
        x = self.norm_out(h)
        scalars = x[:, : self.hidden_scalars]
        atom_vectors = self.vector_head(x)
        pooled = segment_mean(scalars, node_batch, b)
        out = {
            "atom_vectors": atom_vectors,
            "frac_vectors": cartesian_to_fractional_gradient(atom_vectors, lattice, node_batch),
            "atom_scalars": self.atom_head(scalars),
            "crystal_scalars": self.crystal_head(pooled),
        }
        if self.lattice_out is not None:
            basis = lattice if lattice_basis is None else lattice_basis
            if basis.shape != lattice.shape:
                raise ShapeError(f"lattice_basis has shape {tuple(basis.shape)}, expected {tuple(lattice.shape)} "
                                 "= one (3, 3) lattice per crystal")
            out["lattice"] = self.lattice_out(pooled, basis)
        return out
