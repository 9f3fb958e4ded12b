"""Quality control of lobe label maps: deliberately broken maps raise the right flags.

The intact map is the phantom's truth (lobes 1-5, lungs inside the field of
view, lung HU from the phantom CT), which passes every check; each test breaks
one property and asserts that exactly the matching check fails, with a reason.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import io
from LungAtlasLib.labels import LABELS
from LungAtlasLib.segmentation.qc import quality_control

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _with_array(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(like)
    return image


def _failed_checks(qc: dict) -> set[tuple[str, str | None]]:
    return {(f["check"], f.get("region")) for f in qc["flags"] if not f["passed"]}


def test_intact_phantom_passes_every_check(phantom_subject):
    qc = quality_control(phantom_subject.labels, phantom_subject.ct)
    assert qc["passed"], qc["failed"]
    # 5 lobes x (present, one_component, side) + not_cut + lung_volume + lung_hu
    assert len(qc["flags"]) == 18
    assert qc["has_lobes"] and not qc["notes"]
    json.dumps(qc)  # the record goes into qc.json as is


def test_missing_lobe_is_flagged(phantom_subject):
    array = sitk.GetArrayFromImage(phantom_subject.labels)
    array[array == LABELS.lobe("right_middle").value] = 0
    qc = quality_control(_with_array(array, phantom_subject.labels), phantom_subject.ct)
    assert not qc["passed"]
    assert _failed_checks(qc) == {("present", "Right middle lobe")}
    assert "missing" in qc["failed"][0]


def test_swapped_sides_are_flagged(phantom_subject):
    # Mirror the map left-right (numpy axis 2 is LPS x for this identity-direction image):
    # every lobe now lies on the wrong side of the lung midline.
    array = sitk.GetArrayFromImage(phantom_subject.labels)[:, :, ::-1]
    qc = quality_control(_with_array(array, phantom_subject.labels), phantom_subject.ct)
    assert {check for check, _ in _failed_checks(qc)} >= {"side"}
    assert {region for check, region in _failed_checks(qc) if check == "side"} == {r.name for r in LABELS.lobes}
    assert any("sides swapped" in reason for reason in qc["failed"])


def test_cropped_apex_is_flagged(phantom_subject):
    labels, ct = phantom_subject.labels, phantom_subject.ct
    lung_z = np.flatnonzero(sitk.GetArrayViewFromImage(labels).any(axis=(1, 2)))
    # Keep the image up to 3 cm below the apex: the top slice then cuts through both upper lobes.
    top = int(lung_z[-1] - 30.0 / labels.GetSpacing()[2])
    size = list(labels.GetSize())
    size[2] = top
    cropped = sitk.RegionOfInterest(labels, size, [0, 0, 0])
    qc = quality_control(cropped, sitk.RegionOfInterest(ct, size, [0, 0, 0]))
    failed = _failed_checks(qc)
    assert ("not_cut", None) in failed
    flag = next(f for f in qc["flags"] if f["check"] == "not_cut")
    assert flag["top_area_mm2"] > 1000.0 and flag["bottom_area_mm2"] == 0.0
    assert "top (apex)" in flag["reason"]


def test_tiny_fragment_is_flagged(phantom_subject):
    array = sitk.GetArrayFromImage(phantom_subject.labels)
    # A 3x3x3-voxel (1.7 mL at 4 mm) piece of "right upper lobe" inside the left lower lobe.
    z, y, x = np.argwhere(array == LABELS.lobe("left_lower").value).mean(axis=0).astype(int)
    array[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2] = LABELS.lobe("right_upper").value
    qc = quality_control(_with_array(array, phantom_subject.labels), phantom_subject.ct)
    assert ("one_component", "Right upper lobe") in _failed_checks(qc)
    flag = next(f for f in qc["flags"] if f["check"] == "one_component" and f["region"] == "Right upper lobe")
    assert flag["components"] == 2 and flag["fragments_ml"] == pytest.approx(27 * 0.064, abs=0.01)  # 27 voxels of 0.064 mL


def test_implausible_volume_and_hu(phantom_subject):
    # A "lung" mask covering the whole image: 100x the volume, mostly soft tissue and air.
    array = np.ones(sitk.GetArrayViewFromImage(phantom_subject.labels).shape, np.uint8)
    qc = quality_control(_with_array(array, phantom_subject.labels), phantom_subject.ct)
    checks = {check for check, _ in _failed_checks(qc)}
    assert {"lung_volume", "lung_hu", "present", "not_cut"} <= checks


def test_sides_map_notes_no_lobes_and_orientation_does_not_matter(phantom_subject):
    sides = _with_array(LABELS.side_map(sitk.GetArrayFromImage(phantom_subject.labels)), phantom_subject.labels)
    qc = quality_control(sides, phantom_subject.ct, kind="sides")
    assert qc["passed"] and not qc["has_lobes"]
    assert any("no lobes" in note for note in qc["notes"])
    # The same map stored with other axis directions gives the same verdicts and volumes.
    qc_ras = quality_control(io.reorient(sides, "RAI"), io.reorient(phantom_subject.ct, "RAI"), kind="sides")
    assert qc_ras["passed"] and qc_ras["volumes_ml"] == qc["volumes_ml"]
