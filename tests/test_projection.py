"""The Fourier-slice projector and its adjoint: RELION's own projections, a direct full-grid
reference implementation of the trilinear gather/scatter, the adjoint identity, and the
half-grid (Hermitian) bookkeeping."""
import numpy as np
import pytest
import torch

from cryodask.ctf import ctf_2d, frequency_grid_rfft
from cryodask.geometry import euler_to_matrix, random_rotations
from cryodask.projection import (
    extract_slices,
    half_fourier_volume,
    images_to_fourier,
    insert_slices,
    project,
    slice_coordinates,
    view_order,
    volume_to_fourier,
    volume_to_half_fourier,
)


def _smooth_volume(n, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.normal(size=(n, n, n)), 1.5).astype(np.float32)


def _reference_gather(fvol: np.ndarray, rot: np.ndarray, n: int, pad: int = 2) -> np.ndarray:
    """Trilinear interpolation of the full centred grid, written out point by point (numpy);
    the padded grid's Nyquist planes (k = -M/2, whose mates k = +M/2 lie outside the grid) are
    zero, as in RELION's projector."""
    m = fvol.shape[0]
    fvol = fvol.copy()
    fvol[0], fvol[:, 0], fvol[:, :, 0] = 0, 0, 0
    coords, inside = slice_coordinates(rot[None], n, pad, "cpu")
    c = coords[0].numpy().astype(np.float64) + m // 2  # (N, N//2+1, 3) as (x, y, z) indices
    out = np.zeros(c.shape[:2], np.complex128)
    for iy, ix in zip(*np.nonzero(inside.numpy())):
        p = c[iy, ix]
        p0 = np.floor(p).astype(int)
        f = p - p0
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    x, y, z = p0[0] + dx, p0[1] + dy, p0[2] + dz
                    if 0 <= x < m and 0 <= y < m and 0 <= z < m:
                        w = (f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1]) * (f[2] if dz else 1 - f[2])
                        out[iy, ix] += w * fvol[z, y, x]
    return out


def test_extract_matches_full_grid_reference():
    n = 16
    fvol = volume_to_fourier(_smooth_volume(n), device="cpu")
    rots = random_rotations(3, np.random.default_rng(1))
    got = extract_slices(fvol, rots, n).numpy()
    for r, g in zip(rots, got):
        ref = _reference_gather(fvol.numpy(), r, n)
        assert np.abs(g - ref).max() < 1e-4 * np.abs(ref).max()
    # the half-grid forms give the same slices
    for table in (half_fourier_volume(fvol), volume_to_half_fourier(_smooth_volume(n), device="cpu")):
        again = extract_slices(table, rots, n).numpy()
        np.testing.assert_allclose(again, got, rtol=0, atol=1e-5 * np.abs(got).max())


def test_insert_is_adjoint_of_extract():
    """Re⟨E V, S⟩ over the full 2D plane = Re⟨V, Eᵀ S⟩ over the full 3D grid (V Hermitian, S from
    real images; rfft columns kx > 0 stand for two samples)."""
    n, m = 16, 32
    rng = np.random.default_rng(2)
    fvol = volume_to_fourier(_smooth_volume(n, 3), device="cpu")
    fvol[0], fvol[:, 0], fvol[:, :, 0] = 0, 0, 0  # k = -M/2 planes: not used by the projector
    rots = random_rotations(5, rng)
    s = images_to_fourier(rng.normal(size=(5, n, n)).astype(np.float32))
    data = torch.zeros((m, m, m), dtype=torch.complex64)
    weights = torch.zeros((m, m, m))
    insert_slices(data, weights, s, torch.ones(s.shape), rots)
    mult = torch.where(torch.fft.rfftfreq(n) == 0, 1.0, 2.0)
    lhs = (torch.conj(extract_slices(fvol, rots, n)) * s * mult).real.sum().item()
    rhs = (torch.conj(fvol) * data).real.sum().item()
    assert abs(lhs - rhs) < 1e-4 * abs(lhs)


def test_insert_matches_full_grid_scatter():
    """Half-grid insertion with Hermitian closure equals scattering every sample and its Friedel
    mate into a full grid (for real images, whose kx = 0 column holds both mates)."""
    n, m = 12, 24
    rng = np.random.default_rng(4)
    rots = random_rotations(4, rng)
    s = images_to_fourier(rng.normal(size=(4, n, n)).astype(np.float32))
    sw = images_to_fourier(rng.normal(size=(4, n, n)).astype(np.float32)).abs() ** 2  # symmetric weights
    data = torch.zeros((m, m, m), dtype=torch.complex64)
    weights = torch.zeros((m, m, m))
    insert_slices(data, weights, s, sw, rots)
    ref_d = np.zeros((m, m, m), np.complex128)
    ref_w = np.zeros((m, m, m))
    coords, inside = slice_coordinates(rots, n, 2, "cpu")
    for b in range(4):
        for iy, ix in zip(*np.nonzero(inside.numpy())):
            if iy == n // 2 and ix == 0:
                continue  # the (0, -N/2) Nyquist sample has no mate inside the plane
            for sign in ((1, -1) if ix > 0 else (1,)):
                p = sign * coords[b, iy, ix].numpy().astype(np.float64) + m // 2
                v = complex(s[b, iy, ix]) if sign > 0 else complex(s[b, iy, ix]).conjugate()
                p0 = np.floor(p).astype(int)
                f = p - p0
                for dz in (0, 1):
                    for dy in (0, 1):
                        for dx in (0, 1):
                            x, y, z = p0[0] + dx, p0[1] + dy, p0[2] + dz
                            if 0 <= x < m and 0 <= y < m and 0 <= z < m:
                                w = (f[0] if dx else 1 - f[0]) * (f[1] if dy else 1 - f[1]) * (f[2] if dz else 1 - f[2])
                                ref_d[z, y, x] += w * v
                                ref_w[z, y, x] += w * float(sw[b, iy, ix])
    c = np.arange(m) - m // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    ins = r < m // 2 - 2  # away from the Nyquist sample's spill-over
    np.testing.assert_allclose(data.numpy()[ins], ref_d[ins], atol=1e-4 * np.abs(ref_d).max())
    np.testing.assert_allclose(weights.numpy()[ins], ref_w[ins], atol=1e-4 * ref_w.max())


