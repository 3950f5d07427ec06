"""AUTM flows against Pyro's affine and spline autoregressive flows, side by side in one run.

For D in {2, 8, 32}, stacks of ``--layers`` layers with the same hidden sizes (reverse permutations
between layers), batch ``--batch``, float32, on one thread:

* density-estimation step: ``-log p(data)`` (Pyro's direction: every layer is inverted), backward,
  Adam step;
* sampling throughput: ``sample((n,))`` without gradients (the explicit forward direction);
* inverse cost vs forward cost of the stack (no gradients).

Ratios are to ``pyro.affine_autoregressive`` measured in the same process. Writes
``benchmarks/results/autm.md``.

Run: ``python benchmarks/bench_autm.py`` (about 3-4 minutes on one core).
"""

from __future__ import annotations

import argparse
import os
import sys

import pyro.distributions as dist
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    machine_line,
    markdown_table,
    pyro_peer,
    standard_normal,
    time_fn,
    write_result,
)

import pyro_flows  # noqa: E402

REFERENCE = "pyro.affine_autoregressive"


def build(name, dim, layers, hidden, g, num_steps):
    if name.startswith("pyro."):
        return pyro_peer(name, dim, layers, hidden)
    return pyro_flows.flow(name, dim, num_layers=layers, hidden_dims=list(hidden), g=g, num_steps=num_steps)


def measure(name, dim, args):
    torch.manual_seed(0)
    t = build(name, dim, args.layers, args.hidden, args.g, args.num_steps)
    d = dist.TransformedDistribution(standard_normal(dim), list(t.parts))
    data = 1.5 * torch.randn(args.batch, dim)
    opt = torch.optim.Adam(t.parameters(), lr=1e-3)

    def de_step():
        loss = -d.log_prob(data.clone()).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample():
        with torch.no_grad():
            d.sample((args.samples,))

    x = torch.randn(args.batch, dim)
    with torch.no_grad():
        y = t(x)

    def fwd():
        with torch.no_grad():
            t(x.clone())

    def inv():
        with torch.no_grad():
            t.inv(y.clone())

    kw = dict(repeats=args.repeats, warmup=1)
    return {
        "flow": name,
        "D": dim,
        "de_ms": 1e3 * time_fn(de_step, **kw),
        "samples_per_s": args.samples / time_fn(sample, **kw),
        "fwd_ms": 1e3 * time_fn(fwd, **kw),
        "inv_ms": 1e3 * time_fn(inv, **kw),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--samples", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--g", default="cubic")
    p.add_argument("--num-steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    flows = ["autm_autoregressive", "autm_coupling", "pyro.spline_autoregressive", REFERENCE]
    rows = []
    for dim in args.dims:
        block = [measure(name, dim, args) for name in flows]
        ref = next(r for r in block if r["flow"] == REFERENCE)
        for r in block:
            r["de_ratio"] = r["de_ms"] / ref["de_ms"]
            r["sample_ratio"] = r["samples_per_s"] / ref["samples_per_s"]
            r["inv_over_fwd"] = r["inv_ms"] / r["fwd_ms"]
            print(r, flush=True)
        rows += block

    columns = [
        ("D", "D", None),
        ("flow", "flow", None),
        ("de_ms", "DE step (ms)", "{:.1f}"),
        ("de_ratio", "DE step / affine", "{:.2f}"),
        ("samples_per_s", "samples/s", "{:.0f}"),
        ("sample_ratio", "sampling / affine", "{:.2f}"),
        ("fwd_ms", "forward (ms)", "{:.2f}"),
        ("inv_ms", "inverse (ms)", "{:.2f}"),
        ("inv_over_fwd", "inverse / forward", "{:.1f}"),
    ]
    cmd = "python benchmarks/bench_autm.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        "# AUTM vs Pyro's autoregressive flows",
        "",
        f"Machine: {machine_line()}",
        "",
        f"Command: `{cmd.strip()}`",
        "",
        f"Stacks of {args.layers} layers, hidden sizes {args.hidden}, reverse permutations between layers; "
        f"AUTM g={args.g!r}, num_steps={args.num_steps}; batch {args.batch}, float32. "
        "DE step = -log p(data) in Pyro's direction (every layer inverted) + backward + Adam step; "
        f"sampling = sample(({args.samples},)) without gradients; inverse/forward = the stack's inverse "
        "time over its forward time (no gradients). Ratios are to pyro.affine_autoregressive in the same run "
        f"(median of {args.repeats} runs after one warm-up).",
        "",
        markdown_table(rows, columns),
        "",
    ])
    path = write_result("autm.md", text)
    print(text)
    print("wrote", path)


if __name__ == "__main__":
    main()
