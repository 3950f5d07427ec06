"""The registry, ``flow()`` stacking, validation helpers, and the conditional distribution wrapper."""

import pickle

import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import transforms as T
from pyro.distributions.conditional import (
    ConditionalComposeTransformModule,
)
from pyro.distributions.conditional import (
    ConditionalTransformedDistribution as PyroCTD,
)
from pyro.distributions.torch_transform import ComposeTransformModule

import pyro_flows
from pyro_flows import registry
from pyro_flows.distributions import ConditionalTransformedDistribution
from pyro_flows.transforms import Permute
from pyro_flows.validation import broadcast_context, check_event


@pytest.fixture
def toy_family():
    """A throwaway family built from Pyro's affine autoregressive layers."""
    name = "_test_affine"
    registry.register_flow(
        name,
        lambda d, **kw: T.affine_autoregressive(d, hidden_dims=[6]),
        lambda d, c, **kw: T.conditional_affine_autoregressive(d, c, hidden_dims=[6]),
    )
    yield name
    registry._REGISTRY.pop(name)


def test_flows_are_in_canonical_order():
    order = [n for n in registry.CANONICAL_ORDER if n in pyro_flows.FLOWS]
    assert list(pyro_flows.FLOWS[: len(order)]) == order
    for name in pyro_flows.FLOWS:
        assert callable(getattr(pyro_flows, name))
        assert callable(getattr(pyro_flows, "conditional_" + name))


def test_flow_stacks_with_permutations(toy_family):
    t = pyro_flows.flow(toy_family, 3, num_layers=3)
    assert isinstance(t, ComposeTransformModule)
    kinds = [type(p).__name__ for p in t.parts]
    assert kinds == ["AffineAutoregressive", "Permute", "AffineAutoregressive", "Permute",
                     "AffineAutoregressive"]
    assert t.parts[1].permutation.tolist() == [2, 1, 0]
    assert len(list(t.parameters())) > 0
    r = pyro_flows.flow(toy_family, 5, num_layers=2, permutation="random")
    assert sorted(r.parts[1].permutation.tolist()) == list(range(5))
    again = pyro_flows.flow(toy_family, 5, num_layers=2, permutation="random")
    assert torch.equal(r.parts[1].permutation, again.parts[1].permutation)  # reproducible
    n = pyro_flows.flow(toy_family, 3, num_layers=2, permutation=None)
    assert len(n.parts) == 2


def test_conditional_flow_stack(toy_family):
    t = pyro_flows.flow(toy_family, 3, num_layers=2, context_dim=4)
    assert isinstance(t, ConditionalComposeTransformModule)
    ct = t.condition(torch.randn(5, 4))
    assert ct(torch.randn(5, 3)).shape == (5, 3)


def test_flow_bad_arguments(toy_family):
    with pytest.raises(ValueError, match="unknown flow family 'nope'"):
        pyro_flows.flow("nope", 3)
    with pytest.raises(ValueError, match="num_layers"):
        pyro_flows.flow(toy_family, 3, num_layers=0)
    with pytest.raises(ValueError, match="input_dim"):
        pyro_flows.flow(toy_family, 2.5)
    with pytest.raises(ValueError, match="permutation"):
        pyro_flows.flow(toy_family, 3, permutation="shuffle")


def test_permute_is_exact_and_follows_dtype():
    p = Permute(torch.tensor([2, 0, 1]))
    x = torch.randn(4, 3)
    y = p(x)
    assert torch.equal(y, x[:, [2, 0, 1]])
    assert torch.equal(p.inv(y.clone()), x)
    assert p.log_abs_det_jacobian(x, y).shape == (4,)
    assert torch.equal(pickle.loads(pickle.dumps(p))(x), y)
    with pytest.raises(ValueError, match="permutation"):
        Permute(torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="expected event size 3"):
        p(torch.randn(4, 2))


def test_check_event_messages():
    with pytest.raises(ValueError, match=r"expected event size 3 .* got 5"):
        check_event(torch.randn(2, 5), 3)
    with pytest.raises(ValueError, match="floating point"):
        check_event(torch.ones(2, 3, dtype=torch.long), 3)
    with pytest.raises(TypeError):
        check_event([1.0, 2.0, 3.0], 3)


