"""Subcommands for the individual stages (each also runs inside ``cryodask run``)."""
from __future__ import annotations

import argparse


def register(sub, add_cluster_args) -> None:
    """Add the stage subcommands to the ``cryodask`` parser."""
