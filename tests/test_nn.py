"""Shared layers: guaranteed Lipschitz bounds, quasi-autoregressive masks, activations."""

import pytest
import torch

from pyro_flows.nn import (
    ELU,
    LipSwish,
    LipschitzLinear,
    get_activation,
    matrix_norm_bound,
    quasi_autoregressive_masks,
)

f64 = torch.float64


def power_iteration(w, steps):
    v = torch.ones(w.shape[1], dtype=w.dtype)
    for _ in range(steps):
        v = w.T @ (w @ v)
        v = v / v.norm()
    return (w @ v).norm()


@pytest.mark.parametrize("seed", range(5))
def test_masked_bound_is_guaranteed_and_tight(seed):
    torch.manual_seed(seed)
    masks, _ = quasi_autoregressive_masks(4, [8, 8])
    for m in masks:
        layer = LipschitzLinear(m.shape[1], m.shape[0], mask=m).double()
        with torch.no_grad():
            layer.weight.mul_(10 * torch.rand(()).item())
        true = torch.linalg.svdvals(layer.weight * layer.mask)[0]
        bound = layer.lipschitz()
        assert true <= bound <= true * (1 + 1e-5)
        # the bound of W * M is not the bound of W
        assert not torch.isclose(bound, torch.linalg.svdvals(layer.weight)[0])


def test_power_iteration_underestimates_but_bound_does_not():
    # the reason DESIGN.md forbids power iteration as a bound: it approaches from below
    torch.manual_seed(0)
    w = torch.randn(30, 30, dtype=f64)
    true = torch.linalg.svdvals(w)[0]
    assert power_iteration(w, 2) < true
    assert matrix_norm_bound(w) >= true


@pytest.mark.parametrize("bound", ["spectral", "frobenius"])
def test_coeff_normalisation_for_any_weight(bound):
    layer = LipschitzLinear(5, 7, coeff=0.9, bound=bound).double()
    for scale in (1e-3, 1.0, 1e3):
        with torch.no_grad():
            layer.weight.copy_(scale * torch.randn(7, 5, dtype=f64))
        w = layer.effective_weight()
        assert torch.linalg.svdvals(w)[0] <= 0.9 + 1e-12
        assert layer.lipschitz() <= 0.9 * (1 + 1e-5)
    # empirical Lipschitz ratio
    x, y = torch.randn(100, 5, dtype=f64), torch.randn(100, 5, dtype=f64)
    ratio = (layer(x) - layer(y)).norm(dim=-1) / (x - y).norm(dim=-1)
    assert ratio.max() <= 0.9 + 1e-12


def test_bound_cache_follows_parameter_updates():
    layer = LipschitzLinear(3, 3).double()
    with torch.no_grad():
        b1 = layer.lipschitz()
        assert layer.lipschitz() is b1  # reused while the weight is unchanged
        layer.weight.mul_(2.0)
        b2 = layer.lipschitz()
    assert torch.isclose(b2, 2 * b1)
    # with a graph needed, the bound is fresh and differentiable
    b3 = layer.lipschitz()
    assert b3.requires_grad
    b3.backward()
    assert layer.weight.grad is not None


def test_kept_bounds_caches_a_bound_computed_with_a_graph():
    """Inside ``kept_bounds`` a differentiable bound is also cached, so a later no-graph request with the same
    weights (detached copies included: the path gradient's pass) reads it; outside, it is computed again."""
    from pyro_flows.nn.lipschitz import kept_bounds

    layer = LipschitzLinear(3, 3).double()
    b_graph = layer.lipschitz()  # outside: nothing cached
    with torch.no_grad():
        b_fresh = layer.lipschitz()
    assert b_fresh is not b_graph and torch.equal(b_fresh, b_graph.detach())
    with torch.no_grad():
        layer.weight.mul_(1.5)
    with kept_bounds():
        b_graph = layer.lipschitz()
    assert b_graph.requires_grad
    with torch.no_grad():
        b_read = layer.lipschitz()
        assert torch.equal(b_read, b_graph.detach()) and layer.lipschitz() is b_read  # read, not recomputed
        layer.weight.mul_(2.0)  # a change of the weights is still seen
        assert torch.isclose(layer.lipschitz(), 2 * b_read)


