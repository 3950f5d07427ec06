"""Reports: one markdown table writer, number formats, and the plots of the demo, benchmarks and tutorials.

Every table in the demo, the benchmarks and the tutorials is written by :func:`markdown_table` (rows are
dicts; a column is ``(key, header, format)`` with a format string, a callable or None). Plots need
matplotlib (the ``demo``/``bench``/``test`` extras) and are imported lazily, with the Agg backend.

Example:
    >>> from pyro_flows.experiments.reports import markdown_table, fmt_time
    >>> cols = [("flow", "flow", None), ("t", "step", fmt_time)]
    >>> print(markdown_table([{"flow": "qlf", "t": 0.0123}], cols))
    | flow | step |
    |---|---|
    | qlf | 12.30 ms |
"""

from __future__ import annotations

import math
import os
import platform

import torch

__all__ = [
    "fmt_time",
    "fmt_ratio",
    "fmt_mem",
    "fmt_count",
    "markdown_table",
    "write_text",
    "machine_line",
    "plot_densities",
    "plot_losses",
    "plot_guide_samples",
    "plot_vs_dim",
    "plot_bars",
]


def fmt_time(v):
    if v is None:
        return "n/a"
    return f"{v * 1e3:.2f} ms" if v < 1 else f"{v:.2f} s"


def fmt_ratio(v):
    return "n/a" if v is None else f"{v:.2f}"


def fmt_mem(v):
    return "n/a" if v is None else f"{v / 2**20:.2f} MiB"


def fmt_count(v):
    return "n/a" if v is None else f"{int(v):,}"


def _cell(v, fmt):
    if callable(fmt):
        return fmt(v)
    if v is None:
        return ""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return fmt.format(v) if fmt else str(v)


def markdown_table(rows, columns) -> str:
    """A markdown table of ``rows`` (dicts); ``columns``: ``[(key, header, format), ...]`` where format is
    None (``str``), a format string (``"{:.3f}"``; missing values are blank) or a callable (gets None too)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def write_text(path, text) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    return path


def machine_line() -> str:
    return (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    )


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_densities(title, data, models, path, grid_n=60, lim=None):
    """Data (histogram and scatter) next to each model's density and samples; ``models``:
    ``{label: FlowModel-like}`` with ``log_prob`` and ``sample``. 2-D data only."""
    plt = _plt()
    names = list(models)
    lim = lim or float(data.abs().max().clamp(max=6.0)) * 1.05
    lin = torch.linspace(-lim, lim, grid_n, device=data.device)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], -1)
    fig, axes = plt.subplots(2, len(names) + 1, figsize=(2.6 * (len(names) + 1), 5.2), squeeze=False)
    pts = data[:2000].cpu()
    axes[0, 0].hist2d(pts[:, 0].numpy(), pts[:, 1].numpy(), bins=grid_n, range=[[-lim, lim]] * 2)
    axes[0, 0].set_title(f"{title}: data", fontsize=9)
    axes[1, 0].scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
    for j, name in enumerate(names, start=1):
        m = models[name]
        with torch.no_grad():
            try:
                lp = torch.cat([m.log_prob(c) for c in grid.split(2048)])
                axes[0, j].imshow(
                    lp.exp().reshape(grid_n, grid_n).cpu().numpy(),
                    origin="lower",
                    extent=(-lim, lim, -lim, lim),
                )
            except Exception as e:  # a plot must not sink a run
                axes[0, j].text(
                    0.5, 0.5, f"no density:\n{type(e).__name__}", ha="center", transform=axes[0, j].transAxes
                )
            try:
                s = m.sample(1000).cpu()
                axes[1, j].scatter(s[:, 0], s[:, 1], s=1, alpha=0.5, color="C1")
            except Exception as e:
                axes[1, j].text(
                    0.5, 0.5, f"no samples:\n{type(e).__name__}", ha="center", transform=axes[1, j].transAxes
                )
        axes[0, j].set_title(name, fontsize=9)
    for ax in axes.ravel():
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_losses(curves, path, floors=None, ylabel="loss"):
    """One panel per task: ``curves = {task: {label: [loss, ...]}}``; ``floors = {task: value}``, dashed."""
    plt = _plt()
    floors = floors or {}
    tasks = list(curves)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        finals = []
        for name, losses in curves[task].items():
            if not losses:
                continue
            y = torch.tensor(losses, dtype=torch.float64)
            k = max(1, len(y) // 50)  # running mean for readability
            ys = torch.nn.functional.avg_pool1d(y[None, None], k, stride=1)[0, 0] if k > 1 else y
            ax.plot(range(k - 1, k - 1 + len(ys)), ys.numpy(), label=name, lw=1.2)
            finals.append(float(ys.min()))
        if floors.get(task) is not None:
            ax.axhline(floors[task], color="k", ls="--", lw=1, label="floor")
            finals.append(floors[task])
        if finals:
            lo = min(finals)
            ax.set_ylim(lo - 0.1 * abs(lo) - 0.3, lo + 0.2 * abs(lo) + 4.0)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_guide_samples(samples, path, xlabel="x", ylabel="y", title=None):
    """One scatter per guide: ``samples = {label: tensor (n, 2)}``."""
    plt = _plt()
    names = list(samples)
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 2.9), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        s = samples[name].cpu()
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0, 0].set_ylabel(ylabel)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_vs_dim(rows, keys, path, is_ours=lambda name: True):
    """Log-log cost against D: one panel per key; ``rows`` have ``flow``, ``D`` and the keys."""
    plt = _plt()
    flows = list(dict.fromkeys(r["flow"] for r in rows))
    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for f in flows:
            pts = [(r["D"], r[key]) for r in rows if r["flow"] == f and r.get(key)]
            if pts:
                ours = is_ours(f)
                ax.plot(*zip(*pts), marker="o", lw=2 if ours else 1, ls="-" if ours else "--", label=f)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(dims)
        ax.set_xticklabels([str(d) for d in dims])
        ax.set_xlabel("D")
        ax.set_title(key.replace("_", " "), fontsize=9)
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_bars(values, path, floors=None, highlight=lambda name: True, xlabel="test NLL"):
    """Horizontal bars per panel: ``values = {panel: {label: value}}``; ``floors = {panel: value}``."""
    plt = _plt()
    floors = floors or {}
    panels = list(values)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels):
        names = [n for n, v in values[p].items() if v is not None and math.isfinite(v)]
        vals = [values[p][n] for n in names]
        ax.barh(range(len(names)), vals, color=["C0" if highlight(n) else "C1" for n in names])
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=6)
        if floors.get(p) is not None:
            ax.axvline(floors[p], color="k", ls="--", lw=1)
        if vals:
            lo = min(vals + ([floors[p]] if floors.get(p) is not None else []))
            hi = max(vals)
            pad = 0.1 * (hi - lo + 1e-3)
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_title(p, fontsize=9)
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
