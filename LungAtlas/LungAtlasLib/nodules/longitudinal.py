"""One participant's nodules across screens (T0/T1/T2), matched in atlas space.

A nodule at a later screen is ``persistent`` when a nodule of the same
participant at an earlier screen lies within ``max_distance_mm`` of it in the
atlas (both mapped through their own scan's transform), else ``new``. Nodules
of the first screen a participant has are ``baseline``. Matching is one-to-one
per pair of screens and minimises the total distance (Hungarian algorithm,
scipy ``linear_sum_assignment``); each later nodule is matched to the most
recent earlier screen where it finds a partner.

The threshold must cover registration error plus, for NLST's estimated
positions, their section uncertainty: 15 mm is the default; NLST positions
(lobe-slice centroids) with uncertainties of several cm match loosely.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

DEFAULT_MATCH_DISTANCE_MM = 15.0


def match_longitudinal(mapped: pd.DataFrame, max_distance_mm: float = DEFAULT_MATCH_DISTANCE_MM) -> pd.DataFrame:
    """Used nodules (status ``ok``) with ``longitudinal_status`` (baseline/new/persistent),
    ``matched_nodule_id`` and ``match_distance_mm`` (atlas mm)."""
    used = mapped[mapped["status"] == "ok"].copy()
    used["longitudinal_status"] = "new"
    used["matched_nodule_id"] = None
    used["match_distance_mm"] = np.nan
    used["_year"] = pd.to_numeric(used["study_yr"], errors="coerce")
    columns = ["atlas_x_lps", "atlas_y_lps", "atlas_z_lps"]
    for _, person in used.groupby(used["participant"].astype(str)):
        years = sorted(person["_year"].dropna().unique())
        if not years:
            continue
        used.loc[person.index[person["_year"] == years[0]], "longitudinal_status"] = "baseline"
        for position, year in enumerate(years[1:], start=1):
            later = person[person["_year"] == year]
            unmatched = list(later.index)
            for earlier_year in reversed(years[:position]):  # most recent earlier screen first
                if not unmatched:
                    break
                earlier = person[person["_year"] == earlier_year]
                a = used.loc[unmatched, columns].to_numpy(float)
                b = earlier[columns].to_numpy(float)
                distance = np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)
                cost = np.where(distance <= max_distance_mm, distance, 1e9)
                rows, cols = linear_sum_assignment(cost)
                matched = []
                for r, c in zip(rows, cols):
                    if distance[r, c] <= max_distance_mm:
                        index = unmatched[r]
                        used.loc[index, ["longitudinal_status", "matched_nodule_id", "match_distance_mm"]] = [
                            "persistent", earlier.iloc[c]["nodule_id"], float(distance[r, c])]
                        matched.append(index)
                unmatched = [i for i in unmatched if i not in matched]
    return used.drop(columns="_year")


def longitudinal_summary(matched: pd.DataFrame) -> pd.DataFrame:
    """Counts of baseline / new / persistent nodules per screening year."""
    table = pd.crosstab(matched["study_yr"], matched["longitudinal_status"])
    for column in ("baseline", "new", "persistent"):
        if column not in table:
            table[column] = 0
    return table[["baseline", "new", "persistent"]].reset_index()
