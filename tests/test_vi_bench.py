"""The VI benchmark's code path (``bench --what vi``): snapshots on a CPU clock, parts and merge, the report's
verdicts and time-to-target. Nothing here depends on how fast anything trains."""

import contextlib
import json
import math
import os

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_flows.experiments import measure, vi
from pyro_flows.experiments.bench import main as bench_main
from pyro_flows.infer import AutoFlow
from pyro_flows.infer import posteriordb as pdb

needs_pdb = pytest.mark.skipif(not pdb.available(), reason="posteriordb data not found")
POST = "kilpisjarvi_mod-kilpisjarvi"  # D = 3, cheap


def _snap(t, elbo, se=0.01, mean=0.5, sd=0.5, khat=0.5, **kw):
    return {"t": t, "cpu_s": t, "steps": int(100 * t), "elbo": elbo, "elbo_se": se, "khat": khat,
            "mean_rms": mean, "mean_max": mean, "sd_rms": sd, "sd_max": sd, **kw}


def _row(post, guide, snaps, tier="long", status="ok", **kw):
    return {"posterior": post, "guide": guide, "label": guide, "tier": tier, "dim": 3, "snapshots": snaps,
            "status": status, **kw}


def test_time_to_target_uses_tolerance_and_reports_the_gap():
    row = _row("p", "g", [_snap(1.0, -12.0), _snap(10.0, -10.15), _snap(30.0, -10.05)])
    assert vi.time_to_target(row, (-10.0, 0.01)) == (30.0, pytest.approx(-0.05))
    assert vi.time_to_target(row, (-10.0, 0.01), tol=0.2) == (10.0, pytest.approx(-0.15))
    # a noisy target widens the tolerance to two standard errors of the difference
    assert vi.time_to_target(row, (-10.0, 0.1), tol=0.1)[0] == 10.0
    never, gap = vi.time_to_target(row, (-9.0, 0.0))
    assert never is None and gap == pytest.approx(-1.05)


def test_headline_verdicts_margin_and_missing_fits():
    names = ["a-a", "b-b", "c-c", "d-d"]
    rows = []
    for p, (fm, fs) in zip(names[:3], [(0.10, 0.10), (0.20, 0.05), (0.12, 0.12)]):
        rows.append(_row(p, "AutoMultivariateNormal", [_snap(30.0, -1.0, mean=0.10, sd=0.10)]))
        rows.append(_row(p, "AutoFlow", [_snap(30.0, -1.0, mean=fm, sd=fs)]))
    rows.append(_row("d-d", "AutoMultivariateNormal", [_snap(30.0, -1.0)]))
    rows.append(_row("d-d", "AutoFlow", [], status="nonfinite", nonfinite_step=7, nonfinite_s=0.5))
    meta = {"posteriors": names, "table_times": [10.0, 30.0, 120.0]}
    table, lines = vi.headline(rows, meta)
    verdict = {r["posterior"]: r["verdict"] for r in table}
    assert verdict["a"].startswith("tie")
    assert verdict["b"] == "AutoMVN better"  # mean error worse by 0.10 although sd error is better
    assert verdict["c"].startswith("tie")  # 0.02 worse: within the margin
    assert "non-finite loss at step 7" in verdict["d"]
    assert "on 2 of 4 posteriors; worse on: b, d" in lines[0]
    assert "on 0 of 4" in lines[1]


def test_headline_reports_the_median_khat_where_a_fit_has_several():
    sets = [0.9, 0.6, 0.5, 0.62, 0.75]
    rows = [_row("eight_schools-eight_schools_centered", "AutoMultivariateNormal", [_snap(30.0, -1.0, khat=0.8)]),
            _row("eight_schools-eight_schools_centered", "AutoFlow",
                 [_snap(30.0, -1.0, khat=0.9, khat_sets=sets, khat_median=0.62,
                        per_param={"mu": [0.01, 0.02], "tau": [0.1, 0.05]})])]
    table, lines = vi.headline(rows, {"posteriors": ["eight_schools-eight_schools_centered"], "table_times": [30.0]})
    assert table[0]["flow_khat"] == 0.62 and table[0]["mvn_khat"] == 0.8  # an older fit: its one estimate
    line = next(ln for ln in lines if ln.startswith("- eight_schools_centered"))
    assert "k-hat 0.62 (median of 5 estimates" in line and "0.90, 0.60, 0.50, 0.62, 0.75" in line
    assert "k-hat 0.80 (one estimate)" in line


