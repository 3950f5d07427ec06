"""Tutorial 2: a flow guide for a hierarchical model (eight schools), with diagnostics.

Run:  python tutorials/02_eight_schools_guide.py                 (about a minute on one core)
      python tutorials/02_eight_schools_guide.py --smoke         (a few seconds)
      python tutorials/02_eight_schools_guide.py --family qlf    (add a family; 'all': every one)

The model
---------
Eight schools (Rubin 1981): school j reports a coaching effect y_j with standard error sigma_j; the true
effects theta_j share a population mean mu and spread tau:

    mu ~ Normal(0, 5),  tau ~ HalfCauchy(5),  theta_j = mu + tau * eta_j,  eta_j ~ Normal(0, 1),
    y_j ~ Normal(theta_j, sigma_j).

We use this *non-centred* form, the posteriordb model ``eight_schools_noncentered`` as written in
``pyro_flows.infer.posteriordb`` (the site ``theta_trans`` is eta; ``theta`` is a deterministic site), with
Rubin's data built in: ``pyro_flows.experiments.data.eight_schools()``. The posterior over (mu, log tau, eta)
is still skewed and has a funnel-like dependence between tau and the eta's, which a mean-field Gaussian
(``AutoNormal``) cannot represent.

The guides
----------
* ``AutoNormal``: independent Gaussians (Pyro's default);
* ``AutoMultivariateNormal``: a full-covariance Gaussian;
* ``pyro_flows.infer.AutoFlow(model)``: ``z = loc + L f(eps)`` with ``loc`` and the lower-triangular ``L``
  of ``AutoMultivariateNormal`` and ``f`` a stack of a pyro_flows family (the default family, or
  ``AutoFlow(model, "<family>")``). ``f`` starts at the exact identity, so the guide starts as
  ``AutoMultivariateNormal`` and the flow can only add; its optimiser is ``AutoFlow.optimizer()`` (separate
  learning rates for the affine part and the flow). ``pyro.infer.autoguide.AutoNormalizingFlow(model,
  functools.partial(pyro_flows.flow, name, num_layers=4))`` also works, without the affine part and the
  identity start.

The diagnostics
---------------
* ELBO: the mean of the log importance weights ``log p(y, z) - log q(z)``, z ~ q: higher is better, and
  ``log p(y) - ELBO = KL(q || posterior) >= 0``;
* PSIS k-hat (Yao et al. 2018): the Pareto tail index of the importance weights: below 0.5 the guide is
  good enough to be corrected by importance sampling, above 0.7 its estimates are unreliable;
* ArviZ: guide draws as ``InferenceData`` (``pyro_flows.infer.to_inference_data``) for ``az.summary``.
"""

import argparse
import sys
import time

import torch

import pyro
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

import pyro_flows
from pyro_flows.experiments.data import eight_schools
from pyro_flows.experiments.reports import markdown_table
from pyro_flows.experiments.trainer import train_svi
from pyro_flows.infer import AutoFlow, guide_draws, importance_log_weights, psis_khat, to_inference_data

model, LATENT_DIM = eight_schools()  # model() closes over the data; 10 latent dimensions


def train(guide, steps, lr):
    """SVI with 4 vectorised particles per step (flows handle the (N, 1, D) particle batch); the learning
    rate decays to a tenth. ``lr=None``: ``AutoFlow.optimizer()``, AutoFlow's own rates."""
    pyro.clear_param_store()
    decay = 0.1 ** (1 / steps)
    optim = AutoFlow.optimizer(lrd=decay) if lr is None else pyro.optim.ClippedAdam({"lr": lr, "lrd": decay})
    result = train_svi(model, guide, (), steps=steps, num_particles=4, optim=optim, max_plate_nesting=0)
    for step in range(0, result.steps, max(1, result.steps // 4)):
        print(f"  step {step:4d}  ELBO {-result.losses[step]:9.2f}")
    return guide


def diagnose(name, guide, num_samples):
    with torch.no_grad():
        lw = importance_log_weights(model, guide, num_samples=num_samples, max_plate_nesting=0)
        khat = psis_khat(log_weights=lw)
        draws = guide_draws(model, guide, num_samples=num_samples, sites=["mu", "tau", "theta"])
    # self-normalised importance weights correct the guide's moments towards the exact posterior
    w = torch.softmax(lw, 0)
    tau_is = (w * draws["tau"]).sum().item()
    return {
        "guide": name,
        "elbo": lw.mean().item(),
        "khat": khat,
        "mu": draws["mu"].mean().item(),
        "tau": draws["tau"].mean().item(),
        "tau_is": tau_is,
        "draws": draws,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny run to check that everything works")
    p.add_argument("--family", default=None, help="a pyro_flows family besides AutoFlow's default ('all': every one)")
    p.add_argument("--steps", type=int, default=None, help="SVI steps (default 500; 5 with --smoke)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = args.steps or (5 if args.smoke else 500)
    n = 100 if args.smoke else 2000
    families = list(pyro_flows.FLOWS) if args.family == "all" else [args.family] if args.family else []
    guides = [
        ("AutoNormal", lambda: AutoNormal(model), 3e-2),
        ("AutoMultivariateNormal", lambda: AutoMultivariateNormal(model), 1e-2),
        ("AutoFlow (default family)", lambda: AutoFlow(model), None),
    ]
    for f in families:
        guides.append((f"AutoFlow({f})", lambda f=f: AutoFlow(model, f), None))
    results = []
    for name, make, lr in guides:
        print(f"{name}:")
        t0 = time.perf_counter()
        guide = train(make(), steps, lr)
        r = diagnose(name, guide, n)
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
    print(
        "\n"
        + markdown_table(
            results,
            [
                ("guide", "guide", None),
                ("elbo", "ELBO", "{:.2f}"),
                ("khat", "PSIS k-hat", "{:.2f}"),
                ("mu", "E[mu]", "{:.2f}"),
                ("tau", "E[tau]", "{:.2f}"),
                ("tau_is", "E[tau] importance-corrected", "{:.2f}"),
                ("seconds", "seconds", "{:.1f}"),
            ],
        )
    )
    print(
        "\nk-hat < 0.5: good; 0.5-0.7: usable; > 0.7: unreliable. The reference posterior (posteriordb, "
        "10,000 NUTS draws) has E[mu] about 4.4 and E[tau] about 3.6."
    )

    # ArviZ: summary statistics of the best guide's draws (4 pseudo-chains of independent draws)
    best = max(results, key=lambda r: r["elbo"])
    try:
        import arviz as az

        idata = to_inference_data({k: v for k, v in best["draws"].items()})
        print(f"\nArviZ summary of {best['guide']} (the highest ELBO):")
        print(az.summary(idata, var_names=["mu", "tau"], kind="stats").to_string())
    except ImportError:
        print("(install arviz for the summary table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
