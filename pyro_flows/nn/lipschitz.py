"""Lipschitz-controlled linear layers with a *guaranteed* bound.

Residual flows need ``Lip(F) < 1`` for every parameter value, not only where a power iteration
happened to look: power iteration returns a lower bound of the spectral norm, so normalising by it can
leave ``Lip > 1`` (the invertibility failure DESIGN.md warns about). Here the bound of a (masked)
weight is its exact largest singular value computed in float64 (accurate far below the margin),
inflated by a relative margin of ``1e-6`` to cover rounding. For large layers
``bound="frobenius"`` gives a cheaper, looser guaranteed bound (``||W||_2 <= ||W||_F``).

The spectral bound needs no gradient through a decomposition: with ``u``, ``v`` the top singular pair
from a no-grad decomposition, ``sigma_max(W) = u^T W v`` and its gradient is ``u v^T`` (exact where
``sigma_max`` is simple; a subgradient otherwise). :func:`spectral_norm_bounds` takes it from the
float64 Gram matrix on the smaller side (``W^T W`` or ``W W^T``): one batched ``eigh`` per Gram size
for small ones; from size :data:`INVERSE_ITERATION_MIN_SIZE` on, the value from one batched
``eigvalsh`` and the top eigenvector (for the gradient only) from inverse iteration (see
:func:`_top_eigenpair`), about 40 % cheaper. Forming the Gram matrix costs a relative error of about
``m n eps`` in ``sigma_max^2`` (below 1e-9 for layers up to 4096 x 4096), far inside the margin. Its
backward is one outer product per weight.

Values are cached between parameter updates (:func:`cached_bound`): a cached bound is reused when the
weights have not changed (their ``_version`` counters and their values, compared with a stored copy,
since updates through ``p.data`` do not bump ``_version``) and no graph is needed (``torch.no_grad()``
or frozen weights, as when sampling from a trained flow). In training a fresh, differentiable bound is
computed each call: in a stack of flow layers (:class:`~pyro_flows.stacking.FlowStack`) ONE call for
every layer's networks (:class:`shared_bounds`, :func:`spectral_norm_segments`), each network reading
the value it would compute alone.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerwiseBounds", "LipschitzDenseNN", "LipschitzLinear", "LipschitzMADE", "PackedBoundLayout",
           "SharedBoundNetwork", "kept_bounds", "matrix_norm_bound", "packed_spectral_bounds", "power_norm_product",
           "shared_bounds", "spectral_norm_bounds", "spectral_norm_product", "spectral_norm_segments"]

MARGIN = 1e-6
_BOUNDS = ("spectral", "power", "frobenius")
#: diagonal shift of the unit-trace Gram powers in :func:`power_norm_product`
_SHIFT = 1e-15


def _singular_direction(a, x, sigma):
    """``d sigma / d A = x y^T`` for ``sigma = x^T A y``, ``y = A^T x / sigma``: ``x`` the top eigenvector
    ``(k, n, 1)`` of ``A A^T`` for the batch ``a`` ``(k, n, m)`` with top singular values ``sigma`` ``(k,)``
    (0 where ``A = 0``)."""
    y = torch.bmm(x.transpose(1, 2), a) / sigma.clamp(min=torch.finfo(sigma.dtype).tiny)[:, None, None]
    return x * y


def _product_scales(bounds):
    """``(1 + MARGIN) prod_{j != i} b_j`` for each ``i`` of ``bounds`` ``(n, ...)`` (the derivative of the
    product of the bounds in bound ``i``, times the margin's factor; also where a bound is 0)."""
    n = bounds.shape[0]
    if n == 1:
        return torch.full_like(bounds, 1 + MARGIN)
    others = bounds.unsqueeze(0).expand(n, *bounds.shape).clone()
    others.diagonal(dim1=0, dim2=1).fill_(1)
    return others.prod(1) * (1 + MARGIN)


class _SpectralNormBounds(torch.autograd.Function):
    """``(1 + MARGIN) * sigma_max(W_i)`` for each 2-D ``W_i``, computed in float64 with no graph through
    the eigensolver; gradient ``(1 + MARGIN) u_i v_i^T`` (the top singular pair).

    Each weight is written ``A_i = W_i^T`` (tall) or ``A_i = W_i`` (wide), so its Gram matrix
    ``A_i A_i^T`` is on the smaller side; weights whose ``A_i`` have equal shapes share one float64
    conversion and one batched product, and Gram matrices of equal size one ``eigh``. The weights
    come in *segments* (consecutive runs, ``(start, stop, product)``): a segment returns its bounds,
    or their product (one entry, formed in float64), so several networks' bounds come from one call.
    """

    @staticmethod
    def forward(ctx, need_grad, members, segments, *weights):
        dtype = weights[0].dtype
        n = len(weights)
        tall = [w.shape[0] >= w.shape[1] for w in weights]
        directions, sigmas = [], []
        with torch.no_grad():
            a_groups = []
            for idx in members:
                a = [weights[i].T if tall[i] else weights[i] for i in idx]
                a_groups.append((torch.stack(a) if len(a) > 1 else a[0].unsqueeze(0)).to(torch.float64))
            # one eigh per Gram size (groups of different A shapes can share a Gram size)
            by_size = {}
            for j, a in enumerate(a_groups):
                by_size.setdefault(a.shape[1], []).append(j)
            evals, evecs = [None] * len(a_groups), [None] * len(a_groups)
            for js in by_size.values():
                grams = [torch.bmm(a_groups[j], a_groups[j].transpose(1, 2)) for j in js]
                gram = torch.cat(grams) if len(grams) > 1 else grams[0]
                lam, vec = _top_eigenpair(gram, need_grad)
                start = 0
                for j in js:
                    k = a_groups[j].shape[0]
                    evals[j] = lam[start : start + k]
                    evecs[j] = None if vec is None else vec[start : start + k]
                    start += k
            for a, lam, x in zip(a_groups, evals, evecs):
                sigma = lam.clamp(min=0).sqrt()
                sigmas.append(sigma)
                if need_grad:
                    directions.append(_singular_direction(a, x, sigma[:, 0]).to(dtype))
            bounds = (torch.cat(sigmas) if len(sigmas) > 1 else sigmas[0]).squeeze(-1) * (1 + MARGIN)
            order = [i for idx in members for i in idx]  # the group order of ``bounds``
            if order != list(range(n)):
                bounds = bounds.index_select(0, _index(_inverse_order(order), bounds.device))
            outs, scales = [], []
            for start, stop, product in segments:
                b = bounds[start:stop]
                outs.append(b.prod(0, keepdim=True) if product else b)
                if need_grad:
                    scales.append(_product_scales(b) if product else torch.full_like(b, 1 + MARGIN))
            out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if need_grad:
            ctx.save_for_backward((torch.cat(scales) if len(scales) > 1 else scales[0]).to(dtype), *directions)
        ctx.members, ctx.segments, ctx.tall = members, segments, tall
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, *directions = ctx.saved_tensors
        out = [None] * (3 + len(ctx.tall))
        # the gradient of each weight's bound, in input order
        per_weight, k = [], 0
        for start, stop, product in ctx.segments:
            if product:
                per_weight.append(grad[k : k + 1].expand(stop - start))
                k += 1
            else:
                per_weight.append(grad[k : k + stop - start])
                k += stop - start
        g = (torch.cat(per_weight) if len(per_weight) > 1 else per_weight[0]) * scale
        for idx, direction in zip(ctx.members, directions):
            gi = g if len(idx) == len(ctx.tall) and idx == sorted(idx) else g.index_select(0, _index(idx, g.device))
            da = gi[:, None, None] * direction
            for j, i in enumerate(idx):
                out[3 + i] = da[j].T if ctx.tall[i] else da[j]
        return tuple(out)


#: Gram matrices of at least this size get their top eigenpair from ``eigvalsh`` and inverse iteration
#: (below it, ``eigh`` is cheaper: CPU, float64, batches of 2-10: ``eigh`` 0.07 / 0.37 / 1.5 / 2.1 ms
#: against 0.17 / 0.31 / 0.86 / 1.26 ms at sizes 8 / 32 / 64 / 120)
INVERSE_ITERATION_MIN_SIZE = 32
#: relative shift above the top eigenvalue for the inverse iteration
_SHIFT_REL = 1e-9


def _top_eigenpair(gram, need_vector):
    """``(lambda_max, v)`` of a batch of symmetric PSD float64 matrices: ``(k, 1)`` and ``(k, n, 1)``
    (``v`` is ``None`` without ``need_vector``). The value does not depend on ``need_vector``.

    Small matrices: one ``eigh``. From :data:`INVERSE_ITERATION_MIN_SIZE` on: the value from
    ``eigvalsh`` (about 40 % of an ``eigh``: no eigenvectors) and, for the gradient, the vector from
    two steps of inverse iteration with the shift ``s = lambda_max (1 + 1e-9)`` (one Cholesky
    factorisation of ``s I - G``, positive definite since ``eigvalsh`` is accurate to ~``n eps ||G||``,
    far below the shift; two triangular solves per step). Each step shrinks the other eigenvectors'
    share by ``(s - lambda_1) / (s - lambda_i) <= 1e-9 lambda_1 / (lambda_1 - lambda_i)``, so the
    vector is the top one to rounding unless the top eigenvalues are within ~1e-5 of each other
    relatively, and then a unit vector of that near-degenerate top space (``v^T G v = lambda_max`` to
    that accuracy: a subgradient of ``sqrt(lambda_max)``). The start vector is fixed (not random), so
    the bound and its gradient are functions of the weights.
    """
    n = gram.shape[-1]
    if n < INVERSE_ITERATION_MIN_SIZE:
        lam, vec = torch.linalg.eigh(gram)
        return lam[:, -1:], vec[:, :, -1:] if need_vector else None
    # eigvalsh whatever the grad mode: the value must not change with it (the stack's round-trip
    # certificate, computed without gradients, must see the user's map)
    top = torch.linalg.eigvalsh(gram)[:, -1:]
    if not need_vector:
        return top, None
    shift = top.clamp(min=0) * (1 + _SHIFT_REL) + 1e-300  # (a zero matrix: s = 1e-300, still PD)
    chol, _ = torch.linalg.cholesky_ex(torch.diag_embed(shift.expand(-1, n)) - gram)
    k = torch.arange(n, dtype=gram.dtype, device=gram.device)
    v = (torch.frac(k * 0.6180339887498949) + 0.5).expand(gram.shape[0], n).unsqueeze(-1)
    for _ in range(2):
        v = torch.cholesky_solve(v, chol)
        v = v / v.abs().amax(1, keepdim=True)  # (max-norm first: no overflow for tiny shifts)
    return top, v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


_INDEX_CACHE = {}


def _index(positions, device):
    """``positions`` as a long tensor on ``device``, built once per device (no copy per call)."""
    key = (tuple(positions), device)
    t = _INDEX_CACHE.get(key)
    if t is None:
        t = _INDEX_CACHE[key] = torch.tensor(positions, dtype=torch.long, device=device)
    return t


def _inverse_order(order):
    inv = [0] * len(order)
    for k, i in enumerate(order):
        inv[i] = k
    return inv


def _groups(weights):
    """Indices of the weights whose ``A_i`` (``W_i^T`` if tall, else ``W_i``) share a shape."""
    groups = {}
    for i, w in enumerate(weights):
        r, c = w.shape
        groups.setdefault((c, r) if r >= c else (r, c), []).append(i)
    return list(groups.values())


def _check_weights(weights, name):
    if not weights or any(w.dim() != 2 for w in weights):
        raise ValueError(f"{name} expects a non-empty sequence of 2-D tensors")


def spectral_norm_segments(weight_lists, products) -> list:
    """:func:`spectral_norm_bounds` (``products[k]`` false) or :func:`spectral_norm_product` (true) of
    each list of 2-D tensors in ``weight_lists``, all from ONE batched computation (one ``eigh`` per
    Gram size over every list, one autograd node). Each result is the one its list would get alone,
    to float64 rounding (the same per-matrix arithmetic; a stack of networks uses it to bound all
    its layers at once).

    Example:
        >>> b, p = spectral_norm_segments([[torch.eye(3) * 2], [torch.eye(3), torch.ones(2, 3)]], [False, True])
        >>> [round(float(x), 4) for x in b], round(float(p), 4)
        ([2.0], 2.4495)
    """
    weights, segments, start = [], [], 0
    for ws, product in zip(weight_lists, products):
        ws = list(ws)
        _check_weights(ws, "spectral_norm_segments")
        weights += ws
        segments.append((start, start + len(ws), bool(product)))
        start += len(ws)
    if not segments or len(segments) != len(weight_lists):
        raise ValueError("spectral_norm_segments expects one products entry per list of weights")
    need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    out = _SpectralNormBounds.apply(need_grad, _groups(weights), tuple(segments), *weights)
    if len(segments) == 1:
        return [out[0] if segments[0][2] else out]
    results, k = [], 0
    for start, stop, product in segments:
        if product:
            results.append(out[k])
            k += 1
        else:
            results.append(out[k : k + stop - start])
            k += stop - start
    return results


def spectral_norm_bounds(weights) -> torch.Tensor:
    """Guaranteed upper bounds of the spectral norms of several 2-D tensors, batched.

    Returns a ``(len(weights),)`` tensor of the first weight's dtype, each entry ``sigma_max(W_i)``
    (float64) times ``1 + 1e-6``; differentiable, with gradient ``(1 + 1e-6) u_i v_i^T`` (no backward
    through a decomposition).

    Example:
        >>> w = [torch.eye(3) * 2, torch.ones(2, 4)]
        >>> [round(float(b), 4) for b in spectral_norm_bounds(w)]
        [2.0, 2.8284]
    """
    weights = list(weights)
    _check_weights(weights, "spectral_norm_bounds")
    return spectral_norm_segments([weights], [False])[0]


def spectral_norm_product(weights) -> torch.Tensor:
    """The product of :func:`spectral_norm_bounds` (a 0-d tensor, one autograd node; formed in
    float64, in input order): a guaranteed bound of the Lipschitz constant of a chain of linear maps
    with 1-Lipschitz maps between them.

    Example:
        >>> round(float(spectral_norm_product([torch.eye(3) * 2, torch.ones(2, 3)])), 4)
        4.899
    """
    weights = list(weights)
    _check_weights(weights, "spectral_norm_product")
    return spectral_norm_segments([weights], [True])[0]


class PackedBoundLayout:
    """Where a network's bounded weights sit in its packed parameter (:class:`~pyro_flows.nn.packed.Packing`),
    so that a stack of networks with one layout is bounded straight from their packed parameters
    (:func:`packed_spectral_bounds`), with no autograd graph through the weights' views and masks.

    Arguments:
        packed: the flat parameter.
        layers: one ``(offset, rows, cols, keep)`` per bounded weight: the ``rows x cols`` weight starts at
            ``offset`` of ``packed`` (row-major) and its bound is over its first ``keep`` columns (a
            context's columns are not counted).
        masks: one 0/1 tensor of shape ``(rows, cols)`` per weight, or ``None`` (unmasked).
        product: the network uses the product of its weights' bounds (else each bound).
    """

    __slots__ = ("packed", "layers", "masks", "product", "key")

    def __init__(self, packed, layers, masks, product):
        self.packed, self.layers, self.masks, self.product = packed, tuple(layers), list(masks), bool(product)
        self.key = (self.layers, tuple(m is None for m in self.masks), self.product, packed.shape, packed.dtype,
                    packed.device)


class _PackedSpectralBounds(torch.autograd.Function):
    """:class:`_SpectralNormBounds` for ``k`` networks of one :class:`PackedBoundLayout`, taking their
    packed parameters themselves: the weights are sliced and masked inside (float64, no graph), the
    Gram matrices of one size over all networks and layers go to one ``_top_eigenpair`` call, and the
    backward writes each network's gradient into one flat tensor (``(1 + MARGIN) u v^T`` times the mask
    on each weight's entries, zero elsewhere): a few dozen aten ops for the whole stack where the
    per-weight path runs a split, a mask product and a slice per weight, forward and backward."""

    @staticmethod
    def forward(ctx, layers, product, need_grad, masks, *packed):
        dtype, k = packed[0].dtype, len(packed)
        n_layers = len(layers)
        with torch.no_grad():
            flat = (torch.stack(packed) if k > 1 else packed[0].unsqueeze(0)).to(torch.float64)
            a_list, tall = [], []
            for (offset, rows, cols, keep), mask in zip(layers, masks):
                w = flat[:, offset:offset + rows * cols].view(k, rows, cols)
                if mask is not None:
                    w = w * mask
                if keep < cols:
                    w = w[:, :, :keep]
                tall.append(rows >= keep)
                a_list.append(w.transpose(1, 2) if tall[-1] else w)
            by_size = {}
            for i, a in enumerate(a_list):
                by_size.setdefault(a.shape[1], []).append(i)
            lam, vec = [None] * n_layers, [None] * n_layers
            for idx in by_size.values():
                grams = [torch.bmm(a_list[i], a_list[i].transpose(1, 2)) for i in idx]
                top, x = _top_eigenpair(torch.cat(grams) if len(grams) > 1 else grams[0], need_grad)
                for j, i in enumerate(idx):
                    lam[i] = top[j * k:(j + 1) * k, 0]
                    vec[i] = None if x is None else x[j * k:(j + 1) * k]
            sigma = torch.stack(lam).clamp(min=0).sqrt()  # (layers, k)
            bounds = sigma * (1 + MARGIN)
            out = bounds.prod(0) if product else bounds.T
            if need_grad:
                directions = []
                for i, (a, x) in enumerate(zip(a_list, vec)):
                    d = _singular_direction(a, x, sigma[i])
                    d = d.transpose(1, 2) if tall[i] else d
                    mask = masks[i]
                    if mask is not None:
                        d = d * mask[..., : d.shape[-1]]
                    directions.append(d.to(dtype))
                scale = _product_scales(bounds) if product else torch.full_like(bounds, 1 + MARGIN)
                ctx.save_for_backward(scale.to(dtype), *directions)
        ctx.layers, ctx.product, ctx.k, ctx.numel = layers, product, k, packed[0].shape[0]
        return out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        scale, *directions = ctx.saved_tensors
        g = scale * (grad if ctx.product else grad.T)  # (layers, k)
        flat = grad.new_zeros(ctx.k, ctx.numel)
        for i, ((offset, rows, cols, keep), d) in enumerate(zip(ctx.layers, directions)):
            view = flat[:, offset:offset + rows * cols].view(ctx.k, rows, cols)
            view[:, :, :keep].addcmul_(d, g[i][:, None, None])
        return (None, None, None, None, *flat.unbind(0))


def packed_spectral_bounds(layouts) -> torch.Tensor:
    """The spectral bounds of several networks of one :class:`PackedBoundLayout` (equal ``key``), from
    their packed parameters in ONE batched computation: a ``(len(layouts),)`` tensor of products, or
    ``(len(layouts), layers)`` of per-weight bounds. Each entry is the one :func:`spectral_norm_product`
    / :func:`spectral_norm_bounds` gives for that network's (sliced, masked) weights, to float64
    rounding, with the same gradient.

    Example:
        >>> from pyro_flows.nn.quasi_autoregressive import QuasiAutoregressiveNet
        >>> nets = [QuasiAutoregressiveNet(3, hidden_factors=(2,)) for _ in range(2)]
        >>> b = packed_spectral_bounds([n._packed_layout() for n in nets])
        >>> bool(torch.allclose(b, torch.stack([n._compute_bound(None) for n in nets])))
        True
    """
    layouts = list(layouts)
    if not layouts or len({lay.key for lay in layouts}) != 1:
        raise ValueError("packed_spectral_bounds expects networks of one layout")
    first = layouts[0]
    masks = [None if m is None else (torch.stack([lay.masks[i] for lay in layouts]) if len(layouts) > 1
                                    else m.unsqueeze(0)).to(torch.float64)
             for i, m in enumerate(first.masks)]
    packed = [lay.packed for lay in layouts]
    need_grad = torch.is_grad_enabled() and any(p.requires_grad for p in packed)
    return _PackedSpectralBounds.apply(first.layers, first.product, need_grad, masks, *packed)


class _PowerNormProduct(torch.autograd.Function):
    """``prod_i (1 + MARGIN) ||G_i^k||_F^(1 / (2 k))`` with ``G_i`` the Gram matrix of ``W_i`` on its
    smaller side and ``k = 8^blocks`` (see :func:`power_norm_product`), with its exact gradient.

    Gram matrices of equal size are squared together (one batched product per squaring) in float64.
    ``G^k`` is formed by repeated squaring, rescaled to unit trace every three squarings
    (``M_0 = G / t_0``, ``M_b = M_{b-1}^8 / t_b``, ``K = M_{B-1}^8``), so
    ``log ||G^k||_F^(1/k) = sum_b 8^-b log t_b + 8^-B log ||K||_F`` without overflow. The gradient of
    ``log ||G^k||_F^(1/k)`` in ``G`` is ``G^(2k-1) / tr(G^(2k))``, which in the rescaled matrices is
    ``K Q_0 ... Q_{B-1} / (||K||_F^2 prod_b t_b)`` with ``Q_b = M_b M_b^2 M_b^4`` (all commute): no
    autograd graph through the squarings and no decomposition.
    """

    @staticmethod
    def forward(ctx, blocks, need_grad, *weights):
        dtype = weights[0].dtype
        tiny = torch.finfo(torch.float64).tiny
        tall = [w.shape[0] >= w.shape[1] for w in weights]
        groups = {}
        for i, w in enumerate(weights):
            groups.setdefault(min(w.shape), []).append(i)
        log_sigma, saved = [], []
        with torch.no_grad():
            for idx in groups.values():
                a = [(weights[i].T if tall[i] else weights[i]).to(torch.float64) for i in idx]
                m = torch.stack([x @ x.T for x in a])
                eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
                log_lam, scales, qs = 0.0, [], []
                for b in range(blocks):
                    t = m.diagonal(dim1=1, dim2=2).sum(-1).clamp(min=tiny)
                    scales.append(t)
                    log_lam = log_lam + t.log() * 8.0 ** -b
                    # + SHIFT I: an upper bound still (lambda_max grows by SHIFT), and no eigenvalue
                    # of the powers falls into float64's subnormal range (slow arithmetic)
                    m = torch.add(m / t[:, None, None], eye, alpha=_SHIFT)
                    m2 = torch.bmm(m, m)
                    m4 = torch.bmm(m2, m2)
                    if need_grad:
                        qs.append(torch.bmm(torch.bmm(m, m2), m4))
                    m = torch.bmm(m4, m4)
                norm2 = m.pow(2).sum((1, 2)).clamp(min=tiny)
                log_sigma.append(0.5 * (log_lam + norm2.log() * (0.5 * 8.0 ** -blocks)))
                saved.append((idx, a, m, norm2, scales, qs))
            prod = torch.exp(torch.cat(log_sigma).sum()) * (1 + MARGIN) ** len(weights)
        if need_grad:
            ctx.saved = saved
            ctx.save_for_backward(prod)
        ctx.tall, ctx.dtype, ctx.n = tall, dtype, len(weights)
        return prod.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        (prod,) = ctx.saved_tensors
        out = [None] * (2 + ctx.n)
        grad = grad.to(torch.float64)
        for idx, a, k, norm2, scales, qs in ctx.saved:
            q = qs[0]
            for s in qs[1:]:
                q = torch.bmm(q, s)
            # d log sigma_i / d G_i = 0.5 K Q / (||K||^2 prod_b t_b); d / dA = 2 (d / dG) A; times
            # d prod / d log sigma_i = prod. The scalar factor is formed in logs; a zero weight
            # (t_0 clamped to tiny) gets the subgradient 0
            log_t = scales[0].log()
            for t in scales[1:]:
                log_t = log_t + t.log()
            factor = torch.exp((prod.log() - log_t).clamp(max=700.0)) * grad / norm2
            factor = torch.where(scales[0] > torch.finfo(torch.float64).tiny, factor, 0.0)
            g = torch.bmm(k, q) * factor[:, None, None]
            for j, (i, x) in enumerate(zip(idx, a)):
                da = (g[j] @ x).to(ctx.dtype)
                out[2 + i] = da.T if ctx.tall[i] else da
        return tuple(out)


def power_norm_product(weights, blocks: int = 2) -> torch.Tensor:
    """A guaranteed bound of ``prod_i sigma_max(W_i)`` without a decomposition (0-d, differentiable).

    For the Gram matrix ``G`` of ``W`` (``sigma_max(W)^2 = lambda_max(G)``, ``G`` positive
    semi-definite), ``lambda_max(G)^k <= ||G^k||_F``, so ``||G^k||_F^(1/(2k))`` bounds ``sigma_max(W)``
    from above, by a factor at most ``r^(1/(4k))`` with ``r`` the rank (all singular values equal; much
    less when they are spread). Here ``k = 8^blocks``: ``blocks=2`` (six squarings, ``k = 64``) is within
    1.7 % of ``sigma_max`` for any matrix of rank <= 64 and 2.7 % for rank <= 1024. Each factor is
    inflated by ``1 + 1e-6`` to cover rounding (the squarings run in float64). Cheap where
    decompositions are not: a few batched matrix products, no host synchronisation, and the exact
    gradient of the value returned.

    Example:
        >>> w = [torch.eye(3) * 2, torch.ones(2, 3)]
        >>> b = float(power_norm_product(w))
        >>> 4.899 < b < 4.899 * 3 ** (1 / 256) + 1e-4
        True
    """
    weights = list(weights)
    if not weights or any(w.dim() != 2 for w in weights):
        raise ValueError("power_norm_product expects a non-empty sequence of 2-D tensors")
    if blocks < 1:
        raise ValueError(f"blocks must be >= 1, got {blocks}")
    need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    return _PowerNormProduct.apply(int(blocks), need_grad, *weights)


# -- cached and shared bounds ------------------------------------------------------------------
_CACHE = "_bound_cache"
_SHARED = "_shared_bounds"


def _weights_key(params):
    return tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params)


