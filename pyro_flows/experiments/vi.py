"""VI benchmarks: flow guides against Pyro's Gaussian guides per CPU second (``bench --what vi``), and SVI
particle scaling (``bench --what particles``).

``vi`` answers "for the same compute, does a flow guide give a better posterior than ``AutoNormal`` or
``AutoMultivariateNormal``?" on the posteriordb subset (:mod:`pyro_flows.infer.posteriordb`, nine
posteriors with 10,000 reference draws each). Two tiers:

* ``long``: ``AutoNormal``, ``AutoMultivariateNormal`` and the default ``AutoFlow(model)`` (and
  ``AutoIAFNormal`` when asked for with ``--guides``), trained up to the largest ``--seconds`` (default
  120 s), with snapshots at log-spaced times (1, 2, 5, 10, 20, 30, 60, 120 s and the ``--seconds``).
* ``short``: ``AutoFlow(model, family)`` of every registered family with its defaults (the sizes users
  get), trained up to 30 s (the ``--seconds`` up to 30), with the same snapshots.

The clock is the process's CPU time with one torch thread (:class:`~pyro_flows.experiments.measure.CpuClock`):
on a shared machine wall time charges a fit for whatever else runs. One SVI run per fit (Trace_ELBO, one
particle; :func:`~pyro_flows.experiments.trainer.train_svi`) continues through all snapshots, optimiser
state included; the evaluation at a snapshot is paused out of the clock and leaves the random stream of
the training as it was. At each snapshot: the ELBO (mean log importance weight) with its standard error
and the PSIS k-hat from ``--draws`` guide draws (at the table times the median of :data:`KHAT_SETS` estimates
from independent sets of draws); mean and sd errors against the reference draws (in
reference sds; rms and max over parameters) from ``--draws`` draws, ``--table-draws`` at the table times
(``--seconds``), where the per-parameter errors are kept too. A non-finite loss ends the fit and is
recorded (step and time). Optimisers: Adam lr 0.02 for the Gaussian guides (and IAF); ``AutoFlow``'s own
optimiser factory for AutoFlow and for ``"AutoMultivariateNormal+schedule"`` (asked for with ``--guides``:
AutoMultivariateNormal with the same rate schedule). Everything in float64.

The report (``vi.md``, ``results.json``, one ``vi_<posterior>.png`` per posterior: errors against CPU
time, log x) puts first the comparison the user asks for: at 30 s, default ``AutoFlow`` against
``AutoMultivariateNormal``; then the time each guide needs to reach AutoMultivariateNormal's ELBO at its
last snapshot (snapshot resolution), the per-family short tier (non-finite losses included) and the full
tables.

Separate processes may run separate tiers or posteriors (``--results-part NAME`` writes
``vi/parts/NAME.json`` only); ``--merge`` then writes the report from every part.

``particles``: SVI steps per second against the number N of vectorised ELBO particles on a hierarchical
regression with a data plate (latent dimension 12; flows see ``(N, 1, D)``), as a ratio to AutoIAFNormal.
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyro_flows.experiments import measure, reports
from pyro_flows.experiments.models import GUIDE_BASELINES, make_guide

__all__ = [
    "TIERS",
    "SNAPSHOT_GRID",
    "build_guide",
    "evaluate_guide",
    "fit_with_snapshots",
    "run_vi",
    "vi_markdown",
    "time_to_target",
    "run_particles",
    "regression_data",
    "regression_model",
]

#: The tiers: guides to fit and the longest budget (seconds of CPU time; None: the largest ``--seconds``).
TIERS = {
    "long": {"guides": ("AutoNormal", "AutoMultivariateNormal", "AutoFlow"), "max_seconds": None},
    "short": {"guides": None, "max_seconds": 30.0},  # None: every registered family
}
#: Snapshot times (CPU seconds) besides the table times.
SNAPSHOT_GRID = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
#: The Gaussian guides' (and IAF's) optimiser: Adam with this learning rate, initial scale 0.1.
BASELINE_LR = 0.02
#: AutoMultivariateNormal trained with ``AutoFlow.optimizer()`` (the same rate and rate schedule as
#: AutoFlow's affine part): how much of AutoFlow's gain is the schedule rather than the flow.
SCHEDULED_MVN = "AutoMultivariateNormal+schedule"
#: The default AutoFlow with its flow never switched on: its Gaussian part alone (the Laplace start, its frame
#: and the rate schedule), so what the flow layers add shows separately from what the start gives.
FLOW_OFF = "AutoFlow (flow off)"
#: guides that are there to show where a gain comes from (never the default AutoFlow's competitors)
HONESTY_GUIDES = (SCHEDULED_MVN, FLOW_OFF)
#: ELBO tolerance of the time-to-target: reached when ``elbo >= target - max(TARGET_TOL, 2 * se)``, ``se`` the
#: standard error of the difference of the two ELBO estimates.
TARGET_TOL = 0.1
#: Margin by which a guide must beat another on an error (reference sds) to count as better.
WIN_MARGIN = 0.03
#: At the table times the PSIS k-hat is estimated from this many independent sets of ``draws`` guide draws and
#: the median reported: one estimate from 2000 draws scatters by +-0.15 around 0.7 on a funnel (the largest
#: weights come from rare draws near the neck, and ten times more draws in one set do not narrow it), so one
#: estimate cannot decide ``k-hat < 0.7`` there (``docs/autoflow.md``).
KHAT_SETS = 5


# ---------------------------------------------------------------------------------------------
# guides
# ---------------------------------------------------------------------------------------------
def _autoflow(model, family=None, **kwargs):
    """``AutoFlow(model)`` (``family=None``: the default family) or ``AutoFlow(model, family)``, with
    ``AutoFlow.optimizer()``; returns ``(guide, optimiser, label)``."""
    from pyro_flows.infer import AutoFlow

    guide = AutoFlow(model, **kwargs) if family is None else AutoFlow(model, family, **kwargs)
    spec = guide._flow_spec
    name = spec if isinstance(spec, str) else getattr(spec, "__name__", type(spec).__name__)
    return guide, AutoFlow.optimizer(), f"AutoFlow ({name})" if family is None else name


def build_guide(kind, model):
    """``(guide, pyro optimiser, label)`` for ``kind``: ``"AutoNormal"``, ``"AutoMultivariateNormal"``,
    ``"AutoIAFNormal"`` (Pyro's defaults, initial scale 0.1 for the Gaussian ones, Adam lr
    :data:`BASELINE_LR`), ``"AutoFlow"`` (the default ``AutoFlow(model)``) or a family name
    (``AutoFlow(model, family)`` with its defaults); AutoFlow with its own optimiser factory.

    Example:
        >>> import torch, pyro, pyro.distributions as dist
        >>> def model():
        ...     pyro.sample("x", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        >>> guide, optim, label = build_guide("AutoMultivariateNormal", model)
        >>> label
        'AutoMultivariateNormal'
    """
    from pyro.infer import autoguide

    import pyro_flows

    if kind in ("AutoNormal", "AutoMultivariateNormal"):
        return getattr(autoguide, kind)(model, init_scale=0.1), pyro.optim.Adam({"lr": BASELINE_LR}), kind
    if kind == SCHEDULED_MVN:
        from pyro_flows.infer import AutoFlow

        return autoguide.AutoMultivariateNormal(model, init_scale=0.1), AutoFlow.optimizer(lr=BASELINE_LR), kind
    if kind == "AutoIAFNormal":
        return autoguide.AutoIAFNormal(model), pyro.optim.Adam({"lr": BASELINE_LR}), kind
    if kind == "AutoFlow":
        return _autoflow(model)
    if kind == FLOW_OFF:
        guide, optim, _ = _autoflow(model, warmup=10**12)
        return guide, optim, kind
    if kind in pyro_flows.FLOWS:
        return _autoflow(model, kind)
    raise ValueError(f"unknown guide {kind!r}; expected AutoNormal, AutoMultivariateNormal, AutoIAFNormal, "
                     f"AutoFlow or a family in {pyro_flows.FLOWS}")


# ---------------------------------------------------------------------------------------------
# one fit with snapshots
# ---------------------------------------------------------------------------------------------
def _draws(post, guide, n, chunk):
    from pyro_flows.infer import flatten_draws, guide_draws

    parts = [flatten_draws(guide_draws(post.model, guide, num_samples=min(chunk, n - i), sites=post.sites))
             for i in range(0, n, chunk)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluate_guide(post, guide, draws=2000, moment_draws=None, seed=0, per_param=False, chunk=1000, khat_sets=1,
                   khat_draws=None):
    """ELBO (and its standard error), PSIS k-hat from ``draws`` guide draws; mean and sd errors against
    ``post.reference`` from ``moment_draws`` (default ``draws``) draws; ``per_param``: keep every
    parameter's ``[mean_err, sd_err]``. Vectorised in chunks of ``chunk`` draws. ``khat_sets > 1``: also the
    k-hat of ``khat_sets - 1`` further independent sets of ``khat_draws`` (default ``draws``) draws, set ``k``
    drawn after ``torch.manual_seed(seed + 1000 k)`` (``khat_sets``: all of them, the first is ``khat``), and
    their median (``khat_median``)."""
    from pyro_flows.infer import compare_draws, elbo_estimate, importance_log_weights, psis_khat

    torch.manual_seed(seed)
    lw = importance_log_weights(post.model, guide, num_samples=draws, max_plate_nesting=0, chunk_size=chunk)
    e = elbo_estimate(lw)
    out = {"elbo": e["elbo"], "elbo_se": e["elbo_se"], "khat": psis_khat(log_weights=lw),
           "finite_weights": float(torch.isfinite(lw).double().mean())}
    c = compare_draws(_draws(post, guide, moment_draws or draws, chunk), post.reference)
    out.update(mean_rms=c["mean_err_rms"], mean_max=c["mean_err_max"], sd_rms=c["sd_err_rms"],
               sd_max=c["sd_err_max"])
    if per_param:
        out["per_param"] = {k: [v["mean_err"], v["sd_err"]] for k, v in c["per_param"].items()}
    if khat_sets > 1:
        sets = [out["khat"]]
        for k in range(1, khat_sets):
            torch.manual_seed(seed + 1000 * k)
            more = importance_log_weights(post.model, guide, num_samples=khat_draws or draws, max_plate_nesting=0,
                                          chunk_size=chunk)
            sets.append(psis_khat(log_weights=more))
        out.update(khat_sets=sets, khat_median=float(np.median(sets)))
    return out


def snapshot_times(table_times, budget):
    """The grid points up to ``budget`` together with the table times up to ``budget``, sorted."""
    return sorted({t for t in SNAPSHOT_GRID if t <= budget} | {t for t in table_times if t <= budget})


def fit_with_snapshots(post, kind, times, table_times=(), draws=2000, table_draws=10000, seed=0, tier="long",
                       clock=None):
    """Fit guide ``kind`` (see :func:`build_guide`) to ``post`` by SVI for ``max(times)`` CPU seconds and
    evaluate (:func:`evaluate_guide`) at each of ``times`` (the first step whose clock reaches it); returns
    a row ``{"posterior", "guide", "label", "tier", "dim", "snapshots": [...], "status", ...}``.
    ``status``: ``"ok"``, ``"nonfinite"`` (a non-finite loss ended the fit: ``nonfinite_step``,
    ``nonfinite_s``) or ``"error"`` (an exception; ``error``); ``flow_on_step`` / ``flow_on_s``: when an
    ``AutoFlow``'s warmup ended (1: the flow ran from the start). ``clock``: the training clock (default a
    :class:`~pyro_flows.experiments.measure.CpuClock`; anything with ``__call__`` and ``paused()``)."""
    from pyro_flows.experiments.trainer import train_svi

    row = {"posterior": post.name, "guide": kind, "label": kind, "tier": tier, "dim": post.dim, "snapshots": []}
    pending = sorted(float(t) for t in times)
    table = {float(t) for t in table_times}
    clock = measure.CpuClock() if clock is None else clock

    def callback(info):
        if "flow_on_step" not in row and getattr(guide, "flow_on", False):  # AutoFlow's warmup ended
            row.update(flow_on_step=info.step + 1, flow_on_s=info.elapsed)
        due = []
        while pending and info.elapsed >= pending[0]:
            due.append(pending.pop(0))
        if due:
            with clock.paused():
                state = torch.get_rng_state()
                is_table = any(t in table for t in due)
                try:
                    ev = evaluate_guide(post, guide, draws, table_draws if is_table else draws, seed=seed + 1,
                                        per_param=is_table, khat_sets=KHAT_SETS if is_table else 1)
                except Exception as exc:  # e.g. a guide whose parameters went non-finite
                    row["error"] = f"evaluation at {due[0]:g} s: {type(exc).__name__}: {str(exc)[:120]}"
                    return True
                finally:
                    torch.set_rng_state(state)
            for t in due:
                row["snapshots"].append({"t": t, "cpu_s": info.elapsed, "steps": info.step + 1, **ev})
        return not pending

    try:
        pyro.clear_param_store()
        torch.manual_seed(seed)
        guide, optim, row["label"] = build_guide(kind, post.model)
        res = train_svi(post.model, guide, (), steps=10**9, optim=optim, seed=seed, callback=callback,
                        clock=clock, max_plate_nesting=0)
        row.update(steps=res.steps, train_s=res.seconds, status="error" if "error" in row else "ok")
        if res.stopped_by == "nonfinite":
            row.update(status="nonfinite", nonfinite_step=res.steps + 1, nonfinite_s=res.seconds)
    except Exception as exc:  # a failing guide is a result, not a crash
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:160]}")
    return row


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def _snap(row, t):
    """The snapshot of ``row`` at time ``t`` (None if the fit did not get there)."""
    return next((s for s in row.get("snapshots", ()) if s["t"] == t), None) if row else None


def _row(rows, posterior, guide, tier=None):
    return next((r for r in rows if r["posterior"] == posterior and r["guide"] == guide
                 and (tier is None or r["tier"] == tier)), None)


def time_to_target(row, target, tol=TARGET_TOL):
    """CPU seconds (snapshot resolution) at which ``row`` first reaches ``target = (elbo, se)``: its ELBO
    at least ``target - max(tol, 2 se_diff)``; None if never. Returns ``(seconds or None, best gap)``."""
    best = -math.inf
    for s in row.get("snapshots", ()):
        if not math.isfinite(s["elbo"]):
            continue
        se = math.sqrt((s.get("elbo_se") or 0.0) ** 2 + (target[1] or 0.0) ** 2)
        gap = s["elbo"] - target[0]
        best = max(best, gap)
        if gap >= -max(tol, 2 * se if math.isfinite(se) else 0.0):
            return s["t"], best
    return None, best


def _target(rows, posterior):
    """AutoMultivariateNormal's ELBO at its last snapshot (long tier first): ``((elbo, se), t)``."""
    r = _row(rows, posterior, "AutoMultivariateNormal", "long") or _row(rows, posterior, "AutoMultivariateNormal")
    if not r or not r.get("snapshots"):
        return None, None
    s = r["snapshots"][-1]
    return (s["elbo"], s.get("elbo_se") or 0.0), s["t"]


