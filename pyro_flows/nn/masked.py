"""Degree-based masks for autoregressive (MADE) and quasi-autoregressive networks.

Strictly autoregressive conditioners are Pyro's own (``pyro.nn.AutoRegressiveNN`` and
``ConditionalAutoRegressiveNN``): families reuse them. What Pyro lacks, and QuAR needs, is the
*quasi-autoregressive* mask of Gopal (QuAR flows): the first layer allows ``degree(hidden) >= degree(input)``
(equality included), so output ``i`` depends on inputs ``j <= i`` and the Jacobian is
lower-triangular *with* a non-zero diagonal. :func:`quasi_autoregressive_masks` builds those masks;
hidden sizes are multiples ``k * D`` so every coordinate owns ``k`` units in each layer, which is what
lets the Jacobian diagonal be propagated exactly in one forward pass (units of degree ``i`` only see
units of degree ``<= i``, and the diagonal term only flows through units of degree exactly ``i``).
"""

from __future__ import annotations

import torch

from ..validation import check_dim

__all__ = ["quasi_autoregressive_degrees", "quasi_autoregressive_masks", "autoregressive_masks"]


def _with_context(mask, context_dim):
    """A first-layer mask with ``context_dim`` columns appended that every unit sees."""
    if not context_dim:
        return mask
    return torch.cat([mask, torch.ones(mask.shape[0], context_dim, dtype=mask.dtype)], dim=1)


def _hidden_masks(degrees, context_dim):
    """Masks between consecutive ``degrees`` (a unit sees units of lower or equal degree); the context
    columns on the first layer."""
    masks = []
    for l in range(1, len(degrees)):
        m = (degrees[l][:, None] >= degrees[l - 1][None, :]).to(torch.get_default_dtype())
        masks.append(_with_context(m, context_dim) if l == 1 else m)
    return masks


def quasi_autoregressive_degrees(input_dim: int, hidden_dims):
    """Degrees of the inputs and of each hidden layer (``k`` units per coordinate, in blocks)."""
    input_dim = check_dim(input_dim, "input_dim")
    degrees = [torch.arange(input_dim)]
    for h in hidden_dims:
        h = check_dim(h, "hidden dim")
        if h % input_dim:
            raise ValueError(
                f"quasi-autoregressive hidden sizes must be multiples of input_dim={input_dim}, got {h}"
            )
        degrees.append(torch.arange(input_dim).repeat_interleave(h // input_dim))
    return degrees


def quasi_autoregressive_masks(input_dim: int, hidden_dims, context_dim: int = 0,
                               output_multiplier: int = 1):
    """Masks (``out x in``) of a quasi-autoregressive network ``R^D -> R^(D * output_multiplier)``.

    Output ``m * D + i`` (for ``m < output_multiplier``) may depend on inputs ``j <= i``; ``context_dim``
    extra inputs (appended after the D inputs of the first layer) are visible to every first-layer
    unit. Returns ``(masks, degrees)`` where ``degrees[l]`` are the degrees of layer ``l``'s units
    (``degrees[0]`` the inputs, ``degrees[-1]`` the outputs).
    """
    degrees = quasi_autoregressive_degrees(input_dim, hidden_dims)
    out_deg = torch.arange(input_dim).repeat(check_dim(output_multiplier, "output_multiplier"))
    degrees.append(out_deg)
    masks = _hidden_masks(degrees, context_dim)
    return masks, degrees


def autoregressive_masks(input_dim: int, hidden_dims, context_dim: int = 0,
                         output_multiplier: int = 1):
    """Masks (``out x in``) of a *strictly* autoregressive (MADE) network ``R^D -> R^(D * m)``.

    Output ``k * D + i`` (for ``k < output_multiplier``) depends on inputs ``j < i`` only (output ``0``
    is a constant: its bias). Hidden units get degrees ``0 .. D - 2`` cyclically; ``context_dim``
    extra inputs (appended after the D inputs) are visible to every first-layer unit.
    """
    input_dim = check_dim(input_dim, "input_dim")
    top = max(input_dim - 1, 1)
    degrees = [torch.arange(input_dim)]
    for h in hidden_dims:
        degrees.append(torch.arange(check_dim(h, "hidden dim")) % top)
    out_deg = torch.arange(input_dim).repeat(check_dim(output_multiplier, "output_multiplier"))
    masks = _hidden_masks(degrees, context_dim)
    last = (out_deg[:, None] > degrees[-1][None, :]).to(torch.get_default_dtype())
    masks.append(_with_context(last, context_dim if len(degrees) == 1 else 0))
    return masks
