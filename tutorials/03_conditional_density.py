"""Tutorial 3: conditional density estimation and amortised inference with conditional flows.

Run:  python tutorials/03_conditional_density.py                   (about a minute per family on one core)
      python tutorials/03_conditional_density.py --smoke           (a few seconds)
      python tutorials/03_conditional_density.py --family sinusoidal

Every pyro_flows family has a conditional variant: ``pyro_flows.flow(name, D, num_layers, context_dim=C)``
returns a ``ConditionalComposeTransformModule`` whose ``.condition(context)`` is an ordinary transform whose
parameters are computed from the context by a network. Two uses:

Part A: conditional density estimation, p(x | c)
-------------------------------------------------
Data: c ~ Uniform(-1, 1), x1 | c ~ Normal(c, 0.3), x2 | x1, c ~ Normal(sin(3 x1), 0.1 + 0.3 |c|): a curved
ridge whose width depends on c. Because the true conditional density is known, we can report the test NLL
next to the exact conditional entropy floor ``E[-log p(x | c)]`` (estimated on the same test set): the gap is
the expected KL divergence from the truth to the model. We use
``pyro_flows.distributions.ConditionalTransformedDistribution(base, [flow]).condition(c)``, whose batch shape
is ``c.shape[:-1]``, so a batch of contexts is one vectorised call.

Part B: amortised inference, q(z | y)
-------------------------------------
Model: z ~ Normal(0, I_2); y1 ~ Normal(z1 * z2, 0.3), y2 ~ Normal(z1 + z2, 0.5). For a given y the
posterior p(z | y) is banana-shaped (two modes when y1 > 0 and y2 is near 0). Instead of fitting a guide per
observation, we fit ONE conditional flow ``q(z | y)`` (``pyro_flows.infer.ConditionalFlow``) by SVI on many
observations at once (a ``pyro.plate`` over them). For a new y, ``q(z | y)`` is then available instantly,
without more optimisation. Because z is 2-D we can compute the exact log-evidence ``log p(y)`` on a grid and
report, for held-out observations, the gap ``log p(y) - ELBO(y) = KL(q(. | y) || p(. | y))``.
"""

import argparse
import math
import sys
import time

import torch

import pyro
import pyro.distributions as dist
import pyro_flows
from pyro_flows.distributions import ConditionalTransformedDistribution
from pyro_flows.experiments.data import ridge_log_prob, ridge_sample
from pyro_flows.experiments.reports import markdown_table
from pyro_flows.experiments.trainer import conditional_density_loss, cosine_decay, train, train_svi
from pyro_flows.infer import ConditionalFlow