def cached_bound(owner, params):
    """The bound cached on ``owner`` (by :func:`store_bound`) if ``params`` have not changed since,
    else ``None``. ``_version`` alone is not enough: optimisers that update ``p.data`` in place (Pyro's
    ClippedAdam) do not bump it, so the cache also keeps a copy of the parameters and compares them."""
    cache = owner.__dict__.get(_CACHE)
    if cache is None or cache[0] != _weights_key(params):
        return None
    if all(torch.equal(c, p.detach()) for c, p in zip(cache[2], params)):
        return cache[1]
    return None


def store_bound(owner, params, value):
    """Cache ``value`` (detached) on ``owner`` until ``params`` change; returns the detached value."""
    value = value.detach()
    owner.__dict__[_CACHE] = (_weights_key(params), value, [p.detach().clone() for p in params])
    return value


_KEEPING = [0]  # > 0 inside kept_bounds()


class kept_bounds:  # noqa: N801 (a context manager, used like a function)
    """Within the block, a bound computed *with* a graph is also cached (detached, as by :func:`store_bound`),
    so a later request without a graph, with the same parameter values, reads it instead of computing it
    again. Outside, only no-graph values are cached (storing costs a copy of the parameters, wasted when
    the next request follows an optimiser step). Used by the path-derivative gradient, whose pass with
    detached parameters follows the differentiable draw at the same values. Nests."""

    def __enter__(self):
        _KEEPING[0] += 1
        return self

    def __exit__(self, *exc):
        _KEEPING[0] -= 1
        return False


