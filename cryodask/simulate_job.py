"""``cryodask simulate``: the simulator as a Dask graph that writes a dataset with its ground truth.

Micrograph mode (default) writes::

    OUT/micrographs/mic_0001.mrc ...     micrographs (protein dark), pixel size in the header
    OUT/truth_particles.star             RELION 3.1: rlnMicrographName, rlnCoordinateX/Y, angles,
                                          origins, CTF, cdViewClass, rlnImageName -> clean stacks
    OUT/clean/mic_0001.mrcs ...          noise-free particle boxes (protein white)
    OUT/truth_volume.mrc                 the volume that was projected
    OUT/simulation.json                  parameters and counts

Stack mode (``--particles N``) writes ``OUT/particles.mrcs`` (noisy), ``OUT/particles.star``
(truth poses, shifts and CTF), ``OUT/clean_particles.mrcs`` and the truth volume.

Every micrograph (or chunk of particles) is one task whose random numbers come from
``SeedSequence([seed, index])``, so the output does not depend on the number of workers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import dask
import numpy as np
import pandas as pd

from .errors import InputError
from .phantoms import PHANTOMS, default_pixel_size, make_phantom, phantom_diameter, phantom_symmetry
from .simulate import CTFRange, Optics, simulate_micrograph, simulate_particles

__all__ = ["SimulationConfig", "load_volume", "run_simulation"]


@dataclass
class SimulationConfig:
    """Parameters of a simulated dataset. Lengths in Å unless the name says px; defocus in µm."""

    volume: str = "apoferritin"
    out: str = "simulated"
    n_micrographs: int = 10
    particles: int | None = None  # stack mode: number of particles, no micrographs
    seed: int = 0
    snr: float = 0.1
    views: str = "all"
    pixel_size: float | None = None
    micrograph_size: int = 1024
    box: int | None = None
    particles_per_micrograph: int | None = None
    defocus_min_um: float = 1.0
    defocus_max_um: float = 2.5
    astigmatism_A: float = 0.0
    bfactor: float = 0.0
    ctf: bool = True
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    max_shift_px: float = 0.0
    ice_gradient: float = 0.0
    carbon_edge: bool = False
    symmetry: str | None = None
    diameter: float | None = None  # Å; from the phantom, or measured from an MRC map

    def optics(self) -> Optics:
        return Optics(self.voltage, self.cs, self.amplitude_contrast)

    def ctf_range(self) -> CTFRange:
        return CTFRange(self.defocus_min_um * 1e4, self.defocus_max_um * 1e4, self.astigmatism_A,
                        self.bfactor, self.ctf)


def _even_box(diameter_px: float) -> int:
    return int(2 * math.ceil(0.8 * diameter_px))


def load_volume(cfg: SimulationConfig) -> tuple[np.ndarray, float, float, str | None]:
    """The volume to project: ``(volume (N,N,N), pixel size Å, diameter Å, symmetry)``."""
    if cfg.volume in PHANTOMS:
        apix = cfg.pixel_size or default_pixel_size(cfg.volume)
        diam = phantom_diameter(cfg.volume)
        box = cfg.box or _even_box(diam / apix)
        return make_phantom(cfg.volume, box, apix), apix, diam, cfg.symmetry or phantom_symmetry(cfg.volume)
    from .io.mrc import read_map

    path = Path(cfg.volume)
    if not path.exists():
        raise InputError(path, f"no such volume file (built-in phantoms: {', '.join(sorted(PHANTOMS))})")
    vol, apix_hdr = read_map(path)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(path, f"volume must be a cube, got shape {vol.shape}")
    apix = cfg.pixel_size or apix_hdr
    if not apix:
        raise InputError(path, "the header has no voxel size: pass --pixel-size")
    n = vol.shape[0]
    if n % 2:  # keep voxel n//2 at the centre of an even box
        vol = vol[:-1, :-1, :-1]
    if cfg.box and cfg.box != vol.shape[0]:
        raise InputError(path, f"--box {cfg.box} differs from the map's box {vol.shape[0]}")
    vol = vol.astype(np.float32)
    vol = vol / (vol.std() or 1.0)
    if cfg.diameter:
        diam = cfg.diameter
    else:  # the extent of the density above 10 % of its maximum
        c = np.arange(vol.shape[0]) - vol.shape[0] // 2
        zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
        r = np.sqrt(xx**2 + yy**2 + zz**2)[vol > 0.1 * vol.max()]
        diam = 2 * float(r.max() if r.size else vol.shape[0] / 2) * apix
    return vol, apix, diam, cfg.symmetry


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _one_micrograph(vol, cfg: SimulationConfig, apix: float, diam: float, symmetry, index: int, out: Path):
    from .io.mrc import write_image, write_stack

    rng = _rng(cfg.seed, index)
    n = cfg.micrograph_size
    mic, table, clean = simulate_micrograph(
        vol, apix, (n, n), diam / apix, rng, n_particles=cfg.particles_per_micrograph, views=cfg.views,
        snr=cfg.snr, optics=cfg.optics(), ctf=cfg.ctf_range(), symmetry=symmetry,
        ice_gradient=cfg.ice_gradient, carbon_edge=cfg.carbon_edge, device="cpu")
    name = f"mic_{index + 1:04d}"
    write_image(out / "micrographs" / f"{name}.mrc", mic, apix)
    write_stack(out / "clean" / f"{name}.mrcs", clean, apix)
    table.insert(0, "rlnMicrographName", f"micrographs/{name}.mrc")
    table["rlnImageName"] = [f"{i + 1:06d}@clean/{name}.mrcs" for i in range(len(table))]
    return table


def _stack_chunk(vol, cfg: SimulationConfig, apix: float, symmetry, index: int, start: int, count: int,
                 sigma: float, out: Path):
    import mrcfile

    rng = _rng(cfg.seed, index)
    _, clean, table = simulate_particles(vol, count, apix, rng, views=cfg.views, snr=None, optics=cfg.optics(),
                                         ctf=cfg.ctf_range(), max_shift_px=cfg.max_shift_px,
                                         symmetry=symmetry, device="cpu")
    noisy = clean + rng.normal(0.0, sigma, clean.shape).astype(np.float32) if sigma else clean
    for fname, arr in (("particles.mrcs", noisy), ("clean_particles.mrcs", clean)):
        with mrcfile.mmap(out / fname, mode="r+") as m:
            m.data[start:start + count] = arr
    return table


def run_simulation(cfg: SimulationConfig) -> dict:
    """Build and compute the simulation graph (on the active Dask scheduler); returns a summary."""
    from .io.mrc import write_map
    from .io.star import write_particles
    from .model import microscope_attrs, particle_dataset, provenance

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    vol, apix, diam, symmetry = load_volume(cfg)
    cfg.pixel_size, cfg.diameter, cfg.symmetry = apix, diam, symmetry
    write_map(out / "truth_volume.mrc", vol, apix)
    vol_d = dask.delayed(vol, pure=True)
    attrs = {**microscope_attrs(apix, cfg.voltage, cfg.cs, cfg.amplitude_contrast),
             **provenance("simulate", asdict(cfg), cfg.volume)}
    if cfg.particles:
        import mrcfile

        box = vol.shape[0]
        for fname in ("particles.mrcs", "clean_particles.mrcs"):
            m = mrcfile.new_mmap(out / fname, shape=(cfg.particles, box, box), mrc_mode=2, overwrite=True)
            m.voxel_size = apix
            m.header.ispg = 0
            m.close()
        sigma = 0.0
        if cfg.snr:
            _, pilot, _ = simulate_particles(vol, 512, apix, _rng(cfg.seed, 10**6), views=cfg.views, snr=None,
                                             optics=cfg.optics(), ctf=cfg.ctf_range(),
                                             max_shift_px=cfg.max_shift_px, device="cpu")
            sigma = float(np.sqrt(np.mean(np.var(pilot, axis=(1, 2))) / cfg.snr))
        chunk = 2048
        tasks = [dask.delayed(_stack_chunk, pure=True)(vol_d, cfg, apix, symmetry, i, s, min(chunk, cfg.particles - s),
                                                       sigma, out)
                 for i, s in enumerate(range(0, cfg.particles, chunk))]
        tables = dask.compute(*tasks)
        table = pd.concat(tables, ignore_index=True)
        table.insert(0, "rlnImageName", [f"{i + 1:06d}@particles.mrcs" for i in range(len(table))])
        star = out / "particles.star"
        _fix_stack_headers(out, apix)
    else:
        tasks = [dask.delayed(_one_micrograph, pure=True)(vol_d, cfg, apix, diam, symmetry, i, out)
                 for i in range(cfg.n_micrographs)]
        tables = dask.compute(*tasks)
        table = pd.concat(tables, ignore_index=True)
        star = out / "truth_particles.star"
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnImagePixelSize": [apix], "rlnVoltage": [cfg.voltage],
                           "rlnSphericalAberration": [cfg.cs], "rlnAmplitudeContrast": [cfg.amplitude_contrast],
                           "rlnImageSize": [int(vol.shape[0])], "rlnImageDimensionality": [2]})
    table["rlnOpticsGroup"] = 1
    ds = particle_dataset(None, table, attrs, optics=optics)
    write_particles(star, ds)
    summary = {
        "mode": "particles" if cfg.particles else "micrographs",
        "n_particles": int(len(table)),
        "n_micrographs": 0 if cfg.particles else cfg.n_micrographs,
        "pixel_size_A": apix,
        "box_px": int(vol.shape[0]),
        "diameter_A": diam,
        "symmetry": symmetry,
        "views": {str(k): int(v) for k, v in table["cdViewClass"].value_counts().items()},
        "truth_star": str(star),
        "config": asdict(cfg),
    }
    (out / "simulation.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _fix_stack_headers(out: Path, apix: float) -> None:
    import mrcfile

    for fname in ("particles.mrcs", "clean_particles.mrcs"):
        with mrcfile.mmap(out / fname, mode="r+") as m:
            m.update_header_stats()
            m.voxel_size = apix
