"""Data-parallel training on ``torch.distributed`` (gloo, CPU): two processes equal one.

Two processes, each given the full data, train with :mod:`pyro_flows.experiments.trainer` for 5 steps; the
trainer shards every minibatch over them and averages the gradients. Their parameters must equal (float64,
atol 1e-6) those of one process on the combined minibatches, and each other exactly. The cases cover
density estimation with minibatches and a family whose both directions are iterative solves (monotone),
conditional density estimation on a full batch split unevenly (41 rows over 2 processes), and SVI with an
``AutoFlow`` guide on a subsampled data plate (lazily created parameters, vectorised particles). Rank 1
builds its flows from a different seed (and its AutoFlow from another initial scale, and its Pyro
``Permute`` from another random permutation), so the equality also shows that rank 0's values are broadcast
before the first step, lazily created parameters and permutations included, and that the transforms'
cached records do not outlive the broadcast. Stop decisions (time budget,
non-finite loss on one rank only) must be the same on both ranks, and one checkpoint is written.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

pytestmark = pytest.mark.skipif(not (tdist.is_available() and tdist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

ROOT = Path(__file__).resolve().parents[1]
STEPS = 5
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _snapshot(mods):
    return [p.detach().clone() for m in mods for p in m.parameters()]


# ---------------------------------------------------------------------------------------------
# the cases: each runs in one process or in a group; `init_seed` seeds the construction of the flow
# ---------------------------------------------------------------------------------------------
def case_density(init_seed, checkpoint=None):
    import pyro.distributions as dist

    import pyro_flows
    from pyro_flows.experiments.trainer import density_loss, train

    x = torch.randn(40, 3, generator=_gen(1)) * torch.tensor([1.0, 0.5, 2.0]) + 0.3
    torch.manual_seed(100 + init_seed)
    flow = pyro_flows.flow("monotone", 3, num_layers=2, permutation="random")
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
    init = _snapshot([flow])
    buffers = [b.clone() for b in flow.buffers()]
    r = train(d, density_loss, (x,), steps=STEPS, batch_size=16, lr=3e-2, seed=7, checkpoint=checkpoint)
    return {"init": init, "params": _snapshot([flow]), "buffers": [b.clone() for b in flow.buffers()],
            "init_buffers": buffers, "losses": r.losses, "stopped_by": r.stopped_by, "steps": r.steps}


def case_conditional(init_seed):
    import pyro.distributions as dist

    import pyro_flows
    from pyro_flows.distributions import ConditionalTransformedDistribution
    from pyro_flows.experiments.trainer import conditional_density_loss, train

    g = _gen(2)
    ctx = torch.randn(41, 2, generator=g)
    x = torch.stack([ctx[:, 0] + 0.3 * torch.randn(41, generator=g), ctx.prod(-1).sin()], -1)
    torch.manual_seed(200 + init_seed)
    flow = pyro_flows.flow("sinusoidal", 2, num_layers=2, context_dim=2)
    d = ConditionalTransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    init = _snapshot([flow])
    r = train(d, conditional_density_loss, (x, ctx), steps=STEPS, lr=3e-2, seed=3)  # full batch: 21 + 20 rows
    return {"init": init, "params": _snapshot([flow]), "losses": r.losses, "stopped_by": r.stopped_by}


def _svi_model(x, size):
    import pyro
    import pyro.distributions as dist

    loc = pyro.sample("loc", dist.Normal(x.new_zeros(3), 2.0).to_event(1))
    log_scale = pyro.sample("log_scale", dist.Normal(x.new_zeros(()), 1.0))
    with pyro.plate("data", size, subsample_size=len(x)):
        pyro.sample("obs", dist.Normal(loc, log_scale.exp()[..., None]).to_event(1), obs=x)


def case_svi(init_seed, checkpoint=None):
    import pyro

    from pyro_flows.experiments.trainer import train_svi
    from pyro_flows.infer import AutoFlow

    pyro.clear_param_store()
    x = torch.randn(40, 3, generator=_gen(3)) * 0.7 + torch.tensor([1.0, -2.0, 0.5])
    model = functools.partial(_svi_model, size=x.shape[0])
    torch.manual_seed(300 + init_seed)
    # rank 1's lazily created parameters start elsewhere: rank 0's must reach it before the first step
    guide = AutoFlow(model, "monotone", num_layers=1, init_scale=0.1 if init_seed == 0 else 0.3)
    kw = dict(subsample_size=16, num_particles=2, lr=3e-2, seed=5, max_plate_nesting=1)
    train_svi(model, guide, (x,), steps=0, **kw)  # creates (and broadcasts) the parameters only
    store = pyro.get_param_store()
    names = sorted(store.keys())
    init = [store[n].detach().clone() for n in names]
    r = train_svi(model, guide, (x,), steps=STEPS, checkpoint=checkpoint, **kw)
    return {"names": names, "init": init, "params": [store[n].detach().clone() for n in names],
            "losses": r.losses, "stopped_by": r.stopped_by}


def case_stops(init_seed):
    """Stop decisions taken from reduced values: a time budget of 0 s stops every rank after its first
    step; an infinite loss on rank 1's rows only stops both before any update."""
    import pyro.distributions as dist

    import pyro_flows
    from pyro_flows.experiments.trainer import density_loss, train

    torch.manual_seed(400 + init_seed)
    flow = pyro_flows.flow("qlf", 2, num_layers=1)
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
    x = torch.randn(20, 2, generator=_gen(4))
    timed = train(d, density_loss, (x,), steps=STEPS, lr=1e-2, time_budget=0.0)
    x[15] = 1e200  # rows 10..19 are rank 1's share of the full batch: an infinite loss there only
    before = _snapshot([flow])
    bad = train(d, density_loss, (x,), steps=STEPS, lr=1e-2)
    unchanged = all(torch.equal(a, b) for a, b in zip(before, _snapshot([flow])))
    # distributed=False: every rank alone on its own data, no collective (a hang would time the test out)
    alone = train(d, density_loss, (x[:10] + init_seed,), steps=2, lr=1e-2, distributed=False)
    return {"time": (timed.stopped_by, timed.steps), "nan": (bad.stopped_by, bad.steps),
            "nan_unchanged": unchanged, "alone": (alone.world_size, _snapshot([flow]))}


