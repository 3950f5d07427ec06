"""AutoFlow's Laplace start: exact on a Gaussian posterior, refused where it would hurt, kept by training and
by save/load."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_flows.infer import AutoFlow
from pyro_flows.infer.laplace import laplace_start


def _gaussian_problem():
    """A badly conditioned correlated Gaussian posterior (regression on correlated predictors, two scales)."""
    g = torch.Generator().manual_seed(0)
    n, k = 200, 4
    base = torch.randn(n, 1, generator=g, dtype=torch.float64)
    X = base + 0.05 * torch.randn(n, k, generator=g, dtype=torch.float64)  # nearly collinear columns
    X[:, 0] *= 50.0  # and one on a large scale
    y = X @ torch.tensor([0.02, 1.0, -1.0, 0.5], dtype=torch.float64) + 0.3 * torch.randn(n, generator=g,
                                                                                          dtype=torch.float64)

    def model():
        b = pyro.sample("b", dist.Normal(torch.zeros(k, dtype=torch.float64), 10.0).to_event(1))
        pyro.sample("y", dist.Normal(X @ b, 0.3).to_event(1), obs=y)

    prec = X.T @ X / 0.09 + torch.eye(k, dtype=torch.float64) / 100.0
    cov = torch.linalg.inv(prec)
    mean = cov @ (X.T @ y / 0.09)
    return model, mean, cov


def _funnel():
    def model():
        log_tau = pyro.sample("log_tau", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 3.0))
        pyro.sample("theta", dist.Normal(torch.zeros(5, dtype=torch.float64), log_tau.exp()).to_event(1))

    return model


def _moments(guide):
    with torch.no_grad():
        q = guide.get_posterior()
    return q.mean, q.covariance_matrix


def test_laplace_start_is_the_exact_posterior_of_a_gaussian_model():
    model, mean, cov = _gaussian_problem()
    pyro.clear_param_store()
    guide = AutoFlow(model)
    guide()
    assert guide.laplace_info["accepted"], guide.laplace_info
    assert guide.laplace_info["elbo_laplace"] > guide.laplace_info["elbo_default"]
    m, c = _moments(guide)
    sd = cov.diagonal().sqrt()
    # the mode search stops at L-BFGS's tolerances: far below the posterior's own scales
    assert ((m - mean).abs() / sd).max() < 1e-3
    assert torch.allclose(c, cov, rtol=1e-4, atol=1e-4 * float(cov.abs().max()))


def test_training_in_the_laplace_frame_keeps_the_start():
    """The optimiser's steps are in units of the posterior's scales: 300 steps of ``AutoFlow.optimizer()``
    leave the mean within a fraction of a posterior sd on every coordinate (a step of lr = 0.02 in the model's
    own coordinates would be ~100 sds of the stiffest one)."""
    model, mean, cov = _gaussian_problem()
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoFlow(model, warmup=10**6)
    svi = SVI(model, guide, AutoFlow.optimizer(), Trace_ELBO())
    frame = None
    for _ in range(300):
        svi.step()
        if frame is None:
            frame = (guide.frame_loc.detach().clone(), guide.frame_tril.detach().clone())
    m, _ = _moments(guide)
    assert ((m - mean).abs() / cov.diagonal().sqrt()).max() < 0.5
    # the frame is fixed: no gradient reaches it
    assert torch.equal(guide.frame_loc.detach(), frame[0]) and torch.equal(guide.frame_tril.detach(), frame[1])
    assert guide.loc.abs().max() > 0  # the coordinates relative to it did train


def test_funnel_refuses_the_laplace_start_and_starts_as_before():
    model = _funnel()
    pyro.clear_param_store()
    torch.manual_seed(0)
    with_laplace = AutoFlow(model)
    with_laplace()
    assert not with_laplace.laplace_info["accepted"]
    pyro.clear_param_store()
    torch.manual_seed(0)
    without = AutoFlow(model, laplace=False)
    without()
    assert without.laplace_info is None
    m1, c1 = _moments(with_laplace)
    m0, c0 = _moments(without)
    assert torch.equal(m1, m0) and torch.equal(c1, c0)  # the identity frame changes nothing, bit for bit
    assert torch.allclose(c0, 0.01 * torch.eye(6, dtype=torch.float64))


def test_laplace_does_not_touch_the_global_rng():
    """The ELBO comparison's draws come from a private generator: a seeded run draws the same numbers after
    building its guide as one without the Laplace start."""
    model, _, _ = _gaussian_problem()
    after = []
    for laplace in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(5)
        AutoFlow(model, laplace=laplace)()
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("flow_on", [False, True])
def test_save_and_load_restores_the_frame(tmp_path, flow_on):
    model, _, _ = _gaussian_problem()
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoFlow(model, warmup=0 if flow_on else 10**6)
    svi = SVI(model, guide, AutoFlow.optimizer(), Trace_ELBO())
    for _ in range(20):
        svi.step()
    z = torch.randn(7, 4, dtype=torch.float64)
    with torch.no_grad():
        expected = guide.get_posterior().log_prob(z)
    path = tmp_path / "store.pt"
    pyro.get_param_store().save(path)
    pyro.clear_param_store()
    pyro.get_param_store().load(path)
    again = AutoFlow(model, warmup=0 if flow_on else 10**6)
    again()
    assert again.laplace_info == {"reason": "trained parameters in the param store"}
    with torch.no_grad():
        assert torch.allclose(again.get_posterior().log_prob(z), expected, rtol=1e-12, atol=1e-10)


def test_diagonal_rank_takes_the_mean_field_scales():
    model, mean, cov = _gaussian_problem()
    pyro.clear_param_store()
    guide = AutoFlow(model, affine_rank="diag")
    guide()
    assert guide.laplace_info["accepted"]
    with torch.no_grad():
        q = guide.get_posterior()
    # mean-field KL(q || p) optimum for a Gaussian p with precision H: sd_i = H_ii^(-1/2), mean = p's mean
    prec = torch.linalg.inv(cov)
    assert torch.allclose(q.stddev, prec.diagonal().rsqrt(), rtol=1e-4)
    assert ((q.mean - mean).abs() / cov.diagonal().sqrt()).max() < 1e-3


def test_subsampled_model_skips_laplace():
    data = torch.randn(100, dtype=torch.float64)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with pyro.plate("data", 100, subsample_size=10) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[idx])

    pyro.clear_param_store()
    guide = AutoFlow(model)
    guide()
    assert "subsampled" in guide.laplace_info["reason"]


def test_laplace_start_reports_failures_instead_of_raising():
    def log_joint(z):  # improper: grows without bound, so the search meets infinities
        return (z ** 2).sum() * 1e300

    start = laplace_start(log_joint, torch.zeros(3, dtype=torch.float64), 0.1)
    assert not start.accepted and start.info["reason"]
    assert torch.equal(start.loc, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(start.scale_tril, 0.1 * torch.eye(3, dtype=torch.float64))
    assert math.isinf(start.info["elbo_laplace"])


@pytest.mark.parametrize("bad", ["yes", 0, -3, 1.5])
def test_bad_laplace_argument(bad):
    with pytest.raises(ValueError, match="laplace"):
        AutoFlow(lambda: None, laplace=bad)


def test_laplace_start_under_jit_trace_elbo():
    """The start is computed when the guide builds its parameters, which JitTrace_ELBO does inside its trace:
    the traced steps then train in the frame like eager ones."""
    import warnings

    from pyro.infer import JitTrace_ELBO

    model, mean, cov = _gaussian_problem()
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoFlow(model)
    svi = SVI(model, guide, AutoFlow.optimizer(), JitTrace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [svi.step() for _ in range(30)]
    assert guide.laplace_info["accepted"] and all(math.isfinite(v) for v in losses)
    assert guide.flow_on  # (under a JIT trace the flow runs from the first step)
    with torch.no_grad():
        m = guide.get_posterior().sample((4000,)).mean(0)  # Monte Carlo error ~0.02 sd
    assert ((m - mean).abs() / cov.diagonal().sqrt()).max() < 0.5


def test_scaled_model_keeps_the_laplace_start():
    """``poutine.scale`` (a tempered likelihood) leaves the log joint deterministic: the start applies, and is
    the Laplace approximation of the scaled density (here a Gaussian with half the data's precision)."""
    data = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)

    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 100.0))
        with pyro.poutine.scale(scale=0.5), pyro.plate("data", 4):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=data)

    pyro.clear_param_store()
    guide = AutoFlow(model)
    guide()
    assert guide.laplace_info["accepted"], guide.laplace_info
    m, c = _moments(guide)
    prec = 0.5 * 4 + 1e-4
    assert abs(float(m[0]) - 0.5 * float(data.sum()) / prec) < 1e-4
    assert abs(float(c[0, 0]) - 1 / prec) < 1e-6
