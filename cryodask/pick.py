"""Component 2a — fully automated particle picking by intensity-based clustering (IBC).

AutoCryoPicker's route, made to work on close-packed real micrographs:

1. **Intensity-based clustering** (:func:`cluster_membership`): a two-class model of the
   preprocessed micrograph's grey levels — a Gaussian mixture (default), k-means or fuzzy
   c-means — gives every pixel a membership of the *protein* (dark) class.
2. **Binary mask and cleaning** (:func:`ibc_mask`): membership > ½, opened to remove specks
   and thin bridges, small objects removed, particle-sized holes filled (scikit-image / OpenCV
   morphology).
3. **Contamination** (:func:`contamination_mask`): mask regions far thicker than a particle
   (ice, carbon, aggregates) survive a morphological opening with a disk wider than the
   particle; picks on them or at their rim are discarded.
4. **Circular particles by a modified circular Hough transform** (:func:`circular_hough`):
   every edge pixel votes *along its gradient* — a dark particle on a bright background, so
   only inward votes — for centres at radii around the particle radius. The accumulator
   extends half a diameter beyond the image and is normalised by the fraction of the circle
   inside it, so particles cut by the border are found at their true centre (and dropped when
   that lies outside). Greedy Euclidean non-maximum suppression (``min_distance``) separates
   touching, close-packed particles. The votes come from the preprocessed grey levels
   (``hough_on="image"``, default) or from the clustering's membership map
   (``hough_on="membership"``; within 0.01 F1 on EMPIAR-10146).
5. **Verification and score** (:func:`circle_support`): the figure of merit is the fraction of
   the candidate's outline (48 directions, best radius, ±2 px) where the image rises outwards
   — an explicit boundary support in [0, 1]; candidates below ``threshold`` are dropped. The
   mean outward gradient on the outline (*edge strength*) guards against false picks in empty
   ice: when even the five strongest circles of a micrograph are weak (``empty_gate``) nothing
   is picked, and a pick needs ``min_relative_strength`` of their strength.
6. **Square/rectangular particles by Feret boxes** (:func:`object_shapes`,
   :func:`rectangle_support`, :func:`classify_view`): the cleaned mask is split into one region
   per particle (watershed of the distance transform seeded at the circular picks); each
   region's minimum-area rectangle (``cv2.minAreaRect``) and Feret diameter give its box. A
   region is a *side* view when its box explains the boundary about as well as a circle and
   it fills its box or is elongated; regions without a circular pick are added as side views
   when their box support passes the threshold.

All sizes derive from ``diameter / pixel_size`` (Å → px) at the picking scale; the defaults
need no per-dataset tuning. Output coordinates are pixels of the *original* micrograph
(x = column, y = row, 0-based, pixel centres at integers).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist
from skimage import measure, morphology, segmentation

from .runtime import release_freed_memory, run_beside
from .preprocess import TARGET_DIAMETER_PX, picking_binning

__all__ = [
    "PICK_COLUMNS",
    "cluster_membership",
    "ibc_mask",
    "contamination_mask",
    "gradient_field",
    "visible_fraction",
    "circular_hough",
    "nms_peaks",
    "circle_support",
    "rectangle_support",
    "object_shapes",
    "classify_view",
    "darkness_map",
    "dataset_gate",
    "gate_flags",
    "view_features",
    "classify_views",
    "dataset_views",
    "pack_view_features",
    "view_fit_all",
    "view_summary",
    "fit_dataset_views",
    "apply_dataset_views",
    "to_original",
    "pick_ibc",
    "pick_graph",
    "accepted_picks",
    "evaluate_picks",
    "picks_table",
    "write_picks",
]

#: Columns of every picker's output table.
PICK_COLUMNS = ["x", "y", "score", "view"]

#: Default acceptance threshold on the boundary-support score (fraction of the outline).
DEFAULT_THRESHOLD = 0.5


def _empty_picks() -> pd.DataFrame:
    return pd.DataFrame({"x": pd.Series(dtype=float), "y": pd.Series(dtype=float),
                         "score": pd.Series(dtype=float), "view": pd.Series(dtype=object)})


# --------------------------------------------------------------------------------------------
# 1. intensity-based clustering
# --------------------------------------------------------------------------------------------


def _histogram(img: np.ndarray, nbins: int = 256, block: int = 1 << 20):
    """(bin centres, counts as float64) of the grey levels of ``img`` over [min, max], binned in
    float64. ``img`` may be float32: it is converted ``block`` pixels at a time (the counts of
    each pixel's bin do not depend on the blocks), so no float64 copy of the image is made."""
    flat = np.asarray(img).reshape(-1)
    lo, hi = float(np.min(flat)), float(np.max(flat))
    if hi <= lo:
        hi = lo + 1.0
    h = np.zeros(nbins, np.int64)
    for i in range(0, max(len(flat), 1), block):
        hb, e = np.histogram(flat[i:i + block].astype(np.float64), nbins, (lo, hi))
        h += hb
    return 0.5 * (e[1:] + e[:-1]), h.astype(np.float64)


def _quartile_init(x, w):
    q = np.cumsum(w) / w.sum()
    return np.array([x[min(np.searchsorted(q, 0.25), len(x) - 1)], x[min(np.searchsorted(q, 0.75), len(x) - 1)]])


def _gmm(img, x, w, n_iter=300):
    mu = _quartile_init(x, w)
    mean = (w * x).sum() / w.sum()
    sd = np.full(2, np.sqrt((w * (x - mean) ** 2).sum() / w.sum()) / 2 + 1e-6)
    pi = np.array([0.5, 0.5])
    floor = (x[1] - x[0]) if len(x) > 1 else 1e-6
    for _ in range(n_iter):
        lik = pi / sd * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2) + 1e-300
        r = lik / lik.sum(1, keepdims=True)
        nk = (w[:, None] * r).sum(0) + 1e-12
        mu_new = (w[:, None] * r * x[:, None]).sum(0) / nk
        sd = np.maximum(np.sqrt((w[:, None] * r * (x[:, None] - mu_new) ** 2).sum(0) / nk), floor)
        pi = nk / nk.sum()
        done = np.allclose(mu_new, mu, rtol=0, atol=1e-6 * (abs(x[-1] - x[0]) + 1e-12))
        mu = mu_new
        if done:
            break
    dark = int(np.argmin(mu))
    return _gmm_posterior(img, mu, sd, pi, dark), {"means": mu, "sigmas": sd, "weights": pi}


def _gmm_posterior(img, mu, sd, pi, k):
    """Posterior of component ``k`` of the two-component mixture ``(mu, sd, pi)`` at every pixel
    of ``img`` (float32 or float64), float64, shaped like ``img``. The arithmetic of
    ``lik = pi/sd·exp(−½((img − mu)/sd)²) + 1e−300; lik[k] / (lik[0] + lik[1])`` in float64,
    element for element, on two image-sized float64 buffers (in place) instead of an
    (ny, nx, 2) array and its temporaries."""
    lik = []
    for j in range(2):
        t = np.subtract(img, mu[j], dtype=np.float64)
        t /= sd[j]
        np.square(t, out=t)
        t *= -0.5
        np.exp(t, out=t)
        t *= (pi / sd)[j]
        t += 1e-300
        lik.append(t)
    post, other = lik[k], lik[1 - k]
    np.add(lik[0], lik[1], out=other)
    post /= other
    return post


def _kmeans(img, x, w, n_iter=300):
    c = _quartile_init(x, w)
    for _ in range(n_iter):
        lab = np.abs(x[:, None] - c).argmin(1)
        new = np.array([(w[lab == k] * x[lab == k]).sum() / max(w[lab == k].sum(), 1e-12) if (lab == k).any() else c[k]
                        for k in range(2)])
        if np.allclose(new, c):
            break
        c = new
    t = c.mean()
    lo, hi = (c[0], c[1]) if c[0] <= c[1] else (c[1], c[0])
    return (img < t).astype(np.float64), {"centres": np.array([lo, hi]), "threshold": t}


def _fcm(img, x, w, m=2.0, n_iter=300):
    c = _quartile_init(x, w)

    def memb(v, c):
        dist = np.abs(v[..., None] - c) + 1e-12
        inv = dist ** (-2.0 / (m - 1.0))
        return inv / inv.sum(-1, keepdims=True)

    for _ in range(n_iter):
        u = memb(x, c) ** m
        new = (w[:, None] * u * x[:, None]).sum(0) / ((w[:, None] * u).sum(0) + 1e-12)
        done = np.allclose(new, c, rtol=0, atol=1e-6 * (abs(x[-1] - x[0]) + 1e-12))
        c = new
        if done:
            break
    dark = int(np.argmin(c))
    return memb(img, c)[..., dark], {"centres": c, "fuzzifier": m}


def cluster_membership(img: np.ndarray, method: str = "gmm") -> tuple[np.ndarray, dict]:
    """Membership of every pixel in the *dark* (protein) intensity class.

    Two classes (protein, background) are fitted to the grey-level histogram (256 bins) of
    ``img``:

    - ``"gmm"`` — Gaussian mixture by EM; membership = posterior of the darker component.
    - ``"kmeans"`` — 1-D k-means; membership is hard (1 below the midpoint of the centres).
    - ``"fcm"`` — fuzzy c-means (fuzzifier 2); membership is the fuzzy membership.

    Returns ``(membership, info)``: a float32 array shaped like ``img`` in [0, 1] and the
    fitted parameters.
    """
    img = np.asarray(img)
    if img.dtype != np.float32:  # float32 is used as is (float64 arithmetic on it: the same values)
        img = img.astype(np.float64)
    if method not in ("gmm", "kmeans", "fcm"):
        raise ValueError(f"unknown clustering {method!r}; choose 'gmm', 'kmeans' or 'fcm'")
    x, w = _histogram(img)
    if method == "gmm":
        u, info = _gmm(img, x, w)
    else:
        img = img.astype(np.float64, copy=False)
        u, info = (_kmeans if method == "kmeans" else _fcm)(img, x, w)
    np.clip(u, 0, 1, out=u)
    return u.astype(np.float32), info


# --------------------------------------------------------------------------------------------
# 2-3. mask, cleaning, contamination
# --------------------------------------------------------------------------------------------


