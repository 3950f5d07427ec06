"""Tests of the AUTM family beyond the shared conformance suite (which runs its default integrand).

* every integrand (sigmoid, quadratic, cubic, linear) passes the float64 exactness, gradient and float32
  checks of the conformance harness, plain and conditional, autoregressive and coupling;
* the scalar step map is strictly increasing, finite and has the exact log-derivative for extreme raw
  parameters (+-10, and +-1e4);
* the hand-written backward of the fused elementwise node matches finite differences (``gradcheck``,
  float64, tight tolerances), and the map's values do not depend on the grad mode;
* the discrete map converges to the paper's continuous-time map (a fine RK4 reference) as the number of
  steps grows, at second order, where that map exists;
* the inverse's bracketed solve needs a bounded number of iterations, and its starting point (the
  paper's reversed integration) approaches the exact inverse as the number of steps grows;
* fitting: a 1-D bimodal density and 2-D 8gaussians reach a test NLL within a stated margin of the exact
  entropy (``slow``).
"""

import itertools
import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from conformance import Case, check_exact, check_float32, check_gradients

import pyro_flows
from pyro_flows.datasets import ENTROPY, toy_sample
from pyro_flows.solvers import ConvergenceWarning
from pyro_flows.transforms.autm import (
    INTEGRANDS,
    autm_coefficients,
    autm_map,
    autm_reverse_integration,
    log_slope_bound,
)

CONSTRUCTORS = {
    "autm_autoregressive": (pyro_flows.autm_autoregressive, pyro_flows.conditional_autm_autoregressive),
    "autm_coupling": (pyro_flows.autm_coupling, pyro_flows.conditional_autm_coupling),
}


def _cases(g):
    kw = dict(hidden_dims=[8], num_steps=4, g=g)
    out = []
    for name, (plain, cond) in CONSTRUCTORS.items():
        out.append(Case(f"{name}[{g}]", lambda d, f=plain: f(d, **kw)))
        out.append(Case(f"conditional_{name}[{g}]", lambda d, c, f=cond: f(d, c, **kw), conditional=True))
    return out


ALL_CASES = [c for g in INTEGRANDS for c in _cases(g)]


@pytest.mark.parametrize("case", ALL_CASES, ids=str)
def test_every_integrand_is_exact(case):
    for scale in (0.3, 2.0):
        check_exact(case, scale)
    check_gradients(case)
    check_float32(case, 0.3)


# ----------------------------------------------------------------------------------------------
# the scalar map
# ----------------------------------------------------------------------------------------------
def _raw(a, b, c, g, n=1):
    p = 2 if g == "linear" else 3
    vals = [a, b, c][:p]
    return torch.tensor(vals, dtype=torch.float64).reshape(p, 1).expand(p, n)


@pytest.mark.parametrize("g", INTEGRANDS)
@pytest.mark.parametrize("num_steps", [1, 4, 16])
def test_monotone_for_extreme_raw_parameters(g, num_steps):
    x = torch.linspace(-60, 60, 4001, dtype=torch.float64)
    for a, b, c in itertools.product([-10.0, 0.0, 10.0], repeat=3):
        for mult in (1.0, 1e3):  # +-10 and +-1e4
            coeffs = autm_coefficients(_raw(a * mult, b * mult, c * mult, g), g, num_steps)
            xs = x.clone().requires_grad_(True)
            y, logd = autm_map(xs, *coeffs, g, num_steps)
            assert torch.isfinite(y).all() and torch.isfinite(logd).all()
            assert (y[1:] > y[:-1]).all(), f"not increasing for g={g}, raw=({a}, {b}, {c})x{mult}"
            # the log-derivative is the derivative of the computed map
            (dy,) = torch.autograd.grad(y.sum(), xs)
            assert torch.allclose(dy.log(), logd, atol=1e-9, rtol=1e-9)
            # and stays inside the documented bound, which does not grow with num_steps
            bound = log_slope_bound(num_steps, 5.0, 2.0, g)
            assert bound <= 5.0 + 1.97 * 2.0
            assert logd.abs().max() <= bound + 1e-9
            # onto: the slope stays >= exp(-bound) out to +-1e12 (mean value theorem), so q -> +-inf
            far = torch.tensor([-1e12, 1e12], dtype=torch.float64)
            y_far, _ = autm_map(far, *[None if t is None else t[..., :1] for t in coeffs], g, num_steps)
            assert torch.isfinite(y_far).all() and y_far[0] < y.min() and y_far[1] > y.max()
            assert (y_far[1] - y_far[0]) >= 2e12 * math.exp(-bound) * (1 - 1e-9)


