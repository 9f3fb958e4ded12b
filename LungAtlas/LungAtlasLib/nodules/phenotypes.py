"""Phenotype groups and their comparisons: chi-square on lobe counts, density difference maps,
and a permutation test on density maps with family-wise error control.

Groups come from NLST participant columns (``prsn``): ``gender`` (1 male, 2
female), ``age`` (years, NLST bands 55-59 ... 70-74), ``cigsmok`` (1 current,
0 former smoker), ``pkyr`` (pack-years: <40, 40-59, >=60; NLST enrolled >=30),
``can_scr`` (0 = no lung cancer, any other value = lung cancer diagnosed; a
``cancer`` column, if present, is used instead), and the screening year of the
scan (``study_yr`` 0/1/2 -> T0/T1/T2). Missing or unknown codes become the
group ``"unknown"``, which is reported and left out of the tests.

Permutation test: the statistic at each atlas voxel is the difference of the
two groups' mean densities (nodules per mL per scan, the same maps as
:mod:`.density`) divided by the square root of the pooled density (its Poisson
scale, so that common and rare regions weigh alike); group labels are permuted between exchangeable units
(participants; scans for the screening-year comparison, where a participant
is in both groups); family-wise error is controlled by the maximum statistic
(Nichols & Holmes 2002): a voxel's corrected p-value is the share of
permutations whose largest |difference| anywhere in the lungs reaches that
voxel's |difference|. The global p-value is that of the most different voxel.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import stats

from ..geometry import physical_to_index, voxel_volume_ml
from ..labels import LABELS
from .density import coverage_at, smooth

UNKNOWN = "unknown"
AGE_BANDS = [(0, 55, "<55"), (55, 60, "55-59"), (60, 65, "60-64"), (65, 70, "65-69"), (70, 75, "70-74"),
             (75, 200, "75+")]
PACK_YEAR_BANDS = [(0, 40, "<40"), (40, 60, "40-59"), (60, 1e9, ">=60")]
# phenotype column -> its levels in natural order (the first and the last are compared when there are more than two)
PHENOTYPES = {
    "sex": ["male", "female"],
    "age_group": [label for _, _, label in AGE_BANDS],
    "smoking": ["former", "current"],
    "pack_years_group": [label for _, _, label in PACK_YEAR_BANDS],
    "cancer": ["no_cancer", "cancer"],
    "screen_year": ["T0", "T1", "T2"],
}


def _band(value, bands) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return UNKNOWN
    if np.isnan(number):
        return UNKNOWN
    for low, high, label in bands:
        if low <= number < high:
            return label
    return UNKNOWN


def _code(value, mapping) -> str:
    try:
        return mapping.get(int(float(value)), UNKNOWN)
    except (TypeError, ValueError):
        return UNKNOWN


def derive_phenotypes(participants: pd.DataFrame) -> pd.DataFrame:
    """NLST participant rows -> ``participant`` plus the group columns of :data:`PHENOTYPES`
    (except ``screen_year``, a property of the scan)."""
    pid = participants["pid"] if "pid" in participants else participants["participant"]
    out = pd.DataFrame({"participant": pid.astype(str).to_numpy()})
    column = participants.get
    out["sex"] = [_code(v, {1: "male", 2: "female"}) for v in column("gender", pd.Series([None] * len(out)))]
    out["age_group"] = [_band(v, AGE_BANDS) for v in column("age", pd.Series([None] * len(out)))]
    out["smoking"] = [_code(v, {0: "former", 1: "current"}) for v in column("cigsmok", pd.Series([None] * len(out)))]
    out["pack_years_group"] = [_band(v, PACK_YEAR_BANDS) for v in column("pkyr", pd.Series([None] * len(out)))]
    cancer_source = column("cancer", column("can_scr", pd.Series([None] * len(out))))
    out["cancer"] = [UNKNOWN if pd.isna(v) else ("cancer" if float(v) > 0 else "no_cancer") for v in cancer_source]
    return out


def screen_year_label(study_yr) -> str:
    return _code(study_yr, {0: "T0", 1: "T1", 2: "T2"})


def scan_table(nodules: pd.DataFrame, scans: pd.DataFrame | None = None,
               phenotypes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per scan (``case_id``, ``participant``, ``study_yr``, ``screen_year`` and the
    phenotype groups). ``scans`` lists every scan, those without nodules included; without
    it the scans are those named in the nodule table. Scans named in the nodule table
    but missing from ``scans`` are added (``added_from_nodule_table`` True)."""
    if scans is None:
        scans = nodules[["case_id", "participant", "study_yr"]].drop_duplicates("case_id")
    scans = scans.copy()
    # a nodule's scan missing from the scan list still counts as a scan (reported in the flag)
    missing = nodules[~nodules["case_id"].isin(scans["case_id"])][["case_id", "participant", "study_yr"]]
    scans["added_from_nodule_table"] = False
    if len(missing):
        missing = missing.drop_duplicates("case_id").assign(added_from_nodule_table=True)
        scans = pd.concat([scans, missing], ignore_index=True)
    scans["participant"] = scans["participant"].astype(str)
    scans["screen_year"] = [screen_year_label(v) for v in scans.get("study_yr", pd.Series([None] * len(scans)))]
    if phenotypes is not None:
        derived = derive_phenotypes(phenotypes) if "pid" in phenotypes or "gender" in phenotypes else phenotypes
        derived = derived.copy()
        derived["participant"] = derived["participant"].astype(str)
        scans = scans.drop(columns=[c for c in derived.columns if c != "participant" and c in scans])
        scans = scans.merge(derived, on="participant", how="left")
    for column in PHENOTYPES:
        if column not in scans:
            scans[column] = UNKNOWN
        scans[column] = scans[column].fillna(UNKNOWN)
    return scans.reset_index(drop=True)


