"""The LungAtlas module logic on a real MRML scene (slicer-core), with real CT.

The logic runs its long steps in a real background process (LungAtlasMRML/runner.py)
with the test-only backends of Testing/slicer_backends.py; everything MRML-side
(volume geometry, segment names and colours, grid transform direction,
hardening, storage round trips) is Slicer's own code from slicer-core.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.usefixtures("slicer_modules")

TESTING = Path(__file__).resolve().parent


@pytest.fixture()
def scene(slicer_modules):
    from LungAtlasMRML.headless import make_scene

    headless = make_scene(install=True)
    yield headless
    headless.close()


@pytest.fixture()
def logic(scene, ct_data):
    import LungAtlas

    logic = LungAtlas.LungAtlasLogic()
    logic.plugins = ["slicer_backends"]
    logic.environment = {
        "PYTHONPATH": str(TESTING),
        "LUNGATLAS_TEST_LUNGS": str(ct_data / "nsclc-lung1-001" / "lung1-001_lungs_4mm.nii.gz"),
        "OMP_NUM_THREADS": "1", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
    }
    return logic


@pytest.fixture(scope="module")
def lung1_path(ct_data):
    return ct_data / "nsclc-lung1-001" / "lung1-001_ct_4mm.nii.gz"


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory):
    """An atlas folder (phantom template + lobes, 6 mm) and a 'patient' made from it through the
    known transform of slicer_backends: patient(p) = atlas(moving_to_fixed(p))."""
    import slicer_backends
    from LungAtlasLib import phantom
    from LungAtlasLib.geometry import resample_to
    from LungAtlasLib.io import write_image

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    atlas = phantom.make_atlas_subject(spacing_mm=6.0)
    folder = tmp_path_factory.mktemp("atlas")
    write_image(atlas.ct, folder / "template.nii.gz")
    write_image(atlas.labels, folder / "template_lobes.nii.gz")
    # moving_to_fixed as an exact affine for making the patient: y = x/(1+S) - T/(1+S) (C = 0)
    m2f = sitk.AffineTransform(3)
    m2f.SetMatrix((np.eye(3) / (1 + slicer_backends.S)).ravel().tolist())
    m2f.SetTranslation((-slicer_backends.T / (1 + slicer_backends.S)).tolist())
    grid = sitk.Image(atlas.ct.GetSize(), sitk.sitkInt16)
    grid.SetSpacing(atlas.ct.GetSpacing())
    grid.SetOrigin(tuple(np.asarray(atlas.ct.GetOrigin()) + slicer_backends.T))
    grid = sitk.Resample(grid, [int(s * 1.1) for s in atlas.ct.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                         grid.GetOrigin(), grid.GetSpacing(), grid.GetDirection())
    ct = resample_to(atlas.ct, grid, transform=m2f, default_value=-1000)
    labels = resample_to(atlas.labels, grid, transform=m2f, is_label=True)
    density = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(atlas.labels) == 1).astype(np.float32) * 0.8)
    density.CopyInformation(atlas.ct)
    write_image(density, folder / "nodule_density_all.nii.gz")
    return {"folder": folder, "atlas": atlas, "ct": ct, "labels": labels}


def _node_names(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


# ---------------------------------------------------------------------------
# Input CT
# ---------------------------------------------------------------------------
def test_load_ct_matches_slicers_own_reader_in_ras(scene, logic, lung1_path):
    import slicer
    import vtk

    node = logic.loadCT(lung1_path)
    # Slicer's own reader (ITK-based NIfTI IO inside slicer-core) gives the reference IJK -> RAS.
    reference = scene.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "reference")
    storage = scene.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(lung1_path))
    assert storage.ReadData(reference)
    ours, theirs = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ours)
    reference.GetIJKToRASMatrix(theirs)
    ours = np.array([[ours.GetElement(r, c) for c in range(4)] for r in range(4)])
    theirs = np.array([[theirs.GetElement(r, c) for c in range(4)] for r in range(4)])
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # The file is LPS with origin (-249.5, -460.5, -681.5): in RAS x and y change sign, 4 mm voxels
    # along -x, -y, +z.
    np.testing.assert_allclose(ours[:3, 3], [249.51171875, 460.51171875, -681.5], atol=1e-6)
    np.testing.assert_allclose(np.diag(ours)[:3], [-4.0, -4.0, 4.0])
    assert np.array_equal(slicer.util.arrayFromVolume(node), slicer.util.arrayFromVolume(reference))


def test_bad_inputs_give_clear_errors(scene, logic, tmp_path):
    import LungAtlas
    from LungAtlasMRML import bridge

    with pytest.raises(LungAtlas.LungAtlasError, match="No input volume"):
        logic.segment(None, backend="test-lungsplit")
    mr_like = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 800, (8, 9, 10)).astype(np.float32))
    node = bridge.image_to_volume_node(mr_like, "T1 MR")
    with pytest.raises(LungAtlas.LungAtlasError, match="T1 MR does not look like a CT"):
        logic.segment(node, backend="test-lungsplit")
    (tmp_path / "template.nii.gz").write_bytes(b"")
    with pytest.raises(LungAtlas.LungAtlasError, match=r"incomplete: missing lobes"):
        logic.atlasFiles(tmp_path)


# ---------------------------------------------------------------------------
# Segment
# ---------------------------------------------------------------------------
def test_segment_real_ct_gives_named_coloured_lobes(scene, logic, lung1_path, ct_data):
    import slicer_backends
    from LungAtlasLib.labels import LABELS
    from LungAtlasMRML import bridge

    volume = logic.loadCT(lung1_path)
    progress = []
    segmentation = logic.segment(volume, backend="test-lungsplit", mode="fast", device="cpu",
                                 progressCallback=lambda p, m: progress.append(p))
    seg = segmentation.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == [r.slicer_segment for r in LABELS.lobes]
    for region in LABELS.lobes:
        np.testing.assert_allclose(seg.GetSegment(region.key).GetColor(), region.color_float, atol=1e-6)
    # Voxels: each segment holds exactly the stand-in's voxels of that value (no off-by-one value mapping).
    expected = slicer_backends.split_lungs(sitk.GetArrayFromImage(
        sitk.ReadImage(str(ct_data / "nsclc-lung1-001" / "lung1-001_lungs_4mm.nii.gz"))))
    labels, kind = bridge.segmentation_node_to_label_map(segmentation, volume)
    assert kind == "lobes"
    assert np.array_equal(sitk.GetArrayViewFromImage(labels), expected)
    qc = json.loads(segmentation.GetAttribute("LungAtlas.qc"))
    assert [f["check"] for f in qc["flags"] if not f["passed"]] == ["test_flag"]
    assert progress[-1] == 100


def test_segment_with_classical_backend_on_real_ct(scene, logic, lung1_path):
    from LungAtlasLib.segmentation import base

    if "classical" not in base.BACKENDS:
        pytest.skip("classical segmentation backend not in this build")
    volume = logic.loadCT(lung1_path)
    segmentation = logic.segment(volume, backend="classical", mode=None, device=None)
    seg = segmentation.GetSegmentation()
    names = sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments()))
    assert names == ["left lung", "right lung"]
    from LungAtlasMRML import bridge
    labels, kind = bridge.segmentation_node_to_label_map(segmentation, volume)
    volume_ml = {v: float((sitk.GetArrayViewFromImage(labels) == v).sum()) * 64 / 1000 for v in (1, 2)}
    # Adult lungs hold roughly 1-4 L each; LUNG1-001's left lung is partly replaced by tumour.
    assert 1000 < volume_ml[1] < 4500 and 500 < volume_ml[2] < 4000, volume_ml


def test_missing_weights_fail_cleanly_and_leave_the_scene_as_it_was(scene, logic, lung1_path):
    import LungAtlas

    volume = logic.loadCT(lung1_path)
    before = _node_names(scene.scene)
    with pytest.raises(LungAtlas.MissingWeightsError, match="put the weights folder there"):
        logic.checkBackend("segment", "test-missing-weights")
    with pytest.raises(LungAtlas.LungAtlasError, match="weights not found"):
        logic.segment(volume, backend="test-missing-weights")
    assert _node_names(scene.scene) == before


def test_cancel_kills_the_whole_process_tree(scene, logic, lung1_path):
    import psutil

    import LungAtlas

    volume = logic.loadCT(lung1_path)
    before = _node_names(scene.scene)
    child_pid = []
    started = threading.Event()

    def on_log(line):
        if line.startswith("CHILD "):
            child_pid.append(int(line.split()[1]))

    def on_progress(percent, message):
        if percent >= 30:
            started.set()

    errors = []
    runs = []

    def work():
        try:
            logic.segment(volume, backend="test-hang", logCallback=on_log, progressCallback=on_progress)
        except LungAtlas.LungAtlasError as exc:
            errors.append(str(exc))

    from LungAtlasMRML import process as process_module
    original_init = process_module.BackgroundProcess.__init__

    def remember(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        runs.append(self)

    process_module.BackgroundProcess.__init__ = remember
    try:
        thread = threading.Thread(target=work)
        thread.start()
        assert started.wait(60), "the hanging backend never reported progress"
        runs[0].cancel()
        thread.join(60)
    finally:
        process_module.BackgroundProcess.__init__ = original_init
    assert not thread.is_alive()
    assert errors and "cancelled" in errors[0]
    # The runner and the grandchild it started are both gone (or zombies awaiting their reaper).
    for pid in [runs[0].proc.pid] + child_pid:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert child_pid, "the backend's child pid was not reported"
    assert _node_names(scene.scene) == before


# ---------------------------------------------------------------------------
# Register, metrics, nodules
# ---------------------------------------------------------------------------
@pytest.fixture()
def registered(scene, logic, phantom_case):
    from LungAtlasMRML import bridge

    volume = bridge.image_to_volume_node(phantom_case["ct"], "patient")
    segmentation = bridge.label_map_to_segmentation_node(phantom_case["labels"], "lobes",
                                                         reference_volume_node=volume)
    transform, resampled = logic.register(volume, segmentation, str(phantom_case["folder"]),
                                          backend="test-analytic", ioSteps=3, device="cpu")
    return {"volume": volume, "segmentation": segmentation, "transform": transform, "resampled": resampled}


def test_registration_transform_hardening_moves_points_as_known(scene, registered, phantom_case):
    import slicer_backends
    from LungAtlasMRML import bridge

    assert registered["transform"].GetClassName() == "vtkMRMLGridTransformNode"
    patient_points = np.array([[30.0, -20.0, 15.0], [-60.0, 10.0, -40.0]])
    markups = bridge.points_to_markups_node(patient_points, ["a", "b"], name="nodules")
    markups.SetAndObserveTransformNodeID(registered["transform"].GetID())
    scene.transform_logic.hardenTransform(markups)
    moved, _labels = bridge.markups_node_to_points(markups)
    expected = slicer_backends.moving_to_fixed(patient_points)
    # within 0.5 mm: the field is sampled at 6 mm and inverted iteratively by Slicer; an affine
    # map is reproduced exactly by linear interpolation, so the error is only the inversion's.
    assert np.max(np.linalg.norm(moved - expected, axis=1)) < 0.5
    # The resampled CT lies on the atlas grid, and equals the atlas inside the lungs (the patient
    # was made from the atlas through the inverse of this very transform).
    warped = bridge.volume_node_to_image(registered["resampled"])
    atlas = phantom_case["atlas"]
    assert warped.GetSize() == atlas.ct.GetSize()
    np.testing.assert_allclose(warped.GetOrigin(), atlas.ct.GetOrigin(), atol=1e-4)
    lungs = sitk.GetArrayViewFromImage(atlas.labels) > 0
    difference = np.abs(sitk.GetArrayViewFromImage(warped).astype(float) - sitk.GetArrayViewFromImage(atlas.ct))
    assert np.median(difference[lungs]) < 40  # HU; two linear resamplings of a noisy 6 mm phantom


def test_metrics_table_and_chart(scene, logic, registered, phantom_case):
    import LungAtlas
    from LungAtlasMRML import bridge

    table, chart = logic.computeMetrics(registered["volume"], registered["segmentation"], registered["transform"],
                                        str(phantom_case["folder"]))
    rows = bridge.table_node_to_rows(table)
    columns = [table.GetTable().GetColumn(c).GetName() for c in range(table.GetTable().GetNumberOfColumns())]
    assert columns == LungAtlas.LungAtlasLogic.METRIC_COLUMNS
    assert [r["region"] for r in rows] == ["right_upper", "right_middle", "right_lower", "left_upper",
                                            "left_lower", "lung", "image", "lung_intensity"]
    by_region = {r["region"]: r for r in rows}
    # After: the exact inverse of how the patient was made (the patient grid is the atlas grid
    # shifted by T, so the two nearest-neighbour resamplings land on voxel centres: measured 1.000);
    # before: a 5 % scale and ~12 mm shift apart (measured 0.65-0.87).
    for region in ("right_upper", "left_lower", "lung"):
        assert by_region[region]["dice_after"] > 0.99
        assert by_region[region]["dice_after"] > by_region[region]["dice_before"] + 0.1
    assert by_region["lung_intensity"]["mse_after"] < by_region["lung_intensity"]["mse_before"]
    assert np.isnan(by_region["image"]["dice_after"])  # MSE rows carry no Dice
    assert chart.GetNumberOfPlotSeriesNodes() == 2


def test_nodules_map_into_atlas_space(scene, logic, registered):
    import slicer_backends
    from LungAtlasMRML import bridge

    patient = np.array([[25.0, 30.0, 20.0], [-50.0, -15.0, -30.0], [60.0, 5.0, 40.0]])
    markups = logic.createNoduleMarkups(patient, ["n1", "n2", "n3"])
    atlas = logic.mapNodulesToAtlas(markups, registered["transform"])
    atlas_points, labels = bridge.markups_node_to_points(atlas)
    assert labels == ["n1", "n2", "n3"]
    assert np.max(np.linalg.norm(atlas_points - slicer_backends.moving_to_fixed(patient), axis=1)) < 0.5
    # the patient-space list is untouched
    np.testing.assert_allclose(bridge.markups_node_to_points(markups)[0], patient, atol=1e-9)


def test_nlst_rows_become_points_in_their_lobe(scene, logic, phantom_case, tmp_path):
    pytest.importorskip("LungAtlasLib.nodules.inputs")
    from LungAtlasLib.cohort import nlst
    from LungAtlasMRML import bridge

    volume = bridge.image_to_volume_node(phantom_case["atlas"].ct, "atlas as patient")
    segmentation = bridge.label_map_to_segmentation_node(phantom_case["atlas"].labels, "lobes",
                                                         reference_volume_node=volume)
    n_slices = phantom_case["atlas"].ct.GetSize()[2]
    middle = n_slices // 2
    columns = list(dict.fromkeys(["pid", "study_yr", "sct_ab_num", "sct_ab_desc", "sct_epi_loc", "sct_slice_num",
                                  "sct_long_dia", "sct_perp_dia", *getattr(nlst, "CTAB_REQUIRED", [])]))
    rows = [{"pid": 100001, "study_yr": 0, "sct_ab_num": 1, "sct_ab_desc": 51, "sct_epi_loc": 1,
             "sct_slice_num": middle - 5, "sct_long_dia": 6, "sct_perp_dia": 5},
            {"pid": 100001, "study_yr": 0, "sct_ab_num": 2, "sct_ab_desc": 51, "sct_epi_loc": 8,
             "sct_slice_num": middle, "sct_long_dia": 7, "sct_perp_dia": 5},
            {"pid": 100002, "study_yr": 0, "sct_ab_num": 1, "sct_ab_desc": 51, "sct_epi_loc": 6,
             "sct_slice_num": middle, "sct_long_dia": 9, "sct_perp_dia": 8}]
    import pandas as pd
    pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows]).to_csv(tmp_path / "ctab.csv", index=False)
    node = logic.importNlstAbnormalities(str(tmp_path / "ctab.csv"), "100001", volume, segmentation)
    points, labels = bridge.markups_node_to_points(node)
    # Participant 100001 has two rows: the right-upper one is placed, code 8 ("other") is not guessed.
    assert len(points) == 1
    excluded = json.loads(node.GetAttribute("LungAtlas.excluded"))
    assert [e["status"] for e in excluded] == ["nlst_other_location"]
    index = sitk.GetArrayViewFromImage(phantom_case["atlas"].labels)
    ijk = phantom_case["atlas"].labels.TransformPhysicalPointToIndex(tuple(points[0]))
    assert index[ijk[2], ijk[1], ijk[0]] == 1  # the estimate lies in the right upper lobe


# ---------------------------------------------------------------------------
# Save and reload
# ---------------------------------------------------------------------------
def _storage_round_trip(scene, node, storage_class, path, new_class):
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    assert storage.WriteData(node), f"writing {path} failed"
    reloaded = scene.AddNewNodeByClass(new_class, f"{node.GetName()} reloaded")
    reader = scene.AddNewNodeByClass(storage_class)
    reader.SetFileName(str(path))
    assert reader.ReadData(reloaded), f"reading {path} failed"
    return reloaded


def test_nodes_save_and_reload(scene, logic, registered, phantom_case, tmp_path):
    import slicer_backends
    from LungAtlasLib.geometry import lps_to_ras
    from LungAtlasMRML import bridge

    s = scene.scene
    # Segmentation as .seg.nrrd: names, colours and voxels survive.
    seg = _storage_round_trip(s, registered["segmentation"], "vtkMRMLSegmentationStorageNode",
                              tmp_path / "lobes.seg.nrrd", "vtkMRMLSegmentationNode")
    original = registered["segmentation"].GetSegmentation()
    for i in range(original.GetNumberOfSegments()):
        segment_id = original.GetNthSegmentID(i)
        assert seg.GetSegmentation().GetSegment(segment_id).GetName() == original.GetSegment(segment_id).GetName()
        np.testing.assert_allclose(seg.GetSegmentation().GetSegment(segment_id).GetColor(),
                                   original.GetSegment(segment_id).GetColor(), atol=1e-3)
    a, _ = bridge.segmentation_node_to_label_map(registered["segmentation"], registered["volume"])
    b, _ = bridge.segmentation_node_to_label_map(seg, registered["volume"])
    assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b))

    # Transform as ITK .h5: Slicer writes the FromParent (atlas -> patient) transform, in LPS, which is
    # exactly the core's fixed_to_moving; reloaded, it maps points the same way.
    h5 = tmp_path / "patient_to_atlas.h5"
    transform = _storage_round_trip(s, registered["transform"], "vtkMRMLTransformStorageNode", h5,
                                    "vtkMRMLGridTransformNode")
    atlas_point = np.array([10.0, -25.0, 30.0])
    np.testing.assert_allclose(sitk.ReadTransform(str(h5)).TransformPoint(tuple(atlas_point)),
                               slicer_backends.fixed_to_moving(atlas_point), atol=1e-6)
    patient = np.array([[30.0, -20.0, 15.0]])
    np.testing.assert_allclose(bridge.map_points_to_parent(transform, lps_to_ras(patient)),
                               bridge.map_points_to_parent(registered["transform"], lps_to_ras(patient)), atol=1e-3)

    # Metrics table as .tsv and .csv.
    table, _chart = logic.computeMetrics(registered["volume"], registered["segmentation"], registered["transform"],
                                         str(phantom_case["folder"]))
    for suffix in (".tsv", ".csv"):
        reloaded = _storage_round_trip(s, table, "vtkMRMLTableStorageNode", tmp_path / f"metrics{suffix}",
                                       "vtkMRMLTableNode")
        rows, again = bridge.table_node_to_rows(table), bridge.table_node_to_rows(reloaded)
        assert [r["region"] for r in again] == [r["region"] for r in rows]
        np.testing.assert_allclose([r["dice_after"] for r in again], [r["dice_after"] for r in rows],
                                   rtol=1e-6, equal_nan=True)

    # Markups as .mrk.json.
    markups = logic.createNoduleMarkups(np.array([[1.0, 2.0, 3.0]]), ["n1"])
    reloaded = _storage_round_trip(s, markups, "vtkMRMLMarkupsJsonStorageNode", tmp_path / "nodules.mrk.json",
                                   "vtkMRMLMarkupsFiducialNode")
    np.testing.assert_allclose(bridge.markups_node_to_points(reloaded)[0], [[1.0, 2.0, 3.0]], atol=1e-6)


# ---------------------------------------------------------------------------
# Atlas view
# ---------------------------------------------------------------------------
def test_show_atlas_overlays_density_with_colour_map_and_opacity(scene, logic, phantom_case):
    composite = scene.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # one slice view's layers
    nodes = logic.showAtlas(str(phantom_case["folder"]), opacity=0.4, colorMap="PET-Heat")
    display = nodes["density"].GetDisplayNode()
    assert display.GetColorNode().GetName() == "PET-Heat"
    assert display.GetApplyThreshold() and display.GetLowerThreshold() > 0  # zero density is transparent
    assert display.GetWindowLevelMax() == pytest.approx(0.8)  # the map's maximum
    assert composite.GetBackgroundVolumeID() == nodes["template"].GetID()
    assert composite.GetForegroundVolumeID() == nodes["density"].GetID()
    assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    assert nodes["lobes"].GetSegmentation().GetNumberOfSegments() == 5
    logic.setDensityDisplay(nodes["density"], opacity=0.9, colorMap="Iron")
    assert composite.GetForegroundOpacity() == pytest.approx(0.9)
    assert display.GetColorNode().GetName() == "Iron"


def test_module_self_test_runs_under_slicer_core(scene):
    """The ScriptedLoadableModuleTest kept for real Slicer runs here too (on the stand-in base class)."""
    import LungAtlas

    test = LungAtlas.LungAtlasTest()
    test.runTest()
