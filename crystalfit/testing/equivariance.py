"""Shipped symmetry checks for models of periodic crystals.

A *model* is any callable ``model(batch, **kwargs)`` that maps a
:class:`~crystalfit.data.CrystalBatch` to a tensor, a tuple of tensors or a
dict of tensors.  Each output's leading dimension must be the number of atoms
``N`` (a per-atom output) or of crystals ``B`` (a per-crystal output).  How an
output transforms under ``L -> L R`` (rows of ``L`` are lattice vectors, ``R``
orthogonal) is given by ``transforms`` (key -> kind):

==============  ==============================================================
kind            meaning under ``L -> L R`` (``R`` per crystal)
==============  ==============================================================
``"invariant"`` unchanged (the default for every key not listed)
``"vector"``    per-atom Cartesian vectors ``(N, 3)``: ``v -> v R``
``"lattice"``   per-crystal ``(B, 3, 3)`` lattice-like: ``X -> X R``
==============  ==============================================================

The defaults (:data:`DEFAULT_TRANSFORMS`) match
:class:`crystalfit.nn.PeriodicEquivariantNetwork`: ``atom_vectors`` is a
vector, ``lattice`` is lattice-like, ``frac_vectors``, ``atom_scalars`` and
``crystal_scalars`` are invariant.  Tensor outputs are named ``"output"``,
tuple outputs ``"output0"``, ``"output1"``, ...

Every check returns ``None`` or raises :class:`AssertionError` naming the
check, the output key and the largest deviation.  A deviation passes when
``max|got - expected| <= tol * max(1, max|expected|)`` with ``tol = atol`` or the
dtype default (:data:`DEFAULT_TOLERANCES`: 1e-4 for float32, 1e-9 for
float64).  An ``nn.Module`` model is deep-copied, cast to ``dtype`` and put in
eval mode (the caller's model is never modified); other callables must accept
a batch of ``dtype`` themselves.

Examples
--------
>>> from ase.build import bulk
>>> from crystalfit.io import structures_to_batch
>>> from crystalfit.nn import PeriodicEquivariantNetwork
>>> net = PeriodicEquivariantNetwork(hidden_scalars=8, hidden_vectors=4, n_layers=1)
>>> atoms = bulk("NaCl", "rocksalt", a=5.6); atoms.rattle(0.1, seed=1)
>>> check_all(net, structures_to_batch([atoms, bulk("Cu")]))
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..exceptions import CrystalfitError
from ..geometry import wrap_frac

__all__ = [
    "DEFAULT_TRANSFORMS",
    "DEFAULT_TOLERANCES",
    "random_orthogonal",
    "check_rotation_equivariance",
    "check_permutation_equivariance",
    "check_translation_invariance",
    "check_integer_shift_invariance",
    "check_batch_independence",
    "check_all",
]

#: How the outputs of :class:`crystalfit.nn.PeriodicEquivariantNetwork` transform.
DEFAULT_TRANSFORMS: dict[str, str] = {"atom_vectors": "vector", "lattice": "lattice"}
#: Relative tolerance per dtype (see the module docstring).
DEFAULT_TOLERANCES: dict[torch.dtype, float] = {
    torch.float16: 1e-2,
    torch.bfloat16: 3e-2,
    torch.float32: 1e-4,
    torch.float64: 1e-9,
}
_KINDS = ("invariant", "vector", "lattice")
_PER_CRYSTAL_KEYS = ("lattice", "crystal_scalars")


# --------------------------------------------------------------------- helpers
def random_orthogonal(n: int, generator: torch.Generator, reflection: bool = True) -> Tensor:
    """``n`` Haar-random orthogonal 3x3 matrices (float64, CPU).

    Parameters
    ----------
    n : int
    generator : torch.Generator
    reflection : bool
        If True the first matrix has determinant -1 and the others a random
        sign; if False all are proper rotations.

    Returns
    -------
    Tensor, shape (n, 3, 3)
    """
    a = torch.randn((n, 3, 3), generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(q)
    if reflection:
        want = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
        want[0] = -1.0
    else:
        want = torch.ones(n, dtype=torch.float64)
    flip = torch.where(det * want < 0, -1.0, 1.0)
    return q * torch.stack([flip, torch.ones_like(flip), torch.ones_like(flip)], dim=-1)[:, None, :]


def _tolerance(dtype: torch.dtype, atol: float | None) -> float:
    if atol is not None:
        return float(atol)
    return DEFAULT_TOLERANCES.get(dtype, 1e-4)


def _replace(batch, **changes):
    if hasattr(batch, "replace"):
        return batch.replace(**changes)
    return dataclasses.replace(batch, **changes)


def _prepare(model, batch, dtype):
    if dtype is not None:
        batch = batch.to(dtype=dtype)
        if isinstance(model, torch.nn.Module):
            model = copy.deepcopy(model).to(dtype)
    if isinstance(model, torch.nn.Module):
        model = model.eval() if dtype is not None else copy.deepcopy(model).eval()
    return model, batch


def _as_dict(out: Any) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        return {"output": out}
    if isinstance(out, Mapping):
        return {str(k): v for k, v in out.items() if isinstance(v, Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output{i}": v for i, v in enumerate(out) if isinstance(v, Tensor)}
    raise CrystalfitError(
        f"model returned {type(out).__name__}; the equivariance checks need a Tensor, a tuple of Tensors "
        "or a dict of Tensors; wrap the model so that it returns one of these"
    )


def _call(model, batch, crystal_kwargs, atom_kwargs) -> dict[str, Tensor]:
    kwargs = dict(crystal_kwargs or {})
    kwargs.update(atom_kwargs or {})
    with torch.no_grad():
        out = _as_dict(model(batch, **kwargs))
    n, b = batch.frac.shape[0], batch.num_atoms.shape[0]
    for key, value in out.items():
        if value.dim() == 0 or value.shape[0] not in (n, b):
            raise CrystalfitError(
                f"output {key!r} has shape {tuple(value.shape)}; the equivariance checks need a leading "
                f"dimension of N={n} atoms or B={b} crystals; drop or reshape that output in a wrapper"
            )
    return out


def _level(key: str, value: Tensor, n: int, b: int, kind: str) -> str:
    if n != b:
        return "atom" if value.shape[0] == n else "crystal"
    return "crystal" if kind == "lattice" or key in _PER_CRYSTAL_KEYS else "atom"


def _kind(key: str, transforms: Mapping[str, str] | None) -> str:
    table = DEFAULT_TRANSFORMS if transforms is None else transforms
    kind = table.get(key, "invariant")
    if kind not in _KINDS:
        raise CrystalfitError(
            f"transforms[{key!r}] is {kind!r}; allowed kinds are {_KINDS}; "
            "use 'vector' for (N, 3) Cartesian vectors and 'lattice' for (B, 3, 3) outputs"
        )
    return kind


def _compare(check: str, key: str, got: Tensor, expected: Tensor, tol: float) -> None:
    if got.shape != expected.shape:
        raise AssertionError(f"{check}: output {key!r} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    if not torch.isfinite(expected).all() or not torch.isfinite(got).all():
        raise AssertionError(f"{check}: output {key!r} contains NaN or inf")
    if got.numel() == 0:
        return
    dev = float((got - expected).abs().max())
    scale = max(1.0, float(expected.abs().max()))
    if dev > tol * scale:
        raise AssertionError(
            f"{check}: output {key!r} deviates by max {dev:.3e} (allowed {tol * scale:.3e} = "
            f"{tol:g} x max(1, max|expected| = {scale:.3g}), dtype {expected.dtype})"
        )


def _check_outputs(check: str, ref: dict, new: dict, expected_fn: Callable, tol: float) -> None:
    if set(ref) != set(new):
        raise AssertionError(f"{check}: output keys changed from {sorted(ref)} to {sorted(new)}")
    failures = []
    for key in ref:
        try:
            _compare(check, key, new[key], expected_fn(key, ref[key]), tol)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("; ".join(failures))


# ---------------------------------------------------------------------- checks
def check_rotation_equivariance(model, batch, dtype: torch.dtype | None = torch.float64, atol: float | None = None,
                                seed: int = 0, transforms: Mapping[str, str] | None = None,
                                crystal_kwargs: Mapping[str, Tensor] | None = None,
                                atom_kwargs: Mapping[str, Tensor] | None = None, reflection: bool = True) -> None:
    """Check ``L -> L R_b`` (a random orthogonal ``R_b`` per crystal, the first one a reflection).

    ``"vector"`` outputs must become ``v R_b``, ``"lattice"`` outputs ``X R_b``,
    everything else (fractional outputs, scalars) must not change.

    Parameters
    ----------
    model : callable
        ``model(batch, **crystal_kwargs, **atom_kwargs)`` -> Tensor, tuple or dict of Tensors.
    batch : CrystalBatch
    dtype : torch.dtype or None
        Run in this dtype (None: the batch's dtype, model untouched).
    atol : float, optional
        Relative tolerance; default from :data:`DEFAULT_TOLERANCES`.
    seed : int
        Seed of the random transformation.
    transforms : mapping, optional
        Output key -> ``"invariant" | "vector" | "lattice"``; default :data:`DEFAULT_TRANSFORMS`.
    crystal_kwargs, atom_kwargs : mapping of str to Tensor, optional
        Extra keyword inputs with leading dimension B (e.g. ``t``, ``cond``)
        or N (e.g. ``type_probs``); they must be invariant inputs.
    reflection : bool
        Include improper rotations (O(3)); False checks SO(3) only.

    Raises
    ------
    AssertionError
        Naming the output key and the largest deviation.
    """
    model, batch = _prepare(model, batch, dtype)
    gen = torch.Generator().manual_seed(seed)
    b = batch.num_atoms.shape[0]
    rot = random_orthogonal(b, gen, reflection).to(device=batch.lattice.device, dtype=batch.lattice.dtype)
    ref = _call(model, batch, crystal_kwargs, atom_kwargs)
    new = _call(model, _replace(batch, lattice=batch.lattice @ rot), crystal_kwargs, atom_kwargs)
    n = batch.frac.shape[0]

    def expected(key, value):
        kind = _kind(key, transforms)
        if kind == "invariant":
            return value
        per_item = rot[batch.batch] if _level(key, value, n, b, kind) == "atom" else rot
        if kind == "vector":
            return torch.einsum("ni,nij->nj", value, per_item)
        return value @ per_item

    _check_outputs("rotation equivariance", ref, new, expected, _tolerance(batch.frac.dtype, atol))


def check_permutation_equivariance(model, batch, dtype: torch.dtype | None = torch.float64,
                                   atol: float | None = None, seed: int = 0,
                                   transforms: Mapping[str, str] | None = None,
                                   crystal_kwargs: Mapping[str, Tensor] | None = None,
                                   atom_kwargs: Mapping[str, Tensor] | None = None) -> None:
    """Check that shuffling the atoms within each crystal shuffles per-atom outputs alike.

    Per-crystal outputs must not change.  Parameters as in
    :func:`check_rotation_equivariance`; ``atom_kwargs`` are permuted with the atoms.
    """
    model, batch = _prepare(model, batch, dtype)
    gen = torch.Generator().manual_seed(seed)
    n, b = batch.frac.shape[0], batch.num_atoms.shape[0]
    key_sort = batch.batch.cpu().to(torch.float64) + torch.rand(n, generator=gen, dtype=torch.float64)
    perm = torch.argsort(key_sort).to(batch.frac.device)
    ref = _call(model, batch, crystal_kwargs, atom_kwargs)
    permuted_atoms = {k: v[perm] for k, v in (atom_kwargs or {}).items()}
    new = _call(model, _replace(batch, frac=batch.frac[perm], numbers=batch.numbers[perm]), crystal_kwargs,
                permuted_atoms)

    def expected(key, value):
        level = _level(key, value, n, b, _kind(key, transforms))
        return value[perm] if level == "atom" else value

    _check_outputs("permutation equivariance", ref, new, expected, _tolerance(batch.frac.dtype, atol))


def check_translation_invariance(model, batch, dtype: torch.dtype | None = torch.float64,
                                 atol: float | None = None, seed: int = 0,
                                 transforms: Mapping[str, str] | None = None,
                                 crystal_kwargs: Mapping[str, Tensor] | None = None,
                                 atom_kwargs: Mapping[str, Tensor] | None = None) -> None:
    """Check invariance under a random common fractional translation per crystal (then wrapped into [0, 1)).

    Every output must be unchanged.  Parameters as in :func:`check_rotation_equivariance`.
    """
    model, batch = _prepare(model, batch, dtype)
    gen = torch.Generator().manual_seed(seed)
    b = batch.num_atoms.shape[0]
    shift = torch.rand((b, 3), generator=gen, dtype=torch.float64).to(device=batch.frac.device, dtype=batch.frac.dtype)
    ref = _call(model, batch, crystal_kwargs, atom_kwargs)
    new = _call(model, _replace(batch, frac=wrap_frac(batch.frac + shift[batch.batch])), crystal_kwargs, atom_kwargs)
    _check_outputs("translation invariance", ref, new, lambda key, value: value, _tolerance(batch.frac.dtype, atol))


def check_integer_shift_invariance(model, batch, dtype: torch.dtype | None = torch.float64,
                                   atol: float | None = None, seed: int = 0,
                                   transforms: Mapping[str, str] | None = None,
                                   crystal_kwargs: Mapping[str, Tensor] | None = None,
                                   atom_kwargs: Mapping[str, Tensor] | None = None) -> None:
    """Check invariance when atoms move by integer lattice vectors (periodic images, not wrapped).

    Every atom moves by an independent random integer vector in ``[-2, 2]^3``
    (the first atom by ``(1, -2, 2)`` at least), so the fractional coordinates
    leave ``[0, 1)``.  Every output must be unchanged.  Parameters as in
    :func:`check_rotation_equivariance`.
    """
    model, batch = _prepare(model, batch, dtype)
    gen = torch.Generator().manual_seed(seed)
    n = batch.frac.shape[0]
    shift = torch.randint(-2, 3, (n, 3), generator=gen)
    if n:
        shift[0] = torch.tensor([1, -2, 2])
    shift = shift.to(device=batch.frac.device, dtype=batch.frac.dtype)
    ref = _call(model, batch, crystal_kwargs, atom_kwargs)
    new = _call(model, _replace(batch, frac=batch.frac + shift), crystal_kwargs, atom_kwargs)
    _check_outputs("integer-shift invariance", ref, new, lambda key, value: value, _tolerance(batch.frac.dtype, atol))


def check_batch_independence(model, batch, dtype: torch.dtype | None = torch.float64, atol: float | None = None,
                             seed: int = 0, transforms: Mapping[str, str] | None = None,
                             crystal_kwargs: Mapping[str, Tensor] | None = None,
                             atom_kwargs: Mapping[str, Tensor] | None = None) -> None:
    """Check that each crystal's outputs are the same alone as inside the batch.

    Runs the model once on the whole batch and once per crystal (a loop over
    crystals: keep test batches small).  Parameters as in
    :func:`check_rotation_equivariance` (``seed`` is unused).
    """
    model, batch = _prepare(model, batch, dtype)
    n, b = batch.frac.shape[0], batch.num_atoms.shape[0]
    ref = _call(model, batch, crystal_kwargs, atom_kwargs)
    ptr = torch.cat([batch.num_atoms.new_zeros(1), torch.cumsum(batch.num_atoms, 0)]).tolist()
    tol = _tolerance(batch.frac.dtype, atol)
    for i in range(b):
        lo, hi = ptr[i], ptr[i + 1]
        sub = batch.select([i])
        ck = {k: v[i : i + 1] for k, v in (crystal_kwargs or {}).items()}
        ak = {k: v[lo:hi] for k, v in (atom_kwargs or {}).items()}
        new = _call(model, sub, ck, ak)

        def expected(key, value):
            level = _level(key, value, n, b, _kind(key, transforms))
            return value[lo:hi] if level == "atom" else value[i : i + 1]

        _check_outputs(f"batch independence (crystal {i} alone)", ref, new, expected, tol)


_CHECKS = {
    "rotation": check_rotation_equivariance,
    "permutation": check_permutation_equivariance,
    "translation": check_translation_invariance,
    "integer_shift": check_integer_shift_invariance,
    "batch_independence": check_batch_independence,
}


def check_all(model, batch, dtype: torch.dtype | None = torch.float64, atol: float | None = None, seed: int = 0,
              transforms: Mapping[str, str] | None = None, crystal_kwargs: Mapping[str, Tensor] | None = None,
              atom_kwargs: Mapping[str, Tensor] | None = None, checks: tuple[str, ...] | None = None) -> None:
    """Run all symmetry checks and report every failure at once.

    Parameters
    ----------
    model, batch, dtype, atol, seed, transforms, crystal_kwargs, atom_kwargs
        As in :func:`check_rotation_equivariance`.
    checks : tuple of str, optional
        Subset of ``"rotation", "permutation", "translation", "integer_shift",
        "batch_independence"``; default all.

    Raises
    ------
    AssertionError
        One line per failing check.
    """
    names = tuple(_CHECKS) if checks is None else tuple(checks)
    unknown = [c for c in names if c not in _CHECKS]
    if unknown:
        raise CrystalfitError(f"checks contains {unknown}; known checks are {tuple(_CHECKS)}")
    failures = []
    for name in names:
        try:
            _CHECKS[name](model, batch, dtype=dtype, atol=atol, seed=seed, transforms=transforms,
                          crystal_kwargs=crystal_kwargs, atom_kwargs=atom_kwargs)
        except AssertionError as exc:
            failures.append(str(exc))
    if failures:
        raise AssertionError("; ".join(failures))