def _decision_time(meta):
    """The table time the headline comparison uses: 30 s, else the largest table time up to 30 s."""
    ts = sorted(meta["table_times"])
    return 30.0 if 30.0 in ts else max([t for t in ts if t <= 30.0] or ts[:1])


def _fmt(v, f="{:.3f}"):
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)


def _status_text(row):
    if row["status"] == "nonfinite":
        return f"non-finite loss at step {row['nonfinite_step']} ({row['nonfinite_s']:.1f} s)"
    if row["status"] == "error":
        return row.get("error", "error")
    return ""


def headline(rows, meta):
    """Per posterior at the decision time: default AutoFlow against AutoMultivariateNormal; returns
    ``(table rows, verdict lines)``."""
    t = _decision_time(meta)
    table, worse, better, sched, off = [], [], [], [], []
    for p in meta["posteriors"]:
        f, m, n = (_snap(_row(rows, p, g, "long"), t) for g in ("AutoFlow", "AutoMultivariateNormal", "AutoNormal"))
        ms = _snap(_row(rows, p, SCHEDULED_MVN, "long"), t)
        fo = _snap(_row(rows, p, FLOW_OFF, "long"), t)
        fr = _row(rows, p, "AutoFlow", "long")
        r = {"posterior": p.split("-")[-1], "dim": (fr or {}).get("dim")}
        if n:
            r["normal"] = f"{n['mean_rms']:.3f} / {n['sd_rms']:.3f}"
        if ms:
            r["mvn_sched"] = f"{ms['mean_rms']:.3f} / {ms['sd_rms']:.3f}"
            if f:
                sched.append(_verdict(f, ms))
        if fo:
            r["flow_off"] = f"{fo['mean_rms']:.3f} / {fo['sd_rms']:.3f}"
            if f:
                off.append(_verdict(f, fo))
        if m:
            r.update(mvn_mean=m["mean_rms"], mvn_sd=m["sd_rms"], mvn_khat=_khat(m), mvn_elbo=m["elbo"])
        if f:
            r.update(flow_mean=f["mean_rms"], flow_sd=f["sd_rms"], flow_khat=_khat(f), flow_elbo=f["elbo"])
        if f and m:
            v = _verdict(f, m)
            if v > 0:
                r["verdict"] = "AutoMVN better"
                worse.append(r["posterior"])
            elif v < 0:
                r["verdict"] = "AutoFlow better"
                better.append(r["posterior"])
            else:
                r["verdict"] = f"tie (within {WIN_MARGIN})"
        else:
            r["verdict"] = "missing: " + (_status_text(fr) if fr and not f else "no AutoFlow/AutoMVN snapshot")
            worse.append(r["posterior"])
        table.append(r)
    n = len(meta["posteriors"])
    lines = [
        f"- No worse than AutoMultivariateNormal (both errors within {WIN_MARGIN} sd) on "
        f"{n - len(worse)} of {n} posteriors" + (f"; worse on: {', '.join(worse)}" if worse else "") + ".",
        f"- Better (one error lower by more than {WIN_MARGIN} sd, neither higher) on {len(better)} of {n}"
        + (f": {', '.join(better)}" if better else "") + ".",
    ]
    if sched:
        lines.append(f"- Against {SCHEDULED_MVN} (AutoMultivariateNormal trained with `AutoFlow.optimizer()`, the "
                     f"same rate schedule as AutoFlow's affine part: what the schedule alone gives): AutoFlow better "
                     f"on {sched.count(-1)}, worse on {sched.count(1)}, within {WIN_MARGIN} sd on {sched.count(0)} "
                     f"of {len(sched)}.")
    if off:
        lines.append(f"- Against {FLOW_OFF} (the default AutoFlow whose flow is never switched on: its Gaussian part "
                     f"alone, with the Laplace start, its frame and the schedule: what the flow layers add): AutoFlow "
                     f"better on {off.count(-1)}, worse on {off.count(1)}, within {WIN_MARGIN} sd on {off.count(0)} "
                     f"of {len(off)}.")
    lines.append(_iterate_noise(rows, meta))
    fl = [r for r in (_row(rows, p, "AutoFlow", "long") for p in meta["posteriors"]) if r]
    on = [r["posterior"].split("-")[-1] for r in fl if r.get("flow_on_s", math.inf) <= t]
    lines.append(f"- The default AutoFlow's warmup (flow layers skipped, the guide is AutoMultivariateNormal) had "
                 f"ended by {t:g} s on {len(on)} of {len(fl)} posteriors" + (f" ({', '.join(on)})" if on else "")
                 + ".")
    ec = "eight_schools-eight_schools_centered"
    s = _snap(_row(rows, ec, "AutoFlow", "long"), t) if ec in meta["posteriors"] else None
    if s is not None:
        pp = s.get("per_param", {})
        mu, tau = (pp.get(k, [math.nan])[0] for k in ("mu", "tau"))
        lines.append(f"- eight_schools_centered, default AutoFlow at {t:g} s: {_khat_text(s)}, mean error of "
                     f"mu {mu:.3f} sd, of tau {tau:.3f} sd (AutoMultivariateNormal: "
                     + _mu_tau(_snap(_row(rows, ec, "AutoMultivariateNormal", "long"), t)) + ").")
    return table, lines


