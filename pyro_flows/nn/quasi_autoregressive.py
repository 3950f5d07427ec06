"""Quasi-autoregressive Lipschitz networks with exact Jacobian-diagonal propagation (QuAR).

:class:`QuasiAutoregressiveNet` is the residual branch ``F: R^D -> R^D`` of a QuAR flow (Gopal, 2020):

* **Masks.** Every linear layer is a :class:`~pyro_flows.nn.lipschitz.LipschitzLinear` masked by
  :func:`~pyro_flows.nn.masked.quasi_autoregressive_masks`: hidden sizes are multiples ``k * D``, unit
  ``u`` of a layer has a degree ``d(u)`` (``k`` units per coordinate) and may see units of degree
  ``<= d(u)`` of the previous layer, *including* equality in the first layer (MADE would require
  ``<``). Output ``i`` thus depends on ``x_j`` for ``j <= i`` only: ``J_F`` is lower-triangular with a
  (generically) non-zero diagonal, for every value of the weights (the masks are buffers, never
  trained or perturbed).
* **Exact diagonal in the same pass** (the paper's recursion, section 4.1). A unit of degree ``d``
  depends on ``x_{<=d}`` only, so ``d a_u / d x_{d(u)}`` receives contributions only from units of
  the previous layer with the *same* degree: with ``E`` the 0/1 "equal degree" pattern,
  ``g_a = (W * M * E) g_h`` for a linear layer (``g_h = 1`` for the inputs) and ``g_h = act'(a) * g_a``
  for an activation. ``W * M * E`` is block-diagonal (``D`` blocks of ``k_out x k_in``), so the
  diagonal costs one block-diagonal product per layer (a dense masked product for small layers, where
  that is faster, a batched product of the ``D`` blocks for large ones), no autograd and no trace
  estimator, and it is the derivative of the function actually computed (tested against autograd).
* **Lipschitz control by construction** (section 4.2, the "Lipschitz trick"). The masked network
  ``N = f_L o ... o f_1`` has ``Lip(N) <= P = prod_i Lip(f_i)``, where each linear layer's factor is the
  *exact* spectral norm of ``W * M`` (float64 plus a 1e-6 relative margin; all layers in one
  :func:`~pyro_flows.nn.lipschitz.spectral_norm_product` call: one batched ``eigh`` per Gram-matrix
  size, no graph through it, gradient ``u v^T``; the paper's power iteration is only a lower bound and
  is not used)
  and each activation's factor is its Lipschitz constant (ELU: 1; LipSwish: 1 as a safe bound of its
  < 1 constant). The output is ``F = diag(c) N`` with ``c_d = sigma / (theta_d + P)``, ``theta =
  softplus(raw_theta) >= 0`` learnable (one per output coordinate, as in the paper) and ``0 < sigma < 1``
  fixed. Then ``Lip(F) <= max_d c_d * P = sigma * P / (min_d theta_d + P) <= sigma < 1`` for ANY weights.
  Because ``|dF_i/dx_i| <= ||J_F||_2 <= Lip(F) < 1``, ``1 + diag(J_F) > 0`` and ``log|det(I + J_F)| =
  sum_i log1p(diag_i)`` exactly. The paper leaves open whether ``sigma / (theta + P)`` also scales
  the last bias: here it does (it scales the whole network output), which does not affect ``Lip``.
* **Context** (conditional flows): ``context_dim`` extra inputs are appended to the first layer and seen
  by every first-layer unit. They do not change which ``x_j`` an output depends on, so the Jacobian in
  ``x`` stays lower-triangular; the Lipschitz bound in ``x`` is the spectral norm of the first ``D``
  columns only (``mask_columns``), since for a fixed context the context columns only add a bias.
  Hence ``Lip_x(F(., context)) <= sigma`` for every context.

References:
    A. Gopal, "Quasi-Autoregressive Residual (QuAR) Flows", ICML 2020 INNF+ workshop, arXiv:2009.07419.

    M. Germain, K. Gregor, I. Murray, H. Larochelle, "MADE: Masked Autoencoder for Distribution
    Estimation", ICML 2015.

    J. Behrmann, W. Grathwohl, R. T. Q. Chen, D. Duvenaud, J.-H. Jacobsen, "Invertible Residual
    Networks", ICML 2019.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import broadcast_context, check_dim
from .activations import get_activation
from .lipschitz import (_BOUNDS, LipschitzLinear, PackedBoundLayout, SharedBoundNetwork, matrix_norm_bound,
                        power_norm_product, spectral_norm_product)
from .masked import quasi_autoregressive_masks
from .packed import Packing, register_old_keys

__all__ = ["QuasiAutoregressiveNet", "default_quar_hidden_dims"]


def default_quar_hidden_dims(input_dim: int, hidden_dims=None, hidden_factors=None):
    """Resolve the hidden sizes of a QuAR network.

    ``hidden_dims`` (sizes, each a multiple of ``input_dim``) and ``hidden_factors`` (multipliers
    ``k``, giving sizes ``k * input_dim``) are alternatives; with neither, two hidden layers of
    ``k = max(4, ceil(64 / D))`` units per coordinate (64 units for ``D <= 16``, like the paper's
    2-128-128-2 toy network at half the width).
    """
    input_dim = check_dim(input_dim, "input_dim")
    if hidden_dims is not None and hidden_factors is not None:
        raise ValueError("give hidden_dims or hidden_factors, not both")
    if hidden_factors is not None:
        if isinstance(hidden_factors, int):
            hidden_factors = [hidden_factors]
        return [check_dim(k, "hidden factor") * input_dim for k in hidden_factors]
    if hidden_dims is None:
        k = max(4, math.ceil(64 / input_dim))
        return [k * input_dim, k * input_dim]
    if isinstance(hidden_dims, int):
        hidden_dims = [hidden_dims]
    hidden_dims = [check_dim(h, "hidden dim") for h in hidden_dims]
    for h in hidden_dims:
        if h % input_dim:
            raise ValueError(
                f"quasi-autoregressive hidden sizes must be multiples of input_dim={input_dim}, "
                f"got {h} (use hidden_factors=(k, ...) for sizes k * input_dim)"
            )
    return hidden_dims


class QuasiAutoregressiveNet(SharedBoundNetwork, nn.Module):
    """Masked Lipschitz network ``F`` with lower-triangular Jacobian, its exact diagonal, and ``Lip(F) < 1``.

    ``forward(x, context=None)`` returns ``(F(x), diag(J_F(x)))``, both of the broadcast batch shape
    of ``x`` and ``context`` with ``D`` trailing entries; :meth:`lipschitz` returns a guaranteed bound
    ``sigma * P / (min(theta) + P) < 1`` of ``Lip(F)`` in ``x`` (a differentiable 0-d tensor).

    Arguments:
        input_dim: D.
        hidden_dims: hidden sizes, each a multiple of D (``None``: see ``hidden_factors``).
        hidden_factors: alternative to ``hidden_dims``: units per coordinate ``k`` of each hidden
            layer (sizes ``k * D``). With neither, :func:`default_quar_hidden_dims`.
        context_dim: size of an optional context appended to the first layer's input (0: none).
        activation: ``"elu"`` (the paper's choice) or ``"lipswish"``, or a registered name; must
            provide ``forward_and_derivative`` and a ``lipschitz`` bound.
        lipschitz: ``sigma``, the fixed maximal Lipschitz constant of ``F`` (``0 < sigma < 1``, default
            0.9; the attribute ``lipschitz_target``); smaller values make
            the fixed-point inverse converge faster but limit how much one layer can change volume
            (``log(1 - sigma) <= d log|det| / D <= log(1 + sigma)`` per coordinate).
        lipschitz_trick: if ``False``, ``theta`` is fixed at 0 (hard spectral normalisation of the
            product, the paper's ablation).
        bound: ``"spectral"`` (exact, default) or ``"frobenius"`` (cheaper, looser) per-layer bound.

    Example:
        >>> import torch
        >>> net = QuasiAutoregressiveNet(3, hidden_factors=(2, 2))
        >>> out, diag = net(torch.randn(5, 3))
        >>> out.shape, diag.shape, bool(net.lipschitz() < 1)
        (torch.Size([5, 3]), torch.Size([5, 3]), True)
    """

    #: layers with at least this many weight entries propagate the diagonal blockwise
    BLOCKWISE_MIN_SIZE = 128 * 128

    def __init__(self, input_dim, hidden_dims=None, *, hidden_factors=None, context_dim=0,
                 activation="elu", lipschitz=0.9, lipschitz_trick=True, bound="spectral"):
        super().__init__()
        self.input_dim = D = check_dim(input_dim, "input_dim")
        self.context_dim = check_dim(context_dim, "context_dim", minimum=0)
        if isinstance(lipschitz, bool) or not (isinstance(lipschitz, numbers.Real) and 0 < lipschitz < 1):
            raise ValueError(f"lipschitz must be a number in (0, 1), got {lipschitz!r}")
        #: the bound ``sigma`` of the paper (``Lip(F) <= sigma < 1``), the ``lipschitz`` argument
        self.lipschitz_target = float(lipschitz)
        self.lipschitz_trick = bool(lipschitz_trick)
        self.hidden_dims = default_quar_hidden_dims(D, hidden_dims, hidden_factors)
        masks, degrees = quasi_autoregressive_masks(D, self.hidden_dims, context_dim=self.context_dim)
        sizes = [D] + self.hidden_dims + [D]
        if bound not in _BOUNDS:
            raise ValueError(f"bound must be one of {_BOUNDS}, got {bound!r}")
        self.bound = bound
        # the layers' weights and biases (and raw_theta) live in ONE parameter tensor: an optimiser
        # updates it in one go (Adam costs ~26 aten ops per tensor per step; Pyro's optimisers a
        # Python optimiser object per tensor); ``layers[i].weight`` etc. are views of it
        shapes, init = [], []
        for i, m in enumerate(masks):
            in_features = sizes[i] + (self.context_dim if i == 0 else 0)
            # a LipschitzLinear only for its initialisation (masked fan-in scaling)
            layer = LipschitzLinear(in_features, sizes[i + 1], mask=m, bound=bound)
            shapes += [tuple(layer.weight.shape), tuple(layer.bias.shape)]
            init += [layer.weight.detach(), layer.bias.detach()]
            self.register_buffer(f"_mask{i}", layer.mask, persistent=False)
        # theta = softplus(raw_theta) >= 0, one per output coordinate; init theta = 0.1
        if self.lipschitz_trick:
            shapes.append((D,))
            init.append(torch.full((D,), math.log(math.expm1(0.1))))
        self._packing = Packing(shapes)
        self.packed = nn.Parameter(self._packing.pack(init))
        self.layers = [_Layer(self, i) for i in range(len(masks))]
        self.activations = nn.ModuleList([get_activation(activation, h) for h in self.hidden_dims])
        for act in self.activations:
            if not hasattr(act, "forward_and_derivative") or not hasattr(act, "lipschitz"):
                raise ValueError(f"activation {activation!r} must give forward_and_derivative and lipschitz")
        self._act_factor = math.prod(float(act.lipschitz) for act in self.activations)
        # "equal degree" patterns: the only connections that carry d/dx_{d(u)} (non-persistent:
        # they are a function of the sizes, like the masks' structure)
        for i in range(len(masks)):
            eq = (degrees[i + 1][:, None] == degrees[i][None, :]).to(torch.get_default_dtype())
            self.register_buffer(f"_eq{i}", eq, persistent=False)
        # propagate the diagonal through the D diagonal blocks (k_out x k_in) of large hidden/output
        # layers instead of the dense masked matrix (the dense product is faster for small layers)
        self._blockwise = [i > 0 and sizes[i] * sizes[i + 1] >= self.BLOCKWISE_MIN_SIZE
                           for i in range(len(masks))]
        # state dicts saved with one parameter per weight, bias and ``raw_theta`` still load
        register_old_keys(self, [f"layers.{i}.{k}" for i in range(len(masks)) for k in ("weight", "bias")]
                          + (["raw_theta"] if self.lipschitz_trick else []), "packed",
                          drop=[f"layers.{i}.mask" for i in range(len(masks))])

    # -- the parameters: views of ``packed`` ----------------------------------------------------
    def unpack(self, flat):
        """``[W_0, b_0, W_1, b_1, ..., raw_theta]``: views of ``flat``, a tensor shaped like
        :attr:`packed` (the parameter itself, or e.g. its gradient), in one split."""
        return self._packing.unpack(flat)

    def _views(self):
        return self.unpack(self.packed)

    @property
    def raw_theta(self):
        """The unconstrained ``theta`` (a view of :attr:`packed`), or ``None`` without the trick."""
        return self._views()[-1] if self.lipschitz_trick else None

    # -- Lipschitz control --------------------------------------------------------------------
    def _masked_weights(self, views=None):
        views = self._views() if views is None else views
        return [views[2 * i] * getattr(self, f"_mask{i}") for i in range(len(self.layers))]

    def product_bound(self, weights=None) -> torch.Tensor:
        """``P = prod_i Lip(f_i)``: guaranteed bound of the unscaled masked network in ``x``.

        The spectral norms of all layers come from one batched no-grad eigendecomposition
        (:func:`~pyro_flows.nn.lipschitz.spectral_norm_product`; ``bound="power"``:
        :func:`~pyro_flows.nn.lipschitz.power_norm_product`); ``weights`` are the masked weights
        if the caller has them. Without a graph to build, the value is cached until a weight changes;
        in a stack of flow layers the stack computes every layer's bound in one call
        (:class:`~pyro_flows.nn.lipschitz.shared_bounds`).
        """
        return self._bound(lambda: self._compute_bound(weights))

    def _bound_params(self):
        return [self.packed]

    def _columns(self, weights):
        D = self.input_dim
        return [w[:, :D] if i == 0 and w.shape[1] != D else w for i, w in enumerate(weights)]

    def _spectral_terms(self):
        return (self._columns(self._masked_weights()), True) if self.bound == "spectral" else None

    def _packed_layout(self):
        if self.bound != "spectral":
            return None
        offsets, shapes = self._packing.offsets, self._packing.shapes
        layers = [(offsets[2 * i], *shapes[2 * i], self.input_dim if i == 0 else shapes[2 * i][1])
                  for i in range(len(self.layers))]
        return PackedBoundLayout(self.packed, layers, [getattr(self, f"_mask{i}") for i in range(len(self.layers))],
                                 product=True)

    def _finish_bound(self, p):
        return p * self._act_factor if self._act_factor != 1.0 else p

    def _compute_bound(self, weights):
        cols = self._columns(self._masked_weights() if weights is None else weights)
        if self.bound == "spectral":
            p = spectral_norm_product(cols)
        elif self.bound == "power":
            p = power_norm_product(cols)
        else:
            p = torch.stack([matrix_norm_bound(w, "frobenius") for w in cols]).prod()
        return self._finish_bound(p)

    def theta(self, raw_theta=None):
        """``theta >= 0`` (shape ``(D,)``), or ``None`` without the Lipschitz trick."""
        raw_theta = self.raw_theta if raw_theta is None else raw_theta
        return None if raw_theta is None else F.softplus(raw_theta)

    def output_scale(self, p=None, weights=None, raw_theta=None) -> torch.Tensor:
        """``c = sigma / (theta + P)`` (shape ``(D,)`` or 0-d), so that ``Lip(F) <= sigma``."""
        p = self.product_bound(weights) if p is None else p
        theta = self.theta(raw_theta)
        denom = p if theta is None else theta + p
        # P > 0 unless every weight vanishes; the floor only avoids 0/0 (then N is constant, F too)
        return self.lipschitz_target / denom.clamp(min=torch.finfo(denom.dtype).tiny)

    def lipschitz(self) -> torch.Tensor:
        """Guaranteed bound of ``Lip(F)`` in ``x`` (for every context): ``max(c) * P <= sigma < 1``."""
        p = self.product_bound()
        return (self.output_scale(p).max() * p).clamp(max=self.lipschitz_target)

    @torch.no_grad()
    def zero_output_(self):
        """Zero the last layer's weight and bias in place, so that ``F = 0`` for every input (and
        context); returns ``self``.

        The other layers keep their values, so the gradient of ``F`` in the last layer's weight
        (``c h^T`` with the last hidden activations ``h``) and bias (``c``) does not vanish. Needs
        the Lipschitz trick: with ``theta`` fixed at 0 the output scale ``c = sigma / P`` is
        unbounded as the last layer's norm (and so ``P``) goes to 0.

        Example:
            >>> import torch
            >>> net = QuasiAutoregressiveNet(3, hidden_factors=(2,)).zero_output_()
            >>> out, diag = net(torch.randn(4, 3))
            >>> bool((out == 0).all() and (diag == 0).all())
            True
        """
        if self.raw_theta is None:
            raise ValueError("zero_output_ needs lipschitz_trick=True (without it F = sigma N / P "
                             "cannot be 0 with a finite gradient)")
        views = self._views()
        n = len(self.layers)
        views[2 * n - 2].zero_()
        views[2 * n - 1].zero_()
        return self

    # -- forward with the exact diagonal ------------------------------------------------------
    def forward(self, x, context=None, scale=None, diag=True):
        """``(F(x), diag J_F(x))``; ``scale`` is a precomputed :meth:`output_scale` (e.g. held fixed
        over the iterations of a solve), ``None`` to compute it here; ``diag=False`` skips the
        diagonal (returned as ``None``): a fixed-point step needs only ``F(x)``."""
        D = self.input_dim
        if self.context_dim:
            if context is None:
                raise ValueError(f"{type(self).__name__} was built with context_dim={self.context_dim}: "
                                 "a context is required")
            x, context = broadcast_context(x, context)
            h = torch.cat([x, context], dim=-1)
        else:
            h = x
        views = self._views()
        weights = self._masked_weights(views)
        if scale is None:
            c = self.output_scale(weights=weights, raw_theta=views[-1] if self.lipschitz_trick else None)
        else:
            c = scale
        n = len(self.layers)
        if not diag:
            for i, w in enumerate(weights):
                h = F.linear(h, w, views[2 * i + 1])
                if i < n - 1:
                    h = self.activations[i](h)
            return h * c, None
        g = None
        for i, w in enumerate(weights):
            a = F.linear(h, w, views[2 * i + 1])
            eq = getattr(self, f"_eq{i}")
            if i == 0:
                # the inputs' own diagonal is 1: the row sum of the equal-degree entries
                ga = (w[:, :D] * eq).sum(-1)
            elif self._blockwise[i]:
                k_out, k_in = w.shape[0] // D, w.shape[1] // D
                # units are grouped by degree in contiguous blocks: the (d, d) blocks of w
                blocks = w.view(D, k_out, D, k_in).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
                batch = g.shape[:-1]
                ga = torch.einsum("...di,doi->...do", g.reshape(batch + (D, k_in)), blocks)
                ga = ga.reshape(batch + (D * k_out,))
            else:
                ga = F.linear(g, w * eq)
            if i < n - 1:
                h, dh = self.activations[i].forward_and_derivative(a)
                g = dh * ga
            else:
                h, g = a, (ga if i else ga.expand_as(a))
        return h * c, g * c

    def extra_repr(self):
        return (f"input_dim={self.input_dim}, hidden_dims={self.hidden_dims}, context_dim={self.context_dim}, "
                f"sigma={self.lipschitz_target}, lipschitz_trick={self.lipschitz_trick}")


class _Layer:
    """Layer ``i`` of a :class:`QuasiAutoregressiveNet`: its ``weight`` and ``bias`` are views of the
    network's :attr:`~QuasiAutoregressiveNet.packed` parameter (write to them under ``torch.no_grad()``)."""

    def __init__(self, net, index):
        self._net, self._index = net, index

    @property
    def weight(self):
        return self._net._views()[2 * self._index]

    @property
    def bias(self):
        return self._net._views()[2 * self._index + 1]

    @property
    def mask(self):
        return getattr(self._net, f"_mask{self._index}")

    def masked_weight(self):
        return self.weight * self.mask

