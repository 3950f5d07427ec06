"""Pyro models and reference draws for the posteriordb subset in ``../shared/data/posteriordb``.

The data directory is found at ``$PYRO_FLOWS_POSTERIORDB`` if that is set, else at
``<repository>/../shared/data/posteriordb`` (see :func:`posteriordb_path`). Its README describes the
layout: ``posteriors/<name>.json`` (model, data and reference names), ``models/<model>.stan``,
``data/<data>.json.zip`` and ``reference_draws/<reference>.json.zip`` (10 chains x 1000 draws of every
parameter, named as Stan does: ``theta[1]``).

Each model here is a line-by-line translation of the Stan program, with these conventions:

* Sites carry Stan's parameter names and shapes, so guide draws flatten to the reference names
  (:func:`pyro_flows.infer.flatten_draws`); Stan's transformed parameters are
  ``pyro.deterministic`` sites (``theta`` of the non-centred eight schools, ``f`` of the GP,
  ``beta1`` of GARCH).
* Stan's implicit flat priors are ``ImproperUniform`` sites with the declared support (their ``sample``
  returns the feasible point ``biject_to(support)(0)``, so Pyro's init strategies start there).
  Constrained proper priors (``real<lower=0> tau; tau ~ cauchy(0, 5)``) become the half
  distributions; Stan drops their normalising constants, so ELBOs here differ from Stan's ``lp__``
  by constants, equal for every guide of one posterior (compare ELBOs within a posterior only).
* A bound that depends on another parameter (GARCH: ``beta1 < 1 - alpha1``) cannot be a Pyro
  support, because autoguides fix the supports at their prototype trace. It is reparameterised as
  ``beta1 = (1 - alpha1) * u`` with ``u`` in (0, 1) and the Jacobian ``log(1 - alpha1)`` added as a
  factor, which leaves the target density unchanged.
* ``ordered[2] mu`` (Gaussian mixture) uses Pyro's ``ordered_vector`` support with the Normal prior
  as a factor (Stan's density on the ordered cone, unnormalised like Stan's).
* Every model broadcasts over leading particle dimensions (no plates: the likelihood is an event
  dimension), so ``vectorize_particles=True``, ``Predictive(parallel=True)`` and vectorised
  importance weights work; ``max_plate_nesting`` is 0.
* GARCH's variance recursion ``s_t = a_t + beta1 s_{t-1}`` is linear in ``s``; it is evaluated in
  closed form as ``s = beta1^t s_0 + P a`` with the lower-triangular matrix
  ``P[t, j] = beta1^(t - j)``, vectorised over particles instead of a Python loop over time.
* The GP keeps Stan's jitter of 1e-10 on the kernel diagonal and needs float64 (the default here).

Example:
    >>> from pyro_flows.infer import posteriordb as pdb
    >>> if pdb.available():  # doctest: +SKIP
    ...     post = pdb.load_posterior("eight_schools-eight_schools_noncentered")
    ...     sorted(post.reference)[:3]
    ['mu', 'tau', 'theta[1]']
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to

__all__ = ["POSTERIORS", "ENV_VAR", "posteriordb_path", "available", "load_data", "load_reference_draws",
           "load_posterior", "Posterior"]

ENV_VAR = "PYRO_FLOWS_POSTERIORDB"

POSTERIORS = (
    "eight_schools-eight_schools_noncentered",
    "eight_schools-eight_schools_centered",
    "kilpisjarvi_mod-kilpisjarvi",
    "arK-arK",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "garch-garch11",
    "gp_pois_regr-gp_pois_regr",
    "nes2000-nes",
    "diamonds-diamonds",
)


def posteriordb_path() -> str:
    """``$PYRO_FLOWS_POSTERIORDB`` if set, else ``<repo>/../shared/data/posteriordb``."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return os.path.normpath(os.path.join(repo, "..", "shared", "data", "posteriordb"))


def available() -> bool:
    """Whether the posteriordb directory (with ``posteriors/``) exists."""
    return os.path.isdir(os.path.join(posteriordb_path(), "posteriors"))


