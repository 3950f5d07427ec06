"""The main job: ``python -m pyro_flows demo``.

Two panels, each trained for the same CPU time per contender, with a table and plots:

(a) **SVI guides on eight schools, centred** (10 latents; the funnel that defeats Gaussian guides; the model
    of :mod:`pyro_flows.infer.posteriordb` with Rubin's data built in): ``AutoNormal``,
    ``AutoMultivariateNormal`` and the default ``AutoFlow(model)`` (``--svi-guides`` adds or replaces), each
    trained for ``--svi-seconds`` of process CPU time (default 20 s) exactly as in the VI benchmark
    (:mod:`pyro_flows.experiments.vi`: Trace_ELBO, one particle, Adam lr 0.02 for the Gaussian guides,
    AutoFlow's own optimiser), then the ELBO (mean log importance weight of 2000 guide draws, with its
    standard error), the PSIS k-hat (below 0.5 good, above 0.7 unreliable; the median of the estimates from five
    independent sets of 2000 draws, as in the VI benchmark's tables: one estimate scatters by about 0.15 on this
    funnel) and the guide's mean and sd of ``mu`` and ``tau`` against posteriordb's reference NUTS posterior;

(b) **density estimation** on the built-in 2-D toy density ``8gaussians`` (exact entropy 2.8314 nats):
    maximum likelihood on a fixed, seeded training set (batch 512, Adam lr 0.02 with cosine decay), then the
    test NLL on 10,000 fresh seeded draws next to the entropy floor. ``NLL - entropy`` is the KL divergence
    from the data to the model (up to the test set's Monte Carlo error, about 0.01 nats), so it is the
    number to look at. By default the two families that learn fastest per CPU second (quar, qlf) share the
    budget, so each trains long enough to be judged; ``--family all`` trains every registered family
    (``pyro_flows.FLOWS``, looked up at run time) on the same total budget, and ``--dataset`` adds others.

It prints a table, writes ``results.md`` / ``results.json`` and PNG plots (learned densities, samples,
loss curves, guide samples) into the output folder, and shows a tqdm progress bar during training.
It is composed of the application layer :mod:`pyro_flows.experiments`: data splits (``data``), one model
wrapper (``models``), the guides of the VI benchmark (``vi``), the trainer (``trainer``) and the reports.

Time: ``--time-budget`` (default 140 s) caps the whole run's process CPU time (torch uses one thread,
``--threads``, so on an idle machine this is the wall time; on a busy one the results stay the same and the
run takes longer). The SVI guides come first, with a fixed equal CPU budget each (``--svi-seconds``, at
most 35% of the total budget together); each density task then gets an equal share of what is left (less
20% for evaluation and plots, measured as it goes) and stops when its share of CPU time is used;
``--steps`` is the cap otherwise. The default run stays under three minutes on two idle CPU cores including
start-up; the table reports the steps each run actually took and whether its share ran out.
``--time-budget 0`` disables the cap of the density tasks (then ``--steps`` decides).

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
from pyro_flows.experiments.models import FlowModel

__all__ = [
    "DEFAULT_DATASETS",
    "DEFAULT_FAMILIES",
    "DEFAULT_GUIDES",
    "resolve_guides",
    "BASELINES",
    "available_families",
    "fit_density",
    "fit_guide",
    "run_demo",
    "resolve_families",
    "resolve_datasets",
    "check_options",
]

DEFAULT_DATASETS = ("8gaussians",)
#: Density families trained by default: the ones that learn fastest per CPU second on the toy densities, so
#: each gets enough of the budget to be judged (``--family all``: every registered family).
DEFAULT_FAMILIES = ("quar", "qlf")
#: SVI guides on eight schools by default: the Gaussian guides and the default ``AutoFlow(model)``.
DEFAULT_GUIDES = ("AutoNormal", "AutoMultivariateNormal", "AutoFlow")
#: At most this fraction of ``time_budget`` goes to the SVI guides (together).
SVI_FRACTION = 0.45
#: Adam's learning rate for density estimation (cosine decay to a tenth; batch 512).
DENSITY_LR = 2e-2

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
    """``spec``: None (:data:`DEFAULT_FAMILIES`, those registered), ``"all"`` (every registered family), or a
    list of names / comma lists. ValueError if unknown."""
    names = _names(spec or ())
    if not names or names == ["all"]:
        names = [f for f in pyro_flows.FLOWS if names == ["all"] or f in DEFAULT_FAMILIES] or list(pyro_flows.FLOWS)
        if not names:
            print(
                "note: no pyro_flows family is registered yet; running the Pyro baseline "
                "pyro.spline_coupling instead",
                file=sys.stderr,
            )
            names = ["pyro.spline_coupling"]
        return names
    known = available_families()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown flow family {bad[0]!r}; expected one of {known} or 'all'")
    return names


def resolve_guides(spec):
    """SVI guides: None (:data:`DEFAULT_GUIDES`) or names / comma lists of AutoNormal,
    AutoMultivariateNormal, AutoFlow (the default family) and family names. ValueError if unknown."""
    names = _names(spec or ()) or list(DEFAULT_GUIDES)
    known = ("AutoNormal", "AutoMultivariateNormal", "AutoFlow") + tuple(pyro_flows.FLOWS)
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown SVI guide {bad[0]!r}; expected one of {known}")
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


def check_options(families, datasets, steps, svi_steps, device, svi_guides=None):
    """Validate the demo's options; returns ``(families, datasets, device)``. ValueError if one is bad."""
    families = resolve_families(families)
    resolve_guides(svi_guides)
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
    batch_size=512,
    lr=DENSITY_LR,
    seed=0,
    time_budget=None,
    progress=True,
    desc=None,
):
    """Maximum-likelihood training of ``name`` on ``train``; returns a dict with the test NLL and curves.

    Adam with a cosine learning-rate decay from ``lr`` to ``lr / 10`` over the run's progress (steps or
    time share, whichever is further along), gradient-norm clip 100; stops early when ``time_budget``
    seconds of process CPU time have been spent training or the loss is not finite.
    """
    from pyro_flows.experiments.measure import CpuClock
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
        clock=CpuClock(),
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
# (b) SVI guides on eight schools (centred: the funnel)
# ---------------------------------------------------------------------------------------------
#: Posterior mean and sd of mu and tau in eight schools (posteriordb's 10,000 reference NUTS draws).
EIGHT_SCHOOLS_REFERENCE = {"mu": (4.41, 3.31), "tau": (3.60, 3.20)}


