"""Thin entry point: ``python benchmarks/run.py ARGS`` is ``python -m pyro_flows bench ARGS``.

The benchmarks live in :mod:`pyro_flows.experiments.bench` (speed, nll, vi, particles; ``--family`` picks
families, ``--quick`` makes a smoke run); their results are committed under ``benchmarks/results/``.
"""

import sys

from pyro_flows.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main())
