"""Host synchronisations a CUDA training step really makes, per family and task, against the peers.

``tests/test_gpu_ready.py`` counts, on the CPU, what *would* force a host synchronisation on a GPU
(every read to the host through ATen, the kernels' own included, and data-dependent shapes). This
script is its check on a real GPU (:func:`pyro_flows.experiments.measure.cuda_sync_sites`):
``torch.cuda.set_sync_debug_mode("warn")`` makes the CUDA runtime warn on every synchronising call
(device-to-host copies, a ``linalg`` status check), and each is recorded where it came from (file:line
of the Python frame that called the op), for
one training step of each flow in the direction set for the task:

* ``density``: ``-log p`` of a batch of data, backward (``single_pass="log_prob"``);
* ``guide``: ``rsample`` of a batch and ``log_prob`` of those samples, backward (``single_pass="sample"``);

the optimiser's step (``torch.optim.Adam``) is counted apart. Peers: Pyro's ``affine_autoregressive``
(IAF for the guide, inverted MAF-style for density) and, when installed, zuko's MAF.

Usage (on a machine with CUDA)::

    python benchmarks/bench_cuda_syncs.py --dim 8 --layers 5 --batch 512 --out syncs.md
"""

from __future__ import annotations

import argparse
import ast
import statistics
import sys
import time

import torch

from pyro_flows.experiments import measure
from pyro_flows.experiments.bench import _step_loss
from pyro_flows.experiments.data import synthetic
from pyro_flows.experiments.models import FlowModel
from pyro_flows import FLOWS

PEERS = ("pyro.affine_autoregressive", "zuko.maf")


def _parse_entry(entry):
    """``"quar:bound=power;lipschitz=0.5"`` -> ``("quar", {"bound": "power", "lipschitz": 0.5})``."""
    name, _, rest = entry.partition(":")
    kwargs = {}
    for item in filter(None, rest.split(";")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


def _median_ms(fn, device, repeats=20):
    times = []
    for _ in range(repeats):
        measure.synchronize(device)
        t = time.perf_counter()
        fn()
        measure.synchronize(device)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--hidden", default="64,64")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--family", default=",".join(FLOWS))
    p.add_argument("--variants", default="quar:bound=power",
                   help="extra rows, comma list of family:key=value[;key=value] (values parsed as Python literals)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_cuda_syncs.py needs a CUDA device")
    device = torch.device(args.device)
    hidden = [int(h) for h in args.hidden.split(",")]
    rows, details = [], []
    x = synthetic(args.dim, args.batch, seed=0, device=device)
    entries = args.family.split(",") + list(PEERS) + [v for v in args.variants.split(",") if v]
    for task in ("density", "guide"):
        for entry in entries:
            name, kwargs = _parse_entry(entry)
            try:
                torch.manual_seed(0)
                m = FlowModel(name, args.dim, num_layers=args.layers, hidden_dims=hidden, task=task, **kwargs)
                m = m.to(device)
                step = measure.TrainingStep(_step_loss(m, task, x), m.parameters())
                for _ in range(2):  # warm-up: lazy initialisation and caches are not per-step costs
                    step.step()
                where = measure.cuda_sync_sites(step.forward_backward)
                opt = measure.cuda_sync_sites(step.optimizer.step)
                ms = _median_ms(step.step, device)
                rows.append((entry, task, sum(where.values()), sum(opt.values()), f"{ms:.2f}"))
                details.append((entry, task, where))
            except Exception as e:  # report, go on with the others
                rows.append((entry, task, f"error: {type(e).__name__}: {str(e)[:80]}", "", ""))
            print(rows[-1], flush=True)
    lines = [
        f"# Host synchronisations of one CUDA training step (D={args.dim}, {args.layers} layers, hidden "
        f"{args.hidden}, batch {args.batch})",
        "",
        f"Device: {torch.cuda.get_device_name()}, torch {torch.__version__}. Counted with "
        "`torch.cuda.set_sync_debug_mode('warn')` (`benchmarks/bench_cuda_syncs.py`); step = loss + backward "
        "in the direction set for the task, Adam counted apart.",
        "",
        "| flow | task | syncs (step) | syncs (Adam) | step ms (median of 20, Adam included) |",
        "|---|---|---|---|---|",
    ] + [f"| {n} | {t} | {s} | {o} | {ms} |" for n, t, s, o, ms in rows]
    lines += ["", "## Where (file:line of the Python frame, count)", ""]
    for name, task, where in details:
        if where:
            lines.append(f"- {name} / {task}: " + ", ".join(f"`{k}` x{v}" for k, v in where.most_common(8)))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
