"""Preprocessing kernels (cryodask.preprocess): each step does what its docstring says, on
images whose answer we know, and the Dask graph equals the kernel."""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from scipy import ndimage as ndi

from cryodask import preprocess as P


def _raise_on_compute(*args, **kwargs):
    raise RuntimeError("computed")


def _disc_image(n=256, centres=((64, 64), (150, 180), (200, 60)), radius=16, contrast=1.0, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    img = np.zeros((n, n), np.float32)
    for cy, cx in centres:
        img -= contrast * ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2)
    return (img + rng.normal(0, noise, img.shape)).astype(np.float32)


def test_picking_binning_and_shape():
    # 115 Å particle at 1.5 Å/px is 76.7 px; target 32 px → factor 2.396
    assert P.picking_binning(1.5, 115) == pytest.approx(115 / 1.5 / 32)
    assert P.picking_binning(5.0, 100) == 1.0  # never upsample
    assert P.downsampled_shape((1200, 1240), 2.396) == (501, 518)
    with pytest.raises(ValueError):
        P.picking_binning(0, 100)


def test_normalise_is_affine_invariant_and_robust():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (200, 200)).astype(np.float32)
    x[:5, :5] = 1e6  # outliers must not matter
    a = P.normalise(x)
    b = P.normalise(3000.0 * x + 32768.0)
    assert a.dtype == np.float32
    assert np.median(a) == pytest.approx(0.0, abs=1e-3)
    assert 1.4826 * np.median(np.abs(a)) == pytest.approx(1.0, rel=1e-3)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_downsample_preserves_mean_and_maps_coordinates():
    n, f = 240, 2.5
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    y0, x0 = 101.3, 57.8
    img = np.exp(-((yy - y0) ** 2 + (xx - x0) ** 2) / (2 * 6.0 ** 2)).astype(np.float32)
    out = P.downsample(img, f)
    assert out.shape == P.downsampled_shape(img.shape, f) == (96, 96)
    assert out.mean() == pytest.approx(img.mean(), rel=1e-3)
    cy, cx = ndi.center_of_mass(out)
    s = n / out.shape[0]
    assert (cy + 0.5) * s - 0.5 == pytest.approx(y0, abs=0.15)
    assert (cx + 0.5) * s - 0.5 == pytest.approx(x0, abs=0.15)


def test_flatten_removes_gradient_not_particles():
    img = _disc_image(noise=0.0)
    ramp = np.linspace(0, 5, img.shape[1], dtype=np.float32)[None, :]
    out = P.flatten_background(img + ramp, sigma_px=64)
    bg = out[:, 100:110]  # a strip without particles
    assert abs(bg[:, 0].mean() - bg[:, -1].mean()) < 0.05
    assert out[64, 64] < out[10, 120] - 0.5  # the disc is still dark


def test_contrast_and_histeq_ranges():
    rng = np.random.default_rng(2)
    x = rng.gamma(2.0, 1.0, (128, 128)).astype(np.float32)
    c = P.contrast_correction(x)
    assert c.min() == 0.0 and c.max() == 1.0
    assert np.mean(c == 1.0) == pytest.approx(0.005, abs=0.003)  # 0.5 % clipped at each end
    h = P.histogram_equalisation(x)
    assert 0.0 <= h.min() and h.max() <= 1.0
    # equalised: the empirical CDF is the identity
    assert np.mean(h <= 0.5) == pytest.approx(0.5, abs=0.02)
    assert np.mean(h <= 0.25) == pytest.approx(0.25, abs=0.02)


def test_wiener_reduces_noise_keeps_edges():
    rng = np.random.default_rng(3)
    clean = np.zeros((128, 128), np.float32)
    clean[:, 64:] = 4.0
    noisy = clean + rng.normal(0, 1, clean.shape).astype(np.float32)
    out = P.wiener_restoration(noisy, radius=2)
    flat = (slice(10, 118), slice(10, 54))
    assert out[flat].var() < 0.35 * noisy[flat].var()
    step = out[:, 70:].mean() - out[:, :58].mean()
    assert step == pytest.approx(4.0, abs=0.2)


def test_guided_filter_matches_reference_and_preserves_edges():
    rng = np.random.default_rng(4)
    clean = np.zeros((96, 96), np.float32)
    clean[30:70, 30:70] = 1.0
    p = clean + rng.normal(0, 0.1, clean.shape).astype(np.float32)
    r, eps = 3, 1e-2
    # reference He et al. with scipy box means ('reflect' = OpenCV BORDER_REFLECT)
    box = lambda a: ndi.uniform_filter(a.astype(np.float64), 2 * r + 1, mode="reflect")  # noqa: E731
    mi, mp = box(p), box(p)
    a = (box(p * p) - mi * mp) / (box(p * p) - mi * mi + eps)
    b = mp - a * mi
    ref = box(a) * p + box(b)
    out = P.guided_filter(p, r, eps)
    np.testing.assert_allclose(out, ref, atol=2e-4)
    inside = (slice(38, 62), slice(38, 62))
    assert out[inside].std() < 0.5 * p[inside].std()
    assert out[50, 35] - out[50, 24] > 0.8  # edge kept
    # eps → 0: the self-guided filter is the identity
    np.testing.assert_allclose(P.guided_filter(p, r, 1e-9), p, atol=1e-3)


