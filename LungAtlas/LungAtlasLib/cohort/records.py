"""Per-case records and the cohort table rebuilt from them.

Layout under the run folder (``--out``)::

    run_config.json                  the configuration of this run
    index/series.csv, exams.csv      what ingest found and chose (and why)
    index/cases.csv                  the cases to run (one selected series per exam)
    cases/<case>/record.json         the case's record: input, and per stage status, hash, outputs
    cases/<case>/case.log            the case's log (all stages, all attempts)
    cases/<case>/<stage>/...         the stage's files
    template/                        the template the cases are registered to
    aggregate/                       cohort-level tables (nodules in atlas space, per-lobe counts)
    cohort_table.parquet, .csv       one row per case, rebuilt from the records

A record is written atomically after every stage, so a killed worker leaves
the record of its last finished stage; the cohort table is only ever derived
from the records and can be rebuilt at any time.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd

from ..paths import inside, read_json, safe_name, write_json_atomic
from .config import CASE_STAGES

log = logging.getLogger(__name__)

DONE, FAILED = "done", "failed"


def case_dir(out: str | Path, case_id: str) -> Path:
    return inside(out, "cases", safe_name(case_id))


def record_path(out: str | Path, case_id: str) -> Path:
    return case_dir(out, case_id) / "record.json"


def read_record(out: str | Path, case_id: str) -> dict:
    """The case's record, or an empty one. A record that cannot be parsed (a disk
    that filled up before atomic writes existed, a hand edit) is set aside, not trusted."""
    path = record_path(out, case_id)
    if not path.exists():
        return {"case_id": case_id, "stages": {}}
    try:
        record = read_json(path)
    except (json.JSONDecodeError, OSError) as exc:
        log.warning("case %s: record %s unreadable (%s); the case is recomputed", case_id, path, exc)
        return {"case_id": case_id, "stages": {}}
    record.setdefault("stages", {})
    return record


def write_record(out: str | Path, record: dict) -> Path:
    return write_json_atomic(record_path(out, record["case_id"]), record)


def stage_is_done(record: dict, stage: str, expected_hash: str) -> bool:
    """True when the stage finished with the current hash and its files still exist."""
    entry = record.get("stages", {}).get(stage)
    if not entry or entry.get("status") != DONE or entry.get("hash") != expected_hash:
        return False
    return all(Path(p).exists() for p in entry.get("outputs", {}).values())


def case_status(record: dict, hashes: dict | None = None) -> str:
    """"done" (all case stages current), "failed" (a stage failed with the current
    hash), or "pending"."""
    stages = record.get("stages", {})
    for stage in CASE_STAGES:
        entry = stages.get(stage)
        if entry is None:
            return "pending"
        if hashes is not None and entry.get("hash") != hashes.get(stage):
            return "pending"
        if entry.get("status") == FAILED:
            return FAILED
        if entry.get("status") != DONE:
            return "pending"
    return DONE


def first_failure(record: dict) -> tuple[str, dict] | None:
    for stage in CASE_STAGES:
        entry = record.get("stages", {}).get(stage)
        if entry and entry.get("status") == FAILED:
            return stage, entry
    return None


def _flatten(prefix: str, data: dict, row: dict) -> None:
    for key, value in (data or {}).items():
        if isinstance(value, (dict, list)):
            continue
        row[f"{prefix}{key}"] = value


def cohort_table(out: str | Path, case_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per case: input columns (phenotype included), status, and each
    stage's status and summary numbers. Built from the records only."""
    out = Path(out)
    if case_ids is None:
        case_ids = sorted(p.parent.name for p in (out / "cases").glob("*/record.json"))
    rows = []
    for case_id in case_ids:
        record = read_record(out, case_id)
        row = {"case_id": case_id}
        _flatten("", record.get("input", {}), row)
        row["status"] = case_status(record)
        failure = first_failure(record)
        row["failed_stage"] = failure[0] if failure else None
        row["error"] = failure[1].get("error") if failure else None
        for stage in CASE_STAGES:
            entry = record.get("stages", {}).get(stage, {})
            row[f"{stage}_status"] = entry.get("status")
            row[f"{stage}_seconds"] = entry.get("seconds")
            _flatten(f"{stage}_", entry.get("summary", {}), row)
        rows.append(row)
    return pd.DataFrame(rows)


def write_cohort_table(out: str | Path, case_ids: list[str] | None = None) -> pd.DataFrame:
    """Rebuild ``cohort_table.parquet`` and ``.csv`` from the records (atomically)."""
    import os

    table = cohort_table(out, case_ids)
    for suffix in (".parquet", ".csv"):
        target = inside(out, "cohort_table" + suffix)
        tmp = target.with_name(f".{target.name}.tmp")
        if suffix == ".parquet":
            # mixed-type object columns (e.g. nodule counts with None) must not stop the table
            table.astype({c: "string" for c in table.columns if table[c].dtype == object}).to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
        os.replace(tmp, target)
    return table
