"""Running graphs: progress display, run log, stage timing."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("cryodask")

__all__ = ["compute", "setup_logging", "stage_timer"]


def _active_client():
    try:
        from distributed import get_client

        return get_client()
    except (ImportError, ValueError):
        return None


def compute(*objs: Any, label: str = "", progress: bool | None = None) -> tuple:
    """``dask.compute`` on the active scheduler with a progress bar when attached to a terminal.

    With a distributed client the bar is ``distributed.progress`` (the dashboard shows the
    task stream); otherwise ``dask.diagnostics.ProgressBar``.
    """
    import dask

    show = sys.stderr.isatty() if progress is None else progress
    if label:
        log.info("computing: %s", label)
    client = _active_client()
    if client is not None:
        futures = client.compute(list(objs))
        if show:
            from distributed import progress as dprogress

            dprogress(futures)
            print(file=sys.stderr)
        return tuple(client.gather(futures))
    if show:
        from dask.diagnostics import ProgressBar

        with ProgressBar(out=sys.stderr):
            return dask.compute(*objs)
    return dask.compute(*objs)


def setup_logging(log_file: str | Path | None = None, debug: bool = False) -> None:
    """Log to stderr (INFO) and, if given, to ``log_file`` (DEBUG)."""
    root = logging.getLogger("cryodask")
    root.setLevel(logging.DEBUG)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.DEBUG if debug else logging.INFO)
    sh.setFormatter(fmt)
    root.addHandler(sh)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


@contextlib.contextmanager
def stage_timer(record: dict, name: str) -> Iterator[dict]:
    """Time a stage; stores ``{'seconds': …}`` (plus whatever the block adds) in ``record[name]``."""
    entry: dict[str, Any] = {}
    t0 = time.perf_counter()
    log.info("stage %s: start", name)
    try:
        yield entry
    finally:
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        record[name] = entry
        log.info("stage %s: done in %.1f s", name, entry["seconds"])
