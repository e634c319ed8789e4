import numpy as np
import pytest

from cryodask.geometry import (euler_to_matrix, matrix_to_euler, random_rotations, rotation_angle_deg,
                               symmetry_matrices)


def test_euler_roundtrip_and_orthonormal():
    rng = np.random.default_rng(1)
    r = random_rotations(500, rng)
    assert np.allclose(np.einsum("nij,nkj->nik", r, r), np.eye(3), atol=1e-12)
    assert np.allclose(np.linalg.det(r), 1.0)
    back = euler_to_matrix(*matrix_to_euler(r))
    assert np.abs(back - r).max() < 1e-10


@pytest.mark.parametrize("tilt", [0.0, 180.0])
def test_euler_poles(tilt):
    m = euler_to_matrix(35.0, tilt, -70.0)
    assert np.abs(euler_to_matrix(*matrix_to_euler(m)) - m).max() < 1e-10


def test_relion_viewing_direction():
    # RELION: the third row of A is the projection direction (sin t cos r, sin t sin r, cos t)
    rot, tilt = 30.0, 50.0
    a = euler_to_matrix(rot, tilt, 12.0)
    r, t = np.deg2rad(rot), np.deg2rad(tilt)
    assert np.allclose(a[2], [np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)])


def test_uniform_rotations_are_uniform():
    # the viewing direction's z component is uniform in [-1, 1] for Haar-random rotations
    r = random_rotations(20000, np.random.default_rng(0))
    z = r[:, 2, 2]
    hist, _ = np.histogram(z, bins=10, range=(-1, 1))
    assert np.all(np.abs(hist / len(z) - 0.1) < 0.01)


@pytest.mark.parametrize("sym,order", [("C1", 1), ("C5", 5), ("D5", 10), ("T", 12), ("O", 24), ("I", 60)])
def test_point_groups(sym, order):
    g = symmetry_matrices(sym)
    assert len(g) == order
    # closed under multiplication
    prods = np.einsum("aij,bjk->abik", g, g).reshape(-1, 3, 3)
    d = rotation_angle_deg(prods[:, None], g[None])
    assert np.all(d.min(axis=1) < 1e-5)


def test_unknown_group():
    with pytest.raises(ValueError):
        symmetry_matrices("X3")
