"""Nodules into atlas space: points through the patient -> atlas transform, masks by nearest neighbour.

Direction (registration/base.py): with fixed = atlas and moving = patient,
``RegistrationResult.moving_to_fixed`` carries patient points into the atlas and
``fixed_to_moving`` is what the resampler needs to pull a patient image (or a
nodule mask) onto the atlas grid. Points and images therefore use OPPOSITE
transforms; mixing them up moves every nodule by twice the displacement.

A displacement-field transform is zero outside its field, so a point outside the
field would silently not move: such points are reported
(``outside_transform_domain``), as are points that land outside the atlas image
or away from the atlas lungs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from ..geometry import physical_to_index, resample_to
from ..labels import LABELS

DEFAULT_LUNG_MARGIN_MM = 5.0


def _flatten(transform: sitk.Transform) -> list[sitk.Transform]:
    """Sub-transforms in the order they act on a point (a CompositeTransform applies its
    last-added transform first)."""
    if isinstance(transform, sitk.CompositeTransform) or transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        parts = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
        return [leaf for part in reversed(parts) for leaf in _flatten(part)]
    return [transform]


def _field_bounds(transform: sitk.Transform):
    """(lower, upper) LPS corners of a displacement field's voxel centres, or None.

    Read from the transform's fixed parameters (size, origin, spacing, direction),
    not from a copy of the field, which can be hundreds of MB at 1 mm."""
    if transform.GetName() != "DisplacementFieldTransform":
        return None
    fixed = np.array(transform.GetFixedParameters(), float)
    size, origin, spacing = fixed[0:3], fixed[3:6], fixed[6:9]
    direction = fixed[9:18].reshape(3, 3)
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    physical = origin + (corners * spacing) @ direction.T
    tolerance = 1e-3 * spacing.min()
    return physical.min(axis=0) - tolerance, physical.max(axis=0) + tolerance


def map_points(points_lps, moving_to_fixed: sitk.Transform) -> tuple[np.ndarray, np.ndarray]:
    """Map (N, 3) patient LPS points (mm) into the atlas (LPS mm).

    ``moving_to_fixed``: the transform that maps patient points to atlas points
    (``RegistrationResult.moving_to_fixed`` with fixed = atlas; for a displacement
    field u on the patient grid, atlas = p + u(p)).

    Returns ``(atlas_points, inside_domain)``: ``inside_domain[i]`` is False when
    point i passed through a displacement field outside that field's extent (ITK
    then moves it by nothing); its mapped coordinates are NaN.
    """
    points = np.atleast_2d(np.asarray(points_lps, float))
    if points.shape[1:] != (3,):
        raise ValueError(f"points must be (N, 3) LPS mm, got shape {points.shape}")
    current = points.copy()
    inside = np.isfinite(points).all(axis=1)
    for part in _flatten(moving_to_fixed):
        bounds = _field_bounds(part)
        if bounds is not None:
            inside &= np.all((current >= bounds[0]) & (current <= bounds[1]), axis=1)
        current = np.array([part.TransformPoint(tuple(p)) if ok else (np.nan,) * 3
                            for p, ok in zip(current, inside)], float).reshape(-1, 3)
    current[~inside] = np.nan
    return current, inside


def warp_mask(mask: sitk.Image, fixed_to_moving: sitk.Transform, atlas_reference: sitk.Image) -> sitk.Image:
    """A patient nodule (or lobe) label map on the atlas grid, nearest neighbour so labels stay labels.

    ``fixed_to_moving`` maps atlas points to patient points (ITK resampling
    direction: for every atlas voxel, where to read in the patient mask)."""
    return resample_to(mask, atlas_reference, is_label=True, transform=fixed_to_moving, default_value=0)


class AtlasLobeLookup:
    """Atlas lobe of an atlas LPS point: the lobe label at that voxel, or the nearest
    lobe within ``margin_mm`` for points just outside the lungs (juxtapleural nodules
    and registration error put true lung nodules a few mm outside the template's lungs).
    """

    def __init__(self, atlas_labels: sitk.Image, margin_mm: float = DEFAULT_LUNG_MARGIN_MM):
        self.image = atlas_labels
        self.labels = sitk.GetArrayFromImage(atlas_labels)
        self.margin_mm = float(margin_mm)
        spacing_zyx = atlas_labels.GetSpacing()[::-1]
        self.distance_mm, nearest = ndimage.distance_transform_edt(
            self.labels == 0, sampling=spacing_zyx, return_indices=True)
        self.nearest_label = self.labels[tuple(nearest)]

    def lookup(self, atlas_points_lps) -> tuple[np.ndarray, np.ndarray]:
        """(lobe values, status strings) per point: ``ok`` (lobe 1-5), ``outside_atlas_image``
        or ``outside_atlas_lung`` (lobe 0)."""
        points = np.atleast_2d(np.asarray(atlas_points_lps, float))
        lobes = np.zeros(len(points), np.int16)
        status = np.full(len(points), "ok", dtype=object)
        finite = np.isfinite(points).all(axis=1)
        index = np.full((len(points), 3), -1, int)
        if finite.any():
            index[finite] = np.round(physical_to_index(self.image, points[finite])).astype(int)
        shape = np.array(self.labels.shape)
        in_image = finite & np.all((index >= 0) & (index < shape), axis=1)
        status[~in_image] = "outside_atlas_image"
        z, y, x = index[in_image].T
        near = self.distance_mm[z, y, x] <= self.margin_mm
        found = np.where(near, self.nearest_label[z, y, x], 0)
        lobes[in_image] = found
        status[np.flatnonzero(in_image)[found == 0]] = "outside_atlas_lung"
        return lobes, status


def inside_image(points_lps, image: sitk.Image, margin_voxels: float = 0.5) -> np.ndarray:
    """True for LPS points within ``image``'s field of view (voxel centres +- half a voxel)."""
    points = np.atleast_2d(np.asarray(points_lps, float))
    if len(points) == 0:
        return np.zeros(0, bool)
    index = physical_to_index(image, points)
    upper = np.array(image.GetSize()[::-1]) - 1
    return np.isfinite(index).all(axis=1) & np.all((index >= -margin_voxels) & (index <= upper + margin_voxels),
                                                   axis=1)


def map_nodules(nodules: pd.DataFrame, transforms: dict, atlas_labels: sitk.Image, *,
                lung_margin_mm: float = DEFAULT_LUNG_MARGIN_MM, patient_images: dict | None = None) -> pd.DataFrame:
    """Map a nodule table (:mod:`.inputs` format) into the atlas.

    ``transforms``: case_id -> patient-to-atlas point transform (moving_to_fixed).
    Adds ``atlas_x_lps, atlas_y_lps, atlas_z_lps`` (mm) and ``atlas_lobe`` (label
    table value at the mapped point; nearest lobe within ``lung_margin_mm``; the
    lobe recorded by the reader, e.g. NLST's, stays in ``recorded_lobe``) and
    updates ``status`` of usable rows to ``no_registration``, ``outside_patient_image``
    (when ``patient_images``, case_id -> the scan's CT or any image on its grid, is
    given), ``outside_transform_domain``, ``outside_atlas_image`` or ``outside_atlas_lung``
    when they apply. Every row is kept: participant, screen year, size and
    attenuation travel along.
    """
    out = nodules.copy()
    for column in ("atlas_x_lps", "atlas_y_lps", "atlas_z_lps"):
        out[column] = np.nan
    out["atlas_lobe"] = 0
    out["status"] = out["status"].astype(object)
    out["note"] = out["note"].astype(object) if "note" in out else ""
    lookup = AtlasLobeLookup(atlas_labels, lung_margin_mm)
    usable = out["status"] == "ok"
    for case_id, rows in out[usable].groupby("case_id", sort=False):
        transform = transforms.get(case_id)
        if transform is None:
            out.loc[rows.index, "status"] = "no_registration"
            out.loc[rows.index, "note"] = f"no patient-to-atlas transform for case {case_id}"
            continue
        points = rows[["x_lps", "y_lps", "z_lps"]].to_numpy(float)
        mapped, inside = map_points(points, transform)
        in_patient = np.ones(len(points), bool)
        if patient_images is not None and patient_images.get(case_id) is not None:
            in_patient = inside_image(points, patient_images[case_id])
        mapped[~in_patient] = np.nan
        out.loc[rows.index, ["atlas_x_lps", "atlas_y_lps", "atlas_z_lps"]] = mapped
        lobes, status = lookup.lookup(mapped)
        status[~inside] = "outside_transform_domain"
        status[~in_patient] = "outside_patient_image"
        lobes[~inside | ~in_patient] = 0
        out.loc[rows.index, "atlas_lobe"] = lobes
        out.loc[rows.index, "status"] = status
    out["atlas_lobe"] = out["atlas_lobe"].astype(int)
    return out


def atlas_points(mapped: pd.DataFrame) -> np.ndarray:
    """(N, 3) atlas LPS points of the usable rows of a mapped table."""
    return mapped.loc[mapped["status"] == "ok", ["atlas_x_lps", "atlas_y_lps", "atlas_z_lps"]].to_numpy(float)


def lobe_name(value: int) -> str:
    return LABELS.lobe(int(value)).key if int(value) in LABELS.lobe_values else "none"
