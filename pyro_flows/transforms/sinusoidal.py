"""Sinusoidal Flow: LDU blocks of triangular shifts around elementwise sinusoidal "D-scales".

One layer (an *LDU block*) is the paper's map from data ``x`` to noise ``z`` (its ``T_l^{-1}``)::

    u = x + s_U(x)            s_U(x)_i depends on x_{>i} only (strictly upper-triangular Jacobian)
    u <- tau_1(u), ..., tau_S(u)   S = num_scales elementwise sinusoidal transformers ("D-scales")
    z = u + s_L(u)            s_L(u)_i depends on u_{<i} only (strictly lower-triangular Jacobian)

Each D-scale acts on every coordinate with its own K sinusoids (``K = num_sinusoids``)::

    tau(u) = u - alpha * sum_k w_k [sin(2 a_k u + 2 b_k) - sin(2 b_k)] / (2 a_k) + d
    tau'(u) = 1 - alpha * sum_k w_k cos(2 a_k u + 2 b_k)

with convex weights ``w = softmax(.)``, positive frequencies ``a = softplus(.)``, phases ``b``, a shift
``d`` and the residual weight ``alpha = (1 - eps) tanh(.)``, so ``eps <= tau' <= 2 - eps`` for *every*
raw parameter value: each D-scale is strictly increasing and ``u -> u - tau(u)`` is a contraction with
Lipschitz constant ``|alpha| <= 1 - eps`` (Banach). The log-det of a block is
``sum_i sum_s log1p(-alpha * sum_k w_k cos(2 a_k u + 2 b_k))``: the shifts have unit-triangular Jacobians.

Choices made where the paper is vague or numerically loose (all documented here, tested in
``tests/test_sinusoidal.py``):

* **Stable D-scale.** The paper's ``(sin 2b - sin 2(au+b)) / (2a)`` cancels catastrophically for small
  ``a u`` (and divides 0 by 0 as ``a -> 0``). We use the exact product-to-sum identity
  ``[sin(2au + 2b) - sin 2b] / (2a) = sin(a u) cos(a u + 2b) / a``, whose factor
  ``sin(a u) / a = u sinc(a u)`` has no subtraction and is accurate to a few ulps for every ``a``; the
  derivative of the form is exactly ``cos(2au + 2b)``. Frequencies are floored at ``sqrt(tiny)`` of the
  dtype (so ``a u`` never becomes denormal and ``softplus`` underflow to ``a = 0`` is harmless): the
  D-scale is then its ``a -> 0`` limit ``u cos(2b)`` to relative ``a u``, still with slope ``>= eps``.
  (``torch.sinc`` computes the same factor but is several times slower than ``sin`` on CPU.) The
  paper's additive constant ``sum_k w_k sin(2b_k)/(2a_k)`` is part of this form (so ``tau(0) = d``).
* **Log-det** is ``log1p`` of the exact derivative ``- alpha sum_k w_k cos(.)``, evaluated at the point
  the map was actually applied to (also after a numerical solve), so it is the log-det of the computed map.
* **D-scale parameters are free per-dimension parameters** in :class:`Sinusoidal` (the paper's
  "independent conditioner"). In :class:`ConditionalSinusoidal` they are free parameters *plus* the
  output of a dense network of the context (last layer zero at initialisation); they enter the same
  constraining functions, so every D-scale is contractive for every context. The context also drives
  both shift conditioners (Pyro's ``ConditionalAutoRegressiveNN``).
* **Conditioners.** Pyro's MADE ``AutoRegressiveNN`` with ``param_dims=[1]``: identity permutation for
  ``s_L`` (output ``i`` sees ``u_{<i}``) and the reversed permutation for ``s_U`` (output ``i`` sees
  ``x_{>i}``). Their last layers start at zero and ``alpha`` starts at zero, so a block is the identity
  at initialisation (ReZero-style, as the paper suggests). For ``input_dim == 1`` (or ``shift=False``,
  the paper's "pure D-scale" flow) there are no shift networks: a strictly triangular shift in one
  dimension is a constant, which the D-scale's ``d`` already provides.
* **Direction.** Pyro's ``_call`` maps noise to data. By default (``single_pass="log_prob"``) the
  paper's orientation is kept: ``_inverse`` (data -> noise, i.e. ``log_prob`` of data) is the analytic
  LDU block and ``_call`` (sampling, ``rsample``) is the numerical inverse. ``single_pass="sample"``
  swaps them (IAF-like: cheap ``rsample`` for SVI guides, numerical ``log_prob`` of external data).
* **Exact inversion.** The triangular shift ``z = u + s_L(u)`` is inverted by the fixed point
  ``u <- z - s_L(u)`` started at ``z``. Because the Jacobian of ``s_L`` is strictly triangular
  (nilpotent), the ``k``-th iterate is exact in its first ``k`` coordinates, so the iteration is capped
  at ``D`` iterations, where it is exact whatever the network's Lipschitz constant (the paper's "Algorithm
  1" has no guarantee for the shifts). By default (``shift_tol=0``) it stops earlier only on an exactly
  repeated iterate, which is then an exact fixed point; ``shift_tol=None`` stops once the step is below
  :func:`~pyro_flows.solvers.default_tolerance` of the dtype, which is faster but leaves an error of
  about ``||(I + J_s)^{-1}|| * step`` that no a-priori bound controls, so it is opt-in. Each D-scale is inverted by Banach iteration (:func:`~pyro_flows.solvers.fixed_point`
  with the elementwise ``lipschitz=|alpha|``, so the stopping rule bounds the true error) for at most
  ``max_iter`` iterations. It is skipped when ``max|alpha|`` predicts more than ``max_iter`` steps or a
  stopping rule that rounding cannot meet (``|alpha|/(1-|alpha|) > tol / (4 eps_dtype)``, i.e.
  ``|alpha| > 0.68`` in float32); then, or if it does not reach the tolerance, the solve finishes with
  the bracketed Newton solver :func:`~pyro_flows.solvers.monotone_root` on the bracket
  ``(y - d) / (1 -+ |alpha|)`` (each D-scale is increasing with slope in ``[1 - |alpha|, 1 + |alpha|]``),
  which warns or raises if *it* stops short: a result is never silently
  unconverged. Iteration counts of the last numerical solve are in ``last_inverse_info``.
* **Gradients through the numerical direction** use implicit differentiation:
  :func:`~pyro_flows.solvers.implicit_monotone_root` for the D-scales and
  :func:`~pyro_flows.solvers.implicit_fixed_point` for the shifts (its adjoint iteration is nilpotent too,
  capped at ``D + 1``).
* **Initial frequencies** ``a_k`` are geometric, ``2^{k - K/2}`` (``0.25, 0.5, 1, 2`` for ``K = 4``), phases
  uniform in ``(-pi/2, pi/2)``, weights uniform: the paper does not say; this spreads the "staircase"
  periods over an order of magnitude.
* ``flow()`` puts no permutation between blocks: each LDU block already has a dense Jacobian.

References:
    Y. Wei. Sinusoidal Flow: A Fast Invertible Autoregressive Flow. ACML 2021 (arXiv:2110.13344).
    J. Behrmann et al. Invertible Residual Networks. ICML 2019 (Banach fixed-point inversion).
    M. Germain et al. MADE: Masked Autoencoder for Distribution Estimation. ICML 2015.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from pyro.nn import AutoRegressiveNN, ConditionalAutoRegressiveNN, DenseNN

from ..registry import register_flow
from ..solvers import (
    default_tolerance,
    fixed_point,
    implicit_fixed_point,
    implicit_monotone_root,
    monotone_root,
)
from ..validation import broadcast_context, check_dim, check_finite, check_single_pass
from ._base import ConditionalFlowModule, FlowTransform

__all__ = [
    "dscale",
    "dscale_log_derivative",
    "ConditionedSinusoidal",
    "Sinusoidal",
    "ConditionalSinusoidal",
    "sinusoidal",
    "conditional_sinusoidal",
]


# ------------------------------------------------------------------------------------------------
# the elementwise D-scale
# ------------------------------------------------------------------------------------------------
def _angles(u, alpha, a, b, w):
    """Shared terms: ``u[..., None]``, ``theta = a u``, ``phi = a u + 2 b``, ``alpha w`` and ``alpha w / a``.

    Frequencies are floored at ``sqrt(tiny)`` of the dtype (``1.1e-19`` in float32, ``1.5e-154`` in
    float64), so ``a u`` stays a normal number and ``sin(a u) / a`` never divides by zero; every
    function below uses the same floored ``a``, so the map and its derivative stay consistent. Below
    the floor the D-scale equals its ``a -> 0`` limit ``u cos(2b)`` to relative ``a u``.
    """
    a = a.clamp_min(torch.finfo(a.dtype).tiny ** 0.5)
    uk = u.unsqueeze(-1)
    theta = a * uk
    aw = alpha.unsqueeze(-1) * w
    return uk, theta, theta + 2 * b, aw, aw / a


def dscale(u, alpha, a, b, w, d):
    """The sinusoidal transformer ``tau(u)`` in the cancellation-free product form.

    ``tau(u) = u - alpha * sum_k w_k * sin(a_k u) * cos(a_k u + 2 b_k) / a_k + d``, which equals the
    paper's ``u - alpha * sum_k w_k [sin(2 a_k u + 2 b_k) - sin(2 b_k)] / (2 a_k) + d`` (product-to-sum
    identity) without its subtraction: ``sin(a u) / a = u sinc(a u)`` is accurate to a few ulps for
    every ``a`` (see :func:`_angles` for the floor on ``a``).

    Arguments:
        u: ``(..., D)``.
        alpha, d: broadcastable to ``(..., D)``.
        a, b, w: broadcastable to ``(..., D, K)`` (``a >= 0``, ``w`` convex weights).
    """
    _, theta, phi, _, awa = _angles(u, alpha, a, b, w)
    return u - (awa * torch.sin(theta) * torch.cos(phi)).sum(-1) + d


def dscale_log_derivative(u, alpha, a, b, w):
    """``log tau'(u) = log1p(-alpha * sum_k w_k cos(2 a_k u + 2 b_k))``, elementwise, shape of ``u``."""
    _, theta, phi, aw, _ = _angles(u, alpha, a, b, w)
    return torch.log1p(-(aw * torch.cos(theta + phi)).sum(-1))


