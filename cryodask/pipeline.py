"""``cryodask run``: the whole pipeline, stage by stage, on one Dask cluster.

Stages (each a module of its own; here they are only wired together):
``ingest`` → ``preprocess`` → ``pick`` → ``extract`` → ``select`` → ``align2d`` →
``reconstruct`` (the 3D stages are added as they are built).

Every stage writes its outputs under ``OUT/`` (zarr groups in ``OUT/store.zarr``, STAR/MRC
files) and then a completion record ``OUT/stages/<stage>.json`` holding a hash of its
parameters and of its upstream stages' hashes. A re-run skips every stage whose record
matches, so a killed job resumes where it stopped, and a changed parameter re-runs exactly the
stages downstream of it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .errors import CryodaskError, InputError

log = logging.getLogger("cryodask")

__all__ = ["RunConfig", "run_pipeline", "STAGES"]


@dataclass
class RunConfig:
    """A run: inputs, the particle, and per-stage settings (the YAML keys are these names)."""

    micrographs: list[str] = field(default_factory=list)
    pixel_size: float | None = None  # Å/px
    diameter: float | None = None  # particle outer diameter, Å
    symmetry: str = "C1"
    out: str = "cryodask_run"
    seed: int = 0
    voltage: float = 300.0  # kV
    cs: float = 2.7  # mm
    amplitude_contrast: float = 0.1
    truth: str | None = None  # folder of a simulation: adds accuracy figures to the report
    stages: list[str] | None = None
    cluster: dict[str, Any] = field(default_factory=dict)
    preprocess: dict[str, Any] = field(default_factory=dict)
    ctf: dict[str, Any] = field(default_factory=dict)
    pick: dict[str, Any] = field(default_factory=dict)
    extract: dict[str, Any] = field(default_factory=dict)
    select: dict[str, Any] = field(default_factory=dict)
    align2d: dict[str, Any] = field(default_factory=dict)
    localized: dict[str, Any] = field(default_factory=dict)  # the paper's pairwise SfM maps; opt-in
    refine: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | None = None, overrides: dict[str, Any] | None = None) -> "RunConfig":
        """From a YAML file (optional) with command-line ``overrides`` (None values ignored)."""
        d: dict[str, Any] = {}
        if path:
            import yaml

            p = Path(path)
            if not p.exists():
                raise InputError(p, "no such configuration file")
            try:
                d = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise InputError(p, f"not valid YAML ({str(e).splitlines()[0]})") from None
            if not isinstance(d, dict):
                raise InputError(p, "the configuration must be a mapping of keys to values")
        for k, v in (overrides or {}).items():
            if v is not None:
                d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        if isinstance(d.get("micrographs"), str):
            d["micrographs"] = [d["micrographs"]]
        if isinstance(d.get("stages"), str):
            d["stages"] = [s.strip() for s in d["stages"].split(",") if s.strip()]
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(path, f"unknown configuration key(s): {', '.join(unknown)}")
        cfg = cls(**d)
        cfg.validate(path)
        # absolute paths: workers (SLURM jobs, pods) may start in another directory
        cfg.out = str(Path(cfg.out).expanduser().absolute())
        cfg.micrographs = [str(Path(m).expanduser().absolute()) for m in cfg.micrographs]
        if cfg.truth:
            cfg.truth = str(Path(cfg.truth).expanduser().absolute())
        return cfg

    def validate(self, source=None) -> None:
        if not self.micrographs:
            raise InputError(source, "no micrographs given (--micrographs GLOB or 'micrographs:' in the config)")
        if not self.diameter or self.diameter <= 0:
            raise InputError(source, "the particle diameter is required (--diameter Å)")
        if self.pixel_size is not None and self.pixel_size <= 0:
            raise InputError(source, "the pixel size must be positive (Å/px)")


# --------------------------------------------------------------------------------------------
class Context:
    """What stages share: the configuration, paths, and results of earlier stages."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.store = self.out / "store.zarr"
        self.records = self.out / "stages"
        self.results: dict[str, dict[str, Any]] = {}
        self.bad_inputs: list[dict[str, str]] = []
        self.figures: list[tuple[str, str]] = []

    @property
    def pixel_size(self) -> float:
        return float(self.results["ingest"]["pixel_size_A"])


def _stage_ingest(ctx: Context) -> dict[str, Any]:
    from .ingest import expand_inputs, ingest_micrographs

    cfg = ctx.cfg
    paths = expand_inputs(cfg.micrographs)
    if not paths:
        raise InputError(None, f"no micrographs match {' '.join(cfg.micrographs)}")
    ds, bad = ingest_micrographs(paths, ctx.store, pixel_size=cfg.pixel_size, voltage=cfg.voltage, cs=cfg.cs,
                                 amplitude_contrast=cfg.amplitude_contrast, resume=ctx.records)
    ctx.bad_inputs.extend(bad)
    return {"n_files": len(paths), "n_micrographs": int(ds.sizes["micrograph"]), "n_bad": len(bad), "bad": bad,
            "shape_px": list(ds["image"].shape[1:]), "pixel_size_A": float(ds.attrs["pixel_size"])}


