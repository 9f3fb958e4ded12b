"""Per-scan cost of segmentation against its floor, side by side in one run.

1. Classical lung fallback on LUNG1-001 at native resolution (512x512x134 DICOM):
   ours = io.read_image (with LungAtlas's header checks) + ClassicalSegmenter.segment
   (including QC); floor = a bare SimpleITK GDCM series read. Also prints the Dice
   per lung against the native clinical contours.
2. TotalSegmentator through our backend vs a bare call of the package, both in a
   fresh subprocess (as a real run is), with the same stand-in weights (mode
   "fastest", the five lobes as roi_subset) on LUNG1-001 at 4 mm: the ratio is our
   wrapper's overhead (reorientation, NIfTI round trip, config, log capture, mapping, QC).

Runs are interleaved (floor, ours, floor, ours) so machine noise hits both alike; the
figure is the ratio of medians. Usage: benchmarks/run segmentation [--reps N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing"))

from LungAtlasLib import io  # noqa: E402
from LungAtlasLib.metrics import dice_per_label  # noqa: E402
from LungAtlasLib.segmentation import get_segmenter  # noqa: E402
from LungAtlasLib.segmentation.totalsegmentator import LOBE_CLASSES  # noqa: E402

DATA = Path(os.environ.get("LUNGATLAS_TEST_DATA", REPO.parent / "shared" / "data" / "ct"))
LUNG1 = DATA / "nsclc-lung1-001"


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def classical(reps: int) -> None:
    dicom = LUNG1 / "dicom" / "image"

    def floor():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(dicom)))
        return reader.Execute()

    def ours():
        ct = io.read_image(dicom)
        return ct, get_segmenter("classical").segment(ct, "LUNG1-001")

    floors, totals, segs = [], [], []
    result = None
    for _ in range(reps):
        floors.append(_timed(floor)[0])
        t, (ct, result) = _timed(ours)
        totals.append(t)
        segs.append(result.info["seconds"])
    reference = sitk.GetArrayFromImage(io.read_label_map(LUNG1 / "lung1-001_lungs.nii.gz"))
    dice = dice_per_label(reference, sitk.GetArrayFromImage(result.labels), [1, 2])
    f = statistics.median(floors)
    print(f"classical fallback, LUNG1-001 native {ct.GetSize()}: read floor {f:.2f} s; "
          f"read+segment+QC {statistics.median(totals):.2f} s = {statistics.median(totals) / f:.1f}x the floor "
          f"(segmentation alone {statistics.median(segs) / f:.1f}x)")
    print(f"  Dice vs clinical contours (native grid): right {dice[1]:.4f}, left {dice[2]:.4f}; "
          f"volumes {result.info['volume_ml']} mL")


BARE = """
import sys
from totalsegmentator.python_api import totalsegmentator
if __name__ == "__main__":
    totalsegmentator(sys.argv[1], sys.argv[2], ml=True, task="total", fastest=True, roi_subset=sys.argv[3:],
                     device="cpu", nr_thr_resamp=1, nr_thr_saving=1, quiet=True)
"""


def totalseg(reps: int) -> None:
    from fixtures.standin_totalsegmentator import make_standin_weights

    with tempfile.TemporaryDirectory(prefix="lungatlas_bench_") as tmp:
        tmp = Path(tmp)
        weights, home = tmp / "weights", tmp / "home"
        make_standin_weights(weights, "fastest", force_label=12)
        ct_path = LUNG1 / "lung1-001_ct_4mm.nii.gz"
        script = tmp / "bare.py"
        script.write_text(BARE)
        env = dict(os.environ, TOTALSEG_HOME_DIR=str(home), TOTALSEG_WEIGHTS_PATH=str(weights), OMP_NUM_THREADS="1")
        from LungAtlasLib.segmentation.totalsegmentator import write_totalseg_config
        write_totalseg_config(home)

        def bare():
            subprocess.run([sys.executable, str(script), str(ct_path), str(tmp / "bare.nii.gz"), *LOBE_CLASSES],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ours():
            ct = io.read_image(ct_path)
            return get_segmenter("totalsegmentator", mode="fastest", weights_dir=weights, home_dir=home
                                 ).segment(ct, "LUNG1-001")

        bares, wrapped, inside = [], [], []
        for _ in range(reps):
            bares.append(_timed(bare)[0])
            t, result = _timed(ours)
            wrapped.append(t)
            inside.append(result.info["seconds"])
        b, w = statistics.median(bares), statistics.median(wrapped)
        same = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp / "bare.nii.gz"))) == 12,
                              sitk.GetArrayFromImage(ours().labels) == 1)
        print(f"TotalSegmentator stand-in (fastest, roi_subset lobes), LUNG1-001 4 mm: bare call {b:.1f} s; "
              f"through the LungAtlas backend {w:.1f} s = {w / b:.2f}x, of which the TotalSegmentator "
              f"subprocess {statistics.median(inside):.1f} s (same voxels labelled: {same})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", choices=("classical", "totalsegmentator"))
    args = parser.parse_args()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    if args.only in (None, "classical"):
        classical(args.reps)
    if args.only in (None, "totalsegmentator"):
        totalseg(max(2, args.reps - 1))


if __name__ == "__main__":
    main()
