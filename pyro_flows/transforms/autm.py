r"""AUTM flows: autoregressive and coupling layers built on the Atomic Unrestricted Time Machine.

AUTM (Cai et al., 2022) defines a scalar increasing map through a latent trajectory,
:math:`q(x) = v(1)`, :math:`v' = g(v; \theta)`, :math:`v(0) = x`, with unrestricted parameters
:math:`\theta` from a conditioner (a masked network for the autoregressive layer, a dense network on the
other half for the coupling layer). The integrands are :math:`g = a v + b + c\,n(v)` with
:math:`n = v^2` ("quadratic"), :math:`v^3` ("cubic", the default) or :math:`\sigma(v)` ("sigmoid"),
plus "linear" (:math:`c = 0`). Long derivations and measurements: ``docs/autm.md``.

**The map is the discrete map we compute.** (DESIGN.md, "AUTM": the continuous map is not a bijection of
:math:`\mathbb{R}` for polynomial :math:`g`, and a quadrature of the log-derivative is not the log-det of
the computed map.) With :math:`K` = ``num_steps``, :math:`h = 1/K`, a symmetric (Strang) splitting
composes the exact flows of the scaling, :math:`S(v) = e^{\alpha h/2}v`, and of the shift,
:math:`T_\tau(v) = v + \beta\tau`, with :math:`K` Heun steps
:math:`N(v) = v + \tfrac{p}{2}(\tilde n(v) + \tilde n(v + p\tilde n(v)))`, :math:`p = h\gamma`, of the
nonlinear part, in the palindromic order
:math:`q = T_{h/2} S N S T_h S N \cdots N S T_{h/2}` (so the linear steps cost one multiply-add each and
no :math:`\varphi_1`), where :math:`\tilde n` is :math:`n` continued beyond
:math:`|v| > R` (``tail_bound``) by its tangent lines, so :math:`|\tilde n'| \le M` (:math:`M = 2R`,
:math:`3R^2`, :math:`1/4`). The log-det is the exact sum over the steps of the computed map's
log-derivatives (checked against autograd). As :math:`K \to \infty` the map converges at second order to
the time-1 map of :math:`v' = \alpha v + \beta + \gamma\tilde n(v)`, the paper's ODE where the path stays
in :math:`|v| \le R` (tested against RK4).

**Bounds that hold for every parameter value.** The coefficients are
:math:`\alpha = A\tanh(a/A)` (``log_scale_bound`` :math:`A`: default 3 for the autoregressive layer,
like the upper clamp of Pyro's affine layers, and 5 for the coupling layer), :math:`\beta = b` and
:math:`\gamma = c_{\max}\tanh(c/c_{\max})/M` with :math:`c_{\max} = \min(B, K/2)`
(``nonlinear_bound`` :math:`B`, default 2), so every Heun step has :math:`|p\tilde n'| \le
\kappa := \min(B/K, 1/2)` and :math:`N' \in [1-\kappa-\kappa^2/2,\ 1+\kappa+\kappa^2/2]`. Hence, per layer
and coordinate, for any ``num_steps``:

.. math::  |\log q'| \;\le\; A + K\,|\log(1-\kappa-\kappa^2/2)| \;\le\; A + 1.97\,B

(at the defaults :math:`K = 4`, :math:`B = 2`: 6.92 autoregressive, 8.92 coupling; 5.64 and 7.64 at
:math:`K = 8`; at most :math:`A + 3.93` for any :math:`K`; :func:`log_slope_bound` computes it). :math:`K = 4
= 2B` is the fewest steps that keep the whole budget :math:`B` (below, :math:`c_{\max} = K/2 < B`); it
trains as well as :math:`K = 8` per second of CPU and costs half the elementwise work (``docs/autm.md``).

The *total* nonlinear budget :math:`B` is split over the steps, so the bound does not grow with
``num_steps`` (it shrinks towards :math:`A + B` as :math:`K` grows). The autoregressive layer's
conditioner is a :class:`~pyro_flows.nn.LipschitzMADE`, the coupling layer's a dense network of
``LipschitzLinear`` layers, each with Lipschitz constant in :math:`x` at most ``lipschitz`` (default 2)
for every weight value: together with the slope bound this bounds how an error in one coordinate
moves the others (through the sequential inverse, and through the stacked layers of a flow). The
acceptance test (``tests/test_autm.py``: float64, 4 layers, every parameter moved by 2 N(0, 1),
D in {5, 8, 16}) reconstructs to 1e-6; with an unbounded dense net the same test misses by 1e12.

**Directions** (``single_pass``). The *explicit* map :math:`E` (one conditioner pass, then the
elementwise :math:`q`) is put on the inverse (data to noise) by ``single_pass="log_prob"`` (the
default: ``log_prob`` of external data in one pass, density estimation), or on ``_call`` by
``single_pass="sample"`` (``rsample`` and ``log_prob`` of own samples in one pass, guides). The explicit
direction makes no host synchronisation. The other direction solves :math:`E(u) = v` numerically:

* coupling: one elementwise bracketed Newton/bisection solve
  (:func:`pyro_flows.solvers.monotone_root`) started from the paper's reversed integration, inside the
  bracket :math:`|q(u_0) - v|/m` given by the guaranteed slope floor
  :math:`m = e^{\alpha}(1-\kappa_\gamma-\kappa_\gamma^2/2)^K` (padded by four tolerances; a root
  that rounding put outside it sends the solve to a bracket search). The evaluation at :math:`u_0` is
  the solver's first iterate and the evaluation at the result is the layer's log-det and certificate;
* autoregressive: block Gauss-Jacobi passes, each solving all coordinates elementwise for the
  conditioner evaluated at the current iterate; it is exact after at most ``input_dim`` passes (the
  conditioner is strictly triangular) and stops earlier once a pass changes nothing.

**Certified.** Every numerical result :math:`\hat u` is checked in the solved variable: with the
residual :math:`r = |E(\hat u) - v|` (plus a rounding allowance) and the Jacobian :math:`J` of
:math:`E` at :math:`\hat u` (diagonal, :math:`q'`, for coupling; lower triangular for the
autoregressive layer, from one backward pass of the elementwise map and the conditioner's analytic
Jacobian, :meth:`~pyro_flows.nn.LipschitzMADE.output_and_jacobian`), the error obeys, to first
order, :math:`|\hat u - u^*| \le |J^{-1}|\,r` componentwise.
If that exceeds :math:`\sqrt{\epsilon}(1 + |\hat u|)` (:math:`\epsilon` the dtype's machine epsilon:
1.5e-8 in float64, 3.5e-4 in float32) a :class:`~pyro_flows.solvers.ConvergenceWarning` names the
bound reached; this is what flags, e.g., float32 inputs of size 1e3. The bound of the last numerical
call is kept in ``last_solver_info.error_bound``. (The check is per layer; rounding amplified *across* the layers of
a stack is caught by the stack's round-trip certificate, :class:`pyro_flows.stacking.FlowStack`.)

**Gradients** of the numerical direction come from the implicit function theorem, never by unrolling
the solver: :func:`~pyro_flows.solvers.implicit_monotone_root` for coupling, and for the autoregressive
layer one pass :math:`\hat u - J^{-1}(E_\theta(\hat u) - v)` with :math:`J` held fixed, whose first
derivatives are exactly those of the inverse.

References:
    Cai, Ji, He, Ye, Xi. *AUTM Flow: Atomic Unrestricted Time Machine for Monotonic Normalizing
    Flows.* Preprint, June 2022.

    Germain et al. *MADE: Masked Autoencoder for Distribution Estimation.* ICML 2015.

    Dinh, Sohl-Dickstein, Bengio. *Density estimation using Real NVP.* ICLR 2017.
"""

from __future__ import annotations

import math
import warnings

import torch
from pyro.distributions.torch_transform import TransformModule

from ..nn import LipschitzDenseNN, LipschitzMADE
from ..registry import register_flow
from ..solvers import ConvergenceWarning, SolverInfo, implicit_fixed_point, implicit_monotone_root, monotone_root
from ..validation import broadcast_context, check_dim, check_finite, check_single_pass
from ._base import ConditionalFlowModule, FlowTransform

__all__ = [
    "INTEGRANDS",
    "AUTMAutoregressive",
    "AUTMCoupling",
    "ConditionalAUTMAutoregressive",
    "ConditionalAUTMCoupling",
    "ConditionedAUTMAutoregressive",
    "ConditionedAUTMCoupling",
    "autm_autoregressive",
    "autm_coefficients",
    "autm_coupling",
    "autm_map",
    "autm_reverse_integration",
    "conditional_autm_autoregressive",
    "conditional_autm_coupling",
    "log_slope_bound",
]

