"""Throughput of the pipeline with 1 and 2 local workers (issue 6: ≥ 1.8× from 1 to 2 workers).

Simulates N micrographs with the demo's settings (apoferritin-like, 3 Å/px, 1024², SNR 0.1, CTF;
cached in --work) and runs the pipeline's distributed stages (default ingest → preprocess → ctf
→ pick → extract → align2d) on a fresh ``distributed.LocalCluster`` of 1 and then 2 single-threaded
worker processes, timing the whole run (cluster start excluded). The refine stage is excluded by
default: it runs as batched torch in one process (its threads, not Dask workers, set its speed);
add it with ``--stages ...,refine`` to measure it too.

    python benchmarks/bench_scaling.py --n 50 [--workers 1 2] [--repeat 3] [--work bench_scaling_work]

Run it on an otherwise idle machine: every figure here is a wall time. On a small shared VM the
machine's speed drifts between runs; ``--repeat`` interleaves the worker counts and reports medians.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

STAGES = "ingest,preprocess,ctf,pick,extract,align2d"


def simulate(work: Path, n: int, size: int, seed: int) -> Path:
    sim = work / f"sim_{n}x{size}"
    if not (sim / "simulation.json").exists():
        subprocess.run([sys.executable, "-m", "cryodask", "simulate", "--volume", "apoferritin", "--n-micrographs",
                        str(n), "--micrograph-size", str(size), "--pixel-size", "3", "--seed", str(seed),
                        "--out", str(sim), "--cluster", "local", "--workers", "2"], check=True,
                       stdout=subprocess.DEVNULL)
    return sim


def measure(sim: Path, out: Path, workers: int, stages: list[str]) -> dict:
    from cryodask.cluster import ClusterConfig, client_for
    from cryodask.pipeline import RunConfig, run_pipeline

    shutil.rmtree(out, ignore_errors=True)
    cfg = RunConfig.load(None, overrides={"micrographs": [str(sim / "micrographs" / "*.mrc")], "pixel_size": 3.0,
                                          "diameter": 120.0, "symmetry": "O", "seed": 0, "out": str(out),
                                          "stages": stages})
    ccfg = ClusterConfig(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
    with client_for(ccfg, announce=lambda m: None) as client:
        client.wait_for_workers(workers)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = run_pipeline(cfg, None)
        seconds, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
        worker_cpu = client.run(time.process_time)
    return {"workers": workers, "seconds": round(seconds, 1), "stage_seconds": rep["timings_s"],
            # CPU seconds of this process (the driver and, in a LocalCluster, the scheduler) and of
            # each worker process since it started: the driver shares the cores with the workers
            "driver_cpu_s": round(driver_cpu, 1), "worker_cpu_s": [round(v, 1) for v in worker_cpu.values()],
            "n_micrographs": rep["stages"]["ingest"]["n_micrographs"],
            "n_particles": rep["stages"].get("extract", {}).get("n_particles"),
            "micrographs_per_s": round(rep["stages"]["ingest"]["n_micrographs"] / seconds, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50, help="number of micrographs")
    ap.add_argument("--size", type=int, default=1024, help="micrograph size, px")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--stages", default=STAGES)
    ap.add_argument("--work", default="bench_scaling_work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per worker count, interleaved (1, 2, 1, 2, ...); medians are reported")
    args = ap.parse_args(argv)
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    sim = simulate(work, args.n, args.size, args.seed)
    # the driver's one-time imports (torch, the stage modules) outside the timed runs: else the
    # first run alone pays them
    import importlib

    from cryodask.cluster import limit_threads

    limit_threads()
    for mod in ("ingest", "preprocess", "ctf_estimate", "pick", "extract", "select", "align2d", "pipeline"):
        importlib.import_module(f"cryodask.{mod}")
    importlib.import_module("matplotlib.pyplot")  # the align2d gallery's, on the driver
    load0 = os.getloadavg()
    runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    for _ in range(args.repeat):
        for w in args.workers:
            r = measure(sim, work / f"run_w{w}", w, args.stages.split(","))
            runs[w].append(r)
            print(json.dumps(r), flush=True)
    med = {w: statistics.median(r["seconds"] for r in rs) for w, rs in runs.items()}
    base = med[args.workers[0]]
    summary = {"cpu_count": os.cpu_count(), "load_before": load0, "load_after": os.getloadavg(),
               "repeat": args.repeat, "median_seconds": med,
               "speedup": {w: round(base / m, 3) for w, m in med.items()}}
    if args.repeat > 1:  # the ratio within each interleaved pair shows how much the machine drifted
        first = args.workers[0]
        summary["speedup_per_repeat"] = {w: [round(a["seconds"] / b["seconds"], 3) for a, b in
                                             zip(runs[first], rs)] for w, rs in runs.items() if w != first}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
