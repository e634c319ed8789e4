"""FSC against the acceptance check (../shared/checks/fsc.py), masked FSC with phase-randomisation
correction, resolution crossings, writers and the translational alignment helper."""
import importlib.util

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cryodask.fsc import (
    align_to_reference,
    crossing,
    fsc_curve,
    fsc_report,
    masked_fsc,
    phase_randomise,
    resolution,
    soft_sphere,
    write_fsc_csv,
    write_fsc_png,
)


@pytest.fixture(scope="module")
def check(shared_checks):
    spec = importlib.util.spec_from_file_location("checks_fsc", shared_checks / "fsc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _blob(n, seed=0, sigma=2.0):
    rng = np.random.default_rng(seed)
    v = gaussian_filter(rng.normal(size=(n, n, n)), sigma)
    return v * soft_sphere(n, n / 3, 4)


@pytest.mark.shared
@pytest.mark.parametrize("n", [32, 33])
def test_agrees_with_acceptance_check(check, n):
    rng = np.random.default_rng(n)
    a = _blob(n, 1)
    b = a + 0.5 * a.std() * rng.normal(size=a.shape)
    ours, theirs = fsc_curve(a, b), check.fsc_curve(a, b)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    for thr in (0.5, 0.143):
        assert crossing(ours, thr, n, 1.7) == check.crossing(theirs, thr, n, 1.7)
    np.testing.assert_allclose(soft_sphere(n, 10.0), check.soft_sphere(n, 10.0), atol=0)


def test_identical_maps_and_crossing_interpolation():
    a = _blob(32)
    c = fsc_curve(a, a)
    np.testing.assert_allclose(c, 1.0, atol=1e-12)
    assert resolution(c, 2.0) == {"fsc0.5": 4.0, "fsc0.143": 4.0}  # never falls: Nyquist
    curve = np.array([1.0, 0.9, 0.7, 0.3, 0.1, 0.0])  # 0.5 crossed half-way between shells 2 and 3
    assert crossing(curve, 0.5, 10, 1.0) == pytest.approx(10 / 2.5)
    assert crossing(curve, 0.143, 10, 1.0) == pytest.approx(10 / (3 + (0.3 - 0.143) / 0.2))


def test_independent_noise_has_zero_fsc():
    rng = np.random.default_rng(3)
    c = fsc_curve(rng.normal(size=(32,) * 3), rng.normal(size=(32,) * 3))
    assert np.abs(c[2:]).max() < 0.15  # shells ≥ 2 hold ≥ 50 voxels: |FSC| ~ 1/sqrt(count)


def test_phase_randomisation_keeps_amplitudes_and_low_shells():
    a = _blob(32, 4)
    r = phase_randomise(a, 6, np.random.default_rng(0))
    assert r.dtype == np.float64 and np.isrealobj(r)
    fa, fr = np.abs(np.fft.rfftn(a)), np.abs(np.fft.rfftn(r))
    np.testing.assert_allclose(fa, fr, rtol=1e-6, atol=1e-9 * fa.max())
    c = fsc_curve(a, r)
    assert c[:5].min() > 0.999 and np.abs(c[8:]).max() < 0.3


def test_masked_fsc_is_corrected_for_the_mask():
    """Maps = common signal + independent noise. A tight mask raises the FSC (less solvent
    noise); the correction removes what the mask alone creates: for pure noise it stays near 0."""
    n = 40
    rng = np.random.default_rng(5)
    sig = _blob(n, 6, 1.2)
    noise = 1.5 * sig.std()
    a = sig + noise * rng.normal(size=sig.shape)
    b = sig + noise * rng.normal(size=sig.shape)
    mask = soft_sphere(n, n / 3, 3)
    m = masked_fsc(a, b, mask, np.random.default_rng(0))
    hi = slice(int(m["randomise_from"]) + 2, n // 2)
    assert m["randomise_from"] < n // 2
    assert np.mean(m["corrected"][hi]) > np.mean(m["unmasked"][hi]) + 0.05
    pure = masked_fsc(rng.normal(size=sig.shape), rng.normal(size=sig.shape), soft_sphere(n, 6, 3),
                      np.random.default_rng(1))
    assert np.mean(np.abs(pure["corrected"][4:])) < 0.12
    rep = fsc_report(a, b, 2.0, mask_radius=n / 3)
    assert {"curve", "fsc0.5", "fsc0.143", "masked_curve", "masked_fsc0.5", "masked_fsc0.143"} <= set(rep)
    assert rep["masked_fsc0.143"] <= rep["fsc0.143"]


def test_writers(tmp_path):
    a = _blob(24)
    c = fsc_curve(a, a + 0.3 * np.random.default_rng(0).normal(size=a.shape))
    write_fsc_csv(tmp_path / "fsc.csv", {"fsc": c, "other": c / 2}, 24, 3.0)
    lines = (tmp_path / "fsc.csv").read_text().splitlines()
    assert lines[0] == "shell,resolution_A,fsc,other" and len(lines) == 1 + 13
    assert lines[2].split(",")[1] == "72.000"  # shell 1 of a 24-px, 3 Å/px box
    assert abs(float(lines[5].split(",")[2]) - c[4]) < 1e-5
    write_fsc_png(tmp_path / "fsc.png", {"fsc": c}, 24, 3.0, title="t")
    assert (tmp_path / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_align_to_reference_finds_integer_shift():
    ref = _blob(32, 8)
    moved = np.roll(ref, (3, -2, 5), axis=(0, 1, 2))
    back, shift = align_to_reference(moved, ref)
    assert tuple(shift) == (-3, 2, -5)
    np.testing.assert_allclose(back, ref, atol=1e-12)
