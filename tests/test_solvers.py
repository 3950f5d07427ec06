"""Unit tests of the shared solvers against closed-form inverses and finite differences."""

import math
import warnings

import pytest
import torch

from pyro_flows.solvers import (
    ConvergenceWarning,
    SolverError,
    default_tolerance,
    fixed_point,
    implicit_fixed_point,
    implicit_monotone_root,
    monotone_root,
)

f64 = torch.float64


def sinh_map(x):
    return torch.sinh(x), torch.cosh(x)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e8])
def test_monotone_root_matches_closed_form_float64(scale):
    y = scale * torch.randn(2000, dtype=f64)
    x, info = monotone_root(sinh_map, y, return_info=True)
    assert info.converged
    assert (x - torch.asinh(y)).abs().max() < 1e-10 * max(1.0, math.log1p(scale))
    assert info.iterations < 100


def test_monotone_root_cubic_and_initial_guess():
    y = torch.linspace(-50, 50, 101, dtype=f64)
    fn = lambda x: (x + x ** 3, 1 + 3 * x ** 2)
    x = monotone_root(fn, y)
    assert ((x + x ** 3) - y).abs().max() < 1e-10
    # a good initial guess converges in fewer iterations than a poor one
    _, good = monotone_root(fn, y, init=x + 1e-3, return_info=True)
    _, poor = monotone_root(fn, y, init=torch.zeros_like(y), return_info=True)
    assert good.iterations <= poor.iterations


def test_monotone_root_with_given_bracket_and_flat_regions():
    # softplus-like map with derivative as small as 1e-6 somewhere: bisection safeguard keeps it exact
    def fn(x):
        return 1e-6 * x + torch.nn.functional.softplus(x), 1e-6 + torch.sigmoid(x)

    y = torch.tensor([-1e-5, 1e-3, 0.5, 7.0, 40.0], dtype=f64)
    x = monotone_root(fn, y, lower=torch.full_like(y, -100.0), upper=torch.full_like(y, 100.0))
    assert (fn(x)[0] - y).abs().max() < 1e-12


def test_monotone_root_float32():
    y = torch.randn(500) * 10
    x = monotone_root(sinh_map, y)
    assert x.dtype == torch.float32
    assert (x - torch.asinh(y)).abs().max() < 1e-5


def test_monotone_root_rejects_non_finite_input():
    y = torch.tensor([0.0, float("nan")], dtype=f64)
    with pytest.raises(ValueError, match="non-finite"):
        monotone_root(sinh_map, y)


def test_monotone_root_reports_non_convergence():
    y = torch.tensor([1e6, 3.0], dtype=f64)
    fn = lambda x: (x + x ** 3, 1 + 3 * x ** 2)
    with pytest.warns(ConvergenceWarning, match="residual"):
        monotone_root(fn, y, max_iter=2)
    with pytest.raises(SolverError) as e:
        monotone_root(fn, y, max_iter=2, on_fail="raise")
    assert e.value.residual > 0 and e.value.iterations == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monotone_root(fn, y, max_iter=2, on_fail="ignore")


def test_monotone_root_range_not_covering_target():
    with pytest.raises(SolverError, match="bracket"):
        monotone_root(lambda x: (torch.tanh(x), 1 - torch.tanh(x) ** 2), torch.tensor([2.0], dtype=f64))


def _linear_problem(batch=(7, 3), d=4, lip=0.9, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=f64)
    A = lip * A / torch.linalg.matrix_norm(A, ord=2)
    b = torch.randn(*batch, d, generator=g, dtype=f64)
    exact = torch.linalg.solve(torch.eye(d, dtype=f64) - A, b.unsqueeze(-1)).squeeze(-1)
    return A, b, exact


@pytest.mark.parametrize("accelerate", [None, "anderson"])
def test_fixed_point_linear_contraction(accelerate):
    A, b, exact = _linear_problem()
    x, info = fixed_point(lambda x: x @ A.T + b, torch.zeros_like(b), lipschitz=0.9,
                          accelerate=accelerate, return_info=True)
    assert info.converged
    assert (x - exact).abs().max() < 1e-10


