"""How the path gradient's pass applies the AUTM autoregressive layer's inverse Jacobian, against the particles.

The particle benchmark's regression model (D = 12), the default ``AutoFlow(model, warmup=0)``, ``Trace_ELBO`` with
N vectorised particles, one thread. Three steps timed round robin in one process (medians): the usual gradient
(``path_gradient=False``), the path gradient with each draw's Jacobian formed (the certified path), and the path
gradient with the Jacobian applied by sweeps of vector-Jacobian products in the backward pass
(the adjoint iteration of ``solvers.implicit_fixed_point``). The numbers behind
``pyro_flows.transforms.autm.JACOBIAN_FREE_MIN_DRAWS``. Writes ``benchmarks/results/path_gradient_inverse.md``.

    python benchmarks/bench_path_gradient_inverse.py [--particles 1,16,256,4096]
"""

import argparse
import os
import statistics
import time
import warnings

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_flows.transforms.autm as autm
from pyro_flows.experiments import reports
from pyro_flows.experiments.vi import regression_data, regression_model
from pyro_flows.infer import AutoFlow


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", default="1,16,256,4096")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "path_gradient_inverse.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    data = regression_data("cpu")
    store = pyro.get_param_store()
    variants = (("usual gradient", False, None), ("path gradient, Jacobian", "auto", 10**12),
                ("path gradient, sweeps", "auto", 1))
    rows = []
    for n in [int(p) for p in args.particles.split(",")]:
        steps = {}
        for name, pg, threshold in variants:
            with store.scope() as state:
                torch.manual_seed(0)
                guide = AutoFlow(regression_model, warmup=0, path_gradient=pg)
                svi = SVI(regression_model, guide, AutoFlow.optimizer(),
                          Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1))
                svi.step(*data)
            steps[name] = (svi, state, threshold)
        times = {name: [] for name in steps}
        default = autm.JACOBIAN_FREE_MIN_DRAWS
        try:
            for _ in range(15 if n < 1000 else 5):
                for name, (svi, state, threshold) in steps.items():
                    autm.JACOBIAN_FREE_MIN_DRAWS = default if threshold is None else threshold
                    with store.scope(state):
                        t = time.perf_counter()
                        svi.step(*data)
                        times[name].append(time.perf_counter() - t)
        finally:
            autm.JACOBIAN_FREE_MIN_DRAWS = default
        med = {name: 1e3 * statistics.median(v[1:]) for name, v in times.items()}
        rows.append((n, med))
        print(f"N={n}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items()), flush=True)
    base = variants[0][0]
    lines = ["# The path gradient's pass: the inverse Jacobian formed or applied by sweeps", "",
             f"Command: `python benchmarks/bench_path_gradient_inverse.py --particles {args.particles}`. Default "
             "`AutoFlow(model, warmup=0)` on the particle benchmark's regression model (D = 12), `Trace_ELBO` with N "
             "vectorised particles, one thread, medians of interleaved steps; in brackets the ratio to the usual "
             "gradient's step.", "",
             "| N | " + " | ".join(name for name, _, _ in variants) + " |", "|---|" + "---|" * len(variants)]
    lines += [f"| {n} | " + " | ".join(f"{m[name]:.1f} ms ({m[name] / m[base]:.2f}x)" for name, _, _ in variants)
              + " |" for n, m in rows]
    print(f"wrote {reports.write_text(args.out, chr(10).join(lines) + chr(10))}")


if __name__ == "__main__":
    main()