def test_mask_columns_excludes_context():
    layer = LipschitzLinear(5, 4, mask_columns=3).double()
    with torch.no_grad():
        layer.weight[:, 3:] = 1e3
    assert layer.lipschitz() <= torch.linalg.svdvals(layer.weight[:, :3])[0] * (1 + 1e-5)


def test_lipschitz_linear_bad_arguments():
    with pytest.raises(ValueError, match="mask shape"):
        LipschitzLinear(3, 4, mask=torch.ones(3, 3))
    with pytest.raises(ValueError, match="coeff"):
        LipschitzLinear(3, 4, coeff=0.0)
    with pytest.raises(ValueError, match="bound"):
        LipschitzLinear(3, 4, bound="nuclear")


def test_quasi_autoregressive_connectivity():
    D = 4
    masks, degrees = quasi_autoregressive_masks(D, [8, 12], context_dim=2, output_multiplier=2)
    conn = masks[0][:, :D]
    for m in masks[1:]:
        conn = (m @ conn).clamp(max=1)
    # output m*D + i depends on inputs j <= i, including j == i
    expected = torch.tril(torch.ones(D, D)).repeat(2, 1)
    assert torch.equal(conn, expected)
    assert masks[0][:, D:].eq(1).all()  # context visible everywhere
    assert degrees[1].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="multiples"):
        quasi_autoregressive_masks(4, [6])


@pytest.mark.parametrize("act", [LipSwish(3), ELU()], ids=["lipswish", "elu"])
def test_activation_derivative_and_lipschitz(act):
    act = act.double()
    if isinstance(act, LipSwish):
        with torch.no_grad():
            act.raw_beta.copy_(torch.tensor([-3.0, 0.5, 4.0], dtype=f64))
    x = torch.linspace(-20, 20, 4001, dtype=f64)[:, None].expand(-1, 3).clone().requires_grad_()
    y, dy = act.forward_and_derivative(x)
    (auto,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(dy, auto, atol=1e-12)
    assert dy.abs().max() <= 1.0 + 1e-12


def test_get_activation():
    assert isinstance(get_activation("elu"), ELU)
    with pytest.raises(ValueError, match="unknown activation"):
        get_activation("relu6")


def test_spectral_norm_bounds_batched_values_and_gradients():
    """One batched no-grad SVD gives each weight's guaranteed bound, and the gradient ``u v^T``
    equals autograd's through a differentiable SVD."""
    from pyro_flows.nn.lipschitz import MARGIN, spectral_norm_bounds

    torch.manual_seed(0)
    ws = [torch.randn(6, 3, dtype=f64, requires_grad=True), torch.randn(6, 6, dtype=f64, requires_grad=True),
          torch.randn(3, 6, dtype=f64, requires_grad=True)]
    bounds = spectral_norm_bounds(ws)
    true = torch.stack([torch.linalg.matrix_norm(w, ord=2) for w in ws])
    assert (bounds >= true).all() and torch.allclose(bounds, true * (1 + MARGIN), rtol=1e-12)
    weights = torch.randn(3, dtype=f64)
    got = torch.autograd.grad((bounds * weights).sum(), ws)
    expected = torch.autograd.grad((true * weights * (1 + MARGIN)).sum(), ws)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-10)
    # a single weight, float32 in and out (the SVD runs in float64)
    w = torch.randn(5, 4, requires_grad=True)
    b = matrix_norm_bound(w)
    assert b.dtype == torch.float32 and b.dim() == 0
    assert b >= torch.linalg.svdvals(w.detach().double())[0].float()
    (gw,) = torch.autograd.grad(b, w)
    (ew,) = torch.autograd.grad(torch.linalg.matrix_norm(w, ord=2), w)
    assert torch.allclose(gw, ew, atol=1e-5)
    with pytest.raises(ValueError):
        spectral_norm_bounds([torch.ones(3)])


