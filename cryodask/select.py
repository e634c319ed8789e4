"""Component 3 — perfect particle masks and good/bad particle selection.

The method (Auto3DCryoMap): every particle gets a *perfect* binary mask — an oriented
rectangle for a side view, a filled disc for a top view — built from its own segmented object,
and particles whose object is missing, broken, cut by the box edge, of the wrong size or of
the wrong shape are rejected with a recorded reason.

Per particle, in order (all kernels are pure functions on batches ``(n, N, N)``):

1. :func:`preprocess_particles` — CTF phase flip (when the defocus is known), Gaussian
   low-pass (≈ diameter/3.5 for the masks) and Fourier cropping to a small *working* box
   (64 px: the particle ≈ 40 px, segmentation fast and the noise averaged), then RELION-style
   normalisation.
2. :func:`cluster_masks` — intensity-based clustering: the two-class split of each particle's
   grey levels with the least within-class variance (the global optimum of 2-means in 1-D,
   i.e. Otsu's threshold); particles are protein-white → initial binary mask.
3. :func:`measure_objects` — cleaning (a small opening removes specks, a closing and hole
   filling make a hollow ring a disc, objects smaller than a fraction of the particle are
   dropped, border-touching debris is discarded), the particle's object (the one over the box
   centre) and its perfect masks: the minimum-area rectangle (its long axis gives the in-plane
   angle estimate; the Feret diameters are recorded) and, for top views, the disc found by a
   *modified* circular Hough transform (:func:`hough_discs`: radii near the expected one,
   centres near the box centre, and an oriented vote — edges count only when their gradient
   points to the centre, so a ring's outer rim wins over its inner rim); a top view's object
   is the filled convex hull of the pieces inside that disc. With ``view='auto'`` the view is
   the perfect mask (disc or rectangle) that overlaps the object better.
4. :func:`select_particles` — the good/bad decision on the feature table, with reasons (no
   mask, fragmented, touches the edge, size, shape); size thresholds are relative to the set's
   median size and its robust spread (or to a given diameter), all overridable
   (:class:`SelectionThresholds`).

Graph builders: :func:`features_graph` (map_blocks over particle chunks) and
:func:`masks_graph` (renders the perfect masks at full size from the features). Driver:
:func:`select_star` (STAR in → STAR with flags + zarr store + gallery PNG + report).

Coordinates: ``x`` = column, ``y`` = row, both in pixels **relative to the box centre**
(index ``N // 2``), in pixels of the *input* particle box unless a name says ``work``.
Angles in degrees, measured from +x towards +y (i.e. towards increasing row index).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import dask
import dask.array as da
import numpy as np
import torch
from scipy import ndimage as ndi

from .ctf import frequency_grid_rfft
from .model import particle_chunk

__all__ = [
    "FEATURES",
    "REASONS",
    "SelectionThresholds",
    "work_box_for",
    "preprocess_particles",
    "ctf_sign",
    "cluster_masks",
    "measure_objects",
    "edge_maps",
    "image_gradients",
    "hough_discs",
    "select_particles",
    "reason_text",
    "render_masks",
    "particle_features",
    "features_graph",
    "masks_graph",
    "inject_junk",
    "gallery_png",
    "select_star",
    "selection_columns",
    "star_inputs",
    "lazy_particle_images",
    "write_gallery",
]

#: Columns of the per-particle feature table returned by :func:`measure_objects`.
#: Lengths in px of the input box (positions relative to the box centre), angles in degrees.
FEATURES = (
    "found",          # 1 if an object sits over the box centre
    "x", "y",         # centre of the perfect mask (rectangle for side, disc for top views)
    "length", "width",  # rectangle long and short sides
    "angle",          # direction of the rectangle's long side, degrees in [0, 180)
    "feret_max", "feret_min",
    "area",           # object area, px²
    "eq_diameter",    # diameter of the disc of the same area
    "disc_x", "disc_y", "disc_r",  # disc (Hough for top views, equal-area disc at the centroid otherwise)
    "iou_rect", "iou_disc",  # overlap of the object with each perfect mask
    "circularity",    # 4πA/P²
    "touches_edge",   # the object touches the box edge
    "n_fragments",    # other pieces near the object, larger than a fraction of it
    "is_top",         # 1 top view, 0 side view
)
_F = {name: i for i, name in enumerate(FEATURES)}

#: Rejection reasons, as bit flags of ``cdRejectReason``.
REASONS = {1: "no mask", 2: "fragmented", 4: "touches edge", 8: "size", 16: "shape"}


def _feature(features: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(features)[:, _F[name]]


# ------------------------------------------------------------------------------ preprocessing
def work_box_for(box: int, work_box: int | None = 64) -> int:
    """Working box size (even, ≤ ``box``): particles are Fourier-cropped to it for masks and
    alignment (default 64 px: a particle filling ~2/3 of its box becomes ~40 px)."""
    if not work_box or work_box >= box:
        return int(box)
    return int(work_box) - int(work_box) % 2


def preprocess_particles(
    images: np.ndarray,
    pixel_size: float,
    *,
    work_box: int | None = None,
    lowpass_A: float | None = None,
    defocus: np.ndarray | None = None,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    normalise: bool = True,
) -> np.ndarray:
    """Normalise, phase-flip, low-pass and Fourier-crop a batch of particles.

    Parameters
    ----------
    images : (n, N, N) float, protein white, centre at N//2.
    pixel_size : Å/px of ``images``.
    work_box : output box M (≤ N, even); None keeps N. Pixel size becomes ``pixel_size·N/M``.
    lowpass_A : Gaussian low-pass whose amplitude is ½ at 1/lowpass_A (Å); None: no low-pass.
    defocus : (n, 3) rlnDefocusU, rlnDefocusV (Å), rlnDefocusAngle (deg); when given, each
        particle is multiplied by the sign of its CTF in Fourier space (phase flip), so the
        particle is white at all frequencies and its CTF fringes fold back into it.
    voltage, cs, amplitude_contrast : kV, mm, fraction (for the phase flip).
    normalise : RELION-style normalisation of the result (background outside 75 % of the half
        box: mean 0, σ 1).

    Returns
    -------
    (n, M, M) float32.
    """
    x = torch.as_tensor(np.array(images, np.float32))
    n, box = x.shape[0], x.shape[-1]
    m = work_box_for(box, work_box)
    if n == 0:
        return np.zeros((0, m, m), np.float32)
    # the centre N//2 → M//2: the phase factors of the two fftshifts are (−1)^(kx+ky) on the kept
    # frequencies of both grids, so they cancel and no shift is needed
    f = torch.fft.rfft2(x)
    if m != box:  # Fourier crop first: only the kept frequencies need the CTF and the filter
        h = m // 2
        f = torch.cat([f[:, :h, :h + 1], f[:, box - h:, :h + 1]], dim=1) * (m / box) ** 2
    ky, kx = frequency_grid_rfft(m, pixel_size * box / m)
    if defocus is not None:
        f = f * ctf_sign(ky, kx, np.asarray(defocus, np.float64).reshape(n, 3), voltage, cs, amplitude_contrast)
    if lowpass_A:
        sigma_k = (1.0 / lowpass_A) / np.sqrt(2 * np.log(2))
        f = f * torch.exp(-(kx**2 + ky**2) / (2 * sigma_k**2))
    out = torch.fft.irfft2(f, s=(m, m))
    if normalise:
        out = _normalise(out)
    return out.numpy().astype(np.float32)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """RELION normalisation of (n, N, N): pixels outside 75 % of the half box get mean 0, σ 1."""
    box = x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(box) - box // 2, torch.arange(box) - box // 2, indexing="ij")
    w = ((xx**2 + yy**2) > (0.375 * box) ** 2).to(x.dtype).reshape(-1)
    flat = x.reshape(len(x), -1)
    k = w.sum()
    mean = flat @ w / k
    var = (flat * flat) @ w / k - mean**2
    std = torch.sqrt(torch.clamp(var, min=0))
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (x - mean[:, None, None]) / std[:, None, None]


def ctf_sign(ky: torch.Tensor, kx: torch.Tensor, defocus: np.ndarray, voltage: float, cs: float,
             amplitude_contrast: float) -> torch.Tensor:
    """Sign (±1, float32, shape (n, *grid)) of RELION's CTF at frequencies (ky, kx) (1/Å) for
    defocus (n, 3) = (U Å, V Å, angle deg) — the phase-flip filter (same formula as
    :func:`cryodask.ctf.ctf_2d`, evaluated in float32 on a small grid)."""
    from .ctf import electron_wavelength

    d = torch.as_tensor(np.array(defocus, np.float64), dtype=torch.float32)
    lam = electron_wavelength(voltage)
    k1 = np.pi * lam
    k2 = np.pi / 2 * (cs * 1e7) * lam**3
    k3 = np.arctan(amplitude_contrast / np.sqrt(1.0 - amplitude_contrast**2))
    k2sq = kx**2 + ky**2
    theta = torch.atan2(ky, kx)
    c2, s2 = torch.cos(2 * theta), torch.sin(2 * theta)
    ang = torch.deg2rad(d[:, 2])[:, None, None]
    du, dv = d[:, 0, None, None], d[:, 1, None, None]
    deltaf = -(du + dv) * 0.5 - (du - dv) * 0.5 * (c2 * torch.cos(2 * ang) + s2 * torch.sin(2 * ang))
    chi = k1 * deltaf * k2sq + k2 * k2sq**2 - k3
    return torch.where(torch.sin(chi) > 0, -1.0, 1.0)


def cluster_masks(pre: np.ndarray, n_bins: int = 128) -> np.ndarray:
    """Two-class clustering of the grey levels of each particle → initial binary masks.

    ``pre`` (n, M, M): preprocessed particles (protein white); the bright class is the
    foreground. The split minimises the within-class sum of squares — the global optimum of
    two-means clustering in 1-D, i.e. Otsu's threshold — found exhaustively on a ``n_bins``
    histogram of each particle (all particles at once). Returns bool (n, M, M).
    """
    shape = np.shape(pre)
    if shape[0] == 0:
        return np.zeros(shape, bool)
    x = np.asarray(pre, np.float32).reshape(shape[0], -1)
    lo, hi = x.min(1), x.max(1)
    width = np.where(hi > lo, hi - lo, 1.0) / n_bins
    idx = np.clip(((x - lo[:, None]) / width[:, None]).astype(np.int64), 0, n_bins - 1)
    idx += np.arange(shape[0])[:, None] * n_bins
    hist = np.bincount(idx.ravel(), minlength=shape[0] * n_bins).reshape(shape[0], n_bins).astype(np.float64)
    centres = lo[:, None] + (np.arange(n_bins) + 0.5) * width[:, None]
    w0 = np.cumsum(hist, 1)  # pixels at or below each bin
    s0 = np.cumsum(hist * centres, 1)
    total_w, total_s = w0[:, -1:], s0[:, -1:]
    w1 = total_w - w0
    with np.errstate(invalid="ignore", divide="ignore"):
        between = w0 * w1 * (s0 / w0 - (total_s - s0) / w1) ** 2
    between = np.nan_to_num(between[:, :-1], nan=-1.0)
    k = np.argmax(between, 1)
    thr = lo + (k + 1) * width
    return (x >= thr[:, None]).reshape(shape)


# ------------------------------------------------------------------------- objects and masks
_DISK3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def _rect_from_points(pts: np.ndarray):
    """Minimum-area rectangle of contour points (k, 2) (pixel centres) as
    (cx, cy, length, width, angle_deg of the long side in [0, 180)), sides widened by 1 px so
    the rectangle covers the pixels rather than passing through their centres."""
    rect = cv2.minAreaRect(pts.astype(np.float32))
    corners = cv2.boxPoints(rect)
    e1, e2 = corners[1] - corners[0], corners[2] - corners[1]
    l1, l2 = float(np.hypot(*e1)), float(np.hypot(*e2))
    long_e = e1 if l1 >= l2 else e2
    ang = float(np.degrees(np.arctan2(long_e[1], long_e[0]))) % 180.0
    return rect[0][0], rect[0][1], max(l1, l2) + 1.0, min(l1, l2) + 1.0, ang


def _ferets(pts: np.ndarray) -> tuple[float, float]:
    """Maximum and minimum Feret (caliper) diameters of contour points, px (+1 px, as above)."""
    hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    if len(hull) < 3:
        d = np.ptp(hull, axis=0) if len(hull) else np.zeros(2)
        return float(np.hypot(*d)) + 1, 1.0
    diff = hull[:, None] - hull[None]
    fmax = float(np.sqrt((diff**2).sum(-1)).max())
    edges = np.roll(hull, -1, axis=0) - hull
    normals = np.stack([-edges[:, 1], edges[:, 0]], 1)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-9)
    proj = hull @ normals.T
    fmin = float((proj.max(0) - proj.min(0)).min())
    return fmax + 1.0, fmin + 1.0


def _rect_mask(grid, cx, cy, length, width, angle_deg) -> np.ndarray:
    """Binary rectangle (pixel-centre test) in absolute pixel coordinates; grid = (yy, xx)."""
    yy, xx = grid
    a = np.deg2rad(angle_deg)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    return (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)


def _disc_mask(grid, cx, cy, r) -> np.ndarray:
    yy, xx = grid
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def edge_maps(pre: np.ndarray, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """Canny edges (scikit-image) of each preprocessed particle (n, M, M) → bool (n, M, M).

    ``pre`` is normalised (background σ = 1), so the default hysteresis thresholds (gradient
    magnitudes 0.1/0.2) keep essentially every gradient ridge: the Hough vote, not the edge
    detector, separates the particle's rim from the noise (measured better than adaptive
    thresholds on simulated apoferritin at SNR 0.1)."""
    from skimage.feature import canny

    x = np.asarray(pre, np.float32)
    out = np.zeros(x.shape, bool)
    for i in range(len(x)):
        out[i] = canny(x[i], sigma=sigma, low_threshold=low, high_threshold=high)
    return out


def image_gradients(pre: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian-derivative gradients (d/dx, d/dy) of each image (n, M, M) → (n, 2, M, M)."""
    x = np.asarray(pre, np.float32)
    gx = ndi.gaussian_filter(x, sigma=(0, sigma, sigma), order=(0, 0, 1))
    gy = ndi.gaussian_filter(x, sigma=(0, sigma, sigma), order=(0, 1, 0))
    return np.stack([gx, gy], 1)


