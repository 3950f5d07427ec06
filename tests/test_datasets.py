"""Tests of pyro_flows.datasets: toy generators, scikit-learn tables, and the MAF UCI loader."""

import math
import pickle

import numpy as np
import pytest
import torch

from pyro_flows.datasets import (
    ENTROPY, TABLE_DATASETS, TOY_DATASETS, load_table, load_uci, toy_log_prob, toy_sample,
)


@pytest.mark.parametrize("name", TOY_DATASETS)
def test_toy_shapes_and_seed(name):
    a = toy_sample(name, 300, seed=3)
    b = toy_sample(name, 300, seed=3)
    c = toy_sample(name, 300, seed=4)
    assert a.shape == (300, 2) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert toy_sample(name, 10, dtype=torch.float64).dtype == torch.float64


def test_entropy_floors_match_exact_log_densities():
    assert ENTROPY["checkerboard"] == pytest.approx(math.log(32))
    for name in ("8gaussians", "checkerboard"):
        x = toy_sample(name, 40000, seed=11, dtype=torch.float64)
        lp = toy_log_prob(name, x)
        assert torch.isfinite(lp).all()  # every sample lies in the support
        # Monte-Carlo entropy: standard error ~ sd(log p) / 200 (< 0.006 here), so 0.03 is 5 SE
        assert (-lp.mean()).item() == pytest.approx(ENTROPY[name], abs=0.03)


def test_toy_errors():
    with pytest.raises(ValueError, match="unknown toy data set 'nope'"):
        toy_sample("nope", 10)
    with pytest.raises(ValueError, match="positive integer"):
        toy_sample("moons", 0)
    with pytest.raises(ValueError, match="no exact log-density"):
        toy_log_prob("moons", torch.zeros(1, 2))


@pytest.mark.parametrize("name,dim", [("breast_cancer", 30), ("wine", 13), ("digits", 64)])
def test_tables_split_and_standardised(name, dim):
    s = load_table(name, seed=0)
    n = sum(t.shape[0] for t in s)
    assert {t.shape[1] for t in s} == {dim}
    assert s.train.shape[0] == round(0.8 * n) and s.val.shape[0] == round(0.1 * n)
    assert s.train.mean(0).abs().max() < 1e-4
    assert (s.train.std(0, unbiased=False) - 1).abs().max() < 1e-3
    # held-out splits are standardised with the training moments, so they are only roughly standard
    assert s.test.mean(0).abs().mean() < 0.5
    # splits are disjoint: no test row appears in the training rows
    d = torch.cdist(s.test.double(), s.train.double())
    assert d.min() > 1e-6
    again = load_table(name, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(s, again))
    other = load_table(name, seed=1)
    assert not torch.equal(s.train, other.train)


def test_digits_are_dequantised():
    s = load_table("digits", seed=0, dtype=torch.float64)
    # integer pixels 0..16 would give at most 17 distinct values per column; dequantised ones are all distinct
    col = s.train[:, 20]
    assert torch.unique(col).numel() == col.numel()


def test_table_errors():
    with pytest.raises(ValueError, match="unknown table 'iris'"):
        load_table("iris")
    with pytest.raises(ValueError, match="fractions"):
        load_table("wine", fractions=(0.5, 0.5, 0.5))
    assert set(TABLE_DATASETS) == {"breast_cancer", "wine", "digits"}


def test_uci_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown UCI data set"):
        load_uci("mnist", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_uci("power", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not downloaded"):
        load_uci("power", str(tmp_path))


def test_uci_power_and_miniboone(tmp_path):
    rng = np.random.RandomState(0)
    (tmp_path / "power").mkdir()
    np.save(tmp_path / "power" / "data.npy", rng.randn(1000, 8) * 3 + 1)
    s = load_uci("POWER", str(tmp_path))
    # MAF drops 2 of 8 columns (POWER is 6-D); 10% splits
    assert [t.shape for t in s] == [(810, 6), (90, 6), (100, 6)]
    both = torch.cat([s.train, s.val]).double()
    assert both.mean(0).abs().max() < 1e-5 and (both.std(0, unbiased=False) - 1).abs().max() < 1e-4
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", rng.randn(500, 43))
    s = load_uci("miniboone", str(tmp_path), dtype=torch.float64)
    assert [t.shape for t in s] == [(405, 43), (45, 43), (50, 43)]
    assert s.train.dtype == torch.float64


def test_uci_gas_drops_correlated_columns(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.RandomState(0)
    n = 400
    cols = {"Meth": rng.randn(n), "Eth": rng.randn(n), "Time": np.arange(n)}
    base = rng.randn(n)
    cols["a"] = base
    cols["b"] = base + 1e-3 * rng.randn(n)  # correlation > 0.98 with "a": one of them is dropped
    for k in "cdef":
        cols[k] = rng.randn(n)
    (tmp_path / "gas").mkdir()
    with open(tmp_path / "gas" / "ethylene_CO.pickle", "wb") as f:
        pickle.dump(pd.DataFrame(cols), f)
    s = load_uci("gas", str(tmp_path))
    assert s.train.shape[1] == 5  # a/b -> one, plus c, d, e, f
    assert sum(t.shape[0] for t in s) == n
