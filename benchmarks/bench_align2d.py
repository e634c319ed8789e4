"""2D alignment benchmark: true errors of every variant, the paper's SSIM figures, throughput.

Simulates (seeded) KLH-like side views (box 128, 5 Å/px, particle ≈ 80 × 70 px, RELION CTF
300 kV / 2.7 mm / Q 0.1, defocus 1.0–2.5 µm, uniform in-plane angles, shifts uniform in ±5 px)
and apoferritin-like top views, caches them as ``.npz`` under ``--work``, and runs:

``table``       every registration variant (the paper's four and cryodask's) at each ``--snr``:
                true in-plane angle error (modulo 180°: a rectangle, and D5) and shift error
                after removing the one global rotation/shift (the same formula as
                ``../shared/checks/align_error.py``), the paper's SSIM figures (mask vs
                reference mask; particle vs its aligned version), seconds — the paper's Table 2
                with true errors added — plus a measured example of a wrong alignment scoring
                as high an SSIM as a right one. Single process, in memory.
``top``         apoferritin top-view centring error (disc centre vs truth) and selection.
``junk``        selection on a KLH set with 10 % injected junk (ice blobs, overlapping pairs,
                edge-cut particles): junk rejected, good rejected.
``throughput``  particles/s for masks + the default registration (features, selection, mask
                registration and intensity refinement: everything ``align2d`` computes before
                it writes) at box 128 through the Dask graph on a distributed.LocalCluster with
                1 and 2 single-threaded workers; the stack is read from an ``.mrcs`` by the
                workers. Also the workers' CPU time (process_time), whose ratio to the particle
                count does not depend on other processes; the load average is printed.

Usage::

    python benchmarks/bench_align2d.py table [--n 2000] [--snr 0.1 0.05 0.01] [--variants ...] [--work DIR]
        [--json OUT]
    python benchmarks/bench_align2d.py top [--n 1000] [--box 64 --pixel-size 3]
    python benchmarks/bench_align2d.py junk [--n 1000]
    python benchmarks/bench_align2d.py throughput [--n 2000] [--workers 1 2] [--chunk 500]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def simulate(name: str, n: int, box: int, apix: float, snr: float, views: str, shift: float, seed: int,
             work: Path):
    """Seeded simulated stack (noisy, clean, table), cached as npz in ``work``."""
    import pandas as pd

    from cryodask.phantoms import make_phantom, phantom_symmetry
    from cryodask.simulate import simulate_particles

    work.mkdir(parents=True, exist_ok=True)
    f = work / f"{name}_n{n}_b{box}_p{apix}_snr{snr}_{views}_s{shift}_seed{seed}.npz"
    if f.exists():
        d = np.load(f, allow_pickle=True)
        return d["noisy"], d["clean"], pd.DataFrame(d["table"].item())
    vol = make_phantom(name, box, apix)
    noisy, clean, table = simulate_particles(vol, n, apix, np.random.default_rng(seed), views=views, snr=snr,
                                             max_shift_px=shift, symmetry=phantom_symmetry(name))
    np.savez(f, noisy=noisy, clean=clean, table=np.array(table.to_dict("list"), dtype=object))
    return noisy, clean, table


def _defocus(table):
    return table[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy(np.float64)


def _truth_shift(table, apix):
    return table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(np.float64) / apix


def cmd_table(a) -> dict:
    import torch

    from cryodask.align2d import (VARIANTS, align_side_views, inplane_errors, relion_parameters,
                                  ssim_figures)
    from cryodask.select import particle_features, preprocess_particles, select_particles

    torch.set_num_threads(1)
    box, apix, diam = 128, 5.0, 400.0
    rows, demo = [], {}
    for snr in a.snr:
        noisy, _, table = simulate("klh", a.n, box, apix, snr, "side", 5.0, a.seed, a.work)
        d = _defocus(table)
        t0 = time.perf_counter()
        feats = particle_features(noisy, apix, view="side", diameter_A=diam, defocus=d)
        t_masks = time.perf_counter() - t0
        sel, _, _ = select_particles(feats)
        work = preprocess_particles(noisy, apix, work_box=64, lowpass_A=diam / 8, defocus=d)
        scale = box / 64
        for name in a.variants or list(VARIANTS):
            t0 = time.perf_counter()
            r = align_side_views(work, feats, scale=scale, weights=sel.astype(float), variant=name)
            secs = time.perf_counter() - t0
            rel = relion_parameters(r["theta_deg"], r["centres"] * scale, apix)
            est = np.stack([rel["rlnOriginXAngst"], rel["rlnOriginYAngst"]], 1) / apix
            err = inplane_errors(rel["rlnAnglePsi"], est, table["rlnAnglePsi"], _truth_shift(table, apix), 2)
            err_sel = inplane_errors(rel["rlnAnglePsi"][sel], est[sel], table["rlnAnglePsi"][sel],
                                     _truth_shift(table, apix)[sel], 2)
            ss = ssim_figures(work, feats, r, scale=scale)
            row = {"snr": snr, "variant": name, "n": int(len(noisy)), "selected": int(sel.sum()),
                   "psi_median_deg": err["psi_median_deg"], "psi_p90_deg": err["psi_p90_deg"],
                   "within_5deg": err["within_5deg"], "shift_median_px": err["shift_median_px"],
                   "sel_psi_median_deg": err_sel["psi_median_deg"], "sel_psi_p90_deg": err_sel["psi_p90_deg"],
                   "sel_shift_median_px": err_sel["shift_median_px"],
                   "ssim_mask_pct": 100 * float(np.mean(ss["mask"])), "ssim_image_pct": 100 * float(np.mean(ss["image"])),
                   "seconds": round(secs + t_masks, 2), "seconds_masks": round(t_masks, 2),
                   "particles_per_s": round(len(noisy) / (secs + t_masks), 1)}
            rows.append(row)
            print(f"snr {snr:<5} {name:17s} psi med {row['psi_median_deg']:6.2f} p90 {row['psi_p90_deg']:6.2f} "
                  f"≤5° {row['within_5deg']:.3f} shift med {row['shift_median_px']:5.2f} px | selected "
                  f"{row['selected']}: {row['sel_psi_median_deg']:6.2f}/{row['sel_psi_p90_deg']:6.2f}/"
                  f"{row['sel_shift_median_px']:5.2f} | SSIM mask {row['ssim_mask_pct']:6.2f} % image "
                  f"{row['ssim_image_pct']:6.2f} % | {row['seconds']:6.1f} s", flush=True)
            if snr == a.snr[0] and name in ("paper-affine", "global-refine"):
                e = err["psi_err_deg"]
                right, wrong = e < 2, e > 45
                demo[name] = {
                    "n_right(<2deg)": int(right.sum()), "n_wrong(>45deg)": int(wrong.sum()),
                    "ssim_mask_pct_right": 100 * float(np.mean(ss["mask"][right])) if right.any() else None,
                    "ssim_mask_pct_wrong": 100 * float(np.mean(ss["mask"][wrong])) if wrong.any() else None,
                    "ssim_image_pct_right": 100 * float(np.mean(ss["image"][right])) if right.any() else None,
                    "ssim_image_pct_wrong": 100 * float(np.mean(ss["image"][wrong])) if wrong.any() else None,
                }
                if name == "global-refine":  # every other particle deliberately turned by 180°
                    flip = np.arange(len(noisy)) % 2 == 1
                    turned = dict(r, theta_deg=r["theta_deg"] + 180.0 * flip)
                    st = ssim_figures(work, feats, turned, scale=scale)
                    demo["global-refine, every other particle turned by 180deg"] = {
                        "ssim_mask_pct_turned": 100 * float(np.mean(st["mask"][flip])),
                        "ssim_mask_pct_same_particles_unturned": 100 * float(np.mean(ss["mask"][flip])),
                        "ssim_image_pct_turned": 100 * float(np.mean(st["image"][flip])),
                        "ssim_image_pct_same_particles_unturned": 100 * float(np.mean(ss["image"][flip])),
                        "note": "a rectangle's mask is the same after 180 deg, so its SSIM cannot see the "
                                "turn, which is a 180 deg error for any particle without a 2-fold axis "
                                "across the view (this D5 phantom has one, so its truth is compared "
                                "modulo 180 deg)",
                    }
    print(json.dumps(demo, indent=1))
    return {"rows": rows, "wrong_alignment_ssim": demo}


def cmd_top(a) -> dict:
    import torch

    from cryodask.align2d import centre_top_views, inplane_errors
    from cryodask.select import FEATURES, particle_features, select_particles

    torch.set_num_threads(1)
    noisy, _, table = simulate("apoferritin", a.n, a.box, a.pixel_size, a.snr[0], "top", 5.0, a.seed, a.work)
    out = {}
    for view in ("top", "auto"):
        t0 = time.perf_counter()
        f = particle_features(noisy, a.pixel_size, view=view, diameter_A=120.0, defocus=_defocus(table))
        r = centre_top_views(noisy, f)
        secs = time.perf_counter() - t0
        sel, _, _ = select_particles(f)
        top = f[:, FEATURES.index("is_top")] > 0
        e = inplane_errors(np.zeros(len(f)), -r["centres"], np.zeros(len(f)), _truth_shift(table, a.pixel_size))
        es = e["shift_err_px"]
        out[view] = {"n": len(f), "classified_top": float(top.mean()), "selected": float(sel.mean()),
                     "centring_median_px": float(np.median(es)), "centring_p90_px": float(np.percentile(es, 90)),
                     "centring_median_px_selected": float(np.median(es[sel])) if sel.any() else None,
                     "centring_median_px_top": float(np.median(es[top])) if top.any() else None,
                     "seconds": round(secs, 2)}
        print(view, json.dumps(out[view]), flush=True)
    return out


def cmd_junk(a) -> dict:
    import torch

    from cryodask.select import inject_junk, particle_features, reason_text, select_particles

    torch.set_num_threads(1)
    noisy, clean, table = simulate("klh", a.n, 128, 5.0, a.snr[0], "side", 5.0, a.seed, a.work)
    imgs, kind = inject_junk(noisy, clean, np.random.default_rng(a.seed + 1), fraction=0.1, diameter_px=80,
                             noise_sigma=float(np.std(noisy - clean)))
    out = {}
    for view in ("side", "auto"):
        f = particle_features(imgs, 5.0, view=view, diameter_A=400.0, defocus=_defocus(table))
        sel, reasons, info = select_particles(f)
        junk = kind != ""
        res = {"junk_rejected": float((~sel[junk]).mean()), "good_rejected": float((~sel[~junk]).mean()),
               "n_junk": int(junk.sum()), "n_good": int((~junk).sum())}
        for k in ("ice", "pair", "edge"):
            s = kind == k
            res[f"{k}_rejected"] = float((~sel[s]).mean())
        res["good_reasons"] = {reason_text(q): int((reasons[~junk] == q).sum()) for q in np.unique(reasons[~junk])}
        out[view] = res
        print(view, json.dumps(res), flush=True)
    return out


def _write_star(noisy, table, apix, folder: Path) -> Path:
    from cryodask.io.mrc import write_stack
    from cryodask.io.star import format_image_name, write_particles
    from cryodask.model import microscope_attrs, particle_dataset

    folder.mkdir(parents=True, exist_ok=True)
    write_stack(folder / "particles.mrcs", noisy, pixel_size=apix)
    t = table.drop(columns=["cdViewClass"]).copy()
    t.insert(0, "rlnImageName", [format_image_name(i, "particles.mrcs") for i in range(len(t))])
    ds = particle_dataset(None, t, microscope_attrs(apix))
    write_particles(folder / "particles.star", ds)
    return folder / "particles.star"


def cmd_throughput(a) -> dict:
    from distributed import Client, LocalCluster

    from cryodask.align2d import masks_and_selection, side_alignment_graph
    from cryodask.cluster import limit_threads
    from cryodask.select import star_inputs

    noisy, _, table = simulate("klh", a.n, 128, 5.0, 0.1, "side", 5.0, a.seed, a.work)
    tmp = Path(tempfile.mkdtemp(prefix="bench_align2d_", dir=a.work))
    star = _write_star(noisy, table, 5.0, tmp)
    out = {"n": a.n, "box": 128, "chunk": a.chunk, "load_average_before": os.getloadavg()}
    for nw in a.workers:
        with LocalCluster(n_workers=nw, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
                Client(cluster) as client:
            client.run(limit_threads)
            times = []
            for rep in range(a.repeat + 1):  # the first run warms the workers up (imports, caches)
                cpu0 = client.run(time.process_time)
                t0 = time.perf_counter()
                ds, images, apix, defocus, optics = star_inputs(star, a.chunk)
                feats, sel, _, _ = masks_and_selection(images, apix, defocus=defocus, optics=optics, view="side",
                                                       diameter_A=400.0)
                t1 = time.perf_counter()
                res, info = side_alignment_graph(images, feats, sel, apix, defocus=defocus, optics=optics,
                                                 diameter_A=400.0)
                res.compute()
                t2 = time.perf_counter()
                cpu1 = client.run(time.process_time)
                if rep:
                    times.append((t2 - t0, t1 - t0, sum(cpu1[k] - cpu0[k] for k in cpu0)))
            best = min(times)
            out[f"workers_{nw}"] = {"seconds": round(best[0], 2), "seconds_masks": round(best[1], 2),
                                    "worker_cpu_seconds": round(best[2], 2),
                                    "particles_per_s": round(a.n / best[0], 1),
                                    "particles_per_worker_cpu_s": round(a.n / best[2], 1),
                                    "all_seconds": [round(t[0], 2) for t in times]}
            print(f"{nw} worker(s): {a.n} particles in {best[0]:.1f} s (masks {best[1]:.1f} s) → "
                  f"{a.n / best[0]:.0f} particles/s; workers' CPU {best[2]:.1f} s → {a.n / best[2]:.0f} particles per "
                  f"worker-CPU-second; runs {[round(t[0], 1) for t in times]}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    out["load_average_after"] = os.getloadavg()
    print("load average before/after:", out["load_average_before"], out["load_average_after"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["table", "top", "junk", "throughput"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--snr", type=float, nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=3.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "cryodask_bench_align2d")
    ap.add_argument("--variants", nargs="+", default=None, help="table: only these variants")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    defaults = {"table": (2000, [0.1, 0.05, 0.01]), "top": (1000, [0.1]), "junk": (1000, [0.1]),
                "throughput": (2000, [0.1])}
    a.n = a.n or defaults[a.mode][0]
    a.snr = a.snr or defaults[a.mode][1]
    sys.path.insert(0, str(ROOT))
    res = {"table": cmd_table, "top": cmd_top, "junk": cmd_junk, "throughput": cmd_throughput}[a.mode](a)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
