"""2D alignment (cryodask.align2d) measured against the true in-plane angles and shifts."""
from __future__ import annotations

import subprocess
import sys

import dask
import dask.array as da
import numpy as np
import pytest
import torch

from cryodask.align2d import (DEFAULT_VARIANT, VARIANTS, RSGDSettings, align2d_star, align_side_views,
                              apply_graph, centre_top_views, inplane_errors, polar_transform, refine_alignment,
                              refine_graph, reference_mask, register_graph, register_masks, register_side_masks,
                              relion_parameters, rotation, rotational_correlation, rsgd, soft_masks, ssim_figures,
                              warp, _symmetry_candidates)
from cryodask.geometry import euler_to_matrix
from cryodask.select import FEATURES, particle_features, preprocess_particles, select_particles
from cryodask.simulate import project_exact, simulate_particles

F = {k: i for i, k in enumerate(FEATURES)}
APIX = 10.0
DIAMETER_A = 360.0


def cylinder_volume(box: int = 64) -> np.ndarray:
    """A hollow cylinder (axis z, outer radius ~16 px, length 36 px) with four density tiers and
    a few blobs on its wall: a KLH-like object (near-square rectangles from the side)."""
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.hypot(x, y)
    vol = np.exp(-((r - 14.0) / 2.0) ** 2) / (1 + np.exp(np.abs(z) - 18.0)) * (1 + 0.4 * np.cos(2 * np.pi * z / 9.0))
    for a, zz in [(0.3, 10), (1.9, -6), (3.5, 3), (4.4, -13)]:
        vol += 0.8 * np.exp(-((x - 14 * np.cos(a)) ** 2 + (y - 14 * np.sin(a)) ** 2 + (z - zz) ** 2) / 12.5)
    return (vol / vol.max()).astype(np.float32)


def shell_volume(box: int = 64) -> np.ndarray:
    """A hollow sphere (outer radius 19 px, inner 14 px): round in every view, like apoferritin."""
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.sqrt(x**2 + y**2 + z**2)
    vol = 1 / (1 + np.exp((r - 19.0) / 0.8)) - 0.8 / (1 + np.exp((r - 14.0) / 0.8))
    return (vol / vol.max()).astype(np.float32)


@pytest.fixture(scope="module")
def volume():
    return cylinder_volume()


