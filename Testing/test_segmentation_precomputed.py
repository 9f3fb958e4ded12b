"""Precomputed segmentations: TotalSegmentator label maps, Slicer .seg.nrrd, DICOM SEG.

The label-map test uses TotalSegmentator's own example output (lobes at the lung
bases, a 30-slice crop of a CT whose direction matrix flips x and y); the
.seg.nrrd and DICOM SEG are written here, from the phantom's known lobes, so the
expected output is exact.
"""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import SimpleITK as sitk

from LungAtlasLib import io
from LungAtlasLib.geometry import resample_to
from LungAtlasLib.labels import LABELS
from LungAtlasLib.segmentation import SegmentationError, get_segmenter
from LungAtlasLib.segmentation.precomputed import match_region

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


@pytest.fixture(scope="module")
def example(ct_data):
    folder = ct_data / "totalsegmentator-example"
    # example_seg.nii.gz is TotalSegmentator's output for example_ct_sm.nii.gz (its grid);
    # example_ct.nii.gz is a longer scan of another stretch of the same body.
    return io.read_image(folder / "example_ct_sm.nii.gz"), folder / "example_seg.nii.gz"


def test_totalsegmentator_label_map(example):
    ct, seg_path = example
    result = get_segmenter("precomputed", path=seg_path, code_map="totalsegmentator").segment(ct, "ts-example")
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(seg_path)))
    out = sitk.GetArrayFromImage(result.labels)
    assert result.labels.GetSize() == ct.GetSize() and result.labels.GetDirection() == ct.GetDirection()
    # Same grid (with flipped x and y axes): each TotalSegmentator code's voxels become
    # its lobe's voxels, count for count (the example holds 10, 11, 13, 14; no 12).
    for code, lobe in LABELS.totalsegmentator_to_lobe.items():
        assert (out == lobe).sum() == (raw == code).sum(), (code, lobe)
    assert (raw == 13).sum() > 0 and (out > 0).sum() == np.isin(raw, [10, 11, 12, 13, 14]).sum()
    # Only the lung bases are in this CT: QC says the right upper lobe is missing and
    # the middle lobe (a single 27 uL voxel here) is under 5 mL, the lungs are cut at the top and too small,
    # without raising; the HU check passes (the masks do lie on lung).
    failed = {(f["check"], f.get("region")) for f in result.qc["flags"] if not f["passed"]}
    assert failed == {("present", "Right upper lobe"), ("present", "Right middle lobe"),
                      ("not_cut", None), ("lung_volume", None)}
    assert (out == LABELS.lobe("right_middle").value).sum() == 1
    cut = next(f for f in result.qc["flags"] if f["check"] == "not_cut")
    assert cut["bottom_area_mm2"] == 0.0 and cut["top_area_mm2"] == 1035 * 9.0   # 1035 voxels of 3x3 mm


def test_unknown_codes_and_foreign_grids_are_errors(example, tmp_path):
    ct, seg_path = example
    with pytest.raises(SegmentationError, match=r"case c1: .*example_seg.nii.gz holds codes \[1, 2, 3"):
        get_segmenter("precomputed", path=seg_path, code_map="10:4,11:5,12:1,13:2,14:3").segment(ct, "c1")
    # A segmentation placed 2 m away from the CT (another scan) is refused, not resampled to nothing.
    moved = sitk.ReadImage(str(seg_path))
    moved.SetOrigin(tuple(o + 2000.0 for o in moved.GetOrigin()))
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(SegmentationError, match="case c2: .*moved.nii.gz lies mostly outside the CT"):
        get_segmenter("precomputed", path=tmp_path / "moved.nii.gz").segment(ct, "c2")
    with pytest.raises(SegmentationError, match="case c3: .*does not exist"):
        get_segmenter("precomputed", path=tmp_path / "{case_id}.nii.gz").segment(ct, "c3")


