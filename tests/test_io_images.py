"""Micrograph reading across formats, and the errors users see for bad inputs."""
from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pytest
import tifffile
from PIL import Image

from cryodask.errors import InputError
from cryodask.io.images import micrograph_shape, read_micrograph

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data not present")
RNG = np.random.default_rng(11)


def test_png_8_and_16_bit(tmp_path):
    a8 = RNG.integers(0, 256, size=(20, 30), dtype=np.uint8)
    a16 = RNG.integers(0, 65536, size=(20, 30), dtype=np.uint16)
    Image.fromarray(a8).save(tmp_path / "m8.png")
    Image.fromarray(a16).save(tmp_path / "m16.png")
    for name, ref in (("m8.png", a8), ("m16.png", a16)):
        img, px = read_micrograph(tmp_path / name)
        assert img.dtype == np.float32 and img.shape == (20, 30) and px is None
        assert np.array_equal(img, ref.astype(np.float32)), name
        assert micrograph_shape(tmp_path / name) == (20, 30)
    assert read_micrograph(tmp_path / "m16.png")[0].max() > 255  # really 16-bit, not truncated


def test_tiff_16_bit_and_multipage(tmp_path):
    a16 = RNG.integers(0, 65536, size=(18, 25), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "m.tif", a16)
    img, px = read_micrograph(tmp_path / "m.tif")
    assert np.array_equal(img, a16.astype(np.float32)) and px is None
    assert micrograph_shape(tmp_path / "m.tif") == (18, 25)
    frames = RNG.integers(0, 5, size=(4, 18, 25), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "movie.tiff", frames, photometric="minisblack")
    avg, _ = read_micrograph(tmp_path / "movie.tiff")
    np.testing.assert_allclose(avg, frames.mean(axis=0), atol=1e-6)
    assert micrograph_shape(tmp_path / "movie.tiff") == (18, 25)


def test_mrc_micrograph_and_movie(tmp_path):
    mic = RNG.normal(size=(16, 24)).astype(np.float32)
    with mrcfile.new(tmp_path / "mic.mrc") as m:
        m.set_data(mic)
        m.voxel_size = 1.1
    img, px = read_micrograph(tmp_path / "mic.mrc")
    assert np.array_equal(img, mic) and px == pytest.approx(1.1)
    frames = RNG.normal(size=(3, 16, 24)).astype(np.float32)
    with mrcfile.new(tmp_path / "movie.mrcs") as m:
        m.set_data(frames)
        m.set_image_stack()
    avg, _ = read_micrograph(tmp_path / "movie.mrcs", expected_shape=(16, 24))
    np.testing.assert_allclose(avg, frames.astype(np.float64).mean(axis=0), atol=1e-6)
    assert micrograph_shape(tmp_path / "movie.mrcs") == (16, 24)


def test_rgb_png_rejected(tmp_path):
    Image.fromarray(RNG.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(InputError, match=r"rgb\.png: is a RGB PNG"):
        read_micrograph(tmp_path / "rgb.png")
    tifffile.imwrite(tmp_path / "rgb.tif", RNG.integers(0, 256, size=(10, 12, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(InputError, match=r"rgb\.tif: is a RGB TIFF"):
        read_micrograph(tmp_path / "rgb.tif")


def test_wrong_size_rejected(tmp_path):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match=r"small\.png: size 10×12 .* expected 20×12"):
        read_micrograph(tmp_path / "small.png", expected_shape=(20, 12))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mrcfile's own header statistics on NaN data
def test_nan_micrograph_rejected(tmp_path):
    bad = np.ones((8, 8), np.float32)
    bad[2, 2] = np.nan
    with mrcfile.new(tmp_path / "nan.mrc") as m:
        m.set_data(bad)
    with pytest.raises(InputError, match=r"nan\.mrc: contains 1 NaN/Inf pixels"):
        read_micrograph(tmp_path / "nan.mrc")
    tifffile.imwrite(tmp_path / "nan.tif", bad)
    with pytest.raises(InputError, match=r"nan\.tif: contains 1 NaN/Inf pixels"):
        read_micrograph(tmp_path / "nan.tif")


def test_bad_files_rejected(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match=r"a\.jpg: unsupported micrograph format '\.jpg'"):
        read_micrograph(tmp_path / "a.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InputError, match=r"broken\.png: unreadable or corrupt PNG"):
        read_micrograph(tmp_path / "broken.png")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\xff" * 50)
    with pytest.raises(InputError, match=r"broken\.tif: unreadable or corrupt TIFF"):
        read_micrograph(tmp_path / "broken.tif")
    tifffile.imwrite(tmp_path / "line.tif", np.arange(50, dtype=np.uint16)[None, :])
    with pytest.raises(InputError, match=r"line\.tif: is 1-D data"):
        read_micrograph(tmp_path / "line.tif")
    with pytest.raises(InputError, match=r"gone\.mrc: file not found"):
        read_micrograph(tmp_path / "gone.mrc")


@needs_data
def test_apoferritin_micrograph():
    path = DATA / "apoferritin" / "May08_03.05.02.mrc"
    assert micrograph_shape(path) == (1200, 1240)
    img, px = read_micrograph(path)
    assert img.shape == (1200, 1240) and px == pytest.approx(1.5)
    assert 30000 < float(img.mean()) < 35000  # README: mean ≈ 32,700
