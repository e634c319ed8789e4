"""CTF estimation: defocus, astigmatism and fit quality of each micrograph from its Thon rings.

What CTFFIND4 and Gctf do, written as pure kernels plus a Dask graph builder:

1. **Power spectrum** (:func:`power_spectrum`): the periodogram of the largest square that is a
   multiple of the output sampling (512 px by default), with a narrow Tukey taper and its plane
   removed, block-averaged onto the output grid (``rfft2`` layout). This has the variance of a
   Welch average of tiles but uses nearly every pixel of the micrograph. The spectrum of a
   micrograph is ``P(k) = N(k) + S(k)·CTF²(k)``: a smooth noise/background term plus the
   particles' (or ice's) signal power modulated by the squared CTF; contrast polarity and the
   scale of the pixel values do not matter.
2. **Model**: ``P(k) ≈ b(|k|) + e(|k|)·CTF²(k; U, V, θ)``, the background ``b`` and the envelope
   ``e`` non-negative cubic B-splines of |k| (few segments, so they cannot follow the rings).
   For given defocus values the model is linear in the spline coefficients, solved by weighted
   non-negative least squares (variable projection); the weights ``1/P̄(|k|)²`` are the inverse
   variance of an averaged periodogram, so each Fourier pixel counts by its information
   whatever the spectrum's decay. The score of a defocus is the weighted χ² reduction over the
   background-only model.
3. **Search**: an exhaustive 1-D search of the mean defocus on the rotational average (in a band
   where rings of the largest defocus searched are still sampled), its best peaks refined on the
   2-D spectrum, then — in the band this defocus allows — a coarse grid over astigmatism and a
   Nelder–Mead refinement of ``(mean, a·cos2θ, a·sin2θ)`` (no singularity at zero astigmatism),
   with a Gaussian restraint on the astigmatism (``expected_astigmatism``) so that noise does
   not fit spurious astigmatism where the rings are weak.
4. **Fit quality**: the figure of merit (``rlnCtfFigureOfMerit``) is the weighted correlation of
   the background-subtracted spectrum with the fitted ``e·CTF²`` over the band; the fit
   resolution (``rlnCtfMaxResolution``) is how far the correlation between the *equiphase*
   average of the spectrum (pixels binned by the fitted CTF phase, so astigmatic rings stay
   sharp) and the fitted CTF², in windows of two ring periods, stays ≥ 0.5.

Identifiability: a fit needs CTF zeros inside the band (see :func:`thon_ring_count`); with
fewer than ~2 zeros below Nyquist (e.g. 10 Å/px at 1–2.5 µm defocus) the defocus cannot be
told from the particles' own form factor, and neither score flags that.

Where the particles' own signal dies out before the first CTF zero (e.g. a ~20 Å map at 5 Å/px:
the rise of the first CTF lobe is then all the spectrum shows, and it trades off against the
unknown signal envelope), the spectrum cannot pin the defocus to better than a few thousand Å;
:func:`refine_defocus_to_reference` measures it instead from the particles against projections of
a reference (as RELION's CtfRefine does), which uses the phase of the signal, not its power.

Units: pixel size in Å/px, defocus in Å (positive = underfocus), the defocus angle in degrees —
the direction of ``DefocusU`` (the larger defocus) from the image x axis, in [-90, 90) — and
resolutions in Å. The CTF is :func:`cryodask.ctf.ctf_2d` (RELION's), without phase plate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.interpolate import BSpline
from scipy.optimize import minimize

from .ctf import ctf_2d, electron_wavelength

__all__ = [
    "CTF_COLUMNS",
    "CTFFit",
    "default_tile_size",
    "power_spectrum",
    "spectrum_correlation",
    "fit_ctf",
    "estimate_ctf",
    "ctf_graph",
    "ctf_table",
    "thon_ring_count",
    "plot_ctf_diagnostic",
    "reference_cross_spectra",
    "refine_defocus_to_reference",
]

CTF_COLUMNS = ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfFigureOfMerit", "rlnCtfMaxResolution")


# ----------------------------------------------------------------------------------------------
# power spectrum


def default_tile_size(shape: tuple[int, int], tile: int = 512) -> int:
    """Sampling of the spectrum (px): ``tile`` (512), halved while larger than the micrograph (≥ 32)."""
    t = int(tile)
    while t > 32 and t > min(shape):
        t //= 2
    return t


def _tile_starts(n: int, t: int, step: int) -> np.ndarray:
    """Start indices of tiles of size ``t`` covering ``0..n`` with at most ``step`` between them."""
    if n <= t:
        return np.array([0])
    k = int(math.ceil((n - t) / step)) + 1
    return np.round(np.linspace(0, n - t, k)).astype(int)


def _bin_matrix(n_fine: int, n_coarse: int, factor: int, half: bool):
    """Sparse (coarse × fine) averaging of Fourier pixels along one axis.

    Fine pixel of signed index ``i`` goes to the coarse pixel nearest ``i / factor`` (half to each
    when it lies exactly between two), so coarse pixel ``j`` is centred on frequency ``j/(t·px)``.
    ``half``: the axis is an ``rfft`` axis (indices 0..n//2) rather than a full ``fft`` axis.
    """
    from scipy.sparse import csr_matrix

    if half:
        fi = np.arange(n_fine // 2 + 1)
        n_in, n_out = n_fine // 2 + 1, n_coarse // 2 + 1
    else:
        fi = np.fft.fftfreq(n_fine, 1.0 / n_fine).astype(np.int64)
        n_in, n_out = n_fine, n_coarse
    pos = fi / factor
    lo = np.floor(pos).astype(np.int64)
    frac = pos - lo
    tie = np.isclose(frac, 0.5)
    tgt = np.where(frac > 0.5, lo + 1, lo)
    rows = np.concatenate([tgt, (lo + 1)[tie]])
    cols = np.concatenate([np.arange(n_in), np.arange(n_in)[tie]])
    vals = np.concatenate([np.where(tie, 0.5, 1.0), np.full(int(tie.sum()), 0.5)])
    rows = rows if half else rows % n_coarse
    keep = rows < n_out
    m = csr_matrix((vals[keep], (rows[keep], cols[keep])), shape=(n_out, n_in))
    cnt = np.asarray(m.sum(axis=1)).ravel()
    return csr_matrix(m.multiply(1.0 / np.maximum(cnt, 1e-12)[:, None]))


def spectrum_correlation(shape: tuple[int, int], tile: int) -> float:
    """Pixels of :func:`power_spectrum`'s output per statistically independent measurement.

    With an even block factor ``f``, fine pixels midway between two coarse ones are shared
    (half each), which lowers each pixel's variance by ``(f − ½)/f`` per axis but correlates it
    with its neighbours; the information is that of the fine pixels.
    """
    f = max(1, min(shape) // int(tile))
    per_axis = f / (f - 0.5) if f % 2 == 0 else 1.0
    return per_axis**2


def _power(b: np.ndarray, device=None) -> np.ndarray:
    """|rfft2(b)|² (float64): scipy's FFT on the CPU, torch's on ``device`` when one is given."""
    if device is None or torch.device(device).type == "cpu":
        import scipy.fft

        z = scipy.fft.rfft2(b, workers=-1)
        return (z.real.astype(np.float64) ** 2 + z.imag.astype(np.float64) ** 2)
    z = torch.fft.rfft2(torch.from_numpy(np.ascontiguousarray(b)).to(device))
    return torch.view_as_real(z).square().sum(-1).double().cpu().numpy()


def power_spectrum(micrograph, tile: int | None = None, taper: float = 0.1, device=None) -> np.ndarray:
    """Power spectrum of a micrograph, sampled on a ``tile × tile`` Fourier grid.

    The periodogram of the largest square ``T = f·tile`` (``f = ⌊min(ny, nx)/tile⌋``) — several
    overlapping squares averaged when the micrograph is not square or not a multiple — is taken
    with a narrow Tukey taper (``taper``: tapered fraction of each edge pair, so nearly every pixel
    counts fully), each square's best-fit plane removed first, and its Fourier pixels are then
    averaged in ``f × f`` blocks centred on the coarse grid's frequencies. This has the variance of
    a Welch average of ``f²`` tiles while wasting almost none of the micrograph at tile edges.

    Parameters
    ----------
    micrograph : array (ny, nx), any scale or contrast polarity.
    tile : output sampling (default :func:`default_tile_size`); the spectrum's Fourier pixel is
        ``1 / (tile · pixel_size)`` 1/Å.
    taper : Tukey window parameter (0: none, 1: Hann).
    device : torch device for the FFTs (e.g. ``cryodask.projection.default_device()``); default
        None: scipy's FFT on the CPU.

    Returns
    -------
    float64 array (tile, tile // 2 + 1) in ``rfft2`` layout (``[0, 0]`` is zero frequency):
    frequencies ``fftfreq(tile, pixel_size)`` × ``rfftfreq(tile, pixel_size)``.
    """
    from scipy.signal.windows import tukey

    img = np.asarray(micrograph, dtype=np.float32)
    ny, nx = img.shape
    t = default_tile_size((ny, nx)) if tile is None else int(tile)
    if t > min(ny, nx):
        raise ValueError(f"spectrum size {t} px larger than the micrograph {ny}×{nx}")
    f = max(1, min(ny, nx) // t)
    big = f * t
    w1 = tukey(big, taper).astype(np.float32)
    norm = float((w1**2).sum()) ** 2
    ramp = np.linspace(-1.0, 1.0, big, dtype=np.float32)
    ramp_ss = float((ramp**2).sum()) * big
    starts = [(y, x) for y in _tile_starts(ny, big, big // 2) for x in _tile_starts(nx, big, big // 2)]
    fine = np.zeros((big, big // 2 + 1), np.float64)
    for y, x in starts:
        b = img[y:y + big, x:x + big]
        # remove the best-fit plane (mean, y and x ramps are orthogonal on a square)
        gy = float(b.sum(1, dtype=np.float64) @ ramp) / ramp_ss
        gx = float(b.sum(0, dtype=np.float64) @ ramp) / ramp_ss
        b = (b - np.float32(b.mean(dtype=np.float64)) - gy * ramp[:, None] - gx * ramp[None, :])
        b *= w1[:, None]
        b *= w1[None, :]
        fine += _power(b, device)
    fine /= len(starts) * norm
    if f == 1:
        return fine
    ay = _bin_matrix(big, t, f, half=False)
    ax = _bin_matrix(big, t, f, half=True)
    return np.asarray((ay @ (ax @ fine.T).T))


# ----------------------------------------------------------------------------------------------
# fit


@dataclass
class CTFFit:
    """Result of :func:`fit_ctf` (units: Å, degrees), with the arrays the diagnostic plot needs."""

    defocus_u: float
    defocus_v: float
    defocus_angle: float
    figure_of_merit: float
    max_resolution: float
    pixel_size: float
    voltage: float
    cs: float
    amplitude_contrast: float
    band: tuple[float, float]  # fitting band used, Å (low, high)
    spectrum: np.ndarray = field(repr=False)  # (t, t//2+1) power spectrum
    background: np.ndarray = field(repr=False)  # b(|k|) on the rfft grid (NaN outside the band)
    envelope: np.ndarray = field(repr=False)  # e(|k|) on the rfft grid (NaN outside the band)
    equiphase_k: np.ndarray = field(repr=False)  # (m,) 1/Å
    equiphase_data: np.ndarray = field(repr=False)  # (m,) (P − b)/e, equiphase average
    equiphase_model: np.ndarray = field(repr=False)  # (m,) fitted CTF²
    equiphase_corr: np.ndarray = field(repr=False)  # (m,) windowed correlation

    def as_dict(self) -> dict:
        return dict(zip(CTF_COLUMNS, (self.defocus_u, self.defocus_v, self.defocus_angle,
                                      self.figure_of_merit, self.max_resolution)))


class _Spectrum:
    """The band pixels of a spectrum, their radial bins and weights, and the spline basis."""

    def __init__(self, spectrum, pixel_size, k_lo, k_hi, n_knots, level_window=1 / 12, log_envelope=False):
        t = spectrum.shape[0]
        self.t = t
        self.dk = 1.0 / (t * pixel_size)
        ky, kx = np.meshgrid(np.fft.fftfreq(t, pixel_size), np.fft.rfftfreq(t, pixel_size), indexing="ij")
        kr = np.hypot(ky, kx)
        sel = (kr >= k_lo) & (kr <= k_hi)
        self.k_hi = k_hi
        self.sel = sel
        self.ky, self.kx = ky[sel], kx[sel]
        self.k = kr[sel]
        # float32 per-pixel arrays: the CTF phase (≤ a few hundred rad) keeps ~1e-4 rad accuracy
        # and numpy's float32 sine is several times faster
        self.k2 = (self.k**2).astype(np.float32)
        theta = np.arctan2(self.ky, self.kx)
        self.cos2, self.sin2 = np.cos(2 * theta).astype(np.float32), np.sin(2 * theta).astype(np.float32)
        self.p = spectrum[sel].astype(np.float64)
        rbin = np.rint(self.k / self.dk).astype(np.int64)
        self.r0 = int(rbin.min())
        self.rbin = rbin - self.r0
        nr = int(self.rbin.max()) + 1
        self.nr = nr
        cnt = np.bincount(self.rbin, minlength=nr).astype(np.float64)
        prof = np.bincount(self.rbin, self.p, minlength=nr) / np.maximum(cnt, 1)
        if nr < 8:
            raise ValueError(f"fitting band holds only {nr} Fourier shells; widen resolution_range")
        self.kbin = np.where(cnt > 0, np.bincount(self.rbin, self.k, minlength=nr) / np.maximum(cnt, 1),
                             (np.arange(nr) + self.r0) * self.dk)
        # inverse-variance weights of the averaged periodogram: 1 / (smooth local level)²
        from scipy.ndimage import uniform_filter1d

        size = max(3, int(round(nr * level_window)))
        level = np.exp(uniform_filter1d(np.log(np.maximum(prof, 1e-300)), size=size, mode="nearest"))
        self.profile = prof
        # cubic B-spline bases on the radial bins (k)
        nb, ne = (n_knots, n_knots) if np.isscalar(n_knots) else n_knots
        self.Bb = _bspline_basis(self.kbin, int(nb))  # (Kb, nr) background
        self.Be = _bspline_basis(self.kbin, int(ne), log=log_envelope)  # (Ke, nr) envelope
        self.Kb = self.Bb.shape[0]
        self.set_weights((1.0 / level**2)[self.rbin])

    def set_weights(self, w):
        """Per-pixel weights (inverse variances); updates the sums the fits use."""
        nr = self.nr
        self.w = w
        self.S0 = np.bincount(self.rbin, w, minlength=nr)
        self.SP = np.bincount(self.rbin, w * self.p, minlength=nr)
        self.SPP = float(np.sum(w * self.p**2))
        Hbb = (self.Bb * self.S0) @ self.Bb.T
        self.g0 = _nnls_quadratic(Hbb, self.Bb @ self.SP)[0]  # χ² reduction of the background-only fit


def _bspline_basis(x, n_seg, log=False):
    """Cubic B-spline basis with ``n_seg`` segments over [x.min(), x.max()] (uniform in x, or in
    log x when ``log``): (n_seg + 3, len(x))."""
    inner = (np.geomspace if log else np.linspace)(x[0], x[-1], max(1, n_seg) + 1)
    knots = np.concatenate([[inner[0]] * 3, inner, [inner[-1]] * 3])
    return BSpline.design_matrix(np.clip(x, inner[0], inner[-1]), knots, 3).toarray().T


def _ridge(h):
    return 1e-9 * np.trace(h) / h.shape[-1] * np.eye(h.shape[-1])


class _Optics:
    def __init__(self, voltage, cs, amplitude_contrast):
        lam = electron_wavelength(voltage)
        self.k1 = math.pi * lam
        self.k2 = math.pi / 2 * (cs * 1e7) * lam**3
        self.k3 = math.atan(amplitude_contrast / math.sqrt(1.0 - amplitude_contrast**2))
        self.lam = lam

    def ctf2(self, k2, defocus):
        """CTF² for an effective (direction-dependent) defocus, Å; same formula as ``ctf_2d``."""
        chi = -self.k1 * defocus * k2 + self.k2 * k2**2 - self.k3
        return np.sin(chi) ** 2

    def equivalent_k2(self, k2, defocus, mean):
        """k² at which a CTF of defocus ``mean`` has the phase that ``defocus`` has at ``k2``."""
        phi = self.k1 * defocus * k2 - self.k2 * k2**2
        if self.k2 == 0:
            return phi / (self.k1 * mean)
        a = self.k1 * mean
        disc = np.maximum(a * a - 4 * self.k2 * phi, 0.0)
        return (a - np.sqrt(disc)) / (2 * self.k2)


def _nnls_quadratic(h, g, beta=None):
    """argmin over β ≥ 0 of βᵀHβ − 2βᵀg for a positive-definite H.

    With H = LLᵀ the objective is ‖Lᵀβ − L⁻¹g‖² − ‖L⁻¹g‖², a non-negative least-squares
    problem. ``beta``: the unconstrained optimum H⁻¹g if already known (H then already
    regularised). Returns ``(reduction, β)``, ``reduction = 2βᵀg − βᵀHβ`` (≥ 0): the χ² decrease.
    """
    if beta is None:
        h = h + _ridge(h)
        beta = np.linalg.solve(h, g)
    if np.any(beta < 0):  # the unconstrained optimum is outside the cone: solve the NNLS
        from scipy.linalg import solve_triangular
        from scipy.optimize import nnls

        low = np.linalg.cholesky(h)
        y = solve_triangular(low, g, lower=True, check_finite=False)
        beta, _ = nnls(low.T, y, maxiter=50 * len(g))
    return float(2 * beta @ g - beta @ h @ beta), beta


def _solve(spec: _Spectrum, S1, S2, SPC):
    """Variable projection: best non-negative (b, e) spline coefficients for given CTF² sums.

    ``S1 = Σ w C²``, ``S2 = Σ w C⁴``, ``SPC = Σ w P C²`` per radial bin, shapes (..., nr).
    Non-negative B-spline coefficients make ``b ≥ 0`` and ``e ≥ 0``, which removes the
    ``b + e·C²`` trade-off where C² varies slowly. Returns (χ² reduction over the
    background-only fit, coefficients (..., Kb + Ke)).
    """
    Bb, Be = spec.Bb, spec.Be
    lead = S1.shape[:-1]
    S1, S2, SPC = (x.reshape(-1, x.shape[-1]) for x in (S1, S2, SPC))
    n = len(S1)
    kb = Bb.shape[0]
    nbeta = kb + Be.shape[0]
    h = np.empty((n, nbeta, nbeta))
    g = np.empty((n, nbeta))
    h[:, :kb, :kb] = (Bb * spec.S0) @ Bb.T
    h[:, :kb, kb:] = np.einsum("kr,cr,lr->ckl", Bb, S1, Be)
    h[:, kb:, :kb] = np.swapaxes(h[:, :kb, kb:], 1, 2)
    h[:, kb:, kb:] = np.einsum("kr,cr,lr->ckl", Be, S2, Be)
    g[:, :kb] = Bb @ spec.SP
    g[:, kb:] = SPC @ Be.T
    h += _ridge(h[0])
    free = np.linalg.solve(h, g[..., None])[..., 0]  # unconstrained optima, all at once
    gains = np.empty(n)
    betas = np.empty((n, nbeta))
    for i in range(n):
        gains[i], betas[i] = _nnls_quadratic(h[i], g[i], free[i])
    return (gains - spec.g0).reshape(lead), betas.reshape(lead + (nbeta,))


def _bin_sums(spec: _Spectrum, c2):
    r, w, nr = spec.rbin, spec.w, spec.nr
    wc = w * c2
    return (np.bincount(r, wc, minlength=nr), np.bincount(r, wc * c2, minlength=nr),
            np.bincount(r, wc * spec.p, minlength=nr))


def _score_2d(spec: _Spectrum, opt: _Optics, mean, ax, ay):
    defocus = mean + ax * spec.cos2 + ay * spec.sin2
    c2 = opt.ctf2(spec.k2, defocus)
    S1, S2, SPC = _bin_sums(spec, c2)
    gain, beta = _solve(spec, S1, S2, SPC)
    return float(gain), beta


def _to_uva(mean, ax, ay):
    a = math.hypot(ax, ay)
    ang = 0.5 * math.degrees(math.atan2(ay, ax))
    ang = (ang + 90.0) % 180.0 - 90.0
    return mean + a, mean - a, ang


def fit_ctf(
    spectrum: np.ndarray,
    pixel_size: float,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    defocus_range: tuple[float, float] = (3000.0, 50000.0),
    resolution_range: tuple[float | None, float | None] = (None, None),
    max_astigmatism: float = 3000.0,
    expected_astigmatism: float | None = 500.0,
    n_knots: int | tuple[int, int] = (2, 4),
    log_envelope: bool = True,
    fit_threshold: float = 0.5,
    noise_correlation: float = 1.0,
    n_peaks: int = 3,
) -> CTFFit:
    """Fit the CTF to a power spectrum from :func:`power_spectrum`.

    Parameters
    ----------
    spectrum : (t, t // 2 + 1) power spectrum, ``rfft2`` layout.
    pixel_size : Å/px of the micrograph the spectrum came from.
    voltage, cs, amplitude_contrast : kV, mm, fraction.
    defocus_range : (min, max) mean defocus searched, Å (default 0.3–5 µm).
    resolution_range : fitting band (low, high), Å. Defaults: low = max(50 Å, 8 px), high =
        2.1 px (just inside Nyquist). The high end is lowered where the rings would be closer
        than 2.5 Fourier pixels — for the largest defocus searched during the 1-D search, for
        the defocus found (plus ``max_astigmatism``/2) in the 2-D fit — since undersampled rings
        alias; a larger ``tile`` in :func:`power_spectrum` samples finer.
    max_astigmatism : largest |U − V| searched, Å.
    expected_astigmatism : restraint on astigmatism, Å: adds ``(|U − V| / expected)²`` to the
        calibrated χ² (a Gaussian prior), so that noise does not fit spurious astigmatism;
        ``None`` for none.
    n_knots : spline segments (background, envelope) over the band.
    log_envelope : envelope knots uniform in log k (dense at low k, where the signal falls fast).
    fit_threshold : windowed-correlation level that defines the fit resolution.
    noise_correlation : pixels per independent measurement in ``spectrum`` (see
        :func:`spectrum_correlation`); scales the χ² against the astigmatism restraint.
    n_peaks : local maxima of the 1-D search refined on the 2-D spectrum.
    """
    t = spectrum.shape[0]
    if spectrum.shape != (t, t // 2 + 1):
        raise ValueError(f"expected an rfft2-layout spectrum (t, t//2+1), got {spectrum.shape}")
    lo, hi = resolution_range
    lo = max(50.0, 8.0 * pixel_size) if lo is None else float(lo)
    hi = 2.1 * pixel_size if hi is None else max(float(hi), 2.0 * pixel_size)
    if not lo > hi:
        raise ValueError(f"empty fitting band: {lo} Å to {hi} Å")
    opt = _Optics(voltage, cs, amplitude_contrast)
    dmin, dmax = defocus_range
    box = t * pixel_size  # Å: the spectrum's Fourier pixel is 1/box

    def band_top(defocus):
        """Highest frequency fitted: ``hi``, or lower where rings of ``defocus`` Å would be
        closer than 2.5 Fourier pixels (undersampled rings alias into false patterns)."""
        k_ring = box / (5.0 * opt.lam * max(defocus, 1.0))
        return min(1.0 / hi, max(k_ring, 1.0 / lo + 16.0 / box))

    def make_spectrum(k_top):
        return _Spectrum(spectrum, pixel_size, 1.0 / lo, k_top, n_knots, log_envelope=log_envelope)

    sig = (expected_astigmatism / 2) if expected_astigmatism else np.inf
    amax = max_astigmatism / 2

    def make_cost(spec):
        # χ² calibration: the background-only residual per pixel gives the variance scale of the
        # weighted periodogram; ``noise_correlation`` corrects for pixels sharing data.
        cal = 1.0 / (max(spec.SPP - spec.g0, 1e-300) / len(spec.p) * noise_correlation)

        def cost(x):
            m, ax, ay = x
            if not dmin <= m <= dmax:  # keep the mean defocus inside the searched range
                return 1e30 * (1.0 + min(abs(m - dmin), abs(m - dmax)))
            a2 = ax * ax + ay * ay
            pen = a2 / sig**2 if np.isfinite(sig) else 0.0
            if a2 > amax**2:
                pen += cal * (math.sqrt(a2) - amax) ** 2
            return -cal * _score_2d(spec, opt, m, ax, ay)[0] + pen

        return cost

    # 1. exhaustive 1-D search of the mean defocus on the rotational average, in a band where
    #    the rings of the largest defocus searched are still sampled
    spec = make_spectrum(band_top(dmax))
    kmax = spec.kbin[-1]
    step = min(1.0 / (8 * opt.lam * kmax**2), (dmax - dmin) / 20)
    cand = np.arange(dmin, dmax + step, step)
    c2 = opt.ctf2(spec.kbin[None, :] ** 2, cand[:, None])
    gains, _ = _solve(spec, spec.S0 * c2, spec.S0 * c2**2, spec.SP * c2)
    n = len(cand)
    peaks = [i for i in range(n) if gains[i] >= gains[max(i - 1, 0)] and gains[i] >= gains[min(i + 1, n - 1)]]
    peaks = sorted(peaks, key=lambda i: -gains[i])[:n_peaks]

    # 2. the best few peaks refined on the 2-D spectrum without astigmatism; the best one kept
    from scipy.optimize import minimize_scalar

    cost = make_cost(spec)
    refined = [minimize_scalar(lambda m: cost((m, 0.0, 0.0)), bounds=(cand[i] - step, cand[i] + step),
                               method="bounded", options=dict(xatol=1.0)) for i in peaks]
    best = float(min(refined, key=lambda r: r.fun).x)
    # the band widened to what this defocus (plus the largest astigmatism) allows
    k_top = band_top(best + amax)
    if k_top > spec.kbin[-1] + 2.0 / box:
        spec = make_spectrum(k_top)
        cost = make_cost(spec)
    # 3. coarse grid over astigmatism around the best mean, then Nelder–Mead on (mean, ax, ay)
    grid = [(best, 0.0, 0.0)]
    for a in (amax / 8, amax / 4, amax / 2, amax):
        for th in np.deg2rad(np.arange(0, 180, 22.5)):
            grid.append((best, a * math.cos(2 * th), a * math.sin(2 * th)))
    scores = [cost(p) for p in grid]
    x0 = np.array(grid[int(np.argmin(scores))])
    simplex = np.array([x0, x0 + [step / 2, 0, 0], x0 + [0, amax / 8, 0], x0 + [0, 0, amax / 8]])
    res = minimize(cost, x0, method="Nelder-Mead",
                   options=dict(initial_simplex=simplex, xatol=2.0, fatol=1e-2, maxiter=400))
    mean, ax, ay = res.x
    u, v, ang = _to_uva(mean, ax, ay)

    # 4. fit quality
    gain, beta = _score_2d(spec, opt, mean, ax, ay)
    bb, eb = beta[:spec.Kb] @ spec.Bb, beta[spec.Kb:] @ spec.Be
    b_pix, e_pix = bb[spec.rbin], eb[spec.rbin]
    defocus = mean + ax * spec.cos2 + ay * spec.sin2
    c2 = opt.ctf2(spec.k2, defocus)
    fom = _weighted_corr(spec.p - b_pix, e_pix * c2, spec.w)

    # equiphase average: pixels binned by the frequency at which the mean-defocus CTF has their
    # phase, so that astigmatic rings add up coherently
    keq = np.sqrt(np.maximum(opt.equivalent_k2(spec.k2, defocus, mean), 0.0))
    ebin = np.rint(keq / spec.dk).astype(np.int64) - spec.r0
    ok = (ebin >= 0) & (ebin < spec.nr)
    cnt = np.bincount(ebin[ok], minlength=spec.nr)
    d = np.bincount(ebin[ok], (spec.p - b_pix)[ok], minlength=spec.nr) / np.maximum(cnt, 1)
    kq = spec.kbin
    model = eb * opt.ctf2(kq**2, mean)
    corr = _windowed_corr(d, model, opt, kq, mean, cnt > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_norm = np.where(eb > 0, d / eb, np.nan)
    fit_res = _fit_resolution(corr, kq, fit_threshold, opt, mean)

    bg = np.full(spectrum.shape, np.nan)
    env = np.full(spectrum.shape, np.nan)
    bg[spec.sel], env[spec.sel] = b_pix, e_pix
    return CTFFit(
        defocus_u=float(u), defocus_v=float(v), defocus_angle=float(ang), figure_of_merit=float(fom),
        max_resolution=float(fit_res), pixel_size=float(pixel_size), voltage=float(voltage), cs=float(cs),
        amplitude_contrast=float(amplitude_contrast), band=(float(lo), float(1.0 / spec.k_hi)), spectrum=spectrum,
        background=bg, envelope=env, equiphase_k=kq, equiphase_data=d_norm, equiphase_model=opt.ctf2(kq**2, mean),
        equiphase_corr=corr,
    )


def _weighted_corr(a, b, w):
    wa = w / w.sum()
    a = a - np.sum(wa * a)
    b = b - np.sum(wa * b)
    den = math.sqrt(float(np.sum(wa * a * a) * np.sum(wa * b * b)))
    return float(np.sum(wa * a * b) / den) if den > 0 else 0.0


def _windowed_corr(d, model, opt: _Optics, k, mean, valid):
    """Correlation of ``d`` and ``model`` in windows of ±1 CTF² period (phase ±π) around each bin."""
    phase = opt.k1 * mean * k**2 - opt.k2 * k**4  # monotonic over the band for sane defocus
    out = np.full(len(k), np.nan)
    for j in range(len(k)):
        m = valid & (np.abs(phase - phase[j]) <= math.pi)
        if m.sum() < 5:
            idx = np.argsort(np.abs(np.arange(len(k)) - j))[:5]
            m = np.zeros(len(k), bool)
            m[idx] = True
            m &= valid
        x, y = d[m], model[m]
        if x.size < 3 or np.std(x) == 0 or np.std(y) == 0:
            continue
        out[j] = float(np.corrcoef(x, y)[0, 1])
    return out


def _fit_resolution(corr, k, threshold, opt: _Optics, mean):
    """Resolution (Å) to which the windowed correlation stays at or above ``threshold``.

    Scanned from the first CTF zero outwards (before it there is no ring to fit); a dip below
    the threshold narrower than one ring (phase π) is bridged, a longer one ends the fit.
    """
    phase = opt.k1 * mean * k**2 - opt.k2 * k**4 + opt.k3
    monotonic = bool(np.all(np.diff(phase) > 0))
    start = min(int(np.searchsorted(phase, math.pi)) if monotonic else 0, len(k) - 1)
    good = corr >= threshold
    last = None
    for j in range(start, len(k)):
        if good[j]:
            last = j
        elif monotonic and phase[j] - phase[last if last is not None else start] > math.pi:
            break
        elif not monotonic and last is None:
            break
    return float(1.0 / k[start if last is None else last])


def thon_ring_count(defocus: float, resolution_low: float, resolution_high: float, voltage: float = 300.0,
                    cs: float = 2.7, amplitude_contrast: float = 0.1) -> int:
    """Number of CTF zeros (Thon rings) between ``resolution_low`` and ``resolution_high`` Å for a
    defocus in Å — e.g. with ``resolution_high`` = Nyquist (2 × pixel size), whether a
    micrograph can show its defocus at all (fewer than ~2 zeros: the fit is not identifiable)."""
    opt = _Optics(voltage, cs, amplitude_contrast)
    ks = np.linspace(1.0 / resolution_low, 1.0 / resolution_high, 4096)
    phase = opt.k1 * defocus * ks**2 - opt.k2 * ks**4 + opt.k3
    return int(np.count_nonzero(np.diff(np.floor(phase / math.pi)) != 0))


# ----------------------------------------------------------------------------------------------
# public kernels and graph


def estimate_ctf(
    micrograph,
    pixel_size: float,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    defocus_range: tuple[float, float] = (3000.0, 50000.0),
    resolution_range: tuple[float | None, float | None] = (None, None),
    max_astigmatism: float = 3000.0,
    tile: int | None = None,
    device=None,
    return_fit: bool = False,
    **fit_kwargs,
):
    """CTF of one micrograph (y, x): ``{rlnDefocusU, rlnDefocusV, rlnDefocusAngle,
    rlnCtfFigureOfMerit, rlnCtfMaxResolution}`` (Å, Å, degrees, correlation, Å).

    ``pixel_size`` Å/px; ``voltage`` kV, ``cs`` mm, ``amplitude_contrast`` fraction;
    ``defocus_range`` (min, max) Å; ``tile`` and ``device``: see :func:`power_spectrum`; other
    keyword arguments (``expected_astigmatism``, ...) go to :func:`fit_ctf`. A micrograph with
    non-finite or constant pixels gives NaN for every value. With ``return_fit=True`` the
    :class:`CTFFit` (with the arrays for :func:`plot_ctf_diagnostic`) is returned instead.
    """
    img = np.asarray(micrograph, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D micrograph, got shape {img.shape}")
    if not np.all(np.isfinite(img)) or float(img.std()) == 0.0:
        if return_fit:
            raise ValueError("micrograph has non-finite or constant pixels")
        return dict.fromkeys(CTF_COLUMNS, float("nan"))
    ps = power_spectrum(img, tile=tile, device=device)
    fit_kwargs.setdefault("noise_correlation", spectrum_correlation(img.shape, ps.shape[0]))
    fit = fit_ctf(ps, pixel_size, voltage, cs, amplitude_contrast, defocus_range=defocus_range,
                  resolution_range=resolution_range, max_astigmatism=max_astigmatism, **fit_kwargs)
    return fit if return_fit else fit.as_dict()


def ctf_graph(micrographs, pixel_size: float, voltage: float = 300.0, cs: float = 2.7,
              amplitude_contrast: float = 0.1, **kwargs):
    """Lazy CTF estimation of a stack of micrographs.

    ``micrographs``: dask array ``(n, ny, nx)``, rechunked to one micrograph per chunk if needed.
    Returns a dask array ``(n, 5)`` float64 whose columns are :data:`CTF_COLUMNS`, one chunk per
    micrograph. Keyword arguments go to :func:`estimate_ctf`. Nothing is computed.
    """
    if micrographs.ndim != 3:
        raise ValueError(f"expected (n, ny, nx) micrographs, got {micrographs.shape}")
    n, ny, nx = micrographs.shape
    if micrographs.chunks[1] != (ny,) or micrographs.chunks[2] != (nx,) or any(c != 1 for c in micrographs.chunks[0]):
        micrographs = micrographs.rechunk((1, ny, nx))

    def _block(b):
        r = estimate_ctf(b[0], pixel_size, voltage, cs, amplitude_contrast, **kwargs)
        return np.array([[r[c] for c in CTF_COLUMNS]], dtype=np.float64)

    return micrographs.map_blocks(_block, dtype=np.float64, drop_axis=2,
                                  chunks=((1,) * n, (len(CTF_COLUMNS),)), token="ctf-estimate")


def ctf_table(values, names=None):
    """``(n, 5)`` array from :func:`ctf_graph` → DataFrame with :data:`CTF_COLUMNS` (and
    ``rlnMicrographName`` when ``names`` is given)."""
    import pandas as pd

    df = pd.DataFrame(np.asarray(values, dtype=np.float64), columns=list(CTF_COLUMNS))
    if names is not None:
        df.insert(0, "rlnMicrographName", list(names))
    return df


# ----------------------------------------------------------------------------------------------
# reference-based defocus refinement


def reference_cross_spectra(particles, references):
    """Sums over one micrograph's particles that :func:`refine_defocus_to_reference` scores.

    ``particles`` (b, n, n): the particle boxes as extracted (protein white, no CTF correction);
    ``references`` (b, n, n): noise-free projections of the reference at each particle's pose and
    origin, without CTF, on the same pixel grid. Returns ``(cross, power)``, float64 arrays
    (n, n // 2 + 1) in ``rfft2`` layout: ``Σ_i Re(X_i · conj(R_i))`` and ``Σ_i |R_i|²``.
    """
    x = torch.as_tensor(np.asarray(particles) if not torch.is_tensor(particles) else particles)
    r = torch.as_tensor(np.asarray(references) if not torch.is_tensor(references) else references)
    if x.shape != r.shape or x.ndim != 3 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected matching (b, n, n) stacks, got {tuple(x.shape)} and {tuple(r.shape)}")
    fx = torch.fft.rfft2(x.to(torch.float64))
    fr = torch.fft.rfft2(r.to(torch.float64).to(fx.device))
    cross = (fx * fr.conj()).real.sum(0)
    power = (fr.real**2 + fr.imag**2).sum(0)
    return cross.cpu().numpy(), power.cpu().numpy()


def refine_defocus_to_reference(
    cross,
    power,
    pixel_size: float,
    defocus_u: float,
    defocus_v: float,
    defocus_angle: float,
    voltage: float = 300.0,
    cs: float = 2.7,
    amplitude_contrast: float = 0.1,
    search: float = 5000.0,
    resolution_range: tuple[float, float | None] = (200.0, None),
    fit_astigmatism: bool = True,
    max_astigmatism: float = 3000.0,
) -> dict:
    """Defocus of one micrograph from its particles against projections of a reference.

    With particle transforms ``X_i = a·CTF·R_i + noise`` (white noise within the micrograph), the
    least-squares fit of the scale ``a`` leaves the score ``Σ CTF·cross / √(Σ CTF²·power)`` (sums
    over the Fourier pixels of the band, each half-plane pixel counted for itself and its mirror),
    which this maximises: an exhaustive 1-D search of the mean defocus in ``± search`` Å around
    the start, with a step that moves the CTF phase by at most π/4 at the band's top, then (with
    ``fit_astigmatism``) a Nelder–Mead refinement of ``(mean, a·cos2θ, a·sin2θ)``. The score
    weighs each shell by the reference's power there, so a reference whose radial amplitude
    profile is wrong (e.g. Wiener-filtered, or reconstructed with wrong CTFs) biases the result
    when few CTF zeros lie in the band; alternating it with reconstruction then needs care.

    ``cross``, ``power``: from :func:`reference_cross_spectra`, (n, n // 2 + 1). ``pixel_size``
    Å/px; start ``defocus_u``, ``defocus_v`` Å, ``defocus_angle`` degrees; ``voltage`` kV, ``cs``
    mm. ``resolution_range`` (low, high) Å: high defaults to Nyquist; set it to the reference's
    resolution. Returns ``{rlnDefocusU, rlnDefocusV, rlnDefocusAngle, score, start_score}`` (Å,
    Å, degrees, and the score at the result and at the start; arbitrary units, comparable only
    within one micrograph; ≤ 0: the particles do not correlate with the reference, e.g. the
    wrong contrast, and the defocus means nothing).
    """
    cross = np.asarray(cross, dtype=np.float64)
    power = np.asarray(power, dtype=np.float64)
    n = cross.shape[0]
    if cross.shape != (n, n // 2 + 1) or power.shape != cross.shape:
        raise ValueError(f"expected rfft-layout (n, n//2+1) sums, got {cross.shape} and {power.shape}")
    lo, hi = resolution_range
    hi = 2.0 * pixel_size if hi is None else max(float(hi), 2.0 * pixel_size)
    ky, kx = np.meshgrid(np.fft.fftfreq(n, pixel_size), np.fft.rfftfreq(n, pixel_size), indexing="ij")
    kr = np.hypot(ky, kx)
    mult = np.full(kr.shape, 2.0)
    mult[:, 0] = 1.0
    if n % 2 == 0:
        mult[:, -1] = 1.0
    sel = (kr >= 1.0 / float(lo)) & (kr <= 1.0 / hi)
    if sel.sum() < 8:
        raise ValueError(f"band {lo}–{hi} Å holds fewer than 8 Fourier pixels")
    tky, tkx = torch.from_numpy(ky[sel]), torch.from_numpy(kx[sel])
    wc = torch.from_numpy((mult * cross)[sel])
    wp = torch.from_numpy((mult * power)[sel])

    def scores(u, v, ang):
        c = ctf_2d(tky, tkx, u, v, ang, voltage, cs, amplitude_contrast).double()
        return (c * wc).sum(-1) / torch.sqrt(torch.clamp((c * c * wp).sum(-1), min=1e-300))

    to_uva = _to_uva

    m0 = 0.5 * (defocus_u + defocus_v)
    a0 = 0.5 * (defocus_u - defocus_v)
    th0 = math.radians(defocus_angle)
    ax0, ay0 = a0 * math.cos(2 * th0), a0 * math.sin(2 * th0)
    lam = electron_wavelength(voltage)
    step = min(1.0 / (8.0 * lam * (1.0 / hi) ** 2), search / 10.0)
    cand = np.arange(max(m0 - search, 1.0), m0 + search + step, step)
    u, v, ang = zip(*(to_uva(m, ax0, ay0) for m in cand))
    s = scores(np.array(u), np.array(v), np.array(ang)).numpy()
    start = float(scores(*to_uva(m0, ax0, ay0)))
    x0 = np.array([cand[int(np.argmax(s))], ax0, ay0])

    def cost(x):
        m, ax, ay = x
        if math.hypot(ax, ay) > max_astigmatism / 2 or not cand[0] <= m <= cand[-1]:
            return 1e30
        return -float(scores(*to_uva(m, ax, ay)))

    if fit_astigmatism:
        d = step / 2
        simplex = np.array([x0, x0 + [d, 0, 0], x0 + [0, d, 0], x0 + [0, 0, d]])
        res = minimize(cost, x0, method="Nelder-Mead",
                       options=dict(initial_simplex=simplex, xatol=1.0, fatol=1e-6 * abs(start) + 1e-12,
                                    maxiter=600))
        x = res.x if res.fun <= cost(x0) else x0
    else:
        from scipy.optimize import minimize_scalar

        r = minimize_scalar(lambda m: cost((m, ax0, ay0)), bounds=(x0[0] - step, x0[0] + step),
                            method="bounded", options=dict(xatol=1.0))
        x = np.array([r.x, ax0, ay0]) if r.fun <= cost(x0) else x0
    u, v, ang = to_uva(*x)
    best = -cost(x)
    return {"rlnDefocusU": float(u), "rlnDefocusV": float(v), "rlnDefocusAngle": float(ang),
            "score": float(best), "start_score": float(start)}


# ----------------------------------------------------------------------------------------------
# diagnostic


def plot_ctf_diagnostic(fit: CTFFit, path, title: str | None = None, truth: dict | None = None) -> None:
    """PNG as CTFFIND shows it: the background-subtracted spectrum (left half) beside the fitted
    CTF² (right half), and the equiphase average with the fit and its windowed correlation.

    ``truth`` (optional, e.g. from a simulation): ``{rlnDefocusU, rlnDefocusV, rlnDefocusAngle}``
    added to the caption.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = fit.spectrum.shape[0]
    ky, kx = np.meshgrid(np.fft.fftfreq(t, fit.pixel_size), np.fft.rfftfreq(t, fit.pixel_size), indexing="ij")
    model = ctf_2d(torch.from_numpy(ky), torch.from_numpy(kx), fit.defocus_u, fit.defocus_v, fit.defocus_angle,
                   fit.voltage, fit.cs, fit.amplitude_contrast).numpy() ** 2
    # left: the background-subtracted spectrum averaged over cells of 15° azimuth × one equiphase
    # bin of the fit (so rings add up along their length; misfitted astigmatism shows as rings
    # that do not continue into the right half), as z-scores of each cell's mean
    opt = _Optics(fit.voltage, fit.cs, fit.amplitude_contrast)
    resid = fit.spectrum - fit.background
    inb = np.isfinite(resid)
    theta = np.arctan2(ky, kx)
    mean, half_astig = (fit.defocus_u + fit.defocus_v) / 2, (fit.defocus_u - fit.defocus_v) / 2
    defocus = mean + half_astig * np.cos(2 * (theta - np.deg2rad(fit.defocus_angle)))
    keq = np.sqrt(np.maximum(opt.equivalent_k2(ky**2 + kx**2, defocus, mean), 0.0))
    ebin = np.minimum(np.rint(keq * t * fit.pixel_size).astype(np.int64), t)
    n_sec = 12
    sector = np.clip(((theta + np.pi / 2) / (np.pi / n_sec)).astype(np.int64), 0, n_sec - 1)
    cell = ebin * n_sec + sector
    nc = (t + 1) * n_sec
    cnt = np.bincount(cell[inb], minlength=nc)
    csum = np.bincount(cell[inb], resid[inb], minlength=nc)
    ncnt = np.bincount(ebin[inb], minlength=t + 1)
    m1 = np.bincount(ebin[inb], resid[inb], minlength=t + 1) / np.maximum(ncnt, 1)
    m2 = np.bincount(ebin[inb], resid[inb] ** 2, minlength=t + 1) / np.maximum(ncnt, 1)
    sd = np.sqrt(np.maximum(m2 - m1**2, 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        zc = (csum / cnt - np.repeat(m1, n_sec)) / (np.repeat(sd, n_sec) / np.sqrt(cnt))
    z = np.where(inb, zc[cell], np.nan)
    full_d = np.fft.fftshift(_rfft_to_full(np.clip((z + 3.0) / 6.0, 0, 1)), axes=(0, 1))
    full_m = np.fft.fftshift(_rfft_to_full(model), axes=(0, 1))
    img = np.where(np.arange(t)[None, :] < t // 2, full_d, full_m)
    img = np.where(np.isfinite(img), img, 0.5)

    fig, axs = plt.subplots(1, 2, figsize=(13, 6), gridspec_kw=dict(width_ratios=[1, 1.3]))
    kn = 0.5 / fit.pixel_size
    axs[0].imshow(img, cmap="gray", extent=(-kn, kn, kn, -kn), vmin=0, vmax=1)
    axs[0].set_title("spectrum − background, ring-averaged (left) | fitted CTF² (right)", fontsize=9)
    axs[0].set_xlabel("kx (1/Å)")
    axs[0].set_ylabel("ky (1/Å)")
    for r in fit.band:
        axs[0].add_patch(plt.Circle((0, 0), 1 / r, fill=False, color="tab:orange", lw=0.6, ls="--"))
    k = fit.equiphase_k
    ax = axs[1]
    ax.plot(k, fit.equiphase_data, lw=0.8, color="k", label="equiphase average (P − b)/e")
    ax.plot(k, fit.equiphase_model, lw=0.8, color="tab:red", label="fitted CTF²")
    ax.plot(k, fit.equiphase_corr, lw=1.2, color="tab:blue", label="windowed correlation")
    ax.axvline(1 / fit.max_resolution, color="tab:green", ls="--", label=f"fit resolution {fit.max_resolution:.1f} Å")
    ax.set_ylim(-1.0, 2.5)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.legend(loc="upper right", fontsize=8)
    cap = (f"U {fit.defocus_u:.0f} Å  V {fit.defocus_v:.0f} Å  angle {fit.defocus_angle:.1f}°  "
           f"FOM {fit.figure_of_merit:.3f}  fit to {fit.max_resolution:.1f} Å")
    if truth:
        cap += (f"\ntruth: U {truth['rlnDefocusU']:.0f} Å  V {truth['rlnDefocusV']:.0f} Å  "
                f"angle {truth['rlnDefocusAngle']:.1f}°")
    ax.set_title(cap, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rfft_to_full(half: np.ndarray) -> np.ndarray:
    """(t, t//2+1) rfft-layout real array → (t, t) full layout, using P(−k) = P(k)."""
    t = half.shape[0]
    full = np.empty((t, t), half.dtype)
    full[:, : t // 2 + 1] = half
    neg_y = (-np.arange(t)) % t
    for x in range(t // 2 + 1, t):
        full[:, x] = half[neg_y, t - x]
    return full
