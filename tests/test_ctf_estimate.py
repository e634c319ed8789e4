"""CTF estimation (cryodask.ctf_estimate): defocus and astigmatism recovered from Thon rings.

Ground truth is built here: micrographs whose only structure is white noise filtered by a known
CTF (RELION's, :func:`cryodask.ctf.ctf_2d`) plus white noise, so the answer is exact; and one
small simulated apoferritin micrograph (particles × CTF + noise) from :mod:`cryodask.simulate`.
"""
from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import torch

from cryodask import ctf_estimate as ce
from cryodask.ctf import ctf_2d

PX = 2.0


def ctf_filtered_noise(n, px, u, v, angle, seed, snr=0.5, bfactor=50.0, shape=None):
    """White noise × CTF(u, v, angle) (with a B-factor envelope) + white noise: (ny, nx) float32."""
    ny, nx = shape or (n, n)
    rng = np.random.default_rng(seed)
    ky = torch.fft.fftfreq(ny, px)[:, None].expand(ny, nx // 2 + 1)
    kx = torch.fft.rfftfreq(nx, px)[None, :].expand(ny, nx // 2 + 1)
    c = ctf_2d(ky, kx, u, v, angle, 300.0, 2.7, 0.1, bfactor=bfactor).numpy()
    sig = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(ny, nx))) * c, s=(ny, nx))
    return (math.sqrt(snr) * sig + rng.normal(size=(ny, nx))).astype(np.float32)


def angle_diff(a, b):
    """Difference of two astigmatism angles, degrees, modulo 180 (in [-90, 90))."""
    return (a - b + 90.0) % 180.0 - 90.0


def test_fit_ctf_squared_is_relion_ctf_squared():
    opt = ce._Optics(300.0, 2.7, 0.07)
    ky, kx = torch.meshgrid(torch.fft.fftfreq(64, 1.3, dtype=torch.float64),
                            torch.fft.rfftfreq(64, 1.3, dtype=torch.float64), indexing="ij")
    u, v, ang = 21000.0, 18000.0, 37.0
    ref = ctf_2d(ky, kx, u, v, ang, 300.0, 2.7, 0.07).double().numpy() ** 2
    theta = np.arctan2(ky.numpy(), kx.numpy())
    defocus = (u + v) / 2 + (u - v) / 2 * np.cos(2 * (theta - np.deg2rad(ang)))
    mine = opt.ctf2(ky.numpy() ** 2 + kx.numpy() ** 2, defocus)
    np.testing.assert_allclose(mine, ref, atol=2e-6)
    # along the DefocusAngle direction the defocus is U
    k = np.array([0.1])
    d_along = (u + v) / 2 + (u - v) / 2 * np.cos(0.0)
    assert d_along == u
    assert opt.ctf2(k**2, d_along)[0] == pytest.approx(
        float(ctf_2d(torch.tensor([0.1 * math.sin(math.radians(ang))], dtype=torch.float64),
                     torch.tensor([0.1 * math.cos(math.radians(ang))], dtype=torch.float64),
                     u, v, ang, 300.0, 2.7, 0.07)[0]) ** 2, abs=1e-6)


def test_power_spectrum_is_flat_for_white_noise_and_centred():
    rng = np.random.default_rng(0)
    ps = ce.power_spectrum(rng.normal(size=(1024, 1024)).astype(np.float32), tile=256)
    assert ps.shape == (256, 129)
    assert ps[5:, 5:].mean() == pytest.approx(1.0, rel=0.03)  # unit-variance noise → unit power
    # a plane wave lands on its coarse Fourier pixel, also for a non-square micrograph
    y, x = np.mgrid[:600, :700]
    wave = np.cos(2 * np.pi * (x * 10 / 256 - y * 7 / 256)) + 0.01 * x  # plus a ramp, removed
    ps = ce.power_spectrum(wave.astype(np.float32), tile=256)
    iy, ix = np.unravel_index(np.argmax(ps), ps.shape)
    assert (iy, ix) == (256 - 7, 10)
    assert ps[iy, ix] / ps.sum() > 0.5


