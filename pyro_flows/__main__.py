"""Command line: ``python -m pyro_flows demo`` (the main job) and ``python -m pyro_flows bench``.

``demo`` trains every registered family as a density estimator on 2-D toy densities and as an SVI guide
on eight schools, prints a table and writes plots (see :mod:`pyro_flows.demo`). ``bench`` runs the
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
        help="train every family on toy densities and as an SVI guide; print a table, write plots",
        description=(
            "Train each registered flow family (a) as a density estimator on built-in 2-D toy densities "
            "(test NLL next to the exact entropy floor) and (b) as an SVI guide on eight schools (ELBO, "
            "PSIS k-hat, against AutoNormal). Prints a table and writes results.md, results.json and PNG "
            "plots (learned densities, samples, loss curves, guide samples) to --output. Nothing is "
            "downloaded. The default run takes under about 3 minutes on 2 CPU cores."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--family",
        action="append",
        metavar="NAME",
        help="flow family to train; repeatable or a comma list. Default: every registered "
        "family (pyro_flows.FLOWS). Pyro baselines pyro.spline_coupling, "
        "pyro.affine_coupling, pyro.spline_autoregressive, pyro.affine_autoregressive "
        "are accepted too",
    )
    p.add_argument(
        "--dataset",
        action="append",
        metavar="NAME",
        help=f"data set for density estimation; repeatable or a comma list. Default: "
        f"8gaussians,checkerboard. Toy: {', '.join(TOY_DATASETS)}; tables: "
        f"{', '.join(TABLE_DATASETS)}",
    )
    p.add_argument("--steps", type=int, default=400, help="training steps per density task")
    p.add_argument("--svi-steps", type=int, default=None, help="SVI steps (default: --steps)")
    p.add_argument("--layers", type=int, default=4, help="layers (blocks) per flow")
    p.add_argument(
        "--time-budget",
        type=float,
        default=140.0,
        help="wall-clock seconds for the whole run: each training task gets an equal share "
        "of what is left and stops early when it is used (0: no limit; --steps decides)",
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
        check_options(args.family, args.dataset, args.steps, args.svi_steps, args.device)
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
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
