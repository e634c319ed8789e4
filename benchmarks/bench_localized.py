"""What the paper's "localized" structure-from-motion reconstruction delivers, against ground truth.

For each dataset (apoferritin-like, O; KLH-like, D5; the real 70S ribosome map, C1) a particle
stack is simulated (``cryodask.simulate_job.run_simulation``: 64 px, SNR 0.1 over the box, CTF
1.0–2.5 µm, uniform orientations, seeded). The method's input is "aligned particles": here the
in-plane rotation (and shift) of every particle is removed with the *true* rlnAnglePsi and
origins (``localized_star(apply_alignment=True)``, the best possible 2-D alignment), and the CTF
phases are flipped with the true defocus, so the measurement is of the 3-D step itself.
``cryodask.localized.localized_star`` then runs the pairwise chains (default 50 particles per
chain) and writes the averaged localized map and two controls built from the very same pairs:

* ``shuffled_depth`` — the SfM points with their depths permuted within each pair;
* ``random_depth``   — the same 2-D corner points with a random depth inside a ball of the
  particle's radius;

and the benchmark adds three maps that use no depth information at all:

* ``average_envelope`` — the plain average of the aligned images extruded through that ball;
* ``average_spin``     — the average's rotational profile placed on spherical shells;
* ``ball``             — a uniform ball of the particle's radius (soft edge).

Every map is superposed on the truth by ``cryodask.map_align.align_map`` (global rotation
search in the truth's asymmetric unit, translation, both hands) and its FSC against the truth is
measured by ``../shared/checks/fsc.py`` on the written MRC files (cross-checked with
``cryodask.fsc``). Also reported: the epipolar statistics of the pairs (RANSAC inlier fraction,
Sampson and algebraic distances, the residual of the best *affine* epipolar model), the recovered
vs true relative rotation of each chain's first pair, the rank correlation between the SfM depth
of each corner and the true density-weighted depth along its ray (each chain's first pair, whose
reference is a single particle of known orientation, and 100 pairs of consecutive aligned
particles; also after removing what a quadratic function of the image position explains, since a
tilted or domed depth field correlates with the true depth of a tilted particle without any
3-D information; the random-depth points give the null distribution), CPU time per pair (one
thread), and a best-case experiment: noise-free
projections without CTF of one view and the same view rotated by θ, for each dataset's volume and
for a volume of 25 isolated point-like blobs (where true point correspondences exist).

Usage::

    python benchmarks/bench_localized.py [--particles 1000] [--datasets apoferritin,klh,ribosome]
        [--chain-size 50] [--work scratch/localized/bench] [--out scratch/localized/bench.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
CHECK = SHARED / "checks" / "fsc.py"
RIBOSOME = SHARED / "data" / "volumes" / "ribosome70S_65.mrc"

DATASETS = {
    "apoferritin": dict(volume="apoferritin", pixel_size=None, symmetry="O"),
    "klh": dict(volume="klh", pixel_size=None, symmetry="D5"),
    "ribosome": dict(volume=str(RIBOSOME), pixel_size=5.0, symmetry="C1"),
}


def simulate(name: str, n: int, work: Path, seed: int) -> Path:
    from cryodask.simulate_job import SimulationConfig, run_simulation

    out = work / f"{name}_{n}" / "sim"
    if (out / "particles.star").exists() and json.loads((out / "simulation.json").read_text())["n_particles"] == n:
        return out
    d = DATASETS[name]
    run_simulation(SimulationConfig(volume=d["volume"], out=str(out), particles=n, snr=0.1, seed=seed,
                                    pixel_size=d["pixel_size"], symmetry=d["symmetry"]))
    return out


def check_fsc(map_path: Path, truth_path: Path, csv: Path | None = None) -> tuple[float, float]:
    """FSC0.5 and FSC0.143 (Å) by the acceptance script (curve written to ``csv``)."""
    cmd = [sys.executable, str(CHECK), str(map_path), str(truth_path)] + (["--csv", str(csv)] if csv else [])
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    last = r.stdout.strip().splitlines()[-1]
    vals = dict(kv.split("=") for kv in last.replace(" A", "").split())
    return float(vals["FSC0.5"]), float(vals["FSC0.143"])


def ball(box: int, radius: float) -> np.ndarray:
    from cryodask.fsc import soft_sphere

    return soft_sphere(box, radius - 2, 4.0).astype(np.float32)


def true_depths(volume: np.ndarray, view: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Density-weighted mean depth (px) along the ray through image point (x, y) of ``view``."""
    from scipy.ndimage import map_coordinates

    n = volume.shape[0]
    z = np.arange(n, dtype=np.float64) - n // 2
    pts = np.stack([np.repeat(xy[:, :1], n, 1), np.repeat(xy[:, 1:], n, 1), np.tile(z, (len(xy), 1))], -1)
    vol_xyz = pts @ view  # rows: Bᵀ (x, y, z)
    coords = [vol_xyz[..., 2] + n // 2, vol_xyz[..., 1] + n // 2, vol_xyz[..., 0] + n // 2]
    w = np.maximum(map_coordinates(volume, [c.ravel() for c in coords], order=1, cval=0.0).reshape(len(xy), n), 0)
    return (w * z).sum(1) / np.maximum(w.sum(1), 1e-12)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 5 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def partial_spearman(a, b, xy) -> tuple[float, float]:
    """Rank correlation of a and b after removing from each (by least squares) what a quadratic
    function of the image position explains: (rho, p). A depth "signal" that is only a smooth
    function of the position (a tilted plane or a dome) does not count."""
    from scipy.stats import rankdata, spearmanr

    x, y = xy[:, 0], xy[:, 1]
    A = np.column_stack([np.ones_like(x), x, y, x * x, y * y, x * y])
    if len(a) < A.shape[1] + 4:
        return float("nan"), float("nan")
    ra, rb = rankdata(a), rankdata(b)
    res = lambda v: v - A @ np.linalg.lstsq(A, v, rcond=None)[0]
    r = spearmanr(res(ra), res(rb))
    return float(r[0]), float(r[1])


def depth_diagnostics(loc_dir: Path, star: Path, truth: np.ndarray, radius: float, seed: int) -> dict:
    """First pair of every chain: SfM depth vs true depth, recovered vs true relative rotation."""
    from scipy.stats import spearmanr

    from cryodask.geometry import euler_to_matrix, rotation_angle_deg
    from cryodask.io.star import read_particles
    from cryodask.localized import random_depth_points

    ds = read_particles(star)
    rot, tilt = ds["rlnAngleRot"].values, ds["rlnAngleTilt"].values
    rng = np.random.default_rng(seed)
    rho_sfm, rho_rand, true_rel, found_rel, sig = [], [], [], [], []
    for f in sorted((loc_dir / "points").glob("chain_*.npz")):
        z = np.load(f)
        if not len(z["particle_index"]):
            continue
        i0, i1 = int(z["chain_first_particle"][0]), int(z["particle_index"][0])
        b0, b1 = euler_to_matrix(rot[i0], tilt[i0], 0.0), euler_to_matrix(rot[i1], tilt[i1], 0.0)
        true_rel.append(float(rotation_angle_deg(b1, b0)))
        found_rel.append(float(z["rotation_deg"][0]))
        a, b = z["offsets"][0], z["offsets"][1]
        if not z["ok"][0] or b - a < 5:
            continue
        corners, pts = z["corners"][a:b].astype(np.float64), z["points3d"][a:b].astype(np.float64)
        depth = true_depths(truth, b0, corners)
        r = spearman(pts[:, 2], depth)
        rho_sfm.append(r)
        rho_rand.append(spearman(random_depth_points(corners, radius, rng)[:, 2], depth))
        from scipy.stats import spearmanr

        sig.append(float(spearmanr(pts[:, 2], depth)[1]) < 0.05)
    med = lambda v: float(np.nanmedian(np.abs(v))) if len(v) else float("nan")
    return {
        "first_pairs": len(true_rel),
        "first_pairs_with_points": len(rho_sfm),
        "median_abs_spearman_sfm_depth_vs_true": med(rho_sfm),
        "median_abs_spearman_random_depth_vs_true": med(rho_rand),
        "mean_spearman_sfm": float(np.nanmean(rho_sfm)) if rho_sfm else float("nan"),
        "fraction_significant_p05_sfm": float(np.mean(sig)) if sig else float("nan"),
        "median_true_relative_rotation_deg": float(np.median(true_rel)) if true_rel else float("nan"),
        "median_recovered_rotation_deg": float(np.nanmedian(found_rel)) if found_rel else float("nan"),
        "spearman_recovered_vs_true_rotation": spearman(np.nan_to_num(found_rel), true_rel),
    }


def raw_pair_depths(star: Path, truth: np.ndarray, radius: float, n_pairs: int, seed: int) -> dict:
    """``n_pairs`` pairs of consecutive aligned particles (as the method's input, no fusion): rank
    correlation of the SfM depth with the true depth along each corner's ray in the first view."""
    from scipy.stats import spearmanr

    from cryodask.geometry import euler_to_matrix
    from cryodask.io.star import read_particles
    from cryodask.localized import _read_aligned, pair_points, random_depth_points

    ds = read_particles(star)
    n = ds.sizes["particle"]
    rng = np.random.default_rng(seed)
    first = rng.choice(n - 1, min(n_pairs, n - 1), replace=False)
    imgs = _read_aligned(ds, np.sort(np.concatenate([first, first + 1])), True, True)
    pos = {int(k): i for i, k in enumerate(np.sort(np.concatenate([first, first + 1])))}
    rot, tilt = ds["rlnAngleRot"].values, ds["rlnAngleTilt"].values
    rs, rr, sig, cpu, ps, psig, pn = [], [], [], [], [], [], []
    for i in first:
        c0 = time.process_time()
        res = pair_points(imgs[pos[int(i)]], imgs[pos[int(i) + 1]], seed=int(i))
        cpu.append(time.process_time() - c0)
        if not res["ok"] or len(res["points3d"]) < 5:
            continue
        corners = res["corners"].astype(np.float64)
        depth = true_depths(truth, euler_to_matrix(rot[i], tilt[i], 0.0), corners)
        rs.append(spearman(res["points3d"][:, 2], depth))
        sig.append(float(spearmanr(res["points3d"][:, 2], depth)[1]) < 0.05)
        rr.append(spearman(random_depth_points(corners, radius, rng)[:, 2], depth))
        pr, pp = partial_spearman(res["points3d"][:, 2], depth, corners)
        ps.append(pr)
        psig.append(pp < 0.05)
        pn.append(partial_spearman(random_depth_points(corners, radius, rng)[:, 2], depth, corners)[0])
    return {"pairs": int(len(first)), "pairs_with_points": len(rs),
            "median_abs_partial_spearman_sfm": float(np.nanmedian(np.abs(ps))) if ps else float("nan"),
            "median_abs_partial_spearman_random": float(np.nanmedian(np.abs(pn))) if pn else float("nan"),
            "fraction_significant_p05_partial_sfm": float(np.mean(psig)) if psig else float("nan"),
            "median_abs_spearman_sfm": float(np.nanmedian(np.abs(rs))) if rs else float("nan"),
            "median_abs_spearman_random": float(np.nanmedian(np.abs(rr))) if rr else float("nan"),
            "mean_spearman_sfm": float(np.nanmean(rs)) if rs else float("nan"),
            "fraction_significant_p05_sfm": float(np.mean(sig)) if sig else float("nan"),
            "median_cpu_seconds_per_pair": float(np.median(cpu))}


def pair_statistics(loc_dir: Path) -> dict:
    recs = [np.load(f) for f in sorted((loc_dir / "points").glob("chain_*.npz"))]
    cat = lambda k: np.concatenate([r[k] for r in recs])
    ok = cat("ok").astype(bool)
    counts = np.concatenate([np.diff(r["offsets"]) for r in recs])
    samp, aff = cat("sampson"), cat("affine_residual")
    return {
        "pairs": int(len(ok)),
        "pairs_ok": int(ok.sum()),
        "median_corners": float(np.median(cat("n_corners"))),
        "median_tracked": float(np.median(cat("n_tracked"))),
        "median_inlier_fraction": float(np.median(cat("inlier_fraction"))),
        "median_affine_inlier_fraction": float(np.median(cat("affine_inlier_fraction"))),
        "median_sampson_px": float(np.median(samp)),
        "p90_sampson_px": float(np.percentile(samp, 90)),
        "median_algebraic": float(np.median(cat("algebraic"))),
        "median_affine_residual_px": float(np.median(aff)),
        "median_affine_ratio": float(np.nanmedian(cat("affine_ratio")[ok])),
        "median_essential_sv_ratio": float(np.nanmedian(cat("essential_sv_ratio")[ok])),
        "median_recovered_rotation_deg": float(np.nanmedian(cat("rotation_deg")[ok])),
        "median_parallax_deg": float(np.median(cat("parallax_deg"))) if len(cat("parallax_deg")) else float("nan"),
        "median_midpoint_vs_dlt": float(np.nanmedian(cat("dlt_difference")[ok])),
        "median_points_per_ok_pair": float(np.median(counts[ok])) if ok.any() else 0.0,
        "fraction_points_outside_box": float(cat("n_outside_box")[ok].sum() / max(counts[ok].sum(), 1)),
        "median_seconds_per_pair": float(np.median(cat("seconds"))),
    }


def best_case(truth: np.ndarray, angles, n_pairs: int, seed: int, radius: float) -> list[dict]:
    """Noise-free, CTF-free projections of a view and of the same view rotated by θ about a random
    axis: does the SfM depth follow the true depth when true correspondences exist?"""
    from cryodask.geometry import random_rotations
    from cryodask.localized import pair_points, random_depth_points
    from cryodask.simulate import project_exact

    rng = np.random.default_rng(seed)
    out = []
    for theta in angles:
        views = random_rotations(n_pairs, rng)
        axes = rng.normal(size=(n_pairs, 3))
        axes /= np.linalg.norm(axes, axis=1, keepdims=True)
        t = np.deg2rad(theta)
        k = np.zeros((n_pairs, 3, 3))
        k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
        k = k - np.transpose(k, (0, 2, 1))
        rot = np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)
        second = views @ rot
        imgs = project_exact(truth, np.concatenate([views, second]))
        rs, rr, ok, rot_found, ps, pn = [], [], 0, [], [], []
        for i in range(n_pairs):
            res = pair_points(imgs[i], imgs[n_pairs + i], seed=i)
            if not res["ok"] or len(res["points3d"]) < 5:
                continue
            ok += 1
            rot_found.append(res["rotation_deg"])
            depth = true_depths(truth, views[i], res["corners"].astype(np.float64))
            rs.append(spearman(res["points3d"][:, 2], depth))
            rr.append(spearman(random_depth_points(res["corners"], radius, rng)[:, 2], depth))
            c64 = res["corners"].astype(np.float64)
            ps.append(partial_spearman(res["points3d"][:, 2], depth, c64)[0])
            pn.append(partial_spearman(random_depth_points(c64, radius, rng)[:, 2], depth, c64)[0])
        out.append({"theta_deg": theta, "pairs": n_pairs, "pairs_ok": ok,
                    "median_abs_partial_spearman_sfm": float(np.nanmedian(np.abs(ps))) if ps else float("nan"),
                    "median_abs_partial_spearman_random": float(np.nanmedian(np.abs(pn))) if pn else float("nan"),
                    "median_abs_spearman_sfm": float(np.nanmedian(np.abs(rs))) if rs else float("nan"),
                    "median_abs_spearman_random": float(np.nanmedian(np.abs(rr))) if rr else float("nan"),
                    "median_recovered_rotation_deg": float(np.median(rot_found)) if rot_found else float("nan")})
    return out


