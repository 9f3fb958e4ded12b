"""The cohort run, start to end: index -> segment -> template -> register -> metrics ->
nodules -> aggregate, resumable from the records in the run folder.

Python API (what the command line, the demo and LungAtlasBatch call)::

    from LungAtlasLib.cohort import pipeline
    pipeline.index_cohort(out, dicom="/data/NLST", nlst_tables="/data/cdas", config=cfg)
    summary = pipeline.run_cohort(out, config=cfg)        # resumes; finished work is kept
    summary = pipeline.run_cohort(out, retry_failed=True) # `lungatlas retry`
    pipeline.status(out)                                  # counts and failures, from the records
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..paths import inside, read_json, write_json_atomic, write_text_atomic
from . import config as cfgmod
from . import ingest, nlst, records
from .executor import Executor
from .stages import CaseFailed, run_case

log = logging.getLogger(__name__)

SEGMENT_PHASE = ("segment",)
ATLAS_PHASE = ("register", "metrics", "nodules")


class CohortError(RuntimeError):
    """A problem with the cohort as a whole (no cases, no template); the message says what to do."""


# ---------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------
def _clean(value):
    """JSON-safe scalars: numpy -> Python, NaN/NA -> None (lists of dicts cleaned inside)."""
    if isinstance(value, list):
        return [{k: _clean(v) for k, v in item.items()} if isinstance(item, dict) else _clean(item)
                for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value


def cases_path(out) -> Path:
    return inside(out, "index", "cases.json")


def index_cohort(out, *, dicom=None, manifest=None, nlst_tables=None, config: dict | None = None,
                 workers: int = 2) -> dict:
    """Build ``index/`` under ``out``: the series table (DICOM), the exams with the chosen
    series and why, the NLST join, and ``cases.json`` (the cases to run). Returns a summary."""
    config = cfgmod.merge(cfgmod.default_config(), config or {})
    if (dicom is None) == (manifest is None):
        raise CohortError("give exactly one input: a DICOM folder (--dicom) or a manifest CSV (--manifest)")
    out = Path(out)
    folder = inside(out, "index")
    folder.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    started = time.perf_counter()
    if dicom is not None:
        series = ingest.index_dicom_tree(dicom, workers=workers)
        exams = ingest.select_series(series, config["series_rule"])
        cases, exam_problems = ingest.exams_to_cases(exams)
        problems += exam_problems
        for name, table in (("series", series), ("exams", exams)):
            table.to_csv(folder / f"{name}.csv", index=False)
            table.astype({c: "string" for c in table.columns if table[c].dtype == object}).to_parquet(
                folder / f"{name}.parquet", index=False)
        source = {"dicom": str(Path(dicom).resolve())}
        n_series = len(series)
    else:
        cases = ingest.read_manifest(manifest)
        source = {"manifest": str(Path(manifest).resolve())}
        n_series = len(cases)
    if nlst_tables is not None:
        found = nlst.read_cdas_folder(nlst_tables)
        prsn = screen = ctab = None
        if found["prsn"] is not None:
            prsn, p = nlst.read_participants(found["prsn"])
            problems += p
        if found["screen"] is not None:
            screen, p = nlst.read_screens(found["screen"])
            problems += p
        if found["ctab"] is not None:
            ctab, p = nlst.read_abnormalities(found["ctab"])
            problems += p
        if "participant_id" not in cases.columns:
            raise CohortError("NLST tables need a participant_id for each case (from DICOM PatientID or "
                              "a participant_id column in the manifest)")
        cases, p = nlst.join_to_cases(cases, prsn, screen, ctab)
        problems += p
        source["nlst_tables"] = {k: str(v) if v else None for k, v in found.items()}
    rows = [{k: _clean(v) for k, v in row.items()} for row in cases.to_dict("records")]
    write_json_atomic(cases_path(out), {"source": source, "cases": rows})
    flat = cases.drop(columns=["nlst_nodules"], errors="ignore")
    flat.to_csv(folder / "cases.csv", index=False)
    write_text_atomic(folder / "problems.txt", "".join(p + "\n" for p in problems))
    summary = {"series": n_series, "cases": len(rows), "problems": len(problems),
               "seconds": round(time.perf_counter() - started, 2), "index": str(folder)}
    log.info("index: %d series -> %d cases, %d problems (index/problems.txt)", n_series, len(rows), len(problems))
    return summary


def load_cases(out) -> list[dict]:
    path = cases_path(out)
    if not path.exists():
        raise CohortError(f"{out} has no index yet: run `lungatlas index --out {out} --dicom DIR|--manifest CSV` "
                          "(or give --dicom/--manifest to `lungatlas run`)")
    return read_json(path)["cases"]


# ---------------------------------------------------------------------------
# Planning: what is done, what must run
# ---------------------------------------------------------------------------
def case_input(case: dict) -> dict:
    """The fields of a case that its results depend on (besides the configuration)."""
    return {"ct": case.get("ct"), "series_uid": case.get("series_uid"), "labels": case.get("labels"),
            "nodules": case.get("nodules"), "nlst_nodules": case.get("nlst_nodules")}


def plan(out, config: dict, cases: list[dict], template_hash: str | None) -> pd.DataFrame:
    """Per case: the stage hashes and whether each stage is done / failed / to run."""
    rows = []
    for case in cases:
        hashes = cfgmod.case_stage_hashes(config, case_input(case), template_hash)
        record = records.read_record(out, case["case_id"]) if records.record_path(out, case["case_id"]).exists() \
            else {"stages": {}}
        row = {"case_id": case["case_id"], "hashes": hashes}
        for stage, h in hashes.items():
            entry = record["stages"].get(stage)
            if records.stage_is_done(record, stage, h):
                row[stage] = "done"
            elif entry and entry.get("status") == records.FAILED and entry.get("hash") == h:
                row[stage] = "failed"
            else:
                row[stage] = "todo"
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------
# Template
# ---------------------------------------------------------------------------
TEMPLATE_FILES = ("ct.nii.gz", "lobes.nii.gz")


def _given_template(path) -> dict:
    """A template folder: ct.nii.gz + lobes.nii.gz, or an atlas bundle written by
    ``template.write_atlas`` (atlas.json naming template_ct and template_labels)."""
    folder = Path(path)
    atlas_json = folder / "atlas.json"
    if atlas_json.exists():
        files = read_json(atlas_json).get("files", {})
        ct, labels = files.get("template_ct"), files.get("template_labels") or files.get("lobe_labels")
        if ct and labels and (folder / ct).exists() and (folder / labels).exists():
            return {"ct": str(folder / ct), "labels": str(folder / labels), "source": str(folder)}
    missing = [name for name in TEMPLATE_FILES if not (folder / name).exists()]
    if missing:
        raise CohortError(f"template folder {folder} lacks {missing}: a template is a folder with the template "
                          "CT (ct.nii.gz) and its lobe labels (lobes.nii.gz), or an atlas bundle with atlas.json")
    return {"ct": str(folder / "ct.nii.gz"), "labels": str(folder / "lobes.nii.gz"), "source": str(folder)}


def _template_builder(config: dict):
    """The configured builder function (``template.builder``, "module:function")."""
    import importlib

    spec = config["template"].get("builder") or cfgmod.DEFAULT_CONFIG["template"]["builder"]
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CohortError(f"template builder {spec!r} cannot be imported ({exc}); give an existing template "
                          "folder with --template DIR (ct.nii.gz + lobes.nii.gz)") from None
    try:
        return getattr(module, function)
    except AttributeError:
        raise CohortError(f"template builder {spec!r}: {module_name} has no {function}") from None


def _build_template_task(subset: list[dict], config: dict, folder: str) -> dict:
    """Build the template from the subset's CTs and segmentations, on a worker (a GPU one
    when the registration is a model). The builder is called as
    ``builder(cts, label_maps, case_ids=[...], registration=NAME, registration_options={...},
    folder=PATH, **template.options)`` and returns an object (or dict) with ``ct`` and
    ``labels`` images and optionally ``info``; it may write more files into ``folder``."""
    from .stages import load_plugins, read_case_ct
    from ..io import read_label_map, write_image

    load_plugins(config)
    builder = _template_builder(config)
    cts = [read_case_ct(c) for c in subset]
    labels = [read_label_map(c["labels_path"]) for c in subset]
    # lobes only when every subset case has lobes; otherwise a lung-sides template
    # (1 right, 2 left), never sides read as lobes 1 and 2
    kind = "lobes" if all(c.get("labels_kind", "lobes") == "lobes" for c in subset) else "sides"
    if kind == "sides":
        from ..labels import LABELS

        def as_sides(image, case):
            if case.get("labels_kind", "lobes") == "sides":
                return image
            sides = sitk.GetImageFromArray(LABELS.side_map(sitk.GetArrayFromImage(image)))
            sides.CopyInformation(image)
            return sides

        labels = [as_sides(image, case) for image, case in zip(labels, subset)]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    built = builder(cts, labels, case_ids=[c["case_id"] for c in subset], registration=config["registration"]["name"],
                    registration_options=config["registration"].get("options") or {}, folder=str(folder),
                    **(config["template"].get("options") or {}))
    get = built.get if isinstance(built, dict) else (lambda key, default=None: getattr(built, key, default))
    write_image(get("ct"), folder / "ct.nii.gz")
    write_image(sitk.Cast(get("labels"), sitk.sitkUInt8), folder / "lobes.nii.gz")
    return {"ct": str(folder / "ct.nii.gz"), "labels": str(folder / "lobes.nii.gz"), "source": "built",
            "kind": kind, "info": get("info", {}) or {}}


def ensure_template(out, config: dict, cases: list[dict], plan_table: pd.DataFrame, executor: Executor) -> dict:
    """The template to register to: a given folder, or one built once from the first
    ``subset`` segmented cases (by case id) and kept under ``template/<hash>/``."""
    if config["template"].get("path"):
        template = _given_template(config["template"]["path"])
        template["hash"] = cfgmod.template_hash(config, {})
        return template
    done = plan_table[plan_table["segment"] == "done"].sort_values("case_id")
    subset_ids = list(done["case_id"][: int(config["template"]["subset"])])
    if not subset_ids:
        raise CohortError("no segmented case to build a template from (all segmentations failed?)")
    hashes = {cid: h["segment"] for cid, h in zip(done["case_id"], done["hashes"]) if cid in subset_ids}
    h = cfgmod.template_hash(config, hashes)
    folder = inside(out, "template", h)
    marker = folder / "template.json"
    if marker.exists():
        return read_json(marker)
    by_id = {c["case_id"]: c for c in cases}
    subset = []
    for cid in subset_ids:
        record = records.read_record(out, cid)
        segment = record["stages"]["segment"]
        subset.append({**by_id[cid], "labels_path": segment["outputs"]["labels"],
                       "labels_kind": segment["summary"].get("kind", "lobes")})
    result = executor.map_cases(_build_template_task, [("template", (subset, config, str(folder)), {})],
                                label="template", gpu=True)
    status, value = result["template"]
    if status != "ok":
        raise CohortError(f"building the template failed: {type(value).__name__}: {value}")
    value.update(hash=h, subset=subset_ids)
    write_json_atomic(marker, value)
    return value


# ---------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------
def _record_lost_case(out, case_id: str, stages: tuple, hashes: dict, exc: BaseException) -> None:
    """A task that ended without recording (its worker died, the task was cancelled):
    record the failure on the first unfinished stage so that `retry` picks it up."""
    try:
        _write_lost_case(out, case_id, stages, hashes, exc)
    except OSError as write_error:  # e.g. a full disk: say so, keep the batch going
        log.error("case %s failed (%s) and its record could not be written: %s", case_id, exc, write_error)


def _write_lost_case(out, case_id, stages, hashes, exc) -> None:
    record = records.read_record(out, case_id)
    for stage in stages:
        if not records.stage_is_done(record, stage, hashes[stage]):
            entry = record["stages"].get(stage) or {}
            record["stages"][stage] = {
                "status": records.FAILED, "hash": hashes[stage], "error": f"{type(exc).__name__}: {exc}",
                "traceback": ("the task ended without recording its result: its worker was lost (killed, out "
                              "of memory, crashed) or the task could not start; see cases/<case>/case.log\n"
                              + "".join(traceback.format_exception(exc))),
                "finished": time.time(), "attempts": int(entry.get("attempts", 0)) + 1}
            records.write_record(out, record)
            return


def _run_phase(out, config, cases_by_id, plan_table, stages, template, executor, retry_failed, on_case):
    items, skipped_failed, hashes_by_id = [], [], {}
    for row in plan_table.itertuples(index=False):
        states = [getattr(row, s) for s in stages]
        hashes_by_id[row.case_id] = row.hashes
        if all(s == "done" for s in states):
            continue
        if stages == ATLAS_PHASE and row.segment != "done":
            continue  # not segmented (failed): nothing to register
        first_open = next(s for s in states if s != "done")
        if first_open == "failed" and not retry_failed:
            skipped_failed.append(row.case_id)
            continue
        items.append((row.case_id, (cases_by_id[row.case_id], config, str(out), row.hashes, template),
                      {"stages": stages, "retry_failed": retry_failed}))
    if not items:
        return {}, skipped_failed

    def handle(case_id, status, value):
        if status == "error" and not isinstance(value, CaseFailed):
            _record_lost_case(out, case_id, stages, hashes_by_id[case_id], value)
        for listener in ([on_case] if on_case is not None else []) + list(_CASE_LISTENERS):
            listener(case_id, status, value)

    results = executor.map_cases(run_case, items, label="segment" if stages == SEGMENT_PHASE else "cases",
                                 gpu=True, retries=int(config["execution"].get("retries", 0)), on_result=handle)
    return results, skipped_failed


def check_backends(config: dict) -> None:
    """Refuse to start (one clear error, not one failure per case) when a configured
    backend name is unknown here; the backends' own readiness checks run on the workers."""
    from ..registration.base import BACKENDS as REGISTRATIONS
    from ..segmentation.base import BACKENDS as SEGMENTERS
    from .stages import load_plugins

    try:
        load_plugins(config)
    except ImportError as exc:
        raise CohortError(f"plugin module cannot be imported: {exc}") from None
    for kind, registry, key in (("segmentation", SEGMENTERS, "segmentation"),
                                ("registration", REGISTRATIONS, "registration")):
        name = config[key]["name"]
        if name not in registry:
            raise CohortError(f"unknown {kind} backend {name!r}; available here: {sorted(registry) or 'none'} "
                              "(a plugin module can register more: --plugin MODULE)")


