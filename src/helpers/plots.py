"""Figures (seaborn/matplotlib). Every function returns a closed :class:`matplotlib.figure.Figure` (it displays
once in a notebook and can be saved with ``fig.savefig``).

Tracing figures (SCIENCE.md §8.4): :func:`trace_heatmap` (paper Fig. 2), :func:`effect_by_layer` (Fig. 10),
:func:`peak_layer_hist` (Fig. 1) and :func:`peak_layer_hist_by_window` (Fig. 11). They read the long tracing
table and the outputs of :func:`helpers.tracing.effects` / :func:`helpers.tracing.peak_layers`.
"""

from __future__ import annotations

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
