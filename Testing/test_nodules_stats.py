"""Atlas statistics on hand-computed cases: density, Wilson intervals, lobe rates, chi-square,
central vs peripheral zones, longitudinal matching."""
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from LungAtlasLib.nodules import density, lobes, longitudinal, phenotypes

sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


def _grid(size=(41, 41, 41), spacing=2.0, origin=(-40.0, -40.0, -40.0)):
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing([spacing] * 3)
    image.SetOrigin(origin)
    return image


def test_one_point_density_peak_value_and_integral():
    reference = _grid()
    result = density.density_map([[0.0, 0.0, 0.0]], reference, bandwidth_mm=6.0)
    array = sitk.GetArrayFromImage(result)
    # the peak is at the point (index 20 in every axis)
    assert np.unravel_index(array.argmax(), array.shape) == (20, 20, 20)
    # Gaussian peak: 1 / ((2 pi)^1.5 sigma^3) per mm^3 = 1000 / (15.75 * 216) = 0.2939 per mL
    assert array.max() == pytest.approx(1000.0 / ((2 * np.pi) ** 1.5 * 6.0 ** 3), rel=0.02)
    # one nodule in one scan integrates to 1 nodule per scan
    assert density.integral(result) == pytest.approx(1.0, abs=1e-3)


def test_two_points_density_is_centred_between_them_and_counts_per_scan():
    reference = _grid()
    # two nodules off the voxel centres, from 4 scans: 0.5 nodules per scan
    points = np.array([[-11.0, 3.0, 0.0], [11.0, 3.0, 0.0]])
    result = density.density_map(points, reference, bandwidth_mm=5.0, n_scans=4)
    array = sitk.GetArrayFromImage(result).astype(float)
    assert density.integral(result) == pytest.approx(0.5, abs=1e-3)
    # density-weighted mean position = the midpoint (0, 3, 0): trilinear splatting keeps sub-voxel positions
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in array.shape), indexing="ij")
    total = array.sum()
    centre = [(-40.0 + 2.0 * (axis * array).sum() / total) for axis in (xx, yy, zz)]
    assert centre == pytest.approx([0.0, 3.0, 0.0], abs=1e-3)
    # two equal peaks, 22 mm apart, none in between at 5 mm bandwidth
    x_profile = array[20, 21, :]
    assert x_profile[20] < 0.2 * x_profile.max()


def test_edge_correction_gives_back_the_mass_beyond_the_lung():
    reference = _grid()
    lung = np.zeros((41, 41, 41), bool)
    lung[:, :, :21] = True  # lung for x <= 0 mm
    point = [[0.0, 0.0, 0.0]]  # on the lung's edge: half of a kernel falls outside
    plain = density.density_map(point, reference, lung_mask=lung, bandwidth_mm=6.0, edge_correction=False)
    corrected = density.density_map(point, reference, lung_mask=lung, bandwidth_mm=6.0)
    # without correction ~half (plus the edge plane) of the nodule is inside; corrected: all of it
    assert 0.5 < density.integral(plain) < 0.65
    assert density.integral(corrected) == pytest.approx(1.0, abs=1e-3)
    assert sitk.GetArrayFromImage(corrected)[:, :, 21:].max() == 0.0  # nothing outside the lung


def test_points_outside_the_grid_are_counted_as_left_out():
    counts, outside = density.splat_counts([[0.0, 0.0, 0.0], [500.0, 0.0, 0.0], [np.nan, 0, 0]], _grid())
    assert counts.sum() == pytest.approx(1.0) and outside == 2


def test_wilson_interval_known_values():
    # Wilson 95 % for 5/10 is 0.2366-0.7634 (Newcombe 1998, table I style figures)
    assert lobes.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    # 0/20: lower bound exactly 0, upper 0.1611
    assert lobes.wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)


def test_lobe_rates_from_known_counts():
    # 100 nodules: 31 in the right upper lobe holding 18 % of the lung volume -> rate 31/18 = 1.72
    volumes = {1: 180.0, 2: 80.0, 3: 250.0, 4: 230.0, 5: 260.0}
    nodule_lobes = [1] * 31 + [2] * 5 + [3] * 24 + [4] * 20 + [5] * 20 + [0] * 7  # 0 = not in a lobe, not counted
    table = lobes.lobe_rates(nodule_lobes, volumes).set_index("lobe_key")
    assert table["count"].tolist() == [31, 5, 24, 20, 20]
    assert table.loc["right_upper", "share"] == pytest.approx(0.31)
    assert table.loc["right_upper", "volume_share"] == pytest.approx(0.18)
    assert table.loc["right_upper", "rate"] == pytest.approx(0.31 / 0.18)
    low, high = lobes.wilson_interval(31, 100)
    assert table.loc["right_upper", "rate_ci_low"] == pytest.approx(low / 0.18)
    assert table.loc["right_upper", "rate_ci_high"] == pytest.approx(high / 0.18)
    assert low / 0.18 > 1.0  # RUL significantly over-represented at n = 100
    # shares sum to 1 and volume-weighted rates average to 1
    assert table["share"].sum() == pytest.approx(1.0)
    assert (table["rate"] * table["volume_share"]).sum() == pytest.approx(1.0)


def test_cluster_bootstrap_is_wider_when_nodules_cluster_in_participants():
    # 20 participants with 5 nodules each, all in one lobe or all elsewhere: clustered
    nodule_lobes = np.repeat([1] * 6 + [3] * 14, 5)
    clusters = np.repeat(np.arange(20), 5)
    low, high = lobes.cluster_bootstrap_share_ci(nodule_lobes, clusters, lobe=1)
    w_low, w_high = lobes.wilson_interval(30, 100)
    assert (high - low) > 1.5 * (w_high - w_low)


