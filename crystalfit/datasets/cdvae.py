"""Loaders for the CDVAE benchmark data sets (Perov-5, Carbon-24, MP-20, MPTS-52).

File format (CDVAE ``data/<name>/<split>.csv``): a header line, an unnamed
first column (the row index of the original table), ``material_id``, a
``cif`` column holding a whole P1 CIF (with newlines, csv-quoted) and
property columns.  Columns are found by header name, never by position (in
MP-20 the ``cif`` column is the eighth).

Where the files are looked for, in order:

1. ``data_home`` if given, else the directory in the ``CRYSTALFIT_DATA``
   environment variable, as ``<root>/<name>/<split>.csv``;
2. the per-user cache :func:`get_cache_dir` (``$CRYSTALFIT_CACHE``, else
   ``$XDG_CACHE_HOME/crystalfit``, else ``~/.cache/crystalfit``), same layout;
3. otherwise the file is downloaded from the CDVAE GitHub repository into the
   cache (``download=False`` or ``CRYSTALFIT_NO_DOWNLOAD=1`` turns this off).

Parsed structures are cached as one ``.npz`` (no pickle: lattices, Cartesian positions, numbers, offsets) under
``<cache>/parsed/``, keyed by (file path, size, mtime, reduce); the data
directory itself is never written to.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import math
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from sklearn.utils import Bunch

from ..exceptions import CIFParseError, CrystalfitError
from ..io import to_atoms, to_structure

__all__ = [
    "DATASETS",
    "SPLITS",
    "DatasetNotFoundError",
    "dataset_url",
    "get_cache_dir",
    "load_dataset",
]

#: Known data sets -> (raw-file base URL, description).
DATASETS: dict[str, tuple[str, str]] = {
    "perov_5": (
        "https://raw.githubusercontent.com/txie-93/cdvae/main/data/perov_5",
        "Perov-5: 18,928 cubic perovskite-cell ABX3 crystals, 5 atoms each (Castelli et al. 2012); "
        "properties heat_ref, heat_all (eV/atom), dir_gap, ind_gap (eV); 60/20/20 split.",
    ),
    "perov_5_dev": (
        # not on the main branch: commit of refs/pull/32/head
        "https://raw.githubusercontent.com/txie-93/cdvae/307861da36a6c5be29e68d3685f0d824dfd6e281/data/perov_5_dev",
        "Perov-5 dev subset: the first 1,024 rows of the Perov-5 splits (CDVAE pull request 32).",
    ),
    "carbon_24": (
        "https://raw.githubusercontent.com/txie-93/cdvae/main/data/carbon_24",
        "Carbon-24: 10,153 carbon allotropes with 6-24 atoms (Pickard 2020); property energy_per_atom (eV); "
        "60/20/20 split.",
    ),
    "mp_20": (
        "https://raw.githubusercontent.com/txie-93/cdvae/main/data/mp_20",
        "MP-20: 45,231 Materials Project crystals with <= 20 atoms; properties formation_energy_per_atom, "
        "band_gap, e_above_hull, ...; 60/20/20 split.",
    ),
    "mpts_52": (
        "https://raw.githubusercontent.com/txie-93/cdvae/main/data/mpts_52",
        "MPTS-52: 40,476 Materials Project crystals with <= 52 atoms, chronological split 27,380/5,000/8,096.",
    ),
}
#: Valid split names.
SPLITS = ("train", "val", "test")
#: Values accepted for ``reduce``.
REDUCE_CHOICES = (None, "niggli")
#: Bunch keys that property columns never overwrite (they stay in ``bunch.properties``).
RESERVED_KEYS = frozenset(
    {"structures", "ids", "index", "num_atoms", "properties", "property_names", "DESCR", "filename", "name", "split"}
)
_CACHE_VERSION = 2
_TIMEOUT_S = 30.0


class DatasetNotFoundError(CrystalfitError):
    """A data set file is in none of the searched places and could not be downloaded."""


# --------------------------------------------------------------------------- locations
def get_cache_dir() -> Path:
    """Per-user cache directory: ``$CRYSTALFIT_CACHE``, else ``$XDG_CACHE_HOME/crystalfit``, else ``~/.cache/crystalfit``."""
    env = os.environ.get("CRYSTALFIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "crystalfit"


def dataset_url(name: str, split: str) -> str:
    """URL of the raw CDVAE csv file for ``name`` and ``split``."""
    _check_name_split(name, split)
    return f"{DATASETS[name][0]}/{split}.csv"


def _check_name_split(name: Any, split: Any) -> None:
    if name not in DATASETS:
        raise CrystalfitError(
            f"unknown dataset name {name!r}; valid names are {sorted(DATASETS)}; e.g. load_dataset('perov_5', 'val')"
        )
    if split not in SPLITS:
        raise CrystalfitError(f"unknown split {split!r} for dataset {name!r}; valid splits are {list(SPLITS)}")


def _candidate_roots(data_home: Any) -> list[Path]:
    roots = []
    if data_home is not None:
        roots.append(Path(data_home).expanduser())
    elif os.environ.get("CRYSTALFIT_DATA"):
        roots.append(Path(os.environ["CRYSTALFIT_DATA"]).expanduser())
    roots.append(get_cache_dir())
    return roots


def _download(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically: temp file in dest's folder, size check, rename."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    req = urllib.request.Request(url, headers={"User-Agent": "crystalfit"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length") if getattr(resp, "headers", None) is not None else None
        total = int(length) if length not in (None, "") else None
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            received = 0
            with os.fdopen(fd, "wb") as fh, tqdm(
                total=total, unit="B", unit_scale=True, desc=f"download {dest.parent.name}/{dest.name}", leave=False
            ) as bar:
                while True:
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if received == 0 or (total is not None and received != total):
                raise DatasetNotFoundError(
                    f"download of {url} is incomplete: received {received} bytes, the server announced "
                    f"{total if total is not None else 'an unknown size'} (Content-Length); the partial file was "
                    "deleted; retry, or download the file yourself"
                )
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def _find_or_download(name: str, split: str, data_home: Any, download: bool, verbose: bool) -> Path:
    roots = _candidate_roots(data_home)
    searched = [r / name / f"{split}.csv" for r in roots]
    for path in searched:
        if path.is_file():
            return path
    url = dataset_url(name, split)
    example = f"/path/{name}/{split}.csv"
    where = (
        f"searched {[str(p) for p in searched]}; put the file at one of these paths, e.g. "
        f"set CRYSTALFIT_DATA=/path so that {example} exists, or pass data_home=/path"
    )
    if not download or os.environ.get("CRYSTALFIT_NO_DOWNLOAD", "") not in ("", "0"):
        raise DatasetNotFoundError(
            f"dataset file {name}/{split}.csv not found and downloading is disabled "
            f"(download=False or CRYSTALFIT_NO_DOWNLOAD set); {where}; it can be downloaded from {url}"
        )
    dest = searched[-1]  # the user cache
    if verbose:
        print(f"crystalfit: downloading {url} -> {dest}", file=sys.stderr)
    try:
        _download(url, dest, _TIMEOUT_S)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(f"{exc}; {where}") from exc
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        raise DatasetNotFoundError(
            f"dataset file {name}/{split}.csv not found and the download from {url} failed "
            f"({type(exc).__name__}: {exc}); {where}"
        ) from exc
    return dest


# --------------------------------------------------------------------------- csv
def _read_csv(path: Path, max_rows: int | None) -> tuple[list[str], list[list[str]]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows: list[list[str]] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise CIFParseError(f"{path}: the file is empty (no header line); expected a CDVAE csv with a 'cif' column")
        header = [h.strip() for h in header]
        for row in reader:
            if not row:
                continue
            if max_rows is not None and len(rows) >= max_rows:
                break
            if len(row) != len(header):
                raise CIFParseError(
                    f"{path}, data row {len(rows)} (csv line {reader.line_num}): {len(row)} fields, the header has "
                    f"{len(header)} ({header}); every row needs one value per column; check the quoting of the cif field"
                )
            rows.append(row)
    if "cif" not in header:
        raise CIFParseError(
            f"{path}: no 'cif' column (columns: {header}); a CDVAE csv needs a 'cif' column with one CIF per row"
        )
    return header, rows


def _column_array(values: list[str]) -> np.ndarray:
    """int64 if every value is an integer, float64 if every value is a number (empty -> nan), else object."""
    try:
        return np.array([int(v) for v in values], dtype=np.int64)
    except (ValueError, OverflowError):
        pass
    try:
        return np.array([float(v) if v.strip() else math.nan for v in values], dtype=np.float64)
    except ValueError:
        return np.array(values, dtype=object)


# --------------------------------------------------------------------------- parsing + cache
def _niggli(atoms: Atoms, index: int) -> Atoms:
    """DiffCSP's ``build_crystal(niggli=True, primitive=False)``: Niggli-reduce, rebuild the lattice from parameters."""
    from pymatgen.core import Lattice, Structure

    s = to_structure(atoms, index).get_reduced_structure()
    s = Structure(Lattice.from_parameters(*s.lattice.parameters), s.species, s.frac_coords, coords_are_cartesian=False)
    return to_atoms(s, index)


