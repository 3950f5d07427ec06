"""Measurement: step time (interleaved medians), peak memory, aten ops and host syncs per call, solver
statistics, eager and ``torch.compile``d.

Absolute times on a shared machine are noisy, so :func:`time_interleaved` runs every candidate once per
round (round robin) and reports medians: a load change hits all of them, and only ratios between
candidates measured in the same call are meaningful.

* :func:`count_ops`: aten operator calls (``torch.profiler`` CPU events named ``aten::*``, nested calls
  included); on a GPU each leaf op is a kernel launch, so at small sizes this, not FLOPs, sets the time.
* :func:`count_syncs`: host synchronisations, counted by patching the ``torch.Tensor`` methods that copy
  a value to the host (``item``, ``__bool__``, ``__float__``, ``__int__``, ``__index__``, ``tolist``,
  ``numpy``) and the ops with data-dependent output shapes (``nonzero``, ``unique``, ``masked_select``).
  Calls made inside C++ are not seen; every Python-level one is.
* :func:`peak_memory`: on CUDA the peak allocated bytes; on CPU the bytes autograd saves for backward
  (deterministic, the part of training memory that grows with batch and depth).
* :func:`solver_stats`: the solver diagnostics the layers of a flow keep about their last solve.
* :class:`CpuClock`: process CPU time that can be paused, the training clock of budgets that must not
  depend on what else runs on a shared machine (nor include the evaluation done between snapshots).

Example:
    >>> import torch
    >>> from pyro_flows.experiments.measure import count_syncs, count_ops
    >>> x = torch.ones(3)
    >>> count_syncs(lambda: bool(x.sum() > 0) and x.sum().item())
    2
    >>> count_ops(lambda: x.exp().sum()) >= 2
    True
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field

import torch

__all__ = [
    "SYNC_METHODS",
    "synchronize",
    "time_interleaved",
    "count_syncs",
    "count_ops",
    "peak_memory",
    "solver_stats",
    "TrainingStep",
    "compile_loss",
    "CpuClock",
]

SYNC_METHODS = (
    "item",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "tolist",
    "numpy",
    "nonzero",
    "unique",
    "masked_select",
)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns, repeats=5, warmup=1, device="cpu", slow=1.0):
    """Median seconds per call of each ``fns[name]()``, measured round robin.

    Each function is first called ``warmup`` times; one whose first call took more than ``slow`` seconds
    is not repeated (its first call is its measurement). A function that raises gets ``None`` and the
    error in the second returned dict. Returns ``(times, errors)``.
    """
    times, errors, live = {}, {}, {}
    for name, fn in fns.items():
        try:
            t0 = time.perf_counter()
            for _ in range(max(1, warmup)):
                fn()
            synchronize(device)
            first = (time.perf_counter() - t0) / max(1, warmup)
        except Exception as e:  # a failing candidate is reported, not fatal
            times[name], errors[name] = None, f"{type(e).__name__}: {str(e)[:160]}"
            continue
        if first > slow:
            times[name] = first
        else:
            live[name], times[name] = fn, []
    for _ in range(repeats):
        for name, fn in live.items():
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) if isinstance(v, list) else v for k, v in times.items()}, errors


@contextlib.contextmanager
def _patched_sync_methods(counter):
    saved = {}
    for name in SYNC_METHODS:
        orig = getattr(torch.Tensor, name)
        saved[name] = orig

        def wrapper(self, *args, __orig=orig, **kwargs):
            # a read nested in another (e.g. re-dispatched by a torch function mode) is one sync
            counter[0] += counter[1] == 0
            counter[1] += 1
            try:
                return __orig(self, *args, **kwargs)
            finally:
                counter[1] -= 1

        setattr(torch.Tensor, name, wrapper)
    try:
        yield counter
    finally:
        for name, orig in saved.items():
            setattr(torch.Tensor, name, orig)


def count_syncs(fn) -> int:
    """Host synchronisations made by Python code during ``fn()`` (see the module docstring)."""
    counter = [0, 0]  # count, nesting depth
    with _patched_sync_methods(counter):
        fn()
    return int(counter[0])


def count_ops(fn) -> int:
    """aten operator calls during ``fn()`` (profiler CPU events named ``aten::*``, nested included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def _saved_tensor_bytes(fn):
    seen = {}

    def pack(t):
        with contextlib.suppress(Exception):  # e.g. sparse or meta tensors
            seen[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_memory(fn, device="cpu") -> int:
    """Peak CUDA bytes allocated during ``fn()`` on a GPU; bytes saved for backward on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _saved_tensor_bytes(fn)


_SOLVER_ATTRS = ("last_solver_info",)


def solver_stats(module) -> dict:
    """The solver diagnostics kept by the layers of ``module`` after their last call: ``{layer: info}``."""
    out = {}
    for name, m in module.named_modules():
        for attr in _SOLVER_ATTRS:
            info = getattr(m, attr, None)
            if info is not None and info != 0:
                out[f"{name or type(m).__name__}.{attr}"] = info
    return out


def compile_loss(loss_fn, fullgraph=False):
    """``torch.compile(loss_fn)``; the backward pass is compiled with it (AOTAutograd)."""
    return torch.compile(loss_fn, fullgraph=fullgraph, dynamic=False)


@dataclass
class TrainingStep:
    """One optimiser step of ``loss_fn()`` on ``params``: ``step()`` is the thing timed.

    ``forward_backward()`` is the step without the optimiser, for counting ops and syncs that belong to
    the flow (the optimiser's own are the same for every flow).
    """

    loss_fn: object
    params: list
    lr: float = 1e-4
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self):
        self.params = list(self.params)
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr)

    def forward_backward(self):
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn()
        loss.backward()
        return loss

    def step(self):
        loss = self.forward_backward()
        self.optimizer.step()
        return loss


class CpuClock:
    """Seconds of this process's CPU time (``time.process_time``), less the time spent in :meth:`paused`.

    A training budget on this clock is fair on a shared machine (wall time charges a run for whatever else
    runs) when torch uses one thread (``torch.set_num_threads(1)``: with more threads CPU time adds up
    across cores). Pausing excludes work that is not training (evaluation at snapshots) from the budget.

    Example:
        >>> clock = CpuClock()
        >>> t = clock()
        >>> with clock.paused():
        ...     _ = sum(range(10**6))  # not counted
        >>> clock() - t < 0.05
        True
    """

    def __init__(self):
        self._excluded = 0.0

    def __call__(self) -> float:
        return time.process_time() - self._excluded

    @contextlib.contextmanager
    def paused(self):
        t0 = time.process_time()
        try:
            yield self
        finally:
            self._excluded += time.process_time() - t0
