"""Built-in toy densities (2-D) with their entropies.

The generators follow the residual-flows / FFJORD toy data sets (``8gaussians``, ``checkerboard``,
``2spirals``, ``moons``, ``pinwheel``, ``rings``, ``swissroll``, ``circles``); all draw with a
``torch.Generator`` so a seed fixes the data. ``ENTROPY`` gives the exact differential entropy (in
nats) where it has a closed form or an accurate Monte-Carlo value: it is the floor of the expected
test NLL of any density model, so ``test NLL - entropy`` is a model's excess (a KL divergence).

Example:
    >>> from pyro_flows.datasets import toy_sample, ENTROPY
    >>> x = toy_sample("checkerboard", 1000, seed=0)
    >>> x.shape, round(ENTROPY["checkerboard"], 4)
    (torch.Size([1000, 2]), 3.4657)
"""

from __future__ import annotations

import math

import torch

__all__ = ["TOY_DATASETS", "ENTROPY", "toy_sample", "toy_log_prob"]


def _gen(seed):
    return torch.Generator().manual_seed(int(seed))


_S2 = 1.0 / math.sqrt(2)
_8G_CENTERS = 4.0 * torch.tensor(
    [(1, 0), (-1, 0), (0, 1), (0, -1), (_S2, _S2), (_S2, -_S2), (-_S2, _S2), (-_S2, -_S2)],
    dtype=torch.float64,
)
_8G_STD = 0.5
_8G_SCALE = 1.414


def _eight_gaussians(n, g):
    idx = torch.randint(0, 8, (n,), generator=g)
    x = _8G_CENTERS[idx] + _8G_STD * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x / _8G_SCALE


def _eight_gaussians_log_prob(x):
    x = x.to(torch.float64)
    std = _8G_STD / _8G_SCALE
    d = (x[..., None, :] - _8G_CENTERS / _8G_SCALE) / std  # (..., 8, 2)
    comp = -0.5 * (d ** 2).sum(-1) - 2 * math.log(std) - math.log(2 * math.pi)
    return torch.logsumexp(comp, -1) - math.log(8)


def _checkerboard(n, g):
    x1 = torch.rand(n, generator=g, dtype=torch.float64) * 4 - 2
    x2_ = torch.rand(n, generator=g, dtype=torch.float64) - torch.randint(0, 2, (n,), generator=g) * 2
    x2 = x2_ + torch.floor(x1) % 2
    return torch.stack([x1, x2], 1) * 2


def _checkerboard_log_prob(x):
    x = x.to(torch.float64) / 2
    x1, x2 = x[..., 0], x[..., 1]
    inside = (x1 >= -2) & (x1 < 2) & (x2 >= -2) & (x2 < 2)
    on = ((torch.floor(x1) + torch.floor(x2)) % 2) == 0
    return torch.where(inside & on, torch.full_like(x1, -math.log(32)), torch.full_like(x1, -math.inf))


def _two_spirals(n, g):
    t = torch.sqrt(torch.rand(n, 1, generator=g, dtype=torch.float64)) * 540 * (2 * math.pi) / 360
    d1x = -torch.cos(t) * t + torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.5
    d1y = torch.sin(t) * t + torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.5
    x = torch.cat([torch.cat([d1x, d1y], 1), torch.cat([-d1x, -d1y], 1)], 0) / 3
    x = x + 0.1 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x[torch.randperm(2 * n, generator=g)[:n]]


def _moons(n, g):
    n1 = n // 2
    n2 = n - n1
    a = torch.rand(n1, generator=g, dtype=torch.float64) * math.pi
    b = torch.rand(n2, generator=g, dtype=torch.float64) * math.pi
    upper = torch.stack([torch.cos(a), torch.sin(a)], 1)
    lower = torch.stack([1 - torch.cos(b), 1 - torch.sin(b) - 0.5], 1)
    x = torch.cat([upper, lower], 0) + 0.1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = x * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)
    return x[torch.randperm(n, generator=g)]


def _pinwheel(n, g):
    radial_std, tangential_std, num_classes, rate = 0.3, 0.1, 5, 0.25
    rads = torch.linspace(0, 2 * math.pi, num_classes + 1, dtype=torch.float64)[:-1]
    per = n // num_classes + 1
    feats = torch.randn(num_classes * per, 2, generator=g, dtype=torch.float64) * torch.tensor(
        [radial_std, tangential_std], dtype=torch.float64
    )
    feats[:, 0] += 1.0
    labels = torch.arange(num_classes).repeat_interleave(per)
    angles = rads[labels] + rate * torch.exp(feats[:, 0])
    rot = torch.stack(
        [torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], 1
    ).reshape(-1, 2, 2)
    x = 2 * torch.einsum("ti,tij->tj", feats, rot)
    return x[torch.randperm(x.shape[0], generator=g)[:n]]


def _rings(n, g):
    sizes = [n // 4] * 3 + [n - 3 * (n // 4)]
    out = []
    for radius, m in zip((4.0, 3.0, 2.0, 1.0), sizes):
        ang = torch.linspace(0, 2 * math.pi, m + 1, dtype=torch.float64)[:-1]
        out.append(torch.stack([torch.cos(ang), torch.sin(ang)], 1) * radius)
    x = torch.cat(out, 0) + 0.08 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = x / 3.0 * 2  # to about the same scale as the others
    return x[torch.randperm(n, generator=g)]


def _swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
    x = x + 1.0 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x / 5.0


def _circles(n, g):
    n1 = n // 2
    ang = 2 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    radius = torch.ones(n, dtype=torch.float64)
    radius[n1:] = 0.5
    x = torch.stack([torch.cos(ang), torch.sin(ang)], 1) * radius[:, None]
    x = x + 0.08 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return 3.0 * x[torch.randperm(n, generator=g)]


_GENERATORS = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "swissroll": _swissroll,
    "circles": _circles,
}
TOY_DATASETS = tuple(_GENERATORS)

_LOG_PROBS = {"8gaussians": _eight_gaussians_log_prob, "checkerboard": _checkerboard_log_prob}

#: exact entropies in nats: checkerboard is uniform on 32 units of area (ln 32); 8gaussians is a
#: Monte-Carlo value with 2e6 draws of its exact mixture log-density (standard error about 5e-4).
ENTROPY = {"checkerboard": math.log(32.0), "8gaussians": 2.8314}


def toy_sample(name: str, n: int, seed: int = 0, dtype=torch.float32, device=None) -> torch.Tensor:
    """``n`` draws of the toy density ``name`` as a ``(n, 2)`` tensor (seeded, so reproducible)."""
    try:
        fn = _GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown toy data set {name!r}; expected one of {TOY_DATASETS}") from None
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return fn(n, _gen(seed)).to(dtype=dtype, device=device)


def toy_log_prob(name: str, x: torch.Tensor) -> torch.Tensor:
    """The exact log-density of ``name`` where it is known (``8gaussians``, ``checkerboard``)."""
    if name not in _LOG_PROBS:
        raise ValueError(f"no exact log-density for {name!r}; known for {tuple(_LOG_PROBS)}")
    return _LOG_PROBS[name](x).to(x.dtype)
