"""The report's figures (matplotlib, Agg): labelled axes with units, legends, and one colour
per strategy throughout. Censored runs are drawn as censored (an upward triangle at the
budget), never as if the budget were their time."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from syncbench.analysis.reader import SweepData, strategy_sort_key, variant_label, variant_sort_key  # noqa: E402
from syncbench.analysis.summary import CellSummary  # noqa: E402
from syncbench.strategies.registry import flat_options, traits  # noqa: E402 - torch-free: options models declare them

# for a strategy that declares no display_color (or one no longer registered): the first of
# these that no shipped strategy declares
EXTRA_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e", "#aec7e8"]
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "D", "v", "P", "X"]
PART_COLORS = {"compute": "#4c72b0", "comm": "#dd8452", "wait": "#c44e52"}
DPI = 110  # figures are at most ~10 in wide: about the report's column width at this resolution
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 12}


def strategy_color(name: str, _extra: dict[str, str] = {}) -> str:  # noqa: B006 - deliberate memo
    """The strategy's declared ``display_color``; else one of the spare colours, the same for a
    name throughout."""
    declared = traits(name).display_color
    if declared:
        return declared
    if name not in _extra:
        taken = {m.traits.display_color for m in flat_options().values()}  # no strategy file imported
        spare = [c for c in EXTRA_COLORS if c not in taken] or EXTRA_COLORS
        _extra[name] = spare[len(_extra) % len(spare)]
    return _extra[name]


class NotDrawn(Exception):
    """A figure that this sweep cannot support; the message says why (shown in its place)."""


@dataclass
class Plot:
    filename: str
    title: str
    caption: str


def _variant_label(variant: tuple) -> str:
    return variant_label(variant)


def _series_label(strategy: str, variant: tuple, many_variants: bool) -> str:
    return f"{strategy} ({_variant_label(variant)})" if many_variants and variant else strategy


def fmt_seconds(value: float) -> str:
    """A tick in seconds as a reader writes it: 60 ms, 1.5 s, 2 min (never 6x10^-2)."""
    if value <= 0:
        return "0"
    if value < 1e-3:
        return f"{value * 1e6:.3g} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    return f"{value / 60:.3g} min"


def _plain_log_axis(axis, fmt=lambda v: f"{v:.3g}") -> None:
    """Plain tick labels on a log axis (``fmt``: a number to its text). Intermediate ticks (2x,
    5x) are labelled too when the axis spans less than two decades, where a decade may hold
    no labelled tick at all."""
    lo, hi = sorted(axis.get_view_interval())
    span = hi / lo if lo > 0 else math.inf
    every = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0) if 10 <= span < 100 else every))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: fmt(v)) if span < 100 else NullFormatter())


def _workers_axis(ax, workers: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if len(workers) == 1:
        ax.set_xlim(workers[0] / 1.6, workers[0] * 1.6)
    else:
        ax.set_xlim(min(workers) / 1.3, max(workers) * 1.3)
    ax.set_xlabel("workers N (log scale)")


def _save(fig, out_dir: Path, filename: str) -> None:
    fig.savefig(out_dir / filename, dpi=DPI, bbox_inches="tight")
    plt.close(fig)


def _target_text(sweep: SweepData) -> str:
    op = "≥" if sweep.target_mode == "max" else "≤"
    value = sweep.target_value
    return f"{sweep.target_metric} {op} {value:g}" if value is not None else sweep.target_metric


# ---------------------------------------------------------------------------------------


def plot_tta_vs_workers(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> Plot:
    if not cells:
        raise NotDrawn("the sweep has no finished evaluation runs yet")
    if not any(c.n_reached for c in cells):
        raise NotDrawn("no run of any cell reached the target")
    fig, ax = plt.subplots(figsize=(8.0, 5.0))
    variants = sorted({c.variant for c in cells}, key=variant_sort_key)
    many = len(variants) > 1
    workers = sorted({c.workers for c in cells})
    strategies = sorted({c.strategy for c in cells}, key=strategy_sort_key)
    budget = max((c.budget_s for c in cells if math.isfinite(c.budget_s)), default=math.nan)
    offsets = {s: 1.0 + 0.035 * (i - (len(strategies) - 1) / 2) for i, s in enumerate(strategies)}
    censored_drawn = False
    for vi, variant in enumerate(variants):
        for strategy in strategies:
            series = sorted((c for c in cells if c.variant == variant and c.strategy == strategy),
                            key=lambda c: c.workers)
            if not series:
                continue
            color, ls, marker = strategy_color(strategy), LINESTYLES[vi % 4], MARKERS[vi % len(MARKERS)]
            off = offsets[strategy]
            xs = [c.workers * off for c in series if c.tta_median_s is not None]
            ys = [c.tta_median_s for c in series if c.tta_median_s is not None]
            ax.plot(xs, ys, ls=ls, marker=marker, color=color, lw=2, ms=7, zorder=3,
                    label=_series_label(strategy, variant, many) + " — median")
            for c in series:
                x = c.workers * off
                reached = [r.tta for r in c.usable if r.reached]
                if reached:  # every seed that reached the target
                    ax.scatter([x] * len(reached), reached, s=14, color=color, alpha=0.45, zorder=2, lw=0)
                if c.tta_min_s is not None and c.tta_median_s is not None:
                    top = c.tta_max_s if c.tta_max_s is not None else budget
                    ax.vlines(x, c.tta_min_s, top, color=color, lw=1.2, alpha=0.8,
                              linestyles="solid" if c.tta_max_s is not None else "dashed", zorder=2)
                n_cens = c.n_seeds - c.n_reached
                if n_cens and math.isfinite(budget):
                    ax.scatter([x], [budget], marker="^", s=70, facecolor="white", edgecolor=color, lw=1.8,
                               zorder=4)
                    ax.annotate(f"{n_cens}/{c.n_seeds}", (x, budget), textcoords="offset points", xytext=(0, 8),
                                ha="center", fontsize=7, color=color)
                    censored_drawn = True
    one = [c for c in cells if c.workers == 1 and c.tta_median_s is not None]
    if one and len(workers) > 1:
        base = min(one, key=lambda c: c.tta_median_s)
        grid = np.geomspace(1, max(workers), 50)
        ax.plot(grid, base.tta_median_s / grid, color="black", ls="--", lw=1,
                label="ideal linear scaling from the fastest 1-worker cell")
    if censored_drawn:
        ax.axhline(budget, color="0.5", ls=":", lw=1, label=f"budget {budget:g} s (censoring)")
        ax.set_ylim(top=budget * 1.8)  # room for the k/n labels above the triangles
    ax.set_yscale("log")
    _workers_axis(ax, workers)
    _plain_log_axis(ax.yaxis, fmt_seconds)
    ax.set_ylabel("time to accuracy (training clock, log scale)")
    ax.set_title(f"Time to {_target_text(sweep)} vs workers")
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="0.3", marker="o", ls="none", alpha=0.45, ms=4))
    labels.append("one seed (reached); bar = min–max")
    if censored_drawn:
        handles.append(Line2D([], [], color="0.3", marker="^", ls="none", markerfacecolor="white", ms=8))
        labels.append("censored seeds (k/n): TTA > budget")
    if len(labels) <= 5:
        ax.legend(handles, labels, loc="best", framealpha=0.9)
    else:  # many series: below the axes, where it hides nothing
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.grid(True, which="both", alpha=0.25)
    _save(fig, out_dir, "tta_vs_workers.png")
    return Plot("tta_vs_workers.png", "Time to accuracy vs workers",
                "Median TTA per cell (line), each seed that reached the target (dots) and the min–max range (bar; "
                "dashed up to the budget when a seed is censored). Open triangles at the budget mark censored seeds "
                "(k of n): their TTA is only known to exceed the budget. The dashed black line is ideal linear "
                "scaling from the fastest 1-worker cell. Cells with fewer than 2 seeds reaching the target have no "
                "median point.")


def _step_values(x: np.ndarray, y: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Value of the last evaluation at or before each grid time (NaN before the first);
    after the run stopped its last value is carried forward."""
    if x.size == 0:
        return np.full(grid.shape, np.nan)
    idx = np.searchsorted(x, grid, side="right") - 1
    out = y[np.clip(idx, 0, None)].astype(float)
    out[idx < 0] = np.nan
    return out


