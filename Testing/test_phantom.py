"""The demo-cohort phantom: seeded, anatomically ordered, and its truth self-consistent."""
import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import phantom
from LungAtlasLib.labels import LABELS


def test_same_seed_same_subject():
    a = phantom.make_subject(5, spacing_mm=6.0)
    b = phantom.make_subject(5, spacing_mm=6.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(b.ct))
    assert [n.centre_patient_lps for n in a.nodules] == [n.centre_patient_lps for n in b.nodules]
    c = phantom.make_subject(6, spacing_mm=6.0)
    assert not np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(c.labels))


def test_lobes_present_on_their_side_with_plausible_volumes(phantom_subject):
    labels = sitk.GetArrayFromImage(phantom_subject.labels)
    ml = np.bincount(labels.ravel(), minlength=6) * np.prod(phantom_subject.labels.GetSpacing()) / 1000.0
    # Adult lobes hold roughly 0.3-1.5 L each; the middle lobe is the smallest.
    assert all(150 < ml[v] < 1600 for v in LABELS.lobe_values), ml
    assert ml[2] == min(ml[1:])
    # LPS: +x is the patient's left, so right lobes have smaller x than left lobes.
    coords = np.argwhere(labels > 0)
    x_index = {v: coords[labels[labels > 0] == v][:, 2].mean() for v in LABELS.lobe_values}
    assert max(x_index[v] for v in (1, 2, 3)) < min(x_index[v] for v in (4, 5))
    # Upper lobes sit above lower lobes (z index grows superiorly here).
    z_index = {v: coords[labels[labels > 0] == v][:, 0].mean() for v in LABELS.lobe_values}
    assert z_index[1] > z_index[3] and z_index[4] > z_index[5]


def test_ct_intensities_look_like_chest_ct(phantom_subject):
    ct = sitk.GetArrayFromImage(phantom_subject.ct).astype(float)
    labels = sitk.GetArrayFromImage(phantom_subject.labels)
    assert -900 < np.median(ct[labels > 0]) < -750       # aerated lung
    assert np.percentile(ct, 1) < -950                    # air outside the body
    assert (ct > 400).sum() > 100                         # ribs


def test_nodules_map_to_their_atlas_centres_through_the_true_field(phantom_subject):
    assert len(phantom_subject.nodules) == 3
    field = sitk.DisplacementFieldTransform(sitk.Cast(phantom_subject.patient_to_atlas, sitk.sitkVectorFloat64))
    labels = phantom_subject.labels
    for nodule in phantom_subject.nodules:
        mapped = np.array(field.TransformPoint(nodule.centre_patient_lps))
        # The field is sampled every 4 mm and interpolated linearly; the mapping is smooth,
        # so the interpolated point lands within 0.5 mm of the analytic one.
        assert np.linalg.norm(mapped - nodule.centre_atlas_lps) < 0.5
        # The nodule sits in (or at the edge of) the lobe it was drawn in.
        index = labels.TransformPhysicalPointToIndex(nodule.centre_patient_lps)
        assert labels[index] in (nodule.lobe, 0)


def test_atlas_subject_has_no_deformation():
    atlas = phantom.make_atlas_subject(spacing_mm=8.0)
    displacement = sitk.GetArrayViewFromImage(atlas.patient_to_atlas)
    assert np.abs(displacement).max() == pytest.approx(0.0, abs=1e-9)
    assert atlas.nodules == []