def _dscale_with_log_derivative(u, alpha, a, b, w, d):
    """``(tau(u), log tau'(u))`` sharing the intermediate terms (the training hot path); the same
    operations as :func:`dscale` and :func:`dscale_log_derivative`, so the same rounding."""
    _, theta, phi, aw, awa = _angles(u, alpha, a, b, w)
    r = (awa * torch.sin(theta) * torch.cos(phi)).sum(-1)
    c = (aw * torch.cos(theta + phi)).sum(-1)
    return u - r + d, torch.log1p(-c)


def _dscale_and_derivative(u, alpha, a, b, w, d):
    """``(tau(u), tau'(u))`` for the Newton solver."""
    _, theta, phi, aw, awa = _angles(u, alpha, a, b, w)
    r = (awa * torch.sin(theta) * torch.cos(phi)).sum(-1)
    return u - r + d, 1 - (aw * torch.cos(theta + phi)).sum(-1)


def _constrain(raw, eps):
    """Raw D-scale parameters ``(..., S, D, 3K + 2)`` -> per-scale ``(alpha, a, b, w, d)`` tuples."""
    K = (raw.shape[-1] - 2) // 3
    alpha = (1 - eps) * torch.tanh(raw[..., 0])
    a = F.softplus(raw[..., 1:1 + K])
    b = raw[..., 1 + K:1 + 2 * K]
    w = torch.softmax(raw[..., 1 + 2 * K:1 + 3 * K], dim=-1)
    d = raw[..., -1]
    S = raw.shape[-3]
    return [(alpha[..., s, :], a[..., s, :, :], b[..., s, :, :], w[..., s, :, :], d[..., s, :])
            for s in range(S)]


