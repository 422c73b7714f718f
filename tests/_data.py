"""Shared test helpers: rows of the benchmark csv files through the project's loader; the benchmark script as a
module."""
import importlib.util
import os
from pathlib import Path

import pytest

#: CRYSTALFIT_DATA, else ../shared/data beside the repository (the CI layout).
DATA = Path(os.environ.get("CRYSTALFIT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def perov_rows(n):
    """First ``n`` rows of Perov-5 val as ase.Atoms; skips the test when the file is absent."""
    path = DATA / "perov_5" / "val.csv"
    if not path.is_file():
        pytest.skip(f"Perov-5 data not found at {path}; set CRYSTALFIT_DATA to the folder holding perov_5/val.csv")
    from crystalfit.datasets import load_dataset

    return load_dataset("perov_5", "val", data_home=DATA, max_rows=n, download=False).structures


def xrd_benchmark():
    """``benchmarks/xrd_guidance.py`` loaded as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "xrd_guidance.py"
    spec = importlib.util.spec_from_file_location("xrd_guidance_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
