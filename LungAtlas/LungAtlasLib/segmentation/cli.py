"""Segment the lungs (and lobes) of one CT scan.

Writes OUT/labels.nii.gz (label table values on the CT's grid: lobes 1-5, or
1 right / 2 left lung for the classical backend) and OUT/qc.json (quality-control
flags with reasons, the backend's provenance). Examples:

  lungatlas segment --ct scan.nii.gz --backend totalsegmentator --mode fast --out seg/
  lungatlas segment --ct dicom_folder/ --series-uid 1.2.3 --backend precomputed \\
      --labels idc_totalseg_seg.dcm --out seg/
  lungatlas segment --ct scan.nii.gz --backend classical --out seg/

The exit status is 0 also when QC flags fail (read qc.json "passed"); 2 when the
segmentation could not be made (bad input, missing weights, a model crash).
"""
from __future__ import annotations

import argparse

HELP = "segment lungs and lobes of one CT (TotalSegmentator, precomputed or classical)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ct_positional", nargs="?", metavar="CT", help="CT file or DICOM folder (or use --ct)")
    parser.add_argument("--ct", help="CT file (NIfTI, NRRD, MHA) or DICOM series folder")
    parser.add_argument("--series-uid", help="DICOM series to read when the folder holds several; also the "
                        "series a DICOM SEG must reference")
    parser.add_argument("--case-id", help="name used in messages and qc.json (default: the CT's file name)")
    parser.add_argument("--backend", default="totalsegmentator",
                        choices=("totalsegmentator", "precomputed", "classical"))
    parser.add_argument("--out", required=True, help="output folder")
    ts = parser.add_argument_group("totalsegmentator")
    ts.add_argument("--mode", default="fast", choices=("fastest", "fast", "full"))
    ts.add_argument("--device", default="cpu", help="cpu, gpu or gpu:N")
    ts.add_argument("--weights-dir", help="TotalSegmentator weights (nnU-Net results) folder")
    ts.add_argument("--home-dir", help="TotalSegmentator home for config.json (default $LUNGATLAS_TOTALSEG_HOME "
                    "or ~/.lungatlas/totalsegmentator)")
    ts.add_argument("--allow-download", action="store_true", help="let TotalSegmentator download missing weights")
    ts.add_argument("--timeout", type=float, help="kill TotalSegmentator after this many seconds")
    pre = parser.add_argument_group("precomputed")
    pre.add_argument("--labels", help="segmentation: label map, Slicer .seg.nrrd, DICOM SEG file or folder")
    pre.add_argument("--code-map", default="totalsegmentator",
                     help="label map codes: totalsegmentator (10-14 lobes), lungatlas, or pairs '10:4,11:5,...'")
    pre.add_argument("--kind", default="lobes", choices=("lobes", "sides"), help="what a label map holds")
    pre.add_argument("--segment-name", action="append", default=[], metavar="NAME=VALUE",
                     help="extra segment name -> label table value (repeatable)")
    cl = parser.add_argument_group("classical")
    cl.add_argument("--air-hu", type=float, help="lung/air threshold in HU (default -250)")


def _options(args) -> dict:
    if args.backend == "totalsegmentator":
        from pathlib import Path
        return {"mode": args.mode, "device": args.device, "weights_dir": args.weights_dir,
                "home_dir": args.home_dir, "allow_download": args.allow_download, "timeout_s": args.timeout,
                "log_path": str(Path(args.out) / "totalsegmentator.log")}
    if args.backend == "precomputed":
        from ..cli import UserError
        if not args.labels:
            raise UserError("--backend precomputed needs --labels PATH")
        names = {}
        for item in args.segment_name:
            name, _, value = item.rpartition("=")
            if not name or not value.isdigit():
                raise UserError(f"--segment-name {item!r}: use NAME=VALUE, e.g. 'RUL=1'")
            names[name] = int(value)
        return {"path": args.labels, "code_map": args.code_map, "kind": args.kind,
                "segment_names": names, "series_uid": args.series_uid}
    return {} if args.air_hu is None else {"air_hu": args.air_hu}


def run(args) -> int:
    from pathlib import Path

    from .. import io
    from ..cli import UserError
    from ..paths import inside, safe_name, write_json_atomic
    from . import SegmentationError, get_segmenter

    ct_path = args.ct or args.ct_positional
    if not ct_path:
        raise UserError("give the CT: --ct PATH")
    case_id = args.case_id or safe_name(Path(ct_path).name.split(".")[0] or "case")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        segmenter = get_segmenter(args.backend, **_options(args))
        segmenter.check_ready()
        ct = io.read_image(ct_path, series_uid=args.series_uid)
        if args.backend == "precomputed" and args.series_uid is None and Path(ct_path).is_dir():
            # the series actually read is the one a DICOM SEG must reference
            segmenter.series_uid = io.list_dicom_series(ct_path)[0].series_uid
        result = segmenter.segment(ct, case_id=case_id)
    except SegmentationError as exc:
        raise UserError(str(exc)) from None
    labels_path = io.write_image(result.labels, inside(out, "labels.nii.gz"))
    record = {"case_id": case_id, "ct": str(ct_path), "labels": str(labels_path), "kind": result.kind,
              "backend": result.backend, "qc": result.qc, "info": result.info}
    write_json_atomic(inside(out, "qc.json"), record)
    status = "passed" if result.qc.get("passed") else "FLAGGED: " + "; ".join(result.qc.get("failed", []))
    print(f"{case_id}: {result.kind} from {result.backend} -> {labels_path}; QC {status}")
    return 0
