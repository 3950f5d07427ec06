"""Path-derivative gradients ("sticking the landing") for flow guides.

The reparameterised ELBO gradient of a guide ``q_phi`` with draws ``z = T_phi(eps)`` has two parts: the *path*
term, ``(grad_z log p(z) - grad_z log q_phi(z)) dz/dphi``, and the *score* term, ``grad_phi log q_phi(z)`` at
fixed ``z``, whose expectation is zero. At the optimum (``q = p``) the path term vanishes for every draw, the
score term does not: its noise is what keeps the final iterate moving. Roeder, Wu and Duvenaud (2017, "Sticking
the landing") drop it: same expectation, and a variance that vanishes as ``q`` approaches ``p``. Agrawal,
Sheldon and Domke (2020) found it helps normalizing-flow guides consistently.

Here :class:`PathGradientPosterior` is a ``TransformedDistribution`` whose ``log_prob`` of the draw it has just
made returns the usual value (exactly: the value is not changed) with the gradient of ``log q`` evaluated with
the parameters held fixed, ``log q_{stop_grad(phi)}(z)``, differentiable in ``z`` only, so the ELBO's backward
pass carries the path term alone. ``log q`` with fixed parameters needs the transforms' inverse at ``z``: the
guide's flow runs its other direction once per step (for families whose sampling direction is the single-pass
one that is an iterative, certified solve). Each numerical inverse starts from the input its layer has just
mapped to (nearly) that point (:func:`~pyro_flows.transforms._base.warm_started`), so it ends after one
checked pass. (The AUTM autoregressive layer checks there the backward error, ``|E(u) - z| <= sqrt(eps)
(1 + |z|)``, rather than its usual forward-error certificate, whose Jacobian per draw costs ``D`` conditioner
passes: this pass only differentiates ``log q`` at a point whose image is the draw to within rounding, and
shows nothing to the user.) Other values (data, an earlier draw, a draw edited in place) get the ordinary ``log_prob``.

Used by :class:`~pyro_flows.infer.AutoFlow` (by default, ``path_gradient="auto"``, under ``Trace_ELBO`` and
``TraceMeanField_ELBO``: :func:`in_path_gradient_elbo`; always with ``path_gradient=True``).

Example:
    >>> import torch, pyro.distributions as dist
    >>> from pyro.distributions.transforms import AffineTransform
    >>> loc = torch.zeros(2, requires_grad=True)
    >>> frozen = lambda z: dist.Normal(loc.detach(), 1.0).to_event(1).log_prob(z)  # log q with loc held fixed
    >>> q = PathGradientPosterior(dist.Normal(torch.zeros(2), 1.0).to_event(1), [AffineTransform(loc, 1.0)], frozen)
    >>> z = q.rsample()
    >>> lq = q.log_prob(z)  # the value of log q(z); its gradient in loc is the path term only
    >>> g, = torch.autograd.grad(lq, loc)
    >>> bool(torch.allclose(g, -(z - loc).detach()))  # the path term; the score term, z - loc, is dropped
    True
"""

from __future__ import annotations

import sys

import torch
from pyro.distributions import TransformedDistribution
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO

from ..nn.lipschitz import kept_bounds
from ..transforms._base import kept_records, warm_started

__all__ = ["PATH_GRADIENT_ELBOS", "PathGradientPosterior", "frozen_log_prob", "in_path_gradient_elbo"]

#: the ELBO classes (exact types, not subclasses) under which ``AutoFlow(path_gradient="auto")`` uses the path
#: gradient: objectives whose gradient is ``E_q[grad(log p - log q)]`` with ``log q`` of the guide's own draws,
#: for which dropping the score term is unbiased. Not the importance-weighted ones (``RenyiELBO``,
#: ``TraceTailAdaptive_ELBO``: the path-derivative estimator is biased there, Tucker et al. 2019, "Doubly
#: reparameterized gradient estimators"), and not the JIT ones (a trace cannot record the detached pass).
PATH_GRADIENT_ELBOS = (Trace_ELBO, TraceMeanField_ELBO)

