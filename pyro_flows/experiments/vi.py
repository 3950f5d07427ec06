"""VI benchmarks: flow guides against Pyro's autoguides (``bench --what vi``) and SVI particle scaling
(``bench --what particles``).

``vi``: for every posterior of the posteriordb subset (:mod:`pyro_flows.infer.posteriordb`) and every guide
(AutoNormal, AutoMultivariateNormal, AutoIAFNormal, ``AutoFlow`` of each family), SVI (Trace_ELBO, one
particle, Adam lr 0.02; AutoFlow's flow networks lr 0.001) under the same training wall time per fit
(``--seconds``), trained by :func:`pyro_flows.experiments.trainer.train_svi`; then, from 1000 guide draws,
mean and sd errors against the 10,000 reference draws (in reference sds, rms over parameters), the ELBO and
the PSIS k-hat. Flow guides use 2 layers with each family's registry ``test_kwargs`` (hidden widths raised
to >= 2D). Everything in float64.

``particles``: SVI steps per second against the number N of vectorised ELBO particles on a hierarchical
regression with a data plate (latent dimension 12; flows see ``(N, 1, D)``), as a ratio to AutoIAFNormal.
"""

from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyro_flows.experiments import measure, reports
from pyro_flows.experiments.models import GUIDE_BASELINES, make_guide
from pyro_flows.registry import get_flow

__all__ = ["run_vi", "run_particles", "regression_data", "regression_model"]


def _flow_kwargs(kind, dim):
    kwargs = dict(get_flow(kind).test_kwargs)
    if "hidden_dims" in kwargs:  # MADE-type conditioners need widths >= D; test sizes are meant for D <= 5
        kwargs["hidden_dims"] = [max(int(h), 2 * dim) for h in kwargs["hidden_dims"]]
    return kwargs


def _guide(kind, model, dim, num_layers=2):
    if kind == "AutoNormal" or kind == "AutoMultivariateNormal":
        return make_guide(kind, model, init_scale=0.1)
    if kind == "AutoIAFNormal":
        return make_guide(kind, model, hidden_dim=[max(2 * dim, 10)], num_transforms=num_layers)
    return make_guide(kind, model, num_layers=num_layers, init_scale=0.1, **_flow_kwargs(kind, dim))


def fit_and_evaluate(post, kind, args, seconds, steps=5000, draws=1000):
    from pyro_flows.infer import (
        AutoFlow,
        compare_draws,
        elbo_estimate,
        flatten_draws,
        guide_draws,
        importance_log_weights,
        psis_khat,
    )
    from pyro_flows.experiments.trainer import train_svi

    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    guide = _guide(kind, post.model, post.dim)
    optim = pyro.optim.Adam(
        AutoFlow.optim_args(lr=0.02, flow_lr=0.001) if isinstance(guide, AutoFlow) else {"lr": 0.02}
    )
    res = train_svi(
        post.model,
        guide,
        (),
        steps=steps,
        optim=optim,  # (): the model closes over its data
        time_budget=seconds,
        seed=args.seed,
    )
    if res.stopped_by == "nonfinite":
        raise FloatingPointError(f"non-finite loss after {res.steps} steps")
    torch.manual_seed(args.seed + 1)
    lw = importance_log_weights(post.model, guide, num_samples=draws, max_plate_nesting=0, chunk_size=250)
    e = elbo_estimate(lw)
    c = compare_draws(
        flatten_draws(guide_draws(post.model, guide, num_samples=draws, sites=post.sites)), post.reference
    )
    return {
        "posterior": post.name,
        "guide": kind,
        "steps": res.steps,
        "train_s": res.seconds,
        "elbo": e["elbo"],
        "khat": psis_khat(log_weights=lw),
        "mean_rms": c["mean_err_rms"],
        "mean_max": c["mean_err_max"],
        "sd_rms": c["sd_err_rms"],
        "sd_max": c["sd_err_max"],
    }


