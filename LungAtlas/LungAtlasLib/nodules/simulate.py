"""Planted-truth nodule cohorts in atlas space, for tests, benchmarks and the demo.

Nodule positions are drawn uniformly inside the atlas lobes with chosen
per-lobe weights per mL (so the true volume-normalised rate of each lobe is
known), scans get a Poisson number of nodules, and a group can be given a
planted preference for one lobe. The output has the columns of a mapped nodule
table (:func:`mapping.map_nodules`), so it goes straight into the statistics.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..geometry import index_to_physical
from ..labels import LABELS


def true_rates(lobe_labels: sitk.Image, weights_per_ml: dict[int, float]) -> dict[int, float]:
    """Volume-normalised rate (share of nodules / share of volume) implied by per-mL weights."""
    counts = np.bincount(sitk.GetArrayViewFromImage(lobe_labels).ravel().astype(np.int64),
                         minlength=max(LABELS.lobe_values) + 1)
    volumes = {lobe: float(counts[lobe]) for lobe in LABELS.lobe_values}
    mass = sum(volumes[lobe] * weights_per_ml[lobe] for lobe in LABELS.lobe_values)
    total = sum(volumes.values())
    return {lobe: (volumes[lobe] * weights_per_ml[lobe] / mass) / (volumes[lobe] / total) for lobe in LABELS.lobe_values}


class LobeSampler:
    """Uniform points inside lobes of an atlas label map (voxel centre + uniform jitter within the voxel)."""

    def __init__(self, lobe_labels: sitk.Image):
        self.image = lobe_labels
        labels = sitk.GetArrayViewFromImage(lobe_labels)
        self.voxels = {lobe: np.argwhere(labels == lobe) for lobe in LABELS.lobe_values}

    def sample(self, rng: np.random.Generator, weights_per_ml: dict[int, float], n: int):
        """(points (n, 3) LPS mm, lobes (n,)) with P(lobe) proportional to volume x weight."""
        mass = np.array([len(self.voxels[lobe]) * weights_per_ml[lobe] for lobe in LABELS.lobe_values], float)
        lobes = rng.choice(LABELS.lobe_values, size=n, p=mass / mass.sum())
        points = np.zeros((n, 3))
        for lobe in LABELS.lobe_values:
            chosen = np.flatnonzero(lobes == lobe)
            if len(chosen):
                voxels = self.voxels[lobe][rng.integers(0, len(self.voxels[lobe]), len(chosen))]
                points[chosen] = index_to_physical(self.image, voxels + rng.uniform(-0.45, 0.45, (len(chosen), 3)))
        return points, lobes


    def sample_ball(self, rng: np.random.Generator, centre_lps, radius_mm: float, mean_count: float):
        """A Poisson(mean_count) number of lung points uniform in a ball (LPS mm)."""
        if not hasattr(self, "_lung_points"):
            self._lung_points = np.concatenate([index_to_physical(self.image, v.astype(float))
                                                for v in self.voxels.values()])
            self._lung_lobes = np.concatenate([np.full(len(v), lobe) for lobe, v in self.voxels.items()])
        near = np.flatnonzero(np.linalg.norm(self._lung_points - np.asarray(centre_lps, float), axis=1) <= radius_mm)
        if len(near) == 0:
            raise ValueError(f"no atlas lung voxel within {radius_mm} mm of {centre_lps}")
        chosen = near[rng.integers(0, len(near), int(rng.poisson(mean_count)))]
        spacing = np.asarray(self.image.GetSpacing())
        return (self._lung_points[chosen] + rng.uniform(-0.45, 0.45, (len(chosen), 3)) * spacing,
                self._lung_lobes[chosen])


def planted_cohort(lobe_labels: sitk.Image, n_scans: int, seed: int, *, weights_per_ml: dict[int, float] | None = None,
                   nodules_per_scan: float = 1.5, group_column: str = "sex", groups=("male", "female"),
                   group_b_weights: dict[int, float] | None = None, group_b_hotspot: tuple | None = None,
                   scans_per_participant: int = 1):
    """(mapped nodule table, scan table) of a planted cohort.

    Scans alternate between ``groups``; scans of ``groups[1]`` use
    ``group_b_weights`` (default: the same weights, i.e. a null difference).
    ``group_b_hotspot`` = (centre LPS mm, radius mm, mean extra nodules per scan):
    scans of ``groups[1]`` also get a Poisson number of nodules uniform in that
    ball (clipped to the lungs): a focal difference.
    ``scans_per_participant`` > 1 gives screens T0, T1, ... of one participant
    (same group)."""
    rng = np.random.default_rng(seed)
    weights = weights_per_ml or {lobe: 1.0 for lobe in LABELS.lobe_values}
    weights_b = group_b_weights or weights
    sampler = LobeSampler(lobe_labels)
    scan_rows, nodule_rows = [], []
    for scan in range(n_scans):
        participant = f"P{scan // scans_per_participant:05d}"
        group = groups[(scan // scans_per_participant) % 2]
        case_id = f"{participant}_T{scan % scans_per_participant}"
        scan_rows.append({"case_id": case_id, "participant": participant,
                          "study_yr": scan % scans_per_participant, group_column: group})
        n = int(rng.poisson(nodules_per_scan))
        points, lobes = sampler.sample(rng, weights if group == groups[0] else weights_b, n)
        if group_b_hotspot is not None and group == groups[1]:
            extra_points, extra_lobes = sampler.sample_ball(rng, *group_b_hotspot)
            points, lobes = np.vstack([points, extra_points]), np.concatenate([lobes, extra_lobes])
            n = len(lobes)
        for i in range(n):
            nodule_rows.append({"nodule_id": f"{case_id}-n{i + 1}", "case_id": case_id, "participant": participant,
                                "study_yr": scan % scans_per_participant, "status": "ok",
                                "atlas_x_lps": points[i, 0], "atlas_y_lps": points[i, 1], "atlas_z_lps": points[i, 2],
                                "atlas_lobe": int(lobes[i]), "true_lobe": int(lobes[i]),
                                "diameter_mm": float(rng.uniform(4, 20))})
    return pd.DataFrame(nodule_rows), pd.DataFrame(scan_rows)
