"""The Lipschitz network ``G`` of a Monotone Flow block, with analytic Jacobians.

``G(w, context)`` is a chain of :class:`~pyro_flows.nn.LipschitzLinear` layers and 1-Lipschitz
activations (CPila by default), or an i-DenseNet chain (``dense=True``); ``Lip_w(G) <= L < 1`` for any
weights (see :class:`MonotoneNet`). The block that uses it is
:class:`pyro_flows.transforms.monotone.ConditionedMonotone`.

Speed. A block evaluates ``G`` tens of times per call (fixed-point iterations), so the effective
(spectrally normalised) weights are prepared once per call (:meth:`MonotoneNet.prepare`) and every
evaluation reuses them. With CPila, the activation's doubling ``u -> [u, -u]``, its shift and its two
scales are folded into the prepared weights (:meth:`pyro_flows.nn.cpila.CPila.fold`), so an
evaluation is one ``addmm`` and a few elementwise ops per layer, with no concatenation.

References:
    Ahn, Kim, Hong, Kim. Invertible Monotone Operators for Normalizing Flows. NeurIPS 2022.
    Perugachi-Diaz, Tomczak, Bhulai. Invertible DenseNets with Concatenated LipSwish. NeurIPS 2021.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_dim
from .activations import get_activation
from .cpila import CPila
from .lipschitz import MARGIN, LayerwiseBounds, LipschitzLinear

__all__ = ["MonotoneNet", "folded_exact_step"]


def _check_lipschitz(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"lipschitz must be a number in (0, 1), got {value!r}")
    return float(value)


class MonotoneNet(LayerwiseBounds, nn.Module):
    """The Lipschitz network ``G(w, context)`` of a Monotone Flow block.

    Bound: plain chain of ``n`` linear layers, each a :class:`~pyro_flows.nn.LipschitzLinear` with
    ``coeff = L^(1/n)`` (exact spectral norm plus a margin), activations 1-Lipschitz, so
    ``Lip_w(G) <= L`` for any weights and any context (the context columns of the first layer are
    excluded from its bound: for a fixed context they only shift). ``dense=True``: block ``i`` maps
    ``h -> [eta1 h, eta2 act(W_i h)]`` with ``eta1^2 + eta2^2 = 1`` and ``Lip(W_i) <= 1``, so each block
    is 1-Lipschitz and the output layer (``coeff = L``) gives ``Lip_w(G) <= L``.

    All layers' bounds come from ONE computation (:class:`~pyro_flows.nn.lipschitz.LayerwiseBounds`), in
    every code path (:meth:`prepare`, :meth:`lipschitz_bound`, with or without gradients), and in a stack
    of flow layers from the stack's one call for all its networks.

    Arguments:
        input_dim: D.
        hidden_dims: widths of the hidden layers (growth sizes when ``dense=True``); at least one.
        context_dim: size of a context concatenated at the first layer (0: none).
        activation: ``"cpila"`` (default), ``"lipswish"``, or another registered Lipschitz activation.
        lipschitz: the bound ``L < 1`` of ``Lip_w(G)``.
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
        self.linears.append(LipschitzLinear(width, self.input_dim,
                                            coeff=self.lipschitz_target if self.dense else per_layer))
        # a small output layer: G starts close to 0, so the flow starts close to the identity map
        with torch.no_grad():
            self.linears[-1].weight.mul_(0.1)
        if self.dense:
            self.raw_eta = nn.Parameter(torch.zeros(len(hidden_dims), 2))
        self._folded = not self.dense and all(isinstance(a, CPila) for a in self.activations)

    @property
    def lipschitz_guarantee(self) -> float:
        """A bound of ``Lip_w(G)`` valid for every parameter value (no computation): ``L (1 + 1e-5)``.

        Each layer's effective weight has spectral norm at most its ``coeff`` times ``1 + MARGIN``
        (``LipschitzLinear``), and the coefficients multiply to ``L``.
        """
        return self.lipschitz_target * (1 + MARGIN) ** len(self.linears) * (1 + 1e-6)

    def _eta(self):
        e = F.softplus(self.raw_eta)
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def lipschitz_bound(self) -> torch.Tensor:
        """A guaranteed bound of ``Lip_w(G)`` from the current weights (0-d tensor)."""
        lips = self.layer_lipschitz().unbind()
        bound = lips[-1]
        eta = self._eta() if self.dense else None
        for i, act in enumerate(self.activations):
            c = lips[i] * act.lipschitz
            if self.dense:
                c = torch.sqrt(eta[i, 0] ** 2 + (eta[i, 1] * c) ** 2)
            bound = bound * c
        return bound.detach()

    # -- the layers' spectral bounds, computed together (LayerwiseBounds) -------------------------
    def _bound_layers(self):
        return self.linears

    def _bound_params(self):
        return [lin.weight for lin in self.linears]

    # -- prepared weights: computed once per call, reused by every evaluation -------------------
    def prepare(self):
        """The effective weights, prepared for repeated evaluation (differentiable when grad is on).

        Returns an opaque object for :meth:`value`, :meth:`jacobian` and :meth:`linearize`.
        """
        Ws = list(zip(self.effective_weights(), (lin.bias for lin in self.linears)))
        if not self._folded:
            return ("generic", Ws, self._eta() if self.dense else None)
        layers = []
        scale = 1.0
        for (W, b), act in zip(Ws[:-1], self.activations):
            Wf, bf, out_scale = act.fold(W * scale if scale != 1.0 else W, b)
            layers.append((Wf, bf))
            scale = out_scale
        W, b = Ws[-1]
        return ("folded", layers, (W * scale, b), self.activations[0])

    def output_shift(self, shift, alpha, prepared):
        """``shift + alpha * b_out``: the constant of :meth:`value`'s ``out`` (computed once per solve)."""
        b = prepared[2][1] if prepared[0] == "folded" else prepared[1][-1][1]
        return shift if b is None else shift + alpha * b

    def _hidden(self, w, context, p):
        h = w
        if p[0] == "folded":
            _, layers, _, act = p
            for i, (W, b) in enumerate(layers):
                inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
                h = act.folded(F.linear(inp, W, b))
            return h, p[2]
        _, Ws, eta = p
        for i, ((W, b), act) in enumerate(zip(Ws[:-1], self.activations)):
            inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
            y = act(F.linear(inp, W, b))
            h = torch.cat([eta[i, 0] * h, eta[i, 1] * y], dim=-1) if self.dense else y
        return h, Ws[-1]

    def value(self, w, context=None, prepared=None, out=None):
        """``G(w, context)``; with ``out = (c, alpha)``, ``c + alpha * (G(w, context) - b_out)`` in one op
        (``c`` from :meth:`output_shift`, so the result is ``shift + alpha * G(w, context)``)."""
        p = self.prepare() if prepared is None else prepared
        h, (Wo, bo) = self._hidden(w, context, p)
        if out is None:
            return F.linear(h, Wo, bo)
        c, alpha = out
        flat = h.reshape(-1, h.shape[-1])
        res = torch.addmm(c.reshape(flat.shape[0], Wo.shape[0]), flat, Wo.t(), alpha=alpha)
        return res.reshape(h.shape[:-1] + (Wo.shape[0],))

    def jacobian(self, w, context=None, prepared=None):
        """``(G(w, context), J_G(w))`` with ``J`` of shape ``(..., D, D)``, in one forward pass.

        The tangent matrix is propagated through the layers in the layout ``(..., D, features)``
        (``J = W_n diag(s'_{n-1}) ... diag(s'_1) W_1``); the first layer's tangent is its weight
        (no product with the identity). Differentiable: log-dets built from it have exact gradients.
        """
        p = self.prepare() if prepared is None else prepared
        D = self.input_dim
        if p[0] == "generic":
            g, ops = self.linearize(w, context, p)
            eye = torch.eye(D, dtype=w.dtype, device=w.device)
            return self.apply_linearization(g, ops, eye)
        _, layers, (Wo, bo), act = p
        h, T = w, None
        for i, (W, b) in enumerate(layers):
            inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
            h, dh = act.folded_and_derivative(F.linear(inp, W, b))
            if T is None:  # the first layer: d(W w)/dw = W[:, :D], the same for every sample
                T = dh.unsqueeze(-2) * W[:, :D].t().contiguous()
            else:
                # W = [A; -A] (CPila's doubling): one product with A, the sign goes into dh
                n = W.shape[0] // 2
                U = F.linear(T, W[:n]).unsqueeze(-2)  # (..., D, 1, n)
                ds = torch.stack((dh[..., :n], -dh[..., n:]), dim=-2).unsqueeze(-3)  # (..., 1, 2, n)
                T = (ds * U).flatten(-2)
        g = F.linear(h, Wo, bo)
        return g, F.linear(T, Wo).transpose(-1, -2)

    # -- generic linearisation (any activation, dense): also the stochastic log-det's path -------
    def linearize(self, w, context=None, prepared=None):
        """``G(w)`` and the per-layer factors of ``J_G(w)`` (reused by repeated Jacobian products)."""
        p = self.prepare() if prepared is None else prepared
        ops = []
        h = w
        if p[0] == "generic":
            _, Ws, eta = p
            for i, ((W, b), act) in enumerate(zip(Ws[:-1], self.activations)):
                width = h.shape[-1]
                inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
                y, dy = act.forward_and_derivative(F.linear(inp, W, b))
                k = getattr(act, "expansion", 1)
                ops.append((W[:, :width], dy, k, None if eta is None else eta[i]))
                h = torch.cat([eta[i, 0] * h, eta[i, 1] * y], dim=-1) if self.dense else y
            W, b = Ws[-1]
        else:
            _, layers, (W, b), act = p
            for i, (Wl, bl) in enumerate(layers):
                width = h.shape[-1]
                inp = torch.cat([h, context], dim=-1) if (i == 0 and context is not None) else h
                h, dh = act.folded_and_derivative(F.linear(inp, Wl, bl))
                ops.append((Wl[:, :width], dh, 1, None))
        ops.append((W, None, 1, None))
        return F.linear(h, W, b), ops

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

    @staticmethod
    def vjp_linearization(ops, cotangent):
        """``J_G^T @ cotangent`` (``(..., D)``) from :meth:`linearize`'s factors (no autograd)."""
        r = F.linear(cotangent, ops[-1][0].t())
        for Wx, dy, k, eta in reversed(ops[:-1]):
            if eta is not None:
                width = Wx.shape[1]
                r_prev, r_y = eta[0] * r[..., :width], eta[1] * r[..., width:]
            else:
                r_prev, r_y = None, r
            r_y = r_y * dy
            if k > 1:
                r_y = r_y.unflatten(-1, (k, r_y.shape[-1] // k)).sum(-2)
            r_y = F.linear(r_y, Wx.t())
            r = r_y if r_prev is None else r_prev + r_y
        return r

    def forward(self, w, context=None, tangent=None):
        """``(G(w, context), J_G(w) @ tangent)``; ``tangent`` ``(..., D, m)`` or ``None`` (then ``None``)."""
        if tangent is None:
            return self.value(w, context), None
        return self.apply_linearization(*self.linearize(w, context), tangent)


def _halves(d):
    """``(d_a, d_b)``: a folded layer's activation derivatives for the rows ``A`` and ``-A``."""
    n = d.shape[-1] // 2
    return d[:, :n], d[:, n:]


def _folded_step_forward(w, rhs, context, sign, act, n_hidden, params, grad):
    """The forward of :class:`_FoldedExactStep`; with ``grad`` also what its backward needs.

    Tangents: a folded hidden layer has rows ``[A; -A]``, so its pre-activation tangent is ``[U; -U]``
    with ``U = A dh/dw`` (``(B, D, n)`` in the layout ``(batch, D, features)``). The first two layers
    are contracted without a per-sample tangent: ``U_2[b, j, m] = sum_f d_1[b, f] K[f, j, m]`` with
    ``K[f, j, m] = W_1[f, j] A_2[m, f]`` (one GEMM over the batch), and the output layer as
    ``J^T = U_L P`` with ``P[b, m, i] = W_o[i, m] d_a[b, m] - W_o[i, n + m] d_b[b, m]`` (one batched
    product); layers in between propagate ``T = [d_a U, -d_b U]``, ``U' = T A'^T``. One hidden
    layer: ``J^T = d_1 K_1`` with ``K_1[f, j, i] = W_1[f, j] W_o[i, f]``.
    """
    D = w.shape[-1]
    batch = w.shape[:-1]
    wf = w.reshape(-1, D)
    B = wf.shape[0]
    cf = None if context is None else context.reshape(B, context.shape[-1])
    h = wf if cf is None else torch.cat([wf, cf], dim=-1)
    inputs, ds, d2s = [], [], []
    for i in range(n_hidden):
        W, b = params[2 * i], params[2 * i + 1]
        inputs.append(h)
        v = torch.addmm(b, h, W.t())
        if grad:
            h, d, d2 = act.folded_derivatives(v)
            d2s.append(d2)
        else:
            h, d = act.folded_and_derivative(v)
        ds.append(d)
    Wo, bo = params[2 * n_hidden], params[2 * n_hidden + 1]
    rf = rhs.reshape(B, D)
    y = torch.addmm(rf if bo is None else rf - sign * bo, h, Wo.t(), alpha=-sign)
    W1x = params[0][:, :D]
    Us, Ts, P = [], [], None
    if n_hidden == 1:
        K = W1x.unsqueeze(-1) * Wo.t().unsqueeze(1)  # (F, D, D)
        JT = torch.mm(ds[0], K.reshape(K.shape[0], -1)).reshape(B, D, D)
    else:
        A = params[2][: params[2].shape[0] // 2]
        K = W1x.unsqueeze(-1) * A.t().unsqueeze(1)  # (F, D, n)
        U = torch.mm(ds[0], K.reshape(K.shape[0], -1)).reshape(B, D, A.shape[0])
        Us.append(U)
        for i in range(1, n_hidden - 1):
            da, db = _halves(ds[i])
            T = torch.stack((da, -db), dim=1).unsqueeze(1) * U.unsqueeze(2)  # (B, D, 2, n)
            T = T.flatten(2)
            Ts.append(T)
            W = params[2 * (i + 1)]
            U = torch.mm(T.flatten(0, 1), W[: W.shape[0] // 2].t()).reshape(B, D, W.shape[0] // 2)
            Us.append(U)
        da, db = _halves(ds[-1])
        n = da.shape[-1]
        P = torch.addcmul(da.unsqueeze(-1) * Wo[:, :n].t(), db.unsqueeze(-1), Wo[:, n:].t(), value=-1)  # (B, n, D)
        JT = torch.bmm(U, P)  # JT[b, j, i] = dG_i / dw_j
    eye = torch.eye(D, dtype=w.dtype, device=w.device)
    LU, piv, _ = torch.linalg.lu_factor_ex(torch.stack([eye - JT, eye + JT]))
    logdets = LU.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    y, ladj = y.reshape(rhs.shape), (logdets[0] - logdets[1]).reshape(batch)
    if not grad:
        return y, ladj, None, None
    saved = (LU, piv, h, K, P, *inputs, *ds, *d2s, *Us, *Ts, *params)
    meta = (sign, n_hidden, D, B, batch, None if context is None else context.shape)
    return y, ladj, saved, meta


# -- the fused exact step of a folded (CPila) network: map, log-det and implicit gradients ---------
class _FoldedExactStep(torch.autograd.Function):
    """``(rhs - s G(w), log det(I - J) - log det(I + J))`` with ``J = J_G(w)``, for a folded network at
    the certified solution ``w`` of ``w = 2 rhs - s G(w)``, with a hand-written backward.

    Forward: one pass through the layers gives ``G(w)``, the activation derivatives and ``J^T``
    (contracted as described in :func:`_folded_step_forward`), and one batched LU of
    ``[I - J^T; I + J^T]``. Backward (implicit function theorem for ``w* = 2 rhs - s G(w*)``): the
    log-det's cotangent ``-gl ((I - J)^{-1} + (I + J)^{-1})`` is pulled back through the Jacobian's
    factors (weight gradients and the cotangents of the activation derivatives, which ``psi''``
    turns into pre-activation cotangents), the value path gives ``a = dL/dw*``, then
    ``lam = (I + s J)^{-T} a`` and a second value-path sweep with output cotangent ``-s lam``:
    ``dL/drhs = 2 lam - gy`` and the parameter and context gradients. ``w`` itself gets none (it is a
    detached solution).
    """

    @staticmethod
    def forward(ctx, w, rhs, context, sign, act, n_hidden, *params):
        y, ladj, saved, meta = _folded_step_forward(w, rhs, context, sign, act, n_hidden, params, True)
        ctx.save_for_backward(*saved)
        ctx.meta = meta
        # outputs that are views (of the reshaped batch) would forbid in-place edits of the user's sample
        return (y.clone() if y._base is not None else y), (ladj.clone() if ladj._base is not None else ladj)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gl):
        sign, nh, D, B, batch, ctx_shape = ctx.meta
        saved = list(ctx.saved_tensors)
        LU, piv, hL, K, P = saved[:5]
        k = 5
        inputs, ds, d2s = saved[k:k + nh], saved[k + nh:k + 2 * nh], saved[k + 2 * nh:k + 3 * nh]
        k += 3 * nh
        n_u = 0 if nh == 1 else nh - 1
        Us, Ts = saved[k:k + n_u], saved[k + n_u:k + n_u + max(nh - 2, 0)]
        params = saved[k + n_u + max(nh - 2, 0):]
        Ws = params[0:2 * nh + 2:2]
        Wo = Ws[-1]
        gy = gy.reshape(B, D) if gy is not None else hL.new_zeros(B, D)
        gl = gl.reshape(B) if gl is not None else hL.new_zeros(B)
        eye = torch.eye(D, dtype=hL.dtype, device=hL.device).expand(2, B, D, D)
        inv = torch.linalg.lu_solve(LU, piv, eye)  # (I - J^T)^{-1}, (I + J^T)^{-1}
        gW = [torch.zeros_like(W) for W in Ws]  # the log-det's (tangent) part of the weight gradients
        vtan = [None] * nh
        # -- the log-det through the Jacobian's factors
        gJT = (inv[0] + inv[1]).mT * (-gl)[:, None, None]  # cotangent of J^T
        if nh == 1:
            gK = torch.mm(ds[0].t(), gJT.flatten(1)).reshape(K.shape)  # (F, D, D)
            vtan[0] = torch.mm(gJT.flatten(1), K.flatten(1).t()) * d2s[0]
            W1x = Ws[0][:, :D]
            gW[0][:, :D] = (gK * Wo.t().unsqueeze(1)).sum(-1)
            gW[1] += (gK * W1x.unsqueeze(-1)).sum(1).t()
        else:
            U = Us[-1]
            gU = torch.bmm(gJT, P.mT)  # (B, D, n)
            gPt = torch.bmm(gJT.mT, U)  # (B, D, n): gPt[b, i, m] is the cotangent of P[b, m, i]
            da, db = _halves(ds[-1])
            n = da.shape[-1]
            Woa, Wob = Wo[:, :n].contiguous(), Wo[:, n:].contiguous()
            vtan[-1] = torch.cat(((gPt * Woa).sum(1), -(gPt * Wob).sum(1)), dim=-1) * d2s[-1]
            gW[-1][:, :n] = (gPt * da.unsqueeze(1)).sum(0)
            gW[-1][:, n:] = -(gPt * db.unsqueeze(1)).sum(0)
            for i in range(nh - 2, 0, -1):  # layers between the first two and the last: U_{i+1} = T_i A^T
                W, T = Ws[i + 1], Ts[i - 1]
                m = W.shape[0] // 2
                gW[i + 1][:m] += torch.mm(gU.flatten(0, 1).t(), T.flatten(0, 1))
                gT = torch.mm(gU.flatten(0, 1), W[:m]).reshape(B, D, 2, W.shape[1] // 2)
                U = Us[i - 1]
                da, db = _halves(ds[i])
                gd = (gT * U.unsqueeze(2)).sum(1)  # (B, 2, n): cotangents of d_a and -d_b
                vtan[i] = torch.cat((gd[:, 0], -gd[:, 1]), dim=-1) * d2s[i]
                gU = torch.addcmul(gT[:, :, 0] * da.unsqueeze(1), gT[:, :, 1], db.unsqueeze(1), value=-1)
            # the first two layers: U_2 = d_1 K
            gUr = gU.flatten(1)
            vtan[0] = torch.mm(gUr, K.reshape(K.shape[0], -1).t()) * d2s[0]
            gK = torch.mm(ds[0].t(), gUr).reshape(K.shape)  # (F, D, n)
            W2 = Ws[1]
            m = W2.shape[0] // 2
            gW[0][:, :D] = (gK * W2[:m].t().unsqueeze(1)).sum(-1)
            gW[1][:m] += (gK * Ws[0][:, :D].unsqueeze(-1)).sum(1).t()
        # -- value path, sweep A: dL/dw* from the log-det (the pre-activation cotangents above)
        vA = [None] * nh
        hbar = None
        for i in range(nh - 1, -1, -1):
            vA[i] = vtan[i] if hbar is None else torch.addcmul(vtan[i], hbar, ds[i])
            hbar = torch.mm(vA[i], Ws[i])
        inbarA = hbar
        a = gy + inbarA[:, :D]
        # -- implicit correction: lam = (I + s J)^{-T} a = (I + s J^T)^{-1} a
        lam = (inv[1 if sign > 0 else 0] @ a.unsqueeze(-1)).squeeze(-1)
        gG = lam * (-sign)
        # -- value path, sweep B: output cotangent -s lam; parameter gradients from both sweeps
        grads = [None] * len(params)
        grads[2 * nh] = torch.addmm(gW[nh], gG.t(), hL)
        if params[2 * nh + 1] is not None:
            grads[2 * nh + 1] = gG.sum(0)
        hbar = torch.mm(gG, Wo)
        for i in range(nh - 1, -1, -1):
            vB = hbar * ds[i]
            v = vA[i] + vB
            grads[2 * i] = torch.addmm(gW[i], v.t(), inputs[i])
            grads[2 * i + 1] = v.sum(0)
            hbar = torch.mm(vB, Ws[i])
        grhs = (2 * lam - gy).reshape(batch + (D,))
        gctx = None
        if ctx_shape is not None and ctx.needs_input_grad[2]:
            gctx = (inbarA[:, D:] + hbar[:, D:]).reshape(ctx_shape)
        return (None, grhs, gctx, None, None, None, *grads)


def folded_exact_step(w, rhs, context, prepared, sign):
    """``(rhs - sign G(w), log det(I - J_G(w)) - log det(I + J_G(w)))`` for a folded network at the
    solution ``w`` of ``w = 2 rhs - sign G(w)``, with exact implicit gradients (see
    :class:`_FoldedExactStep`): the map and log-det of a Monotone Flow block and their gradients in
    one pass, with the backward written by hand (no autograd graph through the Jacobian).

    Arguments:
        w: the certified solution (treated as exact; gets no gradient), shape ``(..., D)``.
        rhs: the block's input ``x`` (``sign = 1``) or ``y`` (``sign = -1``), shaped like ``w``.
        context: ``None`` or a context broadcast to ``w``'s batch shape, ``(..., C)``.
        prepared: :meth:`MonotoneNet.prepare` of a CPila network (``prepared[0] == "folded"``).
        sign: ``1.0`` or ``-1.0``.

    Example:
        >>> import torch
        >>> net = MonotoneNet(2, [8]).double()
        >>> x = torch.randn(3, 2, dtype=torch.float64)
        >>> w = 2 * x
        >>> for _ in range(200):  # the forward solve w = 2x - G(w), a contraction
        ...     w = 2 * x - net.value(w)
        >>> y, ladj = folded_exact_step(w, x, None, net.prepare(), 1.0)
        >>> J = net.jacobian(w)[1]
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> ref = torch.linalg.slogdet(eye - J)[1] - torch.linalg.slogdet(eye + J)[1]
        >>> bool(torch.allclose(y, w - x)), bool(torch.allclose(ladj, ref))
        (True, True)
    """
    _, layers, (Wo, bo), act = prepared
    params = [t for layer in layers for t in layer] + [Wo, bo]
    if not torch.is_grad_enabled():
        return _folded_step_forward(w, rhs, context, float(sign), act, len(layers), params, False)[:2]
    return _FoldedExactStep.apply(w.detach(), rhs, context, float(sign), act, len(layers), *params)
