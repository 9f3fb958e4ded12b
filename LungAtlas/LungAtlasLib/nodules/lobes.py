"""Per-lobe counts, shares and volume-normalised rates; central vs peripheral zones.

Rate of a lobe = (its share of nodules) / (its share of lung volume): 1 means
"as many nodules as its size predicts", the reference figure for the right
upper lobe is ~1.8 (31 % of tumours in 18 % of lung volume).

Confidence intervals: Wilson score intervals for the share (binomial: each
nodule falls in the lobe or not); the rate interval is the share interval
divided by the lobe's volume share, which is treated as known (it is measured
on the atlas label map, not sampled). Wilson assumes independent nodules;
several nodules of one participant are not independent, so
``cluster_bootstrap_share_ci`` gives a participant-level bootstrap interval to
compare with.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage, stats

from ..geometry import index_to_physical, physical_to_index, voxel_volume_ml
from ..labels import LABELS

CENTRAL_FRACTION = 1.0 / 3.0


def wilson_interval(k, n, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (NaNs when n == 0)."""
    if n == 0:
        return float("nan"), float("nan")
    z = stats.norm.ppf(0.5 + confidence / 2.0)
    p = k / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def lobe_volumes_ml(lobe_labels: sitk.Image) -> dict[int, float]:
    """Volume of each lobe (mL) of a label map."""
    labels = sitk.GetArrayViewFromImage(lobe_labels)
    # one comparison per lobe on the label type: no int64 copy of a 27 M-voxel map
    return {lobe: float(np.count_nonzero(labels == lobe) * voxel_volume_ml(lobe_labels)) for lobe in LABELS.lobe_values}


def lobe_rates(nodule_lobes, lobe_volumes: dict[int, float], confidence: float = 0.95) -> pd.DataFrame:
    """One row per lobe: count, share (+ Wilson CI), volume (mL), volume share, rate (+ CI).

    ``nodule_lobes``: lobe value (1-5) of each used nodule; values outside 1-5 are
    not counted here (the caller reports them)."""
    values = np.asarray(nodule_lobes, int)
    n = int(np.isin(values, LABELS.lobe_values).sum())
    total_volume = sum(lobe_volumes.values())
    rows = []
    for lobe in LABELS.lobe_values:
        k = int((values == lobe).sum())
        low, high = wilson_interval(k, n, confidence)
        volume_share = lobe_volumes[lobe] / total_volume if total_volume else float("nan")
        share = k / n if n else float("nan")
        rows.append({
            "lobe": lobe, "lobe_key": LABELS.lobe(lobe).key, "lobe_name": LABELS.lobe(lobe).name,
            "count": k, "share": share, "share_ci_low": low, "share_ci_high": high,
            "volume_ml": lobe_volumes[lobe], "volume_share": volume_share,
            "rate": share / volume_share, "rate_ci_low": low / volume_share, "rate_ci_high": high / volume_share,
            "ci_method": f"Wilson {confidence:.0%}",
        })
    return pd.DataFrame(rows)


def cluster_bootstrap_share_ci(nodule_lobes, clusters, lobe: int, confidence: float = 0.95,
                               n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of one lobe's share, resampling whole clusters (participants)."""
    values = np.asarray(nodule_lobes, int)
    clusters = np.asarray(clusters)
    _, cluster_index = np.unique(clusters, return_inverse=True)
    hits = np.bincount(cluster_index, weights=(values == lobe).astype(float))
    sizes = np.bincount(cluster_index).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(sizes), (n_boot, len(sizes)))
    shares = hits[draws].sum(axis=1) / sizes[draws].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(shares, alpha)), float(np.quantile(shares, 1.0 - alpha))


# ---------------------------------------------------------------------------
# Central vs peripheral
# ---------------------------------------------------------------------------
def estimate_hilum_points(lobe_labels: sitk.Image) -> dict[str, np.ndarray]:
    """One hilum point per lung (LPS mm): the centroid of the lung's medial surface
    voxels in the middle third of its height, where the main bronchus and vessels enter.

    An estimate from the label map alone; pass known hilum points to
    :func:`zone_maps` when the atlas has them."""
    labels = sitk.GetArrayViewFromImage(lobe_labels)
    points = {}
    for side in ("right", "left"):
        mask = np.isin(labels, LABELS.lobes_of_side(side))
        if not mask.any():
            continue
        surface = mask & ~ndimage.binary_erosion(mask)
        idx = np.argwhere(surface).astype(float)
        lps = index_to_physical(lobe_labels, idx)
        z = lps[:, 2]
        z_low, z_high = np.quantile(z, [1 / 3, 2 / 3])
        middle = (z >= z_low) & (z <= z_high)
        # medial = towards the midline: the 15 % of surface voxels with the smallest |x - midline|
        all_lung = index_to_physical(lobe_labels, np.argwhere(labels > 0).astype(float))
        midline = float(np.median(all_lung[:, 0]))
        distance = np.abs(lps[middle, 0] - midline)
        medial = distance <= np.quantile(distance, 0.15)
        points[side] = lps[middle][medial].mean(axis=0)
    return points