def _disk(r: float) -> np.ndarray:
    r = max(0, int(round(r)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def ibc_mask(membership: np.ndarray, diameter_px: float, fill_holes: bool = True) -> np.ndarray:
    """Binary protein mask from a membership map, cleaned at the particle's scale.

    ``membership > 0.5`` → opening with a disk of radius ``diameter_px/16`` (breaks thin
    bridges, removes specks) → objects smaller than 15 % of a particle's area removed → (with
    ``fill_holes``) holes smaller than a disk of 0.6·diameter filled (hollow particles become
    solid). Returns bool.
    """
    m = _ibc_mask_open(membership, diameter_px)
    return _fill_particle_holes(m, diameter_px) if fill_holes else m


def _ibc_mask_open(membership, diameter_px):
    """:func:`ibc_mask` without ``fill_holes``."""
    m = (np.asarray(membership) > 0.5).astype(np.uint8)
    m = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(diameter_px / 16.0)).astype(bool)
    area = np.pi * diameter_px ** 2 / 4.0
    return morphology.remove_small_objects(m, max_size=max(1, int(0.15 * area)))


def _fill_particle_holes(m, diameter_px):
    """The hole filling of :func:`ibc_mask` (a new array)."""
    return morphology.remove_small_holes(m, max_size=max(1, int(np.pi * (0.3 * diameter_px) ** 2)))


def contamination_mask(mask: np.ndarray, diameter_px: float, rim: float = 0.35) -> np.ndarray:
    """Regions of ``mask`` much thicker than a particle, grown by ``rim``·diameter.

    A morphological opening with a disk of diameter 1.2·``diameter_px`` removes every
    particle-sized object (and chains of touching particles, whose gaps and — for hollow
    particles — interiors stay open when ``mask`` is not hole-filled); what survives is ice,
    carbon or aggregates. Returns bool.
    """
    m = np.asarray(mask).astype(np.uint8)
    thick = cv2.morphologyEx(m, cv2.MORPH_OPEN, _disk(0.6 * diameter_px))
    if rim > 0:
        thick = cv2.dilate(thick, _disk(rim * diameter_px))
    return thick.astype(bool)


# --------------------------------------------------------------------------------------------
# 4-5. modified circular Hough transform and boundary support
# --------------------------------------------------------------------------------------------


def gradient_field(img: np.ndarray, sigma: float, noise_factor: float = 2.5) -> tuple[np.ndarray, np.ndarray, float]:
    """Gaussian-derivative gradient ``(gy, gx)`` of ``img`` at scale ``sigma`` px, and the
    gradient scale used to normalise boundary supports: the 90th percentile of the magnitude,
    but at least ``noise_factor`` × its median. For pure noise (Rayleigh-distributed
    magnitudes) p90/median ≈ 1.8, in micrographs with particles it is 2.3–3.5: the floor keeps
    noise in empty micrographs from reaching particle-like supports."""
    gy, gx, gs, _ = _gradient_field(img, sigma, noise_factor)
    return gy, gx, gs


def _gradient_field(img, sigma, noise_factor):
    """:func:`gradient_field` and ``(|∇|, its median, its 90th percentile)`` (float32 array and
    NumPy scalars, as :func:`circular_hough` computes them) for reuse by the Hough transform."""
    img = np.asarray(img, dtype=np.float32)
    gy = ndi.gaussian_filter(img, sigma, order=(1, 0))
    gx = ndi.gaussian_filter(img, sigma, order=(0, 1))
    mag = np.hypot(gy, gx)
    med, p90 = np.median(mag), np.percentile(mag, 90)
    gs = max(float(p90), noise_factor * float(med)) or 1.0
    return gy, gx, gs, (mag, med, p90)


def visible_fraction(shape: Sequence[int], radius: float, n_angles: int = 64, pad: int = 0) -> np.ndarray:
    """For every pixel of the image of ``shape`` grown by ``pad`` px on each side, the fraction
    of the circle of ``radius`` px around it that lies inside the (ungrown) image.
    Shape ``(ny + 2·pad, nx + 2·pad)``."""
    th = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    ys = np.arange(-pad, shape[0] + pad)[:, None] + radius * np.sin(th)[None]
    xs = np.arange(-pad, shape[1] + pad)[:, None] + radius * np.cos(th)[None]
    fy = ((ys >= 0) & (ys <= shape[0] - 1)).astype(np.float32)
    fx = ((xs >= 0) & (xs <= shape[1] - 1)).astype(np.float32)
    return (fy @ fx.T) / n_angles


def circular_hough(gy: np.ndarray, gx: np.ndarray, radii: Sequence[float], window: int = 5, pad: int = 0) -> np.ndarray:
    """Gradient-directed circular Hough transform for dark discs on a bright background.

    Pixels whose gradient magnitude is above the median vote, with weight
    ``min(|∇|/p90(|∇|), 1)``, for the centre ``p − r·∇/|∇|`` at every radius ``r`` in
    ``radii`` (px). Each radius's accumulator is summed over a ``window``² neighbourhood and
    divided by the circumference 2πr; the result is the mean over the radius band, divided by
    the fraction of the circle inside the image (at least ½). The accumulator extends ``pad``
    px beyond every edge so that particles cut by the border are found at their true centre,
    even when it lies outside the image: element ``(i, j)`` is image pixel ``(i − pad, j − pad)``.
    Shape ``(ny + 2·pad, nx + 2·pad)``; larger = more circle evidence.
    """
    mag = np.hypot(gy, gx)
    return _circular_hough(gy, gx, (mag, np.median(mag), np.percentile(mag, 90)), radii, window, pad)


def _circular_hough(gy, gx, mag_stats, radii, window=5, pad=0):
    """:func:`circular_hough` given ``(|∇|, its median, its 90th percentile)``. The vote
    positions ``rint(y − r·uy)`` are computed in place on cache-sized float64 buffers
    (:data:`_HOUGH_CHUNK` votes at a time) and the votes inside the accumulator collected in
    their order for one ``np.bincount`` per radius; the vote sums divided by 2πr are added to
    the float32 accumulator a few rows at a time. The arithmetic (and the types NumPy promotes
    to for the type of ``r``) of the plain expressions, so the same values, without their
    image-sized temporaries."""
    mag, med, p90 = mag_stats
    sel = mag > med
    ys, xs = np.nonzero(sel)
    m = mag[sel]
    wts = np.minimum(m / (p90 + 1e-12), 1.0).astype(np.float64)  # bincount's float64 weights
    uy = gy[sel] / (m + 1e-12)
    ux = gx[sel] / (m + 1e-12)
    del sel, m
    ny, nx = gy.shape
    py, px = ny + 2 * pad, nx + 2 * pad
    acc_sum = np.zeros((py, px), np.float32)
    n, ch = len(ys), _HOUGH_CHUNK
    cy, cx = np.empty(min(n, ch)), np.empty(min(n, ch))  # cache-sized work buffers
    idx, w = np.empty(n, np.int64), np.empty(n)  # the votes inside the accumulator, in order
    rows = max(1, ch // max(px, 1))
    buf = np.empty((rows, px))
    for r in radii:
        k = 0
        for a in range(0, n, ch):
            b = min(n, a + ch)
            for c, u, p in ((cy, uy, ys), (cx, ux, xs)):
                c = c[:b - a]
                if np.result_type(u, r) == np.float64:
                    np.multiply(u[a:b], r, out=c)
                    np.subtract(p[a:b], c, out=c)
                else:  # r·u in float32 (a Python float radius), then as float64
                    np.subtract(p[a:b], u[a:b] * r, out=c)
                np.rint(c, out=c)
                c += pad
            qy, qx = cy[:b - a], cx[:b - a]
            ok = (qy >= 0) & (qy < py) & (qx >= 0) & (qx < px)
            j = k + int(np.count_nonzero(ok))
            t = qy[ok]
            t *= px
            t += qx[ok]  # exact: integers far below 2**53
            idx[k:j] = t
            w[k:j] = wts[a:b][ok]
            k = j
        acc = np.bincount(idx[:k], weights=w[:k], minlength=py * px)
        box = cv2.boxFilter(acc.astype(np.float32).reshape(py, px), -1, (window, window), normalize=False,
                            borderType=cv2.BORDER_CONSTANT)
        del acc
        c2 = 2 * np.pi * r
        if np.result_type(box, c2) == np.float64:  # float64 quotient, added and rounded to float32
            for a in range(0, py, rows):
                q = np.divide(box[a:a + rows], c2, out=buf[:min(rows, py - a)])
                np.add(acc_sum[a:a + rows], q, out=acc_sum[a:a + rows], casting="same_kind")
        else:
            acc_sum += box / c2
        del box
    acc_sum /= max(len(radii), 1)
    vis = visible_fraction((ny, nx), float(np.mean(radii)), pad=pad)
    np.maximum(vis, 0.5, out=vis)
    acc_sum /= vis
    return acc_sum


#: Votes per block of the circular Hough transform's position arithmetic (cache-sized buffers).
_HOUGH_CHUNK = 1 << 15


def nms_peaks(score: np.ndarray, min_distance: float, threshold: float) -> np.ndarray:
    """Local maxima of ``score`` ≥ ``threshold``, greedily kept from the highest down so that
    no two are closer than ``min_distance`` px (Euclidean). Returns ``(k, 2)`` int (row, col)."""
    size = max(3, 2 * int(min_distance / 3) + 1)
    mx = ndi.maximum_filter(score, size=size, mode="nearest")
    rows, cols = np.nonzero((score >= mx) & (score >= threshold))
    del mx
    if len(rows) == 0:
        return np.zeros((0, 2), int)
    order = np.argsort(-score[rows, cols], kind="stable")
    pts = np.c_[rows[order], cols[order]].astype(float)
    # greedy suppression: a peak is kept unless a kept, higher-ranked one lies closer than
    # min_distance; only the pairs closer than that (k-d tree) are visited, with the exact
    # integer squared distances of the all-pairs rule
    md2 = min_distance ** 2
    keep = np.ones(len(pts), bool)
    if md2 > 0 and len(pts) > 1:
        from scipy.spatial import cKDTree

        pairs = cKDTree(pts).query_pairs(abs(float(min_distance)) + 1.0, output_type="ndarray")
        if len(pairs):
            d2 = ((pts[pairs[:, 0]] - pts[pairs[:, 1]]) ** 2).sum(1)
            pairs = np.sort(pairs[d2 < md2], axis=1)  # (higher-ranked, lower-ranked)
            pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
            starts = np.searchsorted(pairs[:, 0], np.arange(len(pts) + 1))
            lower = pairs[:, 1]
            for i in np.unique(pairs[:, 0]):
                if keep[i]:
                    keep[lower[starts[i]:starts[i + 1]]] = False
    return pts[keep].astype(int)


def _support(gy, gx, gs, py, px, ny_, nx_, offsets, raw=False):
    """mean over outline points of max over normal offsets of clip(g·n/gs, 0, 1); with ``raw``
    also the unclipped mean of g·n/gs exactly on the outline (a tie-breaker)."""
    ny, nx = gy.shape
    gyf, gxf = np.ravel(gy), np.ravel(gx)
    best = None
    on = None
    for o in offsets:
        qy, qx = py + o * ny_, px + o * nx_
        inside = (qy >= 0) & (qy <= ny - 1) & (qx >= 0) & (qx <= nx - 1)
        flat = np.clip(np.rint(qy).astype(np.int64), 0, ny - 1)
        flat *= nx
        flat += np.clip(np.rint(qx).astype(np.int64), 0, nx - 1)
        v = np.take(gyf, flat) * ny_
        v += np.take(gxf, flat) * nx_
        v /= gs
        v[~inside] = np.nan
        best = v if best is None else np.fmax(best, v)
        if o == 0:
            on = v
    v = np.clip(best, 0.0, 1.0)
    n_in = np.isfinite(v).sum(-1)
    sup = np.where(n_in > 0, np.nansum(v, -1) / np.maximum(n_in, 1), 0.0)
    if not raw:
        return sup
    on = best if on is None else on
    return sup, np.where(n_in > 0, np.nansum(on, -1) / np.maximum(n_in, 1), 0.0)


def circle_support(gy, gx, gs, centres: np.ndarray, radii: Sequence[float], n_angles: int = 48,
                   offsets: Sequence[float] = (-2, -1, 0, 1, 2), return_strength: bool = False):
    """Boundary support of circles: for each centre ``(row, col)`` and radius, the fraction of
    ``n_angles`` outline points (inside the image) where the map rises outwards (gradient
    along the outward normal, in units of the robust gradient scale ``gs``, clipped to
    [0, 1]), each point taking its best of ``offsets`` px along the normal. Returns the best
    support over ``radii`` and that radius (px); ties are broken by the strongest mean
    outward gradient exactly on the circle (``strength``, in units of ``gs``, returned third
    with ``return_strength``)."""
    centres = np.asarray(centres, dtype=float).reshape(-1, 2)
    th = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    sn, cs = np.sin(th)[None], np.cos(th)[None]
    best = np.full(len(centres), -1.0)
    best_m = np.full(len(centres), -np.inf)
    best_r = np.zeros(len(centres))
    with np.errstate(invalid="ignore"):
        for r in radii:
            s, m = _support(gy, gx, gs, centres[:, :1] + r * sn, centres[:, 1:] + r * cs, sn, cs, offsets, raw=True)
            upd = (s > best + 1e-9) | ((np.abs(s - best) <= 1e-9) & (m > best_m))
            best_m[upd], best[upd], best_r[upd] = m[upd], s[upd], r
    if return_strength:
        return best, best_r, best_m
    return best, best_r


def _box_outline(rect, n_points=48):
    """Points and outward unit normals along the outline of a cv2 rotated rect ((cx,cy),(w,h),a)."""
    return _box_outlines([rect], n_points)[0]


def _box_outlines(rects, n_points=48):
    """:func:`_box_outline` of every rect: a list of (points (P, 2) x/y, normals (P, 2)). The
    arithmetic of the single-rect expressions, evaluated for all the rects' points at once."""
    if not len(rects):
        return []
    per_side = []  # (rect index, origin x, y, direction x, y, length, normal x, y, k)
    for i, ((cx, cy), (w, h), ang) in enumerate(rects):
        a = np.deg2rad(ang)
        u = np.array([np.cos(a), np.sin(a)])   # along w, in (x, y)
        v = np.array([-np.sin(a), np.cos(a)])  # along h
        per = 2 * (w + h)
        sides = ((v * h / 2, u, w, v), (-v * h / 2, u, w, -v), (u * w / 2, v, h, u), (-u * w / 2, v, h, -u))
        for (o, t, length, n) in sides:
            k = max(2, int(round(n_points * length / max(per, 1e-9))))
            per_side.append((i, cx + o[0], cy + o[1], t[0], t[1], length, n[0], n[1], k))
    tab = np.array([row[1:8] for row in per_side], dtype=np.float64)
    ks = np.array([row[8] for row in per_side], dtype=np.int64)
    rect_of = np.array([row[0] for row in per_side], dtype=np.int64)
    rep = np.repeat(np.arange(len(ks)), ks)
    j = np.arange(len(rep)) - np.repeat(np.cumsum(ks) - ks, ks)  # index within the side
    s = (j + 0.5) / ks[rep] - 0.5
    sl = s * tab[rep, 4]
    x = tab[rep, 0] + sl * tab[rep, 2]
    y = tab[rep, 1] + sl * tab[rep, 3]
    pts = np.stack([x, y], -1)
    nrm = tab[rep][:, 5:7]
    ends = np.cumsum(np.bincount(rect_of, weights=ks, minlength=len(rects)).astype(np.int64))
    starts = ends - np.bincount(rect_of, weights=ks, minlength=len(rects)).astype(np.int64)
    return [(pts[a:b], nrm[a:b]) for a, b in zip(starts, ends)]


def rectangle_support(gy, gx, gs, rects, offsets: Sequence[float] = (-2, -1, 0, 1, 2),
                      return_strength: bool = False):
    """Boundary support (as :func:`circle_support`) of rotated rectangles given as
    ``cv2.minAreaRect`` tuples ``((cx, cy), (w, h), angle_deg)`` in (x, y) pixel units; with
    ``return_strength`` also their mean outward gradient on the outline (units of ``gs``)."""
    out = np.zeros(len(rects))
    strength = np.zeros(len(rects))
    outlines = _box_outlines(rects)
    # the rectangles whose outlines have the same number of points are measured together (each
    # row's sums are those of a rectangle on its own)
    groups: dict[int, list[int]] = {}
    for i, (p, _) in enumerate(outlines):
        groups.setdefault(len(p), []).append(i)
    with np.errstate(invalid="ignore"):
        for idx in groups.values():
            p = np.stack([outlines[i][0] for i in idx])
            n = np.stack([outlines[i][1] for i in idx])
            sup, m = _support(gy, gx, gs, p[:, :, 1], p[:, :, 0], n[:, :, 1], n[:, :, 0], offsets, raw=True)
            out[idx], strength[idx] = sup, m
    return (out, strength) if return_strength else out


# --------------------------------------------------------------------------------------------
# 6. objects, shapes, views
# --------------------------------------------------------------------------------------------


def object_shapes(mask: np.ndarray, markers: np.ndarray | None = None, *,
                  measures: bool = True) -> tuple[np.ndarray, pd.DataFrame]:
    """Split ``mask`` into one region per particle and measure each region's shape.

    Regions: watershed of the negated distance transform, seeded at ``markers`` (``(k, 2)``
    row/col, e.g. circle picks) plus one seed per connected component that holds no marker.
    Returns ``(labels, table)`` with, per region: ``label, row, col`` (centroid), ``area``,
    ``rect`` (cv2.minAreaRect in x/y), ``rect_w, rect_h`` (long, short side),
    ``rectangularity`` (area / box area) and, with ``measures`` (default), ``feret`` (max Feret
    diameter, from the OpenCV convex hull), ``circularity`` (4π·area/perimeter²) and
    ``solidity``. (:func:`pick_ibc` reads only the former and passes ``measures=False``.)
    """
    mask = np.asarray(mask, bool)
    cc = measure.label(mask, connectivity=2)
    seeds = np.zeros(mask.shape, np.int32)
    n = 0
    if markers is not None and len(markers):
        for r, c in np.asarray(markers, int):
            if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and mask[r, c]:
                n += 1
                seeds[r, c] = n
    dist = _distance_transform(mask)
    have = set(np.unique(cc[seeds > 0]).tolist())
    missing = [lab for lab in range(1, int(cc.max()) + 1) if lab not in have]
    if missing:
        for r, c in ndi.maximum_position(dist, cc, missing):
            n += 1
            seeds[r, c] = n
    if n == 0:
        return np.zeros(mask.shape, np.int32), pd.DataFrame(columns=["label"])
    np.negative(dist, out=dist)
    labels = segmentation.watershed(dist, seeds, mask=mask)
    del dist, cc, seeds
    rows = []
    if measures:
        regions = ((reg.label, reg.coords, reg) for reg in measure.regionprops(labels))
    else:
        regions = ((i + 1, _region_coords(labels, sl, i + 1), None)
                   for i, sl in enumerate(ndi.find_objects(labels)) if sl is not None)
    for lab, yx, reg in regions:
        coords = yx[:, ::-1].astype(np.float32)  # (x, y)
        rect = cv2.minAreaRect(coords)
        (w, h) = rect[1]
        w, h = w + 1.0, h + 1.0  # pixel extent, not centre-to-centre
        rect = (rect[0], (w, h), rect[2])
        area = float(len(yx))
        cy, cx = yx.astype(np.float64).mean(0)  # = regionprops' centroid
        row = {"label": lab, "row": cy, "col": cx, "area": area, "rect": rect, "rect_w": max(w, h),
               "rect_h": min(w, h), "rectangularity": area / (w * h)}
        if measures:
            perim = max(reg.perimeter, 1.0)
            hull = cv2.convexHull(coords).reshape(-1, 2)
            # Feret diameter: largest distance between hull vertices (+1 px: pixel extent)
            feret = float(cdist(hull, hull).max()) + 1.0 if len(hull) > 1 else 1.0
            # hull of pixel squares ≈ hull of centres grown by half a pixel (Pick's theorem)
            hull_area = cv2.contourArea(hull.astype(np.float32)) + cv2.arcLength(hull.astype(np.float32), True) / 2 + 1
            row.update(feret=feret, circularity=4 * np.pi * area / perim ** 2, solidity=min(1.0, area / hull_area))
        rows.append(row)
    cols = ["label", "row", "col", "area"] + (["feret"] if measures else []) + \
        ["rect", "rect_w", "rect_h", "rectangularity"] + (["circularity", "solidity"] if measures else [])
    return labels, pd.DataFrame(rows, columns=cols)


def _distance_transform(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.distance_transform_edt(mask)``, bit for bit, from OpenCV's exact
    Euclidean distance transform (float32): both are √k for the integer squared distance k, so
    k is recovered exactly (rounding; its float32 error is far below ½ at these distances) and
    its float64 square root taken, as SciPy does. Faster and without SciPy's image-sized
    feature-transform arrays. SciPy itself where a distance could exceed 1000 px or the mask has
    no background pixel."""
    mask = np.asarray(mask, bool)
    if mask.all():
        return ndi.distance_transform_edt(mask)
    d = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if d.max() > 1000:
        return ndi.distance_transform_edt(mask)
    k = np.square(d, dtype=np.float64)
    del d
    np.rint(k, out=k)
    return np.sqrt(k, out=k)


def _region_coords(labels, sl, lab):
    """(k, 2) int (row, col) of the pixels of region ``lab`` (bounding box ``sl``) in raster
    order, as ``regionprops(labels)[...].coords``."""
    rr, cc = np.nonzero(labels[sl] == lab)
    return np.stack([rr + sl[0].start, cc + sl[1].start], -1)


#: long/short side ratio above which a compact object counts as rectangular (discs measure ≤ 1.07
#: on noisy masks)
ASPECT_SIDE = 1.15


def classify_view(circle_sup: float, rect_sup: float, rectangularity: float, aspect: float) -> str:
    """'side' (square/rectangular) or 'top' (round) for one object.

    A box outline and a circle outline are both fitted to the object's boundary (boundary
    supports in [0, 1]); a round object supports its circle far better than its minimum-area
    box (the box corners lie off the boundary: box support ≲ 0.8 for discs and rings), a
    square or rectangle supports its box about as well as the (tolerant) circle. Side when
    ``rect_sup ≥ circle_sup − 0.2`` *and* the mask fills its box more than a disc can
    (``rectangularity ≥ 0.82``; a disc fills π/4 ≈ 0.785, a rectangle ≈ 1) or is elongated
    (long/short side ≥ :data:`ASPECT_SIDE`).
    """
    if rect_sup >= circle_sup - 0.2 and (rectangularity >= 0.82 or aspect >= ASPECT_SIDE):
        return "side"
    return "top"


# --------------------------------------------------------------------------------------------
# the IBC picker
# --------------------------------------------------------------------------------------------


def _ring_coverage(mask: np.ndarray, centres: np.ndarray, r_in: float, r_out: float) -> np.ndarray:
    """Fraction of the annulus ``r_in ≤ ρ ≤ r_out`` px around each centre (row, col) covered by
    ``mask`` (pixels outside the image ignored). Counted exactly at the centres only (no
    image-sized filtering)."""
    if len(centres) == 0:
        return np.zeros(0)
    k = int(np.ceil(r_out))
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    rr = np.hypot(yy, xx)
    ring = (rr >= r_in) & (rr <= r_out)
    dy, dx = yy[ring], xx[ring]
    c = np.asarray(centres, int)
    ny, nx = mask.shape
    frac = np.zeros(len(c))
    for i in range(0, len(c), 1024):  # bounded (k, ring) temporaries
        qy, qx = c[i:i + 1024, :1] + dy, c[i:i + 1024, 1:] + dx
        inside = (qy >= 0) & (qy < ny) & (qx >= 0) & (qx < nx)
        hit = np.asarray(mask, bool)[np.clip(qy, 0, ny - 1), np.clip(qx, 0, nx - 1)] & inside
        frac[i:i + 1024] = hit.sum(1) / np.maximum(inside.sum(1), 1)
    return np.clip(frac, 0.0, 1.0)


def darkness_map(img: np.ndarray, diameter_px: float, radius: float = 0.4) -> np.ndarray:
    """Darkness of a particle-sized disc around every pixel: the mean of ``−img`` over a disc
    of radius ``radius``·``diameter_px`` px, in robust z units of the micrograph (minus the median,
    over 1.4826·MAD of the disc means). Shape of ``img``; particles score 1–3, background ≈ 0."""
    k = _disk(radius * diameter_px).astype(np.float32)
    z = -cv2.filter2D(np.asarray(img, np.float32), -1, k / k.sum(), borderType=cv2.BORDER_REFLECT)
    med = float(np.median(z))
    mad = 1.4826 * float(np.median(np.abs(z - med))) or 1.0
    return (z - med) / mad


def dataset_gate(candidates: Sequence[pd.DataFrame], min_fraction: float = 0.75) -> list[pd.DataFrame]:
    """Dataset-level empty-micrograph gate over the candidate tables of all micrographs
    (``pick_ibc(..., return_candidates=True)``; the reduction of the picking graph).

    A micrograph's *reference strength* (mean edge strength of its five strongest circles,
    units of its gradient scale) is compared with the median over the dataset: a micrograph
    below ``min_fraction`` of it holds nothing particle-like that the others have (empty ice,
    noise) and all its candidates are rejected (``accepted=False``, ``empty=True``). The
    per-micrograph ``empty_gate`` cannot do this alone: faint particles at low SNR can be as
    weak as empty real ice. Returns new tables, in order.
    """
    flags = gate_flags([_reference_strength(c) for c in candidates], min_fraction)
    return [_gated(c, f) for c, f in zip(candidates, flags)]


def gate_flags(refs: Sequence[float], min_fraction: float = 0.75) -> np.ndarray:
    """The rule of :func:`dataset_gate` on the micrographs' reference strengths ``refs`` (NaN: no
    candidates): (n,) bool, True for a micrograph whose candidates are all rejected."""
    refs = np.asarray(refs, float)
    ok = np.isfinite(refs) & (refs > 0)
    if not ok.any():
        return np.zeros(len(refs), bool)
    return np.isfinite(refs) & (refs < min_fraction * float(np.median(refs[ok])))


def _reference_strength(c: pd.DataFrame) -> float:
    return float(c["reference_strength"].iloc[0]) if len(c) and "reference_strength" in c else np.nan


def _gated(c: pd.DataFrame, flag: bool) -> pd.DataFrame:
    return c.assign(accepted=False, empty=True) if flag and len(c) else c


def to_original(rows: np.ndarray, cols: np.ndarray, scale_y: float, scale_x: float) -> tuple[np.ndarray, np.ndarray]:
    """Map pixel-centre coordinates of an image downsampled by ``scale`` back to the
    original: ``u_orig = (u + 0.5)·scale − 0.5`` (x from columns, y from rows)."""
    return (np.asarray(cols, float) + 0.5) * scale_x - 0.5, (np.asarray(rows, float) + 0.5) * scale_y - 0.5


def _scales(shape, binning, original_shape):
    if original_shape is not None:
        return original_shape[0] / shape[0], original_shape[1] / shape[1]
    return float(binning), float(binning)


def pick_ibc(
    preprocessed: np.ndarray,
    pixel_size: float,
    diameter: float,
    *,
    clustering: str = "gmm",
    binning: float | None = None,
    original_shape: Sequence[int] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    min_distance: float = 0.6,
    border: float = 0.0,
    radius_range: tuple[float, float] = (0.38, 0.6),
    side_views: bool = True,
    side_peaks: bool = True,
    side_boxes: bool = True,
    peak_darkness: float = 1.3,
    peak_separation: float = 0.85,
    peak_support: float = 0.4,
    peak_radius: float = 0.5,
    hough_on: str = "image",
    noise_factor: float = 2.5,
    min_relative_strength: float = 0.25,
    empty_gate: float = 0.5,
    min_coverage: float = 0.0,
    min_strength: float = 0.2,
    min_darkness: float = 1.0,
    return_candidates: bool = False,
) -> pd.DataFrame:
    """Pick particles in one preprocessed micrograph by intensity-based clustering.

    Parameters
    ----------
    preprocessed : (ny, nx) float — output of :func:`cryodask.preprocess.preprocess_micrograph`
        (protein dark), possibly downsampled.
    pixel_size : Å/px of the *original* micrograph.
    diameter : particle outer diameter in Å.
    clustering : ``"gmm"`` (default), ``"kmeans"`` or ``"fcm"`` — see :func:`cluster_membership`.
    binning : downsampling factor of ``preprocessed`` relative to the original; default
        :func:`~cryodask.preprocess.picking_binning` (what the default chain used).
    original_shape : ``(ny, nx)`` of the original micrograph; when given, the exact per-axis
        scale ``original/preprocessed`` maps coordinates back (preferred over ``binning``).
    threshold : minimum boundary-support score in [0, 1].
    min_distance : minimum centre distance between picks, × diameter.
    border : picks whose centre is closer than ``border``·diameter to the edge are dropped
        (centres outside the image always are).
    radius_range : circle radii searched, × diameter.
    side_views : also look for square/rectangular particles (regions without a circular pick).
    peak_darkness, peak_radius, peak_support : side-view candidates from the darkness map
        (:func:`darkness_map` with a disc of radius ``peak_radius``·diameter — the whole
        particle: a side view's mass sits in its long walls, off-centre, so a smaller disc
        both misses faint ones and pulls the peak towards a wall or a neighbour): peaks of at
        least ``peak_darkness`` robust z units, ``min_distance`` apart, with circle support
        ``peak_support`` or more.
    hough_on : ``"image"`` (preprocessed grey levels, default) or ``"membership"`` (the
        clustering's membership map, smoothed).
    noise_factor : floor of the gradient scale, × median gradient magnitude (see
        :func:`gradient_field`).
    min_relative_strength : minimum edge strength of a pick relative to the mean of the five
        strongest circles of the micrograph — unless its ``darkness`` (see
        :func:`darkness_map`) is at least ``min_darkness``: a faint but massive particle
        (e.g. a side view next to much sharper top views) is kept.
    empty_gate : if that mean is below this (units of the gradient scale) the micrograph is
        taken to be empty and nothing is picked (pure noise: 0.3–0.4; the dataset-level
        :func:`dataset_gate` also drops micrographs far weaker than the others).
    min_strength : minimum mean outward gradient on the outline (units of the gradient scale;
        noise circles: median 0.12, 90th percentile 0.25).
    min_darkness : darkness (robust z units) that lets a pick pass without
        ``min_relative_strength``.
    min_coverage : minimum fraction of the particle's outer half (0.25–0.5 diameter) covered
        by the IBC mask (default 0: off; on real close-packed data the global mask misses too
        many particles to be a reliable filter).
    return_candidates : return every candidate with the extra columns ``row, col`` (picking
        scale), ``border_dist`` (× diameter), ``contaminated``, ``coverage``, ``radius``
        (× diameter), ``strength``, ``relative_strength``, ``empty`` (the micrograph failed
        ``empty_gate``) and ``accepted`` — for diagnostics and training labels.

    Returns
    -------
    DataFrame with columns ``x, y`` (original-micrograph pixels, x = column, y = row),
    ``score`` (boundary support in [0, 1]) and ``view`` (``"top"`` round, ``"side"``
    square/rectangular), sorted by decreasing score.
    """
    img = np.asarray(preprocessed, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D micrograph, got shape {img.shape}")
    if binning is None:
        binning = picking_binning(pixel_size, diameter, TARGET_DIAMETER_PX)
    sy, sx = _scales(img.shape, binning, original_shape)
    d = float(diameter) / float(pixel_size) / float(np.sqrt(sy * sx))  # particle diameter, px here
    ny, nx = img.shape

    memb, _ = cluster_membership(img, clustering)
    opened = _ibc_mask_open(memb, d)  # ibc_mask(memb, d, fill_holes=False)
    mask = _fill_particle_holes(opened, d)  # ibc_mask(memb, d)
    contam = contamination_mask(opened, d)
    del opened
    if hough_on == "membership":
        src = ndi.gaussian_filter(1.0 - memb, max(0.5, d / 32.0))
    elif hough_on == "image":
        src = img
    else:
        raise ValueError("hough_on must be 'membership' or 'image'")
    del memb  # image-sized temporaries are released as soon as they are used up
    gy, gx, gs, mag_stats = _gradient_field(src, max(1.0, 1.5 * d / 32.0), noise_factor)
    del src

    r0, r1 = radius_range[0] * d, radius_range[1] * d
    radii = np.arange(r0, r1 + 1e-6, max(1.0, d / 32.0))
    pad = int(np.ceil(0.5 * d))
    hough = _circular_hough(gy, gx, mag_stats, radii, pad=pad)
    del mag_stats
    pk = nms_peaks(hough, min_distance * d, threshold=float(np.percentile(hough, 50))) - pad
    del hough
    pk = pk[(pk[:, 0] >= 0) & (pk[:, 0] < ny) & (pk[:, 1] >= 0) & (pk[:, 1] < nx)]  # centre inside
    sup, rad, strength = circle_support(gy, gx, gs, pk, radii, return_strength=True)
    bdist = (np.minimum.reduce([pk[:, 0], pk[:, 1], ny - 1 - pk[:, 0], nx - 1 - pk[:, 1]]) / d
             if len(pk) else np.zeros(0))
    cont = contam[pk[:, 0], pk[:, 1]] if len(pk) else np.zeros(0, bool)
    cover = _ring_coverage(mask, pk, 0.25 * d, 0.5 * d)
    # Edge strength of the strongest circles (mean of the top 5, off contamination): below
    # `empty_gate` the micrograph holds no particle-like object at all (empty ice, noise) and
    # nothing is picked; otherwise a pick needs at least `min_relative_strength` of it, which
    # removes noise blobs from the empty areas of sparse micrographs.
    ok_ref = ~cont & np.isfinite(strength)
    ref = float(np.sort(strength[ok_ref])[-5:].mean()) if ok_ref.any() else 0.0
    empty = ref < empty_gate
    rel = strength / ref if ref > 0 else np.zeros_like(strength)
    # Mass: faint particles whose outline is weak next to the strongest ones (side views of a
    # hollow cylinder beside its ring-shaped top views) are still dark blobs of the particle's
    # size; `darkness` is the disc-averaged darkness in robust z units of the micrograph.
    dark = darkness_map(img, d)[pk[:, 0], pk[:, 1]] if len(pk) else np.zeros(0)
    acc = ((sup >= threshold) & (bdist >= border) & ~cont & (cover >= min_coverage)
           & (strength >= min_strength) & ((rel >= min_relative_strength) | (dark >= min_darkness))
           & (not empty))
    rows, cols = pk[:, 0].astype(float), pk[:, 1].astype(float)
    views = np.array(["top"] * len(pk), dtype=object)
    scores = sup.copy()

    if side_views and not empty and len(pk) + mask.sum() > 0:
        labels, shapes = object_shapes(mask & ~contam, pk[acc], measures=False)
        if len(shapes):
            area_p = np.pi * d * d / 4.0
            rsup, rstr = rectangle_support(gy, gx, gs, list(shapes["rect"]), return_strength=True)
            shapes = shapes.assign(rect_support=rsup, rect_strength=rstr)
            by_label = shapes.set_index("label")
            # circular picks: re-classify those whose region is a box
            for i in np.nonzero(acc)[0]:
                lab = labels[pk[i, 0], pk[i, 1]]
                if lab == 0 or lab not in by_label.index:
                    continue
                s = by_label.loc[lab]
                if not (0.25 * area_p <= s["area"] <= 1.6 * area_p):
                    continue
                v = classify_view(sup[i], s["rect_support"], s["rectangularity"], s["rect_w"] / max(s["rect_h"], 1e-9))
                if v == "side":
                    views[i] = "side"
                    (cx, cy) = s["rect"][0]
                    rows[i], cols[i], scores[i] = cy, cx, s["rect_support"]
            # regions with no circular pick: boxes
            taken = set(labels[pk[acc, 0], pk[acc, 1]].tolist()) if acc.any() else set()
            extra = []
            for _, s in shapes.iterrows():
                if not side_boxes or s["label"] in taken or not (0.25 * area_p <= s["area"] <= 1.6 * area_p):
                    continue
                if s["rect_w"] > 1.3 * d or s["rect_support"] < threshold or empty:
                    continue
                if ref > 0 and s["rect_strength"] < min_relative_strength * ref:
                    continue
                aspect = s["rect_w"] / max(s["rect_h"], 1e-9)
                if classify_view(0.0, s["rect_support"], s["rectangularity"], aspect) != "side":
                    continue
                (cx, cy) = s["rect"][0]
                b = min(cy, cx, ny - 1 - cy, nx - 1 - cx) / d
                if b < border:
                    continue
                if acc.any() and np.min(np.hypot(rows[acc] - cy, cols[acc] - cx)) < min_distance * d:
                    continue
                extra.append((cy, cx, s["rect_support"]))
            if extra:
                e = np.array(extra)
                rows = np.r_[rows, e[:, 0]]
                cols = np.r_[cols, e[:, 1]]
                scores = np.r_[scores, e[:, 2]]
                views = np.r_[views, np.array(["side"] * len(e), dtype=object)]
                bdist = np.r_[bdist, np.full(len(e), np.inf)]
                cont = np.r_[cont, np.zeros(len(e), bool)]
                acc = np.r_[acc, np.ones(len(e), bool)]

    route = np.array(["circle"] * len(pk) + ["box"] * (len(rows) - len(pk)), dtype=object)
    nb = len(rows) - len(pk)  # box rows: no circle measurements
    cover, rel = np.r_[cover, np.ones(nb)], np.r_[rel, np.ones(nb)]
    rad, strength, dark = (np.r_[a, np.full(nb, np.nan)] for a in (rad, strength, dark))
    if side_views and side_peaks and not empty:
        # Candidate side views from the darkness map: dark particle-sized blobs with no pick
        # nearby. Their outline is weak, so they are not accepted here; the dataset-level view
        # step (:func:`dataset_views`) accepts them when the dataset holds side views at all.
        dmap = darkness_map(img, d, peak_radius)
        pk2 = nms_peaks(dmap, min_distance * d, peak_darkness)
        if len(pk2):
            keep = ~contam[pk2[:, 0], pk2[:, 1]]
            # kept apart from the picks that survive the dataset-level gate of dataset_views
            firm = acc & ((route != "circle") | (rel >= VIEW_MIN_RELATIVE_STRENGTH) | (dark >= VIEW_MIN_DARKNESS))
            if firm.any():
                keep &= cdist(pk2.astype(float), np.c_[rows[firm], cols[firm]]).min(1) >= peak_separation * d
            pk2 = pk2[keep]
        if len(pk2):
            s2, r2, st2 = circle_support(gy, gx, gs, pk2, radii, return_strength=True)
            keep = s2 >= peak_support
            pk2, s2, r2, st2 = pk2[keep], s2[keep], r2[keep], st2[keep]
            n2 = len(pk2)
            rows, cols = np.r_[rows, pk2[:, 0]], np.r_[cols, pk2[:, 1]]
            scores = np.r_[scores, s2]
            views = np.r_[views, np.array(["side"] * n2, dtype=object)]
            route = np.r_[route, np.array(["darkness"] * n2, dtype=object)]
            bdist = np.r_[bdist, np.minimum.reduce([pk2[:, 0], pk2[:, 1], ny - 1 - pk2[:, 0], nx - 1 - pk2[:, 1]]) / d]
            cont = np.r_[cont, np.zeros(n2, bool)]
            acc = np.r_[acc, np.zeros(n2, bool)]
            cover = np.r_[cover, _ring_coverage(mask, pk2, 0.25 * d, 0.5 * d)]
            rad, strength = np.r_[rad, r2], np.r_[strength, st2]
            rel = np.r_[rel, st2 / ref if ref > 0 else np.zeros(n2)]
            dark = np.r_[dark, dmap[pk2[:, 0], pk2[:, 1]]]
    x, y = to_original(rows, cols, sy, sx)
    df = pd.DataFrame({"x": x, "y": y, "score": scores.astype(float), "view": views})
    if return_candidates:
        df = df.assign(row=rows, col=cols, border_dist=bdist, contaminated=cont, coverage=cover, radius=rad / d,
                       strength=strength, relative_strength=rel, darkness=dark,
                       reference_strength=ref, empty=bool(empty), route=route, accepted=acc)
        return df.sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    df = df.assign(accepted=acc).sort_values("score", ascending=False, kind="stable")
    return accepted_picks(df)


# --------------------------------------------------------------------------------------------
# 7. view classes over the whole dataset (many particles at once)
# --------------------------------------------------------------------------------------------

#: Radial bins and angular harmonics of the rotation-invariant view descriptors.
VIEW_RADII, VIEW_HARMONICS = 12, 8


def view_features(img: np.ndarray, centres: np.ndarray, diameter_px: float) -> np.ndarray:
    """Rotation-invariant descriptors of the particle image around each centre.

    ``img``: (ny, nx) micrograph, protein dark (the preprocessed picking image); ``centres``:
    (k, 2) (row, col) px; ``diameter_px``: particle diameter in px of ``img``. The image is
    low-passed (Gaussian σ = diameter/27 px), normalised (protein bright) and sampled on a polar
    grid of :data:`VIEW_RADII` radii up to 0.6·diameter × 64 angles around each centre. With
    ``c_n(r)`` the angular Fourier coefficients, the descriptors are the radial profile
    ``c_0(r)`` and, for every harmonic ``n = 1…`` :data:`VIEW_HARMONICS`, the invariants
    ``Re c_n(r₁)·c_n(r₂)*`` for all radius pairs r₁ ≤ r₂ — unchanged by in-plane rotation.
    Returns float32 (k, 12 + 8·78). A ring (top view) has little energy in ``n ≥ 1``; a
    rectangle (side view) much, mostly in n = 2 and 4.
    """
    centres = np.asarray(centres, float).reshape(-1, 2)
    nr, nh, nth = VIEW_RADII, VIEW_HARMONICS, 64
    iu = np.triu_indices(nr)
    out = np.zeros((len(centres), nr + nh * len(iu[0])), np.float32)
    if len(centres) == 0:
        return out
    s = ndi.gaussian_filter(np.asarray(img, np.float32), max(0.5, diameter_px / 27.0))
    s = -(s - float(s.mean())) / (float(s.std()) or 1.0)
    rs = (np.arange(nr) + 0.5) * 0.6 * diameter_px / nr
    th = np.linspace(0, 2 * np.pi, nth, endpoint=False)
    ys = centres[:, 0, None, None] + rs[None, :, None] * np.sin(th)[None, None]
    xs = centres[:, 1, None, None] + rs[None, :, None] * np.cos(th)[None, None]
    p = ndi.map_coordinates(s, [ys, xs], order=1, mode="reflect")
    p -= p.mean((1, 2), keepdims=True)
    c = np.fft.rfft(p, axis=2) / nth
    inv = [c[:, :, 0].real] + [(c[:, :, n, None] * np.conj(c[:, None, :, n])).real[:, iu[0], iu[1]]
                               for n in range(1, nh + 1)]
    out[:] = np.concatenate(inv, 1)
    return out


def _asymmetry(features: np.ndarray) -> np.ndarray:
    """log(energy in angular harmonics n ≥ 1 / energy of the radial profile) per particle."""
    nr = VIEW_RADII
    diag = np.nonzero(np.triu_indices(nr)[0] == np.triu_indices(nr)[1])[0]
    e0 = (features[:, :nr].astype(np.float64) ** 2).sum(1)
    en = sum(features[:, nr + k * len(np.triu_indices(nr)[0]) + diag].astype(np.float64).sum(1)
             for k in range(VIEW_HARMONICS))
    return np.log((en + 1e-12) / (e0 + 1e-12))


def _gmm_1d(s: np.ndarray, n_iter: int = 200):
    """Two-component 1-D Gaussian mixture by EM: (responsibility of the upper component (n,),
    means, sds, weights; each ordered lower, upper component).

    Starts at the quartiles with half the sample sd each; stops when no parameter moves by more
    than 1e-7 sd, or after ``n_iter`` iterations. The two components are kept as separate
    contiguous rows of one (2, n) buffer (not an (n, 2) array, whose length-2 rows made every
    NumPy pass slow): 9× faster, the same fits to 1e-13."""
    s = np.ascontiguousarray(s, np.float64)
    s_sd = s.std()
    mu = np.percentile(s, [25, 75]).astype(float)
    sd = np.full(2, s_sd / 2 + 1e-12)
    pi = np.array([0.5, 0.5])
    tol, floor = 1e-7 * (s_sd + 1e-12), 1e-6 * (s_sd + 1e-12)
    r = np.empty((2, len(s)))  # likelihoods, then responsibilities, of the two components
    total, dev = np.empty(len(s)), np.empty(len(s))
    var = np.empty(2)
    for _ in range(n_iter):
        for k in (0, 1):
            lk = r[k]
            np.subtract(s, mu[k], out=lk)
            lk /= sd[k]
            np.square(lk, out=lk)
            lk *= -0.5
            np.exp(lk, out=lk)
            lk *= pi[k] / sd[k]
            lk += 1e-300
        np.add(r[0], r[1], out=total)
        r /= total
        nk = r.sum(1) + 1e-12
        old = np.concatenate([mu, sd, pi])
        mu = (r @ s) / nk
        for k in (0, 1):
            np.subtract(s, mu[k], out=dev)
            np.square(dev, out=dev)
            var[k] = r[k] @ dev
        sd = np.maximum(np.sqrt(var / nk), floor)
        pi = nk / nk.sum()
        if np.abs(np.concatenate([mu, sd, pi]) - old).max() < tol:  # converged (EM moves monotonically)
            break
    up = int(np.argmax(mu))
    return r[up].copy(), mu[[1 - up, up]], sd[[1 - up, up]], pi[[1 - up, up]]


def _ashman_d(s: np.ndarray) -> tuple[float, float]:
    """Ashman's D of a two-component :func:`_gmm_1d` fit of ``s`` and its minor weight."""
    _, mu, sd, pi = _gmm_1d(np.asarray(s, np.float64))
    return float(abs(mu[1] - mu[0]) * np.sqrt(2.0 / (sd[0] ** 2 + sd[1] ** 2))), float(pi.min())


def _standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, F) descriptors → (standardised float64 copy, column means, column sds + 1e-12)."""
    Z = np.array(X, np.float64)  # a copy, standardised in place: one (m, F) float64 array at a time
    mean, std = Z.mean(0), Z.std(0) + 1e-12
    Z -= mean
    Z /= std
    return Z, mean, std


def _split_holds(Z: np.ndarray, y: np.ndarray, n_iter: int) -> bool:
    """Whether the two view classes seeded by ``y`` (m,) on the descriptors ``Z`` (m, F; each
    fold is standardised on its training half) are real: a :func:`_self_trained_discriminant` learnt on one random half of the
    picks must split the *other* half into two modes (Ashman's D ≥ :data:`VIEW_MIN_SEPARATION`
    on the held-out scores, averaged over the two folds, minor weight ≥ 5 %). In-sample, a
    discriminant with hundreds of descriptors separates any population (D 4–5 on a single
    view); held out, one view stays one mode (D ≤ 1.6 on the development sets) while top + side
    views stay apart (D ≈ 3). At most :data:`VIEW_SPLIT_TEST_MAX` picks (a seeded subsample)
    take part, so the test's cost does not grow with the dataset."""
    if len(Z) > VIEW_SPLIT_TEST_MAX:
        sub = np.sort(np.random.default_rng(1).choice(len(Z), VIEW_SPLIT_TEST_MAX, replace=False))
        Z, y = Z[sub], y[sub]
    half = np.random.default_rng(0).random(len(Z)) < 0.5
    if min(int(half.sum()), int((~half).sum())) < 20:
        return False
    # the two folds are independent: on a cluster the second runs on another worker meanwhile
    second = run_beside(_held_out_separation, Z, y, ~half, n_iter)
    d1 = _held_out_separation(Z, y, half, n_iter)
    d2 = None if d1 is None else second()
    if d2 is None:
        return False
    return float(np.mean([d1, d2])) >= VIEW_MIN_SEPARATION


