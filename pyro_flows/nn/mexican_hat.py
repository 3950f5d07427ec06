r"""The Mexican-hat read-out of QLF's coupling conditioners (Liao & He, Eq. 15).

``log s = mean_m h(w_m phi + b_m)`` with the Mexican hat ``h(u) = (1 - u^2) exp(-u^2 / 2)``: since
``h`` takes values in ``[-2 exp(-3/2), 1]``, the scale ``s`` lies in ``[0.640, 2.718]`` for any
parameters (the paper's text says (0.5, 3); the exact range is this one).

References:
    Huadong Liao, Jiawei He. Jacobian Determinant of Normalizing Flows. arXiv:2102.06539, 2021.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_dim
from .packed import Packing

__all__ = ["H_MIN", "MexicanHatNN", "log_scale_range", "mean_of_hats", "mexican_hat", "mexican_hat_biases"]

#: range of the Mexican hat h(u) = (1 - u^2) exp(-u^2/2): [H_MIN, 1], H_MIN = h(sqrt 3)
H_MIN = -2.0 * math.exp(-1.5)


def mexican_hat(u: torch.Tensor) -> torch.Tensor:
    """``(1 - u^2) exp(-u^2 / 2)``: values in ``[-2 exp(-3/2), 1]`` (about ``[-0.446, 1]``).

    Example:
        >>> import torch
        >>> from pyro_flows.nn.mexican_hat import mexican_hat
        >>> mexican_hat(torch.tensor([0.0, 1.0]))
        tensor([1., 0.])
    """
    u2 = u * u
    return (1 - u2) * torch.exp(-0.5 * u2)


class _MeanOfHats(torch.autograd.Function):
    """``mean_m h(u[..., m, :])`` over the hats axis ``-2`` with its closed-form gradient
    ``h'(u) / M``, ``h'(u) = u (u^2 - 3) exp(-u^2 / 2)`` (one node instead of five)."""

    @staticmethod
    def forward(ctx, u):
        u2 = u * u
        e = torch.exp(-0.5 * u2)
        ctx.save_for_backward(u, u2, e)
        return ((1 - u2) * e).mean(-2)

    @staticmethod
    def backward(ctx, grad):
        u, u2, e = ctx.saved_tensors
        return (u * (u2 - 3) * e) * (grad.unsqueeze(-2) / u.shape[-2])


class _LipschitzScale(torch.autograd.Function):
    r"""``k = c / max(prod_l ||W_l||_F, c) = c / sqrt(max(prod_l n_l, c^2))`` with ``n_l = ||W_l||_F^2`` the
    squared Frobenius norms of the layers' weights (``n = segments @ params^2``), as one node with its
    closed-form gradient ``dk/dparams = -k params * (segments^T (1 / n))`` where the product exceeds
    ``c^2`` (else 0, as ``clamp``'s; ``gradcheck``: ``tests/test_qlf.py``). No inf/NaN while the
    read-out is still 0; no host synchronisation (``prod``'s own backward looks for zeros with one)."""

    @staticmethod
    def forward(ctx, params, segments, c):
        n = torch.mv(segments, params.square())
        prod = n.prod()
        k = c / prod.clamp(min=c * c).sqrt()
        ctx.save_for_backward(params, segments, n, prod, k)
        ctx.c2 = c * c
        return k

    @staticmethod
    def backward(ctx, grad):
        params, segments, n, prod, k = ctx.saved_tensors
        # where the clamp is active some n_l may be 0: a finite 1 / max(n, tiny) times the zero scale
        coef = torch.mv(segments.t(), n.clamp_min(torch.finfo(n.dtype).tiny).reciprocal())
        scale = torch.where(prod > ctx.c2, -(grad * k), 0.0)
        return params * (coef * scale), None, None


def mean_of_hats(u: torch.Tensor) -> torch.Tensor:
    """``mexican_hat(u).mean(-2)`` (the same operations, so the same values) as one autograd node.

    Example:
        >>> import torch
        >>> from pyro_flows.nn.mexican_hat import mean_of_hats, mexican_hat
        >>> u = torch.randn(5, 3, 2)
        >>> bool(torch.equal(mean_of_hats(u), mexican_hat(u).mean(-2)))
        True
    """
    return _MeanOfHats.apply(u)


def _hat_spread(num_hats):
    if num_hats == 1:
        return [1.0]
    return [0.8 + 0.4 * m / (num_hats - 1) for m in range(num_hats)]


def log_scale_range(num_hats: int) -> tuple:
    """The open interval of initial log-scales :func:`mexican_hat_biases` can reach."""
    spread = _hat_spread(num_hats)
    c_max = math.sqrt(3.0) / max(spread)
    low = sum((1 - (c * c_max) ** 2) * math.exp(-0.5 * (c * c_max) ** 2) for c in spread) / num_hats
    return low, 1.0


def mexican_hat_biases(log_scale: float, num_hats: int) -> list:
    """Distinct biases ``b_m`` with ``mean_m h(b_m) = log_scale``.

    Equal biases would stay equal forever (identical gradients while the weights start at 0), so
    ``b_m = c * (0.8 ... 1.2)`` (spread evenly) with the common factor ``c`` found by bisection, all
    ``b_m`` on the decreasing branch ``[0, sqrt 3]`` of ``h``. ``ValueError`` outside the reachable
    range (:func:`log_scale_range`).

    Example:
        >>> from pyro_flows.nn.mexican_hat import mexican_hat_biases
        >>> len(mexican_hat_biases(0.1, 4))
        4
    """
    low, high = log_scale_range(num_hats)
    if not low < log_scale < high:
        raise ValueError(
            f"initial log-scale {log_scale:.4g} of the coupling is outside ({low:.4g}, {high:.4g}), "
            f"the range the Mexican-hat read-out can start from; choose beta/kappa differently"
        )
    spread = _hat_spread(num_hats)

    def mean_h(c):
        return sum((1 - (c * s) ** 2) * math.exp(-0.5 * (c * s) ** 2) for s in spread) / num_hats

    lo, hi = 0.0, math.sqrt(3.0) / max(spread)  # mean_h decreasing on [lo, hi]
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_h(mid) > log_scale:
            lo = mid
        else:
            hi = mid
    c = 0.5 * (lo + hi)
    return [c * s for s in spread]


class MexicanHatNN(nn.Module):
    """Conditioner of QLF's dual coupling: tanh MLP features ``phi``, then ``(log s, t)``.

    ``log s = mean_m h(w_m phi + b_m)`` with ``h`` the Mexican hat (so ``s`` in ``[0.640, 2.718]``)
    and ``t = w_t phi + b_t`` (tanh features in ``[-1, 1]``: ``|t| <= ||w_t||_1 + |b_t|`` whatever
    the input). ``w_m``, ``w_t`` and ``b_t`` start at zero and ``b_m`` at :func:`mexican_hat_biases`
    of ``log_scale_init``, so the network starts constant, ``(log_scale_init, 0)``. The ``M`` hat
    weights and the shift read-out are one matrix, applied with one matmul, and all weights and
    biases live in one parameter tensor ``params`` (:meth:`layers` gives the views): one tensor
    for the optimiser to update instead of six.

    Arguments:
        in_features (int): size of the conditioning input (other half, plus the context if any).
        out_features (int): size of the half being transformed.
        hidden_dims (list of int): MLP hidden sizes (tanh).
        num_hats (int): M, the number of Mexican-hat responses averaged.
        log_scale_init (float): the initial ``log s`` (see :func:`log_scale_range`).
        max_lipschitz (float or None): ``c``: the first layer's weight is multiplied by
            ``min(1, c / prod_l ||W_l||_F)`` (all layers, read-out included), so the network is
            ``c``-Lipschitz in ``t`` and ``c * max|h'|``-Lipschitz (``max|h'| < 1.4``) in ``log s``
            for any parameters (context inputs included). Inactive at init (the read-out starts
            at zero). ``None``: no bound.

    Example:
        >>> import torch
        >>> from pyro_flows.nn.mexican_hat import MexicanHatNN
        >>> net = MexicanHatNN(3, 2, [16], num_hats=4, log_scale_init=0.1)
        >>> log_s, t = net(torch.randn(5, 3))
        >>> log_s.shape, bool(torch.allclose(log_s, torch.tensor(0.1))), bool((t == 0).all())
        (torch.Size([5, 2]), True, True)
    """

    def __init__(self, in_features, out_features, hidden_dims, num_hats=4, log_scale_init=0.0,
                 max_lipschitz=None):
        super().__init__()
        if max_lipschitz is not None and not (isinstance(max_lipschitz, (int, float))
                                              and 0 < max_lipschitz < math.inf):
            raise ValueError(f"max_lipschitz must be a positive finite number or None, got {max_lipschitz!r}")
        self.max_lipschitz = None if max_lipschitz is None else float(max_lipschitz)
        in_features = check_dim(in_features, "in_features")
        out_features = check_dim(out_features, "out_features")
        num_hats = check_dim(num_hats, "num_hats")
        hidden_dims = [check_dim(h, "hidden_dims entry") for h in hidden_dims]
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer, got []")
        self.num_hats = num_hats
        self.out_features = out_features
        dims = [in_features] + hidden_dims + [(num_hats + 1) * out_features]
        self._shapes = list(zip(dims[1:], dims[:-1]))  # (out, in) per layer
        # one parameter tensor: per layer the weight (row-major), then the bias
        chunks = []
        for out, inp in self._shapes[:-1]:  # hidden layers: nn.Linear's default initialisation
            bound = 1 / math.sqrt(inp)
            chunks += [torch.empty(out * inp).uniform_(-bound, bound), torch.empty(out).uniform_(-bound, bound)]
        out, inp = self._shapes[-1]  # read-out: zero weights, hat biases, zero shift bias
        biases = torch.tensor(mexican_hat_biases(float(log_scale_init), num_hats))
        chunks += [torch.zeros(out * inp), biases.repeat_interleave(out_features), torch.zeros(out_features)]
        self._packing = Packing([s for out, inp in self._shapes for s in ((out, inp), (out,))])
        self.params = nn.Parameter(torch.cat(chunks))
        # row l selects layer l's weight entries of ``params``: the squared Frobenius norms of all
        # layers are one matrix-vector product (non-persistent: a function of the sizes)
        segments = torch.zeros(len(self._shapes), self.params.numel())
        start = 0
        for l, (out, inp) in enumerate(self._shapes):
            segments[l, start:start + out * inp] = 1
            start += out * inp + out
        self.register_buffer("_weight_segments", segments, persistent=False)

    def layers(self):
        """The ``(weight, bias)`` of each layer, as views of the one parameter tensor."""
        views = self._packing.unpack(self.params)
        return list(zip(views[::2], views[1::2]))

    def forward(self, z, context=None):
        if context is not None:
            z = torch.cat([z, context], dim=-1)
        layers = self.layers()
        w, b = layers[0]
        if self.max_lipschitz is not None:
            w = w * _LipschitzScale.apply(self.params, self._weight_segments, self.max_lipschitz)
        phi = torch.tanh(F.linear(z, w, b))
        for w, b in layers[1:-1]:
            phi = torch.tanh(F.linear(phi, w, b))
        out = F.linear(phi, *layers[-1])
        m, o = self.num_hats, self.out_features
        pre, shift = out.split([m * o, o], dim=-1)
        return mean_of_hats(pre.unflatten(-1, (m, o))), shift
