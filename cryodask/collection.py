"""Collections: many datasets, one cluster, one summary.

``cryodask run collection.yaml`` where the YAML has a ``datasets:`` list::

    out: my_collection            # OUT: every dataset writes OUT/<name>/…
    concurrent: 4                 # datasets whose graphs run on the cluster at the same time
    cluster: {kind: local, n_workers: 8}
    stages: [ingest, preprocess, ctf, pick, extract, align2d, refine]   # defaults for every dataset:
    seed: 0                       #   any key of a single run's configuration
    datasets:
      - name: apoferritin
        micrographs: /data/apo/*.mrc
        pixel_size: 1.06          # Å/px
        diameter: 130             # Å
        voltage: 300              # kV
        cs: 2.7                   # mm
        amplitude_contrast: 0.1
        symmetry: O
        truth: /data/apo_sim      # optional: accuracy figures
        pick: {method: deep}      # optional per-stage overrides (merged into the defaults)
      - name: klh
        ...

One Dask cluster serves the whole collection: each dataset's pipeline runs in a thread of this
process against the same ``distributed.Client`` (at most ``concurrent`` at a time), so their
graphs share the workers. Every dataset is an ordinary run (``OUT/<name>/report.html``,
``run.log``, completion records, resumable), and a dataset that fails — a bad path, all
micrographs corrupt, a stage error — is recorded with its error in the summary
(``OUT/summary.json`` and ``OUT/summary.html``) without stopping the others.
"""
from __future__ import annotations

import html
import json
import logging
import re
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import CryodaskError, InputError

log = logging.getLogger("cryodask")

__all__ = ["is_collection", "load_collection", "run_collection", "write_summary"]

#: keys that belong to the collection itself, not to its datasets
_COLLECTION_KEYS = ("datasets", "out", "cluster", "concurrent")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _read_yaml(path: str | Path) -> Any:
    import yaml

    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such configuration file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(p, f"not valid YAML ({str(e).splitlines()[0]})") from None


def is_collection(path: str | Path | None) -> bool:
    """True if the YAML file at ``path`` is a collection (has a ``datasets:`` key)."""
    if not path:
        return False
    d = _read_yaml(path)
    return isinstance(d, dict) and "datasets" in d


def load_collection(spec: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Parse a collection: ``(settings, entries)``.

    ``settings``: ``out`` (absolute), ``cluster`` (dict), ``concurrent`` (int). ``entries``: one
    per dataset, ``{"name", "config": RunConfig | None, "error": str | None}`` — a dataset whose
    own settings are invalid (e.g. no diameter) carries the error instead of a config, so that
    it is reported without stopping the others. Errors in the collection's structure (no list of
    datasets, duplicate names) raise :class:`InputError`.
    ``overrides`` (None values ignored) replace top-level keys, e.g. ``out``, ``stages``, ``seed``.
    """
    from .pipeline import RunConfig

    source = spec if not isinstance(spec, dict) else None
    d = dict(spec) if isinstance(spec, dict) else _read_yaml(spec)
    if not isinstance(d, dict):
        raise InputError(source, "the collection must be a mapping with a 'datasets:' list")
    for k, v in (overrides or {}).items():
        if v is not None:
            d[k] = v
    datasets = d.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise InputError(source, "'datasets:' must be a non-empty list of datasets (each with a name)")
    known = {f.name for f in fields(RunConfig)}
    defaults = {k: v for k, v in d.items() if k not in _COLLECTION_KEYS}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise InputError(source, f"unknown collection key(s): {', '.join(unknown)}")
    if "micrographs" in defaults:
        raise InputError(source, "'micrographs:' belongs to each dataset of a collection, not to the collection")
    out = Path(str(d.get("out") or "cryodask_collection")).expanduser().absolute()
    concurrent = d.get("concurrent", 4)
    if isinstance(concurrent, bool) or not isinstance(concurrent, int) or concurrent < 1:
        raise InputError(source, f"'concurrent:' must be a whole number ≥ 1, got {concurrent!r}")
    cluster = d.get("cluster") or {}
    if not isinstance(cluster, dict):
        raise InputError(source, "'cluster:' must be a mapping of settings")

    entries: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(datasets):
        if not isinstance(item, dict):
            raise InputError(source, f"dataset #{i + 1} must be a mapping with a name, not {item!r}")
        name = str(item.get("name", "")).strip()
        if not name:
            raise InputError(source, f"dataset #{i + 1} has no 'name:'")
        if not _NAME_OK.match(name):
            raise InputError(source, f"dataset name {name!r} must be letters, digits, '.', '_' or '-' "
                                     "(it names the dataset's output folder)")
        if name in seen:
            raise InputError(source, f"two datasets are called {name!r}")
        seen.add(name)
        entry: dict[str, Any] = {"name": name, "config": None, "error": None}
        own = {k: v for k, v in item.items() if k != "name"}
        try:
            bad = sorted(set(own) - known) + (["out"] if "out" in own else [])
            if bad:
                raise InputError(source, f"dataset {name}: unknown or not allowed key(s): {', '.join(bad)}")
            merged: dict[str, Any] = dict(defaults)
            for k, v in own.items():  # per-stage sections merge into the collection's defaults
                merged[k] = {**merged[k], **v} if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
            merged["out"] = str(out / name)
            merged.pop("cluster", None)
            entry["config"] = RunConfig.load(None, overrides=merged)
        except (InputError, CryodaskError, TypeError, ValueError) as e:
            entry["error"] = f"dataset {name}: {e}" if not str(e).startswith(f"dataset {name}") else str(e)
        entries.append(entry)
    return {"out": str(out), "cluster": cluster, "concurrent": concurrent, "source": str(source or "")}, entries


# --------------------------------------------------------------------------------------------
def _key_figures(rep: dict[str, Any]) -> dict[str, Any]:
    """The numbers a summary row shows, from one dataset's report (absent stages are skipped)."""
    st = rep.get("stages", {})
    g = lambda stage, *keys: _dig(st.get(stage, {}), *keys)  # noqa: E731
    out = {
        "pixel_size_A": g("ingest", "pixel_size_A"),
        "n_micrographs": g("ingest", "n_micrographs"),
        "n_bad_micrographs": g("ingest", "n_bad"),
        "defocus_median_A": g("ctf", "defocus_median_A"),
        "defocus_error_median_A": g("ctf", "truth", "defocus_error_median_A"),
        "n_picks": g("pick", "n_picks"),
        "pick_f1": g("pick", "truth", "f1"),
        "box_px": g("extract", "box_px"),
        "n_particles": g("extract", "n_particles"),
        "n_selected": g("align2d", "n_selected"),
        "resolution_A": g("refine", "resolution_half_maps_A", "fsc0.143"),
        "fsc_vs_truth_0.143_A": g("refine", "truth", "fsc_vs_truth_0.143_A"),
    }
    return {k: v for k, v in out.items() if v is not None}


