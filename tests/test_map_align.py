"""Map superposition: rotation grid, hand flip, resampling, and recovery of a moved map."""
from __future__ import annotations

import numpy as np
import pytest

from cryodask.geometry import random_rotations, rotation_angle_deg, symmetry_matrices
from cryodask.map_align import align_map, flip_hand, fourier_crop, rotation_grid, transform_map

MIRROR = np.diag([1.0, 1.0, -1.0])


def _blobs(rng, box, centres, sigmas):
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((box, box, box))
    for p, s in zip(centres, sigmas):
        v += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return v.astype(np.float32)


def _asymmetric(rng, box=32, n=14, radius=9.0):
    p = rng.normal(size=(n, 3))
    p *= (rng.uniform(0.3, 1.0, n) * radius / np.linalg.norm(p, axis=1))[:, None]
    return _blobs(rng, box, p, rng.uniform(1.2, 2.2, n))


def _fsc(a, b):
    n = a.shape[0]
    fa, fb = np.fft.fftshift(np.fft.fftn(a)), np.fft.fftshift(np.fft.fftn(b))
    c = np.arange(n) - n // 2
    r = np.round(np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)).astype(int).ravel()
    k = r < n // 2 + 1
    r, fa, fb = r[k], fa.ravel()[k], fb.ravel()[k]
    num = np.bincount(r, (fa * np.conj(fb)).real)
    return num / np.sqrt(np.bincount(r, np.abs(fa) ** 2) * np.bincount(r, np.abs(fb) ** 2))


def _crossing(curve, thr):
    below = np.nonzero(curve[1:] < thr)[0]
    return (below[0] + 1) if len(below) else len(curve)


def _sym_error(R_true, R_found, symbol):
    return min(rotation_angle_deg(g @ R_true, R_found) for g in symmetry_matrices(symbol))


def test_rotation_grid_covers_so3_and_asymmetric_units():
    rng = np.random.default_rng(0)
    probe = random_rotations(300, rng)
    grid = rotation_grid(2000)
    assert len(grid) == 2000
    np.testing.assert_allclose(np.einsum("kij,kil->kjl", grid, grid), np.broadcast_to(np.eye(3), grid.shape), atol=1e-9)
    nearest = np.degrees(np.arccos(np.clip((np.einsum("aij,bij->ab", probe, grid).max(1) - 1) / 2, -1, 1)))
    assert nearest.max() < 20.0 and nearest.mean() < 12.0
    sym = symmetry_matrices("D5")
    g5 = rotation_grid(400, "D5")
    assert abs(len(g5) - 400) < 20
    # every rotation is close to some symmetry copy of a grid rotation: the same density as C1
    full = np.einsum("gij,kjl->gkil", sym, g5).reshape(-1, 3, 3)
    nearest5 = np.degrees(np.arccos(np.clip((np.einsum("aij,bij->ab", probe, full).max(1) - 1) / 2, -1, 1)))
    assert nearest5.max() < 20.0


def test_flip_and_transform_conventions():
    rng = np.random.default_rng(1)
    v = _asymmetric(rng)
    np.testing.assert_array_equal(flip_hand(flip_hand(v)), v)
    f = flip_hand(v)
    np.testing.assert_array_equal(f[16 + 3], v[16 - 3])  # z -> -z about voxel N//2
    np.testing.assert_allclose(transform_map(v, np.eye(3)), v, atol=1e-5)
    # a pure shift t moves the content by +t (x, y, z)
    s = transform_map(v, np.eye(3), (2.0, 0.0, -1.0))
    np.testing.assert_allclose(s[16 - 1, 16, 16 + 2], v[16, 16, 16], atol=1e-5)
    # a rotation maps the density at r to R r
    R = random_rotations(1, rng)[0]
    one = _blobs(rng, 32, [[5.0, -3.0, 2.0]], [1.5])
    out = transform_map(one, R)
    c = np.arange(32) - 16
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    com = np.array([(out * x).sum(), (out * y).sum(), (out * z).sum()]) / out.sum()
    np.testing.assert_allclose(com, R @ [5.0, -3.0, 2.0], atol=0.05)
    # Fourier cropping keeps the centre voxel
    assert np.unravel_index(np.argmax(fourier_crop(_blobs(rng, 32, [[0, 0, 0]], [2.0]), 16)), (16,) * 3) == (8, 8, 8)


@pytest.mark.parametrize("flip", [False, True])
def test_align_recovers_a_rotated_shifted_noisy_map(flip):
    rng = np.random.default_rng(2 + flip)
    truth = _asymmetric(rng)
    noisy = truth + rng.normal(0, 0.4 * truth.std(), truth.shape).astype(np.float32)
    Q = random_rotations(1, rng)[0]
    t = rng.uniform(-2, 2, 3)
    moving = transform_map(noisy, Q, t, flip=flip)
    aligned, info = align_map(moving, truth, n_rotations=2000, top_k=4)  # (lighter than the defaults)
    assert info["flipped"] == flip
    # moving(r) = noisy_h(Qᵀ(r − t)); undoing it needs R with M Qᵀ M Rᵀ = I when flipped (M the mirror)
    R_true = MIRROR @ Q.T @ MIRROR if flip else Q.T
    assert rotation_angle_deg(R_true, info["rotation"]) < 4.0  # (3° moves this smooth map by 0.5 voxel)
    exact = transform_map(moving, R_true, -R_true @ (MIRROR @ t if flip else t), flip=flip)
    mask = np.asarray(truth > 0.05 * truth.max())
    c_exact = np.corrcoef(exact[mask], truth[mask])[0, 1]
    assert np.corrcoef(aligned[mask], truth[mask])[0, 1] > c_exact - 0.005
    ref_curve, got = _fsc(noisy, truth), _fsc(aligned, truth)
    assert abs(_crossing(got, 0.5) - _crossing(ref_curve, 0.5)) <= 1
    assert abs(_crossing(got, 0.143) - _crossing(ref_curve, 0.143)) <= 1
    hands = info["correlation_by_hand"]
    assert hands["flipped" if flip else "original"] > hands["original" if flip else "flipped"]


def test_align_with_a_symmetric_reference():
    rng = np.random.default_rng(4)
    sym = symmetry_matrices("D2")
    seeds = rng.normal(size=(4, 3))
    seeds *= (rng.uniform(0.4, 1.0, 4) * 9.0 / np.linalg.norm(seeds, axis=1))[:, None]
    centres = np.einsum("gij,kj->gki", sym, seeds).reshape(-1, 3)
    truth = _blobs(rng, 32, centres, np.tile(rng.uniform(1.3, 2.0, 4), len(sym)))
    Q = random_rotations(1, rng)[0]
    moving = transform_map(truth, Q, (1.0, -1.5, 0.5))
    aligned, info = align_map(moving, truth, symmetry="D2", try_hand=False)
    assert info["search"]["hands"] == 1
    assert _sym_error(Q.T, info["rotation"], "D2") < 2.0
    assert info["correlation"] > 0.98


def test_align_rejects_mismatched_boxes():
    with pytest.raises(ValueError):
        align_map(np.zeros((16, 16, 16)), np.zeros((20, 20, 20)))
