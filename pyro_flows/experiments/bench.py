"""The benchmark command: ``python -m pyro_flows bench --what speed,nll,vi,particles --family ...``.

Every part measures our families and the peers (Pyro's built-ins and zuko, :mod:`.models`) side by side in
ONE process, one thread by default, and reports ratios to the best peer: absolute times on a shared machine
are noisy, ratios measured in the same run are not (timings are interleaved, :mod:`.measure`).

* ``speed``: per flow, task and D (default 2, 8, 32; 5 layers, hidden (64, 64), batch 512): the density
  step (``-log p`` of data, backward, Adam) with each flow in its density direction and the guide step
  (``rsample`` + ``log_prob`` of own samples, backward, Adam) in its guide direction (our families get
  ``single_pass`` set for the task where they have it), as a ratio to the best peer; aten ops and host syncs
  per step (forward and backward: the flow's own; the optimiser's are reported apart), bytes saved for
  backward (CPU) or peak memory (CUDA), the cost of the other (iterative) direction per call relative to the
  single-pass one, and with ``--compile`` the ``torch.compile``d step time.
* ``nll``: test NLL at an equal training budget on toy densities (next to the exact entropy floor) and real
  tables (best validation checkpoint), trained by :func:`pyro_flows.experiments.trainer.train`.
* ``vi``: flow guides against Pyro's Gaussian guides per CPU second on the posteriordb subset, in two tiers
  (:mod:`.vi`; ``--tier``, ``--seconds``, ``--guides``, ``--results-part`` / ``--merge``).
* ``particles``: SVI steps per second against the number of vectorised ELBO particles (:mod:`.vi`).

Results (markdown, plots, ``results.json``) go to ``--results`` (default ``benchmarks/results`` in a source
checkout, else ``./pyro_flows_bench``; ``--quick`` writes to a temporary folder unless given one); ``vi`` and
``particles`` write into its sub-folders ``vi/`` and ``particles/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
import traceback

import torch

import pyro_flows
from pyro_flows.experiments import measure, reports
from pyro_flows.experiments.data import DATASETS, density_splits, synthetic
from pyro_flows.experiments.models import FlowModel, available_peers, is_peer

__all__ = ["WHAT", "parse_args", "main", "speed_rows", "nll_rows"]

WHAT = ("speed", "nll", "vi", "particles")
QUICK_PEERS = ("pyro.affine_autoregressive", "pyro.spline_coupling", "zuko.maf")


def _split(items, unique=True):
    out = []
    for item in items or ():
        out.extend(s.strip() for s in str(item).split(",") if s.strip())
    return list(dict.fromkeys(out)) if unique else out


def default_results():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bench = os.path.join(root, "benchmarks")
    return os.path.join(bench, "results") if os.path.isdir(bench) else os.path.abspath("pyro_flows_bench")


# ---------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------
def _step_loss(model, task, x):
    if task == "density":
        return lambda: -model.log_prob(x.clone()).mean()  # a fresh tensor: no transform-cache hit
    return lambda: model.guide_loss(x.shape[0])


def speed_step(name, dim, task, x, num_layers=5, hidden_dims=(64, 64), seed=0, **kwargs):
    """The speed benchmark's training step of one flow, for scripts that compare steps: ``FlowModel(name, dim)``
    at the benchmark's sizes (built after ``torch.manual_seed(seed)``; ``**kwargs`` to its layers), its loss
    for ``task`` on the data ``x``, and Adam, as a :class:`~pyro_flows.experiments.measure.TrainingStep`.

    Example:
        >>> step = speed_step("quar", 2, "density", torch.randn(16, 2), num_layers=2, hidden_dims=(4, 4))
        >>> loss = step.step()  # one optimiser step; ``step.forward_backward()`` leaves out the optimiser
        >>> bool(torch.isfinite(loss))
        True
    """
    torch.manual_seed(seed)
    model = FlowModel(name, dim, num_layers=num_layers, hidden_dims=list(hidden_dims), task=task, **kwargs)
    return measure.TrainingStep(_step_loss(model, task, x), model.parameters())


def _other_direction_ratio(model, task, x, repeats, device):
    """Seconds per no-grad call of the other direction / of the single-pass one (ours only)."""
    n = x.shape[0]
    if task == "density":
        fast, other = (lambda: model.log_prob(x.clone())), (lambda: model.sample(n))
    else:
        fast = lambda: model.sample(n)  # noqa: E731
        other = lambda: model.log_prob(x.clone())  # noqa: E731
    with torch.no_grad():
        t, err = measure.time_interleaved({"fast": fast, "other": other}, repeats=repeats, device=device)
    if t.get("fast") and t.get("other"):
        return t["other"] / t["fast"], t["other"]
    return None, None


def speed_rows(flows, dims, args, log=print):
    """Measure every flow at every D for both tasks; returns rows with ratios to the best peer."""
    rows, took = [], {}
    for dim in dims:
        x = synthetic(dim, args.batch, seed=args.seed, device=args.device)
        for task in ("density", "guide"):
            models, steps, errors = {}, {}, {}
            for f in flows:
                if took.get((f, task), 0.0) > args.skip_after:
                    errors[f] = f"skipped: it took {took[(f, task)]:.0f} s at a smaller D (> --skip-after)"
                    continue
                try:
                    torch.manual_seed(args.seed)
                    m = FlowModel(f, dim, num_layers=args.layers, hidden_dims=args.hidden, task=task).to(
                        args.device
                    )
                    models[f] = m
                    steps[f] = measure.TrainingStep(_step_loss(m, task, x), m.parameters())
                except Exception as e:  # a flow that cannot be built is reported, not fatal
                    errors[f] = f"construction: {type(e).__name__}: {str(e)[:120]}"
            t0 = time.perf_counter()
            times, errs = measure.time_interleaved(
                {f: s.step for f, s in steps.items()}, repeats=args.repeats, device=args.device, slow=1.0
            )
            errors.update(errs)
            for f in flows:
                r = {"flow": f, "D": dim, "task": task, "step": times.get(f), "error": errors.get(f)}
                if f in models and r["step"] is not None:
                    m, s = models[f], steps[f]
                    t1 = time.perf_counter()
                    r["direction"], r["params"] = m.direction, m.num_params()
                    try:
                        r["ops"] = measure.count_ops(s.forward_backward)
                        # (apart: the peak-memory probe synchronises the device itself)
                        r["syncs"] = measure.count_syncs(s.forward_backward, device=args.device)
                        r["memory"] = measure.peak_memory(s.forward_backward, device=args.device)
                        r["opt_syncs"] = measure.count_syncs(s.optimizer.step, device=args.device)
                        if not is_peer(f):
                            r["other_ratio"], r["other"] = _other_direction_ratio(
                                m, task, x, args.repeats, args.device
                            )
                            r["solver"] = {k: str(v)[:200] for k, v in measure.solver_stats(m.flow).items()}
                    except Exception as e:
                        r["error"] = f"measure: {type(e).__name__}: {str(e)[:120]}"
                    took[(f, task)] = r["step"] * (args.repeats + 2) + time.perf_counter() - t1
                rows.append(r)
            _add_ratios([r for r in rows if r["D"] == dim and r["task"] == task], ("step", "ops", "memory"))
            if args.compile and dim in args.compile_dims:
                _compiled(rows, models, x, dim, task, args, log)
            log(f"[speed] D={dim:<3d} {task:8s} {len(steps)} flows in {time.perf_counter() - t0:.1f} s")
    return rows


def _add_ratios(rows, keys):
    for key in keys:
        vals = [r[key] for r in rows if is_peer(r["flow"]) and r.get(key)]
        best = min(vals) if vals else None
        for r in rows:
            r[key + "_ratio"] = r[key] / best if best and r.get(key) else None
            if key == "step":
                r["best_peer"] = next(
                    (p["flow"] for p in rows if is_peer(p["flow"]) and p.get(key) == best), None
                )


#: at most this many calls of a compiled step before it is timed (compiling and recompiling)
COMPILE_WARMUP = 10


def _compiled(rows, models, x, dim, task, args, log):
    """``torch.compile``d step times of our families and of the best peer (same task and D)."""
    mine = [r for r in rows if r["D"] == dim and r["task"] == task]
    best = next((r["best_peer"] for r in mine if r.get("best_peer")), None)
    for r in mine:
        if r["flow"] not in models or (is_peer(r["flow"]) and r["flow"] != best) or r.get("step") is None:
            continue
        m = models[r["flow"]]
        try:
            # a fresh start for every model: dynamo keeps at most ``cache_size_limit`` (8) compiled variants
            # per code object, and every model's loss (and the package's own frames) share their code
            # objects, so later models would silently run uncompiled
            torch._dynamo.reset()
            t0 = time.perf_counter()
            step = measure.TrainingStep(measure.compile_loss(_step_loss(m, task, x)), m.parameters())
            # the first call compiles; later ones may recompile (guards on state the first calls set, e.g.
            # a transform's cache record): call until a call costs less than twice the eager step (at most
            # COMPILE_WARMUP calls), so that compiling is not timed as the step
            for calls in range(1, COMPILE_WARMUP + 1):
                t1 = time.perf_counter()
                step.step()
                measure.synchronize(args.device)
                if calls > 1 and time.perf_counter() - t1 < 2 * r["step"]:
                    break
            r["compile_seconds"], r["compile_calls"] = time.perf_counter() - t0, calls
            t, err = measure.time_interleaved({"c": step.step}, repeats=args.repeats, device=args.device,
                                              slow=math.inf)
            r["compiled_step"] = t.get("c")
        except Exception as e:
            r["compiled_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        log(f"[compile] D={dim} {task} {r['flow']}: {reports.fmt_time(r.get('compiled_step'))}")
    peer = next((r for r in mine if r["flow"] == best), {})
    for r in mine:
        if r.get("compiled_step") and peer.get("compiled_step"):
            r["compiled_ratio"] = r["compiled_step"] / peer["compiled_step"]


SPEED_COLUMNS = [
    ("flow", "flow", None),
    ("D", "D", None),
    ("direction", "direction", None),
    ("params", "params", None),
    ("step", "step", reports.fmt_time),
    ("step_ratio", "ratio", reports.fmt_ratio),
    ("ops", "aten ops", reports.fmt_count),
    ("ops_ratio", "ops ratio", reports.fmt_ratio),
    ("syncs", "syncs (flow)", None),
    ("opt_syncs", "syncs (Adam)", None),
    ("memory", "memory", reports.fmt_mem),
    ("memory_ratio", "mem. ratio", reports.fmt_ratio),
    ("other_ratio", "other dir. / single pass", reports.fmt_ratio),
    ("compiled_step", "compiled step", lambda v: "" if v is None else reports.fmt_time(v)),
    ("compiled_ratio", "compiled ratio", lambda v: "" if v is None else reports.fmt_ratio(v)),
]


def speed_summary(rows, families, dims):
    """Markdown lines: per family, step time / best peer's per task and D; aten ops / fewest peer ops and
    the flow's host syncs per step at the largest D."""
    summary, top = [], max(dims)
    for f in families:
        row = {"flow": f}
        for r in rows:
            if r["flow"] == f:
                row[f"{r['task']}_{r['D']}"] = r.get("step_ratio")
                if r["D"] == top:
                    row[f"{r['task']}_ops"], row[f"{r['task']}_syncs"] = r.get("ops_ratio"), r.get("syncs")
        summary.append(row)
    cols = [("flow", "family", None)]
    cols += [(f"{t}_{d}", f"{t} step D={d}", reports.fmt_ratio) for t in ("density", "guide") for d in dims]
    cols += [(f"{t}_ops", f"{t} ops D={top}", reports.fmt_ratio) for t in ("density", "guide")]
    cols += [(f"{t}_syncs", f"{t} syncs D={top}", None) for t in ("density", "guide")]
    best = sorted({(r["task"], r["D"], r["best_peer"]) for r in rows if r.get("best_peer")})
    return [
        "## Summary: step time / best peer's (ops: aten ops / fewest of any peer; syncs: the flow's own)",
        "",
        reports.markdown_table(summary, cols),
        "",
        "Best peers: " + "; ".join(f"{t} D={d}: {p}" for t, d, p in best) + ".",
        "",
    ]