def plot_curves(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> Plot | None:
    workers = sorted({c.workers for c in cells})
    if not sweep.curves:
        return None
    variants = sorted({c.variant for c in cells}, key=variant_sort_key)
    strategies = sorted({c.strategy for c in cells}, key=strategy_sort_key)
    many = len(variants) > 1
    ncols = min(len(workers), 3)
    nrows = math.ceil(len(workers) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(3.3 * ncols, 5.5), 2.9 * nrows + 0.6), squeeze=False,
                             sharey=True)
    target = sweep.target_value
    legend: dict[str, Line2D] = {}
    for ax, n in zip(axes.flat, workers):
        max_clock = 0.0
        for c in cells:
            if c.workers != n:
                continue
            curves = [sweep.curves.get(r.run_id) for r in c.usable]
            curves = [cv for cv in curves if cv is not None and cv[0].size]
            if not curves:
                continue
            end = max(float(cv[0][-1]) for cv in curves)
            max_clock = max(max_clock, end)
            grid = np.unique(np.concatenate([cv[0] for cv in curves]))
            stack = np.vstack([_step_values(cv[0], cv[1], grid) for cv in curves])
            with np.errstate(all="ignore"):
                valid = ~np.all(np.isnan(stack), axis=0)
            grid, stack = grid[valid], stack[:, valid]
            med = np.nanmedian(stack, axis=0)
            color = strategy_color(c.strategy)
            vi = variants.index(c.variant)
            label = _series_label(c.strategy, c.variant, many)
            # strategies differ in line style and marker too: curves that coincide (sync and local
            # SGD often do at N=1) stay visible, the later one drawn dashed over the solid one
            si = strategies.index(c.strategy)
            ls, marker = LINESTYLES[(si + vi) % 4], MARKERS[si % len(MARKERS)]
            ax.step(grid, med, where="post", color=color, lw=1.8, ls=ls, marker=marker, ms=4,
                    markevery=max(1, grid.size // 6))
            if len(curves) > 1:
                ax.fill_between(grid, np.nanmin(stack, axis=0), np.nanmax(stack, axis=0), step="post", color=color,
                                alpha=0.18, lw=0)
            legend.setdefault(label, Line2D([], [], color=color, lw=1.8, ls=ls, marker=marker, ms=4))
        if target is not None:
            ax.axhline(target, color="black", ls="--", lw=1)
        ax.set_title(f"N = {n}")
        ax.set_xlabel("training clock (s)")
        if max_clock > 0:
            ax.set_xlim(0, max_clock * 1.02)
        ax.grid(True, alpha=0.25)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{sweep.target_metric} (global model)")
    for ax in list(axes.flat)[len(workers):]:
        ax.set_visible(False)
    if target is not None:
        legend[f"target {_target_text(sweep)}"] = Line2D([], [], color="black", ls="--", lw=1)
    legend["min–max over seeds"] = plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=0.3)
    fig.suptitle(f"{sweep.target_metric} vs training clock, per worker count")
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend.keys()), loc="upper center", ncol=min(len(legend), 3),
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    _save(fig, out_dir, "curves.png")
    return Plot("curves.png", f"{sweep.target_metric} vs training clock",
                f"One panel per worker count; the line is the median over seeds and the band the min–max over "
                f"seeds, evaluated every eval.every_s of training clock. A run stops at the first evaluation that "
                f"meets the target; after that its last value is carried forward. The black dashed line is the "
                f"target. Strategies differ in colour, line style and marker: where one curve seems missing it "
                f"runs under another (e.g. sync and local SGD coincide at N=1, where both are plain SGD).")


