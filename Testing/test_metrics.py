"""Alignment metrics against hand-computed values."""
import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import metrics


def test_dice_binary_half_overlap():
    a = np.array([1, 1, 0, 0], bool)
    b = np.array([1, 0, 1, 0], bool)
    assert metrics.dice(a, b) == pytest.approx(0.5)  # 2*1 / (2 + 2)


def test_dice_per_label_and_whole_lung():
    ref = np.zeros((2, 2, 4), np.uint8)
    test = np.zeros_like(ref)
    ref[0] = 1            # 8 voxels of lobe 1
    ref[1, :, :2] = 2     # 4 voxels of lobe 2
    test[0, :, :2] = 1    # 4 voxels of lobe 1, all inside ref lobe 1
    test[0, :, 2:] = 2    # 4 voxels of lobe 2, all inside ref lobe 1 (wrong lobe)
    test[1, :, :2] = 2    # 4 voxels of lobe 2, matching
    d = metrics.dice_per_label(ref, test, labels=(1, 2))
    assert d[1] == pytest.approx(2 * 4 / (8 + 4))   # 0.667
    assert d[2] == pytest.approx(2 * 4 / (4 + 8))   # 0.667
    assert d["lung"] == pytest.approx(1.0)          # the union agrees exactly
    assert np.isnan(metrics.dice_per_label(ref, test, labels=(1, 2, 3))[3])  # absent from both


def test_intensity_mse_window_and_mask():
    ref = np.full((2, 2, 2), -1000.0)
    test = np.zeros((2, 2, 2))
    # -1000 HU -> 0, 0 HU -> 0.5: squared difference 0.25 everywhere
    assert metrics.intensity_mse(ref, test) == pytest.approx(0.25)
    test[0] = 3000.0  # clamped to 1000 HU -> 1.0: half the voxels differ by 1
    assert metrics.intensity_mse(ref, test) == pytest.approx((4 * 1.0 + 4 * 0.25) / 8)
    mask = np.zeros((2, 2, 2), bool)
    mask[1] = True
    assert metrics.intensity_mse(ref, test, mask) == pytest.approx(0.25)
    assert np.isnan(metrics.intensity_mse(ref, test, np.zeros_like(mask)))


def test_relative_volume_difference():
    ref = np.zeros(20, np.uint8)
    test = np.zeros(20, np.uint8)
    ref[:10] = 1
    test[:12] = 1
    ref[10:15] = 2
    test[12:16] = 2
    rvd = metrics.relative_volume_difference(ref, test, labels=(1, 2))
    assert rvd[1] == pytest.approx(0.2)    # |12 - 10| / 10
    assert rvd[2] == pytest.approx(0.2)    # |4 - 5| / 5
    assert rvd["lung"] == pytest.approx(1 / 15)  # |16 - 15| / 15


def test_hausdorff95_in_millimetres_with_anisotropic_spacing():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros_like(a)
    a[2, 5, 2] = True
    b[5, 5, 6] = True
    # 3 voxels apart in z at 2.5 mm and 4 voxels in x at 0.5 mm: sqrt(7.5^2 + 2^2)
    assert metrics.hausdorff95(a, b, (2.5, 1.0, 0.5)) == pytest.approx(np.hypot(7.5, 2.0))
    assert metrics.hausdorff95(a, a, (2.5, 1.0, 0.5)) == 0.0
    assert np.isnan(metrics.hausdorff95(a, np.zeros_like(a), (1, 1, 1)))


def test_hausdorff95_of_shifted_cube():
    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    b = np.roll(a, 2, axis=2)
    # Every face point moves 2 voxels (2 mm) or less; the 95th percentile is the full shift.
    assert metrics.hausdorff95(a, b, (1.0, 1.0, 1.0)) == pytest.approx(2.0)


def _field(shape, spacing_zyx, fn):
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing_zyx)), indexing="ij")
    u = np.zeros(shape + (3,))
    u[..., 0] = fn(x)
    return u


