"""Peak memory per worker vs the number of micrographs (issue 6: it must stay flat).

Simulates N small micrographs (default 512², apoferritin-like at 3 Å/px; cached in --work), then
runs ingest → preprocess → pick → extract on a fresh 2-worker ``distributed.LocalCluster`` and
reports, per worker process, the peak resident set size (Linux ``VmHWM``, read on the worker at
the end: the true peak of that process, start-up included; not ``ru_maxrss``, which a spawned
worker inherits from the driver) and
the largest RSS seen by a 0.25 s sampler; also the driver's (this process's) peak. With two or
more counts it prints the ratio of the largest to the smallest worker peak.

    python benchmarks/bench_memory.py --n 50 500
    python benchmarks/bench_memory.py --n 50 --size 512 --workers 2 --stages ingest,preprocess,pick,extract

Run it on an otherwise idle machine for timings; the memory figures do not depend on load.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MiB = 1024 * 1024


def simulate(work: Path, n: int, size: int, seed: int) -> Path:
    sim = work / f"sim_{n}x{size}"
    mics = sim / "micrographs"
    if (sim / "simulation.json").exists() and len(list(mics.glob("*.mrc"))) == n:
        return sim
    # a larger simulation with the same settings already there: link its first n micrographs
    for big in sorted(work.glob(f"sim_*x{size}")):
        files = sorted((big / "micrographs").glob("*.mrc"))
        if (big / "simulation.json").exists() and len(files) > n:
            mics.mkdir(parents=True, exist_ok=True)
            for f in files[:n]:
                if not (mics / f.name).exists():
                    (mics / f.name).symlink_to(f)
            (sim / "simulation.json").write_text((big / "simulation.json").read_text())
            return sim
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cryodask", "simulate", "--volume", "apoferritin", "--n-micrographs", str(n),
                    "--micrograph-size", str(size), "--pixel-size", "3", "--seed", str(seed), "--out", str(sim),
                    "--cluster", "local", "--workers", "2"], check=True, stdout=subprocess.DEVNULL)
    print(f"simulated {n} micrographs of {size}² in {time.perf_counter() - t0:.0f} s -> {sim}", file=sys.stderr)
    return sim


def _worker_peak() -> dict:
    import psutil

    from cryodask.runtime import peak_rss_mib

    return {"maxrss_MiB": peak_rss_mib(),
            "rss_MiB": psutil.Process().memory_info().rss / MiB, "pid": os.getpid()}


def _worker_rss() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MiB


def measure(sim: Path, out: Path, workers: int, stages: list[str]) -> dict:
    import shutil

    from cryodask.cluster import ClusterConfig, client_for
    from cryodask.pipeline import RunConfig, run_pipeline
    from cryodask.runtime import peak_rss_mib

    shutil.rmtree(out, ignore_errors=True)
    cfg = RunConfig.load(None, overrides={"micrographs": [str(sim / "micrographs" / "*.mrc")], "pixel_size": 3.0,
                                          "diameter": 120.0, "seed": 0, "out": str(out), "stages": stages})
    ccfg = ClusterConfig(n_workers=workers, processes=True, dashboard_address=":0")
    with client_for(ccfg, announce=lambda m: None) as client:
        client.wait_for_workers(workers)
        start = client.run(_worker_peak)
        sampled = {w: 0.0 for w in start}
        per_stage: dict[str, float] = {}
        stop = threading.Event()
        log = out / "run.log"

        def current_stage() -> str:
            try:
                starts = [ln.split("stage ")[1].split(":")[0] for ln in log.read_text().splitlines()
                          if ": start" in ln and " stage " in ln]
                return starts[-1] if starts else "-"
            except OSError:
                return "-"

        def sample():
            while not stop.is_set():
                try:
                    stage = current_stage()
                    for w, r in client.run(_worker_rss).items():
                        sampled[w] = max(sampled.get(w, 0.0), r)
                        per_stage[stage] = round(max(per_stage.get(stage, 0.0), r), 1)
                except Exception:  # noqa: BLE001 - a sample lost while the cluster is busy
                    pass
                stop.wait(0.25)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.perf_counter()
        rep = run_pipeline(cfg, None)
        seconds = time.perf_counter() - t0
        stop.set()
        th.join()
        end = client.run(_worker_peak)
    assert {w: v["pid"] for w, v in end.items()} == {w: v["pid"] for w, v in start.items()}, "a worker restarted"
    st = rep["stages"]
    return {
        "n_micrographs": st["ingest"]["n_micrographs"],
        "n_picks": st.get("pick", {}).get("n_picks"),
        "n_particles": st.get("extract", {}).get("n_particles"),
        "seconds": round(seconds, 1),
        "stage_seconds": rep["timings_s"],
        "worker_peak_MiB": sorted(round(v["maxrss_MiB"], 1) for v in end.values()),
        "worker_idle_MiB": sorted(round(v["rss_MiB"], 1) for v in start.values()),
        "worker_sampled_max_MiB": sorted(round(v, 1) for v in sampled.values()),
        "worker_sampled_max_by_stage_MiB": per_stage,
        "driver_peak_MiB": round(peak_rss_mib(), 1),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[50], help="micrograph counts to compare (e.g. 50 500)")
    ap.add_argument("--size", type=int, default=512, help="micrograph size, px (square)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--stages", default="ingest,preprocess,pick,extract")
    ap.add_argument("--work", default="bench_memory_work", help="folder for the simulated data and the runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    results = []
    for n in args.n:
        sim = simulate(work, n, args.size, args.seed)
        # each count in a fresh process: the driver's peak must not carry over from the previous count
        r = subprocess.run([sys.executable, __file__, "--_measure", str(sim), str(work / f"run_{n}"),
                            str(args.workers), ",".join(stages)], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stderr[-4000:], file=sys.stderr)
            return 1
        res = json.loads(r.stdout.strip().splitlines()[-1])
        results.append(res)
        print(json.dumps(res))
    if len(results) > 1:
        peaks = [max(r["worker_peak_MiB"]) for r in results]
        print(json.dumps({"counts": [r["n_micrographs"] for r in results], "max_worker_peak_MiB": peaks,
                          "ratio_largest_to_smallest": round(max(peaks) / min(peaks), 3)}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_measure":
        sim, out, workers, stages = sys.argv[2:6]
        print(json.dumps(measure(Path(sim), Path(out), int(workers), stages.split(","))))
        sys.exit(0)
    sys.exit(main())
