"""Retry the failed cases of a run folder (with its stored configuration).

Only stages that failed, and those after them, run again; finished cases are
untouched. Execution options (workers, scheduler) may be changed here.
"""
from __future__ import annotations

from . import add_execution_options, add_out
from . import run as run_command

HELP = "rerun the failed cases of a run folder"


def add_arguments(parser) -> None:
    add_out(parser)
    add_execution_options(parser)


def run(args, on_case=None) -> int:
    return run_command.run(args, retry_failed=True, on_case=on_case)
