"""Subcommands for the individual stages (each also runs inside ``cryodask run``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _client(args):
    from .cli import _cluster_config, _maybe_client

    return _maybe_client(_cluster_config(args))


def _print_summary(summary: dict, keys: list[str]) -> None:
    print(json.dumps({k: summary[k] for k in keys if k in summary}, default=str))


def cmd_select(args) -> int:
    from .select import select_star

    with _client(args):
        s = select_star(args.particles, args.out, view=args.view, diameter_A=args.diameter)
    _print_summary(s, ["n_particles", "n_selected", "n_rejected", "rejected_by_reason", "n_top", "n_side"])
    print(f"-> {args.out}/particles_selected.star, {args.out}/select_gallery.png", file=sys.stderr)
    return 0


def cmd_align2d(args) -> int:
    from .align2d import align2d_star

    with _client(args):
        s = align2d_star(args.particles, args.out, view=args.view, variant=args.variant, diameter_A=args.diameter)
    _print_summary(s, ["n_particles", "n_selected", "n_side", "n_top", "variant", "seconds_total"])
    print(f"-> {args.out}/particles_aligned.star, {args.out}/particles.zarr", file=sys.stderr)
    return 0


def register(sub, add_cluster_args) -> None:
    """Add the stage subcommands to the ``cryodask`` parser."""
    from .align2d import DEFAULT_VARIANT, VARIANTS

    s = sub.add_parser("select", help="Component 3: perfect particle masks and good/bad selection",
                       description="Per particle: intensity clustering -> cleaned mask -> perfect mask (oriented "
                                   "rectangle for side views, Hough disc for top views); rejects bad particles "
                                   "with a recorded reason. Input: any RELION 3.x particle STAR with its stack.")
    s.add_argument("--particles", required=True, help="RELION particle STAR (stack paths relative to it)")
    s.add_argument("--out", required=True)
    s.add_argument("--view", choices=["side", "top", "auto"], default="auto")
    s.add_argument("--diameter", type=float, default=None, help="particle's largest dimension, Å")
    add_cluster_args(s)
    s.set_defaults(func=cmd_select)

    a = sub.add_parser("align2d", help="2D alignment: side-view mask registration, top-view centring",
                       description="Masks and selection, then side views registered by their perfect masks "
                                   "(global rotation start, MSE regular-step gradient descent, intensity "
                                   "refinement against a running reference) and top views centred on their disc.")
    a.add_argument("--particles", required=True, help="RELION particle STAR (stack paths relative to it)")
    a.add_argument("--out", required=True)
    a.add_argument("--view", choices=["side", "top", "auto"], default="auto")
    a.add_argument("--variant", choices=sorted(VARIANTS), default=DEFAULT_VARIANT,
                   help=f"registration variant (default {DEFAULT_VARIANT}; 'paper-*' are the paper's four)")
    a.add_argument("--diameter", type=float, default=None, help="particle's largest dimension, Å")
    add_cluster_args(a)
    a.set_defaults(func=cmd_align2d)
