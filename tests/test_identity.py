"""``init_identity_()``: every family can start at the exact identity map (what ``AutoFlow`` relies on).

In float64, after moving every parameter away from its initial value: the stack maps ``x`` to ``x``
and its log-det is 0 (bit for bit for the families whose identity is exact; QLF's block is an expansion
followed by a contraction, so there the tolerance is float64 rounding), the inverse too, and the gradient
of a loss with respect to the parameters is not all zero (training can leave the identity).
"""

import pytest
import torch

import pyro_flows
from pyro_flows.infer.autoguide import init_identity
from pyro_flows.registry import get_flow

FAMILIES = list(pyro_flows.FLOWS)
# QLF is kappa * s0 * beta = 1 in three roundings (its activation cannot have slope exactly 1)
_TOL = {"qlf": 1e-13}


def _build(name, D, conditional):
    spec = get_flow(name)
    kw = dict(spec.test_kwargs)
    if spec.has_single_pass:
        kw["single_pass"] = "sample"
    return pyro_flows.flow(name, D, num_layers=2, context_dim=3 if conditional else None, **kw).double()


def _perturb_and_reset(stack):
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in stack.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    try:
        return init_identity(stack)
    except NotImplementedError:  # pragma: no cover - init_identity catches it
        return False


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("D", [1, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_init_identity_is_the_identity(name, D, conditional):
    if name == "autm_coupling" and D == 1:
        pytest.skip("a coupling layer needs D >= 2")
    stack = _build(name, D, conditional)
    exact = _perturb_and_reset(stack)
    assert exact, f"{name}: init_identity_ is missing on a layer"
    ctx = torch.randn(6, 3, dtype=torch.float64)
    t = stack.condition(ctx) if conditional else stack
    x = 2.0 * torch.randn(6, D, dtype=torch.float64)
    y = t(x)
    ld = t.log_abs_det_jacobian(x, y)
    # the permutation between the two layers is the only thing left
    perm = x if D == 1 or get_flow(name).permutation is None else x.flip(-1)
    tol = _TOL.get(name, 0.0)
    torch.testing.assert_close(y, perm, rtol=tol, atol=tol)
    torch.testing.assert_close(ld, torch.zeros_like(ld), rtol=0, atol=tol * D)
    torch.testing.assert_close(t.inv(y.detach().clone()), x, rtol=tol, atol=tol)
    loss = (y.sin() * torch.arange(1.0, D + 1, dtype=torch.float64)).sum() + (ld * y[..., 0]).sum()
    params = [p for p in stack.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert torch.isfinite(torch.tensor(total)) and total > 0


@pytest.mark.parametrize("bound", ["spectral", "power", "frobenius"])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("name", ["autm_autoregressive", "autm_coupling", "quar"])
def test_identity_start_has_finite_gradients_with_every_bound(name, conditional, bound):
    """Identity-initialised layers have zero weights (a conditioner's output layer): every Lipschitz bound must
    have a finite gradient there, or the first training step is NaN (``AutoFlow(model, bound="frobenius")``
    was, when the Frobenius norm was ``sqrt(sum of squares)``, whose gradient at 0 is inf * 0)."""
    stack = pyro_flows.flow(name, 4, num_layers=2, context_dim=3 if conditional else None, bound=bound,
                            single_pass="sample").double()
    assert init_identity(stack)
    t = stack.condition(torch.randn(6, 3, dtype=torch.float64)) if conditional else stack
    x = torch.randn(6, 4, dtype=torch.float64)
    y = t(x)
    ((y.sin() * torch.arange(1.0, 5, dtype=torch.float64)).sum() + t.log_abs_det_jacobian(x, y).sum()).backward()
    grads = [p.grad for p in stack.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), f"{name}, bound={bound}: non-finite gradient"
    assert any(g.abs().sum() > 0 for g in grads), f"{name}, bound={bound}: no gradient leaves the identity"