#: the attribute that holds the latest draw of a :class:`PathGradientPosterior`
_DRAW = "_path_gradient_draw"


class PathGradientPosterior(TransformedDistribution):
    """A ``TransformedDistribution`` whose ``log_prob`` of its own latest draw carries the path-derivative
    gradient only (see the module docstring).

    Arguments:
        base_dist, transforms: as for ``TransformedDistribution``.
        frozen_log_prob: ``z -> log q(z)`` computed with every parameter held fixed (detached), differentiable
            in ``z``; called once per scored draw.
    """

    def __init__(self, base_dist, transforms, frozen_log_prob, validate_args=None):
        super().__init__(base_dist, transforms, validate_args=validate_args)
        self._frozen_log_prob = frozen_log_prob

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PathGradientPosterior, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._frozen_log_prob = self._frozen_log_prob
        return new

    def rsample(self, sample_shape=torch.Size()):
        # the layers' guaranteed Lipschitz bounds are computed once: the pass with detached parameters reads them
        with kept_bounds():
            z = super().rsample(sample_shape)
        self.__dict__[_DRAW] = (z, z._version)
        return z

    def log_prob(self, value):
        lp = super().log_prob(value)
        draw = self.__dict__.get(_DRAW)
        if draw is None or draw[0] is not value or draw[1] != value._version or not torch.is_grad_enabled():
            return lp
        path = self._frozen_log_prob(value)
        # the usual value (to the last bit), the gradient of log q with the parameters held fixed
        return lp.detach() + (path - path.detach())


def in_path_gradient_elbo(max_depth: int = 64) -> bool:
    """Whether the caller runs inside the trace of one of :data:`PATH_GRADIENT_ELBOS` (found as the ``self`` of
    the nearest ``ELBO._get_trace`` frame on the call stack, within ``max_depth`` frames; a few microseconds),
    and not under a JIT trace. Called by the guide once per step: a guide called outside an ELBO (a
    hand-written loss, ``Predictive``) is not in one."""
    if torch.jit.is_tracing():
        return False
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_get_trace":
            elbo = frame.f_locals.get("self")
            if isinstance(elbo, ELBO):
                return type(elbo) in PATH_GRADIENT_ELBOS
        frame = frame.f_back
    return False


class _Frozen(torch.nn.Module):
    """Holds a flow so that :func:`torch.func.functional_call` can run it with detached parameters."""

    def __init__(self, flow):
        super().__init__()
        self.flow = flow

    def forward(self, transforms, base_dist, z):
        return TransformedDistribution(base_dist, transforms, validate_args=False).log_prob(z)


def frozen_log_prob(flow: torch.nn.Module, transforms, base_dist, z: torch.Tensor) -> torch.Tensor:
    """``log q(z)`` of ``TransformedDistribution(base_dist, transforms)`` with the parameters of ``flow`` (one
    of ``transforms``, or a module they use) detached for the call, differentiable in ``z`` (and in nothing
    else: the other transforms must hold detached tensors already)."""
    if torch.jit.is_tracing():
        raise RuntimeError(
            "the path-derivative gradient (AutoFlow(path_gradient=True)) cannot be traced by torch.jit "
            "(JitTrace_ELBO, torch.jit.trace): it runs the flow with its parameters swapped for detached copies, "
            "which a trace cannot record. Use Trace_ELBO, or path_gradient=False under JIT")
    holder = _Frozen(flow)
    params = {f"flow.{name}": p.detach() for name, p in flow.named_parameters()}
    # the draw was just made by these very layers: their numerical inverses start from the inputs they saw, and
    # their records of the draw (caches, parameter list) are theirs again afterwards
    with kept_records(flow), warm_started(flow):
        return torch.func.functional_call(holder, params, (transforms, base_dist, z))
