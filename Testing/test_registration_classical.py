"""Classical backend: phantom with a known deformation (4 mm) and one real inter-subject pair (4 mm)."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib.geometry import index_to_physical
from LungAtlasLib.metrics import dice_per_label
from LungAtlasLib.registration import RegistrationError, get_registration
from LungAtlasLib.registration import transforms as T

# Small, fast settings for 4 mm images (two levels: 8 mm and 4 mm), one thread for repeatability.
FAST = dict(spacing_mm=4.0, affine_shrink=(2, 1), affine_smoothing=(1, 0), affine_iterations=(200, 100),
            demons_iterations=(200, 100), demons_shrink=(2, 1), threads=1)


@pytest.fixture(scope="module")
def phantom_result(phantom_atlas, phantom_subject):
    backend = get_registration("classical", **FAST)
    return backend.register(phantom_atlas.ct, phantom_subject.ct, fixed_labels=phantom_atlas.labels,
                            moving_labels=phantom_subject.labels)


def test_phantom_lobes_align_and_nothing_folds(phantom_atlas, phantom_subject, phantom_result):
    fixed = sitk.GetArrayFromImage(phantom_atlas.labels)
    before = dice_per_label(fixed, sitk.GetArrayFromImage(T.warp_labels(phantom_subject.labels, phantom_atlas.labels,
                                                                        sitk.Transform())))
    after = dice_per_label(fixed, sitk.GetArrayFromImage(T.warp_labels(phantom_subject.labels, phantom_atlas.labels,
                                                                       phantom_result.fixed_to_moving)))
    # measured: lung 0.72 -> 0.98, lobes 0.49-0.77 -> 0.90-0.96; lobes are driven only by the
    # lung outline here, so the fissures follow from the shape (the middle lobe is hardest)
    assert before["lung"] < 0.8 and after["lung"] > 0.96
    assert min(after[k] for k in (1, 2, 3, 4, 5)) > 0.85
    assert all(after[k] > before[k] + 0.1 for k in (1, 2, 3, 4, 5))
    assert phantom_result.info["folding"]["jacobian_nonpositive_percent"] == 0.0
    assert phantom_result.info["qc"]["passed"]


def test_phantom_points_map_close_to_truth(phantom_subject, phantom_result):
    # nodule centres and a sample of lung voxels: patient -> atlas through moving_to_fixed vs the
    # phantom's analytic truth. Before: ~23 mm apart; measured after: ~5 mm mean (about one 4 mm voxel).
    truth = sitk.DisplacementFieldTransform(sitk.Cast(phantom_subject.patient_to_atlas, sitk.sitkVectorFloat64))
    voxels = np.argwhere(sitk.GetArrayViewFromImage(phantom_subject.labels) > 0)[::40]
    points = index_to_physical(phantom_subject.ct, voxels)
    expected = np.array([truth.TransformPoint(tuple(p)) for p in points])
    mapped = T.warp_points(points, phantom_result.moving_to_fixed)
    before = np.linalg.norm(points - expected, axis=1).mean()
    error = np.linalg.norm(mapped - expected, axis=1)
    assert before > 15.0
    assert error.mean() < 7.0 and np.percentile(error, 95) < 14.0
    nodules = np.array([n.centre_patient_lps for n in phantom_subject.nodules])
    atlas = np.array([n.centre_atlas_lps for n in phantom_subject.nodules])
    assert np.linalg.norm(T.warp_points(nodules, phantom_result.moving_to_fixed) - atlas, axis=1).max() < 10.0


def test_bad_input_gives_clear_errors(phantom_atlas, phantom_subject):
    backend = get_registration("classical", **FAST)
    with pytest.raises(RegistrationError, match="lung mask or lobe labels for the moving"):
        backend.register(phantom_atlas.ct, phantom_subject.ct, fixed_labels=phantom_atlas.labels)
    empty = sitk.Image(phantom_subject.labels) * 0
    with pytest.raises(RegistrationError, match="moving lung mask is empty"):
        backend.register(phantom_atlas.ct, phantom_subject.ct, fixed_labels=phantom_atlas.labels, moving_labels=empty)
    mr_like = sitk.Cast(sitk.RescaleIntensity(phantom_subject.ct, 0, 1000), sitk.sitkFloat32)
    with pytest.raises(RegistrationError, match="does not look like CT"):
        backend.register(phantom_atlas.ct, mr_like, fixed_labels=phantom_atlas.labels,
                         moving_labels=phantom_subject.labels)
    nan = sitk.Cast(phantom_subject.ct, sitk.sitkFloat32)
    nan[5, 5, 5] = float("nan")
    with pytest.raises(RegistrationError, match="NaN"):
        backend.register(phantom_atlas.ct, nan, fixed_labels=phantom_atlas.labels, moving_labels=phantom_subject.labels)


@pytest.mark.slow
def test_real_pair_4mm(ct_data):
    """lung2 -> LUNG1-001 at 4 mm: lungs from LUNG1-001's clinical contours and a threshold
    segmentation of lung2 (it has no lung contours). The two lung definitions differ (the
    clinical contour excludes a 160 mL tumour and hilar structures, the threshold mask keeps
    main bronchi), which caps attainable Dice; measured 0.956 at 4 mm (0.98 at 2 mm), so 0.93
    leaves margin for platform differences while failing any registration that stalls at
    affine (0.81) or centroid (0.65) alignment."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from registration_benchmark import threshold_lungs

    fixed = sitk.ReadImage(str(ct_data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz"))
    fixed_mask = sitk.ReadImage(str(ct_data / "nsclc-lung1-001" / "lung1-001_lungs_4mm.nii.gz"))
    moving = sitk.ReadImage(str(ct_data / "pyradiomics-lung2" / "lung2_ct_4mm.nii.gz"))
    moving_mask = threshold_lungs(moving)
    result = get_registration("classical", **FAST).register(fixed, moving, fixed_mask=fixed_mask,
                                                             moving_mask=moving_mask)
    warped = sitk.GetArrayFromImage(T.warp_labels(moving_mask, fixed_mask, result.fixed_to_moving)) > 0
    reference = sitk.GetArrayFromImage(fixed_mask) > 0
    dice = 2 * (warped & reference).sum() / (warped.sum() + reference.sum())
    assert result.info["lung_dice_working_grid"]["affine"] < 0.9
    assert dice > 0.93
    assert result.info["folding"]["jacobian_nonpositive_percent"] < 0.05


def test_repeatable_runs_give_identical_transforms():
    from LungAtlasLib import phantom

    atlas = phantom.make_atlas_subject(spacing_mm=8.0)
    subject = phantom.make_subject(seed=5, spacing_mm=8.0, n_nodules=0)
    options = dict(FAST, spacing_mm=8.0)
    fields = []
    for _ in range(2):
        result = get_registration("classical", **options).register(atlas.ct, subject.ct, fixed_labels=atlas.labels,
                                                                   moving_labels=subject.labels)
        fields.append(sitk.GetArrayFromImage(T.displacement_field(result.fixed_to_moving, atlas.ct)))
    # no random sampling anywhere and a fixed thread count: bit-identical, not merely close
    assert np.array_equal(fields[0], fields[1])
