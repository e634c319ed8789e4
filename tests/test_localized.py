"""Localized (pairwise structure-from-motion) reconstruction: kernels, graph and driver.

The geometry kernels are checked where structure from motion must work: a 3-D point cloud
seen by a real perspective camera from two views.
"""
from __future__ import annotations

import numpy as np
import pytest

from cryodask.localized import (
    affine_fundamental,
    affine_fundamental_ransac,
    affine_ratio,
    align_in_plane,
    camera_matrix,
    chain_bounds,
    envelope_map,
    epipolar_distances,
    fundamental_ransac,
    fuse,
    localized_graph,
    pair_points,
    random_depth_points,
    register,
    relative_pose,
    shuffled_depth_points,
    splat,
    triangulate_dlt,
    triangulate_midpoint,
    zscore,
)


def _rot_y(deg):
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), 0, np.sin(t)], [0, 1, 0], [-np.sin(t), 0, np.cos(t)]])


def _rot_x(deg):
    t = np.deg2rad(deg)
    return np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])


def _scene(rng, n_points=80, box=128, extent=1.5, depth=6.0, angle=8.0):
    """Points in camera-1 coordinates, a second camera orbiting the scene centre, and K."""
    K = camera_matrix(box, 1.0)
    X = rng.uniform(-extent, extent, (n_points, 3)) + [0, 0, depth]
    R = _rot_y(angle) @ _rot_x(angle / 2)
    centre = np.array([0, 0, depth])
    t = centre - R @ centre  # camera 2 looks at the scene centre from the same distance
    return X, K, R, t


def _project(X, K, R=np.eye(3), t=np.zeros(3)):
    x = (X @ R.T + t) @ K.T
    return x[:, :2] / x[:, 2:]


def _similarity_residual(A, B):
    """RMS of B − s·Q·A − c after the best similarity, relative to B's RMS spread."""
    a, b = A - A.mean(0), B - B.mean(0)
    u, s, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
    q = u @ d @ vt
    scale = np.trace(np.diag(s) @ d) / (a ** 2).sum()
    return np.sqrt(((b - scale * a @ q.T) ** 2).sum(1).mean()) / np.sqrt((b ** 2).sum(1).mean())


def test_midpoint_triangulation_on_known_rays():
    rng = np.random.default_rng(0)
    P = rng.normal(size=(20, 3))
    c1, c2 = np.array([0.0, 0, -5]), np.array([3.0, 1, -4])
    X, gap, ang = triangulate_midpoint(c1, P - c1, c2, P - c2)
    np.testing.assert_allclose(X, P, atol=1e-9)
    np.testing.assert_allclose(gap, 0, atol=1e-9)
    # skew rays: x-axis at z = 0 and a line parallel to y at (x=2, z=1) -> closest points (2,0,0),(2,0,1)
    X, gap, ang = triangulate_midpoint(np.zeros(3), np.array([[1.0, 0, 0]]), np.array([2.0, 5, 1]),
                                       np.array([[0.0, 1, 0]]))
    np.testing.assert_allclose(X[0], [2, 0, 0.5], atol=1e-12)
    np.testing.assert_allclose(gap, [1.0], atol=1e-12)
    np.testing.assert_allclose(ang, [90.0], atol=1e-9)
    X, _, ang = triangulate_midpoint(np.zeros(3), np.array([[0.0, 0, 1]]), np.array([1.0, 0, 0]),
                                     np.array([[0.0, 0, 2]]))
    assert np.isnan(X).all() and ang[0] == pytest.approx(0.0)