def _kept(owner, params, value, need_graph):
    """``value`` as a bound computation returns it: cached and detached without a graph; with one, returned
    as is, and also cached inside :class:`kept_bounds`."""
    if not need_graph:
        return store_bound(owner, params, value)
    if _KEEPING[0]:
        store_bound(owner, params, value)
    return value


class SharedBoundNetwork:
    """Mixin of networks whose guaranteed bound comes from their layers' spectral norms, so that a
    stack of layers can compute every network's bound in ONE batched call (:class:`shared_bounds`).

    A subclass defines ``_bound_params()`` (the parameters the bound depends on),
    ``_spectral_terms()`` (``(weights, product)``: the 2-D tensors to bound and whether the network
    uses their product, or ``None`` when its bound is not the spectral one), ``_finish_bound(raw)``
    (the network's value from :func:`spectral_norm_segments`' entry) and calls :meth:`_bound` with
    its own computation. Without a graph to build, the value is cached until a parameter changes
    (:func:`cached_bound`); inside :class:`shared_bounds` it comes from the stack's batched call.
    """

    def _bound(self, compute):
        params = self._bound_params()
        need_graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        shared = self.__dict__.get(_SHARED)
        if shared is not None:
            value = shared.value(self, need_graph)
            if value is not None:
                return value
        if not need_graph:
            value = cached_bound(self, params)
            if value is not None:
                return value
        return _kept(self, params, compute(), need_graph)

    def _packed_layout(self):
        """A :class:`PackedBoundLayout` if the network's spectral bound can be taken straight from one
        packed parameter (a stack of such networks then uses :func:`packed_spectral_bounds`), else
        ``None``."""
        return None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop(_CACHE, None)
        state.pop(_SHARED, None)
        return state


