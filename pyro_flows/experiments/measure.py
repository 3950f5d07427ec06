"""Measurement: step time (interleaved medians), peak memory, aten ops and host syncs per call, solver
statistics, eager and ``torch.compile``d.

Absolute times on a shared machine are noisy, so :func:`time_interleaved` runs every candidate once per
round (round robin) and reports medians: a load change hits all of them, and only ratios between
candidates measured in the same call are meaningful.

* :func:`count_ops`: aten operator calls (``torch.profiler`` CPU events named ``aten::*``, nested calls
  included); on a GPU each leaf op is a kernel launch, so at small sizes this, not FLOPs, sets the time.
* :func:`count_syncs`: host synchronisations. On a CUDA device, the CUDA runtime's own count
  (``torch.cuda.set_sync_debug_mode("warn")``: every synchronising call, wherever it is made;
  :func:`cuda_sync_sites` says where). Elsewhere, :class:`SyncCounter`: every read of a value to the
  host that goes through ATen (``aten::_local_scalar_dense``: ``item``, ``bool(t)``, ``float(t)``, and
  the reads ATen kernels make themselves, such as the status flag that ``linalg.eigh``, ``eigvalsh``,
  ``svd`` or ``cholesky`` check), the ops whose output shape depends on the data (``nonzero``,
  ``masked_select``, ``unique``), seen by the profiler, plus ``Tensor.tolist`` / ``Tensor.numpy``,
  patched. Python-level reads alone miss the kernels' own: on an H200, one QuAR step made 2
  synchronisations (its ``eigh`` / ``eigvalsh``) that a Python-level count gave as 0
  (``benchmarks/results/gpu/syncs.md``); the CPU count here is 4, an upper bound of the GPU's.
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
    >>> count_syncs(lambda: torch.linalg.eigh(torch.eye(2)))  # eigh checks its status flag on the host
    1
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
    "DATA_DEPENDENT_OPS",
    "SyncCounter",
    "cuda_sync_sites",
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

#: aten ops whose output shape depends on the data: a GPU must copy a count to the host first
DATA_DEPENDENT_OPS = ("aten::nonzero", "aten::masked_select", "aten::_unique2", "aten::unique_dim",
                      "aten::unique_consecutive")
#: the ``torch.Tensor`` methods that read values to the host without going through ATen
_UNDISPATCHED_READS = ("tolist", "numpy")


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


class SyncCounter:
    """Host synchronisations made inside the ``with`` block, as a list of names in ``events`` (see the
    module docstring: ATen reads seen by the profiler, ``tolist`` / ``numpy`` patched).

    Example:
        >>> import torch
        >>> x = torch.arange(3.0)
        >>> with SyncCounter() as c:
        ...     _ = x.sum().item(), x[x > 0], x.tolist()
        >>> c.events
        ['aten::_local_scalar_dense', 'aten::nonzero', 'Tensor.tolist']
    """

    def __init__(self):
        self.events: list[str] = []
        self._patched = {}
        self._depth = 0
        self._profile = None

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        for method in _UNDISPATCHED_READS:
            original = getattr(torch.Tensor, method)
            self._patched[method] = original

            def counted(t, *a, _original=original, _method=method, **k):
                # a torch-function mode (e.g. torch.set_default_device) calls the method again from
                # inside: count the outermost call only
                if self._depth == 0:
                    self._undispatched.append(f"Tensor.{_method}")
                self._depth += 1
                try:
                    return _original(t, *a, **k)
                finally:
                    self._depth -= 1

            setattr(torch.Tensor, method, counted)
        self._undispatched = []
        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            self._profile.__exit__(*exc)
        finally:
            for method, original in self._patched.items():
                setattr(torch.Tensor, method, original)
        wanted = DATA_DEPENDENT_OPS + ("aten::_local_scalar_dense",)
        events = sorted(((e.name(), e.start_ns(), e.end_ns(), e.start_thread_id())
                         for e in _raw_events(self._profile) if e.name() in wanted), key=lambda e: e[1])
        shapes = [e for e in events if e[0] in DATA_DEPENDENT_OPS]
        for name, start, end, thread in events:
            # a data-dependent op's own read of its count is that op's sync, not another
            if name in DATA_DEPENDENT_OPS or not any(
                t == thread and s <= start and end <= e for _, s, e, t in shapes
            ):
                self.events.append(name)
        self.events += self._undispatched
        return False


def cuda_sync_sites(fn):
    """Where ``fn()`` synchronised a CUDA device with the host, by the CUDA runtime's own account
    (``torch.cuda.set_sync_debug_mode("warn")``): a ``collections.Counter`` of ``file:line`` of the
    Python frame that made each synchronising call (ours or a library's)."""
    import collections
    import os
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    sites = collections.Counter()
    for w in caught:
        if "synchroniz" in str(w.message).lower():
            sites[f"{os.path.relpath(w.filename)}:{w.lineno}"] += 1
    return sites


def count_syncs(fn, device="cpu") -> int:
    """Host synchronisations made during ``fn()``: on a CUDA ``device`` the runtime's own count
    (:func:`cuda_sync_sites`), elsewhere :class:`SyncCounter`'s (see the module docstring)."""
    if torch.device(device).type == "cuda":
        return sum(cuda_sync_sites(fn).values())
    with SyncCounter() as counter:
        fn()
    return len(counter.events)


def count_ops(fn) -> int:
    """aten operator calls during ``fn()`` (profiler CPU events named ``aten::*``, nested included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in _raw_events(prof) if e.name().startswith("aten::"))


def _raw_events(prof):
    """The profiler's flat event list (``name()``, ``start_ns()``, ``end_ns()``, ``start_thread_id()``):
    ``prof.events()`` builds a Python tree of every event first, 20 s for 250,000 events."""
    return prof.profiler.kineto_results.events()


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