def _micrographs(ctx: Context):
    from .model import open_group

    ds = open_group(ctx.store, "micrographs")
    return ds.isel(micrograph=np.flatnonzero(ds["valid"].values))


def _stage_preprocess(ctx: Context) -> dict[str, Any]:
    from .model import provenance, write_group
    from .preprocess import DEFAULT_STEPS, picking_binning, preprocess_graph

    cfg = ctx.cfg
    mics = _micrographs(ctx)
    params = dict(cfg.preprocess)
    steps = tuple(params.pop("steps", DEFAULT_STEPS))
    binning = params.setdefault("binning", picking_binning(ctx.pixel_size, cfg.diameter))
    pre = preprocess_graph(mics["image"].data, ctx.pixel_size, cfg.diameter, steps, **params)
    import xarray as xr

    ds = xr.Dataset({"image": (("micrograph", "yp", "xp"), pre)}, coords={"micrograph": mics["micrograph"].values},
                    attrs={**mics.attrs, **provenance("preprocess", {"steps": steps, **params}, "micrographs"),
                           "binning": float(binning), "pixel_size": ctx.pixel_size * float(binning)})
    write_group(ds, ctx.store, "preprocessed", resume=ctx.records, label="preprocess")
    return {"steps": list(steps), "binning": float(binning), "shape_px": list(pre.shape[1:])}


def _stage_ctf(ctx: Context) -> dict[str, Any]:
    """Per-micrograph CTF estimation; micrographs whose Thon rings cannot show below Nyquist at
    this pixel size are flagged (their particles are then reconstructed without CTF correction,
    which only changes amplitudes when there are no CTF zeros below Nyquist)."""
    from .ctf_estimate import CTF_COLUMNS, ctf_graph, ctf_table, thon_ring_count
    from .runtime import compute

    cfg = ctx.cfg
    mics = _micrographs(ctx)
    names = [str(m) for m in mics["micrograph"].values]
    params = dict(cfg.ctf)
    (vals,) = compute(ctf_graph(mics["image"].data, ctx.pixel_size, cfg.voltage, cfg.cs, cfg.amplitude_contrast,
                                **params), label="CTF estimation")
    table = ctf_table(vals, names)
    nyq = 2 * ctx.pixel_size
    mean_def = (table["rlnDefocusU"] + table["rlnDefocusV"]) / 2
    rings = [thon_ring_count(d, 50.0, nyq, cfg.voltage, cfg.cs, cfg.amplitude_contrast) if np.isfinite(d) else 0
             for d in mean_def]
    table["cdThonRings"] = rings
    # a fit pinned at either end of the searched defocus range found no Thon rings of its own
    # (e.g. none below Nyquist): its defocus is the search's boundary, not a measurement
    dmin, dmax = params.get("defocus_range", (3000.0, 50000.0))
    margin = 0.02 * (dmax - dmin)
    at_edge = ((mean_def <= dmin + margin) | (mean_def >= dmax - margin)).to_numpy()
    table["cdCtfAtSearchLimit"] = at_edge.astype(int)
    usable = (np.asarray(rings) >= 2) & np.isfinite(mean_def.to_numpy()) & ~at_edge
    if len(table) and at_edge.mean() >= 0.5:
        # most micrographs found nothing inside the search range: the dataset's Thon rings are
        # not measurable (e.g. beyond Nyquist), and the odd fit inside the range is chance
        usable[:] = False
    table["cdCtfUsable"] = usable
    out = ctx.out / "ctf"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "ctf.csv", index=False)
    result: dict[str, Any] = {
        "n_micrographs": len(table), "n_usable": int(table["cdCtfUsable"].sum()),
        "defocus_median_A": float(np.nanmedian(mean_def)) if len(table) else None,
        "fit_resolution_median_A": float(np.nanmedian(table["rlnCtfMaxResolution"])) if len(table) else None,
        "csv": str(out / "ctf.csv")}
    result["n_at_search_limit"] = int(at_edge.sum())
    if result["n_usable"] < len(table):
        result["warning"] = (f"{len(table) - result['n_usable']} micrograph(s) show fewer than 2 CTF zeros below "
                             f"Nyquist ({nyq:.1f} Å) at their estimated defocus, or their fit sits at the limit "
                             f"of the defocus search ({dmin:.0f}–{dmax:.0f} Å): their defocus is not measurable "
                             "and their particles are reconstructed without CTF correction")
        log.warning(result["warning"])
    if cfg.truth:
        from .evaluate import evaluate_ctf, load_truth

        result["truth"] = evaluate_ctf(table.set_index("rlnMicrographName")[list(CTF_COLUMNS)], load_truth(cfg.truth))
    return result


def _ctf_table(ctx: Context) -> pd.DataFrame | None:
    path = ctx.out / "ctf" / "ctf.csv"
    if "ctf" not in ctx.results or not path.exists():
        return None
    return pd.read_csv(path)


def _diameter_px(ctx: Context) -> float:
    return float(ctx.cfg.diameter) / ctx.pixel_size


