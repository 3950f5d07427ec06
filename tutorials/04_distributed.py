"""Tutorial 4: training a conditional flow on several processes (torch.distributed, torchrun).

Run:  torchrun --nproc_per_node 2 tutorials/04_distributed.py            (2 CPU processes, gloo; <= 3 minutes)
      torchrun --nproc_per_node 2 tutorials/04_distributed.py --smoke    (seconds)
      python tutorials/04_distributed.py --smoke                         (one process: the same script)

Why. Conditional density estimation and amortised inference meet large data: millions of simulations or
observations. The usual way to use several GPUs or machines is data parallelism: every process holds the
same model, takes a different slice of each minibatch, and the processes average their gradients before
every optimiser step, so all of them apply the same update and stay identical. PyTorch's launcher
``torchrun`` starts the processes and tells each its rank; ``torch.distributed`` moves the gradients.

What changes in your code: nothing but the setup below. ``pyro_flows.experiments.trainer.train`` (and
``train_svi``) detect the process group and then

* shard the data: ``batch_size`` is the minibatch of one step over ALL processes; each rank takes an equal,
  disjoint share (the order of ``torch.utils.data.DistributedSampler``), so the run is the single-process
  run on the combined minibatch, whatever the number of processes;
* broadcast rank 0's parameters and buffers (the permutations between layers) before the first step;
* average the gradients after ``backward`` (one all-reduce per step, weighted by each rank's share);
* take every stop decision (time budget, non-finite loss) from reduced values, so no rank is left
  waiting in a collective;
* show the progress bar and write the checkpoint on rank 0 only.

On GPUs. Use the ``nccl`` backend and one device per process: ``torch.cuda.set_device(local_rank)`` and
put the data and the flow on ``cuda:local_rank`` (this script does both when CUDA is available). The
trainer makes one host synchronisation per step (reading the averaged loss), and our families' training
direction makes none of its own, so the GPUs are not stalled by Python.

On several machines. Start the same command on every machine with the machine count and a rendezvous
point that all can reach, e.g. on each of 2 machines with 4 GPUs:
    torchrun --nnodes 2 --nproc_per_node 4 --rdzv_backend c10d --rdzv_endpoint HOST:29400 \\
             --rdzv_id my_job tutorials/04_distributed.py
Nothing else changes: the world size becomes 8 and each rank takes 1/8 of every minibatch.

The data: the ridge of tutorial 3, c ~ Uniform(-1, 1), x1 | c ~ Normal(c, 0.3),
x2 | x1, c ~ Normal(sin(3 x1), 0.1 + 0.3 |c|). Every rank generates the same data from one seed here; with
real data, every rank opens the same dataset (a memory-mapped file) and the trainer picks its rows.
"""

import argparse
import math
import os
import time
from pathlib import Path

import pyro.distributions as dist
import torch
import torch.distributed as tdist

import pyro_flows
from pyro_flows.distributions import ConditionalTransformedDistribution
from pyro_flows.experiments.data import ridge_log_prob, ridge_sample
from pyro_flows.experiments.trainer import (
    conditional_density_loss,
    cosine_decay,
    load_checkpoint,
    train,
)


def setup(device_arg):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment);
    without torchrun, run alone. Returns (rank, world, device)."""
    use_cuda = torch.cuda.is_available() and device_arg != "cpu"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)  # one GPU per process
        tdist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        return tdist.get_rank(), tdist.get_world_size(), device
    return 0, 1, torch.device("cuda" if use_cuda else "cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds: small data, few steps")
    parser.add_argument("--family", default="sinusoidal", choices=pyro_flows.FLOWS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=512, help="rows per step over ALL processes")
    parser.add_argument("--time-budget", type=float, default=180.0, help="seconds of training at most")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu"))
    parser.add_argument("--out", default=".", help="folder of the checkpoint")
    args = parser.parse_args()
    steps = args.steps or (20 if args.smoke else 1500)
    n_train, n_test = (2048, 1024) if args.smoke else (200_000, 20_000)
    batch_size = 64 if args.smoke else args.batch_size

    rank, world, device = setup(args.device)

    def say(*a, tag=True):  # rank 0 reports; the other ranks stay quiet
        if rank == 0:
            print(*(((f"[rank {rank} of {world}]",) if tag else ()) + a), flush=True)

    # every rank: the same data (here generated from one seed; in practice the same files)
    g = torch.Generator().manual_seed(0)
    x_train, c_train = (t.to(device) for t in ridge_sample(n_train, g))
    x_test, c_test = (t.to(device) for t in ridge_sample(n_test, g))

    # every rank: the same flow (the trainer broadcasts rank 0's parameters anyway)
    torch.manual_seed(0)
    flow = pyro_flows.flow(args.family, 2, num_layers=4, context_dim=1).to(device)
    base = dist.Normal(torch.zeros(2, device=device), torch.ones(2, device=device)).to_event(1)
    model = ConditionalTransformedDistribution(base, [flow])

    say(f"{args.family}: {n_train} rows, {steps} steps of {batch_size} rows "
        f"({batch_size // world} per process)")
    ckpt = Path(args.out) / "conditional_flow.pt"
    t0 = time.perf_counter()
    result = train(model, conditional_density_loss, (x_train, c_train), steps=steps, batch_size=batch_size,
                   lr=5e-3, lr_schedule=cosine_decay(0.1), clip_norm=100.0, time_budget=args.time_budget,
                   progress=not args.smoke, checkpoint=str(ckpt), seed=0)
    seconds = time.perf_counter() - t0

    # evaluation, sharded too: each rank scores its rows, one all-reduce sums them
    rows = torch.arange(n_test, device=device).tensor_split(world)[rank]
    with torch.no_grad():
        parts = torch.stack([-model.condition(c_test[rows]).log_prob(x_test[rows]).sum(),
                             -ridge_log_prob(x_test[rows], c_test[rows]).sum()])
    if world > 1:
        tdist.all_reduce(parts)
    nll, floor = (parts / n_test).tolist()

    # the checkpoint rank 0 wrote can be loaded anywhere, e.g. for sampling later
    state = load_checkpoint(str(ckpt))
    say(f"checkpoint {ckpt.name}: step {state['step']}, final loss {state['losses'][-1]:.4f}")
    say("| family | processes | steps | stopped by | train s | test NLL | entropy floor | gap |", tag=False)
    say("|---|---|---|---|---|---|---|---|", tag=False)
    say(f"| {args.family} | {world} | {result.steps} | {result.stopped_by} | {seconds:.1f} | {nll:.4f} "
        f"| {floor:.4f} | {nll - floor:.4f} |", tag=False)
    if not math.isfinite(nll):
        raise SystemExit("non-finite test NLL")
    if world > 1:
        tdist.destroy_process_group()


if __name__ == "__main__":
    main()
