"""Sinusoidal Flow: LDU blocks of triangular shifts around elementwise sinusoidal "D-scales".

One layer (an *LDU block*) is the paper's map from data ``x`` to noise ``z`` (its ``T_l^{-1}``)::

    u = x + s_U(x)            s_U(x)_i depends on x_{>i} only (strictly upper-triangular Jacobian)
    u <- tau_1(u), ..., tau_S(u)   S = num_scales elementwise sinusoidal transformers ("D-scales")
    z = u + s_L(u)            s_L(u)_i depends on u_{<i} only (strictly lower-triangular Jacobian)

Each D-scale acts on every coordinate with its own K sinusoids (``K = num_sinusoids``)::

    tau(u) = u - alpha * sum_k w_k sin(a_k u) cos(a_k u + 2 b_k) / a_k + d
    tau'(u) = 1 - alpha * sum_k w_k cos(2 a_k u + 2 b_k)

with convex weights ``w = softmax(.)``, frequencies ``a = softplus(.)``, phases ``b``, a shift ``d``
and ``alpha = (1 - eps^(1/S)) tanh(.)``.

**Guaranteed bounds (any parameter values, any context).** With ``A = 1 - eps^(1/S)``:

* each D-scale has slope ``tau' in [1 - |alpha|, 1 + |alpha|]``, and the product of a block's S
  slopes, coordinate by coordinate, lies in ``[eps, (2 - eps^(1/S))^S]``, inside ``[eps, 1/eps]``
  (``log(2 - e^(-t)) <= t``). So the per-block, per-coordinate log-slope is in
  ``[log eps, -log eps]`` (``+-6.91`` at the default ``eps = 1e-3``) and the block's log-det in
  ``[D log eps, -D log eps]``, whatever ``num_scales``, ``num_sinusoids`` or the widths;
* each shift is a normalised MADE (masked layers, ELU),
  ``s(x) = min(1, L / B) net(x)`` with ``B`` a guaranteed bound of ``Lip(net)`` (see
  :class:`ShiftNets`), so ``Lip(s) <= shift_lipschitz = L`` (default ``0.5``). A
  strictly triangular shift with ``Lip(s) <= L < 1`` has ``1 - L <= sigma(I + J_s) <= 1 + L``;
* hence the block's Jacobian ``(I + J_L) diag(prod_s tau_s') (I + J_U)`` has singular values in
  ``[(1 - L)^2 eps, (1 + L)^2 / eps]`` (``[2.5e-4, 2.25e3]`` at the defaults): a condition number at
  most ``((1 + L) / (1 - L))^2 / eps^2``, independent of ``D``. (``shift_lipschitz=None`` removes
  the normalisation, as in the paper; the bound then becomes ``sum_{k<D} Lip^k`` per shift, which
  grows with ``D``, and the certificate below uses it.)

**The numerical direction is certified.** The inverse of a block (noise -> data) solves the lower
shift by the fixed point ``u <- z - s_L(u)``, which is exact after ``D`` passes (the Jacobian is
nilpotent) and a contraction when ``L < 1``: it stops earlier once the a-posteriori bound
``L / (1 - L) * |step|`` is below the dtype's tolerance (checked on a schedule: passes 1, 2, 3, 4, 6,
8, 12, ...). Each D-scale is inverted by bracketed Newton (:func:`~pyro_flows.solvers.monotone_root`
on the bracket ``(y - d) / (1 -+ |alpha|)``), stopping on the x-space bound
``|residual| / (1 - |alpha|)``; then the upper shift like the lower one. Finally each stage's
residual (with an allowance for the rounding of its evaluation) is turned into a guaranteed x-space
bound and propagated through the later stages: a shift divides by ``1 - L``, a D-scale by a
guaranteed lower bound of its slope near the solution (``max(1 - |alpha|, tau'(v) - delta M)``, with
``M`` a bound of ``|tau''|``: sharp where the block is well conditioned, the worst case where not).
If the bound exceeds ``atol + rtol |x|_2`` (default ``1e-8`` in float64, ``1e-3`` in float32) a
:class:`~pyro_flows.solvers.ConvergenceWarning` names the bound reached (or
:class:`~pyro_flows.solvers.SolverError` with ``on_fail="raise"``). The bound and iteration counts
of the last solve are in ``last_solver_info`` (a :class:`~pyro_flows.solvers.SolverInfo`).

Choices made where the paper is vague or numerically loose (tested in ``tests/test_sinusoidal.py``):

* **Stable D-scale.** The paper's ``(sin 2b - sin 2(au+b)) / (2a)`` cancels catastrophically for small
  ``a u``. We use the exact identity ``[sin(2au + 2b) - sin 2b] / (2a) = sin(a u) cos(a u + 2b) / a``,
  whose factor ``sin(a u) / a = u sinc(a u)`` has no subtraction; frequencies are floored at
  ``sqrt(tiny)`` of the dtype (the D-scale is then its ``a -> 0`` limit ``u cos(2b)``). The paper's
  additive constant is part of this form (``tau(0) = d``).
* **Log-det** is ``log1p`` of the exact derivative, at the point the map was actually applied to
  (also after a numerical solve): the log-det of the computed map. Shifts are volume preserving.
* **D-scale parameters** are free per-dimension parameters in :class:`Sinusoidal` (the paper's
  "independent conditioner"); in :class:`ConditionalSinusoidal` free parameters plus a dense network
  of the context soft-clamped to ``+-4`` (``4 tanh(h / 4)``), through the same constraints (so the bounds
  hold for every context). The context
  also enters both shift conditioners (not their Lipschitz bound in ``x``).
* **Identity at initialisation** (ReZero, as the paper suggests): ``alpha = 0`` and the shifts' last
  layers are zero. For ``input_dim == 1`` (or ``shift=False``, the paper's "pure D-scale" flow) there are no
  shifts.
* **Direction** (``single_pass``). Pyro's ``_call`` maps noise to data. ``"log_prob"`` (default) keeps
  the paper's orientation: ``_inverse`` (data -> noise, ``log_prob`` of data) is the analytic block
  and ``_call`` (``rsample``) the certified numerical inverse. ``"sample"`` swaps them (cheap
  ``rsample`` for guides, numerical ``log_prob`` of external data).
* **The analytic direction's cost.** A block's S D-scales run as one autograd node
  (:class:`_DScaleChain`) with a closed-form backward, laid out ``(D, K, batch)`` so that the sums
  over the K sinusoids and the parameter gradients' sums over the batch are batched matrix
  products; both shifts' weights and biases are one parameter tensor (:class:`ShiftNets`), their
  masked weights and Lipschitz bounds computed together, the bound product as one node with its
  closed-form gradient. A block trains two parameter tensors, not thirteen.
* **Gradients through the numerical direction** use implicit differentiation
  (:func:`~pyro_flows.solvers.implicit_monotone_root`, :func:`~pyro_flows.solvers.implicit_fixed_point`).
* **Initial frequencies** ``a_k = 2^(k - K/2)``, phases uniform in ``(-pi/2, pi/2)``, uniform weights.
* ``flow()`` puts no permutation between blocks: each LDU block already has a dense Jacobian.
* ``shift="one"`` (an option, not the paper's): one upper shift per block, which then ends by reversing
  the coordinates, so a stack alternates upper and lower shifts (half the networks per block; the
  bounds above hold with one shift factor ``(1 - L)`` / ``(1 + L)`` instead of its square).

References:
    Y. Wei. Sinusoidal Flow: A Fast Invertible Autoregressive Flow. ACML 2021 (arXiv:2110.13344).
    J. Behrmann et al. Invertible Residual Networks. ICML 2019 (Banach fixed-point inversion).
    M. Germain et al. MADE: Masked Autoencoder for Distribution Estimation. ICML 2015.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from pyro.nn import DenseNN

from ..nn.masked import autoregressive_masks
from ..nn.packed import Packing, pack_old_keys
from ..registry import register_flow
from ..solvers import (
    ConvergenceWarning,
    SolverError,
    SolverInfo,
    default_tolerance,
    implicit_fixed_point,
    implicit_monotone_root,
    monotone_root,
)
from ..validation import check_dim, check_finite, check_single_pass
from ._base import ConditionalFlowModule, FlowTransform

__all__ = [
    "ConditionalSinusoidal",
    "ConditionedSinusoidal",
    "ShiftNet",
    "ShiftNets",
    "Sinusoidal",
    "conditional_sinusoidal",
    "dscale",
    "dscale_log_derivative",
    "sinusoidal",
]


# ------------------------------------------------------------------------------------------------
# the elementwise D-scale
# ------------------------------------------------------------------------------------------------
def _kd(t):
    """A ``(..., D, K)`` parameter laid out ``(..., K, D)`` (``(K,)`` becomes ``(K, 1)``), contiguous: a
    transposed view would make the products with ``u`` inherit its strides (``K`` innermost again)."""
    return t.transpose(-1, -2).contiguous() if t.dim() >= 2 else t.unsqueeze(-1)


def _angles(u, alpha, a, b, w):
    """Shared terms: ``u[..., None, :]``, ``theta = a u``, ``phi = a u + 2 b``, ``alpha w`` and
    ``alpha w / a``, laid out ``(..., K, D)``: the sums over the ``K`` sinusoids then reduce an outer
    axis, which vectorises over ``D`` (a sum over a short innermost axis does not).

    Frequencies are floored at ``sqrt(tiny)`` of the dtype (``1.1e-19`` in float32, ``1.5e-154`` in
    float64), so ``a u`` stays a normal number and ``sin(a u) / a`` never divides by zero; every
    function below uses the same floored ``a``, so the map and its derivative stay consistent. Below
    the floor the D-scale equals its ``a -> 0`` limit ``u cos(2b)`` to relative ``a u``.
    """
    a = _kd(a.clamp_min(torch.finfo(a.dtype).tiny ** 0.5))
    uk = u.unsqueeze(-2)
    theta = a * uk
    aw = alpha.unsqueeze(-2) * _kd(w)
    return uk, theta, theta + 2 * _kd(b), aw, aw / a


def dscale(u, alpha, a, b, w, d):
    """The sinusoidal transformer ``tau(u)`` in the cancellation-free product form.

    ``tau(u) = u - alpha * sum_k w_k * sin(a_k u) * cos(a_k u + 2 b_k) / a_k + d``, which equals the
    paper's ``u - alpha * sum_k w_k [sin(2 a_k u + 2 b_k) - sin(2 b_k)] / (2 a_k) + d`` (product-to-sum
    identity) without its subtraction.

    Arguments:
        u: ``(..., D)``.
        alpha, d: broadcastable to ``(..., D)``.
        a, b, w: broadcastable to ``(..., D, K)`` (``a >= 0``, ``w`` convex weights).

    Example:
        >>> import torch
        >>> u = torch.linspace(-2, 2, 5)
        >>> p = (torch.full((5,), 0.5), torch.ones(5, 2), torch.zeros(5, 2), torch.full((5, 2), 0.5))
        >>> dscale(u, *p, torch.zeros(5)).shape
        torch.Size([5])
    """
    _, theta, phi, _, awa = _angles(u, alpha, a, b, w)
    return u - (awa * torch.sin(theta) * torch.cos(phi)).sum(-2) + d


def dscale_log_derivative(u, alpha, a, b, w):
    """``log tau'(u) = log1p(-alpha * sum_k w_k cos(2 a_k u + 2 b_k))``, elementwise, shape of ``u``."""
    _, theta, phi, aw, _ = _angles(u, alpha, a, b, w)
    return torch.log1p(-(aw * torch.cos(theta + phi)).sum(-2))