def _init_raw(num_scales, input_dim, K):
    """Identity D-scales (alpha = 0) with geometric frequencies, random phases, uniform weights."""
    raw = torch.zeros(num_scales, input_dim, 3 * K + 2)
    freqs = 2.0 ** (torch.arange(K, dtype=torch.float64) - K / 2)
    raw[..., 1:1 + K] = torch.log(torch.expm1(freqs)).float()  # softplus^{-1}
    raw[..., 1 + K:1 + 2 * K] = (torch.rand(num_scales, input_dim, K) - 0.5) * math.pi
    return raw


def _check_args(input_dim, hidden_dims, num_scales, num_sinusoids, eps, single_pass, max_iter,
                shift_tol):
    input_dim = check_dim(input_dim, "input_dim")
    check_dim(num_scales, "num_scales")
    check_dim(num_sinusoids, "num_sinusoids")
    check_dim(max_iter, "max_iter")
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    check_single_pass(single_pass)
    if shift_tol is not None and not (isinstance(shift_tol, (int, float)) and shift_tol >= 0):
        raise ValueError(f"shift_tol must be None or a number >= 0, got {shift_tol!r}")
    if hidden_dims is None:
        hidden_dims = [10 * input_dim, 10 * input_dim]
    hidden_dims = [check_dim(h, "hidden_dims entry") for h in hidden_dims]
    if not hidden_dims:
        raise ValueError("hidden_dims must be a non-empty list of layer widths")
    if input_dim > 1 and min(hidden_dims) < input_dim:
        raise ValueError(
            f"hidden_dims must all be >= input_dim ({input_dim}) for a MADE conditioner, got {hidden_dims}"
        )
    return hidden_dims


