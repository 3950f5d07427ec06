"""Concatenated Pila (CPila): the 1-Lipschitz activation of Monotone Flows, in pure PyTorch.

``Pila(x) = x`` for ``x >= 0`` and ``(k^2/2 x^3 - k x^2 + x) exp(k x)`` for ``x < 0`` (``k = 5``): a C^2
function (value, first and second derivative continuous at 0) with derivative

    Pila'(x) = 1                                          (x >= 0)
    Pila'(x) = exp(k x) (k^3/2 x^3 + k^2/2 x^2 - k x + 1)   (x < 0),

which lies in ``[-19 e^{-4}, 1] = [-0.348, 1]`` (its own derivative is ``k exp(kx) (kx)^2 (kx/2 + 2)``,
so the minimum is at ``kx = -4`` and the supremum 1 is reached at 0).

``CPila(x) = a1 [Pila(x - a2), Pila(-x - a2)]`` with ``a1 = 1/1.06``, ``a2 = 0.2`` maps ``R^h`` to
``R^{2h}`` (the two halves concatenated along the last dimension). Its Jacobian is the stacked
diagonal ``[diag(a1 p+); diag(-a1 p-)]`` with ``p± = Pila'(±x - a2)``, whose spectral norm is
``a1 * max_i sqrt(p+_i^2 + p-_i^2)``. The "speed" ``s(x) = sqrt(Pila'(x - a2)^2 + Pila'(-x - a2)^2)``
has maximum ``1.058821...`` (at ``x = -0.6`` and, by symmetry, ``x = 0.6``): on a grid of step 1e-5
over ``[-20, 20]`` the largest value is 1.0588210 and ``|s'| < 0.45`` there, so between grid points
``s`` exceeds it by at most ``0.45 * 0.5e-5``; outside ``[-20, 20]`` ``s < 1 + 1e-30``.
Hence ``Lip(CPila) <= 1.0588233 / 1.06 = 0.99889 < 1``; the class
reports the conservative bound ``lipschitz = 1.0`` (the paper's claim) and ``tests/test_monotone.py``
re-checks the numerical maximum.

Implementation notes: the negative branch is evaluated at ``clamp(x, -TAIL/k, 0)`` (``TAIL = 30``), so
``exp`` never overflows, ``torch.where`` never sees ``inf * 0`` (which would give NaN gradients), and
the tail is *frozen* below ``k x = -30``: there ``Pila`` is the constant ``Pila(-6) = -1.4e-10`` and its
derivative 0 (instead of ``|Pila'| < 1.2e-9``). Without it, float32 values around ``e^{-100}`` are
subnormal, and arithmetic on subnormals is 10-100x slower on CPUs (measured: 15 ms instead of 1 ms
for one Jacobian of a Monotone block). The function computed is continuous, its derivative is the one
returned, and the Lipschitz bound is unchanged (derivatives only shrink). Everything is elementwise
PyTorch, differentiable twice (the stochastic log-det's gradient differentiates the derivative), dtype-
and device-agnostic. No compiled extension.

References:
    Ahn, Kim, Hong, Kim. Invertible Monotone Operators for Normalizing Flows. NeurIPS 2022 (Sec. 4,
    "Concatenated Pila").

Example:
    >>> import torch
    >>> from pyro_flows.nn.cpila import CPila
    >>> act = CPila()
    >>> y, dy = act.forward_and_derivative(torch.randn(4, 3))
    >>> y.shape, dy.shape, act.expansion
    (torch.Size([4, 6]), torch.Size([4, 6]), 2)
"""

from __future__ import annotations

import torch

from .activations import LipschitzActivation, register_activation

__all__ = ["pila", "pila_and_derivative", "CPila"]


#: the exponential tail is frozen below ``k x = -TAIL`` (see the module docstring)
TAIL = 30.0


def pila_and_derivative(x: torch.Tensor, k: float = 5.0):
    """``(Pila(x), Pila'(x))`` elementwise, the negative branch evaluated at ``clamp(x, -TAIL/k, 0)``."""
    xn = x.clamp(min=-TAIL / k, max=0)
    t = k * xn
    e = torch.exp(t)
    t2 = t * t
    neg = xn * (0.5 * t2 - t + 1) * e  # (k^2/2 x^3 - k x^2 + x) e^{kx}
    dneg = ((0.5 * t + 0.5) * t2 - t + 1) * e  # (k^3/2 x^3 + k^2/2 x^2 - k x + 1) e^{kx}
    pos = x >= 0
    dneg = torch.where(x >= -TAIL / k, dneg, torch.zeros_like(dneg))  # as autograd through clamp
    return torch.where(pos, x, neg), torch.where(pos, torch.ones_like(x), dneg)


