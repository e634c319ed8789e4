"""Rotations in RELION's convention, and point-group symmetry.

Conventions (the same as RELION's ``Euler_angles2matrix`` and ``relion_project``):

* Euler angles ``(rot, tilt, psi)`` in **degrees**, ZYZ, giving a 3×3 matrix ``A``.
* Volumes are numpy arrays indexed ``(z, y, x)``; the physical coordinate vector is
  ``r = (x, y, z)`` with the origin at voxel ``N // 2`` on every axis.
* A projection image with angles ``A`` is ``P(x, y) = ∫ V(Aᵀ (x, y, z)ᵀ) dz``: the rows of ``A``
  are the image's x axis, its y axis, and the viewing direction, expressed in the volume's frame.
  In Fourier space, image frequency ``(kx, ky)`` samples the volume's transform at
  ``Aᵀ (kx, ky, 0)ᵀ`` (the central-slice theorem).
* Origins: ``rlnOriginXAngst = +s`` means the particle centre sits ``s`` Å towards −x of the
  box centre (as ``relion_project`` draws it); to centre a particle, shift it by ``+origin``.

Internally poses are matrices; Euler angles appear only at file boundaries.
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "random_rotations",
    "symmetry_matrices",
    "rotation_angle_deg",
]


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """RELION ZYZ Euler angles (degrees) → rotation matrices.

    Parameters
    ----------
    rot, tilt, psi : float or array of shape (n,)
        Angles in degrees.

    Returns
    -------
    ndarray, shape (3, 3) for scalars or (n, 3, 3), float64.
    """
    a, b, g = (np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cc - sg * sa
    m[..., 0, 1] = cg * cs + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cc - cg * sa
    m[..., 1, 1] = -sg * cs + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sc
    m[..., 2, 1] = ss
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rotation matrices (..., 3, 3) → RELION Euler angles ``(rot, tilt, psi)`` in degrees.

    ``tilt`` is in [0, 180]; ``rot`` and ``psi`` in (−180, 180]. At the poles (tilt 0 or 180)
    only ``rot ± psi`` is defined; ``rot`` is then set to 0, as RELION does.
    """
    m = np.asarray(m, dtype=np.float64)
    cb = np.clip(m[..., 2, 2], -1.0, 1.0)
    tilt = np.arccos(cb)
    sb = np.sqrt(np.maximum(0.0, 1.0 - cb * cb))
    pole = sb < 1e-6
    rot = np.where(pole, 0.0, np.arctan2(m[..., 2, 1], m[..., 2, 0]))
    psi = np.where(pole, np.arctan2(-m[..., 1, 0], m[..., 0, 0]), np.arctan2(m[..., 1, 2], -m[..., 0, 2]))
    # at tilt = 180 the in-plane angle enters with the opposite sign
    psi = np.where(pole & (cb < 0), np.arctan2(m[..., 1, 0], -m[..., 0, 0]), psi)
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly from SO(3) (Haar measure), shape (n, 3, 3)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return quaternion_to_matrix(q)


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Unit quaternions (w, x, y, z), shape (n, 4) → rotation matrices (n, 3, 3)."""
    w, x, y, z = np.moveaxis(np.asarray(q, dtype=np.float64), -1, 0)
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        -2,
    )


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation taking ``b`` to ``a``; shapes (..., 3, 3)."""
    r = np.einsum("...ij,...kj->...ik", a, b)
    tr = np.clip((np.trace(r, axis1=-2, axis2=-1) - 1) / 2, -1, 1)
    return np.rad2deg(np.arccos(tr))


def _axis_angle(axis, deg) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    t = np.deg2rad(deg)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def _close_group(gens: list[np.ndarray]) -> np.ndarray:
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in gens:
                c = h @ g
                if not any(np.allclose(c, e, atol=1e-8) for e in group):
                    group.append(c)
                    new.append(c)
        frontier = new
    return np.array(group)


def symmetry_matrices(symbol: str) -> np.ndarray:
    """Rotation matrices of a point group in RELION's standard orientation, shape (n, 3, 3).

    ``C1``, ``Cn`` (n-fold axis along z), ``Dn`` (n-fold along z, 2-fold along x),
    ``T`` (2-folds along x, y, z), ``O`` (4-folds along x, y, z), ``I`` (RELION's ``I1``
    orientation: 2-folds along x, y, z, 5-fold in the yz plane).
    """
    s = symbol.strip().upper()
    if s in ("", "C1"):
        return np.eye(3)[None]
    if s[0] == "C" and s[1:].isdigit():
        n = int(s[1:])
        return _close_group([_axis_angle((0, 0, 1), 360.0 / n)])
    if s[0] == "D" and s[1:].isdigit():
        n = int(s[1:])
        return _close_group([_axis_angle((0, 0, 1), 360.0 / n), _axis_angle((1, 0, 0), 180.0)])
    if s == "T":
        return _close_group([_axis_angle((0, 0, 1), 180.0), _axis_angle((1, 1, 1), 120.0)])
    if s == "O":
        return _close_group([_axis_angle((0, 0, 1), 90.0), _axis_angle((1, 1, 1), 120.0)])
    if s in ("I", "I1"):
        phi = (1 + np.sqrt(5)) / 2
        return _close_group([_axis_angle((0, 0, 1), 180.0), _axis_angle((1, 1, 1), 120.0),
                             _axis_angle((0, 1, phi), 72.0)])
    raise ValueError(f"unknown point group {symbol!r}: use C1, Cn, Dn, T, O or I")
