"""CT input/output on real DICOM and NIfTI, and the errors bad input must give."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LungAtlasLib import geometry, io

pytestmark = pytest.mark.realdata


# ---------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lung1_native(lung1_dicom):
    return io.read_image(lung1_dicom)


def test_lung1_dicom_geometry_and_hu(lung1_native):
    # Published geometry of LUNG1-001 (PROVENANCE.md): 512x512x134, 0.977x0.977x3 mm.
    assert lung1_native.GetSize() == (512, 512, 134)
    np.testing.assert_allclose(lung1_native.GetSpacing(), (0.9765625, 0.9765625, 3.0), atol=1e-3)
    array = sitk.GetArrayViewFromImage(lung1_native)
    # Rescale slope/intercept applied: outside-body air near -1000 HU (stored values are 0-based
    # unsigned with intercept -1024), soft tissue around 0-100 HU.
    assert np.percentile(array, 5) == pytest.approx(-1000, abs=40)
    assert array.min() >= -1100
    assert -150 < np.median(array[array > -300]) < 150


def test_lung1_dicom_matches_resampled_nifti(lung1_native, ct_data):
    reference = io.read_image(ct_data / "nsclc-lung1-001" / "lung1-001_ct_2mm.nii.gz")
    resampled = geometry.resample_to(lung1_native, reference)
    ours = sitk.GetArrayFromImage(resampled).astype(np.float32)
    theirs = sitk.GetArrayFromImage(reference).astype(np.float32)
    body = theirs > -500
    assert body.sum() > 1e6  # the body really is in the comparison
    # Same physical space and HU: mean absolute difference inside the body under 5 HU.
    assert np.abs(ours - theirs)[body].mean() < 5.0


def test_flipped_direction_round_trips_through_reorientation(ct_data):
    original = io.read_image(ct_data / "totalsegmentator-example" / "example_ct.nii.gz")
    # This file's direction has flipped x and y axes (PROVENANCE.md).
    assert np.allclose(original.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    canonical, code = io.to_canonical(original)
    assert np.allclose(canonical.GetDirection(), np.eye(3).ravel())
    # The same voxel sits at the same physical point before and after reorientation.
    corner_before = original.TransformIndexToPhysicalPoint((0, 0, 0))
    last = [s - 1 for s in canonical.GetSize()]
    corner_after = canonical.TransformIndexToPhysicalPoint((last[0], last[1], 0))
    np.testing.assert_allclose(corner_before, corner_after, atol=1e-6)
    back = io.from_canonical(canonical, code)
    assert back.GetDirection() == original.GetDirection()
    assert back.GetOrigin() == original.GetOrigin()
    assert back.GetSpacing() == original.GetSpacing()
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(original))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_read_round_trip_keeps_geometry(ct_data, tmp_path, suffix):
    image = io.read_image(ct_data / "totalsegmentator-example" / "example_ct.nii.gz")
    path = io.write_image(image, tmp_path / f"ct{suffix}")
    again = io.read_image(path)
    np.testing.assert_allclose(again.GetOrigin(), image.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(again.GetSpacing(), image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(again.GetDirection(), image.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(image))
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file left behind"


# ---------------------------------------------------------------------------
# DICOM folders built from real slices
# ---------------------------------------------------------------------------
def _sorted_slices(folder: Path) -> list[Path]:
    files = sorted(folder.iterdir())
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


@pytest.fixture(scope="module")
def lung1_slices(lung1_dicom):
    return _sorted_slices(lung1_dicom)[60:70]  # ten consecutive slices, 3 mm apart


def _copy(files, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def test_two_series_in_one_folder_are_listed_and_chosen(lung1_slices, ct_data, tmp_path):
    folder = _copy(lung1_slices, tmp_path / "mixed")
    _copy(sorted((ct_data / "totalsegmentator-example" / "example_ct_dicom").iterdir()), folder)
    series = io.list_dicom_series(folder)
    assert sorted(s.n_slices for s in series) == [10, 20]
    with pytest.raises(io.ImageInputError, match="2 DICOM series found, choose one"):
        io.read_image(folder)
    lung = next(s for s in series if s.n_slices == 10)
    image = io.read_image(folder, series_uid=lung.series_uid)
    assert image.GetSize() == (512, 512, 10)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan")
    with pytest.raises(io.ImageInputError, match="no DICOM series found") as error:
        io.read_image(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "ct.nii.gz"
    with pytest.raises(io.ImageInputError, match="does not exist") as error:
        io.read_image(missing)
    assert str(missing) in str(error.value)


def test_truncated_dicom_file_is_named(lung1_slices, tmp_path):
    folder = _copy(lung1_slices, tmp_path / "truncated")
    victim = folder / lung1_slices[4].name
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])  # pixel data cut in half
    with pytest.raises(io.ImageInputError) as error:
        io.read_image(folder)
    assert victim.name in str(error.value)


def test_non_ct_modality_is_refused(lung1_slices, tmp_path):
    folder = _copy(lung1_slices, tmp_path / "mr")
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    with pytest.raises(io.ImageInputError, match="modality is MR, not CT"):
        io.read_image(folder)


def test_missing_slice_is_reported(lung1_slices, tmp_path):
    folder = _copy(lung1_slices[:5] + lung1_slices[6:], tmp_path / "gap")
    with pytest.raises(io.ImageInputError, match="a missing slice: gap of 6.000 mm"):
        io.read_image(folder)


def test_uneven_spacing_is_reported(lung1_slices, tmp_path):
    folder = _copy(lung1_slices, tmp_path / "uneven")
    ds = pydicom.dcmread(folder / lung1_slices[3].name)
    position = [float(v) for v in ds.ImagePositionPatient]
    position[2] += 1.0  # one slice 1 mm off its place: gaps of 4 and 2 mm around it
    ds.ImagePositionPatient = position
    ds.save_as(folder / lung1_slices[3].name)
    with pytest.raises(io.ImageInputError, match="a missing slice|uneven slice spacing"):
        io.read_image(folder)


# ---------------------------------------------------------------------------
# Bad image files
# ---------------------------------------------------------------------------
def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(path))
    with pytest.raises(io.ImageInputError, match="2D image; a 3D volume is needed") as error:
        io.read_image(path)
    assert str(path) in str(error.value)


def test_nifti_with_nan_is_refused(tmp_path):
    array = np.full((8, 9, 10), -800.0, np.float32)
    array[4, 4, 4] = np.nan
    path = tmp_path / "nan.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(io.ImageInputError, match="contains 1 NaN or infinite voxel values"):
        io.read_image(path)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(io.ImageInputError, match="cannot be read as an image") as error:
        io.read_image(path)
    assert str(path) in str(error.value)


def test_label_map_must_hold_integers(tmp_path):
    path = tmp_path / "soft.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.full((4, 4, 4), 0.5, np.float32)), str(path))
    with pytest.raises(io.ImageInputError, match="not a label map"):
        io.read_label_map(path)
