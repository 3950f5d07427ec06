"""The conformance harness of DESIGN.md, as plain functions that raise ``AssertionError``.

``test_conformance.py`` runs these over every registered family (plain, conditional, and stacked with
``pyro_flows.flow``) and over two of Pyro's own flows, and ``test_harness.py`` shows that a transform
with a wrong log-det or a wrong inverse is caught.

A *case* bundles how to build a transform: ``make(input_dim)`` returns a ``TransformModule``, or, for a
conditional case, ``make(input_dim, context_dim)`` returns a ``ConditionalTransformModule``.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.distributions as dist
import torch

from pyro_flows.distributions import ConditionalTransformedDistribution
from pyro_flows.logdet import batch_jacobian as _batch_jacobian

D = 3  # event size used by the suite
C = 2  # context size
B = 5  # batch size

# tolerances of DESIGN.md (float64)
ATOL_INV = 1e-6
ATOL_LOGDET = 1e-6


# ----------------------------------------------------------------------------------------------
# known gaps, each checked with ``xfail(strict=True)`` so that a fix turns the run red until its
# entry is removed here
# ----------------------------------------------------------------------------------------------
#: bar 8 cases (ids as :func:`bounded_case_id` writes them) that are still silently wrong. None: the
#: AUTM stacks at s = 5, where rounding amplified across the layers reaches 1e-6 to 1e-4 although
#: every layer meets its own certificate, now warn through the stack's round-trip certificate
#: (:class:`pyro_flows.stacking.FlowStack`).
KNOWN_SILENT: set = set()
KNOWN_SILENT_REASON = "silently wrong: no certificate covers this case"
#: families with no single-pass direction: both directions are fixed-point solves, which test their
#: convergence on a fixed schedule (a host sync per check), and whose iteration count is data
#: dependent (no ``torch.compile(fullgraph=True)``). The GPU-ready checks are expected to fail for them.
ITERATIVE_BOTH_WAYS: set = {"monotone"}
ITERATIVE_REASON = "no single-pass direction: both directions are fixed-point solves"


@dataclass
class Case:
    name: str
    make: Callable
    conditional: bool = False
    # Pyro's built-ins do not validate input or broadcast a context batch in both directions; the
    # harness self-test switches those checks off for them (our flows get all of them).
    validates: bool = True
    broadcasts_context: bool = True
    min_dim: int = 1
    extra: dict = field(default_factory=dict)

    def __str__(self):
        return self.name


# ----------------------------------------------------------------------------------------------
# building and perturbing
# ----------------------------------------------------------------------------------------------
def build(case: Case, input_dim=D, context_dim=C, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    module = case.make(input_dim, context_dim) if case.conditional else case.make(input_dim)
    return module.to(dtype)


def perturb(module: torch.nn.Module, scale: float, seed: int = 1):
    """Add N(0, scale^2) noise to every parameter (any parameter value must work, not only init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return module


def contexts(batch, context_dim=C, dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch, context_dim, generator=g, dtype=dtype)


def inputs(batch, input_dim=D, dtype=torch.float64, seed=3, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*batch, input_dim, generator=g, dtype=dtype)


def transform_of(case, module, context=None):
    """The ``Transform`` to test: the module itself, or ``module.condition(context)``."""
    if case.conditional:
        return module.condition(context)
    return module


def fresh(t: torch.Tensor) -> torch.Tensor:
    """A copy that no transform cache can recognise: inverses are computed, never looked up."""
    return t.detach().clone()


def batch_jacobian(fn, x):
    """``J[b] = d fn(x)[b] / d x[b]`` for a batch ``x`` of shape ``(B, D)`` (the library's one)."""
    return _batch_jacobian(fn, x, create_graph=False)


# ----------------------------------------------------------------------------------------------
# 1. float64 exactness with perturbed parameters
# ----------------------------------------------------------------------------------------------
def check_exact(case: Case, scale: float, input_dim=D):
    module = perturb(build(case, input_dim), scale)
    ctx = contexts((B,)) if case.conditional else None
    t = transform_of(case, module, ctx)
    x = inputs((B,), input_dim)
    y = t(x)
    assert y.shape == x.shape, f"output shape {tuple(y.shape)} != input shape {tuple(x.shape)}"
    assert torch.isfinite(y).all(), "non-finite output"
    lad = t.log_abs_det_jacobian(x, y)
    assert lad.shape == x.shape[:-1], f"log-det shape {tuple(lad.shape)} != {tuple(x.shape[:-1])}"

    # log-det against autograd's Jacobian of the map actually computed
    jac = batch_jacobian(lambda inp: t(inp), fresh(x))
    sign, logdet = torch.linalg.slogdet(jac)
    assert (sign != 0).all(), "singular Jacobian"
    err = (lad - logdet).abs().max().item()
    assert err < ATOL_LOGDET * max(1.0, logdet.abs().max().item()), (
        f"log_abs_det_jacobian differs from slogdet(autograd Jacobian) by {err:.3g}"
    )

    # inverse of a fresh tensor: computed, not looked up in the cache
    x_rec = t.inv(fresh(y))
    err = (x_rec - x).abs().max().item()
    assert err < ATOL_INV, f"max|f.inv(f(x)) - x| = {err:.3g}"

    # the inverse's log-det is the negative of the forward's, and matches its own Jacobian
    lad_inv = t.inv.log_abs_det_jacobian(fresh(y), fresh(x_rec))
    err = (lad_inv + lad).abs().max().item()
    assert err < ATOL_LOGDET * max(1.0, lad.abs().max().item()), (
        f"inverse log-det is not the negative of the forward's (error {err:.3g})"
    )
    jac_inv = batch_jacobian(lambda inp: t.inv(inp), fresh(y))
    _, logdet_inv = torch.linalg.slogdet(jac_inv)
    err = (logdet_inv + lad).abs().max().item()
    assert err < ATOL_LOGDET * max(1.0, lad.abs().max().item()), (
        f"slogdet of the inverse's autograd Jacobian differs from -log-det by {err:.3g}"
    )


# ----------------------------------------------------------------------------------------------
# 2. float32
# ----------------------------------------------------------------------------------------------
def check_float32(case: Case, scale: float):
    module = build(case, dtype=torch.float32)
    if scale:
        perturb(module, scale)
    ctx = contexts((64,), dtype=torch.float32) if case.conditional else None
    t = transform_of(case, module, ctx)
    x = inputs((64,), dtype=torch.float32)
    y = t(x)
    lad = t.log_abs_det_jacobian(x, y)
    assert y.dtype == torch.float32 and lad.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(lad).all(), "non-finite float32 output or log-det"
    x_rec = t.inv(fresh(y))
    assert torch.isfinite(x_rec).all()
    err = ((x_rec - x).abs() / (1 + x.abs())).max().item()
    assert err < 1e-3, f"float32 reconstruction error {err:.3g}"


# ----------------------------------------------------------------------------------------------
# 3. shapes
# ----------------------------------------------------------------------------------------------
BATCH_SHAPES = [(), (B,), (2, 3), (4, 1)]  # (4, 1): vectorised particles (N, 1, D)


def check_shapes(case: Case):
    module = build(case)
    for batch in BATCH_SHAPES:
        x = inputs(batch)
        if case.conditional:
            t = transform_of(case, module, contexts(batch))
        else:
            t = module
        y = t(x)
        assert y.shape == x.shape, f"batch {batch}: output {tuple(y.shape)}"
        assert t.log_abs_det_jacobian(x, y).shape == batch, f"batch {batch}: log-det shape"
        assert t.inv(fresh(y)).shape == x.shape, f"batch {batch}: inverse shape"
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)).to_event(1)
    if case.conditional:
        cd = ConditionalTransformedDistribution(base, [module])
        ctx = contexts((B,))
        d = cd.condition(ctx)
        assert d.batch_shape == (B,), f"conditional distribution batch shape {d.batch_shape}"
        s = d.sample((6,))
        assert s.shape == (6, B, D)
        assert d.log_prob(s).shape == (6, B)
        assert d.rsample().shape == (B, D)
        if case.broadcasts_context:
            # vectorised particles against a batch of contexts
            lp = d.log_prob(inputs((7, 1)))
            assert lp.shape == (7, B)
    else:
        d = dist.TransformedDistribution(base, [module])
        s = d.sample((6,))
        assert s.shape == (6, D)
        assert d.log_prob(s).shape == (6,)
        assert d.log_prob(inputs((4, 1))).shape == (4, 1)
        assert d.rsample((2, 3)).shape == (2, 3, D)