def fit_guide(
    name,
    seconds=10.0,
    steps=None,
    seed=0,
    device="cpu",
    progress=True,
    eval_particles=2000,
    centered=True,
):
    """Fit a guide to eight schools by SVI for ``seconds`` of process CPU time (or ``steps`` steps).

    ``name``: ``"AutoNormal"``, ``"AutoMultivariateNormal"``, ``"AutoFlow"`` (the default ``AutoFlow(model)``)
    or a family name (``AutoFlow(model, family)``), built and optimised as in the VI benchmark
    (:func:`pyro_flows.experiments.vi.build_guide`: Adam lr 0.02 for the Gaussian guides, AutoFlow's own
    optimiser); Trace_ELBO with one particle, float64. Returns a dict with the ELBO (mean log importance
    weight of ``eval_particles`` guide draws) and its standard error, the PSIS k-hat, the guide's mean and
    sd of ``mu`` and ``tau``, the loss curve, guide samples of ``(theta_1, log tau)``, steps and CPU time.
    """
    import pyro

    from pyro_flows.experiments.measure import CpuClock
    from pyro_flows.experiments.trainer import train_svi
    from pyro_flows.experiments.vi import KHAT_SETS, build_guide
    from pyro_flows.infer import elbo_estimate, guide_draws, importance_log_weights, psis_khat

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model, _ = eight_schools(dtype=torch.float64, device=device, centered=centered)
    guide, optim, label = build_guide(name, model)
    flow_on = {}

    def callback(info):  # when AutoFlow's warmup (identity flow layers skipped) ends
        if not flow_on and getattr(guide, "flow_on", False):
            flow_on["step"] = info.step + 1
        return False

    res = train_svi(
        model,
        guide,
        (),  # the model closes over its data
        steps=steps or 10**9,
        optim=optim,
        time_budget=seconds,
        clock=CpuClock(),
        seed=seed,
        progress=progress,
        max_plate_nesting=0,
        desc=f"{label}/eight_schools",
        callback=callback,
    )
    with torch.no_grad():
        lw = importance_log_weights(model, guide, num_samples=eval_particles, max_plate_nesting=0).detach()
        # the median of KHAT_SETS estimates from independent sets of draws (pyro's fit: no arviz import, slow)
        k_hats = [float(psis_khat(log_weights=lw, method="pyro"))]
        for _ in range(KHAT_SETS - 1):
            more = importance_log_weights(model, guide, num_samples=eval_particles, max_plate_nesting=0)
            k_hats.append(float(psis_khat(log_weights=more.detach(), method="pyro")))
        k_hat = sorted(k_hats)[len(k_hats) // 2]
        d = guide_draws(model, guide, num_samples=eval_particles, sites=["mu", "tau", "theta"])
        samples = torch.stack([d["theta"][:, 0], d["tau"].log()], -1)[:500].cpu()
    e = elbo_estimate(lw)
    out = {
        "label": label,
        "guide": guide,
        "losses": res.losses,
        "steps": res.steps,
        "elbo": e["elbo"],
        "elbo_se": e["elbo_se"],
        "k_hat": float(k_hat),
        "samples": samples,
        "time": res.seconds,
        "status": _status(res, seconds or 0.0),
        "flow_from": flow_on.get("step", "never" if hasattr(guide, "flow_on") else None),
    }
    for site, (ref_mean, ref_sd) in EIGHT_SCHOOLS_REFERENCE.items():
        v = d[site].double()
        out[site] = f"{float(v.mean()):.2f} ± {float(v.std()):.2f}"
        out[f"{site}_err"] = abs(float(v.mean()) - ref_mean) / ref_sd
    return out


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
    ("elbo_se", "(se)", "{:.2f}"),
    ("k_hat", "PSIS k-hat", "{:.2f}"),
    ("mu", "mu", None),
    ("mu_err", "mu err (sd)", "{:.2f}"),
    ("tau", "tau", None),
    ("tau_err", "tau err (sd)", "{:.2f}"),
    ("flow_from", "flow on from step", None),
    ("time", "CPU s", "{:.1f}"),
    ("status", "status", None),
]


