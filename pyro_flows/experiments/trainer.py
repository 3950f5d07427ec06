"""The one trainer: maximum likelihood (:func:`train`) and SVI (:func:`train_svi`), alone or on ``torchrun``.

Both functions run unchanged in one process and in a ``torch.distributed`` process group (started by
``torchrun``, or by any launcher that calls ``init_process_group`` before training). In a group they

* shard the data the way :class:`torch.utils.data.DistributedSampler` does (one seeded permutation per
  epoch, rank ``r`` takes every ``world``-th index from ``r``), so the ranks' minibatches of a step are
  disjoint and their union is the minibatch a single process would draw with the same seed;
* broadcast every parameter and buffer from rank 0 before the first step (Pyro parameters are created
  first, by one gradient-free pass of the ELBO; permutations that Pyro's ``Permute`` keeps as plain
  attributes are broadcast too), so all ranks start from the same point;
* all-reduce the gradients after ``backward`` (one flat collective per dtype per step, the loss and the
  elapsed time ride in the same buffer), weighting rank ``r`` by its share ``n_r / n`` of the step's data;
  every rank then applies the same update, so the run equals the single-process run on the combined
  minibatch up to the order of floating-point sums;
* take every decision (non-finite loss, time budget, learning-rate schedule) from the reduced values, so
  it is the same on every rank and no rank waits forever in a collective;
* report (progress bar) and write the checkpoint from rank 0 only.

Gradients are averaged by hand rather than through :class:`~torch.nn.parallel.DistributedDataParallel`:
a loss function calls ``log_prob`` (or Pyro calls the guide), not ``forward``, and DDP only synchronises
gradients of work done inside its ``forward``; Pyro's parameters also live in the param store, not in one
module. The hand all-reduce is exact and covers both.

``batch_size`` (``subsample_size`` for SVI) is the GLOBAL minibatch of one step, split evenly over the
ranks, so a run's meaning (and its learning rate) does not change with the number of processes. Each step
reads the loss on the host once (the finiteness check and the progress bar); nothing else in :func:`train`
syncs (Pyro's ELBOs read their own loss, so :func:`train_svi` adds one read in a group). Distributions
built with ``validate_args`` (torch's default) check their input's support on the host in every
``log_prob``: build them with ``validate_args=False`` for GPU training.

Example:
    >>> import torch, pyro_flows
    >>> import pyro.distributions as dist
    >>> from pyro_flows.experiments.trainer import train, density_loss
    >>> t = pyro_flows.flow("qlf", 2, num_layers=1)
    >>> d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [t])
    >>> r = train(d, density_loss, (torch.randn(64, 2),), steps=3, batch_size=32)
    >>> r.steps, r.stopped_by, len(r.losses)
    (3, 'steps', 3)
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "StepInfo",
    "TrainResult",
    "conditional_density_loss",
    "cosine_decay",
    "density_loss",
    "load_checkpoint",
    "process_group",
    "shard_indices",
    "train",
    "train_svi",
    "trainable_modules",
]


@dataclass
class TrainResult:
    """What a run did. ``losses``: the loss of each step (averaged over ranks in a group); ``steps``: steps
    taken; ``seconds``: time of the loop (on its clock); ``stopped_by``: ``"steps"``, ``"time"`` (``time_budget``
    used), ``"callback"`` (the callback returned True) or ``"nonfinite"`` (a non-finite loss; that step's
    update is not applied); ``world_size``: processes that trained together."""

    losses: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"
    world_size: int = 1


@dataclass
class StepInfo:
    """Passed to ``callback`` after each step; identical on every rank. ``fraction``: how far the run is,
    ``max(steps done / steps, elapsed / time_budget)``; ``elapsed``: seconds (mean over ranks)."""

    step: int
    loss: float
    elapsed: float
    fraction: float
    optimizer: object


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def density_loss(module, batch):
    """``-module.log_prob(x).mean()`` for ``batch = (x,)``: maximum likelihood."""
    (x,) = batch
    return -module.log_prob(x).mean()


def conditional_density_loss(module, batch):
    """``-module.log_prob(x, context).mean()`` for ``batch = (x, context)``: a module with a two-argument
    ``log_prob``, or a conditional distribution (``module.condition(context).log_prob(x)``)."""
    x, context = batch
    if hasattr(module, "condition"):
        return -module.condition(context).log_prob(x).mean()
    return -module.log_prob(x, context).mean()


def cosine_decay(final: float = 0.1) -> Callable[[float], float]:
    """A learning-rate schedule for ``lr_schedule=``: the factor falls from 1 to ``final`` along a half
    cosine of the run's progress (steps or time budget, whichever is further along)."""
    return lambda frac: final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(max(frac, 0.0), 1.0)))


