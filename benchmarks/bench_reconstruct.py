"""Known-pose reconstruction benchmark: cryodask vs relion_reconstruct on the same STAR.

Simulates (seeded) particle stacks from the real 70S ribosome map (../shared/data/volumes), at
64 px / 5 Å/px (N = 10,000) and 128 px / 2.5 Å/px (N = 20,000), SNR 0.1 over the box, RELION CTF
(300 kV, Cs 2.7 mm, Q 0.1, defocus 1.0–2.5 µm), uniform orientations, shifts up to 3 px; writes
them as ``.mrcs`` + RELION 3.1 particle STAR; then runs ``relion_reconstruct --ctf`` (when
installed) and ``python -m cryodask.reconstruct`` on that STAR, each as a separate process timed
from the outside (wall time, python start-up included), and prints

    N  box  tool  wall_s  FSC0.5_A  FSC0.143_A

with the FSC measured against the noise-free volume by ``../shared/checks/fsc.py``'s algorithm.

Usage::

    python benchmarks/bench_reconstruct.py [--work DIR] [--sets 64,128] [--threads 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
VOLUME = SHARED / "data" / "volumes" / "ribosome70S_65.mrc"

SETS = {  # box: (n particles, pixel size Å)
    64: (10_000, 5.0),
    128: (20_000, 2.5),
}


def truth_volume(box: int) -> np.ndarray:
    """The ribosome at ``box`` px: the 65³ map cropped to 64³ (voxel 32 at the centre), or
    resampled ×2 by cubic interpolation about that centre for 128 px (2.5 Å/px)."""
    with mrcfile.open(VOLUME, permissive=True) as m:
        v = np.asarray(m.data, dtype=np.float32)
    if box == 64:
        return np.ascontiguousarray(v[:64, :64, :64])
    from scipy.ndimage import map_coordinates

    f = 64 // (box // 2) if box < 128 else None
    scale = box / 64
    c = 32 + (np.arange(box) - box // 2) / scale
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return map_coordinates(v, [z, y, x], order=3, mode="constant").astype(np.float32)


def write_stack(out: Path, images: np.ndarray, table, pixel_size: float, optics) -> Path:
    """Write ``particles.mrcs`` and a RELION 3.1 ``particles.star`` referencing it."""
    import pandas as pd
    import starfile

    out.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(out / "particles.mrcs", overwrite=True) as m:
        m.set_data(images.astype(np.float32))
        m.voxel_size = pixel_size
    box = images.shape[-1]
    opt = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
        "rlnVoltage": [optics.voltage], "rlnSphericalAberration": [optics.cs],
        "rlnAmplitudeContrast": [optics.amplitude_contrast], "rlnImagePixelSize": [pixel_size],
        "rlnImageSize": [box], "rlnImageDimensionality": [2],
    })
    n = len(images)
    parts = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)]})
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
              "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        parts[c] = table[c].to_numpy()
    parts["rlnOpticsGroup"] = 1
    star = out / "particles.star"
    starfile.write({"optics": opt, "particles": parts}, star, overwrite=True)
    return star


def simulate(out: Path, box: int, seed: int = 0) -> Path:
    """Simulate the stack for ``box`` into ``out`` (skipped when already there)."""
    star = out / "particles.star"
    if star.exists() and (out / "truth.mrc").exists():
        return star
    from cryodask.simulate import CTFRange, Optics, simulate_particles

    n, apix = SETS[box]
    vol = truth_volume(box)
    optics = Optics(300.0, 2.7, 0.1)
    t = time.perf_counter()
    noisy, _, table = simulate_particles(vol, n, apix, np.random.default_rng(seed), snr=0.1, optics=optics,
                                         ctf=CTFRange(10000.0, 25000.0), max_shift_px=3.0)
    print(f"simulated {n} x {box}² in {time.perf_counter() - t:.1f} s", flush=True)
    write_stack(out, noisy, table, apix, optics)
    with mrcfile.new(out / "truth.mrc", overwrite=True) as m:
        m.set_data(vol)
        m.voxel_size = apix
    return star


def _fsc_module():
    spec = importlib.util.spec_from_file_location("checks_fsc", SHARED / "checks" / "fsc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fsc_vs_truth(map_path: Path, truth_path: Path) -> tuple[float, float]:
    """(FSC0.5, FSC0.143) in Å of a map against the truth, by ../shared/checks/fsc.py's code."""
    chk = _fsc_module()
    with mrcfile.open(map_path, permissive=True) as m:
        a = np.asarray(m.data, dtype=np.float64)
    with mrcfile.open(truth_path, permissive=True) as m:
        b = np.asarray(m.data, dtype=np.float64)
        apix = float(m.voxel_size.x)
    c = chk.fsc_curve(a, b)
    n = a.shape[0]
    return chk.crossing(c, 0.5, n, apix), chk.crossing(c, 0.143, n, apix)


def timed(cmd: list[str], cwd: Path, env=None) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise RuntimeError(f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "scratch" / "bench_reconstruct"))
    ap.add_argument("--sets", default="64,128")
    ap.add_argument("--threads", type=int, default=2, help="cores given to each tool (taskset)")
    ap.add_argument("--repeat", type=int, default=1)
    a = ap.parse_args()
    if not VOLUME.exists():
        print(f"{VOLUME} not found: this benchmark needs ../shared/data")
        return 2
    work = Path(a.work)
    cores = ",".join(str(i) for i in range(a.threads))
    pin = ["taskset", "-c", cores] if shutil.which("taskset") else []
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS=str(a.threads))
    rows = []
    for box in (int(s) for s in a.sets.split(",")):
        d = work / f"ribo{box}"
        star = simulate(d, box)
        n, apix = SETS[box]
        truth = d / "truth.mrc"
        for _ in range(a.repeat):
            if shutil.which("relion_reconstruct"):
                wall = timed(pin + ["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf",
                                    "--angpix", str(apix)], d, env)
                rows.append((n, box, "relion_reconstruct --ctf", wall, *fsc_vs_truth(d / "relion.mrc", truth)))
            out = d / "cryodask"
            wall = timed(pin + [sys.executable, "-m", "cryodask.reconstruct", str(star), str(out),
                                "--threads", str(a.threads)], d, env)
            rows.append((n, box, "cryodask (Wiener)", wall, *fsc_vs_truth(out / "map.mrc", truth)))
            if (out / "map_unfiltered.mrc").exists():
                rows.append((n, box, "cryodask (unregularised)", wall,
                             *fsc_vs_truth(out / "map_unfiltered.mrc", truth)))
        for r in rows:
            if r[1] == box:
                print(f"{r[0]:>6d} {r[1]:>4d}  {r[2]:<28s} {r[3]:7.2f} s  FSC0.5 {r[4]:6.2f} Å  FSC0.143 {r[5]:6.2f} Å",
                      flush=True)
    print("\n     N  box  tool                          wall_s  FSC0.5_A  FSC0.143_A")
    for r in rows:
        print(f"{r[0]:>6d} {r[1]:>4d}  {r[2]:<28s} {r[3]:7.2f}  {r[4]:8.2f}  {r[5]:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
