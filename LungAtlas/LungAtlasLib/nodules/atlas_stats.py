"""Atlas statistics from mapped nodules: density maps, per-lobe rates, central vs peripheral,
phenotype comparisons, longitudinal matching, written as NIfTI maps, tables and a report.

    lungatlas atlas-stats --nodules mapped.csv --atlas ATLAS_DIR [--phenotypes prsn.csv]
                          [--scans scans.csv] [--metrics metrics.csv] --out DIR

``--nodules``: a mapped nodule table (CSV or Parquet; columns of
:func:`mapping.map_nodules`: ``atlas_x_lps, atlas_y_lps, atlas_z_lps``, ``status``,
``case_id``, ``participant``, ``study_yr``). ``--atlas``: the atlas bundle folder
(template CT and lobe label map; see :func:`find_atlas_files`). Maps are written
in atlas space on the template grid, so Slicer shows them over the template.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..geometry import voxel_volume_ml
from ..io import read_image, read_label_map, write_image
from ..paths import inside, read_json, safe_name, write_json_atomic
from . import density as density_mod
from .inputs import exclusion_counts
from .lobes import lobe_rates, lobe_volumes_ml, nodule_zones, zone_maps, zone_rates
from .longitudinal import DEFAULT_MATCH_DISTANCE_MM, longitudinal_summary, match_longitudinal
from .phenotypes import (PHENOTYPES, UNKNOWN, GroupDensity, SplatCache, chi_square, density_permutation_test,
                         lobe_contingency, scan_table)

HELP = "density maps, per-lobe rates, phenotype comparisons and a report from mapped nodules"
log = logging.getLogger(__name__)

ATLAS_CT_NAMES = ("template_ct.nii.gz", "template.nii.gz", "atlas_ct.nii.gz", "ct.nii.gz", "template_ct.nrrd")
ATLAS_LABEL_NAMES = ("template_labels.nii.gz", "template_lobes.nii.gz", "lobes.nii.gz", "lobe_labels.nii.gz", "labels.nii.gz",
                     "lobes_truth.nii.gz", "template_lobes.nrrd")


def find_atlas_files(atlas_dir) -> tuple[Path, Path]:
    """(template CT, lobe label map) of an atlas folder: the paths ``atlas.json`` names
    under ``template_ct``/``template_labels`` (or ``lobe_labels``; relative to the folder), else the first of
    :data:`ATLAS_CT_NAMES` / :data:`ATLAS_LABEL_NAMES` that exists."""
    atlas_dir = Path(atlas_dir)
    manifest = atlas_dir / "atlas.json"
    if manifest.exists():
        info = read_json(manifest)
        files = info.get("files", info)
        # template.write_atlas names the label map "template_labels"
        ct, labels = files.get("template_ct"), files.get("template_labels") or files.get("lobe_labels")
        if ct and labels:
            return atlas_dir / ct, atlas_dir / labels
    ct = next((atlas_dir / n for n in ATLAS_CT_NAMES if (atlas_dir / n).exists()), None)
    labels = next((atlas_dir / n for n in ATLAS_LABEL_NAMES if (atlas_dir / n).exists()), None)
    if ct is None or labels is None:
        raise FileNotFoundError(f"atlas folder {atlas_dir}: needs a template CT ({' or '.join(ATLAS_CT_NAMES)}) and "
                                f"a lobe label map ({' or '.join(ATLAS_LABEL_NAMES)}), or an atlas.json naming "
                                "them as template_ct and lobe_labels")
    return ct, labels


def read_table(path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"table {path} does not exist")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def write_table(table: pd.DataFrame, out_dir: Path, name: str) -> dict:
    """``name``.csv and ``name``.parquet under ``out_dir/tables``."""
    folder = inside(out_dir, "tables")
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{name}.csv"
    table.to_csv(csv_path, index=False)
    parquet_path = folder / f"{name}.parquet"
    table.astype({c: str for c in table.columns if table[c].dtype == object}).to_parquet(parquet_path, index=False)
    return {"csv": str(csv_path), "parquet": str(parquet_path)}


@dataclass
class AtlasStatistics:
    """What :func:`compute_atlas_statistics` produced: tables by name, map paths, report path."""

    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    maps: dict[str, Path] = field(default_factory=dict)
    figures: dict[str, Path] = field(default_factory=dict)
    report: Path | None = None


def _comparison_levels(scans: pd.DataFrame, column: str) -> list[str]:
    """Levels present (with scans), in natural order; ``unknown`` left out."""
    present = set(scans[column].astype(str)) - {UNKNOWN}
    ordered = [level for level in PHENOTYPES[column] if level in present]
    return ordered + sorted(present - set(ordered))


def compute_atlas_statistics(mapped: pd.DataFrame, atlas_ct: sitk.Image, atlas_labels: sitk.Image, out_dir, *,
                             scans: pd.DataFrame | None = None, phenotypes: pd.DataFrame | None = None,
                             metrics: pd.DataFrame | None = None, bandwidth_mm: float = 10.0,
                             n_permutations: int = 999, match_distance_mm: float = DEFAULT_MATCH_DISTANCE_MM,
                             seed: int = 0, report: bool = True) -> AtlasStatistics:
    """Everything the nodule atlas reports, written under ``out_dir``:

    ``maps/nodule_density_all.nii.gz`` (nodules per mL per scan),
    ``maps/nodule_density_<phenotype>_<group>.nii.gz``,
    ``maps/nodule_density_difference_<phenotype>_<a>_minus_<b>.nii.gz`` and
    ``maps/nodule_density_pfwe_<phenotype>_<a>_vs_<b>.nii.gz`` (FWE-corrected p),
    ``tables/*.csv|parquet`` and ``report.html``.
    """
    out_dir = Path(out_dir)
    result = AtlasStatistics()
    maps_dir = inside(out_dir, "maps")
    maps_dir.mkdir(parents=True, exist_ok=True)
    lung = sitk.GetArrayViewFromImage(atlas_labels) > 0

    # Nodules: used = status ok (map_nodules already excluded points off the atlas lungs).
    mapped = mapped.copy()
    mapped["participant"] = mapped["participant"].astype(str)
    used = mapped[mapped["status"] == "ok"].copy()
    points = used[["atlas_x_lps", "atlas_y_lps", "atlas_z_lps"]].to_numpy(float)
    scans_all = scan_table(mapped, scans, phenotypes)
    n_scans = len(scans_all)

    zones = zone_maps(atlas_labels)
    zone_table = nodule_zones(points, atlas_labels, zones)
    for column in zone_table:
        used[column] = zone_table[column].to_numpy()
    used = used.drop(columns=[c for c in list(PHENOTYPES) if c in used])
    used = used.merge(scans_all.drop(columns=[c for c in ("participant", "study_yr") if c in scans_all]),
                      on="case_id", how="left")
    for column in PHENOTYPES:
        used[column] = used[column].fillna(UNKNOWN)

    tables = result.tables
    tables["exclusions"] = exclusion_counts(mapped)
    tables["lobe_rates"] = lobe_rates(used["atlas_lobe"], lobe_volumes_ml(atlas_labels))
    tables["zone_rates"] = zone_rates(used["zone"], zones, voxel_volume_ml(atlas_labels))

    # Density of all nodules.
    all_map = density_mod.density_map(points, atlas_labels, lung, bandwidth_mm, n_scans=n_scans)
    result.maps["all"] = write_image(all_map, maps_dir / "nodule_density_all.nii.gz")
    summary = [{"quantity": "scans", "value": n_scans},
               {"quantity": "scans with nodules but missing from the scan list",
                "value": int(scans_all["added_from_nodule_table"].sum())},
               {"quantity": "participants", "value": scans_all["participant"].nunique()},
               {"quantity": "nodules in input", "value": len(mapped)},
               {"quantity": "nodules used", "value": len(used)},
               {"quantity": "nodules excluded", "value": int(len(mapped) - len(used))},
               {"quantity": "nodules per scan (used)", "value": len(used) / max(n_scans, 1)},
               {"quantity": "density integral (nodules per scan)", "value": density_mod.integral(all_map)},
               {"quantity": "kernel bandwidth (mm, Gaussian sigma)", "value": bandwidth_mm},
               {"quantity": "atlas lung volume (mL)", "value": float(lung.sum() * voxel_volume_ml(atlas_labels))},
               {"quantity": "permutations per comparison", "value": n_permutations}]

    # Phenotype groups: density per group, chi-square on lobe counts, permutation test.
    scan_number = {case: i for i, case in enumerate(scans_all["case_id"])}
    point_scan = used["case_id"].map(scan_number).fillna(-1).to_numpy(int)
    known = point_scan >= 0
    cache = SplatCache(points[known], point_scan[known], atlas_labels)
    group_density = GroupDensity(cache, lung, bandwidth_mm)
    chi_rows, perm_rows, counts_rows = [], [], []
    comparison_figures = []
    for column in PHENOTYPES:
        levels = _comparison_levels(scans_all, column)
        if len(levels) < 2:
            continue
        groups = scans_all[column].astype(str).to_numpy()
        for level in levels:
            members = groups == level
            weights = np.where(members, 1.0 / members.sum(), 0.0)
            image = density_mod.to_image(group_density.map(weights), atlas_labels)
            result.maps[f"{column}_{level}"] = write_image(
                image, maps_dir / f"nodule_density_{column}_{safe_name(level)}.nii.gz")
        contingency = lobe_contingency(used, column, levels)
        for level, row in contingency.iterrows():
            counts_rows.append({"phenotype": column, "group": level, "scans": int((groups == level).sum()),
                                **{k: int(v) for k, v in row.items()}, "nodules": int(row.sum())})
        chi_rows.append({"phenotype": column, "groups": " / ".join(levels), **chi_square(contingency.to_numpy())})
        a, b = levels[0], levels[-1]
        units = scans_all["case_id"] if column == "screen_year" else scans_all["participant"]
        test = density_permutation_test(group_density, groups, units.to_numpy(), a, b, n_permutations, seed)
        stem = f"{column}_{safe_name(a)}_minus_{safe_name(b)}"
        result.maps[f"difference_{column}"] = write_image(
            density_mod.to_image(test["difference"], atlas_labels), maps_dir / f"nodule_density_difference_{stem}.nii.gz")
        result.maps[f"pfwe_{column}"] = write_image(
            density_mod.to_image(test["p_fwe"], atlas_labels),
            maps_dir / f"nodule_density_pfwe_{column}_{safe_name(a)}_vs_{safe_name(b)}.nii.gz")
        perm_rows.append({"phenotype": column, "group_a": a, "group_b": b, "scans_a": test["n_a"],
                          "scans_b": test["n_b"], "max_abs_difference": test["max_abs_difference"],
                          "max_abs_statistic": test["max_abs_statistic"],
                          "statistic_fwe_threshold_05": test["fwe_threshold_05"], "p_fwe_global": test["p_global"],
                          "n_permutations": n_permutations,
                          "permuted_unit": "scan" if column == "screen_year" else "participant",
                          "labellings": test["arrangements"], "note": test["note"]})
        comparison_figures.append((column, a, b, contingency, test))
    tables["phenotype_lobe_counts"] = pd.DataFrame(counts_rows)
    tables["phenotype_chi_square"] = pd.DataFrame(chi_rows)
    tables["phenotype_permutation"] = pd.DataFrame(perm_rows)

    longitudinal = match_longitudinal(used, match_distance_mm)
    tables["longitudinal_summary"] = longitudinal_summary(longitudinal) if len(longitudinal) else pd.DataFrame()
    used = used.merge(longitudinal[["nodule_id", "longitudinal_status", "matched_nodule_id", "match_distance_mm"]],
                      on="nodule_id", how="left")
    tables["summary"] = pd.DataFrame(summary)
    tables["nodules_used"] = used
    tables["nodules_all"] = mapped
    tables["scans"] = scans_all
    if metrics is not None:
        tables["alignment_metrics"] = metrics
    for name, table in tables.items():
        write_table(table, out_dir, name)
    write_json_atomic(inside(out_dir, "maps", "maps.json"),
                      {"units": "nodules per mL of lung per scan (Gaussian KDE, edge-corrected to the atlas lungs)",
                       "bandwidth_mm": bandwidth_mm, "maps": {k: Path(v).name for k, v in result.maps.items()}})
    if report:
        from ..report.atlas_report import write_atlas_report
        result.report = write_atlas_report(out_dir, result, atlas_ct, atlas_labels, comparison_figures,
                                           bandwidth_mm=bandwidth_mm)
    return result


def add_arguments(parser) -> None:
    parser.add_argument("--nodules", required=True, type=Path, help="mapped nodule table (CSV or Parquet)")
    parser.add_argument("--atlas", required=True, type=Path, help="atlas folder (template CT + lobe label map)")
    parser.add_argument("--phenotypes", type=Path, help="NLST participant table (prsn CSV) or derived groups")
    parser.add_argument("--scans", type=Path, help="all scans (case_id, participant, study_yr), with or "
                                                   "without nodules; default: the scans named in --nodules")
    parser.add_argument("--metrics", type=Path, help="alignment metrics table (case_id, stage, region, dice, ...)")
    parser.add_argument("--bandwidth", type=float, default=10.0, help="Gaussian kernel sigma in mm (default 10)")
    parser.add_argument("--permutations", type=int, default=999, help="permutations per comparison (default 999)")
    parser.add_argument("--match-distance", type=float, default=DEFAULT_MATCH_DISTANCE_MM,
                        help="longitudinal match distance in atlas mm (default 15)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")


def run(args) -> int:
    from ..cli import UserError

    ct_path, labels_path = find_atlas_files(args.atlas)
    mapped = read_table(args.nodules)
    needed = {"atlas_x_lps", "atlas_y_lps", "atlas_z_lps", "status", "case_id", "participant", "atlas_lobe"}
    if not needed <= set(mapped.columns):
        raise UserError(f"nodule table {args.nodules}: missing columns {sorted(needed - set(mapped.columns))}; "
                        "map the nodules first (nodules.mapping.map_nodules)")
    scans = read_table(args.scans) if args.scans else None
    if scans is not None and not {"case_id", "participant"} <= set(scans.columns):
        raise UserError(f"scan table {args.scans}: needs columns case_id and participant (and study_yr); "
                        f"it has {list(scans.columns)}")
    result = compute_atlas_statistics(
        mapped, read_image(ct_path), read_label_map(labels_path), Path(args.out).resolve(),
        scans=scans,
        phenotypes=read_table(args.phenotypes) if args.phenotypes else None,
        metrics=read_table(args.metrics) if args.metrics else None,
        bandwidth_mm=args.bandwidth, n_permutations=args.permutations, match_distance_mm=args.match_distance)
    print(f"report: {result.report}")
    return 0