# ----------------------------------------------------------------------------------------------
# 4. conditional behaviour
# ----------------------------------------------------------------------------------------------
def check_context(case: Case):
    module = perturb(build(case), 0.3)
    x = inputs((B,))
    ctx = contexts((B,))
    y = module.condition(ctx)(x)
    y_other = module.condition(ctx + 1.0)(fresh(x))
    assert (y - y_other).abs().max() > 1e-6, "the context does not change the map"
    # a batch of contexts acts row by row
    for b in range(B):
        yb = module.condition(ctx[b])(fresh(x[b]))
        assert torch.allclose(yb, y[b], atol=1e-10), "batched context differs from per-row context"
    if case.broadcasts_context:
        # one context against a batch of inputs, and a batch of contexts against particles (N, 1, D)
        y1 = module.condition(ctx[:1])(fresh(x))
        y1b = module.condition(ctx[0])(fresh(x))
        assert torch.allclose(y1, y1b, atol=1e-10)
        xp = inputs((4, 1))
        yp = module.condition(ctx)(xp)
        assert yp.shape == (4, B, D)
        assert torch.allclose(yp[:, 2], module.condition(ctx[2])(fresh(xp[:, 0])), atol=1e-10)
        xr = module.condition(ctx).inv(fresh(yp))
        assert torch.allclose(xr, xp.expand(4, B, D), atol=ATOL_INV)


