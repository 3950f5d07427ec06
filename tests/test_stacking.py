"""The stack returned by ``pyro_flows.flow``: a ``ComposeTransformModule`` that certifies the round trip
of its numerical direction (``pyro_flows.stacking``).

* a layer that errs by a chosen multiple of the tolerance: silent below it, a warning above it, in
  float64 and float32, in both directions, plain and conditional; the warning names the error and
  the part where it crossed the tolerance;
* real stacks: AUTM at s = 5 warns, at s = 2 it is silent and reconstructs;
* the single-pass direction, and answers from the parts' caches, run no check (no extra pass, no
  host synchronisation); ``torch.jit.trace`` of the checked direction is refused;
* compatibility: class, ``state_dict`` keys (old saved stacks load), pickling, ``with_cache``,
  ``inv.inv``, ``TransformedDistribution``;
* one batched spectral bound per stack: the same loss and gradients as the layers alone, one
  ``eigh`` per Gram size, recomputed after every kind of parameter update.
"""

import io
import pickle
import warnings

import pyro.distributions as dist
import pytest
import torch
from conformance import contexts, inputs, perturb
from pyro.distributions.conditional import ConditionalComposeTransformModule, ConditionalTransformModule
from pyro.distributions.torch_transform import ComposeTransformModule

import pyro_flows
from pyro_flows.experiments.measure import SyncCounter
from pyro_flows.solvers import ConvergenceWarning, SolverError
from pyro_flows.stacking import (
    ConditionalFlowStack,
    FlowStack,
    iterative_directions,
    round_trip_tolerance,
)
from pyro_flows.transforms._base import FlowTransform, Permute

D = 4


class Doubling(FlowTransform):
    """``y = 2x``. Its numerical direction (``_call`` for ``single_pass="log_prob"``, ``_inverse`` for
    ``"sample"``) errs so that a round trip through it is off by ``ratio`` times the stack tolerance
    (per sample, relative to ``1 + max|x|`` of the stack's input when it is the only layer)."""

    def __init__(self, ratio=0.0, single_pass="log_prob", cache_size=1):
        super().__init__(D, cache_size=cache_size)
        self.ratio, self.single_pass = ratio, single_pass
        self.undone = 0  # calls of the single-pass direction
        self.solved = 0  # calls of the numerical direction

    def _error(self, t, scale):
        return self.ratio * round_trip_tolerance(t.dtype) * (1 + scale.abs().amax(-1, keepdim=True))

    def _call_and_ladj(self, x):
        ladj = x.new_full(x.shape[:-1], D * 0.6931471805599453)
        if self.single_pass == "log_prob":
            self.solved += 1
            return 2 * x + 2 * self._error(x, x), ladj
        self.undone += 1
        return 2 * x, ladj

    def _inverse_and_ladj(self, y):
        ladj = y.new_full(y.shape[:-1], D * 0.6931471805599453)
        if self.single_pass == "sample":
            self.solved += 1
            return y / 2 + self._error(y, y) / 2, ladj
        self.undone += 1
        return y / 2, ladj


class ConditionalDoubling(ConditionalTransformModule):
    """The context (a scalar) is the ratio of :class:`Doubling`."""

    def condition(self, context):
        return Doubling(float(context))


