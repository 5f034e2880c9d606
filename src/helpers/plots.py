"""Figures (seaborn/matplotlib). Every function returns a closed :class:`matplotlib.figure.Figure` (it displays
once in a notebook and can be saved with ``fig.savefig``).

Tracing figures (SCIENCE.md §8.4): :func:`trace_heatmap` (paper Fig. 2), :func:`effect_by_layer` (Fig. 10),
:func:`peak_layer_hist` (Fig. 1) and :func:`peak_layer_hist_by_window` (Fig. 11). They read the long tracing
table and the outputs of :func:`helpers.tracing.effects` / :func:`helpers.tracing.peak_layers`.

Editing and analysis figures: :func:`scores_by_layer` (Figs. 7–9), :func:`te_scatter` (Fig. 4, 14),
:func:`te_scatter_by_layer` (Figs. 15–18) and :func:`r2_bars` (Fig. 6), from the scored edit table and the
regression table of :mod:`helpers.analysis`.
"""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, MaxNLocator

CMAPS = {"mlp": "Greens", "attn": "Reds", "hidden": "Purples", "zero": "Blues"}
KIND_LABEL = {"mlp": "MLP output", "attn": "attention output", "hidden": "hidden state", "zero": "MLP (zeroed)"}


def _done(fig: Figure) -> Figure:
    fig.tight_layout()
    plt.close(fig)
    return fig


def trace_heatmap(table: pd.DataFrame, case_id, kind: str = "mlp", window: int = 5, ax=None) -> Figure:
    """Paper Fig. 2: p(o_true) after restoring (token, layer), tokens as rows and layers as columns.

    The colour runs from p_corrupt (white) to p_clean (full colour); subject tokens are starred; the title gives
    p_clean and p_corrupt. ``table`` is the long tracing table.
    """
    sub = table[(table.case_id == case_id) & (table.kind == kind) & (table.window == window)]
    if sub.empty:
        raise ValueError(f"no rows for case_id={case_id!r}, kind={kind!r}, window={window}")
    grid = sub.pivot(index="token_idx", columns="layer", values="p_restored").sort_index()
    info = sub.drop_duplicates("token_idx").set_index("token_idx").sort_index()
    labels = [f"{tok!r}*" if subj else repr(tok) for tok, subj in zip(info.token, info.is_subject)]
    p_clean, p_corrupt = float(sub.p_clean.iloc[0]), float(sub.p_corrupt.iloc[0])
    lo, hi = sorted((p_corrupt, p_clean))
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(
        figsize=(3.2 + 0.28 * grid.shape[1], 1.0 + 0.32 * len(grid)))
    mesh = ax.pcolormesh(grid.to_numpy(), cmap=CMAPS.get(kind, "Greens"), vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(grid)) + 0.5, labels)
    step = max(1, grid.shape[1] // 12)
    ax.set_xticks(np.arange(0, grid.shape[1], step) + 0.5, [str(c) for c in grid.columns[::step]])
    ax.set_xlabel(f"centre layer of restored {KIND_LABEL.get(kind, kind)} (window {window})")
    ax.set_ylabel("restored token (* = subject)")
    ax.set_title(f"case {case_id}: p_clean = {p_clean:.3f}, p_corrupt = {p_corrupt:.3f}", fontsize=9)
    cb = fig.colorbar(mesh, ax=ax, label="p(o_true) after restoring")
    cb.ax.yaxis.set_major_locator(MaxNLocator(4))
    cb.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    return _done(fig)


def effect_by_layer(eff: pd.DataFrame, kind: str = "mlp", value: str = "te", ax=None) -> Figure:
    """Fig. 10: mean tracing effect (``value``, default the fractional te) by layer, one line per window, with a
    95% bootstrap band over cases. ``eff`` is :func:`helpers.tracing.effects` output."""
    sub = eff[eff.kind == kind].copy()
    sub["window"] = sub["window"].astype(str)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    sns.lineplot(data=sub, x="layer", y=value, hue="window", errorbar=("ci", 95), n_boot=200, seed=0, ax=ax,
                 marker="o", markersize=3)
    ax.set_xlabel("centre layer")
    ax.set_ylabel("mean tracing effect" + (" (fraction restored)" if value == "te" else f" ({value})"))
    ax.set_title(f"{KIND_LABEL.get(kind, kind)}: mean over {sub.case_id.nunique()} facts", fontsize=9)
    ax.legend(title="window")
    return _done(fig)


def peak_layer_hist(peaks: pd.DataFrame, n_layers: int, kind: str = "mlp", window: int = 5, ax=None) -> Figure:
    """Fig. 1: histogram of the layers where the tracing effect peaks (rows of
    :func:`helpers.tracing.peak_layers`; ties count once per tied row, as in the paper's notebook)."""
    sub = peaks[(peaks.kind == kind) & (peaks.window == window)]
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.2))
    counts = sub.layer.value_counts().reindex(range(n_layers), fill_value=0)
    ax.bar(counts.index, counts.to_numpy(), color=sns.color_palette()[2], width=0.85)
    ax.set_xlabel("layer of peak tracing effect")
    ax.set_ylabel("number of facts")
    ax.set_xlim(-0.6, n_layers - 0.4)
    ax.set_title(f"{KIND_LABEL.get(kind, kind)}, window {window}: {sub.case_id.nunique()} facts", fontsize=9)
    return _done(fig)