class _SharedPass:
    """The bounds of several networks, computed together on the first request (with a graph on the
    first request that needs one)."""

    def __init__(self, networks):
        self.networks = networks
        self.plain = self.graph = None

    def _compute(self, graph):
        values, todo, layouts, terms = {}, [], [], []
        for net in self.networks:
            layout = net._packed_layout()
            term = None if layout is not None else net._spectral_terms()
            if layout is None and term is None:  # (not a spectral bound)
                continue
            params = net._bound_params()
            need = graph and any(p.requires_grad for p in params)
            cached = None if need else cached_bound(net, params)
            if cached is not None:
                values[id(net)] = cached
            else:
                todo.append((net, params, need))
                layouts.append(layout)
                terms.append(term)
        if len(todo) < 2:  # (a single network computes its own)
            return values
        with torch.set_grad_enabled(graph):
            if all(lay is not None for lay in layouts) and len({lay.key for lay in layouts}) == 1:
                # one layout (a stack of equal layers): straight from the packed parameters
                raws = packed_spectral_bounds(layouts).unbind(0)
            else:
                lists, products = zip(*(t if t is not None else net._spectral_terms()
                                        for t, (net, _, _) in zip(terms, todo)))
                first = lists[0][0]
                # (mixed dtypes or devices: each network computes its own)
                if not all(w.dtype == first.dtype and w.device == first.device for ws in lists for w in ws):
                    return values
                raws = spectral_norm_segments(lists, products)
            for (net, params, need), raw in zip(todo, raws):
                value = net._finish_bound(raw)
                values[id(net)] = _kept(net, params, value, need)
        return values

    def value(self, net, need_graph):
        """``net``'s bound from the batched call (``None``: compute it alone)."""
        if need_graph:
            if self.graph is None:
                self.graph = self._compute(True)
            value = self.graph.get(id(net))
            return value if value is not None and value.requires_grad else None
        value = None if self.graph is None else self.graph.get(id(net))
        if value is None:
            if self.plain is None:
                self.plain = self._compute(False)
            value = self.plain.get(id(net))
        return None if value is None else value.detach()