# ---------------------------------------------------------------------------
# Lobe counts
# ---------------------------------------------------------------------------
def lobe_contingency(used: pd.DataFrame, group_column: str, levels=None) -> pd.DataFrame:
    """Groups x lobes table of nodule counts (rows: levels in order, ``unknown`` left out)."""
    levels = levels or [g for g in sorted(used[group_column].unique()) if g != UNKNOWN]
    table = pd.crosstab(used[group_column], used["atlas_lobe"]).reindex(
        index=levels, columns=list(LABELS.lobe_values), fill_value=0)
    table.columns = [LABELS.lobe(v).key for v in table.columns]
    return table


def chi_square(table) -> dict:
    """Pearson chi-square test of independence (scipy ``chi2_contingency``, no continuity
    correction) after dropping empty rows and columns; ``expected_min`` < 5 says the
    asymptotic p-value is rough."""
    counts = np.asarray(table, float)
    counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]
    if counts.shape[0] < 2 or counts.shape[1] < 2:
        return {"chi2": float("nan"), "dof": 0, "p_value": float("nan"), "expected_min": float("nan"),
                "n": int(counts.sum())}
    result = stats.chi2_contingency(counts, correction=False)
    return {"chi2": float(result.statistic), "dof": int(result.dof), "p_value": float(result.pvalue),
            "expected_min": float(result.expected_freq.min()), "n": int(counts.sum())}


# ---------------------------------------------------------------------------
# Density maps by group and the permutation test
# ---------------------------------------------------------------------------
class SplatCache:
    """Trilinear splat entries (flat voxel, weight, scan) of all used nodules on one grid,
    computed once so each permutation is one weighted bincount plus one smoothing."""

    def __init__(self, points_lps, point_scan: np.ndarray, reference: sitk.Image):
        shape = tuple(int(s) for s in reference.GetSize()[::-1])
        self.shape, self.reference = shape, reference
        points = np.atleast_2d(np.asarray(points_lps, float))
        index = physical_to_index(reference, points) if len(points) else np.zeros((0, 3))
        upper = np.array(shape) - 1
        inside = np.isfinite(index).all(axis=1) & np.all((index >= 0) & (index <= upper), axis=1)
        index, scans = index[inside], np.asarray(point_scan)[inside]
        base = np.minimum(np.floor(index).astype(np.int64), np.maximum(upper - 1, 0))
        frac = index - base
        strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
        flats, weights, owners = [], [], []
        for corner in range(8):
            offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
            weights.append(np.prod(np.where(offset, frac, 1.0 - frac), axis=1))
            flats.append((np.minimum(base + offset, upper) * strides).sum(axis=1))
            owners.append(scans)
        self.flat = np.concatenate(flats)
        self.weight = np.concatenate(weights)
        self.scan = np.concatenate(owners).astype(np.int64)

    def counts(self, scan_weights: np.ndarray, entry_scale=1.0) -> np.ndarray:
        w = self.weight * scan_weights[self.scan] * entry_scale
        return np.bincount(self.flat, weights=w, minlength=int(np.prod(self.shape))).reshape(self.shape)


class GroupDensity:
    """Group-mean density maps (nodules per mL per scan) with the same smoothing and edge
    correction as :func:`density.density_map`, from a :class:`SplatCache`."""

    def __init__(self, cache: SplatCache, lung_mask: np.ndarray, bandwidth_mm: float):
        self.cache, self.mask, self.bandwidth = cache, lung_mask.astype(bool), float(bandwidth_mm)
        self.spacing_zyx = cache.reference.GetSpacing()[::-1]
        # edge correction per splat entry, computed once (density.correct_edges does the same per map)
        coverage = coverage_at(self.mask, self.spacing_zyx, bandwidth_mm, cache.flat)
        self.entry_scale = np.where(coverage > 1e-3, 1.0 / np.maximum(coverage, 1e-3), 1.0)
        self.voxel_ml = voxel_volume_ml(cache.reference)

    def map(self, scan_weights: np.ndarray) -> np.ndarray:
        """Density of sum_s w_s * (nodules of scan s); weights 1/n_group give a group mean."""
        counts = self.cache.counts(scan_weights, self.entry_scale)
        return np.where(self.mask, smooth(counts, self.spacing_zyx, self.bandwidth), 0.0) / self.voxel_ml


MIN_ARRANGEMENTS = 20  # fewer distinct labellings and p could never reach 0.05


