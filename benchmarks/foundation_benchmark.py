"""Per-scan cost of the foundation steps against the floor, side by side in one run.

Ours:  read the native LUNG1-001 DICOM series with LungAtlas's checks (io.read_image),
       compute every alignment metric (Dice per lobe and lung, relative volume difference,
       HD95 in mm, intensity MSE whole-image and in-lung) for a 6-label map (background +
       five lobe-like regions) on the native 512x512x134 grid against a shifted copy,
       Jacobian statistics of a smooth displacement field on a 4 mm grid over the same
       extent (registration fields are stored at atlas resolution, not native), and write
       the metrics table (CSV + JSON, atomically).
Floor: a bare SimpleITK GDCM series read plus one numpy Dice of the whole lung.

Runs are interleaved (floor, ours, floor, ours, ...) so machine noise hits both alike;
the figure reported is the ratio of medians. Usage: benchmarks/run foundation
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungAtlasLib import io, metrics
from LungAtlasLib.paths import write_json_atomic, write_text_atomic

DATA = Path(os.environ.get("LUNGATLAS_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "ct"))
DICOM = DATA / "nsclc-lung1-001" / "dicom" / "image"
LUNGS = DATA / "nsclc-lung1-001" / "lung1-001_lungs.nii.gz"


def six_label_maps():
    """Lobe-like regions from the clinical lung contours: right lung cut into three
    slabs along z, left into two; the 'test' map is the same shifted by (1, 3, -2) voxels."""
    lungs = sitk.ReadImage(str(LUNGS))
    array = sitk.GetArrayFromImage(lungs)
    labels = np.zeros_like(array)
    for side, values in ((1, (3, 2, 1)), (2, (5, 4))):
        z = np.flatnonzero((array == side).any(axis=(1, 2)))
        edges = np.linspace(z[0], z[-1] + 1, len(values) + 1).astype(int)
        for value, lo, hi in zip(values, edges[:-1], edges[1:]):
            part = np.zeros_like(array, bool)
            part[lo:hi] = True
            labels[part & (array == side)] = value
    reference = sitk.GetImageFromArray(labels)
    reference.CopyInformation(lungs)
    test = sitk.GetImageFromArray(np.roll(labels, (1, 3, -2), axis=(0, 1, 2)))
    test.CopyInformation(lungs)
    return reference, test


def smooth_field(reference: sitk.Image, spacing_mm: float = 4.0) -> sitk.Image:
    size = [int(round(s * sp / spacing_mm)) for s, sp in zip(reference.GetSize(), reference.GetSpacing())]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing_mm] * 3)
    grid.SetOrigin(reference.GetOrigin())
    z, y, x = np.meshgrid(*(np.arange(n) * spacing_mm for n in size[::-1]), indexing="ij")
    u = np.stack([5 * np.sin(x / 40.0), 3 * np.cos(y / 50.0), 4 * np.sin(z / 60.0)], axis=-1)
    field = sitk.GetImageFromArray(u, isVector=True)
    field.CopyInformation(grid)
    return field


def floor_once(reference_array):
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(DICOM))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    image = reader.Execute()
    lung = reference_array > 0
    shifted = np.roll(lung, 1, axis=0)
    dice = 2.0 * np.count_nonzero(lung & shifted) / (np.count_nonzero(lung) + np.count_nonzero(shifted))
    return image, dice


def shifted_ct() -> sitk.Image:
    """The CT shifted by (1, 3, -2) voxels: stands for a warped image (made once, not timed)."""
    ct = io.read_image(DICOM)
    moving = sitk.GetImageFromArray(np.roll(sitk.GetArrayViewFromImage(ct), (1, 3, -2), axis=(0, 1, 2)))
    moving.CopyInformation(ct)
    return moving


def ours_once(reference, test, moving, field, out: Path):
    timings = {}
    start = time.perf_counter()
    ct = io.read_image(DICOM)
    timings["read"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = metrics.alignment_metrics(reference, test, ct, moving)
    timings["labels+mse"] = time.perf_counter() - start
    start = time.perf_counter()
    metrics.alignment_metrics(reference, test, ct, moving, with_hausdorff=False)
    timings["(same without HD95)"] = time.perf_counter() - start
    start = time.perf_counter()
    rows.append({"region": "transform", **metrics.displacement_field_statistics(field)})
    timings["jacobian"] = time.perf_counter() - start
    start = time.perf_counter()
    columns = sorted({k for r in rows for k in r})
    csv = ",".join(columns) + "\n" + "\n".join(",".join(str(r.get(c, "")) for c in columns) for r in rows) + "\n"
    write_text_atomic(out / "metrics.csv", csv)
    write_json_atomic(out / "metrics.json", rows)
    timings["write"] = time.perf_counter() - start
    return rows, timings


def main(repeats: int = 5) -> int:
    if not DICOM.is_dir():
        print(f"foundation benchmark: real CT not found at {DICOM}", file=sys.stderr)
        return 2
    reference, test = six_label_maps()
    field = smooth_field(reference)
    moving = shifted_ct()
    reference_array = sitk.GetArrayFromImage(reference)
    floor_times, our_times, parts = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ours_once(reference, test, moving, field, Path(tmp))  # warm the file cache for both alike
        for _ in range(repeats):
            start = time.perf_counter()
            floor_once(reference_array)
            floor_times.append(time.perf_counter() - start)
            rows, timings = ours_once(reference, test, moving, field, Path(tmp))
            our_times.append(sum(v for k, v in timings.items() if not k.startswith("(")))
            parts.append(timings)
    floor, ours = statistics.median(floor_times), statistics.median(our_times)
    lung = next(r for r in rows if r["region"] == "lung")
    print("foundation benchmark: native LUNG1-001 (512x512x134), 6-label map, median of", repeats)
    print(f"  floor (bare GDCM read + numpy Dice) : {floor:.3f} s")
    print(f"  LungAtlas read + all metrics + write: {ours:.3f} s")
    for key in parts[0]:
        print(f"    {key:<12s} {statistics.median(p[key] for p in parts):.3f} s")
    print(f"  ratio ours / floor: {ours / floor:.2f}x (target <= 2x)")
    without_hd95 = statistics.median(p["read"] + p["(same without HD95)"] + p["jacobian"] + p["write"] for p in parts)
    print(f"  without the six HD95s: {without_hd95 / floor:.2f}x the floor; read + write alone: "
          f"{statistics.median(p['read'] + p['write'] for p in parts) / floor:.2f}x")
    print(f"  sanity: lung Dice of the shifted map {lung['dice']:.3f}, HD95 {lung['hausdorff95_mm']:.2f} mm")
    print(json.dumps({"benchmark": "foundation", "floor_s": floor, "ours_s": ours, "ratio": ours / floor}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