# ---------------------------------------------------------------------------------------------
# process group, sharding, parameters
# ---------------------------------------------------------------------------------------------
def process_group():
    """``(world_size, rank)`` of the initialised default process group, or ``(1, 0)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def shard_indices(n: int, world: int, rank: int, seed: int, epoch: int) -> torch.Tensor:
    """Rank ``rank``'s indices for ``epoch``: exactly what ``DistributedSampler(range(n), world, rank,
    shuffle=True, seed=seed)`` yields after ``set_epoch(epoch)`` (padded by wrapping around so every rank
    has ``ceil(n / world)``), as a tensor."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    perm = torch.randperm(n, generator=g)
    total = -(-n // world) * world
    if total > n:
        perm = torch.cat([perm, perm.repeat(-(-(total - n) // n))[: total - n]])
    return perm[rank:total:world]


class _Batches:
    """The rank's share of each step's minibatch. ``batch_size=None`` (or ``>= n``): the full data, split
    into ``world`` contiguous parts; otherwise ``batch_size // world`` rows per rank from the sharded epoch
    permutation, dropping an epoch's incomplete last minibatch. No tensors: an empty batch every step."""

    def __init__(self, tensors, batch_size, world, rank, seed):
        if not tensors:  # data closed over by the model: every rank computes the same full loss
            self.fixed, self.weight = (), 1.0 / world
            return
        n = tensors[0].shape[0]
        for t in tensors:
            if t.shape[0] != n:
                sizes = [u.shape[0] for u in tensors]
                raise ValueError(f"all tensors need the same first dimension, got {sizes}")
        self.tensors, self.n, self.world, self.rank, self.seed = tensors, n, world, rank, seed
        if batch_size is None or batch_size >= n:
            if n < world:
                raise ValueError(f"{n} rows cannot be split over {world} processes")
            if world == 1:
                self.fixed = tensors
                self.weight = 1.0
            else:
                idx = torch.arange(n).tensor_split(world)[rank]
                self.fixed = tuple(t[idx.to(t.device)] for t in tensors)
                self.weight = idx.numel() / n
            return
        if batch_size % world:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of processes "
                             f"({world})")
        self.fixed = None
        self.local = batch_size // world
        self.weight = 1.0 / world
        self.per_epoch = -(-n // world) // self.local
        self.epoch, self.pos, self.perm = -1, self.per_epoch, None

    def next(self):
        if self.fixed is not None:
            return self.fixed
        if self.pos >= self.per_epoch:
            self.epoch += 1
            self.pos = 0
            idx = shard_indices(self.n, self.world, self.rank, self.seed, self.epoch)
            # one transfer per epoch; slicing below stays on the data's device
            self.perm = {d: idx.to(d) for d in {t.device for t in self.tensors}}
        lo = self.pos * self.local
        self.pos += 1
        return tuple(t[self.perm[t.device][lo:lo + self.local]] for t in self.tensors)


def trainable_modules(obj) -> list:
    """The ``torch.nn.Module`` s whose parameters train ``obj``: ``obj`` itself if it is a module, else the
    outermost modules reachable through a (conditional) transformed distribution's transforms, their
    inverses (``t.inv``), compositions and base distribution."""
    if isinstance(obj, torch.nn.Module):
        return [obj]
    mods, seen = [], set()

    def visit(o):
        if o is None or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, torch.nn.Module):
            mods.append(o)
        elif isinstance(o, (list, tuple)):
            for item in o:
                visit(item)
        elif hasattr(o, "__dict__"):
            for name in _LINKS:
                visit(o.__dict__.get(name))

    visit(obj)
    if not mods:
        raise TypeError(f"no torch.nn.Module to train in {type(obj).__name__}")
    return mods


_LINKS = ("parts", "transforms", "transform", "base_transform", "base_dist", "_inv")


def _loose_tensors(*roots):
    """Permutations kept as plain attributes (Pyro's ``Permute``, not a module: its permutation is no
    buffer) anywhere in the transform trees of ``roots``. They are broadcast with the parameters, so a
    random permutation drawn under a different seed on some rank cannot silently differ."""
    found, seen = [], set()

    def visit(o):
        if o is None or id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, (list, tuple)) and not isinstance(o, torch.nn.Module):
            for item in o:
                visit(item)
            return
        if isinstance(o, torch.nn.Module):
            for m in o.modules():
                if m is not o:
                    visit(m)
        perm = o.__dict__.get("permutation") if hasattr(o, "__dict__") else None
        if isinstance(perm, torch.Tensor) and not isinstance(o, torch.nn.Module):
            found.append(o)
        for name in _LINKS:
            visit(getattr(o, name, None) if hasattr(o, "__dict__") and name in o.__dict__ else None)

    for root in roots:
        visit(root)
    return found


def _broadcast_loose(owners):
    """Broadcast the plain-attribute permutations of ``owners`` and drop their cached inverses."""
    if owners:
        _broadcast([o.permutation for o in owners])
        for o in owners:
            o.__dict__.pop("inv_permutation", None)  # Pyro's lazy_property, recomputed from the new value


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _broadcast(tensors):
    """Rank 0's values of ``tensors`` (same list, same order on every rank) to every rank, in place.

    One flat collective per (dtype, device); values are written back with ``copy_`` so version counters
    move and every cache keyed on them (``FlowTransform``'s record) forgets values computed before."""
    import torch.distributed as dist

    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for ts in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in ts])
            dist.broadcast(flat, src=0)
            offset = 0
            for t in ts:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def _all_reduce_grads(params, weight, loss, elapsed, world, flags=()):
    """Sum ``weight * grad`` over ranks into every ``p.grad`` (missing grads count as zeros); returns the
    weighted-mean loss, the mean elapsed time and the summed ``flags`` (host floats, unweighted) as one
    tensor, not read here (no host sync)."""
    import torch.distributed as dist

    groups = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    extra = None
    keys = list(groups) or [(loss.dtype, loss.device)]
    for k, key in enumerate(keys):
        ps = groups.get(key, [])
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * weight for p in ps]
        if k == 0:
            dtype, device = key
            # torch.full: a fill kernel with a host scalar, no host-to-device copy
            parts.append(torch.stack([loss.detach().to(dtype=dtype, device=device).reshape(()) * weight,
                                      torch.full((), elapsed / world, dtype=dtype, device=device)]
                                     + [torch.full((), float(f), dtype=dtype, device=device) for f in flags]))
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        offset = 0
        for p in ps:
            g = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        if k == 0:
            extra = flat[offset:]
    return extra


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is an extra
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _save(path, payload, world, rank):
    """Rank 0 writes ``payload`` atomically (temporary file + rename); every rank then waits for it."""
    if rank == 0:
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(payload, tmp)
        os.replace(tmp, path)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def load_checkpoint(path, module=None, optimizer=None, map_location="cpu"):
    """Load a checkpoint written by :func:`train` (``module``'s state and the optimiser's) or by
    :func:`train_svi` (restores Pyro's param store, and ``optimizer`` if given: a ``pyro.optim`` object).
    Returns the checkpoint dict (``step``, ``losses``, ...)."""
    ckpt = torch.load(path, map_location=map_location, weights_only=False)
    if "param_store" in ckpt:
        import pyro

        pyro.get_param_store().set_state(ckpt["param_store"])
        if optimizer is not None and ckpt.get("optim") is not None:
            optimizer.set_state(ckpt["optim"])
        return ckpt
    if module is not None:
        for m, state in zip(trainable_modules(module), ckpt["modules"]):
            m.load_state_dict(state)
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    return ckpt


