"""Built-in toy densities (2-D) with their entropies, and loaders for real tables.

The generators follow the residual-flows / FFJORD toy data sets (``8gaussians``, ``checkerboard``,
``2spirals``, ``moons``, ``pinwheel``, ``rings``, ``swissroll``, ``circles``); all draw with a
``torch.Generator`` so a seed fixes the data. ``ENTROPY`` gives the exact differential entropy (in
nats) where it has a closed form or an accurate Monte-Carlo value: it is the floor of the expected
test NLL of any density model, so ``test NLL - entropy`` is a model's excess (a KL divergence).

Real tables (:func:`load_table`): scikit-learn's ``breast_cancer`` (569 x 30), ``wine`` (178 x 13) and
``digits`` (1797 x 64, integer pixels 0..16 dequantised by adding seeded ``U(0, 1)`` noise) ship inside the
scikit-learn wheel, so nothing is downloaded. Rows are shuffled with a fixed seed and split 80/10/10 into
train / validation / test; every split is standardised with the *training* mean and standard deviation
(so test NLLs are in standardised units, comparable between models but not with other papers' numbers).

The MAF UCI sets (:func:`load_uci`: ``power``, ``gas``, ``hepmass``, ``miniboone``, ``bsds300``) cannot be
downloaded here; the loader reads the preprocessed files of Papamakarios et al. (2017) from a path the user
gives (the layout of their ``data/`` folder, e.g. ``<root>/power/data.npy``) and applies the same cleaning,
splits and normalisation as the MAF code, so numbers are comparable with the literature.

References:
    Papamakarios, Pavlakou, Murray. Masked Autoregressive Flow for Density Estimation. NeurIPS 2017
    (data preprocessing: github.com/gpapamak/maf, ``datasets/``).

Example:
    >>> from pyro_flows.datasets import toy_sample, ENTROPY
    >>> x = toy_sample("checkerboard", 1000, seed=0)
    >>> x.shape, round(ENTROPY["checkerboard"], 4)
    (torch.Size([1000, 2]), 3.4657)
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "TOY_DATASETS", "ENTROPY", "toy_sample", "toy_log_prob",
    "TABLE_DATASETS", "UCI_DATASETS", "Split", "load_table", "load_uci",
]


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


# ---------------------------------------------------------------------------------------------
# real tables
# ---------------------------------------------------------------------------------------------
TABLE_DATASETS = ("breast_cancer", "wine", "digits")
UCI_DATASETS = ("power", "gas", "hepmass", "miniboone", "bsds300")


class Split(NamedTuple):
    """Train / validation / test tensors of shape ``(n, D)``."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor


def _to_split(train, val, test, dtype, device):
    return Split(*(torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)
                   for a in (train, val, test)))


def load_table(name: str, seed: int = 0, fractions=(0.8, 0.1, 0.1), dtype=torch.float32,
               device=None) -> Split:
    """A scikit-learn table, shuffled by ``seed``, split and standardised with the training moments.

    Arguments:
        name: one of ``TABLE_DATASETS`` (``"breast_cancer"``, ``"wine"``, ``"digits"``).
        seed: fixes the dequantisation noise (digits) and the shuffle, hence the splits.
        fractions: train / validation / test fractions (must sum to 1).
        dtype, device: of the returned tensors.

    Returns:
        a :class:`Split` ``(train, val, test)``.

    Example:
        >>> from pyro_flows.datasets import load_table
        >>> s = load_table("wine")
        >>> s.train.shape, s.val.shape, s.test.shape
        (torch.Size([142, 13]), torch.Size([18, 13]), torch.Size([18, 13]))
    """
    if name not in TABLE_DATASETS:
        raise ValueError(f"unknown table {name!r}; expected one of {TABLE_DATASETS}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions!r}")
    try:
        from sklearn import datasets as skd
    except ImportError:  # pragma: no cover - scikit-learn is a test/bench extra
        raise ImportError("load_table needs scikit-learn: pip install scikit-learn") from None
    x = getattr(skd, "load_" + name)().data.astype(np.float64)
    rng = np.random.RandomState(seed)
    if name == "digits":
        x = x + rng.uniform(0.0, 1.0, size=x.shape)  # dequantise the integer pixels 0..16
    x = x[rng.permutation(x.shape[0])]
    n = x.shape[0]
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    train, val, test = x[:n_train], x[n_train:n_train + n_val], x[n_train + n_val:]
    mu, sd = train.mean(0), train.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return _to_split((train - mu) / sd, (val - mu) / sd, (test - mu) / sd, dtype, device)


def _need(path):
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found. The MAF UCI data sets are not downloaded by pyro_flows; get the "
            "preprocessed files of Papamakarios et al. (https://zenodo.org/record/1161203) and pass the "
            "folder that holds power/, gas/, hepmass/, miniboone/ and BSDS300/ as root."
        )
    return path


