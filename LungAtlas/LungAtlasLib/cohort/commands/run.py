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
    add_pipeline_options(parser)
    add_execution_options(parser)


def run(args, retry_failed: bool = False, on_case=None) -> int:
    from ...cli import UserError
    from ..pipeline import index_cohort, run_cohort

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(args, out)
    try:
        if getattr(args, "dicom", None) is not None or getattr(args, "manifest", None) is not None:
            index_cohort(out, dicom=args.dicom, manifest=args.manifest, nlst_tables=args.nlst_tables,
                         config=config, workers=args.index_workers)
        summary = run_cohort(out, config, retry_failed=retry_failed, executor=executor_from(config, args),
                             on_case=on_case)
    except user_errors() as exc:
        raise UserError(str(exc)) from None
    return print_summary(summary, out)
