"""Nodule inputs: CSV and markups points in LPS, nodule masks, NLST lobe + slice estimates."""
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from LungAtlasLib.nodules import inputs

sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def test_csv_points_in_lps_pass_through_and_ras_are_flipped(tmp_path):
    lps = tmp_path / "a.csv"
    pd.DataFrame({"x_lps": [10.0], "y_lps": [-20.0], "z_lps": [30.0], "pid": [100001], "study_yr": [1],
                  "diameter_mm": [6.5]}).to_csv(lps, index=False)
    table = inputs.read_points_csv(lps)
    assert table.loc[0, ["x_lps", "y_lps", "z_lps"]].tolist() == [10.0, -20.0, 30.0]
    assert table.loc[0, "participant"] == 100001 and table.loc[0, "study_yr"] == 1
    assert table.loc[0, "status"] == "ok" and table.loc[0, "position_method"] == inputs.METHOD_GIVEN
    ras = tmp_path / "b.csv"
    pd.DataFrame({"x_ras": [10.0, np.nan], "y_ras": [-20.0, 1.0], "z_ras": [30.0, 2.0]}).to_csv(ras, index=False)
    table = inputs.read_points_csv(ras, case_id="scanB")
    # RAS -> LPS negates x and y only
    assert table.loc[0, ["x_lps", "y_lps", "z_lps"]].tolist() == [-10.0, 20.0, 30.0]
    # an empty coordinate is reported on its row, not dropped
    assert table.loc[1, "status"] == "missing_coordinates" and "row 3" in table.loc[1, "note"]


def test_csv_without_coordinates_names_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"x": [1], "y": [2], "z": [3]}).to_csv(path, index=False)
    with pytest.raises(inputs.NoduleInputError, match="bad.csv.*x_lps"):
        inputs.read_points_csv(path)


def _markups(path, system, points):
    document = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
                           "Resources/Schema/markups-schema-v1.0.3.json#",
                "markups": [{"type": "Fiducial", "coordinateSystem": system, "controlPoints": points}]}
    path.write_text(json.dumps(document))
    return path


def test_markups_ras_and_lps_files_give_the_same_lps_point(tmp_path):
    ras = _markups(tmp_path / "n1.mrk.json", "RAS", [{"id": "1", "label": "N1", "position": [-12.0, 30.0, -5.0],
                                                       "positionStatus": "defined"}])
    lps = _markups(tmp_path / "n2.mrk.json", "LPS", [{"id": "1", "label": "N1", "position": [12.0, -30.0, -5.0],
                                                       "positionStatus": "defined"},
                                                      {"id": "2", "label": "N2", "position": [0, 0, 0],
                                                       "positionStatus": "undefined"}])
    a = inputs.read_markups_json(ras, participant="p1", study_yr=0)
    b = inputs.read_nodule_points(lps)
    assert a.loc[0, ["x_lps", "y_lps", "z_lps"]].tolist() == [12.0, -30.0, -5.0]
    assert b.loc[0, ["x_lps", "y_lps", "z_lps"]].tolist() == [12.0, -30.0, -5.0]
    assert a.loc[0, "nodule_id"] == "n1-N1" and a.loc[0, "participant"] == "p1"
    assert b.loc[1, "status"] == "markup_point_undefined"


