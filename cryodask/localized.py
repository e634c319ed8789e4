"""Components 4–5 of Auto3DCryoMap: "localized" 3-D reconstruction by pairwise structure from motion.

The paper builds a 3-D density from pairs of 2-D-aligned particle images with the tools of
photographic structure from motion, and averages the pairwise ("localized") maps. For each pair
(reference, next aligned particle):

1. **re-registration** of the particle onto the reference by intensity (ECC, OpenCV
   ``findTransformECC``, rigid motion);
2. **Shi–Tomasi corners** on the reference (``cv2.goodFeaturesToTrack``);
3. **KLT tracking** of the corners into the particle (``cv2.calcOpticalFlowPyrLK``);
4. **fundamental matrix** by the normalised 8-point algorithm inside RANSAC (minimal samples
   of 8 matches solved by ``cv2.findFundamentalMat(..., cv2.FM_8POINT)``, scored by the Sampson
   distance, refitted on all inliers); the algebraic and Sampson distances of the inliers are
   reported (``cv2.FM_RANSAC`` itself is available as ``fundamental="opencv"``);
5. **metric reconstruction**: the images are treated as photographs from a calibrated pinhole
   camera (see *Camera* below); essential matrix ``E = Kᵀ F K``, relative pose by
   ``cv2.recoverPose`` (cheirality test);
6. **triangulation** of the inlier matches by the mid-point method (the point halfway between
   the closest points of the two back-projected rays); OpenCV's linear (DLT)
   ``cv2.triangulatePoints`` is computed alongside for comparison;
7. the points are **splatted** into a density grid of the particle box (trilinear deposit of
   unit masses, then a Gaussian of ``sigma`` px): the pair's localized map, normalised to unit
   mass;
8. the next reference is the **gradient-weighted fusion** of the pair (each image z-scored,
   weights = Sobel gradient magnitude, weighted mean).

Camera. Cryo-EM images are parallel (orthographic) projections of a transparent density; the
paper's pipeline assumes a perspective camera. We must pick intrinsics: a calibrated camera with
square pixels, principal point at the box centre (N//2, N//2) and focal length
``f = focal · N`` px (``focal = 1`` by default: a 53° field of view across the box). The
triangulated points, expressed in the reference camera's frame with depth Z, are mapped into the
box by the scale ``f / median(Z)``: x, y then match the reference image's pixel coordinates
(about the box centre) and depth is measured in the same pixels about the median depth. The
reference camera looks along +z of the box. A single pair cannot fix the hand (the mirror image
explains orthographic projections equally well), so maps are compared with the truth after
:func:`cryodask.map_align.align_map` with the hand searched.

What to expect. For parallel projections of a rigidly rotating object, true correspondences
obey the *affine* epipolar constraint: ``F = [[0, 0, a], [0, 0, b], [c, d, e]]`` (the upper-left
2×2 block vanishes; the epipoles lie at infinity). An 8-point fit then returns a near-affine F
(:func:`affine_ratio`; :func:`affine_fundamental` fits the affine model, whose residuals are
reported beside the Sampson distances), and the pinhole model can only read it as a sideways
translation of the camera with almost no rotation — a stereo rig — so the triangulated depth is
``f · baseline / disparity``: a monotonic function of the true depth when all disparities
have one sign, and points at infinity or behind the cameras (rejected by the cheirality test)
where the disparity passes through zero, which is where intensity re-registration puts it. The
absolute depth scale follows from the arbitrary focal length, not from the data. More
fundamentally, a projection of a transparent density has no surface points: a "corner" in one
view is an overlap of densities along a ray and does not mark one 3-D point that another view
shows, except when the two views are nearly the same — consecutive particles are in random
orientations. ``benchmarks/bench_localized.py`` measures what the maps contain.

Graph. The fusion chain is sequential, so particles are split into independent chains of
``chain_size`` consecutive particles; the pairs of a chain are ``dask.delayed`` tasks, each
depending on the previous fusion. Each chain's localized maps are summed in one task (one
(N, N, N) accumulator per chain instead of one per pair; the sum is linear, so the result is the
same), and the chain sums are added by a pairwise tree of delayed tasks; the average is that sum
divided by the number of successful pairs.

Measured (``benchmarks/bench_localized.py``, 2,000 simulated particles at SNR 0.1 with the true
in-plane alignment): the averaged maps are envelope-level (FSC0.5 against the truth ≈ 110–370 Å)
and no better than the same corners given random depths; the plain average of the aligned
images extruded through a ball does better.

Units: images (N, N) px; 3-D points (x, y, z) in px from the box centre; volumes (N, N, N)
indexed (z, y, x) with the centre at N//2.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import cv2
import dask
import numpy as np
from scipy import ndimage

__all__ = [
    "zscore",
    "register",
    "detect_corners",
    "track_klt",
    "fundamental_ransac",
    "epipolar_distances",
    "affine_ratio",
    "affine_fundamental",
    "affine_fundamental_ransac",
    "camera_matrix",
    "relative_pose",
    "triangulate_midpoint",
    "triangulate_dlt",
    "pair_points",
    "splat",
    "fuse",
    "random_depth_points",
    "shuffled_depth_points",
    "envelope_map",
    "align_in_plane",
    "chain_bounds",
    "localized_graph",
    "localized_star",
]


# ----------------------------------------------------------------------------- image kernels

def zscore(img: np.ndarray) -> np.ndarray:
    """(img − mean) / std as float32 (a constant image becomes zeros)."""
    img = np.asarray(img, dtype=np.float32)
    sd = float(img.std())
    return (img - img.mean()) / (sd if sd > 0 else 1.0)


def _prep(img: np.ndarray, smooth_px: float) -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if smooth_px > 0:
        img = cv2.GaussianBlur(img, (0, 0), smooth_px)
    return zscore(img)


def _to_uint8(z: np.ndarray, clip: float = 3.0) -> np.ndarray:
    return np.clip((z + clip) * (255.0 / (2 * clip)), 0, 255).astype(np.uint8)


def register(ref: np.ndarray, img: np.ndarray, *, motion: str = "euclidean", smooth_px: float = 1.0,
             iterations: int = 100, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray, bool]:
    """Register ``img`` onto ``ref`` (both (N, N)) by intensity: OpenCV's ECC maximisation.

    ``motion``: 'translation', 'euclidean' (rotation + translation) or 'none'. The translation is
    initialised by phase correlation. Both images are z-scored and Gaussian-smoothed
    (``smooth_px``) for the estimate; the warp is applied to the original ``img`` (bilinear).
    Returns ``(registered (N, N) float32, warp (2, 3) float32, converged)``; when ECC does not
    converge the phase-correlation translation is used.
    """
    img = np.asarray(img, dtype=np.float32)
    warp = np.eye(2, 3, dtype=np.float32)
    if motion == "none":
        return img.copy(), warp, True
    a, b = _prep(ref, smooth_px), _prep(img, smooth_px)
    (dx, dy), _ = cv2.phaseCorrelate(a.astype(np.float64), b.astype(np.float64))
    warp[:, 2] = (dx, dy)  # img(x + dx) ≈ ref(x)
    mode = {"translation": cv2.MOTION_TRANSLATION, "euclidean": cv2.MOTION_EUCLIDEAN}[motion]
    ok = True
    try:
        _, warp = cv2.findTransformECC(a, b, warp, mode,
                                       (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, iterations, eps), None, 1)
    except cv2.error:
        ok = False
        warp = np.eye(2, 3, dtype=np.float32)
        warp[:, 2] = (dx, dy)
    n = img.shape
    out = cv2.warpAffine(img, warp, (n[1], n[0]), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                         borderMode=cv2.BORDER_REFLECT)
    return out, warp.astype(np.float32), ok


def detect_corners(img: np.ndarray, *, max_corners: int = 200, quality: float = 0.01, min_distance: float = 3.0,
                   block_size: int = 5, mask_radius: float | None = None) -> np.ndarray:
    """Shi–Tomasi corners (``cv2.goodFeaturesToTrack``) of an (N, N) image.

    ``mask_radius`` (px about the box centre N//2) restricts the search to a disc.
    Returns (k, 2) float32 pixel coordinates (x = column, y = row).
    """
    img = np.asarray(img, dtype=np.float32)
    mask = None
    if mask_radius is not None:
        h, w = img.shape
        yy, xx = np.mgrid[:h, :w]
        mask = (((xx - w // 2) ** 2 + (yy - h // 2) ** 2) <= mask_radius ** 2).astype(np.uint8)
    pts = cv2.goodFeaturesToTrack(img, max_corners, quality, min_distance, mask=mask, blockSize=block_size,
                                  useHarrisDetector=False)
    return np.zeros((0, 2), np.float32) if pts is None else pts.reshape(-1, 2).astype(np.float32)


def track_klt(ref8: np.ndarray, img8: np.ndarray, pts: np.ndarray, *, window: int = 11,
              levels: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Pyramidal Lucas–Kanade tracking (``cv2.calcOpticalFlowPyrLK``) of ``pts`` (k, 2) from the
    uint8 image ``ref8`` into ``img8``. Returns ``(pts2 (k, 2) float32, found (k,) bool)``; points
    tracked outside the image are marked not found."""
    if len(pts) == 0:
        return np.zeros((0, 2), np.float32), np.zeros(0, bool)
    p0 = np.ascontiguousarray(pts, dtype=np.float32).reshape(-1, 1, 2)
    p1, status, _ = cv2.calcOpticalFlowPyrLK(
        ref8, img8, p0, None, winSize=(window, window), maxLevel=levels,
        criteria=(cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01))
    p1 = p1.reshape(-1, 2)
    h, w = ref8.shape
    inside = (p1[:, 0] >= 0) & (p1[:, 0] <= w - 1) & (p1[:, 1] >= 0) & (p1[:, 1] <= h - 1)
    return p1.astype(np.float32), (status.reshape(-1) == 1) & inside & np.isfinite(p1).all(1)


# ----------------------------------------------------------------------- epipolar geometry

def _homog(p: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(p, np.float64), np.ones((len(p), 1))], 1)