def _rk4(f, x, n):
    """Classical RK4 on [0, 1] with n steps, for the state (v, log q')."""
    h = 1.0 / n
    s = x
    for _ in range(n):
        k1 = f(s)
        k2 = f(tuple(si + 0.5 * h * ki for si, ki in zip(s, k1)))
        k3 = f(tuple(si + 0.5 * h * ki for si, ki in zip(s, k2)))
        k4 = f(tuple(si + h * ki for si, ki in zip(s, k3)))
        s = tuple(si + h / 6 * (a + 2 * b + 2 * c + d) for si, a, b, c, d in zip(s, k1, k2, k3, k4))
    return s


# M = sup |n'| of the tamed nonlinearities (tail_bound R = 3)
SLOPE = {"sigmoid": 0.25, "quadratic": 6.0, "cubic": 27.0}

# the paper's integrands g(v) = a v + b + c n(v) and dg/dv
PAPER = {
    "sigmoid": (torch.sigmoid, lambda v: torch.sigmoid(v) * (1 - torch.sigmoid(v))),
    "quadratic": (lambda v: v ** 2, lambda v: 2 * v),
    "cubic": (lambda v: v ** 3, lambda v: 3 * v ** 2),
}


@pytest.mark.parametrize("g", ["sigmoid", "quadratic", "cubic"])
def test_converges_to_the_continuous_map(g):
    # coefficients and inputs for which the paper's ODE has a solution on [0, 1] that stays in |v| <= R
    a, b, c = 0.4, -0.3, {"sigmoid": 2.0, "quadratic": 0.3, "cubic": -0.1}[g]
    x = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64)
    n, dn = PAPER[g]
    alpha = 5.0 * math.tanh(a / 5.0)  # the layer's reparameterisation of a

    def rhs(s):
        v, _ = s
        return alpha * v + b + c * n(v), alpha + c * dn(v)

    v_ref, logd_ref = _rk4(rhs, (x, torch.zeros_like(x)), 4000)
    if g != "sigmoid":  # the final point bounds the path here: it stays in the untamed region |v| <= R
        assert v_ref.abs().max() < 3.0
    errors = []
    for k in (8, 16, 32, 64, 128):
        # the layer's raw c is the paper's c in units of 1 / M (M = sup |n'|)
        # a nonlinear budget B large enough that c_max = min(B, K/2) = K/2 (the clamp fades as K grows)
        coeffs = autm_coefficients(_raw(a, b, c * SLOPE[g], g), g, k, nonlinear_bound=1e3)
        y, logd = autm_map(x, *coeffs, g, k)
        errors.append(max((y - v_ref).abs().max().item(), (logd - logd_ref).abs().max().item()))
    assert errors[-1] < 1e-3, errors
    # second order (Strang splitting) once the clamp on c is inactive: halving h quarters the error
    for e_coarse, e_fine in zip(errors[1:-1], errors[2:]):
        assert e_fine < e_coarse / 3.0, errors


