"""Orientation determination and gold-standard refinement (projection matching, batched torch).

Method (the section "Orientation determination and refinement" of the design):

1. **Particles in polar Fourier form.** Each image is normalised on its background, masked by a
   soft circle a little wider than the particle, and its Fourier transform evaluated *exactly*
   (a DFT matrix, no interpolation) on a polar grid: radii 1 … k_max (Fourier px of the box N)
   × M angles. Its CTF is evaluated on the same points (astigmatism included). Frequencies are
   whitened by the per-shell noise power σ²(k) (from the data, then from the residuals).
2. **Scores.** For a reference projection P at rotation A, a particle X with CTF C and a
   translation s (a RELION origin: the image is shifted by +s to centre it), the score is the
   Gaussian log-likelihood with the best scale factor (the profile likelihood)
   ``LL = ½ (Σ w Re[C X_s P*])² / Σ w C² |P|²`` (w = polar area / σ²): the normalised
   cross-correlation, squared. The in-plane angle ψ enters as a cyclic shift along the polar
   angle, so all ψ are scored at once by an FFT over the angular Fourier index m of
   ``Σ_r Ŷ(r, m) P̂*(r, m)`` (trigonometric interpolation gives a finer ψ); for a set of
   reference directions shared by all particles this sum is a real matrix product
   (particles × shifts) × (directions).
3. **Search, coarse to fine.** *Global*: every direction of a near-uniform (Fibonacci) grid
   restricted to the asymmetric unit of the point group × all ψ × a grid of shifts, at low
   resolution; the best few poses per particle are kept. *Local*: around each kept pose, the
   viewing direction is perturbed on a 3×3 grid of small rotations about the image x/y axes
   (ψ again continuous by FFT, within a window) and the shift on a 3×3 grid; the best moves,
   steps halve, a parabola through the last three points of each axis gives the sub-step
   optimum. Everything is batched per particle chunk (one Dask task per chunk and half).
4. **Gold standard.** Particles are split once into two random halves (seeded,
   ``rlnRandomSubset``). Each half is refined against its own reference only; both start from
   the same initial model low-passed to ``initial_lowpass`` Å. After every iteration each half is
   reconstructed from its own poses (:mod:`cryodask.reconstruct`: CTF, Wiener filter with the
   FSC-derived SSNR, symmetry), the half-map FSC gives the resolution, and each half's
   Wiener-filtered map (times a soft spherical solvent mask of the particle diameter) becomes
   that half's next reference. The search resolution follows the FSC (a few shells beyond the
   0.143 crossing) and the angular steps shrink with it; iterations stop when the resolution
   has not improved for ``patience`` iterations.
   *Defocus* (when the particles have CTF parameters and micrograph names): after each
   iteration's reconstruction, each micrograph's mean defocus is refitted against the projections
   of its particles' own half map (plainly inverted, low-passed at the half-map resolution) at
   their new poses (:func:`refine_defocus_groups`, as RELION's CtfRefine does); a round is kept
   only if the half maps reconstructed with it agree better (mean FSC), up to
   ``ctf_refine_rounds`` rounds per iteration.
5. **Result.** The final map combines the two halves' sums, Wiener-filtered with the half-map
   FSC; the reported resolution is the half-map FSC at 0.143 (and 0.5), RELION's way.

Symmetry (RELION's convention, :func:`cryodask.geometry.symmetry_matrices`): for a volume with
V(g r) = V(r) the rotations A and A·g give the same projection, so viewing directions
``Aᵀ e_z`` are searched over one asymmetric unit of the sphere under r ↦ gᵀ r.

Units: pixel sizes Å, shifts/origins px (RELION sign) inside, Å in tables; angles degrees in
tables, radians inside; frequencies in Fourier px of the box (cycles per box) unless noted.
Images (b, N, N), volumes (N, N, N) (z, y, x), centres at N//2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .geometry import euler_to_matrix, matrix_to_euler, symmetry_matrices
from .projection import default_device, volume_to_fourier

__all__ = [
    "PolarGrid",
    "polar_grid",
    "soft_circle",
    "normalise_images",
    "polar_transform",
    "polar_ctf",
    "reference_slices",
    "direction_grid",
    "rotations_from_directions",
    "global_search",
    "local_search",
    "Poses",
    "symmetrize_accumulator",
    "soft_sphere",
    "refine_defocus_groups",
]


# ------------------------------------------------------------------------------ polar grids


@dataclass(frozen=True)
class PolarGrid:
    """Polar sampling of the 2D Fourier plane of an N-px image.

    ``radii`` (R,) 1 … k_max in Fourier px; ``angles`` (M,) 2π j/M; ``kx``, ``ky`` (R, M)
    the Cartesian frequencies (Fourier px, image x and y); ``area`` (R,) the area element
    r·Δr·Δφ of each sample.
    """

    n: int
    radii: torch.Tensor
    angles: torch.Tensor
    kx: torch.Tensor
    ky: torch.Tensor
    area: torch.Tensor

    @property
    def r(self) -> int:
        return len(self.radii)

    @property
    def m(self) -> int:
        return len(self.angles)


def polar_grid(n: int, kmax: float, n_angles: int | None = None, diameter_px: float | None = None,
               device=None) -> PolarGrid:
    """Polar grid with radii 1 … floor(kmax) and ``n_angles`` angles.

    Default ``n_angles``: the arc spacing at the outer radius no coarser than the Fourier-space
    sampling an object of ``diameter_px`` (default N) needs (N/diameter), ×1.25, rounded up to a
    multiple of 8.
    """
    device = device or default_device()
    kmax = max(2, int(math.floor(min(kmax, n // 2))))
    if n_angles is None:
        d = diameter_px or n
        n_angles = int(math.ceil(1.25 * 2 * math.pi * kmax * d / n / 8.0)) * 8
        n_angles = max(n_angles, 16)
    radii = torch.arange(1, kmax + 1, dtype=torch.float32, device=device)
    angles = torch.arange(n_angles, dtype=torch.float32, device=device) * (2 * math.pi / n_angles)
    kx = radii[:, None] * torch.cos(angles)[None]
    ky = radii[:, None] * torch.sin(angles)[None]
    area = radii * (2 * math.pi / n_angles)
    return PolarGrid(n, radii, angles, kx, ky, area)


# ------------------------------------------------------------------------------ particle data


def soft_circle(n: int, radius: float, edge: float = 3.0, device=None) -> torch.Tensor:
    """2D mask (N, N): 1 inside ``radius`` px of the centre N//2, raised-cosine to 0 over ``edge`` px."""
    c = torch.arange(n, dtype=torch.float32, device=device) - n // 2
    r = torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    t = ((radius + edge - r) / edge).clamp(0, 1)
    return 0.5 - 0.5 * torch.cos(math.pi * t)


def soft_sphere(n: int, radius: float, edge: float = 3.0) -> np.ndarray:
    """3D mask (N, N, N): 1 inside ``radius`` px of the centre N//2, raised-cosine edge ``edge`` px."""
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    t = np.clip((radius + edge - r) / edge, 0, 1)
    return (0.5 - 0.5 * np.cos(np.pi * t)).astype(np.float32)


def normalise_images(images, mask_radius: float, edge: float = 3.0, device=None) -> torch.Tensor:
    """Background-normalised, soft-masked images (b, N, N) float32.

    The mean and standard deviation outside ``mask_radius + edge`` px (RELION's background
    region) are used to normalise each image; the image is then multiplied by the soft circle,
    so the outside is 0.
    """
    device = device or default_device()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32), device=device)
    n = x.shape[-1]
    m = soft_circle(n, mask_radius, edge, device)
    bg = (m == 0)
    if int(bg.sum()) < 16:  # mask fills the box: use the whole image
        bg = torch.ones_like(bg)
    vals = x[:, bg]
    mu = vals.mean(1)
    sd = vals.std(1).clamp_min(1e-12)
    return (x - mu[:, None, None]) / sd[:, None, None] * m


