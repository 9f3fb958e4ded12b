"""`lungatlas demo` on the cohort engine: the whole pipeline on phantoms, resumable."""
from __future__ import annotations

import pytest

from LungAtlasLib import cli
from LungAtlasLib.cohort import records
from LungAtlasLib.registration.base import BACKENDS as REGISTRATIONS


def test_demo_runs_every_stage_and_resumes_without_recomputing(tmp_path, capsys):
    import cohort_backends  # noqa: F401 (registers the test registration here as well)

    # the product's classical registration (on an 8 mm grid) when it exists; the test stand-in until then
    registration = "classical" if "classical" in REGISTRATIONS else "test-centroid"
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--subjects", "2", "--spacing", "8", "--segmenter", "precomputed",
            "--registration", registration, "--plugin", "cohort_backends", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2/2 cases finished, 0 failed" in printed
    record = records.read_record(out, "demo001")
    assert [records.read_record(out, c)["stages"]["nodules"]["status"] for c in ("demo001", "demo002")] == ["done"] * 2
    # precomputed truth lobes of the phantom: all five lobes, metrics per lobe
    assert record["stages"]["segment"]["summary"]["kind"] == "lobes"
    assert record["stages"]["metrics"]["summary"]["lobe_dice_mean_after"] is not None
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cases").rglob("*") if p.is_file()}

    summary = out / "aggregate" / "summary.json"
    summary_stamp = summary.stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert "ran now: 0 segmentations, 0 registrations" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps, "a second demo run rewrote finished case files"
    assert summary.stat().st_mtime_ns == summary_stamp, "the unchanged aggregate was recomputed"