def _image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(np.asarray(array, np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_mask_components_give_centroids_volumes_and_diameters():
    array = np.zeros((20, 20, 20), np.uint8)
    array[2:4, 2:4, 2:4] = 1          # 8 voxels of 2 mm = 64 mm^3, centre index 2.5
    array[10:13, 10:13, 10:13] = 1    # 27 voxels = 216 mm^3, centre index 11
    mask = _image(array, spacing=(2.0, 2.0, 2.0), origin=(-10.0, 0.0, 5.0))
    table = inputs.nodules_from_mask(mask, case_id="c1", study_yr=2).sort_values("volume_ml")
    assert table["volume_ml"].tolist() == pytest.approx([0.064, 0.216])
    # centroid = origin + index * spacing: x -10 + 2.5*2 = -5, y 0 + 5 = 5, z 5 + 5 = 10
    assert table.iloc[0][["x_lps", "y_lps", "z_lps"]].tolist() == pytest.approx([-5.0, 5.0, 10.0])
    assert table.iloc[1][["x_lps", "y_lps", "z_lps"]].tolist() == pytest.approx([12.0, 22.0, 27.0])
    # volume-equivalent sphere of 216 mm^3: d = (6 V / pi)^(1/3) = 7.445 mm
    assert table.iloc[1]["diameter_mm"] == pytest.approx((6 * 216 / np.pi) ** (1 / 3))


def test_mask_on_another_grid_is_refused_with_the_case_named():
    mask = _image(np.zeros((5, 5, 5)))
    ct = _image(np.zeros((5, 5, 5)), spacing=(2.0, 2.0, 2.0))
    with pytest.raises(inputs.NoduleInputError, match="case c7.*not on the grid"):
        inputs.nodules_from_mask(mask, case_id="c7", reference=ct)


@pytest.fixture()
def lobes_image():
    """10 axial slices of 2.5 mm (z 0 .. 22.5 mm), 1 mm in-plane. Lobe 1 (right upper) fills
    x 0-9, y 0-19 in the top 4 slices; lobe 4 (left upper) fills x 20-29, y 5-14 in all slices;
    lobe 5 only in the bottom slice."""
    array = np.zeros((10, 20, 30), np.uint8)
    array[6:, 0:20, 0:10] = 1
    array[:, 5:15, 20:30] = 4
    array[0, 0:5, 20:30] = 5
    return _image(array, spacing=(1.0, 1.0, 2.5))


def test_nlst_slice_numbers_count_from_the_top(lobes_image):
    # instance 1 = most superior = array index 9 at z 22.5 mm; instance 10 = z 0
    assert inputs.nlst_slice_z_mm(1, lobes_image) == pytest.approx(22.5)
    assert inputs.nlst_slice_z_mm(10, lobes_image) == pytest.approx(0.0)
    # with the DICOM instance positions known, they decide (here: instances run feet to head)
    assert inputs.nlst_slice_z_mm(1, lobes_image, slice_positions_mm=np.arange(10) * 2.5) == 0.0


def test_nlst_rows_estimated_or_reported(lobes_image):
    ctab = pd.DataFrame({
        "pid": [100012] * 7, "study_yr": [1] * 7, "sct_ab_num": list(range(1, 8)),
        "sct_epi_loc": [1, 5, 8, 1, 1, 9, 6],
        "sct_slice_num": [2, 3, 4, np.nan, 8, 2, 2],
        "sct_long_dia": [7.0, 5.0, 4.0, 6.0, 8.0, 5.0, 5.0], "sct_perp_dia": [5.0, 4.0, 4.0, 5.0, 6.0, 4.0, 4.0],
        "sct_pre_att": [1, 2, 1, 1, 1, 1, 1]})
    table = inputs.estimate_nlst_positions(ctab, lobes_image)
    status = table.set_index("nodule_id")["status"].to_dict()
    assert status == {"100012_T1-ab1": "ok", "100012_T1-ab2": "ok", "100012_T1-ab3": "nlst_other_location",
                      "100012_T1-ab4": "nlst_no_slice", "100012_T1-ab5": "nlst_lobe_not_in_slice",
                      "100012_T1-ab6": "nlst_unknown_code", "100012_T1-ab7": "nlst_lobe_not_in_slice"}
    first = table.iloc[0]
    # slice 2 -> z 20 mm; right upper lobe section x 0..9, y 0..19: centroid (4.5, 9.5, 20)
    assert first[["x_lps", "y_lps", "z_lps"]].tolist() == pytest.approx([4.5, 9.5, 20.0])
    # RMS distance from the centroid of a 10 x 20 grid of 1 mm: sqrt((10^2-1)/12 + (20^2-1)/12) = 6.16 mm
    assert first["uncertainty_mm"] == pytest.approx(np.sqrt((100 - 1) / 12 + (400 - 1) / 12))
    assert first["section_width_mm"] == 10.0 and first["section_depth_mm"] == 20.0
    assert first["diameter_mm"] == 7.0 and first["perpendicular_diameter_mm"] == 5.0
    assert first["position_method"] == inputs.METHOD_NLST
    # lingula (code 5) -> left upper lobe (4): centroid of x 20..29, y 5..14 at slice 3 (z 17.5)
    lingula = table.iloc[1]
    assert lingula["recorded_lobe"] == 4
    assert lingula[["x_lps", "y_lps", "z_lps"]].tolist() == pytest.approx([24.5, 9.5, 17.5])
    assert np.isnan(table.iloc[2]["x_lps"])  # code 8: no guessed position
    counts = inputs.exclusion_counts(table).set_index("status")["nodules"].to_dict()
    assert counts == {"ok": 2, "nlst_lobe_not_in_slice": 2, "nlst_other_location": 1, "nlst_no_slice": 1,
                      "nlst_unknown_code": 1}


def test_nlst_slice_beyond_the_series_is_reported(lobes_image):
    ctab = pd.DataFrame({"pid": [1], "study_yr": [0], "sct_epi_loc": [4], "sct_slice_num": [11]})
    row = inputs.estimate_nlst_positions(ctab, lobes_image, case_id="scan9").iloc[0]
    assert row["status"] == "nlst_slice_outside_series" and "1..10" in row["note"]
    assert row["case_id"] == "scan9"