def epipolar_distances(F: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Algebraic and Sampson distances of matches (p1 (k, 2), p2 (k, 2) px) under ``F``.

    ``F`` is scaled to unit Frobenius norm first. Algebraic: |x₂ᵀ F x₁| (pixel coordinates,
    dimensionless). Sampson: the first-order geometric error
    |x₂ᵀ F x₁| / sqrt((F x₁)₁² + (F x₁)₂² + (Fᵀ x₂)₁² + (Fᵀ x₂)₂²), in px.
    """
    F = np.asarray(F, np.float64)
    F = F / (np.linalg.norm(F) or 1.0)
    x1, x2 = _homog(p1), _homog(p2)
    l2 = x1 @ F.T  # F x1
    l1 = x2 @ F  # Fᵀ x2
    e = np.sum(x2 * l2, axis=1)
    den = l2[:, 0] ** 2 + l2[:, 1] ** 2 + l1[:, 0] ** 2 + l1[:, 1] ** 2
    return np.abs(e), np.abs(e) / np.sqrt(np.maximum(den, 1e-300))


def fundamental_ransac(p1: np.ndarray, p2: np.ndarray, *, threshold: float = 1.0, confidence: float = 0.99,
                       max_iters: int = 1000, rng: np.random.Generator | None = None,
                       method: str = "8point") -> tuple[np.ndarray | None, np.ndarray]:
    """Fundamental matrix of matches p1 ↔ p2 ((k, 2) px) robust to outliers.

    ``method='8point'``: RANSAC whose minimal samples are 8 matches solved by the normalised
    8-point algorithm (``cv2.findFundamentalMat(..., cv2.FM_8POINT)``); a match is an inlier when
    its Sampson distance is below ``threshold`` px; the number of iterations adapts to the
    inlier fraction (``confidence``), at most ``max_iters``; the best model is refitted by the
    8-point algorithm on all its inliers. ``method='opencv'``: ``cv2.findFundamentalMat`` with
    ``cv2.FM_RANSAC`` and the same threshold and confidence.
    Returns ``(F (3, 3) of unit norm or None, inlier mask (k,))``.
    """
    p1 = np.ascontiguousarray(p1, np.float64)
    p2 = np.ascontiguousarray(p2, np.float64)
    k = len(p1)
    none = (None, np.zeros(k, bool))
    if k < 8:
        return none
    if method == "opencv":
        F, mask = cv2.findFundamentalMat(p1, p2, cv2.FM_RANSAC, threshold, confidence, max_iters)
        if F is None or F.shape != (3, 3):
            return none
        return F / np.linalg.norm(F), mask.reshape(-1).astype(bool)
    rng = rng or np.random.default_rng(0)
    best_in, best_cost = np.zeros(k, bool), np.inf
    thr2 = threshold ** 2
    need, it = max_iters, 0
    while it < min(need, max_iters):
        it += 1
        s = rng.choice(k, 8, replace=False)
        F, _ = cv2.findFundamentalMat(p1[s], p2[s], cv2.FM_8POINT)
        if F is None or F.shape != (3, 3):
            continue
        _, d = epipolar_distances(F, p1, p2)
        inl = d * d < thr2
        cost = np.minimum(d * d, thr2).sum()  # tie-break equal counts by residual
        if inl.sum() > best_in.sum() or (inl.sum() == best_in.sum() and cost < best_cost):
            best_in, best_cost = inl, cost
            w = inl.mean()
            p_good = w ** 8  # probability that a sample is all inliers
            need = (1 if p_good >= 1 else max_iters if p_good < 1e-12
                    else int(math.ceil(math.log(1 - confidence) / math.log1p(-p_good))))
    if best_in.sum() < 8:
        return none
    F, _ = cv2.findFundamentalMat(p1[best_in], p2[best_in], cv2.FM_8POINT)
    if F is None or F.shape != (3, 3):
        return none
    _, d = epipolar_distances(F, p1, p2)
    inl = d < threshold
    return F / np.linalg.norm(F), inl


def affine_ratio(F: np.ndarray, box: int) -> float:
    """How far ``F`` is from the affine form: ‖F'[:2, :2]‖ / ‖F'‖ for F' = Tᵀ F T, the fundamental
    matrix in image coordinates centred on the box and scaled to [−1, 1] (T = [[b, 0, c], [0, b, c],
    [0, 0, 1]], b = box/2, c = box//2). 0 for parallel projections; of the order of the
    depth relief / distance ratio for a perspective camera."""
    T = np.array([[box / 2, 0.0, box // 2], [0.0, box / 2, box // 2], [0.0, 0.0, 1.0]])
    Fn = T.T @ np.asarray(F, np.float64) @ T
    return float(np.linalg.norm(Fn[:2, :2]) / np.linalg.norm(Fn))


def affine_fundamental(p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The affine fundamental matrix of matches p1 ↔ p2 ((k, 2) px) by orthogonal regression.

    For parallel projections every match satisfies a·x₂ + b·y₂ + c·x₁ + d·y₁ + e = 0, i.e.
    F_A = [[0, 0, a], [0, 0, b], [c, d, e]]: a hyperplane in (x₂, y₂, x₁, y₁), fitted here by the
    smallest principal component (the maximum-likelihood estimate for isotropic noise).
    Returns ``(F_A (3, 3) of unit norm, residual (k,) px)``, the residual being each match's
    geometric distance to the affine epipolar constraint (equal to its Sampson distance).
    """
    X = np.column_stack([p2, p1]).astype(np.float64)
    mu = X.mean(0)
    _, _, vt = np.linalg.svd(X - mu, full_matrices=False)
    nrm = vt[-1]
    e = -nrm @ mu
    F = np.array([[0, 0, nrm[0]], [0, 0, nrm[1]], [nrm[2], nrm[3], e]])
    return F / np.linalg.norm(F), np.abs((X - mu) @ nrm)


def affine_fundamental_ransac(p1: np.ndarray, p2: np.ndarray, *, threshold: float = 1.0, samples: int = 500,
                              rng: np.random.Generator | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Robust affine fundamental matrix: RANSAC over minimal samples of 4 matches (each defines the
    hyperplane of :func:`affine_fundamental`), inliers within ``threshold`` px, refitted by
    orthogonal regression on the best inlier set. Returns ``(F_A or None, inlier mask)``."""
    X = np.column_stack([p2, p1]).astype(np.float64)
    k = len(X)
    if k < 5:
        return None, np.zeros(k, bool)
    rng = rng or np.random.default_rng(0)
    idx = np.argsort(rng.random((samples, k)), axis=1)[:, :4]
    A = np.concatenate([X[idx], np.ones((samples, 4, 1))], axis=2)  # (s, 4, 5)
    h = np.linalg.svd(A)[2][:, -1]  # (s, 5): n (4) and offset
    nrm = np.linalg.norm(h[:, :4], axis=1)
    good = nrm > 1e-12
    h = h[good] / nrm[good, None]
    d = np.abs(X @ h[:, :4].T + h[:, 4])  # (k, s)
    inl = d < threshold
    best = inl[:, int(np.argmax(inl.sum(0)))] if len(h) else np.zeros(k, bool)
    if best.sum() < 5:
        return None, best
    F, _ = affine_fundamental(p1[best], p2[best])
    nrm = np.array([F[0, 2], F[1, 2], F[2, 0], F[2, 1]])
    return F, np.abs(X @ nrm + F[2, 2]) / np.linalg.norm(nrm) < threshold


def camera_matrix(box: int, focal: float = 1.0) -> np.ndarray:
    """Intrinsics K (3, 3) of the assumed camera: f = focal·box px, principal point (box//2, box//2)."""
    f = focal * box
    c = box // 2
    return np.array([[f, 0.0, c], [0.0, f, c], [0.0, 0.0, 1.0]])


def relative_pose(F: np.ndarray, p1: np.ndarray, p2: np.ndarray, K: np.ndarray) -> dict:
    """Metric reconstruction of two views: E = Kᵀ F K, then ``cv2.recoverPose`` (cheirality).

    Returns dict with ``R`` (3, 3), ``t`` (3,) unit, ``front`` (k,) bool (points in front of both
    cameras), ``E``, ``essential_sv_ratio`` (σ₂/σ₁ of E; 1 for a valid essential matrix).
    Convention: x₂ ~ K [R | t] X for X in the first camera's frame.
    """
    E = K.T @ F @ K
    sv = np.linalg.svd(E, compute_uv=False)
    n, R, t, mask = cv2.recoverPose(E, np.ascontiguousarray(p1, np.float64), np.ascontiguousarray(p2, np.float64), K)
    return {"R": R, "t": t.reshape(3), "front": mask.reshape(-1) > 0, "E": E,
            "essential_sv_ratio": float(sv[1] / sv[0]) if sv[0] > 0 else 0.0}


def triangulate_midpoint(c1: np.ndarray, d1: np.ndarray, c2: np.ndarray,
                         d2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mid-point triangulation of rays c1 + s·d1 and c2 + u·d2 (centres (3,) or (k, 3), directions (k, 3)).

    Returns ``(points (k, 3), gap (k,), angle_deg (k,))``: the midpoint of the two closest points,
    their distance, and the angle between the rays. Parallel rays give NaN points.
    """
    d1 = np.asarray(d1, np.float64)
    d2 = np.asarray(d2, np.float64)
    c1 = np.broadcast_to(np.asarray(c1, np.float64), d1.shape)
    c2 = np.broadcast_to(np.asarray(c2, np.float64), d2.shape)
    w0 = c1 - c2
    a, b, c = (d1 * d1).sum(1), (d1 * d2).sum(1), (d2 * d2).sum(1)
    d, e = (d1 * w0).sum(1), (d2 * w0).sum(1)
    den = a * c - b * b
    ok = den > 1e-12 * a * c
    den = np.where(ok, den, 1.0)
    s = np.where(ok, (b * e - c * d) / den, np.nan)
    u = np.where(ok, (a * e - b * d) / den, np.nan)
    q1, q2 = c1 + s[:, None] * d1, c2 + u[:, None] * d2
    cosang = np.clip(b / np.sqrt(a * c), -1.0, 1.0)
    return 0.5 * (q1 + q2), np.linalg.norm(q1 - q2, axis=1), np.degrees(np.arccos(cosang))


def triangulate_dlt(p1: np.ndarray, p2: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """OpenCV's linear triangulation (``cv2.triangulatePoints``), points (k, 3) in camera-1 frame."""
    P1 = K @ np.hstack([np.eye(3), np.zeros((3, 1))])
    P2 = K @ np.hstack([R, t.reshape(3, 1)])
    X = cv2.triangulatePoints(P1, P2, np.asarray(p1, np.float64).T, np.asarray(p2, np.float64).T)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (X[:3] / X[3]).T


def _rays(p1, p2, K, R, t):
    Ki = np.linalg.inv(K)
    d1 = _homog(p1) @ Ki.T
    d2 = (_homog(p2) @ Ki.T) @ R  # Rᵀ d in camera-1 frame (row vectors)
    c2 = -R.T @ t
    return np.zeros(3), d1, c2, d2


def _empty_pair(reason: str, registered: np.ndarray, warp: np.ndarray, stats: dict) -> dict:
    out = {"ok": False, "reason": reason, "points3d": np.zeros((0, 3), np.float32),
           "points_camera": np.zeros((0, 3), np.float32), "corners": np.zeros((0, 2), np.float32),
           "matches": np.zeros((0, 2), np.float32), "algebraic": np.zeros(0), "sampson": np.zeros(0),
           "affine_residual": np.zeros(0),
           "registered": registered, "warp": warp, "F": np.full((3, 3), np.nan), "R": np.full((3, 3), np.nan),
           "t": np.full(3, np.nan), "affine_ratio": np.nan, "essential_sv_ratio": np.nan, "rotation_deg": np.nan,
           "parallax_deg": np.zeros(0), "gap": np.zeros(0), "dlt_difference": np.nan, "n_outside_box": 0}
    out.update(stats)
    return out


def pair_points(ref: np.ndarray, img: np.ndarray, *, smooth_px: float = 1.0, motion: str = "euclidean",
                max_corners: int = 200, quality: float = 0.01, min_distance: float = 3.0, block_size: int = 5,
                mask_radius: float | None = None, klt_window: int = 11, klt_levels: int = 2,
                ransac_threshold: float = 1.0, ransac_confidence: float = 0.99, ransac_iters: int = 1000,
                fundamental: str = "8point", focal: float = 1.0, seed: int = 0) -> dict:
    """One localized reconstruction: the 3-D points of the pair (reference ``ref``, particle ``img``).

    Both images (N, N), protein white, already 2-D aligned. ``smooth_px``: Gaussian σ (px)
    applied before corner detection and tracking (the raw images are registered and fused).
    ``mask_radius`` (px) limits corners to a disc about the centre (default N/2 − block_size).
    ``focal``: focal length in units of the box (see the module docstring).

    Returns a dict:
      ``points3d`` (m, 3) float32 — triangulated inlier points in box px (x, y, z) about the
      centre (depth scaled by f / median depth); ``points_camera`` (m, 3) — the same in the
      first camera's metric frame (units of the baseline); ``corners`` (m, 2) — their pixel
      coordinates in the reference about the centre; ``matches`` (m, 2) — in the particle;
      ``algebraic``, ``sampson`` (n_inliers,) — epipolar distances of the RANSAC inliers;
      ``affine_residual`` (n_inliers,) px — their distances to the best *affine* epipolar
      constraint (:func:`affine_fundamental`) fitted to the same inliers;
      ``affine_inlier_fraction`` — the inlier fraction of an affine-F RANSAC
      (:func:`affine_fundamental_ransac`, same threshold) on the same tracked matches: parallel
      projections of true correspondences give the same fraction as the perspective F;
      ``n_corners``, ``n_tracked``, ``n_inliers``, ``inlier_fraction`` (inliers / tracked),
      ``F``, ``affine_ratio`` (:func:`affine_ratio`), ``essential_sv_ratio``, ``R``, ``t``,
      ``rotation_deg`` (angle of R), ``parallax_deg`` and ``gap`` per point (ray angle and
      mid-point gap), ``dlt_difference`` (median |mid-point − DLT| / median depth),
      ``n_outside_box``, ``registered`` (the particle registered onto the reference), ``warp``,
      ``ok``, ``reason``.
    """
    ref = np.asarray(ref, np.float32)
    n = ref.shape[0]
    rng = np.random.default_rng(seed)
    registered, warp, _ = register(ref, img, motion=motion, smooth_px=smooth_px)
    a, b = _prep(ref, smooth_px), _prep(registered, smooth_px)
    radius = mask_radius if mask_radius is not None else n / 2 - block_size
    corners = detect_corners(a, max_corners=max_corners, quality=quality, min_distance=min_distance,
                             block_size=block_size, mask_radius=radius)
    stats = {"n_corners": len(corners), "n_tracked": 0, "n_inliers": 0, "inlier_fraction": 0.0,
             "affine_inlier_fraction": 0.0}
    p2, found = track_klt(_to_uint8(a), _to_uint8(b), corners, window=klt_window, levels=klt_levels)
    p1, p2 = corners[found], p2[found]
    stats["n_tracked"] = int(len(p1))
    if len(p1) < 8:
        return _empty_pair("fewer than 8 tracked corners", registered, warp, stats)
    F, inl = fundamental_ransac(p1, p2, threshold=ransac_threshold, confidence=ransac_confidence,
                                max_iters=ransac_iters, rng=rng, method=fundamental)
    stats["n_inliers"] = int(inl.sum())
    stats["inlier_fraction"] = float(inl.mean())
    _, inl_a = affine_fundamental_ransac(p1, p2, threshold=ransac_threshold, rng=rng)
    stats["affine_inlier_fraction"] = float(inl_a.mean())
    if F is None:
        return _empty_pair("no fundamental matrix", registered, warp, stats)
    q1, q2 = p1[inl], p2[inl]
    alg, samp = epipolar_distances(F, q1, q2)
    _, affine_res = affine_fundamental(q1, q2)
    K = camera_matrix(n, focal)
    pose = relative_pose(F, q1, q2, K)
    R, t = pose["R"], pose["t"]
    c1, d1, c2, d2 = _rays(q1, q2, K, R, t)
    X, gap, ang = triangulate_midpoint(c1, d1, c2, d2)
    keep = pose["front"] & np.isfinite(X).all(1) & (X[:, 2] > 0)
    common = {
        "algebraic": alg, "sampson": samp, "affine_residual": affine_res, "F": F, "R": R, "t": t,
        "affine_ratio": affine_ratio(F, n),
        "essential_sv_ratio": pose["essential_sv_ratio"],
        "rotation_deg": float(np.degrees(np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1)))),
    }
    if keep.sum() < 4:
        out = _empty_pair("fewer than 4 points in front of both cameras", registered, warp, stats)
        out.update(common)
        return out
    X, gap, ang = X[keep], gap[keep], ang[keep]
    Xd = triangulate_dlt(q1[keep], q2[keep], K, R, t)
    zmed = float(np.median(X[:, 2]))
    scale = K[0, 0] / zmed
    box_pts = np.column_stack([X[:, 0] * scale, X[:, 1] * scale, (X[:, 2] - zmed) * scale])
    outside = int((np.abs(box_pts) > n / 2 - 1).any(1).sum())
    out = {
        "ok": True, "reason": "",
        "points3d": box_pts.astype(np.float32),
        "points_camera": X.astype(np.float32),
        "corners": (q1[keep] - n // 2).astype(np.float32),
        "matches": (q2[keep] - n // 2).astype(np.float32),
        "parallax_deg": ang, "gap": gap,
        "dlt_difference": float(np.nanmedian(np.linalg.norm(X - Xd, axis=1)) / abs(zmed)),
        "n_outside_box": outside, "registered": registered, "warp": warp,
    }
    out.update(stats)
    out.update(common)
    return out


# --------------------------------------------------------------------------- maps and fusion

def splat(points: np.ndarray, box: int, *, sigma: float = 1.0, weights: np.ndarray | None = None) -> np.ndarray:
    """Gaussian splats of 3-D points into a (box, box, box) grid (z, y, x), centre at box//2.

    ``points`` (k, 3) in px (x, y, z) about the centre; ``weights`` (k,) (default 1). Each point
    is deposited trilinearly and the grid is convolved with a Gaussian of ``sigma`` px, so the
    total mass is preserved for points well inside the box; points outside are dropped.
    """
    pts = np.asarray(points, np.float64).reshape(-1, 3)
    w = np.ones(len(pts)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    vol = np.zeros((box, box, box), np.float64)
    idx = pts[:, ::-1] + box // 2  # (z, y, x) index coordinates
    good = np.isfinite(idx).all(1) & (idx >= 0).all(1) & (idx <= box - 1).all(1)
    idx, w = idx[good], w[good]
    if len(idx):
        i0 = np.minimum(np.floor(idx).astype(np.int64), box - 2)
        f = idx - i0
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    wt = (w * np.where(dz, f[:, 0], 1 - f[:, 0]) * np.where(dy, f[:, 1], 1 - f[:, 1])
                          * np.where(dx, f[:, 2], 1 - f[:, 2]))
                    np.add.at(vol, (i0[:, 0] + dz, i0[:, 1] + dy, i0[:, 2] + dx), wt)
        if sigma > 0:
            vol = ndimage.gaussian_filter(vol, sigma, mode="constant")
    return vol.astype(np.float32)


def fuse(ref: np.ndarray, img: np.ndarray) -> np.ndarray:
    """Gradient-weighted fusion of two registered (N, N) images (the paper's next reference).

    Each image is z-scored; its weight is its Sobel gradient magnitude (``cv2.Sobel``, 3×3);
    the result is the weighted mean ``(w₁ z₁ + w₂ z₂) / (w₁ + w₂)``, falling back to the plain
    mean where both gradients vanish (a small ε = 10⁻³ × mean weight is added to both).
    """
    z1, z2 = zscore(ref), zscore(img)

    def grad(z):
        gx = cv2.Sobel(z, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(z, cv2.CV_32F, 0, 1, ksize=3)
        return np.sqrt(gx * gx + gy * gy)

    w1, w2 = grad(z1), grad(z2)
    eps = 1e-3 * float(0.5 * (w1.mean() + w2.mean())) + 1e-12
    return ((w1 + eps) * z1 + (w2 + eps) * z2) / (w1 + w2 + 2 * eps)


def random_depth_points(corners: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Control: the same 2-D points (k, 2) px with a random depth, uniform along the chord of a
    ball of ``radius`` px (z ∈ [−h, h], h = sqrt(radius² − x² − y²)). Returns (k, 3)."""
    c = np.asarray(corners, np.float64).reshape(-1, 2)
    h = np.sqrt(np.maximum(radius ** 2 - (c ** 2).sum(1), 0.0))
    return np.column_stack([c, rng.uniform(-1.0, 1.0, len(c)) * h])


def shuffled_depth_points(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Control: the structure-from-motion points (k, 3) with their depths randomly permuted
    (same x, y and the same depth distribution; the association of depth to point is lost)."""
    p = np.array(points, np.float64).reshape(-1, 3)
    p[:, 2] = rng.permutation(p[:, 2])
    return p


def envelope_map(mean_image: np.ndarray, radius: float, mode: str = "extrude") -> np.ndarray:
    """Control: a volume built from a 2-D average without any depth information.

    ``extrude``: V(x, y, z) = A(x, y) / L(x, y) inside the ball of ``radius`` px, L the chord
    length, so V projects along z back to A (inside the disc). ``spin``: the rotational average
    of A as a function of radius, placed on spherical shells (a spherically symmetric volume).
    Returns (N, N, N) float32.
    """
    a = np.asarray(mean_image, np.float64)
    n = a.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    if mode == "extrude":
        r2 = x ** 2 + y ** 2
        half = np.sqrt(np.maximum(radius ** 2 - r2[0], 0.0))
        length = np.maximum(2 * half, 1.0)
        vol = np.where(x ** 2 + y ** 2 + z ** 2 <= radius ** 2, (a / length)[None], 0.0)
        return vol.astype(np.float32)
    if mode == "spin":
        yy, xx = np.meshgrid(c, c, indexing="ij")
        rr = np.sqrt(xx ** 2 + yy ** 2).round().astype(int)
        prof = np.bincount(rr.ravel(), a.ravel()) / np.maximum(np.bincount(rr.ravel()), 1)
        r3 = np.sqrt(x ** 2 + y ** 2 + z ** 2)
        vol = np.interp(r3, np.arange(len(prof)), prof, right=0.0)
        return np.where(r3 <= radius, vol, 0.0).astype(np.float32)
    raise ValueError(f"mode must be 'extrude' or 'spin', not {mode!r}")


def align_in_plane(images: np.ndarray, psi_deg: np.ndarray, origins_px: np.ndarray | None = None,
                   order: int = 3) -> np.ndarray:
    """Undo a known 2-D alignment (RELION rlnAnglePsi and origins) of images (n, N, N).

    Image k becomes the projection at psi = 0, centred: out(s) = img(R_ψ s − o), where R_ψ is the
    in-plane block of RELION's matrix for (0, 0, ψ) and o the origin (x, y) in px (RELION sign).
    """
    images = np.asarray(images, np.float32)
    out = np.empty_like(images)
    n = images.shape[-1]
    ctr = np.array([n // 2, n // 2], np.float64)
    o = np.zeros((len(images), 2)) if origins_px is None else np.asarray(origins_px, np.float64)
    for k, (img, psi) in enumerate(zip(images, np.asarray(psi_deg, np.float64))):
        c, s = math.cos(math.radians(psi)), math.sin(math.radians(psi))
        m = np.array([[c, -s], [s, c]])  # (y, x) order
        off = ctr - m @ ctr - np.array([o[k, 1], o[k, 0]])
        out[k] = ndimage.affine_transform(img, m, off, order=order, mode="constant", cval=0.0)
    return out


# ------------------------------------------------------------------------------------ graph

def _take(block: np.ndarray, k: int) -> np.ndarray:
    return np.asarray(block[k], np.float32)


def _n_ok(total: tuple) -> int:
    return int(total[1])


def _fuse_next(ref: np.ndarray, res: dict) -> np.ndarray:
    return fuse(ref, res["registered"])


def _timed_pair(ref, img, kw):
    t0 = time.perf_counter()
    res = pair_points(ref, img, **kw)
    res["seconds"] = time.perf_counter() - t0
    return res


def _chain_maps(results: list[dict], box: int, sigma: float, controls: bool, radius: float,
                seed: int) -> tuple[np.ndarray, int]:
    """Sum of the chain's localized maps (and the controls'): ((1 or 3, N, N, N) float64, #pairs ok)."""
    rng = np.random.default_rng(seed)
    acc = np.zeros(((3 if controls else 1), box, box, box), np.float64)
    n_ok = 0
    for res in results:
        if not res["ok"] or len(res["points3d"]) == 0:
            continue
        n_ok += 1
        m = len(res["points3d"])
        acc[0] += splat(res["points3d"], box, sigma=sigma) / m
        if controls:
            acc[1] += splat(shuffled_depth_points(res["points3d"], rng), box, sigma=sigma) / m
            acc[2] += splat(random_depth_points(res["corners"], radius, rng), box, sigma=sigma) / m
    return acc, n_ok


def _add(a: tuple, b: tuple) -> tuple:
    return a[0] + b[0], a[1] + b[1]


def _tree_sum(items: list, prefix: str):
    """Pairwise tree of delayed additions (depth ⌈log₂ n⌉)."""
    level = list(items)
    depth = 0
    while len(level) > 1:
        depth += 1
        nxt = [dask.delayed(_add, pure=True)(level[i], level[i + 1], dask_key_name=f"{prefix}-sum-{depth}-{i // 2}")
               for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


_RECORD_SCALARS = ("ok", "n_corners", "n_tracked", "n_inliers", "inlier_fraction", "affine_inlier_fraction",
                   "affine_ratio", "essential_sv_ratio", "rotation_deg", "dlt_difference", "n_outside_box", "seconds")


def _chain_record(results: list[dict], indices: np.ndarray) -> dict:
    """Per-chain arrays: concatenated point clouds with offsets, and per-pair statistics."""
    rec = {"chain_first_particle": np.asarray(indices[:1]),  # the chain's first reference
           "particle_index": np.asarray(indices[1:])}  # the particle of each pair (0-based)
    counts = np.array([len(r["points3d"]) for r in results], np.int64)
    rec["offsets"] = np.concatenate([[0], np.cumsum(counts)])
    for key in ("points3d", "points_camera", "corners", "matches"):
        rec[key] = (np.concatenate([r[key] for r in results]).astype(np.float32) if len(results)
                    else np.zeros((0, 3 if key.startswith("points") else 2), np.float32))
    counts_in = np.array([len(r["sampson"]) for r in results], np.int64)
    rec["inlier_offsets"] = np.concatenate([[0], np.cumsum(counts_in)])
    rec["sampson"] = np.concatenate([r["sampson"] for r in results]) if results else np.zeros(0)
    rec["algebraic"] = np.concatenate([r["algebraic"] for r in results]) if results else np.zeros(0)
    rec["affine_residual"] = np.concatenate([r["affine_residual"] for r in results]) if results else np.zeros(0)
    rec["parallax_deg"] = np.concatenate([r["parallax_deg"] for r in results]) if results else np.zeros(0)
    for key in _RECORD_SCALARS:
        rec[key] = np.array([r.get(key, np.nan) for r in results], dtype=np.float64)
    rec["F"] = np.array([r["F"] for r in results]).reshape(-1, 3, 3)
    rec["R"] = np.array([r["R"] for r in results]).reshape(-1, 3, 3)
    rec["t"] = np.array([r["t"] for r in results]).reshape(-1, 3)
    rec["reason"] = np.array([r["reason"] for r in results], dtype=str)
    return rec


def chain_bounds(n: int, chain_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each chain of consecutive particles; a last chain shorter than 2 joins the previous one."""
    chain_size = max(int(chain_size), 2)
    bounds = [(s, min(s + chain_size, n)) for s in range(0, n, chain_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < 2:
        s, _ = bounds.pop()
        bounds[-1] = (bounds[-1][0], n)
    return [b for b in bounds if b[1] - b[0] >= 2]


def localized_graph(images, chain_size: int = 50, *, sigma: float = 1.0, controls: bool = False,
                    control_radius: float | None = None, seed: int = 0, **pair_kwargs) -> dict:
    """The localized reconstruction as a lazy Dask graph.

    ``images``: dask array (n, N, N) of 2-D-aligned particles (protein white). Particles are split
    into chains of ``chain_size`` consecutive images; in each chain the first image is the
    reference, every later image forms a pair with the current reference (a delayed
    :func:`pair_points` task), and the next reference is :func:`fuse` of the pair. ``sigma``:
    splat width (px). ``controls``: also build the shuffled-depth and random-depth control maps
    from the same pairs (``control_radius`` px, default 0.4·N). ``pair_kwargs`` go to
    :func:`pair_points`.

    Returns a dict of delayed objects (nothing is computed): ``map`` (N, N, N) float32, the
    average of all localized maps; ``controls`` (dict of maps, when requested); ``n_pairs_ok``;
    ``chains``, one record per chain (see :func:`_chain_record`); and plain ``bounds``.
    """
    import dask.array as da
    from dask.base import tokenize

    if not isinstance(images, da.Array):
        images = da.from_array(np.asarray(images))
    n, box = images.shape[0], images.shape[-1]
    bounds = chain_bounds(n, chain_size)
    radius = control_radius if control_radius is not None else 0.4 * box
    key = "localized-" + tokenize(images, chain_size, sigma, controls, radius, seed, pair_kwargs)
    sums, records = [], []
    for c, (start, stop) in enumerate(bounds):
        block = images[start:stop].to_delayed().ravel()
        block = (dask.delayed(np.concatenate, pure=True)(list(block), dask_key_name=f"{key}-chain-{c}")
                 if len(block) > 1 else block[0])
        ref = dask.delayed(_take, pure=True)(block, 0, dask_key_name=f"{key}-ref-{c}-0")
        results = []
        for k in range(1, stop - start):
            img = dask.delayed(_take, pure=True)(block, k, dask_key_name=f"{key}-img-{c}-{k}")
            kw = dict(pair_kwargs, seed=int(np.random.SeedSequence([seed, c, k]).generate_state(1)[0]))
            res = dask.delayed(_timed_pair, pure=True)(ref, img, kw, dask_key_name=f"{key}-pair-{c}-{k}")
            results.append(res)
            if k < stop - start - 1:
                ref = dask.delayed(_fuse_next, pure=True)(ref, res, dask_key_name=f"{key}-ref-{c}-{k}")
        cseed = int(np.random.SeedSequence([seed, c]).generate_state(1)[0])
        sums.append(dask.delayed(_chain_maps, pure=True)(results, box, sigma, controls, radius, cseed,
                                                         dask_key_name=f"{key}-chainmap-{c}"))
        records.append(dask.delayed(_chain_record, pure=True)(results, np.arange(start, stop),
                                                              dask_key_name=f"{key}-record-{c}"))
    total = _tree_sum(sums, key)

    def mean_map(t, channel):
        acc, n_ok = t
        return (acc[channel] / max(n_ok, 1)).astype(np.float32)

    out = {
        "map": dask.delayed(mean_map, pure=True)(total, 0, dask_key_name=f"{key}-map"),
        "n_pairs_ok": dask.delayed(_n_ok, pure=True)(total, dask_key_name=f"{key}-nok"),
        "chains": records,
        "bounds": bounds,
    }
    if controls:
        out["controls"] = {
            "shuffled_depth": dask.delayed(mean_map, pure=True)(total, 1, dask_key_name=f"{key}-shuffled"),
            "random_depth": dask.delayed(mean_map, pure=True)(total, 2, dask_key_name=f"{key}-random"),
        }
    return out


# ----------------------------------------------------------------------------------- driver

def _read_aligned(ds, indices: np.ndarray, apply_alignment: bool, phase_flip: bool) -> np.ndarray:
    from .io.star import read_particle_images

    imgs = read_particle_images(ds, indices)
    if phase_flip and "rlnDefocusU" in ds:
        imgs = _phase_flip(ds, indices, imgs)
    if apply_alignment and "rlnAnglePsi" in ds:
        px = _per_particle(ds, "rlnImagePixelSize")[indices]
        psi = ds["rlnAnglePsi"].values[indices]
        ox = ds["rlnOriginXAngst"].values[indices] / px if "rlnOriginXAngst" in ds else np.zeros(len(indices))
        oy = ds["rlnOriginYAngst"].values[indices] / px if "rlnOriginYAngst" in ds else np.zeros(len(indices))
        imgs = align_in_plane(imgs, psi, np.column_stack([ox, oy]))
    return imgs


def _phase_flip(ds, indices, imgs):
    """Multiply each image's transform by the sign of its CTF (RELION parameters from the STAR)."""
    from .ctf import ctf_2d, frequency_grid_rfft

    n = imgs.shape[-1]
    px = float(_per_particle(ds, "rlnImagePixelSize")[indices][0])
    ky, kx = frequency_grid_rfft(n, px)
    get = lambda lab, d=0.0: _per_particle(ds, lab, d)[indices]
    ctf = ctf_2d(ky, kx, get("rlnDefocusU"), get("rlnDefocusV"), get("rlnDefocusAngle"),
                 float(get("rlnVoltage", 300.0)[0]), float(get("rlnSphericalAberration", 2.7)[0]),
                 float(get("rlnAmplitudeContrast", 0.1)[0]))
    sign = np.sign(ctf.numpy()).reshape(len(indices), n, n // 2 + 1)
    f = np.fft.rfft2(np.fft.ifftshift(imgs, axes=(-2, -1)))
    out = np.fft.fftshift(np.fft.irfft2(f * sign, s=(n, n)), axes=(-2, -1))
    return out.astype(np.float32)


def _per_particle(ds, label: str, default=None) -> np.ndarray:
    """``per_particle`` that also accepts a single optics group without rlnOpticsGroup per particle
    (as some writers produce); ``default`` when the label is absent (KeyError if None)."""
    from .io.star import per_particle

    try:
        return per_particle(ds, label)
    except KeyError:
        n = ds.sizes["particle"]
        if label in ds.variables and ds[label].dims == ("optics",) and ds[label].size == 1:
            return np.full(n, ds[label].values[0])
        if default is None:
            raise
        return np.full(n, default)


def localized_star(star_path, out_dir, *, chain_size: int = 50, max_particles: int | None = None,
                   apply_alignment: bool = True, phase_flip: bool = True, controls: bool = True,
                   control_radius_px: float | None = None, sigma: float = 1.0, seed: int = 0,
                   scheduler: str = "threads", **pair_kwargs) -> dict:
    """Run the localized reconstruction on a RELION particle STAR and its stack(s).

    The particles' 2-D alignment (rlnAnglePsi, rlnOriginX/YAngst) is undone when present
    (``apply_alignment``), so the images are the 2-D-aligned particles the method expects;
    ``phase_flip`` corrects the CTF phases (rlnDefocusU/V/Angle) first. Writes, under
    ``out_dir``: ``localized_map.mrc`` (the averaged map, voxel = particle pixel size);
    with ``controls``, ``localized_shuffled_depth.mrc``, ``localized_random_depth.mrc`` and
    ``average_envelope.mrc`` (the plain average of the aligned images extruded through a ball);
    the controls' ball radius is ``control_radius_px`` (default 0.4 × box);
    ``points/chain_NNNN.npz`` (per-pair point clouds and statistics of each chain);
    ``localized.json`` (the figures returned).

    Returns a dict of figures: particle and pair counts, the medians of the inlier fraction,
    Sampson and algebraic distances, affine ratio, essential-matrix singular-value ratio,
    ray parallax, seconds in total and per pair, and the output paths.
    """
    import dask.array as da

    from .io.mrc import write_map
    from .io.star import read_particles

    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "points").mkdir(parents=True, exist_ok=True)
    ds = read_particles(star_path)
    n = ds.sizes["particle"] if max_particles is None else min(int(max_particles), ds.sizes["particle"])
    px = float(_per_particle(ds, "rlnImagePixelSize")[0])
    first = _read_aligned(ds, np.arange(1), False, False)
    box = first.shape[-1]
    parts = []
    for start, stop in chain_bounds(n, chain_size):
        idx = np.arange(start, stop)
        parts.append(da.from_delayed(dask.delayed(_read_aligned, pure=True)(ds, idx, apply_alignment, phase_flip),
                                     (len(idx), box, box), np.float32))
    images = da.concatenate(parts) if parts else da.zeros((0, box, box), np.float32)
    radius = control_radius_px if control_radius_px is not None else 0.4 * box
    g = localized_graph(images, chain_size, sigma=sigma, controls=controls, control_radius=radius, seed=seed,
                        **pair_kwargs)
    writes = [dask.delayed(_write_npz, pure=False)(out / "points" / f"chain_{c:04d}.npz", rec)
              for c, rec in enumerate(g["chains"])]
    todo = {"map": g["map"], "n_ok": g["n_pairs_ok"], "records": g["chains"], "writes": writes}
    if controls:
        todo["controls"] = g["controls"]
        todo["mean"] = images.mean(axis=0)
    res = dask.compute(todo, scheduler=scheduler)[0]
    paths = {"map": str(out / "localized_map.mrc")}
    write_map(paths["map"], res["map"], px)
    if controls:
        for name, vol in res["controls"].items():
            paths[name] = str(out / f"localized_{name}.mrc")
            write_map(paths[name], vol, px)
        paths["average_envelope"] = str(out / "average_envelope.mrc")
        write_map(paths["average_envelope"], envelope_map(res["mean"], radius), px)
    recs = res["records"]
    cat = lambda k: np.concatenate([r[k] for r in recs]) if recs else np.zeros(0)
    ok = cat("ok").astype(bool)
    seconds = time.perf_counter() - t0
    med = lambda v: float(np.nanmedian(v)) if np.size(v) and np.isfinite(v).any() else float("nan")
    figures = {
        "n_particles": int(n),
        "n_chains": len(recs),
        "n_pairs": int(len(ok)),
        "n_pairs_ok": int(res["n_ok"]),
        "median_corners": med(cat("n_corners")),
        "median_tracked": med(cat("n_tracked")),
        "median_inlier_fraction": med(cat("inlier_fraction")),
        "median_affine_inlier_fraction": med(cat("affine_inlier_fraction")),
        "median_sampson_px": med(cat("sampson")),
        "median_algebraic": med(cat("algebraic")),
        "median_affine_residual_px": med(cat("affine_residual")),
        "median_affine_ratio": med(cat("affine_ratio")[ok]),
        "median_essential_sv_ratio": med(cat("essential_sv_ratio")[ok]),
        "median_parallax_deg": med(cat("parallax_deg")),
        "median_points_per_pair": med(np.diff(np.concatenate([r["offsets"] for r in recs]))) if recs else float("nan"),
        "seconds_total": seconds,
        "seconds_per_pair_task": med(cat("seconds")),
        "pixel_size": px,
        "paths": paths,
    }
    with open(out / "localized.json", "w") as f:
        json.dump(figures, f, indent=2)
    return figures


def _write_npz(path: Path, rec: dict) -> str:
    np.savez_compressed(path, **rec)
    return str(path)
