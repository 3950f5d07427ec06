"""AutoFlow's path-derivative ("sticking the landing") gradient (``path_gradient="auto"``, the default, or True).

What a user relies on: the ELBO's value is unchanged, its gradient is the usual one minus the score term
(``grad_phi log q_phi(z)`` at fixed ``z``), only the guide's own draw is scored that way, and on the banana the
default family then gets below the KL target on seeds where the usual gradient does not.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_flows.infer import AutoFlow, importance_log_weights
from pyro_flows.infer.path_gradient import PathGradientPosterior
from pyro_flows.transforms._base import warm_started

D = 3


def gauss_model():
    pyro.sample("z", dist.Normal(torch.zeros(D), torch.tensor([1.0, 2.0, 0.5])).to_event(1))


def _guide(flow, seed=0, **kwargs):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    guide = AutoFlow(gauss_model, flow, num_layers=2, warmup=0, init="default", laplace=False,
                     path_gradient=True, **kwargs)
    guide()  # builds the parameters
    with torch.no_grad():  # away from the start, so that every term is non-trivial (the fixed frame stays)
        for name, p in guide.named_parameters():
            if not name.startswith("frame_"):
                p.add_(0.1 * torch.randn_like(p))
    return guide


CASES = [
    ("autm_autoregressive", {}),
    ("autm_coupling", {}),
    ("qlf", {}),
    ("quar", {}),
    ("sinusoidal", {}),
    ("monotone", {}),
    ("autm_autoregressive", {"affine": "base"}),
    ("autm_autoregressive", {"affine_rank": "diag"}),
]


@pytest.mark.parametrize("flow, kwargs", CASES)
def test_value_unchanged_and_gradient_is_total_minus_score(flow, kwargs):
    guide = _guide(flow, **kwargs)
    params = [p for p in guide.parameters() if p.requires_grad]
    post = guide.get_posterior()
    assert isinstance(post, PathGradientPosterior)
    z = post.rsample((5,))
    lq = post.log_prob(z)
    plain = dist.TransformedDistribution(post.base_dist, post.transforms)
    # the value is the usual one, bit for bit
    assert torch.equal(lq, plain.log_prob(z))
    path = torch.autograd.grad(lq.sum(), params, allow_unused=True, retain_graph=True)
    total = torch.autograd.grad(plain.log_prob(z).sum(), params, allow_unused=True, retain_graph=True)
    # the score term: log q at the same (detached) points, differentiated in the parameters only
    fresh = guide.get_posterior()
    score = torch.autograd.grad(fresh.log_prob(z.detach()).sum(), params, allow_unused=True)
    checked = 0
    for p, a, t, s in zip(params, path, total, score):
        a = torch.zeros_like(p) if a is None else a
        want = (torch.zeros_like(p) if t is None else t) - (torch.zeros_like(p) if s is None else s)
        scale = 1 + want.abs().max()
        assert (a - want).abs().max() < 2e-3 * scale, (flow, kwargs, p.shape, float((a - want).abs().max()))
        checked += int(want.abs().max() > 1e-3)
    assert checked >= 2, "the test must see non-zero path gradients"


def test_during_the_warmup_the_guide_is_the_plain_gaussian():
    """While the flow is off the guide is exactly AutoMultivariateNormal, path gradient or not."""
    pyro.clear_param_store()
    guide = AutoFlow(gauss_model, warmup=100, laplace=False, path_gradient=True)
    guide()
    assert not guide.flow_on
    assert isinstance(guide.get_posterior(), dist.MultivariateNormal)


def test_only_the_guides_own_draw_is_scored_that_way():
    guide = _guide("autm_autoregressive")
    params = [p for p in guide.parameters() if p.requires_grad]
    post = guide.get_posterior()
    z = post.rsample((4,))
    plain = dist.TransformedDistribution(post.base_dist, post.transforms)
    # another tensor (data-like values, with or without a graph of their own): the ordinary log_prob
    for requires_grad in (False, True):
        value, twin = (z.detach().clone().requires_grad_(requires_grad) for _ in range(2))
        got = torch.autograd.grad(post.log_prob(value).sum(), params, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad(plain.log_prob(twin).sum(), params, allow_unused=True, retain_graph=True)
        for g, w in zip(got, want):
            assert (g is None) == (w is None) and (g is None or torch.allclose(g, w))
    # the draw after an in-place edit: the ordinary log_prob of the edited values
    z2 = post.rsample((4,))
    with torch.no_grad():
        z2.add_(0.5)
    assert torch.allclose(post.log_prob(z2), plain.log_prob(z2.clone()), atol=1e-5)
    # without gradients the posterior is the ordinary distribution
    with torch.no_grad():
        assert not isinstance(guide.get_posterior(), PathGradientPosterior)


def test_expanded_posterior_keeps_the_path_gradient():
    guide = _guide("autm_autoregressive")
    post = guide.get_posterior().expand([6])
    assert isinstance(post, PathGradientPosterior)
    z = post.rsample()
    assert z.shape == (6, D)
    lq = post.log_prob(z)
    assert lq.shape == (6,) and torch.isfinite(lq).all()


def test_warm_started_inverse_ends_after_one_pass_and_agrees():
    """The warm start (the layer's own last input) is only a start: the inverse is the certified one."""
    torch.manual_seed(0)
    guide = _guide("autm_autoregressive")
    layer = guide.transform.parts[0]
    x = torch.randn(64, D)
    with torch.no_grad():
        y = layer(x)
        cold = layer.inv(y.clone())
        cold_passes = layer._passes
        layer(x)  # the pair the warm start reads
        with warm_started(guide.transform):
            warm = layer.inv(y.clone())
        warm_passes = layer._passes
    assert warm_passes == 1 < cold_passes
    assert torch.allclose(warm, cold, atol=1e-5) and torch.allclose(warm, x, atol=1e-4)
    assert not layer.__dict__.get("_warm_started")  # the block cleans up


def test_jit_trace_is_refused_with_an_error_naming_jit():
    from pyro.infer import JitTrace_ELBO

    pyro.clear_param_store()
    guide = AutoFlow(gauss_model, "qlf", warmup=0, path_gradient=True)
    svi = SVI(gauss_model, guide, AutoFlow.optimizer(), JitTrace_ELBO())
    with pytest.raises(RuntimeError, match="JitTrace_ELBO"):
        svi.step()


def test_path_gradient_rejects_non_bool():
    with pytest.raises(ValueError, match="path_gradient"):
        AutoFlow(gauss_model, path_gradient="yes")


def banana_model():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    pyro.sample("z2", dist.Normal(z1 ** 2 - 1.0, 0.5))


@pytest.mark.slow
def test_banana_path_gradient_kl():
    """Seed 5 of benchmarks/results/banana_path_gradient.md: with the usual gradient (``path_gradient=False``)
    the default guide ends at KL 0.123 after 1500 steps (8 vectorised particles), with the path gradient (the
    default under Trace_ELBO) below 0.05 (the KL's Monte Carlo s.e. is ~0.01 nats)."""
    pyro.clear_param_store()
    torch.manual_seed(5)
    guide = AutoFlow(banana_model)  # path_gradient="auto": on under Trace_ELBO
    svi = SVI(banana_model, guide, AutoFlow.optimizer(), Trace_ELBO(num_particles=8, vectorize_particles=True,
                                                                    max_plate_nesting=0))
    losses = [svi.step() for _ in range(1500)]
    assert all(math.isfinite(v) for v in losses)
    torch.manual_seed(1005)
    kl = float(-importance_log_weights(banana_model, guide, num_samples=8000, max_plate_nesting=0).mean())
    assert -0.03 < kl < 0.05, f"path-gradient AutoFlow: KL {kl:.3f} on the banana after 1500 steps"


@pytest.mark.parametrize("path_gradient", [False, True])
@pytest.mark.parametrize("affine_rank", ["full", "diag"])
def test_log_prob_of_a_draw_edited_in_place_is_the_edited_values(path_gradient, affine_rank):
    """The guide's affine part caches its last pair (so that log_prob of a draw reads the flow's output back);
    after ``z.add_(...)`` the cache must not answer for the old values."""
    guide = _guide("autm_autoregressive", affine_rank=affine_rank)
    guide.path_gradient = path_gradient
    post = guide.get_posterior()
    z = post.rsample((4,))
    with torch.no_grad():
        z.add_(0.5)
    fresh = dist.TransformedDistribution(post.base_dist, post.transforms)
    want = guide.get_posterior().log_prob(z.detach().clone())
    assert torch.allclose(post.log_prob(z), want, atol=1e-4)
    del fresh


def test_the_pass_with_fixed_parameters_reads_the_draws_lipschitz_bounds(monkeypatch):
    """The guaranteed bounds (a batched eigh per Gram size) are computed once per step: the pass with detached
    parameters reads the values the draw used, so its map is the draw's map exactly."""
    import pyro_flows.nn.lipschitz as lipschitz

    guide = _guide("autm_autoregressive")
    calls = []
    real = lipschitz._top_eigenpair
    monkeypatch.setattr(lipschitz, "_top_eigenpair", lambda *a, **k: calls.append(1) or real(*a, **k))
    post = guide.get_posterior()
    z = post.rsample((5,))
    drawn = len(calls)
    lq = post.log_prob(z)
    assert drawn > 0 and len(calls) == drawn
    lq.sum().backward()  # and the gradient still flows
    assert all(torch.isfinite(p.grad).all() for p in guide.parameters() if p.grad is not None)


@pytest.mark.parametrize("elbo, used", [
    (lambda: Trace_ELBO(), True),
    (lambda: Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=0), True),
    (lambda: pyro.infer.TraceMeanField_ELBO(), True),
    (lambda: pyro.infer.RenyiELBO(alpha=0.5, num_particles=2), False),  # importance weighted: biased there
    (lambda: pyro.infer.TraceTailAdaptive_ELBO(num_particles=4, vectorize_particles=True), False),
    (lambda: pyro.infer.JitTrace_ELBO(), False),  # no error: the default quietly keeps the usual gradient
])
def test_auto_uses_the_path_gradient_under_the_kl_elbos_only(elbo, used):
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoFlow(gauss_model, num_layers=2, warmup=0, laplace=False)  # path_gradient="auto", the default
    assert guide.path_gradient == "auto"
    calls = []
    frozen = guide._frozen_log_prob
    guide._frozen_log_prob = lambda z: calls.append(1) or frozen(z)
    objective = elbo()
    svi = SVI(gauss_model, guide, AutoFlow.optimizer(), objective)
    for _ in range(2):
        loss = svi.step()
        # (TraceTailAdaptive_ELBO returns no loss value, inf; its gradient is what it computes)
        assert math.isfinite(loss) or isinstance(objective, pyro.infer.TraceTailAdaptive_ELBO)
    assert bool(calls) == used
    assert all(torch.isfinite(p).all() for p in guide.parameters())
    calls.clear()
    guide()  # called outside an ELBO (a hand-written loss): the usual gradient
    assert not calls


def test_gradient_is_total_minus_score_with_the_jacobian_free_inverse(monkeypatch):
    """From JACOBIAN_FREE_MIN_DRAWS draws on the default family's pass applies J^{-1} by the adjoint iteration of
    solvers.implicit_fixed_point instead of forming Jacobians: the same gradient (forced here for 5 draws)."""
    import pyro_flows.transforms.autm as autm

    monkeypatch.setattr(autm, "JACOBIAN_FREE_MIN_DRAWS", 1)
    test_value_unchanged_and_gradient_is_total_minus_score("autm_autoregressive", {})
    test_value_unchanged_and_gradient_is_total_minus_score("autm_autoregressive", {"affine": "base"})
