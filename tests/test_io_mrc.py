"""MRC reading/writing: header checks, memory-mapped stacks, movies, axis order, validity."""
from __future__ import annotations

import io
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodask.errors import InputError
from cryodask.io import mrc

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")


def _valid(path) -> bool:
    return mrcfile.validate(str(path), print_file=io.StringIO())


def test_write_map_is_valid_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(6, 8, 10)).astype(np.float32)
    path = tmp_path / "map.mrc"
    mrc.write_map(path, vol, 1.25, origin=(10.0, -20.0, 30.5))
    assert _valid(path)
    with mrcfile.open(path) as m:
        h = m.header
        assert (int(h.mode), int(h.ispg)) == (2, 1)
        assert (int(h.nx), int(h.ny), int(h.nz)) == (10, 8, 6)
        assert (int(h.mx), int(h.my), int(h.mz)) == (10, 8, 6)
        assert (int(h.nxstart), int(h.nystart), int(h.nzstart)) == (0, 0, 0)
        assert float(h.cella.x) == pytest.approx(12.5) and float(h.cella.z) == pytest.approx(7.5)
        assert float(h.dmin) == pytest.approx(vol.min()) and float(h.dmax) == pytest.approx(vol.max())
        assert float(h.dmean) == pytest.approx(vol.mean(), abs=1e-6)
        assert float(h.rms) == pytest.approx(vol.std(), rel=1e-5)
    back, voxel = mrc.read_map(path)
    assert back.dtype == np.float32 and np.array_equal(back, vol)
    assert voxel == pytest.approx(1.25)
    info = mrc.header_info(path)
    assert info["origin"] == (10.0, -20.0, 30.5)
    assert info["shape"] == (6, 8, 10) and info["mode"] == 2 and info["pixel_size"] == pytest.approx(1.25)


def test_unset_pixel_size_is_none(tmp_path):
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((4, 5), np.float32))
        m.voxel_size = 0.0
    assert mrc.header_info(path)["pixel_size"] is None
    assert mrc.read_mrc(path)[1] is None


def test_write_stack_and_partial_reads(tmp_path):
    rng = np.random.default_rng(1)
    stack = rng.normal(size=(7, 12, 9)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    mrc.write_stack(path, stack, 1.7)
    assert _valid(path)
    with mrcfile.open(path, header_only=True) as m:
        assert int(m.header.ispg) == 0 and int(m.header.mode) == 2
        assert float(m.voxel_size.x) == pytest.approx(1.7) and float(m.voxel_size.y) == pytest.approx(1.7)
    got = mrc.read_stack(path, [5, 0, 5, 3])
    assert got.shape == (4, 12, 9) and np.array_equal(got, stack[[5, 0, 5, 3]])
    assert np.array_equal(mrc.read_stack(path), stack)
    with pytest.raises(InputError, match=r"index 7 .*7 images"):
        mrc.read_stack(path, [1, 7])
    single = tmp_path / "one.mrcs"
    mrc.write_stack(single, stack[2], 1.7)
    assert _valid(single)
    one = mrc.read_stack(single)
    assert one.shape == (1, 12, 9) and np.array_equal(one[0], stack[2])


def test_truncated_file_names_file_and_bytes(tmp_path):
    path = tmp_path / "cut.mrc"
    mrc.write_map(path, np.ones((4, 8, 8), np.float32), 1.0)
    full = path.read_bytes()
    path.write_bytes(full[:-100])
    with pytest.raises(InputError) as err:
        mrc.header_info(path)
    msg = str(err.value)
    assert "truncated" in msg and "cut.mrc" in msg
    assert str(len(full)) in msg and str(len(full) - 100) in msg
    with pytest.raises(InputError, match="truncated"):
        mrc.read_mrc(path)


def test_garbage_missing_and_tiny_files(tmp_path):
    junk = tmp_path / "junk.mrc"
    junk.write_bytes(np.random.default_rng(2).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match=r"junk\.mrc: not an MRC file"):
        mrc.read_mrc(junk)
    tiny = tmp_path / "tiny.mrc"
    tiny.write_bytes(b"MAP " * 10)
    with pytest.raises(InputError, match=r"tiny\.mrc: not an MRC file \(only 40 bytes"):
        mrc.header_info(tiny)
    with pytest.raises(InputError, match=r"nothere\.mrc: file not found"):
        mrc.header_info(tmp_path / "nothere.mrc")


def test_unsupported_mode_and_bad_dims(tmp_path):
    cplx = tmp_path / "complex.mrc"
    with mrcfile.new(cplx) as m:
        m.set_data(np.zeros((4, 4), np.complex64))
    with pytest.raises(InputError, match="unsupported MRC mode 4"):
        mrc.header_info(cplx)
    zero = tmp_path / "zero.mrc"
    mrc.write_map(zero, np.ones((2, 3, 4), np.float32), 1.0)
    raw = bytearray(zero.read_bytes())
    raw[0:4] = np.int32(0).tobytes()  # nx = 0
    zero.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="nx=0"):
        mrc.header_info(zero)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's own header statistics on NaN data
