"""NLST CDAS tables: participants (prsn), screening exams (screen), CT abnormalities (ctab).

Column names are the CDAS ones. Codes are mapped only where the data
dictionary is unambiguous; anything else is kept missing and reported in the
returned problem list (with the table, participant and value), never guessed.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..labels import LABELS

PRSN_REQUIRED = ("pid", "age", "gender", "cigsmok", "pkyr")
SCREEN_REQUIRED = ("pid", "study_yr")
CTAB_REQUIRED = ("pid", "study_yr", "sct_ab_desc", "sct_epi_loc")
CTAB_OPTIONAL = ("sct_ab_num", "sct_long_dia", "sct_perp_dia", "sct_margins", "sct_pre_att", "sct_slice_num")

GENDER = {1: "male", 2: "female"}
CIGSMOK = {0: "former", 1: "current"}
STUDY_YEARS = (0, 1, 2)
NODULE_CODE = 51  # sct_ab_desc: non-calcified nodule or mass >= 4 mm

# prsn cancer-location flags (1 = cancer there) -> LungAtlas lobe value
PRSN_LOBE_FLAGS = {"locrup": 1, "locrmid": 2, "locrlow": 3, "loclup": 4, "loclin": 4, "locllow": 5}


def _read(path: str | Path, required: tuple, table: str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NLST {table} table {path} does not exist")
    frame = pd.read_csv(path, low_memory=False)
    frame.columns = [c.strip().lower() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"NLST {table} table {path}: missing column(s) {missing} "
                         f"(found {list(frame.columns)[:20]}); use the CDAS export with its original column names")
    frame["pid"] = frame["pid"].astype(str).str.strip()
    return frame


def _coded(frame: pd.DataFrame, column: str, codes: dict, table: str, problems: list) -> pd.Series:
    """The column's CDAS codes (kept as codes, as the data dictionary defines them);
    codes outside ``codes`` become missing and are reported."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = frame[column].notna() & ~values.isin(list(codes))
    for pid, raw in zip(frame.loc[bad, "pid"], frame.loc[bad, column]):
        problems.append(f"{table}: participant {pid}: unknown {column} code {raw!r} (kept missing)")
    for pid in frame.loc[frame[column].isna(), "pid"]:
        problems.append(f"{table}: participant {pid}: {column} missing")
    return values.where(values.isin(list(codes))).astype("Int64")


