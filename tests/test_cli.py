"""Tests of ``python -m pyro_flows``: help, the demo in a tiny mode, errors, and the bench entry point."""

import json
import os
import subprocess
import sys

import pytest

import pyro_flows
from pyro_flows.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _family():
    # any registered family must work; before one lands, a Pyro baseline keeps the test meaningful
    return pyro_flows.FLOWS[0] if pyro_flows.FLOWS else "pyro.affine_coupling"


def test_help_via_module_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "pyro_flows", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    for opt in ("--family", "--dataset", "--steps", "--device", "--output", "--seed", "--time-budget"):
        assert opt in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "pyro_flows", "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert r.returncode == 0 and "demo" in r.stdout and "bench" in r.stdout


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["demo", "--family", "no_such_flow"], "unknown flow family 'no_such_flow'"),
        (["demo", "--dataset", "no_such_data"], "unknown data set 'no_such_data'"),
        (["demo", "--steps", "0"], "steps must be >= 1"),
        (["demo", "--svi-guides", "AutoNothing"], "unknown SVI guide 'AutoNothing'"),
        (["demo", "--svi-seconds", "0"], "--svi-seconds must be positive"),
    ],
)
def test_bad_arguments_exit_with_clear_error(argv, msg, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--output", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert msg in err
    if "family" in msg:
        for name in pyro_flows.FLOWS:  # the message lists what is available
            assert name in err


@pytest.mark.slow
def test_demo_tiny_run_writes_table_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    fam = _family()
    rc = main(
        [
            "demo",
            "--family",
            fam,
            "--dataset",
            "8gaussians",
            "--steps",
            "3",
            "--svi-steps",
            "3",
            "--svi-guides",
            "AutoMultivariateNormal,AutoFlow",
            "--layers",
            "2",
            "--output",
            str(out),
            "--no-progress",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "test NLL" in printed and "PSIS k-hat" in printed and fam in printed and "eight schools, centred" in printed
    for f in (
        "results.md",
        "results.json",
        "density_8gaussians.png",
        "loss_curves.png",
        "guide_samples_eight_schools.png",
    ):
        assert (out / f).stat().st_size > 0, f
    res = json.loads((out / "results.json").read_text())
    (row,) = res["density"]
    assert row["family"] == fam and row["dataset"] == "8gaussians" and row["steps"] == 3
    assert row["floor"] == pytest.approx(2.8314)
    assert row["excess"] == pytest.approx(row["test_nll"] - row["floor"])
    mvn, flow = res["svi"]
    assert mvn["family"] == "AutoMultivariateNormal" and flow["family"].startswith("AutoFlow (")
    assert all(r["steps"] == 3 and r["k_hat"] == r["k_hat"] and r["elbo_se"] > 0 for r in res["svi"])
    assert all(r["mu_err"] >= 0 and r["tau_err"] >= 0 for r in res["svi"])
    md = (out / "results.md").read_text()
    assert f"| {fam} | 8gaussians | 3 |" in md
    with open(out / "density_8gaussians.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_bench_speed_and_nll_tiny(tmp_path, capsys):
    fam = _family()
    fams = [] if fam.startswith("pyro.") else ["--family", fam]
    rc = main(
        [
            "bench",
            "--what",
            "speed,nll",
            *fams,
            "--peers",
            "pyro.affine_coupling,pyro.affine_autoregressive",
            "--dims",
            "2",
            "--layers",
            "2",
            "--hidden",
            "8,8",
            "--batch",
            "32",
            "--repeats",
            "1",
            "--datasets",
            "8gaussians,wine",
            "--toy-steps",
            "2",
            "--table-steps",
            "2",
            "--eval-every",
            "1",
            "--results",
            str(tmp_path),
        ]
    )
    assert rc == 0
    speed = (tmp_path / "speed.md").read_text()
    assert "| pyro.affine_coupling | 2 |" in speed and "aten ops" in speed and "syncs (flow)" in speed
    summary = (tmp_path / "summary.md").read_text()
    assert "Benchmark summary" in summary and "density step D=2" in summary and "Test NLL" in summary
    for f in ("nll.md", "nll.png", "speed_density_vs_dim.png", "results.json"):
        assert (tmp_path / f).stat().st_size > 0
    data = json.loads((tmp_path / "results.json").read_text())
    for task in ("density", "guide"):
        rows = {r["flow"]: r for r in data["speed"] if r["task"] == task}
        assert set(rows) == set(data["families"]) | {"pyro.affine_coupling", "pyro.affine_autoregressive"}
        peers = [rows[p] for p in ("pyro.affine_coupling", "pyro.affine_autoregressive")]
        assert min(p["step_ratio"] for p in peers) == pytest.approx(1.0)  # ratios are to the best peer
        assert all(p["ops"] > 0 and p["syncs"] == 0 for p in peers)  # Pyro's flows make no host sync
    # each Pyro autoregressive peer runs in its cheap direction for the task
    direction = {(r["flow"], r["task"]): r["direction"] for r in data["speed"]}
    assert direction[("pyro.affine_autoregressive", "density")] == "density (t.inv)"
    assert direction[("pyro.affine_autoregressive", "guide")] == "natural"
    wine = [r for r in data["nll"] if r["dataset"] == "wine"]
    assert len(wine) == len(data["families"]) + 2
    assert all(
        r["best_step"] in (1, 2) for r in wine if r["val_nll"] is not None
    )  # early-stopping checkpoint


def test_bench_is_a_module_not_a_script():
    import pyro_flows.experiments.bench as bench

    assert bench.main is not None
    r = subprocess.run(
        [sys.executable, "-m", "pyro_flows", "bench", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert r.returncode == 0 and "--what" in r.stdout and "--family" in r.stdout


def test_bench_rejects_unknown_family_and_part(capsys):
    for argv, msg in (
        (["--family", "no_such_flow"], "unknown family 'no_such_flow'"),
        (["--what", "colour"], "unknown --what 'colour'"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["bench", *argv])
        assert e.value.code == 2
        assert msg in capsys.readouterr().err


def test_cuda_request_without_cuda_is_a_clear_error(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--device", "cuda", "--output", str(tmp_path)])
    assert e.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.slow
def test_demo_tiny_run_on_cuda(tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "demo_cuda"
    rc = main(
        [
            "demo",
            "--family",
            _family(),
            "--dataset",
            "checkerboard",
            "--steps",
            "2",
            "--svi-steps",
            "2",
            "--layers",
            "2",
            "--device",
            "cuda",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["device"] == "cuda" and len(res["density"]) == 1
    assert (out / "density_checkerboard.png").stat().st_size > 0
