"""Run reports: ``report.json`` (machine-readable) and ``report.html`` (figures and tables).

The HTML page starts with one row per stage — whether it ran or was resumed from its completion
record, its time, its counts (``n_*`` figures and a few sizes) and its accuracy against the
ground truth when the run had one (``truth`` figures) — then the total time, links to the run log
and the JSON report, skipped inputs, the figures, and every value of the report in full.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

__all__ = ["write_report", "stage_rows"]

# figures shown in the "counts" column besides every top-level n_* value (units in the name)
_SIZES = ("box_px", "binning", "pixel_size_A", "shape_px", "defocus_median_A", "fit_resolution_median_A",
          "resolution_half_maps_A", "symmetry", "method", "variant")


def _table(d: dict[str, Any]) -> str:
    rows = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = _table(v)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            cols = sorted({c for r in v for c in r})
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                           for r in v)
            v = f"<table><tr>{head}</tr>{body}</table>"
        else:
            v = html.escape(json.dumps(v, default=str) if not isinstance(v, str) else v)
        rows.append(f"<tr><th>{html.escape(str(k))}</th><td>{v}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "×".join(map(str, v)) if all(isinstance(x, int) for x in v) else ", ".join(map(_fmt, v))
    return str(v)


def _flat_numbers(d: Any, prefix: str = "") -> dict[str, Any]:
    """Scalar figures of a (nested) dict, keys joined with '.'; long lists and curves left out."""
    out: dict[str, Any] = {}
    if not isinstance(d, dict):
        return out
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_numbers(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) and not isinstance(v, str) or (isinstance(v, str) and len(v) < 40):
            out[key] = v
    return out


def stage_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage: name, status, seconds, counts, accuracy (from a pipeline report)."""
    rows = []
    timings = report.get("timings_s", {})
    for name, res in (report.get("stages") or {}).items():
        res = res if isinstance(res, dict) else {}
        t = timings.get(name)
        seconds = t.get("seconds") if isinstance(t, dict) else t
        counts = {k: v for k, v in res.items() if k.startswith("n_") and isinstance(v, (int, float))}
        counts.update({k: res[k] for k in _SIZES if k in res and res[k] is not None})
        if isinstance(res.get("chunks"), dict):
            counts["chunks written/total"] = f"{res['chunks'].get('chunks_written')}/{res['chunks'].get('chunks_total')}"
        rows.append({"stage": name, "status": "resumed" if res.get("resumed") else ("failed" if res.get("error") else "ran"),
                     "seconds": seconds, "counts": counts, "accuracy": _flat_numbers(res.get("truth")),
                     "warning": res.get("warning") or res.get("error")})
    return rows


def _stage_table(report: dict[str, Any]) -> str:
    rows = stage_rows(report)
    if not rows:
        return ""
    body = []
    for r in rows:
        sec = "" if r["seconds"] is None else f"{float(r['seconds']):.1f}"
        if r["status"] == "resumed" and sec:
            sec = f"{sec} (earlier run)"
        counts = "<br>".join(f"{html.escape(k)}: {html.escape(_fmt(v))}" for k, v in r["counts"].items())
        acc = "<br>".join(f"{html.escape(k)}: {html.escape(_fmt(v))}" for k, v in r["accuracy"].items())
        warn = f'<br><span class="warn">{html.escape(str(r["warning"]))}</span>' if r["warning"] else ""
        body.append(f'<tr class="{r["status"]}"><th>{html.escape(r["stage"])}</th><td>{r["status"]}</td>'
                    f'<td class="num">{sec}</td><td>{counts}{warn}</td><td>{acc}</td></tr>')
    total = report.get("total_seconds")
    foot = (f'<tr><th>total</th><td></td><td class="num">{float(total):.1f}</td><td></td><td></td></tr>'
            if isinstance(total, (int, float)) else "")
    return ("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>seconds</th><th>counts</th>"
            "<th>accuracy (vs ground truth)</th></tr>" + "".join(body) + foot + "</table>")


def _bad_inputs(report: dict[str, Any]) -> str:
    bad = report.get("bad_inputs") or []
    if not bad:
        return ""
    items = "".join(f"<li>{html.escape(str(b.get('reason') or b))}</li>" for b in bad)
    return f"<h2>Skipped inputs ({len(bad)})</h2><ul>{items}</ul>"


def write_report(out_dir: str | Path, report: dict[str, Any], figures: list[tuple[str, str]] | None = None) -> Path:
    """Write ``report.json`` and ``report.html`` into ``out_dir``.

    ``figures``: (caption, path relative to out_dir) of PNGs to show in the HTML page.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    figs = "".join(
        f'<figure><img src="{html.escape(p)}" style="max-width:100%"><figcaption>{html.escape(c)}</figcaption></figure>'
        for c, p in (figures or []))
    links = ['<a href="report.json">report.json</a>']
    if (out / "run.log").exists():
        links.insert(0, '<a href="run.log">run.log</a> (the full run log)')
    summary = f"<p>{html.escape(str(report['summary']))}</p>" if report.get("summary") else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cryodask report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}
td.num{{text-align:right}} tr.resumed td{{color:#555}} tr.failed td{{background:#fdd}} .warn{{color:#a60}}
figure{{margin:1em 0}}</style></head><body>
<h1>cryodask report</h1>{summary}<p>{' · '.join(links)}</p>
{_stage_table(report)}{_bad_inputs(report)}
<h2>Figures</h2>{figs or '<p>none</p>'}
<details{'' if report.get('stages') else ' open'}><summary>All values</summary>{_table(report)}</details></body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.html"
