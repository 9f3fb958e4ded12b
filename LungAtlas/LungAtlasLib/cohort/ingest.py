"""Ingest: index a DICOM tree from headers only, choose one series per exam, or read a manifest.

The NLST archive is laid out participant / study / series / slice files; any
tree works, since series are grouped by SeriesInstanceUID within a folder.
Every slice header is read (pixel data never is) because completeness needs
each slice's position; the reads run in a process or thread pool. A series
that cannot be read is a row with its problem, never a crash of the index.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

# NLST codes the screening round in the (de-identified) DICOM StudyDate.
NLST_STUDY_DATES = {"19990102": 0, "20000102": 1, "20010102": 2}
SLICE_GAP_TOLERANCE = 0.05  # fraction of the nominal gap, as io.py


SERIES_COLUMNS = ["participant_id", "study_uid", "study_date", "study_yr", "timepoint", "series_uid", "modality",
                  "description", "manufacturer", "kernel", "slice_thickness_mm", "slice_gap_mm", "n_slices",
                  "orientation", "complete", "problem", "path"]


def timepoint(study_yr) -> str | None:
    return None if study_yr is None or pd.isna(study_yr) else f"T{int(study_yr)}"


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def _orientation(iop) -> str:
    """axial / coronal / sagittal from the slice normal (ImageOrientationPatient), else oblique."""
    if iop is None or len(iop) != 6:
        return "unknown"
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _folder_participant(folder: str) -> str:
    """Participant folder of the NLST layout participant/study/series (when PatientID is empty)."""
    parts = Path(folder).parts
    return parts[-3] if len(parts) >= 3 else ""


def _series_rows_in_folder(folder: str) -> list[dict]:
    """Header-only summary of every series whose slices lie directly in ``folder``."""
    import pydicom

    groups: dict[str, list] = {}
    unreadable = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        try:
            # (specific_tags measured slower than a plain header read with pydicom 3)
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True)
        except Exception as exc:  # pydicom raises many types for non-DICOM or broken files
            unreadable.append((entry.path, exc))
            continue
        if "SeriesInstanceUID" not in ds:
            unreadable.append((entry.path, "no SeriesInstanceUID"))
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((entry.path, ds))
    rows = []
    for uid, slices in groups.items():
        first = slices[0][1]
        problems = []
        positions, iops = [], set()
        for path, ds in slices:
            if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
                positions.append([float(v) for v in ds.ImagePositionPatient])
                iops.add(tuple(round(float(v), 4) for v in ds.ImageOrientationPatient))
        iop = first.get("ImageOrientationPatient")
        gap = None
        if len(positions) < len(slices):
            problems.append(f"{len(slices) - len(positions)} slices without position/orientation")
        if len(iops) > 1:
            problems.append("slices with different orientations")
        elif len(positions) >= 2 and iop is not None:
            normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
            along = np.sort(np.asarray(positions) @ normal)
            gaps = np.diff(along)
            if np.any(gaps < 1e-3):
                problems.append("two slices share one position")
            else:
                gap = float(np.median(gaps))
                worst = float(np.max(np.abs(gaps - gap)))
                if worst > SLICE_GAP_TOLERANCE * gap:
                    problems.append(f"missing slice or uneven spacing (gap {gaps.max():.2f} mm vs {gap:.2f} mm)")
        elif len(positions) < 2:
            problems.append("fewer than 2 slices")
        date = _text(first.get("StudyDate"))
        thickness = first.get("SliceThickness")
        try:
            thickness = float(thickness) if thickness not in (None, "") else None
        except (TypeError, ValueError):
            thickness = None
        rows.append({
            "participant_id": _text(first.get("PatientID")) or _folder_participant(folder),
            "study_uid": _text(first.get("StudyInstanceUID")),
            "study_date": date,
            "study_yr": NLST_STUDY_DATES.get(date),
            "series_uid": uid,
            "modality": _text(first.get("Modality")),
            "description": _text(first.get("SeriesDescription")),
            "manufacturer": _text(first.get("Manufacturer")),
            "kernel": _text(first.get("ConvolutionKernel")),
            "slice_thickness_mm": thickness if thickness is not None else gap,
            "slice_gap_mm": gap,
            "n_slices": len(slices),
            "orientation": _orientation(iop),
            "complete": not problems,
            "problem": "; ".join(problems) or None,
            "path": folder,
        })
    if unreadable and not groups:
        path, exc = unreadable[0]
        rows.append({"participant_id": _folder_participant(folder),
                     "series_uid": None, "n_slices": 0, "complete": False, "path": folder,
                     "problem": f"{len(unreadable)} unreadable files, e.g. {path}: {exc}"})
    elif unreadable:
        for row in rows:
            row["complete"] = False
            row["problem"] = "; ".join(filter(None, [row["problem"], f"{len(unreadable)} unreadable files "
                                                     f"in the folder, e.g. {unreadable[0][0]}"]))
    return rows


def _folders_with_files(root: Path) -> list[str]:
    folders = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if any(not f.startswith(".") for f in filenames):
            folders.append(dirpath)
    return folders


def _chunks(items, n):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _rows_for_folders(folders: list[str]) -> list[dict]:
    rows = []
    for folder in folders:
        rows.extend(_series_rows_in_folder(folder))
    return rows


def index_dicom_tree(root: str | Path, workers: int = 2, use_processes: bool = True) -> pd.DataFrame:
    """One row per DICOM series under ``root`` (columns :data:`SERIES_COLUMNS`).

    Header-only (``stop_before_pixels``); folders are read in parallel by
    ``workers`` processes (or threads), in chunks so that process start-up and
    transport cost little per series.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist or is not a folder")
    folders = _folders_with_files(root)
    if workers <= 1 or len(folders) < 4:
        rows = _rows_for_folders(folders)
    else:
        chunk = max(1, min(64, len(folders) // (workers * 4)))
        pool_type = ProcessPoolExecutor if use_processes else ThreadPoolExecutor
        rows = []
        with pool_type(max_workers=workers) as pool:
            for part in pool.map(_rows_for_folders, list(_chunks(folders, chunk))):
                rows.extend(part)
    table = pd.DataFrame(rows, columns=SERIES_COLUMNS)
    table["timepoint"] = [timepoint(y) for y in table["study_yr"]]
    table["study_yr"] = table["study_yr"].astype("Int64")
    table["n_slices"] = table["n_slices"].fillna(0).astype(int)
    log.info("indexed %d series in %d folders under %s", len(table), len(folders), root)
    return table


# ---------------------------------------------------------------------------
# Series selection
# ---------------------------------------------------------------------------
def _rejections(series: pd.DataFrame, rule: dict) -> pd.Series:
    """Why each series is not eligible (None when it is), vectorised over the table."""
    reason = pd.Series([None] * len(series), index=series.index, dtype=object)

    def mark(condition, text):
        hit = condition & reason.isna()
        if hit.any():
            reason[hit] = text[hit] if isinstance(text, pd.Series) else text

    modality = series["modality"].fillna("")
    thickness = pd.to_numeric(series["slice_thickness_mm"], errors="coerce")
    problem = series["problem"].fillna("").astype(str)
    orientation = series["orientation"].fillna("unknown").astype(str)
    n_slices = pd.to_numeric(series["n_slices"], errors="coerce").fillna(0).astype(int)
    mark(series["series_uid"].isna(), "unreadable (" + problem + ")")
    mark(~modality.isin(["CT", ""]), "modality " + modality.astype(str))
    if rule.get("require_complete", True):
        mark(~series["complete"].fillna(False).astype(bool), "incomplete (" + problem + ")")
    if rule.get("require_axial", True):
        mark(orientation != "axial", orientation + ", not axial")
    minimum = int(rule.get("min_slices", 0))
    mark(n_slices < minimum, n_slices.astype(str) + f" slices < {minimum}")
    mark(thickness.isna(), "slice thickness unknown")
    limit = float(rule["max_thickness_mm"])
    mark(thickness > limit + 1e-6, thickness.map(lambda t: f"{t:g}") + f" mm > {limit:g} mm")
    return reason


def _describe(series: pd.DataFrame) -> pd.Series:
    thickness = pd.to_numeric(series["slice_thickness_mm"], errors="coerce")
    return (series["series_uid"].astype(str) + " (" + series["kernel"].fillna("").replace("", "no kernel").astype(str)
            + ", " + thickness.map(lambda t: f"{t:g}") + " mm, " + series["n_slices"].astype(str) + " slices)")


EXAM_COLUMNS = ["participant_id", "study_uid", "study_yr", "timepoint", "series_uid", "path", "kernel",
                "slice_thickness_mm", "n_slices", "n_series", "selected", "reason"]


def select_series(series: pd.DataFrame, rule: dict) -> pd.DataFrame:
    """One row per exam (participant + study): the chosen series, or none, and why.

    Eligible: CT, complete, axial, at least ``min_slices``, thickness <= ``max_thickness_mm``.
    Among those: a preferred (soft/standard) kernel first when ``kernel_first``, then the
    thinnest slices, then the most slices. The reason names the choice and each rejection.
    Vectorised: 200,000 series take seconds.
    """
    if series.empty:
        return pd.DataFrame(columns=EXAM_COLUMNS)
    table = series.copy()
    table["_exam"] = table["study_uid"].fillna(table["path"]).astype(str)
    table["_why"] = _rejections(table, rule)
    table["_eligible"] = table["_why"].isna()
    table["_soft"] = table["kernel"].fillna("").astype(str).str.strip().str.match(rule["preferred_kernels"],
                                                                                    case=False)
    table["_thickness"] = pd.to_numeric(table["slice_thickness_mm"], errors="coerce")
    table["_label"] = table["series_uid"].where(table["series_uid"].notna(), table["path"]).astype(str)
    keys = ["_exam", "_eligible", "_soft", "_thickness"] if rule.get("kernel_first", True) else \
        ["_exam", "_eligible", "_thickness", "_soft"]
    order = table.sort_values(keys + ["n_slices", "_label"],
                              ascending=[True, False] + ([False, True] if keys[2] == "_soft" else [True, False])
                              + [False, True], kind="stable")
    first = order.groupby("_exam", sort=True).head(1).set_index("_exam")
    described = _describe(order)
    ranked_lower = order["_eligible"] & ~order.index.isin(order.groupby("_exam").head(1).index)
    notes = pd.Series("", index=order.index, dtype=object)
    notes[ranked_lower] = described[ranked_lower] + ": ranked lower"
    rejected = order["_why"].notna()
    notes[rejected] = order.loc[rejected, "_label"] + ": " + order.loc[rejected, "_why"].astype(str)
    joined = notes[notes != ""].groupby(order.loc[notes != "", "_exam"]).agg("; ".join)
    counts = table.groupby("_exam").size()

    exams = pd.DataFrame({
        "participant_id": first["participant_id"], "study_uid": first["study_uid"],
        "study_yr": first["study_yr"], "timepoint": first["timepoint"]})
    chosen = first["_eligible"].astype(bool)
    exams["series_uid"] = first["series_uid"].where(chosen, None)
    exams["path"] = first["path"].where(chosen, None)
    exams["kernel"] = first["kernel"].where(chosen, None)
    exams["slice_thickness_mm"] = first["_thickness"].where(chosen)
    exams["n_slices"] = first["n_slices"].where(chosen)
    exams["n_series"] = counts.reindex(exams.index).to_numpy()
    exams["selected"] = chosen
    others = joined.reindex(exams.index).fillna("")
    soft = first["_soft"].astype(bool)
    head = ("chose " + _describe(first) + f": axial, complete, <= {float(rule['max_thickness_mm']):g} mm, "
            + soft.map({True: "soft/standard kernel", False: "no soft/standard kernel available"}))
    exams["reason"] = (head + ("; " + others).where(others != "", "")).where(chosen, "no usable series: " + others)
    return exams.reset_index(drop=True)[EXAM_COLUMNS]


def exams_to_cases(exams: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Cases (``case_id`` = participant_T<year>) from the selected exams, and problems:
    exams without a usable series, unknown screening years and duplicated exams
    (two studies of one participant in one screening year: the first by study UID is kept)."""
    problems, rows, seen = [], [], {}
    for exam in exams.itertuples(index=False):
        label = f"participant {exam.participant_id} study {exam.study_uid}"
        if not exam.selected:
            problems.append(f"{label}: {exam.reason}")
            continue
        tp = exam.timepoint if isinstance(exam.timepoint, str) else None
        if tp is None:
            problems.append(f"{label}: StudyDate is not an NLST screening code "
                            f"({', '.join(NLST_STUDY_DATES)}); case named by study UID")
        case_id = f"{exam.participant_id}_{tp}" if tp else f"{exam.participant_id}_{str(exam.study_uid)[-8:]}"
        if case_id in seen:
            problems.append(f"{label}: duplicate exam {case_id} (also study {seen[case_id]}); skipped")
            continue
        seen[case_id] = exam.study_uid
        rows.append({"case_id": case_id, "participant_id": str(exam.participant_id),
                     "study_yr": exam.study_yr, "timepoint": tp, "ct": exam.path, "series_uid": exam.series_uid,
                     "kernel": exam.kernel, "slice_thickness_mm": exam.slice_thickness_mm,
                     "n_slices": exam.n_slices})
    cases = pd.DataFrame(rows, columns=["case_id", "participant_id", "study_yr", "timepoint", "ct", "series_uid",
                                        "kernel", "slice_thickness_mm", "n_slices"])
    return cases, problems


# ---------------------------------------------------------------------------
# Manifest of image files
# ---------------------------------------------------------------------------
MANIFEST_PATH_COLUMNS = ("ct", "labels", "nodules")


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Cases from a CSV with a ``ct`` column (NIfTI/NRRD/MHA file or DICOM folder).

    Optional columns: ``case_id`` (else ``participant_id`` + ``study_yr``, else the
    file name), ``participant_id``, ``study_yr``, ``series_uid``, ``labels`` (a label
    map some segmentation backends read), ``nodules`` (CSV of nodule centres in
    patient LPS mm: x_lps, y_lps, z_lps), and any phenotype columns, kept as they are.
    Relative paths are relative to the manifest's folder. Missing files are not
    checked here: each becomes that case's recorded failure.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    table = pd.read_csv(path, dtype={"case_id": str, "participant_id": str, "series_uid": str})
    if "ct" not in table.columns:
        raise ValueError(f"manifest {path}: no 'ct' column (columns: {list(table.columns)})")
    for column in MANIFEST_PATH_COLUMNS:
        if column in table.columns:
            table[column] = [None if pd.isna(p) else str((path.parent / str(p)).resolve())
                             if not Path(str(p)).is_absolute() else str(p) for p in table[column]]
    if table["ct"].isna().any():
        rows = [int(i) + 2 for i in np.flatnonzero(table["ct"].isna())]
        raise ValueError(f"manifest {path}: empty 'ct' on line(s) {rows}")
    if "case_id" not in table.columns or table["case_id"].isna().any():
        generated = []
        for i, row in table.iterrows():
            if "case_id" in table.columns and not pd.isna(row.get("case_id")):
                generated.append(row["case_id"])
            elif "participant_id" in table.columns and not pd.isna(row.get("participant_id")):
                yr = row.get("study_yr")
                generated.append(f"{row['participant_id']}_T{int(yr)}" if yr is not None and not pd.isna(yr)
                                 else str(row["participant_id"]))
            else:
                name = Path(row["ct"]).name
                for suffix in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
                    if name.lower().endswith(suffix):
                        name = name[: -len(suffix)]
                        break
                generated.append(name)
        table["case_id"] = generated
    duplicated = table["case_id"][table["case_id"].duplicated(keep=False)]
    if len(duplicated):
        raise ValueError(f"manifest {path}: duplicated case ids {sorted(set(duplicated))[:10]} "
                         f"(give each row a distinct case_id)")
    if "study_yr" in table.columns:
        table["timepoint"] = [timepoint(y) for y in table["study_yr"]]
    return table