def test_fundamental_pose_and_triangulation_recover_a_perspective_scene():
    rng = np.random.default_rng(1)
    X, K, R, t = _scene(rng, extent=2.0, angle=12.0)
    p1 = _project(X, K) + rng.normal(0, 0.1, (len(X), 2))
    p2 = _project(X, K, R, t) + rng.normal(0, 0.1, (len(X), 2))
    bad = rng.choice(len(X), 16, replace=False)  # 20 % gross outliers
    p2[bad] += rng.uniform(5, 15, (16, 2)) * rng.choice([-1, 1], (16, 2))
    F, inl = fundamental_ransac(p1, p2, threshold=0.5, rng=rng)
    assert F is not None
    Kinv = np.linalg.inv(K)
    tx = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    _, d_true = epipolar_distances(Kinv.T @ tx @ R @ Kinv, p1, p2)
    detectable = np.zeros(len(X), bool)
    detectable[bad] = d_true[bad] > 3.0  # an outlier moved along its epipolar line cannot be seen
    assert detectable.sum() >= 10
    assert not inl[detectable].any()
    good = np.ones(len(X), bool)
    good[bad] = False
    assert inl[good].mean() > 0.95
    alg, samp = epipolar_distances(F, p1[inl], p2[inl])
    assert np.median(samp) < 0.2 and np.all(samp < 0.5)
    _, samp_out = epipolar_distances(F, p1[detectable], p2[detectable])
    assert np.median(samp_out) > 2.0
    pose = relative_pose(F, p1[inl], p2[inl], K)
    err = np.degrees(np.arccos(np.clip((np.trace(pose["R"] @ R.T) - 1) / 2, -1, 1)))
    assert err < 1.0
    assert np.dot(pose["t"], t / np.linalg.norm(t)) > 0.98
    assert pose["essential_sv_ratio"] > 0.9
    # the true F is perspective, not affine
    assert affine_ratio(F, 128) > 0.04
    _, res_affine = affine_fundamental(p1[inl], p2[inl])
    assert np.median(res_affine) > 3 * np.median(samp)  # perspective data: the affine model fails
    _, inl_affine = affine_fundamental_ransac(p1, p2, threshold=0.5, rng=rng)
    assert inl_affine.mean() < inl.mean() - 0.15
    h = lambda p: np.column_stack([p, np.ones(len(p))])
    d1 = h(p1[inl]) @ Kinv.T
    d2 = (h(p2[inl]) @ Kinv.T) @ pose["R"]
    Xm, gap, _ = triangulate_midpoint(np.zeros(3), d1, -pose["R"].T @ pose["t"], d2)
    true_match = good[inl]  # (an outlier displaced along its epipolar line triangulates elsewhere)
    assert _similarity_residual(Xm[true_match], X[inl][true_match]) < 0.02
    Xd = triangulate_dlt(p1[inl], p2[inl], K, pose["R"], pose["t"])
    assert _similarity_residual(Xd[true_match], X[inl][true_match]) < 0.02
    assert np.median(np.linalg.norm(Xm - Xd, axis=1)) < 0.01 * np.median(Xm[:, 2])


def _render(points2d, box, sigma=1.2):
    yy, xx = np.mgrid[:box, :box].astype(np.float64)
    img = np.zeros((box, box))
    for x, y in points2d:
        img += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return img.astype(np.float32)


def _sparse_scene(rng, box=128, n=20, depth=4.0, extent=1.2, angle=8.0, min_sep=12.0):
    """Points whose projections stay inside the images and ≥ ``min_sep`` px apart in both views."""
    K = camera_matrix(box, 1.0)
    R = _rot_y(angle) @ _rot_x(angle / 2)
    centre = np.array([0, 0, depth])
    t = centre - R @ centre
    pts = []
    while len(pts) < n:
        cand = np.array(pts + [rng.uniform(-extent, extent, 3) + centre])
        u1, u2 = _project(cand, K), _project(cand, K, R, t)
        if np.all((u1 > 10) & (u1 < box - 10)) and np.all((u2 > 10) & (u2 < box - 10)):
            if not pts or min(np.linalg.norm(u1[:-1] - u1[-1], axis=1).min(),
                              np.linalg.norm(u2[:-1] - u2[-1], axis=1).min()) > min_sep:
                pts.append(cand[-1])
    return np.array(pts), K, R, t