def test_blow_up_is_tamed():
    # v' = v^2 from v(0) = x > 1 blows up before t = 1 (at t = 1/x); the layer stays finite and
    # increasing, and converges to the tamed ODE (tangent-line tails beyond R) as the steps grow
    g, R, c = "quadratic", 3.0, 1.0
    x = torch.linspace(1.0, 3.0, 16, dtype=torch.float64)

    def n_tamed(v):
        vc = v.clamp(-R, R)
        return vc * vc + 2 * vc * (v - vc)

    v_ref, _ = _rk4(lambda s: (c * n_tamed(s[0]), torch.zeros_like(s[0])), (x, torch.zeros_like(x)), 5000)
    errs = []
    for k in (16, 64, 256, 1024):
        coeffs = autm_coefficients(_raw(0.0, 0.0, c * SLOPE[g], g), g, k, nonlinear_bound=1e3)
        y, logd = autm_map(x, *coeffs, g, k)
        assert torch.isfinite(y).all() and (y[1:] > y[:-1]).all() and torch.isfinite(logd).all()
        errs.append(((y - v_ref).abs() / v_ref.abs()).max().item())
    assert all(e1 < e0 / 4 for e0, e1 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3, errs


def test_linear_is_the_exact_affine_map():
    x = torch.randn(50, dtype=torch.float64)
    for a, b in ((0.7, -1.3), (-3.0, 2.0), (1e-9, 0.5)):
        alpha = 5.0 * math.tanh(a / 5.0)
        exact = math.exp(alpha) * x + b * (math.expm1(alpha) / alpha)
        for k in (1, 3, 8):
            coeffs = autm_coefficients(_raw(a, b, 0.0, "linear"), "linear", k)
            y, logd = autm_map(x, *coeffs, "linear", k)
            assert torch.allclose(y, exact, atol=1e-12)
            assert torch.allclose(logd, torch.full_like(x, alpha))


@pytest.mark.parametrize("g", ["sigmoid", "quadratic", "cubic"])
def test_hand_written_backward_is_exact_and_the_map_ignores_the_grad_mode(g):
    # with gradients the map is one autograd node with a closed-form backward (the layer's fused raw ->
    # (y, log q') node, and autm_map's K-step node): its first derivatives against finite differences
    # (gradcheck, float64), with coefficients broadcast against the inputs, large and tail-reaching
    # inputs, K = 1 (no full step) and K = 9 (two log-accumulation blocks); and the values bitwise equal
    # to the no-grad path, so a certificate computed without gradients sees the map that is trained
    from pyro_flows.transforms.autm import _AUTMLayerMap

    torch.manual_seed(0)
    x = (torch.randn(3, 5, dtype=torch.float64) * 3).requires_grad_(True)
    for k, (A, B) in ((1, (3.0, 2.0)), (3, (5.0, 0.5)), (9, (3.0, 2.0))):
        for batch in (3, 1):
            raw = (torch.randn(batch, 3, 5, dtype=torch.float64) * 2).requires_grad_(True)

            def layer(x, raw):
                return _AUTMLayerMap.apply(x, raw, g, k, 3.0, A, B)

            def fused_steps(x, raw):
                return autm_map(x, *autm_coefficients(raw, g, k, 3.0, A, B), g, k, 3.0)

            assert torch.autograd.gradcheck(layer, (x, raw), atol=1e-8, rtol=1e-6)
            assert torch.autograd.gradcheck(fused_steps, (x, raw), atol=1e-8, rtol=1e-6)
            with torch.no_grad():
                reference = fused_steps(x, raw)
            for out in (layer(x, raw), fused_steps(x, raw)):
                assert all(torch.equal(a, b) for a, b in zip(out, reference))


@pytest.mark.parametrize("g", ["sigmoid", "quadratic", "cubic"])
def test_reverse_integration_approaches_the_inverse(g):
    # the paper's explicit inverse (reversed integration) is only an approximate inverse of the discrete
    # map; it converges to it as the steps grow (per step the reversed Heun step is O(h^3) off)
    x = torch.linspace(-2.0, 2.0, 41, dtype=torch.float64)
    c = {"sigmoid": 0.4, "quadratic": 0.2, "cubic": 0.1}[g]
    errs = []
    for k in (8, 32, 128):
        coeffs = autm_coefficients(_raw(0.5, 0.2, c, g), g, k)
        y, _ = autm_map(x, *coeffs, g, k)
        errs.append((autm_reverse_integration(y, *coeffs, g, k) - x).abs().max().item())
    assert errs[1] < errs[0] / 10 and errs[2] < errs[1] / 10, errs


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("g", ["sigmoid", "quadratic", "cubic"])
def test_inverse_iterations_are_bounded(name, g):
    torch.manual_seed(0)
    # single_pass="sample": the inverse is the numerical direction
    t = CONSTRUCTORS[name][0](4, hidden_dims=[16], g=g, num_steps=8, single_pass="sample").double()
    y = 2.0 * torch.randn(200, 4, dtype=torch.float64)
    for scale in (0.0, 0.3, 2.0):
        with torch.no_grad():
            for p in t.parameters():
                p.add_(scale * torch.randn_like(p))
            x = t.inv(y.clone())
        assert (t(x) - y).abs().max() < 1e-9 * (1 + y.abs().max())
        # safeguarded Newton from the reversed integration, inside a guaranteed bracket: a few Newton
        # steps at moderate parameters; at scale 2 a few entries fall back to bisection inside the
        # bracket |q(x0) - y| / min q', which needs at most about 60 halvings to reach 1e-12
        bound = 12 if scale < 1 else 64
        assert 1 <= t.last_solver_info.iterations <= bound, (scale, t.last_solver_info)
        info = t.last_solver_info
        assert info.detail["passes"] <= 4 and info.error_bound < 1e-8 * (1 + x.abs().max())



def test_solve_reuses_its_evaluations_and_searches_when_the_bracket_misses(monkeypatch):
    """The elementwise solve evaluates the map once before iterating (that evaluation sizes the bracket
    and is the solver's first iterate) and returns the evaluation at its result, which the layer's
    log-det and certificate reuse (no further map call). If the root lies outside the bracket (here: a
    slope floor e^4 times too high, so the bracket is e^4 times too narrow; in use only rounding could
    do it), the solve ends at a bracket end, searches a bracket and solves again: the result is the
    root, without a warning."""
    from pyro_flows.transforms import autm

    torch.manual_seed(0)
    t = pyro_flows.autm_coupling(4, hidden_dims=[16], single_pass="sample").double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.5 * torch.randn_like(p))
    y = 2.0 * torch.randn(64, 4, dtype=torch.float64)
    real_map, calls = t._map, []
    monkeypatch.setattr(t, "_map", lambda x, c: calls.append(1) or real_map(x, c))
    with torch.no_grad():
        x = t.inv(y.clone())
    assert len(calls) == t.last_solver_info.iterations >= 2  # the start's evaluation and one per further iterate
    with torch.no_grad():
        coeffs = t._coefficients(t._raw(x[..., :2])[1])
        y2, logd = real_map(x[..., 2:], coeffs)
    assert (y2 - y[..., 2:]).abs().max() < 1e-12 * (1 + y.abs().max())
    assert torch.equal(t.log_abs_det_jacobian(x, y), logd.sum(-1))  # the reused evaluation, bit for bit

    monkeypatch.setattr(t, "_map", lambda x, c: real_map(x, coeffs))  # the true map whatever the floor
    raised = (coeffs[0] + 4.0,) + tuple(coeffs[1:])  # alpha + 4: the floor exp(alpha) ... e^4 too high
    brackets, real_root = [], autm.monotone_root
    monkeypatch.setattr(autm, "monotone_root",
                        lambda *a, **k: brackets.append(k.get("lower") is not None) or real_root(*a, **k))
    t._iterations = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with torch.no_grad():
            u, y3, logd3 = t._solve(y[..., 2:], raised)
    assert brackets == [True, False]  # the bracketed solve, then the search
    assert (real_map(u, coeffs)[0] - y[..., 2:]).abs().max() < 1e-12 * (1 + y.abs().max())
    assert torch.equal(y3, real_map(u, coeffs)[0]) and torch.equal(logd3, real_map(u, coeffs)[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="g must be one of"):
        pyro_flows.autm_autoregressive(3, g="quartic")
    with pytest.raises(ValueError, match="num_steps"):
        pyro_flows.autm_coupling(3, num_steps=0)
    with pytest.raises(ValueError, match="nonlinear_bound"):
        pyro_flows.autm_autoregressive(3, nonlinear_bound=0.0)
    with pytest.raises(ValueError, match="single_pass"):
        pyro_flows.autm_coupling(3, single_pass="fast")
    with pytest.raises(ValueError, match="lipschitz"):
        pyro_flows.autm_coupling(3, lipschitz=-1.0)
    with pytest.raises(ValueError, match="cache_size"):
        pyro_flows.autm_coupling(3, cache_size=2)
    with pytest.raises(ValueError, match="input_dim >= 2"):
        pyro_flows.autm_coupling(1)
    with pytest.raises(ValueError, match="split_dim"):
        pyro_flows.autm_coupling(4, split_dim=4)
    with pytest.raises(ValueError, match="hidden_dims"):
        pyro_flows.autm_autoregressive(5, hidden_dims=[4])


def test_guide_and_density_directions():
    # an SVI guide (rsample + log_prob of own samples) and scoring external data both work
    pyro.clear_param_store()

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    from functools import partial

    from pyro.infer.autoguide import AutoNormalizingFlow

    guide = AutoNormalizingFlow(model, partial(pyro_flows.flow, "autm_coupling", num_layers=2))
    elbo = pyro.infer.Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    assert math.isfinite(svi.step())
    t = pyro_flows.flow("autm_autoregressive", 3, num_layers=2)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), list(t.parts))
    data = torch.randn(7, 3) * 3
    lp = d.log_prob(data)
    assert lp.shape == (7,) and torch.isfinite(lp).all()