def _run(fn, *args):
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", ConvergenceWarning)
        out = fn(*args)
    return out, [str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("single_pass", ["log_prob", "sample"])
def test_warns_exactly_above_the_tolerance(single_pass, dtype):
    x = inputs((64,), D, dtype=dtype)
    for ratio, loud in ((0.5, False), (2.0, True)):
        layer = Doubling(ratio, single_pass)
        t = FlowStack([layer])
        numerical = t if single_pass == "log_prob" else t.inv
        _, caught = _run(numerical, x)
        assert bool(caught) == loud, (ratio, caught)
        info = t.last_solver_info if single_pass == "log_prob" else t.inv.last_solver_info
        assert info.converged == (not loud)
        assert info.detail["ratio"] == pytest.approx(ratio, rel=1e-3)
        assert layer.undone == 1  # the check: one pass of the single-pass direction
        if loud:
            assert "round trip" in caught[0] and "part 0 (Doubling)" in caught[0], caught[0]
            assert str(dtype) in caught[0]


def test_the_check_leaves_the_layers_records_alone():
    # the log-det of the pair just computed still comes from the layers' records: no second solve
    layers = [Doubling(0.5, "log_prob"), Doubling(0.5, "log_prob")]
    t = FlowStack([layers[0], Permute(torch.arange(D - 1, -1, -1)), layers[1]])
    x = inputs((8,), D)
    y = t(x)
    ladj = t.log_abs_det_jacobian(x, y)
    assert torch.allclose(ladj, torch.full_like(ladj, 2 * D * 0.6931471805599453))
    assert [(la.solved, la.undone) for la in layers] == [(1, 1), (1, 1)]


def test_the_single_pass_direction_is_never_checked():
    layer = Doubling(100.0, "log_prob")
    t = FlowStack([layer, Permute(torch.arange(D - 1, -1, -1)), Doubling(100.0, "log_prob")])
    y = inputs((8,), D)
    _, caught = _run(t.inv, y)  # explicit direction: nothing to check, even for a wrong layer
    assert not caught and layer.undone == 1 and t.inv.last_solver_info is None
    # the same pass makes no host synchronisation beyond a ComposeTransformModule's
    fresh = [Doubling(100.0, "log_prob") for _ in range(2)]
    with SyncCounter() as ours:
        FlowStack(fresh).inv(y.clone())
    with SyncCounter() as plain:
        ComposeTransformModule(fresh).inv(y.clone())
    assert ours.events == plain.events == []


def test_answers_from_the_caches_are_not_checked_again():
    # a guide's step: rsample (single pass), then log_prob of its own sample (the numerical direction,
    # answered from the layers' caches): no check, no synchronisation
    layer = Doubling(100.0, "sample")
    t = FlowStack([layer, Permute(torch.arange(D - 1, -1, -1))])
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0, validate_args=False).to_event(1)
    d = dist.TransformedDistribution(base, [t], validate_args=False)  # support checks sync
    with SyncCounter() as c, warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        z = d.rsample((16,))
        d.log_prob(z)
    assert c.events == [] and t.inv.last_solver_info is None
    # a fresh tensor is computed, hence checked
    _, caught = _run(d.log_prob, z.clone())
    assert caught and not t.inv.last_solver_info.converged


def test_conditional_stack_certifies_its_condition():
    c = ConditionalFlowStack([ConditionalDoubling(), Permute(torch.arange(D - 1, -1, -1))])
    assert isinstance(c, ConditionalComposeTransformModule)
    x = inputs((8,), D)
    for ratio, loud in ((0.5, False), (3.0, True)):
        t = c.condition(torch.tensor(ratio, dtype=torch.float64))
        assert isinstance(t, FlowStack)
        _, caught = _run(t, x)
        assert bool(caught) == loud


def test_non_finite_rows_are_left_to_the_layers_and_empty_batches_pass():
    t = FlowStack([Doubling(0.5, "log_prob")])
    x = inputs((8,), D)
    x[3, 1] = float("nan")
    y, caught = _run(t, x)
    assert not caught and torch.isnan(y[3]).all() and t.last_solver_info.converged
    _, caught = _run(t, x[:0])
    assert not caught


def test_certify_false_and_jit_trace():
    x = inputs((8,), D)
    _, caught = _run(FlowStack([Doubling(100.0, "log_prob")], certify=False), x)
    assert not caught
    t = FlowStack([Doubling(100.0, "sample")])
    assert t.inv.certify is True  # built before the setting changes: follows the stack
    t.certify = False
    _, caught = _run(t.inv, x)
    assert not caught
    t = FlowStack([Doubling(0.5, "log_prob")])

    def numerical(v):
        return t(v)

    with pytest.raises(SolverError, match="torch.jit"):
        torch.jit.trace(numerical, x, check_trace=False)
    with pytest.raises(ValueError, match="round_trip_factor"):
        FlowStack([Doubling()], round_trip_factor=0)