def _point_errors(A, B):
    """Per-point |B − s·Q·A − c| after the best similarity, relative to B's RMS spread."""
    a, b = A - A.mean(0), B - B.mean(0)
    u, s, vt = np.linalg.svd(b.T @ a)
    d = np.diag([1, 1, np.sign(np.linalg.det(u @ vt))])
    q = u @ d @ vt
    scale = np.trace(np.diag(s) @ d) / (a ** 2).sum()
    return np.linalg.norm(b - scale * a @ q.T, axis=1) / np.sqrt((b ** 2).sum(1).mean())


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_pair_points_on_rendered_perspective_views(seed):
    """Images of bright dots seen by a perspective camera from two views 8° apart: corners,
    KLT, RANSAC-F, pose and mid-point triangulation recover the 3-D points up to a similarity."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(seed)
    box = 128
    X, K, R, t = _sparse_scene(rng)
    u1, u2 = _project(X, K), _project(X, K, R, t)
    res = pair_points(_render(u1, box, 1.5), _render(u2, box, 1.5), motion="none", smooth_px=0.0,
                      max_corners=60, min_distance=6, quality=0.05, ransac_threshold=0.5, klt_window=15,
                      klt_levels=3)
    assert res["ok"], res["reason"]
    assert res["inlier_fraction"] > 0.9 and np.median(res["sampson"]) < 0.2
    assert np.median(res["affine_residual"]) > 2 * np.median(res["sampson"])  # perspective is detected
    err = np.degrees(np.arccos(np.clip((np.trace(res["R"] @ R.T) - 1) / 2, -1, 1)))
    assert err < 1.0
    # each triangulated point belongs to the scene point whose projection is nearest its corner
    corners = res["corners"] + box // 2
    d = np.linalg.norm(corners[:, None] - u1[None], axis=2)
    near = d.min(1) < 1.0
    assert near.sum() >= 15
    truth = X[d.argmin(1)][near]
    assert np.median(_point_errors(res["points_camera"][near], truth)) < 0.15
    assert spearmanr(res["points3d"][near][:, 2], truth[:, 2])[0] > 0.8  # depth is recovered
    # box coordinates: x, y follow the reference image, depth about the median
    assert abs(np.median(res["points3d"][:, 2])) < 1e-3
    np.testing.assert_allclose(res["points3d"][:, :2], res["corners"], atol=0.3 * np.abs(res["corners"]).max())


def test_parallel_projections_give_an_affine_fundamental_matrix():
    """Orthographic views of a rotated point cloud with exact correspondences: the perspective F
    fitted to them is affine, and the pinhole model reads them as a sideways translation without
    rotation (a stereo rig), so that depth = f·baseline / disparity — monotonic in the true
    depth only where every disparity has the same sign."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(3)
    X = rng.uniform(-20, 20, (60, 3))
    R = _rot_y(10) @ _rot_x(5)
    K = camera_matrix(128)
    for shift, front_min in ((0.0, 0.0), (15.0, 0.95)):
        p1 = X[:, :2] + 64 + rng.normal(0, 0.05, (60, 2))
        p2 = (X @ R.T)[:, :2] + 64 + [shift, 0] + rng.normal(0, 0.05, (60, 2))
        F, inl = fundamental_ransac(p1, p2, threshold=0.5, rng=rng)
        assert F is not None and inl.mean() > 0.9
        assert affine_ratio(F, 128) < 0.05  # (noise-limited; the residual comparison below is the sharp test)
        _, samp = epipolar_distances(F, p1[inl], p2[inl])
        FA, res_affine = affine_fundamental(p1, p2)
        assert np.median(res_affine) < 1.5 * np.median(samp)  # the affine model explains everything
        assert np.abs(FA[:2, :2]).max() == 0
        _, inl_affine = affine_fundamental_ransac(p1, p2, threshold=0.5, rng=rng)
        assert inl_affine.mean() > 0.9
        pose = relative_pose(F, p1[inl], p2[inl], K)
        rot = np.degrees(np.arccos(np.clip((np.trace(pose["R"]) - 1) / 2, -1, 1)))
        assert rot < 3.0 and abs(pose["t"][2]) < 0.1  # not the true 11° rotation: a lateral shift
        assert pose["front"].mean() >= front_min
    # disparities of one sign: the triangulated depth is a monotonic function of the true depth
    h = lambda p: np.column_stack([p, np.ones(len(p))])
    Ki = np.linalg.inv(K)
    fr = pose["front"]
    Xt, _, _ = triangulate_midpoint(np.zeros(3), h(p1[inl][fr]) @ Ki.T, -pose["R"].T @ pose["t"],
                                    (h(p2[inl][fr]) @ Ki.T) @ pose["R"])
    assert abs(spearmanr(Xt[:, 2], X[inl][fr][:, 2])[0]) > 0.9