#: the integrands g offered (the paper's three plus "linear")
INTEGRANDS = ("sigmoid", "quadratic", "cubic", "linear")

# the factor M' with n'(v) = M' * clamp-part: "cubic" 3 vc^2, "quadratic" 2 vc, "sigmoid" s (1 - s)
_DERIV_FACTOR = {"cubic": 3.0, "quadratic": 2.0, "sigmoid": 1.0}


# ----------------------------------------------------------------------------------------------
# the scalar map
# ----------------------------------------------------------------------------------------------
#: the constant ``c`` of :func:`_stage`
_NL_CONST = {"cubic": -2.0 / 3.0, "quadratic": -0.5, "sigmoid": 1.0}


def _slope_bound(kind: str, tail: float) -> float:
    """``M = sup |n'|`` of the tamed nonlinearity."""
    return {"sigmoid": 0.25, "quadratic": 2.0 * tail, "cubic": 3.0 * tail * tail}[kind]


def _phi1(z: torch.Tensor) -> torch.Tensor:
    """``(exp(z) - 1) / z`` without cancellation or a 0/0 (also in the gradient)."""
    small = z.abs() < 1e-3
    zs = torch.where(small, torch.ones_like(z), z)
    taylor = 1 + z * (0.5 + z * (1.0 / 6 + z / 24))
    return torch.where(small, taylor, torch.expm1(zs) / zs)


def _step_kappa(num_steps: int, nonlinear_bound: float) -> float:
    """The per-step bound ``kappa = min(B / K, 1/2)`` on ``|p n'|``."""
    return min(nonlinear_bound / num_steps, 0.5)


def log_slope_bound(num_steps: int = 4, log_scale_bound: float = 5.0, nonlinear_bound: float = 2.0,
                    g: str = "cubic") -> float:
    """The guaranteed bound on ``|log q'|`` of one layer, per coordinate, for any parameter values.

    ``A + K |log(1 - kappa - kappa^2 / 2)|`` with ``kappa = min(B / K, 1/2)`` (``A`` for "linear");
    at most ``A + 1.97 B`` whatever ``num_steps``.

    Example:
        >>> round(log_slope_bound(), 3), round(log_slope_bound(num_steps=8), 3)
        (8.923, 7.642)
    """
    if g == "linear":
        return float(log_scale_bound)
    k = _step_kappa(num_steps, nonlinear_bound)
    return float(log_scale_bound) - num_steps * math.log1p(-k - 0.5 * k * k)


def autm_coefficients(raw: torch.Tensor, g: str, num_steps: int, tail_bound: float = 3.0,
                      log_scale_bound: float = 5.0, nonlinear_bound: float = 2.0):
    """Map unrestricted conditioner outputs to the coefficients ``(alpha, beta, gamma)`` of the layer.

    Arguments:
        raw: ``(..., P, n)`` with ``P = 2`` for ``g="linear"`` (a, b) and ``P = 3`` otherwise (a, b, c).
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound: as in
            :class:`ConditionedAUTMAutoregressive`.

    Returns:
        ``alpha = A tanh(a / A)``, ``beta = b`` and ``gamma = c_max tanh(c / c_max) / M`` with
        ``c_max = min(B, K / 2)`` and ``M = sup|n'|`` (``gamma`` is ``None`` for ``"linear"``).
    """
    A = log_scale_bound
    alpha = A * torch.tanh(raw[..., 0, :] / A)
    beta = raw[..., 1, :]
    if g == "linear":
        return alpha, beta, None
    c_max = _step_kappa(num_steps, nonlinear_bound) * num_steps
    gamma = (c_max / _slope_bound(g, tail_bound)) * torch.tanh(raw[..., 2, :] / c_max)
    return alpha, beta, gamma


def _stage(kind: str, v: torch.Tensor, ps: torch.Tensor, tail: float, one: torch.Tensor, c: torch.Tensor):
    """One evaluation of the tamed nonlinearity (a stage of a Heun step): ``(o, pn, a, b, aux)``.

    ``o = 1 + p n'(v)`` and ``pn = p n(v)``; ``a = n(v) / F`` and ``b = n'(v) / F`` (``F`` =
    ``_DERIV_FACTOR[kind]``, ``ps = F p``, so ``pn = ps a`` and ``o = 1 + ps b``: what the backward needs
    for ``d/d ps``); ``aux`` is ``clamp(v, -R, R)`` (its interior marks where ``n''`` is not 0) or
    ``sigmoid(v)``. Written with few elementwise operations: for "cubic" ``n = vc^2 (3 v - 2 vc)``
    (``v^3`` inside ``[-R, R]``, tangent lines outside, ``vc = clamp(v, -R, R)``) and ``n' = 3 vc^2``;
    for "quadratic" ``n = vc (2 v - vc)`` and ``n' = 2 vc``; for "sigmoid" ``n = s``,
    ``n' = s (1 - s)``. ``one`` and ``c`` (``-2/3``, ``-1/2``, or ``1`` for "sigmoid") are 0-d
    tensors: tensor constants, not Python numbers, keep scalar conversions out of the hot loop.
    """
    if kind == "sigmoid":
        aux = torch.sigmoid(v)
        b = aux * (c - aux)
        return torch.addcmul(one, ps, b), ps * aux, aux, b, aux
    aux = v.clamp(-tail, tail)
    b = aux * aux if kind == "cubic" else aux
    a = b * torch.addcmul(v, c, aux)
    return torch.addcmul(one, ps, b), ps * a, a, b, aux


def _stage_slope_adjoint(kind: str, g: torch.Tensor, b: torch.Tensor, aux: torch.Tensor, tail: float):
    """``T(g)`` of one stage with ``ps' T(g) = g (d o / d v) / 2`` (``o = 1 + ps b``): ``ps' = ps`` for
    "cubic" (``b' = 2 vc [|v| < R]``), ``ps / 2`` otherwise (``b' = [|v| < R]``, ``b (1 - 2 s)``)."""
    if kind == "sigmoid":
        return g * torch.addcmul(b, b, aux, value=-2.0)
    return torch.ops.aten.hardtanh_backward(g * aux if kind == "cubic" else g, aux, -tail, tail)


def _heun_chain(x, e_half, s_first, e_full, s_full, s_last, ps, kind, num_steps, tail, save=False):
    """The K steps: ``(y, sum_k log((1 + o1 o2) / 2), saved, half)`` with ``o = 1 + p n'`` at the stages.

    The same operations with and without ``save`` (the map does not depend on the grad mode).
    ``saved`` (with ``save=True``) lists, per step, what :func:`_chain_adjoint` needs; ``half`` is the
    0-d constant 1/2 in ``x``'s dtype and device.
    """
    one, half, c = (x.new_full((), value) for value in (1.0, 0.5, _NL_CONST[kind]))
    v = torch.addcmul(s_first, e_half, x)
    logs, prod, saved = None, None, []
    for k in range(num_steps):
        o1, pn1, a1, b1, x1 = _stage(kind, v, ps, tail, one, c)
        o2, pn2, a2, b2, x2 = _stage(kind, v + pn1, ps, tail, one, c)
        z = torch.addcmul(v, half, pn1 + pn2)
        factor = torch.addcmul(half, o1, o2, value=0.5)  # N' in [0.375, 1.625]: a log every 8 steps is safe
        if save:
            saved.append((o1, a1, b1, x1, o2, a2, b2, x2, factor, z))
        prod = factor if prod is None else prod * factor
        if k % 8 == 7 or k == num_steps - 1:
            logs, prod = (torch.log(prod) if logs is None else logs + torch.log(prod)), None
        v = torch.addcmul(s_full, e_full, z) if k < num_steps - 1 else torch.addcmul(s_last, e_half, z)
    return v, logs, saved, half


