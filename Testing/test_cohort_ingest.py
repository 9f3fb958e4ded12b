"""Cohort ingest: a synthetic NLST-like DICOM tree (real headers, 8x8 pixels), the
series-selection rule with its reasons, the real LUNG1-001 series, and manifests."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from LungAtlasLib.cohort import config as cfgmod
from LungAtlasLib.cohort import ingest

RULE = cfgmod.default_config()["series_rule"]


def write_series(folder, pid, study_uid, study_date, *, n_slices=24, thickness=2.5, kernel="STANDARD",
                 orientation="axial", drop_slice=None, series_uid=None):
    """One tiny CT series: n_slices 8x8 slices, `thickness` mm apart, NLST-style headers."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    iop = {"axial": [1, 0, 0, 0, 1, 0], "coronal": [1, 0, 0, 0, 0, -1]}[orientation]
    normal = np.cross(iop[:3], iop[3:])
    for i in range(n_slices):
        if i == drop_slice:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", pid, study_uid, series_uid
        ds.StudyDate, ds.ConvolutionKernel, ds.SliceThickness = study_date, kernel, thickness
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [float(v) for v in np.array([-100.0, -100.0, 0.0]) + normal * i * thickness]
        ds.PixelSpacing = [0.7, 0.7]
        ds.InstanceNumber = i + 1
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((8, 8), 1000 + i, np.int16).tobytes()
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)
    return series_uid


@pytest.fixture(scope="module")
def nlst_tree(tmp_path_factory):
    """Three participants, NLST layout participant/study/series, 2-3 series per exam."""
    root = tmp_path_factory.mktemp("nlst_tree")
    uids = {}
    # 100001 T0: a thin LUNG-kernel series, a 2.5 mm STANDARD one (soft kernel preferred) and a 5 mm one
    s = generate_uid()
    uids["lung_thin"] = write_series(root / "100001" / "T0" / "s1", "100001", s, "19990102", thickness=1.25,
                                     kernel="LUNG", n_slices=30)
    uids["standard"] = write_series(root / "100001" / "T0" / "s2", "100001", s, "19990102", thickness=2.5,
                                    kernel="STANDARD")
    uids["thick"] = write_series(root / "100001" / "T0" / "s3", "100001", s, "19990102", thickness=5.0,
                                 kernel="STANDARD")
    # 100001 T1: the STANDARD series misses a slice -> the complete BONE one is chosen
    s = generate_uid()
    uids["gap"] = write_series(root / "100001" / "T1" / "s1", "100001", s, "20000102", kernel="STANDARD",
                               drop_slice=10)
    uids["bone"] = write_series(root / "100001" / "T1" / "s2", "100001", s, "20000102", kernel="BONE")
    # 200002 T2: only a coronal reformat and a 5 mm axial series -> no usable series
    s = generate_uid()
    write_series(root / "200002" / "T2" / "s1", "200002", s, "20010102", orientation="coronal")
    write_series(root / "200002" / "T2" / "s2", "200002", s, "20010102", thickness=5.0)
    # 200003 T0: one Siemens soft-kernel series, and a stray non-DICOM file
    s = generate_uid()
    uids["b30"] = write_series(root / "200003" / "T0" / "s1", "200003", s, "19990102", thickness=2.0,
                               kernel="B30f")
    (root / "200003" / "T0" / "notes").mkdir()
    (root / "200003" / "T0" / "notes" / "readme.txt").write_text("not DICOM")
    return root, uids


def test_index_reads_every_series_from_headers(nlst_tree):
    root, uids = nlst_tree
    series = ingest.index_dicom_tree(root, workers=2)
    readable = series[series["series_uid"].notna()]
    # 3 + 2 + 2 + 1 series were written; the text file is one unreadable-folder row
    assert len(readable) == 8
    assert len(series) == 9
    row = readable.set_index("series_uid").loc[uids["lung_thin"]]
    assert (row.participant_id, row.timepoint, row.kernel, row.n_slices) == ("100001", "T0", "LUNG", 30)
    assert row.slice_thickness_mm == pytest.approx(1.25)
    assert row.orientation == "axial" and bool(row.complete)
    gap = readable.set_index("series_uid").loc[uids["gap"]]
    # one of 24 slices removed: 23 slices and a 5 mm gap among 2.5 mm ones
    assert gap.n_slices == 23 and not gap.complete and "missing slice" in gap.problem
    assert set(readable["timepoint"]) == {"T0", "T1", "T2"}
    assert (readable["orientation"] == "coronal").sum() == 1