def _khat(s):
    """A snapshot's k-hat: the median over its independent sets of draws where it has them (table times of
    fits run since :data:`KHAT_SETS`), else its one estimate."""
    return s.get("khat_median", s["khat"])


def _khat_text(s):
    sets = s.get("khat_sets")
    if not sets:
        return f"k-hat {s['khat']:.2f} (one estimate)"
    return (f"k-hat {_khat(s):.2f} (median of {len(sets)} estimates from independent sets of draws: "
            + ", ".join(f"{k:.2f}" for k in sets) + ")")


def _verdict(f, m):
    """-1: ``f`` better than ``m`` (one rms error lower by more than the margin, neither higher), 1: worse (one
    higher by more than the margin), 0: within the margin."""
    dm, ds = f["mean_rms"] - m["mean_rms"], f["sd_rms"] - m["sd_rms"]
    if dm > WIN_MARGIN or ds > WIN_MARGIN:
        return 1
    return -1 if dm < -WIN_MARGIN or ds < -WIN_MARGIN else 0


def _iterate_noise(rows, meta):
    """How much AutoMultivariateNormal's errors move between its last two snapshots (where it has mostly
    converged, constant-rate Adam keeps jittering): the scale of differences between fits that is noise."""
    d, ts = [], None
    for p in meta["posteriors"]:
        r = _row(rows, p, "AutoMultivariateNormal", "long")
        if r and len(r.get("snapshots", ())) >= 2:
            a, b = r["snapshots"][-2:]
            ts = (a["t"], b["t"])
            d += [abs(a["mean_rms"] - b["mean_rms"]), abs(a["sd_rms"] - b["sd_rms"])]
    if not d:
        return "- (no AutoMultivariateNormal fit with two snapshots: iterate noise not estimated)"
    return (f"- Noise scale: between its last two snapshots ({ts[0]:g} s and {ts[1]:g} s) AutoMultivariateNormal's "
            f"rms errors change by a median {np.median(d):.3f} reference sds ({sum(x > WIN_MARGIN for x in d)} of "
            f"{len(d)} changes exceed {WIN_MARGIN}): constant-rate Adam keeps moving after convergence, so "
            f"differences of this size between two fits are noise.")