# ----------------------------------------------------------------------------------------------
# fitting
# ----------------------------------------------------------------------------------------------
def _fit(d, params, data, steps, lr, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch,), generator=g)
        loss = -d.log_prob(data[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def _bimodal(n, g):
    s = torch.randint(0, 2, (n, 1), generator=g) * 4.0 - 2.0
    return s + 0.5 * torch.randn(n, 1, generator=g)


def _bimodal_entropy():
    grid = torch.linspace(-9, 9, 180001, dtype=torch.float64)
    comp = torch.stack([dist.Normal(m, 0.5).log_prob(grid) for m in (-2.0, 2.0)])
    lp = torch.logsumexp(comp, 0) - math.log(2)
    return -(lp.exp() * lp).sum().item() * (grid[1] - grid[0]).item()


@pytest.mark.slow
def test_fits_1d_bimodal():
    # log_prob through the numerical direction (single_pass="sample": log_prob inverts every layer with
    # the bracketed solver, gradients through the implicit function theorem), D = 1: the MADE reduces to
    # free parameters. The bounded coefficients (slope budget split over the steps) learn more slowly
    # per step than the old unbounded ones: 300 steps at lr 0.1 (150 at 0.03 reach only 1.73)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    train, test = _bimodal(2000, g), _bimodal(5000, g)
    t = pyro_flows.flow("autm_autoregressive", 1, num_layers=3, g="cubic", num_steps=4, single_pass="sample")
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(1), 1.0).to_event(1), list(t.parts))
    _fit(d, t.parameters(), train, steps=300, lr=0.1)
    with torch.no_grad():
        nll = -d.log_prob(test).mean().item()
    # margin 0.1 nats: the seeded run reaches about 0.04 above the entropy (1.4188); the test-set Monte
    # Carlo error of the NLL is about std(log p) / sqrt(5000) ~ 0.01
    entropy = _bimodal_entropy()
    print(f"bimodal test NLL {nll:.4f}, entropy {entropy:.4f}")
    assert nll < entropy + 0.1, (nll, entropy)
    # sampling the trained flow works and its samples are scored consistently
    s = d.sample((500,))
    assert torch.isfinite(s).all() and torch.isfinite(d.log_prob(s)).all()
    assert (s < 0).float().mean().sub(0.5).abs() < 0.1  # both modes are populated


