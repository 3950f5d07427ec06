"""``flow()``: stack layers of a registered family, with the permutations it needs between them.

This sits *above* the families: it reads the registry (which the families fill at import time) and
builds ``Permute`` layers from ``transforms``; nothing below it imports it.
"""

from __future__ import annotations

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

from .registry import PERMUTATIONS, get_flow
from .transforms._base import Permute
from .validation import check_dim, check_single_pass

__all__ = ["flow"]


def _permutation(kind: str, input_dim: int, layer: int) -> torch.Tensor:
    if kind == "reverse":
        return torch.arange(input_dim - 1, -1, -1)
    # a fixed seed per layer: the same flow is built on every call (reproducible, picklable)
    g = torch.Generator().manual_seed(1000 + layer)
    return torch.randperm(input_dim, generator=g)


def _check_cache_size(cache_size):
    if cache_size not in (0, 1) or isinstance(cache_size, bool):
        raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
    return int(cache_size)


def flow(name: str, input_dim: int, num_layers: int = 4, context_dim: int | None = None,
         permutation="default", *, single_pass: str = "log_prob", cache_size: int | None = None,
         **kwargs):
    """Stack ``num_layers`` layers of family ``name`` with permutations between them.

    Arguments:
        name: a name in ``pyro_flows.FLOWS``.
        input_dim: the event size D.
        num_layers: how many layers (blocks) to stack.
        context_dim: if given, build a conditional stack
            (``ConditionalComposeTransformModule``) whose ``.condition(context)`` gives a transform.
        permutation: ``"reverse"``, ``"random"`` (fixed seed per layer), ``None``, or ``"default"``
            (the family's own choice). Placed between layers, never after the last one.
        single_pass: the direction switch (:data:`pyro_flows.validation.SINGLE_PASS`):
            ``"log_prob"`` (default: density estimation, ``log_prob`` of external data in one pass)
            or ``"sample"`` (guides: ``rsample`` and ``log_prob`` of the flow's own samples in one
            pass). Passed to every layer of a family whose two directions differ in cost
            (``FlowSpec.has_single_pass``); the other families cost the same both ways and ignore it.
        cache_size: 0 or 1, given to every layer and permutation (``None``: the layers' default, 1).
            ``cache_size=0`` makes every inverse a computation (no identity-keyed cache).
        **kwargs: passed to every layer's constructor.

    Returns:
        a ``ComposeTransformModule`` (or ``ConditionalComposeTransformModule``).

    Example:
        >>> import torch, pyro_flows
        >>> t = pyro_flows.flow("quar", 3, num_layers=2, single_pass="log_prob")
        >>> t(torch.zeros(5, 3)).shape
        torch.Size([5, 3])
        >>> c = pyro_flows.flow("quar", 3, num_layers=2, context_dim=4)
        >>> c.condition(torch.zeros(5, 4)).inv(torch.zeros(5, 3)).shape
        torch.Size([5, 3])
    """
    spec = get_flow(name)
    input_dim = check_dim(input_dim, "input_dim")
    num_layers = check_dim(num_layers, "num_layers")
    check_single_pass(single_pass)
    if permutation == "default":
        permutation = spec.permutation
    if permutation not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {PERMUTATIONS} or 'default', got {permutation!r}")
    if context_dim is not None:
        context_dim = check_dim(context_dim, "context_dim")
    layer_kwargs = dict(kwargs)
    permute_kwargs = {}
    if cache_size is not None:
        layer_kwargs["cache_size"] = permute_kwargs["cache_size"] = _check_cache_size(cache_size)
    if spec.has_single_pass:
        layer_kwargs["single_pass"] = single_pass
    parts = []
    for i in range(num_layers):
        if context_dim is None:
            parts.append(spec.constructor(input_dim, **layer_kwargs))
        else:
            parts.append(spec.conditional(input_dim, context_dim, **layer_kwargs))
        if permutation is not None and input_dim > 1 and i < num_layers - 1:
            parts.append(Permute(_permutation(permutation, input_dim, i), **permute_kwargs))
    if context_dim is None:
        return ComposeTransformModule(parts)
    return ConditionalComposeTransformModule(parts)
