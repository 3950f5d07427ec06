"""The benchmark suite: every pyro_flows family against Pyro's built-in flows and zuko, in one process.

Run ``python benchmarks/run.py`` (or ``python -m pyro_flows bench``) from a source checkout; ``--help`` lists
the options (``--quick``, ``--families``, ``--peers``, ``--dims``, ...). It writes, under
``benchmarks/results/`` (or ``--results``):

- ``speed.md``: per flow and D in {2, 8, 32}: density-estimation step (``-log p`` of a batch of data,
  backward, Adam step), guide step (``rsample`` of a batch + ``log_prob`` of those own samples, backward,
  Adam step), sampling (per 1000 draws, no grad), external-data ``log_prob`` (per 1000 points, no grad) and
  memory (bytes autograd saves for backward in the density step on CPU; peak CUDA memory on a GPU); each as
  the absolute value and as a ratio to the *best peer* at the same D (ratio > 1: costlier than the best peer);
- ``nll.md``: final test NLL at an equal training budget (same steps, batch, learning-rate schedule, depth) on
  the toy densities (next to the exact entropy floor) and the scikit-learn tables;
- ``summary.md``: per family, the ratio of its step time to the best peer and its test NLL against the best
  peer; plus ``speed_vs_dim.png`` and ``nll.png``, and the raw numbers in ``results.json``.

The two sections can run as separate processes (``--no-nll`` / ``--no-speed`` with their own
``--results`` folder) and be merged afterwards with ``--from-json A/results.json B/results.json``, which only
rebuilds the tables and plots; the committed results were made that way (see ``summary.md`` for the exact
commands). A flow whose measurement at one D took longer than ``--skip-after`` seconds (default 30) is
skipped at larger D and reported as such (zuko's NAF samples by bisection and takes minutes at D=32).

Every family registered in ``pyro_flows.FLOWS`` at run time is included automatically. Peers: Pyro's
``affine_autoregressive``, ``affine_coupling``, ``spline_coupling``, ``spline_autoregressive``,
``neural_autoregressive``, ``block_autoregressive`` (stacks of the same depth with reversing permutations,
``benchmarks/common.pyro_peer``) and zuko's ``MAF``, ``NSF``, ``NAF`` (when zuko is installed).

Choices:
- Direction: each peer in its best direction for the task. Pyro's ``neural_autoregressive`` and
  ``block_autoregressive`` have no inverse, and the inverse of ``affine_autoregressive`` /
  ``spline_autoregressive`` costs D sequential network passes, so for density estimation (density step,
  external ``log_prob``, NLL) these four are used in the *density direction*
  ``TransformedDistribution(base, [t.inv])`` (``log_prob`` is one forward pass; MAF-style), which is how a
  Pyro user would fit them to data; their guide step and sampling use the natural (IAF) direction. zuko's
  flows are used as zuko defines them. Our families are used in ONE direction for everything (they are meant
  to do both), so their costs include any numerical inversion: the peers get the easier deal.
- Sizes. Same depth (``--layers``, default 4) for all; our families use their default layer sizes, peers use
  hidden layers ``(64, 64)``; the parameter counts are reported next to the numbers.
- Timing: medians of ``--repeats`` runs after warm-up (``benchmarks/common.time_fn``), one thread by default;
  only ratios measured in the same run are meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import pyro.distributions as dist  # noqa: E402

import pyro_flows  # noqa: E402
from pyro_flows.datasets import ENTROPY, TABLE_DATASETS, TOY_DATASETS, load_table, toy_sample  # noqa: E402

ZUKO_PEERS = ("zuko.maf", "zuko.nsf", "zuko.naf")
PYRO_PEERS = tuple(common.PYRO_PEERS)
NO_INVERSE = ("pyro.neural_autoregressive", "pyro.block_autoregressive")
#: Pyro peers used in the density direction for density tasks: no inverse, or an inverse that costs D
#: sequential network passes (autoregressive), i.e. each peer in its best direction for the task.
DENSITY_DIRECTION = NO_INVERSE + ("pyro.affine_autoregressive", "pyro.spline_autoregressive")


# ---------------------------------------------------------------------------------------------
# a uniform wrapper around our flows and the peers
# ---------------------------------------------------------------------------------------------
class Model:
    """``log_prob(x)``, ``rsample_log_prob(n)``, ``sample(n)`` and ``parameters()`` for any flow."""

    def __init__(self, name, dim, num_layers=4, hidden=(64, 64), device="cpu"):
        self.name, self.dim = name, dim
        base = common.standard_normal(dim, device=device)
        self.kind = "ours"
        self.direction = "sample"
        if name.startswith("zuko."):
            import zuko

            cls = {"zuko.maf": zuko.flows.MAF, "zuko.nsf": zuko.flows.NSF, "zuko.naf": zuko.flows.NAF}[name]
            self.module = cls(dim, transforms=num_layers, hidden_features=list(hidden)).to(device)
            self.kind = "zuko"
            self.direction = "zuko"
            self._dist = lambda: self.module()
            self._density = self._dist
        elif name.startswith("pyro."):
            self.module = common.pyro_peer(name, dim, num_layers, hidden).to(device)
            self.kind = "pyro"
            t = self.module
            self._dist = lambda: dist.TransformedDistribution(base, [t])
            if name in DENSITY_DIRECTION:
                self.direction = "density (t.inv)"
                self._density = lambda: dist.TransformedDistribution(base, [t.inv])
            else:
                self._density = self._dist
        else:
            self.module = pyro_flows.flow(name, dim, num_layers=num_layers).to(device)
            t = self.module
            self._dist = lambda: dist.TransformedDistribution(base, [t])
            self._density = self._dist

    def parameters(self):
        return list(self.module.parameters())

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def log_prob(self, x):
        return self._density().log_prob(x)

    def rsample_log_prob(self, n):
        d = self._dist()
        if self.kind == "zuko":
            return d.rsample_and_log_prob((n,))
        y = d.rsample((n,))
        return y, d.log_prob(y)

    def sample(self, n):
        return self._dist().sample((n,))


def all_flows(families, peers):
    return list(families) + list(peers)


# ---------------------------------------------------------------------------------------------
# speed / memory
# ---------------------------------------------------------------------------------------------
def _adaptive_time(fn, repeats, device):
    """Like common.time_fn, but one warm-up and one repeat when a call takes over a second."""
    t0 = time.perf_counter()
    fn()
    common.sync(device)
    first = time.perf_counter() - t0
    if first > 1.0:  # slow: the first call is the measurement (no warm-up needed at this scale)
        return first
    return common.time_fn(fn, repeats=repeats, warmup=1, device=device)


def measure_speed(name, dim, args):
    device = args.device
    torch.manual_seed(0)
    try:
        m = Model(name, dim, args.layers, device=device)
    except Exception as e:
        return {"flow": name, "D": dim, "params": None, "direction": "-",
                "errors": [f"construction: {type(e).__name__}: {str(e)[:120]}"]}
    opt = torch.optim.Adam(m.parameters(), lr=1e-4)
    x = torch.randn(args.batch, dim, device=device)
    out = {"flow": name, "D": dim, "params": m.num_params(), "direction": m.direction}

    def density_step():
        opt.zero_grad()
        loss = -m.log_prob(x.clone()).mean()  # a fresh tensor: no transform-cache hit across calls
        loss.backward()
        opt.step()

    def guide_step():
        opt.zero_grad()
        _, lp = m.rsample_log_prob(args.batch)
        lp.mean().backward()
        opt.step()

    def sampling():
        with torch.no_grad():
            m.sample(1000)

    xe = torch.randn(1000, dim, device=device)

    def external():
        with torch.no_grad():
            m.log_prob(xe.clone())

    for key, fn in (("density_step", density_step), ("guide_step", guide_step),
                    ("sample_1000", sampling), ("log_prob_1000", external)):
        try:
            out[key] = _adaptive_time(fn, args.repeats, device)
        except Exception as e:  # a failing peer/family is reported, not fatal
            out[key] = None
            out.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {str(e)[:120]}")
    try:
        out["memory"] = common.peak_memory(lambda: (-m.log_prob(x.clone()).mean()), device=device)
    except Exception as e:
        out["memory"] = None
        out.setdefault("errors", []).append(f"memory: {type(e).__name__}: {str(e)[:120]}")
    return out


SPEED_KEYS = ("density_step", "guide_step", "sample_1000", "log_prob_1000", "memory")


def add_ratios(rows, peers):
    """Adds ``<key>_ratio`` = value / (best peer value at the same D) for every cost key."""
    for key in SPEED_KEYS:
        for dim in sorted({r["D"] for r in rows}):
            vals = [r[key] for r in rows if r["D"] == dim and r["flow"] in peers and r.get(key)]
            best = min(vals) if vals else None
            for r in rows:
                if r["D"] == dim:
                    r[key + "_ratio"] = (r[key] / best) if (best and r.get(key)) else None


# ---------------------------------------------------------------------------------------------
# test NLL at equal budget
# ---------------------------------------------------------------------------------------------
def nll_data(name, seed=0):
    """``(train, val, test)``; ``val`` is None for the toy densities (20,000 draws: no overfitting)."""
    if name in TOY_DATASETS:
        return toy_sample(name, 20000, seed=seed), None, toy_sample(name, 5000, seed=seed + 10_000)
    s = load_table(name, seed=seed)
    return s.train, s.val, s.test


def train_nll(name, dataset, train, test, args, val=None):
    """Train at the common budget; with a validation split (the tables, which have 142-1438 training
    rows and overfit within the budget), the reported model is the checkpoint with the best validation
    NLL, evaluated every ``args.eval_every`` steps (early stopping), as in the MAF/NSF protocol."""
    import copy

    device = args.device
    torch.manual_seed(args.seed)
    train, test = train.to(device), test.to(device)
    val = None if val is None else val.to(device)
    best_val, best_state, best_step = math.inf, None, None
    m = Model(name, train.shape[-1], args.layers, device=device)
    steps = args.toy_steps if dataset in TOY_DATASETS else args.table_steps
    opt = torch.optim.Adam(m.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=args.lr / 10)
    gen = torch.Generator().manual_seed(args.seed)
    t0, done, status = time.perf_counter(), 0, "ok"
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (args.batch,), generator=gen).to(device)
        loss = -m.log_prob(train[idx]).mean()
        if not torch.isfinite(loss):
            status = f"non-finite loss at step {step}"
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 100.0)
        opt.step()
        sched.step()
        done += 1
        if val is not None and (done % args.eval_every == 0 or done == steps):
            with torch.no_grad():
                v = float(-m.log_prob(val.clone()).mean())
            if math.isfinite(v) and v < best_val:
                best_val, best_state, best_step = v, copy.deepcopy(m.module.state_dict()), done
        if args.nll_time_cap and time.perf_counter() - t0 > args.nll_time_cap and done < steps:
            status = f"stopped at time cap {args.nll_time_cap:.0f}s"
            break
    secs = time.perf_counter() - t0
    if best_state is not None:
        m.module.load_state_dict(best_state)
    with torch.no_grad():
        nll = float(torch.cat([-m.log_prob(c.clone()) for c in test.split(1024)]).mean())
    return {"flow": name, "dataset": dataset, "D": train.shape[-1], "steps": done, "test_nll": nll,
            "floor": ENTROPY.get(dataset), "seconds": secs, "status": status, "best_step": best_step,
            "val_nll": None if best_state is None else best_val}


# ---------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------
def _fmt_time(v):
    if v is None:
        return "n/a"
    return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.2f} s"


def _fmt_ratio(v):
    return "n/a" if v is None else f"{v:.2f}"


def _fmt_mem(v):
    return "n/a" if v is None else f"{v / 2**20:.2f} MiB"


def speed_markdown(rows):
    cols = [("flow", "flow", None), ("D", "D", None), ("params", "params", None)]
    for key, head, fmt in (("density_step", "density step", _fmt_time), ("guide_step", "guide step", _fmt_time),
                           ("sample_1000", "sample 1000", _fmt_time),
                           ("log_prob_1000", "log_prob 1000 ext.", _fmt_time), ("memory", "memory", _fmt_mem)):
        cols.append((key, head, fmt))
        cols.append((key + "_ratio", "ratio", _fmt_ratio))
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append(fmt(v) if fmt else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def nll_markdown(rows, flows, datasets):
    by = {(r["flow"], r["dataset"]): r for r in rows}
    head = "| flow | " + " | ".join(
        f"{d} (floor {ENTROPY[d]:.3f})" if d in ENTROPY else f"{d}" for d in datasets) + " |"
    lines = [head, "|" + "|".join("---" for _ in range(len(datasets) + 1)) + "|"]
    for f in flows:
        cells = []
        for d in datasets:
            r = by.get((f, d))
            if r is None:
                cells.append("")
            elif not math.isfinite(r["test_nll"]):
                cells.append(f"diverged ({r['status']})")
            else:
                mark = "" if r["status"] == "ok" else f" ({r['status']}, {r['steps']} steps)"
                cells.append(f"{r['test_nll']:.3f} [{r['seconds']:.0f}s]{mark}")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _best_peer_nll(rows, peers, dataset):
    vals = [(r["test_nll"], r["flow"]) for r in rows
            if r["dataset"] == dataset and r["flow"] in peers and math.isfinite(r["test_nll"])]
    return min(vals) if vals else (None, None)


def summary_markdown(speed_rows, nll_rows, families, peers, datasets, dims):
    lines = []
    if speed_rows:
        lines.append("### Step time and cost, ratio to the best peer at the same D (> 1: costlier)\n")
        head = "| family | " + " | ".join(f"density step D={d}" for d in dims) + " | " + \
            " | ".join(f"guide step D={d}" for d in dims) + " | sampling D=32 | ext. log_prob D=32 | memory D=32 |"
        ncol = 2 * len(dims) + 4
        lines += [head.replace("D=32", f"D={max(dims)}"), "|" + "|".join("---" for _ in range(ncol)) + "|"]
        by = {(r["flow"], r["D"]): r for r in speed_rows}
        for f in families:
            cells = [_fmt_ratio(by.get((f, d), {}).get("density_step_ratio")) for d in dims]
            cells += [_fmt_ratio(by.get((f, d), {}).get("guide_step_ratio")) for d in dims]
            top = by.get((f, max(dims)), {})
            cells += [_fmt_ratio(top.get("sample_1000_ratio")), _fmt_ratio(top.get("log_prob_1000_ratio")),
                      _fmt_ratio(top.get("memory_ratio"))]
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
        best = []
        for d in dims:
            for key in ("density_step", "guide_step"):
                vals = [(r[key], r["flow"]) for r in speed_rows if r["D"] == d and r["flow"] in peers and r.get(key)]
                if vals:
                    v, n = min(vals)
                    best.append(f"{key.replace('_', ' ')} D={d}: {n} ({_fmt_time(v)})")
        lines.append("\nBest peers: " + "; ".join(best) + ".\n")
    if nll_rows:
        lines.append("### Test NLL against the best peer at equal training budget\n")
        lines.append("Toy densities: ratio of excess NLL over the exact entropy floor (the KL divergence), "
                     "ours / best peer (< 1: closer to the data than every peer). Tables: NLL difference "
                     "ours - best peer in nats (standardised units; < 0: better). In parentheses: the plain "
                     "ratio test NLL / best peer's test NLL (where both are positive).\n")
        head = "| family | " + " | ".join(datasets) + " |"
        lines += [head, "|" + "|".join("---" for _ in range(len(datasets) + 1)) + "|"]
        by = {(r["flow"], r["dataset"]): r for r in nll_rows}
        for f in families:
            cells = []
            for d in datasets:
                r = by.get((f, d))
                bv, _ = _best_peer_nll(nll_rows, peers, d)
                if r is None or bv is None or not math.isfinite(r["test_nll"]):
                    cells.append("n/a" if r is None or bv is None else "diverged")
                else:
                    raw = f" ({r['test_nll'] / bv:.2f})" if (r["test_nll"] > 0 and bv > 0) else ""
                    if d in ENTROPY:
                        cells.append(f"{(r['test_nll'] - ENTROPY[d]) / max(bv - ENTROPY[d], 1e-9):.2f}{raw}")
                    else:
                        cells.append(f"{r['test_nll'] - bv:+.3f}{raw}")
            lines.append(f"| {f} | " + " | ".join(cells) + " |")
        bp = []
        for d in datasets:
            v, n = _best_peer_nll(nll_rows, peers, d)
            if n:
                bp.append(f"{d}: {n} ({v:.3f})")
        lines.append("\nBest peers: " + "; ".join(bp) + ".\n")
    return "\n".join(lines)


def plot_speed(rows, flows, dims, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in SPEED_KEYS]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6))
    for ax, key in zip(axes, keys):
        for i, f in enumerate(flows):
            pts = [(r["D"], r[key]) for r in rows if r["flow"] == f and r.get(key)]
            if pts:
                ours = not (f.startswith("pyro.") or f.startswith("zuko."))
                ax.plot(*zip(*pts), marker="o", lw=2 if ours else 1, ls="-" if ours else "--", label=f)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(dims)
        ax.set_xticklabels([str(d) for d in dims])
        ax.set_xlabel("D")
        ax.set_title(key.replace("_", " ") + (" (bytes)" if key == "memory" else " (s)"), fontsize=9)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_nll(rows, flows, datasets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(3.6 * len(datasets), 3.8), squeeze=False)
    by = {(r["flow"], r["dataset"]): r for r in rows}
    for ax, d in zip(axes[0], datasets):
        names = [f for f in flows if (f, d) in by and math.isfinite(by[(f, d)]["test_nll"])]
        vals = [by[(f, d)]["test_nll"] for f in names]
        colors = ["C1" if (f.startswith("pyro.") or f.startswith("zuko.")) else "C0" for f in names]
        ax.barh(range(len(names)), vals, color=colors)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        if d in ENTROPY:
            ax.axvline(ENTROPY[d], color="k", ls="--", lw=1)
        if vals:
            lo = min(vals + ([ENTROPY[d]] if d in ENTROPY else []))
            hi = max(vals)
            pad = 0.1 * (hi - lo + 1e-3)
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(f"{d}: test NLL", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pyro_flows bench",
        description="Compare every pyro_flows family with Pyro's built-in flows and zuko, side by side in one "
                    "process; writes Markdown tables and plots under benchmarks/results/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--families", default=None,
                   help="comma list of our families (default: every name in pyro_flows.FLOWS)")
    p.add_argument("--peers", default=None,
                   help="comma list of peers (default: all Pyro built-ins and, if installed, zuko.maf, "
                        "zuko.nsf, zuko.naf)")
    p.add_argument("--dims", default="2,8,32", help="comma list of D for the speed/memory section")
    p.add_argument("--datasets", default="8gaussians,checkerboard,wine,breast_cancer",
                   help="comma list of data sets for the NLL section")
    p.add_argument("--quick", action="store_true",
                   help="fast smoke run: D in {2, 8}, 2 repeats, 60/30 training steps, two data sets; "
                        "writes to a temporary results folder unless --results is given")
    p.add_argument("--no-speed", action="store_true", help="skip the speed/memory section")
    p.add_argument("--no-nll", action="store_true", help="skip the NLL section")
    p.add_argument("--layers", type=int, default=4, help="layers per flow (all models)")
    p.add_argument("--batch", type=int, default=256, help="batch size for steps and training")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats (median)")
    p.add_argument("--toy-steps", type=int, default=400, help="training steps on the toy densities")
    p.add_argument("--table-steps", type=int, default=200, help="training steps on the tables")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (cosine decay to lr/10)")
    p.add_argument("--nll-time-cap", type=float, default=60.0,
                   help="stop one NLL training run after this many seconds (marked in the table; 0: never)")
    p.add_argument("--eval-every", type=int, default=20,
                   help="tables: validation NLL every this many steps; the best checkpoint is tested")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--results", default=None, help="output folder (default: benchmarks/results)")
    p.add_argument("--skip-after", type=float, default=30.0,
                   help="skip a flow at larger D once measuring it at a smaller D took longer than this "
                        "(seconds; reported as skipped). zuko's NAF samples by bisection: minutes at D=32")
    p.add_argument("--from-json", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="do not measure: rebuild the tables and plots from earlier runs' results.json "
                        "files (e.g. a --no-nll run and a --no-speed run made in parallel)")
    args = p.parse_args(argv)
    if args.quick:
        args.dims = "2,8"
        args.repeats = 2
        args.toy_steps = 60
        args.table_steps = 30
        if args.datasets == p.get_default("datasets"):
            args.datasets = "8gaussians,wine"
        if args.results is None:
            import tempfile

            args.results = tempfile.mkdtemp(prefix="pyro_flows_bench_")
    return p, args


def _load_json(paths):
    """Rows of earlier runs' ``results.json`` files (e.g. a speed-only and an NLL-only run done in parallel)."""
    out = {"speed": [], "nll": [], "families": [], "peers": [], "dims": [], "datasets": [], "commands": [],
           "machine": None}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        # a later file's row for the same (flow, D) / (flow, data set) replaces an earlier one
        for key, ident in (("speed", "D"), ("nll", "dataset")):
            new = data.get(key, [])
            keys = {(r["flow"], r[ident]) for r in new}
            out[key] = [r for r in out[key] if (r["flow"], r[ident]) not in keys] + new
        for key in ("families", "peers", "dims", "datasets"):
            out[key] += [v for v in data.get(key, []) if v not in out[key]]
        out["commands"] += data.get("commands", [data.get("command", "?")])
        out["machine"] = out["machine"] or data.get("machine")
        out["total_seconds"] = out.get("total_seconds", 0.0) + float(data.get("total_seconds", 0.0))
    return out


