"""Superpose a 3-D map on a reference map: rotation, translation and handedness.

Needed to measure any reconstruction whose frame is arbitrary (ab initio, the localized
structure-from-motion maps) against a truth volume: the FSC against the truth is only
meaningful after the best superposition.

Conventions (as in :mod:`cryodask.geometry`): volumes ``(z, y, x)``, physical coordinates
``r = (x, y, z)`` in voxels from the box centre ``N // 2``. The transform found is

    aligned(r) = moving_h(Rᵀ (r − t))

i.e. ``moving_h`` rotated by ``R`` then moved by ``t`` (voxels, order x, y, z), where
``moving_h`` is ``moving`` or, when the hand is flipped, ``moving`` mirrored through the plane
z = 0 (``moving_h(x, y, z) = moving(x, y, −z)``). A rotation of the reference's point group
composed with a solution is an equally good solution; the search keeps one of them.

Method
1. Both maps are masked by a soft sphere (radius N/2 − 2 voxels), their mean removed, and
   Fourier-cropped (low-passed at the cropped box's Nyquist frequency) to ``coarse_box``,
   ``mid_box`` and ``refine_box`` voxels (each capped at N).
2. Global search: a near-uniform grid of rotations (super-Fibonacci spiral on the unit
   quaternions), restricted to one asymmetric unit of the reference's point group; for each
   rotation (and each hand) the rotated map is correlated with the reference at every
   translation at once by FFT. Batched torch (CUDA when present).
3. Local refinement of the ``top_k`` best grid rotations of each hand by a shrinking
   pattern search over small rotations (±x, ±y, ±z, then 20 diagonal axes; translation again
   by FFT, sub-voxel by a parabolic fit of the peak) at ``mid_box``; then of the best of each
   hand (the best two when one hand is searched) at ``refine_box``, down to 0.25°, with the
   translation measured last at full size.
4. Each of these two solutions is applied to the full-size map (cubic B-spline,
   :func:`scipy.ndimage.affine_transform`) and the one with the highest correlation wins (the
   trilinear scores of the search are biased towards rotations near the grid axes, enough to
   prefer the wrong hand of a nearly achiral map).

The reported ``correlation`` is the real-space Pearson correlation of the aligned full-size
map with the reference inside the sphere mask.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .geometry import symmetry_matrices

__all__ = ["align_map", "transform_map", "rotation_grid", "fourier_crop", "fourier_pad", "flip_hand", "soft_sphere"]

# real root of x^4 = x + 4, used by the super-Fibonacci spiral
_PSI = 1.533751168755204288118041


def soft_sphere(n: int, radius: float, edge: float = 3.0) -> np.ndarray:
    """Spherical mask (n, n, n), 1 inside ``radius`` voxels, raised-cosine edge ``edge`` voxels wide."""
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    m = np.clip((radius + edge - r) / edge, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * m)).astype(np.float32)


def fourier_crop(vol: np.ndarray, size: int) -> np.ndarray:
    """Downsample a cubic (N, N, N) volume to (size, size, size) by cropping its Fourier transform.

    The centre voxel N//2 maps to size//2; values are scaled so that densities keep their
    magnitude. A raised-cosine taper over the outer 25 % of the kept band limits ringing and
    keeps the search away from the frequencies that interpolation damages most; ``size >= N``
    applies the taper without cropping.
    """
    n = vol.shape[0]
    size = min(size, n)
    f = np.fft.fftshift(np.fft.fftn(vol))
    lo = n // 2 - size // 2
    f = f[lo:lo + size, lo:lo + size, lo:lo + size]
    k = np.abs(np.arange(size) - size // 2) / (size / 2)
    kr = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    taper = np.clip((1.0 - kr) / 0.25, 0.0, 1.0)
    f = f * (0.5 - 0.5 * np.cos(np.pi * taper))
    out = np.fft.ifftn(np.fft.ifftshift(f)).real * (size / n) ** 3
    return out.astype(np.float32)


def fourier_pad(vol: np.ndarray, size: int) -> np.ndarray:
    """Upsample a cubic (N, N, N) volume to (size, size, size) by zero-padding its Fourier
    transform (band-limited interpolation); voxel N//2 maps to size//2."""
    n = vol.shape[0]
    if size <= n:
        return np.array(vol, dtype=np.float32)
    f = np.fft.fftshift(np.fft.fftn(vol))
    if n % 2 == 0:  # split the Nyquist plane symmetrically
        f[0] *= 0.5
        f[:, 0] *= 0.5
        f[:, :, 0] *= 0.5
    out = np.zeros((size,) * 3, dtype=complex)
    lo = size // 2 - n // 2
    out[lo:lo + n, lo:lo + n, lo:lo + n] = f
    if n % 2 == 0:  # the other half of the Nyquist planes
        hi = lo + n
        out[hi] = out[lo]
        out[:, hi] = out[:, lo]
        out[:, :, hi] = out[:, :, lo]
    return (np.fft.ifftn(np.fft.ifftshift(out)).real * (size / n) ** 3).astype(np.float32)