@pytest.mark.slow
def test_fits_8gaussians():
    # data -> noise by the explicit map (single_pass="log_prob", the default), which keeps this test
    # short; the numerical direction is then used for sampling
    torch.manual_seed(0)
    train = toy_sample("8gaussians", 4000, seed=0)
    test = toy_sample("8gaussians", 4000, seed=1)
    t = pyro_flows.flow("autm_autoregressive", 2, num_layers=4, g="cubic", num_steps=4, hidden_dims=[32, 32])
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
    _fit(d, t.parameters(), train, steps=400, lr=0.01)
    with torch.no_grad():
        nll = -d.log_prob(test).mean().item()
    print(f"8gaussians test NLL {nll:.4f}, entropy {ENTROPY['8gaussians']:.4f}")
    # margin 0.4 nats: the seeded run reaches about 0.23 above the entropy 2.8314 in 400 steps (Pyro's
    # affine / spline autoregressive stacks of 6 layers reach 0.36 / 0.43 in 600 steps); the test-set
    # Monte Carlo error is about 0.02; a single Gaussian fit is about 1.4 above
    assert nll < ENTROPY["8gaussians"] + 0.4, nll
    with torch.no_grad():
        s = d.sample((300,))
    assert torch.isfinite(s).all() and s.std(0).min() > 1.5


def test_conditioner_output_is_checked():
    from pyro.nn import AutoRegressiveNN, DenseNN

    from pyro_flows.nn import LipschitzMADE
    from pyro_flows.transforms.autm import AUTMAutoregressive, AUTMCoupling

    with pytest.raises(ValueError, match="output_multiplier=3"):
        AUTMAutoregressive(3, LipschitzMADE(3, [9], output_multiplier=2))
    with pytest.raises(TypeError, match="LipschitzMADE"):  # no Lipschitz bound: no certified inverse
        AUTMAutoregressive(3, AutoRegressiveNN(3, [9], param_dims=[3]))
    bad_dense = AUTMCoupling(4, 2, DenseNN(2, [8], param_dims=[4]))
    with pytest.raises(ValueError, match="param_dims"):
        bad_dense(torch.randn(2, 4))


