"""Batch structure relaxation with ASE optimizers.

:func:`relax` relaxes a list of structures with EMT (built in, a few metals
and light elements), CHGNet (optional extra ``pip install crystalfit[relax]``)
or any ASE calculator, optionally with the cell (``FrechetCellFilter``), in
parallel with joblib.  It returns a :class:`RelaxResult` with the relaxed
``ase.Atoms``, their energies (eV and eV/atom), the energies of the input
structures (what :func:`crystalfit.metrics.ground_state.ground_state_metrics`
needs as ``generated_energies``), step counts and convergence flags.

Force-only calculators (``"energy"`` not in ``implemented_properties``, e.g.
:class:`~crystalfit.calculators.DenoiserCalculator`) work with the optimizers
whose *step* uses forces only: FIRE (with ``downhill_check=False``, its
default), MDMin, BFGS and LBFGS (``use_line_search=False``, its default).
ASE's ``Optimizer.log`` asks for the energy at every step even when
``logfile=None`` (ASE 3.23-3.29), so :func:`relax` always runs a subclass of
the optimizer whose ``log`` does nothing; energies are then reported as NaN.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator, PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator

from ..exceptions import CrystalfitError, UnknownElementError
from ..io import to_atoms

__all__ = ["RelaxResult", "relax", "emt_supported_elements", "make_calculator", "quiet_optimizer"]

#: Optimizers selectable by name.  FIRE, MDMin, BFGS and LBFGS step with
#: forces only; BFGSLineSearch and GPMin need energies.
OPTIMIZERS = ("FIRE", "MDMin", "BFGS", "LBFGS", "BFGSLineSearch", "GPMin")


def emt_supported_elements() -> list[str]:
    """Element symbols that ASE's EMT calculator has parameters for.

    Returns
    -------
    list of str
        Sorted symbols, read from ``ase.calculators.emt.parameters``
        (Ag, Al, Au, C, Cu, H, N, Ni, O, Pd, Pt in ASE 3.23-3.29).
    """
    from ase.calculators.emt import parameters

    return sorted(parameters)


def _check_emt_elements(atoms_list: Sequence[Atoms]) -> None:
    supported = set(emt_supported_elements())
    bad = []
    for i, atoms in enumerate(atoms_list):
        missing = sorted(set(atoms.get_chemical_symbols()) - supported)
        if missing:
            bad.append(f"structure {i} ({atoms.get_chemical_formula()}): {', '.join(missing)}")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise UnknownElementError(
            f"calculator='emt' has no parameters for some elements: {shown}. EMT supports only "
            f"{', '.join(emt_supported_elements())}; use calculator='chgnet' "
            "(pip install crystalfit[relax]) or pass another ASE calculator"
        )


def _chgnet_calculator():
    try:
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "calculator='chgnet' needs the optional CHGNet package, which is not installed "
            f"({exc}); install it with `pip install crystalfit[relax]` (or `pip install chgnet`)"
        ) from exc
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CHGNetCalculator()


def make_calculator(calculator: Any = "emt", *, copy_instance: bool = False) -> BaseCalculator:
    """Build an ASE calculator from a name, an instance or a factory.

    Parameters
    ----------
    calculator : {"emt", "chgnet"}, ase Calculator or callable
        ``"emt"``: ``ase.calculators.emt.EMT()``; ``"chgnet"``: the pretrained
        ``chgnet.model.dynamics.CHGNetCalculator()`` (its wheel ships the
        weights); an ASE calculator instance (returned as is, or a deep copy
        when ``copy_instance``); a zero-argument callable returning one.
    copy_instance : bool
        Deep-copy an instance (used so parallel workers never share one).

    Returns
    -------
    ase.calculators.calculator.BaseCalculator
    """
    if isinstance(calculator, str):
        name = calculator.lower()
        if name == "emt":
            from ase.calculators.emt import EMT

            return EMT()
        if name == "chgnet":
            return _chgnet_calculator()
        raise CrystalfitError(
            f"calculator={calculator!r} is not a known name; use 'emt', 'chgnet', an ASE Calculator "
            "instance or a zero-argument function returning one"
        )
    if not isinstance(calculator, type) and (
        isinstance(calculator, BaseCalculator) or hasattr(calculator, "get_property")
    ):
        return copy.deepcopy(calculator) if copy_instance else calculator
    if callable(calculator):
        calc = calculator()
        if not (isinstance(calc, BaseCalculator) or hasattr(calc, "get_property")):
            raise CrystalfitError(
                f"the calculator factory {calculator!r} returned a {type(calc).__name__}, expected an ASE "
                "Calculator; pass a zero-argument function that builds an ASE calculator"
            )
        return calc
    raise CrystalfitError(
        f"calculator must be 'emt', 'chgnet', an ASE Calculator or a zero-argument factory, got a "
        f"{type(calculator).__name__}"
    )


def _noop_log(self, *args, **kwargs):
    return None


def quiet_optimizer(optimizer: str | type) -> type:
    """An ASE optimizer class whose ``log`` never asks for the energy.

    ASE's ``Optimizer.log`` calls ``get_potential_energy`` at every step even
    with ``logfile=None``, which fails for force-only calculators.  The
    returned subclass differs from ``optimizer`` only in a no-op ``log``.

    Parameters
    ----------
    optimizer : str or type
        One of :data:`OPTIMIZERS` or an ``ase.optimize`` optimizer class.

    Returns
    -------
    type
        A subclass of the optimizer class.
    """
    import ase.optimize

    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise CrystalfitError(
                f"optimizer={optimizer!r} is not supported; use one of {', '.join(OPTIMIZERS)} "
                "or pass an ase.optimize optimizer class"
            )
        cls = getattr(ase.optimize, optimizer)
    elif isinstance(optimizer, type):
        cls = optimizer
    else:
        raise CrystalfitError(
            f"optimizer must be a name ({', '.join(OPTIMIZERS)}) or an ase.optimize class, got "
            f"{type(optimizer).__name__}"
        )
    return type(f"Quiet{cls.__name__}", (cls,), {"log": _noop_log})


def _max_force(obj) -> float:
    f = np.asarray(obj.get_forces())
    return float(np.sqrt((f**2).sum(axis=1)).max()) if len(f) else 0.0


def _relax_one(
    atoms: Atoms,
    calc: BaseCalculator,
    index: int,
    fmax: float,
    steps: int,
    relax_cell: bool,
    optimizer: Any,
    pressure: float,
) -> dict:
    """Relax one structure in place; return its record."""
    from ase.filters import FrechetCellFilter

    if hasattr(calc, "reset"):
        calc.reset()
    atoms.calc = calc
    props = tuple(getattr(calc, "implemented_properties", ()))
    has_energy = "energy" in props
    if relax_cell and "stress" not in props:
        raise CrystalfitError(
            f"structure {index}: relax_cell=True needs the stress, but the calculator "
            f"{type(calc).__name__} implements only {list(props)}; pass relax_cell=False"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # CHGNet 0.4 builds a tensor from a grad-tracking scalar at every call
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad", category=UserWarning)
        try:
            e0 = float(atoms.get_potential_energy()) if has_energy else math.nan
            obj = FrechetCellFilter(atoms, scalar_pressure=pressure * units.GPa) if relax_cell else atoms
            opt = quiet_optimizer(optimizer)(obj, logfile=None)
            converged = bool(opt.run(fmax=fmax, steps=steps))
            final_fmax = _max_force(obj)
            energy = float(atoms.get_potential_energy()) if has_energy else math.nan
            forces = np.array(atoms.get_forces())
            stress = np.array(atoms.get_stress()) if "stress" in props else None
        except PropertyNotImplementedError as exc:
            raise PropertyNotImplementedError(
                f"structure {index}: optimizer {optimizer!r} needs a property the calculator "
                f"{type(calc).__name__} does not provide ({exc}); force-only calculators work with "
                "FIRE, MDMin, BFGS or LBFGS"
            ) from exc
    out = atoms.copy()
    out.wrap()
    out.calc = SinglePointCalculator(
        out, **{k: v for k, v in (("energy", None if math.isnan(energy) else energy),
                                  ("forces", forces), ("stress", stress)) if v is not None}
    )
    record = dict(converged=converged, n_steps=int(opt.nsteps), energy=energy, initial_energy=e0, fmax=final_fmax)
    out.info["relax"] = dict(record)
    atoms.calc = None
    return dict(record, atoms=out)


def _relax_chunk(items: list[tuple[int, Atoms]], calculator: Any, copy_instance: bool, kwargs: dict) -> list[dict]:
    calc = make_calculator(calculator, copy_instance=copy_instance)
    return [_relax_one(atoms, calc, i, **kwargs) for i, atoms in items]


@dataclass
class RelaxResult:
    """Output of :func:`relax` (also readable like a dict: ``result["energies"]``).

    Attributes
    ----------
    atoms : list of ase.Atoms
        Relaxed structures (copies, positions wrapped into the cell), each with
        a ``SinglePointCalculator`` holding the final energy/forces/stress and
        ``info["relax"]`` with its record.
    energies : np.ndarray, shape (n,)
        Final potential energies in eV (NaN for force-only calculators).
    energies_per_atom : np.ndarray, shape (n,)
        ``energies / n_atoms`` in eV/atom.
    initial_energies : np.ndarray, shape (n,)
        Energies of the input structures in eV (NaN for force-only calculators).
    initial_energies_per_atom : np.ndarray, shape (n,)
        eV/atom.
    n_steps : np.ndarray of int, shape (n,)
        Optimizer steps taken.
    converged : np.ndarray of bool, shape (n,)
        Whether the max force (incl. the cell's generalised forces) fell below ``fmax``.
    fmax : np.ndarray, shape (n,)
        Final max force norm in eV/Angstrom (with the cell filter when ``relax_cell``).
    """

    atoms: list
    energies: np.ndarray
    energies_per_atom: np.ndarray
    initial_energies: np.ndarray
    initial_energies_per_atom: np.ndarray
    n_steps: np.ndarray
    converged: np.ndarray
    fmax: np.ndarray
    settings: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return getattr(self, key)

    def __len__(self) -> int:
        return len(self.atoms)

    def keys(self) -> list[str]:
        return [f for f in self.__dataclass_fields__]

    def to_dict(self) -> dict:
        """The fields as a plain dict."""
        return {k: getattr(self, k) for k in self.keys()}


def relax(
    structures: Sequence[Any],
    calculator: Any = "emt",
    fmax: float = 0.05,
    steps: int = 500,
    relax_cell: bool = True,
    n_jobs: int | None = None,
    optimizer: str | type = "FIRE",
    verbose: bool = False,
    pressure: float = 0.0,
) -> RelaxResult:
    """Relax structures with an ASE calculator and optimizer.

    Parameters
    ----------
    structures : sequence of structure-likes
        ``ase.Atoms``, pymatgen ``Structure``, CIF text or paths (see
        :func:`crystalfit.io.to_atoms`); a single structure is wrapped in a
        list.  Inputs are never modified (copies are relaxed).
    calculator : {"emt", "chgnet"}, ase Calculator or callable
        ``"emt"`` (default, built in; elements from
        :func:`emt_supported_elements` only), ``"chgnet"`` (pretrained
        CHGNet, ``pip install crystalfit[relax]``), an ASE calculator
        instance, or a zero-argument factory.  With ``n_jobs > 1`` every
        worker task builds its own calculator (instances are deep-copied);
        none is shared.
    fmax : float
        Convergence threshold on the max force, eV/Angstrom.
    steps : int
        Maximum optimizer steps per structure.
    relax_cell : bool
        Also relax the cell through ``ase.filters.FrechetCellFilter``
        (needs a calculator with stress).
    n_jobs : int or None
        joblib workers (``None``: 1 outside a ``joblib.parallel_backend``
        context; ``-1``: all cores).  Results do not depend on it.
    optimizer : str or type
        ``"FIRE"`` (default), ``"MDMin"``, ``"BFGS"``, ``"LBFGS"``,
        ``"BFGSLineSearch"``, ``"GPMin"`` or an ``ase.optimize`` class.
    verbose : bool
        Show a tqdm progress bar.
    pressure : float
        External hydrostatic pressure in GPa for the cell relaxation
        (``FrechetCellFilter(scalar_pressure=...)``); the reported energies
        are the calculator's potential energies, without the ``pV`` term.

    Returns
    -------
    RelaxResult

    Raises
    ------
    crystalfit.exceptions.UnknownElementError
        ``calculator="emt"`` and a structure holds an element EMT lacks
        (the message lists the structure indices and elements).
    ImportError
        ``calculator="chgnet"`` without chgnet installed.

    Examples
    --------
    >>> from ase.build import bulk
    >>> res = relax([bulk("Cu", a=3.7)], calculator="emt", fmax=0.01)
    >>> bool(res.converged[0]), round(float(res.atoms[0].cell[0, 1]) * 2, 2)  # EMT Cu: a ~ 3.59
    (True, 3.59)
    """
    if isinstance(structures, (Atoms, str, bytes)) or hasattr(structures, "lattice"):
        structures = [structures]
    atoms_list = [to_atoms(s, i) for i, s in enumerate(structures)]
    n = len(atoms_list)
    if not (isinstance(fmax, (int, float)) and fmax > 0):
        raise CrystalfitError(f"fmax must be a positive number in eV/Angstrom, got {fmax!r}")
    if not (isinstance(steps, (int, np.integer)) and steps >= 0):
        raise CrystalfitError(f"steps must be a non-negative int, got {steps!r}")
    quiet_optimizer(optimizer)  # validate early
    from ase.calculators.emt import EMT

    if (isinstance(calculator, str) and calculator.lower() == "emt") or calculator is EMT or isinstance(calculator, EMT):
        _check_emt_elements(atoms_list)
    if isinstance(calculator, str) and calculator.lower() == "chgnet":
        try:
            import chgnet  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "calculator='chgnet' needs the optional CHGNet package, which is not installed; "
                "install it with `pip install crystalfit[relax]` (or `pip install chgnet`)"
            ) from exc
    kwargs = dict(fmax=float(fmax), steps=int(steps), relax_cell=bool(relax_cell), optimizer=optimizer,
                  pressure=float(pressure))
    records = _run(atoms_list, calculator, kwargs, n_jobs, verbose)
    nat = np.array([len(a) for a in atoms_list], dtype=float)
    energies = np.array([r["energy"] for r in records], dtype=float)
    e0 = np.array([r["initial_energy"] for r in records], dtype=float)
    return RelaxResult(
        atoms=[r["atoms"] for r in records],
        energies=energies,
        energies_per_atom=energies / nat if n else energies,
        initial_energies=e0,
        initial_energies_per_atom=e0 / nat if n else e0,
        n_steps=np.array([r["n_steps"] for r in records], dtype=int),
        converged=np.array([r["converged"] for r in records], dtype=bool),
        fmax=np.array([r["fmax"] for r in records], dtype=float),
        settings=dict(kwargs, calculator=calculator if isinstance(calculator, str) else type(calculator).__name__,
                      optimizer=optimizer if isinstance(optimizer, str) else optimizer.__name__),
    )


def _run(atoms_list: list[Atoms], calculator: Any, kwargs: dict, n_jobs: int | None, verbose: bool) -> list[dict]:
    from joblib import Parallel, delayed, effective_n_jobs

    n = len(atoms_list)
    if n == 0:
        return []
    n_eff = min(effective_n_jobs(n_jobs), n)
    bar = None
    if verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="relax", leave=False)
    try:
        if n_eff == 1:
            calc = make_calculator(calculator)
            out = []
            for i, atoms in enumerate(atoms_list):
                out.append(_relax_one(atoms, calc, i, **kwargs))
                if bar is not None:
                    bar.update(1)
            return out
        # ~2 chunks per worker: one calculator per chunk, progress per chunk
        n_chunks = min(n, 2 * n_eff)
        chunks = [[(i, atoms_list[i]) for i in range(c, n, n_chunks)] for c in range(n_chunks)]
        tasks = [delayed(_relax_chunk)(chunk, calculator, True, kwargs) for chunk in chunks]
        results: list[dict | None] = [None] * n
        for chunk, recs in zip(chunks, Parallel(n_jobs=n_eff, return_as="generator")(tasks)):
            for (i, _), rec in zip(chunk, recs):
                results[i] = rec
            if bar is not None:
                bar.update(len(chunk))
        return results  # type: ignore[return-value]
    finally:
        if bar is not None:
            bar.close()