def run_dataset(name: str, n: int, work: Path, chain_size: int, seed: int, best_angles) -> dict:
    import dask

    from cryodask.fsc import fsc_curve, resolution
    from cryodask.io.mrc import read_map, write_map
    from cryodask.io.star import read_particles
    from cryodask.localized import _read_aligned, envelope_map, localized_star
    from cryodask.map_align import align_map

    sim = simulate(name, n, work, seed)
    meta = json.loads((sim / "simulation.json").read_text())
    apix, sym = meta["pixel_size_A"], meta["symmetry"] or "C1"
    truth, _ = read_map(sim / "truth_volume.mrc")
    box = truth.shape[0]
    radius = 0.5 * meta["diameter_A"] / apix
    loc = work / f"{name}_{n}" / "loc"
    t0 = time.perf_counter()
    figs = localized_star(sim / "particles.star", loc, chain_size=chain_size, control_radius_px=radius, seed=seed)
    wall = time.perf_counter() - t0
    ds = read_particles(sim / "particles.star")
    mean = _read_aligned(ds, np.arange(n), True, True).mean(0)
    maps = {
        "localized": loc / "localized_map.mrc",
        "shuffled_depth": loc / "localized_shuffled_depth.mrc",
        "random_depth": loc / "localized_random_depth.mrc",
        "average_envelope": loc / "average_envelope.mrc",
    }
    write_map(loc / "average_spin.mrc", envelope_map(mean, radius, "spin"), apix)
    write_map(loc / "ball.mrc", ball(box, radius), apix)
    maps["average_spin"] = loc / "average_spin.mrc"
    maps["ball"] = loc / "ball.mrc"
    results = {}
    for key, path in maps.items():
        vol, _ = read_map(path)
        t1 = time.perf_counter()
        aligned, info = align_map(vol, truth, symmetry=sym, try_hand=True)
        out = loc / f"aligned_{key}.mrc"
        write_map(out, aligned, apix)
        r05, r0143 = check_fsc(out, sim / "truth_volume.mrc", loc / f"fsc_{key}.csv")
        own = resolution(fsc_curve(aligned, truth), apix)
        results[key] = {"fsc0.5_A": r05, "fsc0.143_A": r0143, "cryodask_fsc0.5_A": own["fsc0.5"],
                        "cryodask_fsc0.143_A": own["fsc0.143"], "correlation": info["correlation"],
                        "hand_flipped": info["flipped"], "align_seconds": time.perf_counter() - t1}
    with dask.config.set(scheduler="sync"):
        diag = depth_diagnostics(loc, sim / "particles.star", truth, radius, seed)
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # one pair at a time on one thread: CPU time per pair
    try:
        raw = raw_pair_depths(sim / "particles.star", truth, radius, 100, seed)
    finally:
        cv2.setNumThreads(threads)
    best = best_case(truth, best_angles, 30, seed, radius) if best_angles else []
    return {"dataset": name, "particles": n, "pixel_size_A": apix, "box": box, "symmetry": sym,
            "nyquist_A": 2 * apix, "localized_wall_s": wall, "localized_figures": figs, "maps": results,
            "pairs": pair_statistics(loc), "depth_first_pairs": diag, "depth_raw_pairs": raw, "best_case": best}


