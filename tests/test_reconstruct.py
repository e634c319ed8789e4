"""Direct Fourier reconstruction: recovery of known volumes (with and without CTF), symmetry,
exact chunked accumulation, gold-standard halves that never mix, the lazy Dask graph, the STAR
driver, and RELION's own projections."""
import importlib.util

import numpy as np
import pytest
import torch

from cryodask.fsc import fsc_curve
from cryodask.geometry import euler_to_matrix, matrix_to_euler, symmetry_matrices
from cryodask.phantoms import make_phantom
from cryodask.reconstruct import (
    FourierAccumulator,
    accumulate,
    combine,
    finalize,
    gold_standard,
    particle_parameters,
    random_subsets,
    reconstruct_graph,
    reconstruct_star,
    wiener_filter,
)
from cryodask.simulate import CTFRange, Optics, simulate_particles

APIX = 6.0


@pytest.fixture(scope="module")
def phantom():
    return make_phantom("apoferritin", 32, APIX)


def _sim(vol, n, seed, ctf=False, snr=None, shift=2.0):
    return simulate_particles(vol, n, APIX, np.random.default_rng(seed), snr=snr, max_shift_px=shift,
                              ctf=CTFRange(8000.0, 25000.0) if ctf else CTFRange(enabled=False))


def _acc(images, table, ctf=False, **kw):
    p = particle_parameters(table, APIX)
    return accumulate(images, p["rotations"], p["origins_px"], p["defocus"] if ctf else None, pixel_size=APIX,
                      optics=Optics() if ctf else None, device="cpu", **kw)


def _lowpass_corr(a, b, shells):
    """Correlation of two maps over the Fourier shells < ``shells`` (same shell binning as FSC)."""
    n = a.shape[0]
    fa, fb = np.fft.fftshift(np.fft.fftn(a)), np.fft.fftshift(np.fft.fftn(b))
    c = np.arange(n) - n // 2
    r = np.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    sel = (np.round(r) < shells) & (r > 0)
    return float(np.real(np.vdot(fa[sel], fb[sel])) / np.sqrt(np.vdot(fa[sel], fa[sel]).real * np.vdot(fb[sel], fb[sel]).real))


def test_noise_free_projections_reconstruct_the_volume(phantom):
    _, clean, table = _sim(phantom, 1500, 0)
    vol = finalize(_acc(clean, table)).numpy()
    assert _lowpass_corr(vol, phantom, 12) > 0.99  # to 16 Å (Nyquist 12 Å)
    assert fsc_curve(vol, phantom)[:14].min() > 0.95
    # right scale too: the images' grey levels come back
    assert abs(np.sum(vol * phantom) / np.sum(phantom**2) - 1) < 0.05


def test_ctf_corrected_reconstruction_recovers_the_volume(phantom):
    _, clean, table = _sim(phantom, 1500, 1, ctf=True)
    vol = finalize(_acc(clean, table, ctf=True)).numpy()
    assert _lowpass_corr(vol, phantom, 12) > 0.98
    # ignoring the CTF gives a much worse map: the correction is doing the work
    wrong = finalize(_acc(clean, table, ctf=False)).numpy()
    assert fsc_curve(vol, phantom)[4:14].min() > 0.95
    assert fsc_curve(wrong, phantom)[4:14].mean() < 0.6


def test_origin_sign(phantom):
    """Particles drawn off-centre (RELION origins up to 5 px) come back centred."""
    _, clean, table = _sim(phantom, 600, 2, shift=5.0)
    good = finalize(_acc(clean, table)).numpy()
    t = table.copy()
    t["rlnOriginXAngst"] *= -1
    t["rlnOriginYAngst"] *= -1
    bad = finalize(_acc(clean, t)).numpy()
    assert _lowpass_corr(good, phantom, 8) > 0.99 > 0.8 > _lowpass_corr(bad, phantom, 8)


