"""PlateauAdam: the stationarity-triggered learning-rate decay of AutoFlow.optimizer()."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.optim.clipped_adam import ClippedAdam

from pyro_flows.infer import AutoFlow, PlateauAdam, PlateauAdamOptimizer, PlateauTest


def _run(grad_fn, steps, optimizer=PlateauAdamOptimizer, **kwargs):
    x = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = optimizer([x], clip_norm=math.inf, **kwargs)
    g = torch.Generator().manual_seed(0)
    lrs, xs = [], []
    for _ in range(steps):
        x.grad = grad_fn(x.detach(), g)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        xs.append(x.detach().clone())
    return torch.stack(xs), opt, lrs


def test_decays_on_a_stationary_trajectory_down_to_the_floor():
    # the gradient of 0.5 |x - 1|^2 plus unit noise: x reaches 1 in ~50 steps at lr 0.05, then only jitters
    def grad(x, g):
        return x - 1 + torch.randn(4, generator=g, dtype=x.dtype)

    xs, opt, lrs = _run(grad, 1000, lr=0.05, window=100, check_every=50, factor=0.5, min_lr_ratio=0.01)
    group = opt.param_groups[0]
    assert group["decays"] >= 3 and lrs[-1] < 0.05 / 4
    assert lrs[-1] >= 0.05 * 0.01 - 1e-15  # never below the floor
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))  # only ever decays
    # the decayed rate shrinks the jitter: the last iterates are much closer to the optimum than at a constant rate
    const, _, _ = _run(grad, 1000, optimizer=ClippedAdam, lr=0.05)
    err, err_const = ((xs[-200:] - 1) ** 2).mean().sqrt(), ((const[-200:] - 1) ** 2).mean().sqrt()
    assert err < 0.4 * err_const, (float(err), float(err_const))


def test_no_decay_while_the_trajectory_drifts():
    # a constant gradient with noise: x travels steadily (ratio near 1), the rate stays
    _, opt, lrs = _run(lambda x, g: -torch.ones_like(x) + 0.3 * torch.randn(4, generator=g, dtype=x.dtype), 1000,
                       lr=0.01, window=100, check_every=50)
    assert opt.param_groups[0]["decays"] == 0 and lrs[-1] == 0.01


def test_mean_statistic_passes_jitter_of_many_coordinates_the_max_does_not():
    """Under pure jitter the largest ratio over thousands of coordinates stays above the threshold; the
    mean concentrates near its jitter level (~0.1), which is why AutoFlow's optimiser uses it for the flow."""
    g = torch.Generator().manual_seed(1)
    tests = {r: PlateauTest(window=100, check_every=100, reduce=r) for r in ("max", "mean")}
    passed = {r: [] for r in tests}
    x = torch.zeros(2000)
    for _ in range(301):
        x = x + torch.randn(2000, generator=g)  # a random walk: increments without a trend
        for r, t in tests.items():
            passed[r].append(t.update(x))
    assert not any(passed["max"]) and tests["max"].statistic > 0.3
    assert any(passed["mean"]) and tests["mean"].statistic < 0.2


def _model():
    pyro.sample("x", dist.Normal(torch.tensor([3.0, -2.0]), torch.tensor([0.5, 2.0])).to_event(1))


def test_state_survives_get_state_and_set_state(tmp_path):
    """Decayed rates, moments and the tests' windows travel with Pyro's get_state / set_state (and torch.save)."""
    kwargs = {"window": 40, "check_every": 20}
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoMultivariateNormal(_model)
    optim = AutoFlow.optimizer(**kwargs)
    svi = SVI(_model, guide, optim, Trace_ELBO())
    for _ in range(300):
        svi.step()
    lrs = {pyro.get_param_store().param_name(p): o.param_groups[0]["lr"] for p, o in optim.optim_objs.items()}
    assert min(lrs.values()) < 0.02, lrs  # something decayed
    saved = optim.get_state()
    torch.save(saved, tmp_path / "optim.pt")
    pyro.get_param_store().save(tmp_path / "params.pt")

    optim2 = AutoFlow.optimizer(**kwargs)
    optim2.set_state(torch.load(tmp_path / "optim.pt", weights_only=False))
    pyro.get_param_store().load(tmp_path / "params.pt")
    guide2 = AutoMultivariateNormal(_model)  # a new session's guide takes the stored tensors
    SVI(_model, guide2, optim2, Trace_ELBO()).step()
    assert len(optim2.optim_objs) == 3
    for p, o in optim2.optim_objs.items():
        name = pyro.get_param_store().param_name(p)
        group, before = o.param_groups[0], saved[name]
        assert lrs[name] / 2 <= group["lr"] <= lrs[name]  # the decayed rate, not the initial one
        assert group["decays"] >= before["param_groups"][0]["decays"]
        assert o.state[p]["step"] == before["state"][0]["step"] + 1  # Adam's moments came back
        if group["lr"] > group["min_lr"] and group["decays"] == before["param_groups"][0]["decays"]:
            # the test's window came back and went on (not a fresh window)
            assert o._tests[0].count == before["plateau_tests"][0]["count"] + 1


