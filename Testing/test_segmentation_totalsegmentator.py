"""The TotalSegmentator backend, running the real package on real CT with stand-in weights.

The stand-in model (Testing/fixtures/standin_totalsegmentator.py) predicts class 12
(lung_upper_lobe_right) everywhere, so the whole path is checked with a known
answer: our subprocess runner, TotalSegmentator's roi_subset cropping and nnU-Net
prediction, the reorientation round trip and the 12 -> right upper lobe mapping.
The real run is done once per module (10-40 s on 2 cores).
"""
from __future__ import annotations

import json
import os
import stat
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import io
from LungAtlasLib.geometry import crop
from LungAtlasLib.labels import LABELS
from LungAtlasLib.segmentation import SegmentationError, get_segmenter
from LungAtlasLib.segmentation.totalsegmentator import resolve_weights_dir

sys.path.insert(0, os.path.dirname(__file__))
from fixtures.standin_totalsegmentator import make_standin_weights  # noqa: E402

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
FORCED_CODE = 12   # TotalSegmentator's lung_upper_lobe_right


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("totalseg")
    weights = root / "weights"
    make_standin_weights(weights, "fastest", force_label=FORCED_CODE)
    return root, weights


@pytest.fixture(scope="module")
def lung1_ct(ct_data):
    ct = io.read_image(ct_data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz")
    # The chest without the table and outside air (fewer voxels to predict), stored
    # with a non-standard axis order so that the reorientation round trip is exercised.
    box = (slice(45, 85), slice(30, 78), slice(20, 68))   # 160 x 192 x 192 mm: one 6 mm patch
    return io.reorient(crop(ct, box), "RAI")


@pytest.fixture(scope="module")
def standin_run(standin, lung1_ct):
    root, weights = standin
    segmenter = get_segmenter("totalsegmentator", mode="fastest", device="cpu", weights_dir=weights,
                              home_dir=root / "home", log_path=root / "run.log")
    return segmenter.segment(lung1_ct, case_id="LUNG1-001"), root


@pytest.mark.slow
def test_real_package_output_geometry_and_mapping(standin_run, lung1_ct):
    result, _ = standin_run
    labels = result.labels
    assert io.orientation_of(lung1_ct) == "RAI"
    # The output lies exactly on the input's grid, in the input's own axis order.
    assert labels.GetSize() == lung1_ct.GetSize()
    assert labels.GetDirection() == lung1_ct.GetDirection()
    assert np.allclose(labels.GetOrigin(), lung1_ct.GetOrigin(), atol=1e-6)
    assert np.allclose(labels.GetSpacing(), lung1_ct.GetSpacing(), atol=1e-9)
    values, counts = np.unique(sitk.GetArrayViewFromImage(labels), return_counts=True)
    # Code 12 arrives as the label table's right upper lobe (1), and as nothing else.
    assert LABELS.totalsegmentator_to_lobe[FORCED_CODE] == LABELS.lobe("right_upper").value == 1
    assert set(values.tolist()) <= {0, 1}
    assert counts[values.tolist().index(1)] / labels.GetNumberOfPixels() > 0.95
    assert result.kind == "lobes" and result.backend == "totalsegmentator"
    # A right upper lobe filling the image is not a lung: QC says so, without raising.
    assert not result.qc["passed"]
    assert {f["region"] for f in result.qc["flags"] if f["check"] == "present" and not f["passed"]} == \
        {"Right middle lobe", "Right lower lobe", "Left upper lobe", "Left lower lobe"}


@pytest.mark.slow
def test_real_package_log_exit_status_and_config(standin_run):
    result, root = standin_run
    assert result.info["returncode"] == 0 and result.info["mode"] == "fastest"
    log = (root / "run.log").read_text()
    assert "lungatlas runner: finished" in log and "Predicting" in log
    assert "lungatlas runner: finished" in result.info["log_tail"]
    assert result.info["datasets"] == ["Dataset298_TotalSegmentator_total_6mm_1559subj"]
    config = json.loads((root / "home" / "config.json").read_text())
    assert config["send_usage_stats"] is False


def test_missing_weights_stop_before_running(tmp_path):
    # python=/nonexistent proves that nothing was started: the check comes first.
    segmenter = get_segmenter("totalsegmentator", mode="fast", weights_dir=tmp_path / "weights",
                              home_dir=tmp_path / "home", python="/nonexistent/python")
    with pytest.raises(SegmentationError) as info:
        segmenter.segment(sitk.Image([8, 8, 8], sitk.sitkInt16), case_id="c1")
    message = str(info.value)
    assert "missing dataset folder" in message and "Dataset298_TotalSegmentator_total_6mm_1559subj" in message
    assert "Dataset297_TotalSegmentator_total_3mm_1559subj" in message
    assert "TOTALSEG_WEIGHTS_PATH" in message and "allow-download" in message
    # An incomplete folder (no checkpoint) is named as such.
    make_standin_weights(tmp_path / "weights", "fastest", force_label=FORCED_CODE)
    (tmp_path / "weights" / "Dataset297_TotalSegmentator_total_3mm_1559subj").mkdir()
    (tmp_path / "weights" / "Dataset298_TotalSegmentator_total_6mm_1559subj" / "nnUNetTrainer_4000epochs_NoMirroring"
     "__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(SegmentationError, match=r"incomplete dataset folder .*Dataset298.* lacks .*checkpoint_final.pth"):
        segmenter.check_ready()


def test_weights_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "shared_weights"))
    assert resolve_weights_dir()[0] == tmp_path / "shared_weights"
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH")
    (tmp_path / "ts_home" / "nnunet" / "results").mkdir(parents=True)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "ts_home"))
    monkeypatch.setenv("LUNGATLAS_TOTALSEG_HOME", str(tmp_path / "lungatlas_home"))
    # No weights in the LungAtlas home: the existing TOTALSEG_HOME_DIR weights are used.
    assert resolve_weights_dir()[0] == tmp_path / "ts_home" / "nnunet" / "results"
    (tmp_path / "lungatlas_home" / "nnunet" / "results").mkdir(parents=True)
    assert resolve_weights_dir()[0] == tmp_path / "lungatlas_home" / "nnunet" / "results"


