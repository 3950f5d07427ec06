"""A Laplace start for Gaussian-based guides: the mode, the curvature there, and a check that it helps.

An ``AutoMultivariateNormal``-type guide started at the model's initial point with a small isotropic
scale spends most of its early steps walking to the posterior's location and learning its scales; on a
badly conditioned posterior (a regression with correlated predictors, a trend against a large year)
Adam's per-coordinate steps of about the learning rate take thousands of steps to get there. The
Laplace approximation ``N(m, H^{-1})`` (``m`` the mode of the log joint in the unconstrained space,
``H`` the negative Hessian there) is the classical cheap answer: a few hundred L-BFGS evaluations and
``D`` Hessian-vector passes. It is also a poor start where the posterior has no useful mode (a funnel,
whose log density grows without bound towards its neck). So :func:`laplace_start` computes it and then
*checks* it: it estimates the ELBO of both candidate Gaussians (the Laplace one and the default start)
with the same draws (common random numbers) and returns the Laplace one only if its ELBO is higher.

The guide then trains in the Laplace frame (``z = m + P u`` with ``P P^T = H^{-1}``, see
:class:`~pyro_flows.infer.AutoFlow`): a learning rate is then in units of the posterior's own scales,
so a step neither undoes the start on a stiff coordinate nor crawls on a loose one.

Example:
    >>> import torch, pyro.distributions as dist
    >>> target = dist.Normal(torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.01]))
    >>> start = laplace_start(lambda z: target.log_prob(z).sum(-1), torch.zeros(2), init_scale=0.1)
    >>> start.accepted
    True
    >>> [round(float(v), 3) for v in start.loc], [round(float(v), 3) for v in start.scale_tril.diagonal()]
    ([3.0, -1.0], [2.0, 0.01])

    In a guide: ``AutoFlow(model)`` calls it when it builds its parameters (``laplace=True``, default).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from pyro import poutine
from torch.distributions import biject_to

__all__ = ["LaplaceStart", "conditioned_trace", "is_subsampled", "laplace_start", "unconstrained_log_joint"]

#: L-BFGS function evaluations the mode search may spend (``laplace=True``)
DEFAULT_MAX_EVALS = 500
#: draws per candidate in the ELBO comparison
DEFAULT_DRAWS = 64
#: above this latent dimension the D Hessian passes and the D x D decomposition are not attempted
MAX_DIM = 512


@dataclass
class LaplaceStart:
    """The result of :func:`laplace_start`.

    Attributes:
        accepted: whether the Laplace Gaussian had the higher ELBO estimate (``loc``/``scale_tril`` are
            then its mean and the Cholesky factor of its covariance; else the default start's).
        loc, scale_tril: the chosen Gaussian ``N(loc, scale_tril scale_tril^T)`` (unconstrained space).
        info: diagnostics: ``elbo_laplace``, ``elbo_default`` (estimates, nats), ``evals`` (L-BFGS
            evaluations), ``seconds`` (wall), ``reason`` (why not accepted, if so).
    """

    accepted: bool
    loc: torch.Tensor
    scale_tril: torch.Tensor
    info: dict = field(default_factory=dict)


def conditioned_trace(guide, model, latent, args=(), kwargs=None):
    """``(trace, log_det)``: the trace of ``model`` conditioned on the constrained values of an
    ``AutoContinuous`` guide's unconstrained latent vector ``latent`` (shape ``(D,)``), and the sum of the
    ``biject_to`` maps' log-Jacobians. Draws no random numbers (every latent site is conditioned)."""
    kwargs = {} if kwargs is None else kwargs
    values, log_det = {}, latent.new_zeros(())
    for site, unconstrained in guide._unpack_latent(latent):
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
        values[site["name"]] = value
    with poutine.block():
        trace = poutine.trace(poutine.condition(model, values)).get_trace(*args, **kwargs)
    return trace, log_det


def unconstrained_log_joint(guide, model, args=(), kwargs=None):
    """The log joint density of ``model`` as a function of an ``AutoContinuous`` guide's unconstrained latent
    vector (one vector, shape ``(D,)``), including the log-Jacobians of the ``biject_to`` maps: the
    density whose Gaussian approximations the guide's affine part describes. The guide's prototype
    trace must exist. ``model`` is the user's model (not ``guide.model``, which Pyro wraps in the
    ``init_loc_fn`` handler: that one draws from the prior at every site, consuming random numbers)."""

    def log_joint(latent):
        trace, log_det = conditioned_trace(guide, model, latent, args, kwargs)
        return trace.log_prob_sum() + log_det

    return log_joint


def is_subsampled(trace) -> bool:
    """Whether a model trace has a site in a subsampled plate (``subsample_size`` below the plate's size):
    its log joint is then random. A scaled site (``poutine.scale``, tempering) is not: its log joint is
    deterministic and the Laplace start applies."""
    return any(f.full_size is not None and f.full_size != f.size
               for site in trace.nodes.values() if site["type"] == "sample"
               for f in site["cond_indep_stack"])


def _mode(log_joint, x0, max_evals):
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_evals, max_eval=max_evals, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)
    evals = 0

    def closure():
        nonlocal evals
        evals += 1
        opt.zero_grad()
        loss = -log_joint(x)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite log joint during the mode search")
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach(), evals


