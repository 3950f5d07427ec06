"""Median training-step times (``time.thread_time``, one thread) of a few families, as one JSON line, for
before / after comparisons of a change: run it alternately at two commits (separate processes, same
machine state) and compare the medians of the runs. Same step as the speed benchmark (5 layers, hidden
(64, 64), batch 512, Adam), without peers or profiling.

    for i in 1 2 3; do for d in base after; do (cd /tmp && PYTHONPATH=/path/to/$d \\
        python /path/to/benchmarks/bench_step_times.py --label $d); done; done > times.jsonl
"""

import argparse
import json
import statistics
import time
import warnings

import torch

from pyro_flows.experiments.bench import speed_step
from pyro_flows.experiments.data import synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="quar,autm_coupling,autm_autoregressive")
    parser.add_argument("--tasks", default="density,guide")
    parser.add_argument("--dims", default="8,32")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    out = {"label": args.label}
    for family in args.families.split(","):
        for task in args.tasks.split(","):
            for dim in (int(d) for d in args.dims.split(",")):
                step = speed_step(family, dim, task, synthetic(dim, 512, seed=0))
                for _ in range(3):
                    step.step()
                times = []
                for _ in range(args.steps):
                    t = time.thread_time()
                    step.step()
                    times.append(time.thread_time() - t)
                out[f"{family} {task} {dim}"] = 1e3 * statistics.median(times)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