class shared_bounds:  # noqa: N801 (a context manager, used like a function)
    """Within the block, the spectral bounds of ``networks`` (:class:`SharedBoundNetwork`\\ s; others
    are ignored) come from ONE :func:`spectral_norm_segments` call, made when the first of them needs
    its bound; each network reads its entry, the value it would compute alone (to float64 rounding)
    with the same gradients. Networks already in an enclosing block keep that block's values; the
    values are dropped on exit (cached, as usual, where no graph was built).

    Example:
        >>> nets = [LipschitzDenseNN(2, [8], 2) for _ in range(3)]
        >>> with shared_bounds(nets):
        ...     b = [net.bounds() for net in nets]  # one batched eigh per Gram size for all three
        >>> torch.allclose(b[0], nets[0].bounds(), rtol=1e-6)
        True
    """

    def __init__(self, networks):
        mine, seen = [], set()
        for net in networks:
            if isinstance(net, SharedBoundNetwork) and id(net) not in seen and _SHARED not in net.__dict__:
                seen.add(id(net))
                mine.append(net)
        self.networks = mine if len(mine) > 1 else []

    def __enter__(self):
        if self.networks:
            shared = _SharedPass(self.networks)
            for net in self.networks:
                net.__dict__[_SHARED] = shared
        return self

    def __exit__(self, *exc):
        for net in self.networks:
            net.__dict__.pop(_SHARED, None)
        return False


