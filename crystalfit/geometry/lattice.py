"""Lattice parameters, fractional/Cartesian conversion and wrapping (torch)."""
from __future__ import annotations



import torch
from torch import Tensor

from ..exceptions import ShapeError


def wrap_frac(frac: Tensor) -> Tensor:
    """Wrap fractional coordinates into ``[0, 1)``.

    ``x - floor(x)`` can round to exactly 1.0 for tiny negative ``x`` in
    floating point; those entries are mapped to 0.0 so the result is always
    in the half-open interval.

    Parameters
    ----------
    frac : Tensor, shape (..., 3)

    Returns
    -------
    Tensor, same shape, values in [0, 1).
    """
    out = frac - torch.floor(frac)
    return torch.where(out >= 1.0, out - 1.0, out)


def minimum_image_frac(dfrac: Tensor) -> Tensor:
    """Map fractional displacements into ``[-0.5, 0.5)`` (per component)."""
    return dfrac - torch.floor(dfrac + 0.5)


def lattice_params_to_matrix(lengths: Tensor, angles: Tensor) -> Tensor:
    """Lattice matrix from lengths (Angstrom) and angles (degrees).

    Uses the CDVAE / DiffCSP convention: c along z, a in the xz-plane.

    Parameters
    ----------
    lengths : Tensor, shape (B, 3)
    angles : Tensor, shape (B, 3), alpha, beta, gamma in degrees.

    Returns
    -------
    Tensor, shape (B, 3, 3), rows are a, b, c.
    """
    a, b, c = lengths.unbind(-1)
    al, be, ga = torch.deg2rad(angles).unbind(-1)
    cos_al, cos_be, cos_ga = torch.cos(al), torch.cos(be), torch.cos(ga)
    sin_al, sin_be = torch.sin(al), torch.sin(be)
    val = (cos_al * cos_be - cos_ga) / (sin_al * sin_be)
    val = torch.clamp(val, -1.0, 1.0)
    gamma_star = torch.arccos(val)
    zeros = torch.zeros_like(a)
    va = torch.stack([a * sin_be, zeros, a * cos_be], dim=-1)
    vb = torch.stack(
        [-b * sin_al * torch.cos(gamma_star), b * sin_al * torch.sin(gamma_star), b * cos_al],
        dim=-1,
    )
    vc = torch.stack([zeros, zeros, c], dim=-1)
    return torch.stack([va, vb, vc], dim=-2)


def lattice_matrix_to_params(lattice: Tensor) -> tuple[Tensor, Tensor]:
    """Lengths (Angstrom) and angles (degrees) of lattice matrices ``(B, 3, 3)``."""
    lengths = lattice.norm(dim=-1)
    a, b, c = lattice.unbind(-2)
    la, lb, lc = lengths.unbind(-1)

    def angle(u, v, nu, nv):
        cos = (u * v).sum(-1) / (nu * nv)
        return torch.rad2deg(torch.arccos(torch.clamp(cos, -1.0, 1.0)))

    angles = torch.stack([angle(b, c, lb, lc), angle(a, c, la, lc), angle(a, b, la, lb)], dim=-1)
    return lengths, angles


def metric_tensor(lattice: Tensor) -> Tensor:
    """``L L^T`` (B, 3, 3): the O(3)-invariant metric of the cell (Angstrom^2)."""
    return lattice @ lattice.transpose(-1, -2)


def reciprocal_lattice(lattice: Tensor) -> Tensor:
    """Reciprocal vectors without the 2 pi factor, as rows: ``inv(L)^T``.

    ``G = h a* + k b* + l c*`` is then ``hkl @ reciprocal_lattice(L)``.
    """
    return torch.linalg.inv(lattice).transpose(-1, -2)


def frac_to_cart(frac: Tensor, lattice: Tensor, batch: Tensor | None = None) -> Tensor:
    """Cartesian positions (Angstrom) of fractional coordinates.

    Parameters
    ----------
    frac : Tensor, shape (N, 3)
    lattice : Tensor, shape (B, 3, 3) (or (3, 3) when ``batch`` is None)
    batch : Tensor, shape (N,), long, crystal index of each atom.
    """
    if batch is None:
        return frac @ lattice
    return torch.einsum("ni,nij->nj", frac, lattice[batch])


