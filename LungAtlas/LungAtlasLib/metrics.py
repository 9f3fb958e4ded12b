"""Alignment metrics: Dice, intensity MSE, relative volume difference, HD95, Jacobian statistics.

Pure functions on numpy arrays (numpy order z, y, x) with spacing in mm given
explicitly, or on SimpleITK images through :func:`alignment_metrics`. Units:
volumes in mL, distances in mm, MSE on intensities windowed to [-1000, 1000] HU
and scaled to [0, 1] (as the reference study reports it).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .labels import LABELS

HU_WINDOW = (-1000.0, 1000.0)


def confusion_counts(reference: np.ndarray, test: np.ndarray, n_labels: int) -> np.ndarray:
    """(n_labels, n_labels) voxel counts: row = reference label, column = test label."""
    if reference.shape != test.shape:
        raise ValueError(f"label maps differ in shape: {reference.shape} vs {test.shape}")
    ref = reference.ravel().astype(np.int32, copy=False)
    tst = test.ravel().astype(np.int32, copy=False)
    if ref.size and (ref.max() >= n_labels or tst.max() >= n_labels):
        raise ValueError(f"label values must be below {n_labels}")
    return np.bincount(ref * n_labels + tst, minlength=n_labels * n_labels).reshape(n_labels, n_labels)


def dice_from_counts(counts: np.ndarray, labels) -> dict[int, float]:
    """Dice per label from a confusion matrix; NaN where a label is in neither map."""
    out = {}
    for label in labels:
        both = counts[label, label]
        total = counts[label, :].sum() + counts[:, label].sum()
        out[int(label)] = float(2.0 * both / total) if total else float("nan")
    return out


def dice(reference: np.ndarray, test: np.ndarray) -> float:
    """Dice of two binary masks (1.0 when both are empty is avoided: NaN)."""
    reference = reference.astype(bool, copy=False)
    test = test.astype(bool, copy=False)
    total = reference.sum() + test.sum()
    return float(2.0 * np.logical_and(reference, test).sum() / total) if total else float("nan")


def dice_per_label(reference: np.ndarray, test: np.ndarray, labels=None) -> dict:
    """Dice for each label value plus ``"lung"`` for the union of all non-zero labels."""
    labels = tuple(labels) if labels is not None else LABELS.lobe_values
    n = int(max(reference.max(initial=0), test.max(initial=0), max(labels))) + 1
    counts = confusion_counts(reference, test, n)
    result = dice_from_counts(counts, labels)
    lung_both = counts[1:, 1:].sum()
    lung_total = counts[1:, :].sum() + counts[:, 1:].sum()
    result["lung"] = float(2.0 * lung_both / lung_total) if lung_total else float("nan")
    return result


def window_hu(intensities: np.ndarray, window=HU_WINDOW) -> np.ndarray:
    """Clamp HU to the window and scale to [0, 1]."""
    low, high = window
    return (np.clip(intensities.astype(np.float32, copy=False), low, high) - low) / (high - low)


def intensity_mse(reference: np.ndarray, test: np.ndarray, mask: np.ndarray | None = None,
                  window=HU_WINDOW) -> float:
    """Mean squared difference of windowed, [0, 1]-scaled intensities (inside ``mask`` if given)."""
    if reference.shape != test.shape:
        raise ValueError(f"images differ in shape: {reference.shape} vs {test.shape}")
    diff = window_hu(reference, window) - window_hu(test, window)
    if mask is not None:
        mask = mask.astype(bool, copy=False)
        if not mask.any():
            return float("nan")
        diff = diff[mask]
    return float(np.mean(np.square(diff, dtype=np.float64)))


def relative_volume_difference(reference: np.ndarray, test: np.ndarray, labels=None) -> dict:
    """|V_test - V_reference| / V_reference per label and for the whole lung (fraction, not %)."""
    labels = tuple(labels) if labels is not None else LABELS.lobe_values
    n = int(max(reference.max(initial=0), test.max(initial=0), max(labels))) + 1
    ref_counts = np.bincount(reference.ravel(), minlength=n).astype(float)
    test_counts = np.bincount(test.ravel(), minlength=n).astype(float)
    out = {}
    for label in labels:
        ref = ref_counts[label]
        out[int(label)] = float(abs(test_counts[label] - ref) / ref) if ref else float("nan")
    ref_lung, test_lung = ref_counts[1:].sum(), test_counts[1:].sum()
    out["lung"] = float(abs(test_lung - ref_lung) / ref_lung) if ref_lung else float("nan")
    return out


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                          border_value=0)


def hausdorff95(reference: np.ndarray, test: np.ndarray, spacing_zyx) -> float:
    """95th percentile of the symmetric surface distances, in mm (pooled both ways,
    as medpy/MONAI compute it). NaN when either mask is empty."""
    reference = reference.astype(bool, copy=False)
    test = test.astype(bool, copy=False)
    if not reference.any() or not test.any():
        return float("nan")
    # Work inside the joint bounding box (plus one voxel) to keep distance maps small.
    joint = reference | test
    box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in ndimage.find_objects(joint.astype(np.uint8))[0])
    reference, test = reference[box], test[box]
    ref_surface, test_surface = _surface(reference), _surface(test)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_zyx)
    to_test = ndimage.distance_transform_edt(~test_surface, sampling=spacing_zyx)
    distances = np.concatenate([to_ref[test_surface], to_test[ref_surface]])
    return float(np.percentile(distances, 95))


def jacobian_determinant(displacement: np.ndarray, spacing_zyx, direction=None) -> np.ndarray:
    """Jacobian determinant of x -> x + u(x) for a displacement field.

    ``displacement``: (z, y, x, 3) array whose last axis holds the physical
    (x, y, z) components in mm, as SimpleITK displacement fields store them.
    ``direction``: the grid's 3x3 direction matrix (identity if None).
    """
    spacing_xyz = np.asarray(spacing_zyx, float)[::-1]
    direction = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    # d(index)/d(physical) maps physical derivatives onto the grid axes.
    index_per_mm = np.linalg.inv(direction @ np.diag(spacing_xyz))
    grad = np.empty(displacement.shape[:3] + (3, 3), np.float64)
    for component in range(3):
        dz, dy, dx = np.gradient(displacement[..., component].astype(np.float64))
        # derivative with respect to index axes (i=x, j=y, k=z), then chain rule to physical axes
        by_index = np.stack([dx, dy, dz], axis=-1)
        grad[..., component, :] = by_index @ index_per_mm
    grad[..., 0, 0] += 1.0
    grad[..., 1, 1] += 1.0
    grad[..., 2, 2] += 1.0
    return np.linalg.det(grad)


def jacobian_statistics(displacement: np.ndarray, spacing_zyx, direction=None,
                        mask: np.ndarray | None = None) -> dict:
    """Folding and smoothness: % of voxels with J <= 0, std of log J (over J > 0), range."""
    jac = jacobian_determinant(displacement, spacing_zyx, direction)
    if mask is not None:
        jac = jac[mask.astype(bool, copy=False)]
    jac = jac.ravel()
    positive = jac[jac > 0]
    return {
        "jacobian_nonpositive_percent": float(100.0 * np.mean(jac <= 0)) if jac.size else float("nan"),
        "jacobian_log_std": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "jacobian_min": float(jac.min()) if jac.size else float("nan"),
        "jacobian_max": float(jac.max()) if jac.size else float("nan"),
    }


def displacement_field_statistics(field: sitk.Image, mask: sitk.Image | None = None) -> dict:
    """:func:`jacobian_statistics` for a SimpleITK displacement field image."""
    array = sitk.GetArrayViewFromImage(field)
    mask_array = sitk.GetArrayViewFromImage(mask) > 0 if mask is not None else None
    return jacobian_statistics(array, field.GetSpacing()[::-1], field.GetDirection(), mask_array)


def region_name(label) -> str:
    return "lung" if label == "lung" else LABELS.lobe(label).key


def alignment_metrics(fixed_labels: sitk.Image, moving_labels: sitk.Image,
                      fixed_image: sitk.Image | None = None, moving_image: sitk.Image | None = None,
                      labels=None, with_hausdorff: bool = True) -> list[dict]:
    """Per-region rows (region, dice, relative_volume_difference, hausdorff95_mm) of
    ``moving_labels`` against ``fixed_labels`` on one grid, plus a whole-image and
    in-lung intensity MSE row when both images are given.

    Regions absent from both maps are left out (a lung-only map gives only the
    ``lung`` row).
    """
    ref = sitk.GetArrayViewFromImage(fixed_labels)
    test = sitk.GetArrayViewFromImage(moving_labels)
    if ref.shape != test.shape:
        raise ValueError(f"label maps are on different grids: {ref.shape} vs {test.shape}; resample first")
    labels = tuple(labels) if labels is not None else LABELS.lobe_values
    present = [l for l in labels if (ref == l).any() or (test == l).any()]
    dices = dice_per_label(ref, test, present or labels)
    rvds = relative_volume_difference(ref, test, present or labels)
    spacing_zyx = fixed_labels.GetSpacing()[::-1]
    rows = []
    for label in present + ["lung"]:
        ref_mask = ref > 0 if label == "lung" else ref == label
        test_mask = test > 0 if label == "lung" else test == label
        rows.append({
            "region": region_name(label),
            "dice": dices[label],
            "relative_volume_difference": rvds[label],
            "hausdorff95_mm": hausdorff95(ref_mask, test_mask, spacing_zyx) if with_hausdorff else float("nan"),
        })
    if fixed_image is not None and moving_image is not None:
        fixed_array = sitk.GetArrayViewFromImage(fixed_image)
        moving_array = sitk.GetArrayViewFromImage(moving_image)
        rows.append({"region": "image", "mse": intensity_mse(fixed_array, moving_array)})
        rows.append({"region": "lung_intensity", "mse": intensity_mse(fixed_array, moving_array, ref > 0)})
    return rows
