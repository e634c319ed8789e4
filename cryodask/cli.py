"""The ``cryodask`` command line.

Exit codes: 0 success, 2 bad input or usage (a one-line message naming the file and the
problem), 1 internal failure. ``--debug`` shows tracebacks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import CryodaskError, InputError

__all__ = ["main", "build_parser"]


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--cluster", choices=["local", "cuda", "slurm", "kubernetes", "none"], default=None,
                   help="where to run: a distributed.LocalCluster (default), dask-cuda GPUs, SLURM, Kubernetes; "
                        "'none' uses Dask's threaded scheduler in this process")
    g.add_argument("--workers", type=int, default=None, help="number of local workers (default: one per core)")
    g.add_argument("--threads-per-worker", type=int, default=None)


def _cluster_config(args, base: dict | None = None):
    from .cluster import ClusterConfig

    d = dict(base or {})
    if getattr(args, "cluster", None):
        d["kind"] = args.cluster
    if getattr(args, "workers", None):
        d["n_workers"] = args.workers
    if getattr(args, "threads_per_worker", None):
        d["threads_per_worker"] = args.threads_per_worker
    if d.get("kind") == "none":
        return None
    return ClusterConfig.from_dict(d)


def _maybe_client(cfg):
    """A client context for ``cfg``, or a no-op context for the in-process scheduler."""
    import contextlib

    from .cluster import client_for

    if cfg is None:  # Dask's threaded scheduler in this process: one torch/OpenCV thread per task
        from .cluster import limit_threads

        limit_threads()
        return contextlib.nullcontext()
    return client_for(cfg, announce=lambda m: print(m, file=sys.stderr))


# --------------------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from .simulate_job import SimulationConfig, run_simulation

    cfg = SimulationConfig(
        volume=args.volume, out=args.out, n_micrographs=args.n_micrographs, particles=args.particles,
        seed=args.seed, snr=args.snr, views=args.views, pixel_size=args.pixel_size,
        micrograph_size=args.micrograph_size, box=args.box, particles_per_micrograph=args.per_micrograph,
        defocus_min_um=args.defocus[0], defocus_max_um=args.defocus[1], astigmatism_A=args.astigmatism,
        bfactor=args.bfactor, ctf=not args.no_ctf, max_shift_px=args.max_shift,
        ice_gradient=args.ice_gradient, carbon_edge=args.carbon_edge, symmetry=args.symmetry,
    )
    with _maybe_client(_cluster_config(args)):
        summary = run_simulation(cfg)
    from .report import write_report
    from .simulate_report import montage

    figs = []
    if summary["mode"] == "micrographs":
        figs.append(("micrographs and particles (ground-truth centres marked)", montage(Path(args.out))))
    write_report(args.out, {"simulate": {k: v for k, v in summary.items() if k != "config"},
                            "config": summary["config"]}, figs)
    print(f"simulated {summary['n_particles']} particles"
          + (f" in {summary['n_micrographs']} micrographs" if summary["mode"] == "micrographs" else "")
          + f" -> {args.out} (truth: {summary['truth_star']})")
    return 0


def cmd_run(args) -> int:
    from .collection import cmd_run_collection, is_collection
    from .pipeline import RunConfig, run_pipeline

    if is_collection(args.config):  # a YAML with a 'datasets:' list
        return cmd_run_collection(args, _cluster_config)
    cfg = RunConfig.load(args.config, overrides={
        "micrographs": args.micrographs, "pixel_size": args.pixel_size, "diameter": args.diameter,
        "symmetry": args.symmetry, "out": args.out, "seed": args.seed, "truth": args.truth,
        "stages": args.stages, "voltage": args.voltage, "cs": args.cs,
        "amplitude_contrast": args.amplitude_contrast,
        "pick": {"method": args.pick_method} if args.pick_method else None,
    })
    ccfg = _cluster_config(args, cfg.cluster)
    rep = run_pipeline(cfg, ccfg)
    print(f"done: {rep.get('summary', '')} -> {cfg.out}/report.html")
    return 0 if not rep.get("failed") else 1


def cmd_demo(args) -> int:
    from .demo import run_demo

    rep = run_demo(Path(args.out), _cluster_config(args, {"n_workers": args.workers} if args.workers else None),
                   quick=args.quick)
    print(f"demo finished in {rep['total_seconds']:.0f} s -> {args.out}/report.html")
    return 0


def cmd_cluster_show_script(args) -> int:
    from .cluster import ClusterConfig, kubernetes_cluster_spec, slurm_job_script

    base = {}
    if args.config:
        import yaml

        base = (yaml.safe_load(Path(args.config).read_text()) or {}).get("cluster", {})
    base["kind"] = args.cluster
    cfg = ClusterConfig.from_dict(base)
    if args.cluster == "slurm":
        print(slurm_job_script(cfg))
    else:
        import yaml

        print(yaml.safe_dump(kubernetes_cluster_spec(cfg), sort_keys=False))
    return 0


# --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cryodask", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--version", action="version", version=f"cryodask {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("simulate", help="simulate micrographs or a particle stack with complete ground truth",
                       description="Simulate a dataset with ground truth: projections of a phantom (apoferritin, "
                                   "klh) or an MRC map, with CTF and noise, into micrographs or a particle stack.")
    s.add_argument("--volume", default="apoferritin", help="apoferritin | klh | PATH.mrc")
    s.add_argument("--n-micrographs", type=int, default=10)
    s.add_argument("--particles", type=int, default=None, help="stack mode: simulate N boxed particles (no micrographs)")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--snr", type=float, default=0.1, help="signal variance / noise variance over the particle box")
    s.add_argument("--views", choices=["all", "top", "side", "both"], default="all",
                   help="all: uniform orientations; top / side: end-on / side-on views of the volume's z "
                        "axis (±6°); both: 40%% top and 60%% side views (KLH-like)")
    s.add_argument("--pixel-size", type=float, default=None, help="Å/px (default: per phantom, or the map header)")
    s.add_argument("--micrograph-size", type=int, default=1024, help="px (square)")
    s.add_argument("--box", type=int, default=None, help="particle box, px (default ~1.6× the diameter)")
    s.add_argument("--per-micrograph", type=int, default=None, help="particles per micrograph (default: ~30%% coverage)")
    s.add_argument("--defocus", type=float, nargs=2, default=(1.0, 2.5), metavar=("MIN", "MAX"), help="µm")
    s.add_argument("--astigmatism", type=float, default=0.0, help="max |U−V|, Å")
    s.add_argument("--bfactor", type=float, default=0.0, help="Å²")
    s.add_argument("--no-ctf", action="store_true")
    s.add_argument("--max-shift", type=float, default=0.0, help="stack mode: origins uniform in ±px")
    s.add_argument("--ice-gradient", type=float, default=0.0, help="background ramp amplitude, in noise σ")
    s.add_argument("--carbon-edge", action="store_true")
    s.add_argument("--symmetry", default=None, help="point group recorded for the volume (default: the phantom's)")
    _add_cluster_args(s)
    s.set_defaults(func=cmd_simulate)

    r = sub.add_parser("run", help="run the whole pipeline: micrographs -> picks -> particles -> 3D map",
                       description="Run the pipeline from a YAML config and/or flags (flags override the file).")
    r.add_argument("config", nargs="?", default=None, help="YAML run configuration (or a collection of datasets)")
    r.add_argument("--micrographs", nargs="+", default=None, help="paths or globs")
    r.add_argument("--pixel-size", type=float, default=None, help="Å/px")
    r.add_argument("--diameter", type=float, default=None, help="particle outer diameter, Å")
    r.add_argument("--symmetry", default=None, help="C1, Cn, Dn, T, O or I")
    r.add_argument("--voltage", type=float, default=None, help="kV (default 300)")
    r.add_argument("--cs", type=float, default=None, help="spherical aberration, mm (default 2.7)")
    r.add_argument("--amplitude-contrast", type=float, default=None, help="(default 0.1)")
    r.add_argument("--pick-method", choices=["ibc", "deep"], default=None, help="picker (default ibc)")
    r.add_argument("--out", default=None)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--truth", default=None, help="ground-truth folder of a simulation (adds accuracy figures)")
    r.add_argument("--stages", default=None, help="comma-separated subset of stages to run")
    _add_cluster_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="simulate a small apoferritin-like dataset and run every stage on it")
    d.add_argument("--out", default="demo")
    d.add_argument("--quick", action="store_true", help="an even smaller dataset (for tests)")
    _add_cluster_args(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("cluster", help="cluster utilities (dry runs of batch-system job scripts)")
    csub = c.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    cs = csub.add_parser("show-script", help="print the SLURM job script / Kubernetes cluster spec a run would use")
    cs.add_argument("config", nargs="?", default=None, help="run YAML whose 'cluster:' section to use")
    cs.add_argument("--cluster", choices=["slurm", "kubernetes"], default="slurm")
    cs.set_defaults(func=cmd_cluster_show_script)

    from . import cli_stages

    cli_stages.register(sub, _add_cluster_args)
    from . import cli_pick

    cli_pick.register(sub, _add_cluster_args)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .runtime import setup_logging

    setup_logging(None, debug=args.debug)
    try:
        return int(args.func(args) or 0)
    except (InputError, CryodaskError) as e:
        if args.debug:
            raise
        print(f"cryodask {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - last-resort handler for the CLI
        if args.debug:
            raise
        print(f"cryodask {args.command}: internal error: {type(e).__name__}: {e} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