def _dscale_and_derivative(u, alpha, a, b, w, d):
    """``(tau(u), tau'(u))`` for the Newton solver."""
    _, theta, phi, aw, awa = _angles(u, alpha, a, b, w)
    r = (awa * torch.sin(theta) * torch.cos(phi)).sum(-2)
    return u - r + d, 1 - (aw * torch.cos(theta + phi)).sum(-2)


def _alpha_max(eps, num_scales):
    """``A = 1 - eps^(1/S)``: S D-scales with ``|alpha| <= A`` have a slope product in ``[eps, 1/eps]``."""
    return 1.0 - eps ** (1.0 / num_scales)


def _constrain(raw, eps):
    """Raw D-scale parameters ``(..., S, D, 3K + 2)`` -> stacked ``(alpha, a, b, w, d)``.

    ``alpha, d``: ``(..., S, D)``; ``a, b, w``: ``(..., S, D, K)``; ``|alpha| <= 1 - eps^(1/S)``.
    """
    K = (raw.shape[-1] - 2) // 3
    alpha, a, b, w, d = raw.split([1, K, K, K, 1], dim=-1)  # one split: one backward node
    alpha = _alpha_max(eps, raw.shape[-3]) * torch.tanh(alpha.squeeze(-1))
    return alpha, F.softplus(a), b, torch.softmax(w, dim=-1), d.squeeze(-1)


def _scale(params, s):
    """The parameters of D-scale ``s`` from the stacked ones."""
    alpha, a, b, w, d = params
    return alpha[..., s, :], a[..., s, :, :], b[..., s, :, :], w[..., s, :, :], d[..., s, :]


