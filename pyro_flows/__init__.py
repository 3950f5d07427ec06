"""pyro_flows: exact normalizing flows for Pyro.

Public names: ``FLOWS`` (the registered family names), ``flow(name, input_dim, num_layers=...,
context_dim=None, **kwargs)`` and, for each family ``F`` in ``FLOWS``, the constructors ``F(input_dim,
**kwargs)`` and ``conditional_F(input_dim, context_dim, **kwargs)``, with the family's classes
``<X>`` (a ``TransformModule``) and ``Conditional<X>`` (a ``ConditionalTransformModule``) beside them.

Example:
    >>> import torch, pyro.distributions as dist, pyro_flows
    >>> t = pyro_flows.flow(pyro_flows.FLOWS[0], input_dim=2, num_layers=2)
    >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
    >>> d.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
"""

from ._version import __version__
from .registry import get_flow, registered_flows
from .stacking import flow
from .transforms.autm import (
    AUTMAutoregressive,
    AUTMCoupling,
    ConditionalAUTMAutoregressive,
    ConditionalAUTMCoupling,
    autm_autoregressive,
    autm_coupling,
    conditional_autm_autoregressive,
    conditional_autm_coupling,
)
from .transforms.monotone import (
    ConditionalMonotone,
    Monotone,
    conditional_monotone,
    monotone,
)
from .transforms.qlf import QLF, ConditionalQLF, conditional_qlf, qlf
from .transforms.quar import ConditionalQuAR, QuAR, conditional_quar, quar
from .transforms.sinusoidal import (
    ConditionalSinusoidal,
    Sinusoidal,
    conditional_sinusoidal,
    sinusoidal,
)

#: the registered family names, in the order of DESIGN.md.
FLOWS = registered_flows()

__all__ = [
    "FLOWS",
    "QLF",
    "AUTMAutoregressive",
    "AUTMCoupling",
    "ConditionalAUTMAutoregressive",
    "ConditionalAUTMCoupling",
    "ConditionalMonotone",
    "ConditionalQLF",
    "ConditionalQuAR",
    "ConditionalSinusoidal",
    "Monotone",
    "QuAR",
    "Sinusoidal",
    "__version__",
    "autm_autoregressive",
    "autm_coupling",
    "conditional_autm_autoregressive",
    "conditional_autm_coupling",
    "conditional_monotone",
    "conditional_qlf",
    "conditional_quar",
    "conditional_sinusoidal",
    "flow",
    "get_flow",
    "monotone",
    "qlf",
    "quar",
    "sinusoidal",
]