def test_jacobian_of_identity_stretch_and_fold():
    spacing = (2.0, 1.5, 0.5)
    zero = np.zeros((6, 7, 8, 3))
    stats = metrics.jacobian_statistics(zero, spacing)
    assert stats["jacobian_nonpositive_percent"] == 0.0 and stats["jacobian_log_std"] == 0.0
    # u_x = 0.1 x (x in mm): J = 1.1 everywhere, whatever the spacing
    stretch = _field((6, 7, 8), spacing, lambda x: 0.1 * x)
    np.testing.assert_allclose(metrics.jacobian_determinant(stretch, spacing), 1.1)
    # u_x = -2 x: x -> -x, a full fold, J = -1
    fold = _field((6, 7, 8), spacing, lambda x: -2.0 * x)
    assert metrics.jacobian_statistics(fold, spacing)["jacobian_nonpositive_percent"] == 100.0


def test_jacobian_respects_the_direction_matrix():
    # Grid with a flipped x axis: physical x = -i * 0.5. u_x = 0.1 * physical x still gives J = 1.1.
    shape, spacing = (4, 5, 6), (1.0, 1.0, 0.5)
    i = np.arange(shape[2]) * spacing[2]
    u = np.zeros(shape + (3,))
    u[..., 0] = 0.1 * (-i)[None, None, :]
    direction = np.diag([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(metrics.jacobian_determinant(u, spacing, direction), 1.1)


def test_displacement_field_statistics_on_sitk_field():
    u = _field((5, 5, 5), (1, 1, 1), lambda x: 0.2 * x)
    field = sitk.GetImageFromArray(u, isVector=True)
    stats = metrics.displacement_field_statistics(field)
    assert stats["jacobian_min"] == pytest.approx(1.2) and stats["jacobian_log_std"] == pytest.approx(0.0, abs=1e-12)


def test_alignment_metrics_rows():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:5, 2:8, 2:8] = 1
    labels[5:8, 2:8, 2:8] = 4
    fixed = sitk.GetImageFromArray(labels)
    ct = sitk.GetImageFromArray(np.where(labels > 0, -850, 40).astype(np.int16))
    rows = metrics.alignment_metrics(fixed, fixed, ct, ct)
    by_region = {r["region"]: r for r in rows}
    assert set(by_region) == {"right_upper", "left_upper", "lung", "image", "lung_intensity"}
    assert by_region["lung"]["dice"] == 1.0 and by_region["lung"]["hausdorff95_mm"] == 0.0
    assert by_region["right_upper"]["relative_volume_difference"] == 0.0
    assert by_region["image"]["mse"] == 0.0


def _hd95_by_distance_maps(a, b, spacing):
    """Independent reference: surfaces by erosion, distances by Euclidean distance transforms."""
    from scipy import ndimage
    structure = ndimage.generate_binary_structure(3, 1)
    sa = a & ~ndimage.binary_erosion(a, structure, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, structure, border_value=0)
    da = ndimage.distance_transform_edt(~sa, sampling=spacing)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing)
    return np.percentile(np.concatenate([da[sb], db[sa]]), 95)


def test_region_surfaces_agree_with_distance_map_reference():
    rng = np.random.default_rng(0)
    from scipy import ndimage
    noise = ndimage.gaussian_filter(rng.standard_normal((30, 40, 50)), 3)
    ref = np.digitize(noise, [-0.05, 0.0, 0.05]).astype(np.uint8)   # labels 0-3, touching each other
    test = np.roll(ref, (1, -2, 3), axis=(0, 1, 2))
    spacing = (2.5, 0.8, 0.8)
    rows = {r["region"]: r for r in metrics.alignment_metrics(
        _with_spacing(sitk.GetImageFromArray(ref), spacing), _with_spacing(sitk.GetImageFromArray(test), spacing),
        labels=(1, 2, 3))}
    for label, key in ((1, "right_upper"), (2, "right_middle"), (3, "right_lower")):
        expected = _hd95_by_distance_maps(ref == label, test == label, spacing)
        assert rows[key]["hausdorff95_mm"] == pytest.approx(expected)
        assert metrics.hausdorff95(ref == label, test == label, spacing) == pytest.approx(expected)
    assert rows["lung"]["hausdorff95_mm"] == pytest.approx(_hd95_by_distance_maps(ref > 0, test > 0, spacing))


def _with_spacing(image, spacing_zyx):
    image.SetSpacing(spacing_zyx[::-1])
    return image