@pytest.mark.parametrize("u,v,angle", [(15000.0, 15000.0, 0.0), (22000.0, 20000.0, 35.0), (9000.0, 7800.0, -70.0)])
def test_recovers_known_defocus_and_astigmatism(u, v, angle):
    img = ctf_filtered_noise(1024, PX, u, v, angle, seed=int(u))
    r = ce.estimate_ctf(img, PX)
    assert set(r) == set(ce.CTF_COLUMNS)
    assert abs(r["rlnDefocusU"] - u) < 75 and abs(r["rlnDefocusV"] - v) < 75
    if u - v >= 1000:
        assert abs(angle_diff(r["rlnDefocusAngle"], angle)) < 1.5
    else:
        assert r["rlnDefocusU"] - r["rlnDefocusV"] < 200  # no spurious astigmatism
    assert r["rlnCtfFigureOfMerit"] > 0.1
    assert r["rlnCtfMaxResolution"] < 6.0  # rings fitted nearly to Nyquist (4 Å)


def test_pure_noise_gives_a_poor_fit():
    img = np.random.default_rng(3).normal(size=(512, 512)).astype(np.float32)
    r = ce.estimate_ctf(img, PX)
    assert r["rlnCtfFigureOfMerit"] < 0.05
    assert r["rlnCtfMaxResolution"] > 10.0


def test_simulated_apoferritin_micrograph():
    from cryodask.phantoms import make_phantom
    from cryodask.simulate import CTFRange, simulate_micrograph

    vol = make_phantom("apoferritin", 64, 3.0)
    rng = np.random.default_rng(7)
    mic, table, _ = simulate_micrograph(vol, 3.0, (768, 768), 40.0, rng, snr=0.3,
                                        ctf=CTFRange(12000.0, 20000.0, astig=0.0))
    truth = float(table["rlnDefocusU"].iloc[0])
    r = ce.estimate_ctf(mic, 3.0)
    mean = (r["rlnDefocusU"] + r["rlnDefocusV"]) / 2
    assert abs(mean - truth) < 300  # ~2 %: the Thon rings here come only from the particles
    assert r["rlnCtfMaxResolution"] < 16.0


def test_graph_is_lazy_and_matches_the_kernel(tmp_path):
    calls = []

    def load(i):
        calls.append(i)
        if i == 2:
            return np.full((256, 256), np.nan, np.float32)  # a micrograph that failed to ingest
        return ctf_filtered_noise(256, PX, 12000.0 + 4000 * i, 12000.0 + 4000 * i, 0.0, seed=i, snr=2.0)

    stack = da.stack([da.from_delayed(dask.delayed(load)(i), (256, 256), np.float32) for i in range(3)])
    g = ce.ctf_graph(stack, PX)
    assert g.shape == (3, len(ce.CTF_COLUMNS)) and g.chunks[0] == (1, 1, 1)
    assert calls == []  # nothing computed while building
    out = g.compute(scheduler="synchronous")
    assert sorted(calls) == [0, 1, 2]
    ref = ce.estimate_ctf(load(1), PX)
    np.testing.assert_allclose(out[1], [ref[c] for c in ce.CTF_COLUMNS], rtol=1e-9)
    assert np.all(np.isnan(out[2]))
    for i in (0, 1):
        assert abs(out[i, 0] - (12000 + 4000 * i)) < 400
    table = ce.ctf_table(out, names=["a", "b", "c"])
    assert list(table.columns) == ["rlnMicrographName", *ce.CTF_COLUMNS]


def test_diagnostic_png(tmp_path):
    img = ctf_filtered_noise(512, PX, 18000.0, 16500.0, 20.0, seed=5)
    fit = ce.estimate_ctf(img, PX, return_fit=True)
    path = tmp_path / "ctf.png"
    ce.plot_ctf_diagnostic(fit, path, title="test", truth={"rlnDefocusU": 18000.0, "rlnDefocusV": 16500.0,
                                                           "rlnDefocusAngle": 20.0})
    assert path.stat().st_size > 10_000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_thon_ring_count():
    # 300 kV: at 10 Å/px a 1 µm defocus has no zero before Nyquist (20 Å); at 3 Å/px it has 5
    assert ce.thon_ring_count(10000.0, 1000.0, 20.0) == 0
    assert ce.thon_ring_count(10000.0, 1000.0, 6.0) == 5
    assert ce.thon_ring_count(25000.0, 1000.0, 6.0) > ce.thon_ring_count(10000.0, 1000.0, 6.0)