def speed_markdown(rows, families, dims, header):
    text = [
        "# Speed: density step and guide step against the best peer",
        "",
        header,
        "",
        "Ratios: cost / the best peer's cost at the same D and task (> 1: costlier). Density step: `-log p` "
        "of a batch of data, backward, Adam, each flow in its density direction. Guide step: `rsample` of "
        "a batch + `log_prob` of those own samples, backward, Adam, each flow in its guide direction. aten "
        "ops and syncs (flow): forward + backward of one step (profiler events named `aten::*`; host syncs: "
        "on CUDA the runtime's own count (`torch.cuda.set_sync_debug_mode`), on CPU every read to the host through "
        "ATen, the kernels' own included (e.g. `eigh`'s status flag), data-dependent shapes and `tolist`/`numpy`: "
        "`measure.count_syncs`); syncs (Adam): the optimiser's step. Memory: "
        "bytes saved for backward (CPU) or peak CUDA bytes. Other dir. / single pass: a no-grad call of "
        "the other (possibly iterative) direction over one of the single-pass direction, same batch.",
        "",
    ]
    text += speed_summary(rows, families, dims)
    for task in ("density", "guide"):
        text += [
            f"## {task} step",
            "",
            reports.markdown_table([r for r in rows if r["task"] == task], SPEED_COLUMNS),
            "",
        ]
    errs = [f"- {r['flow']} D={r['D']} {r['task']}: {r['error']}" for r in rows if r.get("error")]
    if errs:
        text += ["Not measured (n/a):", ""] + errs + [""]
    return "\n".join(text)


