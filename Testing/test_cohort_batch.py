"""The headless Slicer entry (LungAtlasBatch.main) under slicer-core: same arguments as
``lungatlas``, the scene cleared per case, and Slicer's exit status (never a silent 0)."""
from __future__ import annotations

import pytest

from test_cohort_pipeline import make_config, phantom_cohort, write_manifest  # noqa: F401 (fixture)


@pytest.fixture()
def batch(slicer_modules, monkeypatch):
    """The module file with a real MRML scene and a stand-in for slicer.util.exit
    (slicer-core has no application to exit); returns (module, scene, exit codes)."""
    import slicer
    from slicer import vtkMRMLScene

    import LungAtlasBatch

    scene = vtkMRMLScene()
    codes = []
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer.util, "exit", lambda code=0: codes.append(code), raising=False)
    return LungAtlasBatch, scene, codes


def test_headless_batch_exit_codes_and_scene_clearing(batch, tmp_path, phantom_cohort):
    import json

    module, scene, codes = batch
    manifest = write_manifest(tmp_path, {"subjects": phantom_cohort["subjects"].iloc[:2]},
                              [{"case_id": "gone", "ct": str(tmp_path / "gone.nii.gz"), "labels": ""}])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(tmp_path, phantom_cohort["template"])))
    out = tmp_path / "run"
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")  # left behind by an earlier case
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1

    # one case cannot be read: Slicer must exit 1, not 0
    assert module.main(["run", "--out", str(out), "--manifest", str(manifest), "--config", str(config),
                        "--no-progress"]) == 1
    assert codes == [1]
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0, "scene not cleared per case"

    # a run folder without failures: 0 (status of a folder with only finished cases)
    out_ok = tmp_path / "run_ok"
    manifest_ok = write_manifest(tmp_path, {"subjects": phantom_cohort["subjects"].iloc[:1]})
    assert module.main(["run", "--out", str(out_ok), "--manifest", str(manifest_ok), "--config", str(config),
                        "--no-progress"]) == 0
    assert module.main(["status", "--out", str(out_ok)]) == 0
    # bad arguments: argparse's 2; bad input: 2
    assert module.main(["run", "--bogus"]) == 2
    assert module.main(["status", "--out", str(tmp_path / "nothing")]) == 2
    assert codes == [1, 0, 0, 2, 2]