def _chain_adjoint(gy, glog, x, e_half, e_full, ps, half, saved, kind, num_steps, tail):
    """Reverse sweep of :func:`_heun_chain`: the adjoints of
    ``(x, e_half, s_first, e_full, s_full, s_last, ps)`` (broadcast shape) given those of ``y`` and of
    the summed log-factors.

    Per step (``pn = p n``, ``o = 1 + p n'`` at ``v`` and at ``w = v + pn1``; ``z = v + (pn1 + pn2) / 2``;
    next state ``s + e z``; log-factor ``log((1 + o1 o2) / 2)``, ``dpn/dv = o - 1``): with ``gpn = e gv / 2``
    the adjoint of ``pn2`` and ``r = glog / factor``, the adjoint of ``pn1`` is
    ``gpn1 = gpn o2 + ps' T(r o1)`` and that of ``v`` is ``gpn + gpn1 o1 + ps' T(r o2)``, with
    ``ps' T(g) = g (do/dv) / 2`` (:func:`_stage_slope_adjoint`).
    """
    ps_s = ps if kind == "cubic" else ps * half  # ps' above: b' carries a factor 2 for "cubic"
    he_half, he_full = e_half * half, e_full * half
    gv, ge_half, gs_last, ge_full, gs_full, gps = gy, None, None, None, None, None
    for k in reversed(range(num_steps)):
        o1, a1, b1, x1, o2, a2, b2, x2, factor, z = saved[10 * k: 10 * k + 10]
        last = k == num_steps - 1
        if last:
            ge_half, gs_last = gv * z, gv
        else:
            ge_full = gv * z if ge_full is None else torch.addcmul(ge_full, gv, z)
            gs_full = gv if gs_full is None else gs_full + gv
        gpn = gv * (he_half if last else he_full)
        r = glog / factor
        g1, g2 = r * o2, r * o1  # twice the adjoints of o1, o2
        gpn1 = torch.addcmul(ps_s * _stage_slope_adjoint(kind, g2, b2, x2, tail), gpn, o2)
        gv = torch.addcmul(torch.addcmul(gpn, gpn1, o1), ps_s, _stage_slope_adjoint(kind, g1, b1, x1, tail))
        # pn = ps a and o = 1 + ps b at both stages
        gps = gpn * a2 if gps is None else torch.addcmul(gps, gpn, a2)
        gps = torch.addcmul(torch.addcmul(torch.addcmul(gps, g2, b2, value=0.5), gpn1, a1), g1, b1, value=0.5)
    # v_0 = s_first + e_half x
    gx = gv * e_half
    ge_half = torch.addcmul(ge_half, gv, x)
    if ge_full is None:  # a single step
        ge_full, gs_full = torch.zeros_like(gx), torch.zeros_like(gx)
    return gx, ge_half, gv, ge_full, gs_full, gs_last, gps


def _sum_to(grad, shape):
    return grad if grad.shape == shape else grad.sum_to_size(shape)


class _HeunChain(torch.autograd.Function):
    """:func:`_heun_chain` as one autograd node with a closed-form backward (:func:`_chain_adjoint`).

    First derivatives only: nothing in the package differentiates a gradient of the map again.
    """

    @staticmethod
    def forward(ctx, x, e_half, s_first, e_full, s_full, s_last, ps, kind, num_steps, tail):
        inputs = (x, e_half, s_first, e_full, s_full, s_last, ps)
        y, logs, saved, half = _heun_chain(*inputs, kind, num_steps, tail, save=True)
        ctx.meta = (kind, num_steps, tail, [t.shape for t in inputs])
        ctx.save_for_backward(x, e_half, e_full, ps, half, *(t for step in saved for t in step))
        return y, logs

    @staticmethod
    def backward(ctx, gy, glog):
        kind, num_steps, tail, shapes = ctx.meta
        x, e_half, e_full, ps, half, *saved = ctx.saved_tensors
        grads = _chain_adjoint(gy, glog, x, e_half, e_full, ps, half, saved, kind, num_steps, tail)
        return (*(_sum_to(g, shape) for g, shape in zip(grads, shapes)), None, None, None)


def _linear_flows(alpha, beta, num_steps):
    """``(e_half, s_first, e_full, s_full, s_last)``: the scalings and shifts between the Heun steps.

    With ``S(v) = e^{alpha h / 2} v`` and ``T_tau(v) = v + beta tau`` (the exact flows of ``v' = alpha v``
    and ``v' = beta``): ``S T_{h/2}`` before the first Heun step, ``S T_h S`` between two, ``T_{h/2} S``
    after the last, i.e. ``v -> e v + s`` with ``(e_half, s_first)``, ``(e_full, s_full)``,
    ``(e_half, s_last)``.
    """
    h = 1.0 / num_steps
    e_half, s_last = torch.exp((0.5 * h) * alpha), (0.5 * h) * beta
    s_first = s_last * e_half
    return e_half, s_first, e_half * e_half, s_first + s_first, s_last


class _AUTMLayerMap(torch.autograd.Function):
    """``autm_map(x, *autm_coefficients(raw, ...))`` as one autograd node: the same arithmetic forward
    (so the same values as the two public functions) and a closed-form backward through the K steps
    (:func:`_chain_adjoint`), the linear flows and the ``tanh`` bounds. First derivatives only."""

    @staticmethod
    def forward(ctx, x, raw, g, num_steps, tail, log_scale_bound, nonlinear_bound):
        alpha, beta, gamma = autm_coefficients(raw, g, num_steps, tail, log_scale_bound, nonlinear_bound)
        e_half, s_first, e_full, s_full, s_last = _linear_flows(alpha, beta, num_steps)
        ps = ((1.0 / num_steps) * _DERIV_FACTOR[g]) * gamma
        y, logs, saved, half = _heun_chain(x, e_half, s_first, e_full, s_full, s_last, ps, g, num_steps, tail,
                                           save=True)
        logd = alpha + logs
        ctx.meta = (g, num_steps, tail, log_scale_bound, nonlinear_bound, x.shape, raw.shape)
        ctx.save_for_backward(x, alpha, gamma, e_half, s_last, e_full, ps, half,
                              *(t for step in saved for t in step))
        return y, logd

    @staticmethod
    def backward(ctx, gy, glogd):
        g, num_steps, tail, A, B, x_shape, raw_shape = ctx.meta
        x, alpha, gamma, e_half, s_last, e_full, ps, half, *saved = ctx.saved_tensors
        gx, ge_half, gs_first, ge_full, gs_full, gs_last, gps = _chain_adjoint(
            gy, glogd, x, e_half, e_full, ps, half, saved, g, num_steps, tail)
        h = 1.0 / num_steps
        # s_full = 2 s_first, e_full = e_half^2, s_first = s_last e_half; e_half = exp(alpha h / 2)
        gs_first = torch.add(gs_first, gs_full, alpha=2.0)
        ge_half = torch.addcmul(torch.addcmul(ge_half, ge_full, e_half, value=2.0), gs_first, s_last)
        gs_last = torch.addcmul(gs_last, gs_first, e_half)
        # alpha = A tanh(a / A): d alpha / d a = 1 - (alpha / A)^2 (and alpha enters the log-det directly);
        # s_last = beta h / 2; gamma = c_max tanh(c / c_max) / M: d gamma / d c = (1 - (gamma M / c_max)^2) / M
        galpha = torch.addcmul(glogd, ge_half, e_half, value=0.5 * h)
        ga = torch.addcmul(galpha, galpha * alpha, alpha, value=-1.0 / (A * A))
        c_max, M = _step_kappa(num_steps, B) * num_steps, _slope_bound(g, tail)
        gg = gps * (h * _DERIV_FACTOR[g] / M)
        gc = torch.addcmul(gg, gg * gamma, gamma, value=-(M / c_max) ** 2)
        lead = raw_shape[:-2] + raw_shape[-1:]
        graw = torch.stack([_sum_to(ga, lead), _sum_to(gs_last * (0.5 * h), lead), _sum_to(gc, lead)], dim=-2)
        return _sum_to(gx, x_shape), graw, None, None, None, None, None


def autm_map(x, alpha, beta, gamma, g: str, num_steps: int, tail_bound: float = 3.0):
    """The discrete AUTM map and its exact elementwise log-derivative.

    Arguments:
        x: inputs; ``alpha``, ``beta``, ``gamma``: coefficients broadcastable to ``x`` (from
            :func:`autm_coefficients`; ``gamma`` is ignored for ``g="linear"``).
        g: one of :data:`INTEGRANDS`; num_steps: ``K``; tail_bound: ``R``.

    Returns:
        ``(y, log_dy_dx)``, both shaped like the broadcast of the inputs.

    The Heun step's derivative ``1 + (u1 + u2 + u1 u2) / 2`` (``u = p n'`` at the two stages) is
    ``(1 + (1 + u1)(1 + u2)) / 2``; the factors are multiplied and the log taken once every 8 steps.
    With gradients the K steps run as one autograd node with a hand-written backward (see ``docs/autm.md``).

    Example:
        >>> x = torch.linspace(-2, 2, 5)
        >>> raw = torch.tensor([[0.5], [0.1], [1.0]]).expand(3, 5)
        >>> y, logd = autm_map(x, *autm_coefficients(raw, "cubic", 4), "cubic", 4)
        >>> bool((y.diff() > 0).all()), logd.shape
        (True, torch.Size([5]))
    """
    if g == "linear":  # the time-1 flow of v' = alpha v + beta, exactly
        y = torch.addcmul(beta * _phi1(alpha), torch.exp(alpha), x)
        return y, alpha.expand_as(y)
    if g not in _DERIV_FACTOR:
        raise ValueError(f"g must be one of {INTEGRANDS}, got {g!r}")
    ps = ((1.0 / num_steps) * _DERIV_FACTOR[g]) * gamma
    args = (x, *_linear_flows(alpha, beta, num_steps), ps)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        y, logs = _HeunChain.apply(*args, g, num_steps, float(tail_bound))
    else:
        y, logs, _, _ = _heun_chain(*args, g, num_steps, float(tail_bound))
    logd = alpha + logs
    return y, logd.expand_as(y)


