"""PropertyRegressor: held-out MAE on Perov-5 heat_ref and Carbon-24 energy_per_atom.

Data (CDVAE csv files, read with ``crystalfit.datasets.load_dataset``; ``$CRYSTALFIT_DATA``):

* Perov-5 ``heat_ref`` (eV/atom): train = all 1,024 rows of ``perov_5_dev/train.csv``
  + 80 % of ``perov_5/val.csv``; test = the other 20 % of ``perov_5/val.csv``.
  (``perov_5_dev/train`` is the first 1,024 rows of the Perov-5 *train* split, so
  it does not overlap the val split.)
* Carbon-24 ``energy_per_atom`` (eV/atom): 80 / 20 split of ``carbon_24/val.csv``.

The 80/20 split of a val file is ``numpy.random.default_rng(seed).permutation(n)``:
the first ``round(0.8 n)`` indices train, the rest test (``--seed``, default 0).
Cells are used as stored in the files (no Niggli reduction).

Baseline: predict the training mean.  No published reference MAE exists for these
splits: CDVAE's property models (DimeNet++ ``CrystGNN_Supervise``, SPEC 2.4) are only
used inside the generation metrics and their MAE is not reported.

Writes ``benchmarks/results/property_regressor.json`` and ``.md``.

Usage::

    CRYSTALFIT_DATA=../shared/data python benchmarks/bench_property_regressor.py \
        [--perov-epochs 100] [--carbon-epochs 180] [--threads 1] [--seed 0]
    # smoke test (a few rows, 1 epoch, writes elsewhere):
    python benchmarks/bench_property_regressor.py --max-rows 64 --perov-epochs 1 --carbon-epochs 1 --out /tmp/x
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

import torch  # noqa: E402

from crystalfit import PropertyRegressor  # noqa: E402
from crystalfit.datasets import load_dataset  # noqa: E402


def split_80_20(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random 80/20 split of ``range(n)``: (train indices, test indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(0.8 * n))
    return np.sort(perm[:k]), np.sort(perm[k:])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_task(name, X_tr, y_tr, X_te, y_te, params) -> dict:
    t0 = time.perf_counter()
    model = PropertyRegressor(**params).fit(X_tr, y_tr)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pred = model.predict(X_te)
    predict_s = time.perf_counter() - t0
    base = np.full(len(y_te), float(np.mean(y_tr)))
    mae = float(np.mean(np.abs(pred - y_te)))
    mae_base = float(np.mean(np.abs(base - y_te)))
    res = dict(
        task=name,
        n_train=len(X_tr),
        n_test=len(X_te),
        mae=mae,
        mae_train_mean_baseline=mae_base,
        mae_ratio=mae / mae_base,
        rmse=float(np.sqrt(np.mean((pred - y_te) ** 2))),
        r2=float(model.score(X_te, y_te)),
        train_mae=float(np.mean(np.abs(model.predict(X_tr) - y_tr))),
        y_test_std=float(np.std(y_te)),
        fit_s=fit_s,
        predict_s=predict_s,
        final_train_loss=float(model.history_[-1]),
        loss_history=[float(v) for v in model.history_],
        n_parameters=int(sum(p.numel() for p in model.module_.parameters())),
    )
    print(f"[{name}] MAE {mae:.4f} vs baseline {mae_base:.4f} (R2 {res['r2']:.3f}), fit {fit_s:.0f} s", flush=True)
    return res


def write_markdown(path: Path, out: dict) -> None:
    lines = [
        "# PropertyRegressor: held-out MAE",
        "",
        f"Command: `{out['command']}`",
        "",
        f"Machine: {out['machine']['cpu']}, {out['machine']['torch_threads']} torch thread(s), "
        f"torch {out['machine']['torch']}, Python {out['machine']['python']} "
        f"(load average at start {out['machine']['loadavg_start']}; the 2 cores were shared with other jobs).",
        f"Total wall time: {out['wall_s']:.0f} s.",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in out["settings"].items() if k != "max_epochs"),
        "",
        "| task | data | split (seed %d) | train / test | epochs | MAE ours (eV/atom) | MAE train-mean baseline | "
        "ratio | R^2 | fit s |" % out["seed"],
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in out["results"]:
        lines.append(
            f"| {r['task']} | {r['data']} | {r['split']} | {r['n_train']} / {r['n_test']} | {r['epochs']} | "
            f"{r['mae']:.4f} | {r['mae_train_mean_baseline']:.4f} | {r['mae_ratio']:.3f} | {r['r2']:.3f} | "
            f"{r['fit_s']:.0f} |"
        )
    lines += [
        "",
        "Published reference: none.  CDVAE's property models (DimeNet++ `CrystGNN_Supervise`, hidden 128, "
        "4 blocks, cutoff 7; SPEC 2.4) are only used inside the generation metrics and no MAE is published "
        "for them, so there is no number to compare with; these splits are ours.",
        "",
        "Notes: " + out["notes"],
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perov-epochs", type=int, default=100)
    ap.add_argument("--carbon-epochs", type=int, default=180)
    ap.add_argument("--seed", type=int, default=0, help="split seed and random_state")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rows", type=int, default=None, help="read only the first rows of each file (smoke test)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="property_regressor")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    loadavg = os.getloadavg() if hasattr(os, "getloadavg") else None
    settings = dict(embedding_dim=32, batch_size=64, learning_rate=1e-3, loss="l1", standardize_y=True,
                    device="cpu", random_state=args.seed)
    network = PropertyRegressor().network_settings()

    results = []
    kw = dict(max_rows=args.max_rows, download=False)
    # ---- Perov-5 heat_ref
    dev = load_dataset("perov_5_dev", "train", **kw)
    val = load_dataset("perov_5", "val", **kw)
    tr, te = split_80_20(len(val.structures), args.seed)
    X_tr = list(dev.structures) + [val.structures[i] for i in tr]
    y_tr = np.concatenate([dev.heat_ref, val.heat_ref[tr]])
    res = run_task("Perov-5 heat_ref", X_tr, y_tr, [val.structures[i] for i in te], val.heat_ref[te],
                   dict(settings, max_epochs=args.perov_epochs))
    res.update(data="perov_5_dev/train.csv + perov_5/val.csv", split="dev train + 80% val / 20% val",
               epochs=args.perov_epochs)
    results.append(res)
    # ---- Carbon-24 energy_per_atom
    car = load_dataset("carbon_24", "val", **kw)
    tr, te = split_80_20(len(car.structures), args.seed)
    res = run_task("Carbon-24 energy_per_atom", [car.structures[i] for i in tr], car.energy_per_atom[tr],
                   [car.structures[i] for i in te], car.energy_per_atom[te],
                   dict(settings, max_epochs=args.carbon_epochs))
    res.update(data="carbon_24/val.csv", split="80% val / 20% val", epochs=args.carbon_epochs)
    results.append(res)

    out = dict(
        command=" ".join(["CRYSTALFIT_DATA=" + os.environ.get("CRYSTALFIT_DATA", ""), "OMP_NUM_THREADS=1 python",
                          "benchmarks/bench_property_regressor.py", *(sys.argv[1:] if argv is None else argv)]),
        seed=args.seed,
        max_rows=args.max_rows,
        settings=dict(settings, network=network),
        machine=dict(cpu=cpu_name(), n_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                     torch=torch.__version__, python=platform.python_version(),
                     loadavg_start=None if loadavg is None else [round(v, 2) for v in loadavg]),
        results=results,
        published_reference=None,
        published_reference_note="CDVAE's property models are DimeNet++ (SPEC 2.4); no MAE is published for them.",
        notes="MAE in eV/atom on the held-out rows; baseline = mean of the training targets. Splits are random "
              "(seed above) over rows of the CDVAE val files, cells as stored. Trained from scratch, no early "
              "stopping or validation-based model selection; epochs were chosen only to fit the 15-minute budget.",
        wall_s=time.perf_counter() - t_start,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(out, indent=2))
    write_markdown(args.out / f"{args.name}.md", out)
    print(f"wrote {args.out / args.name}.json/.md in {out['wall_s']:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
