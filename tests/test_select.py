"""Perfect masks and good/bad selection (cryodask.select), against ground truth built here."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import torch

from cryodask.ctf import ctf_2d, frequency_grid_rfft
from cryodask.select import (FEATURES, REASONS, SelectionThresholds, cluster_masks, ctf_sign, edge_maps,
                             features_graph, hough_discs, image_gradients, inject_junk, measure_objects, particle_features,
                             preprocess_particles, reason_text, render_masks, select_particles, select_star)
from cryodask.simulate import simulate_particles

F = {k: i for i, k in enumerate(FEATURES)}
APIX = 10.0  # Å/px of the test stacks
DIAMETER_A = 360.0  # the test cylinder's length


def cylinder_volume(box: int = 64) -> np.ndarray:
    """A hollow cylinder (axis z, outer radius ~16 px, length 36 px) with four density tiers and
    a few blobs on its wall: a KLH-like object (rectangles from the side, rings from the top)."""
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    r = np.hypot(x, y)
    vol = np.exp(-((r - 14.0) / 2.0) ** 2) / (1 + np.exp(np.abs(z) - 18.0)) * (1 + 0.4 * np.cos(2 * np.pi * z / 9.0))
    for a, zz in [(0.3, 10), (1.9, -6), (3.5, 3), (4.4, -13)]:
        vol += 0.8 * np.exp(-((x - 14 * np.cos(a)) ** 2 + (y - 14 * np.sin(a)) ** 2 + (z - zz) ** 2) / 12.5)
    return (vol / vol.max()).astype(np.float32)


@pytest.fixture(scope="module")
def volume():
    return cylinder_volume()


def _stack(volume, n, seed, snr, views="side"):
    noisy, clean, table = simulate_particles(volume, n, APIX, np.random.default_rng(seed), views=views, snr=snr,
                                             max_shift_px=3)
    return noisy, clean, table, table[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()


# ------------------------------------------------------------------------------------ kernels
def test_preprocess_keeps_the_centre_and_crops():
    x = np.zeros((1, 128, 128), np.float32)
    x[0, 64, 64] = 1.0
    x[0, 60, 70] = 2.0  # 6 px right, 4 px up of the centre
    y = preprocess_particles(x, 1.0, work_box=64, normalise=False)
    assert y.shape == (1, 64, 64)
    assert np.unravel_index(np.argmax(y[0]), (64, 64)) == (30, 35)  # (row, col): offsets halved
    assert np.allclose(preprocess_particles(x, 1.0, normalise=False), x, atol=1e-5)  # no crop, no filter: identity


def test_phase_flip_sign_matches_relion_ctf():
    ky, kx = frequency_grid_rfft(64, 4.0)
    d = np.array([[15000.0, 14000.0, 30.0], [22000.0, 22000.0, 0.0]])
    ours = ctf_sign(ky, kx, d, 300.0, 2.7, 0.1)
    ref = torch.sign(ctf_2d(ky, kx, d[:, 0], d[:, 1], d[:, 2], 300.0, 2.7, 0.1))
    assert torch.equal(ours, torch.where(ref < 0, -1.0, 1.0))


def test_clustering_is_otsu():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(5, 48, 48)).astype(np.float32)
    imgs[:, 12:36, 16:30] += rng.uniform(1, 3, (5, 1, 1))
    masks = cluster_masks(imgs, n_bins=256)
    for img, m in zip(imgs, masks):
        # the same criterion on the same 256-bin histogram: the thresholds agree to a bin
        t = threshold_otsu(img, nbins=256)
        width = np.ptp(img) / 256
        assert np.all(m[img >= t + width]) and not np.any(m[img < t - width])


def _rectangle_image(angle_deg, length, width, centre, m=64, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:m, 0:m] - m // 2
    a = np.deg2rad(angle_deg)
    u = (xx - centre[0]) * np.cos(a) + (yy - centre[1]) * np.sin(a)
    v = -(xx - centre[0]) * np.sin(a) + (yy - centre[1]) * np.cos(a)
    img = ((np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)).astype(np.float32)
    return img + noise * rng.normal(size=img.shape).astype(np.float32)


def test_rectangle_mask_recovers_angle_size_and_centre():
    img = _rectangle_image(30.0, 30, 20, (2.0, -3.0))
    f = measure_objects(cluster_masks(img[None]), view="side", expected_diameter_px=30)[0]
    assert f[F["found"]] == 1 and f[F["is_top"]] == 0
    assert abs(f[F["angle"]] - 30.0) < 2.0
    assert abs(f[F["length"]] - 30) < 2 and abs(f[F["width"]] - 20) < 2
    assert abs(f[F["x"]] - 2.0) < 1 and abs(f[F["y"]] + 3.0) < 1
    assert f[F["feret_max"]] == pytest.approx(np.hypot(30, 20), abs=3)
    # the rendered perfect mask is that rectangle
    clean = _rectangle_image(30.0, 30, 20, (2.0, -3.0), noise=0.0) > 0.5
    assert np.mean(render_masks(f[None], 64)[0].astype(bool) == clean) > 0.97


def test_hough_finds_a_noisy_ring():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64] - 32
    r = np.hypot(xx - 3.3, yy + 2.6)
    ring = np.exp(-((r - 15.0) / 2.0) ** 2).astype(np.float32)  # a hollow ring, outer edge ~17 px
    imgs = np.stack([ring + 0.3 * rng.normal(size=ring.shape).astype(np.float32) for _ in range(4)])
    pre = preprocess_particles(imgs, 1.0, lowpass_A=4.0)
    d = hough_discs(edge_maps(pre), 17.0, gradients=image_gradients(pre), rel_range=0.25)
    assert np.allclose(d[:, 0] - 32, 3.3, atol=0.6) and np.allclose(d[:, 1] - 32, -2.6, atol=0.6)
    assert np.all(np.abs(d[:, 2] - 17.0) < 1.0)  # the outer rim
    # an unoriented vote cannot tell the outer rim from the inner one (r ≈ 13) of a thick ring
    plain = hough_discs(edge_maps(pre), 17.0, rel_range=0.25)
    assert np.any(np.abs(plain[:, 2] - 13.0) < 1.0)


def test_reasons_follow_the_thresholds():
    rng = np.random.default_rng(2)
    f = np.zeros((60, len(FEATURES)))
    f[:, F["found"]] = 1
    f[:, F["eq_diameter"]] = rng.normal(40, 0.5, 60)
    f[:, F["feret_max"]] = rng.normal(50, 0.5, 60)
    f[:, F["iou_rect"]] = 0.9
    f[1, F["found"]] = 0
    f[2, F["n_fragments"]] = 1
    f[3, F["touches_edge"]] = 1
    f[4, F["eq_diameter"]] = 52  # 30 % too big
    f[5, F["feret_max"]] = 65  # a pair: too long
    f[6, F["iou_rect"]] = 0.5
    sel, reasons, info = select_particles(f)
    assert [reasons[i] for i in range(7)] == [0, 1, 2, 4, 8, 8, 16]
    assert sel[0] and not sel[1:7].any() and sel[7:].all()
    assert info["expected_eq_diameter_px"]["side"] == pytest.approx(40, abs=0.5)
    assert reason_text(4 | 8) == "touches edge+size" and set(REASONS.values()) >= {"no mask", "fragmented"}
    # the thresholds are overridable
    sel2, reasons2, _ = select_particles(f, SelectionThresholds(min_iou=0.4, size_tolerance=0.5, size_sigmas=0))
    assert reasons2[4] == 0 and reasons2[6] == 0


# --------------------------------------------------------------------------- on simulated sets
def test_selection_rejects_injected_junk(volume):
    # SNR 0.4 at 10 Å/px is the noise per 10-Å pixel of the acceptance case (SNR 0.1 at 5 Å/px,
    # Fourier-cropped ×2 to the working box)
    noisy, clean, table, d = _stack(volume, 300, 3, 0.4)
    imgs, kind = inject_junk(noisy, clean, np.random.default_rng(4), fraction=0.1, diameter_px=36,
                             noise_sigma=float(np.std(noisy - clean)))
    assert set(kind) == {"", "ice", "pair", "edge"} and np.mean(kind != "") == pytest.approx(0.1)
    f = particle_features(imgs, APIX, view="side", diameter_A=DIAMETER_A, defocus=d)
    sel, reasons, _ = select_particles(f)
    junk = kind != ""
    assert np.mean(~sel[junk]) >= 0.9
    assert np.mean(~sel[~junk]) <= 0.05
    assert np.all(reasons[~sel] > 0) and np.all(reasons[sel] == 0)
    # the edge-cut particles are rejected for touching the edge (or having no object)
    assert np.all(reasons[kind == "edge"] & (4 | 1))


def test_auto_view_tells_rectangles_from_rings(volume):
    side, _, _, d_side = _stack(volume, 60, 5, 0.4, "side")
    top, _, _, d_top = _stack(volume, 60, 6, 0.4, "top")
    f_side = particle_features(side, APIX, view="auto", diameter_A=DIAMETER_A, defocus=d_side)
    f_top = particle_features(top, APIX, view="auto", diameter_A=DIAMETER_A, defocus=d_top)
    assert np.mean(f_side[:, F["is_top"]] == 0) >= 0.9
    assert np.mean(f_top[:, F["is_top"]] == 1) >= 0.9


def test_features_graph_is_lazy_and_matches_the_kernel(volume):
    noisy, _, _, d = _stack(volume, 90, 7, 0.4)
    calls = []

    def load(block):
        calls.append(len(block))
        return block

    images = da.from_array(noisy, chunks=(30, -1, -1)).map_blocks(load, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    g = features_graph(images, APIX, defocus=d, view="side", diameter_A=DIAMETER_A)
    assert g.shape == (90, len(FEATURES)) and g.numblocks[0] == 3
    assert calls == []  # building computes nothing
    got = g.compute(scheduler="sync")
    assert sorted(calls) == [30, 30, 30]
    assert np.allclose(got, particle_features(noisy, APIX, view="side", diameter_A=DIAMETER_A, defocus=d))


def test_select_star_writes_flags_masks_and_gallery(volume, tmp_path):
    from cryodask.io.mrc import write_stack
    from cryodask.io.star import format_image_name, read_particles, write_particles
    from cryodask.model import microscope_attrs, open_group, particle_dataset

    noisy, _, table, _ = _stack(volume, 40, 8, 0.4)
    noisy[0] = 0.0  # a blank box: rejected
    write_stack(tmp_path / "p.mrcs", noisy, pixel_size=APIX)
    t = table.drop(columns=["cdViewClass"])
    t.insert(0, "rlnImageName", [format_image_name(i, "p.mrcs") for i in range(len(t))])
    write_particles(tmp_path / "in.star", particle_dataset(None, t, microscope_attrs(APIX)))
    summary = select_star(tmp_path / "in.star", tmp_path / "out", view="side", diameter_A=DIAMETER_A, chunk=16)
    out = read_particles(tmp_path / "out" / "particles_selected.star")
    assert out.sizes["particle"] == 40
    assert out["cdSelected"].values[0] == 0 and out["cdRejectReason"].values[0] != "ok"
    assert summary["n_selected"] == int(out["cdSelected"].values.sum()) >= 30
    store = open_group(tmp_path / "out" / "particles.zarr", "select")
    assert store["mask"].shape == (40, 64, 64) and int(store["mask"][1].sum()) > 300
    assert (tmp_path / "out" / "select_gallery.png").stat().st_size > 1000