def autm_reverse_integration(y, alpha, beta, gamma, g: str, num_steps: int, tail_bound: float = 3.0):
    """The paper's explicit inverse: integrate backwards from ``v(1) = y`` with the same steps.

    The scalings and shifts are undone exactly and each Heun step ``N`` by the reversed Heun step
    ``w - p/2 (n(w) + n(w - p n(w)))``, so this is an approximate inverse of :func:`autm_map` (exact for
    ``"linear"``), used as the starting point of the bracketed solve.
    """
    if g == "linear":
        return (y - beta * _phi1(alpha)) * torch.exp(-alpha)
    e_half, s_first, e_full, s_full, s_last = _linear_flows(alpha, beta, num_steps)
    ps = ((1.0 / num_steps) * _DERIV_FACTOR[g]) * gamma
    one, c = y.new_full((), 1.0), y.new_full((), _NL_CONST[g])
    w = (y - s_last) / e_half
    for k in range(num_steps):
        pn1 = _stage(g, w, ps, tail_bound, one, c)[1]
        pn2 = _stage(g, w - pn1, ps, tail_bound, one, c)[1]
        w = w - 0.5 * (pn1 + pn2)
        w = (w - s_full) / e_full if k < num_steps - 1 else (w - s_first) / e_half
    return w


# ----------------------------------------------------------------------------------------------
# shared machinery of the two layer types
# ----------------------------------------------------------------------------------------------
def _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass):
    if g not in INTEGRANDS:
        raise ValueError(f"g must be one of {INTEGRANDS}, got {g!r}")
    num_steps = check_dim(num_steps, "num_steps")
    for name, value in (("tail_bound", tail_bound), ("log_scale_bound", log_scale_bound),
                        ("nonlinear_bound", nonlinear_bound)):
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value)
                                           and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return {"g": g, "num_steps": num_steps, "tail_bound": float(tail_bound),
            "log_scale_bound": float(log_scale_bound), "nonlinear_bound": float(nonlinear_bound),
            "single_pass": check_single_pass(single_pass)}


def _check_cache_size(cache_size):
    if cache_size not in (0, 1):
        raise ValueError(f"cache_size must be 0 or 1, got {cache_size!r}")
    return cache_size


def _layer_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size):
    """The checked keyword arguments of a conditioned layer (what a conditional module passes on)."""
    settings = _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass)
    settings["cache_size"] = _check_cache_size(cache_size)
    return settings


def _num_params(g):
    return 2 if g == "linear" else 3


def _x_tolerance(dtype) -> float:
    """Tolerance of the certified error bound: ``sqrt(eps)`` of the dtype (relative to ``1 + |x|``)."""
    return math.sqrt(torch.finfo(dtype).eps)


def _default_hidden(input_dim, hidden_dims, minimum=1):
    if hidden_dims is None:
        return [max(10 * input_dim, 16)] * 2
    hidden_dims = [check_dim(h, "hidden_dims entry") for h in hidden_dims]
    if not hidden_dims:
        raise ValueError("hidden_dims must hold at least one size")
    if any(h < minimum for h in hidden_dims):
        raise ValueError(
            f"hidden_dims must all be >= input_dim ({minimum}) for a MADE conditioner, got {hidden_dims}"
        )
    return hidden_dims