def _read_zip_json(path):
    with zipfile.ZipFile(path) as z:
        with z.open(z.namelist()[0]) as f:
            return json.load(f)


def _info(name):
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}; expected one of {POSTERIORS}")
    path = os.path.join(posteriordb_path(), "posteriors", name + ".json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found; set ${ENV_VAR} to the posteriordb directory")
    with open(path) as f:
        return json.load(f)


def load_data(name: str) -> dict:
    """The model's data (a dict of Python lists and numbers) for posterior ``name``."""
    info = _info(name)
    return _read_zip_json(os.path.join(posteriordb_path(), "data", info["data_name"] + ".json.zip"))


def load_reference_draws(name: str, by_chain: bool = False) -> dict:
    """Reference draws: ``{stan_name: array (10000,)}`` (or ``(10, 1000)`` with ``by_chain``)."""
    info = _info(name)
    chains = _read_zip_json(os.path.join(posteriordb_path(), "reference_draws",
                                         info["reference_posterior_name"] + ".json.zip"))
    out = {k: np.asarray([c[k] for c in chains], dtype=np.float64) for k in chains[0]}
    return out if by_chain else {k: v.reshape(-1) for k, v in out.items()}


class _Flat(dist.ImproperUniform):
    """A flat prior on ``support``. ``sample`` returns the feasible point ``biject_to(support)(0)``
    (not a draw: the prior is improper), which is what Pyro's ``init_to_median`` and
    ``init_to_feasible`` then use as the initial value."""

    def __init__(self, support, ref, event_shape=()):
        self._ref = ref
        super().__init__(support, batch_shape=torch.Size(), event_shape=torch.Size(event_shape))

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(_Flat, _instance)
        new._ref = self._ref
        return super().expand(batch_shape, _instance=new)

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        return biject_to(self.support)(self._ref.new_zeros(shape))


def _flat(support, ref, event_shape=()):
    return _Flat(support, ref, event_shape)


@dataclass
class Posterior:
    """A posteriordb posterior: ``model()`` (no arguments), ``reference`` draws, metadata.

    Attributes:
        name: the posteriordb name.
        model: a Pyro model taking no arguments.
        reference: ``{stan_name: np.ndarray (10000,)}``.
        sites: the model sites that carry the reference parameters (for ``guide_draws``).
        dim: the unconstrained latent dimension.
        max_plate_nesting: 0 for every model here.
    """

    name: str
    model: Callable
    reference: dict
    sites: list
    dim: int
    max_plate_nesting: int = 0
    data: dict = field(default_factory=dict, repr=False)


def _t(x, dtype, device):
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=dtype, device=device)


def _eight_schools(d, dtype, device, centered):
    y, sigma = _t(d["y"], dtype, device), _t(d["sigma"], dtype, device)
    J = int(d["J"])
    zero, one = y.new_zeros(()), y.new_ones(())

    def model():
        mu = pyro.sample("mu", dist.Normal(zero, 5 * one))
        tau = pyro.sample("tau", dist.HalfCauchy(5 * one))
        if centered:
            theta = pyro.sample("theta", dist.Normal(mu[..., None], tau[..., None]).expand(
                mu.shape + (J,)).to_event(1))
        else:
            tt = pyro.sample("theta_trans", dist.Normal(zero, one).expand([J]).to_event(1))
            theta = pyro.deterministic("theta", tt * tau[..., None] + mu[..., None], event_dim=1)
        pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)

    return model, ["theta", "mu", "tau"], J + 2


def _kilpisjarvi(d, dtype, device):
    x, y = _t(d["x"], dtype, device), _t(d["y"], dtype, device)
    c = {k: float(d[k]) for k in ("pmualpha", "psalpha", "pmubeta", "psbeta")}
    one = y.new_ones(())

    def model():
        alpha = pyro.sample("alpha", dist.Normal(c["pmualpha"] * one, c["psalpha"] * one))
        beta = pyro.sample("beta", dist.Normal(c["pmubeta"] * one, c["psbeta"] * one))
        sigma = pyro.sample("sigma", _flat(constraints.positive, y))
        pyro.sample("y", dist.Normal(alpha[..., None] + beta[..., None] * x, sigma[..., None]).to_event(1),
                    obs=y)

    return model, ["alpha", "beta", "sigma"], 3


