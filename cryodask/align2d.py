"""2D alignment through perfect masks: side-view registration and top-view centring.

Side views (the method, Auto3DCryoMap §"particle alignment"): each particle's perfect mask (an
oriented rectangle, :mod:`cryodask.select`) is registered to a reference mask (the upright
rectangle of the set's median size) by intensity-based registration — mean-squared error,
regular-step gradient descent (:func:`rsgd`, MATLAB ``imregister``'s optimizer), rigid,
similarity or affine transforms — and the transform found is applied to the particle.
The paper's four settings are selectable (:data:`VARIANTS`):

``paper-affine``      affine from the identity, MATLAB's monomodal defaults (maximum step
                      0.0625, minimum step 1e-5, relaxation 0.5, gradient tolerance 1e-4,
                      100 iterations);
``paper-adjusted``    the same with a smaller initial step (0.02) and minimum step (1e-6);
``paper-300``         ``paper-adjusted`` with up to 300 iterations;
``paper-sim-affine``  a similarity registration first, then affine initialised from it.

(The "adjusted" step values are cryodask's choice: the paper names the adjustment, not the
numbers. Steps are in normalised parameters: radians, matrix entries, half-box translations.)

A local optimizer started at the identity lands in the wrong minimum whenever a particle is
rotated far from the reference, so cryodask adds a *global start*: a polar rotational
cross-correlation of the two masks over all angles (:func:`rotational_correlation`), then a
local rigid RSGD refinement on a 32-px grid (``global-mask``). A rectangle's mask cannot tell θ from θ+180° (a
near-square's not even from θ+90°); ``global-refine`` (the default, measured best) resolves
that and refines angle and shift by aligning the particle images themselves to a running
reference (:func:`align_to_reference`, a few iterations, the reference a tree reduction over
particle chunks and re-centred on its own perfect mask each time).

A projection can only be turned and shifted in its plane: from a similarity or affine fit the
rotation of its polar decomposition and its translation are kept (``rlnAnglePsi``, origins,
and the transform applied to the particle images, bilinear).

Top views: :func:`centre_top_views` centres each particle on its disc mask and re-boxes it;
the *localized* copy has the background outside the disc set to zero.

Conventions
- A transform ``(A, t)`` maps a pixel ``x`` of the aligned (reference-frame) image to the
  particle: ``aligned(x) = particle(A x + t)``, ``x``/``t`` in px relative to the box centre
  (index N//2), ``x`` = column, ``y`` = row. For a rotation ``A = R(θ) = [[cos, −sin], [sin, cos]]``.
- RELION: the particle with ``aligned = particle(R(θ) x + c)`` has ``rlnAnglePsi = −θ`` and
  ``rlnOriginX/YAngst = −c × pixel size`` (up to the one global rotation/shift of any 2D
  alignment; verified against projections of a phantom, ``tests/test_align2d.py``).
- Angles in degrees at the interfaces (radians inside kernels where noted), lengths in px.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import torch
import torch.nn.functional as F

from .select import (FEATURES, REASONS, SelectionThresholds, cluster_masks, features_graph, measure_objects,
                     masks_graph, preprocess_particles, render_masks, select_particles, selection_columns, star_inputs,
                     work_box_for, write_gallery)

__all__ = [
    "RSGDSettings",
    "Variant",
    "VARIANTS",
    "DEFAULT_VARIANT",
    "warp",
    "rotation",
    "soft_masks",
    "reference_mask",
    "rsgd",
    "register_masks",
    "register_side_masks",
    "polar_transform",
    "rotational_correlation",
    "align_to_reference",
    "reference_sum",
    "centre_reference",
    "refine_alignment",
    "align_side_views",
    "centre_top_views",
    "relion_parameters",
    "inplane_errors",
    "ssim_scores",
    "ssim_figures",
    "register_graph",
    "refine_graph",
    "apply_graph",
    "masks_and_selection",
    "side_alignment_graph",
    "align2d_star",
]

_F = {name: i for i, name in enumerate(FEATURES)}


# ------------------------------------------------------------------------------------ warping
def _device(device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    from .projection import default_device

    return default_device()


def rotation(theta: torch.Tensor) -> torch.Tensor:
    """2×2 rotation matrices (n, 2, 2) for angles ``theta`` (n,) in radians."""
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def _base_grid(m: int, device, dtype=torch.float32) -> torch.Tensor:
    r = torch.arange(m, device=device, dtype=dtype) - m // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([xx, yy], -1)  # (m, m, 2) = (x, y), px from the centre


def warp(images: torch.Tensor, A: torch.Tensor, t: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``out(x) = images(A x + t)`` for a batch: images (n, m, m), A (n, 2, 2), t (n, 2) px.

    Bilinear interpolation, zero outside the box. Differentiable in ``A`` and ``t``.
    """
    n, m = images.shape[0], images.shape[-1]
    # in grid_sample's normalised coordinates (align_corners=False) pixel x (from the centre
    # m//2) is u = (x − δ)·2/m with δ = m/2 − ½ − m//2, so the source of u is A u + (Aδ + t − δ)·2/m
    A = A.to(images.dtype)
    delta = torch.full((2,), m / 2 - 0.5 - m // 2, dtype=images.dtype, device=images.device)
    shift = (torch.einsum("nij,j->ni", A, delta) + t.to(images.dtype) - delta) * (2.0 / m)
    u = (_base_grid(m, images.device, images.dtype) - delta) * (2.0 / m)  # (m, m, 2) normalised
    grid = torch.einsum("nij,hwj->nhwi", A, u) + shift[:, None, None, :]  # (faster than F.affine_grid on CPU)
    return F.grid_sample(images[:, None], grid, mode=mode, padding_mode="zeros", align_corners=False)[:, 0]


def soft_masks(features: np.ndarray, m: int, scale: float = 1.0, softness: float = 0.5,
               device=None) -> torch.Tensor:
    """Perfect masks rendered with soft (sigmoid, ``softness`` px) edges on an m×m grid.

    ``features`` (n, len(FEATURES)) in px of the input box; ``scale`` input px per grid px.
    Rectangles for side views, discs for top views. Returns float32 (n, m, m) in [0, 1].
    """
    dev = _device(device)
    f = torch.as_tensor(np.array(features, np.float64), dtype=torch.float32, device=dev)
    g = _base_grid(m, dev)
    x, y = g[..., 0][None], g[..., 1][None]
    col = lambda k: f[:, _F[k], None, None]  # noqa: E731
    a = torch.deg2rad(col("angle"))
    dx, dy = x - col("x") / scale, y - col("y") / scale
    u = dx * torch.cos(a) + dy * torch.sin(a)
    v = -dx * torch.sin(a) + dy * torch.cos(a)
    rect = torch.sigmoid((col("length") / (2 * scale) - u.abs()) / softness) * \
        torch.sigmoid((col("width") / (2 * scale) - v.abs()) / softness)
    ddx, ddy = x - col("disc_x") / scale, y - col("disc_y") / scale
    disc = torch.sigmoid((col("disc_r") / scale - torch.sqrt(ddx**2 + ddy**2 + 1e-12)) / softness)
    out = torch.where(col("is_top") > 0, disc, rect) * (col("found") > 0)
    return out


def reference_mask(length: float, width: float, m: int, *, top: bool = False, scale: float = 1.0,
                   softness: float = 0.5, device=None) -> torch.Tensor:
    """The fixed mask: an upright rectangle (long side along y) of ``length``×``width``, or a
    disc of diameter ``length`` (``top``), centred; sizes in input px, grid m×m. (m, m)."""
    f = np.zeros((1, len(FEATURES)))
    f[0, _F["found"]] = 1
    f[0, _F["length"]], f[0, _F["width"]], f[0, _F["angle"]] = length, width, 90.0
    f[0, _F["disc_r"]] = length / 2
    f[0, _F["is_top"]] = float(top)
    return soft_masks(f, m, scale, softness, device)[0]


# ---------------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class RSGDSettings:
    """Regular-step gradient descent (ITK / MATLAB ``RegularStepGradientDescent``).

    Each iteration moves ``step`` along the (scaled) negative gradient direction; when the
    gradient direction reverses (dot product with the previous gradient < 0) the step is
    multiplied by ``relaxation``; a particle stops when its step < ``min_step``, its gradient
    norm < ``grad_tol`` or after ``max_iter`` iterations. Steps are in the transform's
    normalised parameters (radians, matrix entries, translations in half-boxes).
    """

    max_step: float = 0.0625
    min_step: float = 1e-5
    relaxation: float = 0.5
    grad_tol: float = 1e-4
    max_iter: int = 100


def rsgd(loss_fn, p0: torch.Tensor, settings: RSGDSettings, scales: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise a batch of independent problems by regular-step gradient descent.

    ``loss_fn(p, idx)`` → (k,) losses of the problems ``idx`` (k,) at parameters ``p`` (k, P);
    ``p0`` (n, P). Returns ``(p (n, P), final loss (n,), iterations (n,))``.
    """
    p = p0.detach().clone()
    n = p.shape[0]
    dev = p.device
    scales = torch.ones(p.shape[1], device=dev, dtype=p.dtype) if scales is None else scales.to(dev, p.dtype)
    step = torch.full((n,), settings.max_step, device=dev, dtype=p.dtype)
    prev = torch.zeros_like(p)
    active = torch.ones(n, dtype=torch.bool, device=dev)
    iters = torch.zeros(n, dtype=torch.int64, device=dev)
    loss = torch.full((n,), float("nan"), device=dev, dtype=p.dtype)
    for _ in range(settings.max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        pa = p[idx].clone().requires_grad_(True)
        la = loss_fn(pa, idx)
        (g,) = torch.autograd.grad(la.sum(), pa)
        loss[idx] = la.detach()
        g = g / scales
        gnorm = g.norm(dim=1)
        st = torch.where((g * prev[idx]).sum(1) < 0, step[idx] * settings.relaxation, step[idx])
        stop = (gnorm < settings.grad_tol) | (st < settings.min_step)
        move = (st / gnorm.clamp(min=1e-30))[:, None] * g / scales
        p[idx] = torch.where(stop[:, None], p[idx], pa.detach() - move)
        step[idx] = st
        prev[idx] = g
        iters[idx] += (~stop).long()
        active[idx] = ~stop
    return p, loss, iters


# ---------------------------------------------------------------------------- mask registration
def _to_affine(p: torch.Tensor, kind: str, half: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised parameters → (A (n,2,2), t (n,2) px). rigid: (θ, tx, ty); similarity:
    (s, θ, tx, ty); affine: (a11, a12, a21, a22, tx, ty); translations in half-boxes."""
    if kind == "rigid":
        return rotation(p[:, 0]), p[:, 1:3] * half
    if kind == "similarity":
        return p[:, 0, None, None] * rotation(p[:, 1]), p[:, 2:4] * half
    if kind == "affine":
        return p[:, :4].reshape(-1, 2, 2), p[:, 4:6] * half
    raise ValueError(f"unknown transform {kind!r}")


def _from_affine(A: torch.Tensor, t: torch.Tensor, kind: str, half: float) -> torch.Tensor:
    theta = torch.atan2(A[:, 1, 0] - A[:, 0, 1], A[:, 0, 0] + A[:, 1, 1])
    tn = t / half
    if kind == "rigid":
        return torch.cat([theta[:, None], tn], 1)
    if kind == "similarity":
        s = torch.sqrt(torch.clamp(torch.det(A), min=1e-12))
        return torch.cat([s[:, None], theta[:, None], tn], 1)
    return torch.cat([A.reshape(-1, 4), tn], 1)


def rotation_of(A: torch.Tensor) -> torch.Tensor:
    """Angle (rad) of the rotation in the polar decomposition of 2×2 matrices (n, 2, 2)."""
    return torch.atan2(A[:, 1, 0] - A[:, 0, 1], A[:, 0, 0] + A[:, 1, 1])


def register_masks(moving: torch.Tensor, fixed: torch.Tensor, kind: str = "affine",
                   A0: torch.Tensor | None = None, t0: torch.Tensor | None = None,
                   settings: RSGDSettings = RSGDSettings()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Register masks ``moving`` (n, m, m) to ``fixed`` (m, m): minimise
    ``mean((moving(A x + t) − fixed)²)`` over a rigid, similarity or affine ``(A, t)`` by
    :func:`rsgd`, starting at ``(A0, t0)`` (default identity). Returns (A, t px, final MSE)."""
    n, m = moving.shape[0], moving.shape[-1]
    dev = moving.device
    half = m / 2
    A0 = torch.eye(2, device=dev).expand(n, 2, 2) if A0 is None else A0.to(dev)
    t0 = torch.zeros(n, 2, device=dev) if t0 is None else t0.to(dev)
    p0 = _from_affine(A0, t0, kind, half)

    def loss(p, idx):
        A, t = _to_affine(p, kind, half)
        return ((warp(moving[idx], A, t) - fixed) ** 2).mean(dim=(1, 2))

    p, mse, _ = rsgd(loss, p0, settings)
    A, t = _to_affine(p, kind, half)
    return A.detach(), t.detach(), mse


# ------------------------------------------------------------------------------- polar search
def polar_transform(images: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, n_phi: int = 360
                    ) -> torch.Tensor:
    """Sample images (n, m, m) on circles around ``centres`` (n, 2) px: (n, len(radii), n_phi),
    ``out[:, i, j] = image(c + r_i (cos φ_j, sin φ_j))``, φ_j = 2πj/n_phi (bilinear)."""
    n, m = images.shape[0], images.shape[-1]
    phi = torch.arange(n_phi, device=images.device, dtype=images.dtype) * (2 * math.pi / n_phi)
    ring = torch.stack([torch.cos(phi), torch.sin(phi)], -1)  # (P, 2)
    base = (radii[:, None, None] * ring[None] + (m // 2 + 0.5)) * (2.0 / m) - 1.0  # (R, P, 2), normalised
    norm = base[None] + (centres * (2.0 / m))[:, None, None, :]
    return F.grid_sample(images[:, None], norm, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]


def rotational_correlation(polar: torch.Tensor, polar_ref: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Correlation over all rotations (n, n_phi): ``C[α_j] = Σ_r r Σ_φ P(r, φ+α_j) Q(r, φ)``
    with ring means removed, α_j = 2πj/n_phi. ``polar`` (n, R, P), ``polar_ref`` (R, P) or (n, R, P).
    The particle rotated by ``θ = argmax α`` (``aligned = particle(R(θ)x + c)``) matches the reference."""
    p = polar - polar.mean(-1, keepdim=True)
    q = polar_ref - polar_ref.mean(-1, keepdim=True)
    fp = torch.fft.rfft(p, dim=-1)
    fq = torch.fft.rfft(q, dim=-1)
    spec = (fp * fq.conj() * radii[:, None]).sum(-2)
    return torch.fft.irfft(spec, n=p.shape[-1], dim=-1)


def _peak_in_windows(cc: torch.Tensor, centres_deg: torch.Tensor, half_width_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best angle (deg, sub-sample by a parabola) of circular scores ``cc`` (n, P) within
    ± ``half_width_deg`` of any of ``centres_deg`` (n, K); returns (angle, score)."""
    n, P = cc.shape
    step = 360.0 / P
    ang = torch.arange(P, device=cc.device, dtype=cc.dtype) * step
    d = (ang[None, None, :] - centres_deg[:, :, None] + 180.0) % 360.0 - 180.0
    allowed = (d.abs() <= half_width_deg + 1e-6).any(1)
    masked = torch.where(allowed, cc, torch.full_like(cc, -float("inf")))
    j = masked.argmax(1)
    a, b, c = (cc.gather(1, ((j + k) % P)[:, None])[:, 0] for k in (-1, 0, 1))
    den = a - 2 * b + c
    off = torch.where(den < 0, 0.5 * (a - c) / torch.where(den < 0, den, torch.ones_like(den)), torch.zeros_like(den))
    off = off.clamp(-0.5, 0.5)
    return (j.to(cc.dtype) + off) * step, b


def _cc_shift(images: torch.Tensor, ref: torch.Tensor, max_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Displacement d (n, 2) = (dx, dy) px of each image's content relative to ``ref`` (the
    peak of the circular cross-correlation within ± ``max_shift``, parabolic sub-pixel), and
    the peak value."""
    n, m = images.shape[0], images.shape[-1]
    cc = torch.fft.irfft2(torch.fft.rfft2(images) * torch.fft.rfft2(ref).conj(), s=(m, m))  # lag 0 at [0, 0]
    k = int(math.floor(max_shift)) + 1  # the lags −k..k (one more for the parabola) gathered from the circular result
    lags = torch.arange(-k, k + 1, device=images.device)
    win = cc[:, lags % m][:, :, lags % m]  # (n, 2k+1, 2k+1), lag 0 at [k, k]
    inside = (lags[:, None] ** 2 + lags[None, :] ** 2) <= max_shift**2
    inside[[0, -1], :] = False
    inside[:, [0, -1]] = False
    flat = torch.where(inside[None], win, torch.full_like(win, -float("inf"))).reshape(n, -1).argmax(1)
    w = 2 * k + 1
    iy, ix = flat // w, flat % w

    def para(a, b, c):
        den = a - 2 * b + c
        return torch.where(den < 0, 0.5 * (a - c) / torch.where(den < 0, den, torch.ones_like(den)),
                           torch.zeros_like(den)).clamp(-0.5, 0.5)

    ar = torch.arange(n, device=images.device)
    b = win[ar, iy, ix]
    ox = para(win[ar, iy, ix - 1], b, win[ar, iy, ix + 1])
    oy = para(win[ar, iy - 1, ix], b, win[ar, iy + 1, ix])
    d = torch.stack([(ix - k).to(cc.dtype) + ox, (iy - k).to(cc.dtype) + oy], 1)
    return d, b


# ------------------------------------------------------------------------ intensity refinement
def align_to_reference(images: np.ndarray | torch.Tensor, theta_deg: np.ndarray, centres: np.ndarray,
                       reference: np.ndarray | torch.Tensor, *, candidates_deg: np.ndarray,
                       window_deg: float, max_shift_px: float, r_max_px: float, n_phi: int = 180,
                       device=None) -> np.ndarray:
    """One round of reference-based alignment of a batch (the per-chunk kernel).

    For each particle the rotation is searched by polar rotational correlation with the
    reference around its current centre, within ± ``window_deg`` of ``theta_deg + k`` for the
    offsets ``k`` in ``candidates_deg`` (n, K) (e.g. 0/180 for a rectangle — NaN entries are
    ignored); then the particle rotated by the best angle is cross-correlated with the
    reference for the shift (within ± ``max_shift_px``).

    images (n, m, m) working images; theta_deg (n,); centres (n, 2) px; reference (m, m).
    ``n_phi`` angular samples (2° at 180, refined by a parabola: on simulated KLH the same
    errors as 1° sampling, in half the time). Returns (n, 4) float64: theta_deg, centre x,
    centre y (px), correlation score.
    """
    dev = _device(device)
    x = torch.as_tensor(np.array(images, np.float32), device=dev)
    n, m = x.shape[0], x.shape[-1]
    if n == 0:
        return np.zeros((0, 4))
    ref = torch.as_tensor(np.array(reference, np.float32), device=dev)
    c = torch.as_tensor(np.array(centres, np.float64), dtype=torch.float32, device=dev)
    th = torch.as_tensor(np.array(theta_deg, np.float64), dtype=torch.float32, device=dev)
    radii = torch.arange(1.0, float(r_max_px) + 1e-6, 1.0, device=dev)
    pol = polar_transform(x, c, radii, n_phi)
    pref = polar_transform(ref[None], torch.zeros(1, 2, device=dev), radii, n_phi)[0]
    cc = rotational_correlation(pol, pref, radii)
    cand = torch.as_tensor(np.array(candidates_deg, np.float64), dtype=torch.float32, device=dev)
    centres_deg = th[:, None] + cand
    centres_deg = torch.where(torch.isnan(centres_deg), th[:, None], centres_deg)
    best, _ = _peak_in_windows(cc, centres_deg, window_deg)
    rot = warp(x, rotation(torch.deg2rad(best)), c)
    d, score = _cc_shift(rot, ref, max_shift_px)
    new_c = c + torch.einsum("nij,nj->ni", rotation(torch.deg2rad(best)), d)
    best = (best + 180.0) % 360.0 - 180.0
    return torch.cat([best[:, None], new_c, score[:, None]], 1).double().cpu().numpy()


def reference_sum(images: np.ndarray | torch.Tensor, theta_deg: np.ndarray, centres: np.ndarray,
                  weights: np.ndarray, device=None) -> np.ndarray:
    """Σ_i w_i · aligned_i (m, m) float64 for a batch, plus the weight total in a trailing
    element: returns (m·m + 1,) (so partial sums of chunks can be added by a tree reduction)."""
    dev = _device(device)
    x = torch.as_tensor(np.array(images, np.float32), device=dev)
    m = x.shape[-1]
    w = torch.as_tensor(np.array(weights, np.float64), dtype=torch.float32, device=dev)
    if x.shape[0] == 0:
        return np.zeros(m * m + 1)
    th = torch.deg2rad(torch.as_tensor(np.array(theta_deg, np.float64), dtype=torch.float32, device=dev))
    c = torch.as_tensor(np.array(centres, np.float64), dtype=torch.float32, device=dev)
    al = warp(x, rotation(th), c)
    s = (al * w[:, None, None]).sum(0).double().cpu().numpy().ravel()
    return np.concatenate([s, [float(w.sum())]])


def centre_reference(total: np.ndarray, m: int, *, top: bool = False, expected_diameter_px: float | None = None,
                     device=None) -> tuple[np.ndarray, dict]:
    """The reference from a summed (m·m + 1,) vector: the average, re-centred (bilinear shift)
    on the centre of its own perfect mask (rectangle for side views, Hough disc for top
    views), so that particle centres are measured from the particle's centre. Returns
    (reference (m, m) float32, info with the applied shift px)."""
    avg = (np.asarray(total[:-1]) / max(float(total[-1]), 1e-12)).reshape(m, m).astype(np.float32)
    f = measure_objects(cluster_masks(avg[None]), view="top" if top else "side",
                        expected_diameter_px=expected_diameter_px)[0]
    if f[_F["found"]] <= 0:
        return avg, {"shift_px": [0.0, 0.0], "found": False}
    # sub-pixel centre: the intensity-weighted centroid of the (positive) average inside its
    # perfect mask (the mask's own centre is only good to ~½ px on a pixelated average)
    inside = render_masks(f[None], m)[0] > 0
    wgt = np.clip(avg, 0, None) * inside
    g = np.arange(m) - m // 2
    if wgt.sum() > 0:
        c = np.array([(wgt.sum(0) * g).sum(), (wgt.sum(1) * g).sum()], np.float32) / np.float32(wgt.sum())
    else:
        c = np.array([f[_F["x"]], f[_F["y"]]], np.float32)
    dev = _device(device)
    ref = warp(torch.as_tensor(avg, device=dev)[None], torch.eye(2, device=dev)[None],
               torch.as_tensor(c, device=dev)[None])[0].cpu().numpy()
    return ref, {"shift_px": [float(c[0]), float(c[1])], "found": True,
                 "length": float(f[_F["length"]]), "width": float(f[_F["width"]])}


def refine_alignment(images: np.ndarray, theta_deg: np.ndarray, centres: np.ndarray, *, weights: np.ndarray,
                     candidates_deg: np.ndarray, windows_deg=(12.0, 6.0, 4.0, 3.0), max_shift_px: float = 3.0,
                     r_max_px: float | None = None, expected_diameter_px: float | None = None,
                     device=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """In-memory iterative reference-based refinement (the same kernels as :func:`refine_graph`).

    Starts from the average of the particles aligned at (``theta_deg``, ``centres``) (weights:
    1 for particles used in the reference, 0 otherwise), then for each window in
    ``windows_deg`` aligns every particle to the current reference (:func:`align_to_reference`)
    and rebuilds and re-centres the reference. Returns (theta_deg, centres, reference, log).
    """
    m = images.shape[-1]
    r_max = r_max_px or (m // 2 - 1)
    th, c = np.asarray(theta_deg, np.float64), np.asarray(centres, np.float64)
    ref, info = centre_reference(reference_sum(images, th, c, weights, device), m,
                                 expected_diameter_px=expected_diameter_px, device=device)
    log = [info]
    for w in windows_deg:
        res = align_to_reference(images, th, c, ref, candidates_deg=candidates_deg, window_deg=w,
                                 max_shift_px=max_shift_px, r_max_px=r_max, device=device)
        th, c = res[:, 0], res[:, 1:3]
        ref, info = centre_reference(reference_sum(images, th, c, weights, device), m,
                                     expected_diameter_px=expected_diameter_px, device=device)
        log.append(info)
    return th, c, ref, log


# ---------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A registration setting: the transform, the optimizer, how it starts, and whether the
    intensity refinement follows. ``start``: 'identity' (the paper), 'similarity' (an affine
    fit initialised from a similarity fit) or 'polar' (global rotational correlation of the
    masks, then local refinement)."""

    name: str
    transform: str = "affine"
    start: str = "identity"
    optimizer: RSGDSettings = RSGDSettings()
    refine: bool = False
    description: str = ""
    grid: int | None = None  # masks registered on a grid of this many px (None: the working box)


_ADJUSTED = RSGDSettings(max_step=0.02, min_step=1e-6)
# local refinement after the global start: small steps, few iterations (the polar search is
# already at ~1°: 50 iterations changed the measured errors by < 0.05°, see the module notes)
_LOCAL = RSGDSettings(max_step=0.01, min_step=1e-3, max_iter=10)
VARIANTS: dict[str, Variant] = {
    "paper-affine": Variant("paper-affine", "affine", "identity", RSGDSettings(),
                            description="(1) affine, MATLAB monomodal defaults, from the identity"),
    "paper-adjusted": Variant("paper-adjusted", "affine", "identity", _ADJUSTED,
                              description="(2) affine, initial step 0.02, minimum step 1e-6"),
    "paper-300": Variant("paper-300", "affine", "identity", replace(_ADJUSTED, max_iter=300),
                         description="(3) as (2) with up to 300 iterations"),
    "paper-sim-affine": Variant("paper-sim-affine", "affine", "similarity", _ADJUSTED,
                                description="(4) similarity first, then affine initialised from it"),
    "global-mask": Variant("global-mask", "rigid", "polar", _LOCAL, grid=32,
                           description="polar rotational search of the masks, then rigid RSGD"),
    "global-refine": Variant("global-refine", "rigid", "polar", _LOCAL, refine=True, grid=32, description="global-mask, then 0/90/180° and fine angle/shift from the "
                                                      "images against a running reference"),
}
#: The default: the variant with the smallest true errors on simulated KLH side views
#: (``python benchmarks/bench_align2d.py table``).
DEFAULT_VARIANT = "global-refine"


def register_side_masks(features: np.ndarray, ref_length: float, ref_width: float, m: int, scale: float,
                        variant: str | Variant = DEFAULT_VARIANT, device=None) -> np.ndarray:
    """Register each particle's perfect mask to the upright reference rectangle (the
    per-chunk kernel). ``features`` (n, len(FEATURES)) (input px), the reference sides in
    input px, the working grid m and ``scale`` (input px per working px).

    Returns (n, 8) float64: theta_deg (rotation part of A), centre x, y (t, working px),
    a11, a12, a21, a22 (the linear part), final mask MSE.
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    dev = _device(device)
    n = len(features)
    if n == 0:
        return np.zeros((0, 8))
    m_work = m
    if v.grid and v.grid < m:
        scale, m = scale * m / v.grid, int(v.grid)
    moving = soft_masks(features, m, scale, device=dev)
    fixed = reference_mask(ref_length, ref_width, m, scale=scale, device=dev)
    A0 = t0 = None
    if v.start == "polar":
        c0 = torch.as_tensor(np.array(features)[:, [_F["x"], _F["y"]]] / scale, dtype=torch.float32, device=dev)
        radii = torch.arange(1.0, m // 2 - 1.0, 1.0, device=dev)
        cc = rotational_correlation(polar_transform(moving, c0, radii),
                                    polar_transform(fixed[None], torch.zeros(1, 2, device=dev), radii)[0], radii)
        ang, _ = _peak_in_windows(cc, torch.zeros(n, 1, device=dev), 180.0)
        A0, t0 = rotation(torch.deg2rad(ang)), c0
    elif v.start == "similarity":
        A0, t0, _ = register_masks(moving, fixed, "similarity", settings=v.optimizer)
    A, t, mse = register_masks(moving, fixed, v.transform, A0, t0, v.optimizer)
    t = t * (m_work / m)  # back to working px
    theta = torch.rad2deg(rotation_of(A))
    return torch.cat([theta[:, None], t, A.reshape(n, 4), mse[:, None]], 1).double().cpu().numpy()


def _symmetry_candidates(features: np.ndarray, square_ratio: float) -> np.ndarray:
    """Angle offsets (n, 4) deg the mask cannot tell apart: 0/180 for a rectangle, 0/90/180/270
    for a near-square (length/width < ``square_ratio``); NaN pads."""
    f = np.asarray(features)
    ratio = f[:, _F["length"]] / np.maximum(f[:, _F["width"]], 1e-6)
    out = np.tile(np.array([0.0, 180.0, np.nan, np.nan]), (len(f), 1))
    sq = ratio < square_ratio
    out[sq] = [0.0, 90.0, 180.0, 270.0]
    return out


def align_side_views(images: np.ndarray, features: np.ndarray, *, scale: float, weights: np.ndarray | None = None,
                     variant: str | Variant = DEFAULT_VARIANT, square_ratio: float = 1.25,
                     windows_deg=(12.0, 6.0, 4.0, 3.0), max_shift_px: float | None = None, device=None) -> dict:
    """Align side views in memory: mask registration (+ intensity refinement for refining variants).

    images (n, m, m): working images (preprocessed, :func:`cryodask.select.preprocess_particles`);
    features (n, len(FEATURES)) in input px; ``scale`` input px per working px; ``weights``
    (n,) which particles build the reference (default all found).

    Returns a dict: ``theta_deg`` (n,) and ``centres`` (n, 2) working px (``aligned =
    particle(R(θ)x + c)``), ``mask_theta_deg``/``mask_centres`` (the mask registration alone),
    ``A`` (n, 2, 2), ``mask_mse``, ``reference`` (m, m) or None, ``reference_length/width``.
    """
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    f = np.asarray(features, np.float64)
    m = images.shape[-1]
    found = f[:, _F["found"]] > 0
    w = found.astype(np.float64) if weights is None else np.asarray(weights, np.float64) * found
    ok = (w > 0) if (w > 0).any() else found
    ref_len, ref_wid = float(np.median(f[ok, _F["length"]])), float(np.median(f[ok, _F["width"]]))
    reg = register_side_masks(f, ref_len, ref_wid, m, scale, v, device)
    out = {"mask_theta_deg": reg[:, 0], "mask_centres": reg[:, 1:3], "A": reg[:, 3:7].reshape(-1, 2, 2),
           "mask_mse": reg[:, 7], "reference": None, "reference_length": ref_len, "reference_width": ref_wid}
    th, c = reg[:, 0].copy(), reg[:, 1:3].copy()
    if v.refine:
        diam = ref_len / scale
        th, c, ref, log = refine_alignment(
            images, th, c, weights=w, candidates_deg=_symmetry_candidates(f, square_ratio), windows_deg=windows_deg,
            max_shift_px=max_shift_px or max(2.0, 0.08 * diam), r_max_px=min(m // 2 - 1, 0.5 * math.hypot(ref_len, ref_wid) / scale + 2),
            expected_diameter_px=diam, device=device)
        out["reference"], out["refine_log"] = ref, log
    out["theta_deg"], out["centres"] = th, c
    return out


def centre_top_views(images: np.ndarray, features: np.ndarray, *, device=None) -> dict:
    """Top views: centre each particle (n, N, N) on its perfect disc (``features`` in px of
    the same box) and re-box it (bilinear); the *localized* copy has zero background outside
    the disc. Returns {centres (n, 2) px, aligned (n, N, N), localized (n, N, N)}."""
    dev = _device(device)
    f = np.asarray(features, np.float64)
    x = torch.as_tensor(np.array(images, np.float32), device=dev)
    n, box = x.shape[0], x.shape[-1]
    c = np.where(f[:, [_F["found"]]] > 0, f[:, [_F["disc_x"], _F["disc_y"]]], 0.0)
    ct = torch.as_tensor(c, dtype=torch.float32, device=dev)
    aligned = warp(x, torch.eye(2, device=dev).expand(n, 2, 2), ct)
    g = _base_grid(box, dev)
    r = torch.as_tensor(f[:, _F["disc_r"]], dtype=torch.float32, device=dev)
    inside = (g[..., 0] ** 2 + g[..., 1] ** 2)[None] <= (r**2)[:, None, None]
    return {"centres": c, "aligned": aligned.cpu().numpy(), "localized": (aligned * inside).cpu().numpy()}


# ------------------------------------------------------------------------------------ metrics
def relion_parameters(theta_deg: np.ndarray, centres_px: np.ndarray, pixel_size: float) -> dict[str, np.ndarray]:
    """RELION columns of ``aligned = particle(R(θ)x + c)``: rlnAnglePsi = −θ (deg, in (−180, 180]),
    rlnOriginXAngst/YAngst = −c × pixel size (Å). ``centres_px`` in px of the box written."""
    psi = -np.asarray(theta_deg, np.float64)
    psi = (psi + 180.0) % 360.0 - 180.0
    c = np.asarray(centres_px, np.float64)
    return {"rlnAnglePsi": psi, "rlnOriginXAngst": -c[:, 0] * pixel_size, "rlnOriginYAngst": -c[:, 1] * pixel_size}


def inplane_errors(psi_est, shift_est_px, psi_true, shift_true_px, symmetry: int = 1) -> dict:
    """True in-plane errors after removing the one global rotation and shift (as
    ``shared/checks/align_error.py``): angle differences modulo 360/``symmetry`` with their
    circular mean removed; shift differences (px, (n, 2)) with their mean removed.

    Returns {psi_median_deg, psi_p90_deg, shift_median_px, within_5deg, n, psi_err_deg (n,),
    shift_err_px (n,)}.
    """
    pe, pt = np.asarray(psi_est, float), np.asarray(psi_true, float)
    period = 360.0 / symmetry
    d = np.deg2rad((pe - pt) % period * (360.0 / period))
    offset = np.angle(np.mean(np.exp(1j * d)))
    err = np.rad2deg(np.abs(np.angle(np.exp(1j * (d - offset)))) * (period / 360.0))
    ds = np.asarray(shift_est_px, float) - np.asarray(shift_true_px, float)
    sh = np.hypot(*(ds - ds.mean(0)).T)
    return {"psi_median_deg": float(np.median(err)), "psi_p90_deg": float(np.percentile(err, 90)),
            "shift_median_px": float(np.median(sh)), "within_5deg": float(np.mean(err <= 5)), "n": int(len(err)),
            "psi_err_deg": err, "shift_err_px": sh}


def ssim_scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Structural similarity (scikit-image) of image pairs a[i], b[i] (n, m, m) → (n,);
    the data range is that of each pair."""
    from skimage.metrics import structural_similarity

    out = np.empty(len(a))
    for i in range(len(a)):
        rng = float(max(a[i].max(), b[i].max()) - min(a[i].min(), b[i].min())) or 1.0
        out[i] = structural_similarity(np.asarray(a[i], np.float64), np.asarray(b[i], np.float64), data_range=rng)
    return out


def ssim_figures(images: np.ndarray, features: np.ndarray, result: dict, *, scale: float, device=None) -> dict:
    """The paper's quality figures for an :func:`align_side_views` result (per particle).

    ``mask`` — SSIM between the particle's perfect mask moved by the found transform and the
    reference mask (the registration's own score: what the paper's Table 2 reports);
    ``image`` — SSIM between the particle and its aligned version (``images`` (n, m, m), the
    working images). Neither involves the truth: a wrong alignment can score as high (see
    :func:`inplane_errors` for the true errors).
    """
    dev = _device(device)
    f = np.asarray(features, np.float64)
    m = images.shape[-1]
    th = torch.deg2rad(torch.as_tensor(np.array(result["theta_deg"], np.float32), device=dev))
    c = torch.as_tensor(np.array(result["centres"], np.float32), device=dev)
    A = rotation(th)
    if result.get("reference") is None and result.get("A") is not None:  # mask-only: the full (affine) transform
        A = torch.as_tensor(np.array(result["A"], np.float32), device=dev)
    moving = warp(soft_masks(f, m, scale, device=dev), A, c).cpu().numpy()
    fixed = reference_mask(result["reference_length"], result["reference_width"], m, scale=scale, device=dev).cpu().numpy()
    aligned = warp(torch.as_tensor(np.array(images, np.float32), device=dev), A, c).cpu().numpy()
    return {"mask": ssim_scores(moving, np.broadcast_to(fixed, moving.shape)),
            "image": ssim_scores(np.asarray(images), aligned)}


# ------------------------------------------------------------------------------ graph builders
def _register_block(f, **kw):
    return register_side_masks(f, **kw)


def register_graph(features: da.Array, ref_length: float, ref_width: float, m: int, scale: float,
                   variant: str | Variant = DEFAULT_VARIANT) -> da.Array:
    """Lazy mask registration (n, 8) (see :func:`register_side_masks`), one task per chunk."""
    features = features.rechunk({1: -1})
    return da.blockwise(_register_block, "pk", features, "pf", new_axes={"k": 8}, concatenate=True,
                        dtype=np.float64, meta=np.empty((0, 0), np.float64), ref_length=ref_length, ref_width=ref_width, m=m, scale=scale,
                        variant=variant)


def _sum_block(img, p, w):
    return reference_sum(img, p[:, 0], p[:, 1:3], w)[None]


def _align_block(img, p, cand, ref, **kw):
    return align_to_reference(img, p[:, 0], p[:, 1:3], ref, candidates_deg=cand, **kw)


def _centre_block(total, m, expected_diameter_px):
    return centre_reference(total, m, expected_diameter_px=expected_diameter_px)[0]


def refine_graph(work: da.Array, init: da.Array, weights: da.Array, candidates: da.Array, *,
                 windows_deg=(12.0, 6.0, 4.0, 3.0), max_shift_px: float = 3.0, r_max_px: float | None = None,
                 expected_diameter_px: float | None = None, split_every: int = 8) -> tuple[da.Array, da.Array]:
    """Lazy iterative reference-based refinement.

    ``work`` (n, m, m) working images, ``init`` (n, ≥3) with theta_deg, x, y (working px),
    ``weights`` (n,) (reference membership), ``candidates`` (n, K) angle offsets (deg). For each
    window: every chunk is aligned to the current reference (one task per chunk), the partial
    sums of the aligned chunks are added by a tree reduction (``split_every``), and the
    reference re-centred. Nothing computes here. Returns ((n, 4) lazy array: theta_deg, x, y,
    score; the final reference, a lazy (m, m) array).
    """
    m = work.shape[-1]
    r_max = r_max_px or (m // 2 - 1)
    work = work.rechunk({1: -1, 2: -1})
    chunks = work.chunks[0]
    params = init[:, :3].rechunk((chunks, 3))
    weights = weights.rechunk((chunks,))
    candidates = candidates.rechunk((chunks, -1))

    def reference_of(p):
        sums = da.blockwise(_sum_block, "ps", work, "pyx", p, "pc", weights, "p", new_axes={"s": m * m + 1},
                            concatenate=True, dtype=np.float64, meta=np.empty((0, 0), np.float64))
        total = sums.sum(axis=0, split_every=split_every)
        return da.map_blocks(_centre_block, total.rechunk(-1), m, expected_diameter_px, dtype=np.float32,
                             drop_axis=0, new_axis=[0, 1], chunks=((m,), (m,)), meta=np.empty((0, 0), np.float32))

    ref = reference_of(params)
    res = None
    for w in windows_deg:
        res = da.blockwise(_align_block, "pk", work, "pyx", params, "pc", candidates, "pd", ref, "ab",
                           new_axes={"k": 4}, concatenate=True, dtype=np.float64, meta=np.empty((0, 0), np.float64),
                           window_deg=w,
                           max_shift_px=max_shift_px, r_max_px=r_max)
        params = res[:, :3]
        ref = reference_of(params)
    if res is None:
        res = da.concatenate([params, da.zeros((params.shape[0], 1), chunks=(chunks, 1))], axis=1)
    return res, ref


def _apply_block(img: np.ndarray, p: np.ndarray, scale: float) -> np.ndarray:
    x = torch.as_tensor(np.array(img, np.float32))
    if x.shape[0] == 0:
        return x.numpy()
    p = np.asarray(p, np.float64).reshape(len(p), -1)
    th = torch.deg2rad(torch.as_tensor(p[:, 0], dtype=torch.float32))
    c = torch.as_tensor(p[:, 1:3] * scale, dtype=torch.float32)
    return warp(x, rotation(th), c).numpy()


def apply_graph(images: da.Array, params: da.Array, scale: float = 1.0) -> da.Array:
    """Lazy aligned images: each particle (n, N, N) rotated and shifted by its (theta_deg,
    x, y) in ``params`` (n, ≥3), centres given in px of a box ``scale`` times smaller (bilinear)."""
    params = params[:, :3].rechunk((images.chunks[0], 3))
    return da.map_blocks(_apply_block, images, params[:, :, None], scale, dtype=np.float32,
                         chunks=images.chunks, meta=np.empty((0, 0, 0), np.float32))


# ------------------------------------------------------------------------------------- driver
def masks_and_selection(images: da.Array, pixel_size: float, *, defocus: np.ndarray | None = None,
                        optics: dict | None = None, view: str = "auto", diameter_A: float | None = None,
                        work_box: int = 64, thresholds: SelectionThresholds | None = None):
    """Compute the perfect-mask features of a lazy stack (n, N, N) and select particles.

    Returns (features (n, len(FEATURES)), selected (n,) bool, reasons (n,) int, info dict)."""
    box = images.shape[-1]
    diameter_A = diameter_A or 0.6 * box * pixel_size
    feats = features_graph(images, pixel_size, defocus=defocus, view=view, work_box=work_box, diameter_A=diameter_A,
                           **(optics or {})).compute()
    selected, reasons, info = select_particles(feats, thresholds or SelectionThresholds())
    return feats, selected, reasons, info


def side_alignment_graph(images: da.Array, features: np.ndarray, selected: np.ndarray, pixel_size: float, *,
                         defocus: np.ndarray | None = None, optics: dict | None = None,
                         variant: str | Variant = DEFAULT_VARIANT, diameter_A: float | None = None,
                         work_box: int = 64, square_ratio: float = 1.25) -> tuple[da.Array, dict]:
    """Lazy side-view alignment of a stack (n, N, N) given its features and selection.

    Side views (found, not top) are registered (:func:`register_graph`) and, for refining
    variants, refined against a running reference built from the selected side views
    (:func:`refine_graph`). Returns (lazy (n, 4): theta_deg, x, y (working px), score — zeros
    for particles that are not side views —, info: working box, scale, reference size, the
    lazy reference)."""
    v = VARIANTS[variant] if isinstance(variant, str) else variant
    n, box = images.shape[0], images.shape[-1]
    m = work_box_for(box, work_box)
    scale = box / m
    diameter_A = diameter_A or 0.6 * box * pixel_size
    f = np.asarray(features)
    side = (f[:, _F["found"]] > 0) & (f[:, _F["is_top"]] == 0)
    chunks = images.chunks[0]
    info = {"work_box": m, "scale": scale, "reference": None}
    if not side.any():
        return da.zeros((n, 4), chunks=(chunks, 4)), info
    pool = side & selected if (side & selected).any() else side
    ref_len, ref_wid = float(np.median(f[pool, _F["length"]])), float(np.median(f[pool, _F["width"]]))
    info.update(reference_length_px=ref_len, reference_width_px=ref_wid)
    fd = da.from_array(np.where(side[:, None], f, 0.0), chunks=(chunks, -1))
    reg = register_graph(fd, ref_len, ref_wid, m, scale, v)
    if not v.refine:
        res = da.concatenate([reg[:, :3], -reg[:, 7:8]], axis=1)
    else:
        align_lp = max(diameter_A / 8.0, 2.5 * pixel_size * scale)
        dfc = None if defocus is None else da.from_array(np.asarray(defocus, np.float64), chunks=(chunks, 3))
        work = _work_graph(images, pixel_size, m, align_lp, dfc, optics or {})
        w = da.from_array((pool & selected if (pool & selected).any() else pool).astype(np.float64), chunks=(chunks,))
        cand = da.from_array(_symmetry_candidates(f, square_ratio), chunks=(chunks, -1))
        diam = ref_len / scale
        res, ref = refine_graph(work, reg[:, :3], w, cand, max_shift_px=max(2.0, 0.08 * diam),
                                r_max_px=min(m // 2 - 1, 0.5 * math.hypot(ref_len, ref_wid) / scale + 2),
                                expected_diameter_px=diam)
        info["reference"] = ref
    res = da.where(da.from_array(side, chunks=(chunks,))[:, None], res, 0.0)
    return res, info


def align2d_star(star_in: str | Path, out_dir: str | Path, *, view: str = "auto", variant: str = DEFAULT_VARIANT,
                 diameter_A: float | None = None, work_box: int = 64, chunk: int | None = None,
                 thresholds: SelectionThresholds | None = None) -> dict:
    """``cryodask align2d``: masks, selection and 2D alignment of a RELION particle STAR.

    ``view``: 'side', 'top' or 'auto' (per particle); ``diameter_A``: the particle's largest
    dimension in Å (default 60 % of the box; sets the working filters and the Hough radii).
    Writes into ``out_dir``: ``particles_aligned.star`` (RELION 3.1; every particle, with
    ``rlnAnglePsi`` (deg) and ``rlnOriginXAngst/YAngst`` (Å) in RELION's convention — for
    side views the estimated in-plane angle and centre, for top views psi 0 and the disc
    centre — ``cdViewClass``, ``cdSelected`` (1/0), ``cdRejectReason``, ``cdAlignScore`` and
    the perfect-mask columns of :func:`cryodask.select.selection_columns`; input
    rlnAngleRot/Tilt and priors are dropped, a 2D alignment does not determine them), the
    zarr store ``particles.zarr`` group ``align2d`` with ``aligned`` (the original particles
    rotated and centred), ``aligned_preprocessed`` (the phase-flipped, low-passed particles,
    same transform), ``localized`` (aligned, background outside the perfect mask set to 0),
    ``mask`` (the perfect masks, aligned), ``reference`` (side-view average, working box);
    ``align2d_gallery.png`` (accepted and rejected particles with their masks) and
    ``align2d_summary.json``. Returns the summary.
    """
    import xarray as xr

    from .io.star import write_particles
    from .model import write_group

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ds, images, apix, defocus, optics = star_inputs(star_in, chunk)
    star_in = ds.attrs.get("source", star_in) if not isinstance(star_in, (str, Path)) else star_in
    n, box = images.shape[0], images.shape[-1]
    diameter_A = diameter_A or 0.6 * box * apix
    feats, selected, reasons, sel_info = masks_and_selection(images, apix, defocus=defocus, optics=optics, view=view,
                                                             diameter_A=diameter_A, work_box=work_box,
                                                             thresholds=thresholds)
    found = feats[:, _F["found"]] > 0
    top = found & (feats[:, _F["is_top"]] > 0)
    t_masks = time.perf_counter() - t0
    # the gallery needs only the masks and the selection: the driver draws it while the workers
    # align, instead of leaving them idle at the end
    from concurrent.futures import ThreadPoolExecutor

    side_pool = ThreadPoolExecutor(1, thread_name_prefix="cryodask-align2d-outputs")
    gallery = side_pool.submit(write_gallery, out / "align2d_gallery.png", ds, feats, selected, reasons, images=images)
    res, info = side_alignment_graph(images, feats, selected, apix, defocus=defocus, optics=optics, variant=variant,
                                     diameter_A=diameter_A, work_box=work_box)
    m, scale = info["work_box"], info["scale"]
    ref = info.pop("reference")
    res, ref = dask.compute(res, ref)
    theta, centres, score = res[:, 0], res[:, 1:3] * scale, res[:, 3]  # centres in px of the box
    centres[top] = feats[top][:, [_F["disc_x"], _F["disc_y"]]]
    theta[top] = 0.0
    t_align = time.perf_counter() - t0 - t_masks

    chunks = images.chunks[0]
    params = da.from_array(np.concatenate([theta[:, None], centres], 1), chunks=(chunks, 3))
    aligned = apply_graph(images, params)
    align_lp = max(diameter_A / 8.0, 2.5 * apix * scale)
    dfc = None if defocus is None else da.from_array(defocus, chunks=(chunks, 3))
    aligned_pre = apply_graph(_work_graph(images, apix, box, align_lp, dfc, optics), params)
    # the masks are rendered per chunk on the workers from the (small) feature table, never on
    # the driver: n·box² floats would be shipped inside the graph
    masks = masks_graph(da.from_array(feats, chunks=(chunks, -1)), box).astype(np.float32)
    amask = apply_graph(masks, params) > 0.5  # upright rectangles / centred discs
    data = {"aligned": (("particle", "y", "x"), aligned),
            "aligned_preprocessed": (("particle", "y", "x"), aligned_pre),
            "localized": (("particle", "y", "x"), aligned * amask),
            "mask": (("particle", "y", "x"), amask.astype(np.uint8)),
            "cdSelected": (("particle",), selected.astype(np.int8))}
    if ref is not None:
        data["reference"] = (("wy", "wx"), np.asarray(ref, np.float32))
    store = xr.Dataset(data, attrs={"pixel_size": apix, "stage": "align2d", "variant": str(variant),
                                    "source": str(star_in), "view": view})

    def tables():
        rel = relion_parameters(theta, centres, apix)
        drop = [v for v in ("rlnAngleRot", "rlnAngleTilt", "rlnAngleRotPrior", "rlnAngleTiltPrior",
                            "rlnAnglePsiPrior") if v in ds]
        out_ds = ds.drop_vars(drop)
        out_ds.attrs["star_particle_columns"] = [c for c in ds.attrs.get("star_particle_columns", [])
                                                 if c not in drop]
        for k, val in {**rel, **selection_columns(feats, selected, reasons), "cdAlignScore": score}.items():
            out_ds[k] = ("particle", np.asarray(val))
        write_particles(out / "particles_aligned.star", out_ds)

    # the STAR file needs only the parameters: the driver writes it while the workers write the
    # aligned stacks
    with side_pool:
        table = side_pool.submit(tables)
        write_group(store, out / "particles.zarr", "align2d")
        table.result()
        gallery.result()
    summary = {
        "n_particles": int(n), "n_selected": int(selected.sum()), "n_side": int((found & ~top).sum()),
        "n_top": int(top.sum()), "n_no_mask": int((~found).sum()),
        "rejected_by_reason": {name: int(np.count_nonzero(reasons & bit)) for bit, name in REASONS.items()},
        "variant": str(variant), "view": view, "pixel_size": apix, "box": box, "work_box": m,
        "seconds_masks": round(t_masks, 2), "seconds_align": round(t_align, 2),
        "seconds_total": round(time.perf_counter() - t0, 2), **info, "selection": sel_info,
    }
    (out / "align2d_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _work_block(block, d=None, *, pixel_size, m, lowpass_A, optics):
    d = None if d is None else np.asarray(d).reshape(len(block), 3)
    return preprocess_particles(block, pixel_size, work_box=m, lowpass_A=lowpass_A, defocus=d, **optics)


def _work_graph(images: da.Array, apix: float, m: int, lowpass_A: float, defocus: da.Array | None,
                optics: dict) -> da.Array:
    """Lazy preprocessed images (n, m, m): phase flip, low-pass ``lowpass_A`` Å, crop to m."""
    kw = dict(pixel_size=apix, m=m, lowpass_A=lowpass_A, optics=dict(optics))
    chunks = (images.chunks[0], (m,), (m,))
    meta = np.empty((0, 0, 0), np.float32)
    if defocus is None:
        return da.map_blocks(_work_block, images, dtype=np.float32, chunks=chunks, meta=meta, **kw)
    return da.map_blocks(_work_block, images, defocus.rechunk((images.chunks[0], 3))[:, :, None], dtype=np.float32,
                         chunks=chunks, meta=meta, **kw)
