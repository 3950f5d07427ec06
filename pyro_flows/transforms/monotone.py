"""Monotone Flows: a monotone-operator residual flow with implicit gradients (and a conditional variant).

Construction (Ahn et al., 2022). ``G : R^D -> R^D`` is a Lipschitz network with ``Lip(G) <= L < 1``.
One block is

    F(x) = ((Id + G) / 2)^{-1}(x) - x,          F^{-1}(y) = ((Id - G) / 2)^{-1}(y) - y.

Both directions share one intermediate point ``w``: ``x = (w + G(w)) / 2`` and ``y = (w - G(w)) / 2``,
so ``y = w - x``, ``x = w - y`` and ``w = x + y``. Here ``_call`` (Pyro's direction: base noise to
data) is ``F`` and ``_inverse`` is ``F^{-1}``; both are fixed-point solves of contractions with
Lipschitz constant ``L``:

    forward:  w = 2x - G(w),      y = w - x;          inverse:  w = 2y + G(w),      x = w - y,

solved with :func:`pyro_flows.solvers.fixed_point` (``lipschitz=L``, so its stopping rule bounds the
2-norm distance to the true fixed point by the tolerance), and differentiated by
:func:`pyro_flows.solvers.implicit_fixed_point` (backward solves the adjoint fixed point
``u = grad - J_G^T u`` / ``u = grad + J_G^T u``; nothing is unrolled). The Jacobian is
``dy/dx = (I - J_G(w)) (I + J_G(w))^{-1}``, hence the exact log-det

    log|det dF/dx| = log|det(I - J_G(w))| - log|det(I + J_G(w))|   at   w = x + y,

both determinants positive because ``||J_G|| <= L < 1``. Given ``(x, y)``, ``w = x + y`` needs no solve,
and carries the implicit graph of whichever of ``x``/``y`` was computed.

Choices where the paper (slides) is vague or numerically loose, and why:

* **Guaranteed Lipschitz bound.** The reference code normalises with a power-iteration estimate, a
  *lower* bound of the spectral norm, which can leave ``Lip(G) > 1`` after training (then ``F`` is
  not invertible and the solves diverge). Every linear map here is a
  :class:`~pyro_flows.nn.LipschitzLinear` with ``coeff`` (the exact spectral norm via SVD in float64
  plus a margin), so ``Lip(G)`` is bounded for *any* weights. Plain net: each of the ``n`` linear
  layers has ``coeff = L^(1/n)`` and the activations are 1-Lipschitz, so ``Lip(G) <= L``. The bound
  passed to the solver is the product of the layers' actual bounds (smaller than ``L`` when the
  weights are small: faster convergence, still guaranteed).
* **i-DenseNet option** (``dense=True``): block ``i`` maps ``h -> [eta1 h, eta2 act(W_i h)]`` with learnable
  ``(eta1, eta2) = softplus(raw) / ||softplus(raw)||`` (unit norm) and ``Lip(W_i) <= 1``; a
  concatenation of an ``a``- and a ``b``-Lipschitz map is ``sqrt(a^2 + b^2)``-Lipschitz, so each block is
  ``sqrt(eta1^2 + eta2^2 Lip(W_i)^2) <= 1``-Lipschitz and the final layer (``coeff = L``) gives
  ``Lip(G) <= L``; the product of the per-block values is what the solver gets.
* **Activation:** CPila (:mod:`pyro_flows.nn.cpila`, ``R^h -> R^{2h}``, Lipschitz 0.9989 <= 1), or
  ``"lipswish"`` (or any registered :class:`~pyro_flows.nn.LipschitzActivation`).
* **Jacobian:** computed analytically in one forward pass by propagating a tangent matrix through the
  network (``J = W_n diag(s'_{n-1}) ... diag(s'_1) W_1``, with the stacked-diagonal structure of
  CPila), differentiable, so the exact log-det has exact gradients; for ``D <= 16`` this costs
  ``O(B h^2 D)``. ``tests/test_monotone.py`` checks it against autograd's Jacobian
  (:func:`pyro_flows.logdet.batch_jacobian`).
* **Log-det mode:** ``logdet="auto"`` is exact for ``input_dim <= 16`` and stochastic above;
  ``"stochastic"`` uses :func:`pyro_flows.logdet.monotone_logdet_stochastic` (Russian roulette +
  Hutchinson on the odd-power series ``-2 sum_{k odd} tr(J^k)/k``, Neumann-series gradient
  ``-2 (I - J^2)^{-1}``, geometric stopping with ``1 - p = L`` so the variance is finite). A stochastic
  log-det is unbiased but random: the inverse's log-det is then *not* exactly minus the forward's,
  and the conformance bar (exact) applies to the exact mode only.
* **Tolerances:** the solvers' defaults (1e-12 in float64, 1e-6 in float32), raised to a rounding
  floor ``8 eps sqrt(D) L / (1 - L)`` when that is larger (in float32 the a-posteriori bound
  ``L/(1-L) ||g(w) - w||`` can otherwise not get below rounding noise and the solve would report
  non-convergence). ``atol``/``rtol``/``max_iter`` can be set.
* **Conditional:** the context is concatenated to the input of the first linear layer only, whose
  bound is taken over the ``x``-columns (``LipschitzLinear(mask_columns=D)``): for a fixed context
  ``c``, ``w -> G(w, c)`` is the same composition with the first layer's ``x``-part bounded as before
  (the context columns only add a constant shift), so ``Lip_w(G(., c)) <= L`` for every ``c``. With
  ``dense=True`` the concatenations carry ``w``-features only (the context is not concatenated).
* **Solver:** start points ``w0 = 2x`` (forward) and ``w0 = 2y`` (inverse), the solutions for
  ``G = 0``. Anderson acceleration by default (``accelerate="anderson"``), at most 100 iterations:
  the shared solver's Anderson mixing is not globally safeguarded and in float32 we saw it wander
  off (residual growing to O(1)), so when it has not converged the solve continues with plain
  iterations from where it stopped (any start point converges for a contraction; the stopping rule
  is always checked on a plain step, so the reported accuracy is guaranteed either way). The
  adjoint (backward) solve is linear and uses plain iterations. ``last_solver_info`` holds the
  :class:`~pyro_flows.solvers.SolverInfo` of the latest solve (iterations, residual).
* **Initialisation:** the output layer's weight is scaled by 0.1, so ``G`` starts near 0 and the
  block near the identity (``F = Id`` when ``G = 0``).
* **Cache:** the transform cache (``cache_size=1``) is guarded by parameter version counters in
  ``FlowTransform``: it only ever short-cuts genuinely repeated calls with unchanged parameters.

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
import numbers

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from .. import logdet as _logdet
from ..nn import LipschitzLinear, get_activation
from ..nn import cpila as _cpila  # noqa: F401  (registers "cpila")
from ..registry import register_flow
from ..solvers import default_tolerance, fixed_point, implicit_fixed_point
from ..validation import broadcast_context, check_dim, check_finite
from ._base import ConditionalFlowModule, FlowTransform

__all__ = [
    "MonotoneNet",
    "ConditionedMonotone",
    "Monotone",
    "ConditionalMonotone",
    "monotone",
    "conditional_monotone",
]

LOGDET_MODES = ("auto", "exact", "stochastic")
EXACT_MAX_DIM = 16
ANDERSON_MAX_ITER = 100


def _check_lipschitz(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"lipschitz must be a number in (0, 1), got {value!r}")
    return float(value)


def _default_hidden(input_dim):
    return [max(64, 4 * input_dim)] * 2


class MonotoneNet(nn.Module):
    """The Lipschitz network ``G(w, context)`` of a Monotone Flow block, with analytic Jacobians.

    Arguments:
        input_dim: D.
        hidden_dims: widths of the hidden layers (growth sizes when ``dense=True``); at least one.
        context_dim: size of a context concatenated at the first layer (0: none).
        activation: ``"cpila"`` (default), ``"lipswish"``, or another registered Lipschitz activation.
        lipschitz: the bound ``L < 1`` of ``Lip(G)`` in ``w`` (for every context).
        dense: i-DenseNet learnable concatenation instead of a plain chain.

    Example:
        >>> import torch
        >>> net = MonotoneNet(3, [8])
        >>> g, J = net(torch.randn(5, 3), tangent=torch.eye(3))
        >>> g.shape, J.shape, bool(net.lipschitz_bound() <= 0.9 * (1 + 1e-5))
        (torch.Size([5, 3]), torch.Size([5, 3, 3]), True)
    """

    def __init__(self, input_dim, hidden_dims, context_dim=0, activation="cpila", lipschitz=0.9,
                 dense=False):
        super().__init__()
        self.input_dim = check_dim(input_dim, "input_dim")
        self.context_dim = check_dim(context_dim, "context_dim", minimum=0)
        hidden_dims = [check_dim(h, "hidden dim") for h in hidden_dims]
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer")
        self.lipschitz_target = _check_lipschitz(lipschitz)
        self.dense = bool(dense)
        n_lin = len(hidden_dims) + 1
        per_layer = self.lipschitz_target ** (1.0 / n_lin)
        self.linears = nn.ModuleList()
        self.activations = nn.ModuleList()
        width = self.input_dim
        for i, h in enumerate(hidden_dims):
            extra = self.context_dim if i == 0 else 0
            coeff = 1.0 if self.dense else per_layer
            self.linears.append(LipschitzLinear(width + extra, h, coeff=coeff, mask_columns=width))
            act = get_activation(activation, num_features=h)
            if getattr(act, "lipschitz", 2.0) > 1.0:
                raise ValueError(f"activation {activation!r} has Lipschitz bound {act.lipschitz} > 1")
            self.activations.append(act)
            out = getattr(act, "expansion", 1) * h
            width = width + out if self.dense else out
        self.linears.append(LipschitzLinear(width, self.input_dim, coeff=self.lipschitz_target if self.dense else per_layer))
        # a small output layer: G starts close to 0, so the flow starts close to the identity map
        # (F(x) = x for G = 0) and the first solves are cheap
        with torch.no_grad():
            self.linears[-1].weight.mul_(0.1)
        if self.dense:
            self.raw_eta = nn.Parameter(torch.zeros(len(hidden_dims), 2))

    def _eta(self):
        e = F.softplus(self.raw_eta)
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def lipschitz_bound(self) -> torch.Tensor:
        """A guaranteed bound of ``Lip_w(G)`` (0-d tensor), from the layers' current weights."""
        bound = self.linears[-1].lipschitz()
        eta = self._eta() if self.dense else None
        for i, (lin, act) in enumerate(zip(self.linears[:-1], self.activations)):
            c = lin.lipschitz() * act.lipschitz
            if self.dense:
                c = torch.sqrt(eta[i, 0] ** 2 + (eta[i, 1] * c) ** 2)
            bound = bound * c
        return bound.detach()

    def forward(self, w, context=None, tangent=None):
        """``(G(w, context), J_G(w) @ tangent)``; ``tangent`` ``(..., D, m)`` or ``None`` (then ``None``)."""
        if tangent is None:
            return self.value(w, context), None
        return self.apply_linearization(*self.linearize(w, context), tangent)

    def value(self, w, context=None):
        """``G(w, context)`` alone (no activation derivatives: the fixed-point iterations' path)."""
        h = w
        eta = self._eta() if self.dense else None
        for i, (lin, act) in enumerate(zip(self.linears[:-1], self.activations)):
            inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
            y = act(lin(inp))
            h = torch.cat([eta[i, 0] * h, eta[i, 1] * y], dim=-1) if self.dense else y
        return self.linears[-1](h)

    def linearize(self, w, context=None):
        """``G(w)`` and the per-layer factors of ``J_G(w)`` (reused by repeated Jacobian products)."""
        ops = []
        h = w
        eta = self._eta() if self.dense else None
        for i, (lin, act) in enumerate(zip(self.linears[:-1], self.activations)):
            W = lin.effective_weight()
            width = h.shape[-1]
            inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
            y, dy = act.forward_and_derivative(F.linear(inp, W, lin.bias))
            k = getattr(act, "expansion", 1)
            ops.append((W[:, :width], dy, k, None if eta is None else eta[i]))
            h = torch.cat([eta[i, 0] * h, eta[i, 1] * y], dim=-1) if self.dense else y
        W = self.linears[-1].effective_weight()
        ops.append((W, None, 1, None))
        return F.linear(h, W, self.linears[-1].bias), ops

    @staticmethod
    def apply_linearization(g, ops, tangent, transposed=False):
        """``(g, J_G @ tangent)`` from :meth:`linearize`'s factors.

        Tangents are propagated in the layout ``(..., m, features)`` so every layer is one
        ``F.linear`` over the batch; ``transposed=True`` takes and returns that layout directly
        (``(..., m, D)``) instead of ``(..., D, m)``.
        """
        if tangent is None:
            return g, None
        T = tangent if transposed else tangent.transpose(-1, -2)
        for Wx, dy, k, eta in ops[:-1]:
            Ta = F.linear(T, Wx)
            if k > 1:
                Ta = torch.cat([Ta] * k, dim=-1)
            Ty = dy.unsqueeze(-2) * Ta
            if eta is not None:
                T = torch.cat([eta[0] * T.expand(Ty.shape[:-1] + T.shape[-1:]), eta[1] * Ty], dim=-1)
            else:
                T = Ty
        T = F.linear(T, ops[-1][0])
        return g, (T if transposed else T.transpose(-1, -2))