def hough_discs(edges: np.ndarray, radius_px: float, *, gradients: np.ndarray | None = None,
                rel_range: float = 0.2, max_offset_px: float | None = None, batch: int = 256) -> np.ndarray:
    """Modified circular Hough transform: the best circle of each edge map (n, M, M) with a
    radius within ``radius_px`` × (1 ± ``rel_range``) and a centre within ``max_offset_px`` of
    the box centre (default 0.7 × the radius).

    With ``gradients`` (n, 2, M, M) the vote is *oriented*: an edge pixel votes for a circle
    in proportion to how much its intensity gradient points towards the circle's centre
    (``−ĝ·n̂``, n̂ the circle's outward normal), and against it when the gradient points out —
    so the outer rim of a bright particle counts and a hollow ring's inner rim does not.
    Votes are accumulated for all particles and radii at once by FFT correlation with
    anti-aliased rings (normalised by their length, so a score is the fraction of the circle
    lying on consistent edges). The peak is refined to sub-pixel by the accumulator's centroid
    over 3×3 and a parabola in radius.

    Returns (n, 4) float64: centre x, y (absolute working px), radius (px), score.
    """
    e = torch.as_tensor(np.array(edges, np.float32))
    n, m = e.shape[0], e.shape[-1]
    if gradients is not None:
        g = torch.as_tensor(np.array(gradients, np.float32))
        g = g / torch.clamp(torch.sqrt((g**2).sum(1, keepdim=True)), min=1e-12)
        fields = e[:, None] * g  # (n, 2, M, M): unit gradients on the edges
    else:
        fields = e[:, None]
    radii = np.arange(max(2.0, np.floor(radius_px * (1 - rel_range))), np.ceil(radius_px * (1 + rel_range)) + 1.0)
    max_off = 0.7 * radius_px if max_offset_px is None else max_offset_px
    # periodic accumulation without wrap-around into the allowed centres needs a period
    # larger than half the box + the largest offset + the largest radius
    size = int(max(m, np.ceil(m / 2 + max_off + radii[-1] + 2)))
    size += size % 2
    pad = (size - m) // 2
    c = torch.arange(size, dtype=torch.float32) - size // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    dist = torch.sqrt(xx**2 + yy**2)
    rings = torch.clamp(1 - (dist[None] - torch.as_tensor(radii, dtype=torch.float32)[:, None, None]).abs(), min=0)
    rings = rings / rings.sum((-2, -1), keepdim=True)
    if gradients is not None:  # −(outward normal) kernels: votes for the centre the gradient points to
        safe = torch.clamp(dist, min=1e-6)
        kernels = torch.stack([-rings * xx / safe, -rings * yy / safe], 1)  # (R, 2, S, S)
    else:
        kernels = rings[:, None]
    kf = torch.fft.rfft2(torch.fft.ifftshift(kernels, dim=(-2, -1))).conj()  # correlation
    h = m // 2
    off = torch.arange(m, dtype=torch.float32) - h
    allowed = (off[:, None] ** 2 + off[None, :] ** 2) <= max_off**2
    out = np.zeros((n, 4))
    for s in range(0, n, batch):
        eb = torch.zeros((min(batch, n - s), fields.shape[1], size, size))
        eb[..., pad:pad + m, pad:pad + m] = fields[s:s + batch]
        spec = (torch.fft.rfft2(eb)[:, None] * kf[None]).sum(2)  # (b, R, S, S//2+1)
        acc = torch.fft.irfft2(spec, s=(size, size))[:, :, pad:pad + m, pad:pad + m]
        acc = torch.where(allowed, acc, torch.full_like(acc, -1.0)).numpy()
        for j in range(acc.shape[0]):
            k, y, x = np.unravel_index(int(np.argmax(acc[j])), acc[j].shape)
            y0, y1, x0, x1 = max(y - 1, 0), min(y + 2, m), max(x - 1, 0), min(x + 2, m)
            win = acc[j, k, y0:y1, x0:x1]
            w = np.clip(win - win.min(), 0, None)
            cy, cx = float(y), float(x)
            if w.sum() > 0:
                wy, wx = np.mgrid[y0:y1, x0:x1]
                cy, cx = float((wy * w).sum() / w.sum()), float((wx * w).sum() / w.sum())
            r = float(radii[k])
            if 0 < k < len(radii) - 1:
                a, b, c3 = acc[j, k - 1, y, x], acc[j, k, y, x], acc[j, k + 1, y, x]
                den = a - 2 * b + c3
                if den < 0:
                    r += float(np.clip(0.5 * (a - c3) / den, -0.5, 0.5))
            out[s + j] = cx, cy, r, float(acc[j, k, y, x])
    return out