def test_rejects_an_empty_band():
    img = ctf_filtered_noise(256, 10.0, 20000.0, 20000.0, 0.0, seed=1)
    with pytest.raises(ValueError, match="band"):
        ce.estimate_ctf(img, 10.0, resolution_range=(19.0, 25.0))


def test_real_apoferritin_halves_agree(shared_data):
    """EMPIAR-10146 (true defocus unknown): the two halves of a micrograph must agree."""
    import mrcfile

    path = shared_data / "apoferritin" / "May08_05.35.20.mrc"
    if not path.exists():
        pytest.skip("micrograph not available")
    img = mrcfile.read(path)
    a, b = ce.estimate_ctf(img[:, :620], 1.5), ce.estimate_ctf(img[:, 620:], 1.5)
    for r in (a, b):
        assert 5000 < r["rlnDefocusV"] <= r["rlnDefocusU"] < 40000
        assert r["rlnCtfMaxResolution"] < 8.0
    assert abs(a["rlnDefocusU"] - b["rlnDefocusU"]) < 300
    assert abs(a["rlnDefocusV"] - b["rlnDefocusV"]) < 300


def test_pipeline_flags_unmeasurable_defocus(tmp_path):
    """KLH-like micrographs at 10 Å/px (Nyquist 20 Å) show no Thon ring below Nyquist at 1–2.5 µm:
    the fit can only land on the limit of the defocus search, and the CTF stage must flag every
    micrograph as not usable (its particles are then reconstructed without CTF correction)."""
    from cryodask.pipeline import RunConfig, run_pipeline
    from cryodask.simulate_job import SimulationConfig, run_simulation

    sim = tmp_path / "sim"
    run_simulation(SimulationConfig(volume="klh", out=str(sim), n_micrographs=3, micrograph_size=512, snr=0.1, seed=3))
    rep = run_pipeline(RunConfig.load(None, {"micrographs": [str(sim / "micrographs" / "*.mrc")], "diameter": 400.0,
                                             "symmetry": "D5", "out": str(tmp_path / "run"),
                                             "stages": ["ingest", "ctf"]}))
    ctf = rep["stages"]["ctf"]
    assert ctf["n_micrographs"] == 3 and ctf["n_usable"] == 0 and ctf["n_at_search_limit"] >= 2
    assert "warning" in ctf


def test_refine_defocus_to_reference_recovers_defocus_and_astigmatism():
    """Particles = CTF ⊛ reference + white noise at 5 Å/px, where a 1-D start is 3000 Å off: the
    reference-based fit finds the mean defocus, the astigmatism and its angle."""
    rng = np.random.default_rng(3)
    n, px, b = 64, 5.0, 200
    u, v, ang = 15500.0, 14500.0, 30.0
    ky = torch.fft.fftfreq(n, px)[:, None].expand(n, n // 2 + 1)
    kx = torch.fft.rfftfreq(n, px)[None, :].expand(n, n // 2 + 1)
    blur = np.exp(-1000.0 * (ky**2 + kx**2).numpy())  # a smooth "particle" spectrum
    refs = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(b, n, n))) * blur, s=(n, n))
    c = ctf_2d(ky, kx, u, v, ang, 300.0, 2.7, 0.1).numpy()
    clean = np.fft.irfft2(np.fft.rfft2(refs) * c, s=(n, n))
    parts = clean + rng.normal(scale=np.sqrt(clean.var() / 0.1), size=clean.shape)  # SNR 0.1
    cross, power = ce.reference_cross_spectra(parts, refs)
    assert cross.shape == power.shape == (n, n // 2 + 1)
    r = ce.refine_defocus_to_reference(cross, power, px, 18000.0, 18000.0, 0.0, search=6000.0)
    assert abs((r["rlnDefocusU"] + r["rlnDefocusV"]) / 2 - (u + v) / 2) < 300
    assert abs((r["rlnDefocusU"] - r["rlnDefocusV"]) - (u - v)) < 500
    assert abs(angle_diff(r["rlnDefocusAngle"], ang)) < 15
    assert r["score"] > r["start_score"] > 0
    # particles of the opposite contrast do not correlate with the reference at any defocus
    assert ce.refine_defocus_to_reference(-cross, power, px, 18000.0, 18000.0, 0.0)["score"] < 0
    with pytest.raises(ValueError):  # stacks of different box sizes
        ce.reference_cross_spectra(parts[:, :10], refs)