class _AUTMBase(FlowTransform):
    """Elementwise AUTM maths and the direction switch shared by the autoregressive and coupling layers.

    A layer defines the explicit map ``_explicit(u) -> (E(u), log|det E'(u)|)`` and its numerical
    inverse ``_numerical(v) -> (u, log|det E'(u)|)`` with ``E(u) = v``; ``single_pass`` puts the explicit
    one on ``_call`` ("sample") or on ``_inverse`` ("log_prob").
    """

    def __init__(self, input_dim, g, num_steps, tail_bound, log_scale_bound, nonlinear_bound,
                 single_pass="log_prob", context=None, cache_size=1):
        super().__init__(input_dim, cache_size=_check_cache_size(cache_size), context=context)
        settings = _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass)
        self.g = settings["g"]
        self.num_steps = settings["num_steps"]
        self.tail_bound = settings["tail_bound"]
        self.log_scale_bound = settings["log_scale_bound"]
        self.nonlinear_bound = settings["nonlinear_bound"]
        self.single_pass = settings["single_pass"]
        #: what the last numerical (iterative) direction did, a SolverInfo: solver iterations (largest
        #: over passes), the largest residual, the certified bound on the error in the solved variable,
        #: and ``detail["passes"]``, the conditioner passes
        self.last_solver_info = None
        self._iterations = 0  # accumulated over the solves of one call, published in last_solver_info
        self._passes = 0

    # -- the direction switch ---------------------------------------------------------------
    def _call_and_ladj(self, x):
        if self.single_pass == "sample":
            return self._explicit(x)
        y, logdet = self._numerical(x)
        return y, -logdet

    def _inverse_and_ladj(self, y):
        if self.single_pass == "sample":
            return self._numerical(y)
        x, logdet = self._explicit(y)
        return x, -logdet

    def _log_abs_det_jacobian(self, x, y):
        if self.single_pass == "sample":
            return self._explicit(x)[1]
        return -self._explicit(y)[1]

    def _numerical_start(self, v):
        """The warm start of the numerical direction at ``v`` (``FlowTransform._warm_start``): ``v`` is a y
        when that direction is the inverse (``single_pass="sample"``), an x otherwise."""
        return self._warm_start(v, 1 if self.single_pass == "sample" else 0)

    def init_identity_(self):
        """Make the layer exactly the identity map: zero the conditioner's output layer.

        The raw coefficients are then ``a = b = c = 0``, so ``alpha = beta = gamma = 0`` and every
        step of the discrete map is exactly ``v -> v`` with log-derivative exactly 0. The hidden
        layers keep their values, so the output layer's gradient does not vanish. Needs a
        conditioner whose last layer is ``net.layers[-1]`` with ``weight`` and ``bias`` (the
        package's Lipschitz networks, Pyro's ``DenseNN``/``AutoRegressiveNN``). Returns ``self``.

        Example:
            >>> import torch
            >>> t = autm_coupling(4).init_identity_()
            >>> x = torch.randn(3, 4)
            >>> bool((t(x) == x).all())
            True
        """
        net = self.arn if hasattr(self, "arn") else self.nn
        layers = getattr(net, "layers", None)
        last = layers[-1] if layers is not None and len(layers) else None
        if getattr(last, "weight", None) is None or getattr(last, "bias", None) is None:
            raise NotImplementedError(
                f"{type(self).__name__}: init_identity_ needs a conditioner whose output layer is "
                f"net.layers[-1] with a weight and a bias, got {type(net).__name__}")
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        return self

    # -- the elementwise maths ----------------------------------------------------------------
    def _check_raw(self, raw):
        P = _num_params(self.g)
        if not isinstance(raw, torch.Tensor) or raw.dim() < 2 or raw.shape[-2] != P:
            got = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(
                f"{type(self).__name__}: the conditioner must return one tensor of shape (..., {P}, n) "
                f"for g={self.g!r} (output_multiplier={P} for a MADE, [{P} * n] outputs for a dense "
                f"net), got {got}"
            )
        return raw

    def _coefficients(self, raw):
        return autm_coefficients(self._check_raw(raw), self.g, self.num_steps, self.tail_bound,
                                 self.log_scale_bound, self.nonlinear_bound)

    def _map(self, x, coeffs):
        return autm_map(x, *coeffs, self.g, self.num_steps, self.tail_bound)

    def _map_raw(self, x, raw):
        """``_map(x, _coefficients(raw))``; with gradients, one autograd node (:class:`_AUTMLayerMap`)."""
        if self.g == "linear" or not (torch.is_grad_enabled() and (x.requires_grad or raw.requires_grad)):
            return self._map(x, self._coefficients(raw))
        return _AUTMLayerMap.apply(x, self._check_raw(raw), self.g, self.num_steps, self.tail_bound,
                                   self.log_scale_bound, self.nonlinear_bound)

    def _solve(self, target, coeffs, init=None):
        """Elementwise root of ``q(u; coeffs) = target`` (no graph), in a guaranteed bracket.

        Returns ``(u, y, logd)`` with ``y, logd = self._map(u, coeffs)``: the solver's last evaluation
        (the map is deterministic, so it is what a fresh call gives, bit for bit).
        """
        fixed = tuple(None if c is None else c.detach() for c in coeffs)
        target = target.detach()
        if init is None:
            init = autm_reverse_integration(target, *fixed, self.g, self.num_steps, self.tail_bound)
            init = torch.where(torch.isfinite(init), init, target)
        last = {}

        def fn(v):
            y, logd = self._map(v, fixed)
            last.update(y=y, logd=logd)
            return y, torch.exp(logd)

        # q' >= m := exp(alpha) prod(1 - p - p^2/2) everywhere (p = h|gamma|M, each Heun step's bound),
        # so the root lies within |q(init) - target| / m of init: a bracket without a search
        log_m = fixed[0]
        if self.g != "linear":
            hgm = fixed[2].abs() * (_slope_bound(self.g, self.tail_bound) / self.num_steps)
            log_m = log_m + self.num_steps * torch.log1p(-hgm - 0.5 * hgm * hgm)
        eps = torch.finfo(target.dtype).eps
        tol = 64 * eps  # near rounding: a loose stop would be amplified by the layers that follow
        first = fn(init)  # sizes the bracket and is the solver's first evaluation
        slack = (first[0] - target).abs() + 64 * eps * (1 + target.abs())
        # padded by four times the x-tolerance (so init is strictly inside, and a solve that ends
        # within the tolerance of an end has met a root outside it, see below); a non-finite width
        # gives the empty bracket [init, init], which the check below sends to the search
        width = slack * torch.exp(-log_m) * (1 + 1e-6) + 4 * tol * (1 + init.abs())
        finite = torch.isfinite(width)
        lower = torch.where(finite, init - width, init)
        upper = torch.where(finite, init + width, init)
        x, info = monotone_root(fn, target, init=init, lower=lower, upper=upper, atol=tol, rtol=tol,
                                return_info=True, first=first, on_fail="ignore")
        if not info.detail["at_last_evaluation"]:
            fn(x)
        # The bracket holds in exact arithmetic; rounding in the evaluated map could in principle put
        # the evaluated root outside it. The solve then ends at a bracket end with its residual
        # pointing outwards: search a bracket and solve again (one host synchronisation, as the
        # up-front evaluation of both ends that this check replaces made).
        y, near = last["y"], tol * (1 + x.abs())
        out = ((x - lower <= near) & (y > target)) | ((upper - x <= near) & (y < target))
        if not (info.converged and bool((finite & ~out).all())):
            x, info = monotone_root(fn, target, init=init, atol=tol, rtol=tol, return_info=True)
            if not info.detail["at_last_evaluation"]:
                fn(x)
        self._iterations = max(self._iterations, info.iterations)
        return x, last["y"], last["logd"]

    def _certify(self, u, v, y, logd, jac=None):
        """Warn unless the certified error bound of the numerical result ``u`` is within tolerance.

        ``y = E(u)`` and ``logd = log q'`` computed at the solution ``u`` of ``E(u) = v``. With the
        residual ``r = |y - v|`` (plus a rounding allowance), the error obeys (to first order)
        ``|u - u*| <= |J^{-1}| r`` componentwise, ``J`` the Jacobian of ``E`` at ``u``: diagonal
        (``q'``) for the coupling layer, lower triangular (``jac``, ``(..., D, D)``) for the
        autoregressive layer, where it carries how an error in one coordinate moves the others.
        """
        with torch.no_grad():
            eps = torch.finfo(u.dtype).eps
            r = (y - v).abs() + 16 * eps * (1 + v.abs() + y.abs())
            if jac is None:
                err = r / torch.exp(logd)
            else:
                eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
                inv = torch.linalg.solve_triangular(jac, eye.expand_as(jac), upper=False)
                err = (inv.abs() @ r.unsqueeze(-1)).squeeze(-1)
            err = torch.where(torch.isfinite(err), err, torch.full_like(err, float("inf")))
            tol = _x_tolerance(u.dtype) * (1 + u.abs())
            bound, residual, ok = 0.0, 0.0, True
            if err.numel():  # one host synchronisation
                bound, residual, ok = torch.stack([err.max(), r.max(), (err <= tol).all().to(err.dtype)]).tolist()
                ok = ok == 1.0
            self.last_solver_info = SolverInfo(self._iterations, residual, ok, bound, {"passes": self._passes})
            if not ok:
                worst = float((err / tol).max())
                warnings.warn(
                    f"{type(self).__name__}: the numerical direction's certified error bound is "
                    f"{bound:.3g} ({worst:.3g} times the tolerance sqrt(eps) (1 + |x|), "
                    f"dtype {u.dtype}): the result may be inaccurate; use float64, smaller inputs, or "
                    f"single_pass={'sample' if self.single_pass == 'log_prob' else 'log_prob'!r} so this "
                    f"direction is the explicit one",
                    ConvergenceWarning,
                    stacklevel=4,
                )


# ----------------------------------------------------------------------------------------------
# autoregressive
# ----------------------------------------------------------------------------------------------
def _check_made(input_dim, net, g):
    if not isinstance(net, LipschitzMADE):
        raise TypeError(
            f"the AUTM autoregressive conditioner must be a pyro_flows.nn.LipschitzMADE (its Lipschitz "
            f"bound certifies the sequential inverse), got {type(net).__name__}"
        )
    P = _num_params(g)
    if net.input_dim != input_dim or net.output_multiplier != P:
        raise ValueError(
            f"the conditioner must be LipschitzMADE({input_dim}, ..., output_multiplier={P}) for "
            f"g={g!r}, got input_dim={net.input_dim}, output_multiplier={net.output_multiplier}"
        )
    return net