def _fake_interpreter(path, body: str) -> str:
    """A stand-in for the Python interpreter that TotalSegmentator runs under."""
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("body, expected", [
    ("echo 'RuntimeError: CUDA out of memory' >&2; exit 3", r"exited with status 3; .*CUDA out of memory"),
    ("echo done; exit 0", r"exited 0 but wrote no output"),
])
def test_crash_and_empty_output_are_errors(standin, tmp_path, body, expected):
    _, weights = standin
    segmenter = get_segmenter("totalsegmentator", mode="fastest", weights_dir=weights, home_dir=tmp_path / "home",
                              python=_fake_interpreter(tmp_path / "python", body), log_path=tmp_path / "run.log")
    ct = sitk.Image([8, 8, 8], sitk.sitkInt16)
    with pytest.raises(SegmentationError, match=f"case c2: TotalSegmentator {expected}"):
        segmenter.segment(ct, case_id="c2")
    assert (tmp_path / "run.log").exists()


def test_cancel_kills_the_run(standin, tmp_path):
    _, weights = standin
    segmenter = get_segmenter("totalsegmentator", mode="fastest", weights_dir=weights, home_dir=tmp_path / "home",
                              python=_fake_interpreter(tmp_path / "python", "exec sleep 600"),
                              should_cancel=lambda: True, work_dir=tmp_path / "work")
    with pytest.raises(SegmentationError, match="case c3: TotalSegmentator cancelled"):
        segmenter.segment(sitk.Image([8, 8, 8], sitk.sitkInt16), case_id="c3")


@pytest.mark.slow
def test_real_package_crash_on_broken_weights(tmp_path, lung1_ct):
    # A checkpoint that torch cannot load: the real package raises inside the runner.
    make_standin_weights(tmp_path / "weights", "fastest", force_label=FORCED_CODE, corrupt=True)
    segmenter = get_segmenter("totalsegmentator", mode="fastest", weights_dir=tmp_path / "weights",
                              home_dir=tmp_path / "home", log_path=tmp_path / "run.log")
    with pytest.raises(SegmentationError, match=r"case c4: TotalSegmentator exited with status 3; .*failed"):
        segmenter.segment(lung1_ct, case_id="c4")
    assert "Traceback" in (tmp_path / "run.log").read_text()
