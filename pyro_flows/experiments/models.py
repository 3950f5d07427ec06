"""One wrapper for our families and the peers: :class:`FlowModel`, and :func:`make_guide` for SVI.

Names: every family in ``pyro_flows.FLOWS``; Pyro's built-ins ``pyro.affine_autoregressive``,
``pyro.affine_coupling``, ``pyro.spline_coupling``, ``pyro.spline_autoregressive``,
``pyro.neural_autoregressive``, ``pyro.block_autoregressive`` (stacks of the same depth with reversing
permutations); zuko's ``zuko.maf``, ``zuko.nsf``, ``zuko.naf`` when zuko is installed.

The task picks the direction. ``task="density"`` (``log_prob`` of external data is the training step):
our families that have the direction switch get ``single_pass="log_prob"``, and Pyro's autoregressive
peers and the peers without an inverse are used as ``TransformedDistribution(base, [t.inv])`` (MAF-style,
one pass for ``log_prob``). ``task="guide"`` (``rsample`` and ``log_prob`` of own samples): our families
get ``single_pass="sample"`` and Pyro's peers run in their natural (IAF) direction. zuko's flows are used as
zuko defines them. So every flow runs in its best direction for the task, and the name says which.

Example:
    >>> import torch
    >>> from pyro_flows.experiments.models import FlowModel
    >>> m = FlowModel("pyro.affine_autoregressive", 3, num_layers=2, hidden_dims=(8, 8))
    >>> m.log_prob(torch.randn(5, 3)).shape, m.sample(4).shape, m.direction
    (torch.Size([5]), torch.Size([4, 3]), 'density (t.inv)')
"""

from __future__ import annotations

import functools

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from pyro.distributions.conditional import ConditionalComposeTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule
from torch import nn

import pyro_flows
from pyro_flows.registry import get_flow, registered_flows

__all__ = [
    "PYRO_PEERS",
    "ZUKO_PEERS",
    "TASKS",
    "GUIDE_BASELINES",
    "zuko_available",
    "available_peers",
    "known_names",
    "is_peer",
    "FlowModel",
    "make_guide",
]

TASKS = ("density", "guide")

#: Pyro built-ins: name -> (unconditional constructor, conditional constructor or None).
PYRO_PEERS = {
    "pyro.affine_autoregressive": (T.affine_autoregressive, T.conditional_affine_autoregressive),
    "pyro.affine_coupling": (T.affine_coupling, T.conditional_affine_coupling),
    "pyro.spline_coupling": (T.spline_coupling, T.conditional_spline),
    "pyro.spline_autoregressive": (T.spline_autoregressive, T.conditional_spline_autoregressive),
    "pyro.neural_autoregressive": (T.neural_autoregressive, T.conditional_neural_autoregressive),
    "pyro.block_autoregressive": (T.block_autoregressive, None),
}
#: Pyro peers whose ``log_prob`` of data runs a D-pass inverse (or has none): inverted for density tasks.
_DENSITY_INVERTED = (
    "pyro.affine_autoregressive",
    "pyro.spline_autoregressive",
    "pyro.neural_autoregressive",
    "pyro.block_autoregressive",
)
ZUKO_PEERS = ("zuko.maf", "zuko.nsf", "zuko.naf")
#: Pyro's Gaussian and IAF autoguides, accepted by :func:`make_guide` next to every flow name.
GUIDE_BASELINES = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal")


def zuko_available() -> bool:
    try:
        import zuko  # noqa: F401
    except ImportError:
        return False
    return True


def available_peers() -> tuple:
    """Pyro's peers, then zuko's when zuko is installed."""
    return tuple(PYRO_PEERS) + (ZUKO_PEERS if zuko_available() else ())


def known_names() -> tuple:
    """Every name :class:`FlowModel` accepts: the registered families, then the peers."""
    return registered_flows() + available_peers()


def is_peer(name: str) -> bool:
    return name.startswith(("pyro.", "zuko."))