def test_spectral_norm_bounds_degenerate_weights():
    from pyro_flows.nn.lipschitz import spectral_norm_bounds

    # a zero weight: bound 0, gradient finite (zero); a repeated top singular value: a subgradient
    # u v^T of unit spectral norm
    z = torch.zeros(4, 3, dtype=f64, requires_grad=True)
    e = torch.eye(3, dtype=f64).mul(2).requires_grad_()
    b = spectral_norm_bounds([z, e])
    assert b[0] == 0 and torch.isclose(b[1], torch.tensor(2.0, dtype=f64), rtol=1e-5)
    gz, ge = torch.autograd.grad(b.sum(), [z, e])
    assert torch.equal(gz, torch.zeros_like(gz))
    assert torch.isclose(torch.linalg.matrix_norm(ge, ord=2), torch.tensor(1.0, dtype=f64), rtol=1e-5)
    # a wide and a tall weight of very different scales in one call
    torch.manual_seed(1)
    ws = [1e-8 * torch.randn(2, 9, dtype=f64), 1e8 * torch.randn(9, 2, dtype=f64)]
    true = torch.stack([torch.linalg.svdvals(w)[0] for w in ws])
    got = spectral_norm_bounds(ws)
    assert (got >= true).all() and (got <= true * (1 + 2e-6)).all()


def test_spectral_norm_product_value_and_gradient():
    from pyro_flows.nn.lipschitz import spectral_norm_bounds, spectral_norm_product

    torch.manual_seed(2)
    ws = [torch.randn(6, 3, dtype=f64, requires_grad=True), torch.randn(6, 6, dtype=f64, requires_grad=True),
          torch.zeros(3, 6, dtype=f64, requires_grad=True)]
    for zero_last in (False, True):
        if not zero_last:
            with torch.no_grad():
                ws[2].copy_(torch.randn(3, 6, dtype=f64))
        else:
            with torch.no_grad():
                ws[2].zero_()
        p = spectral_norm_product(ws)
        ref = spectral_norm_bounds(ws).prod()
        assert torch.allclose(p, ref, rtol=1e-14, atol=0)
        got = torch.autograd.grad(p, ws)
        expected = torch.autograd.grad(spectral_norm_bounds(ws).prod(), ws)
        for g, e in zip(got, expected):
            assert torch.isfinite(g).all() and torch.allclose(g, e, atol=1e-10)


@pytest.mark.parametrize("blocks", [1, 2])
def test_power_norm_product_is_a_guaranteed_bound_with_its_exact_gradient(blocks):
    from pyro_flows.nn.lipschitz import power_norm_product, spectral_norm_product

    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(12, 12, generator=g, dtype=torch.float64),
          torch.randn(3, 12, generator=g, dtype=torch.float64)]
    # flat spectra are the worst case: an orthogonal matrix of rank 12
    q = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    k = 8 ** blocks
    for case in (ws, [q], [q * 1e-100, ws[0]], [q * 1e100]):
        exact = spectral_norm_product(case)
        bound = power_norm_product(case, blocks=blocks)
        assert exact <= bound <= exact * 12 ** (len(case) / (4 * k)) * (1 + 1e-9)
    assert power_norm_product([q], blocks=blocks) > 12 ** (1 / (4 * k)) * (1 - 1e-9)  # the factor is attained
    ws = [w.requires_grad_() for w in ws]
    assert torch.autograd.gradcheck(lambda *w: power_norm_product(w, blocks=blocks), ws)
    # float32 weights: a float32 value and gradients; a zero weight gives a zero bound and finite gradients
    w32 = [w.detach().float().requires_grad_() for w in ws] + [torch.zeros(3, 5, requires_grad=True)]
    p = power_norm_product(w32, blocks=blocks)
    p.backward()
    assert p.dtype == torch.float32 and p == 0
    assert all(w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all() for w in w32)
    with pytest.raises(ValueError, match="2-D"):
        power_norm_product([torch.ones(3)])