def _preprocessed(ctx: Context, names: list[str]):
    """The preprocessed micrographs that the preprocess stage stored (``preprocessed`` group,
    picking scale, possibly binned), as a lazy ``(n, ny', nx')`` dask array in the order of
    ``names``."""
    from .model import open_group

    try:
        pre = open_group(ctx.store, "preprocessed")
    except (FileNotFoundError, KeyError, ValueError, OSError):
        raise CryodaskError(f"{ctx.store}: no preprocessed micrographs; picking reads them from the "
                            "preprocess stage, run it first") from None
    stored = [str(m) for m in pre["micrograph"].values]
    if stored == names:
        return pre["image"].data
    where = {m: i for i, m in enumerate(stored)}
    missing = [m for m in names if m not in where]
    if missing:
        raise CryodaskError(f"{ctx.store}: no preprocessed micrograph for {missing[0]} "
                            f"({len(missing)} missing); re-run the preprocess stage")
    return pre["image"].data[[where[m] for m in names]]


def _stage_pick(ctx: Context) -> dict[str, Any]:
    """Picking on the micrographs that the preprocess stage stored (its settings apply; they
    are read, not recomputed); coordinates in pixels of the original micrographs."""
    from .pick import pick_graph, write_picks
    from .runtime import compute

    cfg = ctx.cfg
    mics = _micrographs(ctx)
    params = dict(cfg.pick)
    method = params.pop("method", "ibc")
    names = [str(m) for m in mics["micrograph"].values]
    paths = [str(p) for p in mics["path"].values]
    graph = pick_graph(mics["image"].data, names, ctx.pixel_size, cfg.diameter, method=method,
                       pick_params=params.get("ibc"), train_params={"seed": cfg.seed, **params.get("deep", {})},
                       preprocessed=_preprocessed(ctx, names))
    model = graph.pop("__model__", None)
    results = compute(*graph.values(), *([model] if model is not None else []), label=f"pick ({method})")
    out = ctx.out / "picks"
    frames = dict(zip(names, results[:len(names)]))
    attrs = {k: v for k, v in mics.attrs.items() if k in ("pixel_size", "voltage", "cs", "amplitude_contrast")}
    table, no_picks = write_picks(out, frames, attrs, dict(zip(names, paths)))
    result: dict[str, Any] = {"method": method, "n_picks": len(table),
                              "per_micrograph": {n: int(len(d)) for n, d in zip(names, results[:len(names)])},
                              "views": {str(k): int(v) for k, v in table["cdViewClass"].value_counts().items()},
                              "star": str(out / "particles.star"), "micrographs_without_picks": no_picks}
    if model is not None:
        from .pick_deep import save_model

        save_model(results[-1], out / "picker_weights.pt")
        result["weights"] = str(out / "picker_weights.pt")
    if cfg.truth:
        from .evaluate import evaluate_picking, load_truth

        table["mic"] = table["rlnMicrographName"].map(lambda s: Path(str(s)).stem)
        truth = load_truth(cfg.truth)
        result["truth"] = evaluate_picking(table, truth[truth["mic"].isin(names)], 0.25 * _diameter_px(ctx))
    return result


def _read_picks(ctx: Context) -> pd.DataFrame:
    from .io.star import read_particles
    from .model import table_to_frame

    t = table_to_frame(read_particles(ctx.out / "picks" / "particles.star"))
    t["rlnMicrographName"] = t["rlnMicrographName"].map(lambda s: Path(str(s)).stem)
    return t


def _stage_extract(ctx: Context) -> dict[str, Any]:
    from .extract import box_size, extract_with_preprocessed
    from .model import open_group, write_group

    cfg = ctx.cfg
    params = dict(cfg.extract)
    box = int(params.get("box") or box_size(_diameter_px(ctx), params.get("factor", 1.5)))
    picks = _read_picks(ctx)
    ctf = _ctf_table(ctx)
    if ctf is not None:  # per-particle CTF from its micrograph's estimate
        ctf = ctf[ctf["cdCtfUsable"].astype(bool)].drop(columns=["cdThonRings", "cdCtfUsable", "cdCtfAtSearchLimit"],
                                                       errors="ignore")
        picks = picks.merge(ctf, on="rlnMicrographName", how="left")
        if picks["rlnDefocusU"].isna().any():  # some micrographs without a usable fit
            if picks["rlnDefocusU"].isna().all():
                picks = picks.drop(columns=[c for c in ctf.columns if c != "rlnMicrographName"])
            else:
                picks = picks[picks["rlnDefocusU"].notna()]
    mics = _micrographs(ctx)
    # the preprocessed version of every kept particle, cut from the preprocessed micrograph at
    # the picking scale around the same centre and resampled to the same box
    pre = open_group(ctx.store, "preprocessed")
    ds, dropped = extract_with_preprocessed(mics, pre["image"].data, float(pre.attrs.get("binning", 1.0)), picks, box,
                                            invert=params.get("invert", True), edge=params.get("edge", "drop"))
    res = write_group(ds, ctx.store, "particles", resume=ctx.records, label="extract")
    return {"box_px": box, "n_particles": int(ds.sizes["particle"]), "n_dropped_edge": int(len(dropped)),
            "chunks": res}