def peak_layer_hist_by_window(peaks: pd.DataFrame, n_layers: int, kind: str = "mlp") -> Figure:
    """Fig. 11: :func:`peak_layer_hist` for every window, one panel each."""
    windows = sorted(peaks[peaks.kind == kind].window.unique())
    if not windows:
        raise ValueError(f"no peak rows for kind {kind!r}")
    fig, axes = plt.subplots(1, len(windows), figsize=(3.2 * len(windows), 3), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], windows):
        peak_layer_hist(peaks, n_layers, kind=kind, window=w, ax=ax)
        ax.set_title(f"window {w}", fontsize=9)
        if ax is not axes[0][0]:
            ax.set_ylabel("")
    return _done(fig)


# ----------------------------------------------------------------------------------- editing and analysis

METHOD_LABELS = {"ft1": "FT-1", "ft5": "FT-5", "rome": "ROME", "memit": "MEMIT"}
PROBLEM_LABELS = {"ei": "Error Injection", "tr": "Tracing Reversal", "fe": "Fact Erasure",
                  "fa": "Fact Amplification", "ff": "Fact Forcing"}
METRIC_LABELS = {"rewrite": "Rewrite score", "paraphrase": "Paraphrase score", "neighborhood": "Neighborhood score",
                 "essence": "Essence score", "overall": "Overall score", "overall_essence": "Overall score (with essence)"}


def scores_by_layer(edits: pd.DataFrame, metrics: Sequence[str] = ("rewrite", "paraphrase", "neighborhood"),
                    hue: str = "method", title: str | None = None) -> plt.Figure:
    """Mean score (95% CI over facts) against central edit layer, one panel per metric, one line per ``hue``."""
    long = edits.melt(id_vars=["case_id", "central_layer", hue], value_vars=list(metrics),
                      var_name="metric", value_name="score")
    long[hue] = long[hue].map(lambda m: METHOD_LABELS.get(m, PROBLEM_LABELS.get(m, m)))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        sns.lineplot(data=long[long["metric"] == metric], x="central_layer", y="score", hue=hue, marker="o",
                     errorbar=("ci", 95), ax=ax)
        ax.set_title(METRIC_LABELS.get(metric, metric))
        ax.set_xlabel("central edit layer (0-based)")
        ax.set_ylabel("mean score")
        ax.set_ylim(-0.02, 1.02)
        if ax is not axes[0][-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    if title:
        fig.suptitle(title)
    return _done(fig)


def te_scatter(joined: pd.DataFrame, score: str = "rewrite", te: str = "te", ax=None,
               title: str | None = None, xlabel: str | None = None) -> plt.Figure:
    """Edit score against tracing effect (Fig. 4): points, OLS line with 95% CI, dashed y = x."""
    own = ax is None
    fig, ax = (plt.subplots(figsize=(4.6, 4.0)) if own else (ax.figure, ax))
    sns.regplot(data=joined, x=te, y=score, ax=ax, scatter_kws={"s": 12, "alpha": 0.5}, line_kws={"color": "C1"})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel or ("tracing effect (fraction restored, max over tokens)" if te == "te" else te))
    ax.set_ylabel(METRIC_LABELS.get(score, score))
    if title:
        ax.set_title(title)
    return _done(fig) if own else fig


def te_scatter_by_layer(joined: pd.DataFrame, score: str = "rewrite", te: str = "te", col_wrap: int = 4,
                        layers: Sequence[int] | None = None, xlabel: str | None = None) -> plt.Figure:
    """One :func:`te_scatter` panel per central layer (Figs. 15–18, 21–22)."""
    layers = sorted(joined["layer"].unique()) if layers is None else list(layers)
    n = len(layers)
    ncol = min(col_wrap, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        te_scatter(joined[joined["layer"] == layer], score, te, ax=ax, title=f"layer {layer}", xlabel=xlabel)
    xlabel = axes.flat[0].get_xlabel()
    for ax in axes.flat:  # one shared x label under the grid (the long per-panel labels overlap)
        ax.set_xlabel("")
    fig.supxlabel(xlabel, fontsize=10)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return _done(fig)


def r2_bars(table: pd.DataFrame, metric: str = "rewrite", title: str | None = None) -> plt.Figure:
    """Fig. 6: per problem, stacked bars of R² of the layer model (blue) and the gain from adding tracing (orange);
    ``title`` above the panels (e.g. the study)."""
    t = table[table["metric"] == metric]
    problems = [p for p in PROBLEM_LABELS if p in set(t["problem"])]
    methods = [m for m in METHOD_LABELS if m in set(t["method"])]
    fig, axes = plt.subplots(1, len(problems), figsize=(3.0 * len(problems), 3.4), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], problems):
        g = t[t["problem"] == p].set_index("method").reindex(methods)
        x = range(len(methods))
        ax.bar(x, g["r2_layer"], color="C0", label="layer")
        ax.bar(x, g["diff"].clip(lower=0), bottom=g["r2_layer"], color="C1", label="added by tracing")
        ax.set_xticks(list(x), [METHOD_LABELS[m] for m in methods], rotation=30)
        ax.set_title(PROBLEM_LABELS[p], fontsize=10)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel(f"R² ({METRIC_LABELS.get(metric, metric).lower()})")
    axes[0][-1].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _done(fig)