def test_spectral_norm_bounds_do_not_depend_on_grad_mode():
    # the map a Lipschitz layer computes must be the same with and without gradients (bit for bit):
    # the stack's round-trip certificate runs without gradients and must check the user's map
    from pyro_flows.nn.lipschitz import spectral_norm_bounds

    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # eigh and eigvalsh round the top eigenvalue differently for most such draws
        ws = [(5 * torch.randn(64, 8, generator=g, dtype=torch.float64)).requires_grad_(),
              (5 * torch.randn(64, 64, generator=g, dtype=torch.float64)).requires_grad_()]
        with_grad = spectral_norm_bounds(ws)
        with torch.no_grad():
            without = spectral_norm_bounds(ws)
        assert torch.equal(with_grad.detach(), without)


def _lipschitz_nets():
    from pyro_flows.nn import LipschitzDenseNN, LipschitzMADE

    torch.manual_seed(0)
    nets = [LipschitzMADE(8, [64, 64], output_multiplier=3, context_dim=2, coeff=0.9),
            LipschitzMADE(4, [32, 32], output_multiplier=2, context_dim=2, coeff=[0.9, 1.0, 0.8]),
            LipschitzDenseNN(4, [64, 64], 6, context_dim=2, coeff=0.9)]
    with torch.no_grad():
        for net in nets:
            for layer in net.layers:
                layer.weight.mul_(5)  # every bound active (coeff / bound < 1)
    return nets


def test_lipschitz_networks_are_one_map_whatever_the_grad_mode():
    # forward, precomputed weights (the numerical inverse), effective_weights and lipschitz: one
    # batched bound computation, bit for bit the same with and without gradients, cached or not
    from pyro_flows.nn.lipschitz import spectral_norm_bounds

    for net in _lipschitz_nets():
        x, c = torch.randn(5, net.layers[0].mask_columns), torch.randn(5, 2)
        y, weights, lip = net(x, c), net.effective_weights(), net.lipschitz()
        masked = [layer.masked_weight() for layer in net.layers]
        cols = [masked[0][:, : net.layers[0].mask_columns]] + masked[1:]
        assert torch.equal(net.bounds().detach(), spectral_norm_bounds(cols).detach())
        for _ in range(2):  # computed, then cached
            with torch.no_grad():
                assert torch.equal(net(x, c), y.detach())
                assert all(torch.equal(a, b.detach()) for a, b in zip(net.effective_weights(), weights))
                assert torch.equal(net.lipschitz(), lip.detach())
                assert torch.equal(net(x, c, weights=[w.detach() for w in weights]), y.detach())
        coeffs = [layer.coeff for layer in net.layers]
        assert lip <= torch.tensor(coeffs).prod() * (1 + 1e-5)


def test_lipschitz_network_bound_cache_follows_data_updates():
    net = _lipschitz_nets()[0]
    with torch.no_grad():
        b1 = net.bounds()
        assert net.bounds() is b1
        net.layers[1].weight.data.mul_(2.0)  # as ClippedAdam does: no version bump
        b2 = net.bounds()
    assert torch.equal(b2[1], net.bounds()[1].detach()) and not torch.equal(b1[1], b2[1])
    assert torch.equal(b1[[0, 2]], b2[[0, 2]])


def test_packing_views_and_old_keys():
    from pyro_flows.nn.packed import Packing, pack_old_keys

    p = Packing([(2, 3), (3,), (2, 1, 2)])
    a, b, c = torch.randn(2, 3), torch.randn(3), torch.randn(2, 1, 2)
    flat = p.pack([a, b, c])
    views = p.unpack(flat)
    assert all(torch.equal(v, t) and v._base is flat for v, t in zip(views, (a, b, c)))
    with pytest.raises(ValueError, match="shapes"):
        p.pack([a, b])
    sd = {"x.u0": a, "x.l0": a + 1, "x.b": b, "x.m": b, "y": b}
    pack_old_keys(sd, "x.", [("u0", "l0"), "b"], "packed", drop=["m"])
    assert sorted(sd) == ["x.packed", "y"]
    assert torch.equal(sd["x.packed"], torch.cat([torch.stack([a, a + 1]).reshape(-1), b]))
    sd = {"x.b": b}
    pack_old_keys(sd, "x.", ["a", "b"], "packed")  # not all old keys there: left alone
    assert list(sd) == ["x.b"]