def test_anderson_needs_fewer_iterations():
    A, b, _ = _linear_problem(lip=0.97)
    g = lambda x: x @ A.T + b
    _, plain = fixed_point(g, torch.zeros_like(b), lipschitz=0.97, return_info=True, max_iter=3000)
    _, fast = fixed_point(g, torch.zeros_like(b), lipschitz=0.97, accelerate="anderson",
                          return_info=True, max_iter=3000)
    assert fast.iterations < plain.iterations / 3


def test_fixed_point_error_bound_holds():
    # with the Lipschitz bound the stopping rule bounds the distance to the true fixed point
    A, b, exact = _linear_problem(lip=0.99)
    x = fixed_point(lambda x: x @ A.T + b, torch.zeros_like(b), lipschitz=0.99, atol=1e-8, rtol=0.0,
                    max_iter=10000)
    assert (x - exact).pow(2).sum(-1).sqrt().max() < 1e-8


def test_fixed_point_bad_input_and_reporting():
    A, b, _ = _linear_problem()
    g = lambda x: x @ A.T + b
    with pytest.raises(ValueError, match="non-finite"):
        fixed_point(g, torch.full_like(b, float("nan")))
    with pytest.raises(ValueError, match="lipschitz"):
        fixed_point(g, torch.zeros_like(b), lipschitz=1.0)
    with pytest.raises(SolverError, match="non-finite"):
        fixed_point(lambda x: x * float("nan"), torch.ones_like(b))
    with pytest.warns(ConvergenceWarning, match="residual"):
        fixed_point(g, torch.zeros_like(b), max_iter=3)
    with pytest.raises(SolverError):
        fixed_point(g, torch.zeros_like(b), max_iter=3, on_fail="raise")
    with pytest.raises(ValueError, match="on_fail"):
        fixed_point(g, torch.zeros_like(b), on_fail="maybe")


def test_fixed_point_per_sample_convergence_in_batch():
    # samples with very different contraction rates converge together without a loop over the batch
    rates = torch.tensor([0.1, 0.5, 0.95], dtype=f64)[:, None]
    b = torch.ones(3, 2, dtype=f64)
    x = fixed_point(lambda x: rates * torch.sin(x) + b, torch.zeros_like(b), lipschitz=rates)
    assert (x - (rates * torch.sin(x) + b)).abs().max() < 1e-11


def test_implicit_fixed_point_gradient_linear():
    A, b, exact = _linear_problem(batch=(5,))
    A = A.clone().requires_grad_()
    b = b.clone().requires_grad_()
    g = lambda x: x @ A.T + b
    x = fixed_point(g, torch.zeros_like(b), lipschitz=0.9)
    x = implicit_fixed_point(g, x, lipschitz=0.9)
    w = torch.randn_like(x)
    (x * w).sum().backward()
    eye = torch.eye(4, dtype=f64)
    # d(w.x*)/db = (I - A)^{-T} w ;  d(w.x*)/dA = sum_b u_b x_b^T with u = (I - A)^{-T} w
    u = torch.linalg.solve((eye - A.detach()).T, w.T).T
    assert (b.grad - u).abs().max() < 1e-9
    assert (A.grad - u.T @ exact).abs().max() < 1e-9


def test_implicit_fixed_point_gradient_nonlinear_finite_difference():
    w = torch.tensor(0.8, dtype=f64, requires_grad=True)
    c = torch.randn(6, 3, dtype=f64)

    def solve(wv):
        return fixed_point(lambda x: wv * torch.sin(x) + c, torch.zeros_like(c), lipschitz=0.8)

    g = lambda x: w * torch.sin(x) + c
    x = implicit_fixed_point(g, solve(w.detach()), lipschitz=0.8)
    x.pow(2).sum().backward()
    eps = 1e-6
    fd = (solve(0.8 + eps).pow(2).sum() - solve(0.8 - eps).pow(2).sum()) / (2 * eps)
    assert abs(w.grad.item() - fd.item()) < 1e-6 * max(1, abs(fd.item()))