def _mu_tau(s):
    if s is None:
        return "n/a"
    pp = s.get("per_param", {})
    return (f"{_khat_text(s)}, mu {pp.get('mu', [math.nan])[0]:.3f} sd, "
            f"tau {pp.get('tau', [math.nan])[0]:.3f} sd")


HEADLINE_COLUMNS = [
    ("posterior", "posterior", None),
    ("dim", "D", None),
    ("flow_mean", "AutoFlow mean err", "{:.3f}"),
    ("mvn_mean", "AutoMVN mean err", "{:.3f}"),
    ("flow_sd", "AutoFlow sd err", "{:.3f}"),
    ("mvn_sd", "AutoMVN sd err", "{:.3f}"),
    ("verdict", "verdict", None),
    ("flow_khat", "AutoFlow k-hat", "{:.2f}"),
    ("mvn_khat", "AutoMVN k-hat", "{:.2f}"),
    ("flow_elbo", "AutoFlow ELBO", "{:.2f}"),
    ("mvn_elbo", "AutoMVN ELBO", "{:.2f}"),
    ("normal", "AutoNormal mean / sd err", None),
    ("mvn_sched", "AutoMVN+schedule mean / sd err", None),
    ("flow_off", "AutoFlow (flow off) mean / sd err", None),
]