def test_view_order_is_a_permutation_grouping_directions():
    rots = random_rotations(500, np.random.default_rng(5))
    order = view_order(rots)
    assert sorted(order.tolist()) == list(range(500))
    d = rots[order, 2] * np.sign(rots[order, 2, 2:3])
    step = np.degrees(np.arccos(np.clip(np.abs(np.sum(d[1:] * d[:-1], 1)), -1, 1)))
    rand = np.degrees(np.arccos(np.clip(np.abs(np.sum(rots[1:, 2] * rots[:-1, 2], 1)), -1, 1)))
    assert np.median(step) < 0.3 * np.median(rand)


def _relion_set(shared_data, kind):
    import mrcfile
    import starfile

    d = shared_data / "relion_projections" / kind
    p = starfile.read(d / "particles_true.star")["particles"]
    rot = euler_to_matrix(p.rlnAngleRot, p.rlnAngleTilt, p.rlnAnglePsi)
    origins = np.stack([p.rlnOriginXAngst, p.rlnOriginYAngst], 1) / 5.0
    ctf = None
    if kind == "ctf":
        ky, kx = frequency_grid_rfft(64, 5.0)
        ctf = ctf_2d(ky, kx, p.rlnDefocusU.values, p.rlnDefocusV.values, p.rlnDefocusAngle.values, 300, 2.7, 0.1)
    return mrcfile.read(d / "truth.mrc"), mrcfile.read(d / "particles.mrcs"), rot, origins, ctf


@pytest.mark.shared
@pytest.mark.parametrize("kind", ["noctf", "ctf"])
def test_project_reproduces_relion_project(shared_data, kind):
    """Same algorithm as relion_project (×2 padding, trilinear): images agree to about 0.1 %
    (median; worst 0.15 % without, 0.3 % with CTF); a transposed matrix would be far off."""
    vol, imgs, rot, origins, ctf = _relion_set(shared_data, kind)
    got = project(vol, rot, origins, ctf, device="cpu").numpy()
    err = np.linalg.norm(got - imgs, axis=(1, 2)) / np.linalg.norm(imgs, axis=(1, 2))
    assert err.max() < (0.002 if kind == "noctf" else 0.004)
    assert np.median(err) < 0.0012
    # the same with a precomputed table, reused
    table = volume_to_half_fourier(vol, device="cpu")
    again = project(None, rot[:50], origins[:50], None if ctf is None else ctf[:50], fvol=table).numpy()
    np.testing.assert_allclose(again, got[:50], atol=1e-5 * np.abs(got).max())
    wrong = project(vol, np.transpose(rot[:20], (0, 2, 1)), origins[:20], None if ctf is None else ctf[:20],
                    device="cpu").numpy()
    assert np.median(np.linalg.norm(wrong - imgs[:20], axis=(1, 2)) / np.linalg.norm(imgs[:20], axis=(1, 2))) > 0.3


def test_torch_fallback_matches_compiled_path(monkeypatch):
    """The index_add_/gather path (used on GPUs) gives the same sums as scipy's compiled loops."""
    import cryodask.projection as P

    n, m = 16, 32
    rng = np.random.default_rng(6)
    rots = random_rotations(7, rng)
    fvol = volume_to_fourier(_smooth_volume(n, 7), device="cpu")
    s = images_to_fourier(rng.normal(size=(7, n, n)).astype(np.float32))
    ref_slices = extract_slices(fvol, rots, n)
    d0, w0 = torch.zeros((m, m, m), dtype=torch.complex64), torch.zeros((m, m, m))
    insert_slices(d0, w0, s, torch.ones(s.shape), rots)
    monkeypatch.setattr(P, "_USE_SCIPY", False)
    np.testing.assert_allclose(extract_slices(fvol, rots, n).numpy(), ref_slices.numpy(), atol=1e-4)
    d1, w1 = torch.zeros((m, m, m), dtype=torch.complex64), torch.zeros((m, m, m))
    insert_slices(d1, w1, s, torch.ones(s.shape), rots)
    np.testing.assert_allclose(d1.numpy(), d0.numpy(), atol=1e-4 * np.abs(d0.numpy()).max())
    np.testing.assert_allclose(w1.numpy(), w0.numpy(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    n = 32
    rng = np.random.default_rng(8)
    vol = _smooth_volume(n, 9)
    rots = random_rotations(20, rng)
    cpu = project(vol, rots, device="cpu").numpy()
    gpu = project(vol, rots, device="cuda").cpu().numpy()
    np.testing.assert_allclose(gpu, cpu, atol=1e-4 * np.abs(cpu).max())
