"""The main job: ``python -m pyro_flows demo``.

Trains every registered family (``pyro_flows.FLOWS``, looked up at run time, so a family is covered as soon
as it registers) twice:

(a) as a **density estimator** on built-in 2-D toy densities (default ``8gaussians`` and ``checkerboard``,
    whose exact entropies are known): maximum likelihood on a fixed, seeded training set, then the test NLL
    on a fresh seeded test set next to the exact entropy floor. ``NLL - entropy`` is the KL divergence from
    the data to the model (up to Monte-Carlo error of the test set), so it is the number to look at;

(b) as an **SVI guide** on a built-in Bayesian model (eight schools, non-centred, 10 latent dimensions, the
    model of :mod:`pyro_flows.infer.posteriordb`) via ``pyro_flows.infer.AutoFlow``, reporting
    the final ELBO (higher is better, the mean log importance weight of 500 guide draws) and the PSIS
    diagnostic k-hat (below 0.5 good, above 0.7 unreliable). ``AutoNormal`` is trained alongside as a
    reference.

It prints a table, writes ``results.md`` / ``results.json`` and PNG plots (learned densities, samples,
loss curves, guide samples) into the output folder, and shows a tqdm progress bar during training.
It is composed of the application layer :mod:`pyro_flows.experiments`: data splits (``data``), one model
wrapper (``models``), the trainer (``trainer``) and the reports (``reports``).

Time: ``--time-budget`` (default 140 s) caps the whole run's wall time. Before each training task the
demo gives it an equal share of what is left of the budget (less 30% for evaluation and plots,
measured as it goes, so the cap holds on a slow or busy machine) and stops the task early when the share is
used; ``--steps`` is the cap otherwise. With six families this is about 15 s of training per family (a
third of it per task), so the default run stays under three minutes on two CPU cores including start-up;
the table reports the steps each run actually took and whether its share ran out. ``--time-budget 0``
disables the cap (then ``--steps`` alone decides, e.g. for a reproducible run).

Besides the registered families, ``--family`` accepts a few of Pyro's built-in flows as baselines
(``pyro.spline_coupling``, ``pyro.affine_coupling``, ``pyro.spline_autoregressive``,
``pyro.affine_autoregressive``), e.g. ``--family sinusoidal,pyro.spline_coupling``.

Example:
    >>> from pyro_flows.demo import run_demo
    >>> rows = run_demo(families=["pyro.spline_coupling"], datasets=["8gaussians"], steps=5,
    ...                 svi_steps=5, output="/tmp/pf_demo", progress=False)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import pyro_flows
from pyro_flows.datasets import TABLE_DATASETS, TOY_DATASETS
from pyro_flows.experiments import reports
from pyro_flows.experiments.data import density_splits, eight_schools
from pyro_flows.experiments.models import FlowModel, make_guide

__all__ = [
    "DEFAULT_DATASETS",
    "BASELINES",
    "available_families",
    "fit_density",
    "fit_guide",
    "run_demo",
    "resolve_families",
    "resolve_datasets",
    "check_options",
]

DEFAULT_DATASETS = ("8gaussians", "checkerboard")

#: Pyro built-ins accepted by ``--family`` as baselines (all invertible, so they can do density estimation).
BASELINES = (
    "pyro.spline_coupling",
    "pyro.affine_coupling",
    "pyro.spline_autoregressive",
    "pyro.affine_autoregressive",
)


def available_families():
    """Registered families (at call time) followed by the Pyro baselines."""
    return tuple(pyro_flows.FLOWS) + tuple(BASELINES)


def _names(spec):
    names = []
    for item in spec:
        names.extend(n.strip() for n in str(item).split(",") if n.strip())
    return list(dict.fromkeys(names))


def resolve_families(spec):
    """``spec``: None (every registered family), or a list of names / comma lists. ValueError if unknown."""
    if not spec:
        names = list(pyro_flows.FLOWS)
        if not names:
            print(
                "note: no pyro_flows family is registered yet; running the Pyro baseline "
                "pyro.spline_coupling instead",
                file=sys.stderr,
            )
            names = ["pyro.spline_coupling"]
        return names
    names, known = _names(spec), available_families()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown flow family {bad[0]!r}; expected one of {known}")
    return names


def resolve_datasets(spec):
    """``spec``: None (the default toy densities), or names / comma lists (toy or table names)."""
    if not spec:
        return list(DEFAULT_DATASETS)
    names, known = _names(spec), TOY_DATASETS + TABLE_DATASETS
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown data set {bad[0]!r}; expected one of {known}")
    return names


def check_options(families, datasets, steps, svi_steps, device):
    """Validate the demo's options; returns ``(families, datasets, device)``. ValueError if one is bad."""
    families = resolve_families(families)
    datasets = resolve_datasets(datasets)
    device = str(device)
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if svi_steps is not None and svi_steps < 1:
        raise ValueError(f"svi_steps must be >= 1, got {svi_steps}")
    return families, datasets, device