def _family_rows(rows):
    """Short-tier rows per family; the default family's long-tier ``AutoFlow`` rows stand in where its
    short-tier fit was not run (the same fit: same guide, optimiser and seed)."""
    out = {}
    for r in rows:
        if r["tier"] == "short":
            out.setdefault(r["guide"], {})[r["posterior"]] = r
    for r in rows:
        if r["tier"] == "long" and r["guide"] == "AutoFlow" and r["label"].startswith("AutoFlow ("):
            out.setdefault(r["label"][len("AutoFlow ("):-1], {}).setdefault(r["posterior"], r)
    return out


def _family_table(rows, meta, t):
    """Short tier: one row per family, one column per posterior (``mean / sd`` error at ``t``)."""
    out = []
    for g, by_post in _family_rows(rows).items():
        row, means, sds, bad = {"guide": g}, [], [], 0
        for p in meta["posteriors"]:
            r = by_post.get(p)
            if r is None:
                continue
            s = _snap(r, t)
            bad += r["status"] != "ok"
            if s is not None:
                row[p] = f"{s['mean_rms']:.2f} / {s['sd_rms']:.2f}"
                means.append(s["mean_rms"])
                sds.append(s["sd_rms"])
            if r["status"] != "ok":
                row[p] = (row.get(p, "") + " " + _status_text(r)).strip()
        row.update(median_mean=float(np.median(means)) if means else None,
                   median_sd=float(np.median(sds)) if sds else None, bad=bad)
        out.append(row)
    cols = [("guide", "family", None)] + [(p, p.split("-")[-1], None) for p in meta["posteriors"]]
    cols += [("median_mean", "median mean err", "{:.3f}"), ("median_sd", "median sd err", "{:.3f}"),
             ("bad", "non-finite / failed fits", "{:d}")]
    return reports.markdown_table(out, cols)


DETAIL_COLUMNS = [
    ("label", "guide", None),
    ("t", "CPU s", "{:g}"),
    ("steps", "steps", "{:d}"),
    ("mean_rms", "mean err rms", "{:.3f}"),
    ("mean_max", "mean err max", "{:.3f}"),
    ("sd_rms", "sd err rms", "{:.3f}"),
    ("sd_max", "sd err max", "{:.3f}"),
    ("elbo_txt", "ELBO (se)", None),
    ("khat", "k-hat", "{:.2f}"),
    ("note", "note", None),
]


