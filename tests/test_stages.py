"""The pipeline's stage runner: independent stages overlap, dependencies hold, failures."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from cryodask.pipeline import _run_stages
from cryodask.runtime import dataset_scope, inherit_scope, scope_state, setup_logging

STAGES = ["ingest", "preprocess", "ctf", "pick", "extract"]


def _runner(events, order, fail=None):
    lock = threading.Lock()

    def run(name):
        with lock:
            order.append(("start", name))
        if name == "preprocess":  # finishes only if ctf runs at the same time
            assert events["ctf_started"].wait(10), "ctf did not start while preprocess ran"
            if fail:
                time.sleep(0.5)  # the failure reaches the runner while preprocess still runs
        if name == "ctf":
            events["ctf_started"].set()
            if fail == "ctf":
                raise RuntimeError("ctf failed")
        with lock:
            order.append(("end", name))

    return run


def test_independent_stages_overlap_and_dependencies_hold():
    order: list = []
    _run_stages(STAGES, STAGES, _runner({"ctf_started": threading.Event()}, order))
    pos = {ev: i for i, ev in enumerate(order)}
    assert set(pos) == {(k, n) for n in STAGES for k in ("start", "end")}
    assert pos[("start", "ctf")] < pos[("end", "preprocess")]  # they overlapped
    assert pos[("end", "ingest")] < min(pos[("start", "preprocess")], pos[("start", "ctf")])
    assert pos[("end", "preprocess")] < pos[("start", "pick")]
    assert pos[("start", "extract")] > max(pos[("end", "ctf")], pos[("end", "pick")])


def test_a_failed_stage_stops_the_run_after_the_running_stages_finish():
    order: list = []
    with pytest.raises(RuntimeError, match="ctf failed"):
        _run_stages(STAGES, STAGES, _runner({"ctf_started": threading.Event()}, order, fail="ctf"))
    # preprocess was running: it finished (its record is written, a re-run resumes after it);
    # nothing new started after the failure
    assert ("end", "preprocess") in order
    assert ("start", "pick") not in order and ("start", "extract") not in order


def test_helper_threads_log_into_their_datasets_run_log(tmp_path):
    log = logging.getLogger("cryodask")

    def helper(state):
        with inherit_scope(state):
            log.info("from the helper")

    try:
        with dataset_scope("ds1"):
            setup_logging(tmp_path / "run.log")
            t = threading.Thread(target=helper, args=(scope_state(),))
            t.start()
            t.join()
            log.info("from the dataset thread")
        other = threading.Thread(target=lambda: log.info("from elsewhere"))
        other.start()
        other.join()
    finally:
        setup_logging(None)
    text = (tmp_path / "run.log").read_text()
    assert "[ds1] from the helper" in text and "[ds1] from the dataset thread" in text
    assert "from elsewhere" not in text