def case_peer(init_seed):
    """Pyro's own flows, MAF-style (``t.inv``), with a random Pyro ``Permute`` drawn per rank: its
    permutation is a plain attribute, not a buffer, and must still be rank 0's everywhere."""
    import pyro.distributions as dist
    from pyro.distributions import transforms as T

    from pyro_flows.experiments.trainer import density_loss, train

    x = torch.randn(40, 3, generator=_gen(5)) * torch.tensor([2.0, 1.0, 0.5])
    torch.manual_seed(500 + init_seed)
    stack = T.ComposeTransformModule([T.affine_autoregressive(3, hidden_dims=[8]),
                                      T.Permute(torch.randperm(3)),
                                      T.affine_autoregressive(3, hidden_dims=[8])])
    d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [stack.inv])
    init, perm0 = _snapshot([stack]), stack.parts[1].permutation.clone()
    r = train(d, density_loss, (x,), steps=STEPS, batch_size=16, lr=3e-2, seed=2)
    return {"init": init, "params": _snapshot([stack]), "losses": r.losses, "stopped_by": r.stopped_by,
            "perm": (perm0, stack.parts[1].permutation.clone())}


def case_cache(init_seed):
    """A pair computed before training must not be served from a transform's record afterwards: the
    broadcast writes with ``copy_``, which moves the version counters the records are keyed on."""
    import pyro_flows
    from pyro_flows.experiments.trainer import density_loss, train

    torch.manual_seed(600 + init_seed)
    t = pyro_flows.qlf(2)
    with torch.no_grad():  # away from the volume-preserving initialisation, differently on each rank
        for p in t.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(6, 2, generator=_gen(6))
    y = t(x)
    before = t.log_abs_det_jacobian(x, y).detach().clone()
    train(t, density_loss, (x,), steps=0)  # broadcast only
    after = t.log_abs_det_jacobian(x, y).detach()
    with torch.no_grad():
        fresh = t.log_abs_det_jacobian(x.clone(), t(x.clone()))
        roundtrip = float((t(t.inv(y)) - y).abs().max())
    return {"before": before, "after": after, "fresh": fresh, "roundtrip": roundtrip}


