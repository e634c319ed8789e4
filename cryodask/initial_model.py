"""Initial 3D models built from the particles alone (no user-supplied model).

Kinds (:func:`build_initial_model`):

* ``sphere`` — for round particles: the spherically symmetric map that best explains the data,
  i.e. the reconstruction of all particles at random orientations (every view of a spherical
  object is the same), soft-masked at the particle diameter. It comes out solid or a shell
  (apoferritin) as the data say.
* ``cylinder`` — for particles whose side views are rectangles: a soft-edged solid cylinder along
  z with the measured width and height (``shape_hint``: ``{"width": Å, "height": Å}``, from the
  2D stage's perfect-mask measurement; by default the diameter for both).
* ``abinitio`` — stochastic hard/soft-assignment projection matching at low resolution
  (cryoSPARC-like): from a start volume (random Gaussian blobs, or the shape above), for a
  number of minibatches of random particles: search every pose (viewing directions over the
  asymmetric unit × in-plane angles × a few shifts) against the current volume, weight the
  best few poses of each particle by their likelihood at an annealed temperature, add the
  weighted back-projections to a running (exponentially forgetting) Fourier accumulator, and
  rebuild the volume (symmetrised, Wiener-regularised, low-passed on a schedule from coarse to
  finer, solvent-masked).

  Why many restarts: projection matching from a random start falls into one of several
  self-consistent basins, and which one is fixed by the start volume, not by the temperature or
  the batch size (measured on the apoferritin phantom, O, 2,000 particles at SNR 0.1: about
  1 start in 3 from random blobs and 1 in 12 from the spherical average reaches the true
  structure; the others converge to wrong, nearly achiral O-symmetric maps). Wrong basins
  explain the data clearly worse: the mean log-likelihood of held-out particles separates
  them already after a third of the iterations (e.g. 43 vs ≤ 39 at 30 Å; 68 vs ≤ 58 at 16 Å).
  So ``restarts`` runs (a quarter from the shape, the rest from random blobs) are played as
  a tournament: all run the first third of the schedule, the ``keep`` best by held-out
  likelihood finish it, and the best finisher is returned.
* ``auto`` — ``abinitio`` with the shape the point group suggests among the starts: ``sphere``
  for the cubic groups (T, O, I), ``cylinder`` for Cn/Dn with n ≥ 3, random blobs only for
  C1/C2/D2.

Everything runs on Fourier-cropped particles (box ``box_small``) — low resolution is all an
initial model needs — and returns a map at the particles' box. Units: Å, px of the given box.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import symmetry_matrices

__all__ = ["build_initial_model", "centre_volume", "sphere_model", "cylinder_model", "blob_model", "ab_initio",
           "fourier_resize_images", "fourier_resize_volume", "auto_kind"]


def fourier_resize_images(images, size: int) -> np.ndarray:
    """Images (b, N, N) resampled to (b, size, size) by cropping/padding their centred transform
    (the pixel size becomes ``N/size`` times larger); centre N//2 ↦ size//2."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    n = x.shape[-1]
    if size == n:
        return x.numpy().copy()
    f = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))
    out = torch.zeros((x.shape[0], size, size), dtype=f.dtype)
    m = min(n, size)
    a, b = n // 2 - m // 2, size // 2 - m // 2
    out[:, b:b + m, b:b + m] = f[:, a:a + m, a:a + m]
    img = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(out, dim=(-2, -1))), dim=(-2, -1)).real
    return (img * (size / n) ** 2).numpy().astype(np.float32)


def fourier_resize_volume(vol: np.ndarray, size: int) -> np.ndarray:
    """Volume (N, N, N) resampled to (size,)*3 by Fourier cropping/padding (densities kept)."""
    n = vol.shape[0]
    if size == n:
        return np.asarray(vol, dtype=np.float32).copy()
    f = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(vol)))
    out = np.zeros((size,) * 3, dtype=complex)
    m = min(n, size)
    a, b = n // 2 - m // 2, size // 2 - m // 2
    out[b:b + m, b:b + m, b:b + m] = f[a:a + m, a:a + m, a:a + m]
    v = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real
    return (v * (size / n) ** 3).astype(np.float32)


def _radius_grid(n: int):
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return z, y, x


def _soft(t: np.ndarray, edge: float) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(t / edge, 0, 1))