def _block_terms(params):
    """The point-independent terms of :func:`_angles` for all scales at once, stacked over scales:
    ``(a, 2 b, alpha w, alpha w / a, d)`` (the same operations, so the same rounding)."""
    alpha, a, b, w, d = params
    a = a.clamp_min(torch.finfo(a.dtype).tiny ** 0.5)
    aw = alpha.unsqueeze(-1) * w
    return a, 2 * b, aw, aw / a, d


def _dscale_fast(u, a, two_b, aw, awa, d):
    """``(tau(u), log tau'(u))`` of one D-scale from its :func:`_block_terms` (any batch shapes; laid
    out ``(..., K, D)`` as in :func:`_angles`)."""
    theta = _kd(a) * u.unsqueeze(-2)
    phi = theta + _kd(two_b)
    r = (_kd(awa) * torch.sin(theta) * torch.cos(phi)).sum(-2)
    c = (_kd(aw) * torch.cos(theta + phi)).sum(-2)
    return u - r + d, torch.log1p(-c)


def _dscale_chain(u, params):
    """``(tau_S(... tau_1(u)), sum of the log-slopes over scales and coordinates)``: a block's D-scales.

    With parameters shared by the whole batch (an unconditional block, or one context) this is one
    :class:`_DScaleChain` call (the single-pass hot path); with per-point parameters (a batch of
    contexts) the D-scales run one by one through autograd (:func:`_dscale_fast`).
    """
    a, two_b, aw, awa, d = _block_terms(params)
    if a.dim() == 3 and u.dim() >= 1:
        flat = u.reshape(-1, u.shape[-1])
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, a, two_b, aw, awa, d))
        v, lad = _DScaleChain.apply(need_grad, flat, a, two_b, aw, awa, d)
        return v.reshape(u.shape), lad.reshape(u.shape[:-1])
    lad = 0.0
    for s in range(a.shape[-3]):
        u, log_slope = _dscale_fast(u, a[..., s, :, :], two_b[..., s, :, :], aw[..., s, :, :], awa[..., s, :, :],
                                    d[..., s, :])
        lad = lad + log_slope
    return u, lad.sum(-1)


class _DScaleChain(torch.autograd.Function):
    r"""A block's S D-scales on a batch ``u`` (``(M, D)``) with shared terms (``(S, D, K)``, ``d``:
    ``(S, D)``): ``(tau_S o ... o tau_1 (u), sum_{s, i} log tau_s'(u_s)_i)``, with a closed-form backward.

    The same map as :func:`_dscale_fast` applied scale by scale (the same angles, computed by the same
    operations), laid out as ``(D, K, M)`` so that each sum over the ``K`` sinusoids and each
    parameter gradient's sum over the batch is one batched matrix product. With
    ``theta = a u``, ``phi = theta + 2b``, ``psi = theta + phi`` and ``P = sin(theta) cos(phi)``:
    ``tau = u - sum_k awa P + d`` and ``c = sum_k aw cos(psi)``, ``log tau' = log1p(-c)``; the
    backward uses ``d tau / du = 1 - c``, ``d c / du = -2 sum_k a aw sin(psi)``,
    ``dP / da = u cos(psi)`` and ``dP / d(2b) = -sin(theta) sin(phi)`` (no difference of nearby
    values: accurate for small ``a u``). ``gradcheck`` in float64: ``tests/test_sinusoidal.py``.
    """

    @staticmethod
    def forward(ctx, need_grad, u, a, two_b, aw, awa, d):
        v = u.t().contiguous()  # (D, M)
        a4, b4 = a.unsqueeze(-1), two_b.unsqueeze(-1)  # (S, D, K, 1)
        aw4, awa4 = aw.unsqueeze(-2), awa.unsqueeze(-2)  # (S, D, 1, K)
        lad, saved = None, []
        for s in range(a.shape[0]):
            theta = a4[s] * v.unsqueeze(-2)  # (D, K, M)
            phi = theta + b4[s]
            sin_theta = torch.sin(theta)
            P = sin_theta * torch.cos(phi)
            psi = theta + phi
            cos_psi = torch.cos(psi)
            r = torch.bmm(awa4[s], P).squeeze(-2)  # sum over k: (D, M)
            c = torch.bmm(aw4[s], cos_psi).squeeze(-2)
            if need_grad:
                saved += [v, P, sin_theta * torch.sin(phi), cos_psi, torch.sin(psi), c]
            v = v - r + d[s].unsqueeze(-1)
            log_slope = torch.log1p(-c)
            lad = log_slope if lad is None else lad + log_slope
        if need_grad:
            ctx.save_for_backward(a, aw, awa, *saved)
        return v.t(), lad.sum(0)

    @staticmethod
    def backward(ctx, g_v, g_lad):
        a, aw, awa, *saved = ctx.saved_tensors
        go = g_v.t().contiguous()  # (D, M): the gradient at the current scale's output
        gl = g_lad.unsqueeze(0)  # (1, M): d loss / d log tau'(.)_i, every i
        two_a_aw = (2 * a * aw).unsqueeze(-2)  # (S, D, 1, K)
        sums_p, sums_q, sums_c, sums_s, sums_d = [], [], [], [], []
        for s in reversed(range(a.shape[0])):
            v, P, Q, cos_psi, sin_psi, c = saved[6 * s:6 * s + 6]
            one_minus_c = 1 - c
            q = gl / one_minus_c  # minus d loss / d c
            go3 = go.unsqueeze(1)  # (D, 1, M)
            # sums over the batch (matrix products with (D, M, K) views): (D, n, K)
            sums_p.append(torch.bmm(go3, P.transpose(1, 2)))
            sums_q.append(torch.bmm(go3, Q.transpose(1, 2)))
            sums_c.append(torch.bmm(torch.stack([go * v, q], 1), cos_psi.transpose(1, 2)))
            sums_s.append(torch.bmm(torch.stack([q, q * v], 1), sin_psi.transpose(1, 2)))
            sums_d.append(go.sum(-1))
            go = torch.addcmul(go * one_minus_c, q, torch.bmm(two_a_aw[s], sin_psi).squeeze(-2))
        sum_p, sum_q, sum_c, sum_s = (torch.stack(x[::-1]) for x in (sums_p, sums_q, sums_c, sums_s))
        g_a = 2 * aw * sum_s[..., 1, :] - awa * sum_c[..., 0, :]
        g_two_b = awa * sum_q[..., 0, :] + aw * sum_s[..., 0, :]
        return None, go.t(), g_a, g_two_b, -sum_c[..., 1, :], -sum_p[..., 0, :], torch.stack(sums_d[::-1])


def _init_raw(num_scales, input_dim, K):
    """Identity D-scales (alpha = 0) with geometric frequencies, random phases, uniform weights."""
    raw = torch.zeros(num_scales, input_dim, 3 * K + 2)
    freqs = 2.0 ** (torch.arange(K, dtype=torch.float64) - K / 2)
    raw[..., 1:1 + K] = torch.log(torch.expm1(freqs)).float()  # softplus^{-1}
    raw[..., 1 + K:1 + 2 * K] = (torch.rand(num_scales, input_dim, K) - 0.5) * math.pi
    return raw


