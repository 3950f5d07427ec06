"""Constructor settings of a family against test NLL at equal CPU time (the capacity cost of a default).

Each run trains a ``flow(family, D, num_layers=4, **kwargs)`` for density estimation with the shared
trainer for ``--seconds`` of process CPU time on one thread (batch 256, Adam 3e-3 with cosine decay,
gradient-norm clip 100, the NLL benchmark's splits; validation early stopping on the data sets without an
exact entropy), then prints one JSON line with its test NLL. A cheaper setting trains more steps in the
same time, so this is the comparison a speed-motivated default change has to pass. ``--grid`` takes one
JSON object of keyword arguments per setting (``{}`` is the family's defaults); ``--markdown`` also
writes a table (test NLL per data set and setting, the difference to the first setting, steps
trained) with the command that produced it. A string value starting with ``=`` is a Python expression
of the event size ``D`` (with ``max``, ``min``, ``int``), so a size rule can be compared across data sets:
``'{"hidden_dims": "=[10 * D] * 2"}'``. Example, the table in
``benchmarks/results/defaults/sinusoidal.md``::

    python benchmarks/bench_defaults.py --family sinusoidal --seconds 30 \\
        --datasets 8gaussians,checkerboard,wine,breast_cancer \\
        --grid '{"num_scales": 4}' '{"num_scales": 2}' --markdown benchmarks/results/defaults/sinusoidal.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shlex
import sys

import torch

from pyro_flows.experiments.data import density_splits
from pyro_flows.experiments.measure import CpuClock
from pyro_flows.experiments.models import FlowModel
from pyro_flows.experiments.trainer import cosine_decay, density_loss, train


def resolve(kwargs, dim):
    """``kwargs`` with every string value ``"=expr"`` replaced by ``expr`` evaluated at ``D = dim``."""
    names = {"D": dim, "max": max, "min": min, "int": int, "__builtins__": {}}
    return {k: eval(v[1:], names) if isinstance(v, str) and v.startswith("=") else v for k, v in kwargs.items()}


def run(family, dataset, kwargs, seconds, seed=0, num_layers=4):
    """Train one setting for ``seconds`` of CPU time; returns a dict with its test NLL (nats)."""
    splits = density_splits(dataset, seed=seed)
    torch.manual_seed(seed)
    dim = splits.train.shape[-1]
    model = FlowModel(family, dim, num_layers=num_layers, task="density", **resolve(kwargs, dim))
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
    return {"dataset": dataset, "seed": seed, "family": family, "kwargs": kwargs, "steps": res.steps,
            "params": model.num_params(), "test_nll": round(nll, 4)}


def markdown(rows, args, command):
    """A table: per data set (and seed), each setting's test NLL, its difference to the first setting and
    the steps it trained."""
    settings = [json.dumps(g, sort_keys=True) for g in args.grid]
    lines = [
        f"# {args.family}: constructor settings against test NLL at equal CPU time",
        "",
        f"Machine: {platform.machine()}, torch {torch.__version__}, 1 thread, python {platform.python_version()}.  ",
        f"Command: `{command}`  ",
        f"{args.layers} layers, each setting trained for {args.seconds:g} s of process CPU time (batch 256, Adam "
        "3e-3, cosine decay to 3e-4, clip 100; early stopping on validation NLL for the tables). Test NLL in "
        "nats (lower is better); diff: this setting minus the first (a positive diff is a capacity loss).",
        "",
        "| data set | seed | " + " | ".join(f"`{s}` NLL | diff | steps" for s in settings) + " |",
        "|---|---|" + "---|---|---|" * len(settings),
    ]
    by_key = {(r["dataset"], r["seed"], json.dumps(r["kwargs"], sort_keys=True)): r for r in rows}
    for dataset in args.datasets.split(","):
        for seed in args.seed_list:
            first = by_key.get((dataset, seed, settings[0]))
            cells = []
            for s in settings:
                r = by_key.get((dataset, seed, s))
                if r is None:
                    cells += ["", "", ""]
                    continue
                diff = "" if first is None else f"{r['test_nll'] - first['test_nll']:+.4f}"
                cells += [f"{r['test_nll']:.4f}", diff, str(r["steps"])]
            lines.append(f"| {dataset} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, help="a registered family (or a peer name)")
    p.add_argument("--grid", nargs="+", default=["{}"], help="one JSON object of constructor kwargs per setting")
    p.add_argument("--seconds", type=float, default=30.0, help="CPU seconds per run")
    p.add_argument("--datasets", default="8gaussians,checkerboard,wine,breast_cancer")
    p.add_argument("--seeds", default="0")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--markdown", default=None, help="also write a markdown table to this path")
    args = p.parse_args(argv)
    args.grid = [json.loads(g) for g in args.grid]
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets.split(","):
        for seed in args.seed_list:
            for kwargs in args.grid:
                rows.append(run(args.family, dataset, kwargs, args.seconds, seed, args.layers))
                print(json.dumps(rows[-1]), flush=True)
    if args.markdown:
        command = "python benchmarks/bench_defaults.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, args, command))
    return rows


if __name__ == "__main__":
    main()
