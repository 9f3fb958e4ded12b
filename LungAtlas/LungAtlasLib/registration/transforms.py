"""Transforms: the one place that stores, reads, composes, inverts-by-name and applies them.

Directions (see :mod:`.base`), with fixed = atlas and moving = patient:

* ``fixed_to_moving`` maps a fixed-space point (LPS mm) to the moving-space
  point that lands there; ITK's resampler needs exactly this to pull a moving
  image onto the fixed grid (:func:`warp_image`, :func:`warp_labels`).
* ``moving_to_fixed`` maps moving-space points (nodule centres, LPS mm) into
  fixed space (:func:`warp_points`).

Files (names say the direction): ``fixed_to_moving.h5`` and
``moving_to_fixed.h5`` are ITK transform files (composite transforms of an
affine and a displacement field) that Slicer loads as transforms; optional
``*_displacement.nii.gz`` files are the same maps sampled as ITK displacement
fields (vector images, LPS mm), which Slicer loads as grid transforms.
A displacement field stores ``u(x)`` with ``T(x) = x + u(x)``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..geometry import AIR_HU
from ..metrics import displacement_field_statistics
from .base import RegistrationResult

FIXED_TO_MOVING = "fixed_to_moving"
MOVING_TO_FIXED = "moving_to_fixed"
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
FIELD_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _is_field_path(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in FIELD_SUFFIXES)


def read_transform(path: str | Path) -> sitk.Transform:
    """An ITK transform file (.h5/.tfm/.txt/.mat) or a displacement field image (.nii.gz, .nrrd, .mha)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"transform file {path} does not exist")
    try:
        if _is_field_path(path):
            field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
            if field.GetNumberOfComponentsPerPixel() != 3:
                raise ValueError(f"{path}: a displacement field needs 3 components per voxel, "
                                 f"found {field.GetNumberOfComponentsPerPixel()}")
            return sitk.DisplacementFieldTransform(field)
        return sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable ITK transform ({str(exc).splitlines()[0]})") from None


def displacement_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """``transform`` sampled on ``reference``'s grid as a displacement field
    (VectorFloat64, components x, y, z in LPS mm): u(x) = T(x) - x."""
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                             reference.GetOrigin(), reference.GetSpacing(),
                                             reference.GetDirection())


