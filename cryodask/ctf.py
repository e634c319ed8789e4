"""Contrast transfer function, exactly as RELION evaluates it (``CTF::getCTF``).

Units: defocus in Å (positive = underfocus), defocus angle in degrees (the direction of
``DefocusU`` measured from the image x axis), voltage in kV, spherical aberration in mm,
phase shift in degrees, B-factor in Å², spatial frequency in 1/Å.

``CTF(k) = -sin(χ(k)) · exp(-B k²/4) · scale`` with
``χ = π λ Δf(θ) k² ... `` written the RELION way::

    χ = K1·Δf·k² + K2·k⁴ − K5 − K3,   Δf = −(U+V)/2 − (U−V)/2 · cos 2(θ − θ_ast)
    K1 = π λ,  K2 = π/2 · Cs · λ³,  K3 = atan(Q / sqrt(1 − Q²)),  K5 = phase shift

so that the CTF at zero frequency is ``+sin(K3) > 0``: contrast is not inverted by the CTF.
"""
from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["electron_wavelength", "ctf_2d", "frequency_grid_rfft"]


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(v * (1.0 + v * 0.978466e-6))


def frequency_grid_rfft(n: int, pixel_size: float, device=None, dtype=torch.float32):
    """Spatial frequencies (1/Å) of ``torch.fft.rfft2`` of an ``n × n`` image.

    Returns ``(ky, kx)``, each of shape ``(n, n // 2 + 1)``.
    """
    ky = torch.fft.fftfreq(n, d=pixel_size, device=device, dtype=dtype)
    kx = torch.fft.rfftfreq(n, d=pixel_size, device=device, dtype=dtype)
    return torch.meshgrid(ky, kx, indexing="ij")


def ctf_2d(
    ky,
    kx,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage: float,
    cs: float,
    amplitude_contrast: float,
    phase_shift=0.0,
    bfactor=0.0,
    scale=1.0,
) -> torch.Tensor:
    """CTF values at frequencies ``(ky, kx)`` (1/Å) for a batch of particles.

    Parameters
    ----------
    ky, kx : tensor, shape (...grid)
        Frequency components along image y (rows) and x (columns), 1/Å.
    defocus_u, defocus_v, defocus_angle : array-like, shape (n,) or scalar
        Å, Å, degrees.
    voltage, cs, amplitude_contrast : float
        kV, mm, fraction.
    phase_shift, bfactor, scale : array-like (n,) or scalar
        degrees, Å², unitless.

    Returns
    -------
    tensor of shape (n, ...grid) (or (...grid) if all per-particle values are scalars), float32.
    """
    dev, dt = kx.device, kx.dtype

    def as_t(v):
        t = torch.as_tensor(np.array(v, dtype=np.float64), device=dev)
        return t.reshape(t.shape + (1,) * kx.ndim)

    lam = electron_wavelength(voltage)
    k1 = math.pi * lam
    k2 = math.pi / 2 * (cs * 1e7) * lam**3
    k3 = math.atan(amplitude_contrast / math.sqrt(1.0 - amplitude_contrast**2))
    du, dv, ang = as_t(defocus_u), as_t(defocus_v), torch.deg2rad(as_t(defocus_angle))
    k5 = torch.deg2rad(as_t(phase_shift))
    kx64, ky64 = kx.to(torch.float64), ky.to(torch.float64)
    k2sq = kx64**2 + ky64**2
    theta = torch.atan2(ky64, kx64)
    deltaf = -(du + dv) * 0.5 - (du - dv) * 0.5 * torch.cos(2 * (theta - ang))
    chi = k1 * deltaf * k2sq + k2 * k2sq**2 - k5 - k3
    out = -torch.sin(chi)
    b = as_t(bfactor)
    if bool(torch.any(b != 0)):
        out = out * torch.exp(-b / 4 * k2sq)
    out = out * as_t(scale)
    return out.to(dt)
