"""The cohort engine end to end on phantoms (6 mm) and the real LUNG1-001 CT, in process:
records, resume without recomputation, a changed parameter, a corrupt case, retry,
and the command-line front doors. Backends are the test-only ones of cohort_backends."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from LungAtlasLib import cli
from LungAtlasLib.cohort import pipeline, records


def calls(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="session")
def phantom_cohort(tmp_path_factory):
    """Atlas + 3 phantom subjects at 6 mm; the atlas phantom doubles as the given template."""
    from LungAtlasLib import demo

    root = tmp_path_factory.mktemp("phantom_cohort")
    manifest = demo.ensure_demo_cohort(root, 3, 6.0)
    template = root / "template"
    template.mkdir()
    atlas = manifest[manifest.is_atlas].iloc[0]
    shutil.copy(atlas.ct, template / "ct.nii.gz")
    shutil.copy(atlas.labels, template / "lobes.nii.gz")
    subjects = manifest[~manifest.is_atlas].drop(columns="is_atlas")
    return {"root": root, "template": template, "subjects": subjects}


def make_config(tmp_path, template, **registration_options):
    return {"plugins": ["cohort_backends"],
            "segmentation": {"name": "test-truth",
                             "options": {"labels": "{labels}", "calls_file": str(tmp_path / "seg_calls.txt")}},
            "registration": {"name": "test-centroid",
                             "options": {"calls_file": str(tmp_path / "reg_calls.txt"), **registration_options}},
            "template": {"path": str(template)}, "metrics": {"hausdorff": False},
            "aggregate": {"permutations": 9, "report": False},
            "execution": {"workers": 1}}


def write_manifest(tmp_path, cohort, extra_rows=()):
    rows = cohort["subjects"].to_dict("records") + list(extra_rows)
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_end_to_end_resume_parameter_change_corrupt_case_and_retry(tmp_path, phantom_cohort):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file")
    manifest = write_manifest(tmp_path, phantom_cohort, [{"case_id": "broken", "ct": str(broken), "labels": ""}])
    out = tmp_path / "run"
    pipeline.index_cohort(out, manifest=manifest)
    config = make_config(tmp_path, phantom_cohort["template"])

    first = pipeline.run_cohort(out, config, progress=False)
    # the corrupt case fails alone, with an error naming its file; the 3 phantoms finish
    assert (first["done"], first["failed"], first["failed_cases"]) == (3, 1, ["broken"])
    failure = records.read_record(out, "broken")["stages"]["segment"]
    assert failure["status"] == "failed" and str(broken) in failure["error"]
    assert "Traceback" in failure["traceback"]
    assert len(calls(tmp_path / "seg_calls.txt")) == 3 and len(calls(tmp_path / "reg_calls.txt")) == 3
    # centroid alignment must improve whole-lung overlap of the phantoms with the atlas
    # (poses differ by up to ~15 mm; measured 0.73 -> 0.85 at 6 mm)
    assert first["lung_dice_after_mean"] > first["lung_dice_before_mean"] + 0.05
    table = pd.read_parquet(out / "cohort_table.parquet")
    assert len(table) == 4 and set(table.loc[table.status == "done", "case_id"]) == {"demo001", "demo002", "demo003"}
    assert (out / "cases" / "demo001" / "case.log").read_text().count("stage segment done") == 1
    per_lobe = pd.read_csv(out / "aggregate" / "atlas" / "tables" / "lobe_rates.csv")
    # every phantom nodule that mapped into the atlas lungs is counted in one of the 5 lobes
    assert first["nodules_mapped"] > 0
    assert per_lobe["count"].sum() == first["nodules_mapped"] and len(per_lobe) == 5
    assert (out / "aggregate" / "atlas" / "maps" / "nodule_density_all.nii.gz").exists()
    record_times = {c: records.record_path(out, c).stat().st_mtime_ns for c in ("demo001", "demo002", "demo003")}

    # resume: nothing finished is recomputed (no backend call, records untouched); the failure stays recorded
    again = pipeline.run_cohort(out, None, progress=False)
    assert again["ran"] == {"segment": 0, "register": 0} and again["failed_cases"] == ["broken"]
    assert len(calls(tmp_path / "seg_calls.txt")) == 3 and len(calls(tmp_path / "reg_calls.txt")) == 3
    assert {c: records.record_path(out, c).stat().st_mtime_ns for c in record_times} == record_times

    # a changed registration parameter reruns registration and what follows, not segmentation
    seg_file = Path(records.read_record(out, "demo001")["stages"]["segment"]["outputs"]["labels"])
    seg_mtime = seg_file.stat().st_mtime_ns
    old_metrics_hash = records.read_record(out, "demo001")["stages"]["metrics"]["hash"]
    changed = pipeline.run_cohort(out, make_config(tmp_path, phantom_cohort["template"], shift_mm=6.0),
                                  progress=False)
    assert changed["ran"] == {"segment": 0, "register": 3}
    assert len(calls(tmp_path / "seg_calls.txt")) == 3 and len(calls(tmp_path / "reg_calls.txt")) == 6
    assert seg_file.stat().st_mtime_ns == seg_mtime
    assert records.read_record(out, "demo001")["stages"]["metrics"]["hash"] != old_metrics_hash
    # a 6 mm shift off the centroid alignment must cost overlap
    assert changed["lung_dice_after_mean"] < first["lung_dice_after_mean"]

    # retry after fixing the input: only the failed case runs
    shutil.copy(phantom_cohort["subjects"].iloc[0].ct, broken)
    cases = json.loads((out / "index" / "cases.json").read_text())
    for case in cases["cases"]:
        if case["case_id"] == "broken":
            case["labels"] = phantom_cohort["subjects"].iloc[0].labels
    (out / "index" / "cases.json").write_text(json.dumps(cases))
    retried = pipeline.run_cohort(out, None, retry_failed=True, progress=False)
    assert (retried["done"], retried["failed"]) == (4, 0)
    assert calls(tmp_path / "seg_calls.txt")[3:] and all("broken" in c for c in calls(tmp_path / "seg_calls.txt")[3:])
    assert len(calls(tmp_path / "reg_calls.txt")) == 7


@pytest.mark.realdata
def test_real_ct_case_through_the_pipeline(tmp_path, phantom_cohort, lung1_dicom):
    """LUNG1-001 (DICOM, 512x512x134) next to a phantom: read, lungs by threshold ("sides"),
    registered to the phantom template, metrics on whole lungs only."""
    manifest = write_manifest(tmp_path, {"subjects": phantom_cohort["subjects"].iloc[:1]},
                              [{"case_id": "LUNG1-001", "ct": str(lung1_dicom), "labels": ""}])
    out = tmp_path / "run"
    pipeline.index_cohort(out, manifest=manifest)
    summary = pipeline.run_cohort(out, make_config(tmp_path, phantom_cohort["template"]), progress=False)
    assert (summary["done"], summary["failed"]) == (2, 0)
    record = records.read_record(out, "LUNG1-001")
    assert record["stages"]["segment"]["summary"]["kind"] == "sides"
    # two adult lungs: several litres (threshold segmentation, tumour excluded)
    assert 2000 < record["stages"]["segment"]["summary"]["lung_volume_ml"] < 8000
    metrics = pd.read_csv(record["stages"]["metrics"]["outputs"]["table"])
    assert set(metrics["region"]) == {"lung", "image", "lung_intensity"}
    assert record["stages"]["metrics"]["summary"]["lung_dice_after"] > 0.3


def test_command_line_run_status_retry_report(tmp_path, phantom_cohort, capsys):
    missing = tmp_path / "missing.nii.gz"
    manifest = write_manifest(tmp_path, {"subjects": phantom_cohort["subjects"].iloc[:2]},
                              [{"case_id": "gone", "ct": str(missing), "labels": ""}])
    out = tmp_path / "run"
    config_file = tmp_path / "config.json"
    config = make_config(tmp_path, phantom_cohort["template"])
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "template"}))
    assert cli.main(["index", "--out", str(out), "--manifest", str(manifest)]) == 0
    code = cli.main(["run", "--out", str(out), "--config", str(config_file), "--template",
                     str(phantom_cohort["template"]), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1 and "2/3 cases finished, 1 failed" in printed and "gone" in printed
    assert cli.main(["status", "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "gone: segment:" in printed and "missing.nii.gz" in printed
    assert cli.main(["report", "--out", str(out)]) == 0
    assert len(pd.read_csv(out / "cohort_table.csv")) == 3
    # still missing: retry fails again, exit 1; the finished cases are not touched
    assert cli.main(["retry", "--out", str(out), "--no-progress"]) == 1
    assert len(calls(tmp_path / "seg_calls.txt")) == 2
    # bad input that the user fixes: one clear line and exit 2
    assert cli.main(["run", "--out", str(tmp_path / "empty")]) == 2
    assert "has no index yet" in capsys.readouterr().err
    assert cli.main(["run", "--out", str(out), "--registration-option", "novalue"]) == 2


def test_nlst_tables_reach_the_nodule_stage(tmp_path, phantom_cohort):
    """Phenotype columns land in the cohort table; ctab nodule rows (no coordinates) reach
    the nodule stage, which places them by lobe + slice or reports why it cannot."""
    subjects = phantom_cohort["subjects"].iloc[:1].assign(participant_id="100001", study_yr=0, case_id="100001_T0")
    manifest = tmp_path / "manifest.csv"
    subjects.drop(columns=["nodules"]).to_csv(manifest, index=False)
    tables = tmp_path / "cdas"
    tables.mkdir()
    (tables / "prsn.csv").write_text("pid,age,gender,cigsmok,pkyr\n100001,63,2,1,52.5\n")
    (tables / "screen.csv").write_text("pid,study_yr\n100001,0\n")
    (tables / "ctab.csv").write_text(
        "pid,study_yr,sct_ab_num,sct_ab_desc,sct_epi_loc,sct_long_dia,sct_perp_dia,sct_pre_att,sct_slice_num\n"
        "100001,0,1,51,3,9,7,1,20\n"     # right lower lobe, slice 20
        "100001,0,2,51,8,6,5,1,30\n"     # "other": no lobe, reported
        "100001,0,3,64,,,,,\n"           # not a nodule row
        "100001,1,1,51,1,6,5,1,30\n")    # another screening year: not this case
    out = tmp_path / "run"
    pipeline.index_cohort(out, manifest=manifest, nlst_tables=tables)
    summary = pipeline.run_cohort(out, make_config(tmp_path, phantom_cohort["template"]), progress=False)
    assert summary["done"] == 1
    table = pd.read_csv(out / "cohort_table.csv")
    assert table.loc[0, "gender"] == 2 and table.loc[0, "pkyr"] == 52.5 and table.loc[0, "n_nlst_nodules"] == 2
    record = records.read_record(out, "100001_T0")
    nodules = pd.read_csv(record["stages"]["nodules"]["outputs"]["table"])
    nlst_rows = nodules[nodules["source"] == "nlst_ctab"].set_index("nodule_id")
    assert sorted(nlst_rows.index) == ["100001_T0-ab1", "100001_T0-ab2"]
    assert nlst_rows.loc["100001_T0-ab2", "status"] == "nlst_other_location"
    assert record["stages"]["nodules"]["summary"]["n_nodules"] == 2


def test_unreachable_scheduler_and_escaping_case_ids(tmp_path, phantom_cohort):
    from LungAtlasLib.cohort.executor import Executor, SchedulerUnreachable

    # nothing listens on port 9 of this machine: one clear error naming the address
    with pytest.raises(SchedulerUnreachable, match="tcp://127.0.0.1:9"):
        with Executor(scheduler="tcp://127.0.0.1:9", connect_timeout="2s", progress=False):
            pass
    # a case id that tries to leave the run folder is written inside it
    subject = phantom_cohort["subjects"].iloc[:1].assign(case_id="../../escaped")
    manifest = tmp_path / "manifest.csv"
    subject.to_csv(manifest, index=False)
    out = tmp_path / "deep" / "run"
    pipeline.index_cohort(out, manifest=manifest)
    summary = pipeline.run_cohort(out, make_config(tmp_path, phantom_cohort["template"]), progress=False)
    assert summary["done"] == 1
    assert records.record_path(out, "../../escaped").parent.parent == (out / "cases").resolve()
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "deep" / "escaped").exists()


@pytest.mark.realdata
def test_dicom_tree_run_indexes_once(tmp_path, phantom_cohort, lung1_dicom, capsys):
    """`lungatlas run --dicom TREE` indexes, chooses the series (3 mm allowed by the config
    file here), runs; run again: the tree is not read again, nothing is recomputed."""
    config = make_config(tmp_path, phantom_cohort["template"])
    config["segmentation"]["options"]["labels"] = ""  # threshold lungs: the real CT has no truth
    config["series_rule"] = {"max_thickness_mm": 3.0}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--dicom", str(lung1_dicom), "--config", str(config_file), "--no-progress"]
    assert cli.main(argv) == 0
    assert "1/1 cases finished" in capsys.readouterr().out
    exams = pd.read_csv(out / "index" / "exams.csv")
    assert exams.loc[0, "selected"] and "chose" in exams.loc[0, "reason"]
    stamp = (out / "index" / "series.csv").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert "ran now: 0 segmentations, 0 registrations" in capsys.readouterr().out
    assert (out / "index" / "series.csv").stat().st_mtime_ns == stamp


def test_template_built_from_a_subset_once(tmp_path, phantom_cohort):
    """No template given: segment all, build one from the first `subset` cases (by id),
    register all to it; resume keeps it; a different subset builds a new one and reruns
    registration but not segmentation."""
    manifest = write_manifest(tmp_path, phantom_cohort)
    out = tmp_path / "run"
    pipeline.index_cohort(out, manifest=manifest)
    config = make_config(tmp_path, phantom_cohort["template"])
    config["template"] = {"path": None, "subset": 2, "builder": "cohort_backends:mean_template",
                          "options": {"calls_file": str(tmp_path / "template_calls.txt")}}
    summary = pipeline.run_cohort(out, config, progress=False)
    assert (summary["done"], summary["failed"]) == (3, 0)
    built = json.loads(next((out / "template").glob("*/template.json")).read_text())
    assert built["subset"] == ["demo001", "demo002"] and built["info"]["n"] == 2
    # registered to the built template: the first subset case's grid
    assert summary["template"] == built["ct"]
    assert calls(tmp_path / "template_calls.txt") == ["template 2"]

    again = pipeline.run_cohort(out, None, progress=False)
    assert again["ran"] == {"segment": 0, "register": 0} and len(calls(tmp_path / "template_calls.txt")) == 1

    config["template"]["subset"] = 3
    changed = pipeline.run_cohort(out, config, progress=False)
    assert changed["ran"] == {"segment": 0, "register": 3}
    assert calls(tmp_path / "template_calls.txt") == ["template 2", "template 3"]
    assert len(list((out / "template").glob("*/template.json"))) == 2


@pytest.mark.slow
def test_groupwise_template_with_classical_registration(tmp_path, phantom_cohort):
    """The product path: precomputed lobes, LungAtlas's groupwise template builder
    (1 round, 6 mm) from 2 of 3 phantoms, classical registration of all 3 to it; then a
    lung-only (classical) segmentation gives a sides template, never read as lobes."""
    from LungAtlasLib.registration.base import BACKENDS

    if "classical" not in BACKENDS:
        pytest.skip("classical registration backend not in this tree yet")
    pytest.importorskip("LungAtlasLib.template")
    manifest = write_manifest(tmp_path, phantom_cohort)
    out = tmp_path / "run"
    pipeline.index_cohort(out, manifest=manifest)
    config = {"segmentation": {"name": "precomputed", "options": {"path": "{labels}", "code_map": "lungatlas"}},
              "registration": {"name": "classical", "options": {"spacing_mm": 8.0, "threads": 1}},
              "template": {"path": None, "subset": 2, "options": {"rounds": 1, "spacing_mm": 6.0}},
              "metrics": {"hausdorff": False}, "aggregate": {"permutations": 9, "report": False}}
    summary = pipeline.run_cohort(out, config, progress=False)
    assert (summary["done"], summary["failed"]) == (3, 0)
    bundle = next((out / "template").glob("*/atlas.json")).parent
    assert (bundle / "template_ct.nii.gz").exists() and (bundle / "ct.nii.gz").exists()
    assert json.loads((bundle / "template.json").read_text())["kind"] == "lobes"
    # whole-lung overlap with the template must improve on the scanner-coordinate overlap
    # (phantom poses differ by up to ~15 mm)
    assert summary["lung_dice_after_mean"] > summary["lung_dice_before_mean"] + 0.05
    assert summary["lobe_dice_after_mean"] is not None

    config["segmentation"] = {"name": "classical", "options": {}}
    sides = pipeline.run_cohort(out, config, progress=False)
    assert sides["done"] == 3 and "no lobes" in sides["atlas_statistics"]
    kinds = [json.loads(p.read_text()).get("kind") for p in (out / "template").glob("*/template.json")]
    assert sorted(kinds) == ["lobes", "sides"]
