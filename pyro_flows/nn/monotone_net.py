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
from .lipschitz import MARGIN, LipschitzLinear

__all__ = ["MonotoneNet"]


def _check_lipschitz(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"lipschitz must be a number in (0, 1), got {value!r}")
    return float(value)


class MonotoneNet(nn.Module):
    """The Lipschitz network ``G(w, context)`` of a Monotone Flow block.

    Bound: plain chain of ``n`` linear layers, each a :class:`~pyro_flows.nn.LipschitzLinear` with
    ``coeff = L^(1/n)`` (exact spectral norm plus a margin), activations 1-Lipschitz, so
    ``Lip_w(G) <= L`` for any weights and any context (the context columns of the first layer are
    excluded from its bound: for a fixed context they only shift). ``dense=True``: block ``i`` maps
    ``h -> [eta1 h, eta2 act(W_i h)]`` with ``eta1^2 + eta2^2 = 1`` and ``Lip(W_i) <= 1``, so each block
    is 1-Lipschitz and the output layer (``coeff = L``) gives ``Lip_w(G) <= L``.

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
        """A guaranteed bound of ``Lip_w(G)`` from the current weights (0-d tensor; one SVD per layer)."""
        bound = self.linears[-1].lipschitz()
        eta = self._eta() if self.dense else None
        for i, (lin, act) in enumerate(zip(self.linears[:-1], self.activations)):
            c = lin.lipschitz() * act.lipschitz
            if self.dense:
                c = torch.sqrt(eta[i, 0] ** 2 + (eta[i, 1] * c) ** 2)
            bound = bound * c
        return bound.detach()

    # -- prepared weights: computed once per call, reused by every evaluation -------------------
    def prepare(self):
        """The effective weights, prepared for repeated evaluation (differentiable when grad is on).

        Returns an opaque object for :meth:`value`, :meth:`jacobian` and :meth:`linearize`.
        """
        Ws = [(lin.effective_weight(), lin.bias) for lin in self.linears]
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
        res = torch.addmm(c.reshape(flat.shape[0], -1), flat, Wo.t(), alpha=alpha)
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
