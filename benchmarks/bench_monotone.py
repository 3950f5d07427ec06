"""Monotone Flow (exact and stochastic log-det) against Pyro's affine_autoregressive and our other families.

The questions (issue 6): what does a Monotone Flow cost per training step and per ``log_prob`` in its two
log-det modes, how many fixed-point iterations do its solves take, and how fast does it sample, next to
Pyro's ``affine_autoregressive`` (MAF orientation: ``log_prob`` analytic) and every other family registered
in ``pyro_flows.FLOWS`` at run time, at D = 2, 8, 32. All in one process, as ratios to the Pyro peer.

Every model is a stack of ``--layers`` layers (reverse permutations between them), first trained
``--steps`` Adam steps of maximum likelihood (so the solves see trained, non-trivial maps), then measured:

* ``train ms``: one density-estimation step (``-log p`` of a batch of 256, backward, Adam);
* ``log_prob ms``: ``log_prob`` of 1000 external points under ``no_grad`` (for Monotone: inverse solves +
  log-det; in stochastic mode one Russian-roulette/Hutchinson draw);
* ``sample/s``: samples per second drawing 1000 under ``no_grad`` (Monotone: forward solves only; Pyro's
  MAF: D sequential passes per layer);
* ``it. inv / fwd``: Monotone's fixed-point iterations per block (mean over blocks) in ``log_prob``
  (inverse direction) and in sampling (forward direction); Anderson acceleration, tolerance 1e-6
  (float32);
* ``test NLL``: on 2000 held-out points (stochastic mode: one unbiased draw of it);
* ratios ``x MAF``: time over ``pyro.affine_autoregressive``'s at the same D (> 1: slower).

Sizes: Monotone and Pyro's MAF use hidden widths ``[--hidden] * 2``; the other families use their
defaults (their parameter counts are listed). Monotone's log-det is exact (dense Jacobian, ``logdet="exact"``)
or stochastic (``logdet="stochastic"``) at every D here, so both modes are visible at every size (the
library's default ``"auto"`` is exact for D <= 16).

Data: ``8gaussians`` for D = 2; for D = 8, 32 a fixed random rotation of independent bimodal coordinates.

Run (about 4-5 minutes on one idle core)::

    python benchmarks/bench_monotone.py              # writes benchmarks/results/monotone.md
    python benchmarks/bench_monotone.py --dims 2 --steps 10 --repeats 2 --out monotone_smoke.md
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import pyro.distributions as dist
import torch

from common import (density_step, machine_line, make_data, markdown_table, pyro_peer, standard_normal,
                    time_fn, write_result)

import pyro_flows

PEER = "pyro.affine_autoregressive"


def entries(families):
    """(label, family, kwargs) for every model measured."""
    out = [("monotone (exact)", "monotone", {"logdet": "exact"}),
           ("monotone (stochastic)", "monotone", {"logdet": "stochastic"}),
           (PEER, PEER, {})]
    out += [(f, f, {}) for f in families if f != "monotone"]
    return out


def build(family, dim, args, kwargs):
    base = standard_normal(dim)
    if family == PEER:
        m = pyro_peer(PEER, dim, num_layers=args.layers, hidden=(args.hidden, args.hidden))
        return m, dist.TransformedDistribution(base, [m.inv])  # MAF: log_prob analytic
    if family == "monotone":
        kwargs = dict(kwargs, hidden_dims=[args.hidden, args.hidden], lipschitz=args.lipschitz)
    m = pyro_flows.flow(family, dim, num_layers=args.layers, **kwargs)
    return m, dist.TransformedDistribution(base, list(m.parts))


def solver_iterations(module, fn):
    """Mean fixed-point iterations per Monotone block while running ``fn()``."""
    blocks = [p for p in getattr(module, "parts", []) if hasattr(p, "last_solver_info")]
    if not blocks:
        return None
    for b in blocks:
        b.last_solver_info = None
    fn()
    its = [b.last_solver_info.iterations for b in blocks if b.last_solver_info is not None]
    return sum(its) / len(its) if its else None


def measure(label, family, kwargs, dim, args):
    torch.manual_seed(0)
    module, d = build(family, dim, args, kwargs)
    train, test = make_data(dim, 20_000, seed=0), make_data(dim, 2000, seed=1)
    ext = test[:1000].clone()
    step = density_step(d, module, train, lr=args.lr)

    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_s = time.perf_counter() - t0
    row = {"flow": label, "D": dim, "params": sum(p.numel() for p in module.parameters())}
    row["train_ms"] = 1e3 * time_fn(step, repeats=args.repeats, warmup=1)

    def log_prob():
        with torch.no_grad():
            return d.log_prob(ext.clone())

    def sample():
        with torch.no_grad():
            return d.sample((1000,))

    row["logprob_ms"] = 1e3 * time_fn(log_prob, repeats=args.repeats, warmup=1)
    row["sample_per_s"] = 1000 / time_fn(sample, repeats=args.repeats, warmup=1)
    if family == "monotone":
        inv = solver_iterations(module, log_prob)
        fwd = solver_iterations(module, sample)
        row["iters"] = f"{inv:.1f} / {fwd:.1f}"
    with torch.no_grad():
        row["nll"] = -d.log_prob(test.clone()).mean().item()
    row["train_total_s"] = train_s
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lipschitz", type=float, default=0.9)
    parser.add_argument("--steps", type=int, default=40, help="training steps before measuring")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="*", default=None,
                        help="our other families to include (default: all of pyro_flows.FLOWS)")
    parser.add_argument("--out", default="monotone.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    families = pyro_flows.FLOWS if args.families is None else args.families
    rows = []
    t_start = time.perf_counter()
    for dim in args.dims:
        dim_rows = []
        for label, family, kw in entries(families):
            try:
                r = measure(label, family, kw, dim, args)
            except Exception as e:  # a family that fails is reported, not fatal
                traceback.print_exc()
                r = {"flow": label, "D": dim, "iters": f"error: {type(e).__name__}"}
            dim_rows.append(r)
            print(r, file=sys.stderr, flush=True)
        peer = next(r for r in dim_rows if r["flow"] == PEER)
        for r in dim_rows:
            for key, ratio in (("train_ms", "train_x"), ("logprob_ms", "logprob_x")):
                if r.get(key) is not None and peer.get(key):
                    r[ratio] = r[key] / peer[key]
            if r.get("sample_per_s") and peer.get("sample_per_s"):
                r["sample_x"] = peer["sample_per_s"] / r["sample_per_s"]  # time ratio
        rows += dim_rows
    total = time.perf_counter() - t_start
    columns = [
        ("flow", "flow", None), ("D", "D", None), ("params", "params", None),
        ("train_ms", "train ms", "{:.1f}"), ("train_x", "train x MAF", "{:.2f}"),
        ("logprob_ms", "log_prob ms (1000)", "{:.1f}"), ("logprob_x", "log_prob x MAF", "{:.2f}"),
        ("sample_per_s", "sample/s", "{:.0f}"), ("sample_x", "sample time x MAF", "{:.2f}"),
        ("iters", "it. inv / fwd", None), ("nll", "test NLL", "{:.3f}"),
    ]
    cmd = "python benchmarks/bench_monotone.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])
                                                   if (argv if argv is not None else sys.argv[1:]) else "")
    text = "\n".join([
        "# Monotone Flow (exact / stochastic log-det) vs Pyro's MAF and our other families",
        "",
        f"Machine: {machine_line()}; load average {load_start:.1f} at the start, "
        f"{(os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')):.1f} at the end "
        f"(on {os.cpu_count()} cores: absolute times are inflated by other jobs; compare ratios, which are "
        "measured side by side in one run)",
        f"Command: `{cmd}` (total {total:.0f} s)",
        "",
        f"{args.layers} layers each (reverse permutations between them), each model trained {args.steps} Adam "
        f"steps (lr {args.lr}, batch 256) before measuring; Monotone and `{PEER}` with hidden widths "
        f"[{args.hidden}, {args.hidden}] (Monotone: CPila, Lip(G) <= {args.lipschitz}), other families at "
        "their defaults. Times are medians of "
        f"{args.repeats} runs; ratios are to `{PEER}` (MAF orientation: log_prob analytic, sampling D "
        "sequential passes per layer) at the same D, > 1 meaning slower. 'it. inv / fwd' = Monotone's "
        "fixed-point iterations per block in log_prob (inverse solves) / sampling (forward solves), Anderson "
        "acceleration, float32 tolerance. Stochastic mode: one Russian-roulette + Hutchinson draw per "
        "log_prob (its test NLL is one unbiased draw). Data: 8gaussians (D = 2), rotated bimodal (D = 8, 32).",
        "",
        markdown_table(rows, columns),
        "",
    ])
    path = write_result(args.out, text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
