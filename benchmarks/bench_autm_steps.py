"""AUTM's ``num_steps`` against test NLL at equal CPU time (the capacity cost of fewer steps).

Each run trains a 4-layer ``flow(family, D, num_steps=K)`` for density estimation with the shared trainer
for ``--seconds`` of process CPU time on one thread (batch 256, Adam 3e-3 with cosine decay, the NLL
benchmark's splits; validation early stopping on the data sets without an exact entropy), then prints
one JSON line with its test NLL. ``docs/autm.md`` ("Fewer steps") quotes it::

    python benchmarks/bench_autm_steps.py --seconds 30 --families autm_autoregressive,autm_coupling \\
        --datasets 8gaussians,checkerboard,wine,breast_cancer --steps 8,4
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import torch

from pyro_flows.experiments.data import density_splits
from pyro_flows.experiments.measure import CpuClock
from pyro_flows.experiments.models import FlowModel
from pyro_flows.experiments.trainer import cosine_decay, density_loss, train


def run(family, dataset, num_steps, seconds, seed=0):
    splits = density_splits(dataset, seed=seed)
    torch.manual_seed(seed)
    model = FlowModel(family, splits.train.shape[-1], num_layers=4, task="density", num_steps=num_steps)
    best = {"val": math.inf, "state": None}
    use_val = splits.floor is None

    def keep_best(info):
        if use_val and (info.step + 1) % 20 == 0:
            with torch.no_grad():
                v = float(-model.log_prob(splits.val.clone()).mean())
            if math.isfinite(v) and v < best["val"]:
                best.update(val=v, state=copy.deepcopy(model.state_dict()))
        return False

    res = train(model, density_loss, (splits.train,), steps=10**9, batch_size=256, lr=3e-3, time_budget=seconds,
                seed=seed, clip_norm=100.0, lr_schedule=cosine_decay(0.1), callback=keep_best, clock=CpuClock(),
                progress=False)
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    with torch.no_grad():
        nll = float(torch.cat([-model.log_prob(c.clone()) for c in splits.test.split(1024)]).mean())
    return {"dataset": dataset, "seed": seed, "family": family, "num_steps": num_steps, "steps": res.steps,
            "test_nll": round(nll, 4)}


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
                    print(json.dumps(run(family, dataset, k, args.seconds, seed)), flush=True)


if __name__ == "__main__":
    main()