def test_chi_square_on_a_known_table():
    # expected 12, 18 / 28, 42: chi2 = 4/12 + 4/18 + 4/28 + 4/42 = 0.7937 on 1 dof, p = 0.373
    result = phenotypes.chi_square([[10, 20], [30, 40]])
    assert result["chi2"] == pytest.approx(0.79365, abs=1e-4)
    assert result["dof"] == 1 and result["p_value"] == pytest.approx(0.3730, abs=1e-3)
    assert result["expected_min"] == pytest.approx(12.0)
    # an empty lobe column is dropped rather than making the test undefined
    assert phenotypes.chi_square([[10, 20, 0], [30, 40, 0]])["dof"] == 1


def test_phenotype_groups_from_nlst_codes():
    prsn = pd.DataFrame({"pid": [1, 2, 3], "gender": [1, 2, 7], "age": [57, 70, np.nan], "cigsmok": [1, 0, np.nan],
                         "pkyr": [35.0, 60.0, 45.5], "can_scr": [0, 1, np.nan]})
    derived = phenotypes.derive_phenotypes(prsn)
    assert derived["sex"].tolist() == ["male", "female", "unknown"]
    assert derived["age_group"].tolist() == ["55-59", "70-74", "unknown"]
    assert derived["smoking"].tolist() == ["current", "former", "unknown"]
    assert derived["pack_years_group"].tolist() == ["<40", ">=60", "40-59"]
    assert derived["cancer"].tolist() == ["no_cancer", "cancer", "unknown"]


def _sphere_lung(radius_mm=40.0, spacing=2.0):
    n = int(2 * radius_mm / spacing) + 5
    origin = -spacing * (n - 1) / 2
    image = _grid((n, n, n), spacing, (origin,) * 3)
    axis = origin + spacing * np.arange(n)
    zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")
    array = (np.sqrt(xx ** 2 + yy ** 2 + zz ** 2) <= radius_mm).astype(np.uint8)  # lobe 1, right lung
    labels = sitk.GetImageFromArray(array)
    labels.CopyInformation(image)
    return labels


def test_central_and_peripheral_zones_of_a_sphere():
    labels = _sphere_lung()
    zones = lobes.zone_maps(labels, hilum_points={"right": np.zeros(3)})
    table = lobes.nodule_zones([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [34.0, 0.0, 0.0], [100.0, 0.0, 0.0]],
                               labels, zones)
    # depth = d_hilum / (d_hilum + d_pleura) = r / R on a sphere with the hilum at its centre
    assert table["zone"].tolist() == ["central", "central", "peripheral", "unknown"]
    assert table["relative_depth"].iloc[2] == pytest.approx(34.0 / 40.0, abs=0.06)
    assert table["distance_to_pleura_mm"].iloc[2] == pytest.approx(6.0, abs=1.5)
    rates = lobes.zone_rates(table["zone"], zones, voxel_ml=0.008).set_index("zone")
    # central zone = r < R/3: (1/3)^3 = 3.7 % of the volume (discretised sphere: allow 1.5 points)
    assert rates.loc["central", "volume_share"] == pytest.approx(1 / 27, abs=0.015)
    assert rates.loc["central", "count"] == 2 and rates.loc["peripheral", "count"] == 1


def test_longitudinal_matching_new_and_persistent():
    rows = [("p1", 0, "a0", (0.0, 0.0, 0.0)), ("p1", 1, "a1", (3.0, 0.0, 0.0)), ("p1", 1, "b1", (50.0, 0.0, 0.0)),
            ("p1", 2, "a2", (3.0, 1.0, 0.0)), ("p2", 1, "c1", (0.0, 0.0, 0.0)), ("p2", 2, "c2", (40.0, 0.0, 0.0))]
    table = pd.DataFrame([{"participant": p, "study_yr": y, "nodule_id": n, "status": "ok", "atlas_x_lps": c[0],
                           "atlas_y_lps": c[1], "atlas_z_lps": c[2]} for p, y, n, c in rows])
    matched = longitudinal.match_longitudinal(table, max_distance_mm=10.0).set_index("nodule_id")
    assert matched["longitudinal_status"].to_dict() == {"a0": "baseline", "a1": "persistent", "b1": "new",
                                                        "a2": "persistent", "c1": "baseline", "c2": "new"}
    # a2 matches the most recent screen's nodule a1 (1 mm), not a0
    assert matched.loc["a2", "matched_nodule_id"] == "a1"
    assert matched.loc["a2", "match_distance_mm"] == pytest.approx(1.0)
    summary = longitudinal.longitudinal_summary(matched.reset_index()).set_index("study_yr")
    assert summary.loc[1].tolist() == [1, 1, 1] and summary.loc[2].tolist() == [0, 1, 1]


def test_coarse_grid_coverage_matches_the_full_grid_within_one_percent():
    # a 12 mm kernel on a 1 mm grid takes the coarse path (factor 3); compare with full smoothing
    lung = np.zeros((60, 60, 60), bool)
    lung[10:50, 15:45, 5:30] = True
    voxels = np.flatnonzero(lung)[::97]
    coarse = density.coverage_at(lung, (1.0, 1.0, 1.0), 12.0, voxels)
    exact = density.smooth(lung.astype(np.float32), (1.0, 1.0, 1.0), 12.0).ravel()[voxels]
    assert np.abs(coarse - exact).max() < 0.01
    # coverage at a face of a big box is about one half, deep inside close to one
    assert 0.1 < exact.min() < 0.6