def read_participants(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Phenotype per participant, one row per pid: age (years), gender (1 male, 2 female),
    cigsmok (0 former, 1 current), pkyr (pack-years), cancer flags and the lobes of a
    diagnosed cancer. Codes stay CDAS codes; unknown ones become missing and are reported."""
    problems: list[str] = []
    prsn = _read(path, PRSN_REQUIRED, "prsn")
    dup = prsn["pid"][prsn["pid"].duplicated(keep=False)]
    for pid in sorted(set(dup)):
        problems.append(f"prsn: participant {pid} appears {int((prsn['pid'] == pid).sum())} times; "
                        "phenotype left missing for it")
    prsn = prsn[~prsn["pid"].isin(set(dup))].copy()
    out = pd.DataFrame({"participant_id": prsn["pid"]})
    out["age"] = pd.to_numeric(prsn["age"], errors="coerce")
    out["gender"] = _coded(prsn, "gender", GENDER, "prsn", problems)
    out["cigsmok"] = _coded(prsn, "cigsmok", CIGSMOK, "prsn", problems)
    out["pkyr"] = pd.to_numeric(prsn["pkyr"], errors="coerce")
    for pid in prsn.loc[out["age"].isna(), "pid"]:
        problems.append(f"prsn: participant {pid}: age missing or not a number")
    for column in ("can_scr", "cancyr", "conflc", "canc_free_days"):
        if column in prsn.columns:
            out[column] = pd.to_numeric(prsn[column], errors="coerce")
    if "conflc" in out.columns:
        out["lung_cancer"] = out["conflc"] == 1
    elif "can_scr" in out.columns:
        out["lung_cancer"] = out["can_scr"].fillna(0) > 0
    flags = [c for c in PRSN_LOBE_FLAGS if c in prsn.columns]
    other_flags = [c for c in prsn.columns if c.startswith("loc") and c not in PRSN_LOBE_FLAGS]
    lobes, other = [], []
    for _, row in prsn.iterrows():
        found = sorted({PRSN_LOBE_FLAGS[c] for c in flags if pd.to_numeric(row[c], errors="coerce") == 1})
        lobes.append(",".join(LABELS.lobe(v).key for v in found) or None)
        other.append(",".join(c for c in other_flags if pd.to_numeric(row[c], errors="coerce") == 1) or None)
    out["cancer_lobes"] = lobes
    out["cancer_other_locations"] = other
    return out.reset_index(drop=True), problems


def read_screens(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Screening exams: one row per (pid, study_yr); study_yr 0/1/2 = T0/T1/T2."""
    problems: list[str] = []
    screen = _read(path, SCREEN_REQUIRED, "screen")
    screen["study_yr"] = pd.to_numeric(screen["study_yr"], errors="coerce")
    bad = ~screen["study_yr"].isin(STUDY_YEARS)
    for pid, yr in zip(screen.loc[bad, "pid"], screen.loc[bad, "study_yr"]):
        problems.append(f"screen: participant {pid}: study_yr {yr!r} is not 0, 1 or 2 (row dropped)")
    screen = screen[~bad].copy()
    screen["study_yr"] = screen["study_yr"].astype(int)
    keep = ["pid", "study_yr"] + [c for c in screen.columns if c.startswith("ct_recon_filter") or c in
                                  ("ctdxqual", "techpara_kvp", "techpara_effmas")]
    return screen[keep].rename(columns={"pid": "participant_id"}).reset_index(drop=True), problems


def read_abnormalities(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Nodule rows (``sct_ab_desc`` 51) with their lobe from ``sct_epi_loc`` through the
    label table; an unknown or missing location keeps ``lobe`` missing and is reported."""
    problems: list[str] = []
    ctab = _read(path, CTAB_REQUIRED, "ctab")
    ctab["sct_ab_desc"] = pd.to_numeric(ctab["sct_ab_desc"], errors="coerce")
    nodules = ctab[ctab["sct_ab_desc"] == NODULE_CODE].copy()
    nodules["study_yr"] = pd.to_numeric(nodules["study_yr"], errors="coerce")
    lobes, names = [], []
    for pid, code in zip(nodules["pid"], nodules["sct_epi_loc"]):
        if pd.isna(code):
            problems.append(f"ctab: participant {pid}: nodule without sct_epi_loc (lobe unknown)")
            lobes.append(None)
            names.append(None)
            continue
        try:
            loc = LABELS.nlst_location(code)
        except KeyError:
            problems.append(f"ctab: participant {pid}: unknown sct_epi_loc code {code!r} (lobe unknown)")
            lobes.append(None)
            names.append(None)
            continue
        lobes.append(loc.lobe)
        names.append(loc.name)
    nodules["lobe"] = pd.array(lobes, dtype="Int64")
    nodules["location_name"] = names
    keep = ["pid", "study_yr", "sct_epi_loc", "lobe", "location_name"] + [c for c in CTAB_OPTIONAL
                                                                          if c in nodules.columns]
    return nodules[keep].rename(columns={"pid": "participant_id"}).reset_index(drop=True), problems


def join_to_cases(cases: pd.DataFrame, participants: pd.DataFrame | None = None,
                  screens: pd.DataFrame | None = None,
                  nodules: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Add phenotype and screening columns to the cases (by participant_id and study_yr)
    and a ``nlst_nodules`` column: the case's nodule rows as a list of dicts."""
    problems: list[str] = []
    cases = cases.copy()
    cases["participant_id"] = cases["participant_id"].astype(str)
    if participants is not None:
        known = set(participants["participant_id"])
        for pid in sorted(set(cases["participant_id"]) - known):
            problems.append(f"participant {pid}: no row in prsn (phenotype missing)")
        overlap = [c for c in participants.columns if c in cases.columns and c != "participant_id"]
        if overlap:
            problems.append(f"columns {overlap} of the case list replaced by the prsn table's")
            cases = cases.drop(columns=overlap)
        cases = cases.merge(participants, on="participant_id", how="left")
    year = pd.to_numeric(cases.get("study_yr"), errors="coerce") if "study_yr" in cases else None
    if screens is not None and year is not None:
        cases["_yr"] = year
        screens = screens.rename(columns={"study_yr": "_yr"})
        merged = cases.merge(screens.drop_duplicates(["participant_id", "_yr"]), on=["participant_id", "_yr"],
                             how="left", indicator=True)
        for cid in merged.loc[merged["_merge"] == "left_only", "case_id"]:
            problems.append(f"case {cid}: no screen row for this participant and study_yr")
        cases = merged.drop(columns=["_merge", "_yr"])
    if nodules is not None:
        grouped = {}
        for row in nodules.to_dict("records"):
            clean = {k: (None if pd.isna(v) else v) for k, v in row.items()}
            grouped.setdefault((clean["participant_id"], clean["study_yr"]), []).append(clean)
        years = pd.to_numeric(cases["study_yr"], errors="coerce") if "study_yr" in cases else [None] * len(cases)
        cases["nlst_nodules"] = [grouped.get((pid, None if pd.isna(yr) else int(yr)), [])
                                 for pid, yr in zip(cases["participant_id"], years)]
    return cases, problems


def read_cdas_folder(folder: str | Path) -> dict:
    """The three tables from a folder of CDAS CSV exports (file names containing
    prsn / screen / ctab, as CDAS delivers them); absent ones are None."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"NLST table folder {folder} does not exist")
    found = {}
    for key in ("prsn", "screen", "ctab"):
        matches = sorted(p for p in folder.glob("*.csv") if key in p.name.lower())
        if len(matches) > 1:
            raise ValueError(f"NLST table folder {folder}: several {key} files {[m.name for m in matches]}")
        found[key] = matches[0] if matches else None
    return found
