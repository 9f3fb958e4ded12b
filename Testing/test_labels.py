"""The label table: one file, every code scheme mapped onto lobes 1-5."""
import numpy as np
import pytest

from LungAtlasLib.labels import LABEL_TABLE_PATH, LABELS


def test_lobes_are_values_one_to_five_in_anatomical_order():
    assert [r.key for r in LABELS.lobes] == ["right_upper", "right_middle", "right_lower", "left_upper", "left_lower"]
    assert LABELS.lobe_values == (1, 2, 3, 4, 5)
    assert LABELS.lobes_of_side("right") == (1, 2, 3)
    assert LABELS.lobes_of_side("left") == (4, 5)
    assert LABEL_TABLE_PATH.name == "label_table.json" and LABEL_TABLE_PATH.parent.name == "Resources"


def test_totalsegmentator_codes_10_to_14():
    # TotalSegmentator task "total": 10 LUL, 11 LLL, 12 RUL, 13 RML, 14 RLL (FACTS.md).
    assert LABELS.totalsegmentator_to_lobe == {10: 4, 11: 5, 12: 1, 13: 2, 14: 3}
    ts = np.array([0, 10, 11, 12, 13, 14, 7, 51])
    assert LABELS.remap(ts, LABELS.totalsegmentator_to_lobe).tolist() == [0, 4, 5, 1, 2, 3, 0, 0]


def test_nlst_locations_lingula_and_other():
    assert [LABELS.nlst_location(c).lobe for c in (1, 2, 3, 4, 6)] == [1, 2, 3, 4, 5]
    lingula = LABELS.nlst_location(5)
    assert lingula.lobe == 4 and "Lingula" in lingula.name  # lingula belongs to the left upper lobe
    other = LABELS.nlst_location("8")
    assert other.other and other.lobe is None  # flagged, never guessed into a lobe
    with pytest.raises(KeyError, match="unknown NLST sct_epi_loc code 7"):
        LABELS.nlst_location(7)
    with pytest.raises(KeyError):
        LABELS.nlst_location(None)


def test_names_colours_and_segment_names_are_distinct():
    names = [r.slicer_segment for r in LABELS.lobes]
    assert len(set(names)) == 5 and all("lobe" in n for n in names)
    colours = [r.color for r in LABELS.lobes]
    assert len(set(colours)) == 5
    assert all(0.0 <= c <= 1.0 for r in LABELS.lobes for c in r.color_float)
    assert LABELS.lobe("left lower lobe of lung").value == 5


def test_side_map_and_lung_union():
    lobes = np.array([0, 1, 2, 3, 4, 5])
    assert LABELS.side_map(lobes).tolist() == [0, 1, 1, 1, 2, 2]
    assert LABELS.lung_mask(lobes).tolist() == [False, True, True, True, True, True]