def _pyro_layer(name, dim, hidden_dims, context_dim):
    plain, conditional = PYRO_PEERS[name]
    kw = {} if name == "pyro.block_autoregressive" else {"hidden_dims": list(hidden_dims)}
    if context_dim is None:
        return plain(dim, **kw)
    if conditional is None:
        raise ValueError(f"{name} has no conditional version in Pyro")
    return conditional(dim, context_dim, **kw)


def _pyro_stack(name, dim, num_layers, hidden_dims=(64, 64), context_dim=None):
    parts = []
    for i in range(num_layers):
        parts.append(_pyro_layer(name, dim, hidden_dims, context_dim))
        if i < num_layers - 1 and dim > 1:
            parts.append(T.Permute(torch.arange(dim - 1, -1, -1)))
    return ComposeTransformModule(parts) if context_dim is None else ConditionalComposeTransformModule(parts)


def _our_kwargs(name, task, kwargs):
    kwargs = dict(kwargs)
    if get_flow(name).has_single_pass and "single_pass" not in kwargs:
        kwargs["single_pass"] = "log_prob" if task == "density" else "sample"
    return kwargs


class FlowModel(nn.Module):
    """A flow (ours or a peer) on a standard normal base, used the same way whatever its origin.

    Arguments:
        name: a name in :func:`known_names`.
        dim: the event size D.
        num_layers: layers (blocks) in the stack.
        hidden_dims: hidden widths of the conditioner networks; None: the family's default (ours) or
            ``(64, 64)`` (peers).
        context_dim: build a conditional flow; then every method takes ``context``.
        task: ``"density"`` or ``"guide"``: which direction is single-pass (see the module docstring).
        **kwargs: passed to every layer of our families (e.g. ``single_pass`` to override the task's).

    Attributes:
        kind: ``"ours"``, ``"pyro"`` or ``"zuko"``; ``direction``: how the flow is used, in words;
        ``flow``: the underlying module (its parameters are this module's parameters).
    """

    def __init__(self, name, dim, num_layers=4, hidden_dims=None, context_dim=None, task="density", **kwargs):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.name, self.dim, self.context_dim, self.task = name, int(dim), context_dim, task
        self.inverted = False
        if name.startswith("zuko."):
            import zuko

            cls = {"zuko.maf": zuko.flows.MAF, "zuko.nsf": zuko.flows.NSF, "zuko.naf": zuko.flows.NAF}[name]
            self.flow = cls(
                dim,
                context=context_dim or 0,
                transforms=num_layers,
                hidden_features=list(hidden_dims or (64, 64)),
            )
            self.kind, self.direction = "zuko", "zuko"
        elif name in PYRO_PEERS:
            self.flow = _pyro_stack(name, dim, num_layers, hidden_dims or (64, 64), context_dim)
            self.kind = "pyro"
            self.inverted = task == "density" and name in _DENSITY_INVERTED
            self.direction = "density (t.inv)" if self.inverted else "natural"
        elif name in registered_flows():
            if hidden_dims is not None:
                kwargs["hidden_dims"] = tuple(hidden_dims)
            kwargs = _our_kwargs(name, task, kwargs)
            self.flow = pyro_flows.flow(name, dim, num_layers=num_layers, context_dim=context_dim, **kwargs)
            self.kind = "ours"
            self.direction = f"single_pass={kwargs['single_pass']}" if "single_pass" in kwargs else "one"
        else:
            raise ValueError(f"unknown flow {name!r}; expected one of {known_names()}")
        self.register_buffer("_zero", torch.zeros(()), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # Pyro's Permute keeps its permutation as a plain attribute, which Module.to(device) does not move:
        # move it with the parameters (and drop its cached inverse), or a CUDA step fails on a CPU index
        super()._apply(fn, *args, **kwargs)
        for part in getattr(self.flow, "parts", ()):
            if isinstance(part, T.Permute):
                part.permutation = fn(part.permutation)
                part.__dict__.pop("inv_permutation", None)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def distribution(self, context=None):
        """The flow's distribution (conditioned on ``context`` for a conditional flow)."""
        if (context is None) != (self.context_dim is None):
            raise ValueError(
                f"{self.name}: context is {'required' if context is None else 'not expected'}"
                f" (context_dim={self.context_dim})"
            )
        if self.kind == "zuko":
            return self.flow(context)
        t = self.flow if context is None else self.flow.condition(context)
        if self.inverted:
            t = t.inv
        zero = self._zero.expand(self.dim)
        # validate_args=False: torch's argument validation checks the support on the host in every
        # log_prob (a sync per call on a GPU); measurements must not depend on the global setting
        base = dist.Normal(zero, torch.ones_like(zero), validate_args=False).to_event(1)
        if context is not None:
            base = base.expand(context.shape[:-1])
        return dist.TransformedDistribution(base, [t], validate_args=False)

    def log_prob(self, x, context=None):
        if self.kind == "pyro":
            # Pyro's cache_size=1 hands back its last output when the same tensor object comes again (full-
            # batch training passes one tensor every step): a stale value with a freed graph. A view is a new
            # object (no copy), so the cache serves only the pair computed within this call.
            x = x.view_as(x)
        return self.distribution(context).log_prob(x)

    def rsample_and_log_prob(self, n, context=None):
        """``n`` reparameterised draws and their log-densities (a guide's step)."""
        d = self.distribution(context)
        if self.kind == "zuko":
            return d.rsample_and_log_prob((n,))
        z = d.rsample((n,))
        return z, d.log_prob(z)

    def guide_loss(self, n, context=None):
        """``mean log q(z)`` over ``n`` own draws: the flow-dependent part of a guide's ELBO step."""
        return self.rsample_and_log_prob(n, context)[1].mean()

    def sample(self, n, context=None):
        with torch.no_grad():
            return self.distribution(context).sample((n,))

    def extra_repr(self):
        return f"name={self.name!r}, dim={self.dim}, task={self.task!r}, direction={self.direction!r}"


def make_guide(name, model, num_layers=None, hidden_dims=None, **kwargs):
    """An autoguide for ``model``: one of :data:`GUIDE_BASELINES`, ``"AutoFlow"`` (the default
    :class:`~pyro_flows.infer.AutoFlow`: default family, sizes and warmup), a family (``AutoFlow`` of that
    family) or a Pyro peer.

    Our families run in the guide direction (``AutoFlow`` chooses it); a Pyro peer is stacked as in
    :class:`FlowModel` and used in its natural (IAF) direction. ``num_layers=None`` means ``AutoFlow``'s
    default (4 for a Pyro peer). ``**kwargs`` go to ``AutoFlow`` (e.g. ``warmup``) and every layer of a
    family. Train an ``AutoFlow`` with ``AutoFlow.optimizer()`` (separate rates for the affine part and
    the flow).
    """
    from pyro.infer import autoguide

    from pyro_flows.infer import AutoFlow

    if name in GUIDE_BASELINES:
        return getattr(autoguide, name)(model, **kwargs)
    if name in PYRO_PEERS:
        make = functools.partial(
            _pyro_stack, name, num_layers=num_layers or 4, hidden_dims=hidden_dims or (64, 64)
        )
        return AutoFlow(model, make, **kwargs)
    if name == "AutoFlow" or name in registered_flows():
        if hidden_dims is not None:
            kwargs["hidden_dims"] = tuple(hidden_dims)
        return AutoFlow(model, None if name == "AutoFlow" else name, num_layers=num_layers, **kwargs)
    raise ValueError(
        f"unknown guide {name!r}; expected one of {GUIDE_BASELINES + ('AutoFlow',) + tuple(pyro_flows.FLOWS)}"
        f" or a Pyro peer {tuple(PYRO_PEERS)}"
    )
