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