class ConditionedMonotone(FlowTransform):
    """One Monotone Flow block ``F(x) = ((Id + G)/2)^{-1}(x) - x`` for a given network ``G`` (and context).

    Arguments:
        input_dim: D.
        net: a :class:`MonotoneNet` (or any module with the same ``forward``/``linearize``/
            ``lipschitz_bound`` interface and ``Lip_w(G) < 1``).
        context: the context tensor ``(..., C)`` (conditional use) or ``None``.
        logdet: ``"auto"`` (exact for ``input_dim <= 16``), ``"exact"`` or ``"stochastic"``.
        n_exact_terms, roulette_p: the stochastic estimator's always-computed terms and geometric
            stopping probability (``None``: ``1 - Lip(G)`` clipped to ``[0.02, 0.5]``).
        accelerate: ``"anderson"`` (default) or ``None`` for the fixed-point solves.
        atol, rtol, max_iter: solver tolerances (default: dtype-dependent, see the module docstring).
        cache_size: Pyro's transform cache (0 or 1).

    Example:
        >>> import torch
        >>> net = MonotoneNet(2, [8])
        >>> t = ConditionedMonotone(2, net)
        >>> x = torch.randn(4, 2)
        >>> bool((t.inv(t(x).clone()) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, input_dim, net, context=None, logdet="auto", n_exact_terms=2, roulette_p=None,
                 accelerate="anderson", atol=None, rtol=None, max_iter=1000, cache_size=1):
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
        self.atol, self.rtol = atol, rtol
        self.max_iter = check_dim(max_iter, "max_iter")
        self.net = net
        self.last_solver_info = None  # SolverInfo of the most recent solve (benchmarks, diagnostics)

    # -- helpers ------------------------------------------------------------------------------
    def _exact(self):
        return self.logdet_mode == "exact" or (self.logdet_mode == "auto" and self.input_dim <= EXACT_MAX_DIM)

    def _tolerances(self, dtype, L):
        tol = default_tolerance(dtype)
        c = max(1.0, L / (1.0 - L))
        floor = 8.0 * torch.finfo(dtype).eps * math.sqrt(self.input_dim) * c
        atol = max(tol, floor) if self.atol is None else self.atol
        rtol = max(tol, floor) if self.rtol is None else self.rtol
        return atol, rtol

    def _solve(self, rhs, sign, name):
        """Solve ``w = 2 rhs - sign * G(w)``; returns ``(w, rhs)`` broadcast against the context."""
        check_finite(rhs, f"{type(self).__name__} {name}")
        ctx = self._context
        if ctx is not None:
            rhs, ctx = broadcast_context(rhs, ctx)
        L = self.net.lipschitz_bound()
        L_float = float(L)
        if not L_float < 1:
            raise ValueError(f"Lip(G) bound {L_float} is not < 1: the block is not invertible")
        atol, rtol = self._tolerances(rhs.dtype, L_float)
        kwargs = dict(lipschitz=L_float, atol=atol, rtol=rtol)

        def g(w):
            return 2 * rhs - sign * self.net(w, ctx)[0]

        w0 = 2 * rhs.detach()
        iterations = 0
        if self.accelerate == "anderson":
            # Anderson mixing is not globally safeguarded (in float32 it can wander off); any point is
            # a valid start for a contraction, so finish with plain iterations when it falls short
            w0, info = fixed_point(g, w0, return_info=True, accelerate="anderson", on_fail="ignore",
                                   max_iter=min(self.max_iter, ANDERSON_MAX_ITER), **kwargs)
            iterations = info.iterations
            if not info.converged and not bool(torch.isfinite(w0).all()):
                w0 = 2 * rhs.detach()
        if self.accelerate is None or not info.converged:
            w0, info = fixed_point(g, w0, return_info=True, max_iter=self.max_iter, **kwargs)
            info.iterations += iterations
        self.last_solver_info = info
        # the adjoint solve (backward) is linear; plain iterations, always convergent for Lip < 1
        return implicit_fixed_point(g, w0, max_iter=self.max_iter, **kwargs), rhs


    # -- Transform API --------------------------------------------------------------------------
    def _call(self, x):
        w, x = self._solve(x, 1.0, "input")
        return w - x

    def _inverse(self, y):
        w, y = self._solve(y, -1.0, "inverse input")
        return w - y

    def _log_abs_det_jacobian(self, x, y):
        x, y = torch.broadcast_tensors(x, y)
        ctx = self._context
        if ctx is not None:
            x, ctx = broadcast_context(x, ctx)
            y = y.expand_as(x)
        w = x + y
        if self._exact():
            D = self.input_dim
            eye = torch.eye(D, dtype=w.dtype, device=w.device)
            _, J = self.net(w, ctx, tangent=eye)
            return _logdet.monotone_logdet_exact(J)
        return self.stochastic_logdet(w, ctx)

    def stochastic_logdet(self, w, ctx=None, **kwargs):
        """Unbiased Russian-roulette/Hutchinson estimate of the log-det at the solved point ``w``."""
        with torch.no_grad():
            g0, ops0 = self.net.linearize(w.detach(), ctx)
            L = float(self.net.lipschitz_bound())

        def matvec(u):
            return self.net.apply_linearization(g0, ops0, u.unsqueeze(-2), transposed=True)[1].squeeze(-2)

        def grad_matvec(u):
            g, ops = self.net.linearize(w, ctx)
            return self.net.apply_linearization(g, ops, u.unsqueeze(-2), transposed=True)[1].squeeze(-2)

        p = self.roulette_p if self.roulette_p is not None else _logdet.default_roulette_p(L)
        kwargs.setdefault("n_exact", self.n_exact_terms)
        kwargs.setdefault("p", p)
        return _logdet.monotone_logdet_stochastic(matvec, grad_matvec, w, **kwargs)


def _options(kw):
    return {k: kw.pop(k) for k in list(kw) if k in (
        "logdet", "n_exact_terms", "roulette_p", "accelerate", "atol", "rtol", "max_iter")}


class Monotone(ConditionedMonotone, TransformModule):
    """A Monotone Flow block with learnable ``G`` (a :class:`MonotoneNet`).

    Arguments:
        input_dim: D.
        hidden_dims: hidden widths of ``G`` (default ``[max(64, 4 D)] * 2``).
        activation: ``"cpila"`` (default) or ``"lipswish"``.
        lipschitz: bound ``L < 1`` of ``Lip(G)`` (default 0.9); larger ``L`` is more expressive
            (``(1-L)/(1+L) <= dF/dx <= (1+L)/(1-L)``) but the solves take more iterations.
        dense: i-DenseNet learnable concatenation (default ``False``).
        logdet, n_exact_terms, roulette_p, accelerate, atol, rtol, max_iter, cache_size:
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


class ConditionalMonotone(ConditionalFlowModule):
    """A conditional Monotone Flow block: the context enters ``G`` at its first layer.

    ``condition(context)`` returns a :class:`ConditionedMonotone`; ``Lip_w(G(., context)) <= L`` for
    every context (the first layer's bound is taken over the ``w``-columns only).

    Arguments:
        input_dim, context_dim: D and C.
        hidden_dims, activation, lipschitz, dense: as :class:`Monotone`.
        logdet, n_exact_terms, roulette_p, accelerate, atol, rtol, max_iter, cache_size:
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
