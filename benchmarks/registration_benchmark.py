"""Registration benchmark: the classical backend vs ANTs SyNQuick, side by side, on real CT pairs.

    .venv/bin/python benchmarks/registration_benchmark.py [--spacing 2] [--pairs both|forward|reverse]
        [--skip-synquick] [--threads 2] [--json OUT.json]
        [--unigradicon-grid 175 [--io-steps 2]]   # time/memory of the uniGradICON path, stand-in network

Pairs (../shared/data/ct or $LUNGATLAS_TEST_DATA): lung2 -> LUNG1-001 and the reverse.
Lungs: LUNG1-001's clinical lung contours; lung2 has none, so its lungs come
from the classical segmenter when it is available, else from a simple threshold
segmenter defined here (air inside the body, two largest components).
Printed per pair and method: whole-lung Dice after registration (warped moving
lung mask vs fixed lung mask on the fixed grid, nearest neighbour), % of voxels
with Jacobian <= 0 (fixed_to_moving on the fixed lung box), wall time, peak RSS
growth, and the speed ratio classical / SyNQuick. Timings depend on machine load:
compare ratios from one run, not absolute seconds across runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "LungAtlas"))

from LungAtlasLib import geometry  # noqa: E402
from LungAtlasLib.metrics import dice, displacement_field_statistics  # noqa: E402
from LungAtlasLib.registration import get_registration  # noqa: E402
from LungAtlasLib.registration import transforms as T  # noqa: E402


def data_root() -> Path:
    return Path(os.environ.get("LUNGATLAS_TEST_DATA", ROOT.parent / "shared" / "data" / "ct"))


def threshold_lungs(ct: sitk.Image) -> sitk.Image:
    """Lungs as air (< -400 HU) inside the body (largest dense component, holes filled per slice)."""
    a = sitk.GetArrayFromImage(ct)
    dense = a > -500
    lab, n = ndimage.label(dense)
    body = lab == (np.argmax(ndimage.sum(dense, lab, range(1, n + 1))) + 1)
    body = np.stack([ndimage.binary_fill_holes(s) for s in body])
    air = ndimage.binary_opening(body & (a < -400), iterations=1)
    lab, n = ndimage.label(air)
    sizes = ndimage.sum(air, lab, range(1, n + 1))
    order = np.argsort(sizes)[::-1]
    keep = [i + 1 for i in order[:2] if sizes[i] > 0.1 * sizes[order[0]]]
    lungs = np.stack([ndimage.binary_fill_holes(s) for s in np.isin(lab, keep)])
    out = sitk.GetImageFromArray(lungs.astype(np.uint8))
    out.CopyInformation(ct)
    return out


def lungs_for(ct: sitk.Image, clinical: Path | None) -> tuple[sitk.Image, str]:
    if clinical is not None:
        return sitk.Cast(sitk.ReadImage(str(clinical)) > 0, sitk.sitkUInt8), "clinical contours"
    try:
        from LungAtlasLib.segmentation import get_segmenter
        result = get_segmenter("classical").segment(ct, "benchmark")
        return sitk.Cast(result.labels > 0, sitk.sitkUInt8), "classical segmenter"
    except Exception:  # segmenter not available (yet): the threshold stand-in
        return threshold_lungs(ct), "threshold (benchmark stand-in)"


def load_cases(spacing: int) -> dict:
    root = data_root()
    cases = {}
    for name, ct_path, lungs in (
            ("LUNG1-001", root / "nsclc-lung1-001" / f"lung1-001_ct_{spacing}mm.nii.gz",
             root / "nsclc-lung1-001" / f"lung1-001_lungs_{spacing}mm.nii.gz"),
            ("lung2", root / "pyradiomics-lung2" / f"lung2_ct_{spacing}mm.nii.gz", None)):
        if not ct_path.is_file():
            sys.exit(f"missing {ct_path}: set LUNGATLAS_TEST_DATA to the shared CT folder")
        ct = sitk.ReadImage(str(ct_path))
        mask, source = lungs_for(ct, lungs)
        cases[name] = {"ct": ct, "mask": mask, "lung_source": source}
    return cases


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate(fixed_mask, moving_mask, fixed_to_moving) -> dict:
    warped = T.warp_labels(moving_mask, fixed_mask, fixed_to_moving)
    f = sitk.GetArrayViewFromImage(fixed_mask) > 0
    box = geometry.bounding_box(f, margin=5)
    field = T.displacement_field(fixed_to_moving, geometry.crop(fixed_mask, box))
    return {"dice": dice(f, sitk.GetArrayViewFromImage(warped) > 0),
            "folding_percent": displacement_field_statistics(field)["jacobian_nonpositive_percent"]}


def run_classical(fixed, moving, threads) -> dict:
    backend = get_registration("classical", threads=threads)
    t0, rss0 = time.perf_counter(), peak_rss_mb()
    result = backend.register(fixed["ct"], moving["ct"], fixed_mask=fixed["mask"], moving_mask=moving["mask"])
    seconds = time.perf_counter() - t0
    out = evaluate(fixed["mask"], moving["mask"], result.fixed_to_moving)
    out.update(seconds=seconds, peak_rss_growth_mb=peak_rss_mb() - rss0,
               stages=result.info["timings"], working_grid_dice=result.info["lung_dice_working_grid"])
    return out


def run_synquick(fixed, moving) -> dict:
    """ANTs' antsRegistrationSyNQuick[s] recreation on the whole images, its defaults."""
    import ants
    with tempfile.TemporaryDirectory(prefix="synquick_") as tmp:
        f = ants.from_numpy(sitk.GetArrayFromImage(fixed["ct"]).astype(np.float32).T,
                            origin=fixed["ct"].GetOrigin(), spacing=fixed["ct"].GetSpacing(),
                            direction=np.array(fixed["ct"].GetDirection()).reshape(3, 3))
        m = ants.from_numpy(sitk.GetArrayFromImage(moving["ct"]).astype(np.float32).T,
                            origin=moving["ct"].GetOrigin(), spacing=moving["ct"].GetSpacing(),
                            direction=np.array(moving["ct"].GetDirection()).reshape(3, 3))
        t0, rss0 = time.perf_counter(), peak_rss_mb()
        reg = ants.registration(f, m, type_of_transform="antsRegistrationSyNQuick[s]",
                                outprefix=str(Path(tmp) / "q_"), write_composite_transform=True)
        seconds = time.perf_counter() - t0
        fixed_to_moving = sitk.ReadTransform(reg["fwdtransforms"])
    out = evaluate(fixed["mask"], moving["mask"], fixed_to_moving)
    out.update(seconds=seconds, peak_rss_growth_mb=peak_rss_mb() - rss0)
    return out


