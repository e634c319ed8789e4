"""The simulator against independent references: real-space projection, RELION's own
projections, the SNR definition, and particle positions in micrographs."""
import numpy as np
import pytest

from cryodask.ctf import ctf_2d, frequency_grid_rfft
from cryodask.geometry import euler_to_matrix
from cryodask.phantoms import make_phantom
from cryodask.projection import project, project_real_space
from cryodask.simulate import CTFRange, project_exact, simulate_micrograph, simulate_particles

ANGLES = [(0, 0, 0), (0, 90, 0), (30, 60, -20), (-120, 135, 75), (90, 90, 90), (170, 10, -45)]


@pytest.fixture(scope="module")
def klh48():
    # slightly smoothed so that it is band-limited: then sinc (Fourier) and spline (real-space)
    # interpolation agree, and any difference is an error of the projector
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(make_phantom("klh", 48, 12.0), 0.8)


@pytest.mark.parametrize("angles", ANGLES)
def test_exact_projector_matches_real_space_reference(klh48, angles):
    r = euler_to_matrix(*angles)
    ref = project_real_space(klh48, r, order=5)
    got = project_exact(klh48, r[None])[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.005


def test_trilinear_projector_close_to_reference(klh48):
    # the ×2-padded trilinear slice (RELION's algorithm) is within a few % of the exact projection
    r = euler_to_matrix(30, 60, -20)
    ref = project_real_space(klh48, r, order=5)
    got = project(klh48, r[None], device="cpu").numpy()[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.08


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


@pytest.mark.parametrize("kind", ["noctf", "ctf"])
def test_reproduces_relion_project(shared_data, kind):
    """Euler convention, origin sign and CTF against images made by relion_project itself."""
    vol, imgs, rot, origins, ctf = _relion_set(shared_data, kind)
    same_algorithm = project(vol, rot, origins, ctf, device="cpu").numpy()
    err = np.linalg.norm(same_algorithm - imgs, axis=(1, 2)) / np.linalg.norm(imgs, axis=(1, 2))
    assert err.max() < 0.005
    exact = project_exact(vol, rot, origins, None if ctf is None else ctf.numpy())
    err = np.linalg.norm(exact - imgs, axis=(1, 2)) / np.linalg.norm(imgs, axis=(1, 2))
    assert np.median(err) < 0.04  # RELION's own trilinear interpolation error
    # a wrong convention (e.g. transposed matrix or flipped origin sign) is far off
    wrong = project_exact(vol, np.transpose(rot, (0, 2, 1)), origins)
    assert np.median(np.linalg.norm(wrong - imgs, axis=(1, 2)) / np.linalg.norm(imgs, axis=(1, 2))) > 0.3
    flipped = project_exact(vol, rot, -origins, None if ctf is None else ctf.numpy())
    assert np.median(np.linalg.norm(flipped - imgs, axis=(1, 2)) / np.linalg.norm(imgs, axis=(1, 2))) > 0.1


@pytest.mark.parametrize("snr", [0.05, 0.1, 1.0])
def test_noise_hits_requested_snr(snr):
    vol = make_phantom("apoferritin", 32, 6.0)
    noisy, clean, _ = simulate_particles(vol, 400, 6.0, np.random.default_rng(3), snr=snr, max_shift_px=2)
    measured = np.mean(np.var(clean, axis=(1, 2))) / np.var(noisy - clean)
    assert abs(measured / snr - 1) < 0.05


def test_stack_truth_matches_images():
    """Clean images equal projections at the tabulated poses, shifts and CTF."""
    vol = make_phantom("klh", 40, 14.0)
    _, clean, t = simulate_particles(vol, 20, 14.0, np.random.default_rng(5), snr=None, max_shift_px=4,
                                     ctf=CTFRange(15000, 25000, astig=500))
    rot = euler_to_matrix(t.rlnAngleRot, t.rlnAngleTilt, t.rlnAnglePsi)
    ky, kx = frequency_grid_rfft(40, 14.0)
    ctf = ctf_2d(ky, kx, t.rlnDefocusU.values, t.rlnDefocusV.values, t.rlnDefocusAngle.values, 300, 2.7, 0.1)
    origins = np.stack([t.rlnOriginXAngst, t.rlnOriginYAngst], 1) / 14.0
    assert np.allclose(project_exact(vol, rot, origins, ctf.numpy()), clean, atol=1e-4 * np.abs(clean).max())
    assert np.all(np.abs(origins) <= 4)


def test_micrograph_coordinates_point_at_particle_centres():
    # apoferritin is centrosymmetric: each particle's centre of mass is its centre
    vol = make_phantom("apoferritin", 48, 4.0)
    rng = np.random.default_rng(11)
    mic, t, clean = simulate_micrograph(vol, 4.0, (512, 512), 30.0, rng, snr=None, ctf=CTFRange(enabled=False))
    assert len(t) >= 20
    sig = -mic
    true_x = t.rlnCoordinateX - t.rlnOriginXAngst / 4.0
    true_y = t.rlnCoordinateY - t.rlnOriginYAngst / 4.0
    assert np.allclose(true_x, t.cdTrueX) and np.allclose(true_y, t.cdTrueY)
    yy, xx = np.mgrid[0:512, 0:512]
    errs = []
    for x, y in zip(true_x, true_y):
        w = sig * (((xx - x) ** 2 + (yy - y) ** 2) < 17**2)
        errs.append(np.hypot((w * xx).sum() / w.sum() - x, (w * yy).sum() / w.sum() - y))
    assert np.max(errs) < 0.25
    # the clean boxes are centred on the integer coordinates, offset by the origins
    c = clean.sum(0)
    assert np.unravel_index(np.argmax(c), c.shape) != (0, 0)


def test_side_and_top_views():
    vol = make_phantom("klh", 40, 12.0)
    _, _, side = simulate_particles(vol, 50, 12.0, np.random.default_rng(0), views="side", snr=None, symmetry="D5")
    _, _, top = simulate_particles(vol, 50, 12.0, np.random.default_rng(0), views="top", snr=None, symmetry="D5")
    assert (side.cdViewClass == "side").all() and (top.cdViewClass == "top").all()
    assert np.all(np.abs(side.rlnAngleTilt - 90) <= 6.0001)


def test_deterministic_for_a_seed():
    vol = make_phantom("apoferritin", 32, 6.0)
    a = simulate_particles(vol, 30, 6.0, np.random.default_rng(9), snr=0.1)
    b = simulate_particles(vol, 30, 6.0, np.random.default_rng(9), snr=0.1)
    assert np.array_equal(a[0], b[0]) and a[2].equals(b[2])
