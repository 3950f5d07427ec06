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
from pyro_flows.experiments.bench import _step_loss
from pyro_flows.experiments.data import synthetic
from pyro_flows.experiments.models import FlowModel


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
        torch.manual_seed(0)
        m = FlowModel(args.family, dim, num_layers=5, hidden_dims=[64, 64], task=args.task)
        step = measure.TrainingStep(_step_loss(m, args.task, x), m.parameters())
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
