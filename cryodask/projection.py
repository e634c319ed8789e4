"""Fourier-slice projection and its adjoint (back-projection), batched in torch.

Geometry follows :mod:`cryodask.geometry` (RELION's convention). A volume of box ``N`` is padded
to ``M = pad·N``, pre-divided by the trilinear gridding kernel (separable sinc²), and Fourier
transformed once; each image of box ``N`` is then the inverse 2D FFT of the central slice
``F(pad · Aᵀ (kx, ky, 0)ᵀ)`` sampled by trilinear interpolation, cut to the sphere of
radius ``N/2`` (Nyquist), as RELION's projector does.

Array layouts: volumes ``(z, y, x)``; images ``(n, y, x)``; 2D transforms in ``rfft2`` layout
``(n, N, N//2+1)`` of the image with its centre (index ``N//2``) moved to the origin
(``ifftshift``); 3D transforms full and centred (index ``M//2`` is zero frequency).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "default_device",
    "gridding_correction",
    "volume_to_fourier",
    "slice_coordinates",
    "extract_slices",
    "planar_fourier_volume",
    "insert_slices",
    "half_grid_shape",
    "scatter_half",
    "hermitian_close",
    "images_to_fourier",
    "fourier_to_images",
    "shift_phases",
    "project",
    "project_real_space",
]


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def gridding_correction(m: int, n: int, device=None) -> torch.Tensor:
    """Real-space profile of trilinear interpolation on an ``m``-grid, cropped to box ``n``.

    Trilinear interpolation in Fourier space multiplies real space by
    ``sinc²(x/m) sinc²(y/m) sinc²(z/m)`` (x in voxels from the centre); dividing by it before
    projection (or after back-projection) undoes that apodisation. Shape ``(n, n, n)``.
    """
    x = torch.arange(n, dtype=torch.float64, device=device) - n // 2
    s = torch.special.sinc(x / m) ** 2
    return (s[:, None, None] * s[None, :, None] * s[None, None, :]).to(torch.float32)


def volume_to_fourier(volume, pad: int = 2, device=None) -> torch.Tensor:
    """Centred full 3D FFT of the gridding-corrected, zero-padded volume.

    ``volume``: array (N, N, N). Returns complex64 tensor (M, M, M), M = pad·N, with zero
    frequency at index M//2 on each axis.
    """
    device = device or default_device()
    v = torch.as_tensor(np.asarray(volume, dtype=np.float32), device=device)
    n = v.shape[0]
    m = pad * n
    v = v / gridding_correction(m, n, device)
    big = torch.zeros((m, m, m), dtype=torch.float32, device=device)
    o = m // 2 - n // 2
    big[o:o + n, o:o + n, o:o + n] = v
    f = torch.fft.fftn(torch.fft.ifftshift(big))
    return torch.fft.fftshift(f).to(torch.complex64)


def _rfft_grid(n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ky = torch.fft.fftfreq(n, device=device) * n
    kx = torch.fft.rfftfreq(n, device=device) * n
    return torch.meshgrid(ky, kx, indexing="ij")


def slice_coordinates(rotations, n: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """3D grid coordinates (in padded-grid index units, centred) of the central slices.

    Returns ``(coords, inside)``: coords (b, N, N//2+1, 3) ordered (x, y, z); inside a boolean
    (N, N//2+1) mask of the frequencies within the Nyquist sphere.
    """
    r = torch.as_tensor(np.asarray(rotations), dtype=torch.float32, device=device)
    ky, kx = _rfft_grid(n, device)
    inside = (kx**2 + ky**2) <= (n / 2) ** 2
    # k3 = Aᵀ (kx, ky, 0): column j of Aᵀ is row j of A
    coords = pad * (kx[None, ..., None] * r[:, None, None, 0, :] + ky[None, ..., None] * r[:, None, None, 1, :])
    return coords, inside


def _corners(coords: torch.Tensor, m: int):
    """Flat indices and weights of the 8 trilinear neighbours; coords (..., 3) as (x, y, z).

    Reference implementation on the full centred grid (kept for tests and small jobs)."""
    p = coords + m // 2
    p0 = torch.floor(p)
    f = p - p0
    i0 = p0.to(torch.int64)
    out_idx, out_w = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                ix, iy, iz = i0[..., 0] + dx, i0[..., 1] + dy, i0[..., 2] + dz
                w = (f[..., 0] if dx else 1 - f[..., 0]) * (f[..., 1] if dy else 1 - f[..., 1]) * (
                    f[..., 2] if dz else 1 - f[..., 2])
                ok = (ix >= 0) & (ix < m) & (iy >= 0) & (iy < m) & (iz >= 0) & (iz < m)
                idx = (iz.clamp(0, m - 1) * m + iy.clamp(0, m - 1)) * m + ix.clamp(0, m - 1)
                out_idx.append(idx)
                out_w.append(torch.where(ok, w, torch.zeros_like(w)))
    return torch.stack(out_idx, -1), torch.stack(out_w, -1)


def planar_fourier_volume(fvol: torch.Tensor) -> torch.Tensor:
    """Real and imaginary planes of a centred 3D transform as float32 (1, 2, M, M, M).

    The layout :func:`extract_slices` samples from (``torch.nn.functional.grid_sample``);
    pass the result instead of ``fvol`` to reuse it across calls.
    """
    return torch.view_as_real(fvol).permute(3, 0, 1, 2).unsqueeze(0).contiguous()


def extract_slices(fvol: torch.Tensor, rotations, n: int, pad: int = 2, batch: int = 512) -> torch.Tensor:
    """Central slices of a centred 3D transform: complex64 (b, N, N//2+1), rfft layout.

    ``fvol``: complex (M, M, M) from :func:`volume_to_fourier`, or its
    :func:`planar_fourier_volume` form. Trilinear interpolation (``grid_sample``, zero outside
    the grid); frequencies beyond the Nyquist circle (radius N/2) are zero.
    """
    vol2 = planar_fourier_volume(fvol) if fvol.is_complex() else fvol
    m = vol2.shape[-1]
    device = vol2.device
    rot = np.asarray(rotations).reshape(-1, 3, 3)
    out = torch.empty((len(rot), n, n // 2 + 1), dtype=torch.complex64, device=device)
    scale = 2.0 / (m - 1)
    for s in range(0, len(rot), batch):
        coords, inside = slice_coordinates(rot[s:s + batch], n, pad, device)
        # grid_sample (align_corners): index i <-> 2 i / (M-1) - 1; index = coord + M//2
        grid = (coords + m // 2) * scale - 1.0
        vals = torch.nn.functional.grid_sample(vol2, grid[None], mode="bilinear", padding_mode="zeros",
                                               align_corners=True)[0]  # (2, b, N, N//2+1)
        vals = vals * inside
        out[s:s + batch] = torch.complex(vals[0], vals[1])
    return out


# ---------------------------------------------------------------- back-projection (half grid)
#
# Accumulators hold only the half kx >= 0 of the 3D transform (real data are Hermitian): a
# sample at k with k_x < 0 is added at its Friedel mate -k with its imaginary part negated,
# which halves the work. Layout: float32 (M+2, M+2, M//2+2, C), indexed (z, y, x, channel) with
# z, y = k + M//2 and x = k_x; the extra planes take the trilinear spill-over at k = M/2.
# :func:`hermitian_close` then restores the plane k_x = 0, whose two halves the mates share.


def half_grid_shape(m: int, channels: int = 3) -> tuple[int, int, int, int]:
    """Shape of a half-grid accumulator for a padded box ``m``: (m+2, m+2, m//2+2, channels)."""
    return (m + 2, m + 2, m // 2 + 2, channels)


def _scatter_rows(acc_flat: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, vals: torch.Tensor) -> None:
    """``acc_flat[idx[p, c]] += w[p, c] * vals[p]`` for rows of ``acc_flat`` (G, C).

    idx, w: (P, 8); vals: (P, C). On CPU a compiled sparse-matrix product (scipy's CSC
    mat-vecs kernel: one pass, in place); elsewhere ``index_add_``.
    """
    p, k = idx.shape
    c = vals.shape[1]
    if acc_flat.device.type == "cpu" and _csc_matvecs is not None:
        indptr = np.arange(0, p * k + 1, k, dtype=np.int32)
        _csc_matvecs(acc_flat.shape[0], p, c, indptr, idx.numpy().reshape(-1),
                     w.numpy().reshape(-1), vals.numpy().reshape(-1), acc_flat.numpy().reshape(-1))
        return
    flat = acc_flat.reshape(-1)
    i = idx.reshape(-1).to(torch.int64) * c
    for ch in range(c):
        flat.index_add_(0, i + ch, (w * vals[:, ch:ch + 1]).reshape(-1))


try:  # scipy's compiled CSC x dense kernel, used in place (falls back to torch when absent)
    from scipy.sparse._sparsetools import csc_matvecs as _csc_matvecs
except ImportError:  # pragma: no cover
    _csc_matvecs = None


def scatter_half(acc: torch.Tensor, coords: torch.Tensor, values: torch.Tensor, odd=(1,)) -> None:
    """Trilinear back-projection of samples into a half-grid accumulator, in place.

    ``acc``: float32 (M+2, M+2, M//2+2, C) (see :func:`half_grid_shape`); ``coords``: (P, 3)
    sample positions (x, y, z) in padded-grid voxels from the centre, |k| <= M/2;
    ``values``: float32 (P, C). Samples with x < 0 are moved to -coords with the channels in
    ``odd`` negated (the imaginary parts). Each sample is spread over its 8 neighbours with
    weights (1-f)·f products that sum to 1.
    """
    if coords.shape[0] == 0:
        return
    m = acc.shape[0] - 2
    gz, gy, gx, c = acc.shape
    coords = coords.to(torch.float32)
    neg = coords[:, 0] < 0
    sign = 1.0 - 2.0 * neg.to(torch.float32)
    q = coords * sign[:, None]
    q = q + torch.tensor([0.0, m // 2, m // 2], device=q.device)
    q0 = torch.floor(q)
    f = q - q0
    i0 = q0.to(torch.int32)
    base = (i0[:, 2] * gy + i0[:, 1]) * gx + i0[:, 0]
    offs = torch.tensor([dz * gy * gx + dy * gx + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
                        dtype=torch.int32, device=q.device)
    idx = base[:, None] + offs
    fx, fy, fz = f.unbind(1)
    gxx = torch.stack([1 - fx, fx], 1)
    wzy = torch.stack([(1 - fz) * (1 - fy), (1 - fz) * fy, fz * (1 - fy), fz * fy], 1)
    w = (wzy[:, :, None] * gxx[:, None, :]).reshape(-1, 8)
    if odd:
        flip = torch.ones(c, device=q.device)
        flip[list(odd)] = -1.0
        factor = torch.where(neg[:, None], flip, torch.ones_like(flip))
        values = values * factor
    _scatter_rows(acc.view(-1, c), idx, w, values.to(torch.float32).contiguous())


def hermitian_close(half: torch.Tensor, odd=(1,)) -> torch.Tensor:
    """Complete the plane k_x = 0 of a half-grid accumulator (M+2, M+2, M//2+2, C).

    Mates there were split between (0, k_y, k_z) and (0, -k_y, -k_z): the plane becomes
    ``a(k) + conj(a(-k))`` (channels in ``odd`` change sign under the mirror). Returns a new
    tensor cropped to (M, M, M//2+1, C), z and y indexed by k + M//2 (k = -M/2 … M/2-1).
    """
    m = half.shape[0] - 2
    out = half[:m, :m, : m // 2 + 1].clone()
    plane = half[:, :, 0]  # (M+2, M+2, C); index i <-> k = i - M/2, mirror i -> M - i
    mirror = torch.flip(plane[1:m + 1, 1:m + 1], dims=(0, 1))  # mirror[a, b] = plane[M - a, M - b]
    sign = torch.ones(half.shape[-1], device=half.device)
    if odd:
        sign[list(odd)] = -1.0
    out[1:, 1:, 0] = plane[1:m, 1:m] + mirror[1:m, 1:m] * sign
    return out


def insert_slices(
    data: torch.Tensor,
    weights: torch.Tensor,
    slices: torch.Tensor,
    slice_weights: torch.Tensor,
    rotations,
    pad: int = 2,
    batch: int = 512,
) -> None:
    """Back-project central slices into accumulators (the adjoint of :func:`extract_slices`).

    ``data``: complex64 (M, M, M) accumulator; ``weights``: float32 (M, M, M) accumulator of
    the per-frequency weights (e.g. CTF²); ``slices``: complex (b, N, N//2+1);
    ``slice_weights``: float (b, N, N//2+1). Both accumulators are updated in place. Friedel
    mates are inserted too, so the accumulated transform stays Hermitian.

    Implemented on the half grid (:func:`scatter_half`) and expanded by Hermitian symmetry,
    which gives the full-grid sums exactly.
    """
    m = data.shape[0]
    n = slices.shape[1]
    device = data.device
    half = torch.zeros(half_grid_shape(m, 3), dtype=torch.float32, device=device)
    rot = np.asarray(rotations).reshape(-1, 3, 3)
    kx_col = torch.fft.rfftfreq(n, device=device) * n
    mult = torch.where(kx_col == 0, 0.5, 1.0)  # the kx = 0 column holds both mates of each pair
    for s in range(0, len(rot), batch):
        coords, inside = slice_coordinates(rot[s:s + batch], n, pad, device)
        sel = inside.reshape(-1)
        b = coords.shape[0]
        c = coords.reshape(b, -1, 3)[:, sel].reshape(-1, 3)
        sl = slices[s:s + batch].reshape(b, -1)[:, sel]
        mu = mult.expand(n, -1).reshape(-1)[sel]
        sw = slice_weights[s:s + batch].reshape(b, -1)[:, sel]
        vals = torch.stack([sl.real * mu, sl.imag * mu, sw * mu], -1).reshape(-1, 3)
        scatter_half(half, c, vals.to(torch.float32))
    full = _half_to_full(half)
    data += torch.complex(full[..., 0], full[..., 1])
    weights += full[..., 2]


def _half_to_full(half: torch.Tensor, odd=(1,)) -> torch.Tensor:
    """Full centred grid (M, M, M, C) from a half-grid accumulator, by Hermitian symmetry."""
    m = half.shape[0] - 2
    h = m // 2
    closed = hermitian_close(half, odd)  # (M, M, M/2+1, C), x index = kx
    full = torch.zeros((m, m, m, half.shape[-1]), dtype=half.dtype, device=half.device)
    full[:, :, h:] = closed[:, :, :h]  # kx = 0 … M/2-1
    # kx < 0 (full index ix < h): value at (kz, ky, kx) is mate of (-kz, -ky, -kx), -kx = h - ix
    sign = torch.ones(half.shape[-1], device=half.device)
    if odd:
        sign[list(odd)] = -1.0
    src = half[:, :, 1:h + 1]  # kx = 1 … h, index M-i in z/y for the mirror (0 … M+1 available)
    # full[iz, iy, ix] = sign * half[M - iz, M - iy, h - ix] for ix in 0 … h-1
    mir = torch.flip(src[1:m + 1, 1:m + 1], dims=(0, 1, 2))  # [a,b,c] = src[M-a, M-b, h-1-c]
    full[:, :, :h] = mir * sign
    return full


def images_to_fourier(images) -> torch.Tensor:
    """Images (b, N, N), centre at N//2 → complex64 rfft2 (b, N, N//2+1) with centre at origin."""
    x = torch.as_tensor(images, dtype=torch.float32)
    return torch.fft.rfft2(torch.fft.ifftshift(x, dim=(-2, -1)))


def fourier_to_images(f: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`images_to_fourier`: (b, N, N//2+1) → real (b, N, N)."""
    return torch.fft.fftshift(torch.fft.irfft2(f, s=(n, n)), dim=(-2, -1))


def shift_phases(n: int, shifts_px, device) -> torch.Tensor:
    """Phase ramps that translate images by ``shifts_px`` (b, 2) = (dx, dy) pixels.

    Multiply an rfft2-layout transform by the result to move image content by +dx, +dy.
    """
    s = torch.as_tensor(np.asarray(shifts_px, dtype=np.float32), device=device)
    ky, kx = _rfft_grid(n, device)
    ph = -2 * np.pi * (kx[None] * s[:, 0, None, None] + ky[None] * s[:, 1, None, None]) / n
    return torch.polar(torch.ones_like(ph), ph)


def project(volume, rotations, origins_px=None, ctf=None, pad: int = 2, device=None,
            fvol: torch.Tensor | None = None) -> torch.Tensor:
    """Projections of ``volume`` (N, N, N) at ``rotations`` (b, 3, 3).

    ``origins_px`` (b, 2): RELION origins in pixels (image content moved by −origin).
    ``ctf`` (b, N, N//2+1): multiplied in Fourier space. Returns float32 (b, N, N).
    """
    if fvol is None:
        fvol = volume_to_fourier(volume, pad=pad, device=device)
    n = fvol.shape[0] // pad
    f = extract_slices(fvol, rotations, n, pad)
    if origins_px is not None:
        f = f * shift_phases(n, -np.asarray(origins_px, dtype=np.float32), f.device)
    if ctf is not None:
        f = f * torch.as_tensor(ctf, device=f.device)
    return fourier_to_images(f, n)


def project_real_space(volume: np.ndarray, rotation: np.ndarray, order: int = 3) -> np.ndarray:
    """Reference projector: rotate by interpolation in real space and sum along z.

    Independent of the Fourier path; slow; used to test it. ``volume`` (N, N, N), returns (N, N).
    """
    from scipy.ndimage import map_coordinates

    n = volume.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    pts = np.stack([x.ravel(), y.ravel(), z.ravel()])  # image frame (x, y, z)
    vol_xyz = rotation.T @ pts  # volume frame
    coords = np.stack([vol_xyz[2], vol_xyz[1], vol_xyz[0]]) + n // 2
    vals = map_coordinates(volume.astype(np.float64), coords, order=order, mode="constant", cval=0.0)
    return vals.reshape(n, n, n).sum(0).astype(np.float32)
