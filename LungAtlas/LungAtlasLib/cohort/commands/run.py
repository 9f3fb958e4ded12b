"""Run (or resume) the cohort pipeline: segment -> template -> register -> metrics -> nodules -> aggregate.

Indexes first when --dicom or --manifest is given. Finished stages are never
recomputed; a changed option reruns only the stages that depend on it; a
failed case is recorded (error and traceback in cases/<case>/record.json) and
the batch goes on. Exit status 1 when any case failed.
"""
from __future__ import annotations

from . import (add_execution_options, add_inputs, add_out, add_pipeline_options, build_config, executor_from,
               print_summary, user_errors)

HELP = "run or resume the cohort pipeline in a run folder"


def add_arguments(parser) -> None:
    add_out(parser)
    add_inputs(parser)
    parser.add_argument("--reindex", action="store_true",
                        help="read the DICOM tree again although this run folder has indexed it")
    add_pipeline_options(parser)
    add_execution_options(parser)


def needs_index(args, out) -> bool:
    """Index when an input is given, except a DICOM tree already indexed into this folder
    (reading every header again would cost hours at NLST scale; --reindex forces it).
    Manifests and NLST tables are cheap to read and are always read again."""
    from ...paths import read_json
    from ..pipeline import cases_path

    dicom, manifest = getattr(args, "dicom", None), getattr(args, "manifest", None)
    if dicom is None and manifest is None:
        return False
    if manifest is not None or getattr(args, "reindex", False) or not cases_path(out).exists():
        return True
    source = read_json(cases_path(out)).get("source", {})
    return source.get("dicom") != str(dicom.resolve()) or bool(args.nlst_tables)


def run(args, retry_failed: bool = False, on_case=None) -> int:
    from ...cli import UserError
    from ..pipeline import index_cohort, run_cohort

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(args, out)
    try:
        if needs_index(args, out):
            index_cohort(out, dicom=args.dicom, manifest=args.manifest, nlst_tables=args.nlst_tables,
                         config=config, workers=args.index_workers)
        summary = run_cohort(out, config, retry_failed=retry_failed, executor=executor_from(config, args),
                             on_case=on_case)
    except user_errors() as exc:
        raise UserError(str(exc)) from None
    return print_summary(summary, out)
