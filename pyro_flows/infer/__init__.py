"""Flows in Pyro inference: an autoguide, conditional (amortised) flow distributions, diagnostics.

Public names:

* :class:`AutoFlow` (``AutoFlow(model)``, or ``AutoFlow(model, "<family>", num_layers, **kwargs)``), a
  flow autoguide ``z = loc + L f(eps)`` that starts as ``AutoMultivariateNormal`` (full-rank affine part,
  flow layers at the exact identity, skipped until the affine part has converged) and its optimiser
  factory ``AutoFlow.optimizer()`` (a :func:`PlateauAdam`: Adam whose rate halves each time a parameter is
  stationary, :mod:`pyro_flows.infer.schedule`); :func:`init_identity`, :class:`PlateauTest`, :func:`make_flow`;
  :func:`clear_transform_cache` (the transform cache and its stale-graph pitfall are documented in
  :mod:`pyro_flows.infer.autoguide`; the guide in ``docs/autoflow.md``).
* :class:`ConditionalFlow` / :func:`conditional_flow_distribution`: ``q(y | context)`` whose
  ``condition(ctx)`` has batch shape ``ctx.shape[:-1]``, for amortised guides and conditional
  density estimation inside a data plate.
* Diagnostics: :func:`importance_log_weights`, :func:`psis_khat`, :func:`elbo_estimate`,
  :func:`guide_draws`, :func:`to_inference_data`, :func:`flatten_draws`, :func:`compare_draws`.
* :mod:`pyro_flows.infer.posteriordb`: Pyro models and reference draws of the posteriordb subset.

Example:
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro.distributions.transforms import affine_autoregressive
    >>> from pyro_flows.infer import AutoFlow
    >>> pyro.clear_param_store()
    >>> def model():
    ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    >>> guide = AutoFlow(model, affine_autoregressive)  # or AutoFlow(model), or AutoFlow(model, "sinusoidal")
    >>> guide()["x"].shape
    torch.Size([2])
"""

from .autoguide import AutoFlow, PlateauTest, clear_transform_cache, init_identity, make_flow
from .schedule import PlateauAdam, PlateauAdamOptimizer
from .conditional import ConditionalFlow, conditional_flow_distribution
from . import diagnostics as _diagnostics
from .diagnostics import *  # noqa: F403  (the names in diagnostics.__all__, re-exported below)

__all__ = [
    "AutoFlow",
    "PlateauTest",
    "PlateauAdam",
    "PlateauAdamOptimizer",
    "init_identity",
    "make_flow",
    "clear_transform_cache",
    "ConditionalFlow",
    "conditional_flow_distribution",
    *_diagnostics.__all__,
]