# ---------------------------------------------------------------------------------------------
# the loop shared by both
# ---------------------------------------------------------------------------------------------
class _Loop:
    def __init__(self, steps, time_budget, progress, callback, lr_schedule, desc, world, rank, clock=None):
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.clock = time.perf_counter if clock is None else clock
        self.steps, self.time_budget = steps, time_budget
        self.callback, self.lr_schedule = callback, lr_schedule
        self.world = world
        self.bar = _progress(steps, desc, progress and rank == 0)
        self.result = TrainResult(world_size=world)
        self.t0 = self.clock()

    def elapsed(self):
        return self.clock() - self.t0

    def fraction(self, step, elapsed):
        frac = (step + 1) / max(self.steps, 1)
        if self.time_budget:
            frac = max(frac, elapsed / self.time_budget)
        return frac

    def after(self, step, value, elapsed, optimizer, set_factor):
        """Book-keeping after an applied step; returns True to stop."""
        self.result.losses.append(value)
        frac = self.fraction(step, elapsed)
        if self.lr_schedule is not None:
            set_factor(self.lr_schedule(frac))
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{value:.4g}")
        if self.callback is not None and self.callback(StepInfo(step, value, elapsed, frac, optimizer)):
            self.result.stopped_by = "callback"
            return True
        if self.time_budget is not None and elapsed > self.time_budget and step + 1 < self.steps:
            self.result.stopped_by = "time"
            return True
        return False

    def close(self):
        if self.bar is not None:
            self.bar.close()
        self.result.steps = len(self.result.losses)
        self.result.seconds = self.elapsed()
        return self.result


