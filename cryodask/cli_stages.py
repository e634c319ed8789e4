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


def cmd_reconstruct(args) -> int:
    if args.method == "localized":
        from .localized import localized_star

        with _client(args):
            r = localized_star(args.particles, args.out, chain_size=args.chain_size, seed=args.seed)
        print(json.dumps({k: v for k, v in r.items() if not isinstance(v, (dict, list))}, default=str))
        print(f"-> {args.out}/localized_map.mrc (+ control maps, points/)", file=sys.stderr)
        return 0
    from .reconstruct import reconstruct_star

    r = reconstruct_star(args.particles, args.out, symmetry=args.symmetry, ctf=not args.no_ctf,
                         threads=args.threads, seed=args.seed, mask_diameter=args.mask_diameter)
    print(json.dumps({k: r[k] for k in ("n_particles", "symmetry", "fsc0.5", "fsc0.143") if k in r}, default=str))
    print(f"-> {args.out}/map.mrc, half1.mrc, half2.mrc, fsc.csv, fsc.png", file=sys.stderr)
    return 0


def cmd_refine(args) -> int:
    from .refine import refine_star

    init = args.initial
    if init.lower().endswith((".mrc", ".map")):
        from .io.mrc import read_map

        init = read_map(init)[0]
    fig = refine_star(args.particles, args.out, args.symmetry, args.diameter, seed=args.seed, initial=init,
                      fast=args.fast, threads=args.threads, log=lambda m: print(f"refine: {m}", file=sys.stderr))
    print(json.dumps({"n_particles": fig["n_particles"], "symmetry": fig["symmetry"],
                      "initial_model": fig["initial_model"].get("kind"), **fig["resolution_A"],
                      "seconds": fig["seconds"]}, default=float))
    print(f"-> {args.out}/map.mrc, half1.mrc, half2.mrc, fsc.csv, fsc.png, angular_distribution.png, "
          f"particles.star (+ particles.mrcs), refine.json", file=sys.stderr)
    return 0


def cmd_fsc(args) -> int:
    from .fsc import fsc_report
    from .io.mrc import read_map

    a, apix = read_map(args.map1)
    b, _ = read_map(args.map2)
    apix = args.pixel_size or apix
    if not apix:
        from .errors import InputError

        raise InputError(args.map1, "no voxel size in the header: pass --pixel-size")
    from .fsc import write_fsc_csv, write_fsc_png

    rep = fsc_report(a, b, apix, mask_radius=args.mask_radius)
    curves = {"fsc": rep["curve"], **({"masked_corrected": rep["masked_curve"]} if "masked_curve" in rep else {})}
    if args.csv:
        write_fsc_csv(args.csv, curves, a.shape[0], apix)
    if args.png:
        write_fsc_png(args.png, curves, a.shape[0], apix, title=f"{Path(args.map1).name} vs {Path(args.map2).name}")
    print(" ".join(f"{k}={v:.2f} A" for k, v in rep.items() if k != "curve" and not k.endswith("curve"))
          + f" nyquist={2 * apix:.2f} A")
    return 0


def register(sub, add_cluster_args) -> None:
    """Add the stage subcommands to the ``cryodask`` parser."""
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
    a.add_argument("--variant", default="global-refine",
                   help="registration variant: global-refine (default, best measured), global-mask, or the paper's "
                        "four: paper-affine, paper-adjusted, paper-300, paper-sim-affine")
    a.add_argument("--diameter", type=float, default=None, help="particle's largest dimension, Å")
    add_cluster_args(a)
    a.set_defaults(func=cmd_align2d)

    r = sub.add_parser("reconstruct", help="3D reconstruction: Fourier (known angles) or the paper's localized method",
                       description="--method fourier (default): direct Fourier inversion of a particle STAR with "
                                   "known angles, CTF (Wiener), symmetry and gold-standard halves (rlnRandomSubset, "
                                   "or a seeded random split); writes map.mrc, half1.mrc, half2.mrc, fsc.csv, "
                                   "fsc.png. --method localized: the paper's pairwise structure-from-motion maps "
                                   "from 2D-aligned particles (e.g. align2d's particles_aligned.star), averaged.")
    r.add_argument("--method", choices=["fourier", "localized"], default="fourier")
    r.add_argument("--chain-size", type=int, default=50, help="localized: particles per fusion chain")
    r.add_argument("--particles", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--symmetry", default="C1")
    r.add_argument("--no-ctf", action="store_true")
    r.add_argument("--mask-diameter", type=float, default=None, help="soft spherical mask, Å")
    r.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    r.add_argument("--seed", type=int, default=0)
    add_cluster_args(r)
    r.set_defaults(func=cmd_reconstruct, cluster="none")

    rf = sub.add_parser("refine", help="3D refinement from no initial model: orientations, gold-standard map",
                        description="Orientation determination and gold-standard refinement of a RELION particle "
                                    "STAR (any angles in it are ignored): automatic initial model (ab initio from "
                                    "a perfect-mask shape), global then local projection matching against each "
                                    "half's own reference, CTF, symmetry. Writes map.mrc, half1.mrc, half2.mrc, "
                                    "fsc.csv, fsc.png, angular_distribution.png, initial_model.mrc, particles.star "
                                    "with the assigned poses (+ particles.mrcs: relion_reconstruct --i "
                                    "particles.star --ctf run inside OUT reproduces the map) and refine.json.")
    rf.add_argument("--particles", required=True, help="RELION particle STAR (stack paths relative to it)")
    rf.add_argument("--out", required=True)
    rf.add_argument("--symmetry", default="C1", help="C1, Cn, Dn, T, O or I")
    rf.add_argument("--diameter", type=float, default=None, help="particle outer diameter, Å (default 0.7 × box)")
    rf.add_argument("--initial", default="auto",
                    help="initial model: auto (default: ab initio from a sphere/cylinder start), sphere, cylinder, "
                         "abinitio (random blobs) or a map PATH.mrc of the same box and pixel size")
    rf.add_argument("--fast", action="store_true", help="fewer iterations and a coarser search (the demo's setting)")
    rf.add_argument("--threads", type=int, default=None, help="threads (default: all cores)")
    rf.add_argument("--seed", type=int, default=0)
    rf.set_defaults(func=cmd_refine)

    f = sub.add_parser("fsc", help="Fourier shell correlation of two maps, resolution at 0.143 and 0.5")
    f.add_argument("map1")
    f.add_argument("map2")
    f.add_argument("--pixel-size", type=float, default=None)
    f.add_argument("--mask-radius", type=float, default=None, help="soft spherical mask radius, px")
    f.add_argument("--csv", default=None)
    f.add_argument("--png", default=None)
    f.set_defaults(func=cmd_fsc)
