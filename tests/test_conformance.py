"""The conformance suite of DESIGN.md over every registered family: plain, conditional, and stacked.

A family that registers itself (``pyro_flows.registry.register_flow``) is checked here automatically.
"""

import pytest
import torch

import pyro_flows
from pyro_flows.registry import get_flow

from conformance import (
    Case,
    check_bad_input,
    check_cache_follows_updates,
    check_default_device_and_dtype,
    check_context,
    check_cuda,
    check_exact,
    check_float32,
    check_gradients,
    check_persistence,
    check_shapes,
)


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


@pytest.mark.parametrize("case", CASES, ids=str)
def test_persistence(case):
    check_persistence(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cache_follows_parameter_updates(case):
    check_cache_follows_updates(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_default_device_and_dtype_are_not_used(case):
    check_default_device_and_dtype(case)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda(case):
    check_cuda(case)
