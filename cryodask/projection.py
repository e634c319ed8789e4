"""Fourier-slice projection and its adjoint (back-projection), batched in torch.

Geometry follows :mod:`cryodask.geometry` (RELION's convention). A volume of box ``N`` is padded
to ``M = pad·N``, pre-divided by the trilinear gridding kernel (separable sinc²), and Fourier
transformed once; each image of box ``N`` is then the inverse 2D FFT of the central slice
``F(pad · Aᵀ (kx, ky, 0)ᵀ)`` sampled by trilinear interpolation, cut to the sphere of
radius ``N/2`` (Nyquist), as RELION's projector does.

Array layouts: volumes ``(z, y, x)``; images ``(n, y, x)``; 2D transforms in ``rfft2`` layout
``(n, N, N//2+1)`` of the image with its centre (index ``N//2``) moved to the origin
(``ifftshift``); 3D transforms full and centred (index ``M//2`` is zero frequency), or — what
the kernels work on — the Hermitian half ``k_x >= 0`` in a padded float32 table (see
:func:`half_grid_shape`). Interpolation (gather) and back-projection (scatter) share one
trilinear kernel, so :func:`insert_slices` is the exact adjoint of :func:`extract_slices`.
Particles are processed in viewing-direction order (:func:`view_order`) so that consecutive
slices overlap in memory; on CPU the gathers/scatters run in scipy's compiled sparse loops.
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

__all__ = [
    "default_device",
    "gridding_correction",
    "volume_to_fourier",
    "volume_to_half_fourier",
    "slice_coordinates",
    "extract_slices",
    "half_fourier_volume",
    "view_order",
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
    """CUDA when a GPU is visible, else CPU.

    The environment variable ``CRYODASK_DEVICE`` (``cpu``, ``cuda`` or ``cuda:N``) overrides the
    choice, e.g. to keep a shared GPU free; worker processes of a local cluster inherit it.
    """
    forced = os.environ.get("CRYODASK_DEVICE", "").strip()
    if forced:
        dev = torch.device(forced)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"CRYODASK_DEVICE={forced}: no CUDA GPU is visible to this process")
        return dev
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


def volume_to_half_fourier(volume, pad: int = 2, device=None) -> torch.Tensor:
    """The projector's half-grid table of a volume: :func:`half_fourier_volume` of
    :func:`volume_to_fourier`, computed with a real FFT (half the work). Float32
    (M+2, M+2, M//2+2, 2); pass it as ``fvol`` to :func:`extract_slices` / :func:`project`."""
    device = device or default_device()
    v = torch.as_tensor(np.asarray(volume, dtype=np.float32), device=device)
    n = v.shape[0]
    m = pad * n
    big = torch.zeros((m, m, m), dtype=torch.float32, device=device)
    o = m // 2 - n // 2
    big[o:o + n, o:o + n, o:o + n] = v / gridding_correction(m, n, device)
    f = torch.fft.fftshift(torch.fft.rfftn(torch.fft.ifftshift(big)), dim=(0, 1))  # (M, M, M//2+1)
    out = torch.zeros(half_grid_shape(m, 2), dtype=torch.float32, device=device)
    out[1:m, 1:m, : m // 2] = torch.view_as_real(f[1:, 1:, : m // 2])
    return out


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


# ---------------------------------------------------------------- half-grid trilinear kernels
#
# Real maps have Hermitian transforms, so only the half k_x >= 0 is stored: a sample at k with
# k_x < 0 is taken from (or added at) its Friedel mate -k, with the imaginary part negated.
# Half grids are float32 (M+2, M+2, M//2+2, C) arrays indexed (z, y, x, channel) with
# z, y = k + M//2 and x = k_x; the two extra planes on each axis hold the trilinear spill-over
# of samples at |k| = M/2, so no bounds checks are needed for |k| <= M/2.
#
# The work is done in flat "planar" form: coordinates (3, P), one int32 base index and eight
# float32 weight vectors (one per corner, order dz, dy, dx) per batch; on CPU the gathers and
# scatters are scipy's compiled sparse mat-vec loops (one nonzero per row/column, in place),
# elsewhere torch indexing / ``index_add_``.

_USE_SCIPY = True  # tests switch this off to exercise the torch path


@functools.lru_cache(maxsize=None)
def _scipy_kernels():
    """scipy's compiled CSC/CSR × dense loops (private module, stable for a decade; they release
    the GIL), imported on first use; None if unavailable (then torch does the work)."""
    try:
        from scipy.sparse._sparsetools import csc_matvecs, csr_matvecs
    except ImportError:  # pragma: no cover
        return None
    return csc_matvecs, csr_matvecs


def half_grid_shape(m: int, channels: int = 3) -> tuple[int, int, int, int]:
    """Shape of a half-grid array for a padded box ``m``: (m+2, m+2, m//2+2, channels)."""
    return (m + 2, m + 2, m // 2 + 2, channels)


def _corner_offsets(shape) -> list[int]:
    gz, gy, gx = shape
    return [dz * gy * gx + dy * gx + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def _trilinear_planar(coords: torch.Tensor, shape):
    """Base flat index, 8 corner weights and Friedel sign of samples on a half grid.

    ``coords`` (3, P) float32 (x, y, z) in padded-grid voxels from the centre, |k| <= M/2;
    ``shape`` (Gz, Gy, Gx) of the half grid. Returns ``(base int32 (P,), [w (P,)] × 8, sign (P,))``,
    sign −1 where the sample was replaced by its mate (x < 0). Weights sum to 1 per sample.
    """
    gz, gy, gx = shape
    h = float((gz - 2) // 2)
    x, y, z = coords[0], coords[1], coords[2]
    sign = torch.where(x < 0, -1.0, 1.0)
    x = x * sign
    y = torch.addcmul(torch.full_like(y, h), y, sign)
    z = torch.addcmul(torch.full_like(z, h), z, sign)
    x0, y0, z0 = torch.floor(x), torch.floor(y), torch.floor(z)
    fx, fy, fz = x - x0, y - y0, z - z0
    if gz * gy * gx < 2**24:  # exact in float32
        base = ((z0 * gy + y0) * gx + x0).to(torch.int32)
    else:
        base = ((z0.double() * gy + y0.double()) * gx + x0.double()).to(torch.int64)
    gx0, gy0, gz0 = 1.0 - fx, 1.0 - fy, 1.0 - fz
    ws = []
    for wz in (gz0, fz):
        for wy in (gy0, fy):
            wzy = wz * wy
            ws += [wzy * gx0, wzy * fx]
    return base, ws, sign


def _scatter_planar(table: torch.Tensor, shape, base, ws, values: torch.Tensor) -> None:
    """``table[base + off_j] += w_j · values`` for the 8 corners; table (G, C) is the flat view of
    a half grid of ``shape`` (Gz, Gy, Gx); values (P, C)."""
    g, c = table.shape
    offs = _corner_offsets(shape)
    p = base.shape[0]
    kernels = _scipy_kernels() if _USE_SCIPY and table.device.type == "cpu" else None
    if kernels is not None and base.dtype == torch.int32:
        ip = np.arange(p + 1, dtype=np.int32)
        x = values.contiguous().numpy().reshape(-1)
        y = table.numpy().reshape(-1)
        for off, w in zip(offs, ws):
            kernels[0](g, p, c, ip, (base + off).numpy(), w.contiguous().numpy(), x, y)
        return
    for off, w in zip(offs, ws):
        table.index_add_(0, (base + off).long(), values * w[:, None])


def _gather_planar(table: torch.Tensor, shape, base, ws) -> torch.Tensor:
    """``Σ_j w_j · table[base + off_j]`` over the 8 corners: (P, C) from table (G, C), the flat
    view of a half grid of ``shape`` (Gz, Gy, Gx)."""
    g, c = table.shape
    offs = _corner_offsets(shape)
    p = base.shape[0]
    kernels = _scipy_kernels() if _USE_SCIPY and table.device.type == "cpu" else None
    if kernels is not None and base.dtype == torch.int32:
        out = torch.zeros((p, c), dtype=torch.float32)
        ip = np.arange(p + 1, dtype=np.int32)
        x = table.numpy().reshape(-1)
        y = out.numpy().reshape(-1)
        for off, w in zip(offs, ws):
            kernels[1](p, g, c, ip, (base + off).numpy(), w.contiguous().numpy(), x, y)
        return out
    out = torch.zeros((p, c), dtype=table.dtype, device=table.device)
    for off, w in zip(offs, ws):
        out += table[(base + off).long()] * w[:, None]
    return out


def view_order(rotations) -> np.ndarray:
    """Permutation that sorts particles by viewing direction (±z row of the rotation), in bands
    of 6° polar angle with alternating azimuth: consecutive slices then overlap, which keeps the
    trilinear scatter/gather cache-friendly. The order does not change any result."""
    r = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    d = r[:, 2] * np.where(r[:, 2, 2:3] < 0, -1.0, 1.0)  # a plane is the same for ±direction
    band = np.floor(np.arccos(np.clip(d[:, 2], -1, 1)) / np.deg2rad(6.0))
    phi = np.arctan2(d[:, 1], d[:, 0]) / (2 * np.pi)
    return np.argsort(band * 4 + np.where(band % 2 == 0, phi, -phi), kind="stable")


def half_fourier_volume(fvol: torch.Tensor) -> torch.Tensor:
    """Half-grid form (M+2, M+2, M//2+2, 2) float32 of a centred full transform (M, M, M).

    The layout :func:`extract_slices` samples from; pass it instead of ``fvol`` to reuse it.
    The planes |k| = M/2 (and beyond) are zero on every axis — the padded grid's Nyquist, which
    no sample inside the Nyquist sphere needs (RELION's projector zeroes beyond its r_max too) —
    so the Friedel-mirrored lookups stay symmetric.
    """
    m = fvol.shape[0]
    out = torch.zeros(half_grid_shape(m, 2), dtype=torch.float32, device=fvol.device)
    out[1:m, 1:m, : m // 2] = torch.view_as_real(fvol[1:, 1:, m // 2:].to(torch.complex64))
    return out


def extract_slices(fvol: torch.Tensor, rotations, n: int, pad: int = 2, batch: int | None = None) -> torch.Tensor:
    """Central slices of a centred 3D transform: complex64 (b, N, N//2+1), rfft layout.

    ``fvol``: complex (M, M, M) from :func:`volume_to_fourier`, or its
    :func:`half_fourier_volume` form. Trilinear interpolation, zero outside the grid;
    frequencies beyond the Nyquist circle (radius N/2) are zero. ``batch``: slices per step
    (default 32 on CPU, where the table stays in cache, 1024 on a GPU).
    """
    half = half_fourier_volume(fvol) if fvol.is_complex() else fvol
    device = half.device
    batch = batch or (32 if device.type == "cpu" else 1024)
    shape = half.shape[:3]
    table = half.reshape(-1, 2)
    rot = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    kx, ky, sel = _inside(n, device)
    k2t = torch.stack([kx, ky], 0)  # (2, K)
    out = torch.zeros((len(rot), n * (n // 2 + 1)), dtype=torch.complex64, device=device)
    order = view_order(rot)
    for s in range(0, len(rot), batch):
        ids = order[s:s + batch]
        r = torch.as_tensor(pad * rot[ids, :2], dtype=torch.float32, device=device)  # (b, 2, 3)
        coords = torch.matmul(r.transpose(1, 2), k2t).permute(1, 0, 2).reshape(3, -1)
        base, ws, sign = _trilinear_planar(coords, shape)
        v = _gather_planar(table, shape, base, ws)
        vals = torch.complex(v[:, 0], v[:, 1] * sign).reshape(len(ids), -1)
        out[torch.as_tensor(ids, device=device)[:, None], sel[None, :]] = vals
    return out.reshape(len(rot), n, n // 2 + 1)


def _inside(n: int, device):
    """(kx, ky) of the rfft half plane within the Nyquist circle (float32, (K,)), flat indices."""
    ky = torch.fft.fftfreq(n, device=device) * n
    kx = torch.fft.rfftfreq(n, device=device) * n
    kyy, kxx = torch.meshgrid(ky, kx, indexing="ij")
    inside = (kxx**2 + kyy**2 <= (n / 2) ** 2).reshape(-1)
    sel = torch.nonzero(inside).reshape(-1)
    return kxx.reshape(-1)[sel], kyy.reshape(-1)[sel], sel


def scatter_half(acc: torch.Tensor, coords: torch.Tensor, values: torch.Tensor, odd=(1,)) -> None:
    """Trilinear back-projection of samples into a half-grid accumulator, in place.

    ``acc``: float32 (M+2, M+2, M//2+2, C) (see :func:`half_grid_shape`); ``coords``: (P, 3)
    sample positions (x, y, z) in padded-grid voxels from the centre, |k| <= M/2;
    ``values``: float32 (P, C). Samples with x < 0 are moved to -coords with the channels in
    ``odd`` negated (the imaginary parts). Each sample is spread over its 8 neighbours with
    weights (1-f)·f products that sum to 1. ``coords`` and ``values`` are not modified.
    """
    if coords.shape[0] == 0:
        return
    c = acc.shape[-1]
    base, ws, sign = _trilinear_planar(coords.to(torch.float32).t().contiguous(), acc.shape[:3])
    values = values.to(torch.float32).clone()
    for ch in odd:
        values[:, ch] *= sign
    _scatter_planar(acc.view(-1, c), acc.shape[:3], base, ws, values)


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
    ``ctf`` (b, N, N//2+1): multiplied in Fourier space. ``fvol``: the volume's transform, from
    :func:`volume_to_half_fourier` (or :func:`volume_to_fourier`), to reuse across calls.
    Returns float32 (b, N, N).
    """
    if fvol is None:
        fvol = volume_to_half_fourier(volume, pad=pad, device=device)
    m = fvol.shape[0] if fvol.is_complex() else fvol.shape[0] - 2
    n = m // pad
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