# ------------------------------------------------------------------------------------------------
# the shifts
# ------------------------------------------------------------------------------------------------
def _apply(weights, x, ctx=None):
    """Run a MADE given its effective ``[(W, b), ...]`` (ELU between layers)."""
    h = x if ctx is None else torch.cat([x, ctx], dim=-1)
    for i, (W, b) in enumerate(weights):
        if i:
            h = F.elu(h)
        h = F.linear(h, W, b)
    return h


class _Schatten8Product(torch.autograd.Function):
    r"""``prod_j m_j ||W_j||_{S8}`` for stacks ``W_j`` (``(n, r_j, c_j)``), per stack entry (``(n,)``),
    with its closed-form gradient (see :func:`_lipschitz_bound`).

    ``||W||_{S8} = t^(1/8)`` with ``t = tr(G^4) = ||G^2||_F^2`` and ``G`` the Gram matrix on the smaller
    side; ``dt / dW = 8 G^3 W`` (``8 W G^3`` for ``G = W^T W``), so the gradient of the product ``B`` is
    ``B / t_j G_j^3 W_j``: two more small batched products per layer, no graph through the powers.
    """

    @staticmethod
    def forward(ctx, *weights):
        tiny = torch.finfo(weights[0].dtype).tiny
        grams, traces, bound = [], [], None
        for W in weights:
            wide = W.shape[-2] <= W.shape[-1]
            Wt = W.transpose(-1, -2)
            G = torch.bmm(W, Wt) if wide else torch.bmm(Wt, W)
            H = torch.bmm(G, G)
            t = (H * H).sum((-1, -2))
            margin = 1 + (W.shape[-2] + W.shape[-1]) ** 2 * torch.finfo(W.dtype).eps
            f = t.clamp_min(tiny).pow(0.125) * margin
            bound = f if bound is None else bound * f
            grams.append((G, H))
            traces.append(t)
        ctx.save_for_backward(bound, *weights, *(g for pair in grams for g in pair), *traces)
        return bound

    @staticmethod
    def backward(ctx, grad):
        n = (len(ctx.saved_tensors) - 1) // 4
        bound, *rest = ctx.saved_tensors
        weights, grams, traces = rest[:n], rest[n:3 * n], rest[3 * n:]
        tiny = torch.finfo(bound.dtype).tiny
        out = []
        for j, W in enumerate(weights):
            G, H, t = grams[2 * j], grams[2 * j + 1], traces[j]
            # a clamped (zero) trace has a zero gradient, as clamp_min's
            scale = torch.where(t > tiny, grad * bound / t.clamp_min(tiny), 0.0)[:, None, None]
            G3 = torch.bmm(G, H)
            out.append(torch.bmm(G3, W) * scale if W.shape[-2] <= W.shape[-1] else torch.bmm(W, G3) * scale)
        return tuple(out)


def _lipschitz_bound(weights):
    """Guaranteed, differentiable upper bounds of ``Lip(net_i)`` for stacked MADEs (``weights``: the
    masked ``(n, r, c)`` weights of each layer, context columns excluded): the product over layers of
    the Schatten-8 norms ``(sum_j sigma_j^8)^(1/8) = ||(W W^T)^2||_F^(1/4)`` (two small batched
    products each), each inflated by ``1 + (r + c)^2 eps`` for the rounding of those products (ELU is
    1-Lipschitz). The Schatten-8 norm is exact for rank one and within ``rank^(1/8)`` of ``||W||_2``
    (``1.3`` for rank 8, ``1.7`` for 64); no SVD, no host synchronisation."""
    return _Schatten8Product.apply(*weights)


class ShiftNets(torch.nn.Module):
    """Strictly triangular shifts ``s_i(x) = k_i net_i(x, context)``, ``Lip_x(s_i) <= lipschitz``, of
    equal sizes, with all their weights and biases in one parameter tensor.

    Each ``net_i`` is a MADE (masks of :func:`~pyro_flows.nn.masked.autoregressive_masks`, one output
    per coordinate, ELU) used unnormalised; ``k_i = min(1, lipschitz / B_i)`` where ``B_i`` is the
    product of the layers' guaranteed spectral bounds (Schatten-8 norms of the masked weights,
    context columns excluded, see :func:`_lipschitz_bound`), so ``Lip_x(s_i) <= min(B_i, lipschitz)``
    for every parameter value and context. Normalising the whole network once (not each layer) leaves
    the network free to distribute its gain over layers. ``upper[i]`` reverses input and output
    order (flipped masks of the first and last layers), so output ``j`` depends on ``x_{>j}``
    instead of ``x_{<j}``. The last layers start at zero (the identity block at initialisation; the
    bound's derivative is never evaluated at zero: it is clamped away).

    The parameters live in :attr:`params` (layer by layer: the weights ``(n, out, in)``, then the
    biases ``(n, out)``, as views, :meth:`layers`): an optimiser updates one tensor, and the
    nets' masked weights and bounds are computed together (one batched product per layer). The
    masks are non-persistent buffers (they follow from the sizes). ``nets[i]`` is a
    :class:`ShiftNet` handle of net ``i``.

    Arguments:
        input_dim: D.
        hidden_dims: hidden widths.
        context_dim: context size (0: none).
        lipschitz: the bound ``L`` (``None``: no normalisation; :meth:`lipschitz` still reports a
            guaranteed bound).
        upper: one flag per net: strictly upper (``True``) or strictly lower triangular.

    Example:
        >>> import torch
        >>> s = ShiftNets(3, [12], lipschitz=0.5)
        >>> upper, lower = s.nets
        >>> bool(upper.lipschitz() <= 0.5), lower(torch.randn(4, 3)).shape
        (True, torch.Size([4, 3]))
    """

    def __init__(self, input_dim, hidden_dims, context_dim=0, lipschitz=0.5, upper=(True, False)):
        super().__init__()
        self.input_dim, self.context_dim = input_dim, context_dim
        self.bound = None if lipschitz is None else float(lipschitz)
        self.upper = tuple(bool(u) for u in upper)
        masks = autoregressive_masks(input_dim, hidden_dims, context_dim, 1)
        weights, stacked = [[] for _ in masks], [[] for _ in masks]
        for up in self.upper:  # the initialisation of masked Lipschitz layers, net by net
            for j, m in enumerate(masks):
                w = torch.empty(m.shape)
                torch.nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                w *= (m.shape[1] / m.sum(1, keepdim=True).clamp(min=1)).sqrt()
                if up and j == 0:
                    m = torch.cat([m[:, :input_dim].flip(-1), m[:, input_dim:]], -1)
                elif up and j == len(masks) - 1:
                    m = m.flip(0)
                weights[j].append(w if j < len(masks) - 1 else torch.zeros_like(w))
                stacked[j].append(m)
        self._shapes = []
        for j, m in enumerate(stacked):
            self.register_buffer(f"_mask{j}", torch.stack(m), persistent=False)
            self._shapes += [(len(self.upper),) + tuple(masks[j].shape), (len(self.upper), masks[j].shape[0])]
        self._packing = Packing(self._shapes)
        parts = [t for w, m in zip(weights, masks) for t in (torch.stack(w), torch.zeros(len(self.upper), m.shape[0]))]
        self.params = torch.nn.Parameter(self._packing.pack(parts))
        self.nets = tuple(ShiftNet(self, i) for i in range(len(self.upper)))

    def layers(self):
        """``[(W, b), ...]`` per layer: unmasked weights ``(n, out, in)`` and biases ``(n, out)``,
        views of :attr:`params` (write to them under ``torch.no_grad()``)."""
        views = self._packing.unpack(self.params)
        return list(zip(views[::2], views[1::2]))

    def zero_output_(self):
        """Zero every net's last layer (weights and biases): every shift becomes 0."""
        with torch.no_grad():
            for t in self.layers()[-1]:
                t.zero_()
        return self

    def weights(self, bounds=False):
        """Effective ``[(W, b), ...]`` of each net (a list over nets), with the normalisation folded
        into the last layer, computed together; with ``bounds=True`` also the guaranteed ``Lip_x`` of
        each as used, ``min(B_i, L)``, as floats (one host sync: the numerical direction only)."""
        layers = [(W * getattr(self, f"_mask{j}"), b) for j, (W, b) in enumerate(self.layers())]
        first = layers[0][0]
        B = _lipschitz_bound([first[..., :self.input_dim] if self.context_dim else first]
                             + [W for W, _ in layers[1:]])
        if self.bound is not None:
            k = torch.clamp(self.bound / B, max=1.0)
            W, b = layers[-1]
            layers[-1] = (W * k[:, None, None], b * k[:, None])
        per_net = [list(zip(W.unbind(0), b.unbind(0))) for W, b in layers]  # unbind: one backward node
        out = [[layer[i] for layer in per_net] for i in range(len(self.upper))]
        if not bounds:
            return out
        lip = (B if self.bound is None else B.clamp(max=self.bound)).detach().tolist()
        return out, lip

    def lipschitz(self):
        """Guaranteed bounds of each ``Lip_x(s_i)`` (a ``(n,)`` tensor, no gradient)."""
        with torch.no_grad():
            _, lip = self.weights(bounds=True)
        return torch.tensor(lip, dtype=self.params.dtype, device=self.params.device)


