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
    "insert_slices",
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
    """Flat indices and weights of the 8 trilinear neighbours; coords (..., 3) as (x, y, z)."""
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


def extract_slices(fvol: torch.Tensor, rotations, n: int, pad: int = 2, batch: int = 512) -> torch.Tensor:
    """Central slices of a centred 3D transform: complex64 (b, N, N//2+1), rfft layout."""
    m = fvol.shape[0]
    device = fvol.device
    flat = torch.view_as_real(fvol).reshape(-1, 2)
    rot = np.asarray(rotations)
    out = []
    for s in range(0, len(rot), batch):
        coords, inside = slice_coordinates(rot[s:s + batch], n, pad, device)
        idx, w = _corners(coords, m)
        w = w * inside[None, ..., None]
        vals = flat[idx]  # (b, N, N/2+1, 8, 2)
        re = (vals * w[..., None]).sum(-2)
        out.append(torch.view_as_complex(re.contiguous()))
    return torch.cat(out) if out else torch.zeros((0, n, n // 2 + 1), dtype=torch.complex64, device=device)


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
    """
    m = data.shape[0]
    n = slices.shape[1]
    device = data.device
    dflat = torch.view_as_real(data).view(-1, 2)
    wflat = weights.view(-1)
    rot = np.asarray(rotations)
    for s in range(0, len(rot), batch):
        coords, inside = slice_coordinates(rot[s:s + batch], n, pad, device)
        sl = slices[s:s + batch]
        sw = slice_weights[s:s + batch]
        # the half plane kx > 0 stands for its Friedel mate too; kx = 0 column is complete
        keep = inside.clone()
        for sign in (1.0, -1.0):
            if sign < 0:
                keep = inside & (torch.fft.rfftfreq(n, device=device)[None, :] > 0)
            sel = keep.reshape(-1)
            c = (sign * coords).reshape(coords.shape[0], -1, 3)[:, sel]
            v = sl.reshape(sl.shape[0], -1)[:, sel]
            if sign < 0:
                v = torch.conj(v)
            ww = sw.reshape(sw.shape[0], -1)[:, sel]
            idx, w = _corners(c, m)
            idx = idx.reshape(-1)
            wv = torch.view_as_real(v.contiguous())[:, :, None, :] * w[..., None]
            dflat.index_add_(0, idx, wv.reshape(-1, 2))
            wflat.index_add_(0, idx, (ww[..., None] * w).reshape(-1))


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
