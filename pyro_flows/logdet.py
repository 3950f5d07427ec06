"""Log-determinants of residual-type maps: exact (dense Jacobians) and unbiased stochastic estimates.

Residual-type flows (i-ResNet / Residual Flows ``x + G(x)``, Monotone Flows, implicit flows) need
log-determinants of the form ``log|det(I + s J)|`` or ``sum_k c_k tr(J^k)`` where ``J = J_G`` is the
Jacobian of a contraction ``G``. This module is generic: it only sees ``J`` as a dense matrix, or as a
matrix-vector product ``u -> J u``.

Exact (moderate D):
    * :func:`batch_jacobian` — ``J[..., i, j] = d fn(x)[..., i] / d x[..., j]`` for batched ``x`` whose
      samples are independent, by ``D`` reverse-mode passes (``create_graph=True`` keeps it
      differentiable, so log-dets built from it have exact gradients). Cost ``O(D)`` passes.
    * :func:`logabsdet` — ``log|det(I + s J)|`` batched (LU via ``torch.linalg.slogdet``).
    * :func:`monotone_logdet_exact` — ``log|det(I - J)| - log|det(I + J)|`` (Monotone Flows), from one
      batched LU factorisation of ``[I - J; I + J]``, with a hand-written backward that can hand the
      inverses (or the factors) to the caller (:class:`MonotoneLogDetState`).

Stochastic (large D): :func:`roulette_series` estimates ``S(J) = sum_{k>=1} c_k tr(J^k)`` without
bias by a Russian-roulette truncation of the series (Chen et al., 2019) and Hutchinson's trace
estimator: with ``v ~ N(0, I)`` (or Rademacher) and a random number of terms ``N``,

    est = sum_{k=1}^{N} c_k v^T J^k v / P(N >= k),         E_{N, v}[est] = S(J).

``N = n_exact + Geometric(p)`` (``P(N >= k) = 1`` for ``k <= n_exact`` and ``(1-p)^(k - n_exact)``
beyond), one ``N`` per call shared by the batch (every sample is still unbiased). The variance is
finite when ``||J||^2 < 1 - p`` (terms grow like ``(||J||^2 / (1-p))^k``), so
:func:`default_roulette_p` ties ``p`` to the Lipschitz bound: ``1 - p = L`` gives summable
``L^k`` variance terms for every ``L < 1``, at an expected ``n_exact + L/(1-L)`` terms.

Gradient (the "Neumann-series gradient"): differentiating the estimator's terms would need a graph
through ``N`` products. Instead, since ``d S = sum_k k c_k tr(J^{k-1} dJ)``, the returned tensor's
*value* is ``est`` and its *gradient* is that of the surrogate ``v^T dJ u`` with the detached vector
``u = sum_{k=1}^{N} k c_k J^{k-1} v / P(N >= k)``: an unbiased estimate of ``d S`` that needs one
differentiable matrix-vector product (``grad_matvec``) and no graph through the series. For
``log det(I + J)`` (``c_k = (-1)^{k+1}/k``) that is the Neumann series ``(I + J)^{-1} = sum (-J)^k`` of
Residual Flows; for Monotone Flows (``log det(I-J) - log det(I+J) = -2 tr artanh(J)``, ``c_k = -2/k``
for odd ``k``, 0 for even) it is ``-2 (I - J^2)^{-1} = -2 sum J^{2m}``.

References:
    Chen, Behrmann, Duvenaud, Jacobsen. Residual Flows for Invertible Generative Modeling.
    NeurIPS 2019 (Russian-roulette estimator, Neumann-series gradient).
    Hutchinson. A stochastic estimator of the trace of the influence matrix. 1989.
    Ahn, Kim, Hong, Kim. Invertible Monotone Operators for Normalizing Flows. NeurIPS 2022
    (the monotone log-det series).

Example:
    >>> import torch
    >>> from pyro_flows.logdet import monotone_logdet_exact, roulette_series, monotone_coefficient
    >>> J = 0.3 * torch.eye(3, dtype=torch.float64).expand(2, 3, 3)
    >>> exact = monotone_logdet_exact(J)
    >>> bool(torch.allclose(exact, 3 * torch.log(torch.tensor(0.7 / 1.3, dtype=torch.float64))))
    True
    >>> x = torch.zeros(2, 3, dtype=torch.float64)
    >>> mv = lambda u: 0.3 * u
    >>> _ = torch.manual_seed(0)
    >>> est = torch.stack([roulette_series(mv, mv, x, monotone_coefficient, n_exact=40, p=0.5) for _ in range(500)])
    >>> bool(((est.mean(0) - exact).abs() < 4 * est.std(0) / 500 ** 0.5).all())  # noisy per draw, unbiased
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .validation import check_dim

__all__ = [
    "MonotoneLogDetState",
    "batch_jacobian",
    "default_roulette_p",
    "logabsdet",
    "monotone_coefficient",
    "monotone_logdet_exact",
    "monotone_logdet_stochastic",
    "roulette_series",
]


# ---------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------
def batch_jacobian(fn: Callable, x: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Jacobian ``(..., D_out, D)`` of ``fn`` at a batch ``x`` of shape ``(..., D)``.

    ``fn`` must act sample-wise (output sample ``b`` depends only on input sample ``b``). Uses ``D_out``
    reverse-mode passes; with ``create_graph=True`` the result is differentiable in ``x``'s graph and
    in the parameters ``fn`` uses (exact gradients of log-dets built from it).
    """
    if not torch.is_grad_enabled():
        with torch.enable_grad():
            return batch_jacobian(fn, x, create_graph=False).detach()
    xi = x if x.requires_grad else x.detach().requires_grad_(True)
    y = fn(xi)
    rows = []
    for i in range(y.shape[-1]):
        (g,) = torch.autograd.grad(y[..., i].sum(), xi, create_graph=create_graph, retain_graph=True,
                                   allow_unused=True)
        rows.append(torch.zeros_like(xi) if g is None else g)
    return torch.stack(rows, dim=-2)


