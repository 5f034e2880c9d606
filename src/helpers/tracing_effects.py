"""Effects (SCIENCE.md §4.3, §4.4) from the long tracing table of :mod:`helpers.tracing`: computed here and
nowhere else (per-layer te, peak sites, concentration, layer thirds)."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

_GROUP = ["case_id", "kind", "window"]


def _with_restore_effects(table: pd.DataFrame, denominator: str) -> pd.DataFrame:
    """Row-level effects: restore_effect, high_score (recomputed), denominator, zero_denominator, fraction."""
    if denominator not in ("code", "paper"):
        raise ValueError("denominator must be 'code' or 'paper'")
    t = table.copy()
    t["restore_effect"] = t["p_restored"] - t["p_corrupt"]
    t["high_score"] = np.maximum(t["p_clean"], t.groupby(_GROUP, sort=False)["p_restored"].transform("max"))
    if denominator == "code":  # |p_corrupt - high_score|, high_score = max(p_clean, max restored)
        den = (t["p_corrupt"] - t["high_score"]).abs()
    else:  # the paper's p_clean - p_corrupt
        den = t["p_clean"] - t["p_corrupt"]
    t["corruption_effect"] = t["p_corrupt"] - (t["high_score"] if denominator == "code" else t["p_clean"])
    t["denominator"] = den
    t["zero_denominator"] = ~(den > 0)
    safe = den.where(den > 0, 1.0)
    t["fraction_restored"] = np.where(t["zero_denominator"], 0.0, (t["restore_effect"] / safe).clip(lower=0))
    t["subj_fraction"] = np.where(t["zero_denominator"], 0.0, t["restore_effect"] / safe)
    return t


def effects(table: pd.DataFrame, denominator: str = "code") -> pd.DataFrame:
    """One row per (case_id, kind, window, layer) from the long table (SCIENCE.md §4.3).

    Columns: p_clean, p_corrupt, high_score, corruption_effect, denominator, zero_denominator,
    te (max over tokens of fraction_restored = max(0, restore_effect / denominator); the regression variable),
    subj_effect (restore_effect at the last subject token, probability units), subj_effect_fraction (the same
    divided by the denominator, not clipped), restore_effect_max (max over tokens).

    ``denominator="code"`` divides by |p_corrupt - high_score| (te in [0, 1]); ``"paper"`` by p_clean - p_corrupt
    (te ≥ 0, above 1 when a restoration overshoots p_clean). A denominator ≤ 0 (corruption had no effect) sets
    zero_denominator = True and te = subj_effect_fraction = 0, never NaN; such cases are logged.

    Rows of kind "zero" (representation zeroing) get te = subj_effect_fraction = (p_clean - p_zeroed) / p_clean,
    subj_effect = p_clean - p_zeroed, restore_effect_max = p_zeroed - p_clean, denominator = p_clean.
    """
    zero = table[table["kind"] == "zero"]
    tr = table[table["kind"] != "zero"]
    keys = _GROUP + ["layer"]
    parts = []
    if len(tr):
        t = _with_restore_effects(tr, denominator)
        g = t.groupby(keys, sort=True)
        out = g.agg(
            p_clean=("p_clean", "first"),
            p_corrupt=("p_corrupt", "first"),
            high_score=("high_score", "first"),
            corruption_effect=("corruption_effect", "first"),
            denominator=("denominator", "first"),
            zero_denominator=("zero_denominator", "first"),
            te=("fraction_restored", "max"),
            restore_effect_max=("restore_effect", "max"),
        )
        last = t[t["is_last_subject"]].set_index(keys)
        out["subj_effect"] = last["restore_effect"]
        out["subj_effect_fraction"] = last["subj_fraction"]
        parts.append(out.reset_index())
    if len(zero):
        z = zero.copy()
        den = z["p_clean"]
        z["zero_denominator"] = ~(den > 0)
        frac = np.where(z["zero_denominator"], 0.0, (z["p_clean"] - z["p_restored"]) / den.where(den > 0, 1.0))
        parts.append(
            pd.DataFrame(
                {
                    **{k: z[k].values for k in keys},
                    "p_clean": z["p_clean"].values,
                    "p_corrupt": z["p_corrupt"].values,
                    "high_score": z["p_clean"].values,
                    "corruption_effect": 0.0,
                    "denominator": den.values,
                    "zero_denominator": z["zero_denominator"].values,
                    "te": frac,
                    "restore_effect_max": (z["p_restored"] - z["p_clean"]).values,
                    "subj_effect": (z["p_clean"] - z["p_restored"]).values,
                    "subj_effect_fraction": frac,
                }
            )
        )
    if not parts:
        return pd.DataFrame(columns=keys + ["te"])
    out = pd.concat(parts, ignore_index=True)
    out["zero_denominator"] = out["zero_denominator"].astype(bool)
    flagged = out.loc[out["zero_denominator"], _GROUP].drop_duplicates()
    if len(flagged):
        log.warning(
            "%d (case, kind, window) groups have a zero denominator (corruption had no effect); te set to 0: %s",
            len(flagged), flagged["case_id"].tolist()[:20],
        )
    cols = keys + ["te", "subj_effect", "subj_effect_fraction", "restore_effect_max", "p_clean", "p_corrupt",
                   "high_score", "corruption_effect", "denominator", "zero_denominator"]
    return out[cols]


def zero_denominator_cases(eff: pd.DataFrame) -> pd.DataFrame:
    """The (case_id, kind, window) groups whose denominator is zero (te reported as 0 there)."""
    return eff.loc[eff["zero_denominator"], _GROUP].drop_duplicates().reset_index(drop=True)


def peak_layers(table: pd.DataFrame) -> pd.DataFrame:
    """Peak site(s) per (case_id, kind, window): rows with restore_effect ≥ its max over all (t, l) **and** > 0
    (ties kept, so a case can have several rows; a case with no positive effect has none). Tracing kinds only.

    Columns: case_id, kind, window, layer, token_idx, restore_effect.
    """
    t = table[table["kind"] != "zero"]
    eff = t["p_restored"] - t["p_corrupt"]
    best = eff.groupby([t[k] for k in _GROUP], sort=False).transform("max")
    keep = (eff >= best) & (eff > 0)
    out = t.loc[keep, _GROUP + ["layer", "token_idx"]].copy()
    out["restore_effect"] = eff[keep]
    return out.reset_index(drop=True)


def concentrated(eff: pd.DataFrame, threshold: float = 0.5, max_others: int = 3) -> pd.DataFrame:
    """§4.4: per (case_id, kind, window), whether the per-layer curve ``te`` is concentrated: at most
    ``max_others`` layers besides the argmax reach ≥ ``threshold`` × the curve's maximum.

    Columns: case_id, kind, window, peak_layer (first argmax), te_max, n_above (layers besides the argmax at
    ≥ threshold × max), concentrated. A flat zero curve is not concentrated (every layer reaches 0).
    """
    rows = []
    for key, g in eff.sort_values("layer").groupby(_GROUP, sort=True):
        te = g["te"].to_numpy()
        i = int(np.argmax(te))
        n_above = int((te >= threshold * te[i]).sum()) - 1
        rows.append((*key, int(g["layer"].iloc[i]), float(te[i]), n_above, n_above <= max_others))
    return pd.DataFrame(rows, columns=_GROUP + ["peak_layer", "te_max", "n_above", "concentrated"])


def layer_thirds(peaks: pd.DataFrame, n_layer: int) -> pd.Series:
    """Share of peak rows in the first / middle / last third of the network (for prose numbers)."""
    third = pd.cut(peaks["layer"], bins=[-1, n_layer / 3 - 1e-9, 2 * n_layer / 3 - 1e-9, n_layer],
                   labels=["early", "middle", "late"])
    return third.value_counts(normalize=True).reindex(["early", "middle", "late"]).fillna(0.0)


def last_subject_by_layer(table: pd.DataFrame, window: int, kind: str = "mlp") -> pd.Series:
    """Per central layer, the share of the mean corrupted-to-clean gap that restoring ``kind`` at the last
    subject token recovers (window ``window``): mean over facts of p(restored) - p_corrupt, divided by the mean
    over facts of p_clean - p_corrupt (the paper's denominator). A ratio of means: a mean of per-fact ratios is
    dominated by any fact whose corruption barely moved p (SmolLM2, 100 facts: one gap of 4e-5 made it 20)."""
    eff = effects(table[(table["kind"] == kind) & (table["window"] == window)], denominator="paper")
    by = eff.groupby("layer")  # with the paper's denominator, "denominator" is p_clean - p_corrupt (unclipped)
    gap = by["denominator"].mean()
    return (by["subj_effect"].mean() / gap.where(gap > 0)).fillna(0.0)
