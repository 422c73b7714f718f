"""Time COV-R / COV-P (CrystalNN + Magpie fingerprints) for 1,000 vs 1,000 crystals.

Data: Perov-5 validation rows (CDVAE csv; ``$CRYSTALFIT_DATA/perov_5/val.csv``).
``generated`` = rows 0..n-1 with Gaussian noise (0.05 A) on the positions,
``reference`` = rows n..2n-1.  COV is timed with ``n_jobs = 1`` and ``2``
(the fingerprint cache is cleared before each run; the joblib workers are
started before timing, their start-up time is reported separately).

Writes ``benchmarks/results/coverage_timing.json`` and ``.md``.

Usage::

    CRYSTALFIT_DATA=../shared/data python benchmarks/bench_coverage.py [--n 1000] [--n-jobs 1 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from crystalfit.metrics import clear_fingerprint_cache, coverage, fingerprints  # noqa: E402


def load_rows(n: int, data_home: Path):
    """First n Perov-5 val rows as ase.Atoms (project loader, else the csv)."""
    try:
        from crystalfit.datasets import load_dataset

        return load_dataset("perov_5", "val", data_home=data_home, max_rows=n, download=False).structures
    except ImportError:
        import pandas as pd
        from pymatgen.core import Structure
        from pymatgen.io.ase import AseAtomsAdaptor

        df = pd.read_csv(data_home / "perov_5" / "val.csv", nrows=n)
        return [AseAtomsAdaptor.get_atoms(Structure.from_str(c, fmt="cif")) for c in df.cif]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="generated and reference set size (each)")
    ap.add_argument("--n-jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--noise", type=float, default=0.05, help="position noise of the generated copies, Angstrom")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="coverage_timing")
    ap.add_argument("--comp-scaler", type=Path, default=None,
                    help='optional JSON {"means": [132 floats], "stds": [132 floats]}: also report COV with these '
                         "composition standardisation constants (e.g. CDVAE's CompScalerMeans/Stds), from the "
                         "cached fingerprints")
    args = ap.parse_args(argv)

    data_home = Path(os.environ.get("CRYSTALFIT_DATA", ROOT.parent / "shared" / "data"))
    rows = load_rows(2 * args.n + 8, data_home)
    if len(rows) < 2 * args.n + 8:
        raise SystemExit(f"need {2 * args.n + 8} rows, the file has {len(rows)}")
    rng = np.random.default_rng(0)
    generated = []
    for a in rows[: args.n]:
        b = a.copy()
        b.positions += rng.normal(scale=args.noise, size=b.positions.shape)
        generated.append(b)
    reference = rows[args.n : 2 * args.n]
    spare = rows[2 * args.n :]

    # cost per structure of the fingerprint, serial, for the extrapolation
    clear_fingerprint_cache()
    fingerprints(spare[:1])  # featuriser set-up
    clear_fingerprint_cache()
    t0 = time.perf_counter()
    fingerprints(spare[1:8], n_jobs=1)
    per_structure = (time.perf_counter() - t0) / 7
    print(f"fingerprint: {per_structure * 1e3:.1f} ms / structure -> extrapolated serial COV "
          f"{per_structure * 2 * args.n:.0f} s for {2 * args.n} structures", flush=True)

    runs = []
    result_ref = None
    for n_jobs in args.n_jobs:
        startup = 0.0
        if n_jobs != 1:  # start the workers (and their imports) before timing
            clear_fingerprint_cache()
            t0 = time.perf_counter()
            fingerprints(spare[:n_jobs * 2], n_jobs=n_jobs)
            startup = time.perf_counter() - t0
        clear_fingerprint_cache()
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        res = coverage(generated, reference, dataset="perov_5", n_jobs=n_jobs)
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()
        runs.append({
            "n_jobs": n_jobs, "seconds": seconds, "worker_startup_seconds": startup,
            "loadavg_before": load_before, "loadavg_after": load_after, "result": res._asdict(),
        })
        if result_ref is None:
            result_ref = res
        print(f"n_jobs={n_jobs}: {seconds:.1f} s (worker start-up {startup:.1f} s), load {load_before} -> "
              f"{load_after}, COV-R {res.recall:.4f} COV-P {res.precision:.4f}", flush=True)
    extra = {}
    if args.comp_scaler is not None:
        from crystalfit.metrics import coverage_from_fingerprints

        scaler = json.loads(args.comp_scaler.read_text())
        gs, gc = fingerprints(generated)  # cached: no recomputation
        rs, rc = fingerprints(reference)
        res = coverage_from_fingerprints(gs, gc, rs, rc, struct_cutoff=0.2, comp_cutoff=4.0,
                                         comp_means=scaler["means"], comp_stds=scaler["stds"])
        extra = {"comp_scaler_file": str(args.comp_scaler), "result_with_comp_scaler": res._asdict()}
        print(f"with {args.comp_scaler}: COV-R {res.recall:.4f} COV-P {res.precision:.4f}", flush=True)
    base = runs[0]["seconds"]
    for r in runs:
        r["speedup_vs_first"] = base / r["seconds"]
        r["same_result_as_first"] = r["result"] == runs[0]["result"]

    import joblib
    import matminer
    import pymatgen.core

    out = {
        "benchmark": "coverage (COV-R/COV-P) timing",
        "command": "CRYSTALFIT_DATA=../shared/data python benchmarks/bench_coverage.py " + " ".join(argv or sys.argv[1:]),
        "data": f"Perov-5 val.csv: generated = rows 0..{args.n - 1} + N(0, {args.noise} A) position noise, "
                f"reference = rows {args.n}..{2 * args.n - 1}; cut-offs perov_5 (0.2, 4); composition "
                "fingerprints standardised with the reference-set mean/std",
        "n_generated": args.n, "n_reference": args.n,
        "fingerprint_seconds_per_structure": per_structure,
        "extrapolated_serial_seconds": per_structure * 2 * args.n,
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "joblib": joblib.__version__, "matminer": getattr(matminer, "__version__", "?"),
            "pymatgen": getattr(pymatgen.core, "__version__", "?"),
            "note": "cores shared with other processes; see loadavg per run (a load above the core count "
                    "depresses the speed-up)",
        },
        "runs": runs,
        **extra,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2, default=float))
    lines = [
        "# Coverage timing (COV-R / COV-P, CrystalNN + Magpie fingerprints)", "",
        f"- command: `{out['command']}`",
        f"- data: {out['data']}",
        f"- machine: {out['machine']['platform']}, {out['machine']['cpu_count']} CPUs, Python "
        f"{out['machine']['python']}, joblib {out['machine']['joblib']}, matminer {out['machine']['matminer']}",
        f"- fingerprint cost: {per_structure * 1e3:.1f} ms per structure (serial), extrapolated serial COV "
        f"time {per_structure * 2 * args.n:.0f} s", "",
        "| n_jobs | time (s) | worker start-up (s) | speed-up | load avg (1 min) before -> after | COV-R | COV-P |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['n_jobs']} | {r['seconds']:.1f} | {r['worker_startup_seconds']:.1f} | "
            f"{r['speedup_vs_first']:.2f}x | {r['loadavg_before'][0]:.2f} -> {r['loadavg_after'][0]:.2f} | "
            f"{r['result']['recall']:.4f} | {r['result']['precision']:.4f} |"
        )
    if extra:
        r = extra["result_with_comp_scaler"]
        lines += ["", f"COV with the composition constants of `{extra['comp_scaler_file']}` instead of the "
                  f"reference statistics: COV-R {r['recall']:.4f}, COV-P {r['precision']:.4f}."]
    lines += ["", "Timings are ratios measured in one run; the cores were shared with other processes "
              "(load averages above), which depresses the parallel speed-up."]
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
