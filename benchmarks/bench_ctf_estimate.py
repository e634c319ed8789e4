#!/usr/bin/env python
"""CTF estimation: runtime per micrograph and accuracy against simulated ground truth.

Runtime: :func:`cryodask.ctf_estimate.estimate_ctf` on one micrograph (median of ``--repeat``
runs after one warm-up), for 1024², 1240×1200 (the EMPIAR-10146 apoferritin micrographs from
``../shared/data/apoferritin`` when present) and 4096² micrographs (synthetic CTF-filtered noise
at 1 Å/px), in this process (set OMP_NUM_THREADS / torch threads as you wish).

Accuracy: for each folder given with ``--sim`` (made by ``cryodask simulate``, truth in
``truth_particles.star``), the defocus error of every micrograph — |ΔU| and |ΔV| pooled (U ≥ V
on both sides), the mean-defocus error, and the astigmatism-angle error (mod 180°) where the
true |U − V| ≥ 1000 Å — with the median and the maximum. ``--diagnostics DIR`` writes the
CTFFIND-style PNG of every micrograph.

    python benchmarks/bench_ctf_estimate.py [--sim DIR ...] [--real] [--repeat 3] [--json OUT]
                                            [--diagnostics DIR] [--expected-astigmatism 500]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from cryodask.ctf import ctf_2d
from cryodask.ctf_estimate import estimate_ctf, plot_ctf_diagnostic

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "apoferritin"


def synthetic(shape, px, u, v, angle, seed):
    ny, nx = shape
    rng = np.random.default_rng(seed)
    ky = torch.fft.fftfreq(ny, px)[:, None].expand(ny, nx // 2 + 1)
    kx = torch.fft.rfftfreq(nx, px)[None, :].expand(ny, nx // 2 + 1)
    c = ctf_2d(ky, kx, u, v, angle, 300.0, 2.7, 0.1, bfactor=50.0).numpy()
    sig = np.fft.irfft2(np.fft.rfft2(rng.normal(size=shape)) * c, s=shape)
    return (0.7 * sig + rng.normal(size=shape)).astype(np.float32)


def timing(img, px, repeat, **kw):
    estimate_ctf(img, px, **kw)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        estimate_ctf(img, px, **kw)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def accuracy(folder: Path, kw, diag_dir=None):
    import mrcfile
    import starfile

    st = starfile.read(folder / "truth_particles.star")
    px = float(st["optics"]["rlnImagePixelSize"].iloc[0])
    truth = st["particles"].groupby("rlnMicrographName")[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].first()
    uv, mean_err, ang, rows = [], [], [], []
    for name, row in truth.iterrows():
        img = mrcfile.read(folder / name)
        fit = estimate_ctf(img, px, return_fit=True, **kw)
        tu, tv, ta = row.rlnDefocusU, row.rlnDefocusV, row.rlnDefocusAngle
        if tu < tv:
            tu, tv, ta = tv, tu, ta + 90.0
        uv += [abs(fit.defocus_u - tu), abs(fit.defocus_v - tv)]
        mean_err.append(abs((fit.defocus_u + fit.defocus_v) / 2 - (tu + tv) / 2))
        da = (fit.defocus_angle - ta + 90.0) % 180.0 - 90.0
        if tu - tv >= 1000:
            ang.append(abs(da))
        rows.append(dict(micrograph=name, truth=[tu, tv, ta % 180], fit=[fit.defocus_u, fit.defocus_v,
                         fit.defocus_angle], fom=fit.figure_of_merit, fit_resolution=fit.max_resolution))
        if diag_dir:
            out = Path(diag_dir) / f"{folder.name}_{Path(name).stem}.png"
            plot_ctf_diagnostic(fit, out, title=f"{folder.name}/{name}",
                                truth=dict(rlnDefocusU=tu, rlnDefocusV=tv, rlnDefocusAngle=ta))
    med = lambda x: float(np.median(x)) if x else math.nan  # noqa: E731
    return dict(folder=str(folder), pixel_size=px, n=len(truth),
                defocus_err_median=med(uv), defocus_err_max=float(np.max(uv)),
                mean_defocus_err_median=med(mean_err),
                angle_err_median=med(ang), angle_err_max=float(np.max(ang)) if ang else math.nan,
                n_angle=len(ang), micrographs=rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sim", nargs="*", default=[], help="simulation folders (cryodask simulate --out)")
    ap.add_argument("--real", action="store_true", help="also fit the EMPIAR-10146 micrographs (no truth)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--expected-astigmatism", type=float, default=None)
    ap.add_argument("--diagnostics", default=None, help="folder for diagnostic PNGs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    kw = {} if a.expected_astigmatism is None else dict(expected_astigmatism=a.expected_astigmatism)
    if a.diagnostics:
        Path(a.diagnostics).mkdir(parents=True, exist_ok=True)
    out = dict(torch_threads=torch.get_num_threads(), timing_s={}, accuracy=[], real=[])
    if not a.no_timing:
        img = synthetic((1024, 1024), 3.0, 20000, 19000, 30, 0)
        out["timing_s"]["1024x1024 @3A"] = timing(img, 3.0, a.repeat, **kw)
        if DATA.exists():
            import mrcfile

            img = mrcfile.read(sorted(DATA.glob("*.mrc"))[0])
            out["timing_s"]["1240x1200 @1.5A (EMPIAR-10146)"] = timing(img, 1.5, a.repeat, **kw)
        img = synthetic((4096, 4096), 1.0, 15000, 14500, -20, 1)
        out["timing_s"]["4096x4096 @1A"] = timing(img, 1.0, a.repeat, **kw)
        for k, v in out["timing_s"].items():
            print(f"time {k}: {v:.2f} s")
    for folder in a.sim:
        r = accuracy(Path(folder), kw, a.diagnostics)
        out["accuracy"].append(r)
        print(f"{folder}: n={r['n']} defocus |err| median {r['defocus_err_median']:.0f} Å "
              f"max {r['defocus_err_max']:.0f} Å; mean-defocus |err| median {r['mean_defocus_err_median']:.0f} Å; "
              f"angle |err| (|U-V|>=1000 Å, n={r['n_angle']}) median {r['angle_err_median']:.1f}° "
              f"max {r['angle_err_max']:.1f}°")
    if a.real and DATA.exists():
        import mrcfile

        for f in sorted(DATA.glob("*.mrc")):
            fit = estimate_ctf(mrcfile.read(f), 1.5, return_fit=True, **kw)
            out["real"].append(dict(micrograph=f.name, **fit.as_dict()))
            print(f"{f.name}: U {fit.defocus_u:.0f} V {fit.defocus_v:.0f} angle {fit.defocus_angle:.1f} "
                  f"FOM {fit.figure_of_merit:.3f} fit to {fit.max_resolution:.1f} Å")
            if a.diagnostics:
                plot_ctf_diagnostic(fit, Path(a.diagnostics) / f"real_{f.stem}.png", title=f.name)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
