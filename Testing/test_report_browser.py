"""`lungatlas atlas-stats` end to end, and its report rendered in a real headless Chromium:
figures load, and the numbers on the page are the numbers in the tables."""
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from LungAtlasLib import cli, phantom
from LungAtlasLib.io import read_image, write_image
from LungAtlasLib.nodules import density, simulate
from LungAtlasLib.report.html import format_value

sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--allow-file-access-from-files"]


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory):
    """A planted cohort through the real command line: atlas folder, tables, report."""
    root = tmp_path_factory.mktemp("atlas_stats")
    atlas = phantom.make_atlas_subject(spacing_mm=6.0)
    atlas_dir = root / "atlas"
    write_image(atlas.ct, atlas_dir / "template_ct.nii.gz")
    write_image(atlas.labels, atlas_dir / "template_lobes.nii.gz")
    mapped, scans = simulate.planted_cohort(atlas.labels, 40, seed=3, scans_per_participant=2,
                                            weights_per_ml=phantom.LOBE_NODULE_WEIGHT)
    # rows excluded upstream must be counted in the report, not lost
    excluded = pd.DataFrame([{"nodule_id": f"x{i}", "case_id": scans.case_id[i], "participant": scans.participant[i],
                              "study_yr": 0, "status": status, "atlas_lobe": 0}
                             for i, status in enumerate(["nlst_other_location", "nlst_other_location",
                                                         "no_registration"])])
    pd.concat([mapped, excluded]).to_csv(root / "mapped.csv", index=False)
    scans.drop(columns="sex").to_csv(root / "scans.csv", index=False)
    participants = scans.drop_duplicates("participant")
    pd.DataFrame({"pid": participants.participant, "gender": np.where(participants.sex == "male", 1, 2),
                  "age": 62, "cigsmok": 1, "pkyr": 50.0, "can_scr": 0}).to_csv(root / "prsn.csv", index=False)
    rng = np.random.default_rng(0)
    metrics = pd.DataFrame([{"case_id": c, "stage": stage, "region": region, "dice": d0 + rng.normal(0, 0.03),
                             "relative_volume_difference": abs(rng.normal(0.1, 0.05)),
                             "hausdorff95_mm": abs(rng.normal(5.0, 2.0))}
                            for c in scans.case_id[:8] for stage, d0 in (("before", 0.45), ("after", 0.93))
                            for region in ("right_upper", "right_middle", "lung")]
                           + [{"case_id": c, "stage": stage, "region": "image", "mse": abs(rng.normal(m, m / 4))}
                              for c in scans.case_id[:8] for stage, m in (("before", 0.11), ("after", 0.01))])
    metrics.to_csv(root / "metrics.csv", index=False)
    out = root / "out"
    code = cli.main(["atlas-stats", "--nodules", str(root / "mapped.csv"), "--atlas", str(atlas_dir),
                     "--scans", str(root / "scans.csv"), "--phenotypes", str(root / "prsn.csv"),
                     "--metrics", str(root / "metrics.csv"), "--permutations", "19", "--out", str(out)])
    assert code == 0
    return {"out": out, "mapped": mapped, "scans": scans}


def test_maps_and_tables_are_written_with_names_that_say_what_they_are(atlas_run):
    out = atlas_run["out"]
    maps = {p.name for p in (out / "maps").glob("*.nii.gz")}
    assert {"nodule_density_all.nii.gz", "nodule_density_sex_male.nii.gz", "nodule_density_sex_female.nii.gz",
            "nodule_density_difference_sex_male_minus_female.nii.gz", "nodule_density_pfwe_sex_male_vs_female.nii.gz",
            "nodule_density_screen_year_T0.nii.gz"} <= maps
    # age, smoking, pack-years and cancer have one level in this cohort: no comparison, no maps
    assert not any("smoking" in name for name in maps)
    density_all = read_image(out / "maps" / "nodule_density_all.nii.gz")
    # integral over the atlas = used nodules / scans (edge-corrected kernels keep every nodule's mass)
    assert density.integral(density_all) == pytest.approx(len(atlas_run["mapped"]) / 40, rel=1e-3)
    exclusions = pd.read_csv(out / "tables" / "exclusions.csv").set_index("status")["nodules"].to_dict()
    assert exclusions == {"ok": len(atlas_run["mapped"]), "nlst_other_location": 2, "no_registration": 1}
    parquet = pd.read_parquet(out / "tables" / "lobe_rates.parquet")
    assert parquet["count"].sum() == len(atlas_run["mapped"])
    longitudinal = pd.read_csv(out / "tables" / "longitudinal_summary.csv")
    # baseline = the nodules of each participant's first screen that has any
    mapped = atlas_run["mapped"]
    first = mapped.groupby("participant")["study_yr"].transform("min")
    assert longitudinal["baseline"].sum() == (mapped["study_yr"] == first).sum()
    assert longitudinal[["baseline", "new", "persistent"]].to_numpy().sum() == len(mapped)


