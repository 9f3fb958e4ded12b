"""Physical space: resampling onto grids, voxel volumes, and the one LPS <-> RAS conversion.

Conventions: the core works in ITK's LPS patient coordinates, millimetres.
Slicer (and its markups files) use RAS; :func:`lps_to_ras` / :func:`ras_to_lps`
are the only place where the sign flip lives.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

# Slicer's RAS and ITK's LPS differ by the sign of the first two axes.
_LPS_RAS_FLIP = np.array([-1.0, -1.0, 1.0])
AIR_HU = -1024.0


def lps_to_ras(points) -> np.ndarray:
    """(N, 3) or (3,) points in LPS mm -> RAS mm (the conversion is its own inverse)."""
    return np.asarray(points, float) * _LPS_RAS_FLIP


def ras_to_lps(points) -> np.ndarray:
    return np.asarray(points, float) * _LPS_RAS_FLIP


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """True when two images share size, origin, spacing and direction."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def resample_to(image: sitk.Image, reference: sitk.Image, *, is_label: bool = False,
                transform: sitk.Transform | None = None, default_value: float | None = None) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference``.

    Labels use nearest neighbour and keep their pixel type; intensities use
    linear interpolation and air (-1024 HU) outside the field of view.
    ``transform`` maps reference (output) points to ``image`` points, as ITK's
    resampler expects.
    """
    if default_value is None:
        default_value = 0.0 if is_label else AIR_HU
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator,
                         float(default_value), image.GetPixelID())


def isotropic_grid(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """An empty reference image covering ``image``'s extent at isotropic spacing."""
    old_spacing = np.array(image.GetSpacing())
    old_size = np.array(image.GetSize())
    new_size = np.maximum(1, np.round(old_size * old_spacing / spacing_mm)).astype(int)
    reference = sitk.Image([int(s) for s in new_size], image.GetPixelID())
    reference.SetSpacing([float(spacing_mm)] * 3)
    reference.SetDirection(image.GetDirection())
    # Keep the outer edge of the field of view: the first voxel centre moves by half the change in spacing.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    shift = direction @ ((spacing_mm - old_spacing) / 2.0)
    reference.SetOrigin(tuple(np.array(image.GetOrigin()) + shift))
    return reference


def resample_isotropic(image: sitk.Image, spacing_mm: float, is_label: bool = False) -> sitk.Image:
    return resample_to(image, isotropic_grid(image, spacing_mm), is_label=is_label)


def voxel_volume_ml(image: sitk.Image) -> float:
    """Volume of one voxel in millilitres (spacing in mm)."""
    return float(np.prod(image.GetSpacing())) / 1000.0


def index_to_physical(image: sitk.Image, indices_zyx: np.ndarray) -> np.ndarray:
    """(N, 3) numpy-order voxel indices (z, y, x; may be fractional) -> LPS mm."""
    ijk = np.asarray(indices_zyx, float)[:, ::-1]
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return np.asarray(image.GetOrigin()) + (ijk * np.asarray(image.GetSpacing())) @ direction.T


def physical_to_index(image: sitk.Image, points_lps: np.ndarray) -> np.ndarray:
    """(N, 3) LPS mm -> continuous numpy-order indices (z, y, x)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk = (np.asarray(points_lps, float) - np.asarray(image.GetOrigin())) @ direction / np.asarray(image.GetSpacing())
    return ijk[:, ::-1]


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices (numpy order) of the smallest box holding ``mask``, grown by ``margin`` voxels."""
    if not mask.any():
        raise ValueError("bounding box of an empty mask")
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(max(0, present[0] - margin), min(mask.shape[axis], present[-1] + 1 + margin)))
    return tuple(slices)


def crop(image: sitk.Image, box: tuple[slice, ...]) -> sitk.Image:
    """Crop to numpy-order slices, keeping physical geometry."""
    lower = [int(box[2].start), int(box[1].start), int(box[0].start)]
    size = [int(box[axis].stop - box[axis].start) for axis in (2, 1, 0)]
    return sitk.RegionOfInterest(image, size, lower)