def _held_out_separation(Z: np.ndarray, y: np.ndarray, train: np.ndarray, n_iter: int) -> float | None:
    """One fold of :func:`_split_holds`: Ashman's D of the held-out scores (rows ``~train`` of
    the (m, F) descriptors ``Z``) under a :func:`_self_trained_discriminant` learnt on the rows
    ``train`` (standardised on them) from the classes ``y`` (m,); ``None`` when the
    discriminant never separates or the held-out minor weight is below 5 %."""
    Z = np.asarray(Z, np.float64)
    zt, m, sd = _standardise(Z[train])
    w, _, _ = _self_trained_discriminant(zt, y[train], n_iter)
    if w is None:
        return None
    d, minor = _ashman_d(((Z[~train] - m) / sd) @ w)
    return None if minor < 0.05 else d


def _asymmetry_classes(a: np.ndarray, Z: np.ndarray, pos: np.ndarray, n_iter: int):
    """Steps 1–2 of :func:`classify_views`: ``(labels, responsibilities)``. ``a``: (n,)
    asymmetries of all picks; ``Z``: (m, F) descriptors (raw or standardised) of the picks at
    positions ``pos`` (m,) in ``a`` (all of them or a subsample). One mode (or fewer than 20 picks) → every
    pick one class and ``None``; two modes → all ``"top"`` and the asymmetry mixture's
    responsibility of the upper (side) component per pick, to seed the discriminant.

    With at least 40 descriptors the two modes must hold out of sample (:func:`_split_holds`);
    with fewer, the asymmetry mixture alone decides (Ashman's D ≥ :data:`VIEW_MIN_SEPARATION`)."""
    lab = np.full(len(a), "top", object)
    if len(a) >= 20:
        r, mu, sd, pi = _gmm_1d(a)
        if pi.min() >= 0.05:
            if len(Z) >= 40:
                two = _split_holds(Z, r[pos] > 0.5, n_iter)
            else:
                two = abs(mu[1] - mu[0]) * np.sqrt(2.0 / (sd[0] ** 2 + sd[1] ** 2)) >= VIEW_MIN_SEPARATION
            if two:
                return lab, r
    if np.median(a) > VIEW_SIDE_ASYMMETRY:
        lab[:] = "side"
    return lab, None