# ---------------------------------------------------------------------------------------------
# test NLL at an equal budget
# ---------------------------------------------------------------------------------------------
def train_nll(name, splits, args, steps):
    """Train ``name`` on ``splits.train``; with a validation split the best checkpoint is tested."""
    from pyro_flows.experiments.trainer import cosine_decay, density_loss, train

    torch.manual_seed(args.seed)
    dim = splits.train.shape[-1]
    model = FlowModel(name, dim, num_layers=args.nll_layers, task="density").to(args.device)
    best = {"val": math.inf, "state": None, "step": None}
    use_val = splits.floor is None  # tables overfit within the budget: early stopping on validation

    def callback(info):
        if use_val and ((info.step + 1) % args.eval_every == 0 or info.step + 1 == steps):
            with torch.no_grad():
                v = float(-model.log_prob(splits.val.clone()).mean())
            if math.isfinite(v) and v < best["val"]:
                best.update(val=v, state=copy.deepcopy(model.state_dict()), step=info.step + 1)
        return False

    res = train(
        model,
        density_loss,
        (splits.train,),
        steps=steps,
        batch_size=args.nll_batch,
        lr=args.lr,
        time_budget=args.nll_time_cap or None,
        seed=args.seed,
        clip_norm=100.0,
        lr_schedule=cosine_decay(0.1),
        callback=callback,
        desc=f"{name}/{splits.name}",
    )
    if best["state"] is not None:
        model.load_state_dict(best["state"])
    with torch.no_grad():
        nll = float(torch.cat([-model.log_prob(c.clone()) for c in splits.test.split(1024)]).mean())
    return {
        "flow": name,
        "dataset": splits.name,
        "D": dim,
        "steps": res.steps,
        "test_nll": nll,
        "floor": splits.floor,
        "seconds": res.seconds,
        "status": res.stopped_by,
        "best_step": best["step"],
        "val_nll": None if best["state"] is None else best["val"],
    }