def logabsdet(J: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``log|det(I + scale * J)|`` for a batch of square matrices ``(..., D, D)``."""
    eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
    return torch.linalg.slogdet(eye + scale * J).logabsdet


class MonotoneLogDetState:
    """What :func:`monotone_logdet_exact` leaves for the caller: the LU factors of ``[I - J; I + J]``
    (after forward) and their inverses (after backward), so a solve with ``I - J`` or ``I + J`` (e.g. an
    implicit-gradient correction) costs a matrix-vector product or a triangular solve.

    ``solve_transposed(sign, a)`` returns ``(I + sign J)^{-T} a`` for ``a`` of shape ``(..., D)``.
    """

    def __init__(self):
        self.lu = None
        self.inverses = None

    def solve_transposed(self, sign, a):
        i = 1 if sign > 0 else 0
        if self.inverses is not None:
            return (a.unsqueeze(-2) @ self.inverses[i]).squeeze(-2)
        LU, piv = self.lu
        return torch.linalg.lu_solve(LU[i], piv[i], a.unsqueeze(-1), adjoint=True).squeeze(-1)


class _MonotoneLogDet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, J, state):
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device)
        LU, piv, _ = torch.linalg.lu_factor_ex(torch.stack([eye - J, eye + J]))
        logdets = LU.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
        ctx.save_for_backward(LU, piv)
        ctx.state = state
        if state is not None:
            state.lu = (LU, piv)
        return logdets[0] - logdets[1]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        LU, piv = ctx.saved_tensors
        eye = torch.eye(LU.shape[-1], dtype=LU.dtype, device=LU.device).expand(LU.shape)
        inv = torch.linalg.lu_solve(LU, piv, eye)  # (I - J)^{-1}, (I + J)^{-1}
        if ctx.state is not None:
            ctx.state.inverses = inv
        # d/dJ [log det(I - J) - log det(I + J)] = -(I - J)^{-T} - (I + J)^{-T}
        return -(inv[0] + inv[1]).mT * grad[..., None, None], None


def monotone_logdet_exact(J: torch.Tensor, state: MonotoneLogDetState | None = None) -> torch.Tensor:
    """``log|det(I - J)| - log|det(I + J)|``: the log-det of a Monotone Flow block at its solved point.

    ``J`` ``(..., D, D)`` with ``||J|| < 1`` (both determinants positive). One batched LU of
    ``[I - J; I + J]``; differentiable once in ``J`` (backward: one batched solve for both inverses).
    ``state`` (optional, a :class:`MonotoneLogDetState`) receives the factors and inverses.
    """
    return _MonotoneLogDet.apply(J, state)


# ---------------------------------------------------------------------------------------------
# stochastic
# ---------------------------------------------------------------------------------------------
def monotone_coefficient(k: int) -> float:
    """Series coefficient of ``log det(I - J) - log det(I + J) = sum_{k odd} -2/k tr(J^k)``."""
    return -2.0 / k if k % 2 else 0.0


def default_roulette_p(lipschitz: float, lo: float = 0.02, hi: float = 0.5) -> float:
    """Geometric stopping probability ``p = 1 - L`` clipped to ``[lo, hi]`` (finite variance, see above)."""
    return float(min(hi, max(lo, 1.0 - float(lipschitz))))


def _sample_num_terms(n_exact, p, generator):
    # N = n_exact + Geometric(p) on {0, 1, ...}: P(G >= j) = (1 - p)^j
    device = generator.device if generator is not None else "cpu"
    u = torch.rand((), dtype=torch.float64, device=device, generator=generator).item()
    u = max(u, 1e-300)
    return n_exact + int(math.floor(math.log(u) / math.log1p(-p)))


def roulette_series(matvec: Callable, grad_matvec: Callable, x: torch.Tensor, coefficient: Callable,
                    *, n_exact: int = 2, p: float = 0.5, noise: str = "gaussian",
                    generator: torch.Generator | None = None, num_terms: int | None = None,
                    return_terms: bool = False):
    """Unbiased estimate of ``sum_{k>=1} coefficient(k) tr(J^k)`` per sample, with unbiased gradients.

    Arguments:
        matvec: ``u -> J u`` for ``u`` of shape ``(..., D)``, evaluated without a graph (called under
            ``torch.no_grad()``), ``N`` times.
        grad_matvec: ``u -> J u`` *with* the graph to everything ``J`` depends on (parameters, the
            point where ``J`` is taken); called once, for the gradient surrogate. Pass ``matvec`` when
            no gradient is needed.
        x: a tensor of the batch shape ``(..., D)`` (only its shape, dtype and device are used).
        coefficient: ``k -> c_k`` (e.g. :func:`monotone_coefficient`).
        n_exact: terms always computed (``P(N >= k) = 1`` for ``k <= n_exact``).
        p: geometric stopping probability of the remaining terms (see :func:`default_roulette_p`).
        noise: ``"gaussian"`` (``N(0, I)``, as in the paper) or ``"rademacher"`` Hutchinson vectors.
        generator: optional ``torch.Generator`` on ``x``'s device, for reproducible draws.
        num_terms: fix ``N`` and use weights 1: the truncated series ``sum_{k<=N} c_k v^T J^k v``
            (biased by the tail; for tests and deterministic-cost use).
        return_terms: also return the ``N`` used.

    Returns:
        a tensor of shape ``x.shape[:-1]`` whose value is the estimate and whose gradient (if
        ``grad_matvec`` carries a graph) is the Neumann-type unbiased gradient estimate.
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if n_exact < 0:
        raise ValueError(f"n_exact must be >= 0, got {n_exact}")
    if noise not in ("gaussian", "rademacher"):
        raise ValueError(f"noise must be 'gaussian' or 'rademacher', got {noise!r}")
    if num_terms is None:
        n = max(_sample_num_terms(n_exact, p, generator), 1)
    else:  # a fixed truncation: every term has weight 1
        n = check_dim(num_terms, "num_terms")
        n_exact = n
    v = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    if noise == "rademacher":
        v = torch.sign(v)
        v = torch.where(v == 0, torch.ones_like(v), v)
    est = x.new_zeros(x.shape[:-1])
    u = torch.zeros_like(v)  # sum_k k c_k J^{k-1} v / P(N >= k)
    with torch.no_grad():
        w = v  # J^{k-1} v
        for k in range(1, n + 1):
            prob = 1.0 if k <= n_exact else (1.0 - p) ** (k - n_exact)
            c = coefficient(k)
            if c != 0.0:
                u = u + (k * c / prob) * w
            w = matvec(w)
            if c != 0.0:
                est = est + (c / prob) * (v * w).sum(-1)
    if torch.is_grad_enabled():
        surrogate = (v * grad_matvec(u)).sum(-1)
        out = est + (surrogate - surrogate.detach())
    else:
        out = est
    return (out, n) if return_terms else out


def monotone_logdet_stochastic(matvec, grad_matvec, x, **kwargs):
    """Unbiased ``log det(I - J) - log det(I + J)`` (Monotone Flows); see :func:`roulette_series`."""
    return roulette_series(matvec, grad_matvec, x, monotone_coefficient, **kwargs)