def _self_trained_discriminant(Z: np.ndarray, y: np.ndarray, n_iter: int):
    """Step 3 of :func:`classify_views` on standardised descriptors ``Z`` (m, F) seeded by the
    boolean classes ``y`` (m,): ridge-regularised Fisher LDA, scores split by a two-component
    mixture, ``n_iter`` times. Returns ``(w, y, gmm)``; ``w`` is None when ``y`` never has
    both classes. A pass that leaves the classes as they were ends the loop: the next would
    repeat it exactly (the same classes, covariances and scores), so the result is the same."""
    w = g = None
    for _ in range(n_iter):
        if y.all() or not y.any():
            break
        z = Z[~y]  # one class's rows at a time (a copy each), their covariance in place
        m0 = z.mean(0)
        sw = _cov_in_place(z) if len(z) > 1 else 0.0
        z = Z[y]
        m1 = z.mean(0)
        c1 = _cov_in_place(z) if len(z) > 1 else 0.0
        del z
        sw = sw + c1 + np.eye(Z.shape[1])
        w = np.linalg.solve(sw, m1 - m0)
        rr, gm, gs, gp = _gmm_1d(Z @ w)
        same = np.array_equal(rr > 0.5, y)
        y, g = rr > 0.5, (gm, gs, gp)
        if same:
            break
    return w, y, g