def _status(result, time_budget):
    if result.stopped_by == "nonfinite":
        return f"non-finite loss at step {result.steps}"
    if result.stopped_by == "time":
        return f"time share ({time_budget:.1f}s) used"
    return "ok"


# ---------------------------------------------------------------------------------------------
# (a) density estimation
# ---------------------------------------------------------------------------------------------
def fit_density(
    name,
    train,
    test,
    steps=500,
    num_layers=4,
    batch_size=256,
    lr=5e-3,
    seed=0,
    time_budget=None,
    progress=True,
    desc=None,
):
    """Maximum-likelihood training of ``name`` on ``train``; returns a dict with the test NLL and curves.

    Adam with a cosine learning-rate decay from ``lr`` to ``lr / 10`` over the run's progress (steps or
    time share, whichever is further along), gradient-norm clip 100; stops early when ``time_budget``
    seconds of training have passed or the loss is not finite.
    """
    from pyro_flows.experiments.trainer import cosine_decay, density_loss, train as train_loop

    torch.manual_seed(seed)
    model = FlowModel(name, train.shape[-1], num_layers=num_layers, task="density").to(train.device)
    res = train_loop(
        model,
        density_loss,
        (train,),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        time_budget=time_budget,
        seed=seed,
        progress=progress,
        clip_norm=100.0,
        lr_schedule=cosine_decay(0.1),
        desc=desc or name,
    )
    with torch.no_grad():
        test_nll = float(torch.cat([-model.log_prob(c) for c in test.split(2048)]).mean())
    return {
        "model": model,
        "losses": res.losses,
        "steps": res.steps,
        "test_nll": test_nll,
        "time": res.seconds,
        "status": _status(res, time_budget or 0.0),
    }