CASES = {"density": case_density, "conditional": case_conditional, "svi": case_svi, "stops": case_stops,
         "peer": case_peer, "cache": case_cache}


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=120))
    try:
        torch.set_default_dtype(torch.float64)
        out = {}
        for name, case in CASES.items():
            kw = {"checkpoint": os.path.join(outdir, f"{name}.ckpt")} if name in ("density", "svi") else {}
            out[name] = case(rank, **kw)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The cases in a 2-process gloo group (spawned once) and in this process."""
    outdir = str(tmp_path_factory.mktemp("dist"))
    ranks = _spawn_ranks(_worker, outdir)
    single = _in_float64(lambda: {name: case(0) for name, case in CASES.items()})
    return {"ranks": ranks, "single": single, "outdir": outdir}


def _spawn_ranks(worker, outdir):
    """Run ``worker(rank, WORLD, port, outdir)`` in a ``WORLD``-process group; each rank's saved results."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(WORLD, _free_port(), outdir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _in_float64(fn):
    """``fn()`` with float64 as the default dtype (as in the workers), restoring the old default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn()
    finally:
        torch.set_default_dtype(old)


def _assert_same(dist_params, single_params, init):
    assert len(dist_params) == len(single_params) > 0
    moved = max(float((p - q).abs().max()) for p, q in zip(single_params, init))
    assert moved > 1e-3, "the parameters barely moved: the comparison would be vacuous"
    for p, q in zip(dist_params, single_params):
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["density", "conditional", "peer"])
def test_two_processes_equal_one_density(runs, case):
    r0, r1 = (r[case] for r in runs["ranks"])
    single = runs["single"][case]
    for a, b in zip(r0["params"], r1["params"]):  # ranks apply the same averaged gradient: identical
        assert torch.equal(a, b)
    # rank 1 built its flow from another seed; rank 0 built the same one as the single process
    assert any(not torch.equal(a, b) for a, b in zip(r1["init"], single["init"]))
    _assert_same(r0["params"], single["params"], single["init"])
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single["losses"]), atol=1e-6, rtol=0)
    assert r0["stopped_by"] == r1["stopped_by"] == "steps"


def test_buffers_broadcast(runs):
    r0, r1 = (r["density"] for r in runs["ranks"])
    # permutation="random" is seeded per layer, so the buffers agree anyway; they must be unchanged
    for a, b, c in zip(r0["buffers"], r1["buffers"], r1["init_buffers"]):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert len(r0["buffers"]) > 0


def test_plain_attribute_permutation_broadcast(runs):
    r0, r1 = (r["peer"] for r in runs["ranks"])
    assert not torch.equal(r1["perm"][0], r0["perm"][0]), "rank 1 should have drawn another permutation"
    assert torch.equal(r1["perm"][1], r0["perm"][0]) and torch.equal(r0["perm"][1], r0["perm"][0])


def test_broadcast_invalidates_transform_records(runs):
    r1 = runs["ranks"][1]["cache"]  # rank 1's parameters were replaced by rank 0's
    assert not torch.allclose(r1["before"], r1["fresh"])
    torch.testing.assert_close(r1["after"], r1["fresh"], atol=1e-12, rtol=0)
    assert r1["roundtrip"] < 1e-8


def test_two_processes_equal_one_svi(runs):
    r0, r1 = (r["svi"] for r in runs["ranks"])
    single = runs["single"]["svi"]
    assert r0["names"] == r1["names"] == single["names"]
    for a, b in zip(r0["params"], r1["params"]):
        assert torch.equal(a, b)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single["losses"]),
                               atol=1e-6, rtol=1e-9)
    for a, b in zip(r1["init"], single["init"]):  # rank 1's own initial scale was replaced by rank 0's
        assert torch.equal(a, b)
    _assert_same(r0["params"], single["params"], single["init"])
    assert any(n.startswith("AutoFlow") or "transform" in n for n in single["names"])


def test_stop_decisions_agree(runs):
    r0, r1 = (r["stops"] for r in runs["ranks"])
    assert r0["time"] == r1["time"] == ("time", 1)
    assert r0["nan"] == r1["nan"] == ("nonfinite", 0)
    assert r0["nan_unchanged"] and r1["nan_unchanged"]
    assert r0["alone"][0] == r1["alone"][0] == 1
    assert any(not torch.equal(a, b) for a, b in zip(r0["alone"][1], r1["alone"][1]))


def test_one_checkpoint(runs):
    from pyro_flows.experiments.trainer import load_checkpoint

    ckpt = load_checkpoint(os.path.join(runs["outdir"], "density.ckpt"))
    assert ckpt["step"] == STEPS
    saved = [t for state in ckpt["modules"] for k, t in state.items() if "perm" not in k]
    assert len(saved) >= len(runs["ranks"][0]["density"]["params"])
    ckpt = load_checkpoint(os.path.join(runs["outdir"], "svi.ckpt"))
    assert ckpt["step"] == STEPS and "param_store" in ckpt
    assert not [f for f in os.listdir(runs["outdir"]) if ".tmp" in f]


# ---------------------------------------------------------------------------------------------
# every registered family, plain and conditional, in its default direction. SGD here (the density and
# SVI cases above use Adam): Adam divides each update by the gradient's own running scale, so a
# parameter whose gradient is zero in exact arithmetic (rounding noise, summed in a different order by
# two processes) gets an update of the noise's sign; with SGD a parameter difference is proportional to
# the gradient difference, which is what data parallelism can change
# ---------------------------------------------------------------------------------------------
def case_family(name, init_seed, conditional):
    import pyro.distributions as dist

    import pyro_flows
    from pyro_flows.distributions import ConditionalTransformedDistribution
    from pyro_flows.experiments.trainer import conditional_density_loss, density_loss, train

    g = _gen(7)
    torch.manual_seed(700 + init_seed)
    if conditional:
        ctx = torch.randn(21, 2, generator=g)
        x = torch.stack([ctx[:, 0] + 0.5 * torch.randn(21, generator=g), ctx[:, 1].tanh()], -1)
        flow = pyro_flows.flow(name, 2, num_layers=1, context_dim=2)
        d = ConditionalTransformedDistribution(dist.Normal(torch.zeros(2), 1.0).to_event(1), [flow])
        r = train(d, conditional_density_loss, (x, ctx), steps=3, seed=1,  # full batch, 11 + 10
                  optimizer=torch.optim.SGD(flow.parameters(), lr=2e-2))
    else:
        x = torch.randn(24, 3, generator=g) * torch.tensor([1.5, 1.0, 0.5])
        flow = pyro_flows.flow(name, 3, num_layers=2)
        d = dist.TransformedDistribution(dist.Normal(torch.zeros(3), 1.0).to_event(1), [flow])
        r = train(d, density_loss, (x,), steps=3, batch_size=12, seed=1,
                  optimizer=torch.optim.SGD(flow.parameters(), lr=2e-2))
    return {"params": _snapshot([flow]), "losses": r.losses}


def _family_worker(rank, world, port, outdir):
    import pyro_flows

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                             timeout=timedelta(seconds=300))
    try:
        torch.set_default_dtype(torch.float64)
        out = {(f, c): case_family(f, rank, c) for f in pyro_flows.FLOWS for c in (False, True)}
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        tdist.destroy_process_group()


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    import pyro_flows

    outdir = str(tmp_path_factory.mktemp("families"))
    ranks = _spawn_ranks(_family_worker, outdir)
    single = _in_float64(lambda: {(f, c): case_family(f, 0, c) for f in pyro_flows.FLOWS for c in (False, True)})
    return ranks, single


@pytest.mark.slow
@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_every_family_two_processes_equal_one(family_runs, conditional):
    import pyro_flows

    ranks, single = family_runs
    for name in pyro_flows.FLOWS:
        key = (name, conditional)
        for a, b in zip(ranks[0][key]["params"], ranks[1][key]["params"]):
            assert torch.equal(a, b), name
        for p, q in zip(ranks[0][key]["params"], single[key]["params"]):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_shards_match_distributed_sampler():
    from torch.utils.data import DistributedSampler

    from pyro_flows.experiments.trainer import shard_indices

    for n, world, seed, epoch in [(10, 3, 1, 0), (11, 2, 5, 2), (7, 4, 0, 1), (3, 5, 0, 0)]:
        for rank in range(world):
            sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
            sampler.set_epoch(epoch)
            assert shard_indices(n, world, rank, seed, epoch).tolist() == list(sampler)


def test_tutorial_under_torchrun(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    path = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(ROOT / "tutorials" / "04_distributed.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, check=False, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0" in proc.stdout and "rank 1" not in proc.stdout  # rank 0 reports, alone
    assert (tmp_path / "conditional_flow.pt").exists()


# ---------------------------------------------------------------------------------------------
# the trainer alone (no process group)
# ---------------------------------------------------------------------------------------------
class _Shift(torch.nn.Module):
    """log N(x; w, I) up to a constant: the gradient of the mean loss is w - mean(x)."""

    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def log_prob(self, x):
        return -0.5 * ((x - self.w) ** 2).sum(-1)


def test_epochs_cover_the_data_once_and_sgd_is_exact():
    from pyro_flows.experiments.trainer import density_loss, train

    x = torch.arange(12.0).reshape(12, 1)
    seen = []

    def loss(module, batch):
        seen.append(batch[0].reshape(-1).tolist())
        return density_loss(module, batch)

    m = _Shift(1)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    r = train(m, loss, x, steps=3, batch_size=4, optimizer=opt)
    assert r.stopped_by == "steps" and r.steps == 3 and r.world_size == 1
    assert sorted(v for b in seen for v in b) == list(range(12))  # one epoch: every row once
    w = 0.0
    for b in seen:  # SGD on w - mean(batch)
        w -= 0.5 * (w - sum(b) / len(b))
    assert abs(float(m.w.detach()) - w) < 1e-6


def test_callback_schedule_and_checkpoint(tmp_path):
    from pyro_flows.experiments.trainer import cosine_decay, density_loss, load_checkpoint, train

    m = _Shift(2)
    infos = []

    def callback(info):  # sees the learning rate the schedule set for the next step; True stops
        infos.append((info.step, info.fraction, info.optimizer.param_groups[0]["lr"]))
        return info.step == 3

    r = train(m, density_loss, torch.randn(8, 2), steps=10, lr=0.1, lr_schedule=cosine_decay(0.1),
              callback=callback, checkpoint=str(tmp_path / "c.pt"))
    assert r.stopped_by == "callback" and r.steps == 4
    assert [i[0] for i in infos] == [0, 1, 2, 3]
    assert infos[-1][1] == pytest.approx(0.4)
    assert infos[-1][2] == pytest.approx(0.1 * cosine_decay(0.1)(0.4))
    fresh = _Shift(2)
    ckpt = load_checkpoint(str(tmp_path / "c.pt"), fresh)
    assert ckpt["step"] == 4 and torch.equal(fresh.w, m.w)


def test_bad_arguments_name_the_sizes():
    from pyro_flows.experiments.trainer import density_loss, train

    with pytest.raises(ValueError, match=r"same first dimension.*\[4, 5\]"):
        train(_Shift(1), lambda m, b: density_loss(m, b[:1]), (torch.zeros(4, 1), torch.zeros(5, 1)), steps=1)
    with pytest.raises(TypeError, match="no torch.nn.Module"):
        train(object(), density_loss, torch.zeros(4, 1), steps=1)
