"""The script that LungAtlas's background steps run: ``PythonSlicer runner.py STEP ...``.

It imports only the core (never ``slicer``), so it starts fast, and a crash,
hang or cancel of a model cannot take Slicer down. Protocol on stdout, read by
:mod:`LungAtlasMRML.process`:

- ``LUNGATLAS-PROGRESS <percent> <message>``: progress of the step;
- ``LUNGATLAS-ERROR <message>``: an error the user can act on (exit status 2);
- any other line is log text.

Results go to files under ``--out``, with ``result.json`` written last (atomically):
its presence means the step finished.

Steps:
  segment   --ct CT --backend NAME [--mode M] [--device D] --out DIR
            -> DIR/labels.nii.gz (label table values on the CT grid), result.json (kind, backend, qc, info)
  register  --fixed ATLAS_CT --moving CT [--fixed-labels L] [--moving-labels L] --backend NAME
            [--io-steps N] [--device D] --out DIR
            -> DIR/fixed_to_moving.h5, moving_to_fixed.h5 (ITK transform files, LPS),
               warped.nii.gz (moving CT on the fixed grid), warped_labels.nii.gz, result.json

``--plugin MODULE`` (repeatable) imports a module first, e.g. one that registers
an extra backend in ``BACKENDS``.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
import traceback
from pathlib import Path

PROGRESS = "LUNGATLAS-PROGRESS"
ERROR = "LUNGATLAS-ERROR"


def progress(percent: float, message: str) -> None:
    print(f"{PROGRESS} {percent:.0f} {message}", flush=True)


def _backend_options(registry: dict, package: str, name: str, options: dict) -> dict:
    """Only the options the backend's constructor accepts, and only those the user set
    (backends differ: a classical backend has no device, a model backend no threshold)."""
    options = {k: v for k, v in options.items() if v is not None}
    target = registry.get(name)
    if target is None:
        return options  # get_* raises the clear "unknown backend" error
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name, package), class_name)
    parameters = inspect.signature(cls).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return options
    return {k: v for k, v in options.items() if k in parameters}


def _segmentation_registry():
    from LungAtlasLib.segmentation import base
    return base.BACKENDS


def _registration_registry():
    from LungAtlasLib.registration import base
    return base.BACKENDS


def run_segment(args) -> None:
    import SimpleITK as sitk

    from LungAtlasLib.io import read_image, write_image
    from LungAtlasLib.paths import write_json_atomic
    from LungAtlasLib.segmentation import get_segmenter

    out = Path(args.out)
    options = _backend_options(_segmentation_registry(), "LungAtlasLib.segmentation", args.backend, {"mode": args.mode, "device": args.device})
    segmenter = get_segmenter(args.backend, **options)
    progress(5, f"checking backend {args.backend}")
    segmenter.check_ready()
    progress(10, f"reading {args.ct}")
    ct = read_image(args.ct)
    progress(20, f"segmenting with {args.backend}")
    start = time.time()
    result = segmenter.segment(ct, case_id=args.case_id)
    progress(90, "writing the label map")
    labels = sitk.Cast(result.labels, sitk.sitkUInt8)
    write_image(labels, out / "labels.nii.gz")
    write_json_atomic(out / "result.json", {"kind": result.kind, "backend": result.backend, "qc": result.qc,
                                            "info": result.info, "seconds": time.time() - start})
    progress(100, "segmentation done")


def run_register(args) -> None:
    import SimpleITK as sitk

    from LungAtlasLib.geometry import resample_to
    from LungAtlasLib.io import read_image, read_label_map, write_image
    from LungAtlasLib.paths import write_json_atomic
    from LungAtlasLib.registration import get_registration

    out = Path(args.out)
    options = _backend_options(_registration_registry(), "LungAtlasLib.registration", args.backend,
                               {"io_steps": args.io_steps, "device": args.device})
    registration = get_registration(args.backend, **options)
    progress(5, f"checking backend {args.backend}")
    registration.check_ready()
    progress(10, "reading images")
    fixed = read_image(args.fixed)
    moving = read_image(args.moving)
    fixed_labels = read_label_map(args.fixed_labels) if args.fixed_labels else None
    moving_labels = read_label_map(args.moving_labels) if args.moving_labels else None
    masks = {}
    if fixed_labels is not None and moving_labels is not None:
        masks = {"fixed_mask": sitk.Cast(fixed_labels > 0, sitk.sitkUInt8),
                 "moving_mask": sitk.Cast(moving_labels > 0, sitk.sitkUInt8)}
    progress(20, f"registering with {args.backend}")
    start = time.time()
    result = registration.register(fixed, moving, fixed_labels=fixed_labels, moving_labels=moving_labels, **masks)
    seconds = time.time() - start
    progress(85, "writing transforms and warped images")
    out.mkdir(parents=True, exist_ok=True)
    for name, transform in (("fixed_to_moving", result.fixed_to_moving), ("moving_to_fixed", result.moving_to_fixed)):
        tmp = out / f".{name}.tmp.h5"
        sitk.WriteTransform(transform, str(tmp))
        tmp.replace(out / f"{name}.h5")
    write_image(resample_to(moving, fixed, transform=result.fixed_to_moving), out / "warped.nii.gz")
    if moving_labels is not None:
        write_image(resample_to(moving_labels, fixed, transform=result.fixed_to_moving, is_label=True),
                    out / "warped_labels.nii.gz")
    write_json_atomic(out / "result.json", {"backend": result.backend, "info": result.info, "seconds": seconds})
    progress(100, "registration done")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="LungAtlasMRML.runner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plugin", action="append", default=[], help="module to import first (extra backends)")
    steps = parser.add_subparsers(dest="step", required=True)
    seg = steps.add_parser("segment")
    seg.add_argument("--ct", required=True)
    seg.add_argument("--backend", required=True)
    seg.add_argument("--mode")
    seg.add_argument("--device")
    seg.add_argument("--case-id", default="case")
    seg.add_argument("--out", required=True)
    seg.set_defaults(_run=run_segment)
    reg = steps.add_parser("register")
    reg.add_argument("--fixed", required=True)
    reg.add_argument("--moving", required=True)
    reg.add_argument("--fixed-labels")
    reg.add_argument("--moving-labels")
    reg.add_argument("--backend", required=True)
    reg.add_argument("--io-steps", type=int)
    reg.add_argument("--device")
    reg.add_argument("--out", required=True)
    reg.set_defaults(_run=run_register)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for plugin in args.plugin:
        importlib.import_module(plugin)
    from LungAtlasLib.io import ImageInputError
    from LungAtlasLib.registration import RegistrationError
    from LungAtlasLib.segmentation import SegmentationError

    try:
        args._run(args)
    except (SegmentationError, RegistrationError, ImageInputError, FileNotFoundError) as exc:
        print(f"{ERROR} {exc}", flush=True)
        return 2
    except Exception as exc:  # the traceback goes to the log; the first line to the user
        traceback.print_exc(file=sys.stdout)
        print(f"{ERROR} {args.step} failed: {type(exc).__name__}: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # Run as a script (PythonSlicer runner.py ...): make the module folder importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
