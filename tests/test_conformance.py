"""The conformance suite of DESIGN.md over every registered family: plain, conditional, and stacked.

A family that registers itself (``pyro_flows.registry.register_flow``) is checked here automatically.
"""

import itertools

import pytest
import torch
from conformance import (
    BOUNDED_DIMS,
    BOUNDED_KINDS,
    BOUNDED_SCALES,
    KNOWN_SILENT,
    KNOWN_SILENT_REASON,
    Case,
    bounded_case_id,
    check_bad_context,
    check_bad_input,
    check_bounded,
    check_cache_follows_grad_mode,
    check_cache_follows_input_edits,
    check_cache_follows_updates,
    check_context,
    check_cuda,
    check_default_device_and_dtype,
    check_exact,
    check_float32,
    check_gradients,
    check_persistence,
    check_shapes,
    contexts,
    inputs,
)

import pyro_flows
from pyro_flows.registry import get_flow


def _cases():
    cases = []
    for name in pyro_flows.FLOWS:
        spec = get_flow(name)
        kw = spec.test_kwargs
        cases += [
            Case(name, lambda d, spec=spec, kw=kw: spec.constructor(d, **kw)),
            Case(f"conditional_{name}", lambda d, c, spec=spec, kw=kw: spec.conditional(d, c, **kw),
                 conditional=True),
            Case(f"flow({name})", lambda d, name=name, kw=kw: pyro_flows.flow(name, d, num_layers=2, **kw)),
            Case(f"flow({name}, context)",
                 lambda d, c, name=name, kw=kw: pyro_flows.flow(name, d, num_layers=2, context_dim=c, **kw),
                 conditional=True),
        ]
    # the other Lipschitz bounds of the families whose default bound is the exact one: the sync-free one (no
    # decomposition) and the Frobenius norm (cheap, loose)
    for name, bound in itertools.product(("quar", "autm_coupling", "autm_autoregressive"), ("power", "frobenius")):
        if name not in pyro_flows.FLOWS:
            continue
        kw = {**get_flow(name).test_kwargs, "bound": bound}
        cases += [
            Case(f"flow({name}, bound={bound})",
                 lambda d, name=name, kw=kw: pyro_flows.flow(name, d, num_layers=2, **kw)),
            Case(f"flow({name}, bound={bound}, context)",
                 lambda d, c, name=name, kw=kw: pyro_flows.flow(name, d, num_layers=2, context_dim=c, **kw),
                 conditional=True),
        ]
    return cases


CASES = _cases()
CONDITIONAL = [c for c in CASES if c.conditional]

if not CASES:  # pragma: no cover - only before any family is registered
    pytestmark = pytest.mark.skip(reason="no flow family registered yet")


@pytest.mark.parametrize("scale", [0.3, 2.0])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float64_exact(case, scale):
    check_exact(case, scale)


@pytest.mark.parametrize("scale", [0.0, 0.3])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_float32(case, scale):
    check_float32(case, scale)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_shapes(case):
    check_shapes(case)


@pytest.mark.parametrize("case", CONDITIONAL, ids=str)
def test_context(case):
    check_context(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients(case):
    check_gradients(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case):
    check_bad_input(case)


@pytest.mark.parametrize("case", CONDITIONAL, ids=str)
def test_bad_context(case):
    check_bad_context(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_persistence(case):
    check_persistence(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cache_follows_parameter_updates(case):
    check_cache_follows_updates(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cache_follows_input_edits(case):
    check_cache_follows_input_edits(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cache_follows_grad_mode(case):
    check_cache_follows_grad_mode(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_default_device_and_dtype_are_not_used(case):
    check_default_device_and_dtype(case)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda(case):
    check_cuda(case)


def _known_gap(values, key, known, reason):
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if key in known else []
    return pytest.param(*values, marks=marks, id=key)


@pytest.mark.parametrize("name, conditional", [
    pytest.param(name, cond, id=("conditional_" if cond else "") + name)
    for name in pyro_flows.FLOWS for cond in (False, True)
])
def test_flow_passes_cache_size_to_every_layer(name, conditional):
    """``flow(name, D, cache_size=0)``: every layer and permutation computes its inverse."""
    kw = get_flow(name).test_kwargs
    module = pyro_flows.flow(name, 3, num_layers=2, context_dim=2 if conditional else None,
                             cache_size=0, **kw).double()
    t = module.condition(contexts((5,))) if conditional else module
    assert [p._cache_size for p in t.parts] == [0] * len(t.parts)
    x = inputs((5,))
    y = t(x)
    with torch.no_grad():
        for p in module.parameters():
            p.data.add_(0.05)  # through .data: invisible to version counters, seen only by a computation
    t = module.condition(contexts((5,))) if conditional else module
    x_new = t.inv(y)
    assert (x_new - x).abs().max() > 1e-8, "the inverse came from a cache despite cache_size=0"
    assert torch.allclose(t(x_new), y, atol=1e-8)


@pytest.mark.parametrize("name, kind, input_dim, scale", [
    _known_gap((name, kind, d, s), bounded_case_id(name, kind, d, s), KNOWN_SILENT, KNOWN_SILENT_REASON)
    for name in pyro_flows.FLOWS for kind in BOUNDED_KINDS for d in BOUNDED_DIMS for s in BOUNDED_SCALES
])
def test_never_silently_wrong_at_default_sizes(name, kind, input_dim, scale):
    """Bar 8: default sizes, parameters moved by s: reconstructs to 1e-6 or warns (s = 2: reconstructs)."""
    check_bounded(name, kind, input_dim, scale)