def _logical_tensors(module):
    """The module's parameters as the tensors they were before packing: a packed Lipschitz network
    gives the views ``layers[i].weight``, ``layers[i].bias`` (so the draws below match those of the
    stacks these cases were chosen on; its layers own no parameters)."""
    from pyro_flows.nn.lipschitz import _LipschitzStack

    for m in module.modules():
        if isinstance(m, _LipschitzStack):
            for layer in m.layers:
                yield layer.weight
                yield layer.bias
        else:
            yield from m.parameters(recurse=False)


def _moved_flow(name, input_dim, scale, **kw):
    """``flow(name, input_dim)`` in float64 with every parameter tensor moved by ``scale`` N(0, 1)
    (``conformance.perturb``'s draws, tensor by tensor)."""
    torch.manual_seed(0)
    t = pyro_flows.flow(name, input_dim, **kw).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in _logical_tensors(t):
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return t


def test_autm_stack_warns_at_s5_and_is_silent_at_s2():
    x = inputs((128,), 5)
    t = _moved_flow("autm_autoregressive", 5, 5.0)
    y, caught = _run(t, x)
    assert caught and "part" in caught[0], caught
    info = t.last_solver_info
    assert not info.converged and info.residual > 1e-6 and info.detail["part"] is not None
    # the certificate is the error the user sees: the same magnitude, above the tolerance. (Not to the last
    # digit: both are rounding amplified ~1e11 times by this stack, so a last-bit difference between the
    # stack's batched bound and a lone inverse's, which depends on the CPU's kernels, moves them by a few %)
    err = (t.inv(y.clone()) - x).abs().max().item()
    assert err == pytest.approx(info.residual, rel=0.1) and err > 1e-6
    t = _moved_flow("autm_autoregressive", 5, 2.0)
    y, caught = _run(t, x)
    assert not caught and t.last_solver_info.converged
    assert (t.inv(y.clone()) - x).abs().max() < 1e-6


def test_conditional_autm_stack_warns_at_s5_and_reconstructs_at_s2():
    """At s = 5 the stack warns and misses 1e-6; at s = 2 it reconstructs to 1e-6 (DESIGN bar 8) and
    warns exactly when the error it reports crosses the tolerance. (This stack at s = 2 sits at the
    tolerance: perturbing its parameters by 1e-15 relatively moves its round-trip error between 4.7
    and 8.4 of the 8 units, so whether it warns is rounding, not a property to test.)"""
    x, ctx = inputs((128,), 8), contexts((128,), 3)
    for scale in (5.0, 2.0):
        c = _moved_flow("autm_coupling", 8, scale, context_dim=3)
        t = c.condition(ctx)
        assert isinstance(t, FlowStack)
        y, caught = _run(t, x)
        info = t.last_solver_info
        assert bool(caught) == (not info.converged) == (info.detail["ratio"] > 1), (scale, caught)
        assert bool(caught) or scale == 2.0
        err = (t.inv(y.clone()) - x).abs().max().item()
        assert err == pytest.approx(info.residual, rel=1e-6)
        assert err > 1e-6 if scale == 5.0 else err < 1e-6


def test_which_directions_solve():
    assert iterative_directions(pyro_flows.autm_coupling(3)) == {"call"}
    assert iterative_directions(pyro_flows.sinusoidal(3, single_pass="sample")) == {"inverse"}
    assert iterative_directions(pyro_flows.sinusoidal(3, single_pass="sample").inv) == {"call"}
    assert iterative_directions(Permute(torch.arange(3))) == set()
    for name in ("qlf", "monotone"):  # no direction switch: unknown, the stack runs no round trip
        assert iterative_directions(pyro_flows.flow(name, 3, num_layers=1).parts[0]) is None
        t = pyro_flows.flow(name, 3, num_layers=2, hidden_dims=[8])
        t(torch.randn(4, 3))
        assert t.last_solver_info is None
        # certify="always" maps back whatever it costs (monotone: a second solve)
        t = pyro_flows.flow(name, 3, num_layers=2, hidden_dims=[8], certify="always").double()
        x = inputs((4,), 3)
        _, caught = _run(t, x)
        assert not caught and t.last_solver_info.converged and t.last_solver_info.residual < 1e-10
    with pytest.raises(ValueError, match="certify"):
        pyro_flows.flow("quar", 3, certify=1)


