"""Rebuild a run folder's cohort table (Parquet + CSV) and cohort summaries from its records.

Works at any time, also while a run is going on: the records are the truth,
everything written here is derived from them.
"""
from __future__ import annotations

from . import add_out

HELP = "rebuild the cohort table and cohort summaries of a run folder"


def add_arguments(parser) -> None:
    add_out(parser)


def run(args) -> int:
    from ...cli import UserError
    from ...paths import read_json
    from .. import records
    from ..pipeline import CohortError, aggregate, load_cases

    out = args.out.resolve()
    try:
        cases = load_cases(out)
    except CohortError as exc:
        raise UserError(str(exc)) from None
    table = records.write_cohort_table(out, [c["case_id"] for c in cases])
    summary = {}
    templates = sorted((out / "template").glob("*/template.json"), key=lambda p: p.stat().st_mtime)
    config_template = (read_json(out / "run_config.json").get("template") or {}).get("path") \
        if (out / "run_config.json").exists() else None
    template = None
    if config_template:
        from ..pipeline import _given_template
        from .. import config as cfgmod

        template = _given_template(config_template)
        template["hash"] = cfgmod.template_hash({"template": {"path": config_template}}, {})
    elif templates:
        template = read_json(templates[-1])
    if template is not None and (table["status"] == "done").any():
        config = read_json(out / "run_config.json") if (out / "run_config.json").exists() else {}
        summary = aggregate(out, table, template, config.get("aggregate"))
    done = int((table["status"] == "done").sum()) if len(table) else 0
    print(f"report {out}: cohort table of {len(table)} cases ({done} finished) in {out / 'cohort_table.csv'}"
          + (f"; aggregate in {out / 'aggregate'} ({summary.get('nodules_mapped')} nodules mapped)" if summary else ""))
    return 0
