r"""QLF blocks: invertible linear map, dual affine coupling, contractive spline activation.

One block of the flow proposed by Liao & He (the "quasi-linear flow" paper) is

.. math:: f = f_\mathrm{act} \circ f_\mathrm{aff} \circ f_\mathrm{lin},

applied in Pyro's direction (``_call`` maps base noise to data). The three parts are transforms of
their own (:class:`QLFLinear`, :class:`DualAffineCoupling` / :class:`ConditionalDualAffineCoupling`,
:class:`RQSActivation`), and :class:`QLF` / :class:`ConditionalQLF` compose them into one block with a
single log-det. Every map below is computed in closed form (no iterative solver): the log-det is the
exact log-det of the map computed and the inverse is analytic, for any parameter values.

**f_lin** (:class:`QLFLinear`): ``y = Q diag(sigma) x + b``. The paper uses a (strided) invertible
convolution initialised to ``kappa * I``; for vectors that is a ``D x D`` matrix. An LU form can
start there too, but its condition number is unbounded (1e11 after moderate parameter moves, and
then the inverse is silently wrong), so ``Q`` is orthogonal, minus a product of ``D`` Householder
reflections built in one pass (:func:`householder_orthogonal`, ``I`` at init), and
``log sigma = log kappa + R tanh(raw / R)``: the singular values are ``sigma``, in
``kappa [e^-R, e^R]``, for any parameters (``R = max_log_scale``, default 1; ``None`` opts out).
Log-det ``sum(log sigma)``; inverse ``diag(1 / sigma) Q^T (y - b)``, as cheap as the forward. A bias
``b`` (initialised to 0) lets a block translate.

**f_aff** (:class:`DualAffineCoupling`): with ``x = (x1, x2)``, ``x1`` the first ``r = max(1, D // 2)``
coordinates, ``y1 = s1(x2) * x1 + t1(x2)`` then ``y2 = s2(y1) * x2 + t2(y1)`` (paper Eq. 14), so no
coordinate passes through unchanged. Each conditioner is an MLP with tanh hidden layers (the paper
uses convolutional ResNets for images; tanh keeps the features ``phi`` in ``[-1, 1]``, so every shift is
bounded, ``|t| <= ||w_t||_1 + |b_t|``, whatever the input: a ReLU conditioner's shift grows with the
input, and in stacks with large weights the shifts of the second coupling then compound into
Jacobians with condition numbers near 1e13) whose last hidden features ``phi`` feed a read-out:
``log s = mean_m h(w_m phi + b_m)`` with the Mexican hat ``h(u) = (1 - u^2) exp(-u^2 / 2)`` (paper
Eq. 15) and ``t = w_t phi + b_t``. Since
``h`` takes values in ``[-2 exp(-3/2), 1]``, ``s`` lies in ``[0.640, 2.718]`` for any parameters (the
paper's text says (0.5, 3); the exact range is the one above). The read-out weights ``w_m``, ``w_t``
and ``b_t`` start at zero, so the coupling starts as the linear map ``x -> s0 * x``. The paper does
not say how the ``M`` biases are initialised beyond "the blockwise volume-preserving rule": equal
biases would stay equal forever (identical gradients, ``w_m`` start at 0), so we use
``b_m = c * (0.8 ... 1.2)`` (spread evenly) with ``c`` found by bisection such that
``mean_m h(b_m) = log s0`` (all ``b_m`` on the decreasing branch ``[0, sqrt 3]`` of ``h``). Each
conditioner's first weight is scaled by ``min(1, c / prod_l ||W_l||_F)`` (``c = max_lipschitz``,
default 100; inactive at init), so ``t`` is ``c``-Lipschitz and ``log s`` ``1.39 c``-Lipschitz for any
parameters (:class:`~pyro_flows.nn.mexican_hat.MexicanHatNN`); without it, large weights make the
coupling's off-diagonal Jacobian, and with it the inverse's error, grow without bound. The
conditional variant feeds ``cat(x_other, context)`` to both conditioners (the context is broadcast
against the input batch both ways); the linear layer and the activation stay unconditional.
For ``D = 1`` the second half is empty: the conditional coupling is then an affine map of the
context, and the unconditional block drops the coupling (there is nothing to condition on) and puts
the whole initial expansion into ``kappa``. ``dual=False`` (an option, not the paper's) keeps only the
first coupling (``y2 = x2``; one conditioner per block, the linear layers mix the halves between
blocks) and also puts the whole expansion into ``kappa``; its speed and capacity are in ``docs/qlf.md``.

**f_act** (:class:`RQSActivation`): an elementwise monotone rational-quadratic spline (Gregory &
Delbourgo; Durkan et al.) with ``K`` bins per coordinate on a box ``[-w, w]`` (``w = exp(log_width)``
learnable, paper appendix C), knot derivatives ``alpha_i`` in ``(a, 1)`` (sigmoid, Eq. 32; ``a =
min_derivative``, default 0.2), bin widths from a softmax (Eq. 27, with a minimum bin width
``1e-3 * 2w`` so float32 stays safe), and bin slopes ``delta_k = Delta y_k / Delta x_k`` in
``(a, cap_k)`` from a sigmoid (Eq. 28). Outside the box the activation is linear with the boundary
knot's derivative (continuous derivative); the tails are evaluated as two more RQ bins whose slope
and knot derivatives are all that derivative (such a bin is exactly linear), so one bin lookup and
one formula serve every input. The y-range is centred so that the spline is ``beta * x`` when all
slopes equal ``beta``. Evaluation per bin is Eq. 16-17 and the inverse solves the bin's quadratic with
the cancellation-free root ``2c / (-b - sqrt(b^2 - 4ac))``.

*Contractivity.* The paper claims ``alpha_i, delta_k in (0, 1)`` make ``d f_act / dx <= 1``. That is
false: with ``delta = 1`` and ``alpha_k = alpha_{k+1} -> 0`` the derivative at the bin centre tends to
``2``; over ``(0, 1)^3`` the supremum is about 1.9. We therefore cap each bin slope by
``delta_k < (1 + min(alpha_k, alpha_{k+1})) / 2``. What holds:

(i) for ``alpha_k = alpha_{k+1} = a`` the bound is proven. With
``t = 2 xi (1 - xi) / (xi^2 + (1 - xi)^2) in [0, 1]`` the derivative is
``delta^2 (a + delta t)(1 + t) / (delta + a t)^2``, and ``f' <= 1`` iff
``P(t) = delta^2 (1 - a) + delta (2a - a delta - delta^2) t + (a^2 - delta^3) t^2 >= 0``.
``P(0) >= 0``; ``P(1) = (delta + a)(delta + a - 2 delta^2) >= 0`` because ``delta <= (1 + a) / 2``
implies ``2 delta^2 <= delta + a`` for ``a <= 1``; and ``P`` is either concave (so ``>= 0`` between its
non-negative ends) or convex, in which case ``a >= delta^(3/2)`` gives
``a (2 - delta) >= delta^(3/2) >= delta^2``, a non-negative linear coefficient, so ``P`` increases.

(ii) for unequal knot derivatives it is verified numerically, not proven: on a grid of 200 x 200
knot-derivative pairs x 1000 slopes x 201 positions the largest admissible slope is never below
``(1 + min) / 2`` (to the grid step); 2e7 random draws below the cap (biased towards the corners) give
a largest derivative of 0.999999; ``tests/test_qlf.py`` checks ``sup f' <= 1`` at the cap on a grid
and on random and extreme parameters. The cap is tight where both knot derivatives vanish
(``delta = 1/2`` gives sup ``f' = 1``).

The tails have slopes ``alpha_0, alpha_K < 1``. The bound is what the paper's stability argument
needs; it plays no role in exactness.

*Slope floor.* With knot derivatives and slopes above ``a``: ``f' = delta^2 N / den^2`` where ``N``
(weights ``xi^2, 2 xi (1 - xi), (1 - xi)^2``) and ``den`` (weights ``1 - 2s, 2s``) are convex
combinations of values in ``[a, 1]``, so ``f' >= delta^2 a >= a^3`` (proven); the infimum over the
parameterisation is ``2 a^2 / (1 + a)`` (``alpha = 1``, ``delta = a``, bin centre; on a grid, tested):
0.067 at the default ``a = 0.2``.

**Bounds for any parameter values** (per block, ``D`` coordinates; ``R``, ``c``, ``a`` as above):
the linear map has condition number ``<= e^{2R}`` (``e^2`` by default); the coupling's diagonal
slopes lie in ``[0.640, 2.718]`` and its conditioners are Lipschitz as stated; the activation's
slopes lie in ``[a^3, 1]`` (proven; ``[2 a^2 / (1 + a), 1]`` on the grid). So the block's log-det
lies in ``D [log kappa - R + H_MIN + 3 log a, log kappa + R + 1]`` (``H_MIN = -0.446``),
whatever ``num_bins``, ``hidden_dims`` or the number of blocks. At default sizes with every
parameter moved by ``s * N(0, 1)`` (``s`` in {2, 5}, ``D`` in {5, 8, 16}, 4 blocks, inputs
``1.5 N(0, 1)``), float64 reconstruction errors stay below ``1e-6`` (tested; at most 3e-7
seen). Against the previous unbounded defaults (LU linear layer, floor ``1e-3``, no Lipschitz
bound), test NLL at equal steps was 0.02 nats better on checkerboard and far better on
``breast_cancer`` (the unbounded version overfits into huge test NLL); ``max_log_scale=None,
min_derivative=1e-3, max_lipschitz=None``
restores unbounded conditioning.

Pyro's ``_monotonic_rational_spline`` cannot be reused: it fixes the box to ``[-B, B]^2`` with identity
tails and boundary derivatives 1 and builds its knots from raw parameters internally, whereas here
the box height, the boundary derivatives (tail slopes) and the slope caps are part of the
parameterisation.

**Blockwise volume-preserving initialisation** (paper Sec. 3.2, Eq. 18): every part starts linear,
``f_lin = kappa I``, ``f_aff = s0 I`` and ``f_act = beta I``, with ``kappa * s0 = 1 / beta`` so the block
starts as the identity with log-det exactly 0 (``beta`` in ``(0, 1)``; ``beta = 1`` would need a
saturated sigmoid). By default the expansion ``-log beta`` is split evenly,
``log kappa = log s0 = -log(beta) / 2`` (``log s0`` capped at 0.5, the rest going to ``kappa``); pass
``kappa`` to choose the split (``log s0 = -log(beta) - log(kappa)`` must lie in the range the bias rule
reaches, about ``(-0.31, 1)`` for ``M > 1``; a ``ValueError`` names it otherwise).

**Stacking.** ``flow("qlf", ...)`` puts no permutation between blocks (registered with
``permutation=None``): the dual coupling transforms both halves in every block and the learnable
linear layer mixes coordinates across the split, so a fixed permutation adds nothing.

References:
    Huadong Liao, Jiawei He. Jacobian Determinant of Normalizing Flows. arXiv:2102.06539, 2021.

    Conor Durkan, Artur Bekasov, Iain Murray, George Papamakarios. Neural Spline Flows. NeurIPS 2019.

    Diederik P. Kingma, Prafulla Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
    NeurIPS 2018.

    J. A. Gregory, R. Delbourgo. Piecewise rational quadratic interpolation to monotonic data. IMA
    Journal of Numerical Analysis, 1982.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from pyro.distributions.torch_transform import TransformModule
from torch import nn

from ..nn.mexican_hat import MexicanHatNN, log_scale_range
from ..registry import register_flow
from ..validation import check_dim
from ._base import ConditionalFlowModule, FlowTransform

__all__ = [
    "QLF",
    "ConditionalDualAffineCoupling",
    "ConditionalQLF",
    "ConditionedDualAffineCoupling",
    "ConditionedQLF",
    "ConditionedQLFLinear",
    "ConditionedRQSActivation",
    "DualAffineCoupling",
    "QLFLinear",
    "RQSActivation",
    "conditional_qlf",
    "qlf",
    "rqs_forward",
    "rqs_inverse",
    "rqs_table",
]

#: default half-range R of the linear layer's log-scales around log(kappa): cond(W) <= exp(2R)
MAX_LOG_SCALE = 1.0
#: default floor a of the activation's knot derivatives and bin slopes: derivative >= a^3
MIN_DERIVATIVE = 0.2
#: default bound c of each coupling conditioner's Lipschitz constant (product of weight norms)
MAX_LIPSCHITZ = 100.0
_MIN_BIN_WIDTH = 1e-3  # fraction of the box width


def _check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _check_max_log_scale(value):
    if value is None:
        return None
    return _check_positive(value, "max_log_scale")


def _check_min_derivative(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 0.5:
        raise ValueError(f"min_derivative must be a number in (0, 0.5), got {value!r}")
    return float(value)


def _hidden_dims(hidden_dims, default):
    if hidden_dims is None:
        return [default, default]
    hidden_dims = list(hidden_dims)
    if not hidden_dims:
        raise ValueError("hidden_dims must name at least one hidden layer, got []")
    return [check_dim(h, "hidden_dims entry") for h in hidden_dims]


# =================================================================================================
# f_lin: orthogonal times a bounded diagonal
# =================================================================================================
def householder_orthogonal(reflect: torch.Tensor) -> torch.Tensor:
    """``-H_1 H_2 ... H_D`` for the reflections ``H_i = I - 2 v_i v_i^T / |v_i|^2``, where ``v_i``
    is column ``i`` of ``V = I + tril(reflect, -1)`` (LAPACK's storage of Householder vectors).

    Built in one pass with the UT transform (no loop over reflections): ``H_1 ... H_D =
    I - V S^{-1} V^T`` with ``S = triu(V^T V)`` whose diagonal is halved. Orthogonal for any
    ``reflect``; ``-I`` at ``reflect = 0`` is undone by the leading sign, so the result is ``I``.
    """
    d = reflect.shape[-1]
    eye = torch.eye(d, dtype=reflect.dtype, device=reflect.device)
    v = reflect.tril(-1) + eye
    vt = v.transpose(-1, -2)
    g = vt @ v
    s = torch.addcmul(g.triu(), g, eye, value=-0.5)  # triu(V^T V) with the diagonal halved
    tv = torch.linalg.solve_triangular(s, vt, upper=True)
    return torch.addmm(eye, v, tv, beta=-1)


class ConditionedQLFLinear(FlowTransform):
    """``y = W x + b`` with ``W = Q diag(exp(log_scale))`` and parameters from
    ``params() -> (reflect, log_scale, bias)``; see :class:`QLFLinear`."""

    def __init__(self, input_dim, params, cache_size=1, context=None):
        super().__init__(input_dim, cache_size=cache_size, context=context)
        self._params = params

    def _factors(self):
        """``(Q, log_scale, bias)``."""
        reflect, log_scale, bias = self._params()
        return householder_orthogonal(reflect), log_scale, bias

    def weight(self) -> torch.Tensor:
        """The matrix ``W = Q diag(exp(log_scale))``."""
        q, log_scale, _ = self._factors()
        return q * log_scale.exp()

    def _call_and_ladj(self, x):
        q, log_scale, bias = self._factors()
        y = F.linear(x, q * log_scale.exp(), bias)
        return y, log_scale.sum().expand(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        q, log_scale, bias = self._factors()
        # W^{-1} = diag(exp(-log_scale)) Q^T, so x = (y - b) @ (Q diag(exp(-log_scale)))
        x = (y - bias) @ (q / log_scale.exp())
        return x, log_scale.sum().expand(y.shape[:-1])

    def _log_abs_det_jacobian(self, x, y):
        return self._params()[1].sum().expand(x.shape[:-1])


class QLFLinear(ConditionedQLFLinear, TransformModule):
    r"""Invertible linear map ``y = Q diag(sigma) x + b`` (f_lin of a QLF block), initialised to
    ``kappa * I``, with condition number at most ``exp(2 R)`` for any parameter values.

    ``Q`` is (minus) a product of ``D`` Householder reflections (orthogonal for any parameters,
    ``I`` at init, see :func:`householder_orthogonal`), ``log sigma = log kappa + R tanh(raw / R)`` lies in
    ``[log kappa - R, log kappa + R]``
    (``R = max_log_scale``), so the singular values of ``W`` are ``sigma`` and the log-det is
    ``sum(log sigma)``. The inverse is ``diag(1 / sigma) Q^T (y - b)``: both directions cost one
    ``D x D`` matrix (built once per call) and one matmul. The parameters are one tensor ``theta``
    of shape ``(D, D + 2)``: reflection vectors (strict lower part), raw log-scales, bias.

    Arguments:
        input_dim (int): the event size D.
        kappa (float): the initial scale (``W = kappa * I``); default 1.
        max_log_scale (float or None): ``R`` (default 2, so ``cond(W) <= e^4``); ``None`` removes
            the bound (``log sigma = log kappa + raw``, unbounded condition number).
        cache_size (int): Pyro's transform cache size (0 or 1).

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.qlf import QLFLinear
        >>> t = QLFLinear(3, kappa=2.0)
        >>> x = torch.randn(4, 3)
        >>> t.log_abs_det_jacobian(x, t(x))  # log det(2 I) = 3 log 2
        tensor([2.0794, 2.0794, 2.0794, 2.0794], grad_fn=<ExpandBackward0>)
    """

    def __init__(self, input_dim, kappa=1.0, max_log_scale=MAX_LOG_SCALE, cache_size=1):
        input_dim = check_dim(input_dim, "input_dim")
        kappa = _check_positive(kappa, "kappa")
        super().__init__(input_dim, self._get_params, cache_size=cache_size)
        self.log_kappa = math.log(kappa)
        self.max_log_scale = _check_max_log_scale(max_log_scale)
        # one tensor: reflection vectors (strict lower part of the first D columns), raw
        # log-scales, bias
        self.theta = nn.Parameter(torch.zeros(input_dim, input_dim + 2))

    def _get_params(self):
        d, r = self.input_dim, self.max_log_scale
        reflect, raw, bias = self.theta.split([d, 1, 1], dim=-1)
        raw = raw.squeeze(-1)
        log_scale = (raw if r is None else r * torch.tanh(raw / r)) + self.log_kappa
        return reflect, log_scale, bias.squeeze(-1)


# =================================================================================================
# f_aff: dual affine coupling with Mexican-hat log-scales
# =================================================================================================
class ConditionedDualAffineCoupling(FlowTransform):
    """Dual affine coupling (paper Eq. 14) with conditioners ``nn1(x2, ctx)``, ``nn2(y1, ctx)``.

    Each conditioner returns ``(log_scale, shift)``; ``nn2`` is ``None`` for a single coupling
    (``dual=False``: ``y2 = x2``) or when the second half is empty (``D = 1``). ``context`` (if given) is
    broadcast against the input batch. See :class:`DualAffineCoupling`.
    """

    def __init__(self, input_dim, nn1, nn2, cache_size=1, context=None):
        super().__init__(input_dim, cache_size=cache_size, context=context)
        self.split = max(1, self.input_dim // 2)
        self.nn1 = nn1
        self.nn2 = nn2

    def _call_and_ladj(self, x):
        x, ctx = self._broadcast_context(x)
        x1, x2 = x.split([self.split, self.input_dim - self.split], -1)
        log_s1, t1 = self.nn1(x2, ctx)
        y1 = torch.exp(log_s1) * x1 + t1
        if self.nn2 is None:  # a single coupling (x2 passes unchanged), or D = 1
            return (torch.cat([y1, x2], dim=-1) if x2.shape[-1] else y1), log_s1.sum(-1)
        log_s2, t2 = self.nn2(y1, ctx)
        y2 = torch.exp(log_s2) * x2 + t2
        return torch.cat([y1, y2], dim=-1), torch.cat([log_s1, log_s2], -1).sum(-1)

    def _inverse_and_ladj(self, y):
        y, ctx = self._broadcast_context(y)
        y1, y2 = y.split([self.split, self.input_dim - self.split], -1)
        if self.nn2 is None:
            log_s1, t1 = self.nn1(y2, ctx)
            x1 = (y1 - t1) * torch.exp(-log_s1)
            return (torch.cat([x1, y2], dim=-1) if y2.shape[-1] else x1), log_s1.sum(-1)
        log_s2, t2 = self.nn2(y1, ctx)
        x2 = (y2 - t2) * torch.exp(-log_s2)
        log_s1, t1 = self.nn1(x2, ctx)
        x1 = (y1 - t1) * torch.exp(-log_s1)
        return torch.cat([x1, x2], dim=-1), torch.cat([log_s1, log_s2], -1).sum(-1)


def _coupling_nets(input_dim, context_dim, hidden_dims, num_hats, log_scale_init, max_lipschitz, dual=True):
    split = max(1, input_dim // 2)
    rest = input_dim - split
    hidden = _hidden_dims(hidden_dims, max(32, 4 * input_dim))
    nn1 = MexicanHatNN(rest + context_dim, split, hidden, num_hats, log_scale_init, max_lipschitz)
    nn2 = MexicanHatNN(split + context_dim, rest, hidden, num_hats, log_scale_init,
                       max_lipschitz) if rest and dual else None
    return nn1, nn2


class DualAffineCoupling(ConditionedDualAffineCoupling, TransformModule):
    r"""Dual affine coupling with Mexican-hat log-scales (f_aff of a QLF block).

    ``y1 = s1(x2) * x1 + t1(x2)``, ``y2 = s2(y1) * x2 + t2(y1)`` with ``x1`` the first
    ``max(1, D // 2)`` coordinates; every scale lies in ``[0.640, 2.718]`` for any parameters
    (``log s`` is a mean of Mexican hats, :class:`~pyro_flows.nn.mexican_hat.MexicanHatNN`).
    Starts as ``x -> exp(log_scale_init) * x``.

    Arguments:
        input_dim (int): the event size D (at least 2).
        hidden_dims (list of int): hidden sizes of each conditioner; default ``[max(32, 4D)] * 2``.
        num_hats (int): M, Mexican-hat responses averaged per log-scale (default 4).
        log_scale_init (float): initial ``log s`` of every coordinate (default 0, volume preserving).
        max_lipschitz (float or None): Lipschitz bound ``c`` of each conditioner (default 100;
            ``None``: unbounded), see :class:`~pyro_flows.nn.mexican_hat.MexicanHatNN`.
        dual (bool): both couplings (default); ``False``: only the first, ``y2 = x2`` (one conditioner:
            about half the cost; the blocks' linear layers mix the halves).
        cache_size (int): Pyro's transform cache size (0 or 1).

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.qlf import DualAffineCoupling
        >>> t = DualAffineCoupling(4, hidden_dims=[16])
        >>> x = torch.randn(8, 4)
        >>> torch.allclose(t.inv(t(x).clone()), x, atol=1e-5)
        True
    """

    def __init__(self, input_dim, hidden_dims=None, num_hats=4, log_scale_init=0.0,
                 max_lipschitz=MAX_LIPSCHITZ, dual=True, cache_size=1):
        input_dim = check_dim(input_dim, "input_dim")
        if input_dim < 2:
            raise ValueError(
                f"DualAffineCoupling needs input_dim >= 2 (nothing to condition on), got {input_dim}; "
                f"use ConditionalDualAffineCoupling for a 1-D event with a context"
            )
        nn1, nn2 = _coupling_nets(input_dim, 0, hidden_dims, num_hats, log_scale_init, max_lipschitz, dual)
        super().__init__(input_dim, None, None, cache_size=cache_size)
        self.nn1, self.nn2 = nn1, nn2


class ConditionalDualAffineCoupling(ConditionalFlowModule):
    r"""Dual affine coupling whose conditioners also see a context: ``s1(x2, c)``, ``s2(y1, c)``, ...

    Arguments:
        input_dim (int): the event size D (1 allowed: then ``y = s(c) x + t(c)``).
        context_dim (int): the context size C.
        hidden_dims (list of int): hidden sizes of each conditioner; default ``[max(32, 4D)] * 2``.
        num_hats (int): M, Mexican-hat responses averaged per log-scale (default 4).
        log_scale_init (float): initial ``log s`` of every coordinate (default 0).
        max_lipschitz (float or None), dual (bool): as for :class:`DualAffineCoupling`.
        cache_size (int): cache size of the transforms ``condition`` returns (0 or 1).

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.qlf import ConditionalDualAffineCoupling
        >>> m = ConditionalDualAffineCoupling(3, 2, hidden_dims=[16])
        >>> m.condition(torch.randn(5, 2))(torch.randn(5, 3)).shape
        torch.Size([5, 3])
    """

    def __init__(self, input_dim, context_dim, hidden_dims=None, num_hats=4, log_scale_init=0.0,
                 max_lipschitz=MAX_LIPSCHITZ, dual=True, cache_size=1):
        super().__init__(input_dim, context_dim)
        self.cache_size = cache_size
        self.nn1, self.nn2 = _coupling_nets(
            self.input_dim, self.context_dim, hidden_dims, num_hats, log_scale_init, max_lipschitz, dual
        )

    def _condition(self, context):
        return ConditionedDualAffineCoupling(self.input_dim, self.nn1, self.nn2,
                                             cache_size=self.cache_size, context=context)


# =================================================================================================
# f_act: contractive monotone rational-quadratic spline activation with a slope floor
# =================================================================================================
def _logit(p):
    return math.log(p / (1 - p))


def rqs_table(theta, min_derivative=MIN_DERIVATIVE):
    """Per-bin table of the activation from raw parameters ``theta`` of shape ``(D, 3K + 2)``.

    ``theta`` holds, per coordinate, ``K`` bin-width logits, ``K`` bin-slope logits, ``K + 1``
    knot-derivative logits and the log half-width of the box. Returns eight ``(D, K + 2)`` tensors:
    bins ``1 .. K`` are the spline's, bins ``0`` and ``K + 1`` the linear tails (an RQ bin whose slope
    and knot derivatives all equal the boundary derivative is exactly linear, for any position, so
    the tails need no separate branch). They are: left edge ``x0``, inverse width ``1/w``, bottom
    ``y0``, height ``h``, bin slope ``d``, left knot derivative ``a0``, ``e2 = 2 (d - a0)`` and
    ``c = a0 + a1 - 2 d`` (``e2`` and ``c`` exactly 0 in the tails).
    """
    a = min_derivative
    K = (theta.shape[-1] - 2) // 3
    tx, ty, ta, log_width = theta.split([K, K, K + 1, 1], dim=-1)
    width = log_width.exp()  # half-width of the box, (D, 1)
    frac = torch.softmax(tx, dim=-1)
    alpha = torch.sigmoid(ta).mul(1 - a).add(a)  # knot derivatives in (a, 1)
    lo, hi = alpha[..., :1], alpha[..., -1:]
    half_cap = torch.minimum(alpha[..., :-1], alpha[..., 1:])  # cap = (1 + half_cap) / 2
    delta = torch.addcmul(torch.full_like(half_cap, a), half_cap.add(1 - 2 * a), torch.sigmoid(ty), value=0.5)
    # extended bins: left tail, K spline bins, right tail (the tails are one box half-width wide);
    # spline bins are at least _MIN_BIN_WIDTH of the box wide
    dx = torch.cat([width, frac.mul(2 * (1 - _MIN_BIN_WIDTH * K)).add(2 * _MIN_BIN_WIDTH) * width, width], -1)
    d = torch.cat([lo, delta, hi], dim=-1)
    knots = torch.cat([lo, alpha, hi], dim=-1)
    a0, a1 = knots[..., :-1], knots[..., 1:]
    dy = d * dx
    cx, cy = torch.cumsum(dx, -1), torch.cumsum(dy, -1)
    x0 = torch.add(cx - dx, width, alpha=-2)  # the box is [-w, w]
    y0 = torch.add(cy - dy, cy[..., -1:], alpha=-0.5)  # centred: beta * x when every slope is beta
    e2 = torch.add(d, a0, alpha=-1).mul(2)
    c = torch.add(a0 + a1, d, alpha=-2)
    return x0, dx.reciprocal(), y0, dy, d, a0, e2, c


def _bins(v, edges, table):
    """The table entries of the bins of ``v`` (``(N, D)``), given the bins' left edges ``(D, K + 2)``.

    The bin of ``v`` is the number of inner edges ``<= v`` (bins ``0 .. K + 1``): one comparison with
    all ``K + 1`` inner edges and a sum (``(N, K + 1, D)``, reduced over the middle axis), then one
    gather of all eight columns at once (``index_select`` on the stacked table; its backward is one
    ``index_add``)."""
    D, nb = edges.shape
    idx = (edges[:, 1:].t() <= v.unsqueeze(-2)).sum(-2)
    idx = idx + torch.arange(0, D * nb, nb, device=v.device)
    rows = torch.stack(table, 0).reshape(len(table), D * nb)
    return rows.index_select(1, idx.reshape(-1)).view(len(table), *idx.shape).unbind(0)


def _log_derivative(xi, d, a0, e2, c, den):
    """``(log f', n2)`` from ``f' = d^2 n2 / den^2``, ``n2 = a0 + e2 xi + c xi^2``, exact (``log d``) in the
    tails."""
    n2 = torch.addcmul(a0, xi, torch.addcmul(e2, c, xi))
    return torch.log(n2 * (d / den).square()), n2


class _RQSEval(torch.autograd.Function):
    r"""The spline at a point and its log-derivative from the gathered entries of its bin (each ``(N, D)``),
    either direction, as one autograd node with a closed-form backward.

    Forward (``inverse=False``): ``v = x``, ``xi = (x - x0) iw``, returns ``(y, log f'(x))``; inverse:
    ``v = y``, ``xi`` the bin's quadratic root, returns ``(x, log f'(x))``. With ``g = a0 + e2 xi / 2``,
    ``q = h xi g / den`` (so ``y = y0 + q``), ``s = xi (1 - xi)``, ``den = d + c s`` and
    ``n2 = a0 + e2 xi + c xi^2`` (``L = log f' = log n2 + 2 log d - 2 log den``), the partial derivatives
    at fixed ``xi`` are ``dy/dh = xi g / den``, ``dy/da0 = h xi / den``, ``dy/de2 = h xi^2 / (2 den)``,
    ``dy/dd = -q / den``, ``dy/dc = -q s / den``, ``dy/dxi = (h (a0 + e2 xi) - q c (1 - 2 xi)) / den``;
    ``dL/da0 = 1 / n2``, ``dL/de2 = xi / n2``, ``dL/dd = 2 / d - 2 / den``,
    ``dL/dc = xi^2 / n2 - 2 s / den``, ``dL/dxi = (e2 + 2 c xi) / n2 - 2 c (1 - 2 xi) / den``; ``x0``,
    ``iw`` enter through ``xi`` (``dxi/dx0 = -iw``, ``dxi/diw = xi / iw``). A cotangent ``(A, B)`` on
    ``(y, L)`` at fixed ``x`` gives every parameter's gradient as ``A dy/dp + B dL/dp``. The inverse is
    the same with ``A = -g_x / f'`` (implicit differentiation of ``f(x) = y``: ``dx/dp = -(dy/dp) / f'``),
    where ``g_x = g_out + g_L dL/dx`` is the whole cotangent reaching ``x``. ``gradcheck`` in float64:
    ``tests/test_qlf.py``.
    """

    @staticmethod
    def forward(ctx, inverse, v, x0, iw, y0, h, d, a0, e2, c):
        if inverse:
            r = v - y0
            qa = torch.addcmul(h * e2, r, c, value=2)  # 2 qa
            qb = torch.addcmul(h * a0, r, c, value=-1)
            rd = r * d  # qc = -r d
            disc = torch.addcmul(qb * qb, qa, rd, value=2).clamp(min=0)  # qb^2 - 4 qa qc
            xi = torch.div(rd + rd, qb + disc.sqrt())  # the cancellation-free root
            s = torch.addcmul(xi, xi, xi, value=-1)
            den = torch.addcmul(d, c, s)
            out = torch.addcdiv(x0, xi, iw)
        else:
            xi = (v - x0) * iw
            s = torch.addcmul(xi, xi, xi, value=-1)  # xi (1 - xi)
            den = torch.addcmul(d, c, s)
            out = torch.addcdiv(y0, h * xi * torch.addcmul(a0, e2, xi, value=0.5), den)
        log_deriv, n2 = _log_derivative(xi, d, a0, e2, c, den)
        ctx.inverse = inverse
        ctx.save_for_backward(xi, s, den, n2, iw, h, d, a0, e2, c)
        return out, log_deriv

    @staticmethod
    def backward(ctx, g_out, g_L):
        xi, s, den, n2, iw, h, d, a0, e2, c = ctx.saved_tensors
        inv_den, inv_n2 = den.reciprocal(), n2.reciprocal()
        hxi = h * xi
        g = torch.addcmul(a0, e2, xi, value=0.5)
        q = hxi * g * inv_den
        c_slope = c * (1 - 2 * xi)  # d den / d xi
        dy_dxi = (torch.addcmul(a0, e2, xi) * h - q * c_slope) * inv_den
        dl_dxi = torch.addcmul(e2, c, xi, value=2) * inv_n2 - 2 * c_slope * inv_den
        B = g_L
        if ctx.inverse:  # A = -g_x / f', f' = dy_dxi iw, g_x = g_out + g_L dL/dxi iw
            A = -(g_out + B * dl_dxi * iw) / (dy_dxi * iw)
            g_v = -A
        else:
            A = g_out
        G_xi = A * dy_dxi + B * dl_dxi
        if not ctx.inverse:
            g_v = G_xi * iw
        A_den, B_n2 = A * inv_den, B * inv_n2
        Aq_den = A_den * q
        two_B_den = 2 * B * inv_den
        g_x0 = -G_xi * iw
        g_iw = G_xi * xi / iw
        g_h = A_den * xi * g
        g_d = 2 * B / d - two_B_den - Aq_den
        g_a0 = A_den * hxi + B_n2
        g_e2 = (0.5 * A_den * hxi + B_n2) * xi
        g_c = (B_n2 * xi - two_B_den * (1 - xi) - Aq_den * (1 - xi)) * xi
        return None, g_v, g_x0, g_iw, A, g_h, g_d, g_a0, g_e2, g_c


def rqs_forward(x, table):
    """Activation and log-derivative at ``x`` (``(N, D)``); ``table`` from :func:`rqs_table`."""
    return _RQSEval.apply(False, x, *_bins(x, table[0], table))


def rqs_inverse(y, table):
    """Inverse activation at ``y`` (``(N, D)``) and the forward log-derivative at the result."""
    return _RQSEval.apply(True, y, *_bins(y, table[2], table))


class ConditionedRQSActivation(FlowTransform):
    """Elementwise spline activation with raw parameters ``params() -> theta`` (``(D, 3K + 2)``,
    see :func:`rqs_table`); see :class:`RQSActivation`."""

    def __init__(self, input_dim, params, min_derivative=MIN_DERIVATIVE, cache_size=1, context=None):
        super().__init__(input_dim, cache_size=cache_size, context=context)
        self._params = params
        self.min_derivative = _check_min_derivative(min_derivative)

    def table(self):
        """The per-bin table, see :func:`rqs_table`."""
        return rqs_table(self._params(), self.min_derivative)

    def _call_and_ladj(self, x):
        flat = x.reshape(-1, self.input_dim)
        y, dlog = rqs_forward(flat, self.table())
        return y.reshape(x.shape), dlog.sum(-1).reshape(x.shape[:-1])

    def _inverse_and_ladj(self, y):
        flat = y.reshape(-1, self.input_dim)
        x, dlog = rqs_inverse(flat, self.table())
        return x.reshape(y.shape), dlog.sum(-1).reshape(y.shape[:-1])


class RQSActivation(ConditionedRQSActivation, TransformModule):
    r"""Contractive elementwise rational-quadratic spline activation (f_act of a QLF block).

    Per coordinate: ``num_bins`` bins on a learnable box ``[-w, w]``, knot derivatives in
    ``(a, 1)``, bin slopes in ``(a, (1 + min(alpha_k, alpha_{k+1})) / 2)`` with
    ``a = min_derivative``, so that the derivative lies in ``[a^3, 1]`` for any parameters (see the
    module docstring), linear tails outside the box with the boundary derivative as slope, analytic
    inverse. Starts as ``x -> beta * x``. The raw parameters are one tensor ``theta`` of shape
    ``(D, 3K + 2)`` (see :func:`rqs_table`).

    Arguments:
        input_dim (int): the event size D.
        num_bins (int): bins per coordinate, K (default 8; the paper uses 16).
        bound (float): initial half-width ``w`` of the box (default 3).
        beta (float): the initial slope, in ``(a, 1)`` (default 0.8).
        min_derivative (float): ``a``, in ``(0, 0.5)`` (default 0.2).
        cache_size (int): Pyro's transform cache size (0 or 1).

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.qlf import RQSActivation
        >>> t = RQSActivation(2, beta=0.5)
        >>> t(torch.tensor([[1.0, -4.0]])).detach()  # beta * x at init, tails included
        tensor([[ 0.5000, -2.0000]])
    """

    def __init__(self, input_dim, num_bins=8, bound=3.0, beta=0.8, min_derivative=MIN_DERIVATIVE,
                 cache_size=1):
        input_dim = check_dim(input_dim, "input_dim")
        num_bins = check_dim(num_bins, "num_bins")
        bound = _check_positive(bound, "bound")
        a = _check_min_derivative(min_derivative)
        beta = _check_beta(beta, a)
        super().__init__(input_dim, self._get_params, min_derivative=a, cache_size=cache_size)
        self.num_bins = num_bins
        K = num_bins
        # all slopes beta: alpha = beta, and delta = beta with cap = (1 + beta) / 2
        init = torch.cat([
            torch.zeros(K),
            torch.full((K,), _logit((beta - a) / ((1 + beta) / 2 - a))),
            torch.full((K + 1,), _logit((beta - a) / (1 - a))),
            torch.full((1,), math.log(bound)),
        ])
        self.theta = nn.Parameter(init.repeat(input_dim, 1))

    def _get_params(self):
        return self.theta


def _check_beta(beta, min_derivative=MIN_DERIVATIVE):
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not min_derivative < beta < 1:
        raise ValueError(
            f"beta must be a number in (min_derivative, 1) = ({min_derivative}, 1), got {beta!r}"
        )
    return float(beta)


# =================================================================================================
# the block
# =================================================================================================
class ConditionedQLF(FlowTransform):
    """One QLF block ``f_act o f_aff o f_lin`` from three conditioned parts (``coupling`` may be
    ``None`` for ``D = 1`` without a context); see :class:`QLF`."""

    def __init__(self, linear, coupling, activation, cache_size=1, context=None):
        FlowTransform.__init__(self, linear.input_dim, cache_size=cache_size, context=context)
        self.linear = linear
        self.coupling = coupling
        self.activation = activation

    def _parts(self):
        return [p for p in (self.linear, self.coupling, self.activation) if p is not None]

    def _call_and_ladj(self, x):
        return _chain([p._call_and_ladj for p in self._parts()], x)

    def _inverse_and_ladj(self, y):
        return _chain([p._inverse_and_ladj for p in reversed(self._parts())], y)


def _chain(steps, h):
    """Apply ``steps`` (each ``h -> (h, log-det)``) in order; the summed log-det, in that order."""
    h, ld = steps[0](h)
    for step in steps[1:]:
        h, ld_step = step(h)
        ld = ld + ld_step
    return h, ld


def _split_expansion(beta, kappa, num_hats, has_coupling, min_derivative=MIN_DERIVATIVE):
    """``(kappa, log s0)`` with ``kappa * s0 * beta = 1`` (blockwise volume preservation)."""
    beta = _check_beta(beta, _check_min_derivative(min_derivative))
    total = -math.log(beta)
    if not has_coupling:
        if kappa is not None and not math.isclose(kappa, 1 / beta):
            raise ValueError(f"without a coupling scale on every coordinate (D = 1, or dual=False) kappa must be "
                             f"1/beta = {1 / beta:.6g}, got {kappa}")
        return 1 / beta, 0.0
    if kappa is None:
        log_s0 = min(0.5 * total, 0.5)
        kappa = math.exp(total - log_s0)
    else:
        kappa = _check_positive(kappa, "kappa")
        log_s0 = total - math.log(kappa)
    low, high = log_scale_range(num_hats)
    if not low < log_s0 < high:
        raise ValueError(
            f"kappa={kappa:.6g} with beta={beta:.6g} needs an initial coupling log-scale "
            f"{log_s0:.4g} outside the reachable ({low:.4g}, {high:.4g})"
        )
    return kappa, log_s0


class QLF(ConditionedQLF, TransformModule):
    r"""One QLF block ``f_act o f_aff o f_lin`` (Liao & He), blockwise volume preserving at init.

    ``f_lin`` is :class:`QLFLinear` (``kappa * I`` at init), ``f_aff`` a :class:`DualAffineCoupling`
    (``s0 * I`` at init) and ``f_act`` an :class:`RQSActivation` (``beta * I`` at init), with
    ``kappa * s0 * beta = 1``: the block starts as the identity with log-det 0, an expansion followed
    by a contraction. The parts are the submodules ``linear``, ``coupling`` and ``activation``.
    Bounds for any parameters: see the module docstring.

    Arguments:
        input_dim (int): the event size D.
        hidden_dims (list of int): hidden sizes of each coupling conditioner; default
            ``[max(32, 4D)] * 2``.
        num_hats (int): M, Mexican-hat responses averaged per log-scale (default 4).
        num_bins (int): spline bins per coordinate (default 8).
        bound (float): initial half-width of the spline box (default 3).
        beta (float): the activation's initial slope, in ``(min_derivative, 1)`` (default 0.8; the
            paper advises ``[0.5, 1]``).
        kappa (float or None): initial scale of the linear layer; default splits the expansion
            ``1 / beta`` evenly between ``kappa`` and the coupling scale.
        max_log_scale (float or None): the linear layer's log-scales stay within this distance of
            ``log kappa`` (default 2; ``None``: unbounded).
        min_derivative (float): floor of the activation's knot derivatives and bin slopes
            (default 0.1).
        max_lipschitz (float or None): Lipschitz bound of each coupling conditioner (default 100;
            ``None``: unbounded).
        dual (bool): the paper's dual coupling (default); ``False``: one coupling conditioner per
            block (``y2 = x2``; the linear layers mix the halves between blocks), about 20 % fewer
            operations per step; then ``kappa = 1 / beta`` and the coupling starts at ``s0 = 1``.
        cache_size (int): Pyro's transform cache size (0 or 1).

    Example:
        >>> import torch, pyro.distributions as dist
        >>> from pyro_flows.transforms.qlf import QLF
        >>> block = QLF(2, hidden_dims=[16])
        >>> base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
        >>> d = dist.TransformedDistribution(base, [block])
        >>> d.log_prob(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, input_dim, hidden_dims=None, num_hats=4, num_bins=8, bound=3.0, beta=0.8,
                 kappa=None, max_log_scale=MAX_LOG_SCALE, min_derivative=MIN_DERIVATIVE,
                 max_lipschitz=MAX_LIPSCHITZ, dual=True, cache_size=1):
        input_dim = check_dim(input_dim, "input_dim")
        num_hats = check_dim(num_hats, "num_hats")
        kappa, log_s0 = _split_expansion(beta, kappa, num_hats, input_dim > 1 and bool(dual), min_derivative)
        linear = QLFLinear(input_dim, kappa=kappa, max_log_scale=max_log_scale, cache_size=0)
        coupling = None
        if input_dim > 1:
            coupling = DualAffineCoupling(input_dim, hidden_dims, num_hats, log_s0, max_lipschitz,
                                          dual=bool(dual), cache_size=0)
        activation = RQSActivation(input_dim, num_bins, bound, beta, min_derivative, cache_size=0)
        ConditionedQLF.__init__(self, linear, coupling, activation, cache_size=cache_size)

    def init_identity_(self):
        """Reset the block to the identity map (log-det 0) by the blockwise volume-preserving rule.

        ``f_lin = kappa I`` (``theta = 0``: ``Q = I`` exactly), ``f_aff = s0 I`` (read-out weights
        and shift bias zero, hat biases for ``log s0``) and ``f_act = beta I`` (every knot
        derivative and bin slope ``beta``; the box keeps its width), with ``log s0 = min(log kappa,
        0.5)`` (the constructor's default split) and ``beta = 1 / (kappa s0)``. The block is the
        identity up to the rounding of the three scalings (``beta = 1`` is out of reach of the
        activation's sigmoid, so not bit for bit: about ``1e-16`` relative in float64). The
        coupling's hidden layers keep their values, so the read-out's gradient does not vanish.
        In the conditional block the coupling is the identity for every context.

        Example:
            >>> import torch
            >>> t = QLF(3, hidden_dims=[16]).double().init_identity_()
            >>> x = torch.randn(4, 3, dtype=torch.float64)
            >>> bool(torch.allclose(t(x), x, rtol=1e-14, atol=1e-14))
            True
        """
        from ..nn.mexican_hat import mexican_hat_biases

        lin, act = self.linear, self.activation
        nets = [] if self.coupling is None else [n for n in (self.coupling.nn1, self.coupling.nn2) if n is not None]
        log_s0 = 0.0
        single = self.coupling is not None and self.coupling.nn2 is None and lin.input_dim > 1
        if nets and not single:
            low, high = log_scale_range(nets[0].num_hats)
            log_s0 = min(max(min(lin.log_kappa, 0.5), low + 1e-3), high - 1e-3)
        beta = math.exp(-lin.log_kappa - log_s0)
        a = act.min_derivative
        if not a < beta < 1:
            raise ValueError(f"{type(self).__name__}: kappa = {math.exp(lin.log_kappa):.6g} leaves no identity "
                             f"split (activation slope {beta:.6g} outside ({a}, 1))")
        with torch.no_grad():
            lin.theta.zero_()
            for net in nets:
                weight, bias = net.layers()[-1]
                hats = bias.new_tensor(mexican_hat_biases(log_s0, net.num_hats))
                weight.zero_()
                bias.copy_(torch.cat([hats.repeat_interleave(net.out_features), bias.new_zeros(net.out_features)]))
            K = (act.theta.shape[-1] - 2) // 3
            theta = act.theta
            theta[..., :K] = 0.0
            theta[..., K:2 * K] = _logit((beta - a) / ((1 + beta) / 2 - a))
            theta[..., 2 * K:3 * K + 1] = _logit((beta - a) / (1 - a))
        return self


class ConditionalQLF(ConditionalFlowModule):
    r"""Conditional QLF block: the context enters both coupling conditioners.

    The linear layer and the activation are shared by every context (unconditional): the coupling
    is where a context can act without changing the exact log-det structure.

    Arguments:
        input_dim (int): the event size D.
        context_dim (int): the context size C.
        hidden_dims, num_hats, num_bins, bound, beta, kappa, max_log_scale, min_derivative,
            max_lipschitz, dual: as for :class:`QLF`.
        cache_size (int): cache size of the transforms ``condition`` returns (0 or 1).

    Example:
        >>> import torch
        >>> from pyro_flows.transforms.qlf import ConditionalQLF
        >>> m = ConditionalQLF(3, 2, hidden_dims=[16])
        >>> t = m.condition(torch.randn(2))
        >>> t(torch.randn(4, 3)).shape
        torch.Size([4, 3])
    """

    def __init__(self, input_dim, context_dim, hidden_dims=None, num_hats=4, num_bins=8, bound=3.0,
                 beta=0.8, kappa=None, max_log_scale=MAX_LOG_SCALE, min_derivative=MIN_DERIVATIVE,
                 max_lipschitz=MAX_LIPSCHITZ, dual=True, cache_size=1):
        super().__init__(input_dim, context_dim)
        num_hats = check_dim(num_hats, "num_hats")
        kappa, log_s0 = _split_expansion(beta, kappa, num_hats, bool(dual) or self.input_dim == 1, min_derivative)
        self.cache_size = cache_size
        self.linear = QLFLinear(self.input_dim, kappa=kappa, max_log_scale=max_log_scale, cache_size=0)
        self.coupling = ConditionalDualAffineCoupling(
            self.input_dim, self.context_dim, hidden_dims, num_hats, log_s0, max_lipschitz, dual=bool(dual),
            cache_size=0
        )
        self.activation = RQSActivation(self.input_dim, num_bins, bound, beta, min_derivative,
                                        cache_size=0)

    init_identity_ = QLF.init_identity_

    def _condition(self, context):
        return ConditionedQLF(self.linear, self.coupling.condition(context), self.activation,
                              cache_size=self.cache_size, context=context)


def qlf(input_dim, hidden_dims=None, **kwargs):
    """A :class:`QLF` block (``hidden_dims=None``: ``[max(32, 4D)] * 2``); kwargs as for :class:`QLF`.

    Example:
        >>> import pyro_flows
        >>> t = pyro_flows.flow("qlf", 2, num_layers=3, hidden_dims=[16])
    """
    return QLF(input_dim, hidden_dims=hidden_dims, **kwargs)


def conditional_qlf(input_dim, context_dim, hidden_dims=None, **kwargs):
    """A :class:`ConditionalQLF` block; kwargs as for :class:`QLF` (``cache_size`` included).

    Example:
        >>> import pyro_flows
        >>> t = pyro_flows.flow("qlf", 2, num_layers=2, context_dim=3, hidden_dims=[16])
    """
    return ConditionalQLF(input_dim, context_dim, hidden_dims=hidden_dims, **kwargs)


register_flow(
    "qlf",
    qlf,
    conditional_qlf,
    permutation=None,
    test_kwargs={"hidden_dims": [8], "num_hats": 2, "num_bins": 4},
)
