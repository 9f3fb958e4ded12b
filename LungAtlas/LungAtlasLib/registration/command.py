"""Register one CT (moving) to another (fixed, e.g. the atlas template).

Writes into --out: fixed_to_moving.h5 and moving_to_fixed.h5 (ITK transforms; Slicer
loads them), fixed_to_moving_displacement.nii.gz (the same map as a displacement
field on the fixed grid, a Slicer grid transform), warped.nii.gz (moving CT on the
fixed grid), warped_labels.nii.gz (when --moving-labels is given), registration.json
(backend, options, timings, weights hash) and metrics.json (when both label maps are
given: Dice, relative volume difference, HD95 per region and intensity MSE, "before"
on the same grid with no alignment and "after" the registration; plus folding).

Examples:
  lungatlas register --fixed atlas/template_ct.nii.gz --moving case.nii.gz \\
      --fixed-labels atlas/lobes.nii.gz --moving-labels case_lobes.nii.gz --backend classical --out reg/
  LUNGATLAS_UNIGRADICON_WEIGHTS=~/weights/Step_2_final.trch lungatlas register --fixed F --moving M --out reg/
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import SimpleITK as sitk

HELP = "register a CT to another (or to the atlas): transforms, warped images, before/after metrics"
log = logging.getLogger(__name__)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Backend choice and options shared by ``register`` and ``template``."""
    from .base import DEFAULT_BACKEND, available_registrations

    parser.add_argument("--backend", choices=available_registrations(), default=DEFAULT_BACKEND,
                        help=f"registration backend (default {DEFAULT_BACKEND}; 'classical' is offline and needs "
                             "lung masks or labels)")
    parser.add_argument("--unigradicon-weights", metavar="PATH",
                        help="uniGradICON weights file (default $LUNGATLAS_UNIGRADICON_WEIGHTS)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let the unigradicon backend download its weights (into ~/.cache/lungatlas) when missing")
    parser.add_argument("--io-iterations", type=int, default=None,
                        help="uniGradICON instance-optimisation steps (default: none)")
    parser.add_argument("--io-similarity", choices=("lncc", "lncc2", "mind"), default="lncc")
    parser.add_argument("--loss-masking", action="store_true", help="uniGradICON: mask the loss with the lung masks")
    parser.add_argument("--dice-loss-weight", type=float, default=0.0,
                        help="uniGradICON instance optimisation: weight of the lobe Dice loss (needs both label maps)")
    parser.add_argument("--device", default=None, help="torch device for uniGradICON (cpu, cuda, cuda:1)")
    parser.add_argument("--spacing", type=float, default=2.0,
                        help="classical: working resolution in mm (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for ITK/ANTs/torch")


def backend_options(args) -> dict:
    if args.backend == "unigradicon":
        return {"weights": args.unigradicon_weights, "allow_download": args.allow_download,
                "io_iterations": args.io_iterations, "io_similarity": args.io_similarity,
                "loss_function_masking": args.loss_masking, "dice_loss_weight": args.dice_loss_weight,
                "device": args.device, "threads": args.threads}
    return {"spacing_mm": args.spacing, "threads": args.threads}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fixed", required=True, type=Path, help="fixed CT (the atlas template or a reference scan)")
    parser.add_argument("--moving", required=True, type=Path, help="moving CT (the case)")
    parser.add_argument("--fixed-labels", type=Path, help="fixed lobe labels (1-5) or lung mask")
    parser.add_argument("--moving-labels", type=Path, help="moving lobe labels (1-5) or lung mask")
    parser.add_argument("--fixed-mask", type=Path, help="fixed lung mask (default: fixed labels > 0)")
    parser.add_argument("--moving-mask", type=Path, help="moving lung mask (default: moving labels > 0)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    add_backend_arguments(parser)


def run(args) -> int:
    from ..cli import UserError
    from ..io import read_image, read_label_map, write_image
    from ..paths import write_json_atomic
    from .base import RegistrationError, get_registration
    from .metrics import registration_metrics
    from .transforms import save_result, warp_image, warp_labels

    fixed = read_image(args.fixed)
    moving = read_image(args.moving)
    optional = {}
    for key in ("fixed_labels", "moving_labels", "fixed_mask", "moving_mask"):
        path = getattr(args, key)
        optional[key] = read_label_map(path) if path else None
    try:
        backend = get_registration(args.backend, **backend_options(args))
        backend.check_ready()
        result = backend.register(fixed, moving, **optional)
    except (RegistrationError, ValueError) as exc:
        raise UserError(f"registering {args.moving} to {args.fixed}: {exc}") from None

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    paths = save_result(result, out, fixed=fixed)
    warped = warp_image(moving, fixed, result.fixed_to_moving)
    paths["warped"] = str(write_image(warped, out / "warped.nii.gz"))
    warped_labels = None
    if optional["moving_labels"] is not None:
        warped_labels = warp_labels(optional["moving_labels"], fixed, result.fixed_to_moving)
        paths["warped_labels"] = str(write_image(warped_labels, out / "warped_labels.nii.gz"))
    record = {"fixed": str(args.fixed), "moving": str(args.moving), "backend": result.backend,
              "info": result.info, "outputs": paths}
    write_json_atomic(out / "registration.json", record)
    if optional["fixed_labels"] is not None and optional["moving_labels"] is not None:
        metrics = registration_metrics(fixed, moving, optional["fixed_labels"], optional["moving_labels"], result)
        write_json_atomic(out / "metrics.json", metrics)
        lung = {row["stage"]: row for row in metrics["regions"] if row["region"] == "lung"}
        print(f"lung Dice {lung['before']['dice']:.3f} (before) -> {lung['after']['dice']:.3f} (after); "
              f"{metrics['folding']['jacobian_nonpositive_percent']:.3f} % folded voxels in the lungs")
    print(f"wrote {out}")
    return 0