def _cov_in_place(a: np.ndarray) -> np.ndarray:
    """``np.cov(a.T)`` (covariance of the F columns of the (m, F) float64 array ``a``) with
    the same arithmetic on the same memory layout as NumPy's, but without its copy of ``a``:
    ``a`` is centred in place (overwritten)."""
    x = a.T  # np.cov's (F, m) copy of a.T keeps a's memory layout
    avg = x.mean(axis=1)
    x -= avg[:, None]
    c = np.dot(x, x.T)
    c *= np.true_divide(1, x.shape[1] - 1)
    return c.squeeze()


def classify_views(features: Sequence[np.ndarray], n_iter: int = 5) -> list[np.ndarray]:
    """Dataset-level view classes of all picks (the reduction over micrographs).

    ``features``: per micrograph, the (k_i, m) :func:`view_features` of its picks. Returns per
    micrograph a (k_i,) object array of ``"top"`` (round) / ``"side"`` (square/rectangular).

    1. The *asymmetry* (log energy in angular harmonics n ≥ 1 over the radial profile's) of all
       picks is modelled by a two-component Gaussian mixture.
    2. Single mode → one class for every pick: when the mixture's minor weight is < 5 %, or
       the split it seeds does not hold out of sample (a discriminant learnt on half the picks
       leaves the other half in one mode, Ashman's D < :data:`VIEW_MIN_SEPARATION`; see
       :func:`_split_holds`), the dataset has one view, ``top`` (round) unless its median
       asymmetry is above :data:`VIEW_SIDE_ASYMMETRY`.
    3. Otherwise the mixture's labels seed a self-trained linear discriminant on all the
       descriptors (ridge-regularised Fisher LDA, standardised features); the discriminant's
       scores are split again by a two-component mixture, ``n_iter`` times.
    """
    sizes = [len(f) for f in features]
    if sum(sizes) == 0:
        return [np.zeros(0, object) for _ in sizes]
    blocks = [np.asarray(f, np.float32).reshape(n, -1) for f, n in zip(features, sizes) if n]
    a = np.concatenate([_asymmetry(b.astype(np.float64)) for b in blocks])
    # the discriminant is learnt on at most VIEW_FIT_MAX picks (a seeded subsample), so the
    # memory of this reduction does not grow with the dataset; every pick is then scored
    n_all = len(a)
    fit = (np.sort(np.random.default_rng(0).choice(n_all, VIEW_FIT_MAX, replace=False))
           if n_all > VIEW_FIT_MAX else np.arange(n_all))
    X = np.concatenate(blocks)[fit] if n_all > VIEW_FIT_MAX else np.concatenate(blocks)
    lab, r = _asymmetry_classes(a, X, fit, n_iter)
    if r is not None:
        Z, mean, std = _standardise(X)
        w, y, _ = _self_trained_discriminant(Z, r[fit] > 0.5, n_iter)
        if w is None:
            y_all = r > 0.5
        elif len(fit) == n_all:
            y_all = y
        else:
            scores = np.concatenate([((b.astype(np.float64) - mean) / std) @ w for b in blocks])
            y_all = _gmm_1d(scores)[0] > 0.5
        lab[y_all] = "side"
    return list(np.split(lab, np.cumsum(sizes)[:-1]))