def run_demo(
    families=None,
    datasets=None,
    steps=20000,
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
    svi_guides=None,
    svi_seconds=20.0,
):
    """Run the demo; returns ``{"density": rows, "svi": rows, "files": [...]}``. See the module docstring."""
    out = sys.stdout if out is None else out
    families, datasets, device = check_options(families, datasets, steps, svi_steps, device, svi_guides)
    svi_guides = resolve_guides(svi_guides)
    os.makedirs(output, exist_ok=True)
    torch.manual_seed(seed)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    # one-time costs (torch.optim's first Optimizer imports torch._dynamo: seconds) are paid here, inside
    # the budget, rather than in the first family's training share
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    if svi and time_budget:
        svi_seconds = min(svi_seconds, SVI_FRACTION * time_budget / len(svi_guides))
    tasks_left = [len(families) * len(datasets)]

    def share():
        """Training CPU seconds for the next density task: an equal share of what is left of the whole
        budget, less the part its own evaluation and the final plots need (measured as it goes)."""
        if not time_budget:
            return None
        left = time_budget - (time.process_time() - cpu_start) - 3.0
        n = tasks_left[0]
        tasks_left[0] -= 1
        return max(0.5, 0.8 * left / max(n, 1))

    print(
        f"pyro_flows demo: density estimation with {families} on {datasets}"
        + (f"; SVI guides {svi_guides} on eight schools (centred), {svi_seconds:.1f} CPU s each" if svi else "")
        + f"; device {device}; output {output}",
        file=out,
    )
    if families == list(DEFAULT_FAMILIES) and set(DEFAULT_FAMILIES) != set(pyro_flows.FLOWS):
        print(
            f"note: the density panel trains {', '.join(DEFAULT_FAMILIES)} (the families that learn fastest "
            "per CPU second on the toy densities) long enough to be judged; `--family all` trains every "
            f"registered family ({len(pyro_flows.FLOWS)}) on the same total budget",
            file=out,
        )
    curves, floors, files = {}, {}, []
    svi_rows, svi_fits = [], {}
    if svi:  # first: every guide gets the same fixed CPU budget
        for name in svi_guides:
            fit = fit_guide(name, seconds=svi_seconds, steps=svi_steps, seed=seed, device=device, progress=progress)
            svi_fits[fit["label"]] = fit
            svi_rows.append(
                {
                    "family": fit["label"],
                    **{k: fit[k] for k in ("steps", "elbo", "elbo_se", "k_hat", "mu", "mu_err", "tau", "tau_err",
                                           "flow_from")},
                    "time": fit["time"],
                    "status": fit["status"],
                }
            )
        curves["eight_schools centred (-ELBO)"] = {n: f["losses"] for n, f in svi_fits.items()}
        if plots:
            path = os.path.join(output, "guide_samples_eight_schools.png")
            files.append(
                reports.plot_guide_samples(
                    {f"{n}\nk-hat {f['k_hat']:.2f}": f["samples"] for n, f in svi_fits.items()},
                    path,
                    xlabel="theta[1]",
                    ylabel="log tau",
                    title="eight schools (centred): guide samples (the funnel)",
                )
            )

    density_rows = []
    for ds in datasets:
        splits = density_splits(ds, seed=seed, n_train=20000, n_val=1, n_test=10000, device=device)
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
    if plots:
        files.append(
            reports.plot_losses(
                curves, os.path.join(output, "loss_curves.png"), floors, ylabel="train NLL / -ELBO"
            )
        )

    total, total_cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    text = ""
    if svi:
        mu, tau = EIGHT_SCHOOLS_REFERENCE["mu"], EIGHT_SCHOOLS_REFERENCE["tau"]
        text += (
            f"## SVI guides on eight schools, centred (10 latents, a funnel), {svi_seconds:.1f} s of CPU time each\n\n"
            "ELBO: mean log importance weight of 2000 guide draws (higher is better; standard error in the "
            "next column); PSIS k-hat < 0.5 good, > 0.7 unreliable (the median of the estimates from five "
            "independent sets of 2000 draws); mu, tau: the guide's mean ± sd, error = "
            f"|mean - reference mean| / reference sd (reference, 10,000 NUTS draws: mu {mu[0]} ± {mu[1]}, "
            f"tau {tau[0]} ± {tau[1]}). Flow on from step: AutoFlow starts as AutoMultivariateNormal (identity "
            "flow layers, skipped) and switches its flow on when the affine part has plateaued.\n\n"
            + reports.markdown_table(svi_rows, SVI_COLUMNS) + "\n\n"
        )
    text += (
        "## Density estimation (test NLL in nats; floor = exact entropy of the data; "
        "training time in CPU seconds)\n\n" + reports.markdown_table(density_rows, DENSITY_COLUMNS) + "\n"
    )
    text += (f"\nTotal time {total:.1f} s wall, {total_cpu:.1f} s CPU on {device} "
             f"({torch.get_num_threads()} threads).\n")
    print("\n" + text, file=out)
    md = reports.write_text(os.path.join(output, "results.md"), "# pyro_flows demo results\n\n" + text)
    js = reports.write_text(
        os.path.join(output, "results.json"),
        json.dumps(
            {
                "density": density_rows,
                "svi": svi_rows,
                "svi_seconds": svi_seconds,
                "total_seconds": total,
                "total_cpu_seconds": total_cpu,
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
