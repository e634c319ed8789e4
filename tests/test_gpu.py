"""CUDA against CPU: every torch kernel of the pipeline, and a whole run on a dask-cuda cluster.

Each test runs the same seeded inputs on the CPU and on the GPU and asserts that the results agree
within float32 tolerances (the GPU's FFTs and reductions sum in another order, so bitwise
equality is not expected). They skip on a machine without CUDA.

``CRYODASK_TEST_GPU_DEVICE=cpu`` runs them with the CPU in the GPU's place (a dry run of the test
code itself on a machine without a GPU; the dask-cuda test then uses a ``LocalCluster``).
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from cryodask.fsc import fsc_curve
from cryodask.geometry import euler_to_matrix, random_rotations
from cryodask.phantoms import make_phantom
from cryodask.simulate import CTFRange, Optics, simulate_particles

DEV = os.environ.get("CRYODASK_TEST_GPU_DEVICE", "cuda")
DRY_RUN = DEV == "cpu"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BOX, APIX = 32, 6.0


@pytest.fixture(scope="module")
def apo():
    return make_phantom("apoferritin", BOX, APIX)


def _particles(apo, n, seed, snr=None, max_shift_px=1.5):
    rng = np.random.default_rng(seed)
    noisy, clean, t = simulate_particles(apo, n, APIX, rng, snr=snr, ctf=CTFRange(10000, 25000),
                                         max_shift_px=max_shift_px)
    rot = euler_to_matrix(t.rlnAngleRot, t.rlnAngleTilt, t.rlnAnglePsi)
    org = np.stack([t.rlnOriginXAngst, t.rlnOriginYAngst], 1) / APIX
    dfc = t[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()
    return noisy, clean, rot, org, dfc


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def test_default_device_and_override(monkeypatch):
    from cryodask.projection import default_device

    monkeypatch.delenv("CRYODASK_DEVICE", raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("CRYODASK_DEVICE", "cpu")
    assert default_device().type == "cpu"


def test_projection(apo):
    from cryodask.projection import project

    rots = random_rotations(20, np.random.default_rng(8))
    cpu = _np(project(apo, rots, device="cpu"))
    gpu = _np(project(apo, rots, device=DEV))
    np.testing.assert_allclose(gpu, cpu, atol=1e-4 * np.abs(cpu).max())


def test_backprojection_with_ctf_and_symmetry(apo):
    from cryodask.reconstruct import accumulate, finalize

    noisy, _, rot, org, dfc = _particles(apo, 300, 1, snr=0.5)
    kw = dict(pixel_size=APIX, optics=Optics(), symmetry="O")
    ss = np.full(BOX // 2 + 1, 50.0)
    a = _np(finalize(accumulate(noisy, rot, org, dfc, device="cpu", **kw), ss))
    b = _np(finalize(accumulate(noisy, rot, org, dfc, device=DEV, **kw), ss))
    np.testing.assert_allclose(b, a, atol=2e-4 * np.abs(a).max())


def test_orientation_search(apo):
    """Global then local search of the same noisy particles: the same poses on both devices."""
    from cryodask import refine as R

    noisy, _, rot, org, dfc = _particles(apo, 48, 2, snr=1.0)
    rots = R.rotations_from_directions(R.direction_grid(6.0, "O"))
    out = {}
    for dev in ("cpu", DEV):
        x = R.normalise_images(noisy, 12, device=dev)
        vol2 = R.reference_volume(apo, device=dev)
        grid = R.polar_grid(BOX, 6, diameter_px=20, device=dev)
        data = R.prepare_chunk(x, dfc, grid, APIX, Optics(), np.ones(BOX // 2 + 1), support=15)
        rr, oo, sc = R.global_search(data, R.reference_slices(vol2, rots, grid), rots, R.shift_grid(2, 1), top=1)
        grid2 = R.polar_grid(BOX, 14, diameter_px=20, device=dev)
        data2 = R.prepare_chunk(x, dfc, grid2, APIX, Optics(), np.ones(BOX // 2 + 1), support=15)
        r2, o2, s2 = R.local_search(data2, vol2, rr[:, 0], oo[:, 0], angle_step=math.radians(3), shift_step=0.5,
                                    min_angle=math.radians(0.25), min_shift=0.05, psi_window=math.radians(8))
        out[dev] = (rr[:, 0], oo[:, 0], _np(sc)[:, 0], r2, o2)
    (g_c, go_c, gs_c, l_c, lo_c), (g_g, go_g, gs_g, l_g, lo_g) = out["cpu"], out[DEV]
    same = R._angular_error_deg(g_g, g_c, "O") < 1e-2
    assert same.mean() >= 0.95  # a near-tie may flip in the last float bit
    np.testing.assert_allclose(gs_g[same], gs_c[same], rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(go_g[same], go_c[same], atol=1e-4)
    err = R._angular_error_deg(l_g[same], l_c[same], "O")
    assert np.median(err) < 0.05 and np.median(np.abs(lo_g[same] - lo_c[same])) < 0.02
    # and both find the truth
    assert np.mean(R._angular_error_deg(l_g, rot, "O") < 1.5) > 0.8


def test_side_view_mask_registration():
    from cryodask.align2d import register_side_masks
    from cryodask.select import FEATURES

    rng = np.random.default_rng(4)
    n = 24
    f = np.zeros((n, len(FEATURES)))
    F = {k: i for i, k in enumerate(FEATURES)}
    angles = rng.uniform(0, 180, n)
    f[:, F["found"]] = 1
    f[:, F["length"]], f[:, F["width"]] = 40.0 + rng.normal(0, 1, n), 32.0 + rng.normal(0, 1, n)
    f[:, F["angle"]] = angles
    f[:, F["x"]], f[:, F["y"]] = rng.uniform(-3, 3, (2, n))
    a = register_side_masks(f, 40.0, 32.0, 64, 1.0, "global-mask", device="cpu")
    b = register_side_masks(f, 40.0, 32.0, 64, 1.0, "global-mask", device=DEV)
    dtheta = (b[:, 0] - a[:, 0] + 90) % 180 - 90
    assert np.median(np.abs(dtheta)) < 0.05 and np.abs(dtheta).max() < 1.0
    assert np.median(np.abs(b[:, 1:3] - a[:, 1:3])) < 0.02
    # and the registration is right: a long axis at angle a is a rotation by a − 90° (mod 180°)
    assert np.median(np.abs((b[:, 0] - (angles - 90.0) + 90) % 180 - 90)) < 1.0


def test_deep_picker_scores_and_training():
    from cryodask import pick_deep as PD

    torch.manual_seed(0)
    model = PD.PickerNet()
    probe = np.random.default_rng(0).normal(size=(96, 120)).astype(np.float32)
    a = PD.score_map(model, probe, "cpu")
    b = PD.score_map(model, probe, DEV)
    np.testing.assert_allclose(b, a, atol=1e-4)
    # training on the GPU runs and learns a separable toy problem (not bitwise equal to the CPU)
    rng = np.random.default_rng(1)
    s = PD.PickerNet.patch_size
    x = rng.normal(size=(256, s, s)).astype(np.float32)
    y = np.zeros((256, 1, 1), np.int64)
    yy, xx = np.mgrid[:s, :s] - s // 2
    disc = (np.hypot(yy, xx) < 8).astype(np.float32)
    x[:128] += 2.0 * disc
    y[:128] = 1
    m = PD.train_picker(x, y, seed=0, epochs=3, min_steps=60, device=DEV)
    p = np.stack([PD.score_map(m, xi, DEV, symmetrise=False)[:, s // 2, s // 2] for xi in x[::16]])
    assert (p.argmax(1) == y[::16, 0, 0]).mean() >= 0.9


def test_power_spectrum():
    from cryodask.ctf_estimate import power_spectrum

    img = np.random.default_rng(5).normal(size=(600, 520)).astype(np.float32)
    a = power_spectrum(img, tile=128, device="cpu")
    b = power_spectrum(img, tile=128, device=DEV)
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6 * np.abs(a).max())


def test_map_alignment(apo):
    from cryodask.map_align import align_map, transform_map

    rot = np.asarray(euler_to_matrix(30.0, 50.0, -20.0)).reshape(3, 3)
    moved = transform_map(apo, rot, shift=(1.0, -2.0, 0.5))
    a, _ = align_map(moved, apo, symmetry="C1", try_hand=False, n_rotations=1000, device="cpu")
    b, _ = align_map(moved, apo, symmetry="C1", try_hand=False, n_rotations=1000, device=DEV)
    assert fsc_curve(a, b)[1:BOX // 2].min() > 0.99
    assert fsc_curve(b, apo)[1:BOX // 4].min() > 0.95


@pytest.mark.slow
def test_demo_on_a_dask_cuda_cluster_matches_cpu(tmp_path, monkeypatch):
    """The quick demo (simulate → every stage → refined map) on ``--cluster cuda`` (one worker per
    GPU; the torch kernels on the GPU) and with every kernel forced to the CPU
    (``CRYODASK_DEVICE=cpu``, a LocalCluster): the same picks and particles, and maps of the same
    quality against the truth."""
    import json

    from cryodask.cluster import ClusterConfig, client_for
    from cryodask.demo import run_demo
    from cryodask.io.star import read_star_blocks

    def worker_device():
        from cryodask.projection import default_device

        return default_device().type

    reports = {}
    for name, kind, forced in (("gpu", "local" if DRY_RUN else "cuda", None), ("cpu", "local", "cpu")):
        if forced:
            monkeypatch.setenv("CRYODASK_DEVICE", forced)
        else:
            monkeypatch.delenv("CRYODASK_DEVICE", raising=False)
        with client_for(ClusterConfig(kind=kind, n_workers=None if kind == "cuda" else 2),
                        announce=lambda m: None) as client:
            devices = set(client.run(worker_device).values())
            assert devices == {forced or DEV.split(":")[0]}, devices
            reports[name] = run_demo(tmp_path / name, None, quick=True)
    monkeypatch.delenv("CRYODASK_DEVICE", raising=False)
    tg, tc = (reports[k]["stages"]["refine"]["truth"] for k in ("gpu", "cpu"))
    print(json.dumps({"gpu": tg, "cpu": tc, "seconds": {k: reports[k]["total_seconds"] for k in reports}}))
    # picking and extraction do not use torch: identical particles
    sg = read_star_blocks(tmp_path / "gpu" / "particles.star")["particles"]
    sc = read_star_blocks(tmp_path / "cpu" / "particles.star")["particles"]
    assert len(sg) == len(sc)
    np.testing.assert_array_equal(sg["rlnMicrographName"], sc["rlnMicrographName"])
    # refinement takes the same decisions up to float32 rounding: maps of the same quality
    for t in (tg, tc):
        assert t["fsc_vs_truth_0.143_A"] < 10.0 and t["ratio_to_known_pose_0.143"] < 1.25
    assert abs(tg["fsc_vs_truth_0.143_A"] / tc["fsc_vs_truth_0.143_A"] - 1) < 0.05
