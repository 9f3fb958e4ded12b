"""The cohort subcommands of ``lungatlas`` (index, run, status, retry, report).

Every subcommand names its run folder with ``--out DIR``; ``run`` and ``retry``
reuse the configuration stored there, changed only by the options given.
"""
from __future__ import annotations

import json
from pathlib import Path

from .. import config as cfgmod


def add_out(parser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="run folder (created; reused to resume)")


def add_inputs(parser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dicom", type=Path, help="DICOM tree to index (NLST layout participant/study/series)")
    source.add_argument("--manifest", type=Path,
                        help="CSV of cases: ct (NIfTI/NRRD/MHA file or DICOM folder), optional case_id, "
                             "participant_id, study_yr, series_uid, labels, nodules, phenotype columns")
    parser.add_argument("--nlst-tables", type=Path, help="folder with the NLST CDAS CSVs (prsn, screen, ctab)")
    parser.add_argument("--index-workers", type=int, default=2, help="processes reading DICOM headers (default 2)")


def add_pipeline_options(parser) -> None:
    group = parser.add_argument_group("pipeline (stored in the run folder; a change reruns what depends on it)")
    group.add_argument("--config", type=Path, help="configuration file (JSON or YAML; keys as run_config.json)")
    group.add_argument("--segmenter", help="segmentation backend (e.g. totalsegmentator, classical, precomputed)")
    group.add_argument("--segmenter-option", action="append", default=[], metavar="KEY=VALUE",
                       help="backend option; VALUE is JSON or text; {case_id}/{labels}/... filled per case")
    group.add_argument("--registration", help="registration backend (e.g. unigradicon, classical)")
    group.add_argument("--registration-option", action="append", default=[], metavar="KEY=VALUE")
    group.add_argument("--template", type=Path, help="existing template folder (ct.nii.gz + lobes.nii.gz)")
    group.add_argument("--template-subset", type=int, help="cases the template is built from (default 30)")
    group.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                       help="module imported on every worker (registers extra backends)")


def add_execution_options(parser) -> None:
    group = parser.add_argument_group("execution (not part of the results)")
    group.add_argument("--workers", type=int, help="local worker processes (1 = in-process, the default)")
    group.add_argument("--memory-limit", help="memory limit per local worker, e.g. 6GB")
    group.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://head:8786")
    group.add_argument("--jobqueue", choices=["slurm", "pbs"],
                       help="start a dask-jobqueue cluster from Dask's jobqueue configuration (docs/cohort.md)")
    group.add_argument("--jobs", type=int, default=1, help="batch jobs to request with --jobqueue")
    group.add_argument("--gpu-resources", action="store_true", default=None,
                       help="model stages ask for resources GPU=1 (workers must declare --resources GPU=1)")
    group.add_argument("--retries", type=int, help="Dask retries of a failed case task (default 0)")
    group.add_argument("--allowed-failures", type=int,
                       help="worker deaths a case may cause before it is recorded as failed (default 2)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_option(text: str) -> tuple[str, object]:
    from ...cli import UserError

    if "=" not in text:
        raise UserError(f"option {text!r} must be KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def build_config(args, out: Path) -> dict:
    """Stored configuration (or the defaults), then --config, then the command-line options."""
    from ...cli import UserError

    config = cfgmod.load_run_config(out) or cfgmod.default_config()
    if getattr(args, "config", None):
        try:
            config = cfgmod.merge(config, cfgmod.load_config_file(args.config))
        except ValueError as exc:
            raise UserError(str(exc)) from None
    if getattr(args, "segmenter", None):
        if args.segmenter != config["segmentation"]["name"]:
            config["segmentation"] = {"name": args.segmenter, "options": {}}
    for option in getattr(args, "segmenter_option", []):
        key, value = _parse_option(option)
        config["segmentation"].setdefault("options", {})[key] = value
    if getattr(args, "registration", None):
        if args.registration != config["registration"]["name"]:
            config["registration"] = {"name": args.registration, "options": {}}
    for option in getattr(args, "registration_option", []):
        key, value = _parse_option(option)
        config["registration"].setdefault("options", {})[key] = value
    if getattr(args, "template", None):
        config["template"]["path"] = str(Path(args.template).resolve())
    if getattr(args, "template_subset", None):
        config["template"]["subset"] = args.template_subset
    for plugin in getattr(args, "plugin", []):
        if plugin not in config["plugins"]:
            config["plugins"].append(plugin)
    execution = config["execution"]
    for name in ("workers", "memory_limit", "scheduler", "retries", "allowed_failures", "gpu_resources"):
        value = getattr(args, name, None)
        if value is not None:
            execution[name] = value
    if getattr(args, "jobqueue", None):
        execution["jobqueue"] = args.jobqueue
        execution["jobs"] = args.jobs
    return config


def executor_from(config: dict, args):
    from ..executor import Executor
    return Executor(progress=not getattr(args, "no_progress", False), **config["execution"])


def print_summary(summary: dict, out: Path) -> int:
    """One paragraph for the user; exit status 1 when any case failed."""
    print(f"cohort {out}: {summary['done']}/{summary['cases']} cases finished, {summary['failed']} failed; "
          f"ran now: {summary['ran']['segment']} segmentations, {summary['ran']['register']} registrations; "
          f"{summary['seconds']} s")
    if summary.get("lung_dice_after_mean") is not None:
        print(f"  whole-lung Dice to the template: {summary.get('lung_dice_before_mean')} before -> "
              f"{summary['lung_dice_after_mean']} after registration (mean); "
              f"nodules mapped: {summary.get('nodules_mapped')}")
    if summary["failed"]:
        shown = ", ".join(summary["failed_cases"][:10])
        print(f"  failed: {shown}{' ...' if summary['failed'] > 10 else ''} "
              f"(`lungatlas status --out {out}` shows errors; `lungatlas retry --out {out}` reruns them)")
    if summary.get("aggregate_error"):
        print(f"  aggregate FAILED: {summary['aggregate_error']} (case results are complete; "
              f"`lungatlas report --out {out}` retries it)")
    elif summary.get("report"):
        print(f"  report: {summary['report']}")
    print(f"  table: {out / 'cohort_table.csv'}")
    return 1 if summary["failed"] or summary.get("aggregate_error") else 0


def user_errors():
    """Exceptions that are the user's to fix: shown as one line (exit 2)."""
    from ..executor import SchedulerUnreachable
    from ..pipeline import CohortError
    from ...nodules.inputs import NoduleInputError
    return (CohortError, SchedulerUnreachable, ValueError, NoduleInputError)
