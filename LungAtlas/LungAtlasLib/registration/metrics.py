"""Before/after alignment metrics for one registered pair (the study's table, per case).

Stages, all measured on the FIXED grid against the fixed labels:
* ``before``: the moving scan resampled onto the fixed grid with no transform
  (same physical LPS coordinates, as the scanner placed the patient);
* ``centroid``: after translating the moving lungs' centroid onto the fixed lungs'
  centroid (the simplest initial alignment);
* ``after``: through the registration's ``fixed_to_moving``.
Rows come from :func:`LungAtlasLib.metrics.alignment_metrics` (Dice, relative volume
difference, HD95 per lobe and for the lung; intensity MSE of the whole image and in
the fixed lungs). Folding: Jacobian statistics of ``fixed_to_moving`` inside the
fixed lungs (% voxels with J <= 0).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .. import geometry
from ..metrics import alignment_metrics
from .base import RegistrationResult
from .transforms import jacobian_statistics, warp_image, warp_labels


def lung_centroid(labels: sitk.Image) -> np.ndarray:
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels > 0, sitk.sitkUInt8))
    return np.array(stats.GetCentroid(1))


def folding_in_lungs(transform: sitk.Transform, fixed_labels: sitk.Image, margin_voxels: int = 2) -> dict:
    """Jacobian statistics of ``transform`` inside the fixed lungs (sampled on the
    fixed grid cropped to the lungs, which keeps the Jacobian arrays small)."""
    lungs = sitk.GetArrayViewFromImage(fixed_labels) > 0
    box = geometry.bounding_box(lungs, margin_voxels)
    mask = sitk.Cast(geometry.crop(fixed_labels, box) > 0, sitk.sitkUInt8)
    return jacobian_statistics(transform, mask, mask)


def registration_metrics(fixed: sitk.Image, moving: sitk.Image, fixed_labels: sitk.Image,
                         moving_labels: sitk.Image, result: RegistrationResult,
                         with_hausdorff: bool = True) -> dict:
    """{"regions": [{"stage", "region", "dice", ...}], "folding": {...}, "definitions": {...}}."""
    if not sitk.GetArrayViewFromImage(fixed_labels).any() or not sitk.GetArrayViewFromImage(moving_labels).any():
        raise ValueError("a label map is empty: metrics need lungs in both scans")
    centroid_shift = sitk.TranslationTransform(3, tuple(float(v) for v in
                                                        lung_centroid(moving_labels) - lung_centroid(fixed_labels)))
    stages = {"before": sitk.Transform(), "centroid": centroid_shift, "after": result.fixed_to_moving}
    rows = []
    for stage, transform in stages.items():
        warped_labels = warp_labels(moving_labels, fixed, transform)
        warped = warp_image(moving, fixed, transform)
        for row in alignment_metrics(fixed_labels, warped_labels, fixed, warped, with_hausdorff=with_hausdorff):
            rows.append({"stage": stage, **row})
    return {
        "backend": result.backend,
        "regions": rows,
        "folding": folding_in_lungs(result.fixed_to_moving, fixed_labels),
        "definitions": {
            "before": "moving resampled on the fixed grid, no transform (same LPS coordinates)",
            "centroid": "moving lung centroid translated onto the fixed lung centroid",
            "after": "through the registration (fixed_to_moving)",
            "mse": "intensities windowed to -1000..1000 HU, scaled to [0, 1]",
            "folding": "fixed_to_moving Jacobian inside the fixed lungs",
        },
    }
