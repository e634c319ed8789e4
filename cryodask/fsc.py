"""Fourier shell correlation: half-map validation, map-vs-reference comparison, resolution.

Shell binning and crossings are those of ``../shared/checks/fsc.py`` (the acceptance check):
full 3D FFT of each (N, N, N) map, shell index ``round(|k|)`` in voxels of the Fourier grid
(``N//2 + 1`` shells, 0 … N//2; corner voxels beyond are ignored), and the resolution at a
threshold is where the curve first falls below it, interpolated linearly between the two shells
around the crossing, ``N · pixel_size / shell`` in Å (Nyquist when it never falls below).

Masked FSC follows RELION's practice (Chen et al. 2013): a soft spherical mask (cosine edge)
raises the FSC by removing solvent noise but can also create correlation by itself; that part is
measured by phase-randomising both maps beyond the resolution where the unmasked FSC falls below
0.8 and removed: ``FSC_true = (FSC_masked − FSC_randomised) / (1 − FSC_randomised)``.

Kernels take numpy arrays (N, N, N) (any float dtype; computed in float64), pixel sizes in Å.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = [
    "soft_sphere",
    "shell_index",
    "fsc_curve",
    "crossing",
    "resolution",
    "shell_resolutions",
    "phase_randomise",
    "masked_fsc",
    "fsc_report",
    "write_fsc_csv",
    "write_fsc_png",
    "align_to_reference",
]


def soft_sphere(n: int, radius: float, edge: float = 5.0) -> np.ndarray:
    """Spherical mask (N, N, N): 1 inside ``radius`` px of the centre (index N//2), a raised-cosine
    fall to 0 over ``edge`` px; the same mask as the acceptance check's ``--mask-radius``."""
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    m = np.clip((radius + edge - r) / edge, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * m)


def shell_index(n: int) -> np.ndarray:
    """Shell of every voxel of a centred (fftshifted) N³ transform: ``round(|k|)``, int (N, N, N)."""
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    return np.round(r).astype(int)


def fsc_curve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC between two cubic maps of the same shape, one value per shell 0 … N//2 (float64)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"maps must be cubic and the same shape: {a.shape} vs {b.shape}")
    n = a.shape[0]
    fa, fb = np.fft.fftshift(np.fft.fftn(a)), np.fft.fftshift(np.fft.fftn(b))
    shell = shell_index(n).ravel()
    nshell = n // 2 + 1
    keep = shell < nshell
    shell = shell[keep]
    fa, fb = fa.ravel()[keep], fb.ravel()[keep]
    num = np.bincount(shell, (fa * np.conj(fb)).real, nshell)
    da = np.bincount(shell, np.abs(fa) ** 2, nshell)
    db = np.bincount(shell, np.abs(fb) ** 2, nshell)
    return num / np.sqrt(np.maximum(da * db, 1e-30))


def crossing(curve: np.ndarray, threshold: float, n: int, pixel_size: float) -> float:
    """Resolution (Å) where ``curve`` first falls below ``threshold`` (linear interpolation
    between shells); Nyquist (2 × pixel size) when it never does."""
    for i in range(1, len(curve)):
        if curve[i] < threshold:
            f0, f1 = curve[i - 1], curve[i]
            s = (i - 1) + (f0 - threshold) / (f0 - f1) if f0 != f1 else i
            return n * pixel_size / max(s, 1e-9)
    return 2 * pixel_size


def resolution(curve: np.ndarray, pixel_size: float, n: int | None = None) -> dict[str, float]:
    """``{"fsc0.5": Å, "fsc0.143": Å}`` for a curve of ``n//2 + 1`` shells."""
    n = n if n is not None else 2 * (len(curve) - 1)
    return {"fsc0.5": crossing(curve, 0.5, n, pixel_size), "fsc0.143": crossing(curve, 0.143, n, pixel_size)}


def shell_resolutions(n: int, pixel_size: float) -> np.ndarray:
    """Resolution (Å) of each shell 0 … N//2 (``inf`` for shell 0)."""
    s = np.arange(n // 2 + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(s > 0, n * pixel_size / np.maximum(s, 1e-30), np.inf)


def phase_randomise(volume: np.ndarray, from_shell: int, rng: np.random.Generator) -> np.ndarray:
    """The map with the phases of all shells ≥ ``from_shell`` replaced by random ones (Hermitian,
    so the result stays real); amplitudes unchanged."""
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    f = np.fft.rfftn(v)
    kz = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    r = np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)
    sel = np.round(r) >= from_shell
    # random phases of a real white-noise volume are Hermitian-consistent in rfft layout
    noise_phase = np.angle(np.fft.rfftn(rng.standard_normal(v.shape)))
    f = np.where(sel, np.abs(f) * np.exp(1j * noise_phase), f)
    return np.fft.irfftn(f, s=v.shape, axes=(0, 1, 2))


def masked_fsc(a: np.ndarray, b: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None,
               randomise_at: float = 0.8) -> dict[str, np.ndarray]:
    """Unmasked, masked, phase-randomised-masked and corrected FSC curves (RELION practice).

    Phases are randomised from the first shell where the unmasked FSC falls below
    ``randomise_at``. Returns dict with ``unmasked``, ``masked``, ``randomised``, ``corrected``
    (each n//2+1 shells) and ``randomise_from`` (shell).
    """
    rng = rng or np.random.default_rng(0)
    unmasked = fsc_curve(a, b)
    masked = fsc_curve(a * mask, b * mask)
    below = np.nonzero(unmasked[1:] < randomise_at)[0]
    start = int(below[0] + 1) if below.size else len(unmasked)
    if start < len(unmasked):
        ra = phase_randomise(a, start, rng)
        rb = phase_randomise(b, start, rng)
        rand = fsc_curve(ra * mask, rb * mask)
        corrected = masked.copy()
        hi = np.arange(len(masked)) >= start
        corrected[hi] = (masked[hi] - rand[hi]) / np.maximum(1.0 - rand[hi], 1e-9)
    else:
        rand = np.zeros_like(masked)
        corrected = masked.copy()
    return {"unmasked": unmasked, "masked": masked, "randomised": rand, "corrected": corrected,
            "randomise_from": np.int64(start)}


def fsc_report(a: np.ndarray, b: np.ndarray, pixel_size: float, mask_radius: float | None = None,
               rng: np.random.Generator | None = None) -> dict:
    """FSC between two maps with resolutions: ``curve``, ``fsc0.5``, ``fsc0.143`` (Å); with
    ``mask_radius`` (px) also the phase-randomisation-corrected masked curve and its crossings
    (``masked_curve``, ``masked_fsc0.5``, ``masked_fsc0.143``)."""
    n = a.shape[0]
    curve = fsc_curve(a, b)
    out = {"curve": curve, **resolution(curve, pixel_size, n)}
    if mask_radius:
        m = masked_fsc(a, b, soft_sphere(n, mask_radius), rng)
        out["masked_curve"] = m["corrected"]
        out.update({f"masked_{k}": v for k, v in resolution(m["corrected"], pixel_size, n).items()})
    return out


def write_fsc_csv(path: str | Path, curves: dict[str, np.ndarray], n: int, pixel_size: float) -> None:
    """CSV with columns ``shell,resolution_A`` and one column per named curve (same shells)."""
    res = shell_resolutions(n, pixel_size)
    names = list(curves)
    with open(path, "w") as f:
        f.write(",".join(["shell", "resolution_A", *names]) + "\n")
        for i in range(n // 2 + 1):
            vals = [f"{curves[k][i]:.5f}" for k in names]
            f.write(",".join([str(i), f"{res[i]:.3f}" if i else "inf", *vals]) + "\n")


_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def write_fsc_png(path: str | Path, curves: dict[str, np.ndarray], n: int, pixel_size: float,
                  title: str = "") -> None:
    """Plot FSC curves against spatial frequency (1/Å; resolution in Å on the top axis) with the
    0.5 and 0.143 thresholds, as a PNG (drawn with Pillow: no plotting library to import)."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = 640, 430
    left, right, top, bottom = 62, 18, 62, 52
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font, small, has_angstrom = _font(12), _font(11), _font(12) is not None
    if not has_angstrom:  # Pillow's own font lacks Å
        font, small = ImageFont.load_default(size=12), ImageFont.load_default(size=11)
    fmax = (n // 2) / (n * pixel_size)
    ylo, yhi = -0.1, 1.05

    def px(f, v):
        return (left + (w - left - right) * f / fmax, top + (h - top - bottom) * (yhi - v) / (yhi - ylo))

    def text(xy, s, anchor, fnt=font, fill="black"):
        d.text(xy, s if has_angstrom else s.replace("Å", "A"), fill=fill, font=fnt, anchor=anchor)

    x0, y0 = px(0, yhi)
    x1, y1 = px(fmax, ylo)
    for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):  # y grid and ticks
        _, yy = px(0, v)
        d.line([(x0, yy), (x1, yy)], fill=(232, 232, 232) if v else (190, 190, 190))
        d.line([(x0 - 4, yy), (x0, yy)], fill="black")
        text((x0 - 7, yy), f"{v:.1f}", "rm")
    step = _nice_step(fmax / 5)
    for f in np.arange(0, fmax + 1e-12, step):  # bottom ticks: spatial frequency
        xx, _ = px(f, 0)
        d.line([(xx, y1), (xx, y1 + 4)], fill="black")
        text((xx, y1 + 7), f"{f:.3g}", "mt")
    for r in (100, 50, 30, 20, 15, 12, 10, 8, 6, 5, 4, 3, 2.5, 2, 1.5, 1.2, 1):  # top ticks: resolution
        if fmax / 12 <= 1 / r <= fmax * 1.0001:
            xx, _ = px(1 / r, 0)
            d.line([(xx, y0 - 4), (xx, y0)], fill="black")
            text((xx, y0 - 6), f"{r:g}", "mb", small)
    for thr, dash in ((0.5, 3), (0.143, 8)):  # thresholds, dashed
        _, yy = px(0, thr)
        for xs in np.arange(x0, x1, 2 * dash):
            d.line([(xs, yy), (min(xs + dash, x1), yy)], fill=(120, 120, 120))
        text((x1 - 3, yy - 2), f"{thr}", "rb", small, (110, 110, 110))
    for i, (name, c) in enumerate(curves.items()):
        c = np.asarray(c, dtype=np.float64)
        f = np.arange(len(c)) / (n * pixel_size)
        pts = [px(fi, float(np.clip(ci, ylo, yhi))) for fi, ci in zip(f, c) if np.isfinite(ci)]
        colour = _COLOURS[i % len(_COLOURS)]
        d.line(pts, fill=colour, width=2, joint="curve")
        ly = y1 - 14 - 16 * (len(curves) - 1 - i)  # legend, lower left
        d.line([(x0 + 10, ly), (x0 + 34, ly)], fill=colour, width=2)
        text((x0 + 40, ly), name, "lm")
    d.rectangle([x0, y0, x1, y1], outline="black")
    text(((x0 + x1) / 2, h - 8), "spatial frequency (1/Å)", "md")
    text(((x0 + x1) / 2, y0 - 20), "resolution (Å)", "md", small)
    if title:
        text((w / 2, 6), title, "mt")
    label = Image.new("RGB", (40, 16), "white")
    ImageDraw.Draw(label).text((20, 8), "FSC", fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (8, int((y0 + y1) / 2) - 20))
    img.save(path)


def _font(size: int):
    """DejaVu Sans (system fonts, or the copy shipped inside matplotlib's package data — found
    without importing matplotlib) at ``size`` px; None when neither is there."""
    import importlib.util

    from PIL import ImageFont

    candidates = ["DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"]
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(str(Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"))
    for c in candidates:
        try:
            return ImageFont.truetype(c, size)
        except OSError:
            continue
    return None


def _nice_step(x: float) -> float:
    """1, 2 or 5 × a power of ten, at least ``x``."""
    e = 10 ** np.floor(np.log10(x))
    for m in (1, 2, 5, 10):
        if m * e >= x:
            return float(m * e)
    return float(10 * e)


def align_to_reference(volume: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Translate ``volume`` onto ``reference`` by the peak of their cross-correlation (integer
    voxels; no rotation search). Returns ``(shifted volume, shift (dz, dy, dx) in voxels)``."""
    v = np.asarray(volume, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    cc = np.fft.irfftn(np.fft.rfftn(r) * np.conj(np.fft.rfftn(v)), s=v.shape, axes=(0, 1, 2))
    peak = np.array(np.unravel_index(np.argmax(cc), cc.shape))
    shift = np.where(peak > np.array(v.shape) // 2, peak - np.array(v.shape), peak)
    return np.roll(v, tuple(int(s) for s in shift), axis=(0, 1, 2)), shift