def test_spectral_norm_segments_equal_the_separate_calls():
    """One batched call for several lists (bounds or their product) gives each list what it gets alone
    (to float64 rounding), with the same gradients."""
    from pyro_flows.nn.lipschitz import spectral_norm_bounds, spectral_norm_product, spectral_norm_segments

    torch.manual_seed(0)
    lists = [[torch.randn(6, 3), torch.randn(6, 6), torch.randn(3, 6)],
             [torch.randn(5, 3), torch.randn(2, 5)],
             [torch.randn(6, 3), torch.randn(6, 6)]]
    lists = [[w.double().requires_grad_() for w in ws] for ws in lists]
    products = [True, False, True]
    got = spectral_norm_segments(lists, products)
    want = [spectral_norm_product(ws) if p else spectral_norm_bounds(ws) for ws, p in zip(lists, products)]
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)
    flat = [w for ws in lists for w in ws]
    coef = [1.5, torch.tensor([0.3, -2.0], dtype=torch.float64), -0.7]
    loss = lambda vals: sum((c * v).sum() for c, v in zip(coef, vals))  # noqa: E731
    for a, b in zip(torch.autograd.grad(loss(got), flat), torch.autograd.grad(loss(want), flat)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="2-D"):
        spectral_norm_segments([[torch.ones(3)]], [True])


def test_shared_bounds_are_each_networks_own_and_follow_updates():
    """Inside ``shared_bounds`` every network reads its entry of one batched call (one ``eigh`` per
    Gram size for all of them); values and gradients are those it computes alone; without a graph
    the batched values go to each network's cache, which still follows in-place and ``.data`` updates."""
    from pyro_flows.nn.lipschitz import LipschitzDenseNN, LipschitzMADE, shared_bounds
    from pyro_flows.nn.quasi_autoregressive import QuasiAutoregressiveNet

    torch.manual_seed(0)
    nets = [LipschitzDenseNN(3, [12], 4, coeff=0.9), LipschitzMADE(3, [12], output_multiplier=2),
            QuasiAutoregressiveNet(3, hidden_factors=(4,)), LipschitzDenseNN(3, [12], 4, coeff=0.9)]
    nets = [n.double() for n in nets]

    def values():
        return [n.product_bound() if isinstance(n, QuasiAutoregressiveNet) else n.bounds() for n in nets]

    alone = values()
    calls = []
    eigh = torch.linalg.eigh
    try:
        torch.linalg.eigh = lambda a: calls.append(a.shape) or eigh(a)
        with shared_bounds(nets):
            together = values()
            again = values()  # read back, not recomputed
    finally:
        torch.linalg.eigh = eigh
    # one eigh per Gram size, over the 8 weights of the 4 networks
    assert len(calls) == len({s[-1] for s in calls}) and sum(s[0] for s in calls) == 8, calls
    for a, t, r in zip(alone, together, again):
        torch.testing.assert_close(t, a, rtol=1e-14, atol=0)
        assert r is t
    params = [p for n in nets for p in n.parameters()]
    loss = lambda vals: sum(v.sum() for v in vals)  # noqa: E731
    grads_alone = torch.autograd.grad(loss(alone), params, allow_unused=True)
    grads_together = torch.autograd.grad(loss(together), params, allow_unused=True)
    for a, t in zip(grads_alone, grads_together):
        assert (a is None) == (t is None)
        if a is not None:
            torch.testing.assert_close(t, a, rtol=1e-12, atol=1e-15)
    # no graph: the batched values are cached per network, and the cache follows parameter updates
    with torch.no_grad():
        with shared_bounds(nets):
            cached = values()
        for c, a in zip(cached, alone):
            torch.testing.assert_close(c, a.detach(), rtol=1e-14, atol=0)
        nets[0].layers[0].weight.mul_(2.0)        # in place (bumps _version)
        nets[2].packed.data[:5] *= 3.0            # through .data (does not)
        with shared_bounds(nets):
            updated = values()
        fresh = [n._compute_bound(None) if isinstance(n, QuasiAutoregressiveNet) else n._compute_bounds(None)
                 for n in nets]
    for u, f, c in zip(updated, fresh, cached):
        torch.testing.assert_close(u, f, rtol=1e-14, atol=0)
    assert not torch.equal(updated[0], cached[0]) and not torch.equal(updated[2], cached[2])