def cylinder_model(n: int, radius_px: float, height_px: float, edge: float = 2.0) -> np.ndarray:
    """Solid cylinder along z (N, N, N): radius and half-height in px, raised-cosine edges."""
    z, y, x = _radius_grid(n)
    rho = np.sqrt(x ** 2 + y ** 2)
    return (_soft(radius_px + edge / 2 - rho, edge) * _soft(height_px / 2 + edge / 2 - np.abs(z), edge)).astype(np.float32)


def blob_model(n: int, radius_px: float, rng: np.random.Generator, n_blobs: int = 12) -> np.ndarray:
    """Random Gaussian blobs inside a sphere of ``radius_px``: an uninformative start volume."""
    z, y, x = _radius_grid(n)
    vol = np.zeros((n, n, n))
    for _ in range(n_blobs):
        d = rng.normal(size=3)
        p = d / np.linalg.norm(d) * radius_px * rng.uniform(0.2, 0.75)
        s = radius_px * rng.uniform(0.15, 0.3)
        vol += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return (vol / vol.max()).astype(np.float32)


def centre_volume(vol: np.ndarray, symmetry: str = "C1") -> tuple[np.ndarray, np.ndarray]:
    """Shift a map (N, N, N) so that the centre of mass of its positive density sits on the box
    centre (voxel N//2), by a Fourier phase ramp (sub-voxel). Projection matching from a random
    start leaves the structure wherever it formed; a map off-centre by a few voxels is clipped by
    the particle mask and forces large particle shifts. The shift is projected onto what the
    point group allows (along z for Cn, none for Dn, T, O, I), so the symmetry axes stay put.
    Returns (centred map float32, applied shift (z, y, x) voxels)."""
    from scipy import ndimage

    vol = np.asarray(vol, dtype=np.float32)
    n = vol.shape[0]
    pos = np.clip(vol, 0, None)
    if not pos.any():
        return vol.copy(), np.zeros(3)
    com = np.array(ndimage.center_of_mass(pos))
    shift = (n // 2) - com  # (z, y, x)
    sym = symmetry_matrices(symmetry)  # acting on (x, y, z)
    if len(sym) > 1:
        sxyz = shift[::-1]
        sxyz = np.mean([g @ sxyz for g in sym], axis=0)
        shift = sxyz[::-1]
    if np.abs(shift).max() < 0.05:
        return vol.copy(), np.zeros(3)
    f = ndimage.fourier_shift(np.fft.fftn(vol), shift)
    return np.fft.ifftn(f).real.astype(np.float32), shift


def _ctx(images, table, pixel_size, optics, diameter, box_small, device):
    from .refine import noise_spectrum, normalise_images

    n = images.shape[-1]
    small = fourier_resize_images(images, box_small)
    apix = pixel_size * n / box_small
    d_px = diameter / apix
    mask_r = min(d_px / 2 + 2, box_small / 2 - 3)
    norm = normalise_images(small, mask_r, 2.0, device=device)
    sigma2 = noise_spectrum(norm)
    has_ctf = "rlnDefocusU" in table
    defocus = (np.stack([np.asarray(table["rlnDefocusU"], dtype=np.float64),
                         np.asarray(table["rlnDefocusV"] if "rlnDefocusV" in table else table["rlnDefocusU"]),
                         np.asarray(table["rlnDefocusAngle"] if "rlnDefocusAngle" in table else np.zeros(len(small)))],
                        1).astype(np.float64) if has_ctf else None)
    return {"small": small, "norm": norm, "apix": apix, "d_px": d_px, "mask_r": mask_r, "sigma2": sigma2,
            "defocus": defocus, "optics": optics, "support": mask_r + 2.0, "box": box_small, "device": device}


def _reconstruct(c, idx, rotations, origins, weights, symmetry, ssnr: float = 1.0):
    """Weighted back-projection (weights (k,) per insertion) → (volume, accumulator)."""
    from .reconstruct import accumulate
    from .refine import symmetrize_accumulator

    w = np.sqrt(np.asarray(weights, dtype=np.float64))
    imgs = c["small"][idx] * w[:, None, None].astype(np.float32)
    acc = accumulate(imgs, rotations, origins, None if c["defocus"] is None else c["defocus"][idx],
                     pixel_size=c["apix"], optics=c["optics"], ctf_scale=w, symmetry="C1", device=c["device"])
    acc = symmetrize_accumulator(acc, symmetry)
    return acc


def _volume(acc, box: int, res: float, apix: float, mask_r: float, ssnr: float = 1.0) -> np.ndarray:
    from .reconstruct import finalize
    from .refine import lowpass, soft_sphere

    v = finalize(acc, np.full(box // 2 + 1, ssnr)).cpu().numpy()
    v = lowpass(v, res, apix) * soft_sphere(box, mask_r, 2.0)
    return v


def sphere_model(images, table, pixel_size, optics, *, diameter: float, symmetry: str = "C1", seed: int = 0,
                 box_small: int = 32, max_particles: int = 2000, device=None) -> np.ndarray:
    """Spherically averaged map (N, N, N): all particles reconstructed at uniformly random
    orientations (their spherical average), low-passed to the small box's Nyquist, masked."""
    from .geometry import random_rotations

    n = images.shape[-1]
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(images))[:max_particles]
    c = _ctx(images[idx], _rows(table, idx), pixel_size, optics, diameter, box_small, device)
    k = len(idx)
    acc = _reconstruct(c, np.arange(k), random_rotations(k, rng), None, np.ones(k), "C1")
    v = _volume(acc, box_small, 2.2 * c["apix"], c["apix"], c["mask_r"], ssnr=10.0)
    return fourier_resize_volume(v, n)


def _rows(table, idx):
    import pandas as pd

    return pd.DataFrame(table).iloc[np.asarray(idx)].reset_index(drop=True)


def auto_kind(symmetry: str) -> str:
    """Shape the point group suggests for the start of ab initio: 'sphere', 'cylinder' or 'blobs'."""
    s = symmetry.strip().upper()
    if s in ("T", "O", "I", "I1"):
        return "sphere"
    if s[:1] in ("C", "D") and s[1:].isdigit() and int(s[1:]) >= 3:
        return "cylinder"
    return "blobs"


class _Run:
    """State of one ab initio run: the current small volume, its running accumulator and rng."""

    def __init__(self, vol: np.ndarray, rng: np.random.Generator, start: str):
        self.vol, self.acc, self.rng, self.start, self.it = vol, None, rng, start, 0
        self.scores: list[tuple[int, float]] = []


def _ab_setup(symmetry: str, n_directions: int, diameter: float):
    """Rotations of the search as a function of resolution: the direction step is
    max(the step giving ``n_directions`` in the asymmetric unit (≥ 4°), res/(2·diameter) rad) —
    at 40 Å a 130 Å particle needs no finer than ~9° — and shifts of ±1 px (small box)."""
    from .refine import _group, direction_grid, rotations_from_directions, shift_grid

    order = len(_group(symmetry))
    finest = max(math.sqrt(4 * math.pi / (order * n_directions)), math.radians(4.0))
    cache = {}

    def rotations(res: float):
        step = round(max(finest, 0.5 * res / diameter), 3)
        if step not in cache:
            cache[step] = rotations_from_directions(direction_grid(math.degrees(step), symmetry))
        return cache[step]

    return rotations, shift_grid(1.0, 1.0), finest


def _ab_iterate(c, run: _Run, n_iter: int, pool, sched, rotations, shifts, symmetry, batch, top, decay, distinct):
    """Advance ``run`` by ``n_iter`` iterations of the schedule ``sched`` (list of (res Å, temperature))."""
    from .reconstruct import FourierAccumulator
    from .refine import global_search, polar_grid, prepare_chunk, reference_slices, reference_volume

    nb, apix = c["box"], c["apix"]
    for _ in range(n_iter):
        if run.it >= len(sched):
            break
        res, temp = sched[run.it]
        grid = polar_grid(nb, nb * apix / res, diameter_px=c["d_px"], device=c["norm"].device)
        idx = run.rng.choice(pool, size=min(batch, len(pool)), replace=False)
        data = prepare_chunk(c["norm"][idx], None if c["defocus"] is None else c["defocus"][idx], grid, apix,
                             c["optics"], c["sigma2"], support=c["support"], ctf=c["defocus"] is not None)
        vol2 = reference_volume(run.vol, device=c["device"])
        rots = rotations(res)
        rr, oo, ll = global_search(data, reference_slices(vol2, rots, grid), rots, shifts, top=top, distinct=distinct)
        w = np.exp((ll - ll[:, :1]) / temp)
        w /= w.sum(1, keepdims=True)
        keep = w > 0.02
        pi = np.repeat(idx[:, None], top, 1)[keep]
        new = _reconstruct(c, pi, rr[keep], oo[keep], w[keep], symmetry)
        run.acc = new if run.acc is None else FourierAccumulator(run.acc.sums * decay + new.sums, new.box, new.pad,
                                                                 run.acc.count + new.count)
        run.vol = _volume(run.acc, nb, res, apix, c["mask_r"])
        run.it += 1
    return run


def _held_out_score(c, vol: np.ndarray, hold, res: float, rotations, shifts) -> float:
    """Mean best-pose profile log-likelihood of the held-out particles at ``res`` Å."""
    from .refine import global_search, polar_grid, prepare_chunk, reference_slices, reference_volume

    nb, apix = c["box"], c["apix"]
    grid = polar_grid(nb, nb * apix / res, diameter_px=c["d_px"], device=c["norm"].device)
    data = prepare_chunk(c["norm"][hold], None if c["defocus"] is None else c["defocus"][hold], grid, apix,
                         c["optics"], c["sigma2"], support=c["support"], ctf=c["defocus"] is not None)
    vol2 = reference_volume(vol, device=c["device"])
    rots = rotations(res)
    _, _, ll = global_search(data, reference_slices(vol2, rots, grid), rots, shifts, top=1)
    return float(np.mean(ll[:, 0]))


def ab_initio(images, table, pixel_size, optics, *, symmetry: str = "C1", diameter: float, seed: int = 0,
              start: np.ndarray | None = None, box_small: int = 32, iterations: int = 24, batch: int = 150,
              restarts: int = 24, keep: int = 2, probe: float = 0.25, start_share: float = 0.25, top: int = 4,
              res_start: float | None = None, res_end: float | None = None, n_directions: int = 250,
              temperature: float = 8.0, decay: float = 0.8, distinct: bool = False, threads: int = 1, device=None,
              log=None) -> tuple[np.ndarray, dict]:
    """Stochastic projection-matching ab initio (see the module docstring).

    ``restarts`` independent runs (seeded): a share ``start_share`` of them begins from
    ``start`` (the shape at the particles' box, plus a weak random perturbation), the others
    from random blobs (all from blobs when ``start`` is None). After a fraction ``probe`` of the
    ``iterations`` every run is scored on a fixed held-out set of particles (mean best-pose
    log-likelihood at its current resolution); the ``keep`` best go on to the end, and the one
    whose final volume explains the held-out particles best is returned. Runs go in parallel
    (``threads`` Dask threads). Resolution schedule from ``res_start`` (default D/3) to
    ``res_end`` (default D/8) Å, temperature from ``temperature`` to 1 (likelihood units).
    Returns (map (N, N, N), info).
    """
    import dask
    from dask import delayed

    log = log or (lambda m: None)
    n = images.shape[-1]
    rng = np.random.default_rng(seed)
    c = _ctx(images, table, pixel_size, optics, diameter, box_small, device)
    nb, apix = box_small, c["apix"]
    res_start = res_start or max(diameter / 3, 2.5 * apix)
    res_end = max(res_end or diameter / 8, 2.2 * apix)
    rots, shifts, step = _ab_setup(symmetry, n_directions, diameter)
    sched = []
    for it in range(iterations):
        f = it / max(1, iterations - 1)
        sched.append((res_start * (res_end / res_start) ** min(1.0, 1.25 * f),
                      1.0 + (temperature - 1.0) * max(0.0, 1 - 1.5 * f)))
    hold = rng.permutation(len(images))[: min(300, len(images) // 5)]
    pool = np.setdiff1d(np.arange(len(images)), hold)
    n_shape = 0 if start is None else max(1, int(round(restarts * start_share)))
    runs = []
    for r in range(restarts):
        rr = np.random.default_rng([seed, r])
        if r < n_shape:
            v = fourier_resize_volume(start, nb)
            v = v + 0.3 * v.std() * blob_model(nb, c["d_px"] / 2, rr)
            runs.append(_Run(v, rr, "shape"))
        else:
            runs.append(_Run(blob_model(nb, c["d_px"] / 2, rr), rr, "blobs"))
    args = (pool, sched, rots, shifts, symmetry, batch, top, decay, distinct)

    def advance(run_list, n_iter):
        tasks = [delayed(_ab_iterate, pure=False)(c, r_, n_iter, *args) for r_ in run_list]
        return list(dask.compute(*tasks, scheduler="threads", num_workers=max(1, threads)))

    def score(run_list):
        res = sched[min(run_list[0].it, len(sched)) - 1][0]
        tasks = [delayed(_held_out_score, pure=False)(c, r_.vol, hold, res, rots, shifts) for r_ in run_list]
        vals = dask.compute(*tasks, scheduler="threads", num_workers=max(1, threads))
        for r_, v in zip(run_list, vals):
            r_.scores.append((r_.it, round(float(v), 3)))
        return np.array(vals)

    n_probe = int(round(probe * iterations)) if len(runs) > 1 and probe > 0 else 0
    alive = list(range(len(runs)))
    if n_probe:
        sub = advance(runs, n_probe)
        runs = sub
        s1 = score(runs)
        alive = [int(i) for i in np.argsort(-s1)[:keep]]
        log(f"ab initio: {len(runs)} runs scored after {n_probe} iterations "
            f"{[round(float(x), 2) for x in s1]}; continuing {alive}")
    cont = advance([runs[i] for i in alive], iterations)
    for i, r_ in zip(alive, cont):
        runs[i] = r_
    s2 = score([runs[i] for i in alive])
    best = alive[int(np.argmax(s2))]
    log(f"ab initio: final held-out scores {[round(float(x), 2) for x in s2]} (runs {alive}); chose run {best} "
        f"(start: {runs[best].start})")
    info = {"restarts": restarts, "runs": [{"start": r_.start, "scores": r_.scores} for r_ in runs],
            "chosen": best, "chosen_start": runs[best].start, "box_small": nb, "iterations": iterations,
            "batch": batch, "res_start_A": round(res_start, 1), "res_end_A": round(res_end, 1),
            "direction_step_deg": round(math.degrees(step), 2)}
    return fourier_resize_volume(runs[best].vol, n), info


def build_initial_model(kind, images, table, pixel_size, optics, *, symmetry: str = "C1", diameter: float,
                        seed: int = 0, shape_hint: dict | None = None, threads: int | None = None, device=None,
                        log=None, **abinitio_kw) -> tuple[np.ndarray, dict]:
    """Initial model (N, N, N) and a record ``{"kind": …, …}`` of how it was made.

    ``kind``: ``'auto'``, ``'sphere'``, ``'cylinder'``, ``'abinitio'`` (from random blobs) or a
    volume array (used as given: ``'user'``). See the module docstring.
    """
    images = np.asarray(images, dtype=np.float32)
    n = images.shape[-1]
    if not isinstance(kind, str):
        vol = np.asarray(kind, dtype=np.float32)
        if vol.shape != (n, n, n):
            raise ValueError(f"initial volume has shape {vol.shape}, particles need {(n, n, n)}")
        return vol, {"kind": "user"}
    kind = kind.lower()
    hint = shape_hint or {}
    width = float(hint.get("width", diameter))
    height = float(hint.get("height", diameter))

    def shape(name):
        if name == "sphere":
            return sphere_model(images, table, pixel_size, optics, diameter=diameter, seed=seed, device=device)
        if name == "cylinder":
            return cylinder_model(n, width / 2 / pixel_size, height / pixel_size)
        return None

    if kind in ("sphere", "cylinder"):
        rec = {"kind": kind, "diameter_A": diameter}
        if kind == "cylinder":
            rec.update(width_A=width, height_A=height)
        return shape(kind), rec
    if kind == "abinitio":
        vol, info = ab_initio(images, table, pixel_size, optics, symmetry=symmetry, diameter=diameter, seed=seed,
                              threads=threads or 1, device=device, log=log, **abinitio_kw)
        vol, shift = centre_volume(vol, symmetry)
        return vol, {"kind": "abinitio", "start": "random blobs", **info,
                     "recentred_px": [round(float(v), 2) for v in shift]}
    if kind == "auto":
        start_kind = auto_kind(symmetry)
        start = shape(start_kind)
        vol, info = ab_initio(images, table, pixel_size, optics, symmetry=symmetry, diameter=diameter, seed=seed,
                              start=start, threads=threads or 1, device=device, log=log, **abinitio_kw)
        vol, shift = centre_volume(vol, symmetry)
        rec = {"kind": "abinitio", "start": start_kind if start is not None else "random blobs", **info,
               "recentred_px": [round(float(v), 2) for v in shift]}
        if start_kind == "cylinder":
            rec.update(width_A=width, height_A=height)
        return vol, rec
    raise ValueError(f"unknown initial model {kind!r}: use auto, sphere, cylinder, abinitio or a volume")