def run_unigradicon_standin(fixed, moving, grid: int, io_steps: int | None, threads: int) -> dict:
    """The real uniGradICON code path with an un-weighted network (no weights offline):
    its cost (seconds, peak RSS growth) at ``grid``^3, not its accuracy."""
    import torch
    import unigradicon

    torch.set_num_threads(threads)
    net = unigradicon.make_network([1, 1, grid, grid, grid], include_last_step=True)
    net.eval()
    backend = get_registration("unigradicon", network=net, input_shape=(grid, grid, grid),
                               io_iterations=io_steps or None, device="cpu")
    t0, rss0 = time.perf_counter(), peak_rss_mb()
    result = backend.register(fixed["ct"], moving["ct"])
    return {"grid": grid, "io_steps": io_steps, "seconds": time.perf_counter() - t0,
            "peak_rss_growth_mb": peak_rss_mb() - rss0, "network_s": result.info["timings"]["network_s"]}


def run_real_template(cases: dict, spacing: int, rounds: int, threads: int) -> dict:
    """A template from the real whole-chest CTs (classical backend) and how sharp its lungs are:
    the share of the template's lung volume whose lung probability is ambiguous (0.25-0.75;
    a blurred average would have a wide such band) and the cases' lung Dice to it."""
    from LungAtlasLib.template import TemplateCase, build_template

    items = [TemplateCase(name, c["ct"], c["mask"]) for name, c in cases.items()]
    t0 = time.perf_counter()
    result = build_template(items, "classical", {"spacing_mm": float(spacing), "threads": threads},
                            rounds=rounds, spacing_mm=float(spacing))
    seconds = time.perf_counter() - t0
    probability = sitk.GetArrayFromImage(next(iter(result.probabilities.values())))
    lung = sitk.GetArrayFromImage(result.labels) > 0
    ambiguous = ((probability > 0.25) & (probability < 0.75)).sum() / max(1, lung.sum())
    return {"cases": list(cases), "rounds": result.rounds, "seconds": seconds,
            "ambiguous_lung_fraction": float(ambiguous), "reference": result.reference}


