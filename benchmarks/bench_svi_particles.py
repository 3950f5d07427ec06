"""SVI steps per second against the number of vectorised ELBO particles, CPU (and CUDA when available).

One SVI step = ``Trace_ELBO(num_particles=N, vectorize_particles=True)`` on a model with a data plate
(hierarchical regression: 2 global latents, 2 positive scales, 8 group effects, 200 observations; latent
dimension 12), so every flow sees inputs of shape ``(N, 1, D)``. Guides: AutoNormal,
AutoMultivariateNormal, AutoIAFNormal (2 layers), and ``AutoFlow`` for every family in ``pyro_flows.FLOWS``
(2 layers, family defaults). Steps/s is the median over ``--repeats`` timed steps after 2 warm-up steps;
the last column of each table is the ratio to AutoIAFNormal (Pyro's own flow guide) at the same N.
On CUDA the model data and the guide live on the GPU (each step is synchronised before timing).

Usage:
    python benchmarks/bench_svi_particles.py                       # N in 1, 16, 256, 1024, 4096
    python benchmarks/bench_svi_particles.py --particles 1,64,2048 --repeats 3
    python benchmarks/bench_svi_particles.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_line, markdown_table, time_fn, write_result  # noqa: E402

import pyro_flows  # noqa: E402
from pyro_flows.infer import AutoFlow  # noqa: E402


def make_data(device, n=200, groups=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    group = torch.randint(0, groups, (n,), generator=g)
    effect = 0.5 * torch.randn(groups, generator=g)
    y = 1.0 + 2.0 * x + effect[group] + 0.3 * torch.randn(n, generator=g)
    return x.to(device), group.to(device), y.to(device)


def model(x, group, y):
    one = x.new_ones(())
    a = pyro.sample("a", dist.Normal(0 * one, 5 * one))
    b = pyro.sample("b", dist.Normal(0 * one, 5 * one))
    sigma = pyro.sample("sigma", dist.LogNormal(0 * one, one))
    tau = pyro.sample("tau", dist.HalfNormal(one))
    with pyro.plate("groups", 8, dim=-1):
        effect = pyro.sample("effect", dist.Normal(0 * one, tau))
    with pyro.plate("data", y.shape[-1], dim=-1):
        mu = a + b * x + effect[..., group]
        pyro.sample("y", dist.Normal(mu, sigma), obs=y)


def make_guide(kind):
    if kind == "AutoNormal":
        return AutoNormal(model)
    if kind == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model)
    if kind == "AutoIAFNormal":
        return AutoIAFNormal(model, hidden_dim=[24], num_transforms=2)
    return AutoFlow(model, kind, num_layers=2)


def steps_per_second(kind, n, device, repeats):
    pyro.clear_param_store()
    torch.manual_seed(0)
    data = make_data(device)
    guide = make_guide(kind)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.005}),
              Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1))
    t = time_fn(lambda: svi.step(*data), repeats=repeats, warmup=2, device=device)
    return 1.0 / t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", default="1,16,256,1024,4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--guides", default=None)
    ap.add_argument("--devices", default=None, help="e.g. cpu,cuda (default: cpu, plus cuda if available)")
    ap.add_argument("--max-seconds", type=float, default=20.0,
                    help="skip larger N for a guide once one step takes longer than this")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    particles = [int(p) for p in args.particles.split(",")]
    if args.quick:
        particles, args.repeats = [1, 64], 1
    guides = ["AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal"] + list(pyro_flows.FLOWS)
    if args.guides:
        guides = args.guides.split(",")
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    sections = []
    for device in devices:
        rows = []
        for kind in guides:
            row = {"guide": kind}
            slow = False
            for n in particles:
                if slow:
                    row[n] = None
                    continue
                try:
                    row[n] = steps_per_second(kind, n, device, args.repeats)
                    slow = 1.0 / row[n] > args.max_seconds
                except Exception as exc:
                    row[n] = None
                    row["error"] = f"N={n}: {type(exc).__name__}: {str(exc)[:60]}"
                    slow = True
                print(device, kind, n, row[n], flush=True)
            rows.append(row)
        ref = next((r for r in rows if r["guide"] == "AutoIAFNormal"), None)
        for r in rows:
            big = max((n for n in particles if r.get(n) is not None), default=None)
            if ref is not None and big is not None and ref.get(big):
                r["ratio"] = f"{r[big] / ref[big]:.2f} (N={big})"
        cols = ([("guide", "guide", None)] + [(n, f"N={n}", "{:.1f}") for n in particles]
                + [("ratio", "vs AutoIAFNormal", None), ("error", "error", None)])
        sections += [f"## {device}", "", "SVI steps per second (higher is better).", "",
                     markdown_table(rows, cols), ""]
    if "cuda" not in devices:
        sections += ["CUDA: not available on this machine (the script adds a CUDA table when it is).", ""]
    cmd = "python benchmarks/bench_svi_particles.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# SVI throughput vs vectorised particles",
        "",
        f"Machine: {machine_line()}. Command: `{cmd.strip()}`.",
        "Model: hierarchical regression with a data plate (200 observations, latent dimension 12), "
        "Trace_ELBO(vectorize_particles=True); AutoIAFNormal and AutoFlow with 2 flow layers (family default sizes). A blank cell: skipped after a "
        f"step took more than {args.max_seconds:g} s, or failed (see error).",
        "",
    ] + sections)
    print(write_result("svi_particles.md", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
