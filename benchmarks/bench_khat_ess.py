"""PSIS k-hat against the importance weights' effective sample size, with and without the path gradient.

For one posteriordb posterior and seeds 0 and 1: the default ``AutoFlow(model)`` (``path_gradient="auto"``: the
path-derivative gradient under ``Trace_ELBO``) and ``AutoFlow(model, path_gradient=False)``, each trained for
``seconds`` of process CPU time on one thread (the VI benchmark's trainer and clock), then 10,000 importance log
weights ``log p(z) - log q(z)`` of guide draws: k-hat of five independent sets of 2000 (and their median), the
effective sample size ``(sum w)^2 / sum w^2`` as a fraction of the 10,000, the log weights' sd and their largest
value above the median, and the ELBO (their mean). One JSON line per fit. ``docs/autoflow.md`` quotes::

    python benchmarks/bench_khat_ess.py kilpisjarvi_mod-kilpisjarvi 30 \\
        > benchmarks/results/autoflow_settings/khat_ess_kilpisjarvi.jsonl
    python benchmarks/bench_khat_ess.py arK-arK 30 > benchmarks/results/autoflow_settings/khat_ess_arK.jsonl
"""

import json
import sys

import pyro
import torch

from pyro_flows.experiments import measure
from pyro_flows.experiments.trainer import train_svi
from pyro_flows.infer import AutoFlow, importance_log_weights, psis_khat
from pyro_flows.infer.posteriordb import load_posterior


def main(name, seconds):
    torch.set_num_threads(1)
    post = load_posterior(name)
    for seed in (0, 1):
        for pg in ("auto", False):
            pyro.clear_param_store()
            torch.manual_seed(seed)
            guide = AutoFlow(post.model, path_gradient=pg)
            res = train_svi(post.model, guide, (), steps=10**9, optim=AutoFlow.optimizer(), seed=seed,
                            time_budget=seconds, clock=measure.CpuClock(), max_plate_nesting=0)
            torch.manual_seed(1000 + seed)
            lw = importance_log_weights(post.model, guide, num_samples=10000, max_plate_nesting=0).double()
            ks = [round(float(psis_khat(log_weights=lw[i:i + 2000])), 2) for i in range(0, 10000, 2000)]
            w = torch.exp(lw - lw.max())
            ess = float(w.sum() ** 2 / (w * w).sum()) / len(w)
            print(json.dumps({"post": name.split("-")[-1], "path_gradient": pg, "seed": seed, "steps": res.steps,
                              "khat_median_of_5": sorted(ks)[2], "khats": ks, "ess_fraction_10000": round(ess, 3),
                              "lw_sd": round(float(lw.std()), 3),
                              "lw_max_minus_median": round(float(lw.max() - lw.median()), 2),
                              "elbo": round(float(lw.mean()), 3)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