def _split(s):
    return [x.strip() for x in str(s).split(",") if x.strip()]


def main(argv=None):
    parser, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    families = list(pyro_flows.FLOWS) if args.families is None else _split(args.families)
    bad = [f for f in families if f not in pyro_flows.FLOWS]
    if bad:
        parser.error(f"unknown family {bad[0]!r}; registered: {pyro_flows.FLOWS}")
    known_peers = PYRO_PEERS + (ZUKO_PEERS if common.zuko_available() else ())
    peers = list(known_peers) if args.peers is None else _split(args.peers)
    bad = [f for f in peers if f not in known_peers]
    if bad:
        parser.error(f"unknown peer {bad[0]!r}; available: {known_peers}")
    dims = [int(d) for d in _split(args.dims)]
    datasets = _split(args.datasets)
    bad = [d for d in datasets if d not in TOY_DATASETS + TABLE_DATASETS]
    if bad:
        parser.error(f"unknown data set {bad[0]!r}; expected one of {TOY_DATASETS + TABLE_DATASETS}")
    if not families:
        print("note: no pyro_flows family is registered; benchmarking the peers only", file=sys.stderr)
    results = args.results or common.RESULTS
    os.makedirs(results, exist_ok=True)
    flows = all_flows(families, peers)
    command = "python -m pyro_flows bench " + " ".join(argv if argv is not None else sys.argv[1:])
    t_start = time.perf_counter()
    header = (f"Machine: {common.machine_line()}, device {args.device}.  \n"
              f"Command: `{command.strip()}`  \n"
              f"Families: {', '.join(families) or '(none registered)'}; peers: {', '.join(peers)}; "
              f"{args.layers} layers each, batch {args.batch}.\n")

    speed_rows, nll_rows = [], []
    merged = None
    if args.from_json:
        merged = _load_json(args.from_json)
        speed_rows, nll_rows = merged["speed"], merged["nll"]
        families, peers = merged["families"], merged["peers"]
        dims, datasets = merged["dims"] or dims, merged["datasets"] or datasets
        flows = all_flows(families, peers)
        header = (f"Machine: {merged['machine']}, device {args.device}.  \n"
                  f"Commands (one process each; merged by `{command.strip()}`): "
                  + "; ".join(f"`{c}`" for c in merged["commands"]) + "  \n"
                  f"Families: {', '.join(families)}; peers: {', '.join(peers)}; "
                  f"{args.layers} layers each, batch {args.batch}.\n")
        args.no_speed, args.no_nll = not speed_rows, not nll_rows
    if not args.no_speed:
        took = {}
        for dim in dims:
            for f in flows:
                if merged is not None:
                    break
                if took.get(f, 0.0) > args.skip_after:
                    speed_rows.append({"flow": f, "D": dim, "params": None, "direction": "-", "errors": [
                        f"skipped: measuring it at a smaller D took {took[f]:.0f} s (> --skip-after "
                        f"{args.skip_after:.0f} s)"]})
                    print(f"[speed] {f:28s} D={dim:<3d} skipped (too slow at smaller D)", file=sys.stderr)
                    continue
                t0 = time.perf_counter()
                r = measure_speed(f, dim, args)
                took[f] = time.perf_counter() - t0
                speed_rows.append(r)
                print(f"[speed] {f:28s} D={dim:<3d} density {_fmt_time(r['density_step']):>10s} "
                      f"guide {_fmt_time(r['guide_step']):>10s} ({took[f]:.1f}s)",
                      file=sys.stderr, flush=True)
        add_ratios(speed_rows, peers)
        text = ("# Speed and memory\n\n" + header + "\nCosts per call (median); `ratio` = cost / best peer's "
                "cost at the same D (> 1: costlier). Density step: batch of data, `-log p`, backward, Adam. "
                "Guide step: rsample a batch + log_prob of own samples, backward, Adam. Sampling and external "
                "log_prob: 1000 points, no grad. Memory: bytes saved for backward by the density loss (CPU).\n\n"
                + speed_markdown(speed_rows) + "\n")
        errs = [f"- {r['flow']} D={r['D']}: " + "; ".join(r["errors"]) for r in speed_rows if r.get("errors")]
        if errs:
            text += "\nNot measurable (n/a):\n" + "\n".join(errs) + "\n"
        dirs = [f"{r['flow']}" for r in speed_rows if r["direction"] == "density (t.inv)" and r["D"] == dims[0]]
        if dirs:
            text += ("\nUsed in the density direction `TransformedDistribution(base, [t.inv])` for the density "
                     "step and external log_prob (no inverse, or a D-pass sequential inverse), natural "
                     f"direction for guide step and sampling: {', '.join(dirs)}.\n")
        with open(os.path.join(results, "speed.md"), "w") as fh:
            fh.write(text)
        plot_speed(speed_rows, flows, dims, os.path.join(results, "speed_vs_dim.png"))

    if not args.no_nll:
        for d in datasets:
            train, val, test = nll_data(d, args.seed)
            for f in flows:
                if merged is not None:
                    break
                try:
                    r = train_nll(f, d, train, test, args, val=val)
                except Exception as e:
                    traceback.print_exc()
                    r = {"flow": f, "dataset": d, "D": train.shape[-1], "steps": 0, "test_nll": float("nan"),
                         "floor": ENTROPY.get(d), "seconds": 0.0, "status": f"{type(e).__name__}: {str(e)[:80]}"}
                nll_rows.append(r)
                print(f"[nll] {f:28s} {d:14s} {r['test_nll']:.3f} ({r['seconds']:.1f}s, {r['status']})",
                      file=sys.stderr, flush=True)
        text = ("# Test NLL at equal training budget\n\n" + header +
                f"\nEach model: {args.toy_steps} steps on toy densities, {args.table_steps} on tables; batch "
                f"{args.batch}; Adam lr {args.lr} with cosine decay to lr/10; gradient-norm clip 100; seed "
                f"{args.seed}. Test NLL in nats (tables: standardised units, train/val/test split fixed by seed;"
                f" the checkpoint with the best validation NLL, checked every {args.eval_every} steps, is "
                "tested; toys: the final model). [seconds of training]; floor = exact entropy.\n\n"
                + nll_markdown(nll_rows, flows, datasets) + "\n")
        with open(os.path.join(results, "nll.md"), "w") as fh:
            fh.write(text)
        plot_nll(nll_rows, flows, datasets, os.path.join(results, "nll.png"))

    total = merged["total_seconds"] if merged else time.perf_counter() - t_start
    summary = ("# Benchmark summary\n\n" + header + f"Total run time {total / 60:.1f} min"
               + (" (sum over the merged runs)" if merged else "") + ".\n\n"
               + summary_markdown(speed_rows, nll_rows, families, peers, datasets, dims)
               + "\nFull tables: [speed.md](speed.md), [nll.md](nll.md); plots: "
                 "[speed_vs_dim.png](speed_vs_dim.png), [nll.png](nll.png).\n")
    with open(os.path.join(results, "summary.md"), "w") as fh:
        fh.write(summary)
    with open(os.path.join(results, "results.json"), "w") as fh:
        json.dump({"speed": speed_rows, "nll": nll_rows, "families": families, "peers": peers,
                   "dims": dims if speed_rows else [], "datasets": datasets if nll_rows else [],
                   "command": command.strip(), "commands": merged["commands"] if merged else [command.strip()],
                   "machine": merged["machine"] if merged else common.machine_line(),
                   "total_seconds": total}, fh, indent=1, default=str)
    print(summary)
    written = [f for f in ("summary.md", "speed.md", "nll.md", "speed_vs_dim.png", "nll.png", "results.json")
               if (f in ("summary.md", "results.json") or (f.startswith(("speed", "nll")) and
                   ((f.startswith("speed") and speed_rows) or (f.startswith("nll") and nll_rows))))]
    print(f"wrote {', '.join(os.path.join(results, f) for f in written)} ({total:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