def _is_border(stat, m) -> bool:
    x, y, w, h = stat[:4]
    return x == 0 or y == 0 or x + w >= m or y + h >= m


def measure_objects(binary: np.ndarray, *, view: str = "auto", expected_diameter_px: float | None = None,
                    scale: float = 1.0, discs: np.ndarray | None = None, binary_top: np.ndarray | None = None,
                    min_area_fraction: float = 0.1, fragment_fraction: float = 0.15) -> np.ndarray:
    """Clean each initial mask, find the particle's object and fit its perfect masks.

    Parameters
    ----------
    binary : (n, M, M) bool, initial masks at the working scale.
    view : 'side', 'top' or 'auto' (chosen per particle: the perfect mask that fits better).
    expected_diameter_px : particle diameter in *working* px (sets the smallest object kept,
        ``min_area_fraction`` of its disc area, the cleaning kernels and the central search
        radius); None: from the box (a particle filling 60 % of it).
    scale : input px per working px (N / M); lengths and positions in the result are
        multiplied by it (so they are in px of the input box).
    discs : (n, 4) Hough circles of :func:`hough_discs` (absolute working px), needed for top
        views and 'auto'. A top view's object is the filled convex hull of the pieces lying
        in its disc (a ring broken by noise is still one particle).
    binary_top : (n, M, M) bool, initial masks for the top-view objects (e.g. clustered after a
        stronger low-pass that fills a ring); default ``binary``.
    fragment_fraction : other pieces at least this fraction of the object's area, not touching
        the edge, within one diameter of it, count as fragments.

    Returns
    -------
    (n, len(FEATURES)) float64, columns :data:`FEATURES`, positions relative to the box centre.
    """
    b = np.asarray(binary, bool)
    n, m = b.shape[0], b.shape[-1]
    h = m // 2
    diam = float(expected_diameter_px or 0.6 * m)
    min_area = min_area_fraction * np.pi * (diam / 2) ** 2
    central_r = max(2.0, 0.25 * diam)
    yy, xx = np.mgrid[0:m, 0:m].astype(np.float64)
    grid = (yy, xx)
    central = (xx - h) ** 2 + (yy - h) ** 2 <= central_r**2
    out = np.zeros((n, len(FEATURES)), np.float64)
    rad = max(1, int(round(diam / 12)))
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rad + 1, 2 * rad + 1))
    if view != "side" and discs is None:
        raise ValueError("top views need the Hough discs (discs=...)")
    bt = b if binary_top is None else np.asarray(binary_top, bool)

    def components(mask, smallest):
        img = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _DISK3)
        img = cv2.morphologyEx(img, cv2.MORPH_CLOSE, disk)
        contours, _ = cv2.findContours(img, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        img = cv2.drawContours(np.zeros_like(img), contours, -1, 1, thickness=cv2.FILLED)  # holes filled
        img = cv2.morphologyEx(img, cv2.MORPH_OPEN, disk)
        nlab, lab, stats, cents = cv2.connectedComponentsWithStats(img, connectivity=8)
        return lab, stats, cents, [k for k in range(1, nlab) if stats[k, cv2.CC_STAT_AREA] >= smallest]

    for i in range(n):
        lab, stats, cents, keep = components(b[i], min_area)
        comp = {"side": (lab, stats, cents, keep)}
        if view != "side":  # a top view's pieces (the lobes of a ring) may each be small
            comp["top"] = components(bt[i], 0.2 * min_area)
        # the side-view object: the piece over the box centre (or the nearest one)
        side_obj = None
        if keep:
            overlap = np.array([np.count_nonzero((lab == k) & central) for k in keep])
            if overlap.max() > 0:
                side_obj = [keep[int(np.argmax(overlap))]]
            else:
                dist = np.array([np.hypot(cents[k][0] - h, cents[k][1] - h) for k in keep])
                if dist.min() <= 0.45 * diam:
                    side_obj = [keep[int(np.argmin(dist))]]
        # the top-view object: the pieces inside the Hough disc
        top_obj = None
        tlab, tstats, _, tkeep = comp.get("top", comp["side"])
        if discs is not None and view != "side" and tkeep:
            inside = _disc_mask(grid, discs[i, 0], discs[i, 1], 1.15 * discs[i, 2])
            members = [k for k in tkeep
                       if np.count_nonzero((tlab == k) & inside) >= 0.5 * tstats[k, cv2.CC_STAT_AREA]]
            top_obj = members or None
        cand = {}
        for name, members in (("side", side_obj), ("top", top_obj)):
            if members is None:
                continue
            obj = np.isin(comp[name][0], members)
            if name == "top":  # the filled convex hull of the pieces
                hull = cv2.convexHull(cv2.findNonZero(obj.astype(np.uint8)))
                obj = cv2.fillConvexPoly(np.zeros((m, m), np.uint8), hull, 1) > 0
            contours, _ = cv2.findContours(obj.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cand[name] = (obj, max(contours, key=len).reshape(-1, 2), members)
        if view == "top" and "top" not in cand and discs[i, 3] > 0:
            cand["top"] = (np.zeros((m, m), bool), None, [])  # the Hough disc without pieces
        if not cand:
            continue
        if view == "side" or (view == "auto" and "top" not in cand):
            is_top = False
        elif view == "top" or "side" not in cand:
            is_top = True
        else:  # auto: which perfect mask fits the (hull of the) top-view object better
            obj, pts, _ = cand["top"]
            rx, ry, rl, rw, ra = _rect_from_points(pts)
            is_top = _iou(obj, _disc_mask(grid, *discs[i, :3])) > _iou(obj, _rect_mask(grid, rx, ry, rl, rw, ra))
        obj, pts, members = cand["top" if is_top else "side"]
        lab, stats, cents, keep = comp["top" if is_top else "side"]
        if is_top:  # fragments: only pieces of the particle's own size class count
            keep = [k for k in keep if stats[k, cv2.CC_STAT_AREA] >= min_area]
        area = float(np.count_nonzero(obj))
        touches = bool(obj[0].any() or obj[-1].any() or obj[:, 0].any() or obj[:, -1].any())
        if pts is None:  # a top view whose disc holds no piece of the initial mask
            pts = np.array([[discs[i, 0], discs[i, 1]]], np.float32)
        ox, oy = (float(xx[obj].mean()), float(yy[obj].mean())) if area else (discs[i, 0], discs[i, 1])
        frags = 0
        for k in keep:
            if k in members or _is_border(stats[k], m):
                continue
            near = np.hypot(cents[k][0] - ox, cents[k][1] - oy) <= diam
            if near and stats[k, cv2.CC_STAT_AREA] >= fragment_fraction * area:
                frags += 1
        perim = float(cv2.arcLength(pts.reshape(-1, 1, 2).astype(np.float32), True))
        cx, cy, length, width, ang = _rect_from_points(pts)
        fmax, fmin = _ferets(pts)
        r_eq = float(np.sqrt(area / np.pi))
        iou_rect = _iou(obj, _rect_mask(grid, cx, cy, length, width, ang))
        if is_top:
            dx, dy, dr = discs[i, :3]
            touches = touches or min(dx - dr, dy - dr, m - 1 - dx - dr, m - 1 - dy - dr) < -0.5
        else:
            dx, dy, dr = ox, oy, r_eq
        iou_disc = _iou(obj, _disc_mask(grid, dx, dy, dr))
        px, py = (dx, dy) if is_top else (cx, cy)
        row = dict(found=1.0, x=(px - h) * scale, y=(py - h) * scale, length=length * scale,
                   width=width * scale, angle=ang, feret_max=fmax * scale, feret_min=fmin * scale,
                   area=area * scale**2, eq_diameter=2 * r_eq * scale, disc_x=(dx - h) * scale,
                   disc_y=(dy - h) * scale, disc_r=dr * scale, iou_rect=iou_rect, iou_disc=iou_disc,
                   circularity=4 * np.pi * area / max(perim, 1.0) ** 2, touches_edge=float(touches),
                   n_fragments=float(frags), is_top=float(is_top))
        out[i] = [row[k] for k in FEATURES]
    return out


def particle_features(images: np.ndarray, pixel_size: float, *, view: str = "auto", work_box: int | None = 64,
                      lowpass_A: float | None = None, diameter_A: float | None = None,
                      defocus: np.ndarray | None = None, voltage: float = 300.0, cs: float = 2.7,
                      amplitude_contrast: float = 0.1) -> np.ndarray:
    """Preprocess → cluster → measure, for one batch of particles (the map_blocks kernel).

    ``images`` (n, N, N) protein white; ``pixel_size`` Å/px; ``diameter_A`` the expected particle
    diameter (Å; None: 60 % of the box); ``lowpass_A`` default: diameter / 3.5 (at least 2.5 working
    px). Returns the (n, len(FEATURES)) table of :func:`measure_objects` in input px.
    """
    box = np.shape(images)[-1]
    m = work_box_for(box, work_box)
    scale = box / m
    work_px = pixel_size * scale
    diameter_A = diameter_A or 0.6 * box * pixel_size
    lowpass = lowpass_A or max(diameter_A / 3.5, 2.5 * work_px)
    pre = preprocess_particles(images, pixel_size, work_box=m, lowpass_A=lowpass, defocus=defocus,
                               voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)
    diam_px = diameter_A / work_px
    discs = binary_top = None
    if view != "side":
        edge_pre = preprocess_particles(images, pixel_size, work_box=m, lowpass_A=max(diameter_A / 2.7, 2.5 * work_px),
                                        defocus=defocus, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast)
        discs = hough_discs(edge_maps(edge_pre), diam_px / 2, gradients=image_gradients(edge_pre))
        binary_top = cluster_masks(edge_pre)
    return measure_objects(cluster_masks(pre), view=view, expected_diameter_px=diam_px, scale=scale, discs=discs,
                           binary_top=binary_top)


# -------------------------------------------------------------------------------- selection
@dataclass(frozen=True)
class SelectionThresholds:
    """Good/bad thresholds. Sizes are compared with the expected size: the median over the
    set (of the objects found away from the edge, per view), or ``expected_diameter_px``.

    A size is accepted within ± max(``size_tolerance``, ``size_sigmas`` × the set's robust σ
    (1.4826 × MAD) / median) of the expected size — the equivalent diameter on both sides,
    the maximum Feret diameter only above (a pair of overlapping particles is long).
    min_iou: smallest accepted overlap (IoU) of the object with its perfect mask (side views;
    ``min_iou_top`` for the hull of a top view's pieces with its Hough disc).
    max_fragments: largest accepted number of fragments.
    """

    size_tolerance: float = 0.05
    size_sigmas: float = 4.0
    min_iou: float = 0.75
    min_iou_top: float = 0.6
    max_fragments: int = 0
    expected_diameter_px: float | None = None


def _robust_rel_sigma(x: np.ndarray) -> float:
    x = np.asarray(x, float)
    x = x[np.isfinite(x) & (x > 0)]
    if x.size < 5:
        return 0.0
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)) / med)


