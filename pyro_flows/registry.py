"""The registry of flow families and the ``flow()`` stacking helper.

Each family module calls :func:`register_flow` once at import time; ``pyro_flows.FLOWS`` lists the
registered names and the conformance suite (``tests/test_conformance.py``) checks every one of them,
plain and conditional, automatically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

from .validation import check_dim

__all__ = ["FlowSpec", "register_flow", "get_flow", "registered_flows", "flow", "CANONICAL_ORDER"]

#: the order of DESIGN.md; names registered outside it are listed after these.
CANONICAL_ORDER = (
    "autm_autoregressive",
    "autm_coupling",
    "sinusoidal",
    "quar",
    "monotone",
    "qlf",
)

_PERMUTATIONS = ("reverse", "random", None)


@dataclass(frozen=True)
class FlowSpec:
    """What the registry knows about one family.

    Attributes:
        name: the public name (``pyro_flows.<name>`` is the constructor).
        constructor: ``(input_dim, **kwargs) -> TransformModule``.
        conditional: ``(input_dim, context_dim, **kwargs) -> ConditionalTransformModule``.
        permutation: what ``flow()`` puts between layers by default: ``"reverse"``, ``"random"``
            or ``None`` (the family mixes coordinates itself).
        test_kwargs: small keyword arguments the conformance suite uses to keep it fast.
        has_single_pass: the family's two directions differ in cost and its constructors accept the
            direction switch ``single_pass`` (see :data:`pyro_flows.validation.SINGLE_PASS`).
    """

    name: str
    constructor: Callable
    conditional: Callable
    permutation: str | None = "reverse"
    test_kwargs: dict = field(default_factory=dict)
    has_single_pass: bool = False


_REGISTRY: dict[str, FlowSpec] = {}


def register_flow(name, constructor, conditional, *, permutation="reverse", test_kwargs=None,
                  has_single_pass=False):
    """Register a family. Called by the family modules at import time."""
    if permutation not in _PERMUTATIONS:
        raise ValueError(f"permutation must be one of {_PERMUTATIONS}, got {permutation!r}")
    spec = FlowSpec(name, constructor, conditional, permutation, dict(test_kwargs or {}),
                    bool(has_single_pass))
    _REGISTRY[name] = spec
    return spec


def registered_flows() -> tuple:
    """Names of the registered families, in the canonical order of DESIGN.md."""
    known = [n for n in CANONICAL_ORDER if n in _REGISTRY]
    return tuple(known + sorted(n for n in _REGISTRY if n not in CANONICAL_ORDER))


def get_flow(name: str) -> FlowSpec:
    """The :class:`FlowSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown flow family {name!r}; expected one of {registered_flows()}"
        ) from None


def _permutation(kind: str, input_dim: int, layer: int) -> torch.Tensor:
    if kind == "reverse":
        return torch.arange(input_dim - 1, -1, -1)
    # a fixed seed per layer: the same flow is built on every call (reproducible, picklable)
    g = torch.Generator().manual_seed(1000 + layer)
    return torch.randperm(input_dim, generator=g)


def flow(name: str, input_dim: int, num_layers: int = 4, context_dim: int | None = None,
         permutation="default", **kwargs):
    """Stack ``num_layers`` layers of family ``name`` with permutations between them.

    Arguments:
        name: a name in ``pyro_flows.FLOWS``.
        input_dim: the event size D.
        num_layers: how many layers (blocks) to stack.
        context_dim: if given, build a conditional stack
            (``ConditionalComposeTransformModule``) whose ``.condition(context)`` gives a transform.
        permutation: ``"reverse"``, ``"random"`` (fixed seed per layer), ``None``, or ``"default"``
            (the family's own choice). Placed between layers, never after the last one.
        **kwargs: passed to every layer's constructor.

    Returns:
        a ``ComposeTransformModule`` (or ``ConditionalComposeTransformModule``).

    Example:
        >>> import functools, pyro_flows
        >>> from pyro.infer.autoguide import AutoNormalizingFlow
        >>> make = functools.partial(pyro_flows.flow, pyro_flows.FLOWS[0], num_layers=2)
        >>> guide = AutoNormalizingFlow(lambda: None, make)  # doctest: +SKIP
    """
    from .transforms._base import Permute

    spec = get_flow(name)
    input_dim = check_dim(input_dim, "input_dim")
    num_layers = check_dim(num_layers, "num_layers")
    if permutation == "default":
        permutation = spec.permutation
    if permutation not in _PERMUTATIONS:
        raise ValueError(f"permutation must be one of {_PERMUTATIONS} or 'default', got {permutation!r}")
    if context_dim is not None:
        context_dim = check_dim(context_dim, "context_dim")
    parts = []
    for i in range(num_layers):
        if context_dim is None:
            parts.append(spec.constructor(input_dim, **kwargs))
        else:
            parts.append(spec.conditional(input_dim, context_dim, **kwargs))
        if permutation is not None and input_dim > 1 and i < num_layers - 1:
            parts.append(Permute(_permutation(permutation, input_dim, i)))
    if context_dim is None:
        return ComposeTransformModule(parts)
    return ConditionalComposeTransformModule(parts)