def plot_sync_breakdown(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> Plot | None:
    sync = [c for c in cells if c.strategy == "sync" and c.usable]
    if not sync:
        return None
    variants = sorted({c.variant for c in sync}, key=variant_sort_key)
    width = min(10.0, max(5.5, 1.0 * len({c.workers for c in sync}) + 2.5) * len(variants) ** 0.8)
    fig, axes = plt.subplots(1, len(variants), figsize=(width, 4.2), squeeze=False, sharey=True)
    for ax, variant in zip(axes.flat, variants):
        cs = sorted((c for c in sync if c.variant == variant), key=lambda c: c.workers)
        xs = np.arange(len(cs))
        bottom = np.zeros(len(cs))
        for part in ("compute", "comm", "wait"):
            shares = []
            for c in cs:
                per_run = []
                for r in c.usable:
                    parts = [r.metrics.get(f"time_{p}_s") for p in ("compute", "comm", "wait")]
                    if any(p is None for p in parts) or sum(parts) <= 0:
                        continue
                    per_run.append(r.metrics[f"time_{part}_s"] / sum(parts))
                shares.append(100 * float(np.mean(per_run)) if per_run else 0.0)
            shares = np.array(shares)
            ax.bar(xs, shares, bottom=bottom, color=PART_COLORS[part], width=0.6, label=part)
            if part == "wait":
                for x, b, s in zip(xs, bottom, shares):
                    ax.annotate(f"wait {s:.1f}%", (x, b + s), textcoords="offset points", xytext=(0, 3),
                                ha="center", fontsize=8)
            bottom += shares
        ax.set_xticks(xs, [str(c.workers) for c in cs])
        ax.set_xlabel("workers N")
        ax.set_ylim(0, 112)
        if len(variants) > 1:
            ax.set_title(_variant_label(variant))
        ax.grid(True, axis="y", alpha=0.25)
    axes[0, 0].set_ylabel("share of worker time (%)")
    axes[0, 0].legend(loc="lower left", framealpha=0.9)
    fig.suptitle("Synchronous training: compute, communication and waiting")
    fig.tight_layout()
    _save(fig, out_dir, "sync_breakdown.png")
    return Plot("sync_breakdown.png", "Sync time breakdown",
                "Where synchronous workers spend the training clock: computing, communicating (all-reduce, "
                "alpha-beta model in the sim) and waiting for the slowest gradient of each round, as a share of "
                "each worker's time (cumulative time_*_s at the end of the run, mean over workers and seeds).")


def plot_staleness(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> Plot | None:
    """One panel per strategy with a parameter server (and variant): every such strategy
    records the staleness of the pushes its server applies."""
    server_cells = [c for c in cells if traits(c.strategy).has_parameter_server
                    and any(r.run_id in sweep.staleness for r in c.usable)]
    if not server_cells:
        return None
    panels = sorted({(c.strategy, c.variant) for c in server_cells},
                    key=lambda p: (strategy_sort_key(p[0]), variant_sort_key(p[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(min(10.0, 7.0 * len(panels) ** 0.8), 4.2), squeeze=False)
    all_n = sorted({c.workers for c in server_cells})
    cmap = plt.get_cmap("viridis")
    many_strategies = len({strategy for strategy, _ in panels}) > 1
    for ax, (strategy, variant) in zip(axes.flat, panels):
        for c in sorted((c for c in server_cells if c.strategy == strategy and c.variant == variant),
                        key=lambda c: c.workers):
            total: dict[int, int] = defaultdict(int)
            seeds = 0
            for r in c.usable:
                hist = sweep.staleness.get(r.run_id)
                if hist:
                    seeds += 1
                    for k, v in hist.items():
                        total[k] += v
            if not total:
                continue
            ks = np.arange(0, max(total) + 1)
            counts = np.array([total.get(int(k), 0) for k in ks], dtype=float)
            share = counts / counts.sum()
            mean = float((ks * counts).sum() / counts.sum())
            color = cmap(all_n.index(c.workers) / max(1, len(all_n) - 1) * 0.85)
            ax.plot(ks, share, drawstyle="steps-mid", color=color, lw=1.8, marker="o", ms=3,
                    label=f"N={c.workers}: mean {mean:.2f}, max {int(max(total))} ({seeds} seeds)")
            ax.axvline(mean, color=color, ls=":", lw=1)
        ax.set_xlabel("staleness (updates applied between pull and push)")
        ax.set_ylabel("share of updates")
        if len(panels) > 1:
            ax.set_title(_series_label(strategy, variant, True) if many_strategies else _variant_label(variant))
        ax.grid(True, alpha=0.25)
        ax.legend(framealpha=0.9)
    names = sorted({strategy for strategy, _ in panels}, key=strategy_sort_key)
    fig.suptitle(f"Parameter server ({', '.join(names)}): staleness distribution per worker count")
    fig.tight_layout()
    _save(fig, out_dir, "staleness.png")
    return Plot("staleness.png", "Staleness distribution on the parameter server",
                "Distribution of the staleness of the updates a parameter server applied, pooled over seeds "
                f"(staleness.json of each run of {', '.join(names)}); dotted lines mark the means. With homogeneous "
                "workers the mean is close to N − 1; stragglers and a congested server link widen the distribution.")


def plot_memory(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> Plot | None:
    runs = [r for r in sweep.usable_runs if r.checkpointing is not None and r.memory_bytes is not None]
    if not any(r.checkpointing for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    metric_names = set()
    for r in runs:
        name, value = r.memory_bytes
        metric_names.add(name)
        color = strategy_color(r.strategy)
        ax.scatter([1000 * r.metrics.get("step_time_s", math.nan)], [value / 2**20], s=45,
                   marker="o" if r.checkpointing else "s", facecolor=color if r.checkpointing else "white",
                   edgecolor=color, lw=1.5)
    handles = [Line2D([], [], marker="o", color="0.3", ls="none", label="checkpointing on"),
               Line2D([], [], marker="s", color="0.3", markerfacecolor="white", ls="none", label="checkpointing off")]
    for s in sorted({r.strategy for r in runs}, key=strategy_sort_key):
        handles.append(Line2D([], [], color=strategy_color(s), lw=3, label=s))
    ax.legend(handles=handles)
    ax.set_xlabel("step time (ms per worker step)")
    ax.set_ylabel(f"memory (MiB, {' / '.join(sorted(metric_names))})")
    ax.set_title("Activation checkpointing: memory vs step time")
    ax.grid(True, alpha=0.25)
    _save(fig, out_dir, "memory_vs_step.png")
    return Plot("memory_vs_step.png", "Memory vs step time (activation checkpointing)",
                "Each run's memory (peak memory when recorded, else the bytes of saved activations) against its "
                "step time. Filled circles: checkpointing on; open squares: off. When the sweep pins "
                "cluster.compute.step_s, step times are the pinned value, not a measurement.")


def plot_efficiency(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> Plot | None:
    if len({c.workers for c in cells}) < 2:
        return None
    if not any(c.samples_to_target_median is not None or c.time_per_sample_s is not None for c in cells):
        raise NotDrawn("no cell has a median samples-to-target or a clock per sample (too few seeds reached the "
                       "target)")
    variants = sorted({c.variant for c in cells}, key=variant_sort_key)
    many = len(variants) > 1
    workers = sorted({c.workers for c in cells})
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for vi, variant in enumerate(variants):
        for strategy in sorted({c.strategy for c in cells}, key=strategy_sort_key):
            cs = sorted((c for c in cells if c.variant == variant and c.strategy == strategy), key=lambda c: c.workers)
            if not cs:
                continue
            kw = dict(color=strategy_color(strategy), ls=LINESTYLES[vi % 4], marker=MARKERS[vi % len(MARKERS)],
                      lw=1.8, label=_series_label(strategy, variant, many))
            pts = [(c.workers, c.samples_to_target_median) for c in cs if c.samples_to_target_median is not None]
            if pts:
                left.plot(*zip(*pts), **kw)
            pts = [(c.workers, 1e6 * c.time_per_sample_s) for c in cs if c.time_per_sample_s is not None]
            if pts:
                right.plot(*zip(*pts), **kw)
    for ax in (left, right):
        _workers_axis(ax, workers)
        ax.set_yscale("log")
        _plain_log_axis(ax.yaxis)
        ax.grid(True, which="both", alpha=0.25)
    left.set_ylabel("samples to target (median over seeds, log)")
    left.set_title("Statistical efficiency (lower is better)")
    right.set_ylabel("training clock per sample (µs, log)")
    right.set_title("Hardware efficiency (lower is better)")
    if not left.lines:
        left.text(0.5, 0.5, "no cell has >= 2 seeds reaching the target:\nno median samples to target",
                  transform=left.transAxes, ha="center", va="center", color="0.4")
    fig.tight_layout()
    handles, labels = left.get_legend_handles_labels()
    if not labels:
        handles, labels = right.get_legend_handles_labels()
    if labels:  # an empty legend with ncol=0 is a matplotlib ValueError
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(labels), 3),
                   frameon=False)
    empty_left = not left.lines
    _save(fig, out_dir, "efficiency.png")
    caption = ("TTA = samples to target × clock per sample. Left: samples whose gradients reached the model before "
               "the target was met (median; cells with fewer than 2 seeds reaching the target are omitted). Right: "
               "training clock per sample over the whole run (median over seeds, censored runs included).")
    if empty_left:
        caption += (" The left panel is empty: no cell has 2 or more seeds reaching the target, so no median "
                    "samples to target exists.")
    return Plot("efficiency.png", "Statistical vs hardware efficiency", caption)


def make_plots(sweep: SweepData, cells: list[CellSummary], out_dir: Path) -> tuple[list[Plot], list[str]]:
    """All figures that apply to this sweep, and a note for each that does not."""
    plots, skipped = [], []
    makers = [
        (plot_tta_vs_workers, ""),
        (plot_curves, "no metric history could be read"),
        (plot_efficiency, "the sweep has a single worker count"),
        (plot_sync_breakdown, "the sweep has no finished sync runs"),
        (plot_staleness, "the sweep has no runs of a strategy with a parameter server with a staleness.json "
                         "artifact"),
        (plot_memory, "the sweep has no runs with checkpointing.enabled=true"),
    ]
    for maker, why_not in makers:
        name = maker.__name__.removeprefix('plot_').replace('_', ' ')
        try:
            with plt.rc_context(STYLE):
                plot = maker(sweep, cells, out_dir)
        except NotDrawn as exc:
            plot, why_not = None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one figure must not sink the report
            plot, why_not = None, f"could not be drawn ({type(exc).__name__}: {exc})"
        finally:
            plt.close("all")
        if plot is None:
            skipped.append(f"{name}: not drawn — {why_not}")
        else:
            plots.append(plot)
    return plots, skipped