def select_particles(features: np.ndarray, thresholds: SelectionThresholds = SelectionThresholds()
                     ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Good/bad decision from the feature table (:data:`FEATURES`).

    Returns ``(selected bool (n,), reasons int (n,) — bit flags of :data:`REASONS`, info)`` where
    info holds the expected sizes (px) and the relative tolerances used, and the thresholds.
    """
    f = np.asarray(features, np.float64)
    n = len(f)
    found = _feature(f, "found") > 0
    edge = _feature(f, "touches_edge") > 0
    ok = found & ~edge
    eq = _feature(f, "eq_diameter")
    fmax = _feature(f, "feret_max")
    top = _feature(f, "is_top") > 0
    exp_eq = np.full(n, np.nan)
    exp_fmax = np.full(n, np.nan)
    tol_eq = np.full(n, thresholds.size_tolerance)
    tol_f = np.full(n, thresholds.size_tolerance)
    for cls in (top, ~top):
        sel = ok & cls
        pool = sel if sel.sum() >= 5 else ok
        if not pool.any():
            continue
        exp_eq[cls] = np.median(eq[pool])
        exp_fmax[cls] = np.median(fmax[pool])
        tol_eq[cls] = max(thresholds.size_tolerance, thresholds.size_sigmas * _robust_rel_sigma(eq[pool]))
        tol_f[cls] = max(thresholds.size_tolerance, thresholds.size_sigmas * _robust_rel_sigma(fmax[pool]))
    if thresholds.expected_diameter_px:
        ratio = exp_fmax / exp_eq  # keep the set's shape (a rectangle's largest caliper is its diagonal)
        exp_eq = np.full(n, float(thresholds.expected_diameter_px))
        exp_fmax = exp_eq * np.where(np.isfinite(ratio), ratio, 1.0)
    iou = np.where(top, _feature(f, "iou_disc"), _feature(f, "iou_rect"))
    min_iou = np.where(top, thresholds.min_iou_top, thresholds.min_iou)
    reasons = np.zeros(n, np.int64)
    reasons[~found] |= 1
    reasons[found & (_feature(f, "n_fragments") > thresholds.max_fragments)] |= 2
    reasons[found & edge] |= 4
    with np.errstate(invalid="ignore", divide="ignore"):
        r_eq = eq / exp_eq - 1
        r_f = fmax / exp_fmax - 1
    bad_size = found & ((np.abs(r_eq) > tol_eq) | (r_f > tol_f))
    reasons[bad_size] |= 8
    reasons[found & (iou < min_iou)] |= 16
    info = {
        "expected_eq_diameter_px": {"side": _nanmed(exp_eq[~top]), "top": _nanmed(exp_eq[top])},
        "expected_feret_max_px": {"side": _nanmed(exp_fmax[~top]), "top": _nanmed(exp_fmax[top])},
        "size_tolerance": {"side": _nanmed(tol_eq[~top]), "top": _nanmed(tol_eq[top])},
        "feret_tolerance": {"side": _nanmed(tol_f[~top]), "top": _nanmed(tol_f[top])},
        "thresholds": asdict(thresholds),
    }
    return reasons == 0, reasons, info


def _nanmed(x) -> float | None:
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else None


def reason_text(code: int) -> str:
    """'ok' or the reasons of a rejection code joined by '+', e.g. 'touches edge+size'."""
    code = int(code)
    if code == 0:
        return "ok"
    return "+".join(name for bit, name in REASONS.items() if code & bit)


def render_masks(features: np.ndarray, box: int) -> np.ndarray:
    """Perfect binary masks (n, box, box) uint8 from the feature table: the rectangle
    (side views) or the disc (top views); all zeros where no object was found."""
    f = np.asarray(features, np.float64)
    n = len(f)
    h = box // 2
    yy, xx = np.mgrid[0:box, 0:box].astype(np.float64) - h
    out = np.zeros((n, box, box), np.uint8)
    for i in range(n):
        if f[i, _F["found"]] <= 0:
            continue
        if f[i, _F["is_top"]] > 0:
            m = (xx - f[i, _F["disc_x"]]) ** 2 + (yy - f[i, _F["disc_y"]]) ** 2 <= f[i, _F["disc_r"]] ** 2
        else:
            a = np.deg2rad(f[i, _F["angle"]])
            u = (xx - f[i, _F["x"]]) * np.cos(a) + (yy - f[i, _F["y"]]) * np.sin(a)
            v = -(xx - f[i, _F["x"]]) * np.sin(a) + (yy - f[i, _F["y"]]) * np.cos(a)
            m = (np.abs(u) <= f[i, _F["length"]] / 2) & (np.abs(v) <= f[i, _F["width"]] / 2)
        out[i] = m
    return out


# ------------------------------------------------------------------------------ graph builders
def _chunk_kernel(block, *extra, **kw):
    defocus = extra[0] if extra else None
    return particle_features(block, defocus=defocus, **kw)


def features_graph(images: da.Array, pixel_size: float, *, defocus: np.ndarray | da.Array | None = None,
                   **kw) -> da.Array:
    """Lazy feature table (n, len(FEATURES)) float64: :func:`particle_features` mapped over the
    particle chunks of ``images`` (n, N, N) (one task per chunk; nothing computes here).
    ``defocus`` (n, 3) is chunked like the images. Other keywords go to :func:`particle_features`."""
    images = images.rechunk({1: -1, 2: -1})
    args = [images]
    idx = ["pyx"]
    if defocus is not None:
        d = defocus if isinstance(defocus, da.Array) else da.from_array(np.asarray(defocus, np.float64))
        args.append(d.rechunk((images.chunks[0], 3)))
        idx.append("pc")
    pairs = [a for pair in zip(args, idx) for a in pair]
    return da.blockwise(_chunk_kernel, "pf", *pairs, new_axes={"f": len(FEATURES)}, dtype=np.float64,
                        meta=np.empty((0, 0), np.float64), concatenate=True, pixel_size=pixel_size, **kw)


def masks_graph(features: da.Array, box: int) -> da.Array:
    """Lazy perfect masks (n, box, box) uint8 from a lazy feature table (one task per chunk)."""
    features = features.rechunk({1: -1})
    return da.map_blocks(render_masks, features, box, dtype=np.uint8, drop_axis=1, new_axis=[1, 2],
                         chunks=(features.chunks[0], (box,), (box,)), meta=np.empty((0, 0, 0), np.uint8))


# ------------------------------------------------------------------------------ junk injector
def inject_junk(noisy: np.ndarray, clean: np.ndarray, rng: np.random.Generator, *, fraction: float = 0.1,
                diameter_px: float, noise_sigma: float,
                kinds: tuple[str, ...] = ("ice", "pair", "edge")) -> tuple[np.ndarray, np.ndarray]:
    """Replace a ``fraction`` of a simulated stack by junk of known kind (a test utility).

    * ``ice``: a big Gaussian blob (σ 0.4–0.8 × diameter, bright or dark, peak 1.5–3 × the
      clean signal's range) added to the particle at a random offset within ½ diameter;
    * ``pair``: a second particle overlapping the first (offset 0.55–0.85 × diameter);
    * ``edge``: the particle moved so the box edge cuts it (its centre 0.35–0.5 × box from
      the box centre).

    ``noisy``/``clean`` (n, N, N) from the simulator; ``noise_sigma`` the simulated noise σ.
    Returns (images (n, N, N) float32, kind per particle: '' for good particles).
    """
    imgs = np.array(noisy, np.float32, copy=True)
    n, box = imgs.shape[0], imgs.shape[-1]
    labels = np.array([""] * n, dtype=object)
    junk = rng.choice(n, size=int(round(fraction * n)), replace=False)
    yy, xx = np.mgrid[0:box, 0:box].astype(np.float64) - box // 2
    amp = float(np.ptp(clean.mean(0))) or 1.0
    for j, i in enumerate(junk):
        kind = kinds[j % len(kinds)]
        labels[i] = kind
        noise = imgs[i] - clean[i]
        if kind == "ice":
            s = rng.uniform(0.4, 0.8) * diameter_px
            off = rng.uniform(-0.5, 0.5, 2) * diameter_px
            sign = 1.0 if rng.random() < 0.5 else -1.0
            blob = sign * rng.uniform(1.5, 3.0) * amp * np.exp(-((xx - off[0]) ** 2 + (yy - off[1]) ** 2) / (2 * s**2))
            imgs[i] = clean[i] + blob + noise
        elif kind == "pair":
            other = clean[rng.integers(n)]
            a = rng.uniform(0, 2 * np.pi)
            d = rng.uniform(0.55, 0.85) * diameter_px
            moved = ndi.shift(other, (d * np.sin(a), d * np.cos(a)), order=1, mode="constant",
                              cval=float(np.median(other)))
            imgs[i] = clean[i] + moved - float(np.median(other)) + noise
        elif kind == "edge":
            a = rng.uniform(0, 2 * np.pi)
            d = rng.uniform(0.35, 0.5) * box
            bg = float(np.median(clean[i]))
            moved = ndi.shift(clean[i], (d * np.sin(a), d * np.cos(a)), order=1, mode="constant", cval=bg)
            imgs[i] = moved + noise
        else:
            raise ValueError(f"unknown junk kind {kind!r}")
    return imgs, labels


# ------------------------------------------------------------------------------------ gallery
def gallery_png(path: str | Path, images: np.ndarray, masks: np.ndarray, selected: np.ndarray,
                reasons: np.ndarray, *, n_each: int = 8, title: str | None = None, numbers=None) -> Path:
    """A PNG of up to ``n_each`` accepted (top row) and rejected (bottom row) particles with
    their perfect-mask outlines (green accepted, red rejected) and the rejection reason;
    ``numbers`` (default 0…n−1) label the particles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    acc = np.flatnonzero(selected)[:n_each]
    rej = np.flatnonzero(~np.asarray(selected, bool))[:n_each]
    cols = max(1, min(n_each, max(len(acc), len(rej))))
    fig, axes = plt.subplots(2, cols, figsize=(1.8 * cols, 4.2), squeeze=False)
    for row, (idx, colour, label) in enumerate(((acc, "lime", "accepted"), (rej, "red", "rejected"))):
        for c in range(cols):
            ax = axes[row, c]
            ax.axis("off")
            if c >= len(idx):
                continue
            i = idx[c]
            img = images[i]
            lo, hi = np.percentile(img, [1, 99])
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if masks[i].any():
                ax.contour(masks[i], levels=[0.5], colors=colour, linewidths=0.8)
            num = i if numbers is None else numbers[i]
            ax.set_title(f"#{num} {label if row == 0 else reason_text(reasons[i])}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    # fixed margins: tight_layout measured every title's extent (a third of the drawing time)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.86 if title else 0.93, wspace=0.06, hspace=0.22)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- driver
def _optics_value(ds, label, default):
    """The value of an optics label for the particles (the first particle's group; a file with
    a single optics group but no rlnOpticsGroup column in its particle loop uses that group)."""
    from .io.star import per_particle

    try:
        return float(np.asarray(per_particle(ds, label), float)[0])
    except (KeyError, IndexError):
        if label in ds.variables and ds[label].dims == ("optics",) and ds.sizes.get("optics", 0) == 1:
            return float(ds[label].values[0])
        return default


def lazy_particle_images(ds, chunk: int) -> da.Array:
    """The images of a particle STAR Dataset as a lazy (n, N, N) float32 array, one read task
    per chunk of ``chunk`` particles."""
    from .io.star import read_particle_images

    n = ds.sizes["particle"]
    first = read_particle_images(ds, [0])
    box = first.shape[-1]
    parts = []
    for s in range(0, n, chunk):
        idx = np.arange(s, min(n, s + chunk))
        task = dask.delayed(read_particle_images, pure=True)(ds, idx)
        parts.append(da.from_delayed(task, shape=(len(idx), box, box), dtype=np.float32))
    return da.concatenate(parts, axis=0)


def star_inputs(star_in, chunk: int | None = None):
    """(Dataset, lazy images, pixel size Å, defocus (n, 3) or None, optics dict) of a particle STAR
    path, or of a particle Dataset from the store (its ``image`` variable is used lazily), in
    chunks of ``chunk`` particles (default :func:`cryodask.model.particle_chunk`)."""
    from .errors import InputError
    from .io.star import read_particles

    import xarray as xr

    if isinstance(star_in, xr.Dataset):  # a particle Dataset of the store, with lazy 'image'
        ds = star_in.drop_vars([v for v in star_in.data_vars if star_in[v].ndim > 1])
        images = star_in["image"].data
        images = images.rechunk((chunk or particle_chunk(images.shape[0]), -1, -1))
        star_in = ds.attrs.get("source", "particles")
    else:
        ds = read_particles(star_in)
        images = None
    if ds.sizes.get("particle", 0) == 0:
        raise InputError(star_in, "no particles")
    apix = _optics_value(ds, "rlnImagePixelSize", None)
    if not apix:
        raise InputError(star_in, "no pixel size (rlnImagePixelSize in the optics table)")
    if images is None:
        images = lazy_particle_images(ds, chunk or particle_chunk(ds.sizes["particle"]))
    defocus = None
    if all(c in ds for c in ("rlnDefocusU", "rlnDefocusV")):
        ang = ds["rlnDefocusAngle"].values if "rlnDefocusAngle" in ds else np.zeros(ds.sizes["particle"])
        defocus = np.stack([ds["rlnDefocusU"].values, ds["rlnDefocusV"].values, ang], 1).astype(np.float64)
    optics = {"voltage": _optics_value(ds, "rlnVoltage", 300.0), "cs": _optics_value(ds, "rlnSphericalAberration", 2.7),
              "amplitude_contrast": _optics_value(ds, "rlnAmplitudeContrast", 0.1)}
    return ds, images, apix, defocus, optics


def select_star(star_in: str | Path, out_dir: str | Path, *, view: str = "auto", diameter_A: float | None = None,
                thresholds: SelectionThresholds | None = None, work_box: int = 64, chunk: int | None = None) -> dict:
    """``cryodask select``: perfect masks and good/bad selection for a RELION particle STAR.

    Writes into ``out_dir``: ``particles_selected.star`` (every particle, with ``cdSelected``
    (1/0), ``cdRejectReason`` (text), ``cdViewClass`` (top/side) and the perfect-mask
    parameters ``cdMaskX/Y`` (px from the box centre), ``cdMaskLength/Width`` (px),
    ``cdMaskAngle`` (deg), ``cdMaskRadius`` (px)), the zarr store ``particles.zarr`` (group
    ``select``: ``mask`` (particle, y, x) uint8, ``features`` (particle, feature)), the gallery
    ``select_gallery.png`` and ``select_summary.json``. Returns the summary dict.
    """
    import xarray as xr

    from .io.star import write_particles
    from .model import write_group

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds, images, apix, defocus, optics = star_inputs(star_in, chunk)
    box = images.shape[-1]
    feats = features_graph(images, apix, defocus=defocus, view=view, work_box=work_box, diameter_A=diameter_A,
                           **optics)
    f = feats.compute()
    thr = thresholds or SelectionThresholds()
    selected, reasons, info = select_particles(f, thr)
    table = selection_columns(f, selected, reasons)
    out_ds = ds.copy()
    for k, v in table.items():
        out_ds[k] = ("particle", v)
    write_particles(out / "particles_selected.star", out_ds)
    masks = masks_graph(da.from_array(f, chunks=(chunk, -1)), box)
    store = xr.Dataset({"mask": (("particle", "y", "x"), masks),
                        "features": (("particle", "feature"), da.from_array(f, chunks=(chunk, -1))),
                        "cdSelected": (("particle",), selected.astype(np.int8)),
                        "cdRejectReason": (("particle",), reasons)},
                       coords={"feature": list(FEATURES)},
                       attrs={"pixel_size": apix, "stage": "select", "source": str(star_in)})
    write_group(store, out / "particles.zarr", "select")
    write_gallery(out / "select_gallery.png", ds, f, selected, reasons, images=images)
    summary = {
        "n_particles": int(len(f)),
        "n_selected": int(selected.sum()),
        "n_rejected": int((~selected).sum()),
        "rejected_by_reason": {name: int(np.count_nonzero(reasons & bit)) for bit, name in REASONS.items()},
        "n_top": int((_feature(f, "is_top") > 0).sum()),
        "n_side": int(((_feature(f, "is_top") == 0) & (_feature(f, "found") > 0)).sum()),
        "view": view,
        "seconds": round(time.perf_counter() - t0, 2),
        **info,
    }
    (out / "select_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def write_gallery(path: str | Path, ds, features: np.ndarray, selected: np.ndarray, reasons: np.ndarray,
                  n_each: int = 8, images=None) -> Path | None:
    """Read the first ``n_each`` accepted and rejected particles of a STAR Dataset (or take them
    from the lazy ``images`` array) and write their :func:`gallery_png` with the perfect masks
    (None when there are no particles)."""
    from .io.star import read_particle_images

    selected = np.asarray(selected, bool)
    show = np.sort(np.r_[np.flatnonzero(selected)[:n_each], np.flatnonzero(~selected)[:n_each]])
    if not show.size:
        return None
    # a few particles, read here (Dask's threaded scheduler), not on the cluster: the gallery is
    # drawn while the cluster computes the alignment from the same stack
    if images is None:
        imgs = read_particle_images(ds, show)
    else:
        imgs = images[show]
        imgs = np.asarray(imgs.compute(scheduler="threads") if hasattr(imgs, "compute") else imgs)
    box = imgs.shape[-1]
    masks = render_masks(np.asarray(features)[show], box)
    return gallery_png(path, imgs, masks, selected[show], np.asarray(reasons)[show], n_each=n_each,
                       title=f"{int(selected.sum())} accepted / {len(selected)}", numbers=show)


def selection_columns(features: np.ndarray, selected: np.ndarray, reasons: np.ndarray) -> dict[str, np.ndarray]:
    """STAR columns recording the selection: cdSelected, cdRejectReason, cdViewClass and the
    perfect-mask parameters (px of the input box, relative to its centre; degrees)."""
    f = np.asarray(features)
    top = _feature(f, "is_top") > 0
    return {
        "cdSelected": np.asarray(selected, np.int64),
        "cdRejectReason": np.array([reason_text(r).replace(" ", "_") for r in reasons], dtype=object),
        "cdViewClass": np.where(top, "top", "side").astype(object),
        "cdMaskX": _feature(f, "x").astype(np.float64),
        "cdMaskY": _feature(f, "y").astype(np.float64),
        "cdMaskLength": _feature(f, "length").astype(np.float64),
        "cdMaskWidth": _feature(f, "width").astype(np.float64),
        "cdMaskAngle": _feature(f, "angle").astype(np.float64),
        "cdMaskRadius": _feature(f, "disc_r").astype(np.float64),
    }
