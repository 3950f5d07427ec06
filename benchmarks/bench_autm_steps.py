"""AUTM's ``num_steps`` against test NLL at equal CPU time (the capacity cost of fewer steps).

A thin wrapper of ``benchmarks/bench_defaults.py`` (the same runs: a 4-layer ``flow(family, D,
num_steps=K)`` trained for ``--seconds`` of process CPU time on one thread), one JSON line per run with
its ``num_steps`` and test NLL. ``docs/autm.md`` ("Fewer steps") quotes it::

    python benchmarks/bench_autm_steps.py --seconds 30 --families autm_autoregressive,autm_coupling \\
        --datasets 8gaussians,checkerboard,wine,breast_cancer --steps 8,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_defaults import run  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=30.0, help="CPU seconds per run")
    p.add_argument("--families", default="autm_autoregressive,autm_coupling")
    p.add_argument("--datasets", default="8gaussians,checkerboard,wine,breast_cancer")
    p.add_argument("--steps", default="8,4", help="comma list of num_steps")
    p.add_argument("--seeds", default="0")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    for dataset in args.datasets.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            for family in args.families.split(","):
                for k in (int(s) for s in args.steps.split(",")):
                    r = run(family, dataset, {"num_steps": k}, args.seconds, seed)
                    r["num_steps"] = r.pop("kwargs")["num_steps"]
                    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
