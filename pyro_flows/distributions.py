"""A conditional transformed distribution whose batch shape follows the context.

Pyro's ``ConditionalTransformedDistribution.condition(context)`` keeps the base distribution's batch
shape, so conditioning on a ``(B, C)`` batch of contexts and calling ``sample()`` draws one ``(D,)``
base sample that is then broadcast through B different transforms: samples are not independent per
context and ``batch_shape`` is wrong. Here the base distribution is expanded to the context's batch
shape, so ``condition(ctx).sample()`` has shape ``ctx.shape[:-1] + (D,)`` and draws independently
per context, with no Python loop.

Example:
    >>> import torch, pyro.distributions as dist, pyro_flows
    >>> from pyro_flows.distributions import ConditionalTransformedDistribution
    >>> t = pyro_flows.flow(pyro_flows.FLOWS[0], 2, num_layers=2, context_dim=3)  # doctest: +SKIP
    >>> d = ConditionalTransformedDistribution(dist.Normal(torch.zeros(2), 1.).to_event(1), [t])  # doctest: +SKIP
    >>> d.condition(torch.randn(5, 3)).sample().shape  # doctest: +SKIP
    torch.Size([5, 2])
"""

from __future__ import annotations

import torch
from pyro.distributions import TransformedDistribution
from pyro.distributions.conditional import (
    ConditionalTransformedDistribution as _PyroConditionalTransformedDistribution,
)

__all__ = ["ConditionalTransformedDistribution"]


class ConditionalTransformedDistribution(_PyroConditionalTransformedDistribution):
    """Like Pyro's, but ``condition(context)`` has batch shape ``context.shape[:-1]`` (broadcast with
    the base distribution's own batch shape)."""

    def condition(self, context: torch.Tensor) -> TransformedDistribution:
        base = self.base_dist.condition(context)
        transforms = [t.condition(context) for t in self.transforms]
        batch_shape = torch.broadcast_shapes(context.shape[:-1], base.batch_shape)
        if batch_shape != base.batch_shape:
            base = base.expand(batch_shape)
        return TransformedDistribution(base, transforms)