# ----------------------------------------------------------------------------------------------
# 5. gradients
# ----------------------------------------------------------------------------------------------
def _loss(case, module, x, data, ctx):
    t = transform_of(case, module, ctx)
    y = t(x)
    lad = t.log_abs_det_jacobian(x, y)
    # the density-estimation direction: inverse of external data
    z = t.inv(fresh(data))
    lad_inv = t.inv.log_abs_det_jacobian(fresh(data), z)
    return (y.tanh().sum() + lad.sum() + (z ** 2).sum() * 0.1 + lad_inv.sum()) / x.shape[0]


def check_gradients(case: Case, scale: float = 0.3):
    module = perturb(build(case), scale)
    ctx = contexts((B,)) if case.conditional else None
    x, data = inputs((B,)), inputs((B,), seed=4)
    loss = _loss(case, module, x, data, ctx)
    params = dict(module.named_parameters())
    assert params, "the module has no parameters"
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), grads):
        assert g is not None, f"no gradient reaches parameter {name}"
        assert torch.isfinite(g).all(), f"non-finite gradient for {name}"
        assert g.abs().max() > 0, f"zero gradient for parameter {name}"
    # the gradient is the derivative of the loss (checks implicit-function gradients of inverses)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params.values()]
    analytic = sum((gr * v).sum() for gr, v in zip(grads, direction)).item()
    eps = 1e-5

    def shifted(sign):
        with torch.no_grad():
            for p, v in zip(params.values(), direction):
                p.add_(sign * eps * v)
            value = _loss(case, module, x, data, ctx).item()
            for p, v in zip(params.values(), direction):
                p.sub_(sign * eps * v)
        return value

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(analytic - numeric) < 1e-4 * max(1.0, abs(numeric)), (
        f"directional derivative {analytic:.8g} differs from finite difference {numeric:.8g}"
    )