def vi_markdown(rows, meta):
    """The report: headline (default AutoFlow against AutoMultivariateNormal at 30 s), time to reach
    AutoMultivariateNormal's ELBO, the short tier per family, then per posterior the table times."""
    t = _decision_time(meta)
    table, verdict = headline(rows, meta)
    lines = [
        "# VI: flow guides against Gaussian guides per CPU second (posteriordb)",
        "",
        meta.get("header", ""),
        "",
        f"Clock: process CPU time with one torch thread (`time.process_time`, evaluation paused out), not wall "
        "time: the machine is shared. One SVI run per fit (Trace_ELBO, 1 particle) continues through every "
        "snapshot, optimiser state included. AutoNormal / AutoMultivariateNormal (/ AutoIAFNormal): init scale "
        f"0.1, Adam lr {BASELINE_LR}. AutoFlow: `AutoFlow(model)` (long tier) or `AutoFlow(model, family)` "
        "(short tier) with their defaults (user sizes) and AutoFlow's own optimiser (`AutoFlow.optimizer()` of "
        "the code that ran the part: PlateauAdam, whose rates halve when a parameter is stationary, unless the "
        f"part's command says otherwise) and, unless `laplace=False`, its Laplace start (the mode and curvature, "
        "kept when its ELBO estimate beats the default start's; its cost is inside the clock); "
        f"{SCHEDULED_MVN}: AutoMultivariateNormal with `AutoFlow.optimizer()`; {FLOW_OFF}: the default "
        "AutoFlow whose flow is never switched on. "
        "Per snapshot: ELBO (mean "
        f"log importance weight, standard error in brackets) and PSIS k-hat from {meta['draws']} guide draws; "
        "errors |mean_q - mean_ref| / sd_ref and |sd_q - sd_ref| / sd_ref against the 10,000 reference draws "
        f"(rms / max over parameters) from {meta['table_draws']} draws at the table times "
        f"({', '.join(f'{x:g}' for x in meta['table_times'])} s), {meta['draws']} at the other snapshots. "
        "ELBOs compare within a posterior only. k-hat: < 0.5 good, > 0.7 unreliable; at the table times of fits "
        f"run since it was added, the k-hat in the tables is the median of {KHAT_SETS} estimates from independent "
        f"sets of {meta['draws']} draws (one estimate scatters by about +-0.15 near 0.7 on a funnel); older fits "
        "have one. Float64.",
        "",
        f"## At {t:g} s: default AutoFlow against AutoMultivariateNormal",
        "",
        reports.markdown_table(table, HEADLINE_COLUMNS),
        "",
        *verdict,
        "",
        "## CPU seconds to reach AutoMultivariateNormal's ELBO at its last snapshot",
        "",
        f"Reached: ELBO >= target - max({TARGET_TOL} nats, 2 standard errors of the difference), at snapshot "
        f"resolution (the first snapshot that qualifies). 'not reached (gap)': the best ELBO minus the target.",
        "",
    ]
    guides = list(dict.fromkeys((r["tier"], r["guide"]) for r in rows))
    # the default AutoFlow first, then the Gaussian guides, then the rest in the order the parts ran
    first = [("long", "AutoFlow")] + [("long", g) for g in GUIDE_BASELINES + HONESTY_GUIDES]
    guides = [k for k in first if k in guides] + [k for k in guides if k not in first]
    ttt = []
    for p in meta["posteriors"]:
        target, tt = _target(rows, p)
        row = {"posterior": p.split("-")[-1], "target": "" if target is None else f"{target[0]:.2f} ({tt:g} s)"}
        for tier, g in guides:
            r = _row(rows, p, g, tier)
            if r is None or target is None:
                continue
            s, gap = time_to_target(r, target)
            row[(tier, g)] = f"{s:g}" if s is not None else (f"not reached ({gap:+.2f})" if math.isfinite(gap)
                                                              else "not reached")
        ttt.append(row)
    label = {(r["tier"], r["guide"]): r["label"] + (" [short]" if r["tier"] == "short" else "") for r in rows}
    lines += [reports.markdown_table(ttt, [("posterior", "posterior", None), ("target", "target ELBO", None)]
                                     + [(k, label[k], None) for k in guides]), ""]
    if any(r["tier"] == "short" for r in rows):
        ts = [x for x in meta["table_times"] if x <= meta["short_seconds"]]
        for x in sorted(ts, reverse=True):
            lines += [f"## Every family's AutoFlow with its defaults at {x:g} s (short tier): mean / sd err", "",
                      "The default family's row is its long-tier fit where the short tier did not repeat it. A "
                      "fit that failed is marked in its cell.", "", _family_table(rows, meta, x), ""]
    for p in meta["posteriors"]:
        detail = []
        for r in rows:
            if r["posterior"] != p:
                continue
            for s in r.get("snapshots", ()):
                if s["t"] in meta["table_times"]:
                    detail.append({**s, "khat": _khat(s),
                                   "label": r["label"] + (" [short]" if r["tier"] == "short" else ""),
                                   "elbo_txt": f"{s['elbo']:.2f} ({_fmt(s.get('elbo_se'), '{:.2f}')})"})
            if r["status"] != "ok":
                detail.append({"label": r["label"], "note": _status_text(r)})
            if r["guide"] not in GUIDE_BASELINES + HONESTY_GUIDES and "flow_on_step" not in r and r["status"] == "ok":
                detail.append({"label": r["label"], "note": "warmup never ended: the flow's identity layers were "
                               "skipped throughout (the guide was AutoMultivariateNormal)"})
            if r.get("flow_on_step", 1) > 1:
                detail.append({"label": r["label"], "note": f"flow on (warmup over) at step {r['flow_on_step']}, "
                               f"{r['flow_on_s']:.1f} s"})
        lines += [f"## {p} (D = {next((r['dim'] for r in rows if r['posterior'] == p), '?')})", "",
                  f"![errors against CPU time](vi_{p.split('-')[-1]}.png)", "",
                  reports.markdown_table(detail, DETAIL_COLUMNS), ""]
    return "\n".join(lines)