#: Most picks the dataset-level view discriminant is fitted on (a seeded subsample beyond it).
VIEW_FIT_MAX = 5000
#: Fewest picks in a dataset for the dataset-level view classes.
VIEW_MIN_PICKS = 20
#: Micrographs per piece of the view fit's output shipped to the workers that apply it.
VIEW_APPLY_BATCH = 16
#: Ashman's D below which the asymmetry mixture counts as one mode (one view in the dataset).
VIEW_MIN_SEPARATION = 2.0
#: Most picks in the out-of-sample test of a two-view split (:func:`_split_holds`).
VIEW_SPLIT_TEST_MAX = 1000
#: Median asymmetry above which a single-mode dataset is all side views.
VIEW_SIDE_ASYMMETRY = 0.0
#: Fraction of side views among the accepted picks above which a dataset "has side views" and
#: the darkness-map side candidates of :func:`pick_ibc` are accepted.
VIEW_MIN_SIDE_FRACTION = 0.1
#: In a dataset with side views, a circle pick needs this relative edge strength or
#: :data:`VIEW_MIN_DARKNESS` (robust z units) darkness.
VIEW_MIN_RELATIVE_STRENGTH, VIEW_MIN_DARKNESS = 0.4, 1.5
#: In a dataset with both views, a circle pick whose outline the circular Hough transform
#: supports at least this much (``score``, fraction of the circle) is a top view, whatever the
#: descriptor discriminant says: the method's own definition of a top view (a crowded
#: neighbourhood can make a clean ring look asymmetric to the descriptors). On the simulated
#: KLH-like sets ≤ 0.5 % of side views reach it.
VIEW_TOP_SUPPORT = 0.8


