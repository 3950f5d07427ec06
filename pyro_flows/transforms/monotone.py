"""Monotone Flows: a monotone-operator residual flow with implicit gradients (and a conditional variant).

One block (Ahn et al., 2022), with ``G`` a network of guaranteed ``Lip_w(G) <= L < 1``
(:class:`~pyro_flows.nn.monotone_net.MonotoneNet`):

    F(x) = ((Id + G) / 2)^{-1}(x) - x,          F^{-1}(y) = ((Id - G) / 2)^{-1}(y) - y.

Both directions are fixed-point solves of contractions of rate ``L`` through one point ``w = x + y``
(forward ``w = 2x - G(w)``, inverse ``w = 2y + G(w)``), of equal cost, so there is no direction
switch. ``dy/dx = (I - J)(I + J)^{-1}`` with ``J = J_G(w)``, hence the exact log-det

    log|det dF/dx| = log det(I - J) - log det(I + J)          (one batched ``slogdet``).

**Guaranteed bounds (any parameter values, any context, any width or depth of G).** The singular
values of ``dF/dx`` lie in ``[(1-L)/(1+L), (1+L)/(1-L)]`` (``[0.053, 19]`` at the default
``L = 0.9``): per block ``|log|det dF/dx|| <= D log((1+L)/(1-L))`` and the condition number is at most
``((1+L)/(1-L))^2``. Every solve stops on the a-posteriori bound ``L/(1-L) ||w_{k+1} - w_k||`` of the
distance to the true ``w`` (which is the error of ``x = w - y`` or ``y = w - x``, in the data's own
space), checked every ``check_every`` iterations (one host sync per check); when ``max_iter`` is
reached first it warns :class:`~pyro_flows.solvers.ConvergenceWarning` with the bound it reached.

**Log-det.** Exact whenever gradients are off (evaluation, sampling, ``torch.no_grad()``), whatever
``D``. In training (gradients on): exact for ``logdet="exact"``, and for ``logdet="auto"`` (default)
up to ``D = EXACT_MAX_DIM = 64``; above that, or with ``logdet="stochastic"``, the unbiased
Russian-roulette/Hutchinson estimator (:func:`pyro_flows.logdet.monotone_logdet_stochastic`).

**Gradients** are implicit and exact. With the default (CPila) network, one hand-written pass
(:func:`~pyro_flows.nn.monotone_net.folded_exact_step`) takes the certified point ``w``, returns one
more contraction step ``rhs - sign G(w)`` and the exact log-det at ``w``, and its backward applies the
implicit function theorem directly (the log-det's pull-back through the Jacobian's tangents, then
``(I + sign J)^{-T}`` from the inverses the log-det's gradient needs anyway). Other networks (dense,
LipSwish) take one differentiable contraction step whose gradient a hook corrects by
``(I + sign J)^{-T}``; the stochastic mode, which has no dense ``J``, solves the adjoint fixed point
``u = a - sign J^T u`` with ``J^T`` products from the block's linearisation. Derivations, design
choices and measurements: ``docs/monotone.md``.

References:
    Ahn, Kim, Hong, Kim. Invertible Monotone Operators for Normalizing Flows. NeurIPS 2022.
    Chen, Behrmann, Duvenaud, Jacobsen. Residual Flows for Invertible Generative Modeling. NeurIPS 2019.
    Perugachi-Diaz, Tomczak, Bhulai. Invertible DenseNets with Concatenated LipSwish. NeurIPS 2021.
    Lu, Chen, Chen, Zhu, Zhu. Implicit Normalizing Flows. ICLR 2021.

Example:
    >>> import torch, pyro.distributions as dist, pyro_flows
    >>> t = pyro_flows.monotone(2, hidden_dims=[16])
    >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
    >>> d.log_prob(torch.randn(5, 2)).shape
    torch.Size([5])
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro.distributions.torch_transform import TransformModule

from .. import logdet as _logdet
from ..nn.monotone_net import MonotoneNet, folded_exact_step
from ..registry import register_flow
from ..solvers import ConvergenceWarning, SolverInfo, default_tolerance, fixed_point, refuse_jit_trace
from ..validation import broadcast_context, check_dim
from ._base import ConditionalFlowModule, FlowTransform

__all__ = [
    "ConditionedMonotone",
    "Monotone",
    "ConditionalMonotone",
    "monotone",
    "conditional_monotone",
]

LOGDET_MODES = ("auto", "exact", "stochastic")
#: ``logdet="auto"`` trains with the exact log-det up to this ``input_dim`` (always exact without gradients)
EXACT_MAX_DIM = 64
ANDERSON_MAX_ITER = 100


def _default_hidden(input_dim):
    return [max(64, 4 * input_dim)] * 2


class ConditionedMonotone(FlowTransform):
    """One Monotone Flow block ``F(x) = ((Id + G)/2)^{-1}(x) - x`` for a given network ``G`` (and context).

    Arguments:
        input_dim: D.
        net: a :class:`~pyro_flows.nn.monotone_net.MonotoneNet` (``Lip_w(G) < 1``).
        context: the context tensor ``(..., C)`` (conditional use) or ``None``.
        logdet: ``"auto"`` (exact; in training the estimator above ``D = 64``), ``"exact"`` or
            ``"stochastic"`` (the estimator in training); always exact without gradients.
        n_exact_terms, roulette_p: the stochastic estimator's always-computed terms and geometric
            stopping probability (``None``: ``1 - L`` clipped to ``[0.02, 0.5]``).
        accelerate: ``None`` (default: plain iterations) or ``"anderson"``.
        check_every: test the stopping rule every this many iterations (one host sync per test).
        atol, rtol, max_iter: solver tolerances (default: dtype-dependent, see ``docs/monotone.md``).
        cache_size: Pyro's transform cache (0 or 1).

    Example:
        >>> import torch
        >>> from pyro_flows.nn.monotone_net import MonotoneNet
        >>> t = ConditionedMonotone(2, MonotoneNet(2, [8]))
        >>> x = torch.randn(4, 2)
        >>> bool((t.inv(t(x).clone()) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, input_dim, net, context=None, logdet="auto", n_exact_terms=2, roulette_p=None,
                 accelerate=None, check_every=3, atol=None, rtol=None, max_iter=1000, cache_size=1):
        super().__init__(input_dim, cache_size=cache_size, context=context)
        if logdet not in LOGDET_MODES:
            raise ValueError(f"logdet must be one of {LOGDET_MODES}, got {logdet!r}")
        if accelerate not in (None, "anderson"):
            raise ValueError(f"accelerate must be None or 'anderson', got {accelerate!r}")
        if roulette_p is not None and not 0 < roulette_p < 1:
            raise ValueError(f"roulette_p must be in (0, 1) or None, got {roulette_p!r}")
        for name, tol in (("atol", atol), ("rtol", rtol)):
            if tol is not None and not tol > 0:
                raise ValueError(f"{name} must be positive, got {tol!r}")
        self.logdet_mode = logdet
        self.n_exact_terms = check_dim(n_exact_terms, "n_exact_terms", minimum=0)
        self.roulette_p = roulette_p
        self.accelerate = accelerate
        self.check_every = check_dim(check_every, "check_every")
        self.atol, self.rtol = atol, rtol
        self.max_iter = check_dim(max_iter, "max_iter")
        self.net = net
        self.last_solver_info = None  # SolverInfo of the most recent solve (benchmarks, diagnostics)

    def _bound_networks(self):
        return (self.net,)

    # -- helpers ------------------------------------------------------------------------------
    def _stochastic(self):
        """Whether this call uses the estimator: only with gradients on, and only where asked or above 64."""
        if not torch.is_grad_enabled():
            return False
        return self.logdet_mode == "stochastic" or (
            self.logdet_mode == "auto" and self.input_dim > EXACT_MAX_DIM)

    def _tolerances(self, dtype, L):
        tol = default_tolerance(dtype)
        c = max(1.0, L / (1.0 - L))
        floor = 8.0 * torch.finfo(dtype).eps * math.sqrt(self.input_dim) * c
        atol = max(tol, floor) if self.atol is None else self.atol
        rtol = max(tol, floor) if self.rtol is None else self.rtol
        return atol, rtol

    def _fixed_point(self, g, w, L, atol, rtol, name, record=True):
        """Iterate ``w <- g(w)`` (no graph) until ``L/(1-L) ||g(w) - w|| <= atol + rtol max|g(w)|``
        per sample, testing every ``check_every`` iterations; returns the last ``g(w)``."""
        c = L / (1.0 - L)
        it = 0
        if self.accelerate == "anderson":
            # Anderson mixing is not globally safeguarded (in float32 it can wander off); any point is
            # a valid start for a contraction, so finish with plain iterations when it falls short
            wa, info = fixed_point(g, w, return_info=True, accelerate="anderson", on_fail="ignore",
                                   max_iter=min(self.max_iter, ANDERSON_MAX_ITER), lipschitz=L,
                                   atol=atol, rtol=rtol)
            it = info.iterations
            if info.converged:
                self.last_solver_info = info
                return wa
            if bool(torch.isfinite(wa).all()):
                w = wa
        err = None
        k = self.check_every
        for i in range(1, self.max_iter + 1):
            gw = g(w)
            if i % k == 0 or i == self.max_iter:
                err = c * (gw - w).norm(dim=-1)
                bound = atol + rtol * gw.abs().amax(dim=-1)
                done, finite = torch.stack(((err <= bound).all(), torch.isfinite(err).all())).tolist()
                if done:
                    if record:
                        self.last_solver_info = SolverInfo(it + i, err.max() if err.numel() else 0.0, True)
                    return gw
                if not finite:
                    raise ValueError(
                        f"{type(self).__name__} {name}: non-finite values in the fixed-point solve "
                        f"(non-finite input or context?); an iterative inverse cannot be computed for them")
            w = gw
        worst = float(err.max())
        if record:
            self.last_solver_info = SolverInfo(it + self.max_iter, worst, False)
        warnings.warn(
            f"{type(self).__name__} {name}: the fixed-point solve stopped after {self.max_iter} iterations "
            f"with an error bound of {worst:.3g} on the result (tolerance {atol:.3g} + {rtol:.3g} |x|); "
            f"raise max_iter or loosen atol/rtol", ConvergenceWarning, stacklevel=4)
        return w

    def _map(self, rhs, sign, name):
        """Solve ``w = 2 rhs - sign * G(w)``; returns ``(w - rhs, log|det dF/dx|)`` (forward log-det)."""
        refuse_jit_trace(type(self).__name__)
        ctx = self._context
        if ctx is not None:
            rhs, ctx = broadcast_context(rhs, ctx)
        net = self.net
        p = net.prepare()  # effective weights, once per call
        L = net.lipschitz_guarantee
        atol, rtol = self._tolerances(rhs.dtype, L)
        with torch.no_grad():
            r0 = rhs.detach()
            c0 = net.output_shift(2 * r0, -sign, p)
            w = self._fixed_point(lambda v: net.value(v, ctx, p, out=(c0, -sign)), 2 * r0, L, atol, rtol, name)
        if p[0] == "folded" and not self._stochastic():
            # map, exact log-det and implicit gradients in one hand-written pass (see folded_exact_step)
            return folded_exact_step(w, rhs, ctx, p, sign)
        if not torch.is_grad_enabled():
            g, J = net.jacobian(w, ctx, p)
            return (w - r0), _logdet.monotone_logdet_exact(J)
        c = net.output_shift(2 * rhs, -sign, p)

        def g(v):
            return net.value(v, ctx, p, out=(c, -sign))

        if self._stochastic():
            z = g(w)
            with torch.no_grad():
                _, ops = net.linearize(z, ctx, p)
            ladj = self.stochastic_logdet(z, ctx, prepared=p, linearization=ops)
            if z.requires_grad:  # (I + sign J)^{-T} by the adjoint fixed point, J^T products from ops
                z.register_hook(lambda a: self._adjoint(a, ops, sign, L, rtol))
            return z - rhs, ladj
        # one differentiable contraction step from the certified point; its gradient, corrected by
        # (I + sign J)^{-T} in backward, is the exact implicit gradient (w = 2 rhs - sign G(w))
        z = g(w)
        _, J = net.jacobian(z, ctx, p)
        state = _logdet.MonotoneLogDetState()
        ladj = _logdet.monotone_logdet_exact(J, state)
        if z.requires_grad:  # the log-det's backward (which runs first) leaves (I +- J)^{-1} in state
            z.register_hook(lambda a: state.solve_transposed(sign, a))
        return z - rhs, ladj

    def _adjoint(self, a, ops, sign, L, rtol):
        """``u = (I + sign J)^{-T} a``: the fixed point of ``u = a - sign J^T u`` (rate ``L``), to a
        tolerance relative to each sample's ``max|u|``."""
        net = self.net
        tiny = torch.finfo(a.dtype).tiny
        with torch.no_grad():
            return self._fixed_point(lambda u: a - sign * net.vjp_linearization(ops, u), a, L, tiny, rtol,
                                     "adjoint (backward)", record=False)

    # -- the protocol -------------------------------------------------------------------------
    def _call_and_ladj(self, x):
        return self._map(x, 1.0, "input")

    def _inverse_and_ladj(self, y):
        return self._map(y, -1.0, "inverse input")

    def stochastic_logdet(self, w, ctx=None, prepared=None, linearization=None, **kwargs):
        """Unbiased Russian-roulette/Hutchinson estimate of the log-det at the solved point ``w``
        (``linearization``: :meth:`MonotoneNet.linearize`'s factors at ``w``, if already computed)."""
        p = self.net.prepare() if prepared is None else prepared
        g0 = None
        if linearization is None:
            with torch.no_grad():
                g0, linearization = self.net.linearize(w.detach(), ctx, p)
        ops0 = linearization

        def matvec(u):
            return self.net.apply_linearization(g0, ops0, u.unsqueeze(-2), transposed=True)[1].squeeze(-2)

        def grad_matvec(u):
            g, ops = self.net.linearize(w, ctx, p)
            return self.net.apply_linearization(g, ops, u.unsqueeze(-2), transposed=True)[1].squeeze(-2)

        L = self.net.lipschitz_guarantee
        prob = self.roulette_p if self.roulette_p is not None else _logdet.default_roulette_p(L)
        kwargs.setdefault("n_exact", self.n_exact_terms)
        kwargs.setdefault("p", prob)
        return _logdet.monotone_logdet_stochastic(matvec, grad_matvec, w, **kwargs)


_OPTIONS = ("logdet", "n_exact_terms", "roulette_p", "accelerate", "check_every", "atol", "rtol", "max_iter")


def _options(kw):
    return {k: kw.pop(k) for k in list(kw) if k in _OPTIONS}


class Monotone(ConditionedMonotone, TransformModule):
    """A Monotone Flow block with learnable ``G`` (a :class:`MonotoneNet`).

    Arguments:
        input_dim: D.
        hidden_dims: hidden widths of ``G`` (default ``[max(64, 4 D)] * 2``).
        activation: ``"cpila"`` (default) or ``"lipswish"``.
        lipschitz: bound ``L < 1`` of ``Lip(G)`` (default 0.9); larger ``L`` is more expressive
            (``(1-L)/(1+L) <= dF/dx <= (1+L)/(1-L)``) but the solves take more iterations.
        dense: i-DenseNet learnable concatenation (default ``False``).
        logdet, n_exact_terms, roulette_p, accelerate, check_every, atol, rtol, max_iter, cache_size:
            see :class:`ConditionedMonotone`.

    Example:
        >>> import torch
        >>> t = Monotone(3, hidden_dims=[16], lipschitz=0.8)
        >>> x = torch.randn(10, 3)
        >>> y = t(x)
        >>> t.log_abs_det_jacobian(x, y).shape
        torch.Size([10])
    """

    def __init__(self, input_dim, hidden_dims=None, activation="cpila", lipschitz=0.9, dense=False,
                 cache_size=1, **kwargs):
        opts = _options(kwargs)
        if kwargs:
            raise ValueError(f"unknown keyword arguments {sorted(kwargs)}")
        super().__init__(input_dim, None, cache_size=cache_size, **opts)
        hidden = _default_hidden(self.input_dim) if hidden_dims is None else list(hidden_dims)
        self.net = MonotoneNet(self.input_dim, hidden, 0, activation, lipschitz, dense)

    def init_identity_(self):
        """Make the block exactly the identity map (log-det exactly 0); returns ``self``.

        Zeroes the output layer of ``G`` (weight and bias), so ``G = 0``: the forward solve is
        ``w = 2x`` (exact, a power of two), ``F(x) = 2x - x = x``, and ``log det(I - 0) -
        log det(I + 0) = 0``. The hidden layers keep their values, so the output layer's gradient
        does not vanish. In the conditional block ``G = 0`` for every context.

        Example:
            >>> import torch
            >>> t = Monotone(3, hidden_dims=[16]).init_identity_()
            >>> x = torch.randn(4, 3)
            >>> bool((t(x) == x).all())
            True
        """
        last = self.net.linears[-1]
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
        return self


class ConditionalMonotone(ConditionalFlowModule):
    """A conditional Monotone Flow block: the context enters ``G`` at its first layer.

    ``condition(context)`` returns a :class:`ConditionedMonotone`; ``Lip_w(G(., context)) <= L`` for
    every context (the first layer's bound is taken over the ``w``-columns only).

    Arguments:
        input_dim, context_dim: D and C.
        hidden_dims, activation, lipschitz, dense: as :class:`Monotone`.
        logdet, n_exact_terms, roulette_p, accelerate, check_every, atol, rtol, max_iter, cache_size:
            see :class:`ConditionedMonotone`.

    Example:
        >>> import torch
        >>> m = ConditionalMonotone(2, 3, hidden_dims=[16])
        >>> t = m.condition(torch.randn(5, 3))
        >>> t(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(self, input_dim, context_dim, hidden_dims=None, activation="cpila", lipschitz=0.9,
                 dense=False, cache_size=1, **kwargs):
        super().__init__(input_dim, context_dim)
        opts = _options(kwargs)
        if kwargs:
            raise ValueError(f"unknown keyword arguments {sorted(kwargs)}")
        # validate the options once, here, rather than at the first condition()
        ConditionedMonotone(self.input_dim, None, cache_size=cache_size, **opts)
        self._options = dict(opts, cache_size=cache_size)
        hidden = _default_hidden(self.input_dim) if hidden_dims is None else list(hidden_dims)
        self.net = MonotoneNet(self.input_dim, hidden, self.context_dim, activation, lipschitz, dense)

    init_identity_ = Monotone.init_identity_

    def _condition(self, context):
        return ConditionedMonotone(self.input_dim, self.net, context=context, **self._options)


def monotone(input_dim, hidden_dims=None, **kwargs):
    """A :class:`Monotone` block (see its arguments).

    Example:
        >>> import pyro_flows
        >>> t = pyro_flows.monotone(2)
    """
    return Monotone(input_dim, hidden_dims=hidden_dims, **kwargs)


def conditional_monotone(input_dim, context_dim, hidden_dims=None, **kwargs):
    """A :class:`ConditionalMonotone` block (see its arguments).

    Example:
        >>> import pyro_flows
        >>> t = pyro_flows.conditional_monotone(2, 3)
    """
    return ConditionalMonotone(input_dim, context_dim, hidden_dims=hidden_dims, **kwargs)


register_flow("monotone", monotone, conditional_monotone, permutation="reverse",
              test_kwargs={"hidden_dims": [8, 8]})