_CASE_LISTENERS: list = []


class case_listener:
    """Within this context, ``fn(case_id, status, value)`` is called as each case task ends,
    in the calling process (e.g. LungAtlasBatch clears the Slicer scene per case)."""

    def __init__(self, fn):
        self.fn = fn

    def __enter__(self):
        _CASE_LISTENERS.append(self.fn)
        return self.fn

    def __exit__(self, *exc):
        _CASE_LISTENERS.remove(self.fn)
        return False


def run_cohort(out, config: dict | None = None, *, retry_failed: bool = False, executor: Executor | None = None,
               on_case=None, progress: bool = True) -> dict:
    """Run (or resume) every stage for every indexed case. Returns a summary with the
    counts of finished/failed cases and the stages that ran now.

    ``config`` replaces the stored run configuration (stored for the next resume);
    ``None`` reuses it. ``on_case(case_id, status, value)`` is called as each case task ends.
    """
    out = Path(out).resolve()
    stored = cfgmod.load_run_config(out)
    config = cfgmod.merge(cfgmod.default_config(), config) if config is not None else stored
    if config is None:
        raise CohortError(f"{out} has no run configuration: run `lungatlas run --out {out} ...` first")
    check_backends(config)
    cfgmod.save_run_config(out, config)
    cases = load_cases(out)
    if not cases:
        raise CohortError(f"the index of {out} holds no case (see {out / 'index' / 'problems.txt'})")
    cases_by_id = {c["case_id"]: c for c in cases}
    started = time.perf_counter()
    if executor is None:
        executor = Executor(progress=progress, **config["execution"])
    ran = {"segment": 0, "register": 0}
    # an executor already started by the caller stays open for the caller's next run
    def count(results):
        for status, value in results.values():
            if status == "ok":
                for stage in ("segment", "register"):
                    ran[stage] += stage in value["ran"]

    with (executor if executor.client is None else _nullcontext(executor)):
        if config["template"].get("path"):
            # a given template: no barrier between segmentation and registration, each case
            # runs all its stages in one task (workers stay busy to the end)
            template = _given_template(config["template"]["path"])
            template["hash"] = cfgmod.template_hash(config, {})
            table = plan(out, config, cases, template["hash"])
            count(_run_phase(out, config, cases_by_id, table, cfgmod.CASE_STAGES, template, executor,
                             retry_failed, on_case)[0])
        else:
            table = plan(out, config, cases, None)
            count(_run_phase(out, config, cases_by_id, table, SEGMENT_PHASE, None, executor, retry_failed,
                             on_case)[0])
            table = plan(out, config, cases, None)
            template = None
            if (table["segment"] == "done").any():
                template = ensure_template(out, config, cases, table, executor)
                table = plan(out, config, cases, template["hash"])
                count(_run_phase(out, config, cases_by_id, table, ATLAS_PHASE, template, executor,
                                 retry_failed, on_case)[0])
    cohort = records.write_cohort_table(out, [c["case_id"] for c in cases])
    aggregate_info = {}
    if template:
        # the cases' results are safe on disk; a failing cohort statistic must not hide them
        try:
            aggregate_info = aggregate(out, cohort, template, config.get("aggregate"))
        except Exception as exc:
            log.error("aggregate failed (the case results are complete; `lungatlas report --out %s` "
                      "retries it): %s", out, "".join(traceback.format_exception(exc)))
            aggregate_info = {"aggregate_error": f"{type(exc).__name__}: {exc}"}
    final = plan(out, config, cases, template["hash"] if template else None)
    done = int(sum(all(getattr(r, s) == "done" for s in cfgmod.CASE_STAGES) for r in final.itertuples()))
    failed = sorted(r.case_id for r in final.itertuples() if any(getattr(r, s) == "failed"
                                                                 for s in cfgmod.CASE_STAGES))
    summary = {"cases": len(cases), "done": done, "failed": len(failed), "failed_cases": failed,
               "ran": ran, "seconds": round(time.perf_counter() - started, 1),
               "template": template.get("ct") if template else None, **aggregate_info}
    write_json_atomic(inside(out, "run_summary.json"), summary)
    return summary


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------
# Aggregate
# ---------------------------------------------------------------------------
def aggregate(out, cohort: pd.DataFrame, template: dict, options: dict | None = None) -> dict:
    """Cohort-level results from the finished cases: all nodules in atlas space
    (``aggregate/nodules_in_atlas.csv``), the alignment metrics of every case, and the
    nodule atlas of :mod:`..nodules.atlas_stats` (density maps, per-lobe rates, phenotype
    comparisons, report) under ``aggregate/atlas``. Skipped when its inputs (the finished
    cases' stage hashes, their phenotypes, the template, the options) are those of the
    last aggregate, so a resumed run recomputes nothing."""
    from ..io import read_image, read_label_map
    from ..nodules.atlas_stats import compute_atlas_statistics

    options = {**cfgmod.DEFAULT_CONFIG["aggregate"], **(options or {})}
    folder = inside(out, "aggregate")
    folder.mkdir(parents=True, exist_ok=True)
    done = cohort[cohort["status"] == "done"]
    inputs = []
    for case_id in done["case_id"]:
        stages = records.read_record(out, case_id)["stages"]
        inputs.append((case_id, stages["metrics"]["hash"], stages["nodules"]["hash"]))
    phenotype = done.drop(columns=[c for c in done.columns if c.split("_")[0] in cfgmod.CASE_STAGES], errors="ignore")
    aggregate_hash = cfgmod.digest("aggregate", inputs, phenotype.to_json(), template.get("hash", template.get("ct")),
                                   options, cfgmod.stage_versions("metrics"))
    summary_path = folder / "summary.json"
    if summary_path.exists():
        previous = read_json(summary_path)
        if previous.get("hash") == aggregate_hash and (not previous.get("report") or Path(previous["report"]).exists()):
            log.info("aggregate: unchanged since the last run, kept")
            return {k: v for k, v in previous.items() if k != "hash"}
    nodule_tables, metric_tables = [], []
    for case_id in done["case_id"]:
        stages = records.read_record(out, case_id)["stages"]
        table = pd.read_csv(stages["nodules"]["outputs"]["table"])
        if len(table):
            nodule_tables.append(table)
        metric_tables.append(pd.read_csv(stages["metrics"]["outputs"]["table"]))
    nodules = pd.concat(nodule_tables, ignore_index=True) if nodule_tables else pd.DataFrame()
    nodules.to_csv(folder / "nodules_in_atlas.csv", index=False)
    metrics = pd.concat(metric_tables, ignore_index=True).rename(columns={"when": "stage"}) if metric_tables \
        else pd.DataFrame()
    metrics.to_csv(folder / "alignment_metrics.csv", index=False)
    info = {"nodules_total": int(len(nodules)),
            "nodules_mapped": int((nodules["status"] == "ok").sum()) if len(nodules) else 0,
            "lung_dice_before_mean": _mean(done, "metrics_lung_dice_before"),
            "lung_dice_after_mean": _mean(done, "metrics_lung_dice_after"),
            "lobe_dice_after_mean": _mean(done, "metrics_lobe_dice_mean_after")}
    if template.get("kind", "lobes") != "lobes":
        info["atlas_statistics"] = ("skipped: the template has lungs but no lobes (built from lung-only "
                                    "segmentations); segment the template subset with lobes")
    elif info["nodules_mapped"]:
        # every finished scan counts (scans without nodules lower the density), with its phenotype
        scans = pd.DataFrame({"case_id": done["case_id"].astype(str),
                              "participant": done.get("participant_id", done["case_id"]).astype(str),
                              "study_yr": done["study_yr"] if "study_yr" in done else None})
        phenotype_columns = [c for c in ("gender", "age", "cigsmok", "pkyr", "can_scr", "cancer") if c in done]
        phenotypes = None
        if phenotype_columns:
            phenotypes = done[phenotype_columns].copy()
            phenotypes.insert(0, "participant", scans["participant"].to_numpy())
            phenotypes = phenotypes.drop_duplicates("participant")
        result = compute_atlas_statistics(
            nodules, read_image(template["ct"]), read_label_map(template["labels"]), inside(folder, "atlas"),
            scans=scans, phenotypes=phenotypes, metrics=metrics if len(metrics) else None,
            bandwidth_mm=float(options["bandwidth_mm"]), n_permutations=int(options["permutations"]),
            report=bool(options["report"]))
        info["report"] = str(result.report) if result.report else None
    write_json_atomic(summary_path, {**info, "hash": aggregate_hash})
    return info


def _mean(frame: pd.DataFrame, column: str):
    if column not in frame or frame[column].dropna().empty:
        return None
    return round(float(pd.to_numeric(frame[column], errors="coerce").mean()), 4)


# ---------------------------------------------------------------------------
# Status
# ---------------------------------------------------------------------------
def status(out) -> dict:
    """Counts per case status and per failed stage, and the failures with their errors,
    read from the records only (works while a run is going on)."""
    out = Path(out).resolve()
    cases = load_cases(out)
    table = records.cohort_table(out, [c["case_id"] for c in cases])
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    failures = table[table["status"] == "failed"][["case_id", "failed_stage", "error"]].to_dict("records") \
        if len(table) else []
    return {"cases": len(cases), "counts": counts, "failures": failures}


def clear_outputs(out, case_id: str) -> None:
    """Forget a case's results (its folder), e.g. after replacing its input file."""
    shutil.rmtree(records.case_dir(out, case_id), ignore_errors=True)


def describe(summary: dict) -> str:
    return json.dumps(summary, indent=1, default=str)
