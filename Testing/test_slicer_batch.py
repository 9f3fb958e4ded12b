"""The LungAtlasBatch module logic under slicer-core: arguments, background run, status table."""
from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.usefixtures("slicer_modules")


@pytest.fixture()
def batch(slicer_modules):
    from LungAtlasMRML.headless import make_scene

    headless = make_scene(install=True)
    import LungAtlasBatch

    yield LungAtlasBatch.LungAtlasBatchLogic()
    headless.close()


def test_arguments_choose_dicom_or_manifest_and_executor(batch, tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case_id,path\n")
    args = batch.buildArguments(tmp_path / "run", manifest, segmenter="classical", registration="classical",
                                scheduler="tcp://head:8786", workers=4)
    assert args[:3] == ["run", "--out", str(tmp_path / "run")]
    assert args[3:5] == ["--manifest", str(manifest)]
    assert "--scheduler" in args and "--workers" not in args  # a cluster address replaces local workers
    args = batch.buildArguments(tmp_path / "run", tmp_path, workers=2)
    assert args[3:5] == ["--dicom", str(tmp_path)] and args[args.index("--workers") + 1] == "2"
    with pytest.raises(ValueError, match="does not exist"):
        batch.buildArguments(tmp_path / "run", tmp_path / "missing")
    with pytest.raises(ValueError, match="output folder"):
        batch.buildArguments("", tmp_path)
    # The arguments are the cohort engine's own: its parser accepts them.
    from LungAtlasLib.cli import build_parser
    parsed = build_parser().parse_args(batch.buildArguments(tmp_path / "run", manifest, workers=2))
    assert parsed.command == "run" and parsed.workers == 2


def test_background_run_reports_the_engines_exit_status_and_error(batch, tmp_path):
    results = []
    process = batch.start(["status", "--out", str(tmp_path / "never-run")], waitForCompletion=True,
                          completedCallback=results.append)
    assert not process.isRunning()
    # `lungatlas status` on a folder with no run is a user error: exit 2 with a message naming the folder
    assert results[0].returncode == 2
    assert any("never-run" in line for line in results[0].log)
    assert "Bad input" in batch.describeResult(results[0])


def test_report_path_says_how_to_make_one(batch, tmp_path):
    with pytest.raises(FileNotFoundError, match="lungatlas report --out"):
        batch.reportPath(tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("<html></html>")
    assert batch.reportPath(tmp_path).name == "report.html"
