"""`lungatlas segment`: one scan in, labels.nii.gz and qc.json out; user errors exit 2."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from LungAtlasLib import io
from LungAtlasLib.cli import main
from LungAtlasLib.paths import read_json

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def test_segment_classical_writes_labels_and_qc(ct_data, tmp_path):
    ct_path = ct_data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz"
    assert main(["segment", "--ct", str(ct_path), "--backend", "classical", "--out", str(tmp_path)]) == 0
    labels = io.read_label_map(tmp_path / "labels.nii.gz")
    ct = io.read_image(ct_path)
    assert labels.GetSize() == ct.GetSize() and labels.GetOrigin() == ct.GetOrigin()
    assert set(np.unique(sitk.GetArrayViewFromImage(labels)).tolist()) == {0, 1, 2}
    record = read_json(tmp_path / "qc.json")
    assert record["case_id"] == "lung1-001_ct_4mm" and record["kind"] == "sides"
    assert record["qc"]["passed"] is True and record["qc"]["has_lobes"] is False
    # Right lung ~2.9 L, left ~2.2 L on this scan (the clinical contours: 3.0 / 2.3 L).
    assert 2500 < record["qc"]["volumes_ml"]["Right lung"] < 3300
    assert 1900 < record["qc"]["volumes_ml"]["Left lung"] < 2600


def test_segment_user_errors_exit_2(ct_data, tmp_path, capsys):
    ct_path = ct_data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz"
    status = main(["segment", "--ct", str(ct_path), "--backend", "totalsegmentator", "--mode", "fast",
                   "--weights-dir", str(tmp_path / "no_weights"), "--home-dir", str(tmp_path / "home"),
                   "--out", str(tmp_path / "out")])
    assert status == 2
    err = capsys.readouterr().err
    assert "lungatlas segment: error:" in err and "Dataset297_TotalSegmentator_total_3mm_1559subj" in err
    assert not (tmp_path / "out" / "labels.nii.gz").exists()

    assert main(["segment", "--ct", str(tmp_path / "missing.nii.gz"), "--backend", "classical",
                 "--out", str(tmp_path / "out2")]) == 2
    assert "missing.nii.gz: path does not exist" in capsys.readouterr().err

    assert main(["segment", "--ct", str(ct_path), "--backend", "precomputed", "--out", str(tmp_path / "o3")]) == 2
    assert "--labels" in capsys.readouterr().err