def matrix_norm_bound(weight: torch.Tensor, bound: str = "spectral") -> torch.Tensor:
    """A guaranteed upper bound of the spectral norm of ``weight`` (differentiable, a 0-d tensor)."""
    if bound not in _BOUNDS:
        raise ValueError(f"bound must be one of {_BOUNDS}, got {bound!r}")
    if bound == "frobenius":
        # vector_norm, not sqrt(sum of squares): its gradient at a zero weight is 0 (a subgradient), where the
        # square root's is inf * 0 = NaN; identity-initialised layers have zero weights
        return (torch.linalg.vector_norm(weight.double()) * (1 + MARGIN)).to(weight.dtype)
    if bound == "power":
        return power_norm_product([weight])
    return spectral_norm_bounds([weight])[0]


class LipschitzLinear(nn.Module):
    """Linear layer (optionally masked) that knows a guaranteed bound of its Lipschitz constant.

    Arguments:
        in_features, out_features: sizes.
        mask: optional ``(out_features, in_features)`` 0/1 mask; the bound is that of ``W * mask``,
            which can be much smaller or larger than ``||W||``.
        bias: learn a bias.
        coeff: if given (``0 < coeff``), the effective weight is ``W * mask * min(1, coeff / bound)``
            so the layer is ``coeff``-Lipschitz for any ``W`` (spectral normalisation with a
            guaranteed bound). If ``None`` the weight is used as is and :meth:`lipschitz` reports
            its bound (QuAR's "Lipschitz trick" divides by the product of those).
        bound: ``"spectral"`` (exact, default), ``"power"`` (no decomposition, looser by at most 1.7 %
            up to rank 64: :func:`power_norm_product`) or ``"frobenius"`` (cheaper, looser).
        mask_columns: number of leading input columns the bound is taken over; columns after it are
            ignored by :meth:`lipschitz` (e.g. context inputs, which do not affect ``Lip`` in ``x``).

    Example:
        >>> layer = LipschitzLinear(4, 8, coeff=0.9)
        >>> bool(layer.lipschitz() <= 0.9 * (1 + 1e-5))
        True
    """

    def __init__(self, in_features, out_features, mask=None, bias=True, coeff=None,
                 bound="spectral", mask_columns=None):
        super().__init__()
        if coeff is not None and not coeff > 0:
            raise ValueError(f"coeff must be positive, got {coeff}")
        if bound not in _BOUNDS:
            raise ValueError(f"bound must be one of {_BOUNDS}, got {bound!r}")
        self.in_features, self.out_features = in_features, out_features
        self.coeff, self.bound = coeff, bound
        self.mask_columns = in_features if mask_columns is None else mask_columns
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if mask is None:
            self.mask = None
        else:
            mask = torch.as_tensor(mask, dtype=torch.get_default_dtype())
            if mask.shape != (out_features, in_features):
                raise ValueError(
                    f"mask shape must be {(out_features, in_features)}, got {tuple(mask.shape)}"
                )
            self.register_buffer("mask", mask)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.mask is not None:
            # keep the scale of the unmasked entries comparable to a dense layer's
            fan = self.mask.sum(1, keepdim=True).clamp(min=1)
            with torch.no_grad():
                self.weight.mul_((in_features / fan).sqrt())

    def masked_weight(self):
        return self.weight if self.mask is None else self.weight * self.mask

    def _raw_bound(self, w):
        need_graph = torch.is_grad_enabled() and self.weight.requires_grad
        if not need_graph:
            cached = cached_bound(self, [self.weight])
            if cached is not None:
                return cached
        return _kept(self, [self.weight], matrix_norm_bound(w[:, : self.mask_columns], self.bound), need_graph)

    def effective_weight(self):
        """``W * mask``, rescaled to Lipschitz ``coeff`` if ``coeff`` is set."""
        w = self.masked_weight()
        if self.coeff is None:
            return w
        sigma = self._raw_bound(w)
        # coeff / max(sigma, coeff) = min(1, coeff / sigma), finite with a zero gradient at sigma = 0
        # (a fully masked layer), where coeff / sigma would give inf * 0 = NaN in the backward. (clamp, not
        # maximum with sigma.new_tensor(coeff): on a GPU that copies the scalar from the host, a synchronisation
        # per layer and call, 15 per monotone step on an H200)
        return w * (self.coeff / sigma.clamp(min=self.coeff))

    def lipschitz(self) -> torch.Tensor:
        """A guaranteed bound of the layer's Lipschitz constant in its first ``mask_columns`` inputs."""
        w = self.masked_weight()
        sigma = self._raw_bound(w)
        if self.coeff is None:
            return sigma
        return torch.clamp(sigma, max=self.coeff) * (1 + MARGIN)

    def forward(self, x, weight=None, bias=None):
        """``weight``: a precomputed :meth:`effective_weight` (``None``: computed now); ``bias``: the
        bias if the caller has it (a packed network's view)."""
        return F.linear(x, self.effective_weight() if weight is None else weight,
                        self.bias if bias is None else bias)

    def __getattr__(self, name):
        # a layer of a packed network (:class:`_LipschitzStack`): ``weight`` and ``bias`` are views of
        # the network's ``packed`` parameter
        if name in ("weight", "bias"):
            packed_in = self.__dict__.get("_packed_in")
            if packed_in is not None:
                net, index = packed_in
                return net._views()[2 * index + (name == "bias")]
        return super().__getattr__(name)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop(_CACHE, None)
        return state

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"masked={self.mask is not None}, coeff={self.coeff}, bound={self.bound!r}")


