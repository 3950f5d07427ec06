"""The registry of flow families (registration only; ``flow()`` lives in :mod:`pyro_flows.stacking`).

Each family module calls :func:`register_flow` once at import time; ``pyro_flows.FLOWS`` lists the
registered names and the conformance suite (``tests/test_conformance.py``) checks every one of them,
plain and conditional, automatically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .validation import check_dim  # noqa: F401  (re-exported for old imports)

__all__ = ["CANONICAL_ORDER", "PERMUTATIONS", "FlowSpec", "get_flow", "register_flow", "registered_flows"]

#: the order of DESIGN.md; names registered outside it are listed after these.
CANONICAL_ORDER = (
    "autm_autoregressive",
    "autm_coupling",
    "sinusoidal",
    "quar",
    "monotone",
    "qlf",
)

#: what ``flow()`` may put between layers (``FlowSpec.permutation``).
PERMUTATIONS = ("reverse", "random", None)
_PERMUTATIONS = PERMUTATIONS  # old name


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
    if permutation not in PERMUTATIONS:
        raise ValueError(f"permutation must be one of {PERMUTATIONS}, got {permutation!r}")
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


def __getattr__(name):
    # ``registry.flow`` moved to :mod:`pyro_flows.stacking` (the stacking helper sits above the
    # families); kept importable from here for old code.
    if name == "flow":
        from .stacking import flow

        return flow
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