class ShiftNet:
    """Net ``i`` of a :class:`ShiftNets`: ``s(x, context)``, :meth:`weights`, :meth:`lipschitz` (a
    handle, not a module: the parameters are the :class:`ShiftNets`')."""

    def __init__(self, nets, index):
        self._nets, self._index = nets, index

    def weights(self):
        """Effective ``[(W, b), ...]`` (see :meth:`ShiftNets.weights`)."""
        return self._nets.weights()[self._index]

    def lipschitz(self):
        """A guaranteed bound of ``Lip_x(s)`` (a float, no gradient)."""
        return float(self._nets.lipschitz()[self._index])

    def __call__(self, x, context=None):
        return _apply(self.weights(), x, context)


def _pack_old_shift_keys(state_dict, prefix, *args):
    """Load state dicts saved with the two shifts as separate modules (``upper_nn.net.layers.j.weight``,
    ``.bias``, ``.mask`` and the same for ``lower_nn``): their weights and biases, packed."""
    n = 0
    while prefix + f"upper_nn.net.layers.{n}.weight" in state_dict:
        n += 1
    old = [tuple(f"{net}.net.layers.{j}.{kind}" for net in ("upper_nn", "lower_nn"))
           for j in range(n) for kind in ("weight", "bias")]
    masks = [f"{net}.net.layers.{j}.mask" for net in ("upper_nn", "lower_nn") for j in range(n)]
    pack_old_keys(state_dict, prefix, old, "shifts.params", drop=masks)


def _shift_lower_bound(L, D):
    """``m`` with ``|(x + s(x)) - (y + s(y))| >= m |x - y|`` for a strictly triangular ``s`` of
    Lipschitz constant ``L`` in ``D`` dimensions: ``1 - L`` if ``L < 1``, else ``1 / sum_{k<D} L^k``."""
    if L < 1:
        return 1.0 - L
    return 1.0 / sum(L ** k for k in range(D))


#: default x-space tolerance of the certified inverse, per dtype (float32: the conformance bar; the
#: residual floor of float32 over the guaranteed slope bound is about ``6e-8 |z| / 2.5e-4`` at the
#: default bounds, so float32 inverses of badly conditioned blocks warn).
_CERTIFIED_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}

#: the context moves each raw D-scale parameter by at most this much (a soft clamp), so frequencies
#: and offsets stay within a fixed distance of the free parameters for every context.
_CONTEXT_RANGE = 4.0

def _shift_residual(weights, u, z, ctx, eps):
    """``|u + s(u) - z|_2`` plus an allowance for the rounding of its evaluation (a few ulps of each
    term, and ``sqrt(n)`` ulps for each length-``n`` sum in the network: the probabilistic rounding
    bound of Higham and Mary)."""
    out = _apply(weights, u, ctx)
    width = sum(W.shape[-1] for W, _ in weights)
    slack = (4 + math.sqrt(width)) * eps * (u.abs() + out.abs() + z.abs())
    return ((u + out - z).abs() + slack).norm(dim=-1)


def _shift_nets(shift):
    """The ``upper`` flags of a block's :class:`ShiftNets` for its ``shift`` argument (``()``: none)."""
    if isinstance(shift, str):
        if shift != "one":
            raise ValueError(f"shift must be True, False or 'one', got {shift!r}")
        return (True,)
    return (True, False) if shift else ()


_CHECKS = frozenset([1, 2, 3, 4] + [c * 2 ** k for k in range(1, 20) for c in (3, 4)])


def _check_args(input_dim, hidden_dims, num_scales, num_sinusoids, eps, single_pass, max_iter,
                shift_lipschitz, on_fail):
    input_dim = check_dim(input_dim, "input_dim")
    check_dim(num_scales, "num_scales")
    check_dim(num_sinusoids, "num_sinusoids")
    check_dim(max_iter, "max_iter")
    check_single_pass(single_pass)
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise ValueError(f"eps must be a number in (0, 1), got {eps!r}")
    if shift_lipschitz is not None and not (isinstance(shift_lipschitz, (int, float)) and shift_lipschitz > 0):
        raise ValueError(f"shift_lipschitz must be None or a positive number, got {shift_lipschitz!r}")
    if on_fail not in ("warn", "raise"):
        raise ValueError(f"on_fail must be 'warn' or 'raise', got {on_fail!r}")
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


