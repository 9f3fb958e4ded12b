"""The ``lungatlas`` command line: one subcommand per pipeline step.

Each step's module owns its subcommand through ``add_arguments(parser)`` and
``run(args) -> int``; this file only lists them, so adding a step is one line.
Errors that the user can fix (bad input, missing weights) print one clear line
and exit with status 2; anything else keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand name -> module (relative to this package) that implements it
COMMAND_MODULES = {
    "demo": ".demo",
    "info": ".describe",
    "segment": ".segmentation.cli",
    "index": ".cohort.commands.index",
    "run": ".cohort.commands.run",
    "status": ".cohort.commands.status",
    "retry": ".cohort.commands.retry",
    "report": ".cohort.commands.report",
    "atlas-stats": ".nodules.atlas_stats",
    "register": ".registration.command",
    "template": ".template.command",
}


class UserError(Exception):
    """A problem the user can fix; its message is printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungatlas",
        description="LungAtlas: population atlas of lung nodule locations from chest CT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMAND_MODULES.items():
        module = importlib.import_module(module_name, __package__)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> int:
    from .io import ImageInputError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._run(args) or 0)
    except (UserError, ImageInputError, FileNotFoundError) as exc:
        print(f"lungatlas {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lungatlas {args.command}: interrupted; finished work is kept, run again to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Under "python -m" this file runs as __main__, a second copy of the module:
    # call the package's own main so that UserError is the class the steps raise.
    from LungAtlasLib.cli import main as package_main
    sys.exit(package_main())