def test_nan_pixels_rejected(tmp_path):
    img = np.zeros((16, 16), np.float32)
    img[3, 4] = np.nan
    img[5, 6] = np.inf
    img[7, 7] = -np.inf
    path = tmp_path / "nan.mrc"
    with mrcfile.new(path) as m:
        m.set_data(img)
    with pytest.raises(InputError, match=r"nan\.mrc: contains 3 NaN/Inf pixels"):
        mrc.read_mrc(path)


def test_movie_is_frame_averaged(tmp_path):
    rng = np.random.default_rng(3)
    frames = rng.normal(size=(3, 10, 14)).astype(np.float32)
    path = tmp_path / "movie.mrc"
    with mrcfile.new(path) as m:
        m.set_data(frames)
        m.set_image_stack()
        m.voxel_size = 0.8
    avg, px = mrc.read_mrc(path)
    assert avg.shape == (10, 14) and avg.dtype == np.float32
    np.testing.assert_allclose(avg, frames.astype(np.float64).mean(axis=0), rtol=0, atol=1e-6)
    assert px == pytest.approx(0.8)
    full, _ = mrc.read_mrc(path, frame_average=False)
    assert np.array_equal(full, frames)


def test_axis_order_is_honoured(tmp_path):
    rng = np.random.default_rng(4)
    vol = rng.normal(size=(3, 4, 5)).astype(np.float32)  # (z, y, x)
    path = tmp_path / "swapped.mrc"
    # columns = z, rows = y, sections = x: the file's array is vol transposed to (x, y, z)
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(vol.transpose(2, 1, 0)))
        m.header.mapc, m.header.mapr, m.header.maps = 3, 2, 1
    assert mrc.header_info(path)["shape"] == (3, 4, 5)
    back, _ = mrc.read_map(path)
    assert np.array_equal(back, vol)


def test_uint8_and_int16_modes(tmp_path):
    data = np.arange(60, dtype=np.int16).reshape(6, 10) - 30
    path = tmp_path / "i16.mrc"
    with mrcfile.new(path) as m:
        m.set_data(data)
    img, _ = mrc.read_mrc(path)
    assert img.dtype == np.float32 and np.array_equal(img, data.astype(np.float32))


@needs_data
@pytest.mark.filterwarnings("ignore:Map ID string not found", "ignore:Unrecognised machine stamp")
def test_old_stacks_without_map_id_are_read():
    info = mrc.header_info(DATA / "particles" / "relion31.mrcs")
    assert info["shape"] == (5, 256, 256) and info["mode"] == 2
    imgs = mrc.read_stack(DATA / "particles" / "relion31.mrcs", [4, 0])
    assert imgs.shape == (2, 256, 256) and np.all(np.isfinite(imgs))
    with mrcfile.mmap(DATA / "particles" / "relion31.mrcs", permissive=True) as m:
        assert np.array_equal(imgs[0], m.data[4])
    vol, voxel = mrc.read_map(DATA / "volumes" / "ribosome70S_65.mrc")
    assert vol.shape == (65, 65, 65) and voxel is None
