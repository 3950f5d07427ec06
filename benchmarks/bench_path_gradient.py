"""What ``AutoFlow(path_gradient=True)`` costs per SVI step (the numbers in ``docs/autoflow.md``).

The particle benchmark's model (hierarchical regression, latent dimension 12, ``pyro_flows.experiments.vi``),
``AutoFlow(model, warmup=0)`` (the flow on from the first step, so every step pays the path gradient's inverse)
with and without ``path_gradient``, ``AutoFlow.optimizer()``, ``Trace_ELBO`` with N vectorised particles. The two
guides are timed round robin in one process (medians of ``--repeats`` steps); only their ratio is meaningful on
a shared machine. One thread. Writes ``benchmarks/results/path_gradient_cost.md``.

    python benchmarks/bench_path_gradient.py [--particles 1,16,256] [--repeats 21] [--family autm_autoregressive]
"""

import argparse
import os
import warnings

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_flows.experiments import measure, reports
from pyro_flows.experiments.vi import regression_data, regression_model
from pyro_flows.infer import AutoFlow


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", default="1,16,256")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--family", default=None, help="AutoFlow's flow (default: its default family)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "path_gradient_cost.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = regression_data("cpu")
    store = pyro.get_param_store()
    rows = []
    for n in [int(p) for p in args.particles.split(",")]:
        steps = {}
        for path_gradient in (False, True):
            with store.scope() as state:
                torch.manual_seed(0)
                guide = AutoFlow(regression_model, args.family, warmup=0, path_gradient=path_gradient)
                svi = SVI(regression_model, guide, AutoFlow.optimizer(),
                          Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1))
                svi.step(*data)  # builds the parameters

            def step(svi=svi, state=state):
                with store.scope(state):
                    return svi.step(*data)

            steps[path_gradient] = step
        times, _ = measure.time_interleaved(steps, repeats=args.repeats, warmup=2)
        rows.append((n, times[False], times[True]))
        print(f"N={n}: {1e3 * times[False]:.1f} ms -> {1e3 * times[True]:.1f} ms", flush=True)
    family = args.family or "the default family"
    lines = ["# The path-derivative gradient's cost per SVI step", "",
             f"Command: `python benchmarks/bench_path_gradient.py --particles {args.particles} --repeats "
             f"{args.repeats}" + (f" --family {args.family}" if args.family else "") + "`. "
             f"`AutoFlow(model, warmup=0)` ({family}) on the particle benchmark's regression model (D = 12), "
             "`Trace_ELBO` with N vectorised particles, one thread, medians of interleaved steps.", "",
             "| N | step | step with `path_gradient=True` | ratio |", "|---|---|---|---|"]
    lines += [f"| {n} | {1e3 * a:.1f} ms | {1e3 * b:.1f} ms | {b / a:.2f} |" for n, a, b in rows]
    text = "\n".join(lines) + "\n"
    print(f"wrote {reports.write_text(args.out, text)}")


if __name__ == "__main__":
    main()