def test_broadcast_context():
    x, c = broadcast_context(torch.randn(7, 1, 3), torch.randn(5, 2))
    assert x.shape == (7, 5, 3) and c.shape == (7, 5, 2)
    x, c = broadcast_context(torch.randn(3), torch.randn(5, 2))
    assert x.shape == (5, 3)
    with pytest.raises(ValueError, match="does not broadcast"):
        broadcast_context(torch.randn(4, 3), torch.randn(5, 2))


def test_conditional_distribution_batch_shape_follows_context():
    ct = T.conditional_affine_autoregressive(2, 3, hidden_dims=[6])
    base = dist.Normal(torch.zeros(2), torch.ones(2)).to_event(1)
    ctx = torch.randn(5, 3)
    ours = ConditionalTransformedDistribution(base, [ct]).condition(ctx)
    theirs = PyroCTD(base, [ct]).condition(ctx)
    assert theirs.batch_shape == ()  # Pyro's pitfall
    assert ours.batch_shape == (5,)
    s = ours.sample((4,))
    assert s.shape == (4, 5, 2)
    # one independent base draw per context, not one draw shared by all contexts
    z = ours.base_dist.sample()
    assert z.shape == (5, 2) and not torch.allclose(z[0], z[1])
    assert ours.log_prob(s).shape == (4, 5)


@pytest.fixture
def recording_family():
    """A family with a direction switch that records the keywords each layer was built with."""
    name, seen = "_test_recording", []

    def make(d, single_pass="log_prob", cache_size=1, **kw):
        seen.append(("plain", single_pass, cache_size))
        return T.affine_autoregressive(d, hidden_dims=[6])

    def make_conditional(d, c, single_pass="log_prob", cache_size=1, **kw):
        seen.append(("conditional", single_pass, cache_size))
        return T.conditional_affine_autoregressive(d, c, hidden_dims=[6])

    registry.register_flow(name, make, make_conditional, has_single_pass=True)
    yield name, seen
    registry._REGISTRY.pop(name)


def test_direction_defaults_of_flow_autoflow_and_conditional_flow(recording_family, toy_family):
    import pyro

    from pyro_flows.infer import AutoFlow, ConditionalFlow

    name, seen = recording_family
    pyro_flows.flow(name, 3, num_layers=2)
    assert seen == [("plain", "log_prob", 1)] * 2  # density estimation by default
    seen.clear()
    t = pyro_flows.flow(name, 3, num_layers=2, single_pass="sample", cache_size=0, context_dim=2)
    assert seen == [("conditional", "sample", 0)] * 2
    assert all(p._cache_size == 0 for p in t.transforms if isinstance(p, Permute))
    with pytest.raises(ValueError, match="single_pass"):
        pyro_flows.flow(name, 3, single_pass="fast")
    # a family without the switch never receives it (it costs the same both ways)
    pyro_flows.flow(toy_family, 3, single_pass="sample")
    seen.clear()

    def model():
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    pyro.clear_param_store()
    AutoFlow(model, name, num_layers=1)()
    assert seen == [("plain", "sample", 1)]  # a guide samples and scores its own samples
    seen.clear()
    AutoFlow(model, name, num_layers=1, single_pass="log_prob")()
    assert seen == [("plain", "log_prob", 1)]
    seen.clear()
    ConditionalFlow(3, 2, name, num_layers=1)
    assert seen == [("conditional", "log_prob", 1)]  # conditional density estimation
    pyro.clear_param_store()


def test_cache_sees_replaced_parameters():
    """The cache key reads parameter versions from a list kept between calls: replacing a parameter
    object (as ``pyro.module(..., update_module_params=True)`` does) must still invalidate it."""
    spec = registry.get_flow("quar")
    module = spec.constructor(3, **spec.test_kwargs).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        y = module(x)
        owner, pname = next((m, k) for m in module.modules() for k in m._parameters)
        old = owner._parameters[pname]
        owner._parameters[pname] = torch.nn.Parameter(old.detach() + 0.3)  # same version (0)
        x_new = module.inv(y)  # same tensor: a stale cache would hand back x
        assert (x_new - x).abs().max() > 1e-6, "a replaced parameter did not invalidate the cache"
        sig = module._signature()
        owner.register_parameter("_extra", torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)))
        assert module._signature() != sig, "an added parameter is not tracked"
        sig = module._signature()
        owner._extra.add_(1.0)
        assert module._signature() != sig
    state = pickle.loads(pickle.dumps(module))
    assert "_flow_parameter_slots" not in state.__dict__