def test_splat_conserves_mass_and_centre():
    box = 32
    p = np.array([[1.3, -2.6, 4.2]])
    v = splat(p, box, sigma=1.5)
    assert v.shape == (box, box, box) and v.dtype == np.float32
    assert v.sum() == pytest.approx(1.0, rel=1e-4)
    c = np.arange(box) - box // 2
    com = [(v.sum((0, 1)) * c).sum(), (v.sum((0, 2)) * c).sum(), (v.sum((1, 2)) * c).sum()]  # x, y, z
    np.testing.assert_allclose(com, p[0], atol=1e-3)
    two = splat(np.array([[0, 0, 0], [100, 0, 0], [np.nan, 0, 0]]), box, sigma=1.0)
    assert two.sum() == pytest.approx(1.0, rel=1e-4)  # outside and NaN points dropped
    w = splat(np.array([[0, 0, 0], [5, 5, 5]]), box, sigma=0.0, weights=np.array([2.0, 3.0]))
    assert w[box // 2, box // 2, box // 2] == pytest.approx(2.0) and w.sum() == pytest.approx(5.0)


def test_fuse_properties():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(32, 32)).astype(np.float32)
    b = rng.normal(size=(32, 32)).astype(np.float32) * 3 + 7
    np.testing.assert_allclose(fuse(a, a), zscore(a), atol=1e-5)
    np.testing.assert_allclose(fuse(a, b), fuse(b, a), atol=1e-6)
    za, zb = zscore(a), zscore(b)
    f = fuse(a, b)
    assert np.all(f >= np.minimum(za, zb) - 1e-5) and np.all(f <= np.maximum(za, zb) + 1e-5)
    # an image with a sharp edge dominates a smooth one near the edge
    edge = np.zeros((32, 32), np.float32)
    edge[:, 16:] = 1
    smooth = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1)) ** 2
    f = fuse(edge, smooth)
    ze, zs = zscore(edge), zscore(smooth)
    col = slice(15, 17)
    assert np.abs(f[:, col] - ze[:, col]).mean() < 0.25 * np.abs(zs[:, col] - ze[:, col]).mean()


def test_register_undoes_shift_and_rotation():
    from scipy import ndimage

    rng = np.random.default_rng(8)
    ref = ndimage.gaussian_filter(rng.normal(size=(64, 64)), 2).astype(np.float32)
    img = ndimage.rotate(ndimage.shift(ref, (2.5, -3.0), order=3), 4.0, reshape=False, order=3)
    c = slice(10, 54)
    corr = lambda a: np.corrcoef(a[c, c].ravel(), ref[c, c].ravel())[0, 1]
    assert corr(img) < 0.7
    out, warp, ok = register(ref, img, motion="euclidean")
    assert ok and corr(out) > 0.99
    assert np.degrees(np.arctan2(warp[0, 1], warp[0, 0])) == pytest.approx(4.0, abs=0.3)
    out, _, _ = register(ref, ndimage.shift(ref, (2.5, -3.0), order=3), motion="translation")
    assert corr(out) > 0.99
    out, warp, _ = register(ref, img, motion="none")
    np.testing.assert_array_equal(out, img)


