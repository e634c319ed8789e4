"""Component 1 — micrograph preprocessing: make particles stand out before picking.

Every step is a pure kernel: a 2-D ``float32`` numpy image in, a 2-D ``float32`` image out,
no I/O and no state. :func:`preprocess_micrograph` chains them (configurable, defaults that
work on real data), and :func:`preprocess_graph` maps the chain over a Dask array of
micrographs, one chunk per micrograph.

Conventions
- Images are ``(y, x)`` = (row, column) arrays. Protein is *dark* (the usual cryo-EM contrast at
  defocus); no step inverts contrast.
- Sizes given to the chain are physical: ``pixel_size`` in Å/px of the input micrograph and the
  particle's outer ``diameter`` in Å. Every window, radius and tile size is derived from the
  particle diameter *in pixels of the image the step sees*, so the same defaults serve any
  dataset.
- The optional ``downsample`` step shrinks the micrograph so that the particle diameter becomes
  ``target_diameter_px`` pixels (see :func:`picking_binning`); pickers map their coordinates
  back to the original micrograph with the same factor.

The steps (names usable in ``steps=``):

``normalise``       robust z-score (median 0, MAD-based σ 1): removes the arbitrary grey scale
                    of the input (counts, display units...).
``downsample``      area-average to the picking scale (particle ≈ ``target_diameter_px`` px):
                    speeds everything up and averages away shot noise.
``flatten``         subtract a very wide Gaussian background (σ = 2·diameter): removes ice
                    thickness gradients so one intensity model fits the whole micrograph.
``contrast``        contrast-enhancement correction: clip to the [0.5, 99.5] percentiles and
                    stretch linearly to [0, 1] (outliers such as hot pixels or ice crystals no
                    longer compress the particles' contrast).
``histeq``          global histogram equalisation (scikit-image), result in [0, 1].
``wiener``          adaptive (local) Wiener restoration: noise-variance-weighted shrinkage of
                    each pixel towards its local mean (window ≈ diameter/8).
``clahe``           contrast-limited adaptive histogram equalisation (OpenCV) with tiles a few
                    particle diameters wide: equalises contrast locally.
``guided``          self-guided edge-preserving smoothing (He et al. guided filter, box
                    filters): smooths noise inside particles and background, keeps edges.
``morph``           grey-level morphological opening then closing with a small disk: removes
                    bright and dark specks smaller than the particle's wall.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import dask.array as da
import numpy as np
from skimage import exposure

__all__ = [
    "DEFAULT_STEPS",
    "TARGET_DIAMETER_PX",
    "picking_binning",
    "downsampled_shape",
    "normalise",
    "downsample",
    "flatten_background",
    "contrast_correction",
    "histogram_equalisation",
    "wiener_restoration",
    "clahe",
    "box_filter",
    "guided_filter",
    "morphological_open_close",
    "preprocess_micrograph",
    "preprocess_graph",
    "STEPS",
]

#: Particle diameter, in pixels, at the picking scale.
TARGET_DIAMETER_PX = 32.0

#: Default preprocessing chain (names of :data:`STEPS`).
#: ``histeq`` and ``clahe`` are available but not in the default chain: both remap grey levels
#: locally or non-linearly, at odds with the single global intensity model that the IBC picker
#: fits, and ``flatten`` already removes uneven illumination. (Measured on the five labelled
#: EMPIAR-10146 micrographs, IBC picker F1 by shared/checks/pick_f1.py: 0.952 without, 0.948
#: with CLAHE.)
DEFAULT_STEPS: tuple[str, ...] = (
    "normalise",
    "downsample",
    "flatten",
    "wiener",
    "contrast",
    "guided",
    "morph",
)


def _f32(img) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    return np.ascontiguousarray(img, dtype=np.float32)


def picking_binning(pixel_size: float, diameter: float, target_diameter_px: float = TARGET_DIAMETER_PX) -> float:
    """Downsampling factor (≥ 1) that makes a particle ``target_diameter_px`` pixels wide.

    ``pixel_size`` in Å/px, ``diameter`` (outer particle diameter) in Å. Never upsamples: a
    particle already smaller than the target keeps factor 1.
    """
    if pixel_size <= 0 or diameter <= 0:
        raise ValueError("pixel_size and diameter must be positive")
    return max(1.0, float(diameter) / float(pixel_size) / float(target_diameter_px))


def downsampled_shape(shape: Sequence[int], binning: float) -> tuple[int, int]:
    """Shape ``(ny, nx)`` of an image of ``shape`` downsampled by ``binning`` (rounded, ≥ 1)."""
    return (max(1, int(round(shape[0] / binning))), max(1, int(round(shape[1] / binning))))


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


def normalise(img: np.ndarray) -> np.ndarray:
    """Robust z-score: ``(img − median) / (1.4826 · MAD)``.

    Purpose: put every micrograph on the same grey scale whatever its units (electron counts,
    16-bit display values, ...). The median/MAD ignore saturated pixels and contamination.
    Falls back to the standard deviation when the MAD is 0 (e.g. a mostly constant image).
    """
    img = _f32(img)
    step = max(1, int(np.sqrt(img.size / 1e6)))  # statistics from ≤ ~1 M pixels: same to < 0.5 %
    sub = img[::step, ::step]
    med = np.median(sub)
    mad = 1.4826 * np.median(np.abs(sub - med))
    if not np.isfinite(mad) or mad <= 0:
        mad = float(img.std()) or 1.0
    out = img - med  # float32 (a new array: the input is never modified)
    out /= mad
    return out


def downsample(img: np.ndarray, binning: float) -> np.ndarray:
    """Area-average ``img`` by the (possibly non-integer) factor ``binning`` ≥ 1.

    Output shape :func:`downsampled_shape`. Pixel ``(i, j)`` of the output covers input pixels
    ``[i·sy, (i+1)·sy)`` with ``sy = ny_in / ny_out`` (likewise for x), so an output pixel
    centre ``u`` maps back to input ``(u + 0.5)·s − 0.5``.
    """
    img = _f32(img)
    if binning <= 1.0:
        return img
    ny, nx = downsampled_shape(img.shape, binning)
    return np.asarray(cv2.resize(img, (nx, ny), interpolation=cv2.INTER_AREA), dtype=np.float32)


def flatten_background(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Subtract a wide Gaussian-smoothed background (σ = ``sigma_px`` px).

    Purpose: remove slow variations (ice thickness, uneven illumination) far wider than a
    particle so a single intensity model fits the whole micrograph.
    """
    img = _f32(img)
    bg = cv2.GaussianBlur(img, (0, 0), sigmaX=float(sigma_px), borderType=cv2.BORDER_REFLECT)
    return np.subtract(img, bg, out=bg)