VI_COLUMNS = [
    ("guide", "guide", None),
    ("steps", "steps", "{:d}"),
    ("train_s", "train s", "{:.1f}"),
    ("mean_rms", "mean err rms", "{:.3f}"),
    ("mean_max", "mean err max", "{:.3f}"),
    ("sd_rms", "sd err rms", "{:.3f}"),
    ("sd_max", "sd err max", "{:.3f}"),
    ("elbo", "ELBO", "{:.2f}"),
    ("khat", "k-hat", "{:.2f}"),
    ("error", "error", None),
]
VI_SUMMARY_COLUMNS = [
    ("guide", "guide", None),
    ("n", "posteriors fitted", "{:d}"),
    ("mean_rms", "median mean err rms", "{:.3f}"),
    ("sd_rms", "median sd err rms", "{:.3f}"),
    ("elbo_rank", "mean ELBO rank", "{:.1f}"),
    ("k_good", "k-hat < 0.7", "{:d}"),
    ("steps", "median steps", "{:.0f}"),
    ("train_s", "total train s", "{:.0f}"),
]


def _vi_summary(rows, guides, posteriors):
    ok = [r for r in rows if "error" not in r]
    out = []
    for g in guides:
        rs = [r for r in ok if r["guide"] == g]
        if not rs:
            out.append({"guide": g, "n": 0})
            continue
        ranks = []  # rank of the ELBO within each posterior (1 = best), averaged
        for p in posteriors:
            es = sorted((r["elbo"] for r in ok if r["posterior"] == p), reverse=True)
            ranks += [1 + es.index(r["elbo"]) for r in rs if r["posterior"] == p]
        out.append(
            {
                "guide": g,
                "n": len(rs),
                "mean_rms": float(np.median([r["mean_rms"] for r in rs])),
                "sd_rms": float(np.median([r["sd_rms"] for r in rs])),
                "elbo_rank": float(np.mean(ranks)),
                "k_good": sum(r["khat"] < 0.7 for r in rs),
                "steps": float(np.median([r["steps"] for r in rs])),
                "train_s": float(np.sum([r["train_s"] for r in rs])),
            }
        )
    return out


def run_vi(args, header, log=print):
    """The posteriordb VI benchmark; returns ``(rows, files written)``."""
    from pyro_flows.infer import posteriordb as pdb

    if not pdb.available():
        log(f"[vi] posteriordb not found at {pdb.posteriordb_path()} (set ${pdb.ENV_VAR}); skipped")
        return [], []
    posteriors = (
        args.posteriors.split(",")
        if args.posteriors
        else ["eight_schools-eight_schools_noncentered", "kilpisjarvi_mod-kilpisjarvi"]
        if args.quick
        else list(pdb.POSTERIORS)
    )
    guides = list(GUIDE_BASELINES) + list(args.family)
    draws = 200 if args.quick else 1000
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # AutoIAFNormal builds its flow in the default dtype
    rows, t0 = [], time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # first-call costs of torch/pyro would otherwise be charged to the first guide's budget
            fit_and_evaluate(pdb.load_posterior(posteriors[0]), "AutoNormal", args, 2.0, steps=20, draws=50)
            for name in posteriors:
                post = pdb.load_posterior(name)
                for kind in guides:
                    try:
                        r = fit_and_evaluate(post, kind, args, args.seconds, draws=draws)
                    except Exception as exc:  # a failing guide is a result, not a crash
                        r = {
                            "posterior": name,
                            "guide": kind,
                            "error": f"{type(exc).__name__}: {str(exc)[:80]}",
                        }
                    rows.append(r)
                    log(
                        f"[vi] {name:42s} {kind:24s} "
                        + (
                            r.get("error")
                            or f"steps {r['steps']:5d} mean rms {r['mean_rms']:.3f} sd rms {r['sd_rms']:.3f} "
                            f"elbo {r['elbo']:.2f} khat {r['khat']:.2f}"
                        )
                    )
    finally:
        torch.set_default_dtype(default)
    lines = [
        "# VI: flow guides against Pyro's autoguides on posteriordb",
        "",
        header,
        f"Total {(time.perf_counter() - t0) / 60:.1f} min.",
        "",
        f"Budget per fit: {args.seconds:g} s of training (Trace_ELBO, 1 particle, Adam lr 0.02; AutoFlow's "
        "flow networks lr 0.001); 2 layers for AutoIAFNormal and every AutoFlow family (registry "
        f"`test_kwargs` sizes); evaluation on {draws} guide draws. Errors: |mean_q - mean_ref| / sd_ref and "
        "|sd_q - sd_ref| / sd_ref against the 10,000 reference draws (rms and max over parameters). ELBOs "
        "compare within a posterior only. k-hat: PSIS (< 0.5 good, > 0.7 unreliable).",
        "",
        "## Summary over posteriors",
        "",
        reports.markdown_table(_vi_summary(rows, guides, posteriors), VI_SUMMARY_COLUMNS),
        "",
    ]
    for p in posteriors:
        lines += [
            f"## {p}",
            "",
            reports.markdown_table([r for r in rows if r["posterior"] == p], VI_COLUMNS),
            "",
        ]
    return rows, [reports.write_text(os.path.join(args.results, "vi.md"), "\n".join(lines))]


