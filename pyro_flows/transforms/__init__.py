"""One module per flow family; importing a module registers its family (see ``registry.py``)."""

from ._base import ConditionalFlowModule, FlowTransform, Permute  # noqa: F401
from . import autm, sinusoidal, quar, monotone, qlf  # noqa: F401