def run_phantom_template(count: int, spacing: float, rounds: int, threads: int) -> dict:
    """Template-building time for ``count`` phantom scans (classical backend, lobe maps as
    labels), and how close the template's lobes come to the canonical phantom chest."""
    from LungAtlasLib import phantom
    from LungAtlasLib.template import TemplateCase, build_template

    items = []
    for seed in range(1, count + 1):
        subject = phantom.make_subject(seed, spacing_mm=spacing, n_nodules=0)
        items.append(TemplateCase(f"phantom{seed:02d}", subject.ct, subject.labels))
    t0 = time.perf_counter()
    result = build_template(items, "classical", {"spacing_mm": float(spacing), "threads": threads},
                            rounds=rounds, spacing_mm=float(spacing))
    seconds = time.perf_counter() - t0
    return {"cases": count, "spacing_mm": spacing, "rounds": result.rounds, "seconds": seconds,
            "seconds_per_registration": seconds / (count * rounds)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spacing", type=int, choices=(2, 4), default=2)
    parser.add_argument("--pairs", choices=("both", "forward", "reverse", "none"), default="both")
    parser.add_argument("--skip-synquick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--unigradicon-grid", type=int, help="also time the uniGradICON path at this grid (stand-in)")
    parser.add_argument("--io-steps", type=int, default=0, help="instance-optimisation steps for --unigradicon-grid")
    parser.add_argument("--skip-classical", action="store_true")
    parser.add_argument("--template-rounds", type=int, default=0,
                        help="also build a template from the real CTs with this many rounds")
    parser.add_argument("--template-phantoms", type=int, default=0,
                        help="also time a template built from this many phantom scans (6 mm, 2 rounds)")
    args = parser.parse_args(argv)
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)

    cases = load_cases(args.spacing)
    pairs = {"forward": [("LUNG1-001", "lung2")], "reverse": [("lung2", "LUNG1-001")]}
    pairs["both"] = pairs["forward"] + pairs["reverse"]
    pairs["none"] = []
    rows = []
    for fixed_name, moving_name in pairs[args.pairs]:
        fixed, moving = cases[fixed_name], cases[moving_name]
        before = dice(sitk.GetArrayViewFromImage(fixed["mask"]) > 0,
                      sitk.GetArrayViewFromImage(T.warp_labels(moving["mask"], fixed["mask"], sitk.Transform())) > 0)
        row = {"fixed": fixed_name, "moving": moving_name, "spacing_mm": args.spacing, "dice_before": before,
               "lungs": {fixed_name: fixed["lung_source"], moving_name: moving["lung_source"]}}
        if args.unigradicon_grid:
            row["unigradicon_standin"] = run_unigradicon_standin(fixed, moving, args.unigradicon_grid,
                                                                 args.io_steps, args.threads)
            u = row["unigradicon_standin"]
            print(f"{moving_name} -> {fixed_name} uniGradICON path (stand-in) {u['grid']}^3, {u['io_steps']} IO steps: "
                  f"{u['seconds']:.1f} s, peak RSS +{u['peak_rss_growth_mb']:.0f} MB", flush=True)
        if args.skip_classical:
            rows.append(row)
            continue
        row["classical"] = run_classical(fixed, moving, args.threads)
        print(f"{moving_name} -> {fixed_name} classical: Dice {before:.3f} -> {row['classical']['dice']:.4f}, "
              f"folded {row['classical']['folding_percent']:.4f} %, {row['classical']['seconds']:.1f} s", flush=True)
        if not args.skip_synquick:
            row["synquick"] = run_synquick(fixed, moving)
            row["speed_ratio_classical_over_synquick"] = row["classical"]["seconds"] / row["synquick"]["seconds"]
            print(f"{moving_name} -> {fixed_name} SyNQuick : Dice {before:.3f} -> {row['synquick']['dice']:.4f}, "
                  f"folded {row['synquick']['folding_percent']:.4f} %, {row['synquick']['seconds']:.1f} s; "
                  f"time ratio classical/SyNQuick {row['speed_ratio_classical_over_synquick']:.2f}", flush=True)
        rows.append(row)
    if args.template_rounds:
        template = run_real_template(cases, args.spacing, args.template_rounds, args.threads)
        last = template["rounds"][-1]
        print(f"real-CT template ({len(template['cases'])} scans, {args.spacing} mm, {args.template_rounds} rounds): "
              f"{template['seconds']:.1f} s, lung Dice of the scans to it {last['mean_lung_dice_to_template']:.3f}, "
              f"ambiguous lung band {100 * template['ambiguous_lung_fraction']:.1f} % of the lung volume", flush=True)
        rows.append({"template": template})
    if args.template_phantoms:
        template = run_phantom_template(args.template_phantoms, 6.0, 2, args.threads)
        last = template["rounds"][-1]
        print(f"phantom template ({template['cases']} scans, 6 mm, 2 rounds): {template['seconds']:.1f} s, "
              f"{template['seconds_per_registration']:.1f} s per registration, lung Dice of the scans to it "
              f"{last['mean_lung_dice_to_template']:.3f}", flush=True)
        rows.append({"phantom_template": template})
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
