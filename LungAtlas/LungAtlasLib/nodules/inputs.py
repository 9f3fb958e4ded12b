"""Nodule inputs: one table format for points, Slicer markups, nodule masks and NLST rows.

Every reader returns a :class:`pandas.DataFrame` with the columns of
:data:`NODULE_COLUMNS`: one row per nodule, its centre in **patient LPS
millimetres** (``x_lps, y_lps, z_lps``), who and when it belongs to
(``case_id`` = the scan, ``participant``, ``study_yr`` = screening year 0/1/2 for
T0/T1/T2), its size and attenuation, how its position was obtained
(``position_method``) and how uncertain that position is (``uncertainty_mm``).

``status`` is ``"ok"`` for a usable nodule; anything else is the reason it is
excluded (``nlst_other_location``, ``nlst_no_slice``, ...). Excluded rows stay in
the table so that the counts of what was used and why the rest was not can be
reported.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..geometry import index_to_physical, ras_to_lps, same_grid
from ..labels import LABELS

NODULE_COLUMNS = [
    "nodule_id", "case_id", "participant", "study_yr",
    "x_lps", "y_lps", "z_lps",
    "diameter_mm", "perpendicular_diameter_mm", "volume_ml", "attenuation",
    "source", "position_method", "uncertainty_mm", "recorded_lobe", "recorded_location",
    "status", "note",
]

# Position methods (the ``position_method`` column).
METHOD_GIVEN = "given_point"                 # a coordinate from a table or markups file
METHOD_MASK = "mask_centroid"                # centroid of a connected component of a nodule mask
METHOD_NLST = "nlst_lobe_slice_centroid"     # centroid of the named lobe in the recorded axial slice


class NoduleInputError(ValueError):
    """A nodule file or table cannot be read; the message names the file and what is wrong."""


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in NODULE_COLUMNS})


def _finish(rows: list[dict]) -> pd.DataFrame:
    """Rows -> a table with every standard column (missing ones NaN), standard ones first."""
    table = pd.DataFrame(rows)
    for column in NODULE_COLUMNS:
        if column not in table:
            table[column] = np.nan
    extra = [c for c in table.columns if c not in NODULE_COLUMNS]
    table = table[NODULE_COLUMNS + extra]
    for column in ("nodule_id", "case_id", "source", "position_method", "status", "note"):
        table[column] = table[column].astype(object)
    for column in ("x_lps", "y_lps", "z_lps", "diameter_mm", "perpendicular_diameter_mm", "volume_ml",
                   "uncertainty_mm"):
        table[column] = pd.to_numeric(table[column], errors="coerce")
    return table


# ---------------------------------------------------------------------------
# Points from CSV
# ---------------------------------------------------------------------------
_CSV_ALIASES = {"pid": "participant", "subject_id": "case_id", "diameter": "diameter_mm",
                "screen_year": "study_yr"}


def read_points_csv(path: str | Path, *, case_id: str | None = None, participant=None,
                    study_yr=None) -> pd.DataFrame:
    """Nodule points from a CSV table.

    Coordinates: columns ``x_lps, y_lps, z_lps`` (patient LPS mm, ITK's convention)
    or ``x_ras, y_ras, z_ras`` (Slicer's RAS; converted with
    :func:`geometry.ras_to_lps`). Optional columns: ``nodule_id``, ``case_id``,
    ``participant`` (or ``pid``), ``study_yr``, ``diameter_mm``, ``attenuation``,
    any others are kept. ``case_id``/``participant``/``study_yr`` arguments fill
    columns the file does not have.
    """
    path = Path(path)
    try:
        raw = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise NoduleInputError(f"nodule table {path}: cannot read it as CSV ({exc})") from exc
    raw = raw.rename(columns={k: v for k, v in _CSV_ALIASES.items() if k in raw and v not in raw})
    if {"x_lps", "y_lps", "z_lps"} <= set(raw.columns):
        lps = raw[["x_lps", "y_lps", "z_lps"]].to_numpy(float)
    elif {"x_ras", "y_ras", "z_ras"} <= set(raw.columns):
        lps = ras_to_lps(raw[["x_ras", "y_ras", "z_ras"]].to_numpy(float))
        raw = raw.drop(columns=["x_ras", "y_ras", "z_ras"])
    else:
        raise NoduleInputError(
            f"nodule table {path}: needs coordinate columns x_lps,y_lps,z_lps (patient LPS mm) or "
            f"x_ras,y_ras,z_ras (Slicer RAS mm); it has {list(raw.columns)}")
    if case_id is None and "case_id" not in raw:
        case_id = path.stem
    rows = []
    for index, record in enumerate(raw.to_dict("records")):
        row = dict(record)
        row.update(x_lps=lps[index, 0], y_lps=lps[index, 1], z_lps=lps[index, 2])
        for key, default in (("case_id", case_id), ("participant", participant), ("study_yr", study_yr)):
            if key not in raw and default is not None:
                row[key] = default
        row.setdefault("participant", row.get("case_id"))
        row.setdefault("nodule_id", f"{row.get('case_id')}-p{index + 1}")
        row.update(source=f"csv:{path.name}", position_method=METHOD_GIVEN, uncertainty_mm=0.0)
        finite = np.isfinite(lps[index]).all()
        row["status"] = "ok" if finite else "missing_coordinates"
        row["note"] = "" if finite else f"row {index + 2} of {path.name} has an empty or non-numeric coordinate"
        rows.append(row)
    return _finish(rows) if rows else empty_table()


# ---------------------------------------------------------------------------
# Slicer markups JSON
# ---------------------------------------------------------------------------
def read_markups_json(path: str | Path, *, case_id: str | None = None, participant=None,
                      study_yr=None) -> pd.DataFrame:
    """Control points of a Slicer markups file (``.mrk.json``) as nodules.

    Slicer writes positions in RAS unless the markup's ``coordinateSystem`` says
    ``"LPS"`` (Slicer >= 4.11 writes LPS by default; older files and some tools
    write RAS). Either way the result is patient LPS mm. Control points whose
    ``positionStatus`` is not ``"defined"`` are reported (``status``
    ``markup_point_undefined``), not used.
    """
    path = Path(path)
    try:
        with open(path) as f:
            document = json.load(f)
        markups = document["markups"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NoduleInputError(f"markups file {path}: not a Slicer markups JSON file ({exc!r})") from exc
    case_id = case_id or path.name.split(".")[0]
    rows = []
    for markup_index, markup in enumerate(markups):
        system = str(markup.get("coordinateSystem", "RAS")).upper()
        if system not in ("RAS", "LPS"):
            raise NoduleInputError(f"markups file {path}: markup {markup_index} has coordinateSystem "
                                   f"{system!r}; expected 'LPS' or 'RAS'")
        for point_index, point in enumerate(markup.get("controlPoints", [])):
            position = np.asarray(point.get("position", [np.nan] * 3), float)
            if position.shape != (3,):
                raise NoduleInputError(f"markups file {path}: control point {point_index} of markup "
                                       f"{markup_index} has position {point.get('position')!r}")
            lps = position if system == "LPS" else ras_to_lps(position)
            defined = point.get("positionStatus", "defined") == "defined" and np.isfinite(lps).all()
            label = point.get("label") or f"{case_id}-m{len(rows) + 1}"
            rows.append({
                "nodule_id": f"{case_id}-{label}", "case_id": case_id,
                "participant": participant if participant is not None else case_id, "study_yr": study_yr,
                "x_lps": lps[0], "y_lps": lps[1], "z_lps": lps[2],
                "source": f"markups:{path.name}", "position_method": METHOD_GIVEN, "uncertainty_mm": 0.0,
                "status": "ok" if defined else "markup_point_undefined",
                "note": "" if defined else f"positionStatus {point.get('positionStatus')!r}",
                "markup_coordinate_system": system,
            })
    return _finish(rows) if rows else empty_table()


def read_nodule_points(path: str | Path, **kwargs) -> pd.DataFrame:
    """CSV or Slicer markups JSON by file name."""
    name = str(path).lower()
    if name.endswith(".json"):
        return read_markups_json(path, **kwargs)
    return read_points_csv(path, **kwargs)


# ---------------------------------------------------------------------------
# Nodule masks
# ---------------------------------------------------------------------------
def nodules_from_mask(mask: sitk.Image, *, case_id: str, participant=None, study_yr=None,
                      reference: sitk.Image | None = None, source: str = "mask",
                      fully_connected: bool = True) -> pd.DataFrame:
    """One nodule per object of a nodule label map: centroid (patient LPS mm), volume (mL)
    and volume-equivalent diameter (mm).

    A map with one non-zero value is split into connected components (26-connected
    by default); a map with several values is taken as an instance map (each value
    one nodule, even if it has several pieces). ``reference`` (the scan's CT): the
    mask must share its grid, else :class:`NoduleInputError` (resample it first:
    a mask on another grid is a different scan or a different reconstruction).
    """
    if reference is not None and not same_grid(mask, reference):
        raise NoduleInputError(
            f"case {case_id}: nodule mask ({source}) is not on the grid of its CT "
            f"(mask size {mask.GetSize()} spacing {mask.GetSpacing()} origin {mask.GetOrigin()}; "
            f"CT size {reference.GetSize()} spacing {reference.GetSpacing()} origin {reference.GetOrigin()})")
    array = sitk.GetArrayViewFromImage(mask)
    values = np.unique(array[array != 0])
    if len(values) == 0:
        return empty_table()
    if len(values) == 1:
        objects = sitk.ConnectedComponent(mask != 0, fully_connected)
    else:
        objects = sitk.Cast(mask, sitk.sitkUInt32)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(objects)
    rows = []
    for number, label in enumerate(stats.GetLabels(), start=1):
        volume_ml = stats.GetPhysicalSize(label) / 1000.0
        centroid = stats.GetCentroid(label)  # physical LPS mm
        rows.append({
            "nodule_id": f"{case_id}-c{number}", "case_id": case_id,
            "participant": participant if participant is not None else case_id, "study_yr": study_yr,
            "x_lps": centroid[0], "y_lps": centroid[1], "z_lps": centroid[2],
            "volume_ml": volume_ml, "diameter_mm": 2.0 * (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1 / 3),
            "source": source, "position_method": METHOD_MASK,
            # the centroid of a segmented object: its uncertainty is the voxel size, not the object's size
            "uncertainty_mm": float(np.linalg.norm(mask.GetSpacing())) / 2.0,
            "status": "ok", "note": "", "mask_label": int(label),
        })
    return _finish(rows)


# ---------------------------------------------------------------------------
# NLST CT abnormality rows (ctab)
# ---------------------------------------------------------------------------
def _superior_axis(image: sitk.Image) -> tuple[int, float]:
    """(index axis i=0/j=1/k=2 running along patient z, +1 or -1 as it goes up/down).

    NLST slices are axial, so the lobe map's grid must have an axis along z
    (any axial CT does; an oblique grid is refused rather than sliced wrongly)."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    z_row = direction[2]  # z component of each index axis
    axis = int(np.argmax(np.abs(z_row)))
    if abs(z_row[axis]) < 0.99:
        raise NoduleInputError(f"lobe label map has no axis along patient z (direction {image.GetDirection()}); "
                               "NLST slice numbers need an axial grid")
    return axis, float(np.sign(z_row[axis]))


def nlst_slice_z_mm(slice_number: int, lobe_labels: sitk.Image,
                    slice_positions_mm=None) -> float:
    """Patient z (LPS mm, superior positive) of NLST ``sct_slice_num``.

    With ``slice_positions_mm`` (the z of DICOM instances 1..N in instance-number
    order, e.g. ImagePositionPatient[2] read while indexing the series) the
    mapping is exact. Without it the assumption is the usual one for chest CT:
    instance 1 is the most superior slice and images follow head to feet at the
    grid's slice spacing, i.e. z = z_top - (slice_number - 1) * spacing. Note that
    this is NOT the array order: SimpleITK/ITK sort DICOM slices by position, so
    array index 0 is usually the most inferior slice.
    """
    if slice_positions_mm is not None:
        positions = np.asarray(slice_positions_mm, float)
        if not 1 <= slice_number <= len(positions):
            raise IndexError(f"slice {slice_number} outside 1..{len(positions)}")
        return float(positions[slice_number - 1])
    axis, sign = _superior_axis(lobe_labels)
    n = lobe_labels.GetSize()[axis]
    if not 1 <= slice_number <= n:
        raise IndexError(f"slice {slice_number} outside 1..{n}")
    first = index_to_physical(lobe_labels, np.zeros((1, 3)))[0, 2]
    spacing = lobe_labels.GetSpacing()[axis]
    z_values = first + sign * spacing * np.arange(n)
    return float(z_values.max() - (slice_number - 1) * spacing)


def lobe_section(lobe_labels: sitk.Image, lobe: int, z_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """LPS points (N, 3, mm) of ``lobe`` in the axial plane of the grid nearest to ``z_mm``,
    and that plane's index along the z axis. Empty when the lobe is absent there."""
    axis, _ = _superior_axis(lobe_labels)
    n = lobe_labels.GetSize()[axis]
    first = index_to_physical(lobe_labels, np.zeros((1, 3)))[0, 2]
    unit = np.zeros((1, 3))
    unit[0, 2 - axis] = 1.0  # one step along that axis, in numpy (z, y, x) index order
    step = index_to_physical(lobe_labels, unit)[0, 2] - first  # z change (mm) per index
    plane = int(round((z_mm - first) / step))
    if not 0 <= plane < n:
        return np.zeros((0, 3)), np.array(plane)
    array = sitk.GetArrayViewFromImage(lobe_labels)
    numpy_axis = 2 - axis  # numpy order is (k, j, i)
    section = np.take(array, plane, axis=numpy_axis) == lobe
    other = np.argwhere(section)
    indices = np.insert(other, numpy_axis, plane, axis=1).astype(float)
    return index_to_physical(lobe_labels, indices), np.array(plane)


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def estimate_nlst_positions(ctab_rows: pd.DataFrame, lobe_labels: sitk.Image, *, case_id: str | None = None,
                            slice_positions_mm=None, source: str = "nlst_ctab") -> pd.DataFrame:
    """Estimated nodule centres (patient LPS mm) for NLST CT-abnormality rows of ONE scan.

    NLST recorded no coordinates, only the lobe (``sct_epi_loc``) and the image
    number (``sct_slice_num``) of the selected series. The estimate is the centroid
    of the named lobe within that axial slice of ``lobe_labels`` (the lobe map of
    the selected series); its uncertainty (``uncertainty_mm``) is the RMS distance
    of that lobe section's voxels from the centroid (the expected error if the
    nodule may lie anywhere in the section); ``section_width_mm`` and
    ``section_depth_mm`` give the section's x and y extent. Slice numbering: see
    :func:`nlst_slice_z_mm`.

    Lingula (code 5) counts as left upper lobe (the label table says so). Rows
    are reported, never guessed, when the code is 8 (other), unknown or missing
    (``nlst_other_location``, ``nlst_unknown_code``), the slice number is missing
    or outside the series (``nlst_no_slice``, ``nlst_slice_outside_series``), or
    the named lobe is absent from that slice (``nlst_lobe_not_in_slice``).

    Columns used: ``pid``, ``study_yr``, ``sct_ab_num``, ``sct_epi_loc``,
    ``sct_slice_num``, ``sct_long_dia``, ``sct_perp_dia`` (mm), ``sct_pre_att``
    (kept as the raw NLST code in ``attenuation``).
    """
    missing = {"sct_epi_loc", "sct_slice_num"} - set(ctab_rows.columns)
    if missing:
        raise NoduleInputError(f"NLST ctab rows for case {case_id}: missing columns {sorted(missing)}")
    rows = []
    for number, record in enumerate(ctab_rows.to_dict("records"), start=1):
        pid = record.get("pid")
        year = record.get("study_yr")
        scan = case_id if case_id is not None else f"{pid}_T{year}"
        ab_num = record.get("sct_ab_num", number)
        row = {
            "nodule_id": f"{scan}-ab{ab_num}", "case_id": scan, "participant": pid, "study_yr": year,
            "diameter_mm": _number(record.get("sct_long_dia")),
            "perpendicular_diameter_mm": _number(record.get("sct_perp_dia")),
            "attenuation": record.get("sct_pre_att"), "source": source, "position_method": METHOD_NLST,
            "recorded_location": record.get("sct_epi_loc"), "nlst_slice_num": record.get("sct_slice_num"),
            "x_lps": np.nan, "y_lps": np.nan, "z_lps": np.nan, "uncertainty_mm": np.nan, "note": "",
        }
        code = _number(record.get("sct_epi_loc"))
        try:
            location = LABELS.nlst_location(int(code)) if code is not None else LABELS.nlst_location(None)
        except KeyError:
            row.update(status="nlst_unknown_code",
                       note=f"sct_epi_loc {record.get('sct_epi_loc')!r} is not a known NLST location code")
            rows.append(row)
            continue
        if location.lobe is None:
            row.update(status="nlst_other_location", note=f"sct_epi_loc {location.code} ({location.name}): no lobe")
            rows.append(row)
            continue
        row["recorded_lobe"] = location.lobe
        slice_number = _number(record.get("sct_slice_num"))
        if slice_number is None or slice_number != int(slice_number):
            row.update(status="nlst_no_slice", note=f"sct_slice_num {record.get('sct_slice_num')!r} missing")
            rows.append(row)
            continue
        try:
            z_mm = nlst_slice_z_mm(int(slice_number), lobe_labels, slice_positions_mm)
        except IndexError as exc:
            row.update(status="nlst_slice_outside_series", note=str(exc))
            rows.append(row)
            continue
        points, plane = lobe_section(lobe_labels, location.lobe, z_mm)
        if len(points) == 0:
            row.update(status="nlst_lobe_not_in_slice",
                       note=f"{LABELS.lobe(location.lobe).name} absent from slice {int(slice_number)} (z {z_mm:.1f} mm)")
            rows.append(row)
            continue
        centre = points.mean(axis=0)
        row.update(x_lps=centre[0], y_lps=centre[1], z_lps=centre[2],
                   uncertainty_mm=float(np.sqrt(np.mean(np.sum((points - centre) ** 2, axis=1)))),
                   section_width_mm=float(np.ptp(points[:, 0]) + lobe_labels.GetSpacing()[0]),
                   section_depth_mm=float(np.ptp(points[:, 1]) + lobe_labels.GetSpacing()[1]),
                   status="ok", note=f"{location.name}; slice {int(slice_number)} -> z {z_mm:.1f} mm")
        rows.append(row)
    return _finish(rows) if rows else empty_table()


def exclusion_counts(table: pd.DataFrame) -> pd.DataFrame:
    """How many nodules were used and how many were excluded, by reason (``status``)."""
    counts = table["status"].fillna("missing_status").value_counts()
    out = counts.rename_axis("status").reset_index(name="nodules")
    out["used"] = out["status"] == "ok"
    return out.sort_values(["used", "nodules"], ascending=[False, False]).reset_index(drop=True)