def centre_on_rotational_average(images, diameter_px: float, *, iterations: int = 3,
                                 max_shift: float | None = None, resolution_px: float | None = None,
                                 batch: int = 1024, device=None) -> np.ndarray:
    """Reference-free centring of particle images (b, N, N) (protein white, any normalisation).

    Each image is cross-correlated with a disc of the particle's diameter ``diameter_px``, then
    (``iterations`` − 1 more times) with the rotational average of all the images as centred so
    far, both low-passed with a Gaussian of ``resolution_px`` px (default diameter/4); the peak
    within ``max_shift`` px of the box centre (default 0.3 × diameter) is the particle's centre.
    Pickers centre irregular particles poorly (their projected outline changes with the view);
    the rotational average is centred on the mass by construction. Measured on the simulated
    70S ribosome (2,440 picks matched to the truth, SNR 0.1): centring error median 5.37 → 2.17
    px, 90th percentile 9.65 → 4.27 px.

    Returns RELION origins (b, 2) px (x, y): the particle centre sits at box centre − origin.
    """
    device = device or default_device()
    x_all = np.asarray(images, dtype=np.float32)
    b, n = x_all.shape[0], x_all.shape[-1]
    c = torch.arange(n, device=device) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r = torch.sqrt((yy ** 2 + xx ** 2).float())
    rb = r.round().long()
    counts = torch.bincount(rb.ravel()).clamp_min(1)
    ky = torch.fft.fftfreq(n, device=device)[:, None]
    kx = torch.fft.rfftfreq(n, device=device)[None, :]
    sig = float(resolution_px or diameter_px / 4)
    lp = torch.exp(-2.0 * (ky ** 2 + kx ** 2) * sig ** 2)
    lp[0, 0] = 0.0
    outside = r > float(max_shift if max_shift is not None else 0.3 * diameter_px)
    centres = torch.zeros((b, 2), device=device)  # particle centre − box centre (x, y) px

    def spectra(a):
        x = torch.as_tensor(x_all[a:a + batch], device=device)
        return torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)))

    for it in range(iterations):
        if it == 0:
            ref = (r < diameter_px / 2).float()
        else:  # rotational average of the images centred by the current estimates
            total = torch.zeros((n, n // 2 + 1), dtype=torch.complex64, device=device)
            for a in range(0, b, batch):
                s = centres[a:a + batch]
                ramp = torch.exp(2j * math.pi * (ky[None] * s[:, 1, None, None] + kx[None] * s[:, 0, None, None]))
                total += (spectra(a) * ramp).sum(0)
            avg = torch.fft.fftshift(torch.fft.irfft2(total / b, s=(n, n)))
            prof = torch.bincount(rb.ravel(), avg.ravel()) / counts
            ref = prof[rb] * (r < diameter_px / 2 + 4)
        fr = torch.fft.rfft2(torch.fft.ifftshift(ref)).conj() * lp
        for a in range(0, b, batch):
            cc = torch.fft.fftshift(torch.fft.irfft2(spectra(a) * fr, s=(n, n)), dim=(-2, -1))
            cc = cc.masked_fill(outside[None], -torch.inf)
            k = cc.reshape(cc.shape[0], -1).argmax(1)
            centres[a:a + batch] = torch.stack([k % n - n // 2, k // n - n // 2], 1).float()
    return -centres.cpu().numpy().astype(np.float64)


def _dft_matrix(n: int, grid: PolarGrid, pixels: torch.Tensor) -> torch.Tensor:
    """exp(−2πi k·x/N) for the polar points k (R·M) and the image pixels ``pixels`` (P, 2) = (x, y)
    measured from the centre: complex64 (P, R·M)."""
    kx, ky = grid.kx.reshape(-1), grid.ky.reshape(-1)
    ph = (-2 * math.pi / n) * (pixels[:, :1] * kx[None] + pixels[:, 1:] * ky[None])
    return torch.polar(torch.ones_like(ph), ph)


def polar_transform(images: torch.Tensor, grid: PolarGrid, support: float | None = None) -> torch.Tensor:
    """Exact Fourier transform of images (b, N, N) at the polar points: complex64 (b, R, M).

    Same convention as :func:`cryodask.projection.images_to_fourier` (centre N//2 at the
    origin). Pixels beyond ``support`` px of the centre are taken as zero (they are masked).
    """
    b, n = images.shape[0], images.shape[-1]
    c = torch.arange(n, dtype=torch.float32, device=images.device) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    sel = torch.ones(n * n, dtype=torch.bool, device=images.device)
    if support is not None:
        sel = (xx ** 2 + yy ** 2).reshape(-1) <= support ** 2
    pix = torch.stack([xx.reshape(-1)[sel], yy.reshape(-1)[sel]], 1)
    e = _dft_matrix(n, grid, pix)
    flat = images.reshape(b, -1)[:, sel]
    out = torch.complex(flat @ e.real, flat @ e.imag)
    return out.reshape(b, grid.r, grid.m)


def polar_ctf(defocus, grid: PolarGrid, pixel_size: float, optics, phase_shift=None, bfactor=None) -> torch.Tensor:
    """CTF (b, R, M) float32 at the polar points for defocus (b, 3) = U, V (Å), angle (deg);
    ``optics``: voltage (kV), cs (mm), amplitude_contrast. ``defocus`` None → ones (b = 1).

    RELION's formula (as :func:`cryodask.ctf.ctf_2d`), evaluated separably on the polar grid:
    the astigmatic defocus depends on the polar angle only, the aberration phase on the radius.
    """
    from .ctf import electron_wavelength

    device = grid.kx.device
    if defocus is None:
        return torch.ones((1, grid.r, grid.m), dtype=torch.float32, device=device)
    d = torch.as_tensor(np.array(defocus, dtype=np.float64).reshape(-1, 3), device=device)
    lam = electron_wavelength(optics.voltage)
    k1 = math.pi * lam
    k2 = math.pi / 2 * (optics.cs * 1e7) * lam ** 3
    q = optics.amplitude_contrast
    k3 = math.atan(q / math.sqrt(1.0 - q * q))
    f2 = (grid.radii.to(torch.float64) / (grid.n * pixel_size)) ** 2  # (R,) |k|² in 1/Å²
    ang = grid.angles.to(torch.float64)
    du, dv, da = d[:, 0:1], d[:, 1:2], torch.deg2rad(d[:, 2:3])
    deltaf = -(du + dv) * 0.5 - (du - dv) * 0.5 * torch.cos(2 * (ang[None] - da))  # (b, M)
    k5 = 0.0 if phase_shift is None else torch.deg2rad(torch.as_tensor(np.asarray(phase_shift, np.float64),
                                                                        device=device)).reshape(-1, 1, 1)
    chi = k1 * deltaf[:, None, :] * f2[None, :, None] + (k2 * f2 ** 2)[None, :, None] - k5 - k3
    out = -torch.sin(chi)
    if bfactor is not None:
        b = torch.as_tensor(np.asarray(bfactor, np.float64), device=device).reshape(-1, 1, 1)
        out = out * torch.exp(-b / 4 * f2[None, :, None])
    return out.to(torch.float32)


def shift_phase_polar(grid: PolarGrid, shifts: torch.Tensor) -> torch.Tensor:
    """exp(−2πi k·s/N) (…, R, M) for shifts (…, 2) px (x, y): multiplying a transform moves the
    image content by +s (applied to a particle with RELION origin s, it centres the particle)."""
    ph = (-2 * math.pi / grid.n) * (shifts[..., 0, None, None] * grid.kx + shifts[..., 1, None, None] * grid.ky)
    return torch.polar(torch.ones_like(ph), ph)


# ------------------------------------------------------------------------------ references


def reference_volume(volume, pad: int = 2, device=None) -> torch.Tensor:
    """Planar (1, 2, M, M, M) float32 (real, imaginary) form of the map's centred ×``pad``
    Fourier transform (:func:`cryodask.projection.volume_to_fourier`), for :func:`reference_slices`."""
    f = volume_to_fourier(volume, pad=pad, device=device)
    return torch.view_as_real(f).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def reference_slices(vol2: torch.Tensor, rotations, grid: PolarGrid, pad: int = 2, batch: int = 4096) -> torch.Tensor:
    """Central slices of a reference at ``rotations`` (J, 3, 3) sampled on the polar grid:
    complex64 (J, R, M). Sample k ↦ F(Aᵀ (kx, ky, 0)) by trilinear interpolation in the ×``pad``
    grid (radius-major order, which keeps the memory access local)."""
    m = vol2.shape[-1]
    device = vol2.device
    rot = torch.as_tensor(np.asarray(rotations, dtype=np.float32).reshape(-1, 3, 3), device=device)
    half = grid.m // 2 if grid.m % 2 == 0 else grid.m  # F(-k) = conj F(k): sample φ < π only
    out = torch.empty((len(rot), grid.r, grid.m), dtype=torch.complex64, device=device)
    scale = 2.0 / (m - 1)
    kx = grid.kx[:, None, :half, None] * (pad * scale)  # (R, 1, H, 1)
    ky = grid.ky[:, None, :half, None] * (pad * scale)
    for s in range(0, len(rot), batch):
        a = rot[s:s + batch]
        # grid_sample coordinates (R, J, H, 3): (pad (kx A[0] + ky A[1]) + M//2) · 2/(M-1) - 1
        g = kx * a[None, :, None, 0, :] + ky * a[None, :, None, 1, :] + (m // 2 * scale - 1.0)
        v = torch.nn.functional.grid_sample(vol2, g[None], mode="bilinear", padding_mode="zeros",
                                            align_corners=True)[0]  # (2, R, J, H)
        c = torch.complex(v[0], v[1]).permute(1, 0, 2)
        out[s:s + batch, :, :half] = c
        if half < grid.m:
            out[s:s + batch, :, half:] = torch.conj(c)
    return out


# ------------------------------------------------------------------------------ orientation grids


def fibonacci_sphere(n: int) -> np.ndarray:
    """``n`` near-uniform unit vectors (n, 3) (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    phi = math.pi * (1 + 5 ** 0.5) * i
    s = np.sqrt(1 - z * z)
    return np.stack([s * np.cos(phi), s * np.sin(phi), z], 1)


_GENERIC = np.array([0.1236, 0.3090, 0.9430])  # a direction on no symmetry element


def canonical_directions(d: np.ndarray, symmetry: str) -> tuple[np.ndarray, np.ndarray]:
    """Representative of each direction's orbit {gᵀ d}: the one nearest a generic direction.

    Returns (directions (n, 3), index of the group element g used)."""
    sym = _group(symmetry)
    orbit = np.einsum("gji,nj->ngi", sym, d)  # gᵀ d
    k = np.argmax(orbit @ _GENERIC, axis=1)
    return orbit[np.arange(len(d)), k], k


def direction_grid(step_deg: float, symmetry: str = "C1") -> np.ndarray:
    """Near-uniform viewing directions (J, 3) with spacing ≈ ``step_deg`` covering one asymmetric
    unit of ``symmetry`` (directions whose own orbit representative they are)."""
    n_all = int(math.ceil(4 * math.pi / math.radians(step_deg) ** 2))
    d = fibonacci_sphere(n_all)
    if symmetry.strip().upper() in ("C1", ""):
        return d
    c, _ = canonical_directions(d, symmetry)
    keep = np.einsum("ni,ni->n", c, d) > 1 - 1e-9
    return d[keep]


def rotations_from_directions(d: np.ndarray) -> np.ndarray:
    """Rotations (J, 3, 3) with ψ = 0 whose viewing direction Aᵀ e_z is ``d`` (J, 3)."""
    tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1, 1)))
    rot = np.degrees(np.arctan2(d[:, 1], d[:, 0]))
    return euler_to_matrix(rot, tilt, np.zeros(len(d)))


def rot_z(psi_rad) -> np.ndarray:
    """In-plane rotations Rz(ψ) (…, 3, 3) as RELION's psi (A = Rz(ψ)·A₀)."""
    psi = np.asarray(psi_rad, dtype=np.float64)
    c, s = np.cos(psi), np.sin(psi)
    out = np.zeros(psi.shape + (3, 3))
    out[..., 0, 0], out[..., 0, 1], out[..., 1, 0], out[..., 1, 1], out[..., 2, 2] = c, s, -s, c, 1
    return out


def axis_angle(v: np.ndarray) -> np.ndarray:
    """Rotation matrices (…, 3, 3) exp([v]×) for rotation vectors v (…, 3) (radians)."""
    v = np.asarray(v, dtype=np.float64)
    t = np.linalg.norm(v, axis=-1, keepdims=True)
    k = v / np.maximum(t, 1e-12)
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    z = np.zeros_like(kx)
    kk = np.stack([np.stack([z, -kz, ky], -1), np.stack([kz, z, -kx], -1), np.stack([-ky, kx, z], -1)], -2)
    t = t[..., None]
    return np.eye(3) + np.sin(t) * kk + (1 - np.cos(t)) * (kk @ kk)


# ------------------------------------------------------------------------------ scoring kernels


@dataclass
class ParticleChunk:
    """Polar, whitened data of a chunk of particles at one polar grid.

    ``x``: complex64 (b, R, M) transform of the masked images; ``ctf`` float32 (b, R, M);
    ``w`` float32 (R,) area / σ² per radius.
    """

    x: torch.Tensor
    ctf: torch.Tensor
    w: torch.Tensor
    grid: PolarGrid


def prepare_chunk(images_norm: torch.Tensor, defocus, grid: PolarGrid, pixel_size: float, optics,
                  sigma2: np.ndarray, support: float | None = None, ctf: bool = True) -> ParticleChunk:
    """Polar data of normalised images (see :func:`normalise_images`); ``sigma2`` (N//2+1,) noise
    power per shell (of the transform of the normalised, masked image)."""
    x = polar_transform(images_norm, grid, support)
    c = polar_ctf(defocus if ctf else None, grid, pixel_size, optics)
    if c.shape[0] == 1 and x.shape[0] > 1:
        c = c.expand(x.shape[0], -1, -1)
    s2 = torch.as_tensor(np.asarray(sigma2, dtype=np.float32), device=x.device)
    idx = grid.radii.round().long().clamp_max(len(s2) - 1)
    w = grid.area / s2[idx].clamp_min(1e-12)
    return ParticleChunk(x, c, w, grid)


def _scores_shared(y_hat: torch.Tensor, c2_hat: torch.Tensor, p_hat: torch.Tensor, q_hat: torch.Tensor,
                   n_psi: int) -> torch.Tensor:
    """Profile log-likelihood for every particle × shift × direction × ψ.

    ``y_hat`` (b, S, R, H) angular rfft (over φ; H = M//2+1 … kept) of w·C·X_s; ``c2_hat``
    (b, R, H) of w·C²; ``p_hat``/``q_hat`` (J, R, H) of the references P and |P|².
    Returns LL float32 (b, S, J, n_psi) with ψ_l = 2π l / n_psi.
    """
    b, s, r, h = y_hat.shape
    j = p_hat.shape[0]
    m_full = 2 * (h - 1)
    # G[m] = Σ_r Ŷ[m] conj(P̂[m]) as a real product: [Yr | Yi] @ [[Pr, -Pi], [Pi, Pr]]
    ya = torch.cat([y_hat.real, y_hat.imag], 2).permute(3, 0, 1, 2).reshape(h, b * s, 2 * r)
    pr, pi = p_hat.real.permute(2, 1, 0), p_hat.imag.permute(2, 1, 0)  # (H, R, J)
    pb = torch.cat([torch.cat([pr, -pi], 2), torch.cat([pi, pr], 2)], 1)  # (H, 2R, 2J)
    g = torch.bmm(ya, pb)  # (H, bS, 2J)
    g = torch.complex(g[..., :j], g[..., j:]).permute(1, 2, 0)  # (bS, J, H)
    num = torch.fft.irfft(torch.conj(g), n=n_psi, dim=-1) * (n_psi / m_full)
    ca = torch.cat([c2_hat.real, c2_hat.imag], 1).permute(2, 0, 1)  # (H, b, 2R)
    qr, qi = q_hat.real.permute(2, 1, 0), q_hat.imag.permute(2, 1, 0)
    qb = torch.cat([torch.cat([qr, -qi], 2), torch.cat([qi, qr], 2)], 1)
    d = torch.bmm(ca, qb)
    d = torch.complex(d[..., :j], d[..., j:]).permute(1, 2, 0)  # (b, J, H)
    den = torch.fft.irfft(torch.conj(d), n=n_psi, dim=-1) * (n_psi / m_full)
    num = num.reshape(b, s, j, n_psi)
    return 0.5 * num.clamp_min(0) ** 2 / den.clamp_min(1e-20)[:, None]


def _angular_rfft(z: torch.Tensor) -> torch.Tensor:
    """FFT over the last (angle) axis keeping m = 0 … M/2 (input Hermitian-in-angle data)."""
    return torch.fft.fft(z, dim=-1)[..., : z.shape[-1] // 2 + 1]


def shift_grid(max_shift: float, step: float) -> np.ndarray:
    """Shifts (S, 2) px on a square grid of ``step`` within a disc of ``max_shift`` px."""
    k = int(math.floor(max_shift / step + 1e-9))
    v = np.arange(-k, k + 1) * step
    xx, yy = np.meshgrid(v, v, indexing="xy")
    s = np.stack([xx.ravel(), yy.ravel()], 1)
    return s[(s ** 2).sum(1) <= max_shift ** 2 + 1e-9]


@dataclass
class Poses:
    """Per-particle poses: rotations (n, 3, 3), origins (n, 2) px (RELION sign), scores (n,)."""

    rotations: np.ndarray
    origins: np.ndarray
    scores: np.ndarray

    def take(self, idx) -> "Poses":
        return Poses(self.rotations[idx], self.origins[idx], self.scores[idx])


def global_search(chunk: ParticleChunk, ref_slices: torch.Tensor, rotations: np.ndarray, shifts: np.ndarray,
                  origins0: np.ndarray | None = None, top: int = 1, n_psi: int | None = None,
                  distinct: bool = True, budget: float = 2e7) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exhaustive search over reference ``rotations`` (J, 3, 3) (ψ = 0; their polar slices
    ``ref_slices`` (J, R, M)) × all ψ × ``shifts`` (S, 2) px (added to ``origins0`` (b, 2)).

    Returns the ``top`` best poses per particle (with ``distinct``, the best pose of each of the
    ``top`` best reference directions): rotations (b, top, 3, 3), origins (b, top, 2) px, scores
    (b, top) (profile log-likelihood), best first.
    """
    grid = chunk.grid
    b = chunk.x.shape[0]
    device = chunk.x.device
    n_psi = n_psi or grid.m
    p_hat = _angular_rfft(ref_slices)
    q_hat = _angular_rfft((ref_slices.abs() ** 2).to(torch.complex64))
    sh = torch.as_tensor(np.asarray(shifts, dtype=np.float32), device=device)
    o0 = torch.zeros((b, 2), device=device) if origins0 is None else torch.as_tensor(
        np.asarray(origins0, dtype=np.float32), device=device)
    wc = chunk.w[None, :, None] * chunk.ctf  # (b, R, M)
    c2_hat = _angular_rfft((wc * chunk.ctf).to(torch.complex64))
    j, s = len(rotations), len(sh)
    per = max(1, int(budget // max(1, s * j * n_psi)))
    out_r = np.empty((b, top, 3, 3))
    out_o = np.empty((b, top, 2))
    out_s = np.empty((b, top))
    for a in range(0, b, per):
        sl = slice(a, min(a + per, b))
        bb = sl.stop - sl.start
        orig = o0[sl, None, :] + sh[None]  # (bb, S, 2)
        y = (wc[sl, None] * chunk.x[sl, None]) * shift_phase_polar(grid, orig)
        ll = _scores_shared(_angular_rfft(y), c2_hat[sl], p_hat, q_hat, n_psi)  # (bb, S, J, L)
        if distinct:  # the best pose on each of the ``top`` best directions
            per_dir = ll.permute(0, 2, 1, 3).reshape(bb, j, -1)
            dval, dk = per_dir.max(2)  # (bb, J)
            val, ji = torch.topk(dval, top, dim=1)
            k = torch.gather(dk, 1, ji).cpu().numpy()
            ji = ji.cpu().numpy()
            si, li = np.divmod(k, n_psi)
        else:
            val, idx = torch.topk(ll.reshape(bb, -1), top, dim=1)
            idx = idx.cpu().numpy()
            si, rem = np.divmod(idx, j * n_psi)
            ji, li = np.divmod(rem, n_psi)
        out_r[sl] = rot_z(2 * math.pi * li / n_psi) @ rotations[ji]
        out_o[sl] = orig.cpu().numpy()[np.arange(bb)[:, None], si]
        out_s[sl] = val.cpu().numpy()
    return out_r, out_o, out_s


def _psi_basis(h: int, psi: np.ndarray, device) -> torch.Tensor:
    """Real (2H, W) matrix turning [Re G | Im G] (m = 0 … M/2) into Σ_m G(m) e^{−imψ}/M over all
    m (Hermitian in m) at the angles ``psi`` (W,) radians."""
    m_full = 2 * (h - 1)
    m = np.arange(h)
    c = np.where((m == 0) | (m == h - 1), 1.0, 2.0) / m_full
    ang = m[:, None] * np.asarray(psi, dtype=np.float64)[None]
    basis = np.concatenate([c[:, None] * np.cos(ang), c[:, None] * np.sin(ang)], 0)
    return torch.as_tensor(basis, dtype=torch.float32, device=device)


def _scores_local(y_hat: torch.Tensor, c2_hat: torch.Tensor, p_hat: torch.Tensor, q_hat: torch.Tensor,
                  basis: torch.Tensor) -> torch.Tensor:
    """Like :func:`_scores_shared` but with per-particle references ``p_hat``/``q_hat``
    (b, P, R, H), evaluated at the W in-plane angles of ``basis`` (:func:`_psi_basis`).
    Returns LL (b, S, P, W)."""
    g = torch.einsum("bsrh,bprh->bsph", y_hat, torch.conj(p_hat))
    num = torch.cat([g.real, g.imag], -1) @ basis
    d = torch.einsum("brh,bprh->bph", c2_hat, torch.conj(q_hat))
    den = torch.cat([d.real, d.imag], -1) @ basis
    return 0.5 * num.clamp_min(0) ** 2 / den.clamp_min(1e-20)[:, None]


def _shifted(z: torch.Tensor, grid: PolarGrid, origins: np.ndarray, step: np.ndarray) -> torch.Tensor:
    """z (b, R, M) shifted by origins (b, 2) + the 3×3 offsets × step (b,): (b, 9, R, M) in the
    order of ``_OFFSETS`` (x fastest)."""
    dev = z.device
    z = z * shift_phase_polar(grid, torch.as_tensor(origins, dtype=torch.float32, device=dev))
    st = torch.as_tensor(step, dtype=torch.float32, device=dev)
    ex = torch.exp(torch.complex(torch.zeros_like(grid.kx), (-2 * math.pi / grid.n) * grid.kx)[None]
                   * st[:, None, None])
    ey = torch.exp(torch.complex(torch.zeros_like(grid.ky), (-2 * math.pi / grid.n) * grid.ky)[None]
                   * st[:, None, None])
    zx = torch.stack([z * torch.conj(ex), z, z * ex], 1)  # (b, 3, R, M)
    fy = torch.stack([torch.conj(ey), torch.ones_like(ey), ey], 1)  # (b, 3, R, M)
    return (fy[:, :, None] * zx[:, None]).reshape(z.shape[0], 9, grid.r, grid.m)


_OFFSETS = np.array([(a, b) for b in (-1, 0, 1) for a in (-1, 0, 1)], dtype=np.float64)  # centre index 4


def local_search(chunk: ParticleChunk, vol2: torch.Tensor, rotations: np.ndarray, origins: np.ndarray, *,
                 angle_step: float, shift_step: float, min_angle: float, min_shift: float,
                 psi_window: float | None = None, psi_oversample: int = 4, max_rounds: int = 12,
                 pad: int = 2, per: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local refinement of the poses of one chunk (steps and windows in radians / px).

    Each round scores, for every particle, the 3×3 grid of viewing-direction moves (rotations by
    ``angle_step`` about the image x/y axes) × every ψ within ``psi_window`` of the current one
    (all ψ when None; trigonometric interpolation, ``psi_oversample`` × the polar sampling) ×
    the 3×3 grid of shift moves of ``shift_step`` px, and moves to the best; a particle whose
    best is its current direction and shift halves its steps, until they are below
    ``min_angle`` / ``min_shift``. Returns rotations (b, 3, 3), origins (b, 2), scores (b,).
    """
    grid = chunk.grid
    b = chunk.x.shape[0]
    device = chunk.x.device
    rot = np.array(rotations, dtype=np.float64).reshape(b, 3, 3)
    org = np.array(origins, dtype=np.float64).reshape(b, 2)
    score = np.full(b, -np.inf)
    a_step = np.full(b, float(angle_step))
    s_step = np.full(b, float(shift_step))
    active = np.ones(b, dtype=bool)
    step = 2 * math.pi / (psi_oversample * grid.m)
    if psi_window is None or psi_window >= math.pi:
        psi = np.arange(psi_oversample * grid.m) * step
    else:
        k = int(math.ceil(psi_window / step))
        psi = np.arange(-k, k + 1) * step
    basis = _psi_basis(grid.m // 2 + 1, psi, device)
    n_psi = len(psi)
    wc = chunk.w[None, :, None] * chunk.ctf
    c2_all = _angular_rfft((wc * chunk.ctf).to(torch.complex64))
    for _ in range(max_rounds):
        idx = np.nonzero(active)[0]
        if idx.size == 0:
            break
        for a in range(0, idx.size, per):
            ii = idx[a:a + per]
            bb = len(ii)
            v = np.zeros((bb, 9, 3))
            v[:, :, :2] = _OFFSETS[None] * a_step[ii, None, None]
            cand = axis_angle(v) @ rot[ii, None]  # (bb, 9, 3, 3) = D_p · A_i
            sl = reference_slices(vol2, cand.reshape(-1, 3, 3), grid, pad).reshape(bb, 9, grid.r, grid.m)
            p_hat = _angular_rfft(sl)
            q_hat = _angular_rfft((sl.abs() ** 2).to(torch.complex64))
            sh = org[ii, None, :] + _OFFSETS[None] * s_step[ii, None, None]  # (bb, 9, 2)
            ti = torch.as_tensor(ii, device=device)
            y = _shifted(wc[ti] * chunk.x[ti], grid, org[ii], s_step[ii])
            ll = _scores_local(_angular_rfft(y), c2_all[ti], p_hat, q_hat, basis)  # (bb, S, P, W)
            val, k = ll.reshape(bb, -1).max(1)
            k = k.cpu().numpy()
            val = val.cpu().numpy().astype(np.float64)
            si, rem = np.divmod(k, 9 * n_psi)
            pi_, li = np.divmod(rem, n_psi)
            better = val > score[ii] * (1 + 1e-7)
            new_rot = rot_z(psi[li]) @ cand[np.arange(bb), pi_]
            new_org = sh[np.arange(bb), si]
            stay = (~better) | ((pi_ == 4) & (si == 4))
            rot[ii[better]] = new_rot[better]
            org[ii[better]] = new_org[better]
            score[ii[better]] = val[better]
            a_step[ii[stay]] /= 2
            s_step[ii[stay]] /= 2
        active &= (a_step >= min_angle) | (s_step >= min_shift)
    return rot, org, score


@lru_cache(maxsize=16)
def _group(symmetry: str) -> np.ndarray:
    return symmetry_matrices(symmetry)


@lru_cache(maxsize=4)
def _half_points(m: int, device_str: str):
    """Half-grid voxel coordinates (x, y, z) inside |k| < M/2 and their flat indices in (M, M, M/2+1)."""
    h = m // 2
    kz = torch.arange(m, dtype=torch.float32, device=device_str) - h
    kx = torch.arange(h + 1, dtype=torch.float32, device=device_str)
    zz, yy, xx = torch.meshgrid(kz, kz, kx, indexing="ij")
    pts = torch.stack([xx, yy, zz], -1).reshape(-1, 3)
    inside = torch.nonzero((pts ** 2).sum(1) < h * h).reshape(-1)
    return pts[inside].contiguous(), inside


def symmetrize_accumulator(acc, symmetry):
    """Fourier accumulator (:class:`cryodask.reconstruct.FourierAccumulator`) of the symmetric
    average: data and weights summed over the rotations g of the point group, S(k) = Σ_g F(g k)
    (trilinear resampling of the ×pad grids, as RELION symmetrises its back-projector). Equal,
    up to that interpolation, to inserting every particle at A·g for all g; |G| times cheaper."""
    from .projection import hermitian_close
    from .reconstruct import FourierAccumulator

    sym = _group(symmetry) if isinstance(symmetry, str) else np.asarray(symmetry)
    if len(sym) == 1:
        return acc
    sums = acc.sums
    device = sums.device
    m = sums.shape[0] - 2
    h = m // 2
    closed = hermitian_close(sums)  # (M, M, M/2+1, 3): z, y = k + M/2; x = kx
    sign = torch.tensor([1.0, -1.0, 1.0], device=device)
    full = torch.zeros((m, m, m, 3), dtype=sums.dtype, device=device)
    full[:, :, h:] = closed[:, :, :h]
    # kx < 0: F(k) = conj F(-k); full[i, j, c] = conj closed[M-i, M-j, h-c] (i, j >= 1)
    full[1:, 1:, :h] = torch.flip(closed[1:, 1:, 1:h + 1], dims=(0, 1, 2)) * sign
    vol = full.permute(3, 0, 1, 2)[None].contiguous()
    del full
    p, inside = _half_points(m, str(device))
    out = torch.zeros((len(p), 3), dtype=sums.dtype, device=device)
    scale = 2.0 / (m - 1)
    g_all = torch.as_tensor(np.asarray(sym, dtype=np.float32), device=device)
    per = max(1, int(2e7 // max(1, len(p))))
    for a in range(0, len(sym), per):
        g = g_all[a:a + per]
        grid = torch.matmul(p, g.transpose(1, 2) * scale).add_(h * scale - 1.0)  # rows (g p)ᵀ
        v = torch.nn.functional.grid_sample(vol, grid[None, :, :, None], mode="bilinear", padding_mode="zeros",
                                            align_corners=True)  # (1, 3, G, P, 1)
        out += v[0, :, :, :, 0].sum(1).T
    res = torch.zeros_like(sums)
    flat = torch.zeros((m * m * (h + 1), 3), dtype=sums.dtype, device=device)
    flat[inside] = out
    res[:m, :m, :h + 1] = flat.reshape(m, m, h + 1, 3)
    res[:, :, 0] *= 0.5  # hermitian_close adds the two mates of the plane kx = 0
    return FourierAccumulator(res, acc.box, acc.pad, acc.count * len(sym))


# ------------------------------------------------------------------------------ helpers


def noise_spectrum(images_norm: torch.Tensor) -> np.ndarray:
    """Mean power |F(k)|² per shell (N//2+1,) of normalised, masked images (b, N, N)
    (signal + noise; at the SNRs of cryo-EM mostly noise): the initial whitening σ²."""
    from .projection import images_to_fourier

    n = images_norm.shape[-1]
    f = images_to_fourier(images_norm)
    ky = torch.fft.fftfreq(n, device=f.device) * n
    kx = torch.fft.rfftfreq(n, device=f.device) * n
    sh = torch.round(torch.sqrt(ky[:, None] ** 2 + kx[None] ** 2)).long().clamp_max(n // 2).reshape(-1)
    p = (f.abs() ** 2).mean(0).reshape(-1).to(torch.float64)
    tot = torch.zeros(n // 2 + 1, dtype=torch.float64, device=f.device).index_add_(0, sh, p)
    cnt = torch.zeros(n // 2 + 1, dtype=torch.float64, device=f.device).index_add_(0, sh, torch.ones_like(p))
    return (tot / cnt.clamp_min(1)).cpu().numpy()


def lowpass(volume: np.ndarray, resolution: float, pixel_size: float, edge_shells: float = 2.0) -> np.ndarray:
    """Low-pass a map (N, N, N) at ``resolution`` Å with a raised-cosine edge ``edge_shells`` wide."""
    n = volume.shape[0]
    f = np.fft.rfftn(volume)
    kz = np.fft.fftfreq(n) * n
    kx = np.fft.rfftfreq(n) * n
    r = np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)
    k0 = n * pixel_size / resolution
    t = np.clip((k0 + edge_shells / 2 - r) / edge_shells, 0, 1)
    return np.fft.irfftn(f * (0.5 - 0.5 * np.cos(np.pi * t)), s=volume.shape, axes=(0, 1, 2)).astype(np.float32)


def shell_of(resolution: float, n: int, pixel_size: float) -> float:
    """Fourier shell (px of the box) of a resolution in Å."""
    return n * pixel_size / resolution


@dataclass
class RefineSettings:
    """Knobs of :func:`refine_particles` (angles in degrees, shifts in px, resolutions in Å).

    ``fast()`` gives the setting the demo uses (fewer iterations, a coarser global search).
    """

    max_iterations: int = 8
    min_iterations: int = 5
    patience: int = 2
    global_iterations: int = 3  # iterations that search all orientations (then local only)
    global_directions: int = 500  # target number of reference directions in the asymmetric unit
    global_max_shift: float = 3.0
    precentre: bool = True  # centre the picks on the particles' rotational average first
    top_candidates: int = 3
    initial_lowpass: float | None = None
    local_start_deg: float = 2.0
    local_min_deg: float = 0.35
    local_min_shift: float = 0.1
    search_margin_shells: float = 3.0
    chunk: int = 250
    mask_edge: float = 3.0
    ctf_refine_rounds: int = 3  # per-micrograph defocus refinements per iteration, while accepted (0: off)
    ctf_refine_search: float = 5000.0  # ± Å around the current mean defocus
    abinitio: dict = field(default_factory=dict)  # keyword arguments of initial_model.ab_initio

    @classmethod
    def fast(cls) -> "RefineSettings":
        return cls(max_iterations=3, min_iterations=2, patience=1, global_iterations=1, global_directions=250,
                   top_candidates=2,
                   local_start_deg=2.0, local_min_deg=0.5, local_min_shift=0.15, abinitio={"iterations": 18,
                   "restarts": 8, "batch": 150})


def _sym_ops(symmetry: str) -> int:
    return len(_group(symmetry))


def _angular_error_deg(a: np.ndarray, b: np.ndarray, symmetry: str) -> np.ndarray:
    """Smallest rotation angle between A and B·g over the group (degrees), per particle."""
    from .geometry import rotation_angle_deg

    return np.min([rotation_angle_deg(a, b @ g) for g in _group(symmetry)], axis=0)


# ------------------------------------------------------------------------------ per-chunk tasks


def _chunk_data(images_norm: torch.Tensor, defocus, grid: PolarGrid, ctx: dict) -> ParticleChunk:
    return prepare_chunk(images_norm, defocus, grid, ctx["pixel_size"], ctx["optics"], ctx["sigma2"],
                         support=ctx["support"], ctf=defocus is not None)


def search_chunk(images_norm, defocus, poses: Poses | None, vol2: torch.Tensor, plan: dict, ctx: dict) -> Poses:
    """Orientation search of one chunk of particles against one half's reference (a pure task).

    ``plan``: ``kmax`` (Fourier px), ``global`` (bool) with ``rotations`` (J, 3, 3), ``shifts``
    (S, 2), ``kmax_global`` and ``top``; and the local ``angle_step``, ``min_angle``,
    ``psi_window`` (radians), ``shift_step``, ``min_shift`` (px). ``poses``: the previous
    poses (needed unless global).
    """
    x = torch.as_tensor(images_norm)
    d = ctx.get("diameter_px")
    grid = polar_grid(x.shape[-1], plan["kmax"], diameter_px=d, device=x.device)
    local_kw = dict(angle_step=plan["angle_step"], shift_step=plan["shift_step"], min_angle=plan["min_angle"],
                    min_shift=plan["min_shift"], psi_window=plan["psi_window"])
    data = _chunk_data(x, defocus, grid, ctx)
    if plan.get("global"):
        g_grid = polar_grid(x.shape[-1], plan["kmax_global"], diameter_px=d, device=x.device)
        g_data = _chunk_data(x, defocus, g_grid, ctx)
        refs = reference_slices(vol2, plan["rotations"], g_grid)
        o0 = None if poses is None else poses.origins
        rr, oo, _ = global_search(g_data, refs, plan["rotations"], plan["shifts"], o0, top=plan["top"])
        b, top = rr.shape[:2]
        if top > 1 and plan["kmax_global"] < plan["kmax"] - 0.5:
            # settle the candidates at the global search's resolution (cheap), then refine the
            # best one at the full search resolution
            kw = dict(local_kw, min_angle=max(plan["min_angle"], plan["angle_step"] / 4),
                      min_shift=max(plan["min_shift"], plan["shift_step"] / 4))
            r, o, s = local_search(_repeat(g_data, top), vol2, rr.reshape(-1, 3, 3), oo.reshape(-1, 2), **kw)
            best = np.arange(b) * top + np.argmax(s.reshape(b, top), 1)
            kw = dict(local_kw, angle_step=plan["angle_step"] / 2, shift_step=plan["shift_step"] / 2,
                      psi_window=plan["psi_window"] / 2)
            r, o, s = local_search(data, vol2, r[best], o[best], **kw)
            return Poses(r, o, s)
        r, o, s = local_search(_repeat(data, top), vol2, rr.reshape(-1, 3, 3), oo.reshape(-1, 2), **local_kw)
        s = s.reshape(b, top)
        best = np.argmax(s, 1)
        sel = np.arange(b) * top + best
        return Poses(r[sel], o[sel], s[np.arange(b), best])
    r, o, s = local_search(data, vol2, poses.rotations, poses.origins, **local_kw)
    return Poses(r, o, s)


def _repeat(data: ParticleChunk, k: int) -> ParticleChunk:
    if k == 1:
        return data
    return ParticleChunk(data.x.repeat_interleave(k, 0), data.ctf.repeat_interleave(k, 0), data.w, data.grid)


def accumulate_chunk(images, defocus, poses: Poses, ctx: dict):
    """Back-projection of one chunk with its poses (C1; symmetry is applied to the sums)."""
    from .reconstruct import accumulate

    return accumulate(images, poses.rotations, poses.origins, defocus, pixel_size=ctx["pixel_size"],
                      optics=ctx["optics"], symmetry="C1", device=ctx.get("device"))


def _tree(items, fn):
    from dask import delayed

    level = list(items)
    while len(level) > 1:
        nxt = [delayed(fn, pure=True)(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


@dataclass
class HalfMaps:
    """One iteration's gold-standard reconstruction: Wiener-filtered half maps (the next
    references), their FSC (N//2+1,) and the per-shell SSNR used, and the halves' sums."""

    half1: np.ndarray
    half2: np.ndarray
    fsc: np.ndarray
    ssnr: np.ndarray
    acc1: object
    acc2: object

    def resolution(self, pixel_size: float) -> dict[str, float]:
        from .fsc import resolution

        return resolution(self.fsc, pixel_size, self.half1.shape[0])


def half_maps(acc1, acc2, symmetry: str, pixel_size: float) -> HalfMaps:
    """Symmetrise each half's sums, invert them plainly, measure their FSC, then invert again with
    the Wiener term 1/τ² from that FSC (SSNR = FSC/(1−FSC), RELION's way): the filtered halves are
    the next references. The halves are processed separately; only the FSC curve is shared."""
    from .fsc import fsc_curve
    from .reconstruct import finalize, ssnr_from_fsc

    acc1, acc2 = symmetrize_accumulator(acc1, symmetry), symmetrize_accumulator(acc2, symmetry)
    c1, c2 = acc1.closed(), acc2.closed()
    p1 = finalize(acc1, closed=c1).cpu().numpy()
    p2 = finalize(acc2, closed=c2).cpu().numpy()
    fsc = fsc_curve(p1, p2)
    ssnr = ssnr_from_fsc(fsc)
    h1 = finalize(acc1, ssnr, closed=c1).cpu().numpy()
    h2 = finalize(acc2, ssnr, closed=c2).cpu().numpy()
    return HalfMaps(h1, h2, fsc, ssnr, acc1, acc2)


# ------------------------------------------------------------------------------ defocus refinement


def refine_defocus_groups(images, defocus: np.ndarray, rotations: np.ndarray, origins: np.ndarray,
                          subsets: np.ndarray, groups: np.ndarray, references: dict, pixel_size: float, optics,
                          resolution: float, *, low: float = 200.0, search: float = 5000.0,
                          min_particles: int = 10, device=None) -> tuple[np.ndarray, dict]:
    """Per-micrograph (per-group) mean defocus refined against the current references, the way
    RELION's CtfRefine fits defocus: each particle is compared with the projection of *its own
    half's* reference (gold standard) at its pose, and the group's mean defocus is chosen by
    :func:`cryodask.ctf_estimate.refine_defocus_to_reference` (exhaustive 1-D search, then a
    bounded refinement; astigmatism and per-particle offsets within a group are kept).

    ``images`` (n, N, N) as extracted (protein white, no CTF correction); ``defocus`` (n, 3) U, V
    (Å), angle (degrees); ``rotations`` (n, 3, 3), ``origins`` (n, 2) RELION origins in px;
    ``subsets`` (n,) 1/2; ``groups`` (n,) micrograph labels; ``references`` {1: (N, N, N), 2: ...}
    (each half's reference, same voxel size ``pixel_size`` Å); ``resolution`` Å: the top of the
    fitted band (the references' resolution), ``low`` Å its bottom; ``search`` ± Å around the
    current mean. Groups with fewer than ``min_particles`` particles keep their defocus.
    Returns the new (n, 3) defocus and ``{"shift_A": {group: Å}, "median_abs_shift_A": Å}``.
    """
    from .ctf_estimate import reference_cross_spectra, refine_defocus_to_reference
    from .projection import project, volume_to_half_fourier

    images = np.asarray(images, np.float32)
    defocus = np.asarray(defocus, np.float64)
    refs = np.empty_like(images)
    for h, vol in references.items():
        sel = np.flatnonzero(subsets == h)
        if not sel.size:
            continue
        fvol = volume_to_half_fourier(np.asarray(vol, np.float32), device=device)
        for a in range(0, sel.size, 512):
            s = sel[a:a + 512]
            refs[s] = project(None, rotations[s], origins[s], fvol=fvol).cpu().numpy()
    new = defocus.copy()
    shifts = {}
    low = min(float(low), images.shape[-1] * pixel_size / 2)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        if idx.size < min_particles:
            continue
        cross, power = reference_cross_spectra(images[idx], refs[idx])
        u, v = float(defocus[idx, 0].mean()), float(defocus[idx, 1].mean())
        ang = float(defocus[idx[0], 2])
        r = refine_defocus_to_reference(cross, power, pixel_size, u, v, ang, voltage=optics.voltage, cs=optics.cs,
                                        amplitude_contrast=optics.amplitude_contrast, search=search,
                                        resolution_range=(low, resolution), fit_astigmatism=False)
        if r["score"] <= 0:
            continue
        d = 0.5 * (r["rlnDefocusU"] + r["rlnDefocusV"]) - 0.5 * (u + v)
        new[idx, 0] += d
        new[idx, 1] += d
        shifts[str(g)] = float(d)
    med = float(np.median(np.abs(list(shifts.values())))) if shifts else 0.0
    return new, {"shift_A": shifts, "median_abs_shift_A": med}


def _fsc_area(fsc: np.ndarray) -> float:
    """Mean FSC over the shells 1 … N/2: a smooth measure of half-map agreement."""
    return float(np.mean(np.asarray(fsc)[1:]))


# ------------------------------------------------------------------------------ driver


def _concat_poses(parts: list[Poses]) -> Poses:
    return Poses(np.concatenate([p.rotations for p in parts]), np.concatenate([p.origins for p in parts]),
                 np.concatenate([p.scores for p in parts]))


def refine_particles(images, table, pixel_size: float, optics=None, *, symmetry: str = "C1",
                     diameter: float | None = None, seed: int = 0, initial="auto",
                     settings: RefineSettings | None = None, threads: int | None = None, device=None,
                     shape_hint: dict | None = None, log=None, truth: dict | None = None) -> dict:
    """Gold-standard refinement of particles with no user-supplied model.

    Parameters
    ----------
    images : (n, N, N) numpy or dask array of particle images (protein white, CTF not corrected).
    table : DataFrame (or dict of columns) with rlnDefocusU/V/Angle (Å, deg) (CTF off when
        absent) and optionally rlnRandomSubset (1/2; drawn with ``seed`` when absent).
    pixel_size : Å/px.  optics : voltage (kV), cs (mm), amplitude_contrast (default 300/2.7/0.1).
    symmetry : point group (C1, Cn, Dn, T, O, I), used in the search and the reconstruction.
    diameter : particle diameter in Å (default 0.7 × box).
    initial : ``'auto'``, ``'sphere'``, ``'cylinder'``, ``'abinitio'`` or a volume (N, N, N);
        see :func:`cryodask.initial_model.build_initial_model`.
    settings : :class:`RefineSettings` (``RefineSettings.fast()`` for the demo).
    threads : Dask threaded workers (default: all cores).
    truth : optional ``{"rotations": (n,3,3), "origins": (n,2) px}`` for logging pose errors only.

    Returns
    -------
    dict with ``map``, ``half1``, ``half2`` (N, N, N) float32, ``fsc`` (N//2+1,), ``resolution``
    (``fsc0.143``/``fsc0.5`` Å, half maps), ``table`` (input columns plus rlnAngleRot/Tilt/Psi,
    rlnOriginXAngst/YAngst, rlnRandomSubset, rlnLogLikeliContribution), ``initial`` (the
    initial-model record), ``history`` (per iteration), ``seconds``.
    """
    import os
    import time

    import dask
    import pandas as pd
    from dask import delayed

    from .initial_model import build_initial_model
    from .reconstruct import random_subsets

    t_start = time.perf_counter()
    settings = settings or RefineSettings()
    log = log or (lambda msg: None)
    optics = optics or _DefaultOptics()
    device = device or default_device()
    threads = threads or os.cpu_count() or 1
    images = np.asarray(images, dtype=np.float32)
    n, box = images.shape[0], images.shape[-1]
    table = pd.DataFrame(table).reset_index(drop=True)
    if len(table) != n:
        raise ValueError(f"{n} images but {len(table)} table rows")
    diameter = float(diameter) if diameter else 0.7 * box * pixel_size
    d_px = diameter / pixel_size
    has_ctf = "rlnDefocusU" in table
    defocus = (np.stack([table["rlnDefocusU"], table.get("rlnDefocusV", table["rlnDefocusU"]),
                         table.get("rlnDefocusAngle", pd.Series(np.zeros(n)))], 1).astype(np.float64)
               if has_ctf else None)
    subsets = (table["rlnRandomSubset"].to_numpy().astype(np.int64) if "rlnRandomSubset" in table
               else random_subsets(n, seed))
    mask_r = min(d_px / 2 + 3, box / 2 - settings.mask_edge - 1)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else prev_threads)
    try:
        # where the first global search looks (± global_max_shift around it): the pick itself,
        # unless the particle's centre on the rotational average is more than half the range
        # away (a well-centred pick beats a 2D estimate; a badly centred one may have its true
        # centre outside the range)
        prior = np.zeros((n, 2))
        precentre = None
        if settings.precentre:
            prior = centre_on_rotational_average(images, d_px, device=device)
            rr = np.hypot(prior[:, 0], prior[:, 1])
            far = rr > 0.5 * settings.global_max_shift
            prior[~far] = 0.0
            precentre = {"median_px": round(float(np.median(rr)), 2), "p90_px": round(float(np.percentile(rr, 90)), 2),
                         "moved_fraction": round(float(far.mean()), 3)}
            log(f"centring the picks on their rotational average: {precentre['median_px']} px away (median; "
                f"90 %: {precentre['p90_px']} px); {100 * far.mean():.0f} % are more than half the search range "
                f"away and are searched around that centre")
        norm = normalise_images(images, mask_r, settings.mask_edge, device=device)
        sigma2 = noise_spectrum(norm)
        ctx = {"pixel_size": pixel_size, "optics": optics, "sigma2": sigma2, "support": mask_r + settings.mask_edge,
               "diameter_px": d_px, "device": device}
        # ---- initial model (all particles, low resolution)
        t0 = time.perf_counter()
        vol0, init_info = build_initial_model(initial, images, table, pixel_size, optics, symmetry=symmetry,
                                              diameter=diameter, seed=seed, shape_hint=shape_hint,
                                              threads=threads, device=device, log=log, **settings.abinitio)
        init_info["seconds"] = round(time.perf_counter() - t0, 1)
        log(f"initial model: {init_info['kind']} ({init_info['seconds']} s)")
        lp = settings.initial_lowpass or float(np.clip(diameter / 5, 25.0, 60.0))
        lp = max(lp, 2.5 * pixel_size)
        smask = soft_sphere(box, min(d_px / 2 + 2, box / 2 - 3), 3.0)
        start = lowpass(vol0, lp, pixel_size) * smask
        refs = {1: reference_volume(start, device=device), 2: reference_volume(start, device=device)}
        # ---- chunks
        chunks = []
        for a in range(0, n, settings.chunk):
            sl = np.arange(a, min(a + settings.chunk, n))
            for h in (1, 2):
                idx = sl[subsets[sl] == h]
                if idx.size:
                    chunks.append((h, idx))
        poses = {c: Poses(np.tile(np.eye(3), (idx.size, 1, 1)), prior[idx], np.zeros(idx.size))
                 for c, (h, idx) in enumerate(chunks)}
        history = []
        res = lp
        best_res, stall = np.inf, 0
        order = _sym_ops(symmetry)
        rec = None
        groups = (table["rlnMicrographName"].astype(str).to_numpy()
                  if has_ctf and settings.ctf_refine_rounds > 0 and "rlnMicrographName" in table else None)

        def reconstruct_halves(dfs):
            accs = {1: [], 2: []}
            for c, (h, idx) in enumerate(chunks):
                accs[h].append(delayed(accumulate_chunk, pure=True)(images[idx], None if dfs is None else dfs[idx],
                                                                    poses[c], ctx))
            return dask.compute(delayed(half_maps, pure=True)(_tree(accs[1], _combine), _tree(accs[2], _combine),
                                                              symmetry, pixel_size),
                                scheduler="threads", num_workers=threads)[0]

        for it in range(settings.max_iterations):
            t_it = time.perf_counter()
            is_global = it < settings.global_iterations
            kmax = min(box // 2, math.ceil(shell_of(res, box, pixel_size) * (1.0 if it == 0 else 1.15)
                                           + settings.search_margin_shells * (it > 0)))
            plan = {"kmax": kmax, "global": is_global}
            if is_global:
                step = math.sqrt(4 * math.pi / (order * settings.global_directions))
                step = max(step, math.radians(3.0))
                dirs = direction_grid(math.degrees(step), symmetry)
                # the first global search works at the start's resolution; later ones at the
                # half-map FSC's (capped by what the angular step resolves), around the origins found
                kg_cap = kmax if it == 0 else min(kmax, shell_of(res, box, pixel_size))
                kg = float(np.clip(0.75 * box / (d_px * step), 4, kg_cap))
                sstep = float(np.clip(box / (4 * kg), 1.0, 2.0))
                shifts = shift_grid(settings.global_max_shift, sstep) if it == 0 else shift_grid(1.0, 1.0)
                plan.update(rotations=rotations_from_directions(dirs), kmax_global=kg,
                            shifts=shifts, top=settings.top_candidates,
                            angle_step=step / 2, psi_window=step, shift_step=sstep / 2,
                            min_angle=math.radians(settings.local_min_deg), min_shift=settings.local_min_shift)
            else:
                a0 = math.radians(settings.local_start_deg if it == settings.global_iterations
                                  else max(settings.local_start_deg / 2, settings.local_min_deg * 2))
                plan.update(angle_step=a0, psi_window=2.5 * a0, shift_step=0.5 if it == settings.global_iterations else 0.25,
                            min_angle=math.radians(settings.local_min_deg), min_shift=settings.local_min_shift)
            tasks = []
            for c, (h, idx) in enumerate(chunks):
                x = norm[idx]
                dfc = None if defocus is None else defocus[idx]
                tasks.append(delayed(search_chunk, pure=True)(x, dfc, poses[c], refs[h], plan, ctx))
            new = dask.compute(*tasks, scheduler="threads", num_workers=threads)
            t_search = time.perf_counter() - t_it
            poses = dict(enumerate(new))
            rec = reconstruct_halves(defocus)
            ctf_entry = None
            if groups is not None:
                # per-micrograph defocus against each half's own reference at the new poses; the
                # references are the plainly inverted (not Wiener-filtered) half maps, whose radial
                # profile does not pull the fit; a round is kept only when the half maps
                # reconstructed with it agree better (FSC), so the defocus cannot drift with them
                from .reconstruct import finalize

                t_c = time.perf_counter()
                allp = _gather_poses(poses, chunks, n)
                ctf_entry = {"rounds": [], "band_top_A": None}
                for _ in range(settings.ctf_refine_rounds):
                    top = max(rec.resolution(pixel_size)["fsc0.143"], 2.0 * pixel_size)
                    ref = {h: lowpass(finalize(a).cpu().numpy(), top, pixel_size) * smask
                           for h, a in ((1, rec.acc1), (2, rec.acc2))}
                    trial, cinfo = refine_defocus_groups(images, defocus, allp.rotations, allp.origins, subsets,
                                                         groups, ref, pixel_size, optics, top,
                                                         search=settings.ctf_refine_search, device=device)
                    rec2 = reconstruct_halves(trial)
                    a0, a1 = _fsc_area(rec.fsc), _fsc_area(rec2.fsc)
                    ctf_entry["rounds"].append({"median_abs_shift_A": round(cinfo["median_abs_shift_A"], 1),
                                                "fsc_area": [round(a0, 4), round(a1, 4)], "accepted": a1 > a0})
                    ctf_entry["band_top_A"] = round(float(top), 2)
                    if a1 <= a0:
                        break
                    defocus, rec = trial, rec2
                ctf_entry["seconds"] = round(time.perf_counter() - t_c, 1)
            r = rec.resolution(pixel_size)
            entry = {"iteration": it + 1, "global": bool(is_global), "kmax": int(kmax),
                     "search_resolution_A": round(box * pixel_size / kmax, 2),
                     "fsc0.143": round(r["fsc0.143"], 2), "fsc0.5": round(r["fsc0.5"], 2),
                     "search_s": round(t_search, 1), "seconds": round(time.perf_counter() - t_it, 1)}
            if ctf_entry is not None:
                entry["defocus_refinement"] = ctf_entry
            if truth is not None:
                allp = _gather_poses(poses, chunks, n)
                e = _angular_error_deg(allp.rotations, truth["rotations"], symmetry)
                entry["truth_angle_err_median"] = round(float(np.median(e)), 2)
                entry["truth_angle_err_p90"] = round(float(np.percentile(e, 90)), 2)
            history.append(entry)
            log(f"iteration {it + 1}: {entry}")
            res = r["fsc0.143"]
            if res < best_res * 0.99:
                best_res, stall = res, 0
            else:
                stall += 1
            if it + 1 >= settings.min_iterations and stall >= settings.patience:
                break
            for h, half in ((1, rec.half1), (2, rec.half2)):
                refs[h] = reference_volume(half * smask, device=device)
        # the result is the last iteration's (choosing the iteration with the best half-map FSC was
        # measured to return maps whose FSC over-states their resolution: KLH-like data, gap 13.6 %)
        best_it = len(history)
        allp = _gather_poses(poses, chunks, n)
    finally:
        torch.set_num_threads(prev_threads)
    final = _final_maps(rec, pixel_size, diameter)
    out_table = table.copy()
    rot, tilt, psi = matrix_to_euler(allp.rotations)
    out_table["rlnAngleRot"], out_table["rlnAngleTilt"], out_table["rlnAnglePsi"] = rot, tilt, psi
    out_table["rlnOriginXAngst"] = allp.origins[:, 0] * pixel_size
    out_table["rlnOriginYAngst"] = allp.origins[:, 1] * pixel_size
    out_table["rlnRandomSubset"] = subsets
    if has_ctf:  # the defocus the final maps were reconstructed with (refined per micrograph)
        out_table["rlnDefocusU"], out_table["rlnDefocusV"] = defocus[:, 0], defocus[:, 1]
        out_table["rlnDefocusAngle"] = defocus[:, 2]
    out_table["rlnLogLikeliContribution"] = allp.scores
    return {**final, "table": out_table, "initial": init_info, "history": history, "final_iteration": best_it,
            "initial_lowpass_A": lp, "precentre": precentre,
            "symmetry": symmetry, "pixel_size": pixel_size, "diameter_A": diameter,
            "seconds": round(time.perf_counter() - t_start, 1), "initial_map": vol0}


def _final_maps(rec: HalfMaps, pixel_size: float, diameter: float) -> dict:
    """The final gold-standard result from the last iteration's (symmetrised) half sums, by
    :func:`cryodask.reconstruct.gold_standard` (the same code as ``cryodask reconstruct``):
    combined map Wiener-filtered with the half-map FSC, unfiltered half maps, FSC, resolution."""
    from .fsc import resolution
    from .reconstruct import gold_standard

    g = gold_standard(rec.acc1, rec.acc2, pixel_size)
    n = g.map.shape[0]
    return {"map": g.map, "half1": g.half1, "half2": g.half2, "fsc": g.fsc,
            "resolution": resolution(g.fsc, pixel_size, n)}


def _combine(a, b):
    from .reconstruct import combine

    return combine(a, b)


def _gather_poses(poses: dict, chunks: list, n: int) -> Poses:
    out = Poses(np.zeros((n, 3, 3)), np.zeros((n, 2)), np.zeros(n))
    for c, (_, idx) in enumerate(chunks):
        p = poses[c]
        out.rotations[idx], out.origins[idx], out.scores[idx] = p.rotations, p.origins, p.scores
    return out


class _DefaultOptics:
    voltage, cs, amplitude_contrast = 300.0, 2.7, 0.1


# ------------------------------------------------------------------------------ outputs


def write_angular_distribution_png(path, rotations: np.ndarray, symmetry: str = "C1", title: str = "") -> None:
    """Histogram of viewing directions (rot, tilt) of poses (n, 3, 3), equal-area (cos tilt), PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rot, tilt, _ = matrix_to_euler(rotations)
    fig = Figure(figsize=(6, 3.4), dpi=100)
    ax = fig.add_subplot()
    h = ax.hist2d(rot, np.cos(np.radians(tilt)), bins=(72, 36), range=((-180, 180), (-1, 1)), cmap="viridis")
    fig.colorbar(h[3], ax=ax, label="particles")
    ax.set_xlabel("rot (degrees)")
    ax.set_ylabel("cos(tilt)")
    ax.set_title(title or f"angular distribution ({len(rot)} particles, {symmetry})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def write_refinement_outputs(out_dir, result: dict, images: np.ndarray, pixel_size: float, optics_table=None) -> dict:
    """Write ``map.mrc``, ``half1.mrc``, ``half2.mrc``, ``fsc.csv``, ``fsc.png``,
    ``angular_distribution.png``, ``initial_model.mrc``, the particle stack ``particles.mrcs``
    and ``particles.star`` (RELION 3.1: optics + particles with the refined angles, origins in Å,
    CTF and rlnRandomSubset, rlnImageName pointing at the stack in ``out_dir``), and
    ``refine.json``. Returns the figures written to ``refine.json``."""
    import json
    from pathlib import Path

    import pandas as pd
    import xarray as xr

    from .fsc import write_fsc_csv, write_fsc_png
    from .io.mrc import write_map, write_stack
    from .io.star import format_image_name, write_particles

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = result["map"].shape[0]
    write_map(out / "map.mrc", result["map"], pixel_size)
    write_map(out / "half1.mrc", result["half1"], pixel_size)
    write_map(out / "half2.mrc", result["half2"], pixel_size)
    if result.get("initial_map") is not None:
        write_map(out / "initial_model.mrc", result["initial_map"], pixel_size)
    write_fsc_csv(out / "fsc.csv", {"fsc_half_maps": result["fsc"]}, n, pixel_size)
    res = result["resolution"]
    write_fsc_png(out / "fsc.png", {"gold-standard half maps": result["fsc"]}, n, pixel_size,
                  title=f"refined, {result['symmetry']}: FSC0.143 = {res['fsc0.143']:.2f} Å, "
                        f"FSC0.5 = {res['fsc0.5']:.2f} Å")
    t = result["table"]
    rots = euler_to_matrix(t["rlnAngleRot"], t["rlnAngleTilt"], t["rlnAnglePsi"])
    write_angular_distribution_png(out / "angular_distribution.png", rots, result["symmetry"])
    write_stack(out / "particles.mrcs", np.asarray(images, dtype=np.float32), pixel_size)
    parts = pd.DataFrame(t).copy()
    parts["rlnImageName"] = [format_image_name(i, "particles.mrcs") for i in range(len(parts))]
    parts["rlnOpticsGroup"] = 1
    keep = sorted(c for c in parts.columns if c.startswith("rln"))  # deterministic column order
    opt = optics_table or {}
    optics = {"rlnOpticsGroup": np.array([1]), "rlnOpticsGroupName": np.array(["opticsGroup1"]),
              "rlnVoltage": np.array([float(opt.get("voltage", 300.0))]),
              "rlnSphericalAberration": np.array([float(opt.get("cs", 2.7))]),
              "rlnAmplitudeContrast": np.array([float(opt.get("amplitude_contrast", 0.1))]),
              "rlnImagePixelSize": np.array([float(pixel_size)]), "rlnImageSize": np.array([int(n)]),
              "rlnImageDimensionality": np.array([2])}
    group = optics.pop("rlnOpticsGroup")
    ds = xr.Dataset({**{c: ("particle", np.asarray(parts[c].to_numpy())) for c in keep},
                     **{(f"optics_{c}" if c in keep else c): ("optics", v) for c, v in optics.items()}},
                    coords={"optics": group})
    optics = {"rlnOpticsGroup": group, **optics}
    ds.attrs["star_particle_columns"] = ["rlnImageName"] + [c for c in keep if c != "rlnImageName"]
    ds.attrs["star_optics_columns"] = list(optics)
    write_particles(out / "particles.star", ds)
    figures = {"resolution_A": {k: round(float(v), 3) for k, v in res.items()}, "initial_model": result["initial"],
               "initial_lowpass_A": result["initial_lowpass_A"], "symmetry": result["symmetry"],
               "n_particles": int(len(parts)), "box": int(n), "pixel_size": float(pixel_size),
               "seconds": result["seconds"], "history": result["history"]}
    (out / "refine.json").write_text(json.dumps(figures, indent=2, default=float))
    return figures


def refine_star(star_in, out_dir, symmetry: str = "C1", diameter: float | None = None, *, seed: int = 0,
                initial="auto", fast: bool = False, threads: int | None = None, log=None) -> dict:
    """Refine the particles of a RELION particle STAR (angles, if any, are ignored) from no model.

    Reads the images and CTF of ``star_in``, runs :func:`refine_particles` and writes its outputs
    to ``out_dir`` (:func:`write_refinement_outputs`); ``relion_reconstruct --i particles.star
    --ctf`` run inside ``out_dir`` reconstructs the map from the written poses.
    Returns the figures (also in ``out_dir/refine.json``).
    """
    from .errors import InputError
    from .io.star import per_particle, read_particle_images, read_particles

    ds = read_particles(star_in)
    try:
        apix = float(per_particle(ds, "rlnImagePixelSize")[0])
    except KeyError:
        raise InputError(star_in, "no pixel size (rlnImagePixelSize) in the optics table") from None
    images = read_particle_images(ds)

    def opt(label, default):
        try:
            return float(per_particle(ds, label)[0])
        except KeyError:
            return default

    class _Opt:
        voltage = opt("rlnVoltage", 300.0)
        cs = opt("rlnSphericalAberration", 2.7)
        amplitude_contrast = opt("rlnAmplitudeContrast", 0.1)

    cols = {c: ds[c].values for c in ds.data_vars if ds[c].dims == ("particle",)
            and c.startswith("rln") and c not in ("rlnImageName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
                                                  "rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginX", "rlnOriginY",
                                                  "rlnOpticsGroup", "rlnMicrographName")}
    import pandas as pd

    table = pd.DataFrame(cols)
    for c in ("rlnMicrographName",):
        if c in ds.data_vars:
            table[c] = ds[c].values
    res = refine_particles(images, table, apix, _Opt(), symmetry=symmetry, diameter=diameter, seed=seed,
                           initial=initial, settings=RefineSettings.fast() if fast else None, threads=threads,
                           log=log)
    return write_refinement_outputs(out_dir, res, images, apix,
                                    {"voltage": _Opt.voltage, "cs": _Opt.cs, "amplitude_contrast": _Opt.amplitude_contrast})


def main(argv=None) -> int:
    """``python -m cryodask.refine particles.star OUT_DIR --symmetry O --diameter 130``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m cryodask.refine", description=refine_star.__doc__)
    ap.add_argument("star")
    ap.add_argument("out")
    ap.add_argument("--symmetry", default="C1")
    ap.add_argument("--diameter", type=float, help="particle diameter, Å")
    ap.add_argument("--initial", default="auto", help="auto, sphere, cylinder, abinitio or a map (.mrc)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    init = a.initial
    if init.endswith(".mrc"):
        from .io.mrc import read_map

        init = read_map(init)[0]
    fig = refine_star(a.star, a.out, a.symmetry, a.diameter, seed=a.seed, initial=init, fast=a.fast,
                      threads=a.threads, log=lambda m: print(m, flush=True))
    print(json.dumps({k: fig[k] for k in ("resolution_A", "initial_model", "seconds")}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