class ConditionedAUTMAutoregressive(_AUTMBase):
    r"""AUTM autoregressive layer with its parameters from a Lipschitz MADE conditioner (the maths).

    The explicit map is :math:`E(u)_k = q(u_k; \theta_k(u_{<k}))` with :math:`q` the discrete AUTM map
    of the module docstring; with ``single_pass="log_prob"`` it maps data to noise (a MAF), with
    ``"sample"`` noise to data (an IAF). The other direction takes at most ``input_dim`` block
    Gauss-Jacobi passes (see the module docstring), certified and warned about when inaccurate.

    Arguments:
        input_dim: the event size D.
        autoregressive_nn: a :class:`~pyro_flows.nn.LipschitzMADE` ``(D, hidden, output_multiplier=P)``
            (``P = 3``, or 2 for ``g="linear"``, ``context_dim`` set together with ``context``).
        g: the integrand, one of ``"sigmoid"``, ``"quadratic"``, ``"cubic"``, ``"linear"``.
        num_steps: the number K of time steps of the discrete map.
        tail_bound: R, where ``"quadratic"``/``"cubic"`` switch to tangent-line tails.
        log_scale_bound: A, the soft bound on the linear coefficient ``alpha``.
        nonlinear_bound: B, the layer's budget for the nonlinear term, split over the K steps:
            each Heun step has ``|p n'| <= min(B / K, 1/2)``.
        single_pass: ``"log_prob"`` (default) or ``"sample"``: which direction is the explicit one.
        context: the context tensor (for conditioned transforms built by the conditional module).
        cache_size: 0 or 1, as in ``torch.distributions.Transform``.

    Example:
        >>> import torch
        >>> from pyro_flows.nn import LipschitzMADE
        >>> net = LipschitzMADE(3, [30, 30], output_multiplier=3, coeff=1.0)
        >>> t = ConditionedAUTMAutoregressive(3, net, num_steps=6)
        >>> x = torch.randn(5, 3)
        >>> bool((t.inv(t(x).clone()) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, input_dim, autoregressive_nn, g="cubic", num_steps=4, tail_bound=3.0,
                 log_scale_bound=3.0, nonlinear_bound=2.0, single_pass="log_prob", context=None,
                 cache_size=1):
        super().__init__(input_dim, g, num_steps, tail_bound, log_scale_bound, nonlinear_bound,
                         single_pass=single_pass, context=context, cache_size=cache_size)
        self.arn = _check_made(self.input_dim, autoregressive_nn, self.g)

    def _bound_networks(self):
        return (self.arn,)

    def _explicit(self, u):
        u, ctx = self._broadcast_context(u)
        raw = self.arn(u, ctx)
        v, logd = self._map_raw(u, raw)
        return v, logd.sum(-1)

    def _numerical(self, v):
        check_finite(v, f"{type(self).__name__} input of the numerical direction")
        v, ctx = self._broadcast_context(v)
        D = self.input_dim
        self._iterations = 0
        weights = self.arn.effective_weights()
        with torch.no_grad():
            fixed = [w.detach() for w in weights]
            ctx0 = None if ctx is None else ctx.detach()
            target = v.detach()
            # a warm start (transforms._base.warm_started), else the first pass conditions on zeros
            u = self._numerical_start(v)
            passes = 0
            for passes in range(1, D + 1):  # coordinates < passes are final after `passes` passes
                raw = self.arn(torch.zeros_like(target) if u is None else u, ctx0, weights=fixed)
                u_new = self._solve(target, self._coefficients(raw), init=u)[0]
                done = u is not None and bool(
                    ((u_new - u).abs() <= _x_tolerance(u.dtype) ** 2 * (1 + u.abs())).all())
                u = u_new
                if done:
                    break
            self._passes = passes
        theta_graph = torch.is_grad_enabled() and (
            (ctx is not None and ctx.requires_grad) or any(p.requires_grad for p in self.arn.parameters()))
        if (self._in_warm_pass() and not theta_graph and torch.is_grad_enabled() and v.requires_grad
                and v.numel() >= JACOBIAN_FREE_MIN_DRAWS * D):
            path = self._path_gradient_inverse(u, v, fixed, ctx0, weights)
            if path is not None:
                return path
        y, logd, jac = self._map_and_jacobian(u, fixed, ctx0)
        self._certify(u, v, y, logd, jac)
        if not theta_graph:
            if not (torch.is_grad_enabled() and v.requires_grad):
                return u, logd.sum(-1)
            # a graph in v alone (parameters held fixed, as in the path gradient's pass): the same Newton
            # correction from the residual already evaluated, du/dv = J^{-1}; only log q' needs the conditioner
            corr = torch.linalg.solve_triangular(jac, (y - v).unsqueeze(-1), upper=False).squeeze(-1)
            u = u - corr
            _, logd = self._map_raw(u, self.arn(u, ctx, weights=weights))
            return u, logd.sum(-1)
        # implicit gradients in one pass: u - J^{-1} (E(u) - v) with J (the Jacobian at the solution)
        # held fixed has the value u (plus a Newton correction of the order of the residual) and
        # exactly the first derivatives of the inverse: du/dv = J^{-1}, du/dtheta = -J^{-1} dE/dtheta
        raw = self.arn(u, ctx, weights=weights)
        y, _ = self._map_raw(u, raw)
        corr = torch.linalg.solve_triangular(jac, (y - v).unsqueeze(-1), upper=False).squeeze(-1)
        u = u - corr
        raw = self.arn(u, ctx, weights=weights)
        _, logd = self._map_raw(u, raw)
        return u, logd.sum(-1)

    def _path_gradient_inverse(self, u, v, fixed, ctx, weights):
        """The inverse at a warm-started solution ``u`` for the path gradient's pass (parameters held fixed, a
        graph in ``v`` only), without forming the ``(..., D, D)`` Jacobian; ``None`` to take the certified path.

        That pass differentiates ``log q`` at the guide's own draw, never shown to the user: what it needs is
        a point whose image is the draw to within rounding, a *backward* error, checked here as
        ``|E(u) - v| <= sqrt(eps) (1 + |v|)`` (the forward-error certificate, ``|J^{-1}| |E(u) - v|``, needs
        the Jacobian, whose analytic form costs ``D`` conditioner passes per draw: most of this pass at
        thousands of particles). ``u`` is the fixed point of the Jacobi step ``u - (E(u) - v) / diag(J)``
        (``J``'s diagonal is ``q'``: the conditioner of coordinate ``k`` does not read ``u_k``), so
        :func:`~pyro_flows.solvers.implicit_fixed_point` gives it ``du/dv = J^{-1}``: its adjoint iteration
        applies ``J^{-T}`` by vector-Jacobian products, exact after ``D - 1`` of them (the step's Jacobian is
        strictly triangular). ``log q'`` at the result is differentiated as usual.
        """
        with torch.no_grad():
            scale = torch.exp(self._map(u, self._coefficients(self.arn(u, ctx, weights=fixed)))[1])

        def jacobi(w):
            return w - (self._map_raw(w, self.arn(w, ctx, weights=weights))[0] - v) / scale

        step = implicit_fixed_point(jacobi, u, check_every=1)
        with torch.no_grad():  # the backward error, read from the step itself: r = scale (u - step)
            r = ((u - step) * scale).abs()
            ok = (r <= _x_tolerance(u.dtype) * (1 + v.abs())).all() if r.numel() else torch.ones((), dtype=torch.bool)
            residual, ok = torch.stack([r.max() if r.numel() else r.new_zeros(()), ok.to(r.dtype)]).tolist()
        if ok != 1.0:
            return None
        self.last_solver_info = SolverInfo(self._iterations, residual, True, None,
                                           {"passes": self._passes, "certified": "backward error"})
        _, logd = self._map_raw(step, self.arn(step, ctx, weights=weights))
        return step, logd.sum(-1)

    def _map_and_jacobian(self, u, weights, ctx):
        """``(y, logd, J)`` at ``u``, no graph: the explicit map, its log-slopes and its (lower triangular)
        Jacobian ``(..., D, D)``.

        ``J[k, j] = q'_k [k = j] + sum_p (d q_k / d raw_pk) (d raw_pk / d u_j)``: one backward pass of
        the elementwise map for the sensitivities and the conditioner's Jacobian
        (:meth:`~pyro_flows.nn.LipschitzMADE.output_and_jacobian`, analytic).
        """
        u = u.detach()
        with torch.no_grad():
            raw, jr = self.arn.output_and_jacobian(u, ctx, weights)  # (..., P, D), (..., P, D, D)
        with torch.enable_grad():
            raw = raw.requires_grad_(True)
            y, logd = self._map_raw(u, raw)
            (sens,) = torch.autograd.grad(y.sum(), raw)  # (..., P, D)
        with torch.no_grad():
            jac = (sens.unsqueeze(-1) * jr).sum(-3)
            logd = logd.detach()
            return y.detach(), logd, jac + torch.diag_embed(torch.exp(logd))


#: from this many draws (rows of ``D`` coordinates) on, the path gradient's pass applies the autoregressive
#: layer's inverse Jacobian by vector-Jacobian products (the adjoint iteration of
#: :func:`~pyro_flows.solvers.implicit_fixed_point`) instead of forming each draw's Jacobian
#: (:meth:`ConditionedAUTMAutoregressive._path_gradient_inverse`). Measured on one CPU thread
#: (``benchmarks/bench_path_gradient_inverse.py``: default AutoFlow, D = 12, widths 64, path gradient step over
#: the usual step, interleaved, on a machine shared with a CI run): without the Jacobian 2.19x against 1.86x with
#: it at 1 draw, 1.83x against 1.60x at 16, 2.51x against 2.43x at 256, 2.91x against 3.91x at 4096. Each
#: vector-Jacobian product is a pass of fixed overhead; the Jacobian costs ``D`` times the conditioner's
#: arithmetic per draw.
JACOBIAN_FREE_MIN_DRAWS = 512


class AUTMAutoregressive(ConditionedAUTMAutoregressive, TransformModule):
    r"""AUTM autoregressive layer (a ``TransformModule`` owning its Lipschitz MADE conditioner).

    Arguments:
        input_dim: the event size D.
        autoregressive_nn: a :class:`~pyro_flows.nn.LipschitzMADE` ``(D, hidden, output_multiplier=P)``
            with ``P = 3`` (2 for ``g="linear"``). The helper :func:`autm_autoregressive` builds one.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = autm_autoregressive(2, hidden_dims=[16], g="quadratic")
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
        >>> d.log_prob(torch.randn(4, 2)).shape, d.sample((3,)).shape
        (torch.Size([4]), torch.Size([3, 2]))
    """

    def __init__(self, input_dim, autoregressive_nn, g="cubic", num_steps=4, tail_bound=3.0,
                 log_scale_bound=3.0, nonlinear_bound=2.0, single_pass="log_prob", cache_size=1):
        super().__init__(input_dim, autoregressive_nn, g=g, num_steps=num_steps, tail_bound=tail_bound,
                         log_scale_bound=log_scale_bound, nonlinear_bound=nonlinear_bound,
                         single_pass=single_pass, cache_size=cache_size)


class ConditionalAUTMAutoregressive(ConditionalFlowModule):
    r"""Conditional AUTM autoregressive layer: the context enters the Lipschitz MADE conditioner.

    Arguments:
        input_dim: the event size D.
        context_dim: the context size C.
        autoregressive_nn: a :class:`~pyro_flows.nn.LipschitzMADE`
            ``(D, hidden, output_multiplier=P, context_dim=C)``.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> import torch
        >>> t = conditional_autm_autoregressive(3, 2, hidden_dims=[16])
        >>> t.condition(torch.randn(4, 2))(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(self, input_dim, context_dim, autoregressive_nn, g="cubic", num_steps=4,
                 tail_bound=3.0, log_scale_bound=3.0, nonlinear_bound=2.0, single_pass="log_prob",
                 cache_size=1):
        super().__init__(input_dim, context_dim)
        self.settings = _layer_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound,
                                        single_pass, cache_size)
        self.arn = _check_made(self.input_dim, autoregressive_nn, g)
        if self.arn.context_dim != self.context_dim:
            raise ValueError(f"the conditioner's context_dim is {self.arn.context_dim}, expected "
                             f"{self.context_dim}")

    #: zero the conditioner's output layer (context columns included): the identity for every context
    init_identity_ = _AUTMBase.init_identity_

    def _condition(self, context):
        return ConditionedAUTMAutoregressive(self.input_dim, self.arn, context=context, **self.settings)


