"""QuAR flows against a power-series residual flow of equal size and Pyro's affine autoregressive flow.

Side by side, in one process, for D in {2, 8, 32} (default):

* ``quar``: ``pyro_flows.flow("quar", D, num_layers=L, hidden_dims=(H, H))``, the residual map in the
  normalizing direction (data -> base), exact log-det from the diagonal propagated in the same pass.
* ``resflow-ps``: an i-ResNet / Residual-Flow style layer ``x + g(x)`` with the *same* sizes (dense
  D-H-H-D, ELU, every linear layer spectrally normalised to 0.9 with the guaranteed bound of
  ``LipschitzLinear``), the same reverse permutations, and the log-det estimated by the power series
  ``sum_k (-1)^(k+1) tr(J^k) / k`` with one Hutchinson probe (one vector-Jacobian product per term):
  20 terms for evaluation (what Chen et al. use at test time, the paper's comparison) and 4 terms
  for training (their expected number of terms; here a fixed truncation, backpropagated through with
  ``create_graph=True``; the Russian-roulette correction would only add terms).
* ``resflow-exact``: the same residual flow with its exact log-det by brute force (``D`` vector-Jacobian
  products for the full Jacobian, then ``slogdet``): evaluation only.
* ``pyro.affine_autoregressive`` (Pyro's default orientation: ``log_prob`` of data runs its sequential
  inverse, ``D`` network passes) and ``pyro.maf`` (the same layers used through ``.inv`` so that
  ``log_prob`` is one pass, Pyro's MAF orientation).

Measured: ``log_prob`` of external data (no parameter gradients), one density-estimation training step
(``-log_prob(batch).mean()``, backward, Adam), bytes autograd saves for the training step's backward
(:func:`benchmarks.common.peak_memory`), and sampling time. Times are medians of process CPU time
over round-robin repeats (every model measured once per round, so a load change on the shared machine
hits all of them; CPU time, unlike wall time, does not count time the process waits for a core).
Ratios are ``time / time(quar)`` (> 1: QuAR is faster). CPU only.

Run: ``python benchmarks/bench_quar.py`` (about 2-4 minutes on one core); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import transforms as T
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    machine_line, markdown_table, peak_memory, standard_normal, write_result,
)
import pyro_flows  # noqa: E402
from pyro_flows.nn import LipschitzLinear  # noqa: E402


# ---------------------------------------------------------------------------------------------
# the power-series residual flow (i-ResNet / Residual Flows), same sizes as the QuAR stack
# ---------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    def __init__(self, dim, hidden, coeff=0.9):
        super().__init__()
        sizes = [dim] + list(hidden) + [dim]
        self.layers = nn.ModuleList(LipschitzLinear(a, b, coeff=coeff) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.elu(x)
        return x


class ResidualFlow(nn.Module):
    """``z = f_L(... f_1(x))`` with ``f(x) = x + g(x)`` and reverse permutations between layers."""

    def __init__(self, dim, num_layers, hidden):
        super().__init__()
        self.dim = dim
        self.blocks = nn.ModuleList(ResidualBlock(dim, hidden) for _ in range(num_layers))

    def log_prob(self, x, terms=20, exact=False, create_graph=False):
        base = standard_normal(self.dim, x.device, x.dtype)
        total = x.new_zeros(x.shape[:-1])
        gen = torch.Generator(device=x.device).manual_seed(0)
        for i, block in enumerate(self.blocks):
            with torch.enable_grad():
                x = x if x.requires_grad else x.detach().requires_grad_(True)
                gx = block(x)
                if exact:
                    cols = [torch.autograd.grad(gx, x, e.expand_as(gx), retain_graph=True,
                                                create_graph=create_graph)[0]
                            for e in torch.eye(self.dim, dtype=x.dtype, device=x.device)]
                    jac = torch.stack(cols, -2)  # rows: d g_i / d x
                    total = total + torch.linalg.slogdet(torch.eye(self.dim, dtype=x.dtype) + jac)[1]
                else:
                    v = torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
                    w = v
                    for k in range(1, terms + 1):
                        (w,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph)
                        total = total + (-1) ** (k + 1) / k * (w * v).sum(-1)
            x = x + gx
            if i < len(self.blocks) - 1:
                x = x.flip(-1)
        if not create_graph:
            x, total = x.detach(), total.detach()
        return base.log_prob(x) + total


# ---------------------------------------------------------------------------------------------
# peers as (log_prob(x, train) , sample(n), parameters)
# ---------------------------------------------------------------------------------------------
def make_models(dim, num_layers, hidden):
    models = {}
    base = standard_normal(dim)

    q = pyro_flows.flow("quar", dim, num_layers=num_layers, hidden_dims=hidden)
    dq = dist.TransformedDistribution(base, list(q.parts))
    models["quar"] = dict(lp=lambda x, train: dq.log_prob(x), sample=lambda n: dq.sample((n,)),
                          params=list(q.parameters()))
    qf = pyro_flows.flow("quar", dim, num_layers=num_layers, hidden_dims=hidden, bound="frobenius")
    dqf = dist.TransformedDistribution(base, list(qf.parts))
    models["quar (frobenius bound)"] = dict(lp=lambda x, train: dqf.log_prob(x), sample=None,
                                            params=list(qf.parameters()))

    r = ResidualFlow(dim, num_layers, hidden)
    models["resflow-ps"] = dict(lp=lambda x, train: r.log_prob(x, terms=4 if train else 20, create_graph=train),
                                sample=None, params=list(r.parameters()))
    models["resflow-exact"] = dict(lp=lambda x, train: r.log_prob(x, exact=True, create_graph=train),
                                   sample=None, params=list(r.parameters()), train=False)

    def pyro_stack(invert):
        mods, parts = [], []
        for i in range(num_layers):
            m = T.affine_autoregressive(dim, hidden_dims=list(hidden))
            mods.append(m)
            parts.append(m.inv if invert else m)
            if i < num_layers - 1 and dim > 1:
                parts.append(T.Permute(torch.arange(dim - 1, -1, -1)))
        return mods, dist.TransformedDistribution(base, parts)

    mods, da = pyro_stack(False)
    models["pyro.affine_autoregressive"] = dict(
        lp=lambda x, train: da.log_prob(x), sample=lambda n: da.sample((n,)),
        params=[p for m in mods for p in m.parameters()])
    mods_m, dm = pyro_stack(True)
    models["pyro.maf (.inv)"] = dict(
        lp=lambda x, train: dm.log_prob(x), sample=lambda n: dm.sample((n,)),
        params=[p for m in mods_m for p in m.parameters()])
    return models


def _cpu_ms(fn):
    t0 = time.process_time()
    fn()
    return 1e3 * (time.process_time() - t0)


def _tasks(name, m, data, batch):
    """The measured closures of one model: {metric: fn}."""
    tasks = {}

    def lp():
        # evaluation: no parameter gradients (the residual flows still need autograd for their
        # vector-Jacobian products, in x only)
        for prm in m["params"]:
            prm.requires_grad_(False)
        try:
            with torch.no_grad() if name.startswith(("quar", "pyro")) else torch.enable_grad():
                m["lp"](data.clone(), False)
        finally:
            for prm in m["params"]:
                prm.requires_grad_(True)

    tasks["lp_ms"] = lp
    if m.get("train", True):
        opt = torch.optim.Adam(m["params"], lr=1e-4)

        def step():
            loss = -m["lp"](data.clone(), True).mean()  # a fresh batch: no transform cache hit
            opt.zero_grad()
            loss.backward()
            opt.step()

        tasks["train_ms"] = step
    if m["sample"] is not None:
        def sample():
            with torch.no_grad():
                m["sample"](batch)

        tasks["sample_ms"] = sample
    return tasks


def run(dims, num_layers, widths, batch, repeats):
    """Round-robin over models and metrics (so load drifts hit every model alike); CPU-time medians."""
    rows = []
    for width, dim in [(w, d) for w in widths for d in dims]:
        torch.manual_seed(0)
        data = torch.randn(batch, dim) * 1.5
        models = make_models(dim, num_layers, (width, width))
        tasks = {name: _tasks(name, m, data, batch) for name, m in models.items()}
        for name in models:  # warm-up
            for fn in tasks[name].values():
                fn()
        times = {name: {k: [] for k in tasks[name]} for name in models}
        for _ in range(repeats):
            for name in models:
                for key, fn in tasks[name].items():
                    times[name][key].append(_cpu_ms(fn))
        res = {}
        for name, m in models.items():
            r = {"model": name, "D": dim, "H": width}
            r.update({k: statistics.median(v) for k, v in times[name].items()})
            if m.get("train", True):
                r["mem_mb"] = peak_memory(lambda: -m["lp"](data.clone(), True).mean()) / 2 ** 20
            res[name] = r
        q = res["quar"]
        for name, r in res.items():
            for key in ("lp_ms", "train_ms", "mem_mb", "sample_ms"):
                if r.get(key) is not None and q.get(key):
                    r[key.split("_")[0] + "_ratio"] = r[key] / q[key]
            rows.append(r)
            print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    return rows


NOTES = """Models (all of the same depth and hidden sizes, reverse permutations between layers):