def test_series_rule_prefers_soft_kernel_and_records_reasons(nlst_tree):
    root, uids = nlst_tree
    exams = ingest.select_series(ingest.index_dicom_tree(root, workers=1), RULE)
    by_key = {(e.participant_id, e.timepoint): e for e in exams.itertuples() if e.timepoint}
    t0 = by_key[("100001", "T0")]
    # soft/standard kernel first (kernel_first), although the LUNG series is thinner
    assert t0.series_uid == uids["standard"]
    assert "soft/standard kernel" in t0.reason and "5 mm > 2.5 mm" in t0.reason
    # the incomplete STANDARD series is rejected: the complete BONE one is used, and the reason says so
    t1 = by_key[("100001", "T1")]
    assert t1.series_uid == uids["bone"] and "no soft/standard kernel available" in t1.reason
    assert "incomplete" in t1.reason
    none = by_key[("200002", "T2")]
    assert not none.selected and "not axial" in none.reason and "5 mm > 2.5 mm" in none.reason
    assert by_key[("200003", "T0")].series_uid == uids["b30"]
    # thinnest first when the kernel does not lead
    thin_first = ingest.select_series(ingest.index_dicom_tree(root, workers=1), {**RULE, "kernel_first": False})
    row = thin_first[(thin_first.participant_id == "100001") & (thin_first.timepoint == "T0")].iloc[0]
    assert row.series_uid == uids["lung_thin"]

    cases, problems = ingest.exams_to_cases(exams)
    assert sorted(cases["case_id"]) == ["100001_T0", "100001_T1", "200003_T0"]
    assert any("200002" in p and "no usable series" in p for p in problems)


def test_duplicate_exam_in_one_screening_year_is_reported(tmp_path):
    write_series(tmp_path / "300004" / "a" / "s1", "300004", generate_uid(), "19990102")
    write_series(tmp_path / "300004" / "b" / "s1", "300004", generate_uid(), "19990102")
    cases, problems = ingest.exams_to_cases(ingest.select_series(ingest.index_dicom_tree(tmp_path), RULE))
    assert list(cases["case_id"]) == ["300004_T0"]
    assert any("duplicate exam 300004_T0" in p for p in problems)


@pytest.mark.realdata
def test_index_real_lung1_series(lung1_dicom):
    series = ingest.index_dicom_tree(lung1_dicom, workers=1)
    assert len(series) == 1
    row = series.iloc[0]
    # LUNG1-001: 134 axial Siemens B19f slices 3 mm apart, not an NLST date
    assert (row.n_slices, row.kernel, row.orientation, bool(row.complete)) == (134, "B19f", "axial", True)
    assert row.slice_thickness_mm == pytest.approx(3.0) and row.timepoint is None
    rejected = ingest.select_series(series, RULE).iloc[0]
    assert not rejected.selected and "3 mm > 2.5 mm" in rejected.reason
    chosen = ingest.select_series(series, {**RULE, "max_thickness_mm": 3.0}).iloc[0]
    assert chosen.selected and chosen.series_uid == row.series_uid


def test_manifest_paths_ids_and_errors(tmp_path):
    (tmp_path / "m.csv").write_text("ct,participant_id,study_yr,age\nimgs/a.nii.gz,100001,0,61\n"
                                    "/abs/b.nrrd,100002,,70\n")
    table = ingest.read_manifest(tmp_path / "m.csv")
    assert list(table["case_id"]) == ["100001_T0", "100002"]
    assert table["ct"][0] == str((tmp_path / "imgs" / "a.nii.gz").resolve()) and table["ct"][1] == "/abs/b.nrrd"
    assert list(table["age"]) == [61, 70]
    (tmp_path / "dup.csv").write_text("case_id,ct\nx,a.nii.gz\nx,b.nii.gz\n")
    with pytest.raises(ValueError, match=r"dup.csv: duplicated case ids \['x'\]"):
        ingest.read_manifest(tmp_path / "dup.csv")
    (tmp_path / "noct.csv").write_text("case_id,image\nx,a.nii.gz\n")
    with pytest.raises(ValueError, match="no 'ct' column"):
        ingest.read_manifest(tmp_path / "noct.csv")


def test_documented_jobqueue_configuration_gives_gpu_job_scripts():
    """docs/examples/dask-jobqueue-slurm.yaml must give SLURM and PBS job scripts that
    request a GPU and start workers declaring the GPU resource the model stages ask for."""
    import copy
    from pathlib import Path

    import dask
    import dask_jobqueue
    import yaml

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "dask-jobqueue-slurm.yaml"
    config = yaml.safe_load(example.read_text())
    for kind in ("slurm", "pbs"):
        config["jobqueue"][kind]["interface"] = None  # the example's ib0 does not exist here
    saved = copy.deepcopy(dask.config.config)
    try:
        dask.config.update(dask.config.config, config, priority="new")
        with dask_jobqueue.SLURMCluster(scheduler_options={"dashboard_address": None}) as slurm:
            script = slurm.job_script()
        assert "#SBATCH --gres=gpu:1" in script and "--resources GPU=1" in script
        with dask_jobqueue.PBSCluster(scheduler_options={"dashboard_address": None}) as pbs:
            script = pbs.job_script()
        assert "ngpus=1" in script and "--resources GPU=1" in script
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)