@pytest.fixture(scope="module")
def side_set(volume):
    """200 side views at SNR 0.1 (CTF on, random psi, shifts ±3 px) with their features."""
    noisy, clean, table = simulate_particles(volume, 200, APIX, np.random.default_rng(0), views="side", snr=0.1,
                                             max_shift_px=3)
    d = table[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()
    feats = particle_features(noisy, APIX, view="side", diameter_A=DIAMETER_A, defocus=d)
    work = preprocess_particles(noisy, APIX, lowpass_A=DIAMETER_A / 8, defocus=d)
    return noisy, table, d, feats, work


def _truth(table):
    return table["rlnAnglePsi"].to_numpy(), table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / APIX


def _errors(theta, centres, table, symmetry=2):
    rel = relion_parameters(theta, centres, APIX)
    est = np.stack([rel["rlnOriginXAngst"], rel["rlnOriginYAngst"]], 1) / APIX
    return inplane_errors(rel["rlnAnglePsi"], est, *_truth(table), symmetry)


# --------------------------------------------------------------------------------- conventions
def test_warp_and_relion_parameters_follow_relion(volume):
    """A particle projected with psi = 35° and origin (3, −2) px, rotated by θ = −35° about its
    centre c = −origin, is the psi = 0 projection: rlnAnglePsi = −θ, rlnOrigin = −c."""
    rots = euler_to_matrix([20.0, 20.0], [90.0, 90.0], [0.0, 35.0])
    p0 = project_exact(volume, rots[:1])[0]
    p = project_exact(volume, rots[1:], origins_px=np.array([[3.0, -2.0]]))
    aligned = warp(torch.tensor(p), rotation(torch.deg2rad(torch.tensor([-35.0]))), torch.tensor([[-3.0, 2.0]]))[0]
    assert np.abs(aligned.numpy() - p0).mean() < 0.1 * np.abs(p0).mean()
    wrong = warp(torch.tensor(p), rotation(torch.deg2rad(torch.tensor([35.0]))), torch.tensor([[-3.0, 2.0]]))[0]
    assert np.abs(wrong.numpy() - p0).mean() > 0.5 * np.abs(p0).mean()
    rel = relion_parameters(np.array([-35.0]), np.array([[-3.0, 2.0]]), APIX)
    assert rel["rlnAnglePsi"][0] == pytest.approx(35.0)
    assert (rel["rlnOriginXAngst"][0], rel["rlnOriginYAngst"][0]) == pytest.approx((30.0, -20.0))


def test_rsgd_relaxes_its_step_and_converges():
    target = torch.tensor([[1.0, -2.0], [0.3, 0.2], [-4.0, 0.5]])
    seen = []

    def loss(p, idx):
        seen.append(len(idx))
        return ((p - target[idx]) ** 2).sum(1)

    p, final, iters = rsgd(loss, torch.zeros(3, 2), RSGDSettings(max_step=0.5, min_step=1e-4, max_iter=200))
    assert torch.allclose(p, target, atol=1e-3)
    assert torch.all(iters < 200)  # stopped by the minimum step, not the iteration limit
    assert seen[0] == 3 and seen[-1] < 3  # converged problems leave the batch
    # without relaxation the regular step would oscillate: a fixed 0.5 step cannot reach 1e-3
    p_fixed, _, _ = rsgd(loss, torch.zeros(3, 2), RSGDSettings(max_step=0.5, min_step=1e-4, relaxation=1.0,
                                                              max_iter=50))
    assert not torch.allclose(p_fixed, target, atol=1e-2)


def _rect_features(angles_deg, centres, length=40.0, width=32.0):
    f = np.zeros((len(angles_deg), len(FEATURES)))
    f[:, F["found"]] = 1
    f[:, F["length"]], f[:, F["width"]] = length, width
    f[:, F["angle"]] = angles_deg
    f[:, F["x"]], f[:, F["y"]] = np.asarray(centres, float).T
    return f


def test_local_registration_needs_a_global_start():
    f = _rect_features([90.0 + 12.0, 90.0 + 60.0], [(2.0, -1.5), (1.0, 1.0)])
    moving = soft_masks(f, 64, device="cpu")
    fixed = reference_mask(40.0, 32.0, 64, device="cpu")
    A, t, _ = register_masks(moving, fixed, "rigid", settings=RSGDSettings(max_step=0.02, min_step=1e-5))
    theta = torch.rad2deg(torch.atan2(A[:, 1, 0], A[:, 0, 0])).numpy()
    assert theta[0] == pytest.approx(12.0, abs=0.5) and t[0].numpy() == pytest.approx([2.0, -1.5], abs=0.3)
    assert abs(((theta[1] - 60.0) + 90) % 180 - 90) > 10  # 60° away: the local optimizer is lost
    g = register_side_masks(f, 40.0, 32.0, 64, 1.0, "global-mask", device="cpu")
    assert ((g[:, 0] - np.array([12.0, 60.0]) + 90) % 180 - 90) == pytest.approx([0, 0], abs=1.0)


def test_rotational_correlation_finds_the_rotation():
    rng = np.random.default_rng(3)
    img = torch.tensor(preprocess_particles(rng.normal(size=(1, 64, 64)), 1.0, lowpass_A=6.0))
    yy, xx = np.mgrid[0:64, 0:64] - 32
    img = img * torch.tensor((xx**2 + yy**2 < 26**2).astype(np.float32))
    turned = warp(img, rotation(torch.deg2rad(torch.tensor([37.0]))), torch.zeros(1, 2))  # turned by −37°
    radii = torch.arange(1.0, 26.0)
    cc = rotational_correlation(polar_transform(turned, torch.zeros(1, 2), radii), polar_transform(img, torch.zeros(1, 2), radii)[0], radii)
    best = float(torch.argmax(cc[0])) * 360 / cc.shape[1]
    assert ((best + 37.0 + 180) % 360 - 180) == pytest.approx(0, abs=1.0)  # θ = −37° re-aligns it


# ------------------------------------------------------------------------------- true accuracy
def test_side_views_default_variant_true_errors(side_set):
    noisy, table, d, feats, work = side_set
    sel, _, _ = select_particles(feats)
    r = align_side_views(work, feats, scale=1.0, weights=sel.astype(float))
    assert DEFAULT_VARIANT == "global-refine"
    e = _errors(r["theta_deg"], r["centres"], table)
    assert e["psi_median_deg"] < 2.0 and e["psi_p90_deg"] < 5.0
    assert e["shift_median_px"] < 1.0
    # the masks alone (global start, no intensity refinement) are already within a few degrees
    e_mask = _errors(r["mask_theta_deg"], r["mask_centres"], table)
    assert e_mask["psi_median_deg"] < 5.0
    assert e["psi_median_deg"] < e_mask["psi_median_deg"]


def test_paper_variant_fails_far_from_the_start_but_scores_high_ssim(side_set):
    noisy, table, d, feats, work = side_set
    sel, _, _ = select_particles(feats)
    sub = slice(0, 80)
    paper = align_side_views(work[sub], feats[sub], scale=1.0, variant="paper-affine")
    good = align_side_views(work[sub], feats[sub], scale=1.0, weights=sel[sub].astype(float))
    e_paper = _errors(paper["theta_deg"], paper["centres"], table.iloc[sub])
    e_good = _errors(good["theta_deg"], good["centres"], table.iloc[sub])
    assert e_paper["psi_median_deg"] > 10 * e_good["psi_median_deg"]
    wrong = e_paper["psi_err_deg"] > 30
    assert wrong.sum() >= 10
    s_paper = ssim_figures(work[sub], feats[sub], paper, scale=1.0)["mask"]
    s_good = ssim_figures(work[sub], feats[sub], good, scale=1.0)["mask"]
    # the wrongly aligned masks match the reference as well as the right ones do
    assert np.mean(s_paper[wrong]) > np.mean(s_good) - 0.02


def test_top_view_centring_true_error():
    vol = shell_volume()
    noisy, _, table = simulate_particles(vol, 200, 3.0, np.random.default_rng(1), views="top", snr=0.1,
                                         max_shift_px=4)
    d = table[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()
    feats = particle_features(noisy, 3.0, view="top", diameter_A=114.0, defocus=d)
    r = centre_top_views(noisy, feats)
    truth = table[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 3.0
    e = inplane_errors(np.zeros(200), -r["centres"], np.zeros(200), truth)
    assert e["shift_median_px"] < 1.0
    assert r["aligned"].shape == noisy.shape
    # localized: zero outside each particle's disc, unchanged inside
    assert np.all(r["localized"][:, 0, 0] == 0) and np.allclose(r["localized"][:, 32, 32], r["aligned"][:, 32, 32])


def test_inplane_errors_agree_with_align_error_script(shared_checks, tmp_path):
    import pandas as pd

    from cryodask.io.star import write_particles
    from cryodask.model import microscope_attrs, particle_dataset

    rng = np.random.default_rng(5)
    n = 150
    psi_t = rng.uniform(-180, 180, n)
    sh_t = rng.uniform(-5, 5, (n, 2))
    psi_e = psi_t + 33.0 + rng.normal(0, 2, n) + 180.0 * (rng.random(n) < 0.3)  # global offset, noise, flips
    sh_e = sh_t + [1.5, -0.7] + rng.normal(0, 0.5, (n, 2))
    for name, psi, sh in (("est", psi_e, sh_e), ("truth", psi_t, sh_t)):
        t = pd.DataFrame({"rlnAnglePsi": psi, "rlnOriginXAngst": sh[:, 0] * 2.5, "rlnOriginYAngst": sh[:, 1] * 2.5})
        write_particles(tmp_path / f"{name}.star", particle_dataset(None, t, microscope_attrs(2.5)))
    for sym in (1, 2):
        out = subprocess.run([sys.executable, str(shared_checks / "align_error.py"), str(tmp_path / "est.star"),
                              str(tmp_path / "truth.star"), "--symmetry", str(sym), "--pixel-size", "2.5"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        script = dict(kv.split("=") for kv in out.split())
        ours = inplane_errors(psi_e, sh_e, psi_t, sh_t, sym)
        for key in ("psi_median_deg", "psi_p90_deg", "shift_median_px", "within_5deg"):
            assert ours[key] == pytest.approx(float(script[key]), abs=0.006)
    assert inplane_errors(psi_e, sh_e, psi_t, sh_t, 2)["psi_median_deg"] < 3  # flips forgiven modulo 180°


# ------------------------------------------------------------------------------------- graphs
def test_graph_builders_are_lazy_and_match_the_in_memory_path(side_set):
    noisy, table, d, feats, work = side_set
    calls = []

    def load(block):
        calls.append(len(block))
        return block

    w = da.from_array(work, chunks=(50, -1, -1)).map_blocks(load, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    fd = da.from_array(feats, chunks=(50, -1))
    reg = register_graph(fd, 40.0, 33.0, 64, 1.0)
    cand = da.from_array(_symmetry_candidates(feats, 1.25), chunks=(50, -1))
    res, ref = refine_graph(w, reg[:, :3], da.ones(200, chunks=50), cand, windows_deg=(12.0, 4.0),
                            max_shift_px=3.0, r_max_px=28, expected_diameter_px=40.0)
    aligned = apply_graph(da.from_array(noisy, chunks=(50, -1, -1)), res)
    assert calls == []  # nothing computed while building
    got, reg_np, ref_np, al = dask.compute(res, reg, ref, aligned[:3], scheduler="sync")
    assert sorted(calls) == [50] * 4  # each working chunk computed once for all iterations
    th, c, ref_mem, _ = refine_alignment(work, reg_np[:, 0], reg_np[:, 1:3], weights=np.ones(200),
                                         candidates_deg=_symmetry_candidates(feats, 1.25), windows_deg=(12.0, 4.0),
                                         max_shift_px=3.0, r_max_px=28, expected_diameter_px=40.0)
    same = np.abs((got[:, 0] - th + 180) % 360 - 180) < 0.05
    assert same.mean() > 0.95 and np.allclose(got[same, 1:3], c[same], atol=0.05)
    assert np.allclose(ref_np, ref_mem, atol=1e-3 * np.abs(ref_mem).max())
    assert al.shape == (3, 64, 64)


def test_align2d_star_writes_relion_columns_and_stacks(volume, tmp_path, shared_checks):
    from cryodask.io.mrc import write_stack
    from cryodask.io.star import format_image_name, read_particles, write_particles
    from cryodask.model import microscope_attrs, open_group, particle_dataset

    noisy, _, table = simulate_particles(volume, 120, APIX, np.random.default_rng(9), views="side", snr=0.4,
                                         max_shift_px=3)
    write_stack(tmp_path / "p.mrcs", noisy, pixel_size=APIX)
    t = table.drop(columns=["cdViewClass"])
    t.insert(0, "rlnImageName", [format_image_name(i, "p.mrcs") for i in range(len(t))])
    write_particles(tmp_path / "truth.star", particle_dataset(None, t, microscope_attrs(APIX)))
    summary = align2d_star(tmp_path / "truth.star", tmp_path / "out", view="side", diameter_A=DIAMETER_A, chunk=50)
    out = read_particles(tmp_path / "out" / "particles_aligned.star")
    assert out.sizes["particle"] == 120 and summary["n_side"] == 120
    assert "rlnAngleRot" not in out and "rlnAngleTilt" not in out
    for col in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "cdViewClass", "cdSelected", "cdRejectReason"):
        assert col in out
    store = open_group(tmp_path / "out" / "particles.zarr", "align2d")
    assert store["aligned"].shape == (120, 64, 64) and store["localized"].shape == (120, 64, 64)
    r = subprocess.run([sys.executable, str(shared_checks / "align_error.py"), str(tmp_path / "out" / "particles_aligned.star"),
                        str(tmp_path / "truth.star"), "--symmetry", "2", "--pixel-size", str(APIX)],
                       capture_output=True, text=True, check=True).stdout.split()
    vals = dict(kv.split("=") for kv in r)
    assert float(vals["psi_median_deg"]) < 2.0 and float(vals["shift_median_px"]) < 1.0
    # the aligned particles are upright: their average correlates with the reference
    avg = store["aligned_preprocessed"].values[out["cdSelected"].values == 1].mean(0)
    assert avg[20:44, 20:44].mean() > avg[:8, :8].mean()


def test_variants_are_all_selectable():
    assert set(VARIANTS) >= {"paper-affine", "paper-adjusted", "paper-300", "paper-sim-affine", "global-mask",
                             "global-refine"}
    assert VARIANTS["paper-300"].optimizer.max_iter == 300 and VARIANTS["paper-affine"].optimizer.max_step == 0.0625
    assert VARIANTS["paper-sim-affine"].start == "similarity" and VARIANTS[DEFAULT_VARIANT].refine
