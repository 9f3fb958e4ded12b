"""SimpleITK <-> ITK (Python ``itk`` package) conversion: images and transforms, in one place.

The core works with SimpleITK; uniGradICON's wrapper speaks ``itk``. Geometry
(origin, spacing, direction; LPS mm) is copied exactly; pixel data go through numpy.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk


def sitk_to_itk(image: sitk.Image, pixel_type=np.float32):
    """A scalar SimpleITK image as an ``itk.Image`` of ``pixel_type`` with the same geometry."""
    import itk

    array = sitk.GetArrayFromImage(image).astype(pixel_type, copy=False)
    out = itk.image_from_array(np.ascontiguousarray(array))
    out.SetOrigin([float(v) for v in image.GetOrigin()])
    out.SetSpacing([float(v) for v in image.GetSpacing()])
    out.SetDirection(itk.matrix_from_array(np.array(image.GetDirection(), float).reshape(3, 3)))
    return out


def itk_to_sitk(image) -> sitk.Image:
    """An ``itk.Image`` (scalar or vector) as a SimpleITK image with the same geometry."""
    import itk

    array = itk.array_from_image(image)
    is_vector = array.ndim == 4
    out = sitk.GetImageFromArray(array, isVector=is_vector)
    out.SetOrigin(tuple(float(v) for v in image.GetOrigin()))
    out.SetSpacing(tuple(float(v) for v in image.GetSpacing()))
    out.SetDirection(tuple(float(v) for v in np.asarray(itk.array_from_matrix(image.GetDirection())).ravel()))
    return out


def itk_transform_to_displacement_field(transform, reference: sitk.Image) -> sitk.Image:
    """An ``itk`` transform (e.g. uniGradICON's composite) sampled on ``reference``'s grid
    as a SimpleITK displacement field (VectorFloat64, LPS mm)."""
    import itk

    vector = itk.Vector[itk.F, 3]
    field_type = itk.Image[vector, 3]
    reference_itk = sitk_to_itk(_empty_like(reference), np.float32)
    make_field = itk.TransformToDisplacementFieldFilter[field_type, itk.D].New()
    make_field.SetTransform(transform)
    make_field.UseReferenceImageOn()
    make_field.SetReferenceImage(reference_itk)
    make_field.Update()
    return sitk.Cast(itk_to_sitk(make_field.GetOutput()), sitk.sitkVectorFloat64)


def _empty_like(reference: sitk.Image) -> sitk.Image:
    image = sitk.Image(reference.GetSize(), sitk.sitkFloat32)
    image.CopyInformation(reference)
    return image


def itk_transform_to_sitk(transform, reference: sitk.Image) -> sitk.DisplacementFieldTransform:
    """An ``itk`` transform as a SimpleITK displacement-field transform on ``reference``'s grid.
    Outside that grid the result is the identity, so pick the grid the transform is used on
    (the fixed grid for fixed_to_moving, the moving grid for moving_to_fixed)."""
    return sitk.DisplacementFieldTransform(itk_transform_to_displacement_field(transform, reference))
