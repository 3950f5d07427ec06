"""Sinusoidal Flow against Pyro's affine_autoregressive (MAF) and spline_autoregressive, side by side.

The question (issue 4): the paper claims *fast inversion of a fully autoregressive flow*. All three
flows here are fully autoregressive stacks of 4 layers with MADE conditioners of the same widths, used
in the density-estimation orientation: ``log_prob`` of data is the analytic direction (Pyro's modules
are wrapped with ``.inv``, i.e. MAF; ours is analytic in ``_inverse`` by default) and sampling is the
hard direction (Pyro: ``D`` sequential MADE passes per layer; ours: the shift fixed points, capped at
``D`` passes, plus Banach/Newton solves of the D-scales). Each model is first trained briefly
(``--steps`` Adam steps of maximum likelihood) so the shifts are not the zero maps of initialisation,
then measured on the same machine in the same process:

* ``train ms``: one density-estimation step (-log p of a batch of 256, backward, Adam);
* ``sample/s``: samples per second drawing 1000 under ``no_grad``;
* ``hard/easy``: time of the hard direction (sampling 1000) over the easy one (log_prob of 1000);
* ``shift it.``: our shift fixed-point iterations per block (mean of lower, upper; the cap is ``D``);
  for Pyro's flows the hard direction always takes ``D`` passes per layer;
* ``D-scale it.``: our Banach iterations + Newton iterations per D-scale (mean);
* ratios to ``pyro.affine_autoregressive`` at the same ``D``.

Data: ``8gaussians`` for D = 2; for D = 8, 32 a random rotation of independent bimodal coordinates
(``0.5 N(-1.5, 0.5^2) + 0.5 N(1.5, 0.5^2)``), so every coordinate depends on every other.

Run (about 3-4 minutes on one core)::

    python benchmarks/bench_sinusoidal.py            # writes benchmarks/results/sinusoidal.md
    python benchmarks/bench_sinusoidal.py --dims 2 --steps 50 --repeats 3   # quick smoke run
"""

from __future__ import annotations

import argparse
import sys
import time

import pyro.distributions as dist
import torch

from common import (density_step, machine_line, make_data, markdown_table, pyro_peer, standard_normal,
                    time_fn, write_result)

import pyro_flows

PEERS = ("pyro.affine_autoregressive", "pyro.spline_autoregressive")


def build(name, dim, layers, hidden):
    """(module with the parameters, distribution in the density-estimation orientation)."""
    base = standard_normal(dim)
    if name == "sinusoidal":
        m = pyro_flows.flow("sinusoidal", dim, num_layers=layers, hidden_dims=[hidden, hidden])
        return m, dist.TransformedDistribution(base, [m])
    m = pyro_peer(name, dim, num_layers=layers, hidden=(hidden, hidden))
    return m, dist.TransformedDistribution(base, [m.inv])  # MAF: log_prob analytic


def measure(name, dim, args):
    torch.manual_seed(0)
    module, d = build(name, dim, args.layers, args.hidden)
    train, test = make_data(dim, 20_000, seed=0), make_data(dim, 2000, seed=1)
    step = density_step(d, module, train, lr=args.lr)

    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    train_s = time.perf_counter() - t0
    row = {"flow": name, "D": dim, "params": sum(p.numel() for p in module.parameters())}
    row["train_ms"] = 1e3 * time_fn(step, repeats=args.repeats, warmup=1)
    with torch.no_grad():
        row["nll"] = -d.log_prob(test.clone()).mean().item()
        easy = time_fn(lambda: d.log_prob(test[:1000].clone()), repeats=args.repeats, warmup=1)
        hard = time_fn(lambda: d.sample((1000,)), repeats=args.repeats, warmup=1)
    row["sample_per_s"] = 1000 / hard
    row["hard_easy"] = hard / easy
    if name == "sinusoidal":
        infos = [b.last_inverse_info for b in module if getattr(b, "last_inverse_info", None)]
        shift = [v for i in infos for v in (i["lower_shift"], i["upper_shift"])]
        fp = [v for i in infos for v in i["dscale_fixed_point"]]
        nt = [v for i in infos for v in i["dscale_newton"]]
        row["shift_it"] = f"{sum(shift) / len(shift):.1f} (max {max(shift)}) / {dim}"
        row["dscale_it"] = f"{sum(fp) / len(fp):.1f} + {sum(nt) / len(nt):.1f}"
        # accuracy of the numerical inverse on the trained model (float32)
        with torch.no_grad():
            z = torch.randn(1000, dim)
            x = module(z)
            row["recon"] = (module.inv(x.clone()) - z).abs().max().item()
    else:
        row["shift_it"] = f"{dim} (sequential)"
        row["dscale_it"] = "-"
    print(f"  {name:28s} D={dim:3d} trained {args.steps} steps in {train_s:.1f}s  nll {row['nll']:.3f}",
          file=sys.stderr)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=300, help="training steps before measuring")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="sinusoidal.md")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dim in args.dims:
        block = [measure(name, dim, args) for name in ("sinusoidal",) + PEERS]
        ref = next(r for r in block if r["flow"] == "pyro.affine_autoregressive")
        for r in block:
            r["train_ratio"] = r["train_ms"] / ref["train_ms"]
            r["sample_ratio"] = ref["sample_per_s"] / r["sample_per_s"]  # time ratio
        rows += block
    columns = [
        ("flow", "flow", None), ("D", "D", None), ("params", "params", None),
        ("nll", "test NLL", "{:.3f}"),
        ("train_ms", "train ms", "{:.2f}"), ("train_ratio", "train x MAF", "{:.2f}"),
        ("sample_per_s", "sample/s", "{:.0f}"), ("sample_ratio", "sample time x MAF", "{:.2f}"),
        ("hard_easy", "hard/easy", "{:.1f}"),
        ("shift_it", "shift it. / D", None), ("dscale_it", "D-scale it. (Banach + Newton)", None),
        ("recon", "f32 recon err", "{:.1e}"),
    ]
    cmd = "python benchmarks/bench_sinusoidal.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# Sinusoidal Flow vs Pyro's autoregressive flows",
        "",
        f"Machine: {machine_line()}",
        f"Command: `{cmd.strip()}`",
        "",
        "Absolute times come from a shared CPU machine with other jobs running (medians of "
        f"{args.repeats}); compare the ratios within this table, not with other tables.",
        "",
        f"{args.layers} layers, MADE hidden widths [{args.hidden}, {args.hidden}] (Sinusoidal: two MADEs per "
        f"block, 4 D-scales of K = 4), each trained {args.steps} Adam steps (lr {args.lr}, batch 256) before "
        "measuring. Times are medians; ratios are to `pyro.affine_autoregressive` (MAF orientation) at "
        "the same D. 'hard/easy' = time to sample 1000 / time of log_prob of 1000 (the inverse/forward "
        "cost ratio). Pyro's hard direction is D sequential MADE passes per layer.",
        "",
        markdown_table(rows, columns),
        "",
    ])
    path = write_result(args.out, text)
    print(text)
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