def write_transform(transform: sitk.Transform, path: str | Path, reference: sitk.Image | None = None) -> Path:
    """Write an ITK transform file, or (image suffix) the transform sampled as a
    displacement field on ``reference``'s grid, stored as float32 (Slicer grid transform)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    if _is_field_path(path):
        if reference is None:
            raise ValueError(f"{path}: writing a displacement field needs a reference grid")
        field = sitk.Cast(displacement_field(transform, reference), sitk.sitkVectorFloat32)
        sitk.WriteImage(field, str(tmp), True)
    elif path.suffix.lower() in TRANSFORM_SUFFIXES:
        sitk.WriteTransform(transform, str(tmp))
    else:
        raise ValueError(f"{path}: unknown transform file type; use one of {TRANSFORM_SUFFIXES + FIELD_SUFFIXES}")
    tmp.replace(path)  # atomic: a reader never sees half a transform
    return path


def compose(*transforms: sitk.Transform) -> sitk.CompositeTransform:
    """One transform applying ``transforms`` in the order given:
    ``compose(a, b).TransformPoint(p) == b.TransformPoint(a.TransformPoint(p))``.

    (SimpleITK's CompositeTransform applies its list last-first; this hides that.)
    Example: an atlas -> case A map after a case A -> case B map is
    ``compose(atlas_to_a, a_to_b)``.
    """
    if not transforms:
        return sitk.CompositeTransform(3)
    return sitk.CompositeTransform([sitk.Transform(t) for t in reversed(transforms)])


def warp_image(moving: sitk.Image, reference: sitk.Image, fixed_to_moving: sitk.Transform,
               default_value: float = AIR_HU, pixel_type: int | None = None) -> sitk.Image:
    """Moving intensities (HU) resampled onto ``reference``'s grid, trilinear; outside the
    moving field of view: ``default_value`` (air)."""
    return sitk.Resample(moving, reference, fixed_to_moving, sitk.sitkLinear, float(default_value),
                         moving.GetPixelID() if pixel_type is None else pixel_type)


def warp_labels(labels: sitk.Image, reference: sitk.Image, fixed_to_moving: sitk.Transform,
                mode: str = "nearest") -> sitk.Image:
    """A label map resampled onto ``reference``'s grid (UInt8 out).

    ``mode="nearest"``: nearest neighbour (fast; staircase edges when the grids differ).
    ``mode="labelwise"``: each label's indicator (background included) is resampled
    linearly and each voxel takes the label with the largest value (ties keep the
    lower label): smoother boundaries than nearest neighbour when grids differ.
    """
    if mode == "nearest":
        out = sitk.Resample(labels, reference, fixed_to_moving, sitk.sitkNearestNeighbor, 0.0, labels.GetPixelID())
        return sitk.Cast(out, sitk.sitkUInt8)
    if mode != "labelwise":
        raise ValueError(f"label warping mode must be 'nearest' or 'labelwise', not {mode!r}")
    array = sitk.GetArrayViewFromImage(labels)
    values = [int(v) for v in np.unique(array)]
    if 0 not in values:
        values = [0] + values
    best = None
    out = None
    for value in values:
        indicator = sitk.Cast(labels == value, sitk.sitkFloat32)
        # background is 1 outside the moving field of view, the labels 0
        warped = sitk.Resample(indicator, reference, fixed_to_moving, sitk.sitkLinear,
                               1.0 if value == 0 else 0.0, sitk.sitkFloat32)
        warped_array = sitk.GetArrayFromImage(warped)
        if best is None:
            best = warped_array
            out = np.full(warped_array.shape, value, np.uint8)
        else:
            better = warped_array > best
            best = np.where(better, warped_array, best)
            out[better] = value
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image


def warp_points(points_lps, moving_to_fixed: sitk.Transform) -> np.ndarray:
    """(N, 3) or (3,) moving-space points (LPS mm) -> fixed-space points (LPS mm)."""
    points = np.asarray(points_lps, float)
    single = points.ndim == 1
    points = points.reshape(-1, 3)
    out = np.array([moving_to_fixed.TransformPoint(tuple(float(c) for c in p)) for p in points]).reshape(-1, 3)
    return out[0] if single else out


def jacobian_statistics(transform: sitk.Transform, reference: sitk.Image, mask: sitk.Image | None = None) -> dict:
    """Folding and smoothness of ``transform`` on ``reference``'s grid (optionally inside
    ``mask``, on the same grid): % of voxels with Jacobian <= 0, std of log J, range."""
    return displacement_field_statistics(displacement_field(transform, reference), mask)


def save_result(result: RegistrationResult, folder: str | Path, fixed: sitk.Image | None = None,
                moving: sitk.Image | None = None) -> dict[str, str]:
    """Write ``fixed_to_moving.h5`` and ``moving_to_fixed.h5`` into ``folder``; with
    ``fixed``/``moving`` grids also ``fixed_to_moving_displacement.nii.gz`` (on the fixed
    grid) and ``moving_to_fixed_displacement.nii.gz`` (on the moving grid). Returns the paths."""
    folder = Path(folder)
    paths = {
        FIXED_TO_MOVING: write_transform(result.fixed_to_moving, folder / f"{FIXED_TO_MOVING}.h5"),
        MOVING_TO_FIXED: write_transform(result.moving_to_fixed, folder / f"{MOVING_TO_FIXED}.h5"),
    }
    if fixed is not None:
        paths[f"{FIXED_TO_MOVING}_displacement"] = write_transform(
            result.fixed_to_moving, folder / f"{FIXED_TO_MOVING}_displacement.nii.gz", fixed)
    if moving is not None:
        paths[f"{MOVING_TO_FIXED}_displacement"] = write_transform(
            result.moving_to_fixed, folder / f"{MOVING_TO_FIXED}_displacement.nii.gz", moving)
    return {k: str(v) for k, v in paths.items()}


def load_result(folder: str | Path, backend: str = "stored") -> RegistrationResult:
    """Read back the pair written by :func:`save_result`."""
    folder = Path(folder)
    return RegistrationResult(read_transform(folder / f"{FIXED_TO_MOVING}.h5"),
                              read_transform(folder / f"{MOVING_TO_FIXED}.h5"), backend,
                              {"folder": str(folder)})