# ----------------------------------------------------------------------------------------------
# 6. bad input
# ----------------------------------------------------------------------------------------------
def _assert_size_error(fn, expected, got):
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        assert str(expected) in msg and str(got) in msg, f"message does not name {expected} and {got}: {msg}"
        return
    raise AssertionError(f"no ValueError for size {got} (expected {expected})")


def check_bad_input(case: Case):
    module = build(case)
    ctx = contexts((B,)) if case.conditional else None
    t = transform_of(case, module, ctx)
    wrong = inputs((B,), input_dim=D + 2)
    _assert_size_error(lambda: t(wrong), D, D + 2)
    _assert_size_error(lambda: t.inv(wrong), D, D + 2)
    x = inputs((B,))
    _assert_size_error(lambda: t.log_abs_det_jacobian(wrong, x), D, D + 2)
    if case.conditional:
        _assert_size_error(lambda: module.condition(contexts((B,), context_dim=C + 3)), C, C + 3)
    # dtype mismatch is named, not a matmul error
    try:
        t(x.float())
    except ValueError as e:
        assert "dtype" in str(e)
    else:
        raise AssertionError("no ValueError for a float32 input to a float64 flow")
    # non-finite input: never hangs; either a ValueError or a non-finite result
    bad = x.clone()
    bad[0, 0] = float("nan")
    for fn in (t, t.inv):
        try:
            out = fn(bad)
        except ValueError:
            continue
        assert not torch.isfinite(out[0]).all(), "a NaN input produced a finite output"


def check_bad_context(case: Case):
    """A NaN or infinite context raises a ``ValueError`` naming the context while Pyro's validation
    is on; with validation off nothing is checked (no host synchronisation)."""
    import pyro

    module = build(case)
    x = inputs((B,))
    for value in (float("nan"), float("inf"), -float("inf")):
        ctx = contexts((B,))
        ctx[1, 0] = value
        try:
            t = module.condition(ctx)
            t(x)
            t.inv(fresh(x))
        except ValueError as e:
            assert "context" in str(e), f"the error for a {value} context does not name the context: {e}"
        else:
            raise AssertionError(f"no ValueError for a context holding {value}")
    ctx = contexts((B,))
    ctx[1, 0] = float("nan")
    with pyro.validation_enabled(False):
        module.condition(ctx)  # no check, no error: the user asked for speed


# ----------------------------------------------------------------------------------------------
# 7. persistence and devices
# ----------------------------------------------------------------------------------------------
def _outputs(case, module, dtype=torch.float64, device="cpu"):
    ctx = contexts((B,), dtype=dtype).to(device) if case.conditional else None
    t = transform_of(case, module, ctx)
    x = inputs((B,), dtype=dtype).to(device)
    y = t(x)
    return y, t.log_abs_det_jacobian(x, y), t.inv(fresh(y))


def check_persistence(case: Case):
    m1 = perturb(build(case, seed=0), 0.3)
    y1 = _outputs(case, m1)
    m2 = build(case, seed=7)
    m2.load_state_dict(m1.state_dict())
    for a, b in zip(y1, _outputs(case, m2)):
        assert torch.allclose(a, b, atol=1e-12), "state_dict round trip changed the map"
    buf = io.BytesIO()
    pickle.dump(m1, buf)
    m3 = pickle.loads(buf.getvalue())
    for a, b in zip(y1, _outputs(case, m3)):
        assert torch.allclose(a, b, atol=1e-12), "pickle round trip changed the map"
    m4 = build(case, dtype=torch.float32).double()
    for out in _outputs(case, m4):
        assert out.dtype == torch.float64 and torch.isfinite(out).all()


def check_cuda(case: Case):
    m = perturb(build(case), 0.3)
    cpu = _outputs(case, m)
    m = m.to("cuda")
    gpu = _outputs(case, m, device="cuda")
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda"
        assert torch.allclose(a, b.cpu(), atol=1e-6), "CUDA result differs from CPU"