def test_controls_and_envelope():
    rng = np.random.default_rng(5)
    corners = rng.uniform(-8, 8, (50, 2))
    p = random_depth_points(corners, 12.0, rng)
    np.testing.assert_array_equal(p[:, :2], corners)
    assert np.all((p ** 2).sum(1) <= 12.0 ** 2 + 1e-9)
    pts = rng.normal(size=(30, 3))
    s = shuffled_depth_points(pts, rng)
    np.testing.assert_array_equal(s[:, :2], pts[:, :2])
    np.testing.assert_allclose(np.sort(s[:, 2]), np.sort(pts[:, 2]))
    img = np.zeros((32, 32), np.float32)
    img[12:20, 10:22] = 1.0
    v = envelope_map(img, 14.0, "extrude")
    proj = v.sum(0)
    np.testing.assert_allclose(proj[12:20, 10:22], 1.0, rtol=0.15)
    assert proj[:8].max() == 0
    sph = envelope_map(img, 14.0, "spin")
    np.testing.assert_allclose(sph, np.transpose(sph, (2, 1, 0)), atol=1e-6)  # spherically symmetric


def _blob_volume(rng, box, n_blobs=12, radius=None):
    """An asymmetric test volume: Gaussian blobs (σ 1.5–3 px) inside a ball of ``radius`` px."""
    radius = radius or box / 3
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((box, box, box))
    for _ in range(n_blobs):
        p = rng.normal(size=3)
        p *= rng.uniform(0.2, 1.0) * radius / np.linalg.norm(p)
        s = rng.uniform(1.5, 3.0)
        v += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s))
    return v.astype(np.float32)


def test_align_in_plane_undoes_psi_and_origin():
    from cryodask.geometry import euler_to_matrix
    from cryodask.simulate import project_exact

    v = _blob_volume(np.random.default_rng(7), 48)
    origins = np.array([[2.5, -1.5], [-3.0, 0.5]])
    rot, tilt, psi = np.array([30.0, -100.0]), np.array([70.0, 20.0]), np.array([50.0, -140.0])
    moved = project_exact(v, euler_to_matrix(rot, tilt, psi), origins)
    ref = project_exact(v, euler_to_matrix(rot, tilt, np.zeros(2)))
    out = align_in_plane(moved, psi, origins)
    for o, r in zip(out, ref):
        assert np.corrcoef(o.ravel(), r.ravel())[0, 1] > 0.999


def test_chain_bounds():
    assert chain_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert chain_bounds(9, 4) == [(0, 4), (4, 9)]  # a single leftover particle joins the last chain
    assert chain_bounds(1, 4) == []


def test_graph_is_lazy_and_computes(monkeypatch):
    import dask
    import dask.array as da

    import cryodask.localized as loc

    calls = []
    real = loc.pair_points
    monkeypatch.setattr(loc, "pair_points", lambda *a, **k: calls.append(1) or real(*a, **k))
    rng = np.random.default_rng(6)
    box = 64
    X, K, _, _ = _sparse_scene(rng, box=box, n=12, min_sep=8.0, extent=1.0)
    views = []  # a camera orbiting the scene in 6° steps
    for k in range(7):
        R = _rot_y(6.0 * k)
        t = np.array([0, 0, 4.0]) - R @ np.array([0, 0, 4.0])
        views.append(_render(_project(X, K, R, t), box, 1.5))
    arr = da.from_array(np.stack(views), chunks=(2, box, box))
    kw = dict(motion="none", smooth_px=0.0, max_corners=40, min_distance=5, quality=0.05, ransac_threshold=0.5)
    g = localized_graph(arr, chain_size=3, controls=True, **kw)
    from dask.delayed import Delayed

    assert calls == [] and isinstance(g["map"], Delayed)
    assert g["bounds"] == [(0, 3), (3, 7)]
    m, nok, recs, ctl = dask.compute(g["map"], g["n_pairs_ok"], g["chains"], g["controls"], scheduler="sync")
    assert len(calls) == 5  # 2 pairs + 3 pairs
    assert m.shape == (box, box, box) and np.isfinite(m).all()
    assert nok == sum(int(r["ok"].sum()) for r in recs) and nok >= 1
    assert m.sum() == pytest.approx(1.0, abs=0.05)  # average of unit-mass maps (points inside the box)
    assert set(ctl) == {"shuffled_depth", "random_depth"}
    assert [len(r["particle_index"]) for r in recs] == [2, 3]
    assert recs[1]["offsets"][-1] == len(recs[1]["points3d"])
    # the same seed gives the same map
    m2 = dask.compute(localized_graph(arr, chain_size=3, **kw)["map"], scheduler="sync")[0]
    np.testing.assert_array_equal(m, m2)