def test_symmetry_insertion_equals_expanded_particles():
    rng = np.random.default_rng(3)
    imgs = rng.normal(size=(6, 16, 16)).astype(np.float32)
    rots = euler_to_matrix(*rng.uniform(-180, 180, (3, 6)))
    origins = rng.uniform(-2, 2, (6, 2))
    defocus = np.stack([rng.uniform(1e4, 2e4, 6)] * 2 + [np.zeros(6)], 1)
    kw = dict(pixel_size=4.0, optics=Optics(), device="cpu")
    g = symmetry_matrices("D3")
    sym = accumulate(imgs, rots, origins, defocus, symmetry="D3", **kw)
    exp = accumulate(np.repeat(imgs, len(g), 0), np.einsum("bij,gjk->bgik", rots, g).reshape(-1, 3, 3),
                     np.repeat(origins, len(g), 0), np.repeat(defocus, len(g), 0), symmetry="C1", **kw)
    assert sym.count == exp.count == 6 * len(g)
    np.testing.assert_allclose(sym.sums.numpy(), exp.sums.numpy(), atol=2e-5 * exp.sums.abs().max().item())


def test_symmetrised_reconstruction_is_symmetric(phantom):
    """O-symmetric phantom from few particles: imposing O gives an O-symmetric map closer to the truth."""
    _, clean, table = _sim(phantom, 8, 4)
    p = particle_parameters(table, APIX)
    c1 = finalize(accumulate(clean, p["rotations"], p["origins_px"], pixel_size=APIX, device="cpu")).numpy()
    o = finalize(accumulate(clean, p["rotations"], p["origins_px"], pixel_size=APIX, symmetry="O",
                            device="cpu")).numpy()
    assert fsc_curve(o, phantom)[2:14].mean() > fsc_curve(c1, phantom)[2:14].mean() + 0.1
    assert _lowpass_corr(o, phantom, 12) > 0.98
    # a 4-fold about z (through index N//2) maps the O-symmetric map onto itself
    rot90 = np.roll(np.rot90(o, 1, axes=(1, 2)), 1, axis=1)
    assert _lowpass_corr(rot90, o, 12) > 0.98


def test_combine_over_chunks_equals_one_shot(phantom):
    noisy, _, table = _sim(phantom, 300, 5, ctf=True, snr=0.5)
    one = _acc(noisy, table, ctf=True)
    parts = [_acc(noisy[s], table.iloc[s], ctf=True) for s in (slice(0, 70), slice(70, 200), slice(200, 300))]
    tree = combine(combine(parts[0], parts[1]), parts[2])
    other = combine(parts[2], combine(parts[1], parts[0]))
    assert tree.count == other.count == one.count == 300
    tol = 1e-5 * one.sums.abs().max().item()
    np.testing.assert_allclose(tree.sums.numpy(), one.sums.numpy(), atol=tol)
    np.testing.assert_allclose(other.sums.numpy(), one.sums.numpy(), atol=tol)
    # a chain threading one accumulator through the blocks (in place) gives the same sums, and
    # ``select`` picks particles without copying them out first
    p = particle_parameters(table, APIX)
    kw = dict(pixel_size=APIX, optics=Optics(), device="cpu")
    chain = None
    for rows in (np.arange(0, 70), np.arange(70, 200), np.arange(200, 300)):
        chain = accumulate(noisy, p["rotations"], p["origins_px"], p["defocus"], select=rows, into=chain, **kw)
    assert chain.count == 300
    np.testing.assert_allclose(chain.sums.numpy(), one.sums.numpy(), atol=tol)


