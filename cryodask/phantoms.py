"""Built-in test volumes with known geometry, defined analytically in Å.

Each phantom is a sum of smooth primitives (Gaussian-profile rods and ellipsoids) evaluated at
the voxel centres, so it can be rendered at any pixel size and box. Densities are positive
(protein = high), float32, shape ``(box, box, box)`` indexed ``(z, y, x)``, centre at ``box//2``.

* ``apoferritin`` — 24 four-helix-bundle subunits arranged with octahedral (O) symmetry on a
  shell of outer diameter ≈ 120 Å and inner diameter ≈ 80 Å; round in every view.
* ``klh`` — a keyhole-limpet-haemocyanin-like didecamer: a hollow cylinder ≈ 350 Å wide and
  ≈ 400 Å tall built from blobs with D5 symmetry, plus internal collar density; side views are
  near-square, top views are rings.
"""
from __future__ import annotations

import numpy as np

from .geometry import symmetry_matrices

__all__ = ["PHANTOMS", "make_phantom", "phantom_diameter", "default_pixel_size", "phantom_symmetry"]


def _grid(box: int, pixel_size: float) -> np.ndarray:
    c = (np.arange(box) - box // 2) * pixel_size
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.stack([x, y, z], -1)  # (z, y, x, 3) in Å, vector order (x, y, z)


def _rods(points: np.ndarray, starts: np.ndarray, ends: np.ndarray, sigma: float) -> np.ndarray:
    """Sum of rods with a Gaussian cross-section (σ in Å) between ``starts`` and ``ends`` (k, 3)."""
    out = np.zeros(points.shape[:-1], dtype=np.float64)
    pts = points.reshape(-1, 3)
    flat = out.reshape(-1)
    for a, b in zip(starts, ends):
        ab = b - a
        lo, hi = np.minimum(a, b) - 4 * sigma, np.maximum(a, b) + 4 * sigma
        sel = np.all((pts >= lo) & (pts <= hi), axis=1)
        p = pts[sel]
        t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
        d2 = np.sum((p - (a + t[:, None] * ab)) ** 2, axis=1)
        flat[sel] += np.exp(-d2 / (2 * sigma**2))
    return out


def _blobs(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Sum of isotropic Gaussian blobs; ``radii`` (k,) are the σ in Å."""
    out = np.zeros(points.shape[:-1], dtype=np.float64)
    pts = points.reshape(-1, 3)
    flat = out.reshape(-1)
    for c, s in zip(centres, radii):
        sel = np.all(np.abs(pts - c) <= 4 * s, axis=1)
        d2 = np.sum((pts[sel] - c) ** 2, axis=1)
        flat[sel] += np.exp(-d2 / (2 * s**2))
    return out


def _apoferritin(points: np.ndarray) -> np.ndarray:
    # One subunit: a four-helix bundle lying tangentially on the shell at radius 50 Å, plus a
    # short fifth helix; its frame (n = radial, t1 = long axis, t2) is placed at a general
    # position so that the 24 copies under O tile the shell without sitting on symmetry axes.
    n = np.array([0.28, 0.47, 0.84])
    n /= np.linalg.norm(n)
    t1 = np.cross(n, [0.0, 0.0, 1.0])
    t1 /= np.linalg.norm(t1)
    rot = np.deg2rad(25.0)
    t2 = np.cross(n, t1)
    t1, t2 = np.cos(rot) * t1 + np.sin(rot) * t2, -np.sin(rot) * t1 + np.cos(rot) * t2
    centre = 50.0 * n
    starts, ends = [], []
    for a, b in [(-6.5, -4.5), (6.5, -4.5), (-6.5, 4.5), (6.5, 4.5)]:
        off = centre + a * t2 + b * n
        starts.append(off - 25.0 * t1)
        ends.append(off + 25.0 * t1)
    e0 = centre + 12.0 * t2 + 19.0 * t1 - 2.0 * n
    starts.append(e0)
    ends.append(e0 + 14.0 * (0.6 * t2 - 0.8 * t1))
    starts, ends = np.array(starts), np.array(ends)
    sym = symmetry_matrices("O")
    all_s = np.concatenate([starts @ g.T for g in sym])
    all_e = np.concatenate([ends @ g.T for g in sym])
    return _rods(points, all_s, all_e, sigma=3.0)


def _klh(points: np.ndarray) -> np.ndarray:
    # Wall: staggered tiers of blobs on a cylinder of radius ~152 Å (outer edge ~175 Å),
    # heights up to ±178 Å (top edge ~200 Å), D5 symmetry (5-fold along z, 2-fold along x).
    centres, radii = [], []
    for tier, z in enumerate((22.0, 66.0, 110.0, 154.0)):
        for k in range(6):  # six blobs per 72° sector of one decamer
            theta = np.deg2rad(12.0 * k + (6.0 if tier % 2 else 0.0) + 3.0)
            r = 152.0 if k % 2 == 0 else 147.0
            centres.append((r * np.cos(theta), r * np.sin(theta), z))
            radii.append(12.5)
    # collar and internal density near the ends: an inner ring at r ~ 95 Å
    for k in range(3):
        theta = np.deg2rad(24.0 * k + 10.0)
        centres.append((95.0 * np.cos(theta), 95.0 * np.sin(theta), 176.0))
        radii.append(15.0)
    # an off-axis arch inside the wall, unique to the asymmetric unit (breaks local symmetry)
    centres.append((118.0 * np.cos(0.3), 118.0 * np.sin(0.3), 120.0))
    radii.append(11.0)
    centres, radii = np.array(centres), np.array(radii)
    sym = symmetry_matrices("D5")
    all_c = np.concatenate([centres @ g.T for g in sym])
    all_r = np.concatenate([radii for _ in sym])
    return _blobs(points, all_c, all_r)


PHANTOMS = {
    # name: (builder, outer diameter Å, default pixel size Å, point group)
    "apoferritin": (_apoferritin, 120.0, 3.0, "O"),
    "klh": (_klh, 400.0, 10.0, "D5"),
}


def phantom_diameter(name: str) -> float:
    """Largest outer dimension of a built-in phantom, Å."""
    return PHANTOMS[name][1]


def default_pixel_size(name: str) -> float:
    """Pixel size (Å) at which the phantom spans ~40 px, a size good for fast simulations."""
    return PHANTOMS[name][2]


def phantom_symmetry(name: str) -> str:
    """Point group of the phantom (RELION symbol)."""
    return PHANTOMS[name][3]


def make_phantom(name: str, box: int, pixel_size: float) -> np.ndarray:
    """Render phantom ``name`` into a ``(box, box, box)`` float32 volume at ``pixel_size`` Å/px.

    The density is scaled to a maximum of 1.
    """
    if name not in PHANTOMS:
        raise ValueError(f"unknown phantom {name!r}; choose one of {sorted(PHANTOMS)}")
    vol = PHANTOMS[name][0](_grid(box, pixel_size))
    vol /= vol.max()
    return vol.astype(np.float32)
