"""The nodule atlas report: which figures and tables, in which order, with which explanations."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..geometry import resample_to, same_grid
from ..io import read_image
from ..paths import inside
from . import figures
from .html import build_report

STATISTICS_TEXT = (
    "Density maps: Gaussian kernel density of the nodule centres in atlas space (sigma = {bandwidth:g} mm), "
    "edge-corrected to the atlas lungs, in nodules per mL of lung per scan (scans without nodules count).\n\n"
    "Per-lobe rate = share of nodules in the lobe / share of atlas lung volume in the lobe; 1 means as many "
    "nodules as the lobe's size predicts. Intervals: Wilson score 95 % for the share, divided by the volume "
    "share (taken as known). Wilson treats nodules as independent; several nodules of one participant are not, "
    "so the intervals are somewhat too narrow when participants have many nodules.")

COMPARISON_TEXT = (
    "Lobe counts per group: Pearson chi-square test of independence (groups x lobes). Density maps: difference "
    "of group-mean density maps (first minus last group), permutation test with the group labels permuted "
    "between participants (between scans for the screening year), family-wise error controlled by the maximum "
    "statistic over the lungs; p_fwe_global is the corrected p-value of the most different voxel.")


def write_atlas_report(out_dir, result, atlas_ct: sitk.Image, atlas_labels: sitk.Image, comparisons,
                       *, bandwidth_mm: float) -> Path:
    """Figures under ``out_dir/figures`` and ``out_dir/report.html`` from an AtlasStatistics result."""
    out_dir = Path(out_dir)
    fig_dir = inside(out_dir, "figures")
    if not same_grid(atlas_ct, atlas_labels):
        atlas_ct = resample_to(atlas_ct, atlas_labels)
    tables = result.tables
    sections = []

    intro = ("Where nodules occur in the atlas and how that differs between groups. All maps are NIfTI files in "
             "atlas space under maps/ (open them in Slicer over the template); all tables are under tables/ "
             "as CSV and Parquet.")
    sections.append({"title": "Cohort and exclusions",
                     "text": "Every nodule of the input is counted: used, or excluded with its reason.",
                     "tables": [("summary", tables["summary"], "Summary"),
                                ("exclusions", tables["exclusions"], "Nodules used and excluded, by reason")]})

    if "alignment_metrics" in tables and len(tables["alignment_metrics"]):
        path = figures.alignment_boxplots(tables["alignment_metrics"], fig_dir / "alignment_metrics.png")
        result.figures["alignment_metrics"] = path
        sections.append({"title": "Alignment to the atlas, before and after registration",
                         "text": "Per region and case: Dice, relative volume difference and Hausdorff 95 of the "
                                 "case's lobes against the atlas lobes, and intensity MSE (HU clamped to "
                                 "[-1000, 1000], scaled to [0, 1]).",
                         "figures": [(path, "Alignment metrics per region, before (red) and after (blue)")]})

    all_map = read_image(result.maps["all"])
    path = figures.density_views(all_map, atlas_ct, fig_dir / "density_all.png",
                                 title="Nodule density, all nodules")
    result.figures["density_all"] = path
    path_rates = figures.lobe_rate_bars(tables["lobe_rates"], fig_dir / "lobe_rates.png")
    result.figures["lobe_rates"] = path_rates
    sections.append({"title": "Where nodules occur",
                     "text": STATISTICS_TEXT.format(bandwidth=bandwidth_mm),
                     "figures": [(path, "Density of all used nodules over the template: slices through the peak "
                                        "and maximum projections (R = patient right, A = anterior)"),
                                 (path_rates, "Per-lobe rate with 95 % CI, and shares of nodules and volume")],
                     "tables": [("lobe_rates", tables["lobe_rates"], "Per-lobe counts, shares and rates"),
                                ("zone_rates", tables["zone_rates"], "Central vs peripheral")]})

    comparison_figures = []
    for column, a, b, contingency, test in comparisons:
        chi = tables["phenotype_chi_square"].set_index("phenotype").loc[column, "p_value"]
        bars = figures.group_lobe_shares(contingency, fig_dir / f"lobes_{column}.png",
                                         title=f"Lobe shares by {column.replace('_', ' ')} "
                                               f"(chi-square p = {chi:.3g})")
        diff_image = sitk.GetImageFromArray(test["difference"])
        diff_image.CopyInformation(atlas_labels)
        diff = figures.density_views(diff_image, atlas_ct, fig_dir / f"difference_{column}.png",
                                     title=f"Density difference {a} minus {b} " + (
                                         f"(p_FWE = {test['p_global']:.3g})" if test["p_global"] == test["p_global"]
                                         else "(not tested: too few participants)"), diverging=True)
        result.figures[f"lobes_{column}"] = bars
        result.figures[f"difference_{column}"] = diff
        comparison_figures += [(bars, f"Lobe shares by {column}"), (diff, f"Density difference, {a} minus {b}")]
    if comparisons:
        sections.append({"title": "Phenotype comparisons", "text": COMPARISON_TEXT,
                         "tables": [("phenotype_chi_square", tables["phenotype_chi_square"],
                                     "Chi-square on lobe counts"),
                                    ("phenotype_permutation", tables["phenotype_permutation"],
                                     "Permutation test on density maps (FWE by max statistic)"),
                                    ("phenotype_lobe_counts", tables["phenotype_lobe_counts"],
                                     "Lobe counts per group")],
                         "figures": comparison_figures})
    if len(tables.get("longitudinal_summary", [])):
        sections.append({"title": "Longitudinal: nodules across screens",
                         "text": "A later nodule is persistent when a nodule of the same participant at an earlier "
                                 "screen lies within the match distance in the atlas, else new.",
                         "tables": [("longitudinal_summary", tables["longitudinal_summary"],
                                     "Nodules per screening year")]})
    return build_report(out_dir, sections, intro=intro)