@pytest.mark.parametrize("context_dim", [None, 2])
def test_compatible_with_compose_transform_module(context_dim):
    t = pyro_flows.flow("autm_coupling", 3, num_layers=2, context_dim=context_dim)
    plain_class = ComposeTransformModule if context_dim is None else ConditionalComposeTransformModule
    assert isinstance(t, plain_class)
    # state_dict keys are those of the plain stack, and a plain stack's state loads
    old = plain_class(list(t))  # the ModuleList: every module part, permutations included
    assert list(t.state_dict()) == list(old.state_dict())
    assert list(t.state_dict())[0].startswith("0.")
    t.load_state_dict(old.state_dict())
    # pickling keeps the class and the settings
    t.certify = False
    buf = io.BytesIO()
    pickle.dump(t, buf)
    t2 = pickle.loads(buf.getvalue())
    assert type(t2) is type(t) and t2.certify is False
    if context_dim is None:
        assert t.inv.inv is t
        cached = t.with_cache(1)
        assert isinstance(cached, FlowStack) and cached.certify is False and cached.parts == t.parts
        x = torch.randn(5, 3)
        base = dist.Normal(torch.zeros(3), 1.0).to_event(1)
        d = dist.TransformedDistribution(base, [t])
        assert d.log_prob(x).shape == (5,)
        assert torch.allclose(t.inv(t(x)), x, atol=1e-4)


# -- one batched bound per stack --------------------------------------------------------------------
class _EighCounter:
    def __enter__(self):
        self.calls, self._eigh = [], torch.linalg.eigh
        torch.linalg.eigh = lambda a: self.calls.append(tuple(a.shape)) or self._eigh(a)
        return self

    def __exit__(self, *exc):
        torch.linalg.eigh = self._eigh


def _step(transforms, data, single_pass, context=None):
    """A density step (``log_prob`` of data) or a guide step (``rsample`` + ``log_prob``), float64."""
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), 1.0).to_event(1)
    if context is not None:
        transforms = [t.condition(context) for t in transforms]
    d = dist.TransformedDistribution(base, transforms)
    if single_pass == "log_prob":
        return -d.log_prob(data.clone()).mean()
    torch.manual_seed(3)
    return d.log_prob(d.rsample((data.shape[0],))).mean()


@pytest.mark.parametrize("name", ["quar", "autm_coupling", "autm_autoregressive", "monotone"])
@pytest.mark.parametrize("single_pass", ["log_prob", "sample"])
@pytest.mark.parametrize("conditional", [False, True])
def test_stack_computes_every_layers_bound_in_one_call(name, single_pass, conditional):
    """The stack bounds all its layers' weights in one batched call (one ``eigh`` per Gram size, not
    per layer and size), and that is the bound each layer computes alone: the same loss and gradients
    as the layers applied one by one, and a layer used alone works as before. (Monotone has no direction
    switch: ``single_pass`` only picks which of its two solves the step runs.)"""
    torch.manual_seed(0)
    kw = {"hidden_factors": (2, 2)} if name == "quar" else {"hidden_dims": [8, 8]}
    if name != "monotone":
        kw["single_pass"] = single_pass
    stack = pyro_flows.flow(name, D, num_layers=3, context_dim=2 if conditional else None, **kw).double()
    perturb(stack, 0.3)
    data = 1.5 * torch.randn(32, D, dtype=torch.float64)
    ctx = torch.randn(32, 2, dtype=torch.float64) if conditional else None
    with _EighCounter() as together:
        loss = _step([stack], data, single_pass, ctx)
    (grads,) = [torch.autograd.grad(loss, list(stack.parameters()))]
    parts = list(stack.transforms if conditional else stack.parts)
    with _EighCounter() as alone:
        loss_alone = _step(parts, data, single_pass, ctx)
    grads_alone = torch.autograd.grad(loss_alone, list(stack.parameters()))
    assert len(together.calls) == len({s[1:] for s in together.calls}) < len(alone.calls), together.calls
    assert len(alone.calls) == 3 * len(together.calls)  # (every layer has the same Gram sizes)
    assert sum(s[0] for s in together.calls) == sum(s[0] for s in alone.calls)
    torch.testing.assert_close(loss, loss_alone, rtol=1e-13, atol=0)
    for g, a in zip(grads, grads_alone):
        torch.testing.assert_close(g, a, rtol=1e-11, atol=1e-14)


