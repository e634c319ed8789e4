#!/usr/bin/env python
"""The pipeline's torch kernels on the CPU and on a CUDA GPU: seconds, throughput, speed-up.

Each kernel runs on the same seeded inputs, once as a warm-up and then ``--repeat`` times (the
median is reported), on the CPU with ``--cpu-threads`` torch threads (default: every core) and on
``cuda`` (synchronised before the clock stops). The agreement of the two results is printed too
(the GPU tests in ``tests/test_gpu.py`` assert it). Kernels:

``backproject``  :func:`cryodask.reconstruct.accumulate` + :func:`~cryodask.reconstruct.finalize`
                 of ``--n-backproject`` particles at 128 px with CTF (C1), 2.5 Å/px.
``search``       the first global orientation search of refinement
                 (:func:`cryodask.refine.global_search`, 7.5° directions over the whole sphere × all
                 ψ × shifts ±3 px) of ``--n-search`` particles at 64 px, then the local search.
``register``     2D side-view mask registration (:func:`cryodask.align2d.register_side_masks`,
                 the default variant) of ``--n-register`` masks on a 64 px grid.
``deep``         DeepCryoPicker-style network: 300 training steps, and the dense score map of a
                 1024×1024 net-scale image (8 dihedral copies).
``spectrum``     the power spectrum of a 4096×4096 micrograph (:func:`cryodask.ctf_estimate.power_spectrum`).

Prints one JSON line per kernel and device; ``--json`` writes them all. Without CUDA only the CPU
is measured.

    python benchmarks/bench_gpu.py [--kernels backproject,search,register,deep,spectrum] [--repeat 3]
        [--cpu-threads N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def _sync(dev):
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, repeat):
    out = fn()  # warm-up: CUDA context, cuFFT plans, caches
    _sync(dev)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def _as_np(x):
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    if isinstance(x, tuple):
        return _as_np(x[0])
    return np.asarray(x)


def k_backproject(n):
    from cryodask.geometry import random_rotations
    from cryodask.reconstruct import accumulate, finalize
    from cryodask.simulate import Optics

    rng = np.random.default_rng(0)
    box = 128
    imgs = rng.normal(size=(n, box, box)).astype(np.float32)
    rots = random_rotations(n, rng)
    org = rng.uniform(-3, 3, (n, 2))
    dfc = np.stack([rng.uniform(1e4, 2.5e4, n), rng.uniform(1e4, 2.5e4, n), rng.uniform(0, 180, n)], 1)
    ss = np.full(box // 2 + 1, 10.0)

    def run(dev):
        return lambda: finalize(accumulate(imgs, rots, org, dfc, pixel_size=2.5, optics=Optics(), device=dev), ss)

    return run, n, "particles"


def k_search(n):
    from cryodask import refine as R
    from cryodask.phantoms import make_phantom
    from cryodask.simulate import CTFRange, Optics, simulate_particles

    box, apix = 64, 3.0
    vol = make_phantom("apoferritin", box, apix)
    noisy, _, t = simulate_particles(vol, n, apix, np.random.default_rng(1), snr=0.1, ctf=CTFRange(10000, 25000),
                                     max_shift_px=3.0)
    dfc = t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()
    rots = R.rotations_from_directions(R.direction_grid(7.5, "C1"))

    def run(dev):
        def f():
            x = R.normalise_images(noisy, 22, device=dev)
            vol2 = R.reference_volume(vol, device=dev)
            grid = R.polar_grid(box, 8, diameter_px=44, device=dev)
            data = R.prepare_chunk(x, dfc, grid, apix, Optics(), np.ones(box // 2 + 1), support=28)
            rr, oo, _ = R.global_search(data, R.reference_slices(vol2, rots, grid), rots, R.shift_grid(3, 1), top=1)
            grid2 = R.polar_grid(box, 16, diameter_px=44, device=dev)
            data2 = R.prepare_chunk(x, dfc, grid2, apix, Optics(), np.ones(box // 2 + 1), support=28)
            r2, o2, s2 = R.local_search(data2, vol2, rr[:, 0], oo[:, 0], angle_step=math.radians(3), shift_step=0.5,
                                        min_angle=math.radians(0.5), min_shift=0.1, psi_window=math.radians(8))
            return torch.as_tensor(np.asarray(s2, np.float32))
        return f

    return run, n, "particles"


def k_register(n):
    from cryodask.align2d import register_side_masks
    from cryodask.select import FEATURES

    rng = np.random.default_rng(4)
    F = {k: i for i, k in enumerate(FEATURES)}
    f = np.zeros((n, len(FEATURES)))
    f[:, F["found"]] = 1
    f[:, F["length"]], f[:, F["width"]] = 40.0 + rng.normal(0, 1, n), 32.0 + rng.normal(0, 1, n)
    f[:, F["angle"]] = rng.uniform(0, 180, n)
    f[:, F["x"]], f[:, F["y"]] = rng.uniform(-3, 3, (2, n))

    def run(dev):
        return lambda: torch.as_tensor(register_side_masks(f, 40.0, 32.0, 64, 1.0, device=dev)[:, 0])

    return run, n, "masks"


def k_deep(_n):
    from cryodask import pick_deep as PD

    rng = np.random.default_rng(1)
    s = PD.PickerNet.patch_size
    x = rng.normal(size=(2400, s, s)).astype(np.float32)  # 300 steps of 8
    y = rng.integers(0, 3, (2400, 1, 1))
    img = rng.normal(size=(1024, 1024)).astype(np.float32)

    def run(dev):
        def f():
            m = PD.train_picker(x, y, seed=0, epochs=1, min_steps=300, device=dev)
            return torch.as_tensor(PD.score_map(m, img, dev))
        return f

    return run, 1, "train+score"


def k_spectrum(_n):
    from cryodask.ctf_estimate import power_spectrum

    img = np.random.default_rng(5).normal(size=(4096, 4096)).astype(np.float32)

    def run(dev):
        return lambda: torch.as_tensor(power_spectrum(img, tile=512, device=dev))

    return run, 1, "micrographs"


KERNELS = {"backproject": k_backproject, "search": k_search, "register": k_register, "deep": k_deep,
           "spectrum": k_spectrum}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", default=",".join(KERNELS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cpu-threads", type=int, default=os.cpu_count())
    ap.add_argument("--n-backproject", type=int, default=5000)
    ap.add_argument("--n-search", type=int, default=256)
    ap.add_argument("--n-register", type=int, default=1000)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.cpu_threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    head = {"torch": torch.__version__, "cpu_count": os.cpu_count(), "cpu_threads": a.cpu_threads,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(json.dumps(head), flush=True)
    rows = []
    for name in a.kernels.split(","):
        n = {"backproject": a.n_backproject, "search": a.n_search, "register": a.n_register}.get(name, 1)
        run, count, unit = KERNELS[name](n)
        results = {}
        for dev in devices:
            out, sec = _timed(run(dev), dev, a.repeat)
            results[dev] = _as_np(out)
            row = {"kernel": name, "device": dev, "n": count, "unit": unit, "seconds": round(sec, 4),
                   "per_second": round(count / sec, 2)}
            if dev != "cpu":
                cpu = next(r for r in rows if r["kernel"] == name and r["device"] == "cpu")
                row["speedup_vs_cpu"] = round(cpu["seconds"] / sec, 2)
                ref = results["cpu"]
                row["max_abs_diff_rel"] = float(np.abs(results[dev] - ref).max() / max(np.abs(ref).max(), 1e-30))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps({**head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