def test_sides_label_map_resampled_to_a_coarser_ct(ct_data):
    ct4 = io.read_image(ct_data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz")
    sides2 = ct_data / "nsclc-lung1-001" / "lung1-001_lungs_2mm.nii.gz"
    result = get_segmenter("precomputed", path=sides2, code_map="lungatlas", kind="sides").segment(ct4, "lung1")
    assert result.kind == "sides" and result.labels.GetSize() == ct4.GetSize()
    expected = resample_to(io.read_label_map(sides2), ct4, is_label=True)
    assert np.array_equal(sitk.GetArrayViewFromImage(result.labels), sitk.GetArrayViewFromImage(expected))
    assert result.qc["passed"], result.qc["failed"]


# ---------------------------------------------------------------------------
# Slicer .seg.nrrd (written byte for byte as Slicer 5 does: 4D "list" axis for layers)
# ---------------------------------------------------------------------------
def _write_seg_nrrd(path, layers: np.ndarray, reference: sitk.Image, segments: list[dict]) -> None:
    """layers: (n_layers, z, y, x) uint8; segments: dicts with name, layer, value."""
    n_layers = layers.shape[0]
    direction = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    columns = " ".join("(" + ",".join(f"{v:.10g}" for v in direction[:, i]) + ")" for i in range(3))
    size = reference.GetSize()
    header = ["NRRD0004", "type: unsigned char", "dimension: 4", "space: left-posterior-superior",
              f"sizes: {n_layers} {size[0]} {size[1]} {size[2]}", f"space directions: none {columns}",
              "kinds: list domain domain domain", "encoding: gzip",
              "space origin: (" + ",".join(f"{v:.10g}" for v in reference.GetOrigin()) + ")",
              "Segmentation_MasterRepresentation:=Binary labelmap",
              "Segmentation_ContainedRepresentationNames:=Binary labelmap|"]
    for i, seg in enumerate(segments):
        header += [f"Segment{i}_ID:=Segment_{i + 1}", f"Segment{i}_Name:={seg['name']}",
                   f"Segment{i}_Layer:={seg['layer']}", f"Segment{i}_LabelValue:={seg['value']}",
                   f"Segment{i}_Color:=0.5 0.5 0.5", f"Segment{i}_Extent:=0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}",
                   f"Segment{i}_Terminology:=Segmentation category and type - 3D Slicer General Anatomy list"
                   f"~SCT^123037004^Anatomical Structure~SCT^39607008^Lung~^^~Anatomic codes~^^~^^"]
    # NRRD's fastest axis comes first: layer, then x, y, z -> numpy (z, y, x, layer).
    data = np.ascontiguousarray(np.moveaxis(layers, 0, -1)).astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n\n").encode())
        f.write(gzip.compress(data))


def test_slicer_seg_nrrd_by_segment_names(phantom_subject, tmp_path):
    truth = sitk.GetArrayFromImage(phantom_subject.labels)
    # Two layers as Slicer stores overlapping-capable segmentations: right lobes in layer 0
    # (values 1-3), left lobes in layer 1 (values 1-2), names in Slicer's terminology wording
    # and in other spellings.
    layers = np.zeros((2, *truth.shape), np.uint8)
    for value in (1, 2, 3):
        layers[0][truth == value] = value
    layers[1][truth == 4] = 1
    layers[1][truth == 5] = 2
    segments = [{"name": "right upper lobe of lung", "layer": 0, "value": 1},
                {"name": "Right middle lobe", "layer": 0, "value": 2},
                {"name": "lung_lower_lobe_right", "layer": 0, "value": 3},
                {"name": "Left upper lobe of lung", "layer": 1, "value": 1},
                {"name": "LLL", "layer": 1, "value": 2},          # needs segment_names
                ]
    path = tmp_path / "lobes.seg.nrrd"
    _write_seg_nrrd(path, layers, phantom_subject.labels, segments)
    result = get_segmenter("precomputed", path=path, segment_names={"LLL": 5}).segment(phantom_subject.ct, "p3")
    assert result.kind == "lobes" and result.info["layers"] == 2
    assert np.array_equal(sitk.GetArrayViewFromImage(result.labels), truth)
    assert result.qc["passed"], result.qc["failed"]
    # Without the extra name the left lower lobe is simply absent, and QC says so.
    partial = get_segmenter("precomputed", path=path).segment(phantom_subject.ct, "p3")
    assert not partial.qc["passed"] and (sitk.GetArrayViewFromImage(partial.labels) == 5).sum() == 0


def test_segment_name_matching():
    assert match_region("right upper lobe of lung") == ("lobes", 1)
    assert match_region("lung_middle_lobe_right") == ("lobes", 2)
    assert match_region("Lower lobe of lung Right") == ("lobes", 3)
    assert match_region("Upper lobe of lung Left") == ("lobes", 4)
    assert match_region("left lung") == ("sides", 2)
    assert match_region("lung_vessels left") is None
    assert match_region("left upper lobe bronchus") is None
    assert match_region("Right lung nodule") is None
    assert match_region("left middle lobe") is None     # no such lobe
    assert match_region("liver") is None


# ---------------------------------------------------------------------------
# DICOM SEG (highdicom), on a CT series written here with pydicom
# ---------------------------------------------------------------------------
def _write_ct_series(ct: sitk.Image, folder) -> tuple[list, str]:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    array = sitk.GetArrayFromImage(ct).astype(np.int16)
    study, series, frame = generate_uid(entropy_srcs=["s"]), generate_uid(entropy_srcs=["se"]), generate_uid(entropy_srcs=["f"])
    datasets = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"i{k}"])
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P3", "Phantom^Three", "19500101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
            "19990102", "120000", "", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "LungAtlas test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = list(ct.TransformIndexToPhysicalPoint((0, 0, k)))
        ds.PixelSpacing = [ct.GetSpacing()[1], ct.GetSpacing()[0]]
        ds.SliceThickness = ct.GetSpacing()[2]
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = array[k].tobytes()
        pydicom.dcmwrite(folder / f"ct{k:03d}.dcm", ds, enforce_file_format=True)
        datasets.append(ds)
    return datasets, series


