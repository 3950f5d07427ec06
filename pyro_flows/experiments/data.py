"""Data for the demo, the benchmarks and the tutorials: one place for every split.

* :func:`density_splits`: train / validation / test tensors of a 2-D toy density (seeded draws, with its
  exact entropy as the NLL floor) or of a real table (:func:`pyro_flows.datasets.load_table`).
* :func:`synthetic`: data in any dimension D for the speed benchmark (8gaussians at D = 2, a rotated
  product of bimodal marginals otherwise).
* :func:`ridge_sample` / :func:`ridge_log_prob`: a conditional density p(x | c) with a known log-density
  (a curved ridge whose width depends on c), for conditional density estimation.
* :func:`eight_schools`: the non-centred or centred eight-schools model of
  :mod:`pyro_flows.infer.posteriordb` with Rubin's data built in (no data directory needed).

Example:
    >>> from pyro_flows.experiments.data import density_splits
    >>> s = density_splits("8gaussians", n_train=100, n_val=50, n_test=50)
    >>> s.train.shape, s.val.shape, s.test.shape, round(s.floor, 4)
    (torch.Size([100, 2]), torch.Size([50, 2]), torch.Size([50, 2]), 2.8314)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from pyro_flows.datasets import ENTROPY, TABLE_DATASETS, TOY_DATASETS, load_table, toy_sample

__all__ = [
    "DATASETS",
    "DataSplits",
    "density_splits",
    "synthetic",
    "ridge_sample",
    "ridge_log_prob",
    "EIGHT_SCHOOLS",
    "eight_schools",
]

DATASETS = TOY_DATASETS + TABLE_DATASETS

#: Rubin (1981): SAT coaching effects y_j with standard errors sigma_j in eight schools.
EIGHT_SCHOOLS = {
    "J": 8,
    "y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    "sigma": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
}


class DataSplits(NamedTuple):
    """``train``, ``val``, ``test`` tensors ``(n, D)``; ``floor``: the exact entropy (nats) or None."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    floor: Optional[float]


def density_splits(
    name, seed=0, n_train=20000, n_val=2000, n_test=5000, device=None, dtype=torch.float32
) -> DataSplits:
    """Splits of data set ``name`` (a toy in ``TOY_DATASETS`` or a table in ``TABLE_DATASETS``).

    Toys: independent seeded draws (``seed``, ``seed + 10_000``, ``seed + 20_000``) of the sizes given.
    Tables: the shuffled 80/10/10 split of :func:`pyro_flows.datasets.load_table` (sizes fixed by the
    table), standardised with the training moments.
    """
    if name in TOY_DATASETS:
        train, test, val = (
            toy_sample(name, n, seed=seed + k, dtype=dtype, device=device)
            for n, k in ((n_train, 0), (n_test, 10_000), (n_val, 20_000))
        )
        return DataSplits(name, train, val, test, ENTROPY.get(name))
    if name in TABLE_DATASETS:
        s = load_table(name, seed=seed, dtype=dtype, device=device)
        return DataSplits(name, s.train, s.val, s.test, None)
    raise ValueError(f"unknown data set {name!r}; expected one of {DATASETS}")


def synthetic(dim, n, seed=0, dtype=torch.float32, device=None):
    """``n`` points in ``dim`` dimensions for the speed benchmark.

    ``8gaussians`` for ``dim == 2``; otherwise a fixed rotation (the same for every seed) of a product of
    bimodal marginals (``2^dim`` well-separated modes), scaled to unit variance.
    """
    if dim == 2:
        return toy_sample("8gaussians", n, seed=seed, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, dim), generator=g) * 2 - 1
    s = 1.5 * sign + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return (s @ q / 1.58).to(dtype=dtype, device=device)


def ridge_sample(n, generator=None):
    """``(x, c)`` of shapes (n, 2), (n, 1): c ~ U(-1, 1), x1 | c ~ N(c, 0.3),
    x2 | x1, c ~ N(sin(3 x1), 0.1 + 0.3 |c|)."""
    g = generator
    c = torch.rand(n, 1, generator=g) * 2 - 1
    x1 = c[:, 0] + 0.3 * torch.randn(n, generator=g)
    x2 = torch.sin(3 * x1) + (0.1 + 0.3 * c[:, 0].abs()) * torch.randn(n, generator=g)
    return torch.stack([x1, x2], -1), c


def ridge_log_prob(x, c):
    """The exact ``log p(x | c)`` of :func:`ridge_sample` (its mean over a test set is the NLL floor)."""
    import pyro.distributions as dist

    lp1 = dist.Normal(c[:, 0], 0.3).log_prob(x[:, 0])
    lp2 = dist.Normal(torch.sin(3 * x[:, 0]), 0.1 + 0.3 * c[:, 0].abs()).log_prob(x[:, 1])
    return lp1 + lp2


def eight_schools(dtype=torch.float32, device=None, centered=False):
    """The eight-schools model with Rubin's data: ``(model, latent_dim)``.

    ``model()`` takes no arguments (the data are closed over); its latent sites are ``mu``, ``tau`` and
    ``theta_trans`` (non-centred) or ``theta`` (``centered=True``: the funnel), 10 dimensions in all. It is
    the model of :mod:`pyro_flows.infer.posteriordb`, built here without the posteriordb data directory.
    """
    from pyro_flows.infer import posteriordb

    name = "eight_schools-eight_schools_" + ("centered" if centered else "noncentered")
    model, _, dim = posteriordb._BUILDERS[name](EIGHT_SCHOOLS, dtype, torch.device("cpu") if device is None else device)
    return model, dim