# ---------------------------------------------------------------------------------------------
# Part A
# ---------------------------------------------------------------------------------------------
def part_a(name, steps, smoke):
    g = torch.Generator().manual_seed(0)
    x_train, c_train = ridge_sample(512 if smoke else 20000, g)
    x_test, c_test = ridge_sample(256 if smoke else 5000, g)
    flow = pyro_flows.flow(name, 2, num_layers=2 if smoke else 4, context_dim=1)
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    cond = ConditionalTransformedDistribution(base, [flow])
    # conditional_density_loss: -cond.condition(c).log_prob(x).mean(), one call for 256 contexts
    result = train(
        cond,
        conditional_density_loss,
        (x_train, c_train),
        steps=steps,
        batch_size=256,
        lr=5e-3,
        lr_schedule=cosine_decay(0.1),
    )
    for step in range(0, result.steps, max(1, result.steps // 4)):
        print(f"  [A] {name:20s} step {step:4d}  train NLL {result.losses[step]:.3f}")
    with torch.no_grad():
        nll = -cond.condition(c_test).log_prob(x_test).mean().item()
        floor = -ridge_log_prob(x_test, c_test).mean().item()
        # the context changes the density: narrower ridge at c = 0 than at c = 1
        q0 = cond.condition(torch.zeros(1)).sample((2000,))
        q1 = cond.condition(torch.ones(1)).sample((2000,))
    res0 = (q0[:, 1] - torch.sin(3 * q0[:, 0])).std().item()
    res1 = (q1[:, 1] - torch.sin(3 * q1[:, 0])).std().item()
    return {"nll": nll, "floor": floor, "width_c0": res0, "width_c1": res1}


# ---------------------------------------------------------------------------------------------
# Part B
# ---------------------------------------------------------------------------------------------
def simulate(n, g):
    z = torch.randn(n, 2, generator=g)
    y1 = z[:, 0] * z[:, 1] + 0.3 * torch.randn(n, generator=g)
    y2 = z[:, 0] + z[:, 1] + 0.5 * torch.randn(n, generator=g)
    return torch.stack([y1, y2], -1)


def model(y, num_observations=None):
    # the plate declares the data size and the minibatch it sees, so the ELBO is scaled to all observations
    with pyro.plate("observations", num_observations or y.shape[0], subsample_size=y.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(y.new_zeros(2), 1.0).to_event(1))
        pyro.sample("y1", dist.Normal(z[..., 0] * z[..., 1], 0.3), obs=y[:, 0])
        pyro.sample("y2", dist.Normal(z[..., 0] + z[..., 1], 0.5), obs=y[:, 1])


def make_guide(qnet):
    def guide(y, num_observations=None):
        pyro.module("q", qnet)
        with pyro.plate("observations", num_observations or y.shape[0], subsample_size=y.shape[0], dim=-1):
            pyro.sample("z", qnet.condition(y))  # q(z | y): batch shape (num observations,)

    return guide


def log_joint(z, y):
    """log p(z, y) for z of shape (..., 2) and y of shape (2,)."""
    return (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(z[..., 0] * z[..., 1], 0.3).log_prob(y[0])
        + dist.Normal(z[..., 0] + z[..., 1], 0.5).log_prob(y[1])
    )


def exact_log_evidence(y, n=400, lim=5.0):
    lin = torch.linspace(-lim, lim, n, dtype=torch.float64)
    gz = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1)
    cell = (lin[1] - lin[0]) ** 2
    return (torch.logsumexp(log_joint(gz, y.double()).reshape(-1), 0) + torch.log(cell)).item()


def part_b(name, steps, smoke):
    g = torch.Generator().manual_seed(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    qnet = ConditionalFlow(2, 2, name, num_layers=2 if smoke else 4)
    guide = make_guide(qnet)
    # many simulated observations (the prior predictive), 128 per step: amortisation over all of them
    y_all = simulate(128 * steps, g)
    n = y_all.shape[0]
    result = train_svi(
        lambda y: model(y, n), lambda y: guide(y, n), (y_all,), steps=steps, subsample_size=128, lr=3e-3
    )
    for step in range(0, result.steps, max(1, result.steps // 4)):
        print(f"  [B] {name:20s} step {step:4d}  -ELBO per observation {result.losses[step] / n:.3f}")
    y_test = simulate(4 if smoke else 20, torch.Generator().manual_seed(123))
    gaps = []
    with torch.no_grad():
        for y in y_test:
            q = qnet.condition(y)  # no optimisation: the amortised posterior for this y
            z = q.sample((256 if smoke else 4000,))
            elbo = (log_joint(z, y) - q.log_prob(z)).mean().item()
            gaps.append(exact_log_evidence(y, n=100 if smoke else 400) - elbo)
    return {"kl_mean": sum(gaps) / len(gaps), "kl_max": max(gaps)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny run to check that everything works")
    p.add_argument("--family", action="append", help="family (repeatable); default: every registered one")
    p.add_argument("--steps", type=int, default=None, help="training steps per part (default 800; 3 smoke)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    steps = args.steps or (3 if args.smoke else 800)
    families = args.family or list(pyro_flows.FLOWS)
    rows = []
    for name in families:
        t0 = time.perf_counter()
        a = part_a(name, steps, args.smoke)
        b = part_b(name, steps, args.smoke)
        rows.append((name, a, b, time.perf_counter() - t0))
    print("\nPart A: conditional density estimation of p(x | c) (test NLL vs the exact conditional entropy)")
    print(
        markdown_table(
            [dict(a, family=name, gap=a["nll"] - a["floor"]) for name, a, _, _ in rows],
            [
                ("family", "family", None),
                ("nll", "test NLL", "{:.3f}"),
                ("floor", "exact floor", "{:.3f}"),
                ("gap", "gap (KL)", "{:.3f}"),
                ("width_c0", "ridge width at c=0 (true 0.10)", "{:.2f}"),
                ("width_c1", "at c=1 (true 0.40)", "{:.2f}"),
            ],
        )
    )
    print("\nPart B: amortised posterior q(z | y) on held-out y: KL(q || p) = log p(y) - ELBO (exact, grid)")
    print(
        markdown_table(
            [dict(b, family=name, seconds=s) for name, _, b, s in rows],
            [
                ("family", "family", None),
                ("kl_mean", "mean KL", "{:.3f}"),
                ("kl_max", "max KL", "{:.3f}"),
                ("seconds", "seconds (A + B)", "{:.1f}"),
            ],
        )
    )
    ok = all(math.isfinite(a["nll"]) and math.isfinite(b["kl_mean"]) for _, a, b, _ in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
