"""One training step of a flow, counted: aten ops, ``eigh`` / ``eigvalsh`` calls, host syncs (CPU count,
``measure.count_syncs``), median step time and the loss, at the speed benchmark's sizes (5 layers, hidden
(64, 64), batch 512, one thread). Run it at two commits to compare a change (``docs/monotone.md`` quotes it
at 87ac2be and d68620c for the monotone bound batching).

    python benchmarks/bench_step_profile.py --family monotone --dims 8,32 [--task density]
"""

import argparse
import collections
import statistics
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from pyro_flows.experiments import measure
from pyro_flows.experiments.bench import speed_step
from pyro_flows.experiments.data import synthetic


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="monotone")
    parser.add_argument("--dims", default="8,32")
    parser.add_argument("--task", default="density", choices=("density", "guide"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| flow | D | aten ops | eigh + eigvalsh | host syncs (CPU count) | step ms (median) | loss |")
    print("|---|---|---|---|---|---|---|")
    for dim in (int(d) for d in args.dims.split(",")):
        x = synthetic(dim, 512, seed=0)
        step = speed_step(args.family, dim, args.task, x)
        step.step()
        step.step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step.forward_backward()
        names = collections.Counter(e.name() for e in prof.profiler.kineto_results.events())
        ops = sum(v for k, v in names.items() if k.startswith("aten::"))
        eigh = names["aten::_linalg_eigh"] + names["aten::linalg_eigvalsh"]
        syncs = measure.count_syncs(step.forward_backward)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            step.step()
            times.append(time.perf_counter() - t)
        print(f"| {args.family} | {dim} | {ops} | {eigh} | {syncs} | {1e3 * statistics.median(times):.1f} | "
              f"{float(step.forward_backward()):.4f} |", flush=True)


if __name__ == "__main__":
    main()