# ----------------------------------------------------------------------------------------------
# never silently wrong
# ----------------------------------------------------------------------------------------------
def _explicit_log_slopes(t, u):
    """Per-coordinate log q' of the explicit map of layer ``t`` at ``u``."""
    if hasattr(t, "arn"):
        raw = t.arn(u)
        return t._map(u, t._coefficients(raw))[1]
    _, raw = t._raw(u[..., : t.split_dim])
    return t._map(u[..., t.split_dim:], t._coefficients(raw))[1]


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_log_slope_bound_holds_for_huge_parameters(name):
    # |log q'| <= log_slope_bound for any parameter values, and the bound does not grow with num_steps
    torch.manual_seed(0)
    bounds = []
    for num_steps in (1, 8, 64):
        reached = 0.0
        for _ in range(2):  # two draws: one can leave the nonlinear term's signs against alpha's
            t = CONSTRUCTORS[name][0](5, num_steps=num_steps).double()
            with torch.no_grad():
                for p in t.parameters():
                    p.add_(100.0 * torch.randn_like(p))
                u = 50.0 * torch.randn(256, 5, dtype=torch.float64)
                logd = _explicit_log_slopes(t, u)
            bound = log_slope_bound(num_steps, t.log_scale_bound, t.nonlinear_bound, t.g)
            assert logd.abs().max() <= bound + 1e-9, (num_steps, logd.abs().max(), bound)
            reached = max(reached, float(logd.abs().max()))
        assert reached > 0.5 * bound  # the perturbation reaches the bound: the check bites
        bounds.append(bound)
    # the guarantee A + 1.97 B holds for every num_steps (the bound peaks at K = 2B, then falls to A + B)
    assert max(bounds) <= t.log_scale_bound + 1.97 * 2.0 and bounds[2] < bounds[1]


