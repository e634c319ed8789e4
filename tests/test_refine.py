"""Orientation search and gold-standard refinement (cryodask.refine), on small seeded simulations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryodask import refine as R
from cryodask.ctf import ctf_2d
from cryodask.fsc import fsc_curve
from cryodask.geometry import euler_to_matrix, random_rotations
from cryodask.phantoms import make_phantom
from cryodask.reconstruct import accumulate, finalize
from cryodask.simulate import CTFRange, Optics, simulate_particles

BOX, APIX = 32, 6.0  # apoferritin-like phantom at 6 Å/px: ~20 px across


@pytest.fixture(scope="module")
def apo():
    return make_phantom("apoferritin", BOX, APIX)


def _truth(table):
    rot = euler_to_matrix(table.rlnAngleRot, table.rlnAngleTilt, table.rlnAnglePsi)
    org = np.stack([table.rlnOriginXAngst, table.rlnOriginYAngst], 1) / APIX
    return rot, org


def _defocus(table):
    return table[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()


def test_polar_ctf_matches_relion_formula():
    g = R.polar_grid(64, 30, 96, device="cpu")
    d = np.array([[12000.0, 15000.0, 33.0], [20000.0, 20000.0, 0.0]])
    f = 1 / (64 * 3.0)
    ref = ctf_2d(g.ky * f, g.kx * f, d[:, 0], d[:, 1], d[:, 2], 300, 2.7, 0.1)
    assert torch.allclose(R.polar_ctf(d, g, 3.0, Optics()), ref.float(), atol=1e-4)


def test_polar_transform_is_the_exact_dft():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.normal(size=(2, 16, 16)), dtype=torch.float32)
    g = R.polar_grid(16, 6, 8, device="cpu")
    p = R.polar_transform(img, g)
    # at angle 0 the polar points are the integer frequencies (r, 0) of the rfft
    f = torch.fft.rfft2(torch.fft.ifftshift(img, dim=(-2, -1)))
    assert torch.allclose(p[:, :, 0], f[:, 0, 1:7], atol=1e-3)


def test_symmetrized_sums_equal_symmetric_insertion(apo):
    rng = np.random.default_rng(1)
    _, clean, t = simulate_particles(apo, 40, APIX, rng, snr=None, ctf=CTFRange(10000, 25000))
    rot, _ = _truth(t)
    kw = dict(pixel_size=APIX, optics=Optics())
    direct = accumulate(clean, rot, None, _defocus(t), symmetry="O", **kw)
    sym = R.symmetrize_accumulator(accumulate(clean, rot, None, _defocus(t), **kw), "O")
    ss = np.full(BOX // 2 + 1, 100.0)
    a, b = finalize(direct, ss).numpy(), finalize(sym, ss).numpy()
    assert fsc_curve(a, b)[1:].min() > 0.97


def test_direction_grid_covers_the_asymmetric_unit():
    d = R.direction_grid(5.0, "D5")
    full = R.fibonacci_sphere(4000)
    # every direction is within ~1 grid step of some grid direction's symmetry mate
    c, _ = R.canonical_directions(full, "D5")
    ang = np.degrees(np.arccos(np.clip(c @ d.T, -1, 1))).min(1)
    assert np.percentile(ang, 99) < 5.0
    assert 0.07 < len(d) / len(R.fibonacci_sphere(int(4 * np.pi / np.radians(5) ** 2))) < 0.13  # ~1/10


def test_orientation_search_recovers_known_poses(apo):
    """Noise-free particles, the true map as reference: global then local search."""
    rng = np.random.default_rng(2)
    _, clean, t = simulate_particles(apo, 24, APIX, rng, snr=None, ctf=CTFRange(10000, 25000), max_shift_px=1.5)
    rot, org = _truth(t)
    x = R.normalise_images(clean, 12, device="cpu")
    vol2 = R.reference_volume(apo, device="cpu")
    step = 6.0
    rots = R.rotations_from_directions(R.direction_grid(step, "O"))
    grid = R.polar_grid(BOX, 6, diameter_px=20, device="cpu")
    data = R.prepare_chunk(x, _defocus(t), grid, APIX, Optics(), np.ones(BOX // 2 + 1), support=15)
    rr, oo, _ = R.global_search(data, R.reference_slices(vol2, rots, grid), rots, R.shift_grid(2, 1), top=1)
    err_g = R._angular_error_deg(rr[:, 0], rot, "O")
    assert np.median(err_g) < step  # the coarse search lands within its sampling step
    grid2 = R.polar_grid(BOX, 14, diameter_px=20, device="cpu")
    data2 = R.prepare_chunk(x, _defocus(t), grid2, APIX, Optics(), np.ones(BOX // 2 + 1), support=15)
    r2, o2, _ = R.local_search(data2, vol2, rr[:, 0], oo[:, 0], angle_step=math.radians(3), shift_step=0.5,
                               min_angle=math.radians(0.25), min_shift=0.05, psi_window=math.radians(8))
    err = R._angular_error_deg(r2, rot, "O")
    assert np.mean(err < 1.0) > 0.8, np.round(err, 2)
    assert np.median(np.abs(o2 - org)) < 0.15


def _small_dataset(apo, n=400, seed=3):
    rng = np.random.default_rng(seed)
    noisy, _, t = simulate_particles(apo, n, APIX, rng, snr=0.1, ctf=CTFRange(10000, 25000), max_shift_px=1.0)
    return noisy, t


@pytest.mark.slow
def test_refinement_from_lowpassed_truth_improves_fsc(apo):
    noisy, t = _small_dataset(apo)
    start = R.lowpass(apo, 30.0, APIX)
    s = R.RefineSettings(max_iterations=3, min_iterations=3, global_iterations=1, global_directions=150,
                         top_candidates=1, initial_lowpass=30.0, chunk=200)
    out = R.refine_particles(noisy, t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]], APIX, Optics(),
                             symmetry="O", diameter=125.0, initial=start, settings=s, threads=1)
    before = fsc_curve(start, apo)
    after = fsc_curve(out["map"], apo)
    shells = slice(6, 12)  # 32–16 Å: beyond the start's low-pass
    assert after[shells].mean() > before[shells].mean() + 0.3
    assert out["resolution"]["fsc0.143"] < 20.0
    assert out["initial"]["kind"] == "user"


def test_halves_never_mix(apo):
    """Particles of half 2 are blank: whatever half 1 holds must not reach half 2's map (aligning
    noise would reproduce the reference, so blank images are the clean test)."""
    noisy, t = _small_dataset(apo, n=120, seed=4)
    subsets = np.tile([1, 2], 60)
    noisy = noisy.copy()
    noisy[subsets == 2] = 0.0
    table = t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].copy()
    table["rlnRandomSubset"] = subsets
    s = R.RefineSettings(max_iterations=1, min_iterations=1, global_directions=60, top_candidates=1,
                         initial_lowpass=30.0, chunk=64)
    out = R.refine_particles(noisy, table, APIX, Optics(), symmetry="O", diameter=125.0,
                             initial=R.lowpass(apo, 30.0, APIX), settings=s, threads=1)
    assert (out["table"]["rlnRandomSubset"].to_numpy() == subsets).all()
    c1 = np.corrcoef(R.lowpass(out["half1"], 30, APIX).ravel(), R.lowpass(apo, 30, APIX).ravel())[0, 1]
    assert c1 > 0.6
    assert np.abs(out["half2"]).max() < 1e-6 * np.abs(out["half1"]).max() + 1e-12


@pytest.mark.parametrize("precentre", [True, False])
def test_picks_far_off_centre_are_centred_before_the_search(apo, precentre):
    """Picks off-centre by up to 7 px against a ±2 px first search: centring them on the
    rotational average first finds the centres (origins reported in the boxes as given);
    without it a third stay lost (the control that makes the test able to fail)."""
    rng = np.random.default_rng(5)
    noisy, _, t = simulate_particles(apo, 160, APIX, rng, snr=1.0, ctf=CTFRange(10000, 25000), max_shift_px=5.0)
    origins = R.centre_on_rotational_average(noisy, 125.0 / APIX)
    err0 = np.hypot(*(origins - _truth(t)[1]).T)
    assert np.median(err0) <= 1.0 and np.mean(err0 <= 2.0) > 0.9
    s = R.RefineSettings(max_iterations=1, min_iterations=1, global_directions=60, top_candidates=1,
                         initial_lowpass=30.0, chunk=80, global_max_shift=2.0, precentre=precentre)
    out = R.refine_particles(noisy, t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]], APIX, Optics(),
                             symmetry="O", diameter=125.0, initial=R.lowpass(apo, 30.0, APIX), settings=s,
                             threads=1)
    found = out["table"][["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / APIX
    err = np.hypot(*(found - _truth(t)[1]).T)
    if precentre:
        assert np.median(err) < 0.5 and np.mean(err < 1.0) > 0.9
        assert out["precentre"]["median_px"] > 2.0
    else:
        assert out["precentre"] is None
        assert np.mean(err < 1.0) < 0.75  # measured 0.62: a third of the particles stay lost


def test_shift_grid_and_axis_angle():
    s = R.shift_grid(2.0, 1.0)
    assert len(s) == 13 and np.abs(s).max() == 2
    r = R.axis_angle(np.array([0, 0, math.radians(30)]))
    assert np.allclose(r, euler_to_matrix(0, 0, -30), atol=1e-12) or np.allclose(r, euler_to_matrix(0, 0, 30).T)
    rots = random_rotations(5, np.random.default_rng(0))
    assert np.allclose(R.rot_z(0.3) @ rots, euler_to_matrix(0, 0, np.degrees(0.3)) @ rots)


def test_outputs_are_a_relion_particle_star(apo, tmp_path):
    from cryodask.io.star import read_particle_images, read_particles

    noisy, t = _small_dataset(apo, n=80, seed=6)
    s = R.RefineSettings(max_iterations=1, min_iterations=1, global_directions=60, top_candidates=1,
                         initial_lowpass=30.0, chunk=64)
    out = R.refine_particles(noisy, t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]], APIX, Optics(),
                             symmetry="O", diameter=125.0, initial=R.lowpass(apo, 30.0, APIX), settings=s, threads=1)
    fig = R.write_refinement_outputs(tmp_path, out, noisy, APIX)
    for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "fsc.png", "angular_distribution.png",
              "particles.star", "particles.mrcs", "refine.json"):
        assert (tmp_path / f).is_file(), f
    ds = read_particles(tmp_path / "particles.star")
    for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnDefocusU",
              "rlnRandomSubset"):
        assert np.allclose(ds[c].values, out["table"][c].to_numpy()), c
    assert np.allclose(read_particle_images(ds, [0, 79]), noisy[[0, 79]])
    assert fig["initial_model"]["kind"] == "user" and fig["resolution_A"]["fsc0.143"] > 0


def test_refine_command_line(apo, tmp_path, capsys):
    """``cryodask refine --particles P.star --out DIR``: reads a RELION STAR (+ stack), refines (here
    from a given low-pass start, to stay fast) and writes the outputs with a one-line JSON summary."""
    import json

    from cryodask.cli import main
    from cryodask.io.mrc import write_map
    from cryodask.io.star import read_particles

    noisy, t = _small_dataset(apo, n=80, seed=7)
    src = tmp_path / "in"
    out = R.refine_particles(noisy, t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]], APIX, Optics(),
                             symmetry="O", diameter=125.0, initial=R.lowpass(apo, 30.0, APIX),
                             settings=R.RefineSettings(max_iterations=1, min_iterations=1, global_directions=40,
                                                       top_candidates=1, initial_lowpass=30.0), threads=1)
    R.write_refinement_outputs(src, out, noisy, APIX)
    write_map(tmp_path / "start.mrc", R.lowpass(apo, 30.0, APIX), APIX)
    rc = main(["refine", "--particles", str(src / "particles.star"), "--out", str(tmp_path / "r"), "--symmetry", "O",
               "--diameter", "125", "--initial", str(tmp_path / "start.mrc"), "--fast", "--threads", "1"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n_particles"] == 80 and summary["initial_model"] == "user" and summary["fsc0.143"] < 40
    for f in ("map.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "fsc.png", "angular_distribution.png",
              "particles.star", "particles.mrcs"):
        assert (tmp_path / "r" / f).is_file(), f
    ds = read_particles(tmp_path / "r" / "particles.star")
    # the halves of the input STAR are kept (gold standard across runs)
    assert np.array_equal(ds["rlnRandomSubset"].values, out["table"]["rlnRandomSubset"].to_numpy())
    assert main(["refine", "--particles", str(tmp_path / "missing.star"), "--out", str(tmp_path / "x")]) == 2