def test_implicit_fixed_point_without_grad_is_plain_value():
    b = torch.randn(3, 2, dtype=f64)
    g = lambda x: 0.5 * torch.tanh(x) + b
    x = fixed_point(g, torch.zeros_like(b), lipschitz=0.5)
    with torch.no_grad():
        out = implicit_fixed_point(g, x)
    assert not out.requires_grad and (out - x).abs().max() < 1e-11


def test_implicit_monotone_root_gradients_closed_form():
    theta = torch.tensor(1.7, dtype=f64, requires_grad=True)
    y = (5 * torch.randn(10, dtype=f64)).requires_grad_()
    fn = lambda x: (theta * torch.sinh(x), theta * torch.cosh(x))
    x = implicit_monotone_root(fn, monotone_root(fn, y.detach()), y)
    assert (x - torch.asinh(y / theta)).abs().max() < 1e-10
    x.sum().backward()
    r = y.detach() / 1.7
    dx_dy = 1 / (1.7 * torch.sqrt(1 + r ** 2))
    dx_dtheta = (-r / (1.7 * torch.sqrt(1 + r ** 2))).sum()
    assert (y.grad - dx_dy).abs().max() < 1e-10
    assert abs(theta.grad - dx_dtheta) < 1e-10


def test_default_tolerance():
    assert default_tolerance(torch.float64) < 1e-10 < default_tolerance(torch.float32) < 1e-4