# ----------------------------------------------------------------------------------------------
# 8. the cache never hands back a stale result
# ----------------------------------------------------------------------------------------------
def check_cache_follows_updates(case: Case):
    """Full-batch training reuses one data tensor: each step must see the current parameters."""
    module = perturb(build(case), 0.3)
    ctx = contexts((B,)) if case.conditional else None
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)).to_event(1)
    data = inputs((B,))
    opt = torch.optim.SGD(module.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        d = dist.TransformedDistribution(base, [transform_of(case, module, ctx)])
        loss = -d.log_prob(data).mean()
        loss.backward()  # a stale cached graph would fail here on the second pass
        opt.step()
        fresh_value = -d.log_prob(fresh(data)).mean()
        again = -d.log_prob(data).mean()  # same tensor, parameters changed by opt.step()
        assert torch.allclose(again, fresh_value, atol=1e-10), "cached result outlived a parameter update"
    # no_grad: a cached inverse must not survive an in-place parameter change either
    t = transform_of(case, module, ctx)
    with torch.no_grad():
        x1 = t.inv(data)
        for p in module.parameters():
            p.add_(0.05)
        x2 = t.inv(data)
        x_new = t.inv(fresh(data))
        assert torch.equal(x2, x_new) or torch.allclose(x2, x_new, atol=1e-10), (
            "cached inverse outlived an in-place parameter change"
        )
        assert x1.shape == x2.shape


def check_cache_follows_input_edits(case: Case):
    """An in-place edit of the input (``z.add_(1)``) is seen: ``log_prob(z)`` gives the new value."""
    module = perturb(build(case), 0.3)
    ctx = contexts((B,)) if case.conditional else None
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)).to_event(1)
    d = dist.TransformedDistribution(base, [transform_of(case, module, ctx)])
    with torch.no_grad():
        z = d.sample()  # fills the cache with (x, z)
        before = d.log_prob(z)
        z.add_(1.0)
        after = d.log_prob(z)
        expected = d.log_prob(fresh(z))
    assert torch.allclose(after, expected, atol=1e-8), (
        f"log_prob after an in-place edit of its input is {after.tolist()}, expected {expected.tolist()}"
    )
    assert not torch.allclose(after, before), "the in-place edit did not change log_prob"
    # the forward direction too: y = t(x), x.add_(1), t(x) is recomputed
    t = transform_of(case, module, ctx)
    with torch.no_grad():
        x = inputs((B,))
        t(x)
        x.add_(1.0)
        assert torch.allclose(t(x), t(fresh(x)), atol=1e-10), "t(x) after x.add_(1) came from the cache"


def check_cache_follows_grad_mode(case: Case):
    """``log_prob(z)`` under ``no_grad`` then with gradients on the same tensor carries a graph."""
    module = perturb(build(case), 0.3)
    ctx = contexts((B,)) if case.conditional else None
    base = dist.Normal(torch.zeros(D, dtype=torch.float64), torch.ones(D, dtype=torch.float64)).to_event(1)
    d = dist.TransformedDistribution(base, [transform_of(case, module, ctx)])
    z = inputs((B,))
    with torch.no_grad():
        no_graph = d.log_prob(z)
    lp = d.log_prob(z)
    assert lp.requires_grad and lp.grad_fn is not None, "log_prob with gradients on returned no graph"
    assert torch.allclose(lp.detach(), no_graph, atol=1e-10)
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(lp.sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in grads), "no gradient reaches the parameters"
    # and the forward direction
    t = transform_of(case, module, ctx)
    x = inputs((B,), seed=8)
    with torch.no_grad():
        t(x)
    assert t(x).requires_grad, "t(x) with gradients on came from a no_grad cache entry"


# ----------------------------------------------------------------------------------------------
# bar 8. never silently wrong at the sizes users run
# ----------------------------------------------------------------------------------------------
BOUNDED_DIMS = (5, 8, 16)
BOUNDED_SCALES = (2.0, 5.0)
BOUNDED_KINDS = ("plain", "conditional", "flow")
BOUNDED_BATCH = 128


