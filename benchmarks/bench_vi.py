"""VI benchmark over the posteriordb subset: flow guides vs Pyro's autoguides, against reference draws.

For every posterior in ``../shared/data/posteriordb`` (or ``$PYRO_FLOWS_POSTERIORDB``) and every guide
(AutoNormal, AutoMultivariateNormal, AutoIAFNormal, and ``pyro_flows.infer.AutoFlow`` for each family
in ``pyro_flows.FLOWS``), fit by SVI (Trace_ELBO, one particle, Adam lr 0.02; for AutoFlow the flow
networks use lr 0.001 and loc/scale 0.02, see ``AutoFlow.optim_args``) under the SAME
training wall time per fit (``--seconds``, default 6 s; at most ``--steps`` steps), so guides that
are slower per step get fewer steps (the table reports the steps each guide reached). Pass a large
``--seconds`` and ``--steps N`` for an equal-steps comparison instead. Flow families use small
networks by default (``--flow-size small``: each family's registry ``test_kwargs``, hidden widths
raised to at least 2D) so that the default run fits in about 10 minutes on one core;
``--flow-size default`` uses the families' default sizes. Everything runs in float64 (the default
dtype is set to float64 so Pyro's AutoIAFNormal, which builds its flow in the default dtype, matches
the float64 models). Then, from ``--draws`` guide draws:

* mean and sd errors against the 10,000 reference draws, in reference standard deviations, per
  parameter, summarised by their root mean square over parameters (``mean rms``, ``sd rms``) and max;
* the ELBO (mean log importance weight; models with flat priors are unnormalised, so compare ELBOs
  within a posterior only) and the PSIS k-hat of the same weights (arviz.psislw; < 0.5 good,
  > 0.7 unreliable);
* the training wall time.

Writes ``benchmarks/results/vi.md`` (summary + per-posterior tables, machine line, exact command) and
``benchmarks/results/vi.png``. Default run: 9 posteriors x 9 guides x (6 s + evaluation), about 11
minutes. ``--quick``: two posteriors, short fits (a smoke test, not for the results).

Usage:
    python benchmarks/bench_vi.py                  # default budget
    python benchmarks/bench_vi.py --quick
    python benchmarks/bench_vi.py --seconds 20 --steps 5000 --posteriors arK-arK,garch-garch11
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS, machine_line, markdown_table, write_result  # noqa: E402

import pyro_flows  # noqa: E402
from pyro_flows.infer import (  # noqa: E402
    AutoFlow,
    compare_draws,
    elbo_estimate,
    flatten_draws,
    guide_draws,
    importance_log_weights,
    psis_khat,
)
from pyro_flows.infer import posteriordb as pdb  # noqa: E402
from pyro_flows.registry import get_flow  # noqa: E402

BASELINES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal")
KHAT_CLIP = 3.0


def make_guide(kind, model, dim, num_layers, flow_size="small"):
    if kind == "AutoNormal":
        return AutoNormal(model, init_scale=0.1)
    if kind == "AutoMultivariateNormal":
        return AutoMultivariateNormal(model, init_scale=0.1)
    if kind == "AutoIAFNormal":
        return AutoIAFNormal(model, hidden_dim=[max(2 * dim, 10)], num_transforms=num_layers)
    kwargs = {}
    if flow_size == "small":
        # the registry's small test sizes, with hidden widths raised to >= 2D (MADE conditioners need
        # widths >= D, and the test sizes are meant for D <= 5)
        kwargs = dict(get_flow(kind).test_kwargs)
        if "hidden_dims" in kwargs:
            kwargs["hidden_dims"] = [max(int(h), 2 * dim) for h in kwargs["hidden_dims"]]
    return AutoFlow(model, kind, num_layers=num_layers, init_scale=0.1, **kwargs)


def fit_and_evaluate(post, kind, args):
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    guide = make_guide(kind, post.model, post.dim, args.num_layers, args.flow_size)
    if isinstance(guide, AutoFlow):
        optim = pyro.optim.Adam(AutoFlow.optim_args(lr=args.lr, flow_lr=args.flow_lr))
    else:
        optim = pyro.optim.Adam({"lr": args.lr})
    svi = SVI(post.model, guide, optim, Trace_ELBO())
    t0 = time.perf_counter()
    steps = 0
    losses = []
    while steps < args.steps and time.perf_counter() - t0 < args.seconds:
        losses.append(svi.step())
        steps += 1
    train_s = time.perf_counter() - t0
    if not all(math.isfinite(v) for v in losses[-10:]):
        raise FloatingPointError(f"non-finite loss after {steps} steps")
    torch.manual_seed(args.seed + 1)
    lw = importance_log_weights(post.model, guide, num_samples=args.draws, max_plate_nesting=0,
                                chunk_size=args.chunk)
    e = elbo_estimate(lw)
    k = psis_khat(log_weights=lw)
    draws = guide_draws(post.model, guide, num_samples=args.draws, sites=post.sites)
    c = compare_draws(flatten_draws(draws), post.reference)
    return {"posterior": post.name, "guide": kind, "steps": steps, "train_s": train_s,
            "elbo": e["elbo"], "khat": k, "mean_rms": c["mean_err_rms"], "mean_max": c["mean_err_max"],
            "sd_rms": c["sd_err_rms"], "sd_max": c["sd_err_max"]}


def plot(rows, posteriors, guides, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5), sharey=True)
    y = np.arange(len(posteriors))
    markers = "os^vD<>phX*P"
    for j, g in enumerate(guides):
        for ax, key in zip(axes, ("mean_rms", "sd_rms", "khat")):
            xs, ys = [], []
            for i, p in enumerate(posteriors):
                r = next((r for r in rows if r["posterior"] == p and r["guide"] == g and "error" not in r), None)
                if r is not None and math.isfinite(r[key]):
                    xs.append(max(r[key], 1e-3) if key != "khat" else min(r[key], KHAT_CLIP))
                    ys.append(i + (j - len(guides) / 2) * 0.07)
            ax.scatter(xs, ys, marker=markers[j % len(markers)], label=g, s=30)
    for ax, title in zip(axes, ("mean error (rms, reference sds)", "sd error (rms, reference sds)",
                                f"PSIS k-hat (clipped at {KHAT_CLIP:g})")):
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[1].set_xscale("log")
    axes[2].axvline(0.7, color="k", lw=0.8, ls="--")
    axes[2].axvline(0.5, color="k", lw=0.5, ls=":")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels([p.split("-")[-1] for p in posteriors])
    axes[2].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two posteriors, short fits (smoke test)")
    ap.add_argument("--steps", type=int, default=5000, help="max SVI steps per fit")
    ap.add_argument("--seconds", type=float, default=6.0, help="training wall time per fit (the budget)")
    ap.add_argument("--flow-size", choices=("small", "default"), default="small",
                    help="small: each family's registry test_kwargs (small networks); default: family defaults")
    ap.add_argument("--draws", type=int, default=1000, help="guide draws for errors, ELBO and k-hat")
    ap.add_argument("--chunk", type=int, default=250, help="draws per vectorised pass")
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--flow-lr", type=float, default=0.001,
                    help="AutoFlow's flow-network learning rate (loc/scale use --lr)")
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--posteriors", default=None, help="comma-separated subset of posteriordb names")
    ap.add_argument("--guides", default=None, help="comma-separated subset of guide names")
    ap.add_argument("--output", default="vi", help="results file stem in benchmarks/results/")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    warnings.filterwarnings("ignore")
    if not pdb.available():
        print(f"posteriordb not found at {pdb.posteriordb_path()} (set ${pdb.ENV_VAR})")
        return 1
    posteriors = list(pdb.POSTERIORS)
    if args.quick:
        posteriors = ["eight_schools-eight_schools_noncentered", "kilpisjarvi_mod-kilpisjarvi"]
        args.steps, args.seconds, args.draws = min(args.steps, 100), min(args.seconds, 2.0), min(args.draws, 200)
    if args.posteriors:
        posteriors = args.posteriors.split(",")
    guides = list(BASELINES) + list(pyro_flows.FLOWS)
    if args.guides:
        guides = args.guides.split(",")
    # warm-up (first-call costs of torch/pyro would otherwise be charged to the first guide's budget)
    warm = argparse.Namespace(**{**vars(args), "steps": 20, "seconds": 5.0, "draws": 50})
    fit_and_evaluate(pdb.load_posterior(posteriors[0]), "AutoNormal", warm)
    rows = []
    t_all = time.perf_counter()
    for name in posteriors:
        post = pdb.load_posterior(name)
        for kind in guides:
            try:
                r = fit_and_evaluate(post, kind, args)
            except Exception as exc:  # a failing guide is a result, not a crash
                r = {"posterior": name, "guide": kind, "error": f"{type(exc).__name__}: {str(exc)[:80]}"}
            rows.append(r)
            msg = r.get("error") or (f"steps {r['steps']:5d} {r['train_s']:5.1f}s  mean rms {r['mean_rms']:.3f}"
                                     f"  sd rms {r['sd_rms']:.3f}  elbo {r['elbo']:.2f}  khat {r['khat']:.2f}")
            print(f"{name:42s} {kind:24s} {msg}", flush=True)
    total = time.perf_counter() - t_all

    cols = [("guide", "guide", None), ("steps", "steps", "{:d}"), ("train_s", "train s", "{:.1f}"),
            ("mean_rms", "mean err rms", "{:.3f}"), ("mean_max", "mean err max", "{:.3f}"),
            ("sd_rms", "sd err rms", "{:.3f}"), ("sd_max", "sd err max", "{:.3f}"),
            ("elbo", "ELBO", "{:.2f}"), ("khat", "k-hat", "{:.2f}"), ("error", "error", None)]
    ok = [r for r in rows if "error" not in r]
    summary = []
    for g in guides:
        rs = [r for r in ok if r["guide"] == g]
        if not rs:
            summary.append({"guide": g, "n": 0})
            continue
        # rank of the ELBO within each posterior (1 = best), averaged
        ranks = []
        for p in posteriors:
            es = sorted((r["elbo"] for r in ok if r["posterior"] == p), reverse=True)
            mine = [r["elbo"] for r in rs if r["posterior"] == p]
            if mine:
                ranks.append(1 + es.index(mine[0]))
        summary.append({"guide": g, "n": len(rs),
                        "mean_rms": float(np.median([r["mean_rms"] for r in rs])),
                        "sd_rms": float(np.median([r["sd_rms"] for r in rs])),
                        "elbo_rank": float(np.mean(ranks)),
                        "k_good": sum(r["khat"] < 0.7 for r in rs),
                        "steps": float(np.median([r["steps"] for r in rs])),
                        "train_s": float(np.sum([r["train_s"] for r in rs]))})
    scols = [("guide", "guide", None), ("n", "posteriors fitted", "{:d}"),
             ("mean_rms", "median mean err rms", "{:.3f}"), ("sd_rms", "median sd err rms", "{:.3f}"),
             ("elbo_rank", "mean ELBO rank", "{:.1f}"), ("k_good", "k-hat < 0.7", "{:d}"),
             ("steps", "median steps", "{:.0f}"), ("train_s", "total train s", "{:.0f}")]
    cmd = "python benchmarks/bench_vi.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# VI benchmark: flow guides vs Pyro autoguides on posteriordb",
        "",
        f"Machine: {machine_line()}. Command: `{cmd.strip()}` (total {total / 60:.1f} min).",
        f"Budget per fit: {args.seconds:g} s of training wall time (at most {args.steps} steps) (Trace_ELBO, 1 particle, "
        f"Adam lr {args.lr}; AutoFlow's flow networks lr {args.flow_lr}, its loc/scale lr {args.lr}); "
        f"{args.num_layers} layers for AutoIAFNormal and every AutoFlow family ("
        + ("small networks: each family's registry `test_kwargs`" if args.flow_size == "small" else "family defaults")
        + f"); evaluation on {args.draws} guide draws. Families registered at run time: "
        f"{', '.join(pyro_flows.FLOWS) or 'none'}.",
        "",
        "Errors are |mean_q - mean_ref| / sd_ref and |sd_q - sd_ref| / sd_ref over the 10,000 reference draws, "
        "per parameter (rms and max over parameters). ELBOs are comparable within a posterior only (flat "
        "priors are unnormalised). k-hat: PSIS tail index of the same importance weights (< 0.5 good, "
        "> 0.7 unreliable). The Monte Carlo error of the moment errors from "
        f"{args.draws} draws is about {1 / math.sqrt(args.draws):.2f} (mean) and "
        f"{1 / math.sqrt(2 * args.draws):.2f} (sd) reference sds.",
        "",
        "## Summary over posteriors",
        "",
        markdown_table(summary, scols),
        "",
        "![VI benchmark](vi.png)",
        "",
    ]
    for p in posteriors:
        lines += [f"## {p}", "", markdown_table([r for r in rows if r["posterior"] == p], cols), ""]
    os.makedirs(RESULTS, exist_ok=True)
    path = write_result(args.output + ".md", "\n".join(lines))
    try:
        plot(rows, posteriors, guides, os.path.join(RESULTS, args.output + ".png"))
    except Exception as exc:  # pragma: no cover - plotting is optional
        print("plot failed:", exc)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