def _parse(cifs: list[str], ids: list[str], path: Path, reduce: str | None, verbose: bool) -> list[Atoms]:
    from tqdm.auto import tqdm

    out = []
    for r, cif in enumerate(tqdm(cifs, desc=f"parse {path.parent.name}/{path.name}", disable=not verbose)):
        if "\n" not in cif or ("_cell_length_a" not in cif and not cif.lstrip().startswith("data_")):
            raise CIFParseError(
                f"{path}, data row {r} (0-based, header excluded; material_id {ids[r]!r}): the cif field is not "
                f"CIF text (it starts with {cif.strip()[:60]!r}); each row needs a whole CIF with a data_ block "
                "and _cell_length_a/b/c; fix or remove that row"
            )
        try:
            atoms = to_atoms(cif, r)
            if reduce == "niggli":
                atoms = _niggli(atoms, r)
        except CrystalfitError as exc:
            raise type(exc)(
                f"{path}, data row {r} (0-based, header excluded; material_id {ids[r]!r}): {exc}"
            ) from exc
        out.append(atoms)
    return out


def _cache_file(path: Path, reduce: str | None) -> tuple[Path, str]:
    st = path.stat()
    key = f"v{_CACHE_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{reduce}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return get_cache_dir() / "parsed" / f"{path.parent.name}_{path.stem}_{digest}.npz", key