def test_implicit_fixed_point_gradient_under_jit_trace():
    """A JIT trace replays forward without ``requires_grad_``; backward must still get J_g^T u."""
    c = torch.randn(6, 3, dtype=f64)
    w0 = torch.tensor(0.8, dtype=f64)
    x_star = fixed_point(lambda x: w0 * torch.sin(x) + c, torch.zeros_like(c), lipschitz=0.8)

    def loss(w):
        return implicit_fixed_point(lambda x: w * torch.sin(x) + c, x_star, lipschitz=0.8).pow(2).sum()

    w = w0.clone().requires_grad_(True)
    (eager,) = torch.autograd.grad(loss(w), w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes about Python values
        traced = torch.jit.trace(loss, (w,), check_trace=False)
    (replayed,) = torch.autograd.grad(traced(w), w)
    assert abs(replayed.item() - eager.item()) < 1e-10


@pytest.mark.parametrize("solver", ["fixed_point", "monotone_root"])
def test_solvers_refuse_to_be_traced(solver):
    """A trace would freeze the iteration count: an error naming JIT, never a frozen loop."""
    y = torch.linspace(-3, 3, 7, dtype=f64)

    def solve(t):
        if solver == "fixed_point":
            return fixed_point(lambda x: 0.5 * torch.tanh(x) + t, torch.zeros_like(t), lipschitz=0.5)
        return monotone_root(lambda x: (x + x ** 3, 1 + 3 * x ** 2), t)

    with pytest.raises(SolverError, match="torch.jit"):
        torch.jit.trace(solve, (y,), check_trace=False)


def _syncs(fn):
    from pyro_flows.experiments.measure import SyncCounter

    with SyncCounter() as counter:
        out = fn()
    return out, len(counter.events)


def test_fixed_point_checks_convergence_on_a_schedule():
    """One host sync per ``check_every`` iterations (plus the final report), the same result."""
    b = torch.randn(64, 3, dtype=f64)
    g = lambda x: 0.9 * torch.tanh(x) + b
    (x1, info1), syncs1 = _syncs(lambda: fixed_point(g, torch.zeros_like(b), lipschitz=0.9,
                                                     check_every=1, return_info=True))
    (x4, info4), syncs4 = _syncs(lambda: fixed_point(g, torch.zeros_like(b), lipschitz=0.9,
                                                     check_every=4, return_info=True))
    assert info1.converged and info4.converged
    assert info1.iterations <= info4.iterations < info1.iterations + 4 and info4.iterations % 4 == 0
    assert syncs1 > 2 * syncs4, (syncs1, syncs4)
    assert syncs4 <= info4.iterations // 4 + 5  # + input checks and the final report
    # the certified error bound holds for both
    exact = fixed_point(g, x4, lipschitz=0.9, atol=1e-15, rtol=0, max_iter=5000, check_every=1)
    for x, info in ((x1, info1), (x4, info4)):
        assert info.error_bound is not None and info.error_bound < 1e-9
        assert (x - exact).norm(dim=-1).max() <= info.error_bound + 1e-14
    with pytest.raises(ValueError, match="check_every"):
        fixed_point(g, b, check_every=0)


def test_fixed_point_non_finite_map_is_caught_on_the_schedule():
    with pytest.raises(SolverError, match="non-finite"):
        fixed_point(lambda x: x * float("nan"), torch.ones(3, dtype=f64), check_every=4)


def test_monotone_root_stops_on_an_x_space_bound_with_min_slope():
    """A flat map (slope 1e-6): a y-space residual of 1e-12 is an x error of 1e-6; with the slope
    floor the solver keeps going until the x error is certified."""
    slope = 1e-6
    fn = lambda x: (slope * x + 0.1 * slope * torch.sin(x), slope * (1 + 0.1 * torch.cos(x)))
    x_true = torch.linspace(-3, 3, 9, dtype=f64)
    y = fn(x_true)[0]
    _, info_y = monotone_root(fn, y, return_info=True, atol=1e-12, rtol=0)
    x, info = monotone_root(fn, y, return_info=True, atol=1e-12, rtol=0, min_slope=0.9 * slope)
    assert info.converged and info.error_bound <= 1e-12
    assert (x - x_true).abs().max() <= 1e-11
    assert info_y.error_bound >= info.error_bound


def test_warning_names_the_bound_reached():
    fn = lambda x: (x + x ** 3, 1 + 3 * x ** 2)
    y = torch.tensor([5.0, 50.0], dtype=f64)
    with pytest.warns(ConvergenceWarning, match="guaranteed x-space error bound"):
        monotone_root(fn, y, max_iter=2, lower=torch.tensor(-100.0, dtype=f64),
                      upper=torch.tensor(100.0, dtype=f64))
    with pytest.warns(ConvergenceWarning, match="guaranteed x-space error bound"):
        fixed_point(lambda x: 0.99 * torch.sin(x) + 1.0, torch.zeros(2, 3, dtype=f64), lipschitz=0.99,
                    max_iter=3)


def test_monotone_root_reuses_a_first_evaluation():
    """``first``: an evaluation at ``init`` the caller already has is the first iterate's, so the solve
    calls ``fn`` once less; entries whose ``init`` is outside the bracket start from the midpoint and
    ignore it. ``detail["at_last_evaluation"]``: the returned ``x`` is where ``fn`` was last evaluated."""
    y = torch.linspace(-20, 20, 41, dtype=f64)
    calls = []

    def fn(x):
        calls.append(x.clone())
        return sinh_map(x)

    init = torch.asinh(y) + 1e-3
    lower, upper = init - 1.0, init + 1.0
    x0, info0 = monotone_root(fn, y, init=init, lower=lower, upper=upper, return_info=True)
    n0 = len(calls)
    calls.clear()
    x1, info1 = monotone_root(fn, y, init=init, lower=lower, upper=upper, return_info=True, first=sinh_map(init))
    assert torch.equal(x0, x1) and info1.iterations == info0.iterations and len(calls) == n0 - 1
    assert info1.detail["at_last_evaluation"] and torch.equal(calls[-1], x1)
    # for y > 0, init lies above the bracket: those entries start from the midpoint, above the root, and
    # must ignore ``first`` there (if used, its value -1e6 would move the lower end past the root)
    root = torch.asinh(y)
    lower2 = torch.where(y > 0, root - 0.5, lower)
    upper2 = torch.where(y > 0, root + 3.0, upper)
    init2 = torch.where(y > 0, upper2 + 1.0, init)
    first = (torch.where(y > 0, torch.full_like(y, -1e6), torch.sinh(init2)), torch.cosh(init2))
    x2 = monotone_root(fn, y, init=init2, lower=lower2, upper=upper2, first=first)
    assert (x2 - root).abs().max() < 1e-10