def _neg_hessian(log_joint, x):
    x = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(log_joint(x), x, create_graph=True)
    rows = [torch.autograd.grad(grad[i], x, retain_graph=i + 1 < len(x))[0] for i in range(len(x))]
    h = -torch.stack(rows)
    return 0.5 * (h + h.T)


@torch.no_grad()
def _elbo(log_joint, loc, tril, eps):
    z = loc + eps @ tril.T
    log_q = -0.5 * (eps ** 2).sum(-1) - tril.diagonal().abs().log().sum() - 0.5 * len(loc) * math.log(2 * math.pi)
    log_p = torch.stack([log_joint(zi) for zi in z])
    value = (log_p - log_q).mean()
    return float(value) if torch.isfinite(value) else -math.inf


def laplace_start(log_joint, init_loc, init_scale, max_evals: int = DEFAULT_MAX_EVALS,
                  draws: int = DEFAULT_DRAWS, diagonal: bool = False, seed: int = 0) -> LaplaceStart:
    """The Laplace approximation of ``log_joint`` if it beats the default start ``N(init_loc, init_scale^2 I)``.

    Arguments:
        log_joint: the unnormalised log density of one unconstrained vector (e.g.
            :func:`unconstrained_log_joint`).
        init_loc: the start of the mode search and the default start's mean.
        init_scale: the default start's scale.
        max_evals: L-BFGS evaluations for the mode search.
        draws: standard-normal draws per candidate for the ELBO comparison (the same draws for both).
        diagonal: a diagonal Gaussian (``AutoDiagonalNormal``'s family): its scales are
            ``H_ii^{-1/2}``, the optimal mean-field scales for a Gaussian with precision ``H``.
        seed: the comparison's draws come from a private generator with this seed (the global RNG is
            not touched).

    Never raises on a difficult model: a failed search, a non-finite log density or a singular
    curvature return the default start with the ``reason`` in ``info``.
    """
    t0 = time.perf_counter()
    loc0 = init_loc.detach()
    d = loc0.shape[-1]
    default_tril = torch.eye(d, dtype=loc0.dtype, device=loc0.device) * init_scale
    info = {"evals": 0, "elbo_laplace": -math.inf, "elbo_default": -math.inf}

    def default(reason):
        info.update(reason=reason, seconds=time.perf_counter() - t0)
        return LaplaceStart(False, loc0.clone(), default_tril, info)

    if d > MAX_DIM:
        return default(f"latent dimension {d} > {MAX_DIM}")
    try:
        with torch.enable_grad():
            mode, info["evals"] = _mode(log_joint, loc0, max_evals)
            h = _neg_hessian(log_joint, mode).double()
    except (FloatingPointError, RuntimeError, ValueError) as exc:
        return default(f"{type(exc).__name__}: {str(exc)[:100]}")
    if not (torch.isfinite(mode).all() and torch.isfinite(h).all()):
        return default("non-finite mode or curvature")
    if diagonal:
        hd = h.diagonal()
        if not bool((hd > 0).all()):
            return default("curvature not positive on the diagonal")
        tril = torch.diag(hd.rsqrt())
    else:
        evals, vecs = torch.linalg.eigh(h)
        if not bool(evals[0] > 0):
            return default(f"curvature not positive definite (smallest eigenvalue {float(evals[0]):.3g})")
        cov = (vecs / evals) @ vecs.T
        tril, bad = torch.linalg.cholesky_ex(0.5 * (cov + cov.T))
        if bool(bad):
            return default("covariance not positive definite in floating point")
    tril = tril.to(loc0.dtype)
    gen = torch.Generator(device=loc0.device).manual_seed(seed)
    eps = torch.randn(draws, d, generator=gen, dtype=loc0.dtype, device=loc0.device)
    try:
        info["elbo_default"] = _elbo(log_joint, loc0, default_tril, eps)
        info["elbo_laplace"] = _elbo(log_joint, mode, tril, eps)
    except (RuntimeError, ValueError) as exc:
        if not math.isfinite(info["elbo_default"]):
            info["elbo_default"] = -math.inf
        return default(f"ELBO comparison: {type(exc).__name__}: {str(exc)[:100]}")
    if not info["elbo_laplace"] > info["elbo_default"]:
        return default("the default start has the higher ELBO estimate")
    info.update(reason=None, seconds=time.perf_counter() - t0)
    return LaplaceStart(True, mode, tril, info)
