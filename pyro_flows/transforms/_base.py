"""Base classes shared by every family, and a device-following permutation.

Every family follows Pyro's three-class pattern:

* ``Conditioned<X>(FlowTransform)`` holds the maths and takes its parameters from a callable;
* ``<X>(Conditioned<X>, TransformModule)`` owns the ``nn.Parameter``s;
* ``Conditional<X>(ConditionalFlowModule)`` returns a ``Conditioned<X>`` from ``condition(context)``.

:class:`FlowTransform` validates what comes in (event size, dtype, device) in one place, so every
family raises the same ``ValueError`` naming expected and actual sizes. Families implement
``_call``, ``_inverse`` and ``_log_abs_det_jacobian``.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.distributions.torch_transform import TransformModule
from torch.distributions import Transform

from ..validation import check_context, check_dim, check_event, check_like

__all__ = ["FlowTransform", "ConditionalFlowModule", "Permute"]


class FlowTransform(Transform):
    """A bijection of R^D (``event_dim=1``) with input validation.

    Subclasses set ``self.input_dim`` (via ``__init__``) and implement ``_call``, ``_inverse`` and
    ``_log_abs_det_jacobian(x, y)``. When built from a context (``Conditional<X>.condition``) they
    store it in ``self._context`` so inputs are checked against its dtype and device.
    """

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, input_dim: int, cache_size: int = 1, context: torch.Tensor | None = None):
        super().__init__(cache_size=cache_size)
        self.input_dim = check_dim(input_dim, "input_dim")
        self._context = context

    # -- validation -------------------------------------------------------------------------
    def _reference(self) -> torch.Tensor | None:
        if isinstance(self, torch.nn.Module):
            for p in self.parameters():
                return p
        return self._context

    def _check(self, x: torch.Tensor, name: str) -> torch.Tensor:
        check_event(x, self.input_dim, name=f"{type(self).__name__} {name}")
        return check_like(x, self._reference(), name=f"{type(self).__name__} {name}")

    # -- caching ----------------------------------------------------------------------------
    # Pyro's ``cache_size=1`` returns the cached output whenever the *same* tensor object comes
    # again. In full-batch training (one data tensor, many optimiser steps) that hands back the
    # previous parameters' output with a freed graph ("backward through the graph a second time"),
    # or, under ``torch.no_grad()``, a silently stale value. Here a cache entry also records the
    # version counters of the parameters it was computed with (the module's own, or those of the
    # conditional module that built this transform), and any in-place update (``optimizer.step()``,
    # ``load_state_dict``) invalidates it. Updates written through ``p.data`` bypass version
    # counters (Pyro's ``ClippedAdam`` does this): with such optimisers pass fresh tensors or use
    # ``cache_size=0``.
    _owner = None  # the ConditionalFlowModule that built this transform, if any

    def _signature(self):
        owner = self if isinstance(self, torch.nn.Module) else self._owner
        if owner is None:
            return ()
        return tuple(p._version for p in owner.parameters())

    def _cache_lookup(self, tensor, position):
        """The cached partner of ``tensor`` (``position`` 0: an input, 1: an output), or ``None``."""
        if self._cache_size == 0:
            return None
        signature = self._signature()
        if self.__dict__.get("_cache_signature") != signature:
            self._cached_x_y = (None, None)
            self.__dict__["_cache_signature"] = signature
            return None
        cached = self._cached_x_y
        if tensor is cached[position]:
            return cached[1 - position]
        return None

    def __call__(self, x):
        self._check(x, "input")
        hit = self._cache_lookup(x, 0)
        if hit is not None:
            return hit
        y = self._call(x)
        if self._cache_size:
            self._cached_x_y = x, y
        return y

    def _inv_call(self, y):
        self._check(y, "inverse input")
        hit = self._cache_lookup(y, 1)
        if hit is not None:
            return hit
        x = self._inverse(y)
        if self._cache_size:
            self._cached_x_y = x, y
        return x

    def _remember_logdet(self, x, y, logdet):
        """Keep the forward log-det computed alongside ``_call``/``_inverse`` for that same pair.

        ``log_abs_det_jacobian(x, y)`` returns it when called with these very tensors and unchanged
        parameters (as in ``TransformedDistribution.log_prob`` right after the inverse), and
        recomputes it otherwise.
        """
        self.__dict__["_logdet_memo"] = (x, y, logdet, self._signature())

    def log_abs_det_jacobian(self, x, y):
        self._check(x, "input")
        self._check(y, "output")
        memo = self.__dict__.get("_logdet_memo")
        if memo is not None and memo[0] is x and memo[1] is y and memo[3] == self._signature():
            return memo[2]
        return self._log_abs_det_jacobian(x, y)

    def _log_abs_det_jacobian(self, x, y):
        raise NotImplementedError

    # TransformModule subclasses are nn.Modules; keep the Transform cache out of pickles/state
    def __getstate__(self):
        state = super().__getstate__()
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
        state.pop("_cache_signature", None)
        state.pop("_logdet_memo", None)
        return state


class ConditionalFlowModule(ConditionalTransformModule):
    """Base of the conditional modules: validates the context and delegates to ``_condition``."""

    def __init__(self, input_dim: int, context_dim: int):
        super().__init__()
        self.input_dim = check_dim(input_dim, "input_dim")
        self.context_dim = check_dim(context_dim, "context_dim")

    def condition(self, context: torch.Tensor) -> FlowTransform:
        name = f"{type(self).__name__} context"
        check_context(context, self.context_dim, name=name)
        for p in self.parameters():
            check_like(context, p, name=name)
            break
        transform = self._condition(context)
        if isinstance(transform, FlowTransform):
            transform._owner = self  # parameter versions guard its cache
        return transform

    def _condition(self, context: torch.Tensor) -> FlowTransform:
        raise NotImplementedError


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

    def _call(self, x):
        return x.index_select(-1, self.permutation)

    def _inverse(self, y):
        return y.index_select(-1, self.inv_permutation)

    def _log_abs_det_jacobian(self, x, y):
        return x.new_zeros(x.shape[:-1])