def _ark(d, dtype, device):
    K, T = int(d["K"]), int(d["T"])
    y = _t(d["y"], dtype, device)
    # X[t - K, k - 1] = y[t - k] (0-based t = K..T-1, k = 1..K): beta[k] * y[t - k] in Stan
    X = torch.stack([y[K - k: T - k] for k in range(1, K + 1)], dim=-1)
    target = y[K:]
    one = y.new_ones(())

    def model():
        alpha = pyro.sample("alpha", dist.Normal(0 * one, 10 * one))
        beta = pyro.sample("beta", dist.Normal(0 * one, 10 * one).expand([K]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(2.5 * one))
        mu = alpha[..., None] + torch.einsum("tk,...k->...t", X, beta)
        pyro.sample("y", dist.Normal(mu, sigma[..., None]).to_event(1), obs=target)

    return model, ["alpha", "beta", "sigma"], K + 2


def _gauss_mix(d, dtype, device):
    y = _t(d["y"], dtype, device)
    one = y.new_ones(())

    def model():
        mu = pyro.sample("mu", _flat(constraints.ordered_vector, y, (2,)))
        pyro.factor("mu_prior", dist.Normal(0 * one, 2 * one).log_prob(mu).sum(-1))
        sigma = pyro.sample("sigma", dist.HalfNormal(2 * one).expand([2]).to_event(1))
        theta = pyro.sample("theta", dist.Beta(5 * one, 5 * one))
        lp1 = dist.Normal(mu[..., 0:1], sigma[..., 0:1]).log_prob(y) + torch.log(theta)[..., None]
        lp2 = dist.Normal(mu[..., 1:2], sigma[..., 1:2]).log_prob(y) + torch.log1p(-theta)[..., None]
        pyro.factor("y", torch.logaddexp(lp1, lp2).sum(-1))

    return model, ["mu", "sigma", "theta"], 5


def _garch(d, dtype, device):
    T = int(d["T"])
    y = _t(d["y"], dtype, device)
    s0 = float(d["sigma1"]) ** 2
    idx = torch.arange(T, device=device)
    lag = (idx[:, None] - idx[None, :]).to(dtype)            # t - j
    lower = (idx[None, :] >= 1) & (idx[:, None] >= idx[None, :])  # 1 <= j <= t
    lag_c = lag.clamp(min=0)
    tpow = idx.to(dtype)
    tiny = torch.finfo(dtype).tiny

    def model():
        mu = pyro.sample("mu", _flat(constraints.real, y))
        alpha0 = pyro.sample("alpha0", _flat(constraints.positive, y))
        alpha1 = pyro.sample("alpha1", _flat(constraints.unit_interval, y))
        u = pyro.sample("beta1_unit", _flat(constraints.unit_interval, y))
        beta1 = pyro.deterministic("beta1", (1 - alpha1) * u)
        pyro.factor("beta1_jacobian", torch.log1p(-alpha1))
        # a_j = alpha0 + alpha1 (y_{j-1} - mu)^2 for j >= 1 (a_0 unused)
        prev = torch.cat([y[:1], y[:-1]])
        a = alpha0[..., None] + alpha1[..., None] * (prev - mu[..., None]) ** 2
        logb = torch.log(beta1.clamp(min=tiny))[..., None, None]
        P = torch.where(lower, torch.exp(lag_c * logb), torch.zeros_like(logb))
        s = torch.exp(tpow * logb[..., 0]) * s0 + (P @ a[..., None])[..., 0]
        pyro.sample("y", dist.Normal(mu[..., None], s.sqrt()).to_event(1), obs=y)

    return model, ["mu", "alpha0", "alpha1", "beta1"], 4


def _gp_pois(d, dtype, device):
    x = _t(d["x"], dtype, device)
    k = _t(d["k"], dtype, device)
    N = int(d["N"])
    sq = (x[:, None] - x[None, :]) ** 2
    eye = torch.eye(N, dtype=dtype, device=device)
    one = x.new_ones(())

    def model():
        rho = pyro.sample("rho", dist.Gamma(25 * one, 4 * one))
        alpha = pyro.sample("alpha", dist.HalfNormal(2 * one))
        f_tilde = pyro.sample("f_tilde", dist.Normal(0 * one, one).expand([N]).to_event(1))
        cov = alpha[..., None, None] ** 2 * torch.exp(-0.5 * sq / rho[..., None, None] ** 2) + 1e-10 * eye
        L = torch.linalg.cholesky(cov)
        f = pyro.deterministic("f", (L @ f_tilde[..., None])[..., 0], event_dim=1)
        pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)

    return model, ["rho", "alpha", "f"], N + 2


