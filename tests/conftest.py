"""Shared fixtures: the path to ../shared/data (tests that need it skip when it is absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "data"
CHECKS = SHARED / "checks"


def pytest_configure(config):
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return DATA


@pytest.fixture(scope="session")
def shared_checks() -> Path:
    if not CHECKS.is_dir():
        pytest.skip("../shared/checks is not available")
    return CHECKS
