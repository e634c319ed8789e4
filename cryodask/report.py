"""Run reports: ``report.json`` (machine-readable) and ``report.html`` (figures and tables)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

__all__ = ["write_report"]


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
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cryodask report</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}
figure{{margin:1em 0}}</style></head><body>
<h1>cryodask report</h1>{_table(report)}<h2>Figures</h2>{figs}</body></html>"""
    (out / "report.html").write_text(page)
    return out / "report.html"