def _nes(d, dtype, device):
    age = np.asarray(d["age_discrete"])
    cols = [np.ones(len(age)), d["real_ideo"], d["race_adj"], age == 2, age == 3, age == 4,
            d["educ1"], d["gender"], d["income"]]
    X = _t(np.stack([np.asarray(c, dtype=np.float64) for c in cols], -1), dtype, device)
    y = _t(d["partyid7"], dtype, device)

    def model():
        beta = pyro.sample("beta", _flat(constraints.real, y, (9,)))
        sigma = pyro.sample("sigma", _flat(constraints.positive, y))
        mu = torch.einsum("nk,...k->...n", X, beta)
        pyro.sample("y", dist.Normal(mu, sigma[..., None]).to_event(1), obs=y)

    return model, ["beta", "sigma"], 10


def _diamonds(d, dtype, device):
    X = np.asarray(d["X"], dtype=np.float64)
    Xc = X[:, 1:] - X[:, 1:].mean(0)
    Xc = _t(Xc, dtype, device)
    Y = _t(d["Y"], dtype, device)
    Kc = Xc.shape[1]
    one = Y.new_ones(())
    half_t = dist.StudentT(3 * one, 0 * one, 10 * one)

    def model():
        b = pyro.sample("b", dist.Normal(0 * one, one).expand([Kc]).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(3 * one, 8 * one, 10 * one))
        sigma = pyro.sample("sigma", _flat(constraints.positive, Y))
        pyro.factor("sigma_prior", half_t.log_prob(sigma) + math.log(2.0))
        mu = intercept[..., None] + torch.einsum("nk,...k->...n", Xc, b)
        pyro.sample("Y", dist.Normal(mu, sigma[..., None]).to_event(1), obs=Y)

    return model, ["b", "Intercept", "sigma"], Kc + 2


_BUILDERS = {
    "eight_schools-eight_schools_noncentered": lambda d, t, v: _eight_schools(d, t, v, centered=False),
    "eight_schools-eight_schools_centered": lambda d, t, v: _eight_schools(d, t, v, centered=True),
    "kilpisjarvi_mod-kilpisjarvi": _kilpisjarvi,
    "arK-arK": _ark,
    "low_dim_gauss_mix-low_dim_gauss_mix": _gauss_mix,
    "garch-garch11": _garch,
    "gp_pois_regr-gp_pois_regr": _gp_pois,
    "nes2000-nes": _nes,
    "diamonds-diamonds": _diamonds,
}


def load_posterior(name: str, dtype=torch.float64, device=None) -> Posterior:
    """The Pyro model, reference draws and metadata of posterior ``name`` (see :data:`POSTERIORS`).

    Data tensors are created with ``dtype`` (default float64) on ``device`` (default CPU).
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    data = load_data(name)
    model, sites, dim = _BUILDERS[name](data, dtype, device)
    return Posterior(name=name, model=model, reference=load_reference_draws(name), sites=sites, dim=dim,
                     data=data)
