"""The command line: user-fixable errors are one line and exit status 2."""
import json

import pytest

from LungAtlasLib.cli import build_parser, main


def test_every_subcommand_has_help():
    text = build_parser().format_help()
    for command in ("demo", "info"):
        assert command in text


def test_missing_input_is_one_line_and_status_2(tmp_path, capsys):
    missing = tmp_path / "nothing.nii.gz"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lungatlas info: error: {missing}: path does not exist"]


@pytest.mark.realdata
def test_info_lists_dicom_series_and_image_geometry(lung1_dicom, ct_data, capsys):
    assert main(["info", str(lung1_dicom), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing["series"]) == 1 and listing["series"][0]["slices"] == 134
    assert main(["info", str(ct_data / "totalsegmentator-example" / "example_ct.nii.gz"), "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["size"] == [122, 101, 112] and described["orientation"] == "RAS"


def test_backend_options_pass_through_the_lookup_untouched():
    # Any keyword is the backend's, even one named like the lookup's own parameters.
    from LungAtlasLib.segmentation import SegmentationError, get_segmenter
    segmenter = get_segmenter("precomputed", path="x.nii.gz", kind="sides")
    assert segmenter is not None
    with pytest.raises(SegmentationError, match="unknown segmentation backend 'nope'"):
        get_segmenter("nope")