def _round_trip(name, D, s, conditional, **kw):
    torch.manual_seed(0)
    f = pyro_flows.flow(name, D, num_layers=4, context_dim=3 if conditional else None, cache_size=0, **kw)
    f = f.double()
    with torch.no_grad():
        for p in f.parameters():
            p += s * torch.randn_like(p)
    t = f.condition(torch.randn(3, dtype=torch.float64)) if conditional else f
    x = 1.5 * torch.randn(128, D, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            x_rec = t.inv(t(x).clone())
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return (x_rec - x).abs().max().item(), warned


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("D", [5, 8, 16])
def test_default_flows_reconstruct_under_large_perturbations(name, D, conditional):
    # default sizes, 4 layers, every parameter moved by s N(0, 1): at s = 2 the round trip (numerical
    # direction, then explicit) reconstructs to 1e-6 with no warning
    err, warned = _round_trip(name, D, 2.0, conditional)
    assert err < 1e-6 and not warned, (err, warned)


# At s = 5 every layer's numerical result is certified in its own variable, but the round trip through
# 4 layers can lose more (1.5e-6 to 1.2e-4 here) when the layers' Jacobians amplify each other's
# rounding; the stack returned by flow() checks its round trip and warns then (pyro_flows.stacking).
@pytest.mark.slow
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("D", [5, 8, 16])
def test_default_flows_reconstruct_or_warn_at_s5(name, D, conditional):
    err, warned = _round_trip(name, D, 5.0, conditional)
    assert err < 1e-6 or warned, err


def test_float32_large_inputs_warn_or_reconstruct():
    # float32 at |x| ~ 1e3: the certified bound of the numerical direction flags an inaccurate result
    torch.manual_seed(0)
    t = pyro_flows.flow("autm_autoregressive", 8, num_layers=4)
    with torch.no_grad():
        for p in t.parameters():
            p += 0.5 * torch.randn_like(p)
    x = 1e3 * torch.randn(256, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            x_rec = t.inv(t(x).clone())
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    err = ((x_rec - x).abs() / (1 + x.abs())).max().item()
    assert err < 1e-3 or warned, err


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_cache_size_is_accepted_everywhere(name):
    plain, cond = CONSTRUCTORS[name]
    for t in (plain(3, cache_size=0), pyro_flows.flow(name, 3, num_layers=2, cache_size=0)):
        x = torch.randn(4, 3)
        y = t(x)
        assert torch.allclose(t.inv(y), x, atol=1e-4)
    c = cond(3, 2, cache_size=0).condition(torch.randn(2))
    assert c._cache_size == 0
    pyro_flows.flow(name, 3, num_layers=2, context_dim=2, cache_size=0).condition(torch.randn(2))


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
def test_single_pass_puts_the_explicit_map_on_the_chosen_direction(name):
    # count conditioner passes: the explicit direction evaluates the conditioner once
    plain, cond = CONSTRUCTORS[name]
    calls = []
    for single_pass in ("log_prob", "sample"):
        m_plain = plain(4, single_pass=single_pass, cache_size=0)
        m_cond = cond(4, 2, single_pass=single_pass, cache_size=0)
        for t, module in ((m_plain, m_plain), (m_cond.condition(torch.randn(2)), m_cond)):
            net = module.arn if hasattr(module, "arn") else module.nn
            calls.clear()
            hook = net.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
            x = torch.randn(6, 4)
            y = t(x)
            n_call = len(calls)
            calls.clear()
            x_rec = t.inv(y.clone())
            n_inv = len(calls)
            hook.remove()
            assert torch.allclose(x_rec, x, atol=1e-4)
            explicit, numerical = (n_inv, n_call) if single_pass == "log_prob" else (n_call, n_inv)
            assert explicit == 1, (single_pass, n_call, n_inv)
            # the numerical direction: one conditioner pass (coupling), or Gauss-Jacobi passes that
            # reuse the conditioner's weights without calling the module (autoregressive)
            assert numerical <= 1, (single_pass, n_call, n_inv)


def test_log_prob_of_external_data_is_one_explicit_pass_with_exact_gradients():
    # single_pass="log_prob": TransformedDistribution.log_prob runs the explicit map; its gradient is
    # that of the exact density (compare with the numerical direction's log-det at the same pair)
    torch.manual_seed(0)
    t = pyro_flows.autm_autoregressive(3, hidden_dims=[12], num_steps=4).double()
    data = torch.randn(5, 3, dtype=torch.float64)
    x, ladj = t.inverse_and_ladj(data)
    y_back, ladj_back = t.call_and_ladj(x.detach().clone())
    assert torch.allclose(y_back, data, atol=1e-10) and torch.allclose(ladj, ladj_back, atol=1e-10)


@pytest.mark.parametrize("name", list(CONSTRUCTORS))
@pytest.mark.parametrize("single_pass", ["log_prob", "sample"])
def test_explicit_direction_has_no_host_sync_and_compiles(name, single_pass, monkeypatch):
    torch.manual_seed(0)
    t = CONSTRUCTORS[name][0](4, hidden_dims=[8], single_pass=single_pass, cache_size=0)
    fn = t._inverse_and_ladj if single_pass == "log_prob" else t._call_and_ladj
    x = torch.randn(16, 4)
    syncs = []
    item, as_bool = torch.Tensor.item, torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "item", lambda self: syncs.append(1) or item(self))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: syncs.append(1) or as_bool(self))
    out, ladj = fn(x)
    (out.sum() + ladj.sum()).backward()
    monkeypatch.undo()
    assert not syncs, f"{len(syncs)} host syncs in the explicit direction"
    compiled = torch.compile(fn, fullgraph=True, backend="eager")(x)
    assert torch.allclose(compiled[0], out) and torch.allclose(compiled[1], ladj)


@pytest.mark.parametrize("make", [
    lambda **kw: pyro_flows.autm_autoregressive(3, **kw),
    lambda **kw: pyro_flows.autm_coupling(3, **kw),
    lambda **kw: pyro_flows.conditional_autm_autoregressive(3, 2, **kw),
    lambda **kw: pyro_flows.conditional_autm_coupling(3, 2, **kw),
])
def test_bound_option_reaches_every_conditioner_layer(make):
    """``bound`` (as QuAR's) sets how every conditioner layer bounds its spectral norm; a bad value is a
    clear error. (Conformance of ``bound="power"``: tests/test_conformance.py; no host read:
    tests/test_gpu_ready.py.)"""
    t = make(bound="power")
    net = getattr(t, "arn", None) or t.nn
    assert [layer.bound for layer in net.layers] == ["power"] * len(net.layers)
    assert all(layer.bound == "spectral" for layer in (getattr(make(), "arn", None) or make().nn).layers)
    with pytest.raises(ValueError, match="bound must be one of"):
        make(bound="svd")