def test_headline_compares_with_the_scheduled_automultivariatenormal():
    """The honesty row: AutoMultivariateNormal trained with AutoFlow's optimiser, counted separately."""
    rows = []
    for p, (sm, ss) in zip(["a-a", "b-b"], [(0.05, 0.10), (0.10, 0.20)]):
        rows.append(_row(p, "AutoMultivariateNormal", [_snap(30.0, -1.0, mean=0.30, sd=0.30)]))
        rows.append(_row(p, "AutoFlow", [_snap(30.0, -1.0, mean=0.10, sd=0.10)]))
        rows.append(_row(p, vi.SCHEDULED_MVN, [_snap(30.0, -1.0, mean=sm, sd=ss)]))
    table, lines = vi.headline(rows, {"posteriors": ["a-a", "b-b"], "table_times": [30.0]})
    assert [r["mvn_sched"] for r in table] == ["0.050 / 0.100", "0.100 / 0.200"]
    assert "on 2 of 2" in lines[1]  # against plain AutoMultivariateNormal
    line = next(ln for ln in lines if vi.SCHEDULED_MVN in ln)
    assert "AutoFlow better on 1, worse on 1, within 0.03 sd on 0 of 2" in line


def test_cpu_clock_pauses_evaluation_out():
    clock = measure.CpuClock()
    t0 = clock()
    with clock.paused():
        torch.randn(200, 200) @ torch.randn(200, 200)
        sum(range(300_000))
    assert clock() - t0 < 0.02


def test_nonfinite_loss_is_recorded_not_raised():
    def model():
        x = pyro.sample("x", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0))
        pyro.factor("broken", x.new_tensor(math.inf) + x)  # loss -inf from the first step

    post = pdb.Posterior(name="broken", model=model, reference={"x": np.random.randn(100)}, sites=["x"], dim=1)
    row = vi.fit_with_snapshots(post, "AutoNormal", [0.5], draws=20, table_draws=20)
    assert row["status"] == "nonfinite" and row["nonfinite_step"] == 1 and row["snapshots"] == []
    assert "non-finite loss at step 1" in vi._status_text(row)


class _StepClock:
    """A clock that advances 1/64 s (exact in binary) per reading (once per training step), paused like CpuClock."""

    def __init__(self):
        self.t, self.running = 0.0, True

    def __call__(self):
        self.t += 2.0**-6 if self.running else 0.0
        return self.t

    @contextlib.contextmanager
    def paused(self):
        self.running = False
        yield self
        self.running = True


@needs_pdb
def test_fit_with_snapshots_continues_one_run():
    post = pdb.load_posterior(POST)
    row = vi.fit_with_snapshots(post, "AutoMultivariateNormal", [0.125, 0.375], table_times=[0.375], draws=50,
                                table_draws=100, clock=_StepClock())
    assert row["status"] == "ok", row
    a, b = row["snapshots"]
    assert (a["t"], b["t"]) == (0.125, 0.375)
    # one run, evaluation paused out: the snapshots come after 8 and 24 clock ticks of training
    assert (a["steps"], b["steps"], row["steps"]) == (8, 24, 24)
    assert (a["cpu_s"], b["cpu_s"]) == (0.125, 0.375)
    assert "per_param" in b and "per_param" not in a and set(b["per_param"]) == set(post.reference)
    assert all(math.isfinite(s[k]) for s in (a, b) for k in ("mean_rms", "sd_rms"))
    assert not any(math.isnan(s[k]) for s in (a, b) for k in ("elbo", "khat"))
    # the table time's k-hat is also estimated from further independent sets of draws, and their median kept
    assert "khat_sets" not in a and len(b["khat_sets"]) == vi.KHAT_SETS and b["khat_sets"][0] == b["khat"]
    assert b["khat_median"] == float(np.median(b["khat_sets"]))  # (inf at 50 draws of this barely trained guide)


@needs_pdb
def test_evaluate_guide_khat_sets_are_independent_draws():
    post = pdb.load_posterior(POST)
    pyro.clear_param_store()
    torch.manual_seed(0)
    guide = AutoFlow(post.model)  # the Laplace start: near this posterior, so every k-hat is finite
    guide()
    ev = vi.evaluate_guide(post, guide, 500, 100, khat_sets=3)
    assert len(ev["khat_sets"]) == 3 and ev["khat_sets"][0] == ev["khat"]
    assert all(math.isfinite(k) for k in ev["khat_sets"]) and len(set(ev["khat_sets"])) == 3
    assert ev["khat_median"] == sorted(ev["khat_sets"])[1]


