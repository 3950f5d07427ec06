"""What the sync-free Lipschitz bound costs per training step: ``bound="power"`` against the exact ``"spectral"``
bound for the families that have both (QuAR, AUTM coupling and autoregressive), at the speed benchmark's
sizes (5 layers, hidden (64, 64), batch 512, one thread), density and guide steps timed interleaved in one
process. ``docs/bounds.md`` quotes it.

    python benchmarks/bench_bound_cost.py [--dims 8,32] [--repeats 9]
"""

import argparse
import warnings

import torch

from pyro_flows.experiments import measure
from pyro_flows.experiments.bench import speed_step
from pyro_flows.experiments.data import synthetic

FAMILIES = ("autm_coupling", "autm_autoregressive", "quar")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="8,32")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    print("| D | task | family | exact bound: step | power / exact | host syncs (exact / power) |")
    print("|---|---|---|---|---|---|")
    for dim in (int(d) for d in args.dims.split(",")):
        for task in ("density", "guide"):
            x = synthetic(dim, 512, seed=0)
            steps = {}
            for name in FAMILIES:
                for bound in ("spectral", "power"):
                    steps[(name, bound)] = speed_step(name, dim, task, x, bound=bound)
            t, _ = measure.time_interleaved({k: s.step for k, s in steps.items()}, repeats=args.repeats, warmup=2)
            for name in FAMILIES:
                syncs = [measure.count_syncs(steps[(name, b)].forward_backward) for b in ("spectral", "power")]
                print(f"| {dim} | {task} | {name} | {1e3 * t[(name, 'spectral')]:.1f} ms | "
                      f"{t[(name, 'power')] / t[(name, 'spectral')]:.2f} | {syncs[0]} / {syncs[1]} |", flush=True)


if __name__ == "__main__":
    main()