@pytest.fixture(scope="module")
def dicom_seg_case(tmp_path_factory):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from LungAtlasLib import phantom

    subject = phantom.make_subject(seed=5, spacing_mm=8.0)   # small: 43x32x37 voxels
    root = tmp_path_factory.mktemp("dicomseg")
    datasets, series_uid = _write_ct_series(subject.ct, root / "ct")
    truth = sitk.GetArrayFromImage(subject.labels)
    # IDC's NLST TotalSegmentator SEGs code lobes as SNOMED "Upper/Middle/Lower lobe of lung"
    # with a laterality modifier; labels here mix that with TotalSegmentator names.
    lobe_codes = {1: ("45653009", "Upper lobe of lung", "Right"), 2: ("72481006", "Middle lobe of right lung", None),
                  3: ("90572001", "Lower lobe of lung", "Right"), 4: ("45653009", "Upper lobe of lung", "Left"),
                  5: ("90572001", "Lower lobe of lung", "Left")}
    laterality = {"Right": ("24028007", "Right"), "Left": ("7771000", "Left")}
    labels = {1: "segment A", 2: "lung_middle_lobe_right", 3: "segment C", 4: "lung_upper_lobe_left", 5: "segment E"}
    algorithm = hd.AlgorithmIdentificationSequence(name="TotalSegmentator", version="2.18.0",
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number in range(1, 6):
        code, meaning, side = lobe_codes[number]
        description = hd.seg.SegmentDescription(
            segment_number=number, segment_label=labels[number],
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=hd.sr.CodedConcept(code, "SCT", meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        if side:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(laterality[side][0], "SCT", laterality[side][1])]
        descriptions.append(description)
    ordered = sorted(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
    seg = hd.seg.Segmentation(
        source_images=ordered, pixel_array=truth.astype(np.uint8), segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=100,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="LungAtlas test",
        manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    seg.save_as(root / "lobes_seg.dcm")
    return subject, root, series_uid, truth


def test_dicom_seg_lobes_by_coded_properties(dicom_seg_case):
    subject, root, series_uid, truth = dicom_seg_case
    ct = io.read_image(root / "ct")
    result = get_segmenter("precomputed", path=root / "lobes_seg.dcm", series_uid=series_uid).segment(ct, "p5")
    assert result.kind == "lobes" and result.info["source"] == "dicom_seg"
    assert result.info["referenced_series"] == [series_uid]
    # Same grid as the CT series: the lobes come back voxel for voxel.
    assert np.array_equal(sitk.GetArrayViewFromImage(result.labels), truth)


def test_dicom_seg_of_another_series_is_refused(dicom_seg_case):
    subject, root, _, _ = dicom_seg_case
    with pytest.raises(SegmentationError, match=r"case p5: DICOM SEG .*lobes_seg.dcm references series .* not the CT series 1\.2\.3"):
        get_segmenter("precomputed", path=root / "lobes_seg.dcm", series_uid="1.2.3").segment(subject.ct, "p5")


def test_cli_precomputed_dicom_folder(dicom_seg_case, tmp_path):
    from LungAtlasLib.cli import main
    from LungAtlasLib.paths import read_json

    _, root, series_uid, truth = dicom_seg_case
    status = main(["segment", "--ct", str(root / "ct"), "--backend", "precomputed",
                   "--labels", str(root / "lobes_seg.dcm"), "--out", str(tmp_path / "out")])
    assert status == 0
    labels = io.read_label_map(tmp_path / "out" / "labels.nii.gz")
    assert np.array_equal(sitk.GetArrayViewFromImage(labels), truth)
    record = read_json(tmp_path / "out" / "qc.json")
    assert record["kind"] == "lobes" and record["info"]["referenced_series"] == [series_uid]
