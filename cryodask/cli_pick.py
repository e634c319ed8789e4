"""Subcommands for Components 1–2 and extraction: ``preprocess``, ``pick``, ``extract``,
``evaluate-picks`` (each also runs inside ``cryodask run``).

Every command that reads micrographs ingests them first (:mod:`cryodask.ingest`): a file that
is unreadable, truncated, not 2-D, of the wrong size or with NaN/Inf pixels is reported on
stderr with the file and the problem, listed in ``OUT/skipped.json`` and skipped; the other
micrographs are processed. Results go under ``--out``; the input files are never modified.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["register", "read_coordinates", "coordinate_stem", "load_micrographs"]

_STEM_EXTS = (".star", ".mrcs", ".mrc", ".tiff", ".tif", ".png")
_STEM_SUFFIXES = ("_autopick", "_coords", "_pick", "_picks", "_manualpick")


def _client(args):
    from .cli import _cluster_config, _maybe_client

    return _maybe_client(_cluster_config(args))


def coordinate_stem(name: str) -> str:
    """Micrograph key of a file or micrograph name, as ``shared/checks/pick_f1.py`` forms it:
    the base name without a stack index (``12@``), image/STAR extension or picker suffix
    (``_autopick``, ``_coords``, ``_pick``, ``_picks``, ``_manualpick``)."""
    base = Path(str(name).split("@")[-1]).name
    for ext in _STEM_EXTS:
        if base.endswith(ext):
            base = base[: -len(ext)]
    for suffix in _STEM_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base


def _particle_block(path: Path) -> pd.DataFrame:
    from .errors import InputError
    from .io.star import read_star_blocks

    blocks = {k: v for k, v in read_star_blocks(path).items() if k != "optics"}
    for key in ("particles", "", "images"):
        if key in blocks:
            df = blocks[key]
            break
    else:
        df = max(blocks.values(), key=len) if blocks else pd.DataFrame()
    missing = [c for c in ("rlnCoordinateX", "rlnCoordinateY") if c not in df.columns]
    if missing and len(df):
        raise InputError(path, f"missing required column(s) {', '.join(missing)}")
    return df


def read_coordinates(path: str | Path) -> pd.DataFrame:
    """Picks from a STAR file with ``rlnMicrographName`` (e.g. ``particles.star``) or from a
    folder of per-micrograph coordinate STAR files (micrograph = file stem).

    Returns a DataFrame with every column of the file(s) plus ``mic`` (the micrograph key of
    :func:`coordinate_stem`); coordinates are ``rlnCoordinateX/Y`` in micrograph pixels. A file
    whose loop has no rows contributes no picks.
    """
    from .errors import InputError

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.star"))
        if not files:
            raise InputError(path, "no *.star coordinate files in this folder")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(path, "file not found")
    frames = []
    for f in files:
        df = _particle_block(f).copy()
        if not len(df):
            continue
        if "rlnMicrographName" not in df.columns:
            if not path.is_dir():
                raise InputError(f, "no rlnMicrographName column: pass a folder of per-micrograph coordinate "
                                    "files, or a STAR file naming the micrograph of every pick")
            df["rlnMicrographName"] = f.name
        df["mic"] = [coordinate_stem(m) for m in df["rlnMicrographName"].astype(str)]
        frames.append(df)
    if not frames:
        return pd.DataFrame({"rlnCoordinateX": pd.Series(dtype=float), "rlnCoordinateY": pd.Series(dtype=float),
                             "rlnMicrographName": pd.Series(dtype=object), "mic": pd.Series(dtype=object)})
    out = pd.concat(frames, ignore_index=True)
    out["rlnCoordinateX"] = out["rlnCoordinateX"].astype(float)
    out["rlnCoordinateY"] = out["rlnCoordinateY"].astype(float)
    return out


def load_micrographs(patterns, out: Path, pixel_size: float | None):
    """Ingest ``patterns`` (paths, globs or folders) into ``out/store.zarr``; the bad files are
    logged (warning: file and problem) and listed in ``out/skipped.json``. Returns ``(dataset_of_good_micrographs, bad)``."""
    from .errors import InputError
    from .ingest import expand_inputs, ingest_micrographs

    paths = expand_inputs(patterns)
    if not paths:
        raise InputError(None, f"no micrographs match {' '.join(map(str, patterns))}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        ds, bad = ingest_micrographs(paths, out / "store.zarr", pixel_size=pixel_size)
    except InputError as e:
        (out / "skipped.json").write_text(json.dumps([{"file": None, "reason": str(e)}], indent=1) + "\n")
        raise
    (out / "skipped.json").write_text(json.dumps(bad, indent=1) + "\n")
    return ds, bad


def _steps(text):
    if not text:
        return None
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _print(summary: dict) -> None:
    print(json.dumps(summary, default=str))


# --------------------------------------------------------------------------------------------
def cmd_preprocess(args) -> int:
    import dask
    import xarray as xr

    from .io.mrc import write_image
    from .model import provenance, write_group
    from .preprocess import DEFAULT_STEPS, picking_binning, preprocess_graph
    from .runtime import compute

    out = Path(args.out)
    with _client(args):
        mics, bad = load_micrographs(args.micrographs, out, args.pixel_size)
        apix = float(mics.attrs["pixel_size"])
        steps = _steps(args.steps) or DEFAULT_STEPS
        binning = picking_binning(apix, args.diameter) if args.binning is None else float(args.binning)
        pre = preprocess_graph(mics["image"].data, apix, args.diameter, steps, binning=binning)
        names = [str(m) for m in mics["micrograph"].values]
        ds = xr.Dataset({"image": (("micrograph", "yp", "xp"), pre)}, coords={"micrograph": names},
                        attrs={**mics.attrs, **provenance("preprocess", {"steps": list(steps), "binning": binning},
                                                          "micrographs"),
                               "binning": binning, "pixel_size": apix * binning, "original_pixel_size": apix})
        tasks = [write_group(ds, out / "store.zarr", "preprocessed", compute=False)]
        if not args.no_mrc:
            (out / "preprocessed").mkdir(parents=True, exist_ok=True)
            for name, blk in zip(names, pre.to_delayed().ravel()):
                tasks.append(dask.delayed(_write_mrc, pure=True)(write_image, out / "preprocessed" / f"{name}.mrc",
                                                                 blk, apix * binning))
        compute(*tasks, label="preprocess")
    _print({"n_micrographs": len(names), "n_skipped": len(bad), "steps": list(steps), "binning": binning,
            "shape_px": list(pre.shape[1:]), "pixel_size_A": apix * binning})
    print(f"-> {out}/store.zarr (groups micrographs = original, preprocessed)"
          + ("" if args.no_mrc else f", {out}/preprocessed/*.mrc"), file=sys.stderr)
    return 0


def _write_mrc(writer, path, block, pixel_size):
    writer(path, np.asarray(block)[0], pixel_size)
    return str(path)


# --------------------------------------------------------------------------------------------
def cmd_pick(args) -> int:
    from .pick import pick_graph, write_picks
    from .runtime import compute

    out = Path(args.out)
    with _client(args):
        mics, bad = load_micrographs(args.micrographs, out, args.pixel_size)
        apix = float(mics.attrs["pixel_size"])
        names = [str(m) for m in mics["micrograph"].values]
        paths = dict(zip(names, [str(p) for p in mics["path"].values]))
        model = None
        if args.weights:
            from .pick_deep import load_model

            model = load_model(args.weights)
        tp = {"seed": args.seed}
        if args.device:
            tp["device"] = args.device
        if args.threshold is not None:
            tp["threshold"] = args.threshold
        pp = {"clustering": args.clustering}
        if args.threshold is not None and args.method == "ibc":
            pp["threshold"] = args.threshold
        graph = pick_graph(mics["image"].data, names, apix, args.diameter, method=args.method,
                           steps=_steps(args.steps), pick_params=pp, train_params=tp, model=model)
        trained = graph.pop("__model__", None)
        results = compute(*[graph[n] for n in names], *([trained] if trained is not None else []),
                          label=f"pick ({args.method})")
    frames = dict(zip(names, results[:len(names)]))
    table, empty = write_picks(out, frames, mics.attrs, paths)
    summary = {"method": args.method, "n_micrographs": len(names), "n_picks": int(len(table)),
               "n_skipped": len(bad), "skipped": [b["file"] for b in bad],
               "micrographs_without_picks": empty,
               "views": {str(k): int(v) for k, v in table["cdViewClass"].value_counts().items()},
               "per_micrograph": {n: int(len(frames[n])) for n in names}}
    if args.method == "deep":
        from .pick_deep import save_model

        save_model(model if model is not None else results[-1], out / "picker_weights.pt")
        summary["weights"] = str(out / "picker_weights.pt")
    (out / "pick_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _print({k: v for k, v in summary.items() if k != "per_micrograph"})
    print(f"-> {out}/particles.star, {out}/coordinates/ ({len(names) - len(empty)} files"
          + (f"; no file for {len(empty)} micrograph(s) without picks" if empty else "") + ")", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------------
def cmd_extract(args) -> int:
    import dask

    from .errors import InputError
    from .extract import box_size, extract_with_preprocessed
    from .model import open_group, write_group
    from .preprocess import picking_binning, preprocess_graph
    from .runtime import compute

    out = Path(args.out)
    picks = read_coordinates(args.coordinates)
    with _client(args):
        mics, bad = load_micrographs(args.micrographs, out, args.pixel_size)
        apix = float(mics.attrs["pixel_size"])
        names = [str(m) for m in mics["micrograph"].values]
        key = {coordinate_stem(n): n for n in names}
        picks["rlnMicrographName"] = [key.get(m, m) for m in picks["mic"]]
        unknown = sorted(set(picks["mic"]) - set(key))
        if unknown:
            print(f"note: {len(unknown)} micrograph(s) in {args.coordinates} are not among the inputs "
                  f"(e.g. {unknown[0]}); their picks are not extracted", file=sys.stderr)
        picks = picks[picks["mic"].isin(list(key))].drop(columns=["mic"])
        if not len(picks):
            raise InputError(args.coordinates, "no picks on any of the given micrographs")
        box = int(args.box or box_size(args.diameter / apix))
        binning = picking_binning(apix, args.diameter)
        pre = preprocess_graph(mics["image"].data, apix, args.diameter, binning=binning)
        ds, dropped = extract_with_preprocessed(mics, pre, binning, picks, box, invert=args.invert, edge=args.edge)
        write_group(ds, out / "store.zarr", "particles")
    parts = open_group(out / "store.zarr", "particles")
    table = pd.DataFrame({c: parts[c].values for c in parts.data_vars if parts[c].dims == ("particle",)})
    stacks = out / "Particles"
    stacks.mkdir(parents=True, exist_ok=True)
    mic_of = table["rlnMicrographName"].astype(str).to_numpy()
    tasks, names_orig, names_pre = [], np.empty(len(table), object), np.empty(len(table), object)
    for m in dict.fromkeys(mic_of):
        idx = np.flatnonzero(mic_of == m)
        lo, hi = int(idx[0]), int(idx[-1]) + 1  # rows are grouped by micrograph
        for var, suffix, store in (("image", "", names_orig), ("preprocessed", "_preprocessed", names_pre)):
            rel = f"Particles/{m}{suffix}.mrcs"
            store[lo:hi] = [f"{i + 1:06d}@{rel}" for i in range(hi - lo)]
            tasks.append(dask.delayed(_write_stack, pure=True)(out / rel, parts[var].data[lo:hi], apix))
    compute(*tasks, label="write particle stacks")
    mic_paths = dict(zip(names, [str(p) for p in mics["path"].values]))
    base = table.copy()
    base["rlnMicrographName"] = [mic_paths.get(m, m) for m in base["rlnMicrographName"].astype(str)]
    _write_particle_star(out / "particles.star", base.assign(rlnImageName=names_orig), mics.attrs, box)
    _write_particle_star(out / "particles_preprocessed.star", base.assign(rlnImageName=names_pre), mics.attrs, box)
    dropped = dropped.drop(columns=[c for c in ("mic",) if c in dropped.columns])
    _write_dropped(out / "dropped_particles.star", dropped)
    summary = {"n_particles": int(len(table)), "box_px": box, "pixel_size_A": apix, "invert": bool(args.invert),
               "edge": args.edge, "n_dropped_edge": int((dropped["reason"] != "micrograph not found").sum())
               if len(dropped) else 0, "n_skipped_micrographs": len(bad), "unknown_micrographs": unknown}
    (out / "extract_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    _print(summary)
    print(f"-> {out}/particles.star (+ Particles/*.mrcs), {out}/particles_preprocessed.star, "
          f"{out}/store.zarr (group particles: image, preprocessed), {out}/dropped_particles.star", file=sys.stderr)
    return 0


def _write_stack(path, images, pixel_size):
    from .io.mrc import write_stack

    write_stack(path, np.asarray(images, np.float32), pixel_size)
    return str(path)


def _write_particle_star(path: Path, table: pd.DataFrame, attrs, box: int) -> None:
    from .io.star import write_particles
    from .model import particle_dataset

    first = ["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnAutopickFigureOfMerit",
             "rlnClassNumber", "cdViewClass"]
    cols = [c for c in first if c in table.columns] + sorted(c for c in table.columns if c not in first)
    keep = {k: v for k, v in attrs.items() if k in ("pixel_size", "voltage", "cs", "amplitude_contrast")}
    ds = particle_dataset(None, table[cols], keep)
    ds["rlnImageSize"] = ("optics", [int(box)])
    ds["rlnImageDimensionality"] = ("optics", [2])
    write_particles(path, ds)


def _write_dropped(path: Path, dropped: pd.DataFrame) -> None:
    from .io.star import _loop_text, _write_text_atomic

    if not len(dropped):
        path.unlink(missing_ok=True)
        return
    cols = [c for c in dropped.columns if c != "reason"]
    _write_text_atomic(path, _loop_text("particles", [(c, dropped[c].to_numpy()) for c in cols]
                                        + [("cdDropReason", dropped["reason"].to_numpy(object))]))


# --------------------------------------------------------------------------------------------
def cmd_evaluate_picks(args) -> int:
    from .pick import evaluate_picks

    def as_dict(df):
        return {m: g[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float) for m, g in df.groupby("mic", sort=True)}

    picks, truth = as_dict(read_coordinates(args.picks)), as_dict(read_coordinates(args.truth))
    e = evaluate_picks(picks, truth, args.match_px, capped=args.capped)
    for mic, r in e["per_micrograph"].items():
        print(f"{mic}: picks={r['n_picks']} truth={r['n_truth']} matched={r['n_matched']} "
              f"precision={r['precision']:.4f} recall={r['recall']:.4f} F1={r['f1']:.4f}")
    if e["ignored"]:
        print(f"note: {len(e['ignored'])} picked micrographs have no ground truth and are ignored "
              f"(e.g. {e['ignored'][0]})")
    if args.json:
        Path(args.json).write_text(json.dumps({**e, "match_px": args.match_px, "capped": args.capped}, indent=1) + "\n")
    print(f"precision={e['precision']:.4f} recall={e['recall']:.4f} F1={e['f1']:.4f} "
          f"picks={e['n_picks']} truth={e['n_truth']}")
    return 0


# --------------------------------------------------------------------------------------------
def _common(p, add_cluster_args, micrographs=True):
    if micrographs:
        p.add_argument("micrographs", nargs="+", metavar="MICROGRAPH",
                       help="micrograph files (MRC, MRC movie, TIFF, PNG), globs or folders")
    p.add_argument("--pixel-size", type=float, default=None, help="Å/px of the micrographs (default: MRC header)")
    p.add_argument("--diameter", type=float, required=True, help="particle outer diameter, Å")
    p.add_argument("--out", required=True, help="output folder")
    add_cluster_args(p)


def register(sub, add_cluster_args) -> None:
    """Add ``preprocess``, ``pick``, ``extract`` and ``evaluate-picks`` to the ``cryodask`` parser."""
    from .preprocess import DEFAULT_STEPS, STEPS

    p = sub.add_parser("preprocess", help="Component 1: micrograph preprocessing (original kept)",
                       description="Per micrograph, as a Dask graph: " + " → ".join(DEFAULT_STEPS) + " (default "
                                   "chain; also available: " + ", ".join(s for s in STEPS if s not in DEFAULT_STEPS)
                                   + "). Writes OUT/store.zarr (group 'micrographs' = the originals, 'preprocessed' "
                                     "at the picking scale) and OUT/preprocessed/NAME.mrc. Corrupted inputs are "
                                     "reported, listed in OUT/skipped.json and skipped.")
    _common(p, add_cluster_args)
    p.add_argument("--steps", default=None, help="comma-separated chain (default: " + ",".join(DEFAULT_STEPS) + ")")
    p.add_argument("--binning", type=float, default=None,
                   help="downsampling factor (default: particle ≈ 32 px wide at the picking scale)")
    p.add_argument("--no-mrc", action="store_true", help="do not write OUT/preprocessed/*.mrc")
    p.set_defaults(func=cmd_preprocess)

    k = sub.add_parser("pick", help="Component 2: fully automated particle picking (ibc or deep)",
                       description="Preprocess and pick every micrograph. --method ibc: intensity-based clustering "
                                   "→ cleaned mask → modified circular Hough (round/top) and Feret boxes "
                                   "(square/rectangular/side). --method deep: a small network trained on the IBC "
                                   "picks of these micrographs, then applied to each (weights saved as "
                                   "OUT/picker_weights.pt). Writes OUT/particles.star (RELION 3.1; coordinates in "
                                   "pixels of the input micrographs; rlnAutopickFigureOfMerit; view as "
                                   "rlnClassNumber 1 = top, 2 = side and cdViewClass) and "
                                   "OUT/coordinates/NAME.star (none for a micrograph without picks).")
    _common(k, add_cluster_args)
    k.add_argument("--method", choices=["ibc", "deep"], default="ibc")
    k.add_argument("--clustering", choices=["gmm", "kmeans", "fcm"], default="gmm",
                   help="ibc intensity model (default gmm); also used for the deep picker's training labels")
    k.add_argument("--threshold", type=float, default=None,
                   help="acceptance threshold (ibc: boundary support, default 0.5; deep: probability, default 0.7)")
    k.add_argument("--steps", default=None, help="preprocessing chain (default: " + ",".join(DEFAULT_STEPS) + ")")
    k.add_argument("--weights", default=None, help="deep: use these trained weights instead of training")
    k.add_argument("--device", default=None, help="deep: torch device (default: cuda when present, else cpu)")
    k.add_argument("--seed", type=int, default=0, help="deep: training seed")
    k.set_defaults(func=cmd_pick)

    e = sub.add_parser("extract", help="cut particle boxes (original and preprocessed) from picked micrographs",
                       description="Boxes centred on the picks, from the original and from the preprocessed "
                                   "micrographs, normalised as RELION (background outside 75 %% of the box radius: "
                                   "mean 0, std 1). Writes OUT/store.zarr (group 'particles': image, preprocessed), "
                                   "OUT/particles.star + OUT/Particles/NAME.mrcs, OUT/particles_preprocessed.star + "
                                   "OUT/Particles/NAME_preprocessed.mrcs, and OUT/dropped_particles.star (edge "
                                   "particles, with the reason).")
    e.add_argument("--micrographs", nargs="+", required=True, help="micrograph files, globs or folders")
    e.add_argument("--coordinates", required=True,
                   help="particles.star with rlnMicrographName, or a folder of per-micrograph coordinate STARs")
    _common(e, add_cluster_args, micrographs=False)
    e.add_argument("--box", type=int, default=None, help="box size, px (default: 1.5 × diameter, even)")
    e.add_argument("--invert", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="invert contrast so protein is white, as the later stages expect (default: on)")
    e.add_argument("--edge", choices=["drop", "pad"], default="drop",
                   help="particles whose box leaves the micrograph: drop (default) or pad with the mean")
    e.set_defaults(func=cmd_extract)

    v = sub.add_parser("evaluate-picks", help="precision, recall, F1 of picks against ground truth",
                       description="PICKS and TRUTH: a STAR file with rlnMicrographName, rlnCoordinateX/Y, or a "
                                   "folder of per-micrograph coordinate STARs (micrograph = file stem). One-to-one "
                                   "matching by the Hungarian algorithm on centre distances, a pair counting when "
                                   "within --match-px pixels: the same numbers as shared/checks/pick_f1.py. "
                                   "Micrographs without ground truth are ignored.")
    v.add_argument("picks")
    v.add_argument("truth")
    v.add_argument("--match-px", type=float, required=True, help="match radius, px")
    v.add_argument("--capped", action="store_true",
                   help="assign with distances beyond --match-px made prohibitive (can only match more; "
                        "differs from pick_f1.py)")
    v.add_argument("--json", default=None, help="also write the figures to this JSON file")
    v.set_defaults(func=cmd_evaluate_picks)
