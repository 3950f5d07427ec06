"""Shared benchmark machinery: timing, memory, peers, and result tables.

Every benchmark measures our flows and the peers *side by side in one process* and reports ratios to a
reference peer, because absolute times on shared machines are noisy. Timings are medians of
``repeats`` runs after ``warmup`` runs. Memory on CPU is the number of bytes autograd saves for backward
(:func:`saved_tensor_bytes`, deterministic, the part of training memory that grows with batch and
depth); on CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import sys
import time

import pyro.distributions as dist
import torch
from pyro.distributions import transforms as T
from pyro.distributions.torch_transform import ComposeTransformModule

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pyro_flows  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, repeats=7, warmup=2, device="cpu"):
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def saved_tensor_bytes(fn):
    """Bytes of tensors autograd saves for backward while running ``fn()`` (distinct storages)."""
    seen = {}

    def pack(t):
        try:
            key = (t.untyped_storage().data_ptr(), t.device)
            seen[key] = t.untyped_storage().nbytes()
        except Exception:  # pragma: no cover - e.g. sparse or meta tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_memory(fn, device="cpu"):
    """Peak CUDA memory of ``fn()`` on a GPU; saved-for-backward bytes on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return saved_tensor_bytes(fn)


def standard_normal(dim, device="cpu", dtype=torch.float32):
    return dist.Normal(torch.zeros(dim, device=device, dtype=dtype),
                       torch.ones(dim, device=device, dtype=dtype)).to_event(1)


# ---------------------------------------------------------------------------------------------
# peers: Pyro's built-in flows as stacks of the same depth, with permutations between layers
# ---------------------------------------------------------------------------------------------
def _pyro_stack(make, dim, num_layers):
    parts = []
    for i in range(num_layers):
        parts.append(make(dim))
        if i < num_layers - 1 and dim > 1:
            parts.append(pyro_flows.transforms.Permute(torch.arange(dim - 1, -1, -1)))
    return ComposeTransformModule(parts)


PYRO_PEERS = {
    "pyro.affine_autoregressive": lambda d, h: T.affine_autoregressive(d, hidden_dims=h),
    "pyro.affine_coupling": lambda d, h: T.affine_coupling(d, hidden_dims=h),
    "pyro.spline_coupling": lambda d, h: T.spline_coupling(d, hidden_dims=h),
    "pyro.spline_autoregressive": lambda d, h: T.spline_autoregressive(d, hidden_dims=h),
    "pyro.neural_autoregressive": lambda d, h: T.neural_autoregressive(d, hidden_dims=h),
    "pyro.block_autoregressive": lambda d, h: T.block_autoregressive(d),
}


def pyro_peer(name, dim, num_layers=4, hidden=(64, 64)):
    """A stack of ``num_layers`` layers of Pyro's built-in flow ``name``."""
    hidden = list(hidden)
    return _pyro_stack(functools.partial(lambda d, f: f(d, hidden), f=PYRO_PEERS[name]), dim, num_layers)


def make_data(dim, n, seed):
    """Benchmark data in D dimensions: 8gaussians for D = 2; otherwise a fixed rotation of a product
    of bimodal marginals (2^D well-separated modes), the same rotation for every split."""
    from pyro_flows.datasets import toy_sample

    if dim == 2:
        return toy_sample("8gaussians", n, seed=seed)
    g = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (n, dim), generator=g) * 2 - 1
    s = 1.5 * sign + 0.5 * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return (s @ q / 1.58).float()


def density_step(d, module, train, batch=256, lr=1e-3, seed=0):
    """A closure doing one maximum-likelihood Adam step of ``d`` on a random minibatch of ``train``."""
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def step():
        x = train[torch.randint(0, len(train), (batch,), generator=g)]
        loss = -d.log_prob(x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def zuko_available():
    try:
        import zuko  # noqa: F401
    except ImportError:
        return False
    return True


def machine_line():
    return (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def markdown_table(rows, columns):
    """``rows``: list of dicts; ``columns``: list of (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (fmt.format(v) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_result(name, text):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        f.write(text)
    return path