def bounded_case_id(name: str, kind: str, input_dim: int, scale: float) -> str:
    label = {"plain": name, "conditional": f"conditional_{name}", "flow": f"flow({name})"}[kind]
    return f"{label}-D{input_dim}-s{scale:g}"


def check_bounded(name: str, kind: str, input_dim: int, scale: float):
    """Default arguments, every parameter moved by N(0, scale^2), x = 1.5 * randn(128, D), float64:
    the inverse (computed, not cached) reconstructs to 1e-6, or a ``ConvergenceWarning`` (or a
    ``SolverError``) says it could not. At ``scale <= 2`` it must reconstruct."""
    import warnings

    import pyro_flows
    from pyro_flows.registry import get_flow
    from pyro_flows.solvers import ConvergenceWarning, SolverError

    spec = get_flow(name)
    torch.manual_seed(0)
    if kind == "plain":
        module = spec.constructor(input_dim)
    elif kind == "conditional":
        module = spec.conditional(input_dim, C)
    else:
        module = pyro_flows.flow(name, input_dim)
    module = perturb(module.double(), scale)
    ctx = contexts((BOUNDED_BATCH,)) if kind == "conditional" else None
    x = inputs((BOUNDED_BATCH,), input_dim)
    loud = None
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            t = module.condition(ctx) if ctx is not None else module
            y = t(x)
            x_rec = t.inv(fresh(y))
        except SolverError as e:
            loud = f"SolverError: {e}"
    warned = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    if loud is None and warned:
        loud = f"ConvergenceWarning: {warned[0].message}"
    if loud is None:
        err = (x_rec - x).abs().max().item() if torch.isfinite(x_rec).all() else float("inf")
        assert err < ATOL_INV, (
            f"{bounded_case_id(name, kind, input_dim, scale)}: silently wrong, "
            f"max|f.inv(f(x)) - x| = {err:.3g} with no warning"
        )
    else:
        assert scale > 2.0, f"{bounded_case_id(name, kind, input_dim, scale)}: must reconstruct at s <= 2, got {loud}"


# ----------------------------------------------------------------------------------------------
# 9. nothing is created on the default device or in the default dtype behind the user's back
# ----------------------------------------------------------------------------------------------
def check_default_device_and_dtype(case: Case):
    """With the default device set to ``meta`` and the default dtype to float64, a float32 CPU flow
    must still compute on CPU in float32: any tensor allocated without ``device=``/``dtype=`` would be
    a meta (or float64) tensor and fail or leak into the result. This is the CPU stand-in for
    ``torch.set_default_device("cuda")`` with a flow on another device."""
    module = perturb(build(case, dtype=torch.float32), 0.3)
    ctx = contexts((B,), dtype=torch.float32) if case.conditional else None
    x = inputs((B,), dtype=torch.float32)
    dtype, device = torch.get_default_dtype(), torch.get_default_device()
    torch.set_default_dtype(torch.float64)
    torch.set_default_device("meta")
    try:
        t = transform_of(case, module, ctx)
        y = t(x)
        lad = t.log_abs_det_jacobian(x, y)
        x_rec = t.inv(fresh(y))
        (y.sum() + lad.sum() + x_rec.sum()).backward()
    except RuntimeError as e:
        raise AssertionError(f"the flow allocated on the default device or dtype: {e}") from e
    finally:
        # None, not "cpu": setting "cpu" would leave a global device mode behind for later tests
        torch.set_default_device(None if device == torch.device("cpu") else device)
        torch.set_default_dtype(dtype)
    for out in (y, lad, x_rec):
        assert out.device.type == "cpu" and out.dtype == torch.float32, (out.device, out.dtype)
    for name, p in module.named_parameters():
        assert p.grad is None or p.grad.device.type == "cpu", f"gradient of {name} left the CPU"
