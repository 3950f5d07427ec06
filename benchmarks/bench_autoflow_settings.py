"""AutoFlow settings on one posteriordb posterior at equal CPU time, over seeds (the studies behind a default).

Each fit trains ``AutoFlow(model, **kwargs)`` with ``AutoFlow.optimizer()`` for ``--seconds`` of process CPU
time on one thread (the VI benchmark's trainer and clock), then evaluates it as the VI benchmark does (ELBO and
PSIS k-hat from 2000 draws, errors against the reference draws from 10,000), and prints one JSON line: the
settings, seed, steps, k-hat, rms mean / sd errors, the per-parameter errors of ``--params`` and what the
Laplace start decided. A setting's key ``"optimizer"`` holds ``AutoFlow.optimizer``'s arguments and
``"num_particles"`` the ELBO's; ``--khat-repeats K`` adds the k-hat of each fitted guide from ``K - 1`` more
sets of ``--khat-draws`` draws (how noisy one estimate is). ``docs/autoflow.md`` ("Widths") quotes::

    python benchmarks/bench_autoflow_settings.py --posterior eight_schools-eight_schools_centered \\
        --seconds 30 --seeds 0,1,2 --settings '{"hidden_dims": [20, 20]}' '{"hidden_dims": [64, 64]}' \\
        '{"hidden_dims": [100, 100]}' '{"warmup": 0}'
    python benchmarks/bench_autoflow_settings.py --seeds 0,1,2 --settings '{}' \\
        '{"optimizer": {"flow_lr": 0.01}}' '{"num_particles": 4}' '{"num_particles": 16}'
    python benchmarks/bench_autoflow_settings.py --seeds 0,1 --khat-repeats 6
    python benchmarks/bench_autoflow_settings.py --seeds 0,1 --khat-repeats 5 --khat-draws 20000
    python benchmarks/bench_autoflow_settings.py --seeds 0,1,2 --khat-repeats 4 --settings '{}' '{"tail_bound": 5.0}'
    python benchmarks/bench_autoflow_settings.py --seeds 0,1,2 --khat-repeats 4 --settings '{}'  # then 3,4,5
    python benchmarks/bench_autoflow_settings.py --seeds 0,1,2 --khat-repeats 4 \
        --settings '{"warmup": {"patience": 1000}}'  # then --seeds 3,4,5; and '{"warmup": 0}'
    python benchmarks/bench_autoflow_settings.py --seeds 0,1,2 --khat-repeats 4 \
        --settings '{}' '{"student_t_base": 30}' '{"student_t_base": 5}'
    python benchmarks/bench_autoflow_settings.py --posterior kilpisjarvi_mod-kilpisjarvi --seeds 0,1 \
        --settings '{"optimizer": {"flow_lr": 0.002}}' '{}'  # garch11, low_dim_gauss_mix too (the default's
        # flow rate there is 0.002 x 64 / width: 0.00427, 0.0032, 0.00256)

A setting's ``"warmup"`` may be a dict: the arguments of a :class:`~pyro_flows.infer.PlateauTest`.

(their output, one JSON line per fit: ``benchmarks/results/autoflow_settings/``).
"""

from __future__ import annotations

import argparse
import json

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.nn import PyroParam

from pyro_flows.experiments import measure
from pyro_flows.experiments.trainer import train_svi
from pyro_flows.experiments.vi import evaluate_guide
from pyro_flows.infer import AutoFlow, PlateauTest
from pyro_flows.infer.posteriordb import load_posterior