def _split_tail(data, frac=0.1):
    n_test = int(frac * data.shape[0])
    test, rest = data[-n_test:], data[:-n_test]
    n_val = int(frac * rest.shape[0])
    return rest[:-n_val], rest[-n_val:], test


def _uci_power(root):
    data = np.load(_need(os.path.join(root, "power", "data.npy")))
    rng = np.random.RandomState(42)
    rng.shuffle(data)
    n = data.shape[0]
    data = np.delete(data, 3, axis=1)
    data = np.delete(data, 1, axis=1)
    voltage_noise = 0.01 * rng.rand(n, 1)
    gap_noise = 0.001 * rng.rand(n, 1)
    sm_noise = rng.rand(n, 3)
    time_noise = np.zeros((n, 1))
    data = data + np.hstack((gap_noise, voltage_noise, sm_noise, time_noise))
    train, val, test = _split_tail(data)
    both = np.vstack((train, val))
    mu, s = both.mean(0), both.std(0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _uci_gas(root):
    import pandas as pd

    data = pd.read_pickle(_need(os.path.join(root, "gas", "ethylene_CO.pickle")))
    data = data.drop(columns=["Meth", "Eth", "Time"])
    # drop one of every pair of columns with correlation > 0.98, as MAF does, until none is left
    while True:
        corr = (data.corr() > 0.98).to_numpy().sum(1)
        if not (corr > 1).any():
            break
        data = data.drop(columns=data.columns[int(np.argmax(corr > 1))])
    data = ((data - data.mean()) / data.std()).to_numpy()
    return _split_tail(data)


def _uci_hepmass(root):
    import pandas as pd
    from collections import Counter

    tr = pd.read_csv(_need(os.path.join(root, "hepmass", "1000_train.csv")), index_col=False)
    te = pd.read_csv(_need(os.path.join(root, "hepmass", "1000_test.csv")), index_col=False)
    tr = tr[tr[tr.columns[0]] == 1].drop(columns=tr.columns[0])  # signal events only
    te = te[te[te.columns[0]] == 1].drop(columns=te.columns[0])
    te = te.drop(columns=te.columns[-1])  # the test file has one extra column (MAF's note)
    mu, s = tr.mean(), tr.std()
    tr, te = ((tr - mu) / s).to_numpy(), ((te - mu) / s).to_numpy()
    keep = []
    for i, feature in enumerate(tr.T):  # drop features with too many repeated values
        counts = Counter(feature)
        if np.array([v for _, v in sorted(counts.items())])[0] <= 5:
            keep.append(i)
    tr, te = tr[:, keep], te[:, keep]
    n_val = int(0.1 * tr.shape[0])
    return tr[:-n_val], tr[-n_val:], te


def _uci_miniboone(root):
    data = np.load(_need(os.path.join(root, "miniboone", "data.npy")))
    train, val, test = _split_tail(data)
    both = np.vstack((train, val))
    mu, s = both.mean(0), both.std(0)
    return (train - mu) / s, (val - mu) / s, (test - mu) / s


def _uci_bsds300(root):
    path = _need(os.path.join(root, "BSDS300", "BSDS300.hdf5"))
    try:
        import h5py
    except ImportError:
        raise ImportError("loading BSDS300 needs h5py: pip install h5py") from None
    with h5py.File(path, "r") as f:
        return f["train"][:], f["validation"][:], f["test"][:]


_UCI = {"power": _uci_power, "gas": _uci_gas, "hepmass": _uci_hepmass,
        "miniboone": _uci_miniboone, "bsds300": _uci_bsds300}


def load_uci(name: str, root: str, dtype=torch.float32, device=None) -> Split:
    """A MAF UCI data set read from ``root`` (never downloaded), with MAF's preprocessing and splits.

    Arguments:
        name: one of ``UCI_DATASETS`` (case-insensitive).
        root: the folder holding ``power/data.npy``, ``gas/ethylene_CO.pickle``,
            ``hepmass/1000_{train,test}.csv``, ``miniboone/data.npy`` and ``BSDS300/BSDS300.hdf5``.

    Raises:
        ValueError: unknown name. FileNotFoundError: the file is not under ``root`` (says where to get it).

    Example:
        >>> from pyro_flows.datasets import load_uci
        >>> load_uci("power", "/data/maf")  # doctest: +SKIP
    """
    key = str(name).lower()
    if key not in _UCI:
        raise ValueError(f"unknown UCI data set {name!r}; expected one of {UCI_DATASETS}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"UCI root folder {root!r} does not exist")
    return _to_split(*_UCI[key](root), dtype, device)