- `quar`: `pyro_flows.flow("quar", D, num_layers, hidden_dims=(H, H))`, normalizing direction: `log_prob` is
  one pass with the exact log-det from the propagated diagonal; sampling runs the numerical inverse
  (Algorithm 1 + certified Newton finish) in every layer. Training recomputes the exact spectral norm
  (float64 SVD) of every masked weight each step; `quar (frobenius bound)` uses the cheaper, looser
  guaranteed Frobenius bound instead.
- `resflow-ps`: i-ResNet / Residual-Flow layer x + g(x), dense D-H-H-D ELU network, each linear layer
  spectrally normalised to 0.9; log-det by the power series with one Hutchinson probe, 20 terms for
  `log_prob` (the evaluation setting of Chen et al. that the paper compares with), 4 terms backpropagated
  through for the training step (Chen et al. train with 4 terms in expectation).
- `resflow-exact`: the same network, exact log-det by brute force (D vector-Jacobian products + slogdet).
- `pyro.affine_autoregressive`: Pyro's layers as `pyro_peer` builds them (log_prob runs the sequential
  inverse, D passes); `pyro.maf (.inv)`: the same layers used inverted, so log_prob is one pass.

Memory is the bytes autograd saves for the training step's backward (CPU).
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[2, 8, 32])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 256],
                   help="hidden widths to run (two hidden layers each; multiples of every D)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke run: D=2, 2 repeats, no result file")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.dims, args.repeats, args.hidden = [2], 2, [64]
    rows = run(args.dims, args.layers, args.hidden, args.batch, args.repeats)
    cols = [("model", "model", None), ("D", "D", None), ("H", "hidden", None),
            ("lp_ms", "log_prob ms", "{:.2f}"), ("lp_ratio", "x quar", "{:.1f}"),
            ("train_ms", "train step ms", "{:.2f}"), ("train_ratio", "x quar", "{:.2f}"),
            ("mem_mb", "saved MB (train)", "{:.2f}"), ("mem_ratio", "x quar", "{:.2f}"),
            ("sample_ms", "sample ms", "{:.2f}"), ("sample_ratio", "x quar", "{:.2f}")]
    cmd = "python benchmarks/bench_quar.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (f"# QuAR benchmark\n\nMachine: {machine_line()}\n\nCommand: `{cmd.strip()}`\n\n"
            f"{args.layers} layers, two hidden layers of width H for every model, batch {args.batch}, "
            f"float32, medians of {args.repeats} round-robin runs of process CPU time (robust to other jobs on "
            f"a shared machine; one thread). `x quar` = time (or memory) / QuAR's: above 1, QuAR "
            f"is faster (smaller).\n\n" + markdown_table(rows, cols) + "\n\n" + NOTES)
    print(text)
    if not args.quick:
        print("wrote", write_result("quar.md", text))


if __name__ == "__main__":
    main()