class StudentTBaseAutoFlow(AutoFlow):
    """An experiment, not a package feature: ``AutoFlow`` whose base, once the flow is on, is a Student-t with
    a learnable degrees of freedom per dimension (starting at ``base_df``; constraint > 1), as in tail-adaptive
    flows (Jaini et al. 2020; Liang et al., "Fat-tailed variational inference with anisotropic tail adaptive
    flows", ICML 2022). During the warmup the guide is AutoMultivariateNormal as usual. The setting key
    ``"student_t_base": df`` selects it."""

    def __init__(self, model, base_df=30.0, **kwargs):
        self._base_df = float(base_df)
        super().__init__(model, **kwargs)

    def _setup_prototype(self, *args, **kwargs):
        super()._setup_prototype(*args, **kwargs)
        self.base_df = PyroParam(torch.full_like(self.loc.detach(), self._base_df),
                                 constraint=constraints.greater_than(1.0))

    def get_base_dist(self):
        return dist.StudentT(self.base_df, torch.zeros_like(self.loc), torch.ones_like(self.loc)).to_event(1)


def fit(post, kwargs, seed, seconds, params=(), khat_repeats=1, khat_draws=2000):
    settings, kwargs = kwargs, dict(kwargs)
    optim_kwargs = kwargs.pop("optimizer", {})  # AutoFlow.optimizer's arguments, e.g. {"flow_lr": 0.01}
    num_particles = kwargs.pop("num_particles", 1)  # ELBO particles (vectorised), not an AutoFlow argument
    if isinstance(kwargs.get("warmup"), dict):  # {"warmup": {"patience": 1000}}: a PlateauTest's arguments
        kwargs["warmup"] = PlateauTest(**kwargs["warmup"])
    base_df = kwargs.pop("student_t_base", None)  # {"student_t_base": 30}: StudentTBaseAutoFlow
    pyro.clear_param_store()
    torch.manual_seed(seed)
    guide = (AutoFlow(post.model, **kwargs) if base_df is None
             else StudentTBaseAutoFlow(post.model, base_df=base_df, **kwargs))
    res = train_svi(post.model, guide, (), steps=10**9, optim=AutoFlow.optimizer(**optim_kwargs), seed=seed,
                    num_particles=num_particles,
                    time_budget=seconds, clock=measure.CpuClock(), max_plate_nesting=0)
    # khat_sets: the k-hat of the same fitted guide from other sets of khat_draws draws (how noisy one estimate is)
    ev = evaluate_guide(post, guide, 2000, 10000, seed=seed + 1, per_param=True, khat_sets=khat_repeats,
                        khat_draws=khat_draws)
    info = guide.laplace_info or {}
    more = [round(k, 3) for k in ev.get("khat_sets", [])[1:]]
    return {"settings": settings, "seed": seed, "steps": res.steps, "khat": round(ev["khat"], 3),
            "elbo": round(ev["elbo"], 3), "mean_rms": round(ev["mean_rms"], 3), "sd_rms": round(ev["sd_rms"], 3),
            **{f"{p}_err": [round(v, 3) for v in ev["per_param"][p]] for p in params if p in ev["per_param"]},
            "laplace": {k: info.get(k) for k in ("accepted", "elbo_laplace", "elbo_default", "evals", "reason")},
            **({f"khat_other_{khat_draws}_draws": more} if more else {}),
            **({"base_df": [round(v, 1) for v in guide.base_df.tolist()]} if base_df is not None else {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posterior", default="eight_schools-eight_schools_centered")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", nargs="+", default=["{}"],
                        help="JSON dicts of AutoFlow keyword arguments; the key 'optimizer' holds "
                        "AutoFlow.optimizer's (e.g. '{\"optimizer\": {\"flow_lr\": 0.01}}'), 'num_particles' the "
                        "ELBO's")
    parser.add_argument("--params", default="mu,tau", help="parameters whose [mean, sd] errors to print")
    parser.add_argument("--khat-repeats", type=int, default=1,
                        help="also the k-hat of each fitted guide from this many - 1 more sets of draws")
    parser.add_argument("--khat-draws", type=int, default=2000, help="draws per k-hat of --khat-repeats")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    post = load_posterior(args.posterior)
    for setting in args.settings:
        for seed in (int(s) for s in args.seeds.split(",")):
            print(json.dumps(fit(post, json.loads(setting), seed, args.seconds, args.params.split(","),
                                 args.khat_repeats, args.khat_draws)), flush=True)


if __name__ == "__main__":
    main()