def _particles(ctx: Context):
    from .model import open_group

    return open_group(ctx.store, "particles")


def _stage_align2d(ctx: Context) -> dict[str, Any]:
    from .align2d import align2d_star

    cfg = ctx.cfg
    ds = _particles(ctx)
    ds = ds.drop_vars("preprocessed")
    params = dict(cfg.align2d)
    summary = align2d_star(ds, ctx.out / "align2d", view=params.get("view", "auto"),
                           variant=params.get("variant", "global-refine"), diameter_A=cfg.diameter)
    ctx.figures.append(("2D alignment: accepted and rejected particles with their perfect masks",
                        "align2d/align2d_gallery.png"))
    return {k: v for k, v in summary.items() if not isinstance(v, (list,))}


def _selected_particles(ctx: Context):
    """The extracted particles that passed selection (align2d's cdSelected), lazily.

    ``refine: use_selection``: ``true`` / ``false``, or ``"auto"`` (default): the selection is
    used when it keeps at least ``min_selected_fraction`` (default 0.5) of the particles and at
    least 100 of them. The perfect masks model round and rectangular particles; when most
    particles fail them the particle's shape does not fit that model (an irregular particle like a
    ribosome) rather than most picks being bad, and all particles are refined (logged).
    """
    from .io.star import read_particles

    ds = _particles(ctx)
    aligned = ctx.out / "align2d" / "particles_aligned.star"
    params = ctx.cfg.refine
    use = params.get("use_selection", "auto")
    ctx.selection_info = {"policy": str(use), "n_extracted": int(ds.sizes["particle"]), "used": False}
    if use is False or "align2d" not in ctx.results or not aligned.exists():
        return ds
    sel = read_particles(aligned)["cdSelected"].values.astype(bool)
    frac = float(sel.mean()) if sel.size else 0.0
    ctx.selection_info.update(n_selected=int(sel.sum()), fraction=round(frac, 3))
    if use is True or (frac >= float(params.get("min_selected_fraction", 0.5)) and sel.sum() >= 100):
        ctx.selection_info["used"] = True
        return ds.isel(particle=np.flatnonzero(sel))
    log.warning("refine: 2D selection kept only %d of %d particles (%.0f %%): refining all of them (set "
                "refine: {use_selection: true} to refine the selected ones only)", sel.sum(), sel.size, 100 * frac)
    return ds


def _refine_settings(params: dict[str, Any], diameter_px: float | None = None):
    """RefineSettings from the run's ``refine:`` section: ``fast: true`` (the demo's setting) and
    any RefineSettings field by name (e.g. ``max_iterations: 6``).

    Picked particles are off-centre by the picker's centring error (measured on simulations: a
    median of 1.7 px for apoferritin, 5.4 px for the ribosome, whose projected centroid moves with
    the view; a quarter of the ribosome's picks are more than 7.5 px = 15 % of its diameter off),
    so refine first centres the picks on their rotational average (``RefineSettings.precentre``;
    ribosome: median error 5.4 → 2.2 px), and unless set, the first global search covers shifts
    up to 15 % of the particle diameter (at least the RefineSettings default) around them."""
    from dataclasses import fields as dc_fields, replace

    from .refine import RefineSettings

    base = RefineSettings.fast() if params.get("fast") else RefineSettings()
    names = {f.name for f in dc_fields(RefineSettings)}
    unknown = sorted(set(params) - names - {"fast", "initial", "use_selection", "min_selected_fraction", "box",
                                            "ctf"})
    if unknown:
        raise InputError(None, f"unknown refine setting(s): {', '.join(unknown)}")
    kw = {k: v for k, v in params.items() if k in names}
    if "global_max_shift" not in kw and diameter_px:
        kw["global_max_shift"] = max(base.global_max_shift, round(0.15 * diameter_px, 1))
    return replace(base, **kw)


