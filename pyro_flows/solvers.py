"""Batched root finding and fixed-point iteration, with implicit-function gradients.

Every family that inverts numerically uses these, so tolerances, non-convergence reporting and
gradients behave the same everywhere:

* :func:`monotone_root` solves ``f(x) = y`` elementwise for a strictly increasing scalar map with a
  safeguarded (bracketed) Newton iteration: Newton steps when they stay inside the bracket and
  shrink the residual fast enough, bisection otherwise. Convergence is guaranteed once a bracket is
  found, and the bracket is found by doubling outwards from the starting point.
* :func:`fixed_point` iterates ``x <- g(x)`` for a contraction, optionally with Anderson
  acceleration, with a per-sample stopping rule; given a Lipschitz bound ``L < 1`` of ``g`` it stops
  when the a-posteriori error bound ``L/(1-L) * |x_{k+1} - x_k|`` is within tolerance.
* :func:`implicit_fixed_point` and :func:`implicit_monotone_root` attach the gradient of the solution
  from the implicit function theorem, so backward never unrolls the iterations. The fixed-point one is
  a custom ``torch.autograd.Function`` whose backward solves the adjoint fixed point
  ``u = grad + J_g^T u`` with the same solver.

All solvers: no Python loop over batch elements; non-finite input raises ``ValueError`` instead of
iterating; stopping short of the tolerance emits :class:`ConvergenceWarning` naming the residual
reached (``on_fail="warn"``, the default), raises :class:`SolverError` (``"raise"``) or stays silent
(``"ignore"``). Default tolerances depend on the dtype (:func:`default_tolerance`).

Example:
    >>> import torch
    >>> from pyro_flows.solvers import monotone_root
    >>> y = torch.linspace(-5, 5, 11, dtype=torch.float64)
    >>> x = monotone_root(lambda x: (x + x ** 3, 1 + 3 * x ** 2), y)
    >>> bool(((x + x ** 3) - y).abs().max() < 1e-10)
    True
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .validation import check_finite

__all__ = [
    "ConvergenceWarning",
    "SolverError",
    "SolverInfo",
    "default_tolerance",
    "refuse_jit_trace",
    "fixed_point",
    "implicit_fixed_point",
    "implicit_monotone_root",
    "monotone_root",
]

ON_FAIL = ("warn", "raise", "ignore")

#: default convergence-test schedule of :func:`fixed_point`: every ``CHECK_EVERY`` iterations (a
#: fixed schedule, the same on every process), so a solve synchronises with the host once per
#: ``CHECK_EVERY`` iterations instead of after each one (measured on a monotone inverse, D=8,
#: batch 512: 30 syncs -> 8, for 13% more aten ops).
CHECK_EVERY = 4


class ConvergenceWarning(UserWarning):
    """A solver stopped (``max_iter``) before reaching its tolerance."""


class SolverError(RuntimeError):
    """A solver stopped before reaching its tolerance and ``on_fail="raise"`` was asked for."""

    def __init__(self, message, residual=None, iterations=None):
        super().__init__(message)
        self.residual = residual
        self.iterations = iterations


@dataclass
class SolverInfo:
    """What a numerical inverse did: the one diagnostics record of every family.

    A transform that inverts numerically keeps the record of its latest inverse in
    ``last_solver_info`` (``None`` before the first one, or when the latest call needed no solve);
    benchmarks and tests read only this name.

    Attributes:
        iterations: iterations used (the largest over the solves of one call).
        residual: the largest residual left (in the solver's own measure, e.g. ``|f(x) - y|``).
        converged: every element reached its tolerance.
        error_bound: a guaranteed bound on the error in x (``None`` where the solver has none).
        detail: family-specific counters (e.g. per-stage iteration counts), a plain dict.
    """

    iterations: int
    residual: float
    converged: bool
    error_bound: float | None = None
    detail: dict = field(default_factory=dict)

    def merge(self, other: SolverInfo | None) -> SolverInfo:
        """The record of two solves in one call (e.g. successive layers of a block)."""
        if other is None:
            return self
        bounds = [b for b in (self.error_bound, other.error_bound) if b is not None]
        return SolverInfo(
            max(self.iterations, other.iterations),
            max(self.residual, other.residual),
            self.converged and other.converged,
            max(bounds) if bounds else None,
            {**self.detail, **other.detail},
        )


def default_tolerance(dtype: torch.dtype) -> float:
    """Default absolute and relative tolerance for ``dtype`` (1e-12 for float64, 1e-6 for float32)."""
    if dtype == torch.float64:
        return 1e-12
    if dtype == torch.float32:
        return 1e-6
    return 1e-3


def _check_on_fail(on_fail):
    if on_fail not in ON_FAIL:
        raise ValueError(f"on_fail must be one of {ON_FAIL}, got {on_fail!r}")


def refuse_jit_trace(name):
    """An iterative solve cannot be recorded by ``torch.jit.trace`` (e.g. Pyro's ``JitTrace_ELBO``):
    the trace would freeze the iteration count and every convergence test at their trace-time
    values, so the replay would return unconverged results silently."""
    if torch.jit.is_tracing():
        raise SolverError(
            f"{name}: an iterative inverse cannot be traced by torch.jit (JitTrace_ELBO, "
            "torch.jit.trace): the trace would freeze its iteration count. Use Trace_ELBO, or, for a "
            "family with the direction switch, build the flow so this direction is single-pass "
            "(single_pass='sample' for a guide; monotone solves in both directions and has no switch)"
        )


def _check_schedule(check_every):
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
    return check_every


def _report(name, converged, residual, iterations, tol, on_fail, error_bound=None):
    info = SolverInfo(iterations, residual, converged, error_bound)
    if converged or on_fail == "ignore":
        return info
    reached = "" if error_bound is None else f", guaranteed x-space error bound {error_bound:.3g}"
    msg = (
        f"{name} stopped after {iterations} iterations with residual {residual:.3g}{reached} "
        f"(tolerance {tol:.3g}); raise max_iter or loosen atol/rtol"
    )
    if on_fail == "raise":
        raise SolverError(msg, residual=residual, iterations=iterations)
    warnings.warn(msg, ConvergenceWarning, stacklevel=3)
    return info


def _bracket(fn, target, x0, max_expand):
    """Find lo <= root <= hi elementwise by doubling a window around x0 (fn increasing)."""
    width = torch.ones_like(x0)
    lo, hi = x0 - width, x0 + width
    for _ in range(max_expand):
        f_lo = fn(lo)[0]
        f_hi = fn(hi)[0]
        bad_lo = f_lo > target
        bad_hi = f_hi < target
        if not bool((bad_lo | bad_hi).any()):
            return lo, hi, True
        width = torch.where(bad_lo | bad_hi, 2 * width, width)
        # move the window: the old hi is a valid lower end when f(hi) < target and vice versa
        new_lo = torch.where(bad_lo, lo - width, torch.where(bad_hi, hi, lo))
        new_hi = torch.where(bad_hi, hi + width, torch.where(bad_lo, lo, hi))
        lo, hi = new_lo, new_hi
    f_lo, f_hi = fn(lo)[0], fn(hi)[0]
    ok = bool(((f_lo <= target) & (f_hi >= target)).all())
    return lo, hi, ok


def monotone_root(fn, target, *, init=None, lower=None, upper=None, atol=None, rtol=None,
                  max_iter=100, max_expand=64, on_fail="warn", return_info=False, min_slope=None,
                  check_every=1, first=None):
    """Solve ``fn(x) = target`` elementwise for a strictly increasing elementwise map.

    Arguments:
        fn: callable ``x -> (fn(x), fn'(x))``, elementwise (entry i of the output depends only on
            entry i of ``x``), strictly increasing.
        target: tensor of right-hand sides.
        init: starting point (e.g. an approximate analytic inverse); defaults to ``target``.
        lower, upper: a known bracket (``fn(lower) <= target <= fn(upper)``); found by doubling
            outwards from ``init`` when not given.
        atol, rtol: stop when the bracket is narrower than ``atol + rtol * |x|`` (an x-space
            error bound: ``x`` and the root both lie in it), or when ``|fn(x) - target| / min_slope``
            is (x-space again) if ``min_slope`` is given, or else when ``|fn(x) - target| <= atol +
            rtol * |target|`` (y-space); default :func:`default_tolerance`.
        min_slope: a guaranteed lower bound on ``fn'`` (float or a tensor broadcasting against
            ``target``); makes every stopping rule an x-space bound.
        check_every: test convergence (one host synchronisation) every ``check_every`` iterations
            and at ``max_iter``; converged entries stay fixed in between. Default 1: safeguarded
            Newton needs few iterations, each a full evaluation of ``fn`` (often hundreds of
            kernels), so an extra iteration costs more than a synchronisation (measured on an
            AUTM inverse: ``check_every=4`` saved 8 of 50 syncs for 51% more ops).
        max_iter: Newton/bisection iterations; bisection alone gains a bit per iteration, so 100 is
            enough for float64 from any bracket of width < 2^40.
        max_expand: bracket doublings.
        on_fail: ``"warn"``, ``"raise"`` or ``"ignore"`` when the tolerance is not reached.
        return_info: also return a :class:`SolverInfo` (``error_bound``: the largest x-space
            bound reached, the bracket width or ``residual / min_slope``; ``detail["at_last_evaluation"]``:
            whether the returned ``x`` is the point ``fn`` was last evaluated at (or ``first``'s),
            so a caller that kept that evaluation need not repeat it).
        first: ``(fn(init), fn'(init))`` when the caller has already evaluated ``fn`` at ``init``
            (e.g. to size a bracket): the first iteration uses it instead of calling ``fn``. Entries
            where ``init`` is not strictly inside the bracket start from its midpoint as usual and are
            evaluated at the next iteration (their first-iteration values are ignored, no sync).

    Returns:
        ``x`` (and ``info``). No gradient flows through the iterations; use
        :func:`implicit_monotone_root` on the result.
    """
    _check_on_fail(on_fail)
    refuse_jit_trace("monotone_root")
    check_every = _check_schedule(check_every)
    target = check_finite(target.detach(), "monotone_root target")
    tol = default_tolerance(target.dtype)
    atol = tol if atol is None else atol
    rtol = tol if rtol is None else rtol
    with torch.no_grad():
        x = target.clone() if init is None else check_finite(init.detach(), "monotone_root init").clone()
        if lower is None or upper is None:
            lo, hi, ok = _bracket(fn, target, x, max_expand)
            if not ok:
                raise SolverError(
                    "monotone_root could not bracket the root: the map's range may not cover the target"
                )
        else:
            lo, hi = lower.detach().expand_as(x).clone(), upper.detach().expand_as(x).clone()
        inside = (x > lo) & (x < hi)
        x = torch.where(inside, x, 0.5 * (lo + hi))
        y_tol = atol + rtol * target.abs()
        dx_old = hi - lo
        it = 0
        converged = torch.zeros_like(x, dtype=torch.bool)
        residual = torch.full_like(x, float("inf"))
        bound = hi - lo
        evaluated = False
        for it in range(1, max_iter + 1):
            if it == 1 and first is not None:
                # entries moved to the midpoint get NaN: no bracket update, not converged, bisection next
                nan = torch.full_like(x, float("nan"))
                fx = torch.where(inside, first[0].detach(), nan)
                dfx = torch.where(inside, first[1].detach(), nan)
            else:
                fx, dfx = fn(x)
            r = fx - target
            residual = r.abs()
            lo = torch.where(r < 0, x, lo)
            hi = torch.where(r > 0, x, hi)
            x_tol = atol + rtol * x.abs()
            bound = hi - lo
            if min_slope is None:
                converged = (residual <= y_tol) | (bound <= x_tol)
            else:
                bound = torch.minimum(bound, residual / min_slope)
                converged = bound <= x_tol
            if (it % check_every == 0 or it == max_iter) and bool(converged.all()):
                evaluated = True
                break
            newton = x - r / dfx
            # rtsafe's rule: Newton only inside the bracket and when it at least halves the step
            use_newton = torch.isfinite(newton) & (newton > lo) & (newton < hi) & (
                (2 * r).abs() <= (dx_old * dfx).abs()
            )
            x_new = torch.where(use_newton, newton, 0.5 * (lo + hi))
            dx_old = torch.where(converged, dx_old, (x_new - x).abs())
            x = torch.where(converged, x, x_new)
        if residual.numel():
            unconverged = torch.where(converged, torch.zeros_like(residual), residual).max()
            max_res, max_bound, all_converged = torch.stack(
                [unconverged, bound.max().to(residual.dtype), converged.all().to(residual.dtype)]).tolist()
        else:
            max_res, max_bound, all_converged = 0.0, 0.0, 1.0
        info = _report("monotone_root", bool(all_converged), max_res, it, tol, on_fail, error_bound=max_bound)
        info.detail["at_last_evaluation"] = evaluated
    return (x, info) if return_info else x


def _anderson_step(X, F, k, m, lam):
    """One Anderson (type II) mixing step over the last min(k, m) iterates; X, F: (B, m, n)."""
    n = min(k, m)
    G = F[:, :n] - X[:, :n]  # residuals, (B, n, d)
    H = torch.bmm(G, G.transpose(1, 2))
    scale = H.diagonal(dim1=1, dim2=2).mean(-1, keepdim=True).unsqueeze(-1)
    tiny = torch.finfo(G.dtype).tiny
    lam = max(lam, 10 * torch.finfo(G.dtype).eps)  # below eps the regularisation is lost in rounding
    H = H + (lam * scale + tiny) * torch.eye(n, dtype=G.dtype, device=G.device)
    ones = torch.ones(G.shape[0], n, 1, dtype=G.dtype, device=G.device)
    w, info = torch.linalg.solve_ex(H, ones)
    alpha = w / w.sum(1, keepdim=True)  # (B, n, 1)
    bad = (info != 0) | ~torch.isfinite(alpha).all(1).squeeze(-1)
    # a singular system (e.g. a sample whose residuals are all exactly zero, common in float32):
    # keep that sample's latest iterate instead of failing the whole batch (no host sync)
    last = torch.zeros_like(alpha)
    last[:, (k - 1) % m] = 1
    alpha = torch.where(bad[:, None, None], last, alpha)
    return (alpha * F[:, :n]).sum(1)


def fixed_point(g, x0, *, event_dims=1, atol=None, rtol=None, max_iter=500, lipschitz=None,
                accelerate=None, memory=5, on_fail="warn", return_info=False, check_every=CHECK_EVERY):
    """Iterate ``x <- g(x)`` to a fixed point, per sample, without a loop over the batch.

    Arguments:
        g: the map, acting on tensors shaped like ``x0``; sample ``b`` of the output may depend only
            on sample ``b`` of the input (the last ``event_dims`` dimensions form a sample).
        x0: the starting point.
        event_dims: how many trailing dimensions form one sample (1 for vectors).
        atol, rtol: per sample, stop when the error bound ``c * ||x_{k+1} - x_k||_2`` is at most
            ``atol + rtol * max|x_{k+1}|``, where ``c = L / (1 - L)`` if ``lipschitz=L`` is given (an
            a-posteriori bound on the 2-norm distance to the true fixed point) and ``c = 1`` otherwise.
        max_iter: iteration cap.
        lipschitz: a bound ``L < 1`` on ``Lip(g)`` in the 2-norm over a sample (float, or a tensor
            of the batch shape for per-sample bounds).
        accelerate: ``None`` or ``"anderson"`` (Anderson mixing with ``memory`` past iterates). The
            stopping rule is always evaluated on a plain step ``g(x) - x`` and the plain ``g(x)`` is
            returned, so the error bound above holds with acceleration too.
        on_fail: ``"warn"``, ``"raise"`` or ``"ignore"``.
        return_info: also return a :class:`SolverInfo` (residual = the largest ``||g(x) - x||_2``;
            with ``lipschitz``, ``error_bound`` = the largest ``c * ||g(x) - x||_2``).
        check_every: test convergence and finiteness (one host synchronisation) every
            ``check_every`` iterations and at ``max_iter``; iterating a contraction past
            convergence only tightens the bound.

    Returns:
        ``x`` (and ``info``), detached; use :func:`implicit_fixed_point` for gradients.
    """
    _check_on_fail(on_fail)
    refuse_jit_trace("fixed_point")
    check_every = _check_schedule(check_every)
    if accelerate not in (None, "anderson"):
        raise ValueError(f"accelerate must be None or 'anderson', got {accelerate!r}")
    x0 = check_finite(x0.detach(), "fixed_point start")
    tol = default_tolerance(x0.dtype)
    atol = tol if atol is None else atol
    rtol = tol if rtol is None else rtol
    batch_shape = x0.shape[: x0.dim() - event_dims]
    red = tuple(range(x0.dim() - event_dims, x0.dim()))
    if lipschitz is None:
        c = 1.0
    else:
        L = torch.as_tensor(lipschitz, dtype=x0.dtype, device=x0.device).detach()
        if bool((L >= 1).any()):
            raise ValueError(f"fixed_point: lipschitz bound must be < 1 for a contraction, got {L.max().item():.4g}")
        c = L / (1 - L)
        if isinstance(c, torch.Tensor) and c.dim() > len(batch_shape):
            c = c.reshape(c.shape[: len(batch_shape)]) if c.numel() > 1 else c.reshape(())

    def amax(t):
        return t.abs().amax(dim=red) if red else t.abs()

    def norm2(t):  # Lipschitz bounds of our layers are spectral (2-norm) bounds
        return t.pow(2).sum(dim=red).sqrt() if red else t.abs()

    with torch.no_grad():
        x = x0
        it = 0
        done = torch.zeros(batch_shape, dtype=torch.bool, device=x0.device)
        step = torch.full(batch_shape, float("inf"), dtype=x0.dtype, device=x0.device)
        use_anderson = accelerate == "anderson"
        if use_anderson:
            B = max(1, int(torch.Size(batch_shape).numel()))
            d = int(torch.Size(x0.shape[x0.dim() - event_dims:]).numel())
            X = x0.new_zeros(B, memory, d)
            F = x0.new_zeros(B, memory, d)
        for it in range(1, max_iter + 1):
            gx = g(x)
            step = norm2(gx - x)
            done = c * step <= atol + rtol * amax(gx)
            if it % check_every == 0 or it == max_iter:
                # one host synchronisation per scheduled check: convergence and finiteness together
                all_done, finite = torch.stack([done.all(), torch.isfinite(gx).all()]).tolist()
                if not finite:
                    raise SolverError(
                        f"fixed_point: the map returned non-finite values (by iteration {it})")
                if all_done:
                    x = gx
                    break
            if use_anderson:
                k = (it - 1) % memory
                X[:, k] = x.reshape(B, d)
                F[:, k] = gx.reshape(B, d)
                if it >= 2:
                    xa = _anderson_step(X, F, it, memory, 1e-8).reshape(x.shape)
                    # per sample: keep the plain step where the mixed one is not finite (no sync)
                    ok = torch.isfinite(xa).reshape(B, d).all(-1).reshape(batch_shape + (1,) * event_dims)
                    gx = torch.where(ok, xa, gx)
            x = gx
        if step.numel():
            res, all_done = torch.stack([step.max(), done.all().to(step.dtype)]).tolist()
            bound = res * float(c.max()) if isinstance(c, torch.Tensor) else (res if lipschitz is not None else None)
        else:
            res, all_done, bound = 0.0, 1.0, None
        info = _report("fixed_point", bool(all_done), res, it, tol, on_fail,
                       error_bound=bound if lipschitz is not None else None)
    return (x, info) if return_info else x


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity in forward; backward solves ``u = grad + J_g^T u`` at the fixed point.

    Backward needs ``J_g^T u`` at ``z``: from the graph of ``gz = g(z)`` built in forward when it is
    there, otherwise by calling ``g`` again. The graph is absent when the forward was replayed by a
    JIT trace (``torch.jit.trace``, Pyro's ``JitTrace_ELBO``): a trace records ``detach`` but not
    ``requires_grad_``, so in the replay ``gz`` does not depend on ``z``.
    """

    @staticmethod
    def forward(ctx, gz, z, g, solver_kwargs):
        ctx.save_for_backward(gz, z)
        ctx.g = g
        ctx.solver_kwargs = solver_kwargs
        return gz.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        gz, z = ctx.saved_tensors
        kwargs = dict(ctx.solver_kwargs)
        if not (z.requires_grad and gz.requires_grad):
            with torch.enable_grad():
                z = z.detach().requires_grad_(True)
                gz = ctx.g(z)

        def adjoint(u):
            with torch.enable_grad():
                (vjp,) = torch.autograd.grad(gz, z, u, retain_graph=True)
            return grad + vjp

        u = fixed_point(adjoint, grad, **kwargs)
        return u, None, None, None


def implicit_fixed_point(g, x_star, **solver_kwargs):
    """Attach implicit-function gradients to a fixed point ``x_star = g(x_star)``.

    Returns a tensor equal to ``g(x_star)`` (one more contraction step, so at least as accurate) whose
    gradient with respect to everything ``g`` depends on (parameters, inputs) is
    ``(I - J_g)^{-T}``-corrected, computed in backward by a fixed-point solve of the adjoint equation
    with ``solver_kwargs`` (e.g. ``lipschitz=``, ``atol=``). Costs one differentiable call of ``g``
    in forward, and one vector-Jacobian product per adjoint iteration in backward.
    """
    if not torch.is_grad_enabled():
        return g(x_star.detach())
    z = x_star.detach().requires_grad_(True)
    gz = g(z)
    return _ImplicitAdjoint.apply(gz, z, g, solver_kwargs)


def implicit_monotone_root(fn, x_star, target):
    """Attach implicit-function gradients to a root ``fn(x_star) = target`` of an elementwise map.

    ``fn(x) -> (value, derivative)`` must be differentiable in its parameters (and ``target`` may carry
    a graph). Returns ``x_star - (fn(x_star) - target) / fn'(x_star)`` with the derivative detached:
    its value is ``x_star`` plus one Newton correction (of the order of the solver's residual) and its
    first derivatives are exactly ``dx/dtheta = -(df/dtheta) / f'`` and ``dx/dtarget = 1 / f'``.
    """
    x = x_star.detach()
    value, deriv = fn(x)
    return x - (value - target) / deriv.detach()