class LayerwiseBounds(SharedBoundNetwork):
    """Mixin of networks built from :class:`LipschitzLinear` layers (``_bound_layers()``), each rescaled by
    its own bound: all layers' bounds come from ONE computation (:meth:`bounds`: one
    :func:`spectral_norm_bounds` call, one ``eigh`` per Gram size), in every code path
    (:meth:`effective_weights`, a network's Lipschitz bound, with or without gradients), and in a stack of
    flow layers from the stack's one call for all its networks (:class:`shared_bounds`): a batched ``eigh``
    may round differently from a single one, and the map must be one function of the parameters. A
    subclass defines ``_bound_layers()`` and ``_bound_params()``, and ``_masked_weights(views)`` if its
    weights are views of a packed parameter.
    """

    def _bound_layers(self):
        raise NotImplementedError

    def _masked_weights(self, views=None):
        return [layer.masked_weight() for layer in self._bound_layers()]

    def _columns(self, masked):
        return [w if layer.mask_columns == w.shape[1] else w[:, : layer.mask_columns]
                for layer, w in zip(self._bound_layers(), masked)]

    def _spectral_terms(self):
        if any(layer.bound != "spectral" for layer in self._bound_layers()):
            return None
        return self._columns(self._masked_weights()), False

    def _finish_bound(self, raw):
        return raw

    def bounds(self, masked=None) -> torch.Tensor:
        """``(n_layers,)`` guaranteed bounds of the layers' masked weights (first layer: over its
        ``mask_columns``), computed together; ``masked``: the masked weights if the caller has them."""
        return self._bound(lambda: self._compute_bounds(masked))

    def _compute_bounds(self, masked):
        layers = self._bound_layers()
        cols = self._columns(self._masked_weights() if masked is None else masked)
        if all(layer.bound == "spectral" for layer in layers):
            return spectral_norm_bounds(cols)
        return torch.stack([matrix_norm_bound(w, layer.bound) for layer, w in zip(layers, cols)])

    def _coeffs(self):
        coeffs = {layer.coeff for layer in self._bound_layers()}
        return coeffs.pop() if len(coeffs) == 1 else [layer.coeff for layer in self._bound_layers()]

    def effective_weights(self, views=None):
        """The layers' effective (masked, Lipschitz-rescaled) weights, to compute once and reuse."""
        masked = self._masked_weights(views)
        sigma = self.bounds(masked)
        coeff = self._coeffs()
        if coeff is None:
            return masked
        if not isinstance(coeff, list):
            # coeff / max(sigma, coeff) = min(1, coeff / sigma), finite with a zero gradient at sigma = 0
            # (a fully masked layer), where coeff / sigma would give inf * 0 = NaN in the backward
            return [w * s for w, s in zip(masked, (coeff / sigma.clamp(min=coeff)).unbind())]
        return [w if c is None else w * (c / s.clamp(min=c)) for w, s, c in zip(masked, sigma.unbind(), coeff)]

    def layer_lipschitz(self) -> torch.Tensor:
        """``(n_layers,)`` guaranteed bounds of the layers' effective weights (``LipschitzLinear.lipschitz``)."""
        sigma = self.bounds()
        coeff = self._coeffs()
        if coeff is None:
            return sigma
        if not isinstance(coeff, list):
            return sigma.clamp(max=coeff) * (1 + MARGIN)
        return torch.stack([s if c is None else torch.clamp(s, max=c) * (1 + MARGIN)
                            for s, c in zip(sigma.unbind(), coeff)])


class _LipschitzStack(LayerwiseBounds, nn.Module):
    """``LipschitzLinear`` layers (``self.layers``) with ELU (1-Lipschitz) in between; ``Lip_x`` is the
    product of the layers' bounds. The context, if any, is appended to the input and not counted.

    All layers' bounds come from ONE computation (:class:`LayerwiseBounds`), in every code path (forward,
    :meth:`effective_weights`, :meth:`lipschitz`, with or without gradients). Without a graph to build,
    the bounds are cached until a weight changes (:func:`cached_bound`). The layers' weights and biases
    live in ONE parameter, ``packed`` (``layers[i].weight`` / ``.bias`` are views of it).
    """

    def _pack(self):
        """Move the layers' weights and biases into ONE parameter, ``packed`` (an optimiser updates it
        in one go: Pyro's optimisers keep a Python optimiser per tensor, Adam costs a few dozen aten
        ops per tensor per step); ``layers[i].weight`` / ``.bias`` become views of it. State dicts
        saved with one tensor per weight and bias still load."""
        from .packed import Packing, register_old_keys

        shapes, init = [], []
        for layer in self.layers:
            if layer.bias is None:
                raise ValueError("a packed Lipschitz network needs a bias in every layer")
            shapes += [tuple(layer.weight.shape), tuple(layer.bias.shape)]
            init += [layer.weight.detach(), layer.bias.detach()]
        self._packing = Packing(shapes)
        self.packed = nn.Parameter(self._packing.pack(init))
        for i, layer in enumerate(self.layers):
            del layer._parameters["weight"], layer._parameters["bias"]
            layer.__dict__["_packed_in"] = (self, i)
        register_old_keys(self, [f"layers.{i}.{k}" for i in range(len(self.layers)) for k in ("weight", "bias")],
                          "packed")

    def _views(self):
        """``[W_0, b_0, W_1, b_1, ...]``: views of :attr:`packed`, from one split."""
        return self._packing.unpack(self.packed)

    def _bound_layers(self):
        return self.layers

    def _bound_params(self):
        return [self.packed]

    def _packed_layout(self):
        if any(layer.bound != "spectral" for layer in self.layers):
            return None
        offsets, shapes = self._packing.offsets, self._packing.shapes
        layers = [(offsets[2 * i], *shapes[2 * i], layer.mask_columns) for i, layer in enumerate(self.layers)]
        return PackedBoundLayout(self.packed, layers, [layer.mask for layer in self.layers], product=False)

    def _masked_weights(self, views=None):
        views = self._views() if views is None else views
        return [views[2 * i] if layer.mask is None else views[2 * i] * layer.mask
                for i, layer in enumerate(self.layers)]

    def _stack(self, x, context=None, weights=None):
        # without ``weights`` each layer is called as a module (its hooks run) on the effective
        # weights computed together; with them, the same maths on the precomputed weights (reused
        # across solver passes)
        h = x if context is None else torch.cat([x, context], dim=-1)
        views = self._views()
        if weights is None:
            for i, (layer, w) in enumerate(zip(self.layers, self.effective_weights(views))):
                h = layer(F.elu(h) if i else h, weight=w, bias=views[2 * i + 1])
            return h
        for i in range(len(self.layers)):
            if i:
                h = F.elu(h)
            h = F.linear(h, weights[i], views[2 * i + 1])
        return h

    def _output_and_jacobian(self, x, context=None, weights=None):
        """``(out, jac)``: the flat output of :meth:`_stack` and its Jacobian in ``x``, ``(..., out, D_x)``,
        by the chain rule layer by layer (one batched product per layer; ELU's derivative is 1 above 0
        and ``exp`` below). A solver's certificate needs this at every sample: forward-mode autograd
        (``vmap(jacfwd(...))``) computes the same numbers through several times more operations."""
        weights = self.effective_weights() if weights is None else weights
        views = self._views()
        d = x.shape[-1]
        h = x if context is None else torch.cat([x, context], dim=-1)
        jac = weights[0][:, :d]
        for i, w in enumerate(weights):
            if i:
                jac = torch.matmul(w, torch.where(h > 0, 1.0, torch.exp(h)).unsqueeze(-1) * jac)
                h = F.elu(h)
            h = F.linear(h, w, views[2 * i + 1])
        return h, jac.expand(h.shape[:-1] + jac.shape[-2:])

    def lipschitz(self) -> torch.Tensor:
        """A guaranteed bound of ``Lip_x`` (the product of the layers' bounds; ELU is 1-Lipschitz)."""
        return self.layer_lipschitz().prod()