def _stage_refine(ctx: Context) -> dict[str, Any]:
    """Orientation determination and gold-standard refinement of the selected particles from no
    user-supplied model (:func:`cryodask.refine.refine_particles`); writes ``OUT/map.mrc``,
    ``half1.mrc``, ``half2.mrc``, ``fsc.csv``, ``fsc.png``, ``angular_distribution.png``,
    ``initial_model.mrc``, ``particles.mrcs`` + ``particles.star`` (RELION can reconstruct from
    it inside ``OUT``) and ``refine.json``."""
    from .model import table_to_frame
    from .refine import refine_particles, write_refinement_outputs
    from .runtime import compute

    cfg = ctx.cfg
    params = dict(cfg.refine)
    ds = _selected_particles(ctx)
    table = table_to_frame(ds)
    (images,) = compute(ds["image"].data, label="load particles")
    images = np.asarray(images, np.float32)
    apix = ctx.pixel_size
    box0 = images.shape[-1]
    if params.get("box") and int(params["box"]) < box0:  # refine binned particles (Fourier crop)
        images = fourier_crop_images(images, int(params["box"]))
        apix = ctx.pixel_size * box0 / images.shape[-1]
        log.info("refine: particles Fourier-cropped from %d to %d px (%.3f -> %.3f Å/px)", box0,
                 images.shape[-1], ctx.pixel_size, apix)
    settings = _refine_settings(params, float(cfg.diameter) / apix)
    optics = _Optics(cfg.voltage, cfg.cs, cfg.amplitude_contrast)
    if params.get("ctf", True) is False:  # the user distrusts the CTF estimates: no CTF correction
        table = table.drop(columns=[c for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle") if c in table])
        log.warning("refine: CTF correction switched off (refine: {ctf: false})")
    elif "rlnDefocusU" not in table:
        log.warning("refine: no usable CTF estimate for these particles: refining without CTF correction")
    result = refine_particles(images, table, apix, optics, symmetry=cfg.symmetry,
                              diameter=cfg.diameter, seed=cfg.seed, initial=params.get("initial", "auto"),
                              settings=settings, log=lambda m: log.info("refine: %s", m))
    write_refinement_outputs(ctx.out, result, images, apix,
                             {"voltage": cfg.voltage, "cs": cfg.cs, "amplitude_contrast": cfg.amplitude_contrast})
    ctx.figures += [("gold-standard FSC of the half maps", "fsc.png"),
                    ("angular distribution of the refined particles", "angular_distribution.png")]
    init = result["initial"]
    init_summary = {k: init[k] for k in ("kind", "start", "chosen", "chosen_start", "restarts", "recentred_px",
                                          "diameter_A", "width_A", "height_A", "seconds") if k in init}
    res = {k: round(float(v), 3) for k, v in result["resolution"].items()}
    out: dict[str, Any] = {
        "n_particles": int(len(table)), "box_px": int(images.shape[-1]), "pixel_size_A": apix,
        "extracted_box_px": int(box0), "selection": getattr(ctx, "selection_info", None),
        "symmetry": cfg.symmetry,
        "ctf_corrected": "rlnDefocusU" in table, "fast": bool(params.get("fast", False)),
        "initial_model": init_summary, "precentre": result.get("precentre"),
        "global_max_shift_px": settings.global_max_shift,
        "resolution_half_maps_A": res,
        "iterations": len(result.get("history", [])), "final_iteration": result.get("final_iteration"),
        "defocus_refinement": [h["defocus_refinement"] for h in result.get("history", [])
                               if "defocus_refinement" in h],
        "seconds": result.get("seconds"),
        "map": str(ctx.out / "map.mrc"), "star": str(ctx.out / "particles.star")}
    log.info("refine: %d particles, initial model %s, half-map FSC0.143 %.2f Å (FSC0.5 %.2f Å)",
             len(table), init_summary.get("kind"), res["fsc0.143"], res["fsc0.5"])
    if cfg.truth:
        out["truth"] = _evaluate_map_truth(ctx, result, images, table, apix)
        ctx.figures.append(("FSC against the truth volume (refined and known-pose maps)", "truth/fsc_truth.png"))
    return out


@dataclass
class _Optics:
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1


def _box_to(vol: np.ndarray, n: int) -> np.ndarray:
    """Centre-crop or zero-pad a cubic volume to (n, n, n) in real space (same voxel size;
    centre voxel N//2 stays at n//2)."""
    m = vol.shape[0]
    if m == n:
        return np.asarray(vol, np.float32)
    out = np.zeros((n, n, n), np.float32)
    lo_s, lo_d = max(0, m // 2 - n // 2), max(0, n // 2 - m // 2)
    k = min(m, n)
    out[lo_d:lo_d + k, lo_d:lo_d + k, lo_d:lo_d + k] = vol[lo_s:lo_s + k, lo_s:lo_s + k, lo_s:lo_s + k]
    return out


def fourier_crop_images(images: np.ndarray, n: int) -> np.ndarray:
    """Bin particle images (b, N, N) to (b, n, n) by cropping their centred Fourier transform
    (pixel N//2 stays the centre, n//2; the pixel size grows by N/n; densities keep their scale)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images, np.float32))
    m = x.shape[-1]
    f = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(x, dim=(-2, -1))), dim=(-2, -1))
    lo = m // 2 - n // 2
    f = f[..., lo:lo + n, lo:lo + n]
    y = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1))), dim=(-2, -1)).real
    return (y * (n * n) / (m * m)).numpy().astype(np.float32)


def _evaluate_map_truth(ctx: Context, result: dict, images: np.ndarray, table: pd.DataFrame,
                        apix: float | None = None) -> dict[str, Any]:
    """FSC of the refined map vs the truth volume (after superposition), the known-pose
    reconstruction of the same particles (true poses; the CTF the refinement used, and the true
    CTF), and the honesty of the half-map resolution. Writes ``OUT/truth/`` (truth volume in the
    map's box, the superposed refined map, the known-pose map, FSC CSV/PNG) so that any FSC
    tool (e.g. ``checks/fsc.py truth/map_aligned.mrc truth/truth_volume.mrc``) can verify."""
    from .evaluate import evaluate_map, load_truth, truth_pose_table
    from .fsc import write_fsc_csv, write_fsc_png
    from .geometry import euler_to_matrix
    from .io.mrc import read_map, write_map
    from .reconstruct import accumulate, gold_standard, random_subsets

    cfg = ctx.cfg
    apix = float(apix or ctx.pixel_size)  # the refined map's voxel size (particles may be binned)
    truth_vol, truth_apix = read_map(Path(cfg.truth) / "truth_volume.mrc")
    n = result["map"].shape[0]
    if truth_apix and abs(float(truth_apix) - apix) > 1e-3 * apix:
        # same field of view in real space, then Fourier-crop to the map's sampling
        from .map_align import fourier_crop, fourier_pad

        m = int(round(n * apix / float(truth_apix)))
        truth_vol = _box_to(truth_vol, m)
        truth_vol = fourier_crop(truth_vol, n) if m > n else fourier_pad(truth_vol, n)
    truth_vol = _box_to(truth_vol, n)
    ev = evaluate_map(result["map"], truth_vol, apix, symmetry=cfg.symmetry)
    out: dict[str, Any] = {k: v for k, v in ev.items() if k not in ("curve", "aligned")}
    half = float(result["resolution"]["fsc0.143"])
    out["half_map_0.143_A"] = half
    out["half_map_0.143_vs_truth_0.5_gap"] = abs(half - ev["fsc_vs_truth_0.5_A"]) / ev["fsc_vs_truth_0.5_A"]
    # known poses (truth) for the same particles: the limit the data set
    t = table.reset_index(drop=True).copy()
    t["mic"] = t["rlnMicrographName"].map(lambda s: Path(str(s)).stem)
    truth = load_truth(cfg.truth)
    poses = truth_pose_table(t, truth, 0.25 * _diameter_px(ctx), ctx.pixel_size)
    idx = poses.index.to_numpy()
    rots = euler_to_matrix(poses["rlnAngleRot"], poses["rlnAngleTilt"], poses["rlnAnglePsi"])
    origins = poses[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / apix
    subsets = random_subsets(len(idx), cfg.seed)
    optics = _Optics(cfg.voltage, cfg.cs, cfg.amplitude_contrast)
    ctf_sets = {"true_ctf": poses[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()}
    dcols = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]
    refined = result.get("table")
    if "rlnDefocusU" in t and refined is not None and "rlnDefocusU" in refined and len(refined) == len(t):
        # the known-pose twin uses the CTF the final map used (defocus refined against the half
        # maps); the spectrum estimate the refinement started from is reported beside it
        ctf_sets["refine_ctf"] = refined.reset_index(drop=True).loc[idx, dcols].to_numpy(float)
        ctf_sets["input_ctf"] = t.loc[idx, dcols].to_numpy(float)
    elif "rlnDefocusU" in t:
        ctf_sets["refine_ctf"] = t.loc[idx, dcols].to_numpy(float)
    else:
        ctf_sets["refine_ctf"] = None  # the refinement had no CTF: neither has its known-pose twin
    curves = {"refined (superposed) vs truth": ev["curve"]}
    tdir = ctx.out / "truth"
    tdir.mkdir(parents=True, exist_ok=True)
    for name, defocus in ctf_sets.items():
        accs = [accumulate(images[idx][subsets == h], rots[subsets == h], origins[subsets == h],
                           None if defocus is None else defocus[subsets == h], pixel_size=apix, optics=optics,
                           symmetry=cfg.symmetry) for h in (1, 2)]
        known = gold_standard(accs[0], accs[1], apix)
        kev = evaluate_map(known.map, truth_vol, apix, symmetry=cfg.symmetry, align=False)
        tag = {"refine_ctf": "", "true_ctf": "_true_ctf", "input_ctf": "_input_ctf"}[name]
        out[f"known_pose{tag}_fsc_vs_truth_0.143_A"] = kev["fsc_vs_truth_0.143_A"]
        out[f"known_pose{tag}_fsc_vs_truth_0.5_A"] = kev["fsc_vs_truth_0.5_A"]
        curves[f"known poses ({name.replace('_', ' ')}) vs truth"] = kev["curve"]
        write_map(tdir / f"known_pose_{name}.mrc", known.map, apix)
    out["ratio_to_known_pose_0.143"] = ev["fsc_vs_truth_0.143_A"] / out["known_pose_fsc_vs_truth_0.143_A"]
    out["ratio_to_known_pose_true_ctf_0.143"] = (ev["fsc_vs_truth_0.143_A"]
                                                  / out["known_pose_true_ctf_fsc_vs_truth_0.143_A"])
    out["n_matched_to_truth"] = int(len(idx))
    write_map(tdir / "truth_volume.mrc", truth_vol, apix)
    write_map(tdir / "map_aligned.mrc", ev["aligned"], apix)
    write_fsc_csv(tdir / "fsc_truth.csv", curves, n, apix)
    write_fsc_png(tdir / "fsc_truth.png", curves, n, apix,
                  title=f"vs truth: refined {ev['fsc_vs_truth_0.143_A']:.2f} Å, known poses "
                        f"{out['known_pose_fsc_vs_truth_0.143_A']:.2f} Å (0.143)")
    log.info("refine vs truth: FSC0.143 %.2f Å (known poses %.2f Å, ratio %.3f); half-map 0.143 %.2f Å vs "
             "truth 0.5 %.2f Å (gap %.1f %%)", ev["fsc_vs_truth_0.143_A"], out["known_pose_fsc_vs_truth_0.143_A"],
             out["ratio_to_known_pose_0.143"], half, ev["fsc_vs_truth_0.5_A"],
             100 * out["half_map_0.143_vs_truth_0.5_gap"])
    return out


def _stage_localized(ctx: Context) -> dict[str, Any]:
    """The paper's localized reconstruction (pairwise structure from motion, averaged) on the
    selected 2D-aligned particles (phase-flipped, low-passed: align2d's ``aligned_preprocessed``);
    with the same pairs' random-depth controls; measured against the truth volume when the run
    has one. Writes ``OUT/localized/localized_map.mrc`` (+ controls) and ``localized.json``."""
    import dask
    import xarray as xr

    from .io.mrc import write_map
    from .localized import envelope_map, localized_graph

    params = dict(ctx.cfg.localized)
    params.pop("enabled", None)
    store = ctx.out / "align2d" / "particles.zarr"
    if not store.exists():
        raise CryodaskError(f"{store}: no 2D-aligned particles; the localized stage needs align2d first")
    ds = xr.open_zarr(store, group="align2d", consolidated=False)
    keep = np.flatnonzero(ds["cdSelected"].values.astype(bool))
    limit = params.pop("max_particles", None)
    if limit:
        keep = keep[: int(limit)]
    images = ds["aligned_preprocessed"].data[keep]
    box = images.shape[-1]
    controls = bool(params.pop("controls", True))
    radius = 0.5 * ctx.cfg.diameter / ctx.pixel_size
    g = localized_graph(images, int(params.pop("chain_size", 50)), controls=controls, control_radius=radius,
                        seed=ctx.cfg.seed, **params)
    todo = {"map": g["map"], "n_ok": g["n_pairs_ok"]}
    if controls:
        todo["controls"], todo["mean"] = g["controls"], images.mean(axis=0)
    t0 = time.perf_counter()
    res = dask.compute(todo)[0]
    out_dir = ctx.out / "localized"
    out_dir.mkdir(exist_ok=True)
    maps = {"localized": res["map"]}
    if controls:
        maps.update({f"control_{k}": v for k, v in res["controls"].items()})
        maps["control_average_envelope"] = envelope_map(res["mean"], radius)
    paths = {}
    for name, vol in maps.items():
        paths[name] = out_dir / ("localized_map.mrc" if name == "localized" else f"{name}.mrc")
        write_map(paths[name], np.asarray(vol, np.float32), ctx.pixel_size)
    out: dict[str, Any] = {"n_particles": int(len(keep)), "box": int(box), "n_pairs_ok": int(res["n_ok"]),
                           "map": str(paths["localized"]), "seconds_compute": round(time.perf_counter() - t0, 2)}
    if ctx.cfg.truth:
        from .evaluate import evaluate_map
        from .io.mrc import read_map

        truth_vol, _ = read_map(Path(ctx.cfg.truth) / "truth_volume.mrc")
        truth_vol = _box_to(truth_vol, box)  # same voxel size: crop/pad in real space, as for the refined map
        out["truth"] = {}
        for name, vol in maps.items():
            ev = evaluate_map(np.asarray(vol, np.float32), truth_vol, ctx.pixel_size, symmetry=ctx.cfg.symmetry)
            out["truth"][name] = {k: v for k, v in ev.items() if k not in ("curve", "aligned")}
    (out_dir / "localized.json").write_text(json.dumps(out, indent=2, default=str))
    return out


STAGES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "ingest": _stage_ingest,
    "preprocess": _stage_preprocess,
    "ctf": _stage_ctf,
    "pick": _stage_pick,
    "extract": _stage_extract,
    "align2d": _stage_align2d,
    "localized": _stage_localized,
    "refine": _stage_refine,
}
ORDER = ["ingest", "preprocess", "ctf", "pick", "extract", "align2d", "localized", "refine"]
#: the stages whose outputs each stage reads: a stage's completion record holds a hash of its
#: parameters and of these stages' hashes, so a changed parameter re-runs exactly that stage
#: and the ones that (transitively) read its output. Stages not listed depend on all earlier ones.
DEPENDS = {"ingest": (), "preprocess": ("ingest",), "ctf": ("ingest",), "pick": ("ingest", "preprocess"),
           "extract": ("ingest", "preprocess", "ctf", "pick"), "align2d": ("extract",),
           "localized": ("extract", "align2d"), "refine": ("extract", "align2d")}


def _stage_params(cfg: RunConfig, name: str) -> dict[str, Any]:
    common = {"pixel_size": cfg.pixel_size, "diameter": cfg.diameter, "seed": cfg.seed}
    if name == "ingest":
        return {"micrographs": cfg.micrographs, "pixel_size": cfg.pixel_size, "voltage": cfg.voltage, "cs": cfg.cs,
                "amplitude_contrast": cfg.amplitude_contrast}
    if name == "refine":
        return {**common, "symmetry": cfg.symmetry, **getattr(cfg, name, {})}
    return {**common, **(getattr(cfg, name, {}) or {})}


def _read_record(path: Path) -> dict[str, Any] | None:
    """A stage's completion record, or None if absent or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """Write a completion record atomically (a kill mid-write leaves the old one or none)."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, default=str))
    os.replace(tmp, path)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: Dask priority of a stage's computes when it overlaps others (default 0; higher runs first).
#: CTF estimation is needed only by extract, so it runs beside preprocess and pick and fills
#: the workers' idle moments (each stage's last tasks, picking's dataset-wide step, the driver's
#: serial work between computes) instead of holding them up.
PRIORITY = {"ctf": -1}


def _run_stages(todo: list[str], wanted: list[str], run_stage: Callable[[str], None]) -> None:
    """Run the stages in ``todo``, each as soon as the stages it reads (:data:`DEPENDS`, among
    ``wanted``) are done: independent stages (e.g. ``ctf`` beside ``preprocess`` → ``pick``) run
    at the same time, in threads that submit to the same Dask client. After a failure no new
    stage starts; those running finish (and write their completion records) and the first error
    is raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from .runtime import inherit_scope, scope_state

    if len(todo) <= 1:
        for name in todo:
            run_stage(name)
        return
    state = scope_state()

    def in_thread(name: str) -> None:
        with inherit_scope(state, PRIORITY.get(name, 0) + state["priority"]):
            run_stage(name)

    def needs(name: str) -> set[str]:
        deps = DEPENDS.get(name, tuple(wanted[:wanted.index(name)]))
        return {d for d in deps if d in todo}

    pending, done, running, error = list(todo), set(), {}, None
    pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="cryodask-stage")
    try:
        while pending or running:
            if error is None:
                for name in [n for n in pending if needs(n) <= done]:
                    pending.remove(name)
                    running[pool.submit(in_thread, name)] = name
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                name = running.pop(fut)
                exc = fut.exception()
                if exc is None:
                    done.add(name)
                elif error is None:
                    error = exc
    finally:
        # Ctrl-C: return at once; the client's shutdown then ends the stages still computing
        pool.shutdown(wait=False, cancel_futures=True)
    if error is not None:
        raise error


def run_pipeline(cfg: RunConfig, cluster_cfg=None) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the report dict (also written to OUT/report.json)."""
    from .cli import _maybe_client
    from .report import write_report
    from .runtime import setup_logging, stage_timer

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stages").mkdir(exist_ok=True)
    setup_logging(out / "run.log")
    ctx = Context(cfg)
    report: dict[str, Any] = {"config": asdict(cfg), "stages": {}, "timings_s": {}}
    wanted = [s for s in ORDER if s in STAGES and (cfg.stages is None or s in cfg.stages)]
    if cfg.stages is None and not cfg.localized.get("enabled", False):
        wanted.remove("localized")  # slow and envelope-level (see README): run it when asked for
    t0 = time.perf_counter()
    hashes: dict[str, str] = {}
    todo: list[str] = []
    for name in wanted:
        deps = DEPENDS.get(name, tuple(hashes))
        hashes[name] = _hash([name, _stage_params(cfg, name), [hashes[d] for d in deps if d in hashes]])
        rec_path = out / "stages" / f"{name}.json"
        rec = _read_record(rec_path)
        if rec is not None and rec.get("hash") == hashes[name]:
            log.info("stage %s: up to date (completion record %s), not recomputed", name, rec_path)
            ctx.results[name] = rec["result"]
            report["stages"][name] = {**rec["result"], "resumed": True}
            report["timings_s"][name] = rec.get("seconds", 0.0)
            continue
        if rec is not None:
            log.info("stage %s: parameters or upstream stages changed since its completion record, re-running", name)
        todo.append(name)

    def run_stage(name: str) -> None:
        with stage_timer(report["timings_s"], name):
            result = STAGES[name](ctx)
        ctx.results[name] = result
        report["stages"][name] = result
        _write_record(out / "stages" / f"{name}.json",
                      {"hash": hashes[name], "result": result, "seconds": report["timings_s"][name]["seconds"]})

    with _maybe_client(cluster_cfg):
        _run_stages(todo, wanted, run_stage)
    # stages that overlapped finish in any order: report them in pipeline order
    report["stages"] = {k: report["stages"][k] for k in ORDER if k in report["stages"]}
    report["timings_s"] = {k: (v["seconds"] if isinstance(v, dict) else v) for k, v in
                           sorted(report["timings_s"].items(), key=lambda kv: ORDER.index(kv[0]))}
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    report["bad_inputs"] = ctx.bad_inputs
    report["summary"] = ", ".join(f"{k}: ok" for k in report["stages"])
    write_report(out, report, ctx.figures)
    return report