def density_permutation_test(group_density: GroupDensity, scan_groups: np.ndarray, scan_units: np.ndarray,
                             group_a, group_b, n_permutations: int = 999, seed: int = 0) -> dict:
    """Max-statistic permutation test of the difference of two groups' density maps.

    ``scan_groups``: group label per scan (index = the scan numbers used in the
    cache); ``scan_units``: exchangeable unit per scan (participant id, or the scan
    itself). Units whose scans carry several groups are refused (not exchangeable).

    Statistic per voxel: (mean density A - mean density B) / sqrt(pooled density +
    5 % of its in-lung mean), the difference in units of its Poisson scale.

    Returns ``difference`` (A - B, nodules per mL per scan), ``statistic``,
    ``p_fwe`` (corrected p per voxel, 1 outside the lungs), ``p_global``,
    ``max_abs_difference``, ``max_abs_statistic``, ``fwe_threshold_05`` (95th
    percentile of the null maximum statistic), ``n_a``/``n_b`` scans,
    ``arrangements`` (distinct labellings of the units) and ``note``. With fewer
    than :data:`MIN_ARRANGEMENTS` labellings no test is run (p values NaN, the
    note says why): the maps are still returned.
    """
    scan_groups = np.asarray(scan_groups, dtype=object)
    units, unit_of_scan = np.unique(np.asarray(scan_units, dtype=object).astype(str), return_inverse=True)
    unit_group = np.full(len(units), None, dtype=object)
    for unit, group in zip(unit_of_scan, scan_groups):
        if unit_group[unit] is not None and unit_group[unit] != group:
            raise ValueError(f"unit {units[unit]} has scans in several groups; permute at the scan level")
        unit_group[unit] = group
    in_test = np.isin(unit_group, [group_a, group_b])
    scans_in_test = in_test[unit_of_scan]
    n_a = int(np.sum(scan_groups[scans_in_test] == group_a))
    n_b = int(np.sum(scan_groups[scans_in_test] == group_b))
    if n_a == 0 or n_b == 0:
        raise ValueError(f"groups {group_a!r} ({n_a} scans) and {group_b!r} ({n_b} scans): both need scans")

    def weights_for(labels_of_units):
        # group sizes are recounted per permutation: units may hold different numbers of scans
        labels = labels_of_units[unit_of_scan]
        is_a, is_b = scans_in_test & (labels == group_a), scans_in_test & (labels == group_b)
        return np.where(is_a, 1.0 / max(is_a.sum(), 1), 0.0) - np.where(is_b, 1.0 / max(is_b.sum(), 1), 0.0)

    mask = group_density.mask
    units_a = int(np.sum(unit_group[in_test] == group_a))
    arrangements = math.comb(int(in_test.sum()), units_a)
    # Standardise by the Poisson scale of the pooled density: a kernel estimate's variance grows
    # with the local density, so an unscaled maximum would only ever look where nodules are
    # common. The pooled map is the same under every permutation, so this costs one map.
    pooled = group_density.map(np.where(scans_in_test, 1.0 / scans_in_test.sum(), 0.0))
    floor = 0.05 * float(pooled[mask].mean()) if mask.any() else 0.0
    scale = 1.0 / np.sqrt(np.maximum(pooled, 0.0) + floor + 1e-30)
    difference = group_density.map(weights_for(unit_group))
    observed = difference * scale
    common = {"difference": difference.astype(np.float32), "statistic": observed.astype(np.float32),
              "max_abs_difference": float(np.abs(difference[mask]).max(initial=0.0)),
              "max_abs_statistic": float(np.abs(observed[mask]).max(initial=0.0)), "n_a": n_a, "n_b": n_b,
              "n_permutations": n_permutations, "group_a": group_a, "group_b": group_b,
              "arrangements": arrangements}
    if arrangements < MIN_ARRANGEMENTS:
        return {**common, "p_fwe": np.ones(mask.shape, np.float32), "p_global": float("nan"),
                "fwe_threshold_05": float("nan"),
                "note": f"not tested: {units_a} vs {int(in_test.sum()) - units_a} units allow only "
                        f"{arrangements} labellings (< {MIN_ARRANGEMENTS}), p could not reach 0.05"}
    rng = np.random.default_rng(seed)
    test_units = np.flatnonzero(in_test)
    maxima = np.empty(n_permutations)
    for i in range(n_permutations):
        shuffled = unit_group.copy()
        shuffled[test_units] = rng.permutation(unit_group[test_units])
        maxima[i] = np.abs((group_density.map(weights_for(shuffled)) * scale)[mask]).max(initial=0.0)
    absolute = np.abs(observed)
    sorted_max = np.sort(maxima)
    exceed = n_permutations - np.searchsorted(sorted_max, absolute[mask], side="left")
    p_fwe = np.ones(mask.shape, np.float32)
    p_fwe[mask] = (1.0 + exceed) / (1.0 + n_permutations)
    max_abs = common["max_abs_statistic"]
    return {**common, "p_fwe": p_fwe, "p_global": float((1.0 + np.sum(maxima >= max_abs)) / (1.0 + n_permutations)),
            "fwe_threshold_05": float(np.quantile(maxima, 0.95)), "note": ""}