def _load_cache(cache: Path, key: str, ids: list[str]) -> list[Atoms] | None:
    try:
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) != key or len(z["ids"]) < len(ids) or list(z["ids"][: len(ids)]) != ids:
                return None
            lat, pos, num, off = z["lattices"], z["positions"], z["numbers"], z["offsets"]
    except (OSError, KeyError, ValueError):
        return None
    return [
        Atoms(numbers=num[off[i] : off[i + 1]], cell=lat[i], positions=pos[off[i] : off[i + 1]], pbc=True)
        for i in range(len(ids))
    ]


def _save_cache(cache: Path, key: str, ids: list[str], structures: list[Atoms]) -> None:
    counts = np.array([len(a) for a in structures], dtype=np.int64)
    arrays = dict(
        key=np.array(key),
        ids=np.array(ids, dtype=str),
        lattices=np.array([a.cell[:] for a in structures], dtype=np.float64).reshape(-1, 3, 3),
        positions=np.concatenate([a.positions for a in structures]).astype(np.float64),  # exact round trip
        numbers=np.concatenate([a.numbers for a in structures]).astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(counts)]),
    )
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, cache)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        warnings.warn(f"could not write the parsed-structure cache {cache} ({exc}); loading will parse again next time")


# --------------------------------------------------------------------------- public
def load_dataset(
    name: str,
    split: str,
    data_home: str | os.PathLike | None = None,
    *,
    reduce: str | None = None,
    max_rows: int | None = None,
    verbose: bool = False,
    download: bool = True,
) -> Bunch:
    """Load one split of a CDVAE benchmark data set as ``ase.Atoms``.

    Parameters
    ----------
    name : {"perov_5", "perov_5_dev", "carbon_24", "mp_20", "mpts_52"}
        Data set (see :data:`DATASETS`).
    split : {"train", "val", "test"}
        Split; the file is ``<root>/<name>/<split>.csv``.
    data_home : str or path, optional
        Root folder to look in first; default ``$CRYSTALFIT_DATA``.  Only read,
        never written.  The per-user cache (:func:`get_cache_dir`) is searched
        next, and downloads go there.
    reduce : {None, "niggli"}
        None (default): cells as stored in the file.  ``"niggli"``: pymatgen
        Niggli reduction, then the lattice rebuilt from its parameters (a
        standard orientation) with the same fractional coordinates, as
        DiffCSP's ``build_crystal(niggli=True, primitive=False)``.
    max_rows : int, optional
        Read only the first ``max_rows`` data rows.
    verbose : bool
        Show a progress bar while parsing and report cache use on stderr.
    download : bool
        Download the file from the CDVAE repository (:func:`dataset_url`) into
        the cache when it is found nowhere (default True; the environment
        variable ``CRYSTALFIT_NO_DOWNLOAD=1`` also disables it).

    Returns
    -------
    sklearn.utils.Bunch
        ``structures`` (list of n ase.Atoms; ``info["source_id"]`` = material_id,
        ``info["properties"]`` = the row's numeric property values),
        ``ids`` (n,) str, ``index`` (n,) the file's unnamed first column,
        ``num_atoms`` (n,) int, ``properties`` (dict column -> (n,) array),
        one (n,) array per property column under its header name (numeric
        columns as int64/float64, others such as ``formula`` as object arrays;
        a name with characters that are not valid in an attribute, e.g.
        ``spacegroup.crystal_system``, is also available with those replaced
        by ``_``), ``property_names``, ``name``, ``split``, ``filename``, ``DESCR``.

    Raises
    ------
    DatasetNotFoundError
        The file is in none of the searched places and cannot be downloaded;
        the message lists the paths searched and the URL.
    CIFParseError
        A row's CIF cannot be parsed (the message names the file, the data row
        and its material_id), or the file is not in CDVAE format.

    Examples
    --------
    >>> ds = load_dataset("perov_5", "val", max_rows=10)   # doctest: +SKIP
    >>> len(ds.structures), ds.heat_ref.shape              # doctest: +SKIP
    (10, (10,))
    """
    _check_name_split(name, split)
    if reduce not in REDUCE_CHOICES:
        raise CrystalfitError(f"reduce must be one of {list(REDUCE_CHOICES)}, got {reduce!r}")
    if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1):
        raise CrystalfitError(f"max_rows must be None or a positive integer, got {max_rows!r}; e.g. max_rows=100")
    path = _find_or_download(name, split, data_home, download, verbose)
    header, rows = _read_csv(path, max_rows)
    if not rows:
        raise CIFParseError(f"{path}: no data rows after the header {header}; expected one crystal per row")
    cols = {h: k for k, h in enumerate(header)}
    cifs = [row[cols["cif"]] for row in rows]
    index_col = 0 if header[0] == "" else None
    ids = (
        [row[cols["material_id"]] for row in rows]
        if "material_id" in cols
        else [row[index_col] if index_col is not None else str(r) for r, row in enumerate(rows)]
    )
    skip = {"cif", "material_id", ""}
    prop_names = [h for h in header if h not in skip]
    properties = {h: _column_array([row[cols[h]] for row in rows]) for h in prop_names}

    t0 = time.perf_counter()
    cache, key = _cache_file(path, reduce)
    structures = _load_cache(cache, key, ids) if cache.is_file() else None
    from_cache = structures is not None
    if structures is None:
        structures = _parse(cifs, ids, path, reduce, verbose)
        if max_rows is None:
            _save_cache(cache, key, ids, structures)
    if verbose:
        how = f"from cache {cache}" if from_cache else "parsed"
        print(f"crystalfit: {len(structures)} structures {how} in {time.perf_counter() - t0:.2f} s", file=sys.stderr)

    numeric = [h for h in prop_names if properties[h].dtype != object]
    for r, atoms in enumerate(structures):
        atoms.info["source_id"] = ids[r]
        atoms.info["properties"] = {h: properties[h][r].item() for h in numeric}

    bunch = Bunch(
        structures=structures,
        ids=np.array(ids, dtype=str),
        index=_column_array([row[index_col] for row in rows]) if index_col is not None else np.arange(len(rows)),
        num_atoms=np.array([len(a) for a in structures], dtype=np.int64),
        properties=properties,
        property_names=prop_names,
        name=name,
        split=split,
        filename=str(path),
    )
    for h, arr in properties.items():
        for k in {h, "".join(c if c.isalnum() or c == "_" else "_" for c in h)}:
            if k not in RESERVED_KEYS and k not in bunch:
                bunch[k] = arr
    bunch["DESCR"] = (
        f"{DATASETS[name][1]}\nsplit {split!r}: {len(structures)} structures"
        f"{' (first max_rows rows)' if max_rows is not None else ''} from {path}\n"
        f"columns: {header}\nreduce: {reduce!r} ({'cells as stored' if reduce is None else 'Niggli-reduced'})\n"
        f"source: {dataset_url(name, split)} (Xie et al., CDVAE, ICLR 2022)"
    )
    return bunch