def contrast_correction(img: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Contrast-enhancement correction: clip to percentiles, stretch linearly to [0, 1].

    Purpose: a few extreme pixels (hot pixels, ice crystals, carbon edges) otherwise squeeze
    the particles into a narrow part of the grey range.
    """
    img = _f32(img)
    lo, hi = np.percentile(img, [low_pct, high_pct])
    if hi <= lo:
        return np.zeros_like(img)
    out = img - lo  # float64: np.percentile's lo, hi are float64
    out /= hi - lo
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32)


def histogram_equalisation(img: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Global histogram equalisation (scikit-image); output in [0, 1].

    Purpose: spread the grey levels uniformly so that the particle/background intensity
    classes are separated as far as the ordering allows.
    """
    img = _f32(img)
    return exposure.equalize_hist(img, nbins=nbins).astype(np.float32)


def box_filter(img: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a ``(2r+1) × (2r+1)`` window (reflecting borders)."""
    k = 2 * int(radius) + 1
    return cv2.boxFilter(_f32(img), -1, (k, k), normalize=True, borderType=cv2.BORDER_REFLECT)


def wiener_restoration(img: np.ndarray, radius: int = 2, noise: float | None = None) -> np.ndarray:
    """Adaptive local Wiener restoration over a ``(2r+1)²`` window.

    ``out = μ + max(σ² − ν, 0) / max(σ², ν) · (img − μ)`` with local mean μ and variance σ²,
    and noise power ν (default: the mean local variance). Purpose: suppress noise in flat
    regions while keeping strong local structure (particle edges).
    """
    img = _f32(img)
    mu = box_filter(img, radius)
    var = box_filter(img * img, radius)
    var -= mu * mu
    np.maximum(var, 0.0, out=var)
    nu = float(var.mean()) if noise is None else float(noise)
    gain = var - nu
    np.maximum(gain, 0.0, out=gain)
    gain /= np.maximum(var, max(nu, 1e-12), out=var)
    out = img - mu
    out *= gain
    out += mu
    return out


def clahe(img: np.ndarray, tile_px: float = 128.0, clip_limit: float = 2.0) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV); input and output in [0, 1].

    ``tile_px`` is the approximate tile width in pixels (the chain uses 4 particle diameters);
    ``clip_limit`` is OpenCV's clip limit (contrast amplification cap). Purpose: equalise
    contrast locally so particles in thin and thick ice look alike.
    """
    img = _f32(img)
    ny, nx = img.shape
    tiles = (max(1, int(round(nx / tile_px))), max(1, int(round(ny / tile_px))))
    u16 = np.clip(np.rint(np.clip(img, 0.0, 1.0) * 65535.0), 0, 65535).astype(np.uint16)
    eq = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=tiles).apply(u16)
    return (eq.astype(np.float32) / 65535.0).astype(np.float32)


def guided_filter(img: np.ndarray, radius: int = 2, eps: float = 1e-2, guide: np.ndarray | None = None) -> np.ndarray:
    """Guided filter (He, Sun & Tang 2013), here self-guided by default.

    Locally ``q = a·I + b`` in every ``(2r+1)²`` window with
    ``a = cov(I, p) / (var(I) + eps)``, ``b = mean(p) − a·mean(I)``, then ``a, b`` are averaged
    over the windows covering each pixel. ``eps`` is in squared image units (the chain's image
    is in [0, 1]). Purpose: edge-preserving smoothing — flat where variance ≪ eps, untouched
    at edges where variance ≫ eps.
    """
    p = _f32(img)
    guide_img = p if guide is None else _f32(guide)
    mean_i = box_filter(guide_img, radius)
    var_i = box_filter(guide_img * guide_img, radius)
    var_i -= mean_i * mean_i
    if guide is None:  # self-guided: mean_p = mean_i and cov_ip = var_i (the same values)
        mean_p, cov_ip = mean_i, var_i
    else:
        mean_p = box_filter(p, radius)
        cov_ip = box_filter(guide_img * p, radius)
        cov_ip -= mean_i * mean_p
    a = var_i + eps
    np.divide(cov_ip, a, out=a)
    del var_i, cov_ip
    b = a * mean_i
    np.subtract(mean_p, b, out=b)
    del mean_i, mean_p
    out = box_filter(a, radius)
    out *= guide_img
    out += box_filter(b, radius)
    return out


def _disk(radius: int) -> np.ndarray:
    r = max(0, int(radius))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def morphological_open_close(img: np.ndarray, radius: int = 1) -> np.ndarray:
    """Grey-level opening then closing with a disk of ``radius`` px.

    Purpose: opening removes bright specks, closing fills dark specks, both smaller than the
    disk; structures wider than the disk (particle walls) are kept.
    """
    img = _f32(img)
    if radius < 1:
        return img
    k = _disk(radius)
    out = cv2.morphologyEx(img, cv2.MORPH_OPEN, k, borderType=cv2.BORDER_REFLECT)
    return cv2.morphologyEx(out, cv2.MORPH_CLOSE, k, borderType=cv2.BORDER_REFLECT)


# --------------------------------------------------------------------------------------------
# chain
# --------------------------------------------------------------------------------------------


def _step_normalise(img, d_px, p):
    return normalise(img)


def _step_downsample(img, d_px, p):
    return downsample(img, p["binning"])


def _step_flatten(img, d_px, p):
    return flatten_background(img, p.get("flatten_sigma", 2.0) * d_px)


def _step_contrast(img, d_px, p):
    return contrast_correction(img, p.get("low_pct", 0.5), p.get("high_pct", 99.5))


def _step_histeq(img, d_px, p):
    return histogram_equalisation(img)


def _step_wiener(img, d_px, p):
    return wiener_restoration(img, max(1, int(round(p.get("wiener_radius", d_px / 16.0)))))


def _step_clahe(img, d_px, p):
    if img.min() < 0 or img.max() > 1:
        img = contrast_correction(img)
    return clahe(img, p.get("clahe_tile", 4.0) * d_px, p.get("clahe_clip", 2.0))


def _step_guided(img, d_px, p):
    return guided_filter(img, max(1, int(round(p.get("guided_radius", d_px / 16.0)))), p.get("guided_eps", 1e-2))


def _step_morph(img, d_px, p):
    return morphological_open_close(img, int(round(p.get("morph_radius", d_px / 32.0))))


#: name → ``f(img, diameter_px_at_this_scale, params) -> img``
STEPS: dict[str, Callable] = {
    "normalise": _step_normalise,
    "downsample": _step_downsample,
    "flatten": _step_flatten,
    "contrast": _step_contrast,
    "histeq": _step_histeq,
    "wiener": _step_wiener,
    "clahe": _step_clahe,
    "guided": _step_guided,
    "morph": _step_morph,
}


def preprocess_micrograph(
    img: np.ndarray,
    pixel_size: float,
    diameter: float,
    steps: Sequence[str] = DEFAULT_STEPS,
    **params,
) -> np.ndarray:
    """Run the preprocessing chain on one micrograph.

    Parameters
    ----------
    img : (ny, nx) array, any real dtype — one micrograph (protein dark).
    pixel_size : Å/px of ``img``.
    diameter : particle outer diameter in Å.
    steps : names from :data:`STEPS`, applied in order.
    params : optional overrides — ``binning`` (downsampling factor, default
        :func:`picking_binning`), ``target_diameter_px``, ``flatten_sigma`` (× diameter),
        ``low_pct``/``high_pct``, ``wiener_radius``/``guided_radius``/``morph_radius`` (px at the
        current scale), ``clahe_tile`` (× diameter), ``clahe_clip``, ``guided_eps``.

    Returns
    -------
    (ny', nx') float32 image; ``(ny', nx') = downsampled_shape((ny, nx), binning)`` when the
    chain contains ``downsample``, else ``(ny, nx)``. Values in [0, 1] after ``contrast``,
    ``histeq`` or ``clahe``.
    """
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ValueError(f"unknown preprocessing step(s) {unknown}; choose from {sorted(STEPS)}")
    p = dict(params)
    p.setdefault("binning", picking_binning(pixel_size, diameter, p.get("target_diameter_px", TARGET_DIAMETER_PX)))
    out = _f32(img)
    d_px = float(diameter) / float(pixel_size)
    for s in steps:
        before = out.shape
        out = STEPS[s](out, d_px, p)
        if out.shape != before:  # rescaled: keep the diameter in pixels of the current image
            d_px *= float(np.mean(np.divide(out.shape, before)))
    return np.ascontiguousarray(out, dtype=np.float32)


def preprocess_graph(
    micrographs: da.Array,
    pixel_size: float,
    diameter: float,
    steps: Sequence[str] = DEFAULT_STEPS,
    **params,
) -> da.Array:
    """Lazy preprocessing of a stack of micrographs.

    ``micrographs``: dask array ``(n, ny, nx)``; rechunked to one micrograph per chunk
    ``(1, ny, nx)`` if needed. Returns a dask array ``(n, ny', nx')`` float32, one chunk per
    micrograph, where ``(ny', nx')`` is the output shape of :func:`preprocess_micrograph`.
    Nothing is computed.
    """
    if micrographs.ndim != 3:
        raise ValueError(f"expected (n, ny, nx) micrographs, got {micrographs.shape}")
    n, ny, nx = micrographs.shape
    if micrographs.chunks[1] != (ny,) or micrographs.chunks[2] != (nx,) or any(c != 1 for c in micrographs.chunks[0]):
        micrographs = micrographs.rechunk((1, ny, nx))
    p = dict(params)
    p.setdefault("binning", picking_binning(pixel_size, diameter, p.get("target_diameter_px", TARGET_DIAMETER_PX)))
    oy, ox = downsampled_shape((ny, nx), p["binning"]) if ("downsample" in steps and p["binning"] > 1) else (ny, nx)
    steps = tuple(steps)

    def _block(b):
        return preprocess_micrograph(b[0], pixel_size, diameter, steps, **p)[None]

    return micrographs.map_blocks(
        _block, dtype=np.float32, chunks=((1,) * n, (oy,), (ox,)), token="preprocess"
    )