def _scaler(groups_of):
    """``set_factor(f)``: every optimiser param group's lr becomes its initial lr times ``f``."""
    base = {}

    def set_factor(f):
        for opt in groups_of():
            for i, g in enumerate(opt.param_groups):
                key = (id(opt), i)
                if key not in base:
                    base[key] = g["lr"]
                g["lr"] = base[key] * f

    return set_factor


# ---------------------------------------------------------------------------------------------
# maximum likelihood
# ---------------------------------------------------------------------------------------------
def train(module, loss_fn, tensors, *, steps, batch_size=None, lr=1e-3, optimizer=None, time_budget=None,
          seed=0, progress=False, callback=None, checkpoint=None, clip_norm=None, lr_schedule=None,
          desc="train", distributed=None, clock=None) -> TrainResult:
    """Minimise ``loss_fn(module, batch)`` over minibatches of ``tensors``.

    Arguments:
        module: a ``torch.nn.Module`` (e.g. a flow wrapper with ``log_prob``) or a (conditional)
            transformed distribution whose transforms are modules (see :func:`trainable_modules`).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``, a MEAN over the batch's rows (e.g.
            :func:`density_loss`, :func:`conditional_density_loss`); ``batch`` is a tuple of row-slices
            of ``tensors``.
        tensors: a tensor or a tuple of tensors with the same first dimension (on the training device).
        steps: optimiser steps.
        batch_size: rows per step over all processes (``None``: the full data every step).
        lr: Adam's learning rate when ``optimizer`` is None.
        optimizer: a ``torch.optim.Optimizer`` over the module's parameters (default Adam).
        time_budget: seconds; stop after the step that exceeds it (same decision on every rank).
        seed: seeds the sampler's permutations and torch's global RNG (same on every rank).
        progress: a tqdm bar (rank 0).
        callback: ``callback(StepInfo) -> bool``; True stops. Called on every rank with the same values,
            so a callback that decides from them decides the same everywhere.
        checkpoint: a path; rank 0 writes the modules', optimiser's state, steps and losses at the end.
        clip_norm: clip the (averaged) gradient norm to this before the step.
        lr_schedule: ``f(fraction) -> factor`` of the initial learning rate (e.g. :func:`cosine_decay`).
        desc: the progress bar's label.
        distributed: ``None`` (default): train together with the ranks of an initialised default process
            group, alone without one; ``False``: alone even in a group (e.g. each rank fits its own model).
        clock: a callable returning seconds, which ``time_budget``, ``StepInfo.elapsed`` and
            ``TrainResult.seconds`` are measured in (default ``time.perf_counter``, wall time; e.g.
            :class:`~pyro_flows.experiments.measure.CpuClock` for process CPU time that can pause).

    Returns:
        :class:`TrainResult`.
    """
    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    world, rank = process_group() if distributed is not False else (1, 0)
    mods = trainable_modules(module)
    params = _unique(p for m in mods for p in m.parameters())
    if world > 1:
        _broadcast(params + _unique(b for m in mods for b in m.buffers()))
        _broadcast_loose(_loose_tensors(module))
    torch.manual_seed(seed)
    if optimizer is None:
        optimizer = torch.optim.Adam(params, lr=lr)
    batches = _Batches(tensors, batch_size, world, rank, seed)
    loop = _Loop(steps, time_budget, progress, callback, lr_schedule, desc, world, rank, clock)
    set_factor = _scaler(lambda: [optimizer])
    for step in range(steps):
        loss = loss_fn(module, batches.next())
        optimizer.zero_grad()
        loss.backward()
        if world > 1:
            reduced = _all_reduce_grads(params, batches.weight, loss, loop.elapsed(), world)
            value, elapsed = reduced.tolist()  # the one host sync per step
        else:
            value, elapsed = loss.item(), loop.elapsed()  # the one host sync per step
        if not math.isfinite(value):
            loop.result.stopped_by = "nonfinite"
            break
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        optimizer.step()
        if loop.after(step, value, elapsed, optimizer, set_factor):
            break
    result = loop.close()
    if checkpoint is not None:
        _save(checkpoint, {"modules": [m.state_dict() for m in mods], "optimizer": optimizer.state_dict(),
                           "step": result.steps, "losses": result.losses}, world, rank)
    return result