def zone_maps(lobe_labels: sitk.Image, hilum_points: dict | None = None) -> dict[str, np.ndarray]:
    """Per-voxel distance to the pleural surface (mm, lung voxels), distance to the hilum
    of the same lung (mm) and relative depth = d_hilum / (d_hilum + d_pleura) in [0, 1]
    (0 at the hilum, 1 at the pleura). Central = relative depth < 1/3 (the inner third
    from hilum to pleura), peripheral = the outer two thirds."""
    labels = sitk.GetArrayViewFromImage(lobe_labels)
    lung = labels > 0
    spacing_zyx = lobe_labels.GetSpacing()[::-1]
    to_pleura = ndimage.distance_transform_edt(np.pad(lung, 1), sampling=spacing_zyx)[1:-1, 1:-1, 1:-1]
    hilum_points = hilum_points or estimate_hilum_points(lobe_labels)
    to_hilum = np.full(lung.shape, np.nan, np.float32)
    grid = np.argwhere(lung).astype(float)
    lps = index_to_physical(lobe_labels, grid)
    side_of = np.isin(labels[lung], LABELS.lobes_of_side("left"))
    for side, is_left in (("right", False), ("left", True)):
        if side not in hilum_points:
            continue
        select = side_of == is_left
        to_hilum[tuple(grid[select].astype(int).T)] = np.linalg.norm(lps[select] - hilum_points[side], axis=1)
    depth = to_hilum / (to_hilum + to_pleura)
    return {"distance_to_pleura_mm": to_pleura.astype(np.float32), "distance_to_hilum_mm": to_hilum,
            "relative_depth": np.where(lung, depth, np.nan).astype(np.float32), "lung": lung}


def nodule_zones(atlas_points_lps, lobe_labels: sitk.Image, zones: dict | None = None) -> pd.DataFrame:
    """Per point: distance to pleura / hilum (mm), relative depth and zone (central/peripheral),
    read at the nearest atlas voxel (NaN / "unknown" outside the atlas lungs)."""
    zones = zones or zone_maps(lobe_labels)
    points = np.atleast_2d(np.asarray(atlas_points_lps, float))
    index = np.round(physical_to_index(lobe_labels, points)).astype(int) if len(points) else np.zeros((0, 3), int)
    shape = np.array(zones["lung"].shape)
    inside = np.all((index >= 0) & (index < shape), axis=1)
    out = {key: np.full(len(points), np.nan) for key in ("distance_to_pleura_mm", "distance_to_hilum_mm",
                                                         "relative_depth")}
    z, y, x = index[inside].T
    in_lung = np.zeros(len(points), bool)
    in_lung[inside] = zones["lung"][z, y, x]
    for key in out:
        values = np.full(len(points), np.nan)
        values[inside] = zones[key][z, y, x]
        out[key] = np.where(in_lung, values, np.nan)
    zone = np.where(~in_lung | np.isnan(out["relative_depth"]), "unknown",
                    np.where(out["relative_depth"] < CENTRAL_FRACTION, "central", "peripheral"))
    return pd.DataFrame({**out, "zone": zone})


def zone_rates(zone_labels, zones: dict, voxel_ml: float, confidence: float = 0.95) -> pd.DataFrame:
    """Central/peripheral counts, shares (Wilson CI), volume shares and rates, like :func:`lobe_rates`."""
    zone_labels = np.asarray(zone_labels)
    known = zone_labels[zone_labels != "unknown"]
    depth = zones["relative_depth"][zones["lung"]]
    volumes = {"central": float((depth < CENTRAL_FRACTION).sum() * voxel_ml),
               "peripheral": float((depth >= CENTRAL_FRACTION).sum() * voxel_ml)}
    total = sum(volumes.values())
    rows = []
    for zone, volume in volumes.items():
        k = int((known == zone).sum())
        low, high = wilson_interval(k, len(known), confidence)
        share = k / len(known) if len(known) else float("nan")
        vshare = volume / total if total else float("nan")
        rows.append({"zone": zone, "count": k, "share": share, "share_ci_low": low, "share_ci_high": high,
                     "volume_ml": volume, "volume_share": vshare, "rate": share / vshare,
                     "rate_ci_low": low / vshare, "rate_ci_high": high / vshare,
                     "ci_method": f"Wilson {confidence:.0%}",
                     "definition": "central = inner third of the hilum-to-pleura depth"})
    return pd.DataFrame(rows)
