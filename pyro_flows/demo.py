"""The main job: ``python -m pyro_flows demo``.

Trains every registered family (``pyro_flows.FLOWS``, looked up at run time, so a family is covered as soon
as it registers) twice:

(a) as a **density estimator** on built-in 2-D toy densities (default ``8gaussians`` and ``checkerboard``,
    whose exact entropies are known): maximum likelihood on a fixed, seeded training set, then the test NLL
    on a fresh seeded test set next to the exact entropy floor. ``NLL - entropy`` is the KL divergence from
    the data to the model (up to Monte-Carlo error of the test set), so it is the number to look at;

(b) as an **SVI guide** on a built-in Bayesian model (eight schools, non-centred, 10 latent dimensions) via
    ``pyro.infer.autoguide.AutoNormalizingFlow`` (or ``pyro_flows.infer.AutoFlow`` when it exists), reporting
    the final ELBO (higher is better, the mean log importance weight of 500 guide draws) and the PSIS diagnostic k-hat
    (below 0.5 good, above 0.7 unreliable). ``AutoNormal`` is trained alongside as a reference.

It prints a table, writes ``results.md`` / ``results.json`` and PNG plots (learned densities, samples,
loss curves, guide samples) into the output folder, and shows a tqdm progress bar during training.

Time: ``--time-budget`` (default 150 s) caps the whole run's wall time. Before each training task the
demo gives it an equal share of what is left of the budget (less a quarter for evaluation and plots,
measured as it goes, so the cap holds on a slow or busy machine) and stops the task early when the share is
used; ``--steps`` is the cap otherwise. With six families this is about 17 s of training per family (a
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

import functools
import json
import math
import os
import sys
import time

import torch

import pyro_flows
from pyro_flows.datasets import ENTROPY, TABLE_DATASETS, TOY_DATASETS, load_table, toy_sample

__all__ = [
    "DEFAULT_DATASETS", "BASELINES", "EIGHT_SCHOOLS", "available_families", "build_flow",
    "eight_schools_model", "fit_density", "fit_guide", "run_demo", "resolve_families",
    "resolve_datasets",
]

DEFAULT_DATASETS = ("8gaussians", "checkerboard")

#: Pyro built-ins accepted by ``--family`` as baselines (all invertible, so they can do density estimation).
BASELINES = ("pyro.spline_coupling", "pyro.affine_coupling", "pyro.spline_autoregressive",
             "pyro.affine_autoregressive")

#: Rubin (1981): SAT coaching effects y_j with standard errors sigma_j in eight schools.
EIGHT_SCHOOLS = {
    "y": [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0],
    "sigma": [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0],
}


def available_families():
    """Registered families (at call time) followed by the Pyro baselines."""
    return tuple(pyro_flows.FLOWS) + tuple(BASELINES)


def resolve_families(spec):
    """``spec``: None (every registered family), or a list of names / comma lists. ValueError if unknown."""
    if not spec:
        names = list(pyro_flows.FLOWS)
        if not names:
            print("note: no pyro_flows family is registered yet; running the Pyro baseline "
                  "pyro.spline_coupling instead", file=sys.stderr)
            names = ["pyro.spline_coupling"]
        return names
    names = []
    for item in spec:
        names.extend(n.strip() for n in str(item).split(",") if n.strip())
    known = available_families()
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown flow family {bad[0]!r}; expected one of {known}")
    return list(dict.fromkeys(names))


def resolve_datasets(spec):
    """``spec``: None (the default toy densities), or names / comma lists (toy or table names)."""
    if not spec:
        return list(DEFAULT_DATASETS)
    names = []
    for item in spec:
        names.extend(n.strip() for n in str(item).split(",") if n.strip())
    known = TOY_DATASETS + TABLE_DATASETS
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown data set {bad[0]!r}; expected one of {known}")
    return list(dict.fromkeys(names))


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


def build_flow(name, dim, num_layers=4, context_dim=None):
    """A stack of ``num_layers`` layers of ``name`` (a registered family or a Pyro baseline)."""
    if name in BASELINES:
        if context_dim is not None:
            raise ValueError("the Pyro baselines are not built conditionally here")
        from pyro.distributions import transforms as T
        from pyro.distributions.torch_transform import ComposeTransformModule
        from pyro_flows.transforms._base import Permute

        parts = []
        for i in range(num_layers):
            parts.append(getattr(T, name.split(".", 1)[1])(dim))
            if i < num_layers - 1 and dim > 1:
                parts.append(Permute(torch.arange(dim - 1, -1, -1)))
        return ComposeTransformModule(parts)
    return pyro_flows.flow(name, dim, num_layers=num_layers, context_dim=context_dim)


def _base(dim, ref):
    import pyro.distributions as dist

    return dist.Normal(ref.new_zeros(dim), ref.new_ones(dim)).to_event(1)


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a bench/test extra
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# (a) density estimation
# ---------------------------------------------------------------------------------------------
def _data(name, seed, device, n_train=20000, n_test=3000):
    if name in TOY_DATASETS:
        return (toy_sample(name, n_train, seed=seed, device=device),
                toy_sample(name, n_test, seed=seed + 10_000, device=device))
    split = load_table(name, seed=seed, device=device)
    return split.train, split.test


def fit_density(name, train, test, steps=500, num_layers=4, batch_size=256, lr=5e-3, seed=0,
                time_budget=None, progress=True, desc=None):
    """Maximum-likelihood training of ``name`` on ``train``; returns a dict with the test NLL and curves.

    Adam with a cosine learning-rate decay from ``lr`` to ``lr / 10``; stops early when ``time_budget``
    seconds of training have passed (the decay then follows the elapsed time) or the loss is not finite.
    """
    import pyro.distributions as dist

    torch.manual_seed(seed)
    dim = train.shape[-1]
    transform = build_flow(name, dim, num_layers).to(train.device)
    model = dist.TransformedDistribution(_base(dim, train), [transform])
    opt = torch.optim.Adam(transform.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses, status, t0 = [], "ok", time.perf_counter()
    bar = _progress(steps, desc or name, progress)
    for step in range(steps):
        idx = torch.randint(0, train.shape[0], (batch_size,), generator=gen).to(train.device)
        loss = -model.log_prob(train[idx]).mean()
        value = loss.item()  # the one host sync per step: the progress bar and the finiteness check
        if not math.isfinite(value):
            status = f"non-finite loss at step {step}"
            break
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transform.parameters(), 100.0)
        opt.step()
        # cosine decay to lr/10 over the run's progress: steps done or time share used, whichever is
        # further along, so a run stopped by its time share still ends at the small learning rate
        frac = (step + 1) / steps
        if time_budget:
            frac = max(frac, (time.perf_counter() - t0) / time_budget)
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))
        losses.append(value)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(nll=f"{value:.3f}")
        if time_budget and time.perf_counter() - t0 > time_budget and step + 1 < steps:
            status = f"time share ({time_budget:.1f}s) used"
            break
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t0
    with torch.no_grad():
        nll = float(torch.cat([-model.log_prob(c) for c in test.split(2048)]).mean())
    return {"model": model, "transform": transform, "losses": losses, "steps": len(losses),
            "test_nll": nll, "time": train_time, "status": status}


# ---------------------------------------------------------------------------------------------
# (b) SVI guide on eight schools
# ---------------------------------------------------------------------------------------------
def eight_schools_model(y, sigma):
    """Eight schools, non-centred (posteriordb ``eight_schools_noncentered``): 10 latent dimensions."""
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(y.new_zeros(()), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_full((), 5.0)))
    with pyro.plate("schools", y.shape[-1], dim=-1):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(y.new_zeros(()), 1.0))
        pyro.sample("obs", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def _make_guide(name, model, num_layers, device):
    from pyro.infer.autoguide import AutoNormal, AutoNormalizingFlow

    if name == "AutoNormal":
        return AutoNormal(model)
    if name in BASELINES:
        make = lambda dim: build_flow(name, dim, num_layers).to(device)  # noqa: E731
    else:
        make = functools.partial(pyro_flows.flow, name, num_layers=num_layers)
    try:
        from pyro_flows.infer import AutoFlow
    except ImportError:  # pragma: no cover - before pyro_flows.infer landed
        base_make = make
        return AutoNormalizingFlow(model, lambda dim: base_make(dim).to(device))
    return AutoFlow(model, name if name in pyro_flows.FLOWS else make, num_layers=num_layers)


def _importance(model, guide, y, sigma, num_samples):
    """Log importance weights ``log p(y, z) - log q(z)`` of ``num_samples`` guide draws, and the draws."""
    from pyro import poutine
    from pyro.infer.importance import vectorized_importance_weights

    lw, _, guide_trace = vectorized_importance_weights(model, guide, y, sigma, num_samples=num_samples,
                                                       max_plate_nesting=1, normalized=False)
    draws = {n: guide_trace.nodes[n]["value"] for n in ("mu", "tau", "theta_tilde")
             if n in guide_trace.nodes}
    if len(draws) < 3:  # autoguides sample one latent vector: replay the model to get the sites
        tr = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(y, sigma)
        draws = {n: tr.nodes[n]["value"] for n in ("mu", "tau", "theta_tilde")}
    return lw.detach(), draws


def _psis_khat(lw):
    try:
        from pyro_flows.infer import psis_khat

        return float(psis_khat(log_weights=lw, method="pyro"))  # pyro's fit: no arviz import (slow)
    except ImportError:  # pragma: no cover
        from pyro.ops.stats import fit_generalized_pareto

        n = lw.numel()
        lw = torch.sort(lw - lw.max())[0]
        cut = max(math.log(1e-15), float(lw[-int(math.ceil(min(0.2 * n, 3.0 * math.sqrt(n)))) - 1]))
        tail = lw[lw > cut]
        return float(fit_generalized_pareto(tail.exp() - math.exp(cut))[0]) if tail.numel() >= 10 else math.inf


def fit_guide(name, steps=500, num_layers=4, lr=None, num_particles=4, seed=0, device="cpu",
              time_budget=None, progress=True, eval_particles=500):
    """Fit a guide (``name``: family, baseline or ``"AutoNormal"``) to eight schools by SVI.

    Returns a dict with the ELBO (mean log importance weight of ``eval_particles`` guide draws), the PSIS
    k-hat, the loss curve, guide samples of ``(mu, log tau, theta_1)``, steps and training time.
    ``lr=None`` means 1e-2 for flows and 3e-2 for ``AutoNormal`` (whose small initial scales need the
    larger step to converge in a few hundred steps; each is its better of the two on this model).
    """
    if lr is None:
        lr = 3e-2 if name == "AutoNormal" else 1e-2
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    y = torch.tensor(EIGHT_SCHOOLS["y"], device=device)
    sigma = torch.tensor(EIGHT_SCHOOLS["sigma"], device=device)
    model = eight_schools_model
    guide = _make_guide(name, model, num_layers, device)
    guide(y, sigma)  # build the transform (on `device`) before the optimiser sees the parameters
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": lr, "clip_norm": 100.0, "lrd": 0.1 ** (1 / max(steps, 1))}), elbo)
    losses, status, t0 = [], "ok", time.perf_counter()
    bar = _progress(steps, f"{name}/eight_schools", progress)
    for step in range(steps):
        loss = svi.step(y, sigma)
        if not math.isfinite(loss):
            status = f"non-finite loss at step {step}"
            break
        losses.append(loss)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(elbo=f"{-loss:.2f}")
        if time_budget and time.perf_counter() - t0 > time_budget and step + 1 < steps:
            status = f"time share ({time_budget:.1f}s) used"
            break
    if bar is not None:
        bar.close()
    train_time = time.perf_counter() - t0
    with torch.no_grad():
        lw, d = _importance(model, guide, y, sigma, eval_particles)
        final_elbo = float(lw.mean())  # the ELBO estimated with the same draws as k-hat
        k_hat = _psis_khat(lw)
        mu, tau, tt = (d["mu"].reshape(-1), d["tau"].reshape(-1), d["theta_tilde"].reshape(eval_particles, -1))
        samples = torch.stack([mu, tau.log(), mu + tau * tt[:, 0]], -1)[:500].cpu()
    return {"guide": guide, "losses": losses, "steps": len(losses), "elbo": final_elbo, "k_hat": k_hat,
            "samples": samples, "time": train_time, "status": status}


# ---------------------------------------------------------------------------------------------
# plots and tables
# ---------------------------------------------------------------------------------------------
def _plot_densities(dataset, test, fits, path, grid_n=60):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(fits)
    lim = float(test.abs().max().clamp(max=6.0)) * 1.05
    lin = torch.linspace(-lim, lim, grid_n, device=test.device)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(2.6 * (len(names) + 1), 5.2), squeeze=False)
    ext = (-lim, lim, -lim, lim)
    data = test[:2000].cpu()
    axes[0, 0].hist2d(data[:, 0].numpy(), data[:, 1].numpy(), bins=grid_n, range=[[-lim, lim]] * 2,
                      cmap="viridis")
    axes[0, 0].set_title(f"{dataset}: data")
    axes[1, 0].scatter(data[:, 0], data[:, 1], s=1, alpha=0.5)
    axes[1, 0].set_title("data samples")
    for j, name in enumerate(names, start=1):
        fit = fits[name]
        with torch.no_grad():
            try:
                lp = torch.cat([fit["model"].log_prob(c) for c in grid.split(2048)])
                dens = lp.exp().reshape(grid_n, grid_n).cpu()
                axes[0, j].imshow(dens.numpy(), origin="lower", extent=ext, cmap="viridis")
            except Exception as e:  # a plot must not sink the demo
                axes[0, j].text(0.5, 0.5, f"no density:\n{type(e).__name__}", ha="center",
                                transform=axes[0, j].transAxes)
            try:
                s = fit["model"].sample((1000,)).cpu()
                axes[1, j].scatter(s[:, 0], s[:, 1], s=1, alpha=0.5, color="C1")
            except Exception as e:
                axes[1, j].text(0.5, 0.5, f"no samples:\n{type(e).__name__}", ha="center",
                                transform=axes[1, j].transAxes)
        axes[0, j].set_title(f"{name}\nNLL {fit['test_nll']:.3f}", fontsize=9)
        axes[1, j].set_title("samples", fontsize=9)
    for ax in axes.ravel():
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_losses(curves, floors, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(curves)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, losses in curves[task].items():
            if not losses:
                continue
            y = torch.tensor(losses)
            k = max(1, len(y) // 50)  # running mean for readability
            ys = torch.nn.functional.avg_pool1d(y[None, None], k, stride=1)[0, 0] if k > 1 else y
            ax.plot(range(k - 1, k - 1 + len(ys)), ys.numpy(), label=name, lw=1.2)
        if floors.get(task) is not None:
            ax.axhline(floors[task], color="k", ls="--", lw=1, label="entropy floor")
        if task != "eight_schools":
            finals = [min(v) for v in curves[task].values() if v]
            if finals:
                lo = min(finals + ([floors[task]] if floors.get(task) is not None else []))
                ax.set_ylim(lo - 0.3, lo + 4.0)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel("train NLL" if task != "eight_schools" else "-ELBO")
        if task == "eight_schools":
            lo = min(min(v) for v in curves[task].values() if v)
            ax.set_ylim(lo - 2, lo + 25)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_guides(svi, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(svi)
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.9), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        s = svi[name]["samples"]
        ax.scatter(s[:, 2], s[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{name}\nk-hat {svi[name]['k_hat']:.2f}", fontsize=9)
        ax.set_xlabel("theta[1]")
    axes[0, 0].set_ylabel("log tau")
    fig.suptitle("eight schools: guide samples (the funnel)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _fmt_table(rows, columns):
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else (f.format(r[k]) if f else str(r[k]))
                                       for k, _, f in columns) + " |")
    return "\n".join(lines)


DENSITY_COLUMNS = [("family", "family", None), ("dataset", "data set", None), ("steps", "steps", None),
                   ("test_nll", "test NLL", "{:.3f}"), ("floor", "entropy floor", "{:.3f}"),
                   ("excess", "NLL - floor (KL)", "{:.3f}"), ("time", "train s", "{:.1f}"),
                   ("status", "status", None)]
SVI_COLUMNS = [("family", "guide", None), ("steps", "steps", None), ("elbo", "ELBO", "{:.2f}"),
               ("k_hat", "PSIS k-hat", "{:.2f}"), ("time", "train s", "{:.1f}"), ("status", "status", None)]


def run_demo(families=None, datasets=None, steps=400, svi_steps=None, num_layers=4, device="cpu",
             output="pyro_flows_demo", seed=0, time_budget=150.0, progress=True, plots=True,
             svi=True, out=None):
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
        return max(0.5, 0.75 * left / max(n, 1))

    print(f"pyro_flows demo: families {families}; data sets {datasets}"
          f"{' + eight_schools (SVI)' if svi else ''}; device {device}; output {output}", file=out)

    density_rows, curves, floors, files = [], {}, {}, []
    for ds in datasets:
        train, test = _data(ds, seed, device)
        floors[ds] = ENTROPY.get(ds)
        fits = {}
        for name in families:
            fit = fit_density(name, train, test, steps=steps, num_layers=num_layers, seed=seed,
                              time_budget=share(), progress=progress, desc=f"{name}/{ds}")
            fits[name] = fit
            floor = ENTROPY.get(ds)
            density_rows.append({"family": name, "dataset": ds, "steps": fit["steps"],
                                 "test_nll": fit["test_nll"], "floor": floor,
                                 "excess": None if floor is None else fit["test_nll"] - floor,
                                 "time": fit["time"], "status": fit["status"]})
        curves[ds] = {n: f["losses"] for n, f in fits.items()}
        if plots and train.shape[-1] == 2:
            path = os.path.join(output, f"density_{ds}.png")
            _plot_densities(ds, test, fits, path)
            files.append(path)

    svi_rows, svi_fits = [], {}
    if svi:
        for name in ["AutoNormal"] + families:
            fit = fit_guide(name, steps=svi_steps, num_layers=num_layers, seed=seed, device=device,
                            time_budget=share(), progress=progress)
            svi_fits[name] = fit
            svi_rows.append({"family": name, "steps": fit["steps"], "elbo": fit["elbo"],
                             "k_hat": fit["k_hat"], "time": fit["time"], "status": fit["status"]})
        curves["eight_schools"] = {n: f["losses"] for n, f in svi_fits.items()}
        if plots:
            path = os.path.join(output, "guide_samples_eight_schools.png")
            _plot_guides(svi_fits, path)
            files.append(path)
    if plots:
        path = os.path.join(output, "loss_curves.png")
        _plot_losses(curves, floors, path)
        files.append(path)

    total = time.perf_counter() - t_start
    text = "## Density estimation (test NLL in nats; floor = exact entropy of the data)\n\n"
    text += _fmt_table(density_rows, DENSITY_COLUMNS) + "\n"
    if svi:
        text += ("\n## SVI guide on eight schools (10 latents; ELBO higher is better; "
                 "k-hat < 0.5 good, > 0.7 unreliable)\n\n" + _fmt_table(svi_rows, SVI_COLUMNS) + "\n")
    text += f"\nTotal time {total:.1f} s on {device} ({torch.get_num_threads()} threads).\n"
    print("\n" + text, file=out)
    md = os.path.join(output, "results.md")
    with open(md, "w") as f:
        f.write("# pyro_flows demo results\n\n" + text)
    js = os.path.join(output, "results.json")
    with open(js, "w") as f:
        json.dump({"density": density_rows, "svi": svi_rows, "total_seconds": total,
                   "device": device, "families": families, "datasets": datasets}, f, indent=1)
    files = [md, js] + files
    print("wrote " + ", ".join(files), file=out)
    return {"density": density_rows, "svi": svi_rows, "files": files, "total_seconds": total}
