"""Command line: ``python -m pyro_flows demo`` (the main job) and ``python -m pyro_flows bench``.

``demo`` trains SVI guides on eight schools (centred: AutoNormal, AutoMultivariateNormal and the default
``AutoFlow``, same CPU time each) and flow families as density estimators on a 2-D toy density, prints a
table and writes plots (see :mod:`pyro_flows.demo`). ``bench`` runs the
benchmarks of :mod:`pyro_flows.experiments.bench` (``bench --help``: ``--what speed,nll,vi,particles``,
``--family``, ``--quick``, ...).
"""

from __future__ import annotations

import argparse
import sys


def _demo_parser(sub):
    from pyro_flows.datasets import TABLE_DATASETS, TOY_DATASETS

    p = sub.add_parser(
        "demo",
        help="SVI guides on eight schools and flows as density estimators; print a table, write plots",
        description=(
            "(a) SVI guides on eight schools, centred (AutoNormal, AutoMultivariateNormal and the default "
            "AutoFlow, the same CPU time each): ELBO, PSIS k-hat, and mu / tau against the reference "
            "posterior; (b) flow families as density estimators on built-in 2-D toy densities (test NLL next "
            "to the exact entropy floor). Prints a table and writes results.md, results.json and PNG plots "
            "(learned densities, samples, loss curves, guide samples) to --output. Nothing is downloaded. "
            "The default run takes under about 3 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--family",
        action="append",
        metavar="NAME",
        help="flow family for density estimation; repeatable or a comma list, or 'all' (every registered "
        "family). Default: quar,qlf (the fastest learners, so each trains long enough to be judged). Pyro "
        "baselines pyro.spline_coupling, pyro.affine_coupling, pyro.spline_autoregressive, "
        "pyro.affine_autoregressive are accepted too",
    )
    p.add_argument(
        "--dataset",
        action="append",
        metavar="NAME",
        help=f"data set for density estimation; repeatable or a comma list. Default: "
        f"8gaussians. Toy: {', '.join(TOY_DATASETS)}; tables: "
        f"{', '.join(TABLE_DATASETS)}",
    )
    p.add_argument(
        "--svi-guides",
        action="append",
        metavar="NAME",
        help="SVI guides on eight schools; repeatable or a comma list of AutoNormal, AutoMultivariateNormal, "
        "AutoFlow (the default family) and family names. Default: AutoNormal,AutoMultivariateNormal,AutoFlow",
    )
    p.add_argument(
        "--svi-seconds", type=float, default=20.0, help="process CPU seconds of SVI training per guide"
    )
    p.add_argument("--steps", type=int, default=20000, help="at most this many training steps per density task")
    p.add_argument("--svi-steps", type=int, default=None, help="at most this many SVI steps per guide")
    p.add_argument("--layers", type=int, default=4, help="layers (blocks) per flow")
    p.add_argument(
        "--time-budget",
        type=float,
        default=140.0,
        help="process CPU seconds for the whole run (one thread: the wall time on an idle machine): the SVI "
        "guides get --svi-seconds each (at most 35%% of this together), each density task an equal share of "
        "what is left (0: no limit; --steps decides)",
    )
    p.add_argument("--no-svi", action="store_true", help="skip the SVI (eight schools) part")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--output", default="pyro_flows_demo", help="folder for the table and plots")
    p.add_argument("--seed", type=int, default=0, help="seed for data, initialisation and training")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 is fastest for these small tensors on a CPU; "
        "0 leaves torch's own setting)",
    )
    return p


def _bench_main(argv):
    from pyro_flows.experiments.bench import main as bench_main

    return bench_main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="python -m pyro_flows",
        description="pyro_flows: exact normalizing flows for Pyro. Subcommands: demo (the main job), "
        "bench (benchmarks against Pyro's built-ins and zuko).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    _demo_parser(sub)
    sub.add_parser(
        "bench", help="benchmarks against Pyro's built-ins and zuko (see bench --help)", add_help=False
    )
    if argv and argv[0] == "bench":
        return _bench_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pyro_flows.demo import check_options, run_demo

    try:
        check_options(args.family, args.dataset, args.steps, args.svi_steps, args.device, args.svi_guides)
        if args.svi_seconds <= 0:
            raise ValueError(f"--svi-seconds must be positive, got {args.svi_seconds}")
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
    except ValueError as e:
        parser.exit(2, f"python -m pyro_flows demo: error: {e}\n")
    run_demo(
        families=args.family,
        datasets=args.dataset,
        steps=args.steps,
        svi_steps=args.svi_steps,
        num_layers=args.layers,
        device=args.device,
        output=args.output,
        seed=args.seed,
        time_budget=args.time_budget,
        progress=not args.no_progress,
        plots=not args.no_plots,
        svi=not args.no_svi,
        svi_guides=args.svi_guides,
        svi_seconds=args.svi_seconds,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
