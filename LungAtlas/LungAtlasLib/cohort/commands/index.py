"""Index a cohort: read DICOM headers (or a manifest), choose one series per exam, join NLST tables.

Writes index/series.csv, index/exams.csv (the chosen series per exam and why),
index/cases.csv and index/cases.json (the cases `lungatlas run` processes) and
index/problems.txt (exams without a usable series, unknown codes, duplicates).
"""
from __future__ import annotations

from . import add_inputs, add_out, build_config, user_errors

HELP = "index a DICOM tree or manifest (+ NLST tables) into the cases of a run folder"


def add_arguments(parser) -> None:
    add_out(parser)
    add_inputs(parser)
    parser.add_argument("--config", help="configuration file (its series_rule chooses the series)")


def run(args) -> int:
    from ...cli import UserError
    from .. import config as cfgmod
    from ..pipeline import index_cohort

    if args.dicom is None and args.manifest is None:
        raise UserError("give --dicom DIR or --manifest CSV")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(args, out)
    try:
        summary = index_cohort(out, dicom=args.dicom, manifest=args.manifest, nlst_tables=args.nlst_tables,
                               config=config, workers=args.index_workers)
    except user_errors() as exc:
        raise UserError(str(exc)) from None
    cfgmod.save_run_config(out, config)
    print(f"index {out}: {summary['series']} series -> {summary['cases']} cases; {summary['problems']} problems "
          f"(index/problems.txt); {summary['seconds']} s")
    return 0
