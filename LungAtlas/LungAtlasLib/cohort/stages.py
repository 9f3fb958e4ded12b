"""The pipeline stages for one case, and the task that runs them on a worker.

Each stage is a thin wrapper: it reads its inputs from the case's folder,
calls the step's own module through its interface (segmentation, registration,
metrics, nodules), writes its files under ``cases/<case>/<stage>/`` and returns
``(outputs, summary)``. :func:`run_case` decides what is already finished (by
hash), writes the record atomically after every stage, logs to the case's own
log file, and releases memory before the worker takes the next case.
"""
from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..geometry import resample_to
from ..io import read_image, read_label_map, write_image
from ..labels import LABELS
from . import records
from .config import CASE_STAGES

log = logging.getLogger(__name__)


class CaseFailed(RuntimeError):
    """A stage of a case failed; its error and traceback are in the case's record."""


# ---------------------------------------------------------------------------
# Backends, cached per worker process: a model is loaded once per worker, not per case
# ---------------------------------------------------------------------------
_BACKENDS: dict = {}


def load_plugins(config: dict) -> None:
    """Import the configured plugin modules (they register extra backends on import)."""
    for name in config.get("plugins") or ():
        importlib.import_module(name)


def _format_options(options, case: dict):
    """Per-case option values: ``"{case_id}"``, ``"{participant_id}"``, ``"{labels}"`` etc.
    in string options are filled from the case's manifest row."""
    if isinstance(options, str):
        try:
            return options.format(**{k: ("" if v is None else v) for k, v in case.items()})
        except (KeyError, IndexError, ValueError):
            return options
    if isinstance(options, dict):
        return {k: _format_options(v, case) for k, v in options.items()}
    if isinstance(options, list):
        return [_format_options(v, case) for v in options]
    return options


def _backend(kind: str, spec: dict, case: dict):
    options = _format_options(spec.get("options") or {}, case)
    key = (kind, spec["name"], json.dumps(options, sort_keys=True, default=str))
    if key not in _BACKENDS:
        if kind == "segmentation":
            from ..segmentation import get_segmenter
            backend = get_segmenter(spec["name"], **options)
        else:
            from ..registration import get_registration
            backend = get_registration(spec["name"], **options)
        backend.check_ready()
        _BACKENDS.clear()  # one model of a kind in memory at a time
        _BACKENDS[key] = backend
    return _BACKENDS[key]