class LipschitzMADE(_LipschitzStack):
    """A strictly autoregressive (MADE) network with a guaranteed Lipschitz bound in its input.

    Output ``(..., k, i)`` depends on ``x_j`` for ``j < i`` only (and on the context, if any). Every
    linear layer is a masked :class:`LipschitzLinear` with ``coeff`` set, and the activation is
    1-Lipschitz (ELU), so ``Lip_x(net(., context)) <= prod(coeffs)`` for every parameter value and
    every context (context columns are excluded from the bound: for a fixed context they only add a
    bias). Families whose inverse is sequential (the error of coordinate ``i`` feeds the conditioner
    of coordinates ``> i``) use it to bound how fast an inverse's error can grow.

    Arguments:
        input_dim: D.
        hidden_dims: hidden layer sizes.
        output_multiplier: m, the number of outputs per coordinate; output shape ``(..., m, D)``.
        context_dim: size of the context appended to the input (0: unconditional).
        coeff: Lipschitz bound of each linear layer (a float, or one per layer).
        bound: how each layer's spectral norm is bounded (:class:`LipschitzLinear`): ``"spectral"``
            (exact, default), ``"power"`` (no decomposition: no host synchronisation on a GPU; looser by
            at most 1.7 % up to rank 64, 2.7 % up to 1024) or ``"frobenius"``.

    Example:
        >>> net = LipschitzMADE(3, [16, 16], output_multiplier=2, coeff=0.5)
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 2, 3])
        >>> bool(net.lipschitz() <= 0.5 ** 3 * (1 + 1e-5))
        True
    """

    def __init__(self, input_dim, hidden_dims, output_multiplier=1, context_dim=0, coeff=1.0, bound="spectral"):
        super().__init__()
        from .masked import autoregressive_masks

        masks = autoregressive_masks(input_dim, hidden_dims, context_dim, output_multiplier)
        coeffs = list(coeff) if isinstance(coeff, (list, tuple)) else [coeff] * len(masks)
        if len(coeffs) != len(masks):
            raise ValueError(f"coeff: expected {len(masks)} values (one per layer), got {len(coeffs)}")
        self.input_dim, self.output_multiplier, self.context_dim = input_dim, output_multiplier, context_dim
        self.layers = nn.ModuleList()
        for i, (m, c) in enumerate(zip(masks, coeffs)):
            self.layers.append(LipschitzLinear(m.shape[1], m.shape[0], mask=m, coeff=c, bound=bound,
                                               mask_columns=input_dim if i == 0 else None))
        self._pack()

    def forward(self, x, context=None, weights=None):
        """``weights``: precomputed :meth:`effective_weights` (``None``: computed now)."""
        h = self._stack(x, context, weights)
        return h.reshape(h.shape[:-1] + (self.output_multiplier, self.input_dim))

    def output_and_jacobian(self, x, context=None, weights=None):
        """``(net(x, context), d net / d x)``: shapes ``(..., m, D)`` and ``(..., m, D, D)`` (entry
        ``[..., k, i, j]`` is ``d out[k, i] / d x[j]``, zero unless ``j < i``), computed analytically.

        Example:
            >>> net = LipschitzMADE(3, [8], output_multiplier=2)
            >>> out, jac = net.output_and_jacobian(torch.randn(4, 3))
            >>> out.shape, jac.shape
            (torch.Size([4, 2, 3]), torch.Size([4, 2, 3, 3]))
        """
        h, jac = self._output_and_jacobian(x, context, weights)
        shape = h.shape[:-1] + (self.output_multiplier, self.input_dim)
        return h.reshape(shape), jac.reshape(shape + (x.shape[-1],))


class LipschitzDenseNN(_LipschitzStack):
    """A dense network with a guaranteed Lipschitz bound in ``x`` (the context does not count).

    ``LipschitzLinear`` layers with ``coeff`` set and ELU (1-Lipschitz) in between, so
    ``Lip_x <= prod(coeffs)`` for every weight value.

    Arguments:
        input_dim: size of ``x``.
        hidden_dims: hidden layer sizes.
        output_dim: size of the output.
        context_dim: size of the context appended to the input (0: unconditional).
        coeff: Lipschitz bound of each linear layer.
        bound: how each layer's spectral norm is bounded (as in :class:`LipschitzMADE`).

    Example:
        >>> net = LipschitzDenseNN(3, [16], 4, coeff=0.5)
        >>> net(torch.randn(5, 3)).shape
        torch.Size([5, 4])
        >>> bool(net.lipschitz() <= 0.5 ** 2 * (1 + 1e-5))
        True
    """

    def __init__(self, input_dim, hidden_dims, output_dim, context_dim=0, coeff=1.0, bound="spectral"):
        super().__init__()
        sizes = [input_dim + context_dim] + list(hidden_dims) + [output_dim]
        self.context_dim = context_dim
        self.layers = nn.ModuleList(
            LipschitzLinear(a, b, coeff=coeff, bound=bound, mask_columns=input_dim if i == 0 else None)
            for i, (a, b) in enumerate(itertools.pairwise(sizes)))
        self._pack()

    def forward(self, x, context=None, weights=None):
        """``weights``: precomputed :meth:`effective_weights` (``None``: computed now)."""
        return self._stack(x, context, weights)
