"""pyro_flows: exact normalizing flows for Pyro.

Public names: ``FLOWS`` (the registered family names), ``flow(name, input_dim, num_layers=...,
context_dim=None, **kwargs)`` and, for each family ``F`` in ``FLOWS``, the constructors ``F(input_dim,
**kwargs)`` and ``conditional_F(input_dim, context_dim, **kwargs)``.

Example:
    >>> import torch, pyro.distributions as dist, pyro_flows
    >>> t = pyro_flows.flow(pyro_flows.FLOWS[0], input_dim=2, num_layers=2)
    >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), list(t.parts))
    >>> d.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
"""

from ._version import __version__
from . import transforms as _transforms  # noqa: F401  (imports the families; they register)
from .registry import flow, get_flow, registered_flows

FLOWS = registered_flows()


def _export():
    for name in FLOWS:
        spec = get_flow(name)
        globals()[name] = spec.constructor
        globals()["conditional_" + name] = spec.conditional


_export()

__all__ = ["__version__", "FLOWS", "flow"] + [n for f in FLOWS for n in (f, "conditional_" + f)]