def test_pyro_optimiser_bad_arguments():
    x = torch.nn.Parameter(torch.zeros(2))
    for bad in ({"factor": 1.0}, {"min_lr_ratio": 0.0}, {"reduce": "median"}, {"window": 0}):
        with pytest.raises(ValueError):
            PlateauAdamOptimizer([x], **bad)
    assert isinstance(PlateauAdam({"lr": 0.01}), pyro.optim.PyroOptim)


def test_each_group_has_its_own_test_and_rate():
    """A stationary group decays while a drifting one keeps its rate; a group added later gets the settings."""
    still, moving = (torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2))
    opt = PlateauAdamOptimizer([{"params": [still]}, {"params": [moving], "lr": 0.001}], lr=0.05,
                               clip_norm=math.inf, window=100, check_every=50)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        still.grad = still.detach() + torch.randn(3, generator=g, dtype=still.dtype)
        moving.grad = -torch.ones_like(moving)
        opt.step()
    assert opt.param_groups[0]["decays"] >= 2 and opt.param_groups[1]["lr"] == 0.001
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1})
    assert opt.param_groups[2]["min_lr"] == pytest.approx(0.001) and opt.param_groups[2]["reduce"] == "max"


def _banana():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    pyro.sample("z2", dist.Normal(z1 ** 2 - 1.0, 0.5))


def _wide():
    pyro.sample("z", dist.Normal(torch.zeros(10), 1.0).to_event(1))


def _flow_rates(model, guide, optim):
    """The learning rate Pyro's per-parameter optimisers got after one step, by parameter name."""
    SVI(model, guide, optim, Trace_ELBO()).step()
    store = pyro.get_param_store()
    return {store.param_name(p): o.param_groups[0]["lr"] for p, o in optim.optim_objs.items()}


def test_default_flow_rate_follows_the_width():
    """Without ``flow_lr`` the flow's rate is DEFAULT_FLOW_LR * 64 / width for the width rule's narrow
    conditioners (D = 2: width 20), the reference rate at width 64 (D = 10) and for families outside the rule
    or user widths; an explicit ``flow_lr`` is used as given; a guide rebuilt from a saved store keeps the
    scale (the tensors it reads from the store carry it), and the affine part keeps 0.02 throughout."""
    from pyro_flows.infer.autoguide import DEFAULT_FLOW_LR, DEFAULT_LR, FLOW_LR_WIDTH

    def check(model, expected_scale, optim=None, flow_lr=None, **kwargs):
        guide = AutoFlow(model, warmup=0, laplace=False, **kwargs)
        rates = _flow_rates(model, guide, optim or AutoFlow.optimizer(flow_lr=flow_lr))
        flow = {k: v for k, v in rates.items() if ".transform$$$" in k}
        assert flow and all(k.split("$$$")[0].endswith("transform") for k in flow)
        want = flow_lr if flow_lr is not None else DEFAULT_FLOW_LR * expected_scale
        assert all(v == pytest.approx(want, rel=1e-12) for v in flow.values()), flow
        assert all(v == DEFAULT_LR for k, v in rates.items() if k not in flow)
        assert guide.flow_lr_scale == pytest.approx(expected_scale)
        return guide

    pyro.clear_param_store()
    check(_banana, FLOW_LR_WIDTH / 20)
    pyro.clear_param_store()
    check(_banana, FLOW_LR_WIDTH / 20, flow_lr=0.01)
    pyro.clear_param_store()
    check(_wide, 1.0)
    pyro.clear_param_store()
    check(_banana, 1.0, hidden_dims=[20, 20])
    pyro.clear_param_store()
    check(_banana, 1.0, flow="qlf")
    # save, clear, load: a fresh guide reads its flow from the store and the new optimiser scales it again
    pyro.clear_param_store()
    check(_banana, FLOW_LR_WIDTH / 20)
    state = pyro.get_param_store().get_state()
    pyro.clear_param_store()
    pyro.get_param_store().set_state(state)
    check(_banana, FLOW_LR_WIDTH / 20)