def pila(x: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """``Pila(x)`` (see the module docstring); cheaper than :func:`pila_and_derivative`."""
    xn = x.clamp(min=-TAIL / k, max=0)
    t = k * xn
    return torch.where(x >= 0, x, xn * (0.5 * t * t - t + 1) * torch.exp(t))


class CPila(LipschitzActivation):
    """Concatenated Pila, ``R^h -> R^{2h}``: ``a1 [Pila(x - a2), Pila(-x - a2)]`` (1-Lipschitz).

    ``forward_and_derivative(x)`` returns ``(y, dy)``, both of shape ``(..., 2h)``; the Jacobian is
    ``diag(dy) @ [I; I]`` (``expansion = 2``: output unit ``j`` depends on input ``j mod h`` only), which
    is how callers propagate tangents through it.

    Arguments:
        k: the Pila sharpness (paper: 5). Only ``k = 5`` with the default ``a1, a2`` has the checked
            Lipschitz bound; other values raise ``ValueError`` unless ``check=False``.
        a1, a2: output scale and shift (paper: 1/1.06 and 0.2).

    Example:
        >>> import torch
        >>> from pyro_flows.nn import get_activation
        >>> act = get_activation("cpila")
        >>> act(torch.zeros(1, 2)).shape
        torch.Size([1, 4])
    """

    lipschitz = 1.0
    expansion = 2

    def __init__(self, num_features: int | None = None, k: float = 5.0, a1: float = 1 / 1.06,
                 a2: float = 0.2, check: bool = True):
        super().__init__()
        if check and (k, a1, a2) != (5.0, 1 / 1.06, 0.2):
            raise ValueError(
                "CPila's Lipschitz bound is verified for k=5, a1=1/1.06, a2=0.2 only; "
                f"got k={k}, a1={a1}, a2={a2} (pass check=False to use them anyway)"
            )
        self.k, self.a1, self.a2 = float(k), float(a1), float(a2)

    def forward(self, x):
        return self.a1 * pila(torch.cat([x, -x], dim=-1) - self.a2, self.k)

    def forward_and_derivative(self, x):
        h = x.shape[-1]
        p, dp = pila_and_derivative(torch.cat([x, -x], dim=-1) - self.a2, self.k)
        dy = self.a1 * torch.cat([dp[..., :h], -dp[..., h:]], dim=-1)
        return self.a1 * p, dy

    # -- folded form (used by MonotoneNet's fast path) ------------------------------------------
    def fold(self, weight, bias):
        """Fold the doubling, shift and inner scale into a preceding linear layer.

        Returns ``(W', b', out_scale)`` such that for ``u = weight @ h + bias``
        ``CPila(u) = out_scale * folded(W' @ h + b')``, with ``W' = k [weight; -weight]``,
        ``b' = k [bias - a2; -bias - a2]`` and ``out_scale = a1 / k`` (to be folded into the next
        layer's weight). One ``addmm`` then replaces the linear layer, the concatenation, the shift
        and the scales.
        """
        k, a2 = self.k, self.a2
        W = torch.cat([weight, -weight], dim=0) * k
        if bias is None:
            bias = weight.new_zeros(weight.shape[0])
        b = torch.cat([bias - a2, -bias - a2], dim=0) * k
        return W, b, self.a1 / self.k

    @staticmethod
    def folded(v):
        """``psi(v) = relu(v) + phi(t)``, ``phi(t) = t (t^2/2 - t + 1) e^t``, ``t = clamp(v, -TAIL, 0)``
        (so ``Pila(x) = psi(k x) / k``); seven elementwise ops."""
        t = v.clamp(min=-TAIL, max=0)
        q = torch.addcmul(1 - t, t, t, value=0.5)
        return torch.addcmul(torch.relu(v), t * q, torch.exp(t))

    @staticmethod
    def folded_and_derivative(v):
        """``(psi(v), psi'(v))``; ``psi'(v) = e^t (q(t) + t^3/2)`` with ``q(t) = t^2/2 - t + 1`` for
        ``v >= -TAIL`` (equal to 1 for ``v >= 0``, where ``t = 0``) and 0 below."""
        t = v.clamp(min=-TAIL, max=0)
        e = torch.exp(t)
        t2 = t * t
        q = torch.add(1 - t, t2, alpha=0.5)
        d = torch.addcmul(q, t2, t, value=0.5) * (e * (v >= -TAIL))
        return torch.addcmul(torch.relu(v), t * q, e), d

    @staticmethod
    def folded_derivatives(v):
        """``(psi(v), psi'(v), psi''(v))``; ``psi''(v) = e^t t^2 (2 + t/2)`` for ``-TAIL <= v <= 0`` and 0
        elsewhere (the derivative of the ``psi'`` that :meth:`folded_and_derivative` returns, as
        autograd would give it; hand-written backward passes use it)."""
        t = v.clamp(min=-TAIL, max=0)
        e = torch.exp(t)
        em = e * (v >= -TAIL)
        t2 = t * t
        q = torch.add(1 - t, t2, alpha=0.5)
        d = torch.addcmul(q, t2, t, value=0.5) * em
        d2 = torch.addcmul(t2 * 2, t2, t, value=0.5) * em
        return torch.addcmul(torch.relu(v), t * q, e), d, d2

    def extra_repr(self):
        return f"k={self.k}, a1={self.a1:.6g}, a2={self.a2}"


register_activation("cpila", CPila)
