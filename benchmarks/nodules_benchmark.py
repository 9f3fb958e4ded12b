"""Aggregating an NLST-sized nodule set into a 1 mm atlas density map and a per-lobe table,
against the floor, side by side in one run.

Data: 177,000 mapped nodules from 75,000 scans (NLST scale, ARCHITECTURE.md), drawn in the
phantom atlas's lobes with the phantom's lobe weights (nodules.simulate); the atlas label
map is the 4 mm phantom atlas resampled to 1 mm (nearest neighbour): 341 x 251 x 291 voxels.

Ours:  nodules.density.density_map (trilinear splat, 10 mm Gaussian, edge correction to the
       lungs, nodules per mL per scan) + lobes.lobe_volumes_ml + lobes.lobe_rates (Wilson CIs).
Floor: rounding the points to voxel indices and one numpy bincount onto the 1 mm grid (a
       histogram with no smoothing, no edge correction, no table); also reported: that
       floor plus one Gaussian pass over the grid (the least any smoothed map costs).

Runs are interleaved (floor, ours, ...); the figure is the ratio of medians, plus our
absolute time on this machine (the issue asks for under 60 s).
Usage: benchmarks/run nodules   (or .venv/bin/python benchmarks/nodules_benchmark.py [--repeats 3])
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungAtlasLib import phantom
from LungAtlasLib.geometry import physical_to_index, resample_to
from LungAtlasLib.nodules import density, lobes, simulate

N_NODULES, N_SCANS, BANDWIDTH_MM = 177_000, 75_000, 10.0


def atlas_at_1mm() -> sitk.Image:
    coarse = phantom.make_atlas_subject(spacing_mm=4.0).labels
    size = [int(round(s * 4.0)) - 3 for s in coarse.GetSize()]
    reference = sitk.Image(size, sitk.sitkUInt8)
    reference.SetSpacing((1.0, 1.0, 1.0))
    reference.SetOrigin(coarse.GetOrigin())
    return resample_to(coarse, reference, is_label=True)


def floor(points, reference) -> np.ndarray:
    index = np.round(physical_to_index(reference, points)).astype(np.int64)
    shape = np.array(reference.GetSize()[::-1])
    flat = np.ravel_multi_index(tuple(np.clip(index, 0, shape - 1).T), tuple(shape))
    return np.bincount(flat, minlength=int(np.prod(shape)))


def floor_smoothed(points, reference) -> np.ndarray:
    """The bincount floor plus one Gaussian pass (the least any smoothed map costs)."""
    counts = floor(points, reference).reshape(reference.GetSize()[::-1])
    return density.smooth(counts, reference.GetSpacing()[::-1], BANDWIDTH_MM)


def ours(points, point_lobes, reference, lung):
    density_image = density.density_map(points, reference, lung, BANDWIDTH_MM, n_scans=N_SCANS)
    table = lobes.lobe_rates(point_lobes, lobes.lobe_volumes_ml(reference))
    return density_image, table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "nodules")
    args = parser.parse_args(argv)
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(2)

    reference = atlas_at_1mm()
    lung = sitk.GetArrayViewFromImage(reference) > 0
    rng = np.random.default_rng(0)
    points, point_lobes = simulate.LobeSampler(reference).sample(rng, phantom.LOBE_NODULE_WEIGHT, N_NODULES)
    floor_times, smoothed_times, our_times = [], [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        floor(points, reference)
        floor_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        floor_smoothed(points, reference)
        smoothed_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        density_image, table = ours(points, point_lobes, reference, lung)
        our_times.append(time.perf_counter() - start)
    result = {
        "nodules": N_NODULES, "scans": N_SCANS, "grid": list(reference.GetSize()), "spacing_mm": 1.0,
        "bandwidth_mm": BANDWIDTH_MM, "floor_median_s": statistics.median(floor_times),
        "ours_median_s": statistics.median(our_times),
        "ratio_ours_to_floor": statistics.median(our_times) / statistics.median(floor_times),
        "floor_smoothed_median_s": statistics.median(smoothed_times),
        "ratio_ours_to_floor_smoothed": statistics.median(our_times) / statistics.median(smoothed_times),
        "density_integral_nodules_per_scan": density.integral(density_image),
        "expected_nodules_per_scan": N_NODULES / N_SCANS,
        "right_upper_rate": float(table.loc[0, "rate"]),
        "right_upper_rate_true": simulate.true_rates(reference, phantom.LOBE_NODULE_WEIGHT)[1],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