def _packed_nets(kind, context_dim):
    from pyro_flows.nn.lipschitz import LipschitzDenseNN, LipschitzMADE
    from pyro_flows.nn.quasi_autoregressive import QuasiAutoregressiveNet

    if kind == "quar":
        return [QuasiAutoregressiveNet(3, hidden_factors=(12, 12), context_dim=context_dim) for _ in range(3)]
    if kind == "made":
        return [LipschitzMADE(3, [40, 36], output_multiplier=2, context_dim=context_dim) for _ in range(3)]
    return [LipschitzDenseNN(3, [40, 36], 4, context_dim=context_dim, coeff=0.9) for _ in range(3)]


@pytest.mark.parametrize("kind", ["quar", "made", "dense"])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_packed_bounds_equal_the_per_weight_path(kind, context_dim):
    """A stack of networks of one layout is bounded straight from the packed parameters
    (``packed_spectral_bounds``: masks, context columns and Gram sizes on both sides of
    ``INVERSE_ITERATION_MIN_SIZE`` handled inside, one flat gradient per network): the values and
    gradients of the per-weight path (``spectral_norm_product`` / ``spectral_norm_bounds`` of the sliced,
    masked weights), for random weights, a zeroed layer included, and what ``shared_bounds`` hands out."""
    from pyro_flows.nn.lipschitz import packed_spectral_bounds, shared_bounds

    torch.manual_seed(0)
    nets = [n.double() for n in _packed_nets(kind, context_dim)]
    with torch.no_grad():
        for n in nets:
            n.packed.normal_()
        nets[1]._views()[0].zero_()  # a zero weight: bound 0, gradient of the others' product still exact
    layouts = [n._packed_layout() for n in nets]
    packed = packed_spectral_bounds(layouts)
    if kind == "quar":
        alone = torch.stack([n._compute_bound(None) / n._act_factor for n in nets])
    else:
        alone = torch.stack([n._compute_bounds(None) for n in nets])
    torch.testing.assert_close(packed, alone, rtol=1e-13, atol=0)
    weights = torch.randn_like(alone)
    params = [n.packed for n in nets]
    got = torch.autograd.grad((packed * weights).sum(), params)
    want = torch.autograd.grad((alone * weights).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-13)
    with shared_bounds(nets):
        shared = [n.product_bound() if kind == "quar" else n.bounds() for n in nets]
    for s, n, a in zip(shared, nets, alone):
        torch.testing.assert_close(s, n._finish_bound(a), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="one layout"):
        packed_spectral_bounds(layouts + [_packed_nets("dense" if kind != "dense" else "made", 0)[0]
                                          .double()._packed_layout()])


def test_large_gram_bound_by_eigvalsh_and_inverse_iteration():
    """From ``INVERSE_ITERATION_MIN_SIZE`` on, the value comes from ``eigvalsh`` and the gradient's top
    singular pair from inverse iteration: the value is sigma_max (SVD) to rounding, the gradient
    ``(1 + MARGIN) u v^T`` to ~1e-10, whatever the grad mode; a zero weight has bound 0 and gradient 0,
    and a weight with a repeated top singular value gets a subgradient (a unit pair of the top space)."""
    from pyro_flows.nn.lipschitz import INVERSE_ITERATION_MIN_SIZE, MARGIN, spectral_norm_bounds

    n = INVERSE_ITERATION_MIN_SIZE
    torch.manual_seed(0)
    ws = [torch.randn(n + 8, n, dtype=torch.float64), torch.randn(n, 2 * n, dtype=torch.float64)]
    ws = [w.requires_grad_() for w in ws]
    bounds = spectral_norm_bounds(ws)
    with torch.no_grad():
        assert torch.equal(spectral_norm_bounds(ws), bounds.detach())
    for w, b, g in zip(ws, bounds, torch.autograd.grad(bounds.sum(), ws)):
        u, s, vh = torch.linalg.svd(w.detach())
        torch.testing.assert_close(b.detach(), s[0] * (1 + MARGIN), rtol=1e-13, atol=0)
        torch.testing.assert_close(g, (1 + MARGIN) * torch.outer(u[:, 0], vh[0]), rtol=0, atol=1e-10)
    q = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))[0]
    zero = torch.zeros(n, n, dtype=torch.float64, requires_grad=True)
    flat = (3 * q).requires_grad_()
    b = spectral_norm_bounds([zero, flat])
    g0, g1 = torch.autograd.grad(b.sum(), [zero, flat])
    assert b[0] == 0 and torch.equal(g0, torch.zeros_like(g0))
    torch.testing.assert_close(b[1].detach(), torch.tensor(3.0, dtype=torch.float64) * (1 + MARGIN))
    # a subgradient: g = (1 + MARGIN) x y^T with unit x, y and x^T W y = sigma_max
    assert torch.isfinite(g1).all()
    torch.testing.assert_close(torch.linalg.matrix_norm(g1, "fro"), torch.tensor(1 + MARGIN, dtype=torch.float64))
    torch.testing.assert_close((g1 * flat.detach()).sum(), b[1].detach(), rtol=1e-9, atol=0)


