"""Show a run folder's progress from its records: cases finished, failed (with errors), pending."""
from __future__ import annotations

from . import add_out

HELP = "show finished, failed and pending cases of a run folder"


def add_arguments(parser) -> None:
    add_out(parser)
    parser.add_argument("--tracebacks", action="store_true", help="print the traceback of each failure")


def run(args) -> int:
    from ...cli import UserError
    from .. import records
    from ..pipeline import CohortError, status

    out = args.out.resolve()
    try:
        info = status(out)
    except CohortError as exc:
        raise UserError(str(exc)) from None
    counts = ", ".join(f"{v} {k}" for k, v in sorted(info["counts"].items())) or "no records yet"
    print(f"cohort {out}: {info['cases']} cases: {counts}")
    for failure in info["failures"]:
        print(f"  {failure['case_id']}: {failure['failed_stage']}: {failure['error']}")
        if args.tracebacks:
            record = records.read_record(out, failure["case_id"])
            print("    " + record["stages"][failure["failed_stage"]].get("traceback", "").replace("\n", "\n    "))
    return 1 if info["failures"] else 0