def flip_hand(vol: np.ndarray) -> np.ndarray:
    """Mirror through the plane z = 0 of the box (voxel N//2 stays in place): ``out(x,y,z) = vol(x,y,−z)``."""
    return np.roll(np.asarray(vol)[::-1], 1 if vol.shape[0] % 2 == 0 else 0, axis=0).copy()


def _quat_to_matrix(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)


def rotation_grid(n: int, symmetry: str = "C1") -> np.ndarray:
    """About ``n`` near-uniform rotations (k, 3, 3) covering one asymmetric unit of ``symmetry``.

    A super-Fibonacci spiral of ``n·|G|`` unit quaternions (Alexa 2022) is generated and the
    rotations R kept whose trace is the largest in their orbit {g R : g ∈ G} (the Voronoi cell
    of the identity), so every orbit of solutions is represented once at the same density.
    Measured for C1: n = 4000 gives a mean nearest-neighbour distance of 11°, and every rotation
    lies within 13° of a grid point (mean 8°).
    """
    sym = symmetry_matrices(symmetry)
    m = int(n) * len(sym)
    s = np.arange(m) + 0.5
    r = np.sqrt(s / m)
    big = np.sqrt(1.0 - s / m)
    a = 2 * np.pi * s / np.sqrt(2.0)
    b = 2 * np.pi * s / _PSI
    q = np.stack([r * np.sin(a), r * np.cos(a), big * np.sin(b), big * np.cos(b)], -1)
    rots = _quat_to_matrix(q)
    if len(sym) > 1:
        traces = np.einsum("gij,kji->kg", sym, rots)  # tr(g R) for every g
        keep = traces[:, 0] >= traces.max(axis=1) - 1e-9  # sym[0] is the identity
        rots = rots[keep]
    return rots


def _axis_angle(axes: np.ndarray, deg: float) -> np.ndarray:
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    t = np.deg2rad(deg)
    k = np.zeros((len(axes), 3, 3))
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
    k = k - np.transpose(k, (0, 2, 1))
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


# rotation axes polled by the local search: ±x, ±y, ±z, then the 20 edge and corner diagonals
_AXES = np.concatenate([np.eye(3), -np.eye(3)])
_DIAG = np.array([[1, 1, 0], [1, -1, 0], [1, 0, 1], [1, 0, -1], [0, 1, 1], [0, 1, -1], [1, 1, 1], [1, 1, -1],
                  [1, -1, 1], [-1, 1, 1]], dtype=np.float64)
_DIAG = np.concatenate([_DIAG, -_DIAG])