def test_monotone_stack_bound_follows_in_place_edits():
    """A monotone stack's cached bounds (no-grad calls) are recomputed after an in-place weight edit: its
    map matches a freshly built stack with the same parameters."""
    torch.manual_seed(0)
    stack = pyro_flows.flow("monotone", D, num_layers=2, hidden_dims=[8, 8]).double()
    data = torch.randn(16, D, dtype=torch.float64)
    with torch.no_grad():
        before = stack(data.clone())  # caches the bounds
        weight = stack.parts[0].net.linears[0].weight
        weight.add_(0.5 * torch.randn_like(weight))
    fresh = pyro_flows.flow("monotone", D, num_layers=2, hidden_dims=[8, 8]).double()
    fresh.load_state_dict(stack.state_dict())
    with torch.no_grad():
        after, want = stack(data.clone()), fresh(data.clone())
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, want, rtol=1e-14, atol=1e-14)


def test_stack_bound_follows_parameter_updates():
    """After an optimiser step through ``p.data`` (Pyro's ClippedAdam), ``load_state_dict`` or an
    in-place edit, the stack's bounds (and so its map, with or without gradients) are recomputed:
    they match a freshly built stack with the same parameters."""
    import pyro.optim

    torch.manual_seed(0)
    stack = pyro_flows.flow("quar", D, num_layers=3, hidden_factors=(2, 2)).double()
    data = torch.randn(16, D, dtype=torch.float64)

    def no_grad_value(t):
        with torch.no_grad():
            return t.inv(data.clone())

    before = no_grad_value(stack)  # caches the bounds
    optim = pyro.optim.ClippedAdam({"lr": 0.05})
    loss = _step([stack], data, "log_prob")
    loss.backward()
    params = {n: p for n, p in stack.named_parameters()}
    optim(params.values())  # writes through p.data: no version bump
    fresh = pyro_flows.flow("quar", D, num_layers=3, hidden_factors=(2, 2)).double()
    fresh.load_state_dict(stack.state_dict())
    after = no_grad_value(stack)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, no_grad_value(fresh), rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        stack.parts[0].net.packed.mul_(1.5)
    fresh.load_state_dict(stack.state_dict())
    torch.testing.assert_close(no_grad_value(stack), no_grad_value(fresh), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(_step([stack], data, "log_prob"), _step([fresh], data, "log_prob"),
                               rtol=1e-14, atol=0)


# -- known gaps (strict xfails: a fix turns them red until the mark is removed) ---------------------------
# Found by a user-style audit: float64, default sizes, D = 16, 4 layers, every parameter moved by 5 N(0, 1).
# The promise (README, "Guaranteed bounds"): the inverse reconstructs x to 1e-6 or warns.
@pytest.mark.xfail(strict=True, reason=(
    "qlf: both directions are analytic, so no stack certificate runs; at these parameters the layers amplify "
    "the inverse's rounding to ~2e-5 (outputs near 4e6) with no warning"))
def test_known_gap_qlf_inverse_after_large_moves_is_accurate_or_warns():
    _accurate_or_warns("qlf", seed=1, x_scale=1.0)


@pytest.mark.xfail(strict=True, reason=(
    "quar (single_pass='sample'): the stack's round trip compares t(inv(y)) with y, an error in y; the error "
    "in x is 3e-6, four times the tolerance, with no warning"))
def test_known_gap_quar_stack_certificate_reads_the_error_in_x():
    _accurate_or_warns("quar", seed=5, x_scale=1.5, single_pass="sample")


def _accurate_or_warns(name, seed, x_scale, **kwargs):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # (built in float64: the audit's random stream)
    try:
        torch.manual_seed(seed)
        t = pyro_flows.flow(name, 16, num_layers=4, **kwargs)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(5 * torch.randn_like(p))
        x = x_scale * torch.randn(64, 16)
    finally:
        torch.set_default_dtype(default)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        back = t.inv(t(x).clone())
    warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    assert warned or (back - x).abs().max() < 1e-6, float((back - x).abs().max())
