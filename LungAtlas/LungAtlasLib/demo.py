"""Run LungAtlas end to end on the built-in demo cohort (seeded chest phantoms).

Writes the demo cohort (CT, truth lobes, truth nodules) under --out/demo_cohort
and runs the cohort engine on it in --out: segmentation, a template built from
the subjects (groupwise, classical registration), registration of every subject
to it, alignment metrics before and after, nodules mapped into the atlas, and
the aggregate (density maps, per-lobe rates, phenotype comparisons, report). Run
again into the same folder to resume: nothing finished is recomputed.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

from . import phantom
from .paths import inside, read_json

HELP = "run the whole pipeline on the built-in demo cohort (resumable)"
log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="run folder (created; reused to resume)")
    parser.add_argument("--subjects", type=int, default=6, help="number of demo subjects (default 6)")
    parser.add_argument("--spacing", type=float, default=4.0, help="phantom voxel size in mm (default 4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first subject (default 1)")
    parser.add_argument("--segmenter", default="precomputed",
                        help="segmentation backend: precomputed (the phantoms' lobe maps, as the published NLST "
                             "TotalSegmentator segmentations would be used; default) or classical (lungs only, "
                             "computed: no lobe statistics)")
    parser.add_argument("--template", choices=["build", "phantom"], default="build",
                        help="build the template from the demo subjects (default) or use the canonical phantom")
    parser.add_argument("--registration", default="classical", help="registration backend (default classical)")
    parser.add_argument("--registration-spacing", type=float, default=8.0,
                        help="grid spacing (mm) of the classical registration (default 8: a demo, not a study)")
    parser.add_argument("--workers", type=int, default=1, help="local Dask worker processes (1 = in-process)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                        help="module imported on every worker (registers extra backends)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def ensure_demo_cohort(out: Path, n_subjects: int, spacing_mm: float, first_seed: int = 1) -> pd.DataFrame:
    """Write the atlas subject and ``n_subjects`` phantoms under ``out/demo_cohort``;
    a subject whose ``subject.json`` exists is kept. Returns the manifest."""
    cohort = inside(out, "demo_cohort")
    rows = []
    specs = [("atlas", 0, 0.0)] + [(f"demo{first_seed + i:03d}", first_seed + i, 1.0) for i in range(n_subjects)]
    for subject_id, seed, variation in specs:
        folder = inside(cohort, subject_id)
        done = folder / "subject.json"
        if done.exists() and read_json(done).get("spacing_mm") == spacing_mm:
            log.info("demo cohort: %s present, kept", subject_id)
        else:
            subject = phantom.make_subject(seed, spacing_mm=spacing_mm, variation=variation,
                                           n_nodules=0 if variation == 0 else None, subject_id=subject_id)
            subject.metadata.update(phantom.subject_phenotype(seed))
            phantom.write_subject(subject, folder)  # subject.json last: it marks the case complete
            log.info("demo cohort: %s written", subject_id)
        meta = read_json(done)
        rows.append({"case_id": subject_id, "participant_id": subject_id, "ct": str(folder / "ct.nii.gz"),
                     "labels": str(folder / "lobes_truth.nii.gz"), "nodules": str(folder / "nodules_truth.csv"),
                     "is_atlas": subject_id == "atlas",
                     **{k: meta.get(k) for k in ("age", "gender", "cigsmok", "pkyr", "can_scr")}})
    manifest = pd.DataFrame(rows)
    manifest.to_csv(cohort / "all_subjects.csv", index=False)
    return manifest


def demo_config(out: Path, manifest: pd.DataFrame, segmenter: str, registration: str, workers: int,
                registration_spacing: float = 8.0, template: str = "build") -> dict:
    """The cohort configuration of the demo. Template "build": LungAtlas's groupwise
    builder on all demo subjects (2 rounds, 6 mm grid); "phantom": the canonical phantom."""
    from .cohort.config import default_config, merge

    segmentation = {"name": segmenter, "options": {}}
    if segmenter == "precomputed":
        segmentation["options"] = {"path": "{labels}", "code_map": "lungatlas"}
    registration_options = {"spacing_mm": float(registration_spacing)} if registration == "classical" else {}
    if template == "phantom":
        atlas = manifest[manifest.is_atlas].iloc[0]
        folder = inside(out, "demo_cohort", "template")
        folder.mkdir(parents=True, exist_ok=True)
        for source, name in ((atlas.ct, "ct.nii.gz"), (atlas.labels, "lobes.nii.gz")):
            if not (folder / name).exists():
                shutil.copy(source, folder / name)
        template_config = {"path": str(folder)}
    else:
        template_config = {"path": None, "subset": int((~manifest.is_atlas).sum()),
                           "options": {"rounds": 2, "spacing_mm": 6.0}}
    return merge(default_config(), {
        "segmentation": segmentation,
        "registration": {"name": registration, "options": registration_options},
        "template": template_config,
        "execution": {"workers": workers, "memory_limit": "3GB"},
    })


def run(args) -> int:
    from .cli import UserError
    from .cohort import pipeline
    from .cohort.commands import print_summary

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    manifest = ensure_demo_cohort(out, args.subjects, args.spacing, args.seed)
    cases = manifest[~manifest.is_atlas].drop(columns="is_atlas")
    manifest_path = inside(out, "demo_cohort", "manifest.csv")
    cases.to_csv(manifest_path, index=False)
    config = demo_config(out, manifest, args.segmenter, args.registration, args.workers, args.registration_spacing,
                         args.template)
    config["plugins"] = list(args.plugin)
    try:
        pipeline.index_cohort(out, manifest=manifest_path, config=config)
        summary = pipeline.run_cohort(out, config, progress=not args.no_progress)
    except (pipeline.CohortError, ValueError) as exc:
        raise UserError(str(exc)) from None
    return print_summary(summary, out)
