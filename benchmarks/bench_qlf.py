"""QLF against Pyro's affine_coupling and spline_coupling stacks: training stability, NLL, step time.

Side by side in one process, stacks of equal depth (``--layers`` blocks/layers, the same hidden sizes),
trained by Adam on maximum likelihood (-log p of data, backward, step) at two learning rates:

* ``checkerboard`` (2-D toy, exact entropy ln 32 = 3.466 nats is the floor of the test NLL);
* ``breast_cancer`` (scikit-learn, 569 x 30, standardised with the training moments, fixed-seed
  80/10/10 split by ``pyro_flows.datasets.load_table``; test NLL on the 57 held-out rows).

Reported per (data, lr, flow): median step time (timed after training, the three flows interleaved
round robin so machine-load changes hit all alike) and its ratio to ``pyro.affine_coupling``; final and
best test NLL (test NLL every ``steps/10`` steps); the largest gradient norm seen; and whether training
diverged (a non-finite loss or gradient, or an exception; the run stops there). Writes
``benchmarks/results/qlf.md``.

Usage: ``python benchmarks/bench_qlf.py [--quick]`` (the default run takes a few minutes on one core).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import pyro.distributions as dist
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, markdown_table, pyro_peer, write_result  # noqa: E402

import pyro_flows  # noqa: E402
from pyro_flows.datasets import ENTROPY, load_table, toy_sample  # noqa: E402

FLOWS = ("qlf", "pyro.affine_coupling", "pyro.spline_coupling")
REFERENCE = "pyro.affine_coupling"


def make_flow(name, dim, layers, hidden):
    if name == "qlf":
        return pyro_flows.flow("qlf", dim, num_layers=layers, hidden_dims=list(hidden))
    return pyro_peer(name, dim, num_layers=layers, hidden=hidden)


def data(name, seed=0):
    if name == "checkerboard":
        return toy_sample(name, 20000, seed=seed + 1), toy_sample(name, 5000, seed=seed + 2)
    split = load_table(name, seed=seed)
    return split.train, split.test


def gaussian_reference(data_name):
    """Test NLL of the maximum-likelihood full-covariance Gaussian fitted on the training rows."""
    train_x, test_x = (a.double() for a in data(data_name))
    mvn = torch.distributions.MultivariateNormal(train_x.mean(0), torch.cov(train_x.T, correction=0))
    return -mvn.log_prob(test_x).mean().item()


def train(flow_name, data_name, lr, steps, layers, hidden, batch=256, seed=0):
    """Train one flow; returns its row and a ``step()`` closure for the interleaved timing."""
    train_x, test_x = data(data_name)
    dim = train_x.shape[-1]
    torch.manual_seed(seed)
    t = make_flow(flow_name, dim, layers, hidden)
    base = dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)
    d = dist.TransformedDistribution(base, list(t.parts))
    opt = torch.optim.Adam(t.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 10)
    grad_max, curve, diverged = 0.0, [], ""
    every = max(1, steps // 10)
    for i in range(steps):
        idx = torch.randint(0, train_x.shape[0], (min(batch, train_x.shape[0]),), generator=g)
        try:
            loss = -d.log_prob(train_x[idx]).mean()
            opt.zero_grad()
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(t.parameters(), float("inf")).item()
            if not (math.isfinite(loss.item()) and math.isfinite(gn)):
                diverged = f"non-finite at step {i}"
                break
            opt.step()
        except Exception as e:  # noqa: BLE001 - a peer that raises has diverged too
            diverged = f"{type(e).__name__} at step {i}"
            break
        grad_max = max(grad_max, gn)
        if (i + 1) % every == 0 or i == steps - 1:
            with torch.no_grad():
                nll = -d.log_prob(test_x).mean().item()
            curve.append(nll if math.isfinite(nll) else float("inf"))

    def step():  # one training step on a fresh batch (used only for timing, after training)
        idx = torch.randint(0, train_x.shape[0], (min(batch, train_x.shape[0]),), generator=g)
        loss = -d.log_prob(train_x[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step if not diverged else None, {
        "flow": flow_name,
        "data": data_name,
        "lr": lr,
        "final": curve[-1] if curve and not diverged else None,
        "best": min(curve) if curve else None,
        "grad_max": grad_max,
        "status": diverged or "ok",
        "params": sum(p.numel() for p in t.parameters()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run (smoke test)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    steps = {"checkerboard": 400, "breast_cancer": 300}
    if args.quick:
        steps = {k: 20 for k in steps}
    hidden = (args.hidden, args.hidden)
    rows = []
    for data_name, n in steps.items():
        for lr in args.lrs:
            group, steps_fns = [], []
            for name in FLOWS:
                fn, r = train(name, data_name, lr, n, args.layers, hidden)
                r["steps"] = n
                group.append(r)
                steps_fns.append(fn)
                print(r, flush=True)
            # step time: interleaved round robin after training, so load changes hit every flow alike
            times = [[] for _ in FLOWS]
            for _ in range(3 if args.quick else 15):
                for k, fn in enumerate(steps_fns):
                    if fn is None:
                        continue
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            for r, ts in zip(group, times):
                r["step_ms"] = 1e3 * statistics.median(ts) if ts else None
            ref = next(r for r in group if r["flow"] == REFERENCE)
            for r in group:
                if r["step_ms"] and ref["step_ms"]:
                    r["ratio"] = r["step_ms"] / ref["step_ms"]
            rows += group
    cols = [
        ("data", "data", None), ("lr", "lr", "{:g}"), ("steps", "steps", None), ("flow", "flow", None),
        ("params", "params", None), ("step_ms", "step ms", "{:.1f}"), ("ratio", f"x {REFERENCE}", "{:.2f}"),
        ("final", "final test NLL", "{:.3f}"), ("best", "best test NLL", "{:.3f}"),
        ("grad_max", "max grad norm", "{:.3g}"), ("status", "status", None),
    ]
    cmd = "python benchmarks/bench_qlf.py" + (" --quick" if args.quick else "")
    text = "\n".join([
        "# QLF vs Pyro coupling stacks (training stability, test NLL, step time)",
        "",
        f"Machine: {machine_line()}",
        f"Command: `{cmd}`",
        "",
        f"Stacks of {args.layers} blocks/layers, hidden {list(hidden)} in every conditioner, float32, Adam, "
        "batch 256 (for breast_cancer 256 of the 455 training rows per step). Test NLL in nats per sample, "
        "evaluated every steps/10 steps. Step time: median of the timed training steps (forward, "
        "backward, Adam) after training, 15 rounds interleaved round robin across the three flows, ratio to "
        "pyro.affine_coupling in the same run. "
        f"Floors: checkerboard entropy {ENTROPY['checkerboard']:.4f}. breast_cancer: 30-D standardised, "
        "fixed seed-0 split (455/57/57). Reference (no flow): the maximum-likelihood full-covariance "
        "Gaussian fitted on the training rows scores "
        + ", ".join(f"{k} {gaussian_reference(k):.3f}" for k in steps) + " (test NLL).",
        "",
        markdown_table(rows, cols),
        "",
    ])
    path = write_result("qlf.md" if not args.quick else "qlf_quick.md", text)
    print(text)
    print("wrote", path)


if __name__ == "__main__":
    main()
