"""Tests of the conformance harness itself.

The harness is proven on two of Pyro's own flows (which must pass it) and on deliberately broken
transforms (which must fail it): a log-det off by 1%, and an inverse that is slightly wrong.
"""

import warnings

import pytest
import torch
from conformance import (
    Case,
    check_bad_context,
    check_bounded,
    check_cache_follows_grad_mode,
    check_cache_follows_input_edits,
    check_context,
    check_default_device_and_dtype,
    check_exact,
    check_float32,
    check_gradients,
    check_persistence,
    check_shapes,
)
from pyro.distributions import transforms as T

from pyro_flows import registry
from pyro_flows.solvers import ConvergenceWarning

PYRO_CASES = [
    Case("pyro.affine_autoregressive", lambda d: T.affine_autoregressive(d, hidden_dims=[8, 8]),
         validates=False),
    Case("pyro.spline_coupling", lambda d: T.spline_coupling(d, hidden_dims=[8, 8]), validates=False),
    Case("pyro.conditional_affine_autoregressive",
         lambda d, c: T.conditional_affine_autoregressive(d, c, hidden_dims=[8, 8]),
         conditional=True, validates=False, broadcasts_context=False),
]


@pytest.mark.parametrize("scale", [0.3, 2.0])
@pytest.mark.parametrize("case", PYRO_CASES, ids=str)
def test_pyro_builtins_pass_exactness(case, scale):
    torch.set_default_dtype(torch.float64)  # Pyro's inverses allocate in the default dtype
    check_exact(case, scale)


@pytest.mark.parametrize("case", PYRO_CASES, ids=str)
def test_pyro_builtins_pass_the_rest(case):
    check_float32(case, 0.3)
    torch.set_default_dtype(torch.float64)
    check_shapes(case)
    check_gradients(case)
    check_persistence(case)
    if case.conditional:
        check_context(case)


class WrongLogDet(T.AffineAutoregressive):
    def log_abs_det_jacobian(self, x, y):
        return 1.01 * super().log_abs_det_jacobian(x, y)


class WrongInverse(T.AffineAutoregressive):
    def _inverse(self, y):
        return super()._inverse(y) + 1e-4 * torch.tanh(y)


class WrongGradient(T.AffineAutoregressive):
    """Right values, but the gradient of the output is cut from the parameters."""

    def _call(self, x):
        y = super()._call(x)
        return y.detach() + (x - x.detach())


class DefaultDeviceAllocation(T.AffineAutoregressive):
    """Allocates a tensor without ``device=``/``dtype=``: follows the default device, not the input."""

    def _call(self, x):
        return super()._call(x) + torch.zeros(x.shape[-1])


def _arn(d):
    from pyro.nn import AutoRegressiveNN

    return AutoRegressiveNN(d, [8, 8])


@pytest.mark.parametrize(
    "cls, check, message",
    [
        (WrongLogDet, lambda c: check_exact(c, 0.3), "log_abs_det_jacobian differs"),
        (WrongInverse, lambda c: check_exact(c, 0.3), r"f\.inv\(f\(x\)\)"),
        (WrongGradient, check_gradients, "gradient|derivative"),
        (DefaultDeviceAllocation, check_default_device_and_dtype, "device"),
    ],
    ids=["wrong-logdet", "wrong-inverse", "wrong-gradient", "default-device"],
)
def test_harness_catches_broken_transforms(cls, check, message):
    torch.set_default_dtype(torch.float64)
    case = Case(cls.__name__, lambda d: cls(_arn(d)), validates=False)
    with pytest.raises(AssertionError, match=message):
        check(case)


class WarnedWrongInverse(WrongInverse):
    """Wrong, but says so: a ConvergenceWarning, as a solver that stopped short would give."""

    def _inverse(self, y):
        warnings.warn("stopped short", ConvergenceWarning)
        return super()._inverse(y)


@pytest.fixture
def register():
    names = []

    def add(cls):
        name = f"_harness_{cls.__name__}"
        registry.register_flow(name, lambda d, **kw: cls(_arn(d)), lambda d, c, **kw: None)
        names.append(name)
        return name

    yield add
    for name in names:
        registry._REGISTRY.pop(name)


def test_bounded_check_catches_a_silent_wrong_inverse(register):
    torch.set_default_dtype(torch.float64)
    with pytest.raises(AssertionError, match="silently wrong"):
        check_bounded(register(WrongInverse), "plain", 5, 5.0)


def test_bounded_check_accepts_a_warning_only_above_s_2(register):
    torch.set_default_dtype(torch.float64)
    name = register(WarnedWrongInverse)
    check_bounded(name, "plain", 5, 5.0)
    with pytest.raises(AssertionError, match="must reconstruct at s <= 2"):
        check_bounded(name, "plain", 5, 2.0)


@pytest.mark.parametrize("check, message", [
    (check_cache_follows_input_edits, "in-place edit"),
    (check_cache_follows_grad_mode, "no graph|no_grad"),
])
def test_cache_checks_catch_an_identity_keyed_cache(check, message):
    """Pyro's own cache (``cache_size=1``) is keyed on tensor identity only: the checks must fail it."""
    torch.set_default_dtype(torch.float64)
    case = Case("pyro.affine_autoregressive(cache_size=1)",
                lambda d: T.AffineAutoregressive(_arn(d)), validates=False)
    with pytest.raises(AssertionError, match=message):
        check(case)


def test_bad_context_check_catches_an_unchecked_context():
    torch.set_default_dtype(torch.float64)
    with pytest.raises(AssertionError, match="no ValueError"):
        check_bad_context(PYRO_CASES[2])