class _DomReader(HTMLParser):
    """Tables (data-table -> rows of {column: text}), images and the figure status of a dumped DOM."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.status = {}, [], {}
        self._table, self._row, self._column, self._text = None, None, None, ""

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "data-table" in attrs:
            self._table = self.tables.setdefault(attrs["data-table"], [])
        elif tag == "tr" and self._table is not None:
            self._row = {}
        elif tag == "td" and self._row is not None:
            self._column, self._text = attrs.get("data-column"), ""
        elif tag == "img":
            self.images.append(attrs)
        elif attrs.get("id") == "figure-status":
            self.status = attrs

    def handle_data(self, data):
        if self._column is not None:
            self._text += data

    def handle_endtag(self, tag):
        if tag == "td" and self._column is not None:
            self._row[self._column] = self._text
            self._column = None
        elif tag == "tr" and self._row:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def _chromium(args, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("Debian chromium is not installed: CI must `apt-get install -y chromium`")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_chromium_with_figures_and_the_table_numbers(atlas_run, tmp_path):
    out = atlas_run["out"]
    report = (out / "report.html").resolve()
    result = _chromium(["--virtual-time-budget=10000", "--dump-dom", report.as_uri()], tmp_path)
    dom = _DomReader()
    dom.feed(result.stdout)
    # every figure decoded in the browser (the page's own script counts naturalWidth > 0)
    assert len(dom.images) >= 5
    assert all(int(img.get("data-natural-width", 0)) > 0 for img in dom.images), dom.images
    assert dom.status.get("data-loaded") == dom.status.get("data-total") == str(len(dom.images))
    # the numbers shown are the numbers in the tables
    for name in ("lobe_rates", "exclusions", "phenotype_chi_square", "summary"):
        csv = pd.read_csv(out / "tables" / f"{name}.csv")
        shown = dom.tables[name]
        assert len(shown) == len(csv), name
        for row, (_, expected) in zip(shown, csv.iterrows()):
            for column, value in expected.items():
                assert row[column] == format_value(value), (name, column, row[column], value)
    rates = {row["lobe_key"]: float(row["rate"]) for row in dom.tables["lobe_rates"]}
    assert rates["right_upper"] > 1.0  # the planted right-upper-lobe excess is what a reader sees
    # a screenshot of the top of the page for the README / visual check
    shot = tmp_path / "report.png"
    _chromium(["--window-size=1200,2400", "--hide-scrollbars", f"--screenshot={shot}", report.as_uri()], tmp_path)
    assert shot.stat().st_size > 20_000


def test_atlas_stats_refuses_an_unmapped_table(tmp_path, capsys):
    atlas = phantom.make_atlas_subject(spacing_mm=8.0)
    write_image(atlas.ct, tmp_path / "atlas" / "template_ct.nii.gz")
    write_image(atlas.labels, tmp_path / "atlas" / "template_lobes.nii.gz")
    pd.DataFrame({"case_id": ["a"], "x_lps": [0.0], "y_lps": [0.0], "z_lps": [0.0]}).to_csv(tmp_path / "n.csv")
    code = cli.main(["atlas-stats", "--nodules", str(tmp_path / "n.csv"), "--atlas", str(tmp_path / "atlas"),
                     "--out", str(tmp_path / "out")])
    assert code == 2
    assert "n.csv: missing columns" in capsys.readouterr().err
    code = cli.main(["atlas-stats", "--nodules", str(tmp_path / "n.csv"), "--atlas", str(tmp_path),
                     "--out", str(tmp_path / "out")])
    assert code == 2  # a folder without a template names what it needs