def _dig(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _run_one(entry: dict[str, Any], t_origin: float) -> dict[str, Any]:
    from .pipeline import run_pipeline
    from .runtime import dataset_scope

    name, cfg = entry["name"], entry["config"]
    row: dict[str, Any] = {"name": name, "status": "failed", "out": str(cfg.out) if cfg else None,
                           "error": entry["error"]}
    if cfg is None:
        log.error("%s", entry["error"])
        return row
    t0 = time.perf_counter()
    row["started_s"] = round(t0 - t_origin, 2)
    with dataset_scope(name):
        try:
            log.info("dataset %s: start (%d micrograph pattern(s), %s Å/px, diameter %s Å) -> %s", name,
                     len(cfg.micrographs), cfg.pixel_size if cfg.pixel_size else "header", cfg.diameter, cfg.out)
            rep = run_pipeline(cfg, None)  # the collection's client is the default one
            row.update(status="ok", error=None, stages=list(rep.get("stages", {})),
                       resumed=[k for k, v in rep.get("stages", {}).items() if isinstance(v, dict) and v.get("resumed")],
                       timings_s=rep.get("timings_s", {}), **_key_figures(rep))
            if rep.get("bad_inputs"):
                row["bad_inputs"] = rep["bad_inputs"]
            log.info("dataset %s: done in %.1f s", name, time.perf_counter() - t0)
        except (InputError, CryodaskError) as e:
            row["error"] = str(e)
            log.error("dataset %s failed: %s", name, e)
        except Exception as e:  # noqa: BLE001 - one dataset's failure must not stop the others
            row["error"] = f"internal error: {type(e).__name__}: {e}"
            log.error("dataset %s failed: %s\n%s", name, row["error"], traceback.format_exc())
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["finished_s"] = round(time.perf_counter() - t_origin, 2)
    return row


def run_collection(spec: str | Path | dict[str, Any], cluster_cfg=None, *,
                   overrides: dict[str, Any] | None = None, use_client: bool = True) -> dict[str, Any]:
    """Run every dataset of a collection on one cluster; returns the summary (also written to
    ``OUT/summary.json`` and ``OUT/summary.html``).

    ``cluster_cfg``: a :class:`cryodask.cluster.ClusterConfig` (default: the collection's
    ``cluster:`` section), or None with ``use_client=False`` for Dask's threaded scheduler in
    this process. Inside an existing ``distributed.Client`` context, pass ``use_client=False``
    to use that client.
    """
    from .cli import _maybe_client
    from .runtime import setup_logging

    settings, entries = load_collection(spec, overrides)
    out = Path(settings["out"])
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / "collection.log")
    if cluster_cfg is None and use_client:
        from .cluster import ClusterConfig

        cluster_cfg = ClusterConfig.from_dict(settings["cluster"])
    t0 = time.perf_counter()
    summary: dict[str, Any] = {"source": settings["source"], "out": str(out), "n_datasets": len(entries),
                               "concurrent": settings["concurrent"], "datasets": []}
    log.info("collection: %d dataset(s) -> %s (at most %d at a time)", len(entries), out, settings["concurrent"])
    with _maybe_client(cluster_cfg if use_client else None):
        summary["cluster"] = _cluster_info()
        with ThreadPoolExecutor(max_workers=settings["concurrent"], thread_name_prefix="cryodask-dataset") as ex:
            futures = [ex.submit(_run_one, e, t0) for e in entries]
            rows = [f.result() for f in futures]
    summary["datasets"] = rows
    summary["n_ok"] = sum(r["status"] == "ok" for r in rows)
    summary["n_failed"] = len(rows) - summary["n_ok"]
    summary["total_seconds"] = round(time.perf_counter() - t0, 2)
    write_summary(out, summary)
    log.info("collection: %d of %d dataset(s) ok in %.1f s -> %s", summary["n_ok"], len(rows),
             summary["total_seconds"], out / "summary.html")
    return summary