def test_localized_star_writes_outputs(tmp_path):
    from cryodask.io.mrc import read_map
    from cryodask.simulate_job import SimulationConfig, run_simulation

    run_simulation(SimulationConfig(volume="klh", out=str(tmp_path / "sim"), particles=8, snr=0.5, seed=3,
                                    pixel_size=16.0, box=32))
    from cryodask.localized import localized_star

    fig = localized_star(tmp_path / "sim" / "particles.star", tmp_path / "loc", chain_size=4, scheduler="sync",
                         max_corners=50)
    assert fig["n_particles"] == 8 and fig["n_pairs"] == 6 and fig["n_chains"] == 2
    vol, apix = read_map(tmp_path / "loc" / "localized_map.mrc")
    assert vol.shape == (32, 32, 32) and apix == pytest.approx(16.0)
    for name in ("localized_shuffled_depth.mrc", "localized_random_depth.mrc", "average_envelope.mrc",
                 "localized.json", "points/chain_0000.npz", "points/chain_0001.npz"):
        assert (tmp_path / "loc" / name).is_file()
    z = np.load(tmp_path / "loc" / "points" / "chain_0001.npz")
    assert z["points3d"].shape[1] == 3 and len(z["particle_index"]) == 3


def test_pipeline_localized_stage(tmp_path):
    """`cryodask run` with the opt-in localized stage: it runs on the selected 2D-aligned particles
    from the store, writes the averaged map and the controls, and is skipped unless asked for."""
    import mrcfile

    from cryodask.pipeline import RunConfig, run_pipeline
    from cryodask.simulate_job import SimulationConfig, run_simulation

    sim = tmp_path / "sim"
    run_simulation(SimulationConfig(volume="apoferritin", out=str(sim), n_micrographs=1, micrograph_size=384,
                                    pixel_size=3.0, snr=0.1, seed=5))
    base = dict(micrographs=[str(sim / "micrographs" / "*.mrc")], pixel_size=3.0, diameter=120.0, symmetry="O",
                out=str(tmp_path / "run"), seed=5)
    rep = run_pipeline(RunConfig.load(None, {**base, "stages": ["ingest", "preprocess", "pick", "extract",
                                                                 "align2d"]}))
    assert "localized" not in rep["stages"]
    rep = run_pipeline(RunConfig.load(None, {**base, "stages": ["ingest", "preprocess", "pick", "extract", "align2d",
                                                                 "localized"],
                                             "localized": {"chain_size": 10, "max_particles": 20}}))
    loc = rep["stages"]["localized"]
    assert loc["n_particles"] == 20 and 0 < loc["n_pairs_ok"] <= 18  # 2 chains of 10 -> 18 pairs
    vol = mrcfile.read(tmp_path / "run" / "localized" / "localized_map.mrc")
    assert vol.shape == (loc["box"],) * 3 and np.isfinite(vol).all() and vol.std() > 0
    for name in ("control_random_depth", "control_shuffled_depth", "control_average_envelope"):
        assert (tmp_path / "run" / "localized" / f"{name}.mrc").exists()