@pytest.mark.parametrize("single_pass", ["log_prob", "sample"])
def test_numerical_direction_with_fixed_parameters_has_the_exact_input_gradients(single_pass):
    """With the parameters held fixed (frozen, or the path gradient's pass) the numerical direction builds a graph
    in its input only: its Jacobian is the inverse of the explicit map's and its log-det's gradient is exact, in
    float64, at perturbed parameters (checked against torch.autograd.functional.jacobian of the explicit map)."""
    torch.manual_seed(1)
    t = pyro_flows.autm_autoregressive(3, hidden_dims=[12], num_steps=4, single_pass=single_pass,
                                       cache_size=0).double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    t.requires_grad_(False)
    numerical = t.inv if single_pass == "sample" else t
    explicit = t if single_pass == "sample" else t.inv
    v = torch.randn(3, dtype=torch.float64)
    u = numerical(v)
    assert torch.allclose(explicit(u), v, atol=1e-10)
    jac_num = torch.autograd.functional.jacobian(numerical, v)
    jac_exp = torch.autograd.functional.jacobian(explicit, u)
    assert torch.allclose(jac_num @ jac_exp, torch.eye(3, dtype=torch.float64), atol=1e-9)

    # the explicit map's log-det at u, as a function of v: its gradient through u(v) is grad_u ladj . du/dv
    def ladj_explicit(w):
        return torch.linalg.slogdet(torch.autograd.functional.jacobian(explicit, w))[1]

    h = 1e-5  # central differences of the log-det of the autograd Jacobian: error ~h^2, far below the tolerance
    g_u = torch.stack([(ladj_explicit(u + h * e) - ladj_explicit(u - h * e)) / (2 * h)
                       for e in torch.eye(3, dtype=torch.float64)])
    vv = v.clone().requires_grad_(True)
    uu = numerical(vv)
    ladj_num = t.log_abs_det_jacobian(uu, vv) if single_pass == "sample" else t.log_abs_det_jacobian(vv, uu)
    sign = 1.0 if single_pass == "sample" else -1.0  # ladj of the explicit map, u -> v
    (g_v,) = torch.autograd.grad(sign * ladj_num, vv)
    assert torch.allclose(sign * ladj_num.detach(), ladj_explicit(u).detach(), atol=1e-10)
    assert torch.allclose(g_v, g_u @ jac_num, atol=1e-7), (g_v, g_u @ jac_num)


def test_path_gradient_pass_inverse_has_exact_input_gradients_without_a_jacobian(monkeypatch):
    """Inside ``warm_started`` (the path gradient's pass: parameters fixed, the layer's own output as input) the
    autoregressive layer checks the backward error and applies ``J^{-1}`` by Jacobi sweeps of vector-Jacobian
    products in the backward pass: the same first derivatives as the explicit map's inverse Jacobian, in
    float64 at perturbed parameters. A start that is not the layer's own pair is only a start: more passes,
    the same answer."""
    import pyro_flows.transforms.autm as autm
    from pyro_flows.transforms._base import warm_started

    monkeypatch.setattr(autm, "JACOBIAN_FREE_MIN_DRAWS", 1)  # (the default uses it from 512 draws on)
    torch.manual_seed(3)
    D = 5
    t = pyro_flows.autm_autoregressive(D, hidden_dims=[16], num_steps=4, single_pass="sample").double()
    with torch.no_grad():
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    t.requires_grad_(False)
    x = torch.randn(4, D, dtype=torch.float64)
    jac_fwd = torch.stack([torch.autograd.functional.jacobian(lambda a: t._explicit(a)[0], xi) for xi in x])
    y = t(x)
    yy = y.detach().clone().requires_grad_(True)
    with warm_started(t):
        u = t.inv(yy)
    assert t.last_solver_info.detail.get("certified") == "backward error"
    assert torch.allclose(u, x, atol=1e-12)
    rows = [torch.autograd.grad(u[:, k].sum(), yy, retain_graph=True)[0] for k in range(D)]
    jac_inv = torch.stack(rows, 1)  # (batch, D, D): d u_k / d y_j (each sample's u depends on its y only)
    eye = torch.eye(D, dtype=torch.float64).expand(4, D, D)
    assert torch.allclose(jac_inv @ jac_fwd, eye, atol=1e-10), float((jac_inv @ jac_fwd - eye).abs().max())
    assert t.last_solver_info.detail["passes"] == 1
    t(torch.randn(4, D, dtype=torch.float64))  # another pair: a poor start
    with warm_started(t):
        u2 = t.inv(yy)
    assert t.last_solver_info.detail["passes"] > 1 and torch.allclose(u2, x, atol=1e-10)