def test_packed_lipschitz_networks_load_old_state_dicts_and_expose_views():
    """The MADE and dense Lipschitz networks keep weights and biases in ONE parameter; ``layers[i].weight``
    and ``.bias`` are views of it (in-place edits reach it), and a state dict saved with one tensor
    per weight and bias (and MADE's masks) loads into the same map."""
    from pyro_flows.nn.lipschitz import LipschitzDenseNN, LipschitzMADE

    torch.manual_seed(0)
    for make in (lambda: LipschitzMADE(3, [12], output_multiplier=2, context_dim=2),
                 lambda: LipschitzDenseNN(3, [12], 4, context_dim=2, coeff=0.9)):
        net = make()
        assert [n for n, _ in net.named_parameters()] == ["packed"]
        old = {f"layers.{i}.{k}": getattr(layer, k).detach().clone() * 1.5
               for i, layer in enumerate(net.layers) for k in ("weight", "bias")}
        old.update({k: v for k, v in net.state_dict().items() if k.endswith(".mask")})
        other = make()
        other.load_state_dict(old)
        for i, layer in enumerate(other.layers):
            assert torch.equal(layer.weight, old[f"layers.{i}.weight"])
            assert torch.equal(layer.bias, old[f"layers.{i}.bias"])
        with torch.no_grad():
            other.layers[-1].bias.zero_()
        assert torch.equal(other._views()[-1], torch.zeros_like(other.layers[-1].bias))
        x, c = torch.randn(5, 3), torch.randn(5, 2)
        assert torch.isfinite(other(x, c)).all()


@pytest.mark.parametrize("hidden, context_dim", [([], 0), ([16], 0), ([24, 20], 2)])
def test_made_output_and_jacobian_match_autograd(hidden, context_dim):
    """``LipschitzMADE.output_and_jacobian``: the output of ``forward`` and the Jacobian in ``x`` that
    autograd computes (float64, weights moved so that many ELU units sit below 0), autoregressive
    (zero on and above the diagonal), for every context."""
    from pyro_flows.nn import LipschitzMADE

    torch.manual_seed(0)
    net = LipschitzMADE(5, hidden, output_multiplier=3, context_dim=context_dim).double()
    with torch.no_grad():
        net.packed.add_(torch.randn_like(net.packed))
    x = torch.randn(7, 5, dtype=torch.float64)
    ctx = torch.randn(7, context_dim, dtype=torch.float64) if context_dim else None
    out, jac = net.output_and_jacobian(x, ctx)
    assert torch.equal(out, net(x, ctx))
    ref = torch.stack([torch.autograd.functional.jacobian(
        lambda v, i=i: net(v, None if ctx is None else ctx[i]), x[i]) for i in range(len(x))])
    assert jac.shape == (7, 3, 5, 5)
    assert torch.allclose(jac, ref, rtol=1e-12, atol=1e-12)
    assert (jac.triu() == 0).all()
