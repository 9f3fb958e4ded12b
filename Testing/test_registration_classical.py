"""Classical backend: phantom with a known deformation (4 mm, lobe stage on and off), one real pair (4 mm)."""
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
    # measured with lobe labels on both sides (lobe stage on): lung 0.72 -> 0.985, lobes
    # 0.49-0.77 -> 0.969-0.983 (middle lobe lowest); 0.95 is above the 0.93 target and
    # above what the lung outline alone reaches for the middle lobe (0.895, next test)
    assert phantom_result.info["lobe_stage"] == "used"
    assert before["lung"] < 0.8 and after["lung"] > 0.97
    assert min(after[k] for k in (1, 2, 3, 4, 5)) > 0.95
    assert all(after[k] > before[k] + 0.1 for k in (1, 2, 3, 4, 5))
    assert phantom_result.info["folding"]["jacobian_nonpositive_percent"] == 0.0
    assert phantom_result.info["qc"]["passed"]


def test_lobe_labels_align_fissures_better_than_lung_outline(phantom_atlas, phantom_subject, phantom_result):
    # the same pair with lung masks only (no lobe stage): the fissures follow from the outline alone
    lungs = {role: sitk.Cast(labels > 0, sitk.sitkUInt8)
             for role, labels in (("fixed", phantom_atlas.labels), ("moving", phantom_subject.labels))}
    outline = get_registration("classical", **FAST).register(phantom_atlas.ct, phantom_subject.ct,
                                                              fixed_mask=lungs["fixed"], moving_mask=lungs["moving"])
    assert outline.info["lobe_stage"] == "no lobe labels for both scans"
    fixed = sitk.GetArrayFromImage(phantom_atlas.labels)
    dice = {name: dice_per_label(fixed, sitk.GetArrayFromImage(
                T.warp_labels(phantom_subject.labels, phantom_atlas.labels, result.fixed_to_moving)))
            for name, result in (("outline", outline), ("lobes", phantom_result))}
    mean = {name: np.mean([d[k] for k in (1, 2, 3, 4, 5)]) for name, d in dice.items()}
    # measured (seed 3, 4 mm): mean lobar 0.940 -> 0.979, middle lobe 0.895 -> 0.969, lung
    # 0.982 -> 0.985, no folding either way; +0.02 fails if the lobe stage stops acting
    assert mean["lobes"] > mean["outline"] + 0.02
    assert dice["lobes"][2] > dice["outline"][2] + 0.04
    assert dice["lobes"]["lung"] > dice["outline"]["lung"] - 0.005  # the lung outline is not traded away
    assert phantom_result.info["folding"]["jacobian_nonpositive_percent"] < 0.05


def test_sides_map_skips_the_lobe_stage():
    from LungAtlasLib import phantom

    # a right/left map (1/2) is not a lobe map: the result must be bit-identical to lung masks alone
    atlas = phantom.make_atlas_subject(spacing_mm=8.0)
    subject = phantom.make_subject(seed=5, spacing_mm=8.0, n_nodules=0)
    options = dict(FAST, spacing_mm=8.0)

    def sides(labels):  # lobes 1-3 right -> 1, 4-5 left -> 2
        return sitk.Cast((labels > 0) + (labels > 3), sitk.sitkUInt8)

    by_sides = get_registration("classical", **options).register(
        atlas.ct, subject.ct, fixed_labels=sides(atlas.labels), moving_labels=sides(subject.labels))
    by_masks = get_registration("classical", **options).register(
        atlas.ct, subject.ct, fixed_mask=sitk.Cast(atlas.labels > 0, sitk.sitkUInt8),
        moving_mask=sitk.Cast(subject.labels > 0, sitk.sitkUInt8))
    assert by_sides.info["lobe_stage"] == by_masks.info["lobe_stage"] == "no lobe labels for both scans"
    assert np.array_equal(sitk.GetArrayFromImage(T.displacement_field(by_sides.fixed_to_moving, atlas.ct)),
                          sitk.GetArrayFromImage(T.displacement_field(by_masks.fixed_to_moving, atlas.ct)))


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
