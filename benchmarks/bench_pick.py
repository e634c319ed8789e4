#!/usr/bin/env python
"""Throughput of preprocess + IBC pick as a Dask graph, 1 vs 2 workers.

Micrographs per second for the whole ``cryodask.pick.pick_graph(..., method="ibc")`` (read
from a zarr store → preprocess → pick, one task chain per micrograph) on a
``distributed.LocalCluster`` with ``n_workers`` = 1 and 2 (``threads_per_worker=1``, one process
per worker; OpenCV and BLAS limited to one thread in the workers), for 1240×1200 and
4096×4096 micrographs, and the peak resident memory of every worker process (Linux ``VmHWM`` of
a fresh cluster; ``ru_maxrss`` would report the driver's peak, which spawned workers inherit).
Each configuration is run ``--repeat`` times, the worker counts interleaved
(1, 2, 1, 2, …) so that slow drifts of the machine hit both alike; the medians are reported and
the scaling is the ratio of the median throughputs. The machine's load average is printed:
other processes sharing the cores distort the scaling.

Micrographs: the EMPIAR-10146 apoferritin micrographs from ``../shared/data/apoferritin``
(1240×1200, tiled with mirroring into 4096×4096 mosaics) when present, else synthetic
apoferritin-like rings in noise. Pixel size 1.5 Å, particle diameter 115 Å.

    python benchmarks/bench_pick.py [--n-small 24] [--n-large 6] [--workers 1,2] [--repeat 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np

PIXEL, DIAMETER = 1.5, 115.0
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "apoferritin"


def _synthetic(shape, seed):
    rng = np.random.default_rng(seed)
    ny, nx = shape
    img = np.zeros(shape, np.float32)
    d = DIAMETER / PIXEL
    yy, xx = np.ogrid[:ny, :nx]
    for _ in range(int(0.5 * ny * nx / (d * d))):
        cy, cx = rng.uniform(0, ny), rng.uniform(0, nx)
        r = np.hypot(yy - cy, xx - cx)
        img -= ((r > 0.25 * d) & (r < 0.5 * d)).astype(np.float32)
    return 32768 + 3000 * img + rng.normal(0, 6000, shape).astype(np.float32)


def _sources():
    if DATA.exists():
        import mrcfile

        return [mrcfile.read(p).astype(np.float32) for p in sorted(DATA.glob("*.mrc"))], "EMPIAR-10146 apoferritin"
    return [_synthetic((1200, 1240), s) for s in range(4)], "synthetic rings"


def _mosaic(srcs, shape, seed):
    rng = np.random.default_rng(seed)
    out = np.empty(shape, np.float32)
    ny, nx = srcs[0].shape
    for y in range(0, shape[0], ny):
        for x in range(0, shape[1], nx):
            tile = srcs[rng.integers(len(srcs))]
            if rng.random() < 0.5:
                tile = tile[:, ::-1]
            if rng.random() < 0.5:
                tile = tile[::-1]
            h, w = min(ny, shape[0] - y), min(nx, shape[1] - x)
            out[y:y + h, x:x + w] = tile[:h, :w]
    return out


def run_one(store: str, n_workers: int, names):
    from distributed import Client

    from cryodask.cluster import ClusterConfig, make_cluster, worker_setup
    from cryodask.pick import pick_graph
    from cryodask.runtime import peak_rss_mib

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"  # inherited by the worker processes
    # the LocalCluster `cryodask run` starts (its scheduler settings included)
    cfg = ClusterConfig(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                        memory_limit="6GiB")
    with make_cluster(cfg) as cluster, Client(cluster) as client:
        arr = da.from_zarr(store)
        client.run(lambda: __import__("cryodask.pick"))  # import cost outside the timing
        client.run(worker_setup)  # one OpenCV/torch thread, malloc settings: as `cryodask run` sets
        cpu0 = client.run(time.process_time)
        t0, c0 = time.perf_counter(), time.process_time()
        graph = pick_graph(arr, names, PIXEL, DIAMETER, method="ibc")
        results = dask.compute(graph)[0]
        wall, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
        cpu1 = client.run(time.process_time)
        rss = client.run(peak_rss_mib)
    n_picks = int(sum(len(v) for v in results.values()))
    # CPU seconds of the run in each worker process and in this one (the driver and the
    # scheduler, which share the cores with the workers): the workers' sum grows when the
    # cores slow each other down, and drifts with the machine's speed
    return {"workers": n_workers, "wall_s": wall, "micrographs_per_s": len(names) / wall,
            "peak_rss_mb_per_worker": sorted(rss.values()), "picks": n_picks,
            "worker_cpu_s": [round(cpu1[w] - cpu0[w], 2) for w in sorted(cpu1)], "driver_cpu_s": round(driver_cpu, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-small", type=int, default=24, help="number of 1240×1200 micrographs")
    ap.add_argument("--n-large", type=int, default=6, help="number of 4096×4096 micrographs")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--repeat", type=int, default=3, help="runs per configuration (interleaved)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import zarr

    srcs, kind = _sources()
    tmp = Path(tempfile.mkdtemp(prefix="bench_pick_"))
    report = {"source": kind, "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(), "runs": []}
    try:
        for label, shape, n in (("1240x1200", (1200, 1240), a.n_small), ("4096x4096", (4096, 4096), a.n_large)):
            if n <= 0:
                continue
            if shape == srcs[0].shape:
                stack = np.stack([srcs[i % len(srcs)] for i in range(n)])
            else:
                stack = np.stack([_mosaic(srcs, shape, i) for i in range(n)])
            store = str(tmp / f"{label}.zarr")
            z = zarr.open_array(store, mode="w", shape=stack.shape, chunks=(1, *shape), dtype="f4")
            z[:] = stack
            names = [f"{label}_{i:03d}" for i in range(n)]
            workers = [int(x) for x in a.workers.split(",")]
            runs = {w: [] for w in workers}
            for rep in range(a.repeat):
                for w in workers:
                    r = run_one(store, w, names)
                    r.update(size=label, n_micrographs=n, repeat=rep)
                    report["runs"].append(r)
                    runs[w].append(r)
                    rss = ", ".join(f"{m:.0f}" for m in r["peak_rss_mb_per_worker"])
                    cpu = ", ".join(f"{c:.1f}" for c in r["worker_cpu_s"])
                    print(f"{label}  workers={w}  run {rep + 1}/{a.repeat}  {r['micrographs_per_s']:.3f} micrographs/s  "
                          f"(wall {r['wall_s']:.1f} s, {r['picks']} picks)  peak RSS per worker {rss} MB  "
                          f"CPU s per worker {cpu}, driver {r['driver_cpu_s']:.1f}", flush=True)
            med = {w: float(np.median([r["micrographs_per_s"] for r in rs])) for w, rs in runs.items()}
            report.setdefault("median_micrographs_per_s", {})[label] = med
            for w in workers:
                print(f"{label}  workers={w}  median {med[w]:.3f} micrographs/s", flush=True)
            if 1 in med and 2 in med:
                s = med[2] / med[1]
                report.setdefault("scaling_1_to_2", {})[label] = s
                per_run = [b["micrographs_per_s"] / a_["micrographs_per_s"] for a_, b in zip(runs[1], runs[2])]
                print(f"{label}  scaling 1 → 2 workers (median throughputs): {s:.2f}×  "
                      f"(per interleaved pair: {', '.join(f'{x:.2f}' for x in per_run)})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_avg_end"] = os.getloadavg()
    print(f"load average start {report['load_avg_start']}, end {report['load_avg_end']} on {report['cpu_count']} CPUs")
    if a.json:
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
