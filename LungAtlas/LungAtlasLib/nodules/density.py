"""Nodule density maps in atlas space (Gaussian kernel density, bandwidth in mm).

A map's value is **nodules per mL of lung per scan**: the kernel density of the
atlas points divided by the voxel volume (mL) and by the number of scans that
contributed (scans with no nodule count too). Integrated over the lungs it gives
the mean number of nodules per scan.

The kernel is an isotropic Gaussian whose standard deviation is the bandwidth
(mm). Points are splatted onto the grid with trilinear weights (no rounding to
the nearest voxel), then the grid is smoothed, which is the same as summing one
Gaussian per point up to the linear interpolation of the point positions.

Edge correction (``lung_mask`` given): each nodule's kernel is divided by the
share of it that falls inside the lungs (the smoothed lung mask at the nodule),
so every nodule contributes exactly one nodule's mass to the lungs and nodules
at the pleura are not under-counted (the renormalisation correction of kernel
estimates on bounded domains, e.g. Jones 1993, applied per data point); the map
is zero outside the mask.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..geometry import physical_to_index, voxel_volume_ml

DEFAULT_BANDWIDTH_MM = 10.0


def splat_counts(points_lps, reference: sitk.Image, weights=None) -> tuple[np.ndarray, int]:
    """Trilinear splat of (N, 3) LPS points onto ``reference``'s grid (numpy z, y, x order).

    Returns ``(counts, n_outside)``: counts sum to the total weight of the points
    inside the grid; ``n_outside`` points (NaN or beyond the outer voxel centres)
    were left out.
    """
    shape = tuple(int(s) for s in reference.GetSize()[::-1])
    points = np.atleast_2d(np.asarray(points_lps, float))
    weights = np.ones(len(points)) if weights is None else np.asarray(weights, float)
    counts = np.zeros(int(np.prod(shape)), np.float64)
    if len(points) == 0:
        return counts.reshape(shape), 0
    index = physical_to_index(reference, points)
    upper = np.array(shape) - 1
    inside = np.isfinite(index).all(axis=1) & np.all((index >= -1e-6) & (index <= upper + 1e-6), axis=1)
    index = np.clip(index[inside], 0, upper)
    weights = weights[inside]
    base = np.minimum(np.floor(index).astype(np.int64), np.maximum(upper - 1, 0))
    frac = index - base
    strides = np.array([shape[1] * shape[2], shape[2], 1], np.int64)
    for corner in range(8):
        offset = np.array([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        w = weights * np.prod(np.where(offset, frac, 1.0 - frac), axis=1)
        flat = (np.minimum(base + offset, upper) * strides).sum(axis=1)
        counts += np.bincount(flat, weights=w, minlength=counts.size)
    return counts.reshape(shape), int((~inside).sum())


def smooth(counts: np.ndarray, spacing_zyx, bandwidth_mm: float) -> np.ndarray:
    """Gaussian smoothing with standard deviation ``bandwidth_mm`` (mass outside the grid is lost)."""
    if bandwidth_mm <= 0:
        return counts.astype(np.float32)
    sigma = [bandwidth_mm / s for s in spacing_zyx]
    return ndimage.gaussian_filter(counts.astype(np.float32), sigma, mode="constant", truncate=3.5)


def inverse_coverage(lung_mask: np.ndarray, spacing_zyx, bandwidth_mm: float) -> np.ndarray:
    """1 / (share of a kernel centred at each voxel that falls inside the lungs); 1 where the
    share is ~0 (far outside the lungs, where the masked map is zero anyway)."""
    coverage = smooth(lung_mask.astype(np.float32), spacing_zyx, bandwidth_mm)
    inverse = np.ones(coverage.shape, np.float32)
    np.divide(1.0, coverage, out=inverse, where=coverage > 1e-3)
    return inverse


def density_array(counts: np.ndarray, reference: sitk.Image, bandwidth_mm: float, *, n_scans: float = 1.0,
                  lung_mask: np.ndarray | None = None, edge_correction: bool = True) -> np.ndarray:
    """Density (nodules per mL per scan) from splatted counts; see the module docstring."""
    spacing_zyx = reference.GetSpacing()[::-1]
    if lung_mask is not None:
        mask = lung_mask.astype(bool, copy=False)
        if edge_correction and bandwidth_mm > 0:
            counts = counts * inverse_coverage(mask, spacing_zyx, bandwidth_mm)
        density = np.where(mask, smooth(counts, spacing_zyx, bandwidth_mm), 0.0)
    else:
        density = smooth(counts, spacing_zyx, bandwidth_mm)
    return (density / (voxel_volume_ml(reference) * max(float(n_scans), 1e-12))).astype(np.float32)


def to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.asarray(array, np.float32))
    image.CopyInformation(reference)
    return image


def density_map(atlas_points_lps, atlas_reference: sitk.Image, lung_mask: sitk.Image | np.ndarray | None = None,
                bandwidth_mm: float = DEFAULT_BANDWIDTH_MM, *, n_scans: float = 1.0, weights=None,
                edge_correction: bool = True) -> sitk.Image:
    """Nodule density in atlas space (nodules per mL per scan) on ``atlas_reference``'s grid.

    ``atlas_points_lps``: (N, 3) atlas LPS mm; ``lung_mask``: atlas lung mask
    (image on the same grid, or its numpy array) for edge correction and to zero
    the map outside the lungs; ``n_scans``: number of scans the points come from
    (including scans with no nodule).
    """
    counts, _ = splat_counts(atlas_points_lps, atlas_reference, weights)
    mask = sitk.GetArrayViewFromImage(lung_mask) > 0 if isinstance(lung_mask, sitk.Image) else lung_mask
    return to_image(density_array(counts, atlas_reference, bandwidth_mm, n_scans=n_scans, lung_mask=mask,
                                  edge_correction=edge_correction), atlas_reference)


def integral(density: sitk.Image) -> float:
    """Sum of a density map times voxel volume: nodules per scan in the map."""
    return float(sitk.GetArrayViewFromImage(density).sum(dtype=np.float64) * voxel_volume_ml(density))