# ---------------------------------------------------------------------------------------------
# (b) SVI guide on eight schools
# ---------------------------------------------------------------------------------------------
def fit_guide(
    name,
    steps=500,
    num_layers=4,
    lr=None,
    num_particles=4,
    seed=0,
    device="cpu",
    time_budget=None,
    progress=True,
    eval_particles=500,
):
    """Fit a guide (``name``: family, baseline or ``"AutoNormal"``) to eight schools by SVI.

    Returns a dict with the ELBO (mean log importance weight of ``eval_particles`` guide draws), the PSIS
    k-hat, the loss curve, guide samples of ``(theta_1, log tau)``, steps and training time.
    ``lr=None`` means 1e-2 for flows and 3e-2 for ``AutoNormal`` (whose small initial scales need the
    larger step to converge in a few hundred steps; each is its better of the two on this model).
    """
    import pyro

    from pyro_flows.experiments.trainer import train_svi
    from pyro_flows.infer import guide_draws, importance_log_weights, psis_khat

    if lr is None:
        lr = 3e-2 if name == "AutoNormal" else 1e-2
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, _ = eight_schools(device=device)
    guide = (
        make_guide(name, model, num_layers=num_layers) if name != "AutoNormal" else make_guide(name, model)
    )
    optim = pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 100.0, "lrd": 0.1 ** (1 / max(steps, 1))})
    res = train_svi(
        model,
        guide,
        (),
        steps=steps,  # () : the model closes over its data
        num_particles=num_particles,
        vectorize=True,
        optim=optim,
        time_budget=time_budget,
        seed=seed,
        progress=progress,
        max_plate_nesting=0,
        desc=f"{name}/eight_schools",
    )
    with torch.no_grad():
        lw = importance_log_weights(model, guide, num_samples=eval_particles, max_plate_nesting=0).detach()
        k_hat = psis_khat(log_weights=lw, method="pyro")  # pyro's fit: no arviz import (slow)
        d = guide_draws(model, guide, num_samples=eval_particles, sites=["tau", "theta"])
        samples = torch.stack([d["theta"][:, 0], d["tau"].log()], -1)[:500].cpu()
    return {
        "guide": guide,
        "losses": res.losses,
        "steps": res.steps,
        "elbo": float(lw.mean()),
        "k_hat": float(k_hat),
        "samples": samples,
        "time": res.seconds,
        "status": _status(res, time_budget or 0.0),
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
DENSITY_COLUMNS = [
    ("family", "family", None),
    ("dataset", "data set", None),
    ("steps", "steps", None),
    ("test_nll", "test NLL", "{:.3f}"),
    ("floor", "entropy floor", "{:.3f}"),
    ("excess", "NLL - floor (KL)", "{:.3f}"),
    ("time", "train s", "{:.1f}"),
    ("status", "status", None),
]
SVI_COLUMNS = [
    ("family", "guide", None),
    ("steps", "steps", None),
    ("elbo", "ELBO", "{:.2f}"),
    ("k_hat", "PSIS k-hat", "{:.2f}"),
    ("time", "train s", "{:.1f}"),
    ("status", "status", None),
]


def run_demo(
    families=None,
    datasets=None,
    steps=400,
    svi_steps=None,
    num_layers=4,
    device="cpu",
    output="pyro_flows_demo",
    seed=0,
    time_budget=140.0,
    progress=True,
    plots=True,
    svi=True,
    out=None,
):
    """Run the demo; returns ``{"density": rows, "svi": rows, "files": [...]}``. See the module docstring."""
    out = sys.stdout if out is None else out
    families, datasets, device = check_options(families, datasets, steps, svi_steps, device)
    svi_steps = steps if svi_steps is None else svi_steps
    os.makedirs(output, exist_ok=True)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    # one-time costs (torch.optim's first Optimizer imports torch._dynamo: seconds) are paid here, inside
    # the budget, rather than in the first family's training share
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    tasks_left = [len(families) * len(datasets) + ((len(families) + 1) if svi else 0)]

    def share():
        """Training seconds for the next task: an equal share of what is left of the whole budget, less
        the part its own evaluation and the final plots need (measured, so it adapts to a busy machine)."""
        if not time_budget:
            return None
        left = time_budget - (time.perf_counter() - t_start) - 3.0
        n = tasks_left[0]
        tasks_left[0] -= 1
        return max(0.5, 0.7 * left / max(n, 1))

    print(
        f"pyro_flows demo: families {families}; data sets {datasets}"
        f"{' + eight_schools (SVI)' if svi else ''}; device {device}; output {output}",
        file=out,
    )

    density_rows, curves, floors, files = [], {}, {}, []
    for ds in datasets:
        splits = density_splits(ds, seed=seed, n_train=20000, n_val=1, n_test=3000, device=device)
        floors[ds] = splits.floor
        fits = {}
        for name in families:
            fit = fit_density(
                name,
                splits.train,
                splits.test,
                steps=steps,
                num_layers=num_layers,
                seed=seed,
                time_budget=share(),
                progress=progress,
                desc=f"{name}/{ds}",
            )
            fits[name] = fit
            density_rows.append(
                {
                    "family": name,
                    "dataset": ds,
                    "steps": fit["steps"],
                    "test_nll": fit["test_nll"],
                    "floor": splits.floor,
                    "excess": None if splits.floor is None else fit["test_nll"] - splits.floor,
                    "time": fit["time"],
                    "status": fit["status"],
                }
            )
        curves[ds] = {n: f["losses"] for n, f in fits.items()}
        if plots and splits.train.shape[-1] == 2:
            path = os.path.join(output, f"density_{ds}.png")
            files.append(
                reports.plot_densities(
                    ds,
                    splits.test,
                    {f"{n}\nNLL {f['test_nll']:.3f}": f["model"] for n, f in fits.items()},
                    path,
                )
            )

    svi_rows, svi_fits = [], {}
    if svi:
        for name in ["AutoNormal"] + families:
            fit = fit_guide(
                name,
                steps=svi_steps,
                num_layers=num_layers,
                seed=seed,
                device=device,
                time_budget=share(),
                progress=progress,
            )
            svi_fits[name] = fit
            svi_rows.append(
                {
                    "family": name,
                    "steps": fit["steps"],
                    "elbo": fit["elbo"],
                    "k_hat": fit["k_hat"],
                    "time": fit["time"],
                    "status": fit["status"],
                }
            )
        curves["eight_schools (-ELBO)"] = {n: f["losses"] for n, f in svi_fits.items()}
        if plots:
            path = os.path.join(output, "guide_samples_eight_schools.png")
            files.append(
                reports.plot_guide_samples(
                    {f"{n}\nk-hat {f['k_hat']:.2f}": f["samples"] for n, f in svi_fits.items()},
                    path,
                    xlabel="theta[1]",
                    ylabel="log tau",
                    title="eight schools: guide samples (the funnel)",
                )
            )
    if plots:
        files.append(
            reports.plot_losses(
                curves, os.path.join(output, "loss_curves.png"), floors, ylabel="train NLL / -ELBO"
            )
        )

    total = time.perf_counter() - t_start
    text = "## Density estimation (test NLL in nats; floor = exact entropy of the data)\n\n"
    text += reports.markdown_table(density_rows, DENSITY_COLUMNS) + "\n"
    if svi:
        text += (
            "\n## SVI guide on eight schools (10 latents; ELBO higher is better; "
            "k-hat < 0.5 good, > 0.7 unreliable)\n\n" + reports.markdown_table(svi_rows, SVI_COLUMNS) + "\n"
        )
    text += f"\nTotal time {total:.1f} s on {device} ({torch.get_num_threads()} threads).\n"
    print("\n" + text, file=out)
    md = reports.write_text(os.path.join(output, "results.md"), "# pyro_flows demo results\n\n" + text)
    js = reports.write_text(
        os.path.join(output, "results.json"),
        json.dumps(
            {
                "density": density_rows,
                "svi": svi_rows,
                "total_seconds": total,
                "device": device,
                "families": families,
                "datasets": datasets,
            },
            indent=1,
        ),
    )
    files = [md, js] + files
    print("wrote " + ", ".join(files), file=out)
    return {"density": density_rows, "svi": svi_rows, "files": files, "total_seconds": total}
