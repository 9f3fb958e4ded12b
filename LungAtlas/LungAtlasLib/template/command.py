"""Build a groupwise lung template (the atlas space) from CTs and their lung/lobe labels.

Input: a manifest CSV with columns case_id, ct, labels (paths relative to the CSV;
labels = lobe map 1-5 or a lung mask), or repeated --case ID CT LABELS.
Output folder (atlas bundle): template_ct.nii.gz, template_labels.nii.gz (majority
vote), probability_<lobe>.nii.gz, atlas.json (inputs, parameters, per-round
convergence, package versions, weights hash).

Example:
  lungatlas template --manifest cases.csv --backend classical --rounds 3 --spacing 2 --out atlas/
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

HELP = "build a groupwise template (atlas CT, lobe labels and probabilities) from N scans"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..registration.command import add_backend_arguments

    parser.add_argument("--manifest", type=Path, help="CSV with columns case_id, ct, labels")
    parser.add_argument("--case", nargs=3, action="append", metavar=("ID", "CT", "LABELS"), default=[],
                        help="one case (repeatable)")
    parser.add_argument("--rounds", type=int, default=3, help="register-average-update rounds (default 3)")
    parser.add_argument("--reference", help="case id of the initial reference (default: the medoid)")
    parser.add_argument("--template-spacing", type=float, default=2.0, help="template voxel size in mm (default 2)")
    parser.add_argument("--out", required=True, type=Path, help="atlas output folder")
    add_backend_arguments(parser)


def read_manifest(path: Path) -> list[tuple[str, Path, Path]]:
    from ..cli import UserError

    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"case_id", "ct", "labels"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"manifest {path} lacks the column(s) {sorted(missing)} (needs case_id, ct, labels)")
        return [(row["case_id"], path.parent / row["ct"], path.parent / row["labels"]) for row in reader]


def run(args) -> int:
    from ..cli import UserError
    from ..io import read_image, read_label_map
    from ..registration import RegistrationError
    from ..registration.command import backend_options
    from .builder import TemplateCase, build_template, write_atlas

    entries = (read_manifest(args.manifest) if args.manifest else []) + [(i, Path(c), Path(l)) for i, c, l in args.case]
    if len(entries) < 2:
        raise UserError("a template needs at least 2 cases (--manifest or --case)")
    cases = [TemplateCase(case_id, read_image(ct), read_label_map(labels), {"ct": str(ct), "labels": str(labels)})
             for case_id, ct, labels in entries]
    try:
        result = build_template(cases, backend=args.backend, backend_options=backend_options(args),
                                rounds=args.rounds, reference=args.reference, spacing_mm=args.template_spacing)
    except (RegistrationError, ValueError) as exc:
        raise UserError(f"building the template: {exc}") from None
    write_atlas(result, args.out)
    last = result.rounds[-1]
    print(f"template from {len(cases)} cases (reference {result.reference}), {len(result.rounds)} rounds: "
          f"mean lung Dice to template {last['mean_lung_dice_to_template']:.3f}, "
          f"mean displacement {last['mean_displacement_mm']:.2f} mm; wrote {args.out}")
    return 0