def cart_to_frac(cart: Tensor, lattice: Tensor, batch: Tensor | None = None) -> Tensor:
    """Fractional coordinates of Cartesian positions (inverse of :func:`frac_to_cart`)."""
    inv = torch.linalg.inv(lattice)
    if batch is None:
        return cart @ inv
    return torch.einsum("ni,nij->nj", cart, inv[batch])


def polar_factor(lattice: Tensor, n_iter: int = 12) -> Tensor:
    r"""Orthogonal factor ``U`` of the polar decomposition ``L = P U`` (``P = (L L^T)^{1/2}``).

    ``U = (L L^T)^{-1/2} L`` is the orthogonal matrix nearest to ``L``; it rotates with
    the lattice (``L R -> U R``) and has ``det U = sign(det L)``.  Computed by the scaled
    Newton iteration ``U <- (g U + U^{-T}/g) / 2`` (Higham 1986), which is smooth and
    differentiable also for repeated singular values (a cubic cell), where SVD or eigh
    backward passes are undefined.

    Parameters
    ----------
    lattice : Tensor, shape (..., 3, 3)
        Non-singular for a unique answer.  Matrices whose iteration fails in their own
        precision (condition numbers beyond ~1e6 in float32) are redone in float64; an
        exactly singular one, whose polar factor is not unique, gets the identity.
    n_iter : int
        Newton steps; quadratic convergence, 12 reach float64 precision for condition
        numbers up to ~1e6.

    Returns
    -------
    Tensor, shape (..., 3, 3)
    """
    if lattice.shape[-2:] != (3, 3):
        raise ShapeError(f"lattice has shape {tuple(lattice.shape)}, expected (..., 3, 3) with rows a, b, c")
    if lattice.dim() == 2:
        return polar_factor(lattice[None], n_iter)[0]
    u, failed = _polar_newton(lattice, n_iter)
    if not bool(failed.any()):
        return u
    # (nearly) singular in this precision, e.g. a pure-noise lattice of the diffusion prior in float32:
    # redo those in float64; an exactly singular one (no unique polar factor) gets the identity.  The
    # failed matrices are replaced by the identity (a fixed point of the iteration) before the passes
    # that carry gradients, so no inf or NaN of a failed iteration reaches the backward pass.
    idx = failed.nonzero(as_tuple=True)
    bad = lattice[idx].double()
    with torch.no_grad():
        _, failed64 = _polar_newton(bad, n_iter)
    u64, _ = _polar_newton(_identity_where(failed64, bad), n_iter)
    u, _ = _polar_newton(_identity_where(failed, lattice), n_iter)
    u = u.clone()
    u[idx] = u64.to(u.dtype)
    return u


def _identity_where(mask: Tensor, matrices: Tensor) -> Tensor:
    eye = torch.eye(3, dtype=matrices.dtype, device=matrices.device).expand_as(matrices)
    return torch.where(mask[..., None, None], eye, matrices)