def _cluster_info() -> dict[str, Any]:
    """Which scheduler ran the collection (one for all datasets)."""
    try:
        from distributed import get_client

        c = get_client()
    except (ImportError, ValueError):
        return {"scheduler": "dask threaded scheduler (this process)"}
    return {"scheduler": c.scheduler.address, "dashboard": c.dashboard_link, "n_workers": len(c.nthreads())}


# --------------------------------------------------------------------------------------------
_COLUMNS = [("status", "status"), ("pixel_size_A", "Å/px"), ("n_micrographs", "micrographs"),
            ("n_bad_micrographs", "bad"), ("defocus_median_A", "defocus median Å"),
            ("defocus_error_median_A", "defocus error (truth) Å"), ("n_picks", "picks"), ("pick_f1", "pick F1 (truth)"),
            ("box_px", "box px"), ("n_particles", "particles"), ("n_selected", "selected"),
            ("resolution_A", "FSC 0.143 Å"), ("fsc_vs_truth_0.143_A", "FSC vs truth 0.143 Å"),
            ("seconds", "seconds")]


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> Path:
    """``summary.json`` and ``summary.html`` (one row per dataset, links to its report and log)."""
    out = Path(out_dir)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["dataset", *(h for _, h in _COLUMNS), "error", "files"])
    body = []
    for r in summary["datasets"]:
        links = []
        if r.get("out"):
            rel = Path(r["out"]).name
            for f in ("report.html", "run.log"):
                if (Path(r["out"]) / f).exists():
                    links.append(f'<a href="{html.escape(rel)}/{f}">{f}</a>')
        cls = "ok" if r["status"] == "ok" else "failed"
        cells = "".join(f"<td>{html.escape(_fmt(r.get(k)))}</td>" for k, _ in _COLUMNS)
        body.append(f'<tr class="{cls}"><td>{html.escape(r["name"])}</td>{cells}'
                    f'<td>{html.escape(r.get("error") or "")}</td><td>{" ".join(links)}</td></tr>')
    cl = summary.get("cluster", {})
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cryodask collection</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}
tr.failed td{{background:#fdd}}</style></head><body>
<h1>cryodask collection</h1>
<p>{summary['n_ok']} of {summary['n_datasets']} dataset(s) finished, {summary['n_failed']} failed;
{summary['total_seconds']:.1f} s on one cluster ({html.escape(str(cl.get('scheduler', '')))},
{html.escape(str(cl.get('n_workers', '')))} workers). <a href="collection.log">collection.log</a></p>
<table><tr>{head}</tr>{''.join(body)}</table></body></html>"""
    (out / "summary.html").write_text(page)
    return out / "summary.html"


def cmd_run_collection(args, cluster_config) -> int:
    """``cryodask run COLLECTION.yaml`` (called by :func:`cryodask.cli.cmd_run`)."""
    per_dataset = {"--micrographs": args.micrographs, "--pixel-size": args.pixel_size, "--diameter": args.diameter,
                   "--symmetry": args.symmetry, "--truth": args.truth, "--voltage": args.voltage, "--cs": args.cs,
                   "--amplitude-contrast": args.amplitude_contrast}
    given = [k for k, v in per_dataset.items() if v is not None]
    if given:
        raise InputError(args.config, f"{', '.join(given)} cannot be used with a collection "
                                      "(set them per dataset in the YAML)")
    overrides = {"out": args.out, "seed": args.seed, "stages": args.stages,
                 "pick": {"method": args.pick_method} if args.pick_method else None}
    if overrides["pick"] is not None:  # a flag merges into the collection's pick defaults
        base = _read_yaml(args.config).get("pick") or {}
        overrides["pick"] = {**base, **overrides["pick"]}
    cluster = (_read_yaml(args.config) or {}).get("cluster") or {}
    ccfg = cluster_config(args, cluster)
    summary = run_collection(args.config, ccfg, overrides=overrides, use_client=ccfg is not None)
    print(f"collection: {summary['n_ok']} of {summary['n_datasets']} dataset(s) ok"
          + (f", {summary['n_failed']} failed" if summary["n_failed"] else "")
          + f" -> {summary['out']}/summary.html")
    return 0 if summary["n_failed"] == 0 else 1