def test_halves_never_mix_and_graph_is_lazy(phantom):
    noisy, _, table = _sim(phantom, 400, 6, ctf=True, snr=1.0)
    optics = Optics()
    subsets = random_subsets(400, seed=11)
    assert set(np.unique(subsets)) == {1, 2} and abs(np.sum(subsets == 1) - 200) <= 1
    import dask.array as da

    calls = []

    def touch(block):
        calls.append(len(block))
        return block

    images = da.from_array(noisy, chunks=(150, 32, 32)).map_blocks(touch, meta=np.empty((0, 0, 0), np.float32))
    g = reconstruct_graph(images, table, pixel_size=APIX, optics=optics, subsets=subsets, device="cpu")
    assert calls == []  # nothing computed while building
    keys = [str(k) for k in g.__dask_graph__()]
    # 3 blocks in 2 lanes (one task per block), lanes split per half, one combine per half, the root
    assert sum("_accumulate_pair" in k for k in keys) == 3
    assert sum("_combine_owned" in k for k in keys) == 2
    assert sum("gold_standard" in k for k in keys) == 1
    rec = g.compute(scheduler="sync")
    assert sorted(calls) == [100, 150, 150]
    zeroed = noisy.copy()
    zeroed[subsets == 2] = 0.0
    rec0 = reconstruct_graph(zeroed, table, pixel_size=APIX, optics=optics, subsets=subsets, chunk=150,
                             device="cpu").compute(scheduler="sync")
    np.testing.assert_array_equal(rec0.half1, rec.half1)  # half 1 untouched by half 2's images
    assert np.abs(rec0.half2).max() < 1e-6 * np.abs(rec.half2).max()  # half 2 had only zeros
    assert rec.counts == (200, 200)
    np.testing.assert_array_equal(rec.extra["subsets"], subsets)
    # the table's own rlnRandomSubset is honoured when present
    t = table.copy()
    t["rlnRandomSubset"] = subsets
    rec_t = reconstruct_graph(noisy, t, pixel_size=APIX, optics=optics, chunk=400, device="cpu").compute(scheduler="sync")
    np.testing.assert_allclose(rec_t.half1, rec.half1, atol=1e-5 * np.abs(rec.half1).max())


def test_gold_standard_fsc_and_wiener_map(phantom):
    noisy, _, table = _sim(phantom, 2000, 7, ctf=True, snr=0.05)
    p = particle_parameters(table, APIX)
    sub = random_subsets(2000, 0)
    accs = [accumulate(noisy[sub == h], p["rotations"][sub == h], p["origins_px"][sub == h], p["defocus"][sub == h],
                       pixel_size=APIX, optics=Optics(), device="cpu") for h in (1, 2)]
    rec = gold_standard(*accs, APIX)
    truth_fsc = fsc_curve(rec.map_unfiltered, phantom)
    # the gold-standard curve predicts the map's agreement with the truth: C = sqrt(2F/(1+F))
    pred = np.sqrt(2 * np.clip(rec.fsc, 0, 1) / (1 + np.clip(rec.fsc, 0, 1)))
    mid = slice(3, 12)
    assert np.abs(pred[mid] - truth_fsc[mid]).max() < 0.15
    assert rec.resolution()["fsc0.143"] < 20.0
    # the Wiener filter rescales whole shells (FSC against the truth unchanged) and damps the
    # noisy high shells
    np.testing.assert_allclose(fsc_curve(rec.map, phantom)[1:], truth_fsc[1:], atol=1e-4)
    assert np.linalg.norm(rec.map - phantom) < np.linalg.norm(rec.map_unfiltered - phantom)
    tau = gold_standard(*accs, APIX, regularise="tau2")
    assert np.linalg.norm(tau.map - phantom) < np.linalg.norm(rec.map_unfiltered - phantom)


def test_wiener_filter_gain():
    v = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(wiener_filter(v, np.full(9, 1e9)).numpy(), v, atol=1e-4)
    assert np.abs(wiener_filter(v, np.zeros(9)).numpy()).max() < 1e-6
    half = wiener_filter(v, np.ones(9)).numpy()  # SSNR 1 → gain ½
    np.testing.assert_allclose(half, v / 2, atol=1e-4)