@needs_pdb
def test_bench_vi_parts_then_merge_writes_report(tmp_path, capsys):
    common = ["bench", "--what", "vi", "--posteriors", POST, "--seconds", "0.2,0.4", "--draws", "50",
              "--table-draws", "100", "--results", str(tmp_path)]
    assert bench_main(common[1:] + ["--tier", "long", "--guides", "AutoMultivariateNormal,AutoFlow",
                                    "--results-part", "long"]) == 0
    assert bench_main(common[1:] + ["--tier", "short", "--guides", "qlf", "--results-part", "short"]) == 0
    assert not (tmp_path / "vi" / "vi.md").exists()
    assert bench_main(["--what", "vi", "--merge", "--results", str(tmp_path)]) == 0
    out = tmp_path / "vi"
    data = json.loads((out / "results.json").read_text())
    fits = {(r["tier"], r["guide"]): r for r in data["rows"]}
    assert set(fits) == {("long", "AutoMultivariateNormal"), ("long", "AutoFlow"), ("short", "qlf")}
    assert [s["t"] for s in fits[("long", "AutoFlow")]["snapshots"]] == [0.2, 0.4]
    assert [s["t"] for s in fits[("short", "qlf")]["snapshots"]] == [0.2, 0.4]
    md = (out / "vi.md").read_text()
    assert "default AutoFlow against AutoMultivariateNormal" in md and "| kilpisjarvi | 3 |" in md
    assert "CPU seconds to reach AutoMultivariateNormal's ELBO" in md and "short tier" in md
    assert (out / "vi_kilpisjarvi.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_orders_parts_by_finish_time_not_file_mtime(tmp_path, monkeypatch):
    """A later run's row replaces an earlier one's even when a checkout gave the files other mtimes."""
    import os

    from pyro_flows.experiments import vi

    parts = tmp_path / "vi" / "parts"
    parts.mkdir(parents=True)

    def write(name, finished, value, mtime):
        meta = {"header": "Machine: m\nCommand: `x`", "posteriors": ["p"], "table_times": [30.0],
                "short_seconds": 30.0, "draws": 10, "table_draws": 10, "wall_minutes": 1.0}
        if finished is not None:
            meta["finished"] = finished
        row = {"posterior": "p", "tier": "short", "guide": "qlf", "value": value}
        path = parts / f"{name}.json"
        path.write_text(json.dumps({"meta": meta, "rows": [row]}))
        os.utime(path, (mtime, mtime))

    write("a_new", "2026-11-30T11:00:00Z", "new", mtime=1.0)   # finished last, oldest file
    write("b_old", "2026-11-29T09:00:00Z", "old", mtime=3.0)
    write("c_legacy", None, "legacy", mtime=2.0)                # no timestamp: merged first
    seen = {}
    monkeypatch.setattr(vi, "write_vi_report", lambda rows, meta, out: seen.update(rows=rows, meta=meta) or [])
    vi._merge(str(tmp_path / "vi"), "", lambda *a: None)
    assert [r["value"] for r in seen["rows"]] == ["new"]
    assert seen["meta"]["header"].endswith("Merged from c_legacy.json (1 wall min), b_old.json (1 wall min), "
                                           "a_new.json (1 wall min).")


def test_particle_bench_times_every_guide_in_its_own_scope(tmp_path):
    """The particle benchmark times all guides round robin, each with its own parameters (two AutoFlows would
    otherwise share "AutoFlow.loc"), and leaves the caller's param store as it was."""
    import argparse

    pyro.clear_param_store()
    pyro.param("mine", torch.ones(2))
    args = argparse.Namespace(particles="1,4", family=["qlf"], quick=True, device="cpu", results=str(tmp_path))
    rows, files = vi.run_particles(args, "header", log=lambda *a: None)
    by = {r["guide"]: r for r in rows}
    assert set(by) == {"AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoFlow", "qlf"}
    for r in rows:
        assert "error" not in r, r
        for n in ("1", "4"):
            assert r[n] > 0 and r[f"ratio_{n}"] > 0
    assert by["AutoIAFNormal"]["ratio_1"] == 1.0
    assert list(pyro.get_param_store().keys()) == ["mine"]
    assert all(os.path.exists(f) for f in files)