def point_object(box: int = 64, n: int = 25, seed: int = 0) -> np.ndarray:
    """A positive control for the best case: 25 isolated point-like blobs (σ 1.2 px), so that every
    projected blob marks one 3-D point and true correspondences exist between nearby views."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(-18, 18, (n, 3))
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((box,) * 3)
    for q in p:
        v += np.exp(-((x - q[0]) ** 2 + (y - q[1]) ** 2 + (z - q[2]) ** 2) / (2 * 1.2 ** 2))
    return v.astype(np.float32)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, default=1000)
    ap.add_argument("--datasets", default="apoferritin,klh,ribosome")
    ap.add_argument("--chain-size", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--best-case-angles", default="1,3,10,30,90")
    ap.add_argument("--work", default=str(ROOT / "scratch" / "localized" / "bench"))
    ap.add_argument("--out", default=str(ROOT / "scratch" / "localized" / "bench.json"))
    a = ap.parse_args()
    work = Path(a.work)
    angles = [float(x) for x in a.best_case_angles.split(",") if x]
    print(f"# cores {os.cpu_count()}  load {os.getloadavg()[0]:.1f}")
    allres = []
    if angles:
        pc = best_case(point_object(), angles, 30, a.seed, 20.0)
        allres.append({"dataset": "point_object_best_case", "best_case": pc})
        for b in pc:
            print("point object best case:", json.dumps(b))
    for name in [d for d in a.datasets.split(",") if d]:
        res = run_dataset(name, a.particles, work, a.chain_size, a.seed, angles)
        allres.append(res)
        print(f"\n## {name}: {res['particles']} particles, {res['box']} px, {res['pixel_size_A']} Å/px "
              f"(Nyquist {res['nyquist_A']} Å), {res['symmetry']}; localized run {res['localized_wall_s']:.0f} s wall")
        print(f"{'map':18s} {'FSC0.5 Å':>9s} {'FSC0.143 Å':>10s} {'corr':>6s}  hand")
        for k, v in res["maps"].items():
            print(f"{k:18s} {v['fsc0.5_A']:9.1f} {v['fsc0.143_A']:10.1f} {v['correlation']:6.3f}  "
                  f"{'flipped' if v['hand_flipped'] else 'as is'}")
        print("pairs:", json.dumps(res["pairs"]))
        print("depth (first pairs):", json.dumps(res["depth_first_pairs"]))
        print("depth (raw consecutive pairs):", json.dumps(res["depth_raw_pairs"]))
        for b in res["best_case"]:
            print("best case:", json.dumps(b))
        Path(a.out).write_text(json.dumps(allres, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