def nll_rows(flows, datasets, args, log=print):
    rows = []
    for d in datasets:
        splits = density_splits(d, seed=args.seed, device=args.device)
        steps = args.toy_steps if splits.floor is not None else args.table_steps
        for f in flows:
            try:
                r = train_nll(f, splits, args, steps)
            except Exception as e:  # a failing flow is a result, not a crash
                traceback.print_exc()
                r = {
                    "flow": f,
                    "dataset": d,
                    "D": splits.train.shape[-1],
                    "steps": 0,
                    "test_nll": math.nan,
                    "floor": splits.floor,
                    "seconds": 0.0,
                    "status": f"{type(e).__name__}: {str(e)[:80]}",
                }
            rows.append(r)
            log(f"[nll] {f:28s} {d:14s} {r['test_nll']:.3f} ({r['seconds']:.1f} s, {r['status']})")
    return rows


def nll_markdown(rows, flows, datasets, header, args):
    by = {(r["flow"], r["dataset"]): r for r in rows}
    table = []
    for f in flows:
        row = {"flow": f}
        for d in datasets:
            r = by.get((f, d))
            if r is not None:
                note = "" if r["status"] == "steps" else f" ({r['status']}, {r['steps']} steps)"
                row[d] = f"{r['test_nll']:.3f} [{r['seconds']:.0f}s]{note}"
        table.append(row)
    floors = {r["dataset"]: r["floor"] for r in rows}
    cols = [("flow", "flow", None)] + [
        (d, d + (f" (floor {floors[d]:.3f})" if floors.get(d) else ""), None) for d in datasets
    ]
    return "\n".join(
        [
            "# Test NLL at an equal training budget",
            "",
            header,
            "",
            f"Each model: {args.toy_steps} steps on toy densities, {args.table_steps} on tables; "
            f"batch {args.nll_batch}; {args.nll_layers} layers (our families at their default sizes, peers "
            f"hidden (64, 64)); Adam lr {args.lr} with cosine decay to lr/10; gradient-norm clip 100; at "
            f"most {args.nll_time_cap:g} s per run; seed {args.seed}. Test NLL in nats (tables: standardised "
            "units, "
            f"the checkpoint with the best validation NLL, checked every {args.eval_every} steps; toys: the "
            "final model). [seconds of training]; floor = exact entropy.",
            "",
            reports.markdown_table(table, cols),
            "",
        ]
    )


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pyro_flows bench",
        description="Benchmarks of every pyro_flows family against Pyro's built-in flows and zuko, side by "
        "side "
        "in one process: speed (step time, ops, syncs, memory), test NLL, VI on posteriordb, SVI "
        "particle scaling. Writes markdown tables, plots and results.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--what",
        action="append",
        metavar="PART",
        help=f"what to run; repeatable or a comma list of {', '.join(WHAT)}. Default: speed,nll",
    )
    p.add_argument(
        "--family",
        action="append",
        metavar="NAME",
        help="our families; repeatable or a comma list. Default: every name in pyro_flows.FLOWS",
    )
    p.add_argument(
        "--peers",
        action="append",
        metavar="NAME",
        help="peers (speed, nll); repeatable or a comma list. Default: every Pyro built-in and, if "
        "installed, zuko.maf, zuko.nsf, zuko.naf ('none': no peers)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (< 1 min for speed on 2 idle cores): D in {2, 8}, 3 layers, batch 256, 1 repeat, "
        "peers "
        f"{', '.join(QUICK_PEERS)}, 30/15 training steps, two data sets, short VI fits",
    )
    p.add_argument("--dims", default="2,8,32", help="speed: comma list of D")
    p.add_argument("--layers", type=int, default=5, help="speed: layers per flow")
    p.add_argument("--hidden", default="64,64", help="speed: hidden widths of every flow's networks")
    p.add_argument("--batch", type=int, default=512, help="speed: batch size of a step")
    p.add_argument("--repeats", type=int, default=5, help="speed: timed repeats (median, interleaved)")
    p.add_argument(
        "--skip-after",
        type=float,
        default=40.0,
        help="speed: skip a flow at larger D once measuring it at a smaller D took this many seconds",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="speed: also time torch.compile'd steps of our families and the best peer at "
        "--compile-dims (compiling costs 10-100 s per model on a CPU)",
    )
    p.add_argument("--compile-dims", default="8", help="speed: comma list of D for --compile")
    p.add_argument(
        "--datasets",
        default="8gaussians,checkerboard,wine,breast_cancer",
        help=f"nll: comma list of data sets ({', '.join(DATASETS)})",
    )
    p.add_argument("--nll-layers", type=int, default=4, help="nll: layers per flow")
    p.add_argument("--nll-batch", type=int, default=256, help="nll: batch size")
    p.add_argument("--toy-steps", type=int, default=400, help="nll: training steps on the toy densities")
    p.add_argument("--table-steps", type=int, default=200, help="nll: training steps on the tables")
    p.add_argument("--lr", type=float, default=3e-3, help="nll: Adam learning rate (cosine decay to lr/10)")
    p.add_argument("--nll-time-cap", type=float, default=60.0, help="nll: seconds per training run (0: none)")
    p.add_argument(
        "--eval-every", type=int, default=20, help="nll: validation every this many steps (tables)"
    )
    p.add_argument("--posteriors", default=None, help="vi: comma list of posteriordb names (default: all)")
    p.add_argument(
        "--seconds",
        default="10,30,120",
        help="vi: comma list of the table times (CPU seconds of training, one thread); the long tier trains "
        "to the largest, the short tier to those up to 30",
    )
    p.add_argument(
        "--tier",
        default="both",
        choices=("long", "short", "both"),
        help="vi: long (AutoNormal, AutoMultivariateNormal, default AutoFlow to the largest --seconds), short "
        "(every family's AutoFlow with its defaults, to 30 s) or both",
    )
    p.add_argument(
        "--guides",
        action="append",
        metavar="NAME",
        help="vi: guides of the chosen tier(s) instead of the tier's own; repeatable or a comma list of "
        "AutoNormal, AutoMultivariateNormal, AutoIAFNormal, AutoFlow (the default family), "
        "'AutoMultivariateNormal+schedule', 'AutoFlow (flow off)' (quote it) and family names",
    )
    p.add_argument("--draws", type=int, default=2000, help="vi: guide draws per snapshot (ELBO, k-hat, errors)")
    p.add_argument(
        "--table-draws", type=int, default=10000, help="vi: guide draws for the errors at the table times"
    )
    p.add_argument(
        "--results-part",
        default=None,
        metavar="NAME",
        help="vi: write the fits to <results>/vi/parts/NAME.json only (run tiers or posteriors in separate "
        "processes, then --merge)",
    )
    p.add_argument(
        "--merge", action="store_true", help="vi: fit nothing; write the report from every <results>/vi/parts/*.json"
    )
    p.add_argument("--particles", default="1,16,256,1024,4096", help="particles: comma list of N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument(
        "--results", default=None, help="output folder (default: benchmarks/results in a checkout)"
    )
    args = p.parse_args(argv)
    args.what = _split(args.what) or ["speed", "nll"]
    bad = [w for w in args.what if w not in WHAT]
    if bad:
        p.error(f"unknown --what {bad[0]!r}; expected one of {WHAT}")
    args.family = _split(args.family) or list(pyro_flows.FLOWS)
    args.guides = _split(args.guides)
    from .vi import HONESTY_GUIDES

    known = ("AutoNormal", "AutoMultivariateNormal", "AutoIAFNormal", "AutoFlow") + HONESTY_GUIDES + tuple(
        pyro_flows.FLOWS)
    bad = [g for g in args.guides if g not in known]
    if bad:
        p.error(f"unknown guide {bad[0]!r}; expected one of {known}")
    try:
        seconds = [float(t) for t in _split([args.seconds])]
    except ValueError:
        seconds = []
    if not seconds or min(seconds) <= 0:
        p.error(f"--seconds must be a comma list of positive numbers, got {args.seconds!r}")
    bad = [f for f in args.family if f not in pyro_flows.FLOWS]
    if bad:
        p.error(f"unknown family {bad[0]!r}; registered: {pyro_flows.FLOWS}")
    peers = _split(args.peers)
    if peers == ["none"]:
        args.peers = []
    else:
        args.peers = peers or list(QUICK_PEERS if args.quick else available_peers())
        bad = [f for f in args.peers if f not in available_peers()]
        if bad:
            p.error(f"unknown peer {bad[0]!r}; available: {available_peers()}")
    if args.quick:
        args.dims, args.repeats, args.toy_steps, args.table_steps = "2,8", 1, 30, 15
        args.particles, args.skip_after = "1,64", 10.0
        if args.seconds == p.get_default("seconds"):
            args.seconds = "0.5,1"
        if args.draws == p.get_default("draws"):
            args.draws, args.table_draws = 200, 400
        args.layers, args.batch, args.nll_time_cap = 3, 256, min(args.nll_time_cap or 10.0, 10.0)
        if args.datasets == p.get_default("datasets"):
            args.datasets = "8gaussians,wine"
        if args.results is None:
            args.results = tempfile.mkdtemp(prefix="pyro_flows_bench_")
    args.dims = [int(d) for d in _split([args.dims])]
    args.compile_dims = [int(d) for d in _split([args.compile_dims])]
    args.hidden = tuple(int(h) for h in _split([args.hidden], unique=False))
    args.datasets = _split([args.datasets])
    bad = [d for d in args.datasets if d not in DATASETS]
    if bad:
        p.error(f"unknown data set {bad[0]!r}; expected one of {DATASETS}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    args.results = args.results or default_results()
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.results, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    command = ("python -m pyro_flows bench " + " ".join(argv)).strip()
    header = (
        f"Machine: {reports.machine_line()}, device {args.device}.  \nCommand: `{command}`  \n"
        f"Families: {', '.join(args.family) or '(none)'}; peers: {', '.join(args.peers) or '(none)'}."
    )
    flows = list(args.family) + list(args.peers)
    out = {
        "command": command,
        "machine": reports.machine_line(),
        "families": args.family,
        "peers": args.peers,
    }
    written = []
    t_start = time.perf_counter()
    if "speed" in args.what:
        t0 = time.perf_counter()
        rows = speed_rows(flows, args.dims, args, log)
        head = header + (
            f"  \n{args.layers} layers, hidden {list(args.hidden)}, batch {args.batch}, "
            f"median of {args.repeats} interleaved repeats; {time.perf_counter() - t0:.0f} s."
        )
        written.append(
            reports.write_text(
                os.path.join(args.results, "speed.md"), speed_markdown(rows, args.family, args.dims, head)
            )
        )
        out["speed"] = rows
        try:
            for task in ("density", "guide"):
                written.append(
                    reports.plot_vs_dim(
                        [r for r in rows if r["task"] == task],
                        ["step", "ops", "memory"],
                        os.path.join(args.results, f"speed_{task}_vs_dim.png"),
                        is_ours=lambda f: not is_peer(f),
                    )
                )
        except ImportError:  # pragma: no cover - matplotlib is an extra
            pass
    if "nll" in args.what:
        rows = nll_rows(flows, args.datasets, args, log)
        written.append(
            reports.write_text(
                os.path.join(args.results, "nll.md"), nll_markdown(rows, flows, args.datasets, header, args)
            )
        )
        out["nll"] = rows
        try:
            values = {d: {r["flow"]: r["test_nll"] for r in rows if r["dataset"] == d} for d in args.datasets}
            floors = {r["dataset"]: r["floor"] for r in rows}
            written.append(
                reports.plot_bars(
                    values, os.path.join(args.results, "nll.png"), floors, highlight=lambda f: not is_peer(f)
                )
            )
        except ImportError:  # pragma: no cover
            pass
    if "vi" in args.what or "particles" in args.what:
        from pyro_flows.experiments import vi

        if "vi" in args.what:
            out["vi"], files = vi.run_vi(args, header, log)
            written += files
        if "particles" in args.what:
            out["particles"], files = vi.run_particles(args, header, log)
            written += files
    out["total_seconds"] = time.perf_counter() - t_start
    if "speed" in out or "nll" in out:
        summary = ["# Benchmark summary", "", header, f"Total {out['total_seconds'] / 60:.1f} min.", ""]
        if "speed" in out:
            summary += speed_summary(out["speed"], args.family, args.dims) + [
                "Full table: [speed.md](speed.md).",
                "",
            ]
        if "nll" in out:
            summary += ["## Test NLL at an equal training budget", ""]
            summary += nll_markdown(out["nll"], flows, args.datasets, "", args).split("\n")[4:]
            summary += ["Full text: [nll.md](nll.md).", ""]
        written.append(reports.write_text(os.path.join(args.results, "summary.md"), "\n".join(summary)))
    if "speed" in out or "nll" in out:  # vi and particles write their own results.json in their folders
        written.append(
            reports.write_text(
                os.path.join(args.results, "results.json"),
                json.dumps({k: v for k, v in out.items() if k not in ("vi", "particles")}, indent=1, default=str),
            )
        )
    for path in written:
        if path.endswith(".md"):
            with open(path) as fh:
                print(fh.read())
    log(f"wrote {', '.join(written)} ({out['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
