"""Thin entry point: ``python benchmarks/bench_vi.py ARGS`` is ``python -m pyro_flows bench --what vi ARGS``.

The VI benchmark (flow guides against AutoNormal and AutoMultivariateNormal per CPU second on the nine
posteriordb posteriors, :mod:`pyro_flows.experiments.vi`) writes ``benchmarks/results/vi/``. Options:
``--tier long|short|both``, ``--seconds 10,30,120``, ``--posteriors``, ``--guides``, ``--quick``; run parts in
separate processes with ``--results-part NAME`` and report them together with ``--merge``.
"""

import sys

from pyro_flows.experiments.bench import main

if __name__ == "__main__":
    sys.exit(main(["--what", "vi", *sys.argv[1:]]))