# ------------------------------------------------------------------------------------------------
# the transform
# ------------------------------------------------------------------------------------------------
class ConditionedSinusoidal(FlowTransform):
    """One Sinusoidal-Flow LDU block with parameters taken from callables (the maths lives here).

    Arguments:
        input_dim: the event size ``D``.
        shifts: the strictly upper- and lower-triangular shifts ``s_U``, ``s_L``: a
            :class:`ShiftNets` of two nets (``upper=(True, False)``), or ``None`` (no shifts).
        scales: ``context -> (alpha, a, b, w, d)``, the constrained D-scale parameters stacked over
            scales (``(..., S, D)`` and ``(..., S, D, K)``), called with the context as given, so
            they broadcast against the input batch.
        context: the context the callables are bound to (``None`` for an unconditional block).
        single_pass: ``"log_prob"`` (the paper's: ``log_prob`` analytic, sampling numerical) or
            ``"sample"`` (sampling analytic, ``log_prob`` numerical).
        atol, rtol: x-space tolerance of the numerical direction's certificate,
            ``|x - x*|_2 <= atol + rtol |x|_2`` (default ``1e-8`` in float64, ``1e-3`` in float32).
        max_iter: Newton iterations per D-scale.
        on_fail: what happens when the certificate is not met: ``"warn"``
            (:class:`~pyro_flows.solvers.ConvergenceWarning`) or ``"raise"``
            (:class:`~pyro_flows.solvers.SolverError`).
        cache_size: Pyro's transform cache size.

    Attributes:
        last_solver_info: the last numerical solve, a :class:`~pyro_flows.solvers.SolverInfo`:
            ``error_bound`` the largest certified x-space error bound (also its ``residual``: the
            certificate is the stage residuals carried into x-space), ``iterations`` the most
            passes or Newton iterations of any stage, ``detail`` ``{"lower_shift": passes,
            "dscale_newton": [iterations per scale], "upper_shift": passes}``.

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.sinusoidal import ConditionedSinusoidal
        >>> p = (torch.full((1, 2), 0.5), torch.ones(1, 2, 3), torch.zeros(1, 2, 3),
        ...      torch.full((1, 2, 3), 1 / 3), torch.zeros(1, 2))
        >>> t = ConditionedSinusoidal(2, None, lambda ctx: p)
        >>> x = torch.randn(4, 2)
        >>> bool((t.inv(t(x)) - x).abs().max() < 1e-4)
        True
    """

    def __init__(self, input_dim, shifts, scales, context=None, *, single_pass="log_prob",
                 atol=None, rtol=None, max_iter=100, on_fail="warn", cache_size=1):
        super().__init__(input_dim, cache_size=cache_size, context=context)
        if on_fail not in ("warn", "raise"):
            raise ValueError(f"on_fail must be 'warn' or 'raise', got {on_fail!r}")
        self._shifts = shifts
        self._scales_fn = scales
        self.single_pass = check_single_pass(single_pass)
        self.atol, self.rtol = atol, rtol
        self.max_iter = check_dim(max_iter, "max_iter")
        self.on_fail = on_fail
        self.last_solver_info = None

    # -- the analytic LDU map (data -> noise) ---------------------------------------------------
    def _flips(self):
        """Whether the block ends by reversing the coordinates: with one (upper) shift per block, so that
        consecutive blocks alternate upper and lower shifts in the original order."""
        return self._shifts is not None and len(self._shifts.upper) == 1

    def _shift_weights(self, bounds=False):
        """``((upper, lower), (L_U, L_L))``: the shifts' effective weights (``None`` where absent) and,
        with ``bounds``, their guaranteed Lipschitz bounds as floats (a host sync: numerical direction)."""
        if self._shifts is None:
            return (None, None), (0.0, 0.0)
        if bounds:
            weights, lips = self._shifts.weights(bounds=True)
        else:
            weights, lips = self._shifts.weights(), [0.0, 0.0]
        if len(weights) == 1:
            return (weights[0], None), (lips[0], 0.0)
        return tuple(weights), tuple(lips)

    def _ldu(self, x, output=True):
        """``(z, log|det dz/dx|)`` of the LDU block at data ``x`` (``z`` is None if not ``output``)."""
        x, ctx = self._broadcast_context(x)
        params = self._scales_fn(self._context)
        (upper, lower), _ = self._shift_weights()
        z, lad = self._ldu_with(x, ctx, params, upper, lower, output)
        return (z.flip(-1) if z is not None and self._flips() else z), lad

    @staticmethod
    def _ldu_with(x, ctx, params, upper, lower, output=True):
        u = x if upper is None else x + _apply(upper, x, ctx)
        u, lad = _dscale_chain(u, params)
        if not output:
            return None, lad
        z = u if lower is None else u + _apply(lower, u, ctx)
        return z, lad

    # -- its certified numerical inverse (noise -> data) ----------------------------------------
    def _tolerances(self, dtype):
        tol = _CERTIFIED_TOL.get(dtype, 3e-2)
        return (tol if self.atol is None else float(self.atol)), (tol if self.rtol is None else float(self.rtol))

    def _solve_shift(self, weights, z, ctx, L):
        """Solve ``u + s(u) = z`` (no graph): ``u <- z - s(u)``, exact after ``D`` passes; stops earlier
        when the contraction bound ``L / (1 - L) * |step|_2`` is below the dtype's tolerance."""
        D = self.input_dim
        c = L / (1 - L) if L < 1 else math.inf
        tol = default_tolerance(z.dtype)
        u = z
        for k in range(1, D + 1):
            u_new = z - _apply(weights, u, ctx)
            if k < D and k in _CHECKS:
                step = (u_new - u).norm(dim=-1)
                bound = step * c if c < math.inf else step
                if bool((bound <= tol * (1 + u_new.abs().amax(-1)) if c < math.inf else step == 0).all()):
                    return u_new, k
            u = u_new
        return u, D

    def _solve_dscale(self, y, params):
        """Solve ``tau(u) = y`` elementwise (no graph) by bracketed Newton, stopping on the x-space
        bound ``|tau(u) - y| / (1 - |alpha|) <= tol (1 + |y - d| / (1 + |alpha|))`` (``<= tol (1 + |u|)``)."""
        alpha, d = params[0], params[4]
        A = alpha.abs()
        t = y - d
        r1, r2 = t / (1 - A), t / (1 + A)  # tau(0) = d and tau' in [1 - |alpha|, 1 + |alpha|]
        lo, hi = torch.minimum(r1, r2), torch.maximum(r1, r2)
        tol = default_tolerance(y.dtype)
        pad = tol * (1 + hi.abs())
        atol = (1 - A) * tol * (1 + t.abs() / (1 + A))
        u, info = monotone_root(lambda v: _dscale_and_derivative(v, *params), y, init=t,
                                lower=lo - pad, upper=hi + pad, atol=atol, rtol=0.0,
                                max_iter=self.max_iter, on_fail="ignore", return_info=True)
        return u, info.iterations

    def _ldu_inverse(self, z):
        """``(x, log|det dz/dx| at x)``: the data ``x`` whose LDU image is ``z``, certified."""
        check_finite(z, f"{type(self).__name__} input of the numerical inverse")
        z, ctx = self._broadcast_context(z)
        if self._flips():
            z = z.flip(-1)  # undo the block's final reversal (exact)
        D = self.input_dim
        params = self._scales_fn(self._context)
        S = params[0].shape[-2]
        (upper, lower), (L_U, L_L) = self._shift_weights(bounds=True)
        info = {"lower_shift": 0, "dscale_newton": [0] * S, "upper_shift": 0}

        def detach(ws):
            return None if ws is None else [(W.detach(), None if b is None else b.detach()) for W, b in ws]

        pd = tuple(p.detach() for p in params)
        upd, lod = detach(upper), detach(lower)
        cd = None if ctx is None else ctx.detach()
        # 1. solve without a graph, keeping the point each stage produced
        with torch.no_grad():
            u_lower = z.detach()
            if lod is not None:
                u_lower, info["lower_shift"] = self._solve_shift(lod, u_lower, cd, L_L)
            roots, u = [None] * S, u_lower
            for s in reversed(range(S)):
                u, info["dscale_newton"][s] = self._solve_dscale(u, _scale(pd, s))
                roots[s] = u
            if upd is not None:
                x_star, info["upper_shift"] = self._solve_shift(upd, u, cd, L_U)
        # 2. attach implicit-function gradients (without grad: one more exact correction each)
        u = z
        if lower is not None:
            u = implicit_fixed_point(lambda v: z - _apply(lower, v, ctx), u_lower, max_iter=D + 1,
                                     on_fail="ignore")
        stages = [u.detach()]  # the input of each D-scale solve, then the input of the upper shift
        lad = 0.0
        for s in reversed(range(S)):
            p = _scale(params, s)
            u = implicit_monotone_root(lambda v, p=p: _dscale_and_derivative(v, *p), roots[s], u)
            lad = lad + dscale_log_derivative(u, *p[:4])
            stages.append(u.detach())
        lad = lad.sum(-1)
        x = u
        if upper is not None:
            x = implicit_fixed_point(lambda v: u - _apply(upper, v, ctx), x_star, max_iter=D + 1,
                                     on_fail="ignore")
        # 3. certify the returned x
        with torch.no_grad():
            xd = x.detach()
            bound = self._certify(z.detach(), stages, xd, pd, upd, lod, cd, L_U, L_L)
            atol, rtol = self._tolerances(z.dtype)
            failed = bound > atol + rtol * xd.norm(dim=-1)
            worst = float(bound.max()) if bound.numel() else 0.0
            bad = bool(failed.any())
            iterations = max([info["lower_shift"] or 0, info["upper_shift"] or 0, *info["dscale_newton"]])
            self.last_solver_info = SolverInfo(iterations, worst, not bad, worst, info)
            if bad:
                msg = (f"{type(self).__name__}: the numerical inverse reached a certified x-space error "
                       f"bound of {worst:.3g} (tolerance atol={atol:.3g} + rtol={rtol:.3g} * |x|) on "
                       f"{int(failed.sum())} of {failed.numel()} points; the block is too "
                       f"ill-conditioned for this dtype: lower eps or shift_lipschitz, or use float64")
                if self.on_fail == "raise":
                    raise SolverError(msg, residual=worst)
                warnings.warn(msg, ConvergenceWarning, stacklevel=4)
        return x, lad

    def _certify(self, z, stages, x, params, upper, lower, ctx, L_U, L_L):
        """A guaranteed bound of ``|x - x*|_2`` per point (``x*`` the exact preimage of ``z``), from the
        residual of each stage and how the errors of its input propagate:

        * a shift ``v + s(v) = t`` with ``Lip(s) <= L``: ``|v - v*| <= (|residual| + |t - t*|) / m``,
          ``m = 1 - L`` (:func:`_shift_lower_bound` for ``L >= 1``);
        * a D-scale, elementwise: ``|v - v*| <= (|residual| + |t - t*|) / m_loc``, where the slope on
          the interval that holds both is at least ``m_loc = max(1 - |alpha|, tau'(v) - delta M)``,
          ``delta = (|residual| + |t - t*|) / (1 - |alpha|)`` and ``M = 2 |alpha| sum_k w_k a_k``
          bounds ``|tau''|``. The local slope makes the bound sharp where the block is well
          conditioned; the global one keeps it guaranteed everywhere.
        """
        D = self.input_dim
        eps = torch.finfo(z.dtype).eps
        err = torch.zeros_like(z[..., 0])
        if lower is not None:
            u = stages[0]
            err = _shift_residual(lower, u, z, ctx, eps) / _shift_lower_bound(L_L, D)
        err = err.unsqueeze(-1)  # elementwise bound of the D-scales' input error
        for i, s in enumerate(reversed(range(params[0].shape[-2]))):
            alpha, a, b, w, d = _scale(params, s)
            t, v = stages[i], stages[i + 1]
            value, slope = _dscale_and_derivative(v, alpha, a, b, w, d)
            # the residual, plus what rounding may hide in it (|sin(a v) / a| <= |v|, sum |alpha w| <= 1)
            e = (value - t).abs() + 8 * eps * (t.abs() + 2 * v.abs() + d.abs()) + err
            A = alpha.abs()
            curvature = 2 * A * (w * a).sum(-1)
            m_loc = torch.maximum(1 - A, slope - e / (1 - A) * curvature)
            err = e / m_loc
        err = err.norm(dim=-1)
        if upper is not None:
            err = (_shift_residual(upper, x, stages[-1], ctx, eps) + err) / _shift_lower_bound(L_U, D)
        return err

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
        state["last_solver_info"] = None
        return state


