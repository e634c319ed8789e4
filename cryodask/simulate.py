"""Ground-truth simulator: particle stacks and micrographs with every true parameter known.

Kernels here are pure (arrays and parameters in, arrays and tables out, randomness from an
explicit ``numpy.random.Generator``); :mod:`cryodask.simulate_job` wires them into a Dask graph
and writes files.

Physics, in RELION's conventions (:mod:`cryodask.geometry`, :mod:`cryodask.ctf`):

* projections by :func:`project_exact`: the central slices are evaluated by a non-uniform FFT
  (finufft, relative accuracy 1e-6) — exact to the reference real-space projector within its own
  interpolation error (~0.2 %), and independent of the ×2-padded trilinear slice that
  reconstruction and refinement use (so a simulation does not commit the "inverse crime");
* the CTF multiplies the Fourier transform of each particle (stacks) or of the whole
  micrograph (micrographs: one defocus per micrograph, as the microscope does);
* particle stacks have protein **white** (positive), as RELION-extracted particles after its
  default contrast inversion; micrographs have protein **dark**, as recorded;
* SNR = variance of the noise-free signal over the particle box / variance of the white
  Gaussian noise (averaged over particles).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .ctf import ctf_2d, frequency_grid_rfft
from .geometry import euler_to_matrix, matrix_to_euler, random_rotations
from .projection import shift_phases

__all__ = ["Optics", "CTFRange", "sample_poses", "project_exact", "simulate_particles", "simulate_micrograph",
           "noise_sigma"]


def project_exact(volume: np.ndarray, rotations: np.ndarray, origins_px=None, ctf=None, eps: float = 1e-6,
                  batch: int = 1024) -> np.ndarray:
    """Projections of ``volume`` (N, N, N) at ``rotations`` (b, 3, 3) by non-uniform FFT.

    The 2-D transform of each projection is the volume's 3-D DFT on the rotated central plane
    (central-slice theorem), evaluated there directly (finufft type 2) instead of interpolated.
    ``origins_px`` (b, 2): RELION origins in px (content moved by −origin). ``ctf`` (b, N, N//2+1)
    multiplies the transform (rfft layout). Returns float32 (b, N, N), centre at N//2.
    """
    import finufft

    n = volume.shape[0]
    rotations = np.asarray(rotations, dtype=np.float64)
    ky, kx = np.meshgrid(np.fft.fftfreq(n) * n, np.fft.rfftfreq(n) * n, indexing="ij")
    modes = np.ascontiguousarray(np.transpose(np.asarray(volume, np.complex64), (2, 1, 0)))  # (x, y, z)
    out = np.empty((len(rotations), n, n), np.float32)
    for s in range(0, len(rotations), batch):
        r = rotations[s:s + batch]
        k3 = kx[None, ..., None] * r[:, None, None, 0, :] + ky[None, ..., None] * r[:, None, None, 1, :]
        pts = (-2 * np.pi / n) * k3
        f = finufft.nufft3d2(*(np.ascontiguousarray(pts[..., i].ravel(), dtype=np.float32) for i in range(3)),
                             modes, eps=eps, isign=1, modeord=0)
        f = torch.from_numpy(f.reshape(k3.shape[:3]).astype(np.complex64))
        if origins_px is not None:
            f = f * shift_phases(n, -np.asarray(origins_px, np.float32)[s:s + batch], "cpu")
        if ctf is not None:
            f = f * torch.as_tensor(ctf[s:s + batch])
        img = torch.fft.fftshift(torch.fft.irfft2(f, s=(n, n)), dim=(-2, -1))
        out[s:s + batch] = img.numpy()
    return out


@dataclass(frozen=True)
class Optics:
    """Microscope parameters: voltage (kV), spherical aberration (mm), amplitude contrast."""

    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1


@dataclass(frozen=True)
class CTFRange:
    """Defocus drawn uniformly in [min, max] Å; astigmatism |U−V| up to ``astig`` Å; B in Å²."""

    defocus_min: float = 10000.0
    defocus_max: float = 25000.0
    astig: float = 0.0
    bfactor: float = 0.0
    enabled: bool = True

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        mean = rng.uniform(self.defocus_min, self.defocus_max, n)
        d = rng.uniform(0, self.astig, n) / 2
        return {
            "rlnDefocusU": mean + d,
            "rlnDefocusV": mean - d,
            "rlnDefocusAngle": rng.uniform(-180, 180, n) if self.astig > 0 else np.zeros(n),
        }


def sample_poses(n: int, rng: np.random.Generator, views: str = "all", spread_deg: float = 6.0) -> np.ndarray:
    """Rotation matrices (n, 3, 3) for ``views``.

    ``all``: uniform on SO(3). ``top``: viewing direction within ``spread_deg`` of the volume's
    ±z axis (a cylinder seen end-on: a ring). ``side``: viewing direction within ``spread_deg``
    of the xy plane (a cylinder seen from the side: a rectangle). ``both``: each particle a top
    view (probability 0.4) or a side view, as in KLH datasets with their two preferred
    orientations. In-plane angle always uniform.
    """
    if views == "all":
        return random_rotations(n, rng)
    if views not in ("top", "side", "both"):
        raise ValueError(f"views must be all, top, side or both, not {views!r}")
    rot = rng.uniform(-180, 180, n)
    psi = rng.uniform(-180, 180, n)
    dev = rng.uniform(0, spread_deg, n)
    if views in ("top", "both"):
        top_tilt = np.where(rng.random(n) < 0.5, dev, 180.0 - dev)
    if views in ("side", "both"):
        side_tilt = 90.0 + rng.uniform(-spread_deg, spread_deg, n)
    if views == "top":
        tilt = top_tilt
    elif views == "side":
        tilt = side_tilt
    else:
        tilt = np.where(rng.random(n) < 0.4, top_tilt, side_tilt)
    return euler_to_matrix(rot, tilt, psi)


def view_class(rotations: np.ndarray, views: str, symmetry: str | None = None) -> np.ndarray:
    """'top' / 'side' label per particle: for cylinder-like particles by the angle between the
    viewing direction and the z axis (< 45° → top), for round particles always 'top'."""
    if symmetry == "O" or symmetry == "I":
        return np.full(len(rotations), "top", dtype=object)
    cos_t = np.abs(rotations[:, 2, 2])
    return np.where(cos_t > np.cos(np.deg2rad(45.0)), "top", "side").astype(object)


def noise_sigma(clean: np.ndarray, snr: float) -> float:
    """σ of white noise giving ``snr`` = mean per-image signal variance / σ²; clean (n, y, x)."""
    return float(np.sqrt(np.mean(np.var(clean, axis=(-2, -1))) / snr))


def simulate_particles(
    volume: np.ndarray,
    n: int,
    pixel_size: float,
    rng: np.random.Generator,
    *,
    views: str = "all",
    snr: float | None = 0.1,
    optics: Optics = Optics(),
    ctf: CTFRange = CTFRange(),
    max_shift_px: float = 0.0,
    symmetry: str | None = None,
    device=None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """A particle stack with known poses, shifts and CTF.

    Parameters
    ----------
    volume : (N, N, N) float32 density (protein positive).
    n : number of particles.
    pixel_size : Å/px.
    views : 'all', 'top', 'side' or 'both' (see :func:`sample_poses`).
    snr : signal-to-noise ratio over the box (None: no noise).
    max_shift_px : origins uniform in ±max_shift_px on each axis (RELION sign).

    Returns
    -------
    noisy : (n, N, N) float32, protein white.
    clean : (n, N, N) float32, the same without noise.
    table : one row per particle with RELION columns rlnAngleRot/Tilt/Psi (deg),
        rlnOriginXAngst/YAngst (Å), rlnDefocusU/V (Å), rlnDefocusAngle (deg), rlnCtfBfactor,
        and cdViewClass.
    """
    rots = sample_poses(n, rng, views)
    rot, tilt, psi = matrix_to_euler(rots)
    origins = rng.uniform(-max_shift_px, max_shift_px, (n, 2)) if max_shift_px else np.zeros((n, 2))
    defo = ctf.sample(n, rng)
    box = volume.shape[0]
    ctf_img = None
    if ctf.enabled:
        ky, kx = frequency_grid_rfft(box, pixel_size)
        ctf_img = ctf_2d(ky, kx, defo["rlnDefocusU"], defo["rlnDefocusV"], defo["rlnDefocusAngle"],
                         optics.voltage, optics.cs, optics.amplitude_contrast, bfactor=ctf.bfactor)
    clean = np.empty((n, box, box), dtype=np.float32)
    for s in range(0, n, 4096):
        sl = slice(s, s + 4096)
        clean[sl] = project_exact(volume, rots[sl], origins[sl], None if ctf_img is None else ctf_img[sl])
    if snr:
        sigma = noise_sigma(clean, snr)
        noisy = (clean + rng.normal(0.0, sigma, clean.shape)).astype(np.float32)
    else:
        noisy = clean.copy()
    table = pd.DataFrame(
        {
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnOriginXAngst": origins[:, 0] * pixel_size,
            "rlnOriginYAngst": origins[:, 1] * pixel_size,
            **defo,
            "rlnCtfBfactor": np.full(n, ctf.bfactor),
            "cdViewClass": view_class(rots, views, symmetry),
        }
    )
    return noisy, clean, table


def _place_centres(shape, n_target, min_dist, margin, rng, max_tries=200) -> np.ndarray:
    """Random non-overlapping centres (x, y) in px, at least ``margin`` px from the edges."""
    ny, nx = shape
    pts: list[tuple[float, float]] = []
    tries = 0
    while len(pts) < n_target and tries < n_target * max_tries:
        tries += 1
        p = (rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist**2 for q in pts):
            pts.append(p)
    return np.array(pts, dtype=np.float64).reshape(-1, 2)


def _background(shape, rng, *, ice_gradient: float, carbon_edge: bool, scale: float) -> np.ndarray:
    """Smooth ice-thickness gradient and, optionally, a carbon-film region (thicker, so darker)."""
    ny, nx = shape
    y, x = np.mgrid[0:ny, 0:nx].astype(np.float32)
    bg = np.zeros(shape, np.float32)
    if ice_gradient:
        ang = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(ang) * (x - nx / 2) + np.sin(ang) * (y - ny / 2)) / max(nx, ny)
        bg += ice_gradient * scale * ramp
    if carbon_edge:
        # the film boundary: a gentle arc entering from one side
        side = rng.integers(4)
        t = (x if side < 2 else y) / (nx if side < 2 else ny)
        u = (y if side < 2 else x) / (ny if side < 2 else nx)
        edge = 0.15 + 0.05 * np.sin(2 * np.pi * (u + rng.uniform()))
        inside = (t < edge) if side % 2 == 0 else (t > 1 - edge)
        bg -= np.where(inside, 1.5 * scale, 0.0).astype(np.float32)
    return bg


def simulate_micrograph(
    volume: np.ndarray,
    pixel_size: float,
    shape: tuple[int, int],
    diameter_px: float,
    rng: np.random.Generator,
    *,
    n_particles: int | None = None,
    views: str = "all",
    snr: float | None = 0.1,
    optics: Optics = Optics(),
    ctf: CTFRange = CTFRange(),
    symmetry: str | None = None,
    ice_gradient: float = 0.0,
    carbon_edge: bool = False,
    device=None,
) -> tuple[np.ndarray, pd.DataFrame, np.ndarray]:
    """One micrograph with particles at known positions and poses.

    Particles are projected without CTF, placed at random non-overlapping sub-pixel positions
    (centre-to-centre ≥ 1.1 × diameter, wholly inside the micrograph), the micrograph's CTF
    (one defocus) is applied to the whole field, the contrast made dark, and white noise added so
    that the SNR inside a particle box (box = the volume's box) is ``snr``.

    Returns
    -------
    micrograph : (ny, nx) float32, protein dark, mean ~0.
    table : one row per particle: rlnCoordinateX/Y (px, integer, nearest the true centre),
        rlnOriginXAngst/YAngst (Å; true centre = coordinate − origin/pixel size),
        rlnAngleRot/Tilt/Psi (deg), rlnDefocusU/V/Angle, cdViewClass, cdTrueX/cdTrueY (px).
    clean_particles : (n, N, N) float32, noise-free CTF-affected particle boxes centred on the
        integer coordinates, protein white (as extracted and inverted by RELION).
    """
    box = volume.shape[0]
    ny, nx = shape
    if n_particles is None:
        # a moderately crowded field: ~30 % of the area covered by particles
        n_particles = int(0.30 * nx * ny / (np.pi * (diameter_px / 2) ** 2))
    centres = _place_centres(shape, n_particles, 1.1 * diameter_px, box / 2 + 1, rng)
    n = len(centres)
    rots = sample_poses(n, rng, views)
    coords = np.round(centres)
    frac = centres - coords  # true centre − integer coordinate, px
    # each particle projected with its centre offset by frac inside its box
    proj = project_exact(volume, rots, -frac) if n else np.zeros((0, box, box), np.float32)
    signal = np.zeros(shape, np.float32)
    h = box // 2
    for (cx, cy), p in zip(coords.astype(int), proj):
        signal[cy - h:cy - h + box, cx - h:cx - h + box] += p
    defo = ctf.sample(1, rng)
    if ctf.enabled:
        kyy = torch.fft.fftfreq(ny, d=pixel_size)[:, None].expand(ny, nx // 2 + 1)
        kxx = torch.fft.rfftfreq(nx, d=pixel_size)[None, :].expand(ny, nx // 2 + 1)
        c = ctf_2d(kyy, kxx, defo["rlnDefocusU"][0], defo["rlnDefocusV"][0], defo["rlnDefocusAngle"][0],
                   optics.voltage, optics.cs, optics.amplitude_contrast, bfactor=ctf.bfactor)
        signal = torch.fft.irfft2(torch.fft.rfft2(torch.from_numpy(signal)) * c, s=shape).numpy()
    # clean particle boxes (white) cut from the CTF-affected signal
    clean = np.stack([signal[cy - h:cy - h + box, cx - h:cx - h + box] for cx, cy in coords.astype(int)]) \
        if n else np.zeros((0, box, box), np.float32)
    sigma = noise_sigma(clean, snr) if (snr and n) else (float(np.std(signal)) or 1.0)
    mic = -signal
    if snr:
        mic = mic + rng.normal(0.0, sigma, shape).astype(np.float32)
    mic = mic + _background(shape, rng, ice_gradient=ice_gradient, carbon_edge=carbon_edge, scale=sigma)
    rot, tilt, psi = matrix_to_euler(rots) if n else (np.zeros(0),) * 3
    table = pd.DataFrame(
        {
            "rlnCoordinateX": coords[:, 0],
            "rlnCoordinateY": coords[:, 1],
            "rlnOriginXAngst": -frac[:, 0] * pixel_size,
            "rlnOriginYAngst": -frac[:, 1] * pixel_size,
            "rlnAngleRot": rot,
            "rlnAngleTilt": tilt,
            "rlnAnglePsi": psi,
            "rlnDefocusU": np.repeat(defo["rlnDefocusU"], n),
            "rlnDefocusV": np.repeat(defo["rlnDefocusV"], n),
            "rlnDefocusAngle": np.repeat(defo["rlnDefocusAngle"], n),
            "rlnCtfBfactor": np.full(n, ctf.bfactor),
            "cdViewClass": view_class(rots, views, symmetry) if n else np.zeros(0, object),
            "cdTrueX": centres[:, 0],
            "cdTrueY": centres[:, 1],
        }
    )
    return mic.astype(np.float32), table, clean.astype(np.float32)
