"""Conditional flow distributions for amortised guides and conditional density estimation.

:class:`ConditionalFlow` is an ``nn.Module`` holding a conditional flow stack (any registered family
through ``pyro_flows.flow(name, D, num_layers, context_dim=C)``, or a user callable) and a standard
normal base whose buffers follow ``.to()``. ``ConditionalFlow(...).condition(context)`` returns a
``TransformedDistribution`` with batch shape ``context.shape[:-1]`` (through
:class:`pyro_flows.distributions.ConditionalTransformedDistribution`, which expands the base to the
context batch; Pyro's own class keeps the base's batch shape, so a ``(B, C)`` context would draw
one base sample shared by all B contexts). One call samples once per context, without Python loops,
so it can be used directly at a ``pyro.sample`` site inside a plate over contexts:

* amortised guide: ``with pyro.plate("datasets", M): pyro.sample("z", cflow.condition(summaries))``;
* conditional density estimation in a model:
  ``with pyro.plate("data", N): pyro.sample("y", cflow.condition(x), obs=y)``.

Contexts are checked where they enter (``condition``): a wrong size names the expected and actual
sizes, and a NaN or infinite context raises ``ValueError`` naming the context while Pyro's validation
is enabled (the default; the check reads the values back to the host, so
``pyro.enable_validation(False)`` skips it for speed).

Register it with ``pyro.module("name", cflow)`` in the model or guide so SVI trains its parameters.

By default (``affine=True``) a learnable conditional affine layer follows the flow:
``y = m(c) + exp(s(c)) * f(eps; c)`` with ``m``, ``s`` linear in the context and initialised at zero
(so the layer starts as the identity). It makes the distribution at least as flexible as an
amortised diagonal Gaussian whatever family is used, and lets the flow work on standardised
coordinates (the same reasoning as ``AutoFlow``'s affine layer).

Optional fixed ``loc``/``scale`` (e.g. the data's mean and standard deviation) add a final affine
layer ``y = loc + scale * f(eps; context)`` so the flow works on standardised coordinates; the
``scale`` must be positive and both are buffers (moved by ``.to()``, saved in ``state_dict``).

References:
    Papamakarios et al., "Masked autoregressive flow for density estimation", NeurIPS 2017
    (conditional flows); Kingma et al., "Semi-supervised learning with deep generative models",
    NeurIPS 2014 (amortised inference).
"""

from __future__ import annotations

import numbers

import pyro.distributions as dist
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.transforms import AffineTransform

from ..distributions import ConditionalTransformedDistribution
from ..validation import check_context
from .autoguide import make_flow

__all__ = ["ConditionalAffine", "ConditionalFlow", "conditional_flow_distribution"]


class ConditionalAffine(ConditionalTransformModule):
    """``y = m(c) + exp(s(c)) * x`` with ``m``, ``s`` linear in the context ``c`` (zero at init).

    Arguments:
        input_dim: event size D.
        context_dim: context size C.

    Example:
        >>> import torch
        >>> t = ConditionalAffine(2, 3).condition(torch.randn(5, 3))
        >>> t(torch.randn(5, 2)).shape, t.log_abs_det_jacobian(torch.randn(5, 2), None).shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    bijective = True

    def __init__(self, input_dim: int, context_dim: int):
        super().__init__()
        self.input_dim, self.context_dim = int(input_dim), int(context_dim)
        self.net = torch.nn.Linear(self.context_dim, 2 * self.input_dim)
        torch.nn.init.zeros_(self.net.weight)
        torch.nn.init.zeros_(self.net.bias)

    def condition(self, context):
        check_context(context, self.context_dim, name="ConditionalAffine context")
        loc, log_scale = self.net(context).split(self.input_dim, dim=-1)
        return AffineTransform(loc, log_scale.exp(), event_dim=1)


class ConditionalFlow(torch.nn.Module):
    """A learnable conditional density ``q(y | context)`` built from a conditional flow stack.

    Arguments:
        input_dim: event size D of ``y``.
        context_dim: size C of the context.
        flow: a family name in ``pyro_flows.FLOWS`` or a callable ``(input_dim, context_dim) ->
            ConditionalTransformModule`` (e.g. Pyro's ``conditional_affine_autoregressive``).
        num_layers: layers for a family name (default 4).
        affine: add the learnable conditional affine output layer (default True).
        loc, scale: optional fixed affine output layer (tensors broadcastable to ``(D,)``).
        **flow_kwargs: passed to :func:`pyro_flows.flow` for a family name (e.g. ``hidden_dims``,
            ``cache_size``). The direction switch ``single_pass`` defaults to ``"log_prob"``
            (conditional density estimation: ``log_prob`` of observed data in one pass); an
            amortised guide, which samples and scores its own samples, should pass
            ``single_pass="sample"``.

    Example:
        >>> import torch
        >>> from pyro.distributions.transforms import conditional_affine_autoregressive
        >>> cf = ConditionalFlow(2, 3, conditional_affine_autoregressive)
        >>> d = cf.condition(torch.randn(5, 3))
        >>> d.batch_shape, d.event_shape, d.sample().shape
        (torch.Size([5]), torch.Size([2]), torch.Size([5, 2]))
    """

    def __init__(self, input_dim: int, context_dim: int, flow, num_layers: int = 4, *, affine: bool = True,
                 loc=None, scale=None, **flow_kwargs):
        super().__init__()
        for value, what in ((input_dim, "input_dim"), (context_dim, "context_dim")):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        self.input_dim = int(input_dim)
        self.context_dim = int(context_dim)
        self.flow = make_flow(flow, self.input_dim, num_layers, context_dim=self.context_dim, **flow_kwargs)
        ref = next(iter(self.flow.parameters()), None) if isinstance(self.flow, torch.nn.Module) else None
        kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        self.affine = ConditionalAffine(self.input_dim, self.context_dim).to(**kw) if affine else None
        self.register_buffer("base_loc", torch.zeros(self.input_dim, **kw))
        self.register_buffer("base_scale", torch.ones(self.input_dim, **kw))
        if (loc is None) != (scale is None):
            raise ValueError("give both loc and scale, or neither")
        if loc is not None:
            loc = torch.as_tensor(loc, **kw).expand(self.input_dim).clone()
            scale = torch.as_tensor(scale, **kw).expand(self.input_dim).clone()
            if not bool((scale > 0).all()):
                raise ValueError("scale must be positive")
            self.register_buffer("out_loc", loc)
            self.register_buffer("out_scale", scale)
        else:
            self.out_loc = self.out_scale = None

    def _check_context(self, context):
        if not isinstance(context, torch.Tensor):
            raise ValueError(f"context must be a tensor, got {type(context).__name__}")
        check_context(context, self.context_dim, name="ConditionalFlow context")

    def condition(self, context: torch.Tensor) -> dist.TransformedDistribution:
        """``q(. | context)`` with batch shape ``context.shape[:-1]`` and event shape ``(D,)``."""
        self._check_context(context)
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        transforms = [self.flow]
        if self.affine is not None:
            transforms.append(self.affine)
        if self.out_loc is not None:
            transforms.append(AffineTransform(self.out_loc, self.out_scale, event_dim=1))
        return ConditionalTransformedDistribution(base, transforms).condition(context)

    forward = condition


def conditional_flow_distribution(input_dim, context_dim, flow, num_layers=4, **kwargs) -> ConditionalFlow:
    """Shorthand for :class:`ConditionalFlow` (same arguments)."""
    return ConditionalFlow(input_dim, context_dim, flow, num_layers, **kwargs)