class Sinusoidal(ConditionedSinusoidal, TransformModule):
    """One LDU block of Sinusoidal Flow with its own parameters (a ``TransformModule``).

    Arguments:
        input_dim: the event size ``D``.
        hidden_dims: hidden widths of the two shift conditioners (each ``>= input_dim``);
            ``None`` means ``[10 D, 10 D]``.
        num_scales: D-scales per block (paper: 4).
        num_sinusoids: sinusoids ``K`` per D-scale (paper: 4).
        shift: ``True`` (the paper's LDU block, two shift conditioners); ``"one"``: only the upper shift,
            and the block ends by reversing the coordinates (exact, volume preserving), so consecutive
            blocks alternate upper and lower shifts in the original order: one network per block
            instead of two; ``False``: a block of pure D-scales (no shift conditioners).
        eps: the block's slope floor: the product of its D-scale slopes lies in ``[eps, 1/eps]``
            for every coordinate and every parameter value (each ``|alpha| <= 1 - eps^(1/S)``).
        shift_lipschitz: guaranteed ``Lip(s_U), Lip(s_L) <= shift_lipschitz`` (``None``: not
            normalised, as in the paper; the condition bound then grows with ``D``).
        single_pass, atol, rtol, max_iter, on_fail, cache_size: see :class:`ConditionedSinusoidal`.

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
                 shift_lipschitz=0.5, single_pass="log_prob", atol=None, rtol=None, max_iter=100,
                 on_fail="warn", cache_size=1):
        hidden_dims = _check_args(input_dim, hidden_dims, num_scales, num_sinusoids, eps, single_pass,
                                  max_iter, shift_lipschitz, on_fail)
        super().__init__(input_dim, None, self._scales, single_pass=single_pass, atol=atol,
                         rtol=rtol, max_iter=max_iter, on_fail=on_fail, cache_size=cache_size)
        self.eps = float(eps)
        self.num_scales, self.num_sinusoids = int(num_scales), int(num_sinusoids)
        self.raw_scales = torch.nn.Parameter(_init_raw(num_scales, input_dim, num_sinusoids))
        nets = _shift_nets(shift)
        if nets and input_dim > 1:
            self.shifts = ShiftNets(input_dim, hidden_dims, 0, shift_lipschitz, upper=nets)
            self.upper_nn, self.lower_nn = (self.shifts.nets + (None,))[:2]  # handles of s_U and s_L
            object.__setattr__(self, "_shifts", self.shifts)  # a plain reference, not a second registration
        self._register_load_state_dict_pre_hook(_pack_old_shift_keys)

    def _scales(self, ctx):
        return _constrain(self.raw_scales, self.eps)

    def init_identity_(self):
        """Make the block exactly the identity map (log-det exactly 0); returns ``self``.

        Every D-scale gets ``alpha = 0`` and ``d = 0`` (so ``tau(u) = u - 0 + 0`` and
        ``log tau' = log1p(0)``), and both shift networks a zero output layer (so ``s(x) = 0``);
        frequencies, phases, weights and hidden layers keep their values, so the gradient in
        ``alpha``, ``d`` and the shifts' output layers does not vanish. In the conditional block
        the D-scale context network's output layer is zeroed too (the identity for every context).

        Example:
            >>> import torch
            >>> from pyro_flows.transforms.sinusoidal import Sinusoidal
            >>> t = Sinusoidal(3, hidden_dims=[16]).init_identity_()
            >>> x = torch.randn(4, 3)
            >>> bool((t(x) == x).all())
            True
        """
        with torch.no_grad():
            self.raw_scales[..., 0].zero_()
            self.raw_scales[..., -1].zero_()
            if getattr(self, "shifts", None) is not None:
                self.shifts.zero_output_()
            if getattr(self, "scale_nn", None) is not None:
                self.scale_nn.layers[-1].weight.zero_()
                self.scale_nn.layers[-1].bias.zero_()
        return self


class ConditionalSinusoidal(ConditionalFlowModule):
    """A conditional LDU block: the context drives both shift conditioners and the D-scales.

    The D-scale raw parameters are free parameters plus ``4 tanh(DenseNN(context) / 4)`` (last layer
    zero at initialisation; the soft clamp keeps frequencies and offsets within a fixed distance of
    the free parameters, so no context can blow up the block's scale), through the same constraints as
    in :class:`Sinusoidal`; the shifts see the
    context as extra inputs that do not enter their Lipschitz bound in ``x``. So every bound of the
    module docstring holds for every context.

    Arguments:
        input_dim: the event size ``D``.
        context_dim: the context size ``C``.
        hidden_dims: hidden widths of the shift conditioners and of the D-scale network
            (``None``: ``[10 D, 10 D]``).
        num_scales, num_sinusoids, shift, eps, shift_lipschitz, single_pass, atol, rtol, max_iter,
            on_fail, cache_size: as in :class:`Sinusoidal`.
        nonlinearity: activation of the D-scale context network (default ``torch.nn.ReLU()``).

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
                 eps=1e-3, shift_lipschitz=0.5, single_pass="log_prob", atol=None, rtol=None, max_iter=100,
                 on_fail="warn", nonlinearity=None, cache_size=1):
        hidden_dims = _check_args(input_dim, hidden_dims, num_scales, num_sinusoids, eps, single_pass,
                                  max_iter, shift_lipschitz, on_fail)
        super().__init__(input_dim, context_dim)
        self.eps = float(eps)
        self.num_scales, self.num_sinusoids = int(num_scales), int(num_sinusoids)
        self.options = {"single_pass": single_pass, "atol": atol, "rtol": rtol, "max_iter": max_iter,
                        "on_fail": on_fail, "cache_size": cache_size}
        act = torch.nn.ReLU() if nonlinearity is None else nonlinearity
        self.raw_scales = torch.nn.Parameter(_init_raw(num_scales, input_dim, num_sinusoids))
        self.scale_nn = DenseNN(context_dim, hidden_dims, param_dims=[self.raw_scales.numel()],
                                nonlinearity=act)
        with torch.no_grad():
            self.scale_nn.layers[-1].weight.zero_()
            self.scale_nn.layers[-1].bias.zero_()
        nets = _shift_nets(shift)
        self.shift = bool(nets) and input_dim > 1
        if self.shift:
            self.shifts = ShiftNets(input_dim, hidden_dims, context_dim, shift_lipschitz, upper=nets)
            self.upper_nn, self.lower_nn = (self.shifts.nets + (None,))[:2]  # handles of s_U and s_L
        self._register_load_state_dict_pre_hook(_pack_old_shift_keys)

    init_identity_ = Sinusoidal.init_identity_

    def _scales(self, ctx):
        h = self.scale_nn(ctx).reshape(ctx.shape[:-1] + self.raw_scales.shape)
        return _constrain(self.raw_scales + _CONTEXT_RANGE * torch.tanh(h / _CONTEXT_RANGE), self.eps)

    def _condition(self, context):
        return ConditionedSinusoidal(self.input_dim, self.shifts if self.shift else None, self._scales,
                                     context=context, **self.options)


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