def _zero_last_layer(net):
    with torch.no_grad():
        last = net.layers[-1]
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


# ------------------------------------------------------------------------------------------------
# the transform
# ------------------------------------------------------------------------------------------------
class ConditionedSinusoidal(FlowTransform):
    """One Sinusoidal-Flow LDU block with parameters taken from callables (the maths lives here).

    Arguments:
        input_dim: the event size ``D``.
        upper: ``(x, context) -> s_U(x)`` (strictly upper-triangular dependence) or ``None``.
        lower: ``(u, context) -> s_L(u)`` (strictly lower-triangular dependence) or ``None``.
        scales: ``context -> [(alpha, a, b, w, d), ...]``, one constrained tuple per D-scale, called
            with the context as given (not broadcast), so its outputs (``(..., D)`` and
            ``(..., D, K)``) broadcast against the input batch.
        context: the context the callables were bound to (``None`` for an unconditional block).
        single_pass: ``"log_prob"`` (the paper's: ``log_prob`` analytic, sampling numerical) or
            ``"sample"`` (sampling analytic, ``log_prob`` numerical).
        max_iter: Banach iterations per D-scale before finishing with bracketed Newton.
        shift_tol: early-stopping tolerance of the shift inversions. ``0`` (default): stop only on an
            exactly repeated iterate or after the ``D`` passes that make the result exact; ``None``:
            stop once the step is below the dtype's default tolerance (faster, but the error left,
            about ``||(I + J_s)^{-1}|| * step``, has no a-priori bound).
        on_fail: what the final Newton solve does if it stops short (``"warn"`` or ``"raise"``).
        cache_size: Pyro's transform cache size.

    Attributes:
        last_inverse_info: iteration counts of the last numerical solve (the inverse of the LDU map):
            ``{"lower_shift": int, "dscale_fixed_point": [int per scale], "dscale_newton": [...],
            "upper_shift": int}``.

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.sinusoidal import ConditionedSinusoidal
        >>> p = [(torch.full((2,), 0.5), torch.ones(2, 3), torch.zeros(2, 3), torch.full((2, 3), 1 / 3),
        ...       torch.zeros(2))]
        >>> t = ConditionedSinusoidal(2, None, None, lambda ctx: p)
        >>> x = torch.randn(4, 2)
        >>> bool((t.inv(t(x)) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, input_dim, upper, lower, scales, context=None, *, single_pass="log_prob",
                 max_iter=100, shift_tol=0.0, on_fail="warn", cache_size=1):
        super().__init__(input_dim, cache_size=cache_size, context=context)
        if on_fail not in ("warn", "raise"):
            raise ValueError(f"on_fail must be 'warn' or 'raise', got {on_fail!r}")
        self._upper_fn = upper
        self._lower_fn = lower
        self._scales_fn = scales
        self.single_pass = check_single_pass(single_pass)
        self.max_iter = check_dim(max_iter, "max_iter")
        self.shift_tol = shift_tol
        self.on_fail = on_fail
        self.last_inverse_info = None

    # -- the analytic LDU map (data -> noise) ---------------------------------------------------
    def _prepare(self, x):
        ctx = self._context
        if ctx is not None:
            x, ctx = broadcast_context(x, ctx)
        return x, ctx

    def _ldu(self, x, output=True):
        """``(z, log|det dz/dx|)`` of the LDU block at data ``x`` (``z`` is None if not ``output``)."""
        x, ctx = self._prepare(x)
        u = x if self._upper_fn is None else x + self._upper_fn(x, ctx)
        lad = 0.0
        for params in self._scales_fn(self._context):
            u, log_slope = _dscale_with_log_derivative(u, *params)
            lad = lad + log_slope.sum(-1)
        if not output:
            return None, lad
        z = u if self._lower_fn is None else u + self._lower_fn(u, ctx)
        return z, lad

    # -- its numerical inverse (noise -> data) --------------------------------------------------
    def _shift_tol(self, dtype):
        return default_tolerance(dtype) if self.shift_tol is None else float(self.shift_tol)

    def _invert_shift(self, fn, y, ctx):
        """Solve ``x + fn(x) = y`` for a strictly triangular ``fn``: exact after ``D`` iterations."""
        D = self.input_dim
        tol = self._shift_tol(y.dtype)
        yd = y.detach()
        cd = None if ctx is None else ctx.detach()
        with torch.no_grad():
            x, info = fixed_point(lambda v: yd - fn(v, cd), yd, atol=tol, rtol=tol, max_iter=D,
                                  on_fail="ignore", return_info=True)
        # one more (differentiable) pass inside implicit_fixed_point; its adjoint is nilpotent too
        x = implicit_fixed_point(lambda v: y - fn(v, ctx), x, max_iter=D + 1, on_fail="ignore")
        return x, info.iterations

    def _invert_dscale(self, y, params):
        """Solve ``tau(u) = y`` elementwise: Banach iteration, finished by bracketed Newton if needed."""
        alpha, a, b, w, d = params
        pd = [p.detach() for p in params]
        yd = y.detach()
        L = pd[0].abs().expand_as(yd)
        with torch.no_grad():
            u, iterations, converged, newton = yd - pd[4], 0, False, 0
            # Banach iteration needs about log(tol (1 - L) / (L s0)) / log(L) steps (s0: the first
            # step), and its stopping rule L / (1 - L) * step <= tol cannot trigger once rounding
            # (eps |x|) dominates the step; skip it in either case (|alpha| near 1) and let bracketed
            # Newton do the work
            L_max = float(L.max()) if L.numel() else 0.0
            tol = default_tolerance(yd.dtype)
            s0 = float((dscale(u, *pd) - yd).abs().max()) if u.numel() else 0.0
            banach = L_max == 0 or s0 <= tol or (
                L_max / (1 - L_max) <= tol / (4 * torch.finfo(yd.dtype).eps)
                and math.log(tol * (1 - L_max) / (L_max * s0)) / math.log(L_max) <= self.max_iter)
            if banach:
                u, info = fixed_point(lambda v: yd - (dscale(v, *pd) - v), u, event_dims=0, lipschitz=L,
                                      max_iter=self.max_iter, on_fail="ignore", return_info=True)
                iterations, converged = info.iterations, info.converged
            if not converged:
                # tau' in [1 - |alpha|, 1 + |alpha|] and tau(0) = d bracket the root
                t = yd - pd[4]
                r1, r2 = t / (1 - L), t / (1 + L)
                lo, hi = torch.minimum(r1, r2), torch.maximum(r1, r2)
                pad = 1e-3 * (1 + hi.abs() + lo.abs())
                u, ninfo = monotone_root(lambda v: _dscale_and_derivative(v, *pd), yd, init=u,
                                         lower=lo - pad, upper=hi + pad, max_iter=200,
                                         on_fail=self.on_fail, return_info=True)
                newton = ninfo.iterations
        u = implicit_monotone_root(lambda v: _dscale_and_derivative(v, alpha, a, b, w, d), u, y)
        return u, iterations, newton

    def _ldu_inverse(self, z):
        """``(x, log|det dz/dx| at x)``: the data ``x`` whose LDU image is ``z``."""
        check_finite(z, f"{type(self).__name__} input of the numerical inverse")
        z, ctx = self._prepare(z)
        info = {"lower_shift": 0, "dscale_fixed_point": [], "dscale_newton": [], "upper_shift": 0}
        u = z
        if self._lower_fn is not None:
            u, info["lower_shift"] = self._invert_shift(self._lower_fn, z, ctx)
        lad = 0.0
        for params in reversed(self._scales_fn(self._context)):
            u, its, newton = self._invert_dscale(u, params)
            info["dscale_fixed_point"].insert(0, its)
            info["dscale_newton"].insert(0, newton)
            lad = lad + dscale_log_derivative(u, *params[:4]).sum(-1)
        x = u
        if self._upper_fn is not None:
            x, info["upper_shift"] = self._invert_shift(self._upper_fn, u, ctx)
        self.last_inverse_info = info
        return x, lad

    # -- the protocol -----------------------------------------------------------------------------
    # ``lad`` below is always the log-det of the data -> noise LDU map at its data-side point, so the
    # forward log-det is ``-lad`` when ``_call`` is the numerical (noise -> data) direction.
    def _call_and_ladj(self, x):
        if self.single_pass == "log_prob":
            y, lad = self._ldu_inverse(x)
            return y, -lad
        return self._ldu(x)

    def _inverse_and_ladj(self, y):
        if self.single_pass == "log_prob":
            x, lad = self._ldu(y)
            return x, -lad
        return self._ldu_inverse(y)

    def _log_abs_det_jacobian(self, x, y):
        # the analytic direction without its last shift (the log-det does not depend on it)
        if self.single_pass == "log_prob":
            return -self._ldu(y, output=False)[1]
        return self._ldu(x, output=False)[1]

    def __getstate__(self):
        state = super().__getstate__()
        state["last_inverse_info"] = None
        return state


class Sinusoidal(ConditionedSinusoidal, TransformModule):
    """One LDU block of Sinusoidal Flow with its own parameters (a ``TransformModule``).

    Arguments:
        input_dim: the event size ``D``.
        hidden_dims: hidden widths of the two MADE shift conditioners (each ``>= input_dim``);
            ``None`` means ``[10 D, 10 D]``.
        num_scales: D-scales per block (paper: 4).
        num_sinusoids: sinusoids ``K`` per D-scale (paper: 4).
        shift: ``False`` gives a block of pure D-scales (no shift conditioners).
        eps: the residual weight is ``(1 - eps) tanh(.)``, so every D-scale has slope in
            ``[eps, 2 - eps]``.
        single_pass, max_iter, shift_tol, on_fail, cache_size: see :class:`ConditionedSinusoidal`.
        nonlinearity: activation of the conditioners (default ``torch.nn.ReLU()``, as MADE).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_flows.transforms.sinusoidal import Sinusoidal
        >>> t = Sinusoidal(3, hidden_dims=[16])
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [t])
        >>> d.log_prob(torch.randn(8, 3)).shape
        torch.Size([8])
        >>> d.sample((5,)).shape
        torch.Size([5, 3])
    """

    def __init__(self, input_dim, hidden_dims=None, num_scales=4, num_sinusoids=4, shift=True, eps=1e-3,
                 single_pass="log_prob", max_iter=100, shift_tol=0.0, on_fail="warn",
                 nonlinearity=None, cache_size=1):
        hidden_dims = _check_args(input_dim, hidden_dims, num_scales, num_sinusoids, eps, single_pass,
                                  max_iter, shift_tol)
        super().__init__(input_dim, None, None, self._scales, single_pass=single_pass,
                         max_iter=max_iter, shift_tol=shift_tol, on_fail=on_fail, cache_size=cache_size)
        self.eps = float(eps)
        self.num_scales, self.num_sinusoids = int(num_scales), int(num_sinusoids)
        self.raw_scales = torch.nn.Parameter(_init_raw(num_scales, input_dim, num_sinusoids))
        if shift and input_dim > 1:
            act = torch.nn.ReLU() if nonlinearity is None else nonlinearity
            rev = torch.arange(input_dim - 1, -1, -1)
            self.upper_nn = AutoRegressiveNN(input_dim, hidden_dims, param_dims=[1], permutation=rev,
                                             nonlinearity=act)
            self.lower_nn = AutoRegressiveNN(input_dim, hidden_dims, param_dims=[1],
                                             permutation=torch.arange(input_dim), nonlinearity=act)
            _zero_last_layer(self.upper_nn)
            _zero_last_layer(self.lower_nn)
            self._upper_fn = self._upper
            self._lower_fn = self._lower

    def _upper(self, x, ctx):
        return self.upper_nn(x)

    def _lower(self, u, ctx):
        return self.lower_nn(u)

    def _scales(self, ctx):
        return _constrain(self.raw_scales, self.eps)


class ConditionalSinusoidal(ConditionalFlowModule):
    """A conditional LDU block: the context drives both shift conditioners and the D-scales.

    The D-scale raw parameters are free parameters plus ``DenseNN(context)`` (last layer zero at
    initialisation), passed through the same constraints as in :class:`Sinusoidal`, so each D-scale is
    contractive (slope in ``[eps, 2 - eps]``) for every context.

    Arguments:
        input_dim: the event size ``D``.
        context_dim: the context size ``C``.
        hidden_dims: hidden widths of the shift conditioners and of the D-scale network
            (``None``: ``[10 D, 10 D]``).
        num_scales, num_sinusoids, shift, eps, single_pass, max_iter, shift_tol, on_fail,
            nonlinearity, cache_size: as in :class:`Sinusoidal`.

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.sinusoidal import ConditionalSinusoidal
        >>> m = ConditionalSinusoidal(3, 2, hidden_dims=[16])
        >>> t = m.condition(torch.randn(5, 2))
        >>> y = t(torch.randn(5, 3))
        >>> t.log_abs_det_jacobian(torch.randn(5, 3), y).shape
        torch.Size([5])
    """

    def __init__(self, input_dim, context_dim, hidden_dims=None, num_scales=4, num_sinusoids=4, shift=True,
                 eps=1e-3, single_pass="log_prob", max_iter=100, shift_tol=0.0, on_fail="warn",
                 nonlinearity=None, cache_size=1):
        hidden_dims = _check_args(input_dim, hidden_dims, num_scales, num_sinusoids, eps, single_pass,
                                  max_iter, shift_tol)
        super().__init__(input_dim, context_dim)
        if on_fail not in ("warn", "raise"):
            raise ValueError(f"on_fail must be 'warn' or 'raise', got {on_fail!r}")
        self.eps = float(eps)
        self.num_scales, self.num_sinusoids = int(num_scales), int(num_sinusoids)
        self.options = dict(single_pass=single_pass, max_iter=max_iter, shift_tol=shift_tol,
                            on_fail=on_fail, cache_size=cache_size)
        act = torch.nn.ReLU() if nonlinearity is None else nonlinearity
        self.raw_scales = torch.nn.Parameter(_init_raw(num_scales, input_dim, num_sinusoids))
        self.scale_nn = DenseNN(context_dim, hidden_dims, param_dims=[self.raw_scales.numel()],
                                nonlinearity=act)
        _zero_last_layer(self.scale_nn)
        self.shift = bool(shift) and input_dim > 1
        if self.shift:
            rev = torch.arange(input_dim - 1, -1, -1)
            self.upper_nn = ConditionalAutoRegressiveNN(input_dim, context_dim, hidden_dims, param_dims=[1],
                                                        permutation=rev, nonlinearity=act)
            self.lower_nn = ConditionalAutoRegressiveNN(input_dim, context_dim, hidden_dims, param_dims=[1],
                                                        permutation=torch.arange(input_dim),
                                                        nonlinearity=act)
            _zero_last_layer(self.upper_nn)
            _zero_last_layer(self.lower_nn)

    def _upper(self, x, ctx):
        return self.upper_nn(x, ctx)

    def _lower(self, u, ctx):
        return self.lower_nn(u, ctx)

    def _scales(self, ctx):
        raw = self.scale_nn(ctx).reshape(ctx.shape[:-1] + self.raw_scales.shape) + self.raw_scales
        return _constrain(raw, self.eps)

    def _condition(self, context):
        upper, lower = (self._upper, self._lower) if self.shift else (None, None)
        return ConditionedSinusoidal(self.input_dim, upper, lower, self._scales, context=context,
                                     **self.options)


def sinusoidal(input_dim, hidden_dims=None, **kwargs):
    """One Sinusoidal-Flow LDU block (:class:`Sinusoidal`); ``hidden_dims=None`` means ``[10 D, 10 D]``.

    Example:
        >>> import torch, pyro_flows
        >>> t = pyro_flows.sinusoidal(2)
        >>> x = torch.randn(3, 2)
        >>> t.inv(t(x)).shape
        torch.Size([3, 2])
    """
    return Sinusoidal(input_dim, hidden_dims=hidden_dims, **kwargs)


def conditional_sinusoidal(input_dim, context_dim, hidden_dims=None, **kwargs):
    """A conditional Sinusoidal-Flow LDU block (:class:`ConditionalSinusoidal`).

    Example:
        >>> import torch, pyro_flows
        >>> m = pyro_flows.conditional_sinusoidal(2, 3)
        >>> m.condition(torch.randn(3)).inv(torch.randn(4, 2)).shape
        torch.Size([4, 2])
    """
    return ConditionalSinusoidal(input_dim, context_dim, hidden_dims=hidden_dims, **kwargs)


register_flow(
    "sinusoidal",
    sinusoidal,
    conditional_sinusoidal,
    permutation=None,
    test_kwargs={"hidden_dims": [8], "num_scales": 2, "num_sinusoids": 2},
    has_single_pass=True,
)