def _polar_newton(u: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """Scaled Newton iteration of :func:`polar_factor`; also a mask of the matrices whose inversion
    failed or whose iterate is not finite."""
    failed = torch.zeros(u.shape[:-2], dtype=torch.bool, device=u.device)
    for _ in range(n_iter):
        inv, info = torch.linalg.inv_ex(u)
        inv_t = inv.transpose(-1, -2)
        g = torch.sqrt(torch.linalg.matrix_norm(inv_t) / torch.linalg.matrix_norm(u))[..., None, None]
        u = 0.5 * (g * u + inv_t / g)
        failed = failed | (info != 0)
    return u, failed | ~torch.isfinite(u).flatten(-2).all(-1)


def signed_permutations(dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The 48 signed permutation matrices (the cube's point group O_h), shape (48, 3, 3).

    Entry 0 is the identity; the rest follow in a fixed order (permutations of the axes in
    ``itertools.permutations`` order, each with the 8 sign patterns of its rows).
    """
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=dtype, device=device)
            m[torch.arange(3), torch.tensor(perm)] = torch.tensor(signs, dtype=dtype, device=device)
            out.append(m)
    return torch.stack(out)


def relabel_basis(lattice: Tensor, frac: Tensor, ops: Tensor, batch: Tensor) -> tuple[Tensor, Tensor]:
    """The same crystals described in another basis, with the Cartesian frame turned along.

    With a signed permutation (or any orthogonal, integer) matrix ``P`` per crystal, the new
    basis vectors are ``P L P^T`` (rows): the old vectors relabelled and re-signed by ``P``
    (``P L``) and the whole crystal turned by the orthogonal ``P`` (``... P^T``), so
    ``det`` (the handedness of the cell) is kept.  Fractional coordinates become
    ``frac P^T`` wrapped into [0, 1), so Cartesian positions are ``x P^T``: every distance and
    angle of the crystal is unchanged.  A network invariant under O(3) but not under the
    choice of basis sees a new input; a training run that draws ``P`` at random teaches it
    that the basis carries no information.

    Parameters
    ----------
    lattice : Tensor, shape (B, 3, 3), vectors as rows
    frac : Tensor, shape (N, 3)
    ops : Tensor, shape (B, 3, 3), orthogonal integer matrices (e.g. rows of
        :func:`signed_permutations`)
    batch : Tensor, shape (N,), long, crystal index of each atom

    Returns
    -------
    lattice, frac : Tensors of the input shapes
    """
    if ops.shape != lattice.shape:
        raise ShapeError(f"ops must have the lattice's shape {tuple(lattice.shape)}, got {tuple(ops.shape)}")
    ops = ops.to(lattice.dtype)
    new_lattice = ops @ lattice @ ops.transpose(-1, -2)
    new_frac = torch.einsum("ni,nji->nj", frac, ops[batch])
    return new_lattice, wrap_frac(new_frac)


def reduce_lattice(lattice: Tensor, max_sweeps: int = 100) -> tuple[Tensor, Tensor]:
    """Pairwise size-reduced basis of the same lattices (batched Lagrange reduction).

    Repeats ``b_i <- b_i - round(b_i.b_j / b_j.b_j) b_j`` over all ordered pairs of
    the three vectors until no vector changes (at most ``max_sweeps`` sweeps).  The
    result spans the same lattice and is short and close to orthogonal, so that
    a search over the 27 neighbouring images finds periodic minimum distances.

    Parameters
    ----------
    lattice : Tensor, shape (B, 3, 3), vectors as rows
    max_sweeps : int

    Returns
    -------
    reduced : Tensor, shape (B, 3, 3)
        ``U @ lattice``.
    U : Tensor, shape (B, 3, 3), integer-valued (dtype of ``lattice``), ``|det U| = 1``
        Fractional coordinates in the reduced basis are ``frac @ inverse(U)``.

    Examples
    --------
    >>> L = torch.tensor([[[1.0, 0, 0], [5.0, 1, 0], [0, 0, 1]]])
    >>> reduce_lattice(L)[0][0].tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    """
    if lattice.dim() != 3 or lattice.shape[1:] != (3, 3):
        raise ShapeError(f"lattice has shape {tuple(lattice.shape)}, expected (B, 3, 3)")
    red = lattice.clone()
    U = torch.eye(3, dtype=lattice.dtype, device=lattice.device).expand_as(lattice).clone()
    pairs = [(i, j) for i in range(3) for j in range(3) if i != j]
    for _ in range(int(max_sweeps)):
        changed = False
        for i, j in pairs:
            bj = red[:, j]
            nj = (bj * bj).sum(-1)
            mu = torch.round((red[:, i] * bj).sum(-1) / torch.where(nj > 0, nj, torch.ones_like(nj)))
            mu = torch.where((nj > 0) & torch.isfinite(mu), mu, torch.zeros_like(mu))  # degenerate cells: left as is
            if bool((mu != 0).any()):
                changed = True
                red[:, i] = red[:, i] - mu[:, None] * bj
                U[:, i] = U[:, i] - mu[:, None] * U[:, j]
        if not changed:
            break
    return red, U


def min_pair_distance(frac: Tensor, lattice: Tensor, batch: Tensor, num_crystals: int | None = None,
                      chunk_elements: int = 2**23) -> Tensor:
    """Shortest periodic distance between two distinct atoms of each crystal (Angstrom).

    The cell is first reduced (:func:`reduce_lattice`); then for every pair ``i != j``
    of a crystal the fractional difference is reduced to the minimum image and the 27
    neighbouring images of it are searched.  Distances between an atom and its own
    images are not counted (as in pymatgen's ``distance_matrix``).

    Parameters
    ----------
    frac : Tensor, shape (N, 3)
    lattice : Tensor, shape (B, 3, 3), lattice vectors as rows
    batch : Tensor, shape (N,), long, crystal of each atom (atoms stored crystal after crystal)
    num_crystals : int, optional
        ``B`` (default ``lattice.shape[0]``).
    chunk_elements : int
        Bound on the size of the work array (crystals are processed in chunks; 2**23
        elements are 64 MiB in float64).

    Returns
    -------
    Tensor, shape (B,)
        ``inf`` for a crystal with fewer than two atoms.

    Examples
    --------
    >>> frac = torch.tensor([[0.0, 0, 0], [0.5, 0.5, 0.5], [0.0, 0, 0]])
    >>> lat = torch.stack([4.0 * torch.eye(3), 3.0 * torch.eye(3)])
    >>> min_pair_distance(frac, lat, torch.tensor([0, 0, 1])).tolist()  # sqrt(3) * 2, and one atom
    [3.464101552963257, inf]
    """
    B = lattice.shape[0] if num_crystals is None else int(num_crystals)
    if frac.dim() != 2 or frac.shape[1] != 3 or batch.shape != frac.shape[:1]:
        raise ShapeError(f"frac {tuple(frac.shape)} and batch {tuple(batch.shape)} must be (N, 3) and (N,)")
    if lattice.shape != (B, 3, 3):
        raise ShapeError(f"lattice has shape {tuple(lattice.shape)}, expected ({B}, 3, 3): one cell per crystal")
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= B):
        raise ShapeError(f"batch has values in [{int(batch.min())}, {int(batch.max())}], expected crystal indices "
                         f"in [0, {B - 1}]")
    out = torch.full((B,), float("inf"), dtype=frac.dtype, device=frac.device)
    if frac.shape[0] == 0:
        return out
    counts = torch.bincount(batch, minlength=B)
    n_max = int(counts.max())
    if n_max < 2:
        return out
    ptr = torch.cumsum(counts, 0) - counts
    slot = torch.arange(frac.shape[0], device=frac.device) - ptr[batch]
    lattice, U = reduce_lattice(lattice.to(frac.dtype))
    frac = torch.einsum("ni,nij->nj", frac, torch.linalg.inv(U)[batch])
    pad = frac.new_zeros((B, n_max, 3))
    mask = torch.zeros((B, n_max), dtype=torch.bool, device=frac.device)
    pad[batch, slot] = frac
    mask[batch, slot] = True
    r = torch.arange(-1, 2, dtype=frac.dtype, device=frac.device)
    shifts = torch.cartesian_prod(r, r, r)  # (27, 3)
    # crystals in chunks: the work array is (chunk, n, n, 27, 3)
    step = max(1, int(chunk_elements) // (n_max * n_max * 27 * 3))
    dist = []
    for lo in range(0, B, step):
        p = pad[lo:lo + step]
        d = minimum_image_frac(p[:, None, :, :] - p[:, :, None, :])  # (b, n, n, 3)
        cart = torch.einsum("bijsk,bkl->bijsl", d[:, :, :, None, :] + shifts, lattice[lo:lo + step])
        dist.append(cart.norm(dim=-1).amin(-1))  # (b, n, n)
    dist = torch.cat(dist)
    pair = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n_max, dtype=torch.bool, device=frac.device)
    return torch.where(pair, dist, torch.full_like(dist, float("inf"))).flatten(1).amin(-1)