def plot_posterior(rows, posterior, path):
    """Mean and sd error against CPU seconds (log x), one line per guide (short tier dashed)."""
    plt = reports._plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    target, _ = _target(rows, posterior)
    for r in rows:
        if r["posterior"] != posterior or not r.get("snapshots"):
            continue
        ts = [s["t"] for s in r["snapshots"]]
        short = r["tier"] == "short"
        kw = dict(ls="--" if short else "-", lw=1 if short else 2, marker="." if short else "o", ms=4,
                  label=r["label"] + (" [short]" if short else ""))
        axes[0].plot(ts, [s["mean_rms"] for s in r["snapshots"]], **kw)
        axes[1].plot(ts, [s["sd_rms"] for s in r["snapshots"]], **kw)
        if target is not None:
            gap = [target[0] - s["elbo"] if math.isfinite(s["elbo"]) else math.nan for s in r["snapshots"]]
            axes[2].plot(ts, [max(g, 1e-3) for g in gap], **kw)
    for ax, title in zip(axes, ("rms mean error (reference sds)", "rms sd error (reference sds)",
                                "AutoMVN's final ELBO - ELBO (nats, floor 1e-3)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training CPU seconds (one thread)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].axhline(TARGET_TOL, color="k", ls=":", lw=1)
    axes[0].legend(fontsize=6)
    fig.suptitle(posterior, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def _plan(args):
    """``[(tier, guide, budget)]`` for the run and the table times."""
    import pyro_flows

    table_times = sorted(float(s) for s in str(args.seconds).split(",") if s.strip())
    long_budget = max(table_times)
    short_budget = min(TIERS["short"]["max_seconds"], long_budget)
    tiers = ["long", "short"] if args.tier == "both" else [args.tier]
    plan = []
    for tier in tiers:
        guides = TIERS[tier]["guides"] or tuple(pyro_flows.FLOWS)
        if args.guides:
            guides = args.guides
        plan += [(tier, g, long_budget if tier == "long" else short_budget) for g in guides]
    return plan, table_times, short_budget


def _posteriors(args):
    from pyro_flows.infer import posteriordb as pdb

    if args.posteriors:
        return [s.strip() for s in args.posteriors.split(",") if s.strip()]
    return ["eight_schools-eight_schools_noncentered"] if args.quick else list(pdb.POSTERIORS)


def vi_dir(args):
    return os.path.join(args.results, "vi")


def run_vi(args, header, log=print):
    """The posteriordb VI benchmark (see the module docstring); returns ``(rows, files written)``.

    With ``args.merge`` it fits nothing and reports every part in ``vi/parts/``; with ``args.results_part``
    it writes its rows to ``vi/parts/<name>.json`` only (after every fit, so a stopped run keeps its fits).
    """
    from pyro_flows.infer import posteriordb as pdb

    out_dir = vi_dir(args)
    if args.merge:
        return _merge(out_dir, header, log)
    if not pdb.available():
        log(f"[vi] posteriordb not found at {pdb.posteriordb_path()} (set ${pdb.ENV_VAR}); skipped")
        return [], []
    posteriors = _posteriors(args)
    plan, table_times, short_budget = _plan(args)
    meta = {"header": header, "posteriors": posteriors, "table_times": table_times, "short_seconds": short_budget,
            "draws": args.draws, "table_draws": args.table_draws, "threads": torch.get_num_threads()}
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # AutoIAFNormal builds its flow in the default dtype
    rows, t0 = [], time.perf_counter()
    part = os.path.join(out_dir, "parts", f"{args.results_part}.json") if args.results_part else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # first-call costs of torch/pyro would otherwise be charged to the first guide's budget
            fit_with_snapshots(pdb.load_posterior(posteriors[0]), "AutoNormal", [0.2], draws=50, table_draws=50)
            for name in posteriors:
                post = pdb.load_posterior(name)
                for tier, kind, budget in plan:
                    times = snapshot_times(table_times, budget)
                    r = fit_with_snapshots(post, kind, times, [t for t in table_times if t <= budget],
                                           draws=args.draws, table_draws=args.table_draws, seed=args.seed,
                                           tier=tier)
                    rows.append(r)
                    last = r["snapshots"][-1] if r["snapshots"] else None
                    log(f"[vi] {name:40s} {tier:5s} {r['label']:26s} "
                        + (f"t {last['t']:g} s steps {last['steps']:6d} mean {last['mean_rms']:.3f} "
                           f"sd {last['sd_rms']:.3f} elbo {last['elbo']:.2f} khat {last['khat']:.2f} "
                           if last else "")
                        + _status_text(r) + f" [{(time.perf_counter() - t0) / 60:.1f} min]")
                    if part:  # after every fit, so a stopped run keeps what it has done
                        meta["wall_minutes"] = (time.perf_counter() - t0) / 60
                        meta["finished"] = _utc_now()
                        reports.write_text(part, json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    finally:
        torch.set_default_dtype(default)
    meta["wall_minutes"] = (time.perf_counter() - t0) / 60
    meta["finished"] = _utc_now()
    if part:
        reports.write_text(part, json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
        return rows, [part]
    return rows, write_vi_report(rows, meta, out_dir)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _merge(out_dir, header, log):
    """Rows of every ``vi/parts/*.json`` (a later part's row replaces an earlier one's for the same posterior,
    tier and guide) and the report written from them.

    Parts are ordered by the time their run finished (``meta["finished"]``, UTC), not by file modification
    times, which a git checkout resets; parts written before that field existed come first, by name."""
    files = glob.glob(os.path.join(out_dir, "parts", "*.json"))
    if not files:
        raise FileNotFoundError(f"--merge: no parts in {os.path.join(out_dir, 'parts')}")
    loaded = []
    for f in files:
        with open(f) as fh:
            loaded.append((f, json.load(fh)))
    loaded.sort(key=lambda fp: (fp[1]["meta"].get("finished", ""), os.path.basename(fp[0])))
    files = [f for f, _ in loaded]
    rows, metas = {}, []
    for f, part in loaded:
        metas.append(part["meta"])
        for r in part["rows"]:
            rows[(r["posterior"], r["tier"], r["guide"])] = r
    from pyro_flows.infer import posteriordb as pdb

    names = {p for m in metas for p in m["posteriors"]}
    meta = dict(metas[0])
    meta.update(posteriors=[p for p in pdb.POSTERIORS if p in names] + sorted(names - set(pdb.POSTERIORS)),
                table_times=sorted({t for m in metas for t in m["table_times"]}),
                header=_merged_header(metas, files),
                draws=min(m["draws"] for m in metas), table_draws=min(m["table_draws"] for m in metas),
                short_seconds=max(m["short_seconds"] for m in metas))
    rows = list(rows.values())
    log(f"[vi] merged {len(rows)} fits from {len(files)} parts")
    return rows, write_vi_report(rows, meta, out_dir)


def _merged_header(metas, files):
    """The first part's machine line and every part's command."""
    first = metas[0]["header"].split("\n")[0]
    commands = [ln for m in metas for ln in m["header"].split("\n") if ln.startswith("Command:")]
    parts = ", ".join(f"{os.path.basename(f)} ({m['wall_minutes']:.0f} wall min)" for f, m in zip(files, metas))
    return "\n".join([first] + [c.rstrip() + "  " for c in commands] + [f"Merged from {parts}."])


def write_vi_report(rows, meta, out_dir):
    written = [reports.write_text(os.path.join(out_dir, "vi.md"), vi_markdown(rows, meta)),
               reports.write_text(os.path.join(out_dir, "results.json"),
                                  json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))]
    try:
        for p in meta["posteriors"]:
            written.append(plot_posterior(rows, p, os.path.join(out_dir, f"vi_{p.split('-')[-1]}.png")))
    except ImportError:  # pragma: no cover - matplotlib is an extra
        pass
    return written


# ---------------------------------------------------------------------------------------------
# particle scaling
# ---------------------------------------------------------------------------------------------
def regression_data(device="cpu", n=200, groups=8, seed=0):
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU whatever the default device: the same data
    x = torch.randn(n, generator=g, device="cpu")
    group = torch.randint(0, groups, (n,), generator=g, device="cpu")
    effect = 0.5 * torch.randn(groups, generator=g, device="cpu")
    y = 1.0 + 2.0 * x + effect[group] + 0.3 * torch.randn(n, generator=g, device="cpu")
    return x.to(device), group.to(device), y.to(device)


def regression_model(x, group, y):
    """Hierarchical regression: 2 coefficients, 2 positive scales, 8 group effects (latent dim 12)."""
    one = x.new_ones(())
    a = pyro.sample("a", dist.Normal(0 * one, 5 * one))
    b = pyro.sample("b", dist.Normal(0 * one, 5 * one))
    sigma = pyro.sample("sigma", dist.LogNormal(0 * one, one))
    tau = pyro.sample("tau", dist.HalfNormal(one))
    with pyro.plate("groups", 8, dim=-1):
        effect = pyro.sample("effect", dist.Normal(0 * one, tau))
    with pyro.plate("data", y.shape[-1], dim=-1):
        pyro.sample("y", dist.Normal(a + b * x + effect[..., group], sigma), obs=y)


def _svi_step(kind, n, device):
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    torch.manual_seed(0)
    data = regression_data(device)
    if kind == "AutoIAFNormal":
        guide, optim = make_guide(kind, regression_model, hidden_dim=[24], num_transforms=2), None
        with torch.device(device):  # Pyro builds AutoIAFNormal's networks on the default device at its first call
            guide(*data)
    elif kind in GUIDE_BASELINES:
        guide, optim = make_guide(kind, regression_model), None
    else:  # AutoFlow with its defaults (user sizes) and its own optimiser, the flow on from the first step
        guide, optim, _ = _autoflow(regression_model, None if kind == "AutoFlow" else kind, warmup=0)
    svi = SVI(
        regression_model,
        guide,
        optim or pyro.optim.Adam({"lr": 0.005}),
        Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1),
    )
    return lambda: svi.step(*data)


def run_particles(args, header, log=print):
    """SVI steps per second against vectorised particles; returns ``(rows, files written)``."""
    particles = [int(p) for p in str(args.particles).split(",")]
    guides = list(GUIDE_BASELINES) + ["AutoFlow"] + list(args.family)
    rows = {kind: {"guide": kind} for kind in guides}
    store, slow = pyro.get_param_store(), set()

    def in_scope(step, state):
        # each guide keeps its own parameters (every AutoFlow is named "AutoFlow"); the swap is a few dict
        # operations, inside every guide's timing alike
        def run():
            with store.scope(state):
                return step()
        return run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in particles:
            steps = {}
            for kind in guides:
                if kind in slow:
                    continue
                try:
                    with store.scope() as state:
                        step = _svi_step(kind, n, args.device)
                        step()  # builds the guide's parameters
                    steps[kind] = in_scope(step, state)
                except Exception as exc:
                    rows[kind]["error"] = f"N={n}: {type(exc).__name__}: {str(exc)[:60]}"
                    slow.add(kind)
            # every guide timed round robin in one loop: the ratios to AutoIAFNormal see the same machine state
            t, err = measure.time_interleaved(steps, repeats=1 if args.quick else 5, warmup=2, device=args.device,
                                              slow=20.0)
            for kind in steps:
                rows[kind][n] = 1.0 / t[kind] if t.get(kind) else None
                if t.get(kind) is None or t[kind] > 20.0:
                    slow.add(kind)
                if err.get(kind):
                    rows[kind]["error"] = f"N={n}: {err[kind]}"
                log(f"[particles] {kind} N={n}: {rows[kind].get(n)}")
    rows = list(rows.values())
    ref = next((r for r in rows if r["guide"] == "AutoIAFNormal"), {})
    for r in rows:
        for n in particles:
            if r.get(n) and ref.get(n):
                r[f"ratio_{n}"] = r[n] / ref[n]
    cols = (
        [("guide", "guide", None)]
        + [(n, f"N={n} steps/s", "{:.1f}") for n in particles]
        + [(f"ratio_{n}", f"N={n} / IAF", "{:.2f}") for n in particles]
        + [("error", "error", None)]
    )
    text = "\n".join(
        [
            "# SVI throughput against vectorised particles",
            "",
            header,
            "",
            "Model: hierarchical regression with a data plate (200 observations, latent dimension 12), "
            "Trace_ELBO(vectorize_particles=True); AutoIAFNormal with 2 layers (hidden 24); AutoFlow "
            "(`AutoFlow(model)`, the default family) and each family's `AutoFlow(model, family)` with their "
            "defaults (user sizes) and `AutoFlow.optimizer()`, with `warmup=0`: the flow runs from the first "
            "step, so this is the cost of a step of the flow phase (during AutoFlow's default warmup the "
            "flow's identity layers are skipped and a step costs what AutoMultivariateNormal's does). Steps "
            "per second (higher is better; median of 5 steps per guide, every guide timed round robin at each N, "
            "each in its own param-store scope) and the ratio to AutoIAFNormal at the same N.",
            "",
            reports.markdown_table(rows, cols),
            "",
        ]
    )
    rows = [{str(k): v for k, v in r.items()} for r in rows]
    out_dir = os.path.join(args.results, "particles")
    return rows, [reports.write_text(os.path.join(out_dir, "svi_particles.md"), text),
                  reports.write_text(os.path.join(out_dir, "results.json"),
                                     json.dumps({"header": header, "rows": rows}, indent=1, default=str))]
