"""Planted truth on the phantom atlas: a non-uniform lobe distribution is recovered, a planted
group difference is found, a null difference is not (false-positive rate near nominal)."""
import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import phantom
from LungAtlasLib.geometry import index_to_physical
from LungAtlasLib.labels import LABELS
from LungAtlasLib.nodules import lobes, phenotypes, simulate
from LungAtlasLib.nodules.phenotypes import GroupDensity, SplatCache

sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)


@pytest.fixture(scope="module")
def atlas6():
    """The phantom atlas at 6 mm: small enough for hundreds of permutations."""
    return phantom.make_atlas_subject(spacing_mm=6.0)


def _permutation_p(mapped, scans, labels, n_permutations, bandwidth_mm=12.0, seed=0):
    lung = sitk.GetArrayViewFromImage(labels) > 0
    number = {case: i for i, case in enumerate(scans["case_id"])}
    points = mapped[["atlas_x_lps", "atlas_y_lps", "atlas_z_lps"]].to_numpy(float)
    cache = SplatCache(points, mapped["case_id"].map(number).to_numpy(int), labels)
    test = phenotypes.density_permutation_test(GroupDensity(cache, lung, bandwidth_mm), scans["sex"].to_numpy(),
                                               scans["participant"].to_numpy(), "male", "female",
                                               n_permutations, seed)
    return test


def test_planted_lobe_distribution_is_recovered_within_its_intervals(atlas6):
    # the phantom's own per-mL lobe weights (right upper 1.8 ...): true rates follow from the atlas volumes
    truth = simulate.true_rates(atlas6.labels, phantom.LOBE_NODULE_WEIGHT)
    mapped, _ = simulate.planted_cohort(atlas6.labels, 400, seed=11, weights_per_ml=phantom.LOBE_NODULE_WEIGHT)
    rates = lobes.lobe_rates(mapped["atlas_lobe"], lobes.lobe_volumes_ml(atlas6.labels)).set_index("lobe")
    assert rates["count"].sum() == len(mapped) > 500
    for lobe in LABELS.lobe_values:
        assert rates.loc[lobe, "rate_ci_low"] <= truth[lobe] <= rates.loc[lobe, "rate_ci_high"], lobe
    # and the method sees the non-uniformity: the right upper lobe's interval lies above 1
    assert truth[1] > 1.3 and rates.loc[1, "rate_ci_low"] > 1.0


def test_planted_lobe_difference_between_groups_is_found_by_chi_square(atlas6):
    # females: 3x the per-mL nodule rate in the right upper lobe, males uniform
    female = {1: 3.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}
    mapped, scans = simulate.planted_cohort(atlas6.labels, 160, seed=5, group_b_weights=female)
    table = phenotypes.lobe_contingency(mapped.merge(scans[["case_id", "sex"]], on="case_id"), "sex",
                                        ["male", "female"])
    assert phenotypes.chi_square(table.to_numpy())["p_value"] < 0.01
    assert table.loc["female", "right_upper"] > 1.5 * table.loc["male", "right_upper"]


def test_planted_focal_difference_is_found_by_the_permutation_test(atlas6):
    # females: 0.4 extra nodules per scan within 15 mm of a right-upper-lobe site
    hotspot = np.array([-80.0, 0.0, 60.0])
    mapped, scans = simulate.planted_cohort(atlas6.labels, 120, seed=5, group_b_hotspot=(hotspot, 15.0, 0.4))
    test = _permutation_p(mapped, scans, atlas6.labels, n_permutations=199, bandwidth_mm=10.0)
    # 199 permutations: the smallest attainable p is 0.005
    assert test["p_global"] < 0.01
    # the most different voxel lies near the hotspot, with more nodules in females (male - female < 0)
    statistic = test["statistic"]
    peak = np.unravel_index(np.argmax(np.abs(statistic)), statistic.shape)
    peak_lps = index_to_physical(atlas6.labels, np.array([peak], float))[0]
    assert np.linalg.norm(peak_lps - hotspot) < 20.0 and test["difference"][peak] < 0
    # voxels far from the hotspot are not significant after FWE correction
    far = index_to_physical(atlas6.labels, np.argwhere(test["p_fwe"] < 0.05).astype(float))
    assert np.linalg.norm(far - hotspot, axis=1).max() < 35.0


@pytest.mark.slow
def test_null_difference_false_positive_rate_is_near_nominal(atlas6):
    # same distribution in both groups: at alpha 0.05, about 5 % of cohorts should test positive
    chi_positive, perm_positive = 0, 0
    chi_seeds, perm_seeds = 200, 30
    for seed in range(chi_seeds):
        mapped, scans = simulate.planted_cohort(atlas6.labels, 60, seed=1000 + seed)
        table = phenotypes.lobe_contingency(mapped.merge(scans[["case_id", "sex"]], on="case_id"), "sex",
                                            ["male", "female"])
        chi_positive += phenotypes.chi_square(table.to_numpy())["p_value"] < 0.05
        if seed < perm_seeds:
            perm_positive += _permutation_p(mapped, scans, atlas6.labels, n_permutations=99, seed=seed)["p_global"] < 0.05
    # binomial(200, 0.05): 10 expected, 99 % of outcomes within 3..18
    assert 3 <= chi_positive <= 18, chi_positive
    # binomial(30, 0.05): 1.5 expected; P(>= 6) = 0.016, so 6 or more would mean inflated errors
    assert perm_positive <= 5, perm_positive


def test_too_few_participants_are_not_tested(atlas6):
    # 2 vs 2 participants allow C(4, 2) = 6 labellings: the smallest p would be 1/6, so no test
    mapped, scans = simulate.planted_cohort(atlas6.labels, 4, seed=1, nodules_per_scan=3.0)
    test = _permutation_p(mapped, scans, atlas6.labels, n_permutations=99)
    assert test["arrangements"] == 6 and np.isnan(test["p_global"]) and "6 labellings" in test["note"]
    assert test["difference"].any()  # the maps are still made