def test_clahe_equalises_low_contrast_region():
    rng = np.random.default_rng(5)
    img = np.full((256, 256), 0.5, np.float32)
    img[:, :128] += 0.02 * rng.standard_normal((256, 128)).astype(np.float32)  # faint texture
    img[:, 128:] = rng.uniform(0, 1, (256, 128)).astype(np.float32)
    out = P.clahe(img, tile_px=64, clip_limit=2.0)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert out[:, :128].std() > 3 * img[:, :128].std()


def test_morphology_removes_specks_keeps_disc():
    img = np.zeros((64, 64), np.float32)
    yy, xx = np.mgrid[0:64, 0:64]
    img[(yy - 32) ** 2 + (xx - 32) ** 2 <= 100] = -1.0
    img[5, 5] = 1.0   # bright speck
    img[5, 58] = -1.0  # dark speck
    out = P.morphological_open_close(img, radius=1)
    assert out[5, 5] == 0.0 and out[5, 58] == 0.0
    assert out[32, 32] == -1.0 and out[32, 41] == -1.0


def test_chain_shape_range_and_polarity():
    img = 30000 + 5000 * _disc_image(n=384, centres=((96, 96), (250, 280)), radius=38)
    out = P.preprocess_micrograph(img, pixel_size=1.5, diameter=115)
    b = P.picking_binning(1.5, 115)
    assert out.shape == P.downsampled_shape(img.shape, b)
    assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    s = img.shape[0] / out.shape[0]
    centre = out[int(96 / s), int(96 / s)]
    assert centre < np.median(out) - 0.2  # particles stay dark
    with pytest.raises(ValueError, match="unknown preprocessing step"):
        P.preprocess_micrograph(img, 1.5, 115, steps=("normalise", "sharpen"))
    # every step can run alone
    for step in P.STEPS:
        o = P.preprocess_micrograph(img, 1.5, 115, steps=("normalise", step))
        assert np.isfinite(o).all()


def test_preprocess_graph_is_lazy_and_equals_kernel():
    stack = np.stack([30000 + 5000 * _disc_image(n=200, seed=s) for s in range(3)])
    arr = da.from_array(stack, chunks=(2, 100, 200))  # rechunked to one micrograph per chunk
    with dask.config.set(scheduler=_raise_on_compute):
        g = P.preprocess_graph(arr, 1.5, 115)
        b = P.picking_binning(1.5, 115)
        assert g.shape == (3, *P.downsampled_shape((200, 200), b))
        assert g.chunks[0] == (1, 1, 1)
        assert g.dtype == np.float32
    out = g.compute(scheduler="sync")
    for i in range(3):
        np.testing.assert_array_equal(out[i], P.preprocess_micrograph(stack[i], 1.5, 115))


def test_in_place_kernels_equal_their_plain_expressions():
    """The kernels compute in place on few buffers; the values must be those of the plain
    expressions of their formulas, bit for bit (the picks downstream must not move)."""
    rng = np.random.default_rng(7)
    img = (rng.normal(size=(97, 131)) * 40 + 300).astype(np.float32)
    box = lambda a, r: P.box_filter(a, r)  # noqa: E731
    # normalise
    sub = img[::1, ::1]
    med = np.median(sub)
    mad = 1.4826 * np.median(np.abs(sub - med))
    assert np.array_equal(P.normalise(img), ((img - med) / mad).astype(np.float32))
    # flatten
    bg = P.cv2.GaussianBlur(img, (0, 0), sigmaX=5.0, borderType=P.cv2.BORDER_REFLECT)
    assert np.array_equal(P.flatten_background(img, 5.0), (img - bg).astype(np.float32))
    # contrast (np.percentile gives float64 limits: float64 arithmetic, then float32)
    lo, hi = np.percentile(img, [0.5, 99.5])
    out = P.contrast_correction(img)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32))
    # Wiener
    mu = box(img, 2)
    var = np.maximum(box(img * img, 2) - mu * mu, 0.0)
    nu = float(var.mean())
    gain = np.maximum(var - nu, 0.0) / np.maximum(var, max(nu, 1e-12))
    assert np.array_equal(P.wiener_restoration(img, 2), (mu + gain * (img - mu)).astype(np.float32))
    # guided filter, self-guided and with a separate guide
    p = P.contrast_correction(img)
    for guide in (None, rng.random(img.shape).astype(np.float32)):
        g = p if guide is None else guide
        mi, mp = box(g, 2), box(p, 2)
        a = (box(g * p, 2) - mi * mp) / (box(g * g, 2) - mi * mi + 1e-2)
        b = mp - a * mi
        ref = (box(a, 2) * g + box(b, 2)).astype(np.float32)
        assert np.array_equal(P.guided_filter(p, 2, 1e-2, guide=guide), ref)
    # the input is never modified
    before = img.copy()
    P.preprocess_micrograph(img, 1.5, 60.0)
    assert np.array_equal(img, before)