# ---------------------------------------------------------------------------------------------
# SVI
# ---------------------------------------------------------------------------------------------
def _make_elbo(loss, num_particles, vectorize, max_plate_nesting):
    import pyro.infer

    if not isinstance(loss, str):
        return loss
    cls = getattr(pyro.infer, loss, None)
    if cls is None:
        raise ValueError(f"unknown ELBO {loss!r}: give a pyro.infer class name or an ELBO instance")
    kw = {"num_particles": num_particles}
    if vectorize and num_particles > 1:
        kw["vectorize_particles"] = True
    if max_plate_nesting is not None:
        kw["max_plate_nesting"] = max_plate_nesting
    return cls(**kw)


def train_svi(model, guide, tensors, *, steps, subsample_size=None, num_particles=1, vectorize=True, lr=1e-2,
              optim=None, loss="Trace_ELBO", time_budget=None, seed=0, progress=False, callback=None,
              checkpoint=None, lr_schedule=None, max_plate_nesting=None, desc="svi",
              distributed=None, clock=None) -> TrainResult:
    """Stochastic variational inference: ``model(*batch)`` and ``guide(*batch)`` on minibatches of
    ``tensors``.

    The data plate scales the likelihood the way Pyro's plates expect: the model declares the full
    data size and the minibatch it sees, e.g. ``with pyro.plate("data", N, subsample_size=len(x)):``
    (or ``subsample=`` indices), so each rank's ELBO estimates the full-data ELBO and their average is
    the ELBO of the combined minibatch. Every rank draws the same guide samples (same ``seed``), so the
    run equals the single-process run on the combined minibatch; raise ``num_particles`` to use more.

    Arguments:
        model, guide: Pyro callables taking ``*batch``.
        tensors: a tensor or tuple of tensors with the same first dimension (the data rows), or ``()``
            for a model that closes over its data (called with no arguments; in a group every rank then
            evaluates the same ELBO, so extra processes add nothing but agreement).
        steps: SVI steps.
        subsample_size: rows per step over all processes (``None``: all rows every step).
        num_particles, vectorize: ELBO particles, vectorised when ``num_particles > 1``.
        lr: learning rate of the default ``pyro.optim.Adam``; optim: any ``pyro.optim`` optimiser.
        loss: a ``pyro.infer`` ELBO class name or an ELBO instance.
        time_budget, seed, progress, callback, lr_schedule, desc, distributed, clock: as in :func:`train`.
        checkpoint: a path; rank 0 writes the param store's and optimiser's state at the end.
        max_plate_nesting: passed to the ELBO.

    Returns:
        :class:`TrainResult` (``losses`` are ELBO losses, i.e. negative ELBO estimates).
    """
    import pyro
    from pyro import poutine
    from pyro.infer.util import zero_grads

    tensors = (tensors,) if isinstance(tensors, torch.Tensor) else tuple(tensors)
    world, rank = process_group() if distributed is not False else (1, 0)
    elbo = _make_elbo(loss, num_particles, vectorize, max_plate_nesting)
    optim = optim if optim is not None else pyro.optim.Adam({"lr": lr})
    # create every parameter first (lazily built guides such as AutoFlow build here), by one gradient-free
    # ELBO evaluation, in one process too, so the random stream of the steps is the same for any number of
    # processes; in a group all ranks then start from rank 0's values
    pyro.set_rng_seed(seed)
    with poutine.trace(param_only=True) as capture:
        elbo.loss(model, guide, *_Batches(tensors, subsample_size, world, rank, seed).next())
    known = set(capture.trace.nodes)  # reduced every step, so all ranks reduce the same list
    if world > 1:
        import torch.distributed as dist

        everyone = [None] * world
        dist.all_gather_object(everyone, sorted(known))
        if any(names != everyone[0] for names in everyone):  # the same answer on every rank: all raise
            raise RuntimeError("train_svi: the ranks created different Pyro parameters in their first ELBO "
                               f"evaluation ({everyone}); parameters must not depend on a rank's data")
        store = pyro.get_param_store()
        mods = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
        _broadcast([store[n].unconstrained() for n in sorted(known)]
                   + _unique(b for m in mods for b in m.buffers()))
        _broadcast_loose(_loose_tensors(model, guide))
    batches = _Batches(tensors, subsample_size, world, rank, seed)
    pyro.set_rng_seed(seed)
    loop = _Loop(steps, time_budget, progress, callback, lr_schedule, desc, world, rank, clock)
    set_factor = _scaler(lambda: list(getattr(optim, "optim_objs", {}).values()))
    for step in range(steps):
        batch = batches.next()
        with poutine.trace(param_only=True) as capture:
            local = elbo.loss_and_grads(model, guide, *batch)
        params = every = [site["value"].unconstrained() for _, site in sorted(capture.trace.nodes.items())]
        if world > 1:
            # a parameter this step did not touch still takes part (zero gradient), so the reduced list is
            # the same on every rank whatever each rank's control flow did; a parameter is stepped if some
            # rank used it, as one process on the combined batch would
            store = pyro.get_param_store()
            if not known.issuperset(capture.trace.nodes):
                new = sorted(set(capture.trace.nodes) - known)
                raise RuntimeError(f"train_svi: parameters {new} appeared "
                                   "after the first step; in a process group every parameter must exist from "
                                   "the first ELBO evaluation on")
            params = every = [store[n].unconstrained() for n in sorted(known)]
            ref = params[0] if params else torch.zeros(())
            local_t = torch.full((), local, dtype=ref.dtype, device=ref.device)
            touched = [n in capture.trace.nodes for n in sorted(known)]
            reduced = _all_reduce_grads(params, batches.weight, local_t, loop.elapsed(), world, touched)
            value, elapsed, *used = reduced.tolist()  # Pyro's ELBO read its own loss; this is the second read
            params = [p for p, u in zip(params, used) if u > 0]
        else:
            value, elapsed = float(local), loop.elapsed()
        if not math.isfinite(value):
            zero_grads(set(every))
            loop.result.stopped_by = "nonfinite"
            break
        optim(params)
        zero_grads(set(every))
        if loop.after(step, value, elapsed, optim, set_factor):
            break
    result = loop.close()
    if checkpoint is not None:
        _save(checkpoint, {"param_store": pyro.get_param_store().get_state(),
                           "optim": optim.get_state() if hasattr(optim, "get_state") else None,
                           "step": result.steps, "losses": result.losses}, world, rank)
    return result
