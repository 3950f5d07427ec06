"""The banana with many particles: the path gradient against the usual one at 64 and 256 vectorised particles.

``bench_banana.fit`` (the default ``AutoFlow``, ``AutoFlow.optimizer()``, 1500 steps, KL(q || p) from 8000 draws,
s.e. ~0.01 nats) with ``path_gradient=False`` and with the default (``"auto"``: the path gradient under
``Trace_ELBO``), seeds 0-3. One thread. Prints one line per setting (the numbers in ``docs/autoflow.md``,
``benchmarks/results/banana_particles.md``)::

    python benchmarks/bench_banana_particles.py 256; python benchmarks/bench_banana_particles.py 64
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_banana import fit  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    for pg in (False, "auto"):
        res = [fit(s, 1500, n, None, False, path_gradient=pg) for s in range(4)]
        print(f"N={n} path_gradient={pg}: KL", " / ".join(f"{r[0]:.3f}" for r in res),
              f"cpu s per fit {sum(r[1] for r in res) / 4:.1f}", flush=True)
