"""Initial models from the particles alone (cryodask.initial_model)."""
from __future__ import annotations

import numpy as np
import pytest

from cryodask import initial_model as IM
from cryodask.fsc import fsc_curve
from cryodask.phantoms import make_phantom
from cryodask.simulate import CTFRange, Optics, simulate_particles

BOX, APIX = 32, 6.0


@pytest.fixture(scope="module")
def apo_particles():
    vol = make_phantom("apoferritin", BOX, APIX)
    noisy, _, t = simulate_particles(vol, 300, APIX, np.random.default_rng(0), snr=0.5, ctf=CTFRange(10000, 25000))
    return vol, noisy, t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]]


def test_auto_kind_follows_the_point_group():
    assert IM.auto_kind("O") == "sphere" and IM.auto_kind("I") == "sphere"
    assert IM.auto_kind("D5") == "cylinder" and IM.auto_kind("C7") == "cylinder"
    assert IM.auto_kind("C1") == "blobs" and IM.auto_kind("D2") == "blobs"


def test_cylinder_has_the_measured_width_and_height():
    v = IM.build_initial_model("cylinder", np.zeros((2, 48, 48), np.float32), {}, 5.0, Optics(),
                               diameter=200.0, shape_hint={"width": 150.0, "height": 100.0})[0]
    assert v.shape == (48, 48, 48)
    prof_x = v[24, 24] > 0.5
    prof_z = v[:, 24, 24] > 0.5
    assert abs(prof_x.sum() * 5.0 - 150.0) <= 10.0  # width along x, Å
    assert abs(prof_z.sum() * 5.0 - 100.0) <= 10.0  # height along z, Å


def test_sphere_model_is_the_spherical_average(apo_particles):
    vol, noisy, table = apo_particles
    v, rec = IM.build_initial_model("sphere", noisy, table, APIX, Optics(), diameter=125.0, seed=0)
    assert rec["kind"] == "sphere"
    # radial profile: a shell (apoferritin is hollow), like the truth's spherical average
    c = np.arange(BOX) - BOX // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2).round().astype(int)
    prof = np.bincount(r.ravel(), v.ravel()) / np.bincount(r.ravel())
    truth = np.bincount(r.ravel(), vol.ravel()) / np.bincount(r.ravel())
    assert np.corrcoef(prof[:12], truth[:12])[0, 1] > 0.9
    assert prof[:3].mean() < 0.5 * prof[6:10].max()  # hollow centre


def test_fourier_resize_keeps_centre_and_density():
    rng = np.random.default_rng(1)
    v = np.zeros((32, 32, 32), np.float32)
    v[16, 16, 16] = 1.0
    small = IM.fourier_resize_volume(v, 16)
    assert np.unravel_index(np.argmax(small), small.shape) == (8, 8, 8)
    assert abs(small.sum() * 8 - v.sum()) < 1e-3
    c = np.arange(32) - 16
    img = np.exp(-((c[None, :, None] - rng.uniform(-4, 4, (3, 1, 1))) ** 2 + c[None, None, :] ** 2) / 18.0)
    img = img.astype(np.float32)  # smooth: nothing at the Nyquist frequency
    assert np.allclose(IM.fourier_resize_images(IM.fourier_resize_images(img, 48), 32), img, atol=1e-4)


def test_centre_volume_moves_the_mass_to_the_box_centre_within_the_symmetry():
    from scipy import ndimage

    vol = IM.blob_model(48, 14.0, np.random.default_rng(3))  # asymmetric, not centred on its mass
    off = np.array([3.0, -4.0, 2.5])  # (z, y, x) voxels
    moved = np.fft.ifftn(ndimage.fourier_shift(np.fft.fftn(vol), off)).real.astype(np.float32)
    com0 = np.array(ndimage.center_of_mass(np.clip(vol, 0, None)))
    centred, shift = IM.centre_volume(moved)
    com = np.array(ndimage.center_of_mass(np.clip(centred, 0, None)))
    assert np.allclose(com, 24.0, atol=0.3)
    assert np.allclose(shift, 24.0 - com0 - off, atol=0.3)
    # C4: only along the axis (z); O: the centre of mass of a symmetric map is the centre already
    _, s4 = IM.centre_volume(moved, "C4")
    assert abs(s4[1]) < 1e-9 and abs(s4[2]) < 1e-9 and abs(s4[0] - shift[0]) < 1e-6
    _, so = IM.centre_volume(moved, "O")
    assert np.allclose(so, 0.0)


def test_ab_initio_tournament_keeps_the_best_runs(apo_particles):
    """All runs are scored after the probe; only the ``keep`` best (by held-out likelihood)
    finish the schedule; the best finisher is returned."""
    vol, noisy, table = apo_particles
    v, info = IM.ab_initio(noisy[:120], table.iloc[:120], APIX, Optics(), symmetry="O", diameter=125.0, seed=0,
                           start=vol, box_small=16, iterations=4, batch=40, restarts=5, keep=2, probe=0.5,
                           threads=2)
    assert v.shape == (BOX, BOX, BOX)
    runs = info["runs"]
    assert [r["start"] for r in runs] == ["shape"] + ["blobs"] * 4  # a quarter (≥ 1) from the shape
    assert all(r["scores"][0][0] == 2 for r in runs)  # everyone scored after the probe
    probe = np.array([r["scores"][0][1] for r in runs])
    went_on = [i for i, r in enumerate(runs) if len(r["scores"]) == 2]
    assert sorted(went_on) == sorted(np.argsort(-probe)[:2].tolist())
    assert all(runs[i]["scores"][1][0] == 4 for i in went_on)  # to the end of the schedule
    assert info["chosen"] == max(went_on, key=lambda i: runs[i]["scores"][1][1])


@pytest.mark.slow
def test_ab_initio_finds_the_structure(apo_particles):
    from cryodask.map_align import align_map

    vol, noisy, table = apo_particles
    v, rec = IM.build_initial_model("abinitio", noisy, table, APIX, Optics(), symmetry="O", diameter=125.0,
                                    seed=0, box_small=BOX, iterations=12, batch=100, restarts=8)
    assert rec["kind"] == "abinitio" and rec["start"] == "random blobs"
    al, _ = align_map(v, vol, symmetry="O")
    f = fsc_curve(al, vol)
    assert f[1:6].mean() > 0.8  # right at low resolution (≥ 32 Å)
