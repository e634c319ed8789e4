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
    table["cdCtfUsable"] = (np.asarray(rings) >= 2) & np.isfinite(mean_def.to_numpy())
    out = ctx.out / "ctf"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "ctf.csv", index=False)
    result: dict[str, Any] = {
        "n_micrographs": len(table), "n_usable": int(table["cdCtfUsable"].sum()),
        "defocus_median_A": float(np.nanmedian(mean_def)) if len(table) else None,
        "fit_resolution_median_A": float(np.nanmedian(table["rlnCtfMaxResolution"])) if len(table) else None,
        "csv": str(out / "ctf.csv")}
    if result["n_usable"] < len(table):
        result["warning"] = (f"{len(table) - result['n_usable']} micrograph(s) show fewer than 2 CTF zeros below "
                             f"Nyquist ({nyq:.1f} Å) at their estimated defocus: their defocus is not measurable "
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


def _stage_pick(ctx: Context) -> dict[str, Any]:
    from .io.star import write_coordinates, write_particles
    from .model import particle_dataset
    from .pick import pick_graph
    from .runtime import compute

    cfg = ctx.cfg
    mics = _micrographs(ctx)
    params = dict(cfg.pick)
    method = params.pop("method", "ibc")
    names = [str(m) for m in mics["micrograph"].values]
    paths = [str(p) for p in mics["path"].values]
    graph = pick_graph(mics["image"].data, names, ctx.pixel_size, cfg.diameter, method=method,
                       pick_params=params.get("ibc"), train_params={"seed": cfg.seed, **params.get("deep", {})})
    model = graph.pop("__model__", None)
    results = compute(*graph.values(), *([model] if model is not None else []), label=f"pick ({method})")
    frames = []
    out = ctx.out / "picks"
    (out / "coordinates").mkdir(parents=True, exist_ok=True)
    for name, path, df in zip(names, paths, results[:len(names)]):
        cls = np.where(df["view"].astype(str) == "side", 2, 1)
        write_coordinates(out / "coordinates" / f"{name}.star", df["x"].to_numpy(float), df["y"].to_numpy(float),
                          extra={"rlnAutopickFigureOfMerit": df["score"].to_numpy(float), "rlnClassNumber": cls})
        frames.append(pd.DataFrame({"rlnMicrographName": path, "rlnCoordinateX": df["x"].to_numpy(float),
                                    "rlnCoordinateY": df["y"].to_numpy(float),
                                    "rlnAutopickFigureOfMerit": df["score"].to_numpy(float),
                                    "rlnClassNumber": cls, "cdViewClass": df["view"].astype(str).to_numpy(object)}))
    table = pd.concat(frames, ignore_index=True)
    attrs = {k: v for k, v in mics.attrs.items() if k in ("pixel_size", "voltage", "cs", "amplitude_contrast")}
    write_particles(out / "particles.star", particle_dataset(None, table, attrs))
    result: dict[str, Any] = {"method": method, "n_picks": len(table),
                              "per_micrograph": {n: int(len(d)) for n, d in zip(names, results[:len(names)])},
                              "views": {str(k): int(v) for k, v in table["cdViewClass"].value_counts().items()},
                              "star": str(out / "particles.star")}
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
    import dask.array as da
    import xarray as xr

    from .extract import box_size, extract_graph
    from .model import open_group, write_group

    cfg = ctx.cfg
    params = dict(cfg.extract)
    box = int(params.get("box") or box_size(_diameter_px(ctx), params.get("factor", 1.5)))
    picks = _read_picks(ctx)
    ctf = _ctf_table(ctx)
    if ctf is not None:  # per-particle CTF from its micrograph's estimate
        ctf = ctf[ctf["cdCtfUsable"].astype(bool)].drop(columns=["cdThonRings", "cdCtfUsable"])
        picks = picks.merge(ctf, on="rlnMicrographName", how="left")
        if picks["rlnDefocusU"].isna().any():  # some micrographs without a usable fit
            if picks["rlnDefocusU"].isna().all():
                picks = picks.drop(columns=[c for c in ctf.columns if c != "rlnMicrographName"])
            else:
                picks = picks[picks["rlnDefocusU"].notna()]
    mics = _micrographs(ctx)
    ds, dropped = extract_graph(mics, picks, box, invert=params.get("invert", True), edge=params.get("edge", "drop"))
    # the preprocessed version of every kept particle, cut from the preprocessed micrograph at
    # the picking scale and resampled to the same box
    pre = open_group(ctx.store, "preprocessed")
    binning = float(pre.attrs.get("binning", 1.0))
    kept = pd.DataFrame({"rlnMicrographName": ds["rlnMicrographName"].values.astype(object),
                         "rlnCoordinateX": ds["rlnCoordinateX"].values / binning,
                         "rlnCoordinateY": ds["rlnCoordinateY"].values / binning})
    small = max(8, int(round(box / binning / 2)) * 2)
    pre_ds, _ = extract_graph(pre.rename({"yp": "y", "xp": "x"}), kept, small, invert=True, edge="pad")
    ds["preprocessed"] = (("particle", "y", "x"), pre_ds["image"].data.map_blocks(
        _resize_boxes, box, dtype=np.float32, chunks=(pre_ds["image"].data.chunks[0], (box,), (box,))))
    ds.attrs["box"] = box
    res = write_group(ds, ctx.store, "particles", resume=ctx.records, label="extract")
    return {"box_px": box, "n_particles": int(ds.sizes["particle"]), "n_dropped_edge": int(len(dropped)),
            "chunks": res}


def _resize_boxes(boxes: np.ndarray, box: int) -> np.ndarray:
    import torch

    t = torch.from_numpy(np.ascontiguousarray(boxes, np.float32))[:, None]
    return torch.nn.functional.interpolate(t, size=(box, box), mode="bilinear", align_corners=False)[:, 0].numpy()


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
    """The extracted particles that passed selection (align2d's cdSelected), lazily."""
    from .io.star import read_particles

    ds = _particles(ctx)
    aligned = ctx.out / "align2d" / "particles_aligned.star"
    if "align2d" in ctx.results and aligned.exists():
        sel = read_particles(aligned)["cdSelected"].values.astype(bool)
        if ctx.cfg.refine.get("use_selection", True) and sel.sum() >= 100:
            ds = ds.isel(particle=np.flatnonzero(sel))
    return ds


def _stage_refine(ctx: Context) -> dict[str, Any]:
    from .model import table_to_frame
    from .refine import RefineSettings, refine_particles, write_refinement_outputs

    cfg = ctx.cfg
    params = dict(cfg.refine)
    ds = _selected_particles(ctx)
    table = table_to_frame(ds)
    images = np.asarray(ds["image"].data.compute(), np.float32)
    settings = RefineSettings.fast() if params.get("fast") else RefineSettings()
    optics = {"voltage": cfg.voltage, "cs": cfg.cs, "amplitude_contrast": cfg.amplitude_contrast}
    truth = None
    result = refine_particles(images, table, ctx.pixel_size, _Optics(**optics), symmetry=cfg.symmetry,
                              diameter=cfg.diameter, seed=cfg.seed, initial=params.get("initial", "auto"),
                              settings=settings, log=lambda m: log.info("refine: %s", m), truth=truth)
    figures = write_refinement_outputs(ctx.out, result, images, ctx.pixel_size)
    ctx.figures += [("gold-standard FSC of the half maps", "fsc.png"),
                    ("angular distribution of the refined particles", "angular_distribution.png")]
    out = {"n_particles": int(len(table)), "symmetry": cfg.symmetry, "initial_model": result["initial"],
           "resolution_half_maps_A": {k: float(v) for k, v in result["resolution"].items()},
           "iterations": len(result.get("history", [])), "seconds": result.get("seconds")}
    if cfg.truth:
        out["truth"] = _evaluate_map_truth(ctx, result, images, table)
    return out


@dataclass
class _Optics:
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1


def _evaluate_map_truth(ctx: Context, result: dict, images: np.ndarray, table: pd.DataFrame) -> dict[str, Any]:
    """FSC of the refined map vs the truth volume (after superposition), the known-pose
    reconstruction of the same particles, and the honesty of the half-map resolution."""
    from .evaluate import evaluate_map, load_truth, truth_pose_table
    from .geometry import euler_to_matrix
    from .io.mrc import read_map
    from .reconstruct import accumulate, combine, gold_standard, random_subsets

    cfg = ctx.cfg
    truth_vol, _ = read_map(Path(cfg.truth) / "truth_volume.mrc")
    if truth_vol.shape != result["map"].shape:
        from .map_align import fourier_crop, fourier_pad

        n = result["map"].shape[0]
        truth_vol = fourier_crop(truth_vol, n) if truth_vol.shape[0] > n else fourier_pad(truth_vol, n)
    ev = evaluate_map(result["map"], truth_vol, ctx.pixel_size, symmetry=cfg.symmetry)
    out = {k: v for k, v in ev.items() if k not in ("curve", "aligned")}
    half = float(result["resolution"]["fsc0.143"])
    out["half_map_0.143_vs_truth_0.5_gap"] = abs(half - ev["fsc_vs_truth_0.5_A"]) / ev["fsc_vs_truth_0.5_A"]
    # known poses (truth) for the same particles: the limit the data set
    t = table.copy()
    t["mic"] = t["rlnMicrographName"].map(lambda s: Path(str(s)).stem)
    truth = load_truth(cfg.truth)
    poses = truth_pose_table(t, truth, 0.25 * _diameter_px(ctx), ctx.pixel_size)
    idx = poses.index.to_numpy()
    rots = euler_to_matrix(poses["rlnAngleRot"], poses["rlnAngleTilt"], poses["rlnAnglePsi"])
    origins = poses[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / ctx.pixel_size
    defocus = poses[["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]].to_numpy()
    subsets = random_subsets(len(idx), cfg.seed)
    optics = _Optics(cfg.voltage, cfg.cs, cfg.amplitude_contrast)
    accs = [accumulate(images[idx][subsets == h], rots[subsets == h], origins[subsets == h], defocus[subsets == h],
                       pixel_size=ctx.pixel_size, optics=optics, symmetry=cfg.symmetry) for h in (1, 2)]
    known = gold_standard(accs[0], accs[1], ctx.pixel_size)
    kev = evaluate_map(known.map, truth_vol, ctx.pixel_size, symmetry=cfg.symmetry, align=False)
    out["known_pose_fsc_vs_truth_0.143_A"] = kev["fsc_vs_truth_0.143_A"]
    out["known_pose_fsc_vs_truth_0.5_A"] = kev["fsc_vs_truth_0.5_A"]
    out["ratio_to_known_pose_0.143"] = ev["fsc_vs_truth_0.143_A"] / kev["fsc_vs_truth_0.143_A"]
    out["n_matched_to_truth"] = int(len(idx))
    return out


STAGES: dict[str, Callable[[Context], dict[str, Any]]] = {
    "ingest": _stage_ingest,
    "preprocess": _stage_preprocess,
    "ctf": _stage_ctf,
    "pick": _stage_pick,
    "extract": _stage_extract,
    "align2d": _stage_align2d,
    "refine": _stage_refine,
}
ORDER = ["ingest", "preprocess", "ctf", "pick", "extract", "align2d", "localized", "refine"]


def _stage_params(cfg: RunConfig, name: str) -> dict[str, Any]:
    common = {"pixel_size": cfg.pixel_size, "diameter": cfg.diameter, "seed": cfg.seed}
    if name == "ingest":
        return {"micrographs": cfg.micrographs, "pixel_size": cfg.pixel_size, "voltage": cfg.voltage, "cs": cfg.cs,
                "amplitude_contrast": cfg.amplitude_contrast}
    if name == "refine":
        return {**common, "symmetry": cfg.symmetry, **getattr(cfg, name, {})}
    return {**common, **(getattr(cfg, name, {}) or {})}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    t0 = time.perf_counter()
    upstream = ""
    with _maybe_client(cluster_cfg):
        for name in wanted:
            h = _hash([name, _stage_params(cfg, name), upstream])
            rec_path = out / "stages" / f"{name}.json"
            if rec_path.exists():
                rec = json.loads(rec_path.read_text())
                if rec.get("hash") == h:
                    log.info("stage %s: up to date (completion record %s), not recomputed", name, rec_path)
                    ctx.results[name] = rec["result"]
                    report["stages"][name] = {**rec["result"], "resumed": True}
                    report["timings_s"][name] = rec.get("seconds", 0.0)
                    upstream = h
                    continue
            with stage_timer(report["timings_s"], name) as t:
                result = STAGES[name](ctx)
            ctx.results[name] = result
            report["stages"][name] = result
            rec_path.write_text(json.dumps({"hash": h, "result": result,
                                            "seconds": report["timings_s"][name]["seconds"]}, default=str))
            upstream = h
    report["timings_s"] = {k: (v["seconds"] if isinstance(v, dict) else v) for k, v in report["timings_s"].items()}
    report["total_seconds"] = round(time.perf_counter() - t0, 2)
    report["bad_inputs"] = ctx.bad_inputs
    report["summary"] = ", ".join(f"{k}: ok" for k in report["stages"])
    write_report(out, report, ctx.figures)
    return report
