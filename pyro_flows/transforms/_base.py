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

    def __call__(self, x):
        self._check(x, "input")
        return super().__call__(x)

    def _inv_call(self, y):
        self._check(y, "inverse input")
        return super()._inv_call(y)

    def log_abs_det_jacobian(self, x, y):
        self._check(x, "input")
        self._check(y, "output")
        return self._log_abs_det_jacobian(x, y)

    def _log_abs_det_jacobian(self, x, y):
        raise NotImplementedError

    # TransformModule subclasses are nn.Modules; keep the Transform cache out of pickles/state
    def __getstate__(self):
        state = super().__getstate__()
        if "_cached_x_y" in state:
            state["_cached_x_y"] = (None, None)
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
        return self._condition(context)

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
