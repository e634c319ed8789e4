"""Per-micrograph defocus refinement against each half's reference (refine.refine_defocus_groups)."""
import numpy as np
import torch

from cryodask.ctf import ctf_2d, frequency_grid_rfft
from cryodask.geometry import random_rotations
from cryodask.projection import project
from cryodask.refine import _fsc_area, refine_defocus_groups


class _Optics:
    voltage, cs, amplitude_contrast = 300.0, 2.7, 0.1


def _blobs(n: int, rng) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.zeros((n, n, n), np.float32)
    for _ in range(30):
        p = rng.uniform(-n / 5, n / 5, 3)
        vol += np.exp(-((z - p[0]) ** 2 + (y - p[1]) ** 2 + (x - p[2]) ** 2) / (2 * rng.uniform(1.0, 2.5) ** 2))
    return vol


def test_refine_defocus_groups_recovers_per_micrograph_defocus():
    """Two 'micrographs' at 1.2 and 2.2 µm, particles = CTF·projection + noise (SNR 0.5 over the
    box) at known poses and shifts; the start is 1.5 kÅ off in opposite directions. Against the
    true map as both halves' reference, each group's mean defocus comes back within 250 Å, the
    astigmatism (U − V) and per-particle offsets are kept, and a group too small is left alone."""
    rng = np.random.default_rng(0)
    n, px, b = 48, 3.0, 240
    vol = _blobs(n, rng)
    rot = random_rotations(b, rng)
    origins = rng.uniform(-1.5, 1.5, (b, 2))
    groups = np.repeat(np.array(["m1", "m2"]), b // 2)
    groups[-5:] = "m3"  # a group of 5 particles: below min_particles
    true_mean = np.where(groups == "m1", 12000.0, 22000.0)
    true = np.stack([true_mean + 150, true_mean - 150, np.full(b, 20.0)], 1)
    ky, kx = frequency_grid_rfft(n, px, dtype=torch.float64)
    ctf = torch.stack([ctf_2d(ky, kx, *d, 300.0, 2.7, 0.1) for d in true]).float()
    clean = project(vol, rot, origins, ctf=ctf).numpy()
    parts = (clean + rng.normal(scale=np.sqrt(clean.var() / 0.5), size=clean.shape)).astype(np.float32)
    start = true.copy()
    start[groups == "m1", :2] += 1500.0
    start[groups != "m1", :2] -= 1500.0
    subsets = 1 + (np.arange(b) % 2)
    new, info = refine_defocus_groups(parts, start, rot, origins, subsets, groups, {1: vol, 2: vol}, px, _Optics(),
                                      8.0, search=4000.0)
    for g in ("m1", "m2"):
        sel = groups == g
        err = (new[sel, 0] + new[sel, 1]) / 2 - true_mean[sel]
        assert np.all(np.abs(err) < 250), (g, err[:3])
    np.testing.assert_allclose(new[:, 0] - new[:, 1], 300.0, atol=1e-6)  # astigmatism kept
    np.testing.assert_array_equal(new[:, 2], start[:, 2])
    np.testing.assert_array_equal(new[groups == "m3"], start[groups == "m3"])  # too few particles
    assert set(info["shift_A"]) == {"m1", "m2"}
    assert info["shift_A"]["m1"] < -1000 < 1000 < info["shift_A"]["m2"]


def test_fsc_area_is_mean_without_dc():
    assert abs(_fsc_area(np.array([1.0, 0.8, 0.4, 0.0])) - 0.4) < 1e-12
