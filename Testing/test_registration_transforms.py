"""Transform helpers: direction conventions, composition, file round trips, warping, Jacobians."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib.registration import RegistrationResult
from LungAtlasLib.registration import transforms as T


def _grid(size=(20, 18, 16), spacing=(2.0, 2.0, 3.0), origin=(-10.0, 5.0, 20.0)):
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _block(reference, lo, hi, value=1):
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.uint8)
    array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def test_compose_applies_in_the_order_given():
    shift = sitk.TranslationTransform(3, (1.0, 0.0, 0.0))
    scale = sitk.ScaleTransform(3, (2.0, 2.0, 2.0))
    # shift first: (1,1,1) -> (2,1,1) -> scaled (4,2,2); scale first would give (3,2,2)
    assert np.allclose(T.compose(shift, scale).TransformPoint((1.0, 1.0, 1.0)), (4.0, 2.0, 2.0))
    assert np.allclose(T.compose(scale, shift).TransformPoint((1.0, 1.0, 1.0)), (3.0, 2.0, 2.0))


def test_warp_image_labels_points_follow_one_translation():
    grid = _grid()
    labels = _block(grid, (4, 5, 6), (8, 10, 12), 3)
    # fixed_to_moving(x) = x + (4, 0, 0) mm: content appears 4 mm = 2 voxels further -x on the fixed grid
    f2m = sitk.TranslationTransform(3, (4.0, 0.0, 0.0))
    warped = sitk.GetArrayFromImage(T.warp_labels(labels, grid, f2m))
    assert warped[4:8, 5:10, 4:10].all() and warped.sum() == sitk.GetArrayViewFromImage(labels).sum()
    labelwise = sitk.GetArrayFromImage(T.warp_labels(labels, grid, f2m, mode="labelwise"))
    assert np.array_equal(labelwise, warped)  # a whole-voxel shift: both modes agree exactly
    # points travel the other way, through moving_to_fixed = inverse
    point = T.warp_points([1.0, 2.0, 3.0], f2m.GetInverse())
    assert np.allclose(point, (-3.0, 2.0, 3.0))


def test_files_round_trip_and_displacement_field(tmp_path):
    grid = _grid()
    field = sitk.Image(grid.GetSize(), sitk.sitkVectorFloat64)
    field.CopyInformation(grid)
    array = sitk.GetArrayFromImage(field)
    array[..., 1] = 2.5  # +2.5 mm along y everywhere
    field = sitk.GetImageFromArray(array, isVector=True)
    field.CopyInformation(grid)
    f2m = T.compose(sitk.DisplacementFieldTransform(field), sitk.TranslationTransform(3, (1.0, 0.0, 0.0)))
    result = RegistrationResult(f2m, sitk.TranslationTransform(3, (-1.0, -2.5, 0.0)),
                                "test")
    paths = T.save_result(result, tmp_path, fixed=grid, moving=grid)
    assert {"fixed_to_moving", "moving_to_fixed", "fixed_to_moving_displacement"} <= set(paths)
    back = T.load_result(tmp_path)
    centre = grid.TransformContinuousIndexToPhysicalPoint((9.5, 8.5, 7.5))
    expected = np.array(centre) + (1.0, 2.5, 0.0)
    assert np.allclose(back.fixed_to_moving.TransformPoint(centre), expected, atol=1e-6)
    from_field = T.read_transform(tmp_path / "fixed_to_moving_displacement.nii.gz")
    assert np.allclose(from_field.TransformPoint(centre), expected, atol=1e-4)  # float32 storage
    u = sitk.GetArrayFromImage(T.displacement_field(back.fixed_to_moving, grid))
    assert np.allclose(u[..., 0], 1.0) and np.allclose(u[..., 1], 2.5)
    # a pure translation neither folds nor changes volume: J == 1 everywhere
    stats = T.jacobian_statistics(back.fixed_to_moving, grid)
    assert stats["jacobian_nonpositive_percent"] == 0.0
    assert abs(stats["jacobian_min"] - 1.0) < 1e-6 and abs(stats["jacobian_max"] - 1.0) < 1e-6


def test_unreadable_transform_names_the_file(tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_text("not hdf5")
    with pytest.raises(ValueError, match="broken.h5"):
        T.read_transform(bad)
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        T.read_transform(tmp_path / "missing.h5")
