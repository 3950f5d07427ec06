"""Base classes shared by every family, and a device-following permutation.

Every family follows Pyro's three-class pattern:

* ``Conditioned<X>(FlowTransform)`` holds the maths and takes its parameters from a callable;
* ``<X>(Conditioned<X>, TransformModule)`` owns the ``nn.Parameter``s;
* ``Conditional<X>(ConditionalFlowModule)`` returns a ``Conditioned<X>`` from ``condition(context)``.

:class:`FlowTransform` validates what comes in (event size, dtype, device) in one place, so every
family raises the same ``ValueError`` naming expected and actual sizes. Families implement
``_call_and_ladj`` and ``_inverse_and_ladj`` (see :class:`FlowTransform`).
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import Transform

from ..validation import broadcast_context, check_context, check_dim, check_event, check_like

__all__ = ["ConditionalFlowModule", "FlowTransform", "Permute", "VersionCheckedCache", "kept_records", "warm_started"]


class FlowTransform(Transform):
    """A bijection of R^D (``event_dim=1``) with input validation and one map-and-log-det protocol.

    **The protocol.** A family implements two methods, each returning the map *and* the forward
    log-determinant computed in the same pass (zuko's ``call_and_ladj`` is the model):

    * ``_call_and_ladj(x) -> (y, log|det dy/dx|)`` (Pyro's direction: base noise to data);
    * ``_inverse_and_ladj(y) -> (x, log|det dy/dx| at that x)`` (the *forward* log-det, so
      ``log_abs_det_jacobian(x, y)`` is the same quantity whichever direction produced the pair).

    Everything else is derived here: ``__call__``/``_inv_call`` validate the input, consult the
    cache and remember the log-det of the pair they produced, so ``log_abs_det_jacobian(x, y)`` on
    that very pair (as in ``TransformedDistribution.log_prob`` right after the inverse) costs nothing.
    For any other pair, ``_log_abs_det_jacobian(x, y)`` computes it; the default runs
    ``_call_and_ladj(x)``, and a family whose inverse is the cheap direction overrides it.

    The public :meth:`call_and_ladj` and :meth:`inverse_and_ladj` give both at once.

    Families that invert numerically record their latest solve in ``last_solver_info``
    (a :class:`pyro_flows.solvers.SolverInfo`).

    When built from a context (``Conditional<X>.condition``) a transform stores it in
    ``self._context`` so inputs are checked against its dtype and device.
    """

    #: :class:`pyro_flows.solvers.SolverInfo` of the latest numerical inverse (families that
    #: invert numerically set it; the one name for solver diagnostics).
    last_solver_info = None

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, input_dim: int, cache_size: int = 1, context: torch.Tensor | None = None):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_dim(input_dim, "input_dim")
        self._context = context

    def _broadcast_context(self, x: torch.Tensor):
        """``(x, context)`` broadcast to a common batch shape; ``(x, None)`` without a context."""
        if self._context is None:
            return x, None
        return broadcast_context(x, self._context)

    # -- the protocol (families implement these two) -------------------------------------------
    def _call_and_ladj(self, x: torch.Tensor):
        raise NotImplementedError(f"{type(self).__name__} must implement _call_and_ladj")

    def _inverse_and_ladj(self, y: torch.Tensor):
        raise NotImplementedError(f"{type(self).__name__} must implement _inverse_and_ladj")

    # -- identity initialisation (AutoFlow starts as AutoMultivariateNormal) ---------------------
    def init_identity_(self):
        """Set this layer's parameters in place so that it is *exactly* the identity map (log-det 0).

        Families override it; the gradient at the identity must not vanish for every parameter
        (zero a network's last layer, not all of it), so training can move away from it. Returns
        ``self``. Used by :class:`pyro_flows.infer.AutoFlow` so that a guide with identity flow
        layers is exactly ``loc + L eps``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no exact identity initialisation")

    # -- networks whose bounds a stack computes together ------------------------------------
    def _bound_networks(self) -> tuple:
        """The networks (:class:`~pyro_flows.nn.lipschitz.SharedBoundNetwork`) whose guaranteed
        bounds this layer uses; a :class:`~pyro_flows.stacking.FlowStack` computes all its layers'
        bounds in one batched call (:class:`~pyro_flows.nn.lipschitz.shared_bounds`). Default: none."""
        return ()

    def _call(self, x):
        return self._call_and_ladj(x)[0]

    def _inverse(self, y):
        return self._inverse_and_ladj(y)[0]

    def _log_abs_det_jacobian(self, x, y):
        return self._call_and_ladj(x)[1]

    # -- validation -------------------------------------------------------------------------
    def _reference(self) -> torch.Tensor | None:
        if isinstance(self, torch.nn.Module):
            params = _owner_parameters(self)[1]
            if params:
                return params[0]
        return self._context

    def _check(self, x: torch.Tensor, name: str) -> torch.Tensor:
        check_event(x, self.input_dim, name=f"{type(self).__name__} {name}")
        return check_like(x, self._reference(), name=f"{type(self).__name__} {name}")

    # -- caching ----------------------------------------------------------------------------
    # Pyro's ``cache_size=1`` returns the cached output whenever the *same* tensor object comes
    # again. In full-batch training (one data tensor, many optimiser steps) that hands back the
    # previous parameters' output with a freed graph ("backward through the graph a second time"),
    # or, under ``torch.no_grad()``, a silently stale value. Here an entry is keyed on
    #   * the parameter version counters (the module's own, or those of the conditional module that
    #     built this transform): an optimiser step or ``load_state_dict`` invalidates it;
    #   * the version counters of both tensors of the pair: an in-place edit of either
    #     (``z.add_(1)``) invalidates it;
    #   * the grad mode: a result computed under ``torch.no_grad()`` carries no graph and is never
    #     handed to a caller that needs one.
    # Updates written through ``p.data`` bypass version counters (Pyro's ``ClippedAdam`` does
    # this): with such optimisers pass fresh tensors or use ``cache_size=0``.
    #
    # One record, ``(x, y, ladj, key)``, serves both the cache (``cache_size=1``: the inverse of the
    # last output is the last input) and the log-det of the last pair (always, whatever the
    # ``cache_size``), so nothing is computed twice.
    _owner = None  # the ConditionalFlowModule that built this transform, if any

    def _signature(self):
        owner = self if isinstance(self, torch.nn.Module) else self._owner
        if owner is None:
            return ()
        generation, params = _owner_parameters(owner)
        return (generation, *(p._version for p in params))

    def _key(self, x, y):
        return (x._version, y._version, torch.is_grad_enabled(), self._signature())

    def _remember(self, x, y, ladj):
        self.__dict__["_last_pair"] = (x, y, ladj, self._key(x, y))

    def _lookup(self, tensor, position):
        """The remembered pair if ``tensor`` is its element ``position`` (0: x, 1: y) and still valid."""
        last = self.__dict__.get("_last_pair")
        if last is None or last[position] is not tensor:
            return None
        if self._key(last[0], last[1]) != last[3]:
            return None
        return last

    def _in_warm_pass(self) -> bool:
        """Whether the transform runs inside :func:`warm_started` (the path gradient's pass with fixed
        parameters, at the guide's own draw)."""
        return bool(self.__dict__.get(_WARM))

    def _warm_start(self, t, position):
        """Inside :func:`warm_started`: the other element of the last remembered pair (detached, non-finite
        entries zeroed) when its element ``position`` (0: x, 1: y) has ``t``'s shape, dtype and device, as
        the start of a numerical solve for ``t``; else ``None`` (then the solver's own start). Any start
        is safe: the solves are certified where they end."""
        if not self._in_warm_pass():
            return None
        last = self.__dict__.get("_last_pair")
        if last is None:
            return None
        ref, other = last[position], last[1 - position]
        if ref.shape != t.shape or ref.dtype != t.dtype or ref.device != t.device or other.shape != t.shape:
            return None
        return torch.nan_to_num(other.detach(), nan=0.0, posinf=0.0, neginf=0.0)

    def _map_with_cache(self, t, position, what, map_and_ladj):
        """Validate ``t`` (element ``position`` of a pair: 0 x, 1 y), answer from the cache if it
        holds ``t``, else compute the other element with ``map_and_ladj`` and remember the pair."""
        self._check(t, what)
        if self._cache_size:
            hit = self._lookup(t, position)
            if hit is not None:
                return hit[1 - position]
        out, ladj = map_and_ladj(t)
        self._remember(*((t, out) if position == 0 else (out, t)), ladj)
        return out

    def __call__(self, x):
        return self._map_with_cache(x, 0, "input", self._call_and_ladj)

    def _inv_call(self, y):
        return self._map_with_cache(y, 1, "inverse input", self._inverse_and_ladj)

    def call_and_ladj(self, x: torch.Tensor):
        """``(y, log|det dy/dx|)`` for ``y = self(x)``, computed in one pass."""
        y = self(x)
        return y, self.log_abs_det_jacobian(x, y)

    def inverse_and_ladj(self, y: torch.Tensor):
        """``(x, log|det dy/dx|)`` for ``x = self.inv(y)``: the *forward* log-det at that pair."""
        x = self._inv_call(y)
        return x, self.log_abs_det_jacobian(x, y)

    def log_abs_det_jacobian(self, x, y):
        self._check(x, "input")
        self._check(y, "output")
        last = self._lookup(x, 0)
        if last is not None and last[1] is y:
            return last[2]
        return self._log_abs_det_jacobian(x, y)

    # TransformModule subclasses are nn.Modules; keep the Transform cache out of pickles/state
    def __getstate__(self):
        state = super().__getstate__()
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        state.pop("_last_pair", None)
        state.pop(_SLOTS, None)
        return state


class VersionCheckedCache:
    """Mixin for a Pyro/torch ``Transform``: its ``cache_size=1`` cache also checks version counters. Pyro's
    matches the cached pair by identity alone, so after an in-place edit of a draw (``z.add_(1)``)
    ``log_prob(z)`` reads the layer input of the *old* values back: a silently wrong density. Here the pair is
    reused only while neither tensor has been modified in place since it was cached, as in
    :class:`FlowTransform`'s record. (``AutoFlow``'s affine part is ``LowerCholeskyAffine`` with this mixin.)"""

    _cached_versions = None

    def _cached(self, t, position, compute):
        """``t`` is element ``position`` of a pair (0: x, 1: y): the other element, from the cache while valid."""
        if self._cache_size == 0:
            return compute(t)
        pair = self._cached_x_y
        if pair[position] is t and self._cached_versions == (pair[0]._version, pair[1]._version):
            return pair[1 - position]
        out = compute(t)
        pair = (t, out) if position == 0 else (out, t)
        self._cached_x_y, self._cached_versions = pair, (pair[0]._version, pair[1]._version)
        return out

    def __call__(self, x):
        return self._cached(x, 0, self._call)

    def _inv_call(self, y):
        return self._cached(y, 1, self._inverse)


#: a transform's records of its last pair (``FlowTransform``'s; Pyro's cache and this module's version-checked
#: one); :func:`kept_records` also keeps the parameter list the cache key is built on (``_SLOTS``)
_RECORDS = ("_last_pair", "_cached_x_y", "_cached_versions")


@contextlib.contextmanager
def kept_records(module):
    """Within the block the transforms in ``module`` may compute freely (e.g. with swapped parameters): on exit
    each gets back the records of its last pair (its cache) and its parameter list as they were, so a caller's
    later ``log_prob`` of a draw still reads that draw's pairs."""
    keys = (*_RECORDS, _SLOTS)
    transforms = [t for t in module.modules() if isinstance(t, Transform)]
    saved = [{k: t.__dict__[k] for k in keys if k in t.__dict__} for t in transforms]
    try:
        yield
    finally:
        for t, records in zip(transforms, saved):
            for key in keys:
                t.__dict__.pop(key, None)
            t.__dict__.update(records)


_WARM = "_warm_started"


@contextlib.contextmanager
def warm_started(module):
    """Within the block, the numerical direction of each :class:`FlowTransform` in ``module`` (a transform,
    a module, or a list of them) starts from the other element of the pair the transform computed last,
    when the shapes match: an inverse of (nearly) the point a forward call just produced then ends after
    one pass. Used by the path-derivative gradient (:mod:`pyro_flows.infer.path_gradient`), which inverts
    each draw of a guide right after drawing it."""
    marked = []
    for m in module if isinstance(module, (list, tuple)) else [module]:
        for t in m.modules() if isinstance(m, torch.nn.Module) else [m]:
            if isinstance(t, FlowTransform) and not t.__dict__.get(_WARM):
                t.__dict__[_WARM] = True
                marked.append(t)
    try:
        yield
    finally:
        for t in marked:
            t.__dict__.pop(_WARM, None)


_SLOTS = "_flow_parameter_slots"
_GENERATIONS = itertools.count()  # a new parameter list gets a new number: the cache key changes


def _owner_parameters(owner: torch.nn.Module):
    """``(generation, parameters)`` of ``owner``, without walking its module tree on every call.

    The list is built once and kept with, per parameter, the ``_parameters`` dict that holds it; it
    is rebuilt when a parameter is replaced or added to one of those dicts (``module.weight =
    nn.Parameter(...)``, ``pyro.module(..., update_module_params=True)``, ``register_parameter``).
    (A sub-module *added* after the first call is not seen; flows are not edited that way.)
    """
    slots = owner.__dict__.get(_SLOTS)
    if slots is not None:
        generation, sizes, entries, params = slots
        if all(len(d) == n for d, n in sizes) and all(d.get(k) is p for d, k, p in entries):
            return generation, params
    entries, sizes = [], []
    seen = set()
    for module in owner.modules():
        d = module._parameters
        sizes.append((d, len(d)))
        for k, p in d.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                entries.append((d, k, p))
    generation = next(_GENERATIONS)
    params = tuple(p for _, _, p in entries)
    owner.__dict__[_SLOTS] = (generation, sizes, entries, params)
    return generation, params


class ConditionalFlowModule(ConditionalTransformModule):
    """Base of the conditional modules: validates the context and delegates to ``_condition``."""

    def __init__(self, input_dim: int, context_dim: int):
        super().__init__()
        self.input_dim = check_dim(input_dim, "input_dim")
        self.context_dim = check_dim(context_dim, "context_dim")

    def condition(self, context: torch.Tensor) -> FlowTransform:
        """The transform for ``context``, after checking it (see :func:`~pyro_flows.validation.check_context`:
        size, dtype and device always; finiteness while Pyro's validation is enabled)."""
        name = f"{type(self).__name__} context"
        check_context(context, self.context_dim, name=name)
        params = _owner_parameters(self)[1]
        if params:
            check_like(context, params[0], name=name)
        transform = self._condition(context)
        if isinstance(transform, FlowTransform):
            transform._owner = self  # parameter versions guard its cache
        return transform

    def _condition(self, context: torch.Tensor) -> FlowTransform:
        raise NotImplementedError

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop(_SLOTS, None)
        return state


class Permute(FlowTransform, TransformModule):
    """Reorders the last dimension; the permutation is a buffer, so it follows ``.to(device)``.

    (Pyro's ``Permute`` keeps the permutation as a plain attribute, which stays on the device it was
    built on.) Volume preserving: the log-det is zero.
    """

    def __init__(self, permutation: torch.Tensor, cache_size: int = 1):
        permutation = torch.as_tensor(permutation, dtype=torch.long)
        super().__init__(int(permutation.numel()), cache_size=cache_size)
        if not torch.equal(permutation.sort().values, torch.arange(permutation.numel())):
            raise ValueError(f"permutation must be a permutation of 0..{permutation.numel() - 1}")
        self.register_buffer("permutation", permutation)
        self.register_buffer("inv_permutation", torch.argsort(permutation))

    def _reference(self):
        return None

    def _check(self, x, name):
        check_event(x, self.input_dim, name=f"Permute {name}")
        if x.device != self.permutation.device:
            raise ValueError(
                f"Permute {name}: expected device {self.permutation.device}, got {x.device}"
            )
        return x

    def _call_and_ladj(self, x):
        return x.index_select(-1, self.permutation), x.new_zeros(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        return y.index_select(-1, self.inv_permutation), y.new_zeros(y.shape[:-1])

    def _log_abs_det_jacobian(self, x, y):
        return x.new_zeros(x.shape[:-1])
