"""Figures of the editing results (the paper's Figs. 7–9 analogues)."""

from __future__ import annotations

from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

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
    fig.tight_layout()
    return fig


def te_scatter(joined: pd.DataFrame, score: str = "rewrite", te: str = "te", ax=None,
               title: str | None = None) -> plt.Figure:
    """Edit score against tracing effect (Fig. 4): points, OLS line with 95% CI, dashed y = x."""
    fig, ax = (plt.subplots(figsize=(4.6, 4.0)) if ax is None else (ax.figure, ax))
    sns.regplot(data=joined, x=te, y=score, ax=ax, scatter_kws={"s": 12, "alpha": 0.5}, line_kws={"color": "C1"})
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("tracing effect (fraction restored, max over tokens)" if te == "te" else te)
    ax.set_ylabel(METRIC_LABELS.get(score, score))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def te_scatter_by_layer(joined: pd.DataFrame, score: str = "rewrite", te: str = "te", col_wrap: int = 4,
                        layers: Sequence[int] | None = None) -> plt.Figure:
    """One :func:`te_scatter` panel per central layer (Figs. 15–18)."""
    layers = sorted(joined["layer"].unique()) if layers is None else list(layers)
    n = len(layers)
    ncol = min(col_wrap, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 3.0 * nrow), squeeze=False, sharex=True, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        te_scatter(joined[joined["layer"] == layer], score, te, ax=ax, title=f"layer {layer}")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def r2_bars(table: pd.DataFrame, metric: str = "rewrite") -> plt.Figure:
    """Fig. 6: per problem, stacked bars of R² of the layer model (blue) and the gain from adding tracing (orange)."""
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
    fig.tight_layout()
    return fig