class _Scorer:
    """Correlation of rotated copies of one map with a reference over all translations (torch)."""

    def __init__(self, moving: np.ndarray, reference: np.ndarray, max_shift: float, device, batch: int,
                 oversample: int = 2):
        self.n = n = moving.shape[0]
        self.device, self.batch = device, batch
        # trilinear sampling of a Fourier-upsampled copy: nearly the band-limited interpolant, so
        # that scores do not favour rotations near the grid axes (plain trilinear blurs others)
        self.up = oversample
        self.mov = torch.as_tensor(fourier_pad(moving, n * oversample), dtype=torch.float32, device=device)[None, None]
        ref = torch.as_tensor(np.ascontiguousarray(reference), dtype=torch.float32, device=device)
        self.ref_norm = float(torch.linalg.vector_norm(ref))
        self.fref = torch.fft.rfftn(ref)
        c = torch.arange(n, dtype=torch.float32, device=device) - n // 2
        z, y, x = torch.meshgrid(c, c, c, indexing="ij")
        r = torch.stack([x, y, z], -1).reshape(-1, 3)  # (n³, 3) physical x, y, z
        # only voxels inside the inscribed sphere are sampled (the maps are masked to it)
        self.inside = torch.nonzero((r ** 2).sum(1) <= (n / 2) ** 2).reshape(-1)
        self.r = r[self.inside].contiguous()
        k = torch.fft.fftfreq(n, device=device) * n  # shift of each CC index (circular)
        kr = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
        self.allowed = torch.nonzero(kr.reshape(-1) <= max_shift).reshape(-1)

    def rotate(self, rots: np.ndarray, shift=None) -> torch.Tensor:
        """moving(Rᵀ (r − shift)) for each R: (b, n, n, n), zero outside the inscribed sphere."""
        n, b, m = self.n, len(rots), self.n * self.up
        a = 2.0 / (m - 1)  # grid_sample's normalised coordinates, align_corners=True
        r = torch.as_tensor(np.asarray(rots) * (a * self.up), dtype=torch.float32, device=self.device)
        pts = self.r if shift is None else self.r - torch.as_tensor(np.asarray(shift, np.float32), device=self.device)
        grid = torch.matmul(pts, r)  # rows (r − t)·(aR) = a·up·Rᵀ (r − t)
        grid += a * (m // 2) - 1.0
        vals = torch.nn.functional.grid_sample(self.mov.expand(b, -1, -1, -1, -1), grid[:, None, None],
                                               mode="bilinear", padding_mode="zeros", align_corners=True)
        out = torch.zeros((b, n ** 3), dtype=torch.float32, device=self.device)
        out[:, self.inside] = vals.reshape(b, -1)
        return out.reshape(b, n, n, n)

    def score(self, rots: np.ndarray, shift=None) -> tuple[np.ndarray, np.ndarray]:
        """Best normalised correlation over translations, and that translation t (x, y, z voxels),
        per rotation. ``shift``: a translation applied before the search (sub-voxel), included in
        the returned t; the correlation is taken at whole-voxel offsets from it, so a good
        ``shift`` removes the bias of an off-grid translation."""
        n = self.n
        best, shifts = [], []
        for s in range(0, len(rots), self.batch):
            rv = self.rotate(rots[s:s + self.batch], shift)
            norm = torch.linalg.vector_norm(rv.reshape(len(rv), -1), dim=1) * self.ref_norm
            cc = torch.fft.irfftn(self.fref[None] * torch.conj(torch.fft.rfftn(rv, dim=(1, 2, 3))),
                                  s=(n, n, n), dim=(1, 2, 3)).reshape(len(rv), -1)
            val, j = cc[:, self.allowed].max(dim=1)
            idx = self.allowed[j]
            cc = cc.reshape(len(rv), n, n, n)
            iz, iy, ix = idx // (n * n), (idx // n) % n, idx % n
            sub = []
            for axis, i0 in ((2, ix), (1, iy), (0, iz)):  # parabolic sub-voxel peak, x, y, z
                lo = [iz, iy, ix]
                hi = [iz, iy, ix]
                lo[axis] = (i0 - 1) % n
                hi[axis] = (i0 + 1) % n
                b = torch.arange(len(rv), device=self.device)
                fm, f0, fp = cc[b, lo[0], lo[1], lo[2]], val, cc[b, hi[0], hi[1], hi[2]]
                den = fm - 2 * f0 + fp
                ok = den < 0
                d = torch.where(ok, 0.5 * (fm - fp) / torch.where(ok, den, torch.ones_like(den)), 0.0)
                sub.append(((i0 + n // 2) % n - n // 2).to(torch.float32) + d.clamp(-0.5, 0.5))
            best.append((val / torch.clamp(norm, min=1e-30)).cpu().numpy())
            shifts.append(torch.stack(sub, -1).cpu().numpy())
        t = np.concatenate(shifts).astype(np.float64)
        if shift is not None:
            t = t + np.asarray(shift, np.float64)
        return np.concatenate(best).astype(np.float64), t


def _refine(scorer: _Scorer, rot: np.ndarray, step: float, min_step: float,
            full_poll: bool = True) -> tuple[np.ndarray, float, np.ndarray]:
    """Pattern search around ``rot`` over small rotations (left-multiplied): poll ±step about
    x, y, z; if none improves (and ``full_poll``), poll the 20 diagonal axes; move to the best
    improvement or halve the step, until it falls below ``min_step`` (degrees). The current
    sub-voxel translation is applied while scoring, so that off-grid translations do not bias
    the rotation."""
    _, t0 = scorer.score(rot[None])
    best_s, best_t = (v[0] for v in scorer.score(rot[None], t0[0]))
    while step >= min_step:
        moved = False
        for dirs in ((_AXES, _DIAG) if full_poll else (_AXES,)):
            cand = _axis_angle(dirs, step) @ rot
            s, t = scorer.score(cand, best_t)
            i = int(np.argmax(s))
            if s[i] > best_s + 1e-7:
                rot, best_s, best_t = cand[i], float(s[i]), t[i]
                moved = True
                break
        if not moved:
            step /= 2
    return rot, float(best_s), best_t


def _prepare(vol: np.ndarray, mask: np.ndarray) -> np.ndarray:
    v = np.asarray(vol, dtype=np.float64)
    v = v - (v * mask).sum() / mask.sum()
    return (v * mask).astype(np.float32)


def transform_map(vol: np.ndarray, rotation: np.ndarray, shift=(0.0, 0.0, 0.0), flip: bool = False,
                  order: int = 3) -> np.ndarray:
    """Apply ``out(r) = vol_h(Rᵀ (r − t))`` to a (N, N, N) map (``vol_h`` = z-mirrored when ``flip``).

    ``shift`` t in voxels, order (x, y, z). Cubic B-spline interpolation, zero outside.
    """
    from scipy.ndimage import affine_transform

    v = flip_hand(vol) if flip else np.asarray(vol)
    n = v.shape[0]
    p = np.eye(3)[::-1]  # (x, y, z) <-> (z, y, x)
    m = p @ np.asarray(rotation, dtype=np.float64).T @ p
    ctr = np.full(3, n // 2, dtype=np.float64)
    t_zyx = np.asarray(shift, dtype=np.float64)[::-1]
    off = ctr - m @ (ctr + t_zyx)
    return affine_transform(v.astype(np.float32), m, off, order=order, mode="constant", cval=0.0).astype(np.float32)


def align_map(moving: np.ndarray, reference: np.ndarray, *, symmetry: str = "C1", try_hand: bool = True,
              coarse_box: int = 16, n_rotations: int = 4000, top_k: int = 8, mid_box: int = 24,
              refine_box: int = 48, max_shift_frac: float = 0.25, device=None, batch: int = 128,
              threads: int | None = 1) -> tuple[np.ndarray, dict]:
    """Best superposition of ``moving`` onto ``reference`` (both (N, N, N), same voxel size).

    Parameters
    ----------
    symmetry : point group of ``reference`` (RELION symbol): the global search covers one
        asymmetric unit.
    try_hand : also search the z-mirrored ``moving`` (maps from projections alone have an
        undetermined hand).
    coarse_box : box (voxels) of the global search (Fourier-cropped, i.e. low-passed).
    n_rotations : density of the global search, as rotations over all of SO(3) (4000: 11°
        between neighbours); only the 1/|G| of them in one asymmetric unit are visited.
    top_k : best grid rotations per hand refined locally at ``mid_box``.
    mid_box, refine_box : boxes of the two local refinements (capped at N); the translation is
        measured last at full size.
    max_shift_frac : largest translation searched, as a fraction of the box.
    threads : torch intra-op threads during the search, restored afterwards (the batched kernels
        are small: on CPU one thread is as fast and does not fight other work); None: unchanged.

    Returns
    -------
    aligned : (N, N, N) float32, ``moving`` resampled onto the reference frame.
    info : dict with ``rotation`` (3×3), ``shift`` (x, y, z voxels of the full box), ``flipped``
        (bool), ``correlation`` (Pearson, inside the sphere mask, full size),
        ``correlation_by_hand`` (the same for the best solution of each hand searched) and
        ``search`` (boxes, grid size, spacing).
    """
    from .projection import default_device

    moving = np.asarray(moving, dtype=np.float32)
    reference = np.asarray(reference, dtype=np.float32)
    if moving.shape != reference.shape or moving.ndim != 3 or len(set(moving.shape)) != 1:
        raise ValueError(f"maps must be cubes of the same shape, got {moving.shape} and {reference.shape}")
    device = device or default_device()
    prev_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _align(moving, reference, symmetry, try_hand, coarse_box, n_rotations, top_k, mid_box, refine_box,
                      max_shift_frac, device, batch)
    finally:
        torch.set_num_threads(prev_threads)


def _align(moving, reference, symmetry, try_hand, coarse_box, n_rotations, top_k, mid_box, refine_box,
           max_shift_frac, device, batch):
    n = moving.shape[0]
    mask = soft_sphere(n, n / 2 - 4, 2.0)
    mov_full, ref_full = _prepare(moving, mask), _prepare(reference, mask)
    boxes = [min(n, b - b % 2) for b in (coarse_box, mid_box, refine_box)]
    order_g = len(symmetry_matrices(symmetry))
    grid = rotation_grid(max(n_rotations // order_g, 24), symmetry)
    # mean nearest-neighbour distance of the grid (measured: 0.72 (8π² / |G| / k)^(1/3) rad)
    spacing = 0.72 * math.degrees((8 * math.pi ** 2 / order_g / len(grid)) ** (1 / 3))
    hands = [False, True] if try_hand else [False]
    refs = [fourier_crop(ref_full, b) for b in boxes]
    movs = {h: (flip_hand(mov_full) if h else mov_full) for h in hands}
    scorers: dict = {}

    def scorer(stage, h):
        if (stage, h) not in scorers:
            b = boxes[stage]
            scorers[stage, h] = _Scorer(fourier_crop(movs[h], b), refs[stage], max_shift_frac * b, device, batch,
                                        oversample=1 if stage == 0 else 2)
        return scorers[stage, h]

    def voxel_deg(b):  # the angle that moves a voxel at radius b/2 by one voxel
        return math.degrees(1.0 / (b / 2))

    cands = []
    for h in hands:  # 1: global grid at the coarse box
        s, _ = scorer(0, h).score(grid)
        done: list[np.ndarray] = []
        for rot in grid[np.argsort(-s)[:top_k]]:  # 2: local search at the middle box
            if any(_angle(rot, d) < spacing / 2 for d in done):
                continue  # starts where an earlier search already ended
            r2, s2, _ = _refine(scorer(1, h), rot, spacing / 2, max(0.5, voxel_deg(boxes[1]) / 2))
            cands.append((s2, h, r2))
            done.append(r2)
    cands.sort(key=lambda c: -c[0])
    best_by_hand: dict[bool, float] = {}
    best = None
    # 3: the best of each hand (or the best two of one hand) at refine_box
    finalists = [next(c for c in cands if c[1] == h) for h in hands] if len(hands) > 1 else cands[:2]
    for _, h, rot in finalists:
        r3, s3, t3 = _refine(scorer(2, h), rot, max(voxel_deg(boxes[1]) / 2, 0.5), 0.25)
        shift = t3 * n / boxes[2]
        if boxes[2] < n:  # the translation once more at full size
            shift = _Scorer(fourier_crop(movs[h], n), fourier_crop(ref_full, n), max_shift_frac * n, device,
                            1).score(r3[None], shift)[1][0]
        # judged at full size with cubic interpolation: trilinear scores at the refinement box
        # favour rotations close to the grid axes
        aligned = transform_map(moving, r3, shift, h)
        corr = float(np.corrcoef((aligned * mask).ravel(), (reference * mask).ravel())[0, 1])
        best_by_hand[h] = max(best_by_hand.get(h, -np.inf), corr)
        if best is None or corr > best[0]:
            best = (corr, h, r3, shift, aligned)
    corr, flip, rot, shift, aligned = best
    info = {
        "rotation": rot,
        "shift": np.asarray(shift, dtype=np.float64),
        "flipped": bool(flip),
        "correlation": corr,
        "correlation_by_hand": {("flipped" if k else "original"): float(v) for k, v in best_by_hand.items()},
        "search": {"boxes": boxes, "n_rotations": int(len(grid)), "hands": len(hands),
                   "spacing_deg": float(spacing)},
    }
    return aligned, info


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return math.degrees(math.acos(np.clip((np.trace(a @ b.T) - 1) / 2, -1.0, 1.0)))
