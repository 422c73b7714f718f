"""Private helpers shared by the metric modules: input conversion and a
joblib map with an optional tqdm progress bar.

Input convention of every metric: a list whose entries are ``ase.Atoms``,
pymatgen ``Structure`` (or anything :func:`crystalfit.io.to_structure` reads)
or ``None``.  ``None`` is a failed generation; so is a structure that cannot
be constructed (NaN coordinates, singular cell).  Both become ``None`` here
and every metric counts them as invalid / unmatched.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np
from joblib import Parallel, delayed, effective_n_jobs

from ..exceptions import CrystalfitError, InvalidStructureError

# crystalfit.io is imported lazily: it pulls in torch, which joblib workers
# that only compute fingerprints or StructureMatcher RMS do not need.

__all__ = ["StructureList", "as_structures", "as_structure_or_none", "parallel_map", "check_same_length"]


def as_structure_or_none(obj: Any, index: int | None = None):
    """One entry -> pymatgen ``Structure`` or ``None`` (failed generation).

    ``None`` stays ``None``; an Atoms/Structure that breaks the data model
    (non-finite coordinates, singular cell, no atoms) becomes ``None`` too,
    because a generator that produced it failed.  Objects of an unsupported
    type raise ``TypeError`` (that is a usage error, not a failed sample).
    """
    if obj is None:
        return None
    from ..io import to_structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return to_structure(obj, index)
    except InvalidStructureError:
        return None


class StructureList(list):
    """A list already converted by :func:`as_structures` (passed through unchanged)."""


def as_structures(items: Sequence[Any] | None, name: str) -> list:
    """Convert a list of structure-likes to a list of ``Structure`` / ``None``.

    Parameters
    ----------
    items : sequence
        Entries as accepted by :func:`as_structure_or_none`.
    name : str
        Argument name used in error messages (``"generated"``, ...).

    Returns
    -------
    StructureList of pymatgen.core.Structure or None, length ``len(items)``
        A ``StructureList`` given as input is returned unchanged.
    """
    if items is None or isinstance(items, (str, bytes)) or hasattr(items, "lattice") or hasattr(items, "cell"):
        raise CrystalfitError(
            f"{name} must be a list of structures (ase.Atoms / pymatgen Structure / None), got a single "
            f"{type(items).__name__}; wrap it in a list: [{name}]"
        )
    if isinstance(items, StructureList):
        return items
    return StructureList(as_structure_or_none(s, i) for i, s in enumerate(items))


def check_same_length(a: Sequence, b: Sequence, name_a: str, name_b: str) -> None:
    """Raise a :class:`CrystalfitError` if two paired lists differ in length."""
    if len(a) != len(b):
        raise CrystalfitError(
            f"{name_a} has {len(a)} entries but {name_b} has {len(b)}; {name_a}[i] is compared with "
            f"{name_b}[i], so pass one entry (or one list of candidates) per {name_b} structure"
        )


def _apply_chunk(func: Callable, chunk: list) -> list:
    return [func(*args) for args in chunk]


def parallel_map(
    func: Callable,
    arg_tuples: Sequence[tuple],
    *,
    n_jobs: int | None = None,
    verbose: bool = False,
    desc: str | None = None,
    chunks_per_job: int = 4,
) -> list:
    """``[func(*args) for args in arg_tuples]`` through ``joblib.Parallel``.

    The backend is not fixed: ``n_jobs=None`` and any
    ``with joblib.parallel_backend(...)`` context (loky, threading, dask)
    apply.  Work is sent in chunks (about ``chunks_per_job`` per worker) to
    keep the dispatch overhead small.  With one effective job the loop runs
    in-process.

    Parameters
    ----------
    func : callable
        Must be picklable (a module-level function) for process backends.
    arg_tuples : sequence of tuple
        Positional arguments of each call.
    n_jobs : int or None
        joblib ``n_jobs``; ``None`` means the active backend's default (1
        outside a ``parallel_backend`` context), ``-1`` all cores.
    verbose : bool
        Show a tqdm progress bar (per finished chunk).
    desc : str, optional
        Progress bar label.

    Returns
    -------
    list
        Results in input order.
    """
    n = len(arg_tuples)
    if n == 0:
        return []
    n_eff = effective_n_jobs(n_jobs)
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=desc, leave=False)
    try:
        if n_eff == 1:
            out = []
            for args in arg_tuples:
                out.append(func(*args))
                if bar is not None:
                    bar.update(1)
            return out
        size = max(1, math.ceil(n / (n_eff * chunks_per_job)))
        chunks = [list(arg_tuples[i : i + size]) for i in range(0, n, size)]
        tasks = (delayed(_apply_chunk)(func, c) for c in chunks)
        results = None
        if bar is not None:
            try:
                parallel = Parallel(n_jobs=n_jobs, return_as="generator")
            except ValueError:  # backend without generator support (multiprocessing)
                parallel = None
            if parallel is not None:
                results = []
                for chunk_out in parallel(tasks):
                    results.append(chunk_out)
                    bar.update(len(chunk_out))
        if results is None:
            results = Parallel(n_jobs=n_jobs)(tasks)
            if bar is not None:
                bar.update(n - bar.n)
        return [r for chunk_out in results for r in chunk_out]
    finally:
        if bar is not None:
            bar.close()


def as_float_array(values: Any, name: str) -> np.ndarray:
    """1-D float array from a sequence; ``None`` entries become NaN."""
    try:
        arr = np.asarray([np.nan if v is None else v for v in values], dtype=float)
    except (TypeError, ValueError) as exc:
        raise CrystalfitError(
            f"{name} must be a 1-D sequence of numbers (None for missing), could not convert it ({exc}); "
            "pass e.g. a list of floats or a numpy array of shape (n,)"
        ) from exc
    if arr.ndim != 1:
        raise CrystalfitError(f"{name} has shape {arr.shape}, expected (n,); pass one number per structure")
    return arr
