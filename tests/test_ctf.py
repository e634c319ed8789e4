import math

import numpy as np
import torch

from cryodask.ctf import ctf_2d, electron_wavelength, frequency_grid_rfft


def test_wavelength_300kv():
    assert abs(electron_wavelength(300) - 0.019687) < 1e-5
    assert abs(electron_wavelength(200) - 0.025079) < 1e-5


def test_ctf_matches_analytic_formula():
    # textbook form: CTF = -sin(pi*lam*dz*k^2 ... ) written independently of the module
    apix, n = 1.5, 64
    ky, kx = frequency_grid_rfft(n, apix, dtype=torch.float64)
    du, dv, ang = 15000.0, 13000.0, 30.0
    lam = 12.2643247 / math.sqrt(300e3 * (1 + 300e3 * 0.978466e-6))
    cs = 2.7e7
    w = 0.1
    theta = np.arctan2(ky.numpy(), kx.numpy())
    dz = 0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * (theta - np.deg2rad(ang)))
    k2 = kx.numpy() ** 2 + ky.numpy() ** 2
    gamma = np.pi * lam * dz * k2 - 0.5 * np.pi * cs * lam**3 * k2**2
    expected = np.sqrt(1 - w**2) * np.sin(gamma) + w * np.cos(gamma)
    got = ctf_2d(ky, kx, du, dv, ang, 300, 2.7, w).numpy()
    assert np.abs(got - expected).max() < 1e-5


def test_ctf_batch_and_bfactor():
    ky, kx = frequency_grid_rfft(32, 2.0)
    c = ctf_2d(ky, kx, [10000, 20000], [10000, 20000], [0, 0], 300, 2.7, 0.07, bfactor=[0, 200])
    assert c.shape == (2, 32, 17)
    assert abs(float(c[0, 0, 0]) - 0.07) < 1e-4  # sin(K3) = amplitude contrast at k = 0
    plain = ctf_2d(ky, kx, 20000, 20000, 0, 300, 2.7, 0.07)
    env = torch.exp(-200 / 4 * (kx**2 + ky**2))
    assert torch.allclose(c[1], plain * env, atol=1e-6)
    assert torch.allclose(c[0], ctf_2d(ky, kx, 10000, 10000, 0, 300, 2.7, 0.07), atol=1e-6)
