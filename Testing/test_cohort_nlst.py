"""NLST CDAS tables on small CSVs with the real column names and codes."""
from __future__ import annotations

import pandas as pd
import pytest

from LungAtlasLib.cohort import nlst

PRSN = """pid,age,gender,cigsmok,pkyr,can_scr,conflc,locrup,locrmid,locrlow,loclup,loclin,locllow,locmed
100001,61,1,1,45.5,1,1,1,0,0,0,0,0,0
100002,70,2,0,90,0,0,0,0,0,0,0,0,0
100003,66,3,1,30,0,0,0,0,0,0,0,0,0
100004,58,2,,60,2,1,0,0,0,0,1,0,1
100005,59,1,0,40,0,0,0,0,0,0,0,0,0
100005,59,1,0,40,0,0,0,0,0,0,0,0,0
"""
SCREEN = """pid,study_yr,ct_recon_filter1,ctdxqual
100001,0,1,1
100001,1,1,1
100002,0,2,1
100002,7,2,1
"""
CTAB = """pid,study_yr,sct_ab_num,sct_ab_desc,sct_epi_loc,sct_long_dia,sct_perp_dia,sct_margins,sct_pre_att,sct_slice_num
100001,0,1,51,1,12,9,1,1,40
100001,0,2,51,5,6,5,1,1,55
100001,0,3,64,,,,,,
100001,1,1,51,6,7,6,1,1,70
100002,0,1,51,9,5,4,1,1,30
100002,0,2,51,,5,4,1,1,31
100002,0,3,51,8,5,4,1,1,32
"""


@pytest.fixture
def tables(tmp_path):
    for name, text in (("nlst_prsn.csv", PRSN), ("nlst_screen.csv", SCREEN), ("nlst_ctab.csv", CTAB)):
        (tmp_path / name).write_text(text)
    return tmp_path


def test_participants_phenotype_and_reported_codes(tables):
    prsn, problems = nlst.read_participants(tables / "nlst_prsn.csv")
    people = prsn.set_index("participant_id")
    # the duplicated 100005 is dropped and reported, the other four stay
    assert sorted(people.index) == ["100001", "100002", "100003", "100004"]
    assert any("100005 appears 2 times" in p for p in problems)
    # CDAS codes kept as codes: gender 1 male, cigsmok 1 current / 0 former
    assert people.loc["100001", ["age", "gender", "cigsmok", "pkyr"]].tolist() == [61, 1, 1, 45.5]
    assert people.loc["100002", "cigsmok"] == 0
    # gender 3 is not an NLST code: missing, reported, not guessed
    assert pd.isna(people.loc["100003", "gender"])
    assert any("100003: unknown gender code 3" in p for p in problems)
    assert any("100004: cigsmok missing" in p for p in problems)
    # cancer locations: right upper lobe flag; lingula counts as the left upper lobe; mediastinum is not a lobe
    assert people.loc["100001", "cancer_lobes"] == "right_upper" and bool(people.loc["100001", "lung_cancer"])
    assert people.loc["100004", "cancer_lobes"] == "left_upper"
    assert people.loc["100004", "cancer_other_locations"] == "locmed"


def test_abnormalities_keep_nodules_and_report_unknown_locations(tables):
    nodules, problems = nlst.read_abnormalities(tables / "nlst_ctab.csv")
    # six rows have sct_ab_desc 51; the 64 (other abnormality) is not a nodule row
    assert len(nodules) == 6
    lobes = nodules.set_index(["participant_id", "study_yr", "sct_ab_num"])["lobe"]
    assert lobes.loc[("100001", 0, 1)] == 1        # code 1: right upper lobe
    assert lobes.loc[("100001", 0, 2)] == 4        # code 5 lingula -> left upper lobe (4)
    assert lobes.loc[("100001", 1, 1)] == 5        # code 6: left lower lobe is LungAtlas lobe 5
    assert pd.isna(lobes.loc[("100002", 0, 1)])    # code 9 does not exist
    assert pd.isna(lobes.loc[("100002", 0, 3)])    # code 8 "other": no lobe
    assert any("unknown sct_epi_loc code 9" in p for p in problems)
    assert any("nodule without sct_epi_loc" in p for p in problems)


def test_join_to_cases(tables):
    prsn, _ = nlst.read_participants(tables / "nlst_prsn.csv")
    screen, screen_problems = nlst.read_screens(tables / "nlst_screen.csv")
    nodules, _ = nlst.read_abnormalities(tables / "nlst_ctab.csv")
    assert any("study_yr 7" in p for p in screen_problems)
    cases = pd.DataFrame({"case_id": ["100001_T0", "100001_T1", "100002_T0", "999999_T0"],
                          "participant_id": ["100001", "100001", "100002", "999999"], "study_yr": [0, 1, 0, 0]})
    joined, problems = nlst.join_to_cases(cases, prsn, screen, nodules)
    rows = joined.set_index("case_id")
    assert rows.loc["100001_T1", "pkyr"] == 45.5 and rows.loc["100001_T1", "ct_recon_filter1"] == 1
    # nodules go to their own screening round: 2 at T0, 1 at T1
    assert len(rows.loc["100001_T0", "nlst_nodules"]) == 2 and len(rows.loc["100001_T1", "nlst_nodules"]) == 1
    assert rows.loc["100001_T1", "nlst_nodules"][0]["lobe"] == 5
    assert any("999999: no row in prsn" in p for p in problems)
    assert any("case 999999_T0: no screen row" in p for p in problems)


def test_missing_columns_are_named(tmp_path):
    (tmp_path / "prsn.csv").write_text("pid,age,sex\n1,60,1\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['gender', 'cigsmok', 'pkyr'\]"):
        nlst.read_participants(tmp_path / "prsn.csv")
