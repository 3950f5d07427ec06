"""Diagnostics for fitted guides: PSIS k-hat, ELBO, ArviZ export, and moment errors vs reference draws.

* :func:`importance_log_weights` draws ``num_samples`` particles from the guide and returns
  ``log p(x, z) - log q(z)`` per particle, vectorised over particles
  (:func:`pyro.infer.importance.vectorized_importance_weights`, in chunks to bound memory). The
  model and guide must broadcast over a leading particle dimension (as for
  ``vectorize_particles=True``). Their mean is an ELBO estimate; their log-mean-exp an IWAE bound.
* :func:`psis_khat` fits the generalised Pareto tail of the weights (``arviz.psislw`` by default,
  or ``method="pyro"`` for :func:`pyro.infer.importance.psis_diagnostic`'s estimator on the same
  weights). Below 0.5: good; 0.5 to 0.7: usable; above 0.7: the guide misses mass the posterior has
  (Yao et al. 2018). With fewer than about 1000 draws the estimate is itself noisy.
* :func:`guide_draws` returns draws of the model's latent (and deterministic) sites from the guide
  through :class:`pyro.infer.Predictive`; :func:`to_inference_data` exports them as ArviZ
  ``InferenceData`` with a chain dimension (independent draws split into ``num_chains`` "chains",
  so R-hat is ~1 by construction and ESS ~ the number of draws: they are i.i.d.).
* :func:`flatten_draws` names array elements as Stan does (``theta[1]``, ``L[2,1]``), and
  :func:`compare_draws` reports per-parameter mean and sd errors in units of the reference sd:
  ``|mean_q - mean_ref| / sd_ref`` and ``|sd_q - sd_ref| / sd_ref`` (the benchmark's metric).

References:
    Yao, Vehtari, Simpson and Gelman, "Yes, but did it work?: Evaluating variational inference",
    ICML 2018. Vehtari et al., "Pareto smoothed importance sampling", JMLR 2024.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from pyro.infer import Predictive
from pyro.infer.importance import vectorized_importance_weights

__all__ = [
    "importance_log_weights",
    "psis_khat",
    "elbo_estimate",
    "guide_draws",
    "to_inference_data",
    "flatten_draws",
    "compare_draws",
]


def importance_log_weights(model, guide, *args, num_samples: int = 1000, max_plate_nesting: int = 4,
                           chunk_size: int | None = None, **kwargs) -> torch.Tensor:
    """``log p(x, z_s) - log q(z_s)`` for ``num_samples`` guide draws, shape ``(num_samples,)``.

    Arguments:
        model, guide: the model and a (fitted) guide; both must broadcast over a leading particle
            dimension left of ``max_plate_nesting`` plate dimensions.
        num_samples: how many draws.
        max_plate_nesting: at least the model's plate nesting.
        chunk_size: draws per vectorised pass (default: all at once).

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> from pyro.infer.autoguide import AutoNormal
        >>> def model():
        ...     pyro.sample("x", dist.Normal(0., 1.))
        >>> guide = AutoNormal(model, init_scale=1.0)
        >>> importance_log_weights(model, guide, num_samples=10).shape
        torch.Size([10])
    """
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be positive, got {num_samples!r}")
    chunk = int(num_samples) if chunk_size is None else max(1, int(chunk_size))
    out = []
    remaining = int(num_samples)
    with torch.no_grad():
        while remaining > 0:
            n = min(chunk, remaining)
            log_w, _, _ = vectorized_importance_weights(
                model, guide, *args, num_samples=n, max_plate_nesting=max_plate_nesting, **kwargs)
            out.append(log_w.detach().reshape(n))
            remaining -= n
    return torch.cat(out)


def psis_khat(model=None, guide=None, *args, log_weights=None, num_samples: int = 1000,
              method: str = "arviz", **kwargs) -> float:
    """Pareto-smoothed importance sampling tail index k-hat of a fitted guide.

    Give either ``model`` and ``guide`` (plus their ``*args``/``**kwargs``; ``num_samples`` draws,
    ``max_plate_nesting`` and ``chunk_size`` as for :func:`importance_log_weights`) or precomputed
    ``log_weights``. ``method="arviz"`` uses ``arviz.psislw``; ``method="pyro"`` fits the tail as
    :func:`pyro.infer.importance.psis_diagnostic` does. Returns a float.

    Constant log weights (the guide equals the posterior up to a constant) give ``-inf``.

    Example:
        >>> import torch
        >>> lw = 0.1 * torch.randn(1000, generator=torch.Generator().manual_seed(0))
        >>> psis_khat(log_weights=lw) < 0.5
        True
    """
    if method not in ("arviz", "pyro"):
        raise ValueError(f"method must be 'arviz' or 'pyro', got {method!r}")
    if log_weights is None:
        if model is None or guide is None:
            raise ValueError("give model and guide, or log_weights")
        log_weights = importance_log_weights(model, guide, *args, num_samples=num_samples, **kwargs)
    lw = torch.as_tensor(log_weights).detach().reshape(-1).to("cpu", torch.float64)
    if not bool(torch.isfinite(lw).any()):
        return math.inf
    lw = torch.where(torch.isfinite(lw), lw, lw.new_tensor(-math.inf))
    finite = lw[torch.isfinite(lw)]
    if finite.numel() == lw.numel() and float(finite.max() - finite.min()) == 0.0:
        return -math.inf
    if method == "arviz":
        import arviz as az

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # arviz warns when k-hat is large: we return it
            _, k = az.psislw(lw.numpy())
        return float(np.asarray(k))
    if method == "pyro":
        from pyro.ops.stats import fit_generalized_pareto

        # the same tail as pyro.infer.importance.psis_diagnostic
        n = lw.numel()
        m = min(int(0.2 * n), int(3 * math.sqrt(n)))
        w = (lw - lw.max()).exp()
        tail = torch.topk(w, m).values
        k, _ = fit_generalized_pareto(tail - tail.min())
        return float(k)
    raise ValueError(f"method must be 'arviz' or 'pyro', got {method!r}")


def elbo_estimate(log_weights) -> dict:
    """ELBO (mean log weight) with its Monte Carlo standard error, and the IWAE bound."""
    lw = torch.as_tensor(log_weights).detach().reshape(-1).to("cpu", torch.float64)
    finite = lw[torch.isfinite(lw)]
    n = lw.numel()
    elbo = float(lw.mean())
    se = float(finite.std() / math.sqrt(max(finite.numel(), 1))) if finite.numel() > 1 else math.nan
    iwae = float(torch.logsumexp(lw, 0) - math.log(n))
    return {"elbo": elbo, "elbo_se": se, "iwae": iwae}


def guide_draws(model, guide, *args, num_samples: int = 1000, sites=None, parallel: bool = True,
                **kwargs) -> dict:
    """Draws of the model's latent sites (and its deterministic sites) from the guide.

    Returns a dict name -> tensor ``(num_samples,) + site_shape``, on the guide's device.
    ``sites``: names to return (default: every non-observed sample site and every
    ``pyro.deterministic`` site of the model). ``parallel=True`` vectorises over draws
    (needs a model that broadcasts over a leading particle dimension).
    """
    import pyro.poutine as poutine
    from pyro.poutine.util import site_is_subsample

    with torch.no_grad(), poutine.block():
        tr = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(*args, **kwargs))
                           ).get_trace(*args, **kwargs)
    if sites is None:
        sites = [name for name, s in tr.nodes.items()
                 if s["type"] == "sample" and not site_is_subsample(s) and not name.startswith("_")
                 and (not s["is_observed"] or s["infer"].get("_deterministic"))]
    missing = [n for n in sites if n not in tr.nodes]
    if missing:
        raise ValueError(f"sites {missing} are not in the model")
    predictive = Predictive(model, guide=guide, num_samples=int(num_samples), return_sites=list(sites),
                            parallel=parallel)
    with torch.no_grad():
        samples = predictive(*args, **kwargs)
    # Predictive keeps singleton plate dims of a vectorised run: reshape to the site's own shape
    return {name: samples[name].detach().reshape((int(num_samples),) + tuple(tr.nodes[name]["value"].shape))
            for name in sites}


def flatten_draws(draws: dict) -> dict:
    """``{name: (S,) + shape}`` -> ``{stan_name: (S,) numpy}`` with 1-based Stan indices."""
    flat = {}
    for name, v in draws.items():
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        shape = a.shape[1:]
        if not shape:
            flat[name] = a
            continue
        a = a.reshape(a.shape[0], -1)
        for j, idx in enumerate(np.ndindex(*shape)):
            flat[f"{name}[{','.join(str(i + 1) for i in idx)}]"] = a[:, j]
    return flat


def to_inference_data(draws: dict, num_chains: int = 4):
    """ArviZ ``InferenceData`` of guide draws with a chain dimension.

    ``draws``: ``{name: (S,) + shape}`` (e.g. from :func:`guide_draws`); the S independent draws are
    split into ``num_chains`` chains of ``S // num_chains`` draws (a remainder is dropped).

    Example:
        >>> import torch
        >>> idata = to_inference_data({"mu": torch.randn(100), "theta": torch.randn(100, 3)})
        >>> dict(idata.posterior.sizes)["chain"], dict(idata.posterior.sizes)["draw"]
        (4, 25)
    """
    import arviz as az

    if int(num_chains) < 1:
        raise ValueError(f"num_chains must be positive, got {num_chains!r}")
    posterior = {}
    for name, v in draws.items():
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        per_chain = a.shape[0] // int(num_chains)
        if per_chain < 1:
            raise ValueError(f"{a.shape[0]} draws cannot fill {num_chains} chains")
        a = a[: per_chain * int(num_chains)]
        posterior[name] = a.reshape((int(num_chains), per_chain) + a.shape[1:])
    return az.from_dict(posterior=posterior)


def compare_draws(draws: dict, reference: dict, names=None) -> dict:
    """Mean and sd errors of ``draws`` against ``reference``, in reference standard deviations.

    Arguments:
        draws, reference: ``{name: array (S,)}`` (flattened, e.g. by :func:`flatten_draws`; nested
            arrays are flattened here too).
        names: parameters to compare (default: those in both).

    Returns:
        ``{"per_param": {name: {"mean_err", "sd_err"}}, "mean_err_max", "mean_err_rms",
        "sd_err_max", "sd_err_rms", "names"}``.

    Example:
        >>> import numpy as np
        >>> r = compare_draws({"a": np.array([0., 2.])}, {"a": np.array([-1., 1.])})  # reference sd sqrt(2)
        >>> round(r["mean_err_max"], 3), r["sd_err_max"]
        (0.707, 0.0)
    """
    d = draws if all(np.ndim(v) == 1 for v in draws.values()) else flatten_draws(draws)
    r = reference if all(np.ndim(v) == 1 for v in reference.values()) else flatten_draws(reference)
    if names is None:
        names = [n for n in r if n in d]
    if not names:
        raise ValueError(f"no common parameters: draws have {sorted(d)[:10]}, reference {sorted(r)[:10]}")
    per = {}
    for n in names:
        q = np.asarray(d[n], dtype=np.float64).reshape(-1)
        ref = np.asarray(r[n], dtype=np.float64).reshape(-1)
        sd_ref = ref.std(ddof=1) if ref.size > 1 else 0.0
        sd_ref = sd_ref if sd_ref > 0 else 1.0
        per[n] = {"mean_err": float(abs(q.mean() - ref.mean()) / sd_ref),
                  "sd_err": float(abs((q.std(ddof=1) if q.size > 1 else 0.0) - ref.std(ddof=1)) / sd_ref)}
    me = np.array([v["mean_err"] for v in per.values()])
    se = np.array([v["sd_err"] for v in per.values()])
    return {"per_param": per, "names": list(names), "mean_err_max": float(me.max()),
            "mean_err_rms": float(np.sqrt((me ** 2).mean())), "sd_err_max": float(se.max()),
            "sd_err_rms": float(np.sqrt((se ** 2).mean()))}