def _strong_circles_top(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with :data:`VIEW_TOP_SUPPORT` circle picks set to ``"top"`` (for datasets that
    have both views)."""
    if not len(table) or not {"route", "score", "view"} <= set(table.columns):
        return table
    strong = (table["route"].to_numpy(object) == "circle") & (table["score"].to_numpy(float) >= VIEW_TOP_SUPPORT)
    if not strong.any():
        return table
    table = table.copy()
    view = table["view"].to_numpy(object).copy()
    view[strong] = "top"
    table["view"] = view
    return table


def _both_views(tables: Sequence[pd.DataFrame]) -> bool:
    """Whether the accepted rows of ``tables`` hold top and side views."""
    seen = set()
    for t in tables:
        if len(t):
            seen |= set(t["view"].to_numpy(object)[t["accepted"].to_numpy(bool)].tolist())
    return {"top", "side"} <= seen


def _view_rows(candidates: pd.DataFrame) -> np.ndarray:
    """Rows of a candidate table that take part in the dataset-level views: the accepted picks
    and the darkness-map side candidates of non-empty micrographs."""
    if not len(candidates):
        return np.zeros(0, bool)
    sel = candidates["accepted"].to_numpy(bool)
    if "route" in candidates:
        sel = sel | ((candidates["route"].to_numpy(object) == "darkness") & ~candidates["empty"].to_numpy(bool))
    return sel


def _view_features_block(block, candidates, pixel_size, diameter, original_shape):
    img = np.asarray(block)[0]
    c = candidates[_view_rows(candidates)] if len(candidates) else candidates
    sy, sx = original_shape[0] / img.shape[0], original_shape[1] / img.shape[1]
    d = float(diameter) / float(pixel_size) / float(np.sqrt(sy * sx))
    return view_features(img, c[["row", "col"]].to_numpy(float) if len(c) else np.zeros((0, 2)), d)


def _side_accept(c: pd.DataFrame, s: np.ndarray, a: np.ndarray) -> np.ndarray:
    """``accepted`` of candidate table ``c`` in a dataset with side views (``s``: its view rows,
    ``a``: which of them are accepted): darkness-map candidates are accepted, weak circles not."""
    accepted = c["accepted"].to_numpy(bool).copy()
    accepted[np.nonzero(s)[0][~a]] = True
    # with two views, the reference strength is set by the sharp outline of one of
    # them: a circle pick must then be both fairly strong or clearly dark (weak,
    # pale circles sit between particles)
    if {"relative_strength", "darkness", "route"} <= set(c.columns):
        weak = ((c["route"].to_numpy(object) == "circle")
                & (c["relative_strength"].to_numpy(float) < VIEW_MIN_RELATIVE_STRENGTH)
                & ~(c["darkness"].to_numpy(float) >= VIEW_MIN_DARKNESS))
        accepted &= ~weak
    return accepted


def dataset_views(candidates: Sequence[pd.DataFrame], features: Sequence[np.ndarray]) -> list[pd.DataFrame]:
    """Replace the ``view`` of the accepted candidates of every micrograph by the dataset-level
    classes of :func:`classify_views` (``features``: per micrograph the :func:`view_features`
    of its accepted candidates, in table order). With fewer than :data:`VIEW_MIN_PICKS` picks in
    the dataset the per-micrograph, shape-based views of :func:`pick_ibc` are kept. Returns new
    tables, in order."""
    sel = [_view_rows(c) for c in candidates]
    acc = [c["accepted"].to_numpy(bool)[s] if len(c) else np.zeros(0, bool) for c, s in zip(candidates, sel)]
    feats = [np.asarray(f)[a] for f, a in zip(features, acc)]
    if sum(len(f) for f in feats) < VIEW_MIN_PICKS:
        return list(candidates)  # too few picks for a dataset-level model: keep the shape-based views
    labels = classify_views(feats)
    n_side = sum(int((lab == "side").sum()) for lab in labels)
    with_side = n_side >= VIEW_MIN_SIDE_FRACTION * sum(len(lab) for lab in labels)
    out = []
    for c, s, a, lab in zip(candidates, sel, acc, labels):
        if len(c) and s.any():
            c = c.copy()
            view = c["view"].to_numpy(object).copy()
            accepted = c["accepted"].to_numpy(bool).copy()
            idx = np.nonzero(s)[0]
            view[idx[a]] = lab
            if with_side:
                # darkness-map candidates are side views of a dataset that has them
                view[idx[~a]] = "side"
                accepted = _side_accept(c, s, a)
            c["view"], c["accepted"] = view, accepted
        out.append(c)
    if with_side:
        # refit the view classes on everything accepted: the side candidates sharpen the side class
        fin = [c["accepted"].to_numpy(bool)[s] if len(c) else np.zeros(0, bool) for c, s in zip(out, sel)]
        labels = classify_views([np.asarray(f)[k] for f, k in zip(features, fin)])
        for c, s, k, lab in zip(out, sel, fin, labels):
            if len(c) and k.any():
                view = c["view"].to_numpy(object).copy()
                view[np.nonzero(s)[0][k]] = lab
                c["view"] = view
    return [_strong_circles_top(c) for c in out] if _both_views(out) else out


def _gmm_upper(s: np.ndarray, mu, sd, pi) -> np.ndarray:
    """Responsibility of the upper component of a fitted :func:`_gmm_1d` mixture (means, sds,
    weights ordered lower, upper) for the values ``s``."""
    s = np.asarray(s, np.float64)
    mu, sd, pi = (np.asarray(v, np.float64) for v in (mu, sd, pi))
    lik = pi / sd * np.exp(-0.5 * ((s[:, None] - mu) / sd) ** 2) + 1e-300
    return lik[:, 1] / lik.sum(1)


def _view_model(a: np.ndarray, X: np.ndarray, pos: np.ndarray, n_iter: int = 5):
    """The view classifier of :func:`classify_views` learnt from the asymmetry of every pick and
    the descriptors of a subsample of them (bounded memory).

    ``a``: (n,) :func:`_asymmetry` of all picks; ``X``: (m, F) :func:`view_features` of a
    subsample; ``pos``: (m,) their positions in ``a``. Returns ``(labels, model)``: ``labels``
    (n,) object array when the classes follow from the asymmetry alone (one mode, or a
    discriminant that never separates), else ``None`` with ``model`` = dict(mean, std, w, gmm):
    standardise a pick's descriptors, project on ``w`` and take the upper component of the
    score mixture ``gmm`` = (means, sds, weights) as side views; the model's side fraction on
    the subsample is under ``"side_fraction"``."""
    X = np.asarray(X).reshape(len(pos), -1)
    lab, r = _asymmetry_classes(a, X, pos, n_iter)
    if r is None:
        return lab, None
    if len(X) < 2:  # nothing to fit a discriminant on: the asymmetry mixture's classes
        lab[r > 0.5] = "side"
        return lab, None
    Z, mean, std = _standardise(X)
    w, y, g = _self_trained_discriminant(Z, r[pos] > 0.5, n_iter)
    if w is None:
        lab[r > 0.5] = "side"
        return lab, None
    return None, dict(mean=mean.astype(np.float32), std=std.astype(np.float32), w=w, gmm=g,
                      side_fraction=float(y.mean()))


def _apply_view_model(model: Mapping, X: np.ndarray) -> np.ndarray:
    """Views (``"top"``/``"side"``) of the picks with descriptors ``X`` (k, F) under a
    :func:`_view_model` discriminant."""
    lab = np.full(len(X), "top", object)
    if len(X):
        z = ((np.asarray(X, np.float64) - model["mean"]) / model["std"]) @ model["w"]
        lab[_gmm_upper(z, *model["gmm"]) > 0.5] = "side"
    return lab


def pack_view_features(features: np.ndarray, quota: int | None = None) -> tuple:
    """What one micrograph keeps of the (k, F) :func:`view_features` of its view rows until the
    dataset-level view step: their (k,) :func:`_asymmetry` (float64, from the float32
    descriptors), the descriptors in float16 (k, F), and the positions (m,) and float32
    descriptors (m, F) of a seeded subsample of at most ``quota`` rows (all rows when ``quota``
    is ``None`` or k ≤ ``quota``) for the discriminant's fit."""
    f = np.asarray(features, np.float32)
    k = len(f)
    idx = (np.arange(k) if quota is None or k <= quota
           else np.sort(np.random.default_rng(k).choice(k, int(quota), replace=False)))
    return _asymmetry(f.astype(np.float64)), f.astype(np.float16), idx, f[idx]


def view_fit_all(candidates: Sequence[pd.DataFrame], max_rows: int | None = None) -> bool:
    """Whether the dataset's view rows (:func:`_view_rows` of the gated tables) number at most
    ``max_rows`` (default :data:`VIEW_FIT_MAX`): then every descriptor goes to the fit."""
    max_rows = VIEW_FIT_MAX if max_rows is None else max_rows
    return sum(int(_view_rows(c).sum()) for c in candidates) <= max_rows


def view_summary(packed: tuple, fit_all: bool) -> tuple:
    """What one micrograph sends to :func:`fit_dataset_views`, from its
    :func:`pack_view_features`: the (k,) asymmetries, the positions of the rows whose descriptors
    go to the fit (all when ``fit_all``, else its subsample) and those descriptors (float32; the
    rows outside the subsample, only sent when ``fit_all``, from float16)."""
    asym, f16, idx, x32 = packed
    if not fit_all:
        return asym, idx, x32
    X = np.asarray(f16, np.float32)
    X[idx] = x32
    return asym, np.arange(len(X)), X


def fit_dataset_views(candidates: Sequence[pd.DataFrame], summaries: Sequence[tuple]) -> list:
    """Dataset-level views with memory bounded by :data:`VIEW_FIT_MAX` descriptors (the
    reduction of the picking graph; :func:`dataset_views` on all descriptors otherwise).

    ``candidates``: gated candidate tables; ``summaries``: per micrograph :func:`view_summary`
    of its view rows. When every micrograph sent all its descriptors (at most
    :data:`VIEW_FIT_MAX` rows in the dataset) this is exactly :func:`dataset_views`. Otherwise the
    asymmetry mixture uses every pick, the discriminant and its score mixture the subsample.
    Returns per micrograph ``(table, job)``: ``job`` is ``None`` when the table's views are final,
    else ``(model, rows, k)`` for :func:`apply_dataset_views` (``rows``: table positions of the
    view rows; ``k``: mask over them of the rows whose views the model sets)."""
    sel = [_view_rows(c) for c in candidates]
    if all(len(sm[1]) == int(s.sum()) for sm, s in zip(summaries, sel)):  # every descriptor is here
        return [(c, None) for c in dataset_views(candidates, [sm[2] for sm in summaries])]

    def classify(sets):
        """(labels per micrograph or None, model) for the view rows selected by ``sets``."""
        a = np.concatenate([sm[0][k] for sm, k in zip(summaries, sets)])
        off = np.cumsum([0] + [int(k.sum()) for k in sets])
        insets = [k[sm[1]] for sm, k in zip(summaries, sets)]
        # the chosen descriptors, copied straight into one array (no per-micrograph copies)
        X = np.empty((sum(int(s.sum()) for s in insets),) + summaries[0][2].shape[1:], np.float32) \
            if summaries else np.zeros((0, 0), np.float32)
        pos, at = [], 0
        for i, (sm, k, inset) in enumerate(zip(summaries, sets, insets)):
            m = int(inset.sum())
            X[at:at + m] = sm[2][inset]
            at += m
            pos.append(off[i] + (np.cumsum(k) - 1)[sm[1][inset]])
        lab, model = _view_model(a, X, np.concatenate(pos).astype(int))
        return (None if lab is None else np.split(lab, off[1:-1])), model

    acc = [c["accepted"].to_numpy(bool)[s] if len(c) else np.zeros(0, bool) for c, s in zip(candidates, sel)]
    if sum(int(k.sum()) for k in acc) < VIEW_MIN_PICKS:
        return [(c, None) for c in candidates]
    labels, model = classify(acc)
    if labels is None:
        side_frac = model["side_fraction"]
    else:
        side_frac = sum(int((lab == "side").sum()) for lab in labels) / max(1, sum(len(lab) for lab in labels))
    with_side = side_frac >= VIEW_MIN_SIDE_FRACTION
    out = []
    for i, (c, s, a) in enumerate(zip(candidates, sel, acc)):
        if len(c) and s.any():
            c = c.copy()
            view = c["view"].to_numpy(object).copy()
            idx = np.nonzero(s)[0]
            if labels is not None:
                view[idx[a]] = labels[i]
            if with_side:
                view[idx[~a]] = "side"
                c["accepted"] = _side_accept(c, s, a)
            c["view"] = view
        out.append(c)
    sets = acc
    if with_side:
        sets = [c["accepted"].to_numpy(bool)[s] if len(c) else np.zeros(0, bool) for c, s in zip(out, sel)]
        labels, model = classify(sets)
        if labels is not None:
            for c, s, k, lab in zip(out, sel, sets, labels):
                if len(c) and k.any():
                    view = c["view"].to_numpy(object).copy()
                    view[np.nonzero(s)[0][k]] = lab
                    c["view"] = view
    if labels is not None:
        if _both_views(out):
            out = [_strong_circles_top(c) for c in out]
        return [(c, None) for c in out]
    # a discriminant model: the dataset has both views
    return [(c, (model, np.nonzero(s)[0], k) if len(c) and k.any() else None)
            for c, s, k in zip(out, sel, sets)]


def apply_dataset_views(fitted: tuple, features: np.ndarray) -> pd.DataFrame:
    """One micrograph's table of :func:`fit_dataset_views` with the model's views set on the
    chosen rows (``features``: the descriptors of its view rows, as for :func:`view_summary`,
    any float dtype)."""
    table, job = fitted
    if job is None:
        return table
    model, rows, k = job
    table = table.copy()
    view = table["view"].to_numpy(object).copy()
    view[rows[k]] = _apply_view_model(model, np.asarray(features)[k])
    table["view"] = view
    return _strong_circles_top(table)


# --------------------------------------------------------------------------------------------
# graph builder
# --------------------------------------------------------------------------------------------


def pick_graph(micrographs, names: Sequence[str], pixel_size: float, diameter: float, method: str = "ibc", *,
               steps=None, preprocess_params: Mapping | None = None, pick_params: Mapping | None = None,
               model=None, train_params: Mapping | None = None, preprocessed=None):
    """Lazy picking of a stack of micrographs: one ``dask.delayed`` DataFrame per micrograph.

    ``micrographs``: dask array ``(n, ny, nx)`` (one chunk per micrograph after rechunking);
    ``names``: n micrograph names; ``pixel_size`` Å/px, ``diameter`` Å.

    ``preprocessed``: optional dask array ``(n, ny', nx')`` of the same micrographs already
    preprocessed (e.g. the ``preprocessed`` group that ``cryodask run`` stores, possibly
    binned): picking then reads it instead of preprocessing again (``steps`` and
    ``preprocess_params`` are ignored, and ``micrographs`` only gives the original shape
    ``(ny, nx)`` that coordinates are mapped back to; its data are not read). Its blocks must be
    cheap to read again: after the dataset-level steps each micrograph re-reads its block to
    recompute its view descriptors instead of keeping them in memory.

    - ``method="ibc"``: :func:`~cryodask.preprocess.preprocess_graph` (``steps``,
      ``preprocess_params``) → :func:`pick_ibc` (``pick_params``) per micrograph.
    - ``method="deep"``: the same IBC candidates per micrograph → per-micrograph training tiles
      (:func:`~cryodask.pick_deep.extract_training_patches`; ``train_params`` keys ``tile``,
      ``positive_threshold``, ``negative_threshold``) → one training task that gathers them
      all (the reduction; keys ``seed``, ``device``, ``epochs``, ``batch_size``, ``lr``,
      ``width``, ``max_tiles``) unless a trained ``model`` (or a delayed one) is given →
      :func:`~cryodask.pick_deep.pick_deep` per micrograph (keys ``threshold``, ``device``,
      ``min_distance``, ``border``, ``check_empty``).

    Returns ``dict name → Delayed[DataFrame]`` (columns :data:`PICK_COLUMNS`); for ``"deep"``
    also the delayed trained network under the key ``"__model__"`` (to save with the run).
    Nothing is computed.
    """
    import dask

    from .preprocess import DEFAULT_STEPS, preprocess_graph

    if micrographs.ndim != 3 or len(names) != micrographs.shape[0]:
        raise ValueError("micrographs must be (n, ny, nx) with one name per micrograph")
    if method not in ("ibc", "deep"):
        raise ValueError("method must be 'ibc' or 'deep'")
    n, ny, nx = micrographs.shape
    reread = preprocessed is not None
    if reread:
        pre = preprocessed
        if pre.ndim != 3 or pre.shape[0] != n:
            raise ValueError(f"preprocessed must be (n, ny', nx') with n = {n}, got {pre.shape}")
        if pre.chunks[1] != (pre.shape[1],) or pre.chunks[2] != (pre.shape[2],) or any(c != 1 for c in pre.chunks[0]):
            pre = pre.rechunk((1,) + pre.shape[1:])
    else:
        pp = dict(preprocess_params or {})
        pp.setdefault("binning", picking_binning(pixel_size, diameter,
                                                 pp.get("target_diameter_px", TARGET_DIAMETER_PX)))
        pre = preprocess_graph(micrographs, pixel_size, diameter, steps or DEFAULT_STEPS, **pp)
    blocks = pre.to_delayed().ravel() if method == "deep" else None
    kw = dict(pick_params or {})
    kw.pop("return_candidates", None)
    # task keys carry a token of the inputs: two datasets (or two parameter sets) on one client
    # may have micrographs with the same names
    tok = dask.base.tokenize(pre, pixel_size, diameter, (ny, nx), kw)
    # one task per micrograph computes its candidates *and* the view features of every row that
    # can take part in the dataset-level views, so the dataset-wide steps below only gather small
    # tables and no micrograph stays in memory while they wait for the others
    quota = -(-VIEW_FIT_MAX // max(1, n))  # float32 descriptors each micrograph keeps for the fit
    geo = (pixel_size, diameter, (ny, nx))
    # tasks take a micrograph's tuple whole where they run beside it (the same worker): only the
    # reference strength the gate reads crosses as a piece of it (its view-features task makes
    # the fit's part), so a micrograph has one selection task, not five (each costs the scheduler
    # and the worker's event loop about as much as a 5 ms kernel)
    if method == "ibc":
        # a blockwise step on the preprocessed array: Dask fuses it with the read and the
        # preprocessing into one task per micrograph (each holds a (1, 1, 1) object array around
        # the tuple: the same block structure, so the layers fuse without alias tasks; the
        # binned micrograph is never a result of its own)
        both = list(pre.map_blocks(_candidates_and_features_chunk, pixel_size, diameter, (ny, nx), kw, quota,
                                   not reread, dtype=object, meta=np.empty((0, 0, 0), object),
                                   chunks=((1,) * n, (1,), (1,)),
                                   name=f"ibc-candidates-{tok}").to_delayed().ravel())
    else:  # the deep picker reads the preprocessed blocks again: they are results of their own
        both = [dask.delayed(_candidates_and_features_chunk, pure=True)(
            blk, pixel_size, diameter, (ny, nx), kw, quota, not reread, slim=False,
            dask_key_name=f"ibc-candidates-{name}-{tok}")
            for name, blk in zip(names, blocks)]
    # map → bounded reduce → map. Until the dataset-wide steps have seen every micrograph, each
    # micrograph keeps only what they need of it: (ibc) the rows of its candidate table that can
    # take part in the views (the only ones that can be accepted) with the columns read after the
    # fit, the asymmetries of those rows and float32 descriptors of at most ceil(VIEW_FIT_MAX / n)
    # of them; and, when its preprocessed block cannot be re-read cheaply (preprocessed in this
    # graph), their descriptors in float16 (~1.3 kB a row). The dataset gate gets one reference
    # strength and row count per micrograph; the view fit gets the view rows' few table columns,
    # the asymmetries and those float32 rows (every row when the dataset has at most VIEW_FIT_MAX:
    # then it is exactly dataset_gate + dataset_views) and returns a small model that each
    # micrograph applies to its own descriptors and table. With ``preprocessed`` the descriptors
    # are recomputed (identically) from a re-read of the block, after the gate (all of them go
    # to the fit) or after the fit (the model is applied): those reads are bound to run after
    # the dataset-wide step, so they do not pile up while it waits.
    infos = [dask.delayed(_info_of, pure=True)(b, dask_key_name=f"ibc-strength-{name}-{tok}")
             for name, b in zip(names, both)]
    gate = dask.delayed(_gate_reduce, pure=True)(infos, VIEW_FIT_MAX,
                                                 dask_key_name=f"ibc-dataset-gate-{tok}")
    after_gate = _blocks_after(pre, gate, f"after-gate-{tok}") if reread else [None] * n
    parts = [dask.delayed(_view_parts, pure=True)(b, gate, i, blk, geo, quota,
                                                     dask_key_name=f"view-features-{name}-{tok}")
             for i, (name, b, blk) in enumerate(zip(names, both, after_gate))]
    # the fit's per-micrograph results in batches of VIEW_APPLY_BATCH: a worker fetches a batch
    # once for the micrographs it applies it to, not one small transfer per micrograph
    nb = max(1, -(-n // VIEW_APPLY_BATCH))
    fitted = dask.delayed(_fit_views_block, pure=True, nout=nb)(parts, VIEW_APPLY_BATCH,
                                                                dask_key_name=f"ibc-dataset-views-{tok}")
    after_fit = _blocks_after(pre, fitted, f"after-fit-{tok}") if reread else [None] * n

    def fit_of(i):
        return fitted[i // VIEW_APPLY_BATCH], i % VIEW_APPLY_BATCH

    if method == "ibc":  # the views and the accepted picks in one task per micrograph
        return {name: dask.delayed(_accepted_views_block, pure=True)(*fit_of(i), b, gate, i, blk, geo,
                                                                     dask_key_name=f"pick-ibc-{name}-{tok}")
                for i, (name, b, blk) in enumerate(zip(names, both, after_fit))}
    viewed = [dask.delayed(_views_block, pure=True)(*fit_of(i), b, gate, i, blk, geo,
                                                    dask_key_name=f"ibc-views-{name}-{tok}")
              for i, (name, b, blk) in enumerate(zip(names, both, after_fit))]
    cands = {name: viewed[i] for i, name in enumerate(names)}
    from . import pick_deep as pdp

    tp = dict(train_params or {})
    tok = dask.base.tokenize(tok, tp, model)
    train = model is None
    if train:
        patch_blocks = _blocks_after(pre, fitted, f"patches-{tok}") if reread else blocks
        pieces = [dask.delayed(_patch_block, pure=True)(blk, cands[name], pixel_size, diameter, (ny, nx), tp,
                                                         dask_key_name=f"training-patches-{name}-{tok}")
                  for name, blk in zip(names, patch_blocks)]
        model = dask.delayed(pdp._train_from_pieces, pure=True)(pieces, tp, dask_key_name=f"train-picker-{tok}")
    if reread:  # read again once the network is there (or after the view fit, with a given network)
        after = model if train or dask.is_dask_collection(model) else fitted
        blocks = _blocks_after(pre, after, f"deep-{tok}")
    out = {name: dask.delayed(_deep_block, pure=True)(model, blk, cands[name], pixel_size, diameter, (ny, nx), tp,
                                                       dask_key_name=f"pick-deep-{name}-{tok}")
           for name, blk in zip(names, blocks)}
    out["__model__"] = model
    return out


def _blocks_after(arr, parent, seed: str) -> list:
    """One ``Delayed`` per block of the dask array ``arr`` (one chunk per micrograph), read again
    (new task keys, so the blocks already read are not kept for these) only once ``parent`` is
    computed: re-reads scheduled after a dataset-wide step do not pile up while it waits."""
    from dask.graph_manipulation import bind

    # not optimised: array fusion would copy the parent's tasks into the blocks' graph
    return list(bind(arr, parent, seed=seed).to_delayed(optimize_graph=False).ravel())


def accepted_picks(candidates: pd.DataFrame) -> pd.DataFrame:
    """The picks (columns :data:`PICK_COLUMNS`) of a ``pick_ibc(..., return_candidates=True)``
    table: exactly what ``pick_ibc`` returns without ``return_candidates``."""
    df = candidates[candidates["accepted"].to_numpy(bool)]
    if df.empty:
        return _empty_picks()
    return df[PICK_COLUMNS].reset_index(drop=True)


def _candidates_block(block, pixel_size, diameter, original_shape, kw):
    return pick_ibc(np.asarray(block)[0], pixel_size, diameter, original_shape=original_shape,
                    return_candidates=True, **kw)


def _candidates_and_features_block(block, pixel_size, diameter, original_shape, kw, quota=None, *, slim=False,
                                   keep_f16=True):
    """Candidates of one micrograph, the :func:`pack_view_features` of its rows that may take
    part in the dataset-level views (:func:`_view_rows` before the dataset gate, a superset of
    those after it: the gate only rejects) and (reference strength, number of those rows).

    ``slim``: return only those rows of the candidate table, with the columns read after the
    dataset-level steps (:func:`_slim_candidates`; the picks are the same). ``keep_f16=False``:
    leave out the float16 descriptors (``None`` in their place); they are then recomputed from
    the block after the dataset-level steps."""
    cands = _candidates_block(block, pixel_size, diameter, original_shape, kw)
    packed = pack_view_features(_view_features_block(block, cands, pixel_size, diameter, original_shape), quota)
    info = (_reference_strength(cands), len(packed[0]))
    if not keep_f16 and len(packed[0]):
        packed = (packed[0], None, packed[2], packed[3])
    out = (_slim_candidates(cands) if slim else cands), packed, info
    del cands
    release_freed_memory()
    return out


#: Candidate-table columns an IBC micrograph keeps until its picks are final (the picks'
#: columns, those the dataset-level view step reads and writes, and the picking-scale centre).
_SLIM_COLUMNS = ["x", "y", "score", "view", "accepted", "empty", "route", "relative_strength", "darkness",
                 "row", "col"]


def _slim_candidates(cands: pd.DataFrame) -> pd.DataFrame:
    """The rows of a ``pick_ibc(..., return_candidates=True)`` table that can end up accepted —
    its :func:`_view_rows` (every accepted row and the darkness-map side candidates; the
    dataset-level steps change ``view``/``accepted`` only there) — with :data:`_SLIM_COLUMNS`,
    in table order: :func:`accepted_picks` after the dataset-level steps is the same as for the
    whole table, and the view rows of the slim table are all its rows."""
    if not len(cands):
        return cands
    return cands.loc[_view_rows(cands), [c for c in _SLIM_COLUMNS if c in cands]].reset_index(drop=True)


def _select_view_features(cands, packed, gated):
    """The parts of ``packed`` (:func:`pack_view_features` of ``_view_rows(cands)``) for the
    rows still in the views after the gate."""
    if not len(cands):
        return packed
    keep = _view_rows(gated)[_view_rows(cands)]
    if keep.all():
        return packed
    asym, f16, idx, x32 = packed
    inset = keep[idx]
    return asym[keep], None if f16 is None else f16[keep], (np.cumsum(keep) - 1)[idx[inset]], x32[inset]


#: Candidate-table columns the dataset-level view step reads and writes.
_VIEW_COLUMNS = ["view", "accepted", "empty", "route", "relative_strength", "darkness", "score"]


def _gate_reduce(infos, max_rows):
    """(gate flags, whether every descriptor goes to the view fit) from the per-micrograph
    (reference strength, number of view rows)."""
    flags = gate_flags([r for r, _ in infos])
    return flags, sum(k for (_, k), f in zip(infos, flags) if not f) <= max_rows


def _view_parts(both, gate, i, block=None, geo=None, quota=None):
    """(view rows of the gated table with :data:`_VIEW_COLUMNS`, :func:`view_summary`) of
    micrograph ``i``, from its :func:`_candidates_and_features_chunk` ``both``: all the view fit
    needs of it. When ``both`` holds no float16 descriptors and every descriptor goes to the fit,
    they are recomputed from ``block`` (the micrograph's preprocessed block; ``geo`` = (pixel
    size Å, diameter Å, original shape), ``quota`` as for :func:`pack_view_features`): the same
    values. (The micrograph's own gated float16 descriptors: :func:`_gated_features`.)"""
    cands, packed = _unwrap(both)[:2]
    flags, fit_all = gate
    gated = _gated(cands, flags[i])
    if packed[1] is None and fit_all:
        packed = pack_view_features(_view_features_block(block, cands, *geo), quota)
    packed = _select_view_features(cands, packed, gated)
    mini = gated.loc[_view_rows(gated), [c for c in _VIEW_COLUMNS if c in gated]].reset_index(drop=True) \
        if len(gated) else gated
    return mini, view_summary(packed, fit_all)


def _candidates_and_features_chunk(block, pixel_size, diameter, original_shape, kw, quota, keep_f16, slim=True):
    """:func:`_candidates_and_features_block` of a (1, ny', nx') block as a (1, 1, 1) object
    array (a ``map_blocks`` step)."""
    out = np.empty((1, 1, 1), object)
    out[0, 0, 0] = _candidates_and_features_block(block, pixel_size, diameter, original_shape, kw, quota, slim=slim,
                                                  keep_f16=keep_f16)
    return out


def _unwrap(both):
    """A micrograph's :func:`_candidates_and_features_block` tuple from the (1, 1, 1) object array
    of :func:`_candidates_and_features_chunk`."""
    return both.flat[0]


def _info_of(both):
    """(reference strength, number of view rows) of a micrograph, for the dataset gate."""
    return _unwrap(both)[2]


def _gated_features(both, gate, i):
    """The float16 descriptors of micrograph ``i``'s view rows after the gate (``None`` when its
    :func:`_candidates_and_features_chunk` ``both`` holds none: they are recomputed)."""
    cands, packed = _unwrap(both)[:2]
    if packed[1] is None:
        return None
    return _select_view_features(cands, packed, _gated(cands, gate[0][i]))[1]


def _fit_views_block(parts, batch):
    """:func:`fit_dataset_views` of the micrographs' ``parts``, returned in batches of ``batch``
    micrographs (a tuple of lists)."""
    out = fit_dataset_views([m for m, _ in parts], [sm for _, sm in parts])
    release_freed_memory()  # the fit's temporaries (~100 MB at VIEW_FIT_MAX descriptors)
    return tuple(out[k:k + batch] for k in range(0, max(1, len(out)), batch))


def _apply_views_block(fitted, features, cands, gate, i, block=None, geo=None):
    """Micrograph ``i``'s gated candidate table with the dataset-level views and acceptances.
    ``features``: the float16 descriptors of its view rows after the gate, or ``None``: then,
    when the fitted model needs them, they are recomputed from ``block`` (as in
    :func:`_view_parts`)."""
    table = _gated(cands, gate[0][i])
    if features is None and fitted[1] is not None:
        f = _view_features_block(block, cands, *geo)
        features = f[_view_rows(table)[_view_rows(cands)]].astype(np.float16) if len(cands) else f
    mini = apply_dataset_views(fitted, features)
    if not len(mini):
        return table
    table = table.copy()
    rows = np.nonzero(_view_rows(table))[0]
    for col in ("view", "accepted"):
        v = table[col].to_numpy(object if col == "view" else bool).copy()
        v[rows] = mini[col].to_numpy()
        table[col] = v
    return table


def _views_block(fitted_batch, j, both, gate, i, *args):
    """:func:`_apply_views_block` of micrograph ``i`` with the ``j``-th fitted entry of a batch of
    the view fit, the candidate table and gated float16 descriptors of its
    :func:`_candidates_and_features_chunk` ``both``."""
    return _apply_views_block(fitted_batch[j], _gated_features(both, gate, i), _unwrap(both)[0], gate, i, *args)


def _accepted_views_block(fitted_batch, j, *args):
    """:func:`accepted_picks` of :func:`_views_block` (same arguments)."""
    return accepted_picks(_views_block(fitted_batch, j, *args))


def _patch_block(block, candidates, pixel_size, diameter, original_shape, tp):
    from .pick_deep import extract_training_patches

    keys = ("tile", "positive_threshold", "negative_threshold")
    return extract_training_patches(np.asarray(block)[0], candidates, pixel_size, diameter,
                                    original_shape=original_shape, **{k: v for k, v in tp.items() if k in keys})


def _deep_block(model, block, candidates, pixel_size, diameter, original_shape, tp):
    from .pick_deep import pick_deep

    keys = ("threshold", "device", "min_distance", "border", "check_empty")
    return pick_deep(model, np.asarray(block)[0], pixel_size, diameter, original_shape=original_shape,
                     ibc_candidates=candidates, **{k: v for k, v in tp.items() if k in keys})


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


def evaluate_picks(picks: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], match_px: float,
                   capped: bool = False) -> dict:
    """Precision, recall and F1 of picks against ground truth, per micrograph and overall.

    ``picks`` and ``truth`` map micrograph name → ``(n, 2)`` array of (x, y) px. Matching is
    one-to-one by the Hungarian algorithm on the centre distances; a matched pair counts when
    its distance is ≤ ``match_px``. Micrographs without ground truth are ignored (listed
    under ``"ignored"``).

    With ``capped=False`` (default) the assignment minimises the *raw* distances, exactly as
    ``shared/checks/pick_f1.py`` does, so the numbers agree with it. Note that this lets a far
    unmatched pick pull a chain of correct picks off their particles; ``capped=True`` gives
    every pair farther than ``match_px`` the same prohibitive cost (the usual definition),
    which can only match more.

    Returns ``{"precision", "recall", "f1", "n_picks", "n_truth", "n_matched",
    "per_micrograph": {name: {...same keys}}, "ignored": [...]}``.
    """
    def prf(tp, n, m):
        p = tp / n if n else 0.0
        r = tp / m if m else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                "n_picks": n, "n_truth": m, "n_matched": tp}

    per = {}
    tp = n_p = n_t = 0
    for mic in sorted(truth):
        t = np.asarray(truth[mic], float).reshape(-1, 2)
        p = np.asarray(picks.get(mic, np.zeros((0, 2))), float).reshape(-1, 2)
        m = 0
        if len(p) and len(t):
            dist = cdist(p, t)
            cost = np.where(dist <= match_px, dist, 1e12) if capped else dist
            r, c = linear_sum_assignment(cost)
            m = int((dist[r, c] <= match_px).sum())
        per[mic] = prf(m, len(p), len(t))
        tp, n_p, n_t = tp + m, n_p + len(p), n_t + len(t)
    out = prf(tp, n_p, n_t)
    out["per_micrograph"] = per
    out["ignored"] = sorted(set(picks) - set(truth))
    return out


# --------------------------------------------------------------------------------------------
# output files
# --------------------------------------------------------------------------------------------


def picks_table(frames: Mapping[str, pd.DataFrame], paths: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One RELION particle table from per-micrograph pick tables (columns :data:`PICK_COLUMNS`).

    Columns: ``rlnMicrographName`` (``paths[name]``, else the name), ``rlnCoordinateX/Y`` (px of
    the input micrograph), ``rlnAutopickFigureOfMerit`` (the score), ``rlnClassNumber`` (1 =
    top, 2 = side: RELION's integer class label for the view) and ``cdViewClass`` (the view
    as text).
    """
    rows = []
    for name, df in frames.items():
        view = df["view"].astype(str).to_numpy(object)
        rows.append(pd.DataFrame({
            "rlnMicrographName": np.full(len(df), str((paths or {}).get(name, name)), dtype=object),
            "rlnCoordinateX": df["x"].to_numpy(float), "rlnCoordinateY": df["y"].to_numpy(float),
            "rlnAutopickFigureOfMerit": df["score"].to_numpy(float),
            "rlnClassNumber": np.where(view == "side", 2, 1).astype(np.int64), "cdViewClass": view}))
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in (
            ("rlnMicrographName", object), ("rlnCoordinateX", float), ("rlnCoordinateY", float),
            ("rlnAutopickFigureOfMerit", float), ("rlnClassNumber", np.int64), ("cdViewClass", object))})
    return pd.concat(rows, ignore_index=True)


def write_picks(out_dir, frames: Mapping[str, pd.DataFrame], attrs: Mapping, paths: Mapping[str, str] | None = None,
                ) -> tuple[pd.DataFrame, list[str]]:
    """Write ``out_dir/particles.star`` (RELION 3.1: optics table + particles, see
    :func:`picks_table`) and one coordinate STAR per micrograph, ``out_dir/coordinates/NAME.star``
    (``rlnCoordinateX/Y``, ``rlnAutopickFigureOfMerit``, ``rlnClassNumber``).

    A micrograph without picks gets no coordinate file (a coordinate loop with no rows is not a
    readable table for several STAR readers, among them ``shared/checks/pick_f1.py``); its name
    is returned. ``attrs`` supplies the optics values (``pixel_size`` Å/px, ``voltage`` kV,
    ``cs`` mm, ``amplitude_contrast``). Returns ``(table, names_without_picks)``.
    """
    from pathlib import Path

    from .io.star import write_coordinates, write_particles
    from .model import particle_dataset

    out = Path(out_dir)
    coords = out / "coordinates"
    coords.mkdir(parents=True, exist_ok=True)
    empty = []
    for name, df in frames.items():
        target = coords / f"{name}.star"
        if len(df) == 0:
            target.unlink(missing_ok=True)  # a stale file from an earlier run would be read as picks
            empty.append(name)
            continue
        write_coordinates(target, df["x"].to_numpy(float), df["y"].to_numpy(float),
                          extra={"rlnAutopickFigureOfMerit": df["score"].to_numpy(float),
                                 "rlnClassNumber": np.where(df["view"].astype(str) == "side", 2, 1).astype(np.int64)})
    table = picks_table(frames, paths)
    keep = {k: v for k, v in attrs.items() if k in ("pixel_size", "voltage", "cs", "amplitude_contrast")}
    ds = particle_dataset(None, table, keep)
    if "pixel_size" in keep:
        ds["rlnMicrographPixelSize"] = ("optics", [float(keep["pixel_size"])])
    write_particles(out / "particles.star", ds)
    return table, empty
