"""Physical-space helpers: the LPS/RAS flip, grids, index <-> physical, cropping."""
import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import geometry


def _image(size=(10, 12, 14), spacing=(0.8, 0.9, 2.5), origin=(-5.0, 7.0, 30.0), direction=None):
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def test_lps_ras_flip_is_its_own_inverse():
    p = np.array([[10.0, -20.0, 30.0]])
    assert geometry.lps_to_ras(p).tolist() == [[-10.0, 20.0, 30.0]]
    np.testing.assert_array_equal(geometry.ras_to_lps(geometry.lps_to_ras(p)), p)


def test_index_physical_round_trip_matches_itk():
    image = _image(direction=(0, 1, 0, -1, 0, 0, 0, 0, 1))  # rotated in-plane
    zyx = np.array([[2.0, 3.0, 4.0], [0.5, 1.5, 9.0]])
    physical = geometry.index_to_physical(image, zyx)
    expected = image.TransformContinuousIndexToPhysicalPoint((4.0, 3.0, 2.0))
    np.testing.assert_allclose(physical[0], expected)
    np.testing.assert_allclose(geometry.physical_to_index(image, physical), zyx, atol=1e-9)


def test_isotropic_grid_keeps_the_field_of_view():
    image = _image(size=(100, 100, 40), spacing=(1.0, 1.0, 2.5))
    grid = geometry.isotropic_grid(image, 2.0)
    assert grid.GetSize() == (50, 50, 50)
    # The outer corner stays put: the first voxel centre moves by half the spacing change,
    # +0.5 mm in x and y (1 -> 2 mm) and -0.25 mm in z (2.5 -> 2 mm).
    np.testing.assert_allclose(grid.GetOrigin(), np.array(image.GetOrigin()) + [0.5, 0.5, -0.25])


def test_resample_labels_nearest_and_intensities_linear():
    array = np.zeros((4, 4, 4), np.int16)
    array[:, :, 2:] = 100
    image = sitk.GetImageFromArray(array)
    half = sitk.Image((8, 4, 4), sitk.sitkInt16)
    half.SetSpacing((0.5, 1.0, 1.0))
    linear = sitk.GetArrayFromImage(geometry.resample_to(image, half))
    nearest = sitk.GetArrayFromImage(geometry.resample_to(image, half, is_label=True))
    assert linear[0, 0, 3] == 50          # halfway between voxel 1 (0) and voxel 2 (100)
    assert set(np.unique(nearest)) == {0, 100}
    assert linear[0, 0, 7] == -1024       # beyond the last voxel centre: air, not zero


def test_crop_keeps_physical_position():
    image = _image()
    mask = np.zeros(sitk.GetArrayViewFromImage(image).shape, bool)
    mask[3:5, 2:6, 4:9] = True
    box = geometry.bounding_box(mask, margin=1)
    assert box == (slice(2, 6), slice(1, 7), slice(3, 10))
    cropped = geometry.crop(image, box)
    np.testing.assert_allclose(cropped.GetOrigin(), image.TransformIndexToPhysicalPoint((3, 1, 2)))
    with pytest.raises(ValueError, match="empty mask"):
        geometry.bounding_box(np.zeros((2, 2, 2), bool))


def test_voxel_volume_in_millilitres():
    assert geometry.voxel_volume_ml(_image(spacing=(2.0, 2.0, 2.5))) == pytest.approx(0.01)
