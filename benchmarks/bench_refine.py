"""Refinement from no initial model, measured against ground truth (issue 5's acceptance).

For each dataset — ``apo`` (apoferritin-like phantom, O, 3 Å/px), ``klh`` (KLH-like phantom, D5,
10 Å/px), ``ribo`` (the real 70S ribosome map, C1, 5 Å/px; needs ../shared/data) — simulates
(seeded) N particles at 64 px, SNR 0.1 over the box, CTF 1.0–2.5 µm, uniform orientations,
origins up to ±3 px; then

1. reconstructs the same stack with the TRUE poses (:func:`cryodask.reconstruct.reconstruct_graph`)
   — the limit the data set — and measures its FSC against the truth;
2. refines from no model (:func:`cryodask.refine.refine_particles`, ``initial="auto"``), writes its
   outputs (map, halves, FSC, angular distribution, particles.star + stack) to ``WORK/<name>``;
3. superposes the refined map on the truth (rotation, translation, hand:
   :func:`cryodask.map_align.align_map`) and measures its FSC against the truth;

and prints one JSON line per dataset: wall and process-CPU seconds of the refinement, the initial
model used, the gold-standard half-map FSC0.143/0.5, the FSC-vs-truth 0.143/0.5 of the refined
and of the known-pose map, and the two acceptance ratios:
``truth0.143(refined) / truth0.143(known poses)`` (≤ 1.15) and
``|half0.143 − truth0.5| / truth0.5`` (≤ 0.10).

Usage::

    python benchmarks/bench_refine.py [--sets apo,klh,ribo] [--n 2000] [--fast] [--threads 2] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RIBO = ROOT / ".." / "shared" / "data" / "volumes" / "ribosome70S_65.mrc"


def dataset(name: str, n: int, seed: int):
    from cryodask.phantoms import make_phantom
    from cryodask.simulate import CTFRange, simulate_particles

    if name == "apo":
        vol, apix, sym, diam = make_phantom("apoferritin", 64, 3.0), 3.0, "O", 130.0
    elif name == "klh":
        vol, apix, sym, diam = make_phantom("klh", 64, 10.0), 10.0, "D5", 420.0
    elif name == "ribo":
        import mrcfile

        with mrcfile.open(RIBO, permissive=True) as m:
            vol = np.asarray(m.data, np.float32)[:64, :64, :64].copy()
        apix, sym, diam = 5.0, "C1", 260.0
    else:
        raise ValueError(name)
    noisy, _, table = simulate_particles(vol, n, apix, np.random.default_rng(seed), snr=0.1,
                                         ctf=CTFRange(10000, 25000), max_shift_px=3.0, symmetry=sym)
    return noisy, table.drop(columns=["cdViewClass"]), vol, apix, sym, diam


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="apo,klh,ribo")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fast", action="store_true", help="RefineSettings.fast() (the demo's setting)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--work", default=str(ROOT / "scratch" / "bench_refine"))
    ap.add_argument("--skip-known", action="store_true")
    a = ap.parse_args()

    import dask
    import torch

    from cryodask.fsc import fsc_curve, resolution
    from cryodask.map_align import align_map
    from cryodask.reconstruct import reconstruct_graph
    from cryodask.refine import RefineSettings, refine_particles, write_refinement_outputs
    from cryodask.simulate import Optics

    for name in a.sets.split(","):
        if name == "ribo" and not RIBO.exists():
            print(json.dumps({"name": name, "skipped": "../shared/data absent"}))
            continue
        imgs, table, vol, apix, sym, diam = dataset(name, a.n, a.seed)
        out = {"name": name, "n": a.n, "symmetry": sym, "pixel_size": apix, "fast": a.fast}
        if not a.skip_known:
            torch.set_num_threads(1)
            g = reconstruct_graph(imgs, table, pixel_size=apix, optics=Optics(), symmetry=sym, chunk=500)
            rec = dask.compute(g, scheduler="threads", num_workers=a.threads)[0]
            out["known_truth"] = {k: round(v, 2) for k, v in resolution(fsc_curve(rec.map, vol), apix, 64).items()}
        blind = table.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                                    "rlnOriginYAngst"])
        t0, c0 = time.perf_counter(), time.process_time()
        res = refine_particles(imgs, blind, apix, Optics(), symmetry=sym, diameter=diam, seed=a.seed,
                               initial="auto", settings=RefineSettings.fast() if a.fast else None,
                               threads=a.threads, log=lambda m: print(m, file=sys.stderr, flush=True))
        out["wall_s"] = round(time.perf_counter() - t0, 1)
        out["cpu_s"] = round(time.process_time() - c0, 1)
        work = Path(a.work) / (name + ("_fast" if a.fast else ""))
        write_refinement_outputs(work, res, imgs, apix)
        out["initial"] = res["initial"]
        out["iterations"] = len(res["history"])
        out["half"] = {k: round(v, 2) for k, v in res["resolution"].items()}
        aligned, info = align_map(res["map"], vol, symmetry=sym)
        out["truth"] = {k: round(v, 2) for k, v in resolution(fsc_curve(aligned, vol), apix, 64).items()}
        out["hand_flipped"] = info["flipped"]
        if "known_truth" in out:
            out["ratio_truth0.143_vs_known"] = round(out["truth"]["fsc0.143"] / out["known_truth"]["fsc0.143"], 3)
        out["half0.143_vs_truth0.5"] = round(abs(out["half"]["fsc0.143"] - out["truth"]["fsc0.5"])
                                             / out["truth"]["fsc0.5"], 3)
        print(json.dumps(out, default=float), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
