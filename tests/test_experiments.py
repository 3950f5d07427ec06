"""The application layer (``pyro_flows.experiments``) and the family example of ``docs/architecture.md``.

The architecture document's example family is executed as written and put through the conformance
functions of ``tests/conformance.py``, so a reader who follows it gets a family that passes the bar.
"""

import os
import re

import pytest
import torch
from pyro.distributions import transforms as T

import pyro_flows
from pyro_flows import registry
from pyro_flows.experiments import measure
from pyro_flows.experiments.models import FlowModel, available_peers, make_guide

from conformance import (
    Case,
    check_bad_input,
    check_cache_follows_updates,
    check_context,
    check_default_device_and_dtype,
    check_exact,
    check_float32,
    check_gradients,
    check_persistence,
    check_shapes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example_source():
    with open(os.path.join(ROOT, "docs", "architecture.md")) as fh:
        text = fh.read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "register_flow(" in b]
    return block


@pytest.fixture(scope="module")
def example_family():
    namespace = {"__name__": "architecture_example"}
    exec(compile(_example_source(), "docs/architecture.md", "exec"), namespace)
    # the example registers itself; it is removed again so other tests see the real families only
    # (pickling needs the classes importable: expose them under the example's module name)
    import sys
    import types

    module = types.ModuleType("architecture_example")
    module.__dict__.update(namespace)
    sys.modules["architecture_example"] = module
    try:
        yield registry.get_flow("elementwise_affine")
    finally:
        registry._REGISTRY.pop("elementwise_affine", None)
        sys.modules.pop("architecture_example", None)


def _cases(spec):
    return [
        Case("elementwise_affine", lambda d: spec.constructor(d)),
        Case("conditional_elementwise_affine", lambda d, c: spec.conditional(d, c), conditional=True),
        Case("flow(elementwise_affine)", lambda d: pyro_flows.flow("elementwise_affine", d, num_layers=2)),
        Case(
            "flow(elementwise_affine, context)",
            lambda d, c: pyro_flows.flow("elementwise_affine", d, num_layers=2, context_dim=c),
            conditional=True,
        ),
    ]


def test_architecture_example_family_passes_conformance(example_family):
    assert "elementwise_affine" in registry.registered_flows()
    for case in _cases(example_family):
        for scale in (0.3, 2.0):
            check_exact(case, scale)
        check_float32(case, 0.3)
        check_shapes(case)
        check_gradients(case)
        check_bad_input(case)
        check_persistence(case)
        check_cache_follows_updates(case)
        check_default_device_and_dtype(case)
        if case.conditional:
            check_context(case)


def test_architecture_example_conformance_catches_a_wrong_log_det(example_family):
    """The same functions fail when the example's log-det is off, so the test above can fail."""
    cls = type(example_family.constructor(2))

    class Wrong(cls):
        def _call_and_ladj(self, x):
            y, ladj = super()._call_and_ladj(x)
            return y, ladj + 1e-3

    with pytest.raises(AssertionError):
        check_exact(Case("wrong", lambda d: Wrong(d)), 0.3)


def test_example_family_trains_in_the_application_layer(example_family):
    from pyro_flows.experiments.trainer import density_loss, train

    m = FlowModel("elementwise_affine", 2, num_layers=1)
    x = 3.0 + 0.5 * torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    res = train(m, density_loss, (x,), steps=60, lr=0.1)
    assert res.stopped_by == "steps" and res.losses[-1] < res.losses[0] - 1.0


@pytest.mark.parametrize("task", ["density", "guide"])
def test_flow_model_direction_follows_the_task(task):
    """Pyro's autoregressive peer is inverted for density estimation (one pass for log_prob)."""
    m = FlowModel("pyro.affine_autoregressive", 3, num_layers=2, hidden_dims=(6, 6), task=task)
    assert m.inverted == (task == "density")
    x = torch.randn(4, 3)
    lp = m.log_prob(x)
    z, lz = m.rsample_and_log_prob(5)
    assert lp.shape == (4,) and z.shape == (5, 3) and lz.shape == (5,)
    # log_prob of the model's own draws agrees with the log-density returned with them
    assert torch.allclose(m.log_prob(z.detach().clone()), lz, atol=1e-4)


