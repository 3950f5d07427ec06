"""``flow()``: stack layers of a registered family, with the permutations it needs between them, and
certify the stack's round trip.

This sits *above* the families: it reads the registry (which the families fill at import time) and
builds ``Permute`` layers from ``transforms``; nothing below it imports it.

**The stack certificate.** Every layer certifies its own numerical inverse (an x-space bound per
layer), but a stack can amplify each layer's rounding: four AUTM layers near their log-slope bound
turn per-layer errors of 1e-9 into round-trip errors of 1e-5. :class:`FlowStack` (what :func:`flow`
returns) therefore checks its *iterative* direction as a whole: after computing it, it maps the result
back through every part with the cheap single-pass direction (one pass, no solve, no cache) and
compares with the input. That difference is exactly the round-trip error a user would see
(``t.inv(t(x)) - x``), and it is a backward error: the result is the exact image of an input that
differs from the given one by that much. Above the tolerance (:func:`round_trip_tolerance`) it warns
:class:`~pyro_flows.solvers.ConvergenceWarning` naming the error reached and the part where it first
crossed the tolerance. The single-pass direction (training) is never checked: no extra pass, no host
synchronisation. See ``docs/solvers.md`` for what is and is not covered.

**One bound for the stack.** Layers whose networks carry a guaranteed Lipschitz bound (QuAR, both
AUTM families) compute it from the spectral norms of their weights. Every call of a stack (either
direction, and ``log_abs_det_jacobian``) runs inside :class:`~pyro_flows.nn.lipschitz.shared_bounds`
over all its parts' networks: the first network that needs its bound triggers ONE batched computation
for all of them, and each reads its entry (the value and gradient it would compute alone). A layer
used outside a stack computes its own, as before. See ``docs/bounds.md``.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from torch.distributions.transforms import ComposeTransform, _InverseTransform

from .nn.lipschitz import shared_bounds
from .registry import PERMUTATIONS, get_flow
from .solvers import ConvergenceWarning, SolverInfo, refuse_jit_trace
from .transforms._base import Permute
from .validation import check_dim, check_single_pass

__all__ = ["ROUND_TRIP_FACTOR", "ConditionalFlowStack", "FlowStack", "flow", "iterative_directions",
           "round_trip_tolerance"]

#: the stack's round-trip tolerance in units of ``sqrt(eps) (1 + max|x|)`` (per sample, ``max`` over
#: the event): every layer's solve is certified to ``sqrt(eps) (1 + |x|)`` in its own variable, so a
#: stack of the default depth (4 layers) that only adds its layers' errors stays within 4 units, and
#: the return pass's own rounding within twice that. More means the layers amplify each other's
#: errors. In float64 this is ``1.19e-7 (1 + max|x|)``, below 1e-6 for ``|x| <= 7``; in float32
#: ``2.8e-3 (1 + max|x|)``.
ROUND_TRIP_FACTOR = 8.0

_DIRECTIONS = ("call", "inverse")


def round_trip_tolerance(dtype: torch.dtype, factor: float = ROUND_TRIP_FACTOR) -> float:
    """The stack certificate's tolerance in ``dtype``, relative to ``1 + max|x|`` of each sample:
    ``factor * sqrt(eps)`` (1.19e-7 in float64, 2.76e-3 in float32 at the default factor).

    Example:
        >>> import torch
        >>> from pyro_flows.stacking import round_trip_tolerance
        >>> f"{round_trip_tolerance(torch.float64):.3g}", f"{round_trip_tolerance(torch.float32):.3g}"
        ('1.19e-07', '0.00276')
    """
    return factor * math.sqrt(torch.finfo(dtype).eps)


def iterative_directions(part) -> frozenset | None:
    """Which directions of ``part`` (``"call"``: ``_call``, ``"inverse"``: ``_inverse``) solve
    numerically: a set, or ``None`` when unknown.

    Read from the part's ``iterative_directions`` attribute when it has one, else from its direction
    switch ``single_pass`` (``"log_prob"``: ``_call`` is the numerical one; ``"sample"``: ``_inverse``);
    a :class:`~pyro_flows.transforms._base.Permute` has none. The inverse of a part (``part.inv``)
    swaps the two. Families without a direction switch are unknown here (analytic both ways, like
    qlf, or numerical both ways, like monotone): a stack that holds one does not run the round trip,
    which could cost a second solve (see ``docs/solvers.md`` for their bounds).

    Example:
        >>> import pyro_flows
        >>> from pyro_flows.stacking import iterative_directions
        >>> sorted(iterative_directions(pyro_flows.quar(3, single_pass="sample")))
        ['inverse']
    """
    if isinstance(part, _InverseTransform):
        inner = iterative_directions(part._inv)
        return None if inner is None else frozenset({"call": "inverse", "inverse": "call"}[d] for d in inner)
    declared = getattr(part, "iterative_directions", None)
    if declared is not None:
        return frozenset(declared)
    if isinstance(part, Permute):
        return frozenset()
    single_pass = getattr(part, "single_pass", None)
    if single_pass == "log_prob":
        return frozenset({"call"})
    if single_pass == "sample":
        return frozenset({"inverse"})
    return None


def _check_certify(certify):
    if certify not in (True, False, "always") or (certify in (0, 1) and not isinstance(certify, bool)):
        raise ValueError(f"certify must be True, False or 'always', got {certify!r}")
    return certify


def _check_factor(factor):
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ValueError(f"round_trip_factor must be a positive number, got {factor!r}")
    return float(factor)


class _RoundTrip:
    """The certificate shared by a stack and its inverse: ``self.parts`` in the order applied."""

    certify = True
    round_trip_factor = ROUND_TRIP_FACTOR
    #: :class:`~pyro_flows.solvers.SolverInfo` of the latest certified call: ``residual`` is the
    #: round-trip error (max abs), ``converged`` whether it was within tolerance; ``detail`` holds
    #: ``ratio`` (error over tolerance) and ``part`` (where it first crossed the tolerance, or None)
    last_solver_info = None
    _name = "FlowStack"

    def _describe(self, k):
        """``(index, layer name)`` of ``self.parts[k]`` in the stack the user built."""
        return k, type(self.parts[k]).__name__

    def _solving_parts(self):
        """Which parts solve in this direction (a list of bools), or ``None`` when the round trip is
        not run: it runs when some part solves in this direction and every part's other direction is
        known to be single-pass (so the check costs one cheap pass)."""
        if not self.certify:
            return None
        kinds = [iterative_directions(p) for p in self.parts]
        if self.certify == "always":  # whatever the check costs; unknown parts count as solving
            return [k is None or "call" in k for k in kinds]
        if any(k is None or "inverse" in k for k in kinds):
            return None
        solving = ["call" in k for k in kinds]
        return solving if any(solving) else None

    def __call__(self, x):
        with shared_bounds(_bound_networks(self.parts)):
            return self._run(x)

    def log_abs_det_jacobian(self, x, y):
        with shared_bounds(_bound_networks(self.parts)):
            return super().log_abs_det_jacobian(x, y)

    def _run(self, x):
        solving = self._solving_parts()
        if solving is None:
            for part in self.parts:
                x = part(x)
            return x
        values, solved = [x], False
        for part, solves in zip(self.parts, solving):
            # an answer from a part's cache was certified when computed, or came from the exact
            # single-pass direction (log_prob of the flow's own sample): nothing new to check
            solved = solved or (solves and not _answers_from_cache(part, values[-1]))
            values.append(part(values[-1]))
        if solved:
            refuse_jit_trace(type(self).__name__)  # the check reads values back: it cannot be traced
            self._certify(values)
        return values[-1]

    def _certify(self, values):
        """Map ``values[-1]`` back through every part (single pass, uncached) and compare."""
        x = values[0]
        if not x.is_floating_point() or x.numel() == 0:
            return
        with torch.no_grad():
            tol = round_trip_tolerance(x.dtype, self.round_trip_factor)
            rows = torch.isfinite(x).all(-1)  # a non-finite input is the layers' business, not ours
            back = values[-1].detach()
            ratios, errors = [], None
            for k in range(len(self.parts) - 1, -1, -1):
                back = _undo(self.parts[k], back)
                ref = values[k].detach()
                err = (back - ref).abs().amax(-1)
                err = torch.where(torch.isnan(err), torch.full_like(err, float("inf")), err)
                ratio = torch.where(rows, err / (tol * (1 + ref.abs().amax(-1))), torch.zeros_like(err))
                ratios.append(ratio.amax())
                errors = torch.where(rows, err, torch.zeros_like(err))
            summary = torch.stack(ratios + [errors.amax()]).tolist()  # one host synchronisation
        ratios, error = summary[:-1], summary[-1]
        ratio = ratios[-1]
        crossed = next((len(self.parts) - 1 - i for i, r in enumerate(ratios) if r > 1), None)
        ok = ratio <= 1
        iterations = [getattr(p, "last_solver_info", None) for p in self.parts]
        iterations = max((i.iterations for i in iterations if i is not None), default=0)
        self.last_solver_info = SolverInfo(iterations, error, ok, None,
                                           {"ratio": ratio, "part": None if ok else crossed})
        if not ok:
            where = "" if crossed is None else (
                "; it first crosses the tolerance when undoing part {} ({})".format(*self._describe(crossed)))
            warnings.warn(
                f"{self._name}: the round trip through the stack is off by {error:.3g} "
                f"({ratio:.3g} times the tolerance {self.round_trip_factor:g} sqrt(eps) (1 + max|x|), dtype "
                f"{x.dtype}){where}: each layer met its own certificate, but the layers amplify each "
                f"other's rounding, so the result may be inaccurate (it is the exact image of an input "
                f"that differs by that much); use float64, fewer layers or smaller inputs",
                ConvergenceWarning,
                stacklevel=3,
            )


def _bound_networks(parts) -> list:
    """The networks whose guaranteed bounds the parts use (each part's ``_bound_networks()``)."""
    nets = []
    for part in parts:
        get = getattr(part._inv if isinstance(part, _InverseTransform) else part, "_bound_networks", None)
        if get is not None:
            nets.extend(get())
    return nets


def _answers_from_cache(part, value) -> bool:
    """Whether ``part(value)`` will be answered from the part's cache (a
    :class:`~pyro_flows.transforms._base.FlowTransform` record still valid for ``value``): no host
    synchronisation, the same test the part makes."""
    inner, position = (part._inv, 1) if isinstance(part, _InverseTransform) else (part, 0)
    lookup = getattr(inner, "_lookup", None)
    return bool(getattr(inner, "_cache_size", 0)) and lookup is not None and lookup(value, position) is not None


def _undo(part, value):
    """``part``'s single-pass reverse direction on ``value``, computed (no cache, no record)."""
    if isinstance(part, _InverseTransform):
        return part._inv._call(value)
    return part._inverse(value)


class FlowStack(_RoundTrip, ComposeTransformModule):
    """A ``ComposeTransformModule`` that certifies its numerical direction's round trip.

    When a call runs the direction in which some part solves numerically, the stack maps the result
    back through every part in the single-pass direction and warns
    :class:`~pyro_flows.solvers.ConvergenceWarning` when the round-trip error of a sample exceeds
    ``round_trip_factor * sqrt(eps) * (1 + max|x|)`` (:func:`round_trip_tolerance`; float64:
    1.19e-7 (1 + max|x|)). The single-pass direction runs exactly as in ``ComposeTransformModule``.
    Parameters, ``state_dict`` keys (``0.xxx``), caching and ``.parts`` are those of
    ``ComposeTransformModule``.

    Arguments:
        parts: the transforms, in the order applied by ``_call``.
        cache_size: as in ``ComposeTransformModule`` (0: the parts cache themselves).
        certify: ``True`` (default): check the round trip where it costs one single-pass sweep (some
            part solves in this direction, none in the other); ``"always"``: check every computed
            call, even where mapping back solves too (monotone: a second solve; qlf: an analytic
            pass); ``False``: never.
        round_trip_factor: the tolerance in units of ``sqrt(eps) (1 + max|x|)`` (default
            :data:`ROUND_TRIP_FACTOR`).

    Example:
        >>> import torch, pyro_flows
        >>> t = pyro_flows.flow("autm_coupling", 4, num_layers=2).double()
        >>> y = t(torch.randn(8, 4, dtype=torch.float64))  # numerical direction: certified
        >>> t.last_solver_info.converged
        True
    """

    def __init__(self, parts, cache_size=0, *, certify=True, round_trip_factor=ROUND_TRIP_FACTOR):
        super().__init__(parts, cache_size=cache_size)
        self.certify = _check_certify(certify)
        self.round_trip_factor = _check_factor(round_trip_factor)
        self.last_solver_info = None

    @property
    def inv(self):
        inv = self.__dict__.get("_inv")
        if not isinstance(inv, _FlowStackInverse):
            inv = _FlowStackInverse(self)
            self.__dict__["_inv"] = inv
        return inv

    def with_cache(self, cache_size=1):
        if cache_size == self._cache_size:
            return self
        return FlowStack(self.parts, cache_size=cache_size, certify=self.certify,
                         round_trip_factor=self.round_trip_factor)


class _FlowStackInverse(_RoundTrip, ComposeTransform):
    """The inverse of a :class:`FlowStack`: the parts' inverses in reverse order, certified the same way."""

    def __init__(self, stack: FlowStack):
        super().__init__([p.inv for p in reversed(stack.parts)])
        self.stack = stack

    @property
    def certify(self):  # the stack's settings, also when changed after ``inv`` was built
        return self.stack.certify

    @property
    def round_trip_factor(self):
        return self.stack.round_trip_factor

    _name = "FlowStack inverse"

    def _describe(self, k):
        j = len(self.parts) - 1 - k
        return j, type(self.stack.parts[j]).__name__

    @property
    def inv(self):
        return self.stack

    def with_cache(self, cache_size=1):
        return self.stack.with_cache(cache_size).inv


class ConditionalFlowStack(ConditionalComposeTransformModule):
    """A ``ConditionalComposeTransformModule`` whose ``.condition(context)`` is a :class:`FlowStack`
    (so the conditioned stack certifies its numerical direction the same way).

    Arguments:
        transforms, cache_size: as in ``ConditionalComposeTransformModule``.
        certify, round_trip_factor: as in :class:`FlowStack`.

    Example:
        >>> import torch, pyro_flows
        >>> c = pyro_flows.flow("quar", 3, num_layers=2, context_dim=2)
        >>> type(c.condition(torch.zeros(2))).__name__
        'FlowStack'
    """

    def __init__(self, transforms, cache_size=0, *, certify=True, round_trip_factor=ROUND_TRIP_FACTOR):
        super().__init__(transforms, cache_size=cache_size)
        self.certify = _check_certify(certify)
        self.round_trip_factor = _check_factor(round_trip_factor)

    def condition(self, context):
        parts = [t.condition(context) for t in self.transforms]  # constant parts are wrapped by the base
        return FlowStack(parts, certify=self.certify,
                         round_trip_factor=self.round_trip_factor).with_cache(self._cache_size)


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
         certify=True, **kwargs):
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
        certify: the stack's round-trip certificate (:class:`FlowStack`): ``True`` (default),
            ``"always"`` or ``False``.
        **kwargs: passed to every layer's constructor.

    Returns:
        a :class:`FlowStack` (a ``ComposeTransformModule``), or a :class:`ConditionalFlowStack` (a
        ``ConditionalComposeTransformModule``), whose numerical direction certifies its round trip
        (see the module docstring).

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
    _check_certify(certify)
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
        return FlowStack(parts, certify=certify)
    return ConditionalFlowStack(parts, certify=certify)