def _write_star(d, images, table, apix, optics=Optics()):
    import mrcfile
    import pandas as pd
    import starfile

    with mrcfile.new(d / "parts.mrcs", overwrite=True) as m:
        m.set_data(images.astype(np.float32))
    opt = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["g1"], "rlnVoltage": [optics.voltage],
                        "rlnSphericalAberration": [optics.cs], "rlnAmplitudeContrast": [optics.amplitude_contrast],
                        "rlnImagePixelSize": [apix], "rlnImageSize": [images.shape[-1]], "rlnImageDimensionality": [2]})
    parts = table[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                   "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].copy()
    parts.insert(0, "rlnImageName", [f"{i + 1:06d}@parts.mrcs" for i in range(len(images))])
    parts["rlnOpticsGroup"] = 1
    starfile.write({"optics": opt, "particles": parts}, d / "parts.star", overwrite=True)
    return d / "parts.star"


def test_reconstruct_star_writes_maps_and_fsc(tmp_path, phantom):
    import mrcfile

    noisy, _, table = _sim(phantom, 400, 8, ctf=True, snr=1.0)
    star = _write_star(tmp_path, noisy, table, APIX)
    fig = reconstruct_star(star, tmp_path / "out", chunk=150, threads=2, device="cpu")
    for name in ("map.mrc", "map_unfil.mrc", "half1.mrc", "half2.mrc", "fsc.csv", "fsc.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    with mrcfile.open(tmp_path / "out" / "map.mrc") as m:
        assert m.data.shape == (32, 32, 32) and m.data.dtype == np.float32
        assert float(m.voxel_size.x) == pytest.approx(APIX)
    assert fig["n_particles"] == 400 and fig["half_sizes"] == [200, 200] and fig["box"] == 32
    assert 2 * APIX <= fig["fsc0.143"] < 30.0
    with mrcfile.open(tmp_path / "out" / "map_unfil.mrc") as m:
        assert _lowpass_corr(m.data.astype(np.float64), phantom, 8) > 0.95


@pytest.mark.shared
@pytest.mark.parametrize("kind", ["noctf", "ctf"])
def test_relion_projections_reproduce_truth(shared_data, shared_checks, tmp_path, kind):
    """Images made by relion_project with the STAR's poses reconstruct truth.mrc (same grey scale)."""
    import mrcfile

    d = shared_data / "relion_projections" / kind
    reconstruct_star(d / "particles_true.star", tmp_path, threads=2, device="cpu", png=False)
    spec = importlib.util.spec_from_file_location("checks_fsc", shared_checks / "fsc.py")
    chk = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chk)
    truth = mrcfile.read(d / "truth.mrc").astype(np.float64)
    got = mrcfile.read(tmp_path / "map_unfil.mrc").astype(np.float64)
    c = chk.fsc_curve(got, truth)
    assert c[:31].min() > 0.9 and c.min() > 0.6
    assert chk.crossing(c, 0.5, 64, 5.0) == 10.0  # to Nyquist
    assert abs(np.sum(got * truth) / np.sum(truth**2) - 1) < 0.03
    # a transposed rotation convention would not reconstruct
    import starfile

    p = starfile.read(d / "particles_true.star")["particles"]
    r = euler_to_matrix(p.rlnAngleRot, p.rlnAngleTilt, p.rlnAnglePsi)
    rot, tilt, psi = matrix_to_euler(np.transpose(r, (0, 2, 1)))
    imgs = mrcfile.read(d / "particles.mrcs")
    acc = accumulate(imgs, euler_to_matrix(rot, tilt, psi), np.stack([p.rlnOriginXAngst, p.rlnOriginYAngst], 1) / 5.0,
                     pixel_size=5.0, device="cpu")
    assert fsc_curve(finalize(acc).numpy(), truth)[5:20].mean() < 0.5


def test_accumulator_is_plain_tensors():
    acc = FourierAccumulator(torch.zeros(34, 34, 18, 3), 16, 2, 0)
    d, w = acc.closed()
    assert d.shape == w.shape == (32, 32, 17) and d.dtype == torch.complex64
    with pytest.raises(ValueError):
        combine(acc, FourierAccumulator(torch.zeros(66, 66, 34, 3), 32, 2, 0))


@pytest.mark.shared
def test_star_reader_matches_starfile(shared_data):
    """The pandas-free particle STAR reader gives starfile's values (RELION 3.1 and 5 files)."""
    import starfile

    from cryodask.reconstruct import _read_star

    for f in (shared_data / "particles" / "relion31.star", shared_data / "particles" / "relion5.star",
              shared_data / "relion_projections" / "ctf" / "particles_true.star"):
        cols, optics, apix = _read_star(f)
        ref = starfile.read(f, always_dict=True)
        parts = ref["particles"]
        assert list(cols["rlnImageName"]) == [str(v) for v in parts["rlnImageName"]]
        for c in parts.columns:
            if c in cols and cols[c].dtype.kind == "f":
                np.testing.assert_allclose(cols[c], parts[c].to_numpy(dtype=float), rtol=1e-12)
        assert apix == pytest.approx(float(ref["optics"]["rlnImagePixelSize"].iloc[0]))
        assert optics["voltage"] == pytest.approx(float(ref["optics"]["rlnVoltage"].iloc[0]))


def test_star_errors_and_multi_stack_blocks(tmp_path, phantom):
    import mrcfile

    from cryodask.errors import InputError
    from cryodask.reconstruct import _image_blocks, _read_star

    noisy, _, table = _sim(phantom, 30, 9, ctf=True, snr=1.0)
    star = _write_star(tmp_path, noisy, table, APIX)
    # split the stack in two files, interleaved rows: blocks span both stacks, in table order
    with mrcfile.new(tmp_path / "a.mrcs") as m:
        m.set_data(noisy[0::2])
    with mrcfile.new(tmp_path / "b.mrcs") as m:
        m.set_data(noisy[1::2])
    text = star.read_text()
    for i in range(30):
        text = text.replace(f"{i + 1:06d}@parts.mrcs", f"{i // 2 + 1:06d}@{'ab'[i % 2]}.mrcs")
    (tmp_path / "two.star").write_text(text)
    cols, _, _ = _read_star(tmp_path / "two.star")
    blocks = _image_blocks(tmp_path / "two.star", cols["rlnImageName"], 16)
    assert [c for _, c in blocks] == [16, 14]
    np.testing.assert_array_equal(np.concatenate([b.compute() for b, _ in blocks]), noisy)
    (tmp_path / "bad.star").write_text(text.replace("b.mrcs", "missing.mrcs"))
    with pytest.raises(InputError, match="missing.mrcs"):
        _image_blocks(tmp_path / "bad.star", _read_star(tmp_path / "bad.star")[0]["rlnImageName"], 16)
    (tmp_path / "noangles.star").write_text(text.replace("_rlnAngleTilt", "_rlnSomethingElse"))
    with pytest.raises(InputError, match="rlnAngleTilt"):
        _read_star(tmp_path / "noangles.star")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_accumulation_matches_cpu(phantom):
    noisy, _, table = _sim(phantom, 200, 10, ctf=True, snr=1.0)
    p = particle_parameters(table, APIX)
    args = (noisy, p["rotations"], p["origins_px"], p["defocus"])
    cpu = accumulate(*args, pixel_size=APIX, optics=Optics(), device="cpu")
    gpu = accumulate(*args, pixel_size=APIX, optics=Optics(), device="cuda")
    np.testing.assert_allclose(gpu.sums.cpu().numpy(), cpu.sums.numpy(), atol=1e-4 * cpu.sums.abs().max().item())
    np.testing.assert_allclose(finalize(gpu).cpu().numpy(), finalize(cpu).numpy(), atol=1e-4)
