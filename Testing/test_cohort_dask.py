"""The cohort on a real local Dask cluster with two worker processes, with a worker
killed in the middle of a case (os._exit in the test segmenter)."""
from __future__ import annotations

import pytest

from LungAtlasLib.cohort import pipeline, records
from LungAtlasLib.cohort.executor import Executor
from test_cohort_pipeline import calls, make_config, phantom_cohort, write_manifest  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def dask_config(tmp_path, cohort, kill_case, marker, kill_always=False, allowed_failures=2):
    config = make_config(tmp_path, cohort["template"])
    config["segmentation"]["options"].update(kill_case=kill_case, kill_marker=str(marker), kill_always=kill_always)
    config["execution"] = {"workers": 2, "memory_limit": "2GB", "allowed_failures": allowed_failures}
    return config


@pytest.mark.realdata
def test_killed_worker_loses_nothing_and_failed_case_retries(tmp_path, phantom_cohort, lung1_dicom):
    # phantoms and the real LUNG1-001 CT (DICOM) in one cohort
    mixed = write_manifest(tmp_path, phantom_cohort, [{"case_id": "LUNG1-001", "ct": str(lung1_dicom), "labels": ""}])
    manifest = tmp_path / "phantoms.csv"
    phantom_cohort["subjects"].to_csv(manifest, index=False)
    out = tmp_path / "run"
    pipeline.index_cohort(out, manifest=mixed)
    marker = tmp_path / "killed-once"

    # 1. the worker running demo002 dies once; Dask restarts it and reschedules the case
    config = dask_config(tmp_path, phantom_cohort, "demo002", marker)
    with Executor(progress=False, **config["execution"]) as executor:
        summary = pipeline.run_cohort(out, config, executor=executor)
    assert marker.exists(), "the test segmenter did not kill its worker"
    assert (summary["done"], summary["failed"]) == (4, 0)
    # each case segmented exactly once (the killed attempt never reached its count line)
    assert sorted(line.split()[1] for line in calls(tmp_path / "seg_calls.txt")) == \
        ["LUNG1-001", "demo001", "demo002", "demo003"]
    assert records.read_record(out, "LUNG1-001")["stages"]["segment"]["summary"]["kind"] == "sides"
    # demo002 finished in another process than the one that died on it
    killed_pid = int(marker.read_text())
    assert records.read_record(out, "demo002")["stages"]["segment"]["worker_pid"] != killed_pid

    # 2. a case whose worker dies every time: recorded as failed once Dask gives up; the rest is kept
    out2 = tmp_path / "run2"
    pipeline.index_cohort(out2, manifest=manifest)
    (tmp_path / "seg_calls.txt").unlink()
    config = dask_config(tmp_path, phantom_cohort, "demo003", marker, kill_always=True, allowed_failures=0)
    summary = pipeline.run_cohort(out2, config, progress=False)
    assert (summary["done"], summary["failed_cases"]) == (2, ["demo003"])
    failure = records.read_record(out2, "demo003")["stages"]["segment"]
    assert failure["status"] == "failed" and "KilledWorker" in failure["error"]
    finished = {c: records.record_path(out2, c).stat().st_mtime_ns for c in ("demo001", "demo002")}

    # 3. `retry` once the cause is gone: only demo003 runs, the finished cases are untouched
    marker.unlink()  # kill_always kills only while the marker exists: same options, same hashes
    config["execution"]["workers"] = 1  # execution options may change on retry; results do not depend on them
    summary = pipeline.run_cohort(out2, config, retry_failed=True, progress=False)
    assert (summary["done"], summary["failed"]) == (3, 0)
    assert [line.split()[1] for line in calls(tmp_path / "seg_calls.txt")].count("demo003") == 1
    assert {c: records.record_path(out2, c).stat().st_mtime_ns for c in finished} == finished