# ---------------------------------------------------------------------------------------------
# particle scaling
# ---------------------------------------------------------------------------------------------
def regression_data(device="cpu", n=200, groups=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    group = torch.randint(0, groups, (n,), generator=g)
    effect = 0.5 * torch.randn(groups, generator=g)
    y = 1.0 + 2.0 * x + effect[group] + 0.3 * torch.randn(n, generator=g)
    return x.to(device), group.to(device), y.to(device)


def regression_model(x, group, y):
    """Hierarchical regression: 2 coefficients, 2 positive scales, 8 group effects (latent dim 12)."""
    one = x.new_ones(())
    a = pyro.sample("a", dist.Normal(0 * one, 5 * one))
    b = pyro.sample("b", dist.Normal(0 * one, 5 * one))
    sigma = pyro.sample("sigma", dist.LogNormal(0 * one, one))
    tau = pyro.sample("tau", dist.HalfNormal(one))
    with pyro.plate("groups", 8, dim=-1):
        effect = pyro.sample("effect", dist.Normal(0 * one, tau))
    with pyro.plate("data", y.shape[-1], dim=-1):
        pyro.sample("y", dist.Normal(a + b * x + effect[..., group], sigma), obs=y)


def _svi_step(kind, n, device):
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    torch.manual_seed(0)
    data = regression_data(device)
    if kind == "AutoIAFNormal":
        guide = make_guide(kind, regression_model, hidden_dim=[24], num_transforms=2)
    else:
        guide = make_guide(kind, regression_model, num_layers=2)
    svi = SVI(
        regression_model,
        guide,
        pyro.optim.Adam({"lr": 0.005}),
        Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1),
    )
    return lambda: svi.step(*data)


def run_particles(args, header, log=print):
    """SVI steps per second against vectorised particles; returns ``(rows, files written)``."""
    particles = [int(p) for p in str(args.particles).split(",")]
    guides = list(GUIDE_BASELINES) + list(args.family)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in guides:
            row, slow = {"guide": kind}, False
            for n in particles:
                if slow:
                    continue
                try:
                    step = _svi_step(kind, n, args.device)
                    step()  # builds the guide's parameters
                    t, err = measure.time_interleaved(
                        {kind: step}, repeats=1 if args.quick else 3, warmup=2, device=args.device, slow=20.0
                    )
                    row[n] = 1.0 / t[kind] if t.get(kind) else None
                    slow = t.get(kind) is None or t[kind] > 20.0
                    if err:
                        row["error"] = f"N={n}: {err[kind]}"
                except Exception as exc:
                    row["error"], slow = f"N={n}: {type(exc).__name__}: {str(exc)[:60]}", True
                log(f"[particles] {kind} N={n}: {row.get(n)}")
            rows.append(row)
    ref = next((r for r in rows if r["guide"] == "AutoIAFNormal"), {})
    for r in rows:
        for n in particles:
            if r.get(n) and ref.get(n):
                r[f"ratio_{n}"] = r[n] / ref[n]
    cols = (
        [("guide", "guide", None)]
        + [(n, f"N={n} steps/s", "{:.1f}") for n in particles]
        + [(f"ratio_{n}", f"N={n} / IAF", "{:.2f}") for n in particles]
        + [("error", "error", None)]
    )
    text = "\n".join(
        [
            "# SVI throughput against vectorised particles",
            "",
            header,
            "",
            "Model: hierarchical regression with a data plate (200 observations, latent dimension 12), "
            "Trace_ELBO(vectorize_particles=True); AutoIAFNormal and AutoFlow with 2 layers. Steps per "
            "second (higher is better) and the ratio to AutoIAFNormal at the same N.",
            "",
            reports.markdown_table(rows, cols),
            "",
        ]
    )
    rows = [{str(k): v for k, v in r.items()} for r in rows]
    return rows, [reports.write_text(os.path.join(args.results, "svi_particles.md"), text)]