def _near_identity(last, scale=1e-2):
    """Shrink a conditioner's output layer so that a new layer starts close to the identity map."""
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.mul_(scale)


def _check_lipschitz(lipschitz):
    if isinstance(lipschitz, bool) or not (isinstance(lipschitz, (int, float)) and math.isfinite(lipschitz)
                                           and lipschitz > 0):
        raise ValueError(f"lipschitz must be a finite number > 0, got {lipschitz!r}")


def _made(input_dim, context_dim, hidden_dims, g, lipschitz, bound):
    hidden_dims = _default_hidden(input_dim, hidden_dims, minimum=input_dim)
    _check_lipschitz(lipschitz)
    coeff = float(lipschitz) ** (1.0 / (len(hidden_dims) + 1))
    net = LipschitzMADE(input_dim, hidden_dims, output_multiplier=_num_params(g),
                        context_dim=context_dim or 0, coeff=coeff, bound=bound)
    _near_identity(net.layers[-1])
    return net


def autm_autoregressive(input_dim, hidden_dims=None, g="cubic", num_steps=4, tail_bound=3.0,
                        log_scale_bound=3.0, nonlinear_bound=2.0, lipschitz=2.0, single_pass="log_prob",
                        bound="spectral", cache_size=1):
    """An :class:`AUTMAutoregressive` layer with a Lipschitz MADE conditioner (identity order).

    Arguments:
        input_dim: the event size D.
        hidden_dims: hidden sizes of the MADE (each >= D); ``None`` means ``[max(10 D, 16)] * 2``.
        lipschitz: the guaranteed Lipschitz bound of the conditioner in ``x`` (split evenly over its
            linear layers).
        bound: how the conditioner's layers bound their spectral norms: ``"spectral"`` (exact,
            default), ``"power"`` (no decomposition, so no host synchronisation on a GPU; looser by at
            most 1.7 % up to rank 64, 2.7 % up to 1024) or ``"frobenius"`` (as QuAR's ``bound``).
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> t = autm_autoregressive(4, g="cubic", num_steps=4)
        >>> t(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    input_dim = check_dim(input_dim, "input_dim")
    _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass)
    arn = _made(input_dim, None, hidden_dims, g, lipschitz, bound)
    return AUTMAutoregressive(input_dim, arn, g=g, num_steps=num_steps, tail_bound=tail_bound,
                              log_scale_bound=log_scale_bound, nonlinear_bound=nonlinear_bound,
                              single_pass=single_pass, cache_size=cache_size)


def conditional_autm_autoregressive(input_dim, context_dim, hidden_dims=None, g="cubic", num_steps=4,
                                    tail_bound=3.0, log_scale_bound=3.0, nonlinear_bound=2.0,
                                    lipschitz=2.0, single_pass="log_prob", bound="spectral", cache_size=1):
    """A :class:`ConditionalAUTMAutoregressive` layer with a conditional Lipschitz MADE conditioner.

    Arguments:
        input_dim: the event size D; context_dim: the context size C.
        hidden_dims: hidden sizes of the MADE (each >= D); ``None`` means ``[max(10 D, 16)] * 2``.
        lipschitz: the conditioner's Lipschitz bound in ``x`` (the context does not count).
        bound: see :func:`autm_autoregressive`.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> t = conditional_autm_autoregressive(3, 2)
        >>> t.condition(torch.randn(2)).inv(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """
    input_dim = check_dim(input_dim, "input_dim")
    context_dim = check_dim(context_dim, "context_dim")
    _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass)
    arn = _made(input_dim, context_dim, hidden_dims, g, lipschitz, bound)
    return ConditionalAUTMAutoregressive(input_dim, context_dim, arn, g=g, num_steps=num_steps,
                                         tail_bound=tail_bound, log_scale_bound=log_scale_bound,
                                         nonlinear_bound=nonlinear_bound, single_pass=single_pass,
                                         cache_size=cache_size)


# ----------------------------------------------------------------------------------------------
# coupling
# ----------------------------------------------------------------------------------------------
class ConditionedAUTMCoupling(_AUTMBase):
    r"""AUTM coupling layer with its parameters from a dense conditioner (the maths).

    The explicit map keeps :math:`u_{1:d}` and maps :math:`u_{d+1:D}` by :math:`q(\cdot;
    \theta(u_{1:d}))` elementwise (the paper's eq. 6); stacking with a reversing permutation
    (``pyro_flows.flow``) alternates the halves (eq. 7). ``single_pass`` chooses which direction is
    explicit; the other is one elementwise certified solve.

    Arguments:
        input_dim: the event size D (>= 2).
        split_dim: d, the number of leading coordinates that condition the rest (1 <= d < D).
        hypernet: a network ``(..., d) -> (..., P * (D - d))`` (``P = 3``, or 2 for ``g="linear"``),
            called as ``hypernet(u1, context)`` when ``context`` is given; the helpers build a
            Lipschitz-bounded dense net (e.g. Pyro's ``DenseNN(d, hidden, param_dims=[P * (D - d)])``
            also works, without the bound on how errors in the untouched half propagate).
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, context, cache_size:
            see :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> import torch
        >>> from pyro.nn import DenseNN
        >>> t = ConditionedAUTMCoupling(4, 2, DenseNN(2, [16], param_dims=[3 * 2]), g="cubic")
        >>> x = torch.randn(5, 4)
        >>> bool((t.inv(t(x).clone()) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, input_dim, split_dim, hypernet, g="cubic", num_steps=4, tail_bound=3.0,
                 log_scale_bound=5.0, nonlinear_bound=2.0, single_pass="log_prob", context=None,
                 cache_size=1):
        super().__init__(input_dim, g, num_steps, tail_bound, log_scale_bound, nonlinear_bound,
                         single_pass=single_pass, context=context, cache_size=cache_size)
        self.split_dim = _check_split(self.input_dim, split_dim)
        self.nn = hypernet

    def _bound_networks(self):
        return (self.nn,)

    def _raw(self, u1):
        if self._context is None:
            h = self.nn(u1)
        else:
            u1, ctx = broadcast_context(u1, self._context)
            h = self.nn(u1, ctx)
        P, n = _num_params(self.g), self.input_dim - self.split_dim
        if not isinstance(h, torch.Tensor) or h.shape[-1] != P * n:
            got = tuple(h.shape) if isinstance(h, torch.Tensor) else type(h).__name__
            raise ValueError(f"{type(self).__name__}: the conditioner must return one tensor of shape "
                             f"(..., {P * n}) for g={self.g!r} (param_dims=[{P * n}]), got {got}")
        return u1, h.reshape(h.shape[:-1] + (P, n))

    def _explicit(self, u):
        u1, raw = self._raw(u[..., : self.split_dim])
        v2, logd = self._map_raw(u[..., self.split_dim:], raw)
        return torch.cat([u1, v2], -1), logd.sum(-1)

    def _numerical(self, v):
        check_finite(v, f"{type(self).__name__} input of the numerical direction")
        self._iterations = 0
        self._passes = 1
        v1, raw = self._raw(v[..., : self.split_dim])
        v2 = v[..., self.split_dim:].expand(v1.shape[:-1] + (self.input_dim - self.split_dim,))
        coeffs = self._coefficients(raw)
        start = self._numerical_start(v)
        with torch.no_grad():
            init = None if start is None else start[..., self.split_dim:]
            u2, y2, logd = self._solve(v2, coeffs, init=init if init is not None and init.shape == v2.shape else None)

        def fn_graph(w):
            y, logd = self._map(w, coeffs)
            return y, torch.exp(logd)

        if torch.is_grad_enabled() and (v.requires_grad or raw.requires_grad):
            u2 = implicit_monotone_root(fn_graph, u2, v2)
            y2, logd = self._map(u2, coeffs)  # with its graph
        self._certify(u2, v2, y2, logd)
        return torch.cat([v1, u2], -1), logd.sum(-1)


class AUTMCoupling(ConditionedAUTMCoupling, TransformModule):
    r"""AUTM coupling layer (a ``TransformModule`` owning its dense conditioner).

    Arguments:
        input_dim: the event size D (>= 2).
        split_dim: d (1 <= d < D).
        hypernet: a network ``(..., d) -> (..., P * (D - d))``; :func:`autm_coupling` builds a
            Lipschitz-bounded one.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> import torch, pyro.distributions as dist
        >>> t = autm_coupling(4, hidden_dims=[16], g="cubic")
        >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(4), 1.0).to_event(1), [t])
        >>> d.log_prob(d.sample((3,))).shape
        torch.Size([3])
    """

    def __init__(self, input_dim, split_dim, hypernet, g="cubic", num_steps=4, tail_bound=3.0,
                 log_scale_bound=5.0, nonlinear_bound=2.0, single_pass="log_prob", cache_size=1):
        super().__init__(input_dim, split_dim, hypernet, g=g, num_steps=num_steps, tail_bound=tail_bound,
                         log_scale_bound=log_scale_bound, nonlinear_bound=nonlinear_bound,
                         single_pass=single_pass, cache_size=cache_size)


class ConditionalAUTMCoupling(ConditionalFlowModule):
    r"""Conditional AUTM coupling layer: the context enters the dense conditioner.

    Arguments:
        input_dim: the event size D (>= 2); context_dim: the context size C.
        split_dim: d (1 <= d < D).
        hypernet: a network called as ``hypernet(u1, context) -> (..., P * (D - d))``;
            :func:`conditional_autm_coupling` builds a Lipschitz-bounded one.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> import torch
        >>> t = conditional_autm_coupling(4, 2, hidden_dims=[16])
        >>> t.condition(torch.randn(2)).inv(torch.randn(5, 4)).shape
        torch.Size([5, 4])
    """

    def __init__(self, input_dim, context_dim, split_dim, hypernet, g="cubic", num_steps=4,
                 tail_bound=3.0, log_scale_bound=5.0, nonlinear_bound=2.0, single_pass="log_prob",
                 cache_size=1):
        super().__init__(input_dim, context_dim)
        self.split_dim = _check_split(self.input_dim, split_dim)
        self.settings = _layer_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound,
                                        single_pass, cache_size)
        self.nn = hypernet

    #: zero the conditioner's output layer (context columns included): the identity for every context
    init_identity_ = _AUTMBase.init_identity_

    def _condition(self, context):
        return ConditionedAUTMCoupling(self.input_dim, self.split_dim, self.nn, context=context,
                                       **self.settings)


def _dense(split_dim, context_dim, hidden_dims, out_dim, lipschitz, bound):
    _check_lipschitz(lipschitz)
    net = LipschitzDenseNN(split_dim, hidden_dims, out_dim, context_dim=context_dim or 0,
                            coeff=float(lipschitz) ** (1.0 / (len(hidden_dims) + 1)), bound=bound)
    _near_identity(net.layers[-1])
    return net


def _check_split(input_dim, split_dim):
    if input_dim < 2:
        raise ValueError(f"an AUTM coupling layer needs input_dim >= 2, got {input_dim}")
    if split_dim is None:
        return input_dim // 2
    split_dim = check_dim(split_dim, "split_dim")
    if split_dim >= input_dim:
        raise ValueError(f"split_dim must be in [1, input_dim - 1] = [1, {input_dim - 1}], got {split_dim}")
    return split_dim


def _coupling_parts(input_dim, split_dim, hidden_dims, g):
    input_dim = check_dim(input_dim, "input_dim")
    split_dim = _check_split(input_dim, split_dim)
    hidden_dims = _default_hidden(input_dim, hidden_dims)
    return input_dim, split_dim, hidden_dims, [_num_params(g) * (input_dim - split_dim)]


def autm_coupling(input_dim, split_dim=None, hidden_dims=None, g="cubic", num_steps=4, tail_bound=3.0,
                  log_scale_bound=5.0, nonlinear_bound=2.0, lipschitz=2.0, single_pass="log_prob",
                  bound="spectral", cache_size=1):
    """An :class:`AUTMCoupling` layer with a Lipschitz dense conditioner on the first ``split_dim`` coordinates.

    Arguments:
        input_dim: the event size D (>= 2).
        split_dim: d; ``None`` means ``D // 2``.
        hidden_dims: hidden sizes of the conditioner; ``None`` means ``[max(10 D, 16)] * 2``.
        lipschitz: the conditioner's guaranteed Lipschitz bound in the conditioning half.
        bound: see :func:`autm_autoregressive`.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> t = autm_coupling(4)
        >>> t(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass)
    input_dim, split_dim, hidden_dims, param_dims = _coupling_parts(input_dim, split_dim, hidden_dims, g)
    hypernet = _dense(split_dim, None, hidden_dims, param_dims[0], lipschitz, bound)
    return AUTMCoupling(input_dim, split_dim, hypernet, g=g, num_steps=num_steps, tail_bound=tail_bound,
                        log_scale_bound=log_scale_bound, nonlinear_bound=nonlinear_bound,
                        single_pass=single_pass, cache_size=cache_size)


def conditional_autm_coupling(input_dim, context_dim, split_dim=None, hidden_dims=None, g="cubic",
                              num_steps=4, tail_bound=3.0, log_scale_bound=5.0, nonlinear_bound=2.0,
                              lipschitz=2.0, single_pass="log_prob", bound="spectral", cache_size=1):
    """A :class:`ConditionalAUTMCoupling` layer with a Lipschitz dense conditioner (context appended).

    Arguments:
        input_dim: the event size D (>= 2); context_dim: the context size C.
        split_dim: d; ``None`` means ``D // 2``.
        hidden_dims: hidden sizes of the conditioner; ``None`` means ``[max(10 D, 16)] * 2``.
        lipschitz: the conditioner's guaranteed Lipschitz bound in the conditioning half.
        bound: see :func:`autm_autoregressive`.
        g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass, cache_size: see
            :class:`ConditionedAUTMAutoregressive`.

    Example:
        >>> t = conditional_autm_coupling(4, 3)
        >>> t.condition(torch.randn(3))(torch.randn(2, 4)).shape
        torch.Size([2, 4])
    """
    _check_settings(g, num_steps, tail_bound, log_scale_bound, nonlinear_bound, single_pass)
    context_dim = check_dim(context_dim, "context_dim")
    input_dim, split_dim, hidden_dims, param_dims = _coupling_parts(input_dim, split_dim, hidden_dims, g)
    hypernet = _dense(split_dim, context_dim, hidden_dims, param_dims[0], lipschitz, bound)
    return ConditionalAUTMCoupling(input_dim, context_dim, split_dim, hypernet, g=g, num_steps=num_steps,
                                   tail_bound=tail_bound, log_scale_bound=log_scale_bound,
                                   nonlinear_bound=nonlinear_bound, single_pass=single_pass,
                                   cache_size=cache_size)


register_flow(
    "autm_autoregressive",
    autm_autoregressive,
    conditional_autm_autoregressive,
    permutation="reverse",
    test_kwargs={"hidden_dims": [8], "num_steps": 4},
    has_single_pass=True,
)
register_flow(
    "autm_coupling",
    autm_coupling,
    conditional_autm_coupling,
    permutation="reverse",
    test_kwargs={"hidden_dims": [8], "num_steps": 4},
    has_single_pass=True,
)