def release_memory() -> None:
    """Free what a finished case held: Python objects, and cached GPU blocks when torch is loaded."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------
def stage_dir(out, case_id: str, stage: str) -> Path:
    return records.case_dir(out, case_id) / stage


def _write_transform(transform: sitk.Transform, path: Path) -> Path:
    """ITK transform file written atomically (temporary name in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    sitk.WriteTransform(transform, str(tmp))
    os.replace(tmp, path)
    return path


def _write_csv(table: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    table.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def read_case_ct(case: dict) -> sitk.Image:
    series_uid = case.get("series_uid")
    return read_image(case["ct"], series_uid=None if series_uid is None or pd.isna(series_uid) else series_uid)


def load_template(template: dict) -> tuple[sitk.Image, sitk.Image]:
    return read_image(template["ct"]), read_label_map(template["labels"])


# ---------------------------------------------------------------------------
# The stages
# ---------------------------------------------------------------------------
def segment(case: dict, config: dict, out, template: dict | None = None):
    """Lobes (or lungs) of the case's CT through the configured segmentation backend."""
    ct = read_case_ct(case)
    result = _backend("segmentation", config["segmentation"], case).segment(ct, case["case_id"])
    folder = stage_dir(out, case["case_id"], "segment")
    labels_path = write_image(sitk.Cast(result.labels, sitk.sitkUInt8), folder / "labels.nii.gz")
    lung_ml = float((sitk.GetArrayViewFromImage(result.labels) > 0).sum() * np.prod(ct.GetSpacing()) / 1000.0)
    qc = result.qc or {}
    summary = {"backend": result.backend, "kind": result.kind, "qc_passed": qc.get("passed"),
               "lung_volume_ml": round(lung_ml, 2),
               "qc_flags": [f.get("check") for f in qc.get("flags", []) if not f.get("passed", True)]}
    return {"labels": str(labels_path)}, summary


def _as_sides(labels: sitk.Image) -> sitk.Image:
    sides = sitk.GetImageFromArray(LABELS.side_map(sitk.GetArrayFromImage(labels)))
    sides.CopyInformation(labels)
    return sides


def _case_labels(record: dict) -> sitk.Image:
    return read_label_map(record["stages"]["segment"]["outputs"]["labels"])


def register(case: dict, config: dict, out, template: dict, record: dict):
    """Transforms between the case (moving) and the template (fixed), lungs as masks."""
    fixed, fixed_labels = load_template(template)
    moving = read_case_ct(case)
    moving_labels = _case_labels(record)
    kind = record["stages"]["segment"]["summary"].get("kind", "lobes")
    if kind == "sides" and template.get("kind", "lobes") == "lobes":  # compare like with like
        fixed_labels = sitk.GetImageFromArray(LABELS.side_map(sitk.GetArrayFromImage(fixed_labels)))
        fixed_labels.CopyInformation(fixed)
    elif kind == "lobes" and template.get("kind", "lobes") == "sides":
        moving_labels = _as_sides(moving_labels)
    started = time.perf_counter()
    result = _backend("registration", config["registration"], case).register(
        fixed, moving, fixed_mask=fixed_labels > 0, moving_mask=moving_labels > 0,
        fixed_labels=fixed_labels, moving_labels=moving_labels)
    folder = stage_dir(out, case["case_id"], "register")
    outputs = {"fixed_to_moving": str(_write_transform(result.fixed_to_moving, folder / "atlas_to_patient.h5")),
               "moving_to_fixed": str(_write_transform(result.moving_to_fixed, folder / "patient_to_atlas.h5"))}
    summary = {"backend": result.backend, "register_seconds": round(time.perf_counter() - started, 2)}
    summary.update({k: v for k, v in (result.info or {}).items() if isinstance(v, (int, float, str, bool))})
    return outputs, summary


def metrics(case: dict, config: dict, out, template: dict, record: dict):
    """Alignment of the case to the template before (scanner coordinates) and after registration."""
    fixed, fixed_labels = load_template(template)
    moving = read_case_ct(case)
    moving_labels = _case_labels(record)
    fixed_to_moving = sitk.ReadTransform(record["stages"]["register"]["outputs"]["fixed_to_moving"])
    kind = record["stages"]["segment"]["summary"].get("kind", "lobes")
    warped_labels = sitk.Resample(moving_labels, fixed, fixed_to_moving, sitk.sitkNearestNeighbor, 0,
                                  moving_labels.GetPixelID())
    warped_ct = sitk.Resample(moving, fixed, fixed_to_moving, sitk.sitkLinear, -1024.0, moving.GetPixelID())
    before_labels = resample_to(moving_labels, fixed_labels, is_label=True)
    before_ct = resample_to(moving, fixed)
    reference = fixed_labels
    lungs_only = kind == "sides" or template.get("kind", "lobes") == "sides"
    if lungs_only:  # a lobe-less map on either side: compare whole lungs only
        def _binary(image):
            return sitk.Cast(image > 0, sitk.sitkUInt8)
        reference, warped_labels_cmp, before_cmp = _binary(fixed_labels), _binary(warped_labels), _binary(before_labels)
        label_values = (1,)
    else:
        warped_labels_cmp, before_cmp, label_values = warped_labels, before_labels, None
    hd = bool(config["metrics"].get("hausdorff", True))
    rows = []
    for when, labels, ct in (("before", before_cmp, before_ct), ("after", warped_labels_cmp, warped_ct)):
        for row in _alignment(reference, labels, fixed, ct, label_values, hd):
            rows.append({"case_id": case["case_id"], "when": when, **row})
    if lungs_only:
        rows = [r for r in rows if r["region"] in ("lung", "image", "lung_intensity")]
    table = pd.DataFrame(rows)
    folder = stage_dir(out, case["case_id"], "metrics")
    outputs = {"table": str(_write_csv(table, folder / "alignment.csv")),
               "warped_labels": str(write_image(warped_labels, folder / "labels_in_atlas.nii.gz"))}

    def pick(when, region, column):
        hit = table[(table["when"] == when) & (table["region"] == region)]
        return None if hit.empty or column not in hit else round(float(hit[column].iloc[0]), 4)

    lobes = table[(table["when"] == "after") & ~table["region"].isin(["lung", "image", "lung_intensity"])]
    summary = {"lung_dice_before": pick("before", "lung", "dice"), "lung_dice_after": pick("after", "lung", "dice"),
               "lobe_dice_mean_after": round(float(lobes["dice"].mean()), 4) if len(lobes) else None,
               "lung_rvd_after": pick("after", "lung", "relative_volume_difference"),
               "mse_before": pick("before", "image", "mse"), "mse_after": pick("after", "image", "mse")}
    return outputs, summary


def _alignment(reference, labels, fixed_ct, ct, label_values, with_hausdorff):
    from ..metrics import alignment_metrics
    return alignment_metrics(reference, labels, fixed_ct, ct, labels=label_values, with_hausdorff=with_hausdorff)


def nodules(case: dict, config: dict, out, template: dict, record: dict):
    """The case's nodules (given points and NLST abnormality rows) mapped into the atlas."""
    from ..nodules import inputs as nodule_inputs
    from ..nodules.mapping import map_nodules

    case_id = case["case_id"]
    tables = []
    points_file = case.get("nodules")
    if isinstance(points_file, str) and points_file:
        tables.append(nodule_inputs.read_nodule_points(points_file, case_id=case_id,
                                                       participant=case.get("participant_id"),
                                                       study_yr=case.get("study_yr")))
    nlst_rows = case.get("nlst_nodules") or []
    if nlst_rows:
        ctab = pd.DataFrame(nlst_rows).rename(columns={"participant_id": "pid"})
        tables.append(nodule_inputs.estimate_nlst_positions(ctab, _case_labels(record), case_id=case_id))
    _, atlas_labels = load_template(template)
    folder = stage_dir(out, case_id, "nodules")
    if tables:
        table = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) \
            else tables[0]
        table["case_id"] = case_id
        transform = sitk.ReadTransform(record["stages"]["register"]["outputs"]["moving_to_fixed"])
        mapped = map_nodules(table, {case_id: transform}, atlas_labels)
    else:
        mapped = nodule_inputs.empty_table()
        mapped["atlas_lobe"] = pd.Series(dtype=int)
    path = _write_csv(mapped, folder / "nodules_in_atlas.csv")
    used = mapped[mapped["status"] == "ok"] if len(mapped) else mapped
    summary = {"n_nodules": int(len(mapped)), "n_mapped": int(len(used))}
    return {"table": str(path)}, summary


def build_template(cts, label_maps, *, case_ids, registration: str, registration_options: dict, folder,
                   **options) -> dict:
    """The template stage through LungAtlas's groupwise builder (:mod:`..template`): every
    subset case registered with the cohort's registration backend, averaged, unbiased; the
    atlas bundle (template, lobe probabilities, atlas.json) is written to ``folder``.
    ``options`` go to :func:`..template.build_template` (rounds, spacing_mm, margin_mm, ...)."""
    from ..template import TemplateCase, write_atlas
    from ..template import build_template as groupwise

    cases = [TemplateCase(cid, ct, labels) for cid, ct, labels in zip(case_ids, cts, label_maps)]
    result = groupwise(cases, backend=registration, backend_options=registration_options, **options)
    write_atlas(result, folder)
    return {"ct": result.ct, "labels": result.labels,
            "info": {"reference": result.reference, "rounds": result.rounds}}


STAGE_FUNCTIONS = {"segment": segment, "register": register, "metrics": metrics, "nodules": nodules}


# ---------------------------------------------------------------------------
# The task a worker runs for one case
# ---------------------------------------------------------------------------
class _ThreadFilter(logging.Filter):
    """Only this thread's log lines reach the case log (threads of one worker run other cases)."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record):
        return record.thread == self.thread


def run_case(case: dict, config: dict, out: str, hashes: dict, template: dict | None,
             stages: tuple = CASE_STAGES, retry_failed: bool = False) -> dict:
    """Run ``stages`` for one case, skipping those already done with the current hash.

    A stage that failed before with the same hash is not rerun unless
    ``retry_failed`` (``lungatlas retry``). The record is written after every
    stage. Returns ``{"case_id", "status", "ran": [...], "skipped": [...]}``;
    raises :class:`CaseFailed` (after recording the error and traceback) so that
    the executor counts the failure and Dask can apply its retries.
    """
    case_id = case["case_id"]
    load_plugins(config)
    record = records.read_record(out, case_id)
    record["input"] = {k: v for k, v in case.items() if k != "nlst_nodules"}
    record["input"]["n_nlst_nodules"] = len(case.get("nlst_nodules") or [])
    folder = records.case_dir(out, case_id)
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / "case.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ThreadFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    ran, skipped = [], []
    try:
        for stage in stages:
            if records.stage_is_done(record, stage, hashes[stage]):
                skipped.append(stage)
                continue
            entry = record["stages"].get(stage)
            if entry and entry.get("status") == records.FAILED and entry.get("hash") == hashes[stage] \
                    and not retry_failed:
                raise CaseFailed(f"case {case_id}: stage {stage} failed before ({entry.get('error')}); "
                                 "run `lungatlas retry` to try again")
            log.info("case %s: stage %s started (pid %d)", case_id, stage, os.getpid())
            started = time.perf_counter()
            try:
                args = (case, config, out) if stage == "segment" else (case, config, out, template, record)
                outputs, summary = STAGE_FUNCTIONS[stage](*args)
            except Exception as exc:
                record["stages"][stage] = {
                    "status": records.FAILED, "hash": hashes[stage], "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(), "finished": time.time(),
                    "attempts": int((entry or {}).get("attempts", 0)) + 1}
                # a later stage computed from an older result is no longer valid
                for later in CASE_STAGES[CASE_STAGES.index(stage) + 1:]:
                    record["stages"].pop(later, None)
                records.write_record(out, record)
                log.error("case %s: stage %s failed: %s\n%s", case_id, stage, exc, traceback.format_exc())
                raise CaseFailed(f"case {case_id}: stage {stage} failed: {type(exc).__name__}: {exc}") from None
            seconds = round(time.perf_counter() - started, 3)
            record["stages"][stage] = {"status": records.DONE, "hash": hashes[stage], "outputs": outputs,
                                       "summary": summary, "seconds": seconds, "finished": time.time(),
                                       "worker_pid": os.getpid()}
            records.write_record(out, record)
            ran.append(stage)
            log.info("case %s: stage %s done in %.1f s", case_id, stage, seconds)
        records.write_record(out, record)
        return {"case_id": case_id, "status": "ok", "ran": ran, "skipped": skipped}
    finally:
        root.removeHandler(handler)
        handler.close()
        release_memory()