def test_flow_model_moves_pyro_permutations_with_its_parameters():
    """Pyro's ``Permute`` keeps its permutation as a plain attribute: ``FlowModel.to`` moves it too (a CUDA
    step with the permutation left on the CPU fails; 'meta' stands in for the GPU here)."""
    m = FlowModel("pyro.affine_autoregressive", 3, num_layers=3, hidden_dims=(6, 6), task="density")
    perms = [p for p in m.flow.parts if isinstance(p, T.Permute)]
    assert len(perms) == 2
    _ = perms[0].inv_permutation  # a cached inverse must not survive the move
    m.to(torch.float64)
    assert all(p.permutation.dtype == torch.long for p in perms)
    m.to("meta")
    assert all(p.permutation.device.type == "meta" and p.inv_permutation.device.type == "meta" for p in perms)
    assert all(q.device.type == "meta" for q in m.parameters())


def test_flow_model_passes_single_pass_only_where_the_family_has_it(monkeypatch):
    seen = {}

    def fake_flow(name, dim, num_layers=4, context_dim=None, **kwargs):
        seen[name] = kwargs
        return pyro_flows.registry.flow(pyro_flows.FLOWS[0], dim, num_layers=1)

    monkeypatch.setattr(pyro_flows, "flow", fake_flow)
    for name in pyro_flows.FLOWS:
        FlowModel(name, 2, task="guide")
        assert ("single_pass" in seen[name]) == registry.get_flow(name).has_single_pass
        if registry.get_flow(name).has_single_pass:
            assert seen[name]["single_pass"] == "sample"


def test_flow_model_conditional_and_unknown_name():
    m = FlowModel(pyro_flows.FLOWS[-1], 2, num_layers=1, context_dim=3)
    c = torch.randn(4, 3)
    assert m.log_prob(torch.randn(4, 2), c).shape == (4,)
    with pytest.raises(ValueError, match="context"):
        m.log_prob(torch.randn(4, 2))
    with pytest.raises(ValueError, match="unknown flow 'nope'"):
        FlowModel("nope", 2)
    with pytest.raises(ValueError, match="unknown guide"):
        make_guide("nope", lambda: None)


def test_sync_counter_sees_host_reads_and_restores_tensor():
    x = torch.arange(3.0)
    orig = torch.Tensor.item
    assert measure.count_syncs(lambda: (x.sum().item(), bool(x[0] == 0), x.tolist())) == 3
    assert measure.count_syncs(lambda: (x * 2).exp()) == 0
    assert torch.Tensor.item is orig


def test_training_step_counts_for_a_peer():
    m = FlowModel("pyro.affine_coupling", 4, num_layers=2, hidden_dims=(8, 8))
    x = torch.randn(32, 4)
    step = measure.TrainingStep(lambda: -m.log_prob(x.clone()).mean(), m.parameters())
    assert measure.count_syncs(step.forward_backward) == 0
    assert measure.count_ops(step.forward_backward) > 10
    assert measure.peak_memory(step.forward_backward) > 0
    times, errors = measure.time_interleaved({"a": step.step, "bad": lambda: 1 / 0}, repeats=2)
    assert times["a"] > 0 and times["bad"] is None and "ZeroDivisionError" in errors["bad"]


@pytest.mark.parametrize("name", ["pyro.affine_autoregressive", "pyro.spline_coupling", "zuko.maf"])
def test_peers_train_on_the_full_batch(name):
    """Full-batch training passes the same tensor every step: no cache may hand back a stale output."""
    from pyro_flows.experiments.trainer import density_loss, train

    if name.startswith("zuko.") and name not in available_peers():
        pytest.skip("zuko not installed")
    m = FlowModel(name, 3, num_layers=2, hidden_dims=(6, 6))
    x = torch.randn(40, 3)
    res = train(m, density_loss, (x,), steps=3, batch_size=None)
    assert res.steps == 3 and res.stopped_by == "steps"
