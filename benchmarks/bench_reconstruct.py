"""Known-pose reconstruction benchmark: cryodask vs relion_reconstruct on the same STAR.

Simulates (seeded) particle stacks from the real 70S ribosome map (../shared/data/volumes), at
64 px / 5 Å/px (N = 10,000) and 128 px / 2.5 Å/px (N = 20,000; the map resampled ×2 by cubic
interpolation), SNR 0.1 over the box, RELION CTF (300 kV, Cs 2.7 mm, Q 0.1, defocus 1.0–2.5 µm),
uniform orientations, shifts up to 3 px; writes them as ``.mrcs`` + RELION 3.1 particle STAR;
then runs ``relion_reconstruct --ctf`` (and ``mpirun -n 2 relion_reconstruct_mpi``) when
installed and ``python -m cryodask.reconstruct`` on that STAR, each as a separate process pinned
to the same cores (``taskset``) and timed from the outside (wall time, python start-up included;
runs alternate, the median of ``--repeat`` is reported), and prints

    N  box  tool / map  wall_s  cpu_s  FSC0.5_A  FSC0.143_A

with the FSC measured against the noise-free volume by ``../shared/checks/fsc.py``'s code.
The machine's load average is printed too: other processes on the same cores slow every tool.

Usage::

    python benchmarks/bench_reconstruct.py [--work DIR] [--sets 64,128] [--threads 2] [--repeat 3]
        [--mask-diameter 260]
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


def timed(cmd: list[str], cwd: Path, env=None) -> tuple[float, float, str]:
    """Run ``cmd``; return (wall seconds, CPU seconds of the child processes, stdout)."""
    before = os.times()
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = os.times()
    if r.returncode:
        raise RuntimeError(f"{cmd} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return wall, cpu, r.stdout


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "scratch" / "bench_reconstruct"))
    ap.add_argument("--sets", default="64,128")
    ap.add_argument("--threads", type=int, default=2, help="cores given to each tool (taskset)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool (alternating); the median is reported")
    ap.add_argument("--mask-diameter", type=float, default=0.0,
                    help="also run cryodask with this particle mask diameter (Å), reported separately")
    ap.add_argument("--no-relion-mpi", action="store_true", help="skip mpirun -n THREADS relion_reconstruct_mpi")
    a = ap.parse_args()
    if not VOLUME.exists():
        print(f"{VOLUME} not found: this benchmark needs ../shared/data")
        return 2
    work = Path(a.work)
    cores = ",".join(str(i) for i in range(a.threads))
    pin = ["taskset", "-c", cores] if shutil.which("taskset") else []
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMP_NUM_THREADS=str(a.threads))
    have_relion = shutil.which("relion_reconstruct") is not None
    rows = []
    for box in (int(s) for s in a.sets.split(",")):
        d = work / f"ribo{box}"
        star = simulate(d, box)
        n, apix = SETS[box]
        truth = d / "truth.mrc"
        tools = {}
        if have_relion:
            tools["relion_reconstruct --ctf (1 thread: it has no thread option)"] = (
                pin + ["relion_reconstruct", "--i", "particles.star", "--o", "relion.mrc", "--ctf",
                       "--angpix", str(apix)], [("map", d / "relion.mrc")])
            if not a.no_relion_mpi and shutil.which("mpirun") and shutil.which("relion_reconstruct_mpi"):
                tools[f"mpirun -n {a.threads} relion_reconstruct_mpi --ctf"] = (
                    pin + ["mpirun", "-n", str(a.threads), "--oversubscribe", "relion_reconstruct_mpi", "--i",
                           "particles.star", "--o", "relion_mpi.mrc", "--ctf", "--angpix", str(apix)],
                    [("map", d / "relion_mpi.mrc")])
        out = d / "cryodask"
        tools[f"cryodask reconstruct ({a.threads} threads)"] = (
            pin + [sys.executable, "-m", "cryodask.reconstruct", str(star), str(out), "--threads", str(a.threads)],
            [("map (Wiener)", out / "map.mrc"), ("map_unfil", out / "map_unfil.mrc")])
        if a.mask_diameter:
            outm = d / "cryodask_masked"
            tools[f"cryodask reconstruct --mask-diameter {a.mask_diameter:g}"] = (
                pin + [sys.executable, "-m", "cryodask.reconstruct", str(star), str(outm), "--threads",
                       str(a.threads), "--mask-diameter", str(a.mask_diameter)],
                [("map (Wiener)", outm / "map.mrc")])
        times = {k: [] for k in tools}
        loads = []
        for _ in range(a.repeat):
            for name, (cmd, _maps) in tools.items():
                loads.append(load_average())
                times[name].append(timed(cmd, d, env))
        for name, (_cmd, maps) in tools.items():
            wall = float(np.median([t[0] for t in times[name]]))
            cpu = float(np.median([t[1] for t in times[name]]))
            gold = ""
            if name.startswith("cryodask"):  # its own gold-standard half-map figure, for comparison
                import json

                fig = json.loads(times[name][-1][2].strip().splitlines()[-1])
                gold = f"{fig['fsc0.143']:.2f}"
            for label, path in maps:
                r05, r0143 = fsc_vs_truth(path, truth)
                rows.append((n, box, f"{name}: {label}", wall, cpu, r05, r0143, gold))
                print(f"{n:>6d} {box:>4d}  {rows[-1][2]:<72s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  "
                      f"FSC0.5 {r05:6.2f} Å  FSC0.143 {r0143:6.2f} Å  half-map FSC0.143 {gold or '-'}", flush=True)
        print(f"  (load average during the runs: {min(loads):.1f}–{max(loads):.1f}; "
              f"walls: " + "; ".join(f"{k.split(' (')[0]}: " + ", ".join(f"{t[0]:.2f}" for t in v)
                                       for k, v in times.items()) + ")", flush=True)
    print("\nFSC against the truth (../shared/checks/fsc.py's code); wall = whole process, median of runs;"
          "\ncpu = user+sys of the process and its children; half-map = the tool's own gold-standard figure.")
    print("\n     N  box  tool / map" + " " * 62 + "wall_s   cpu_s  FSC0.5_A  FSC0.143_A  half-map_FSC0.143_A")
    for r in rows:
        print(f"{r[0]:>6d} {r[1]:>4d}  {r[2]:<72s} {r[3]:7.2f} {r[4]:7.2f}  {r[5]:8.2f}  {r[6]:10.2f}  {r[7] or '-':>8s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
