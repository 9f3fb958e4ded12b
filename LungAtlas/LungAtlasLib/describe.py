"""Describe a CT input: the DICOM series in a folder, or an image file's geometry.

Use it to choose a series (its UID goes to --series-uid of the other commands)
and to check what LungAtlas will read before a long run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import io

HELP = "list the DICOM series in a folder, or show an image's geometry and HU range"


def add_arguments(parser) -> None:
    parser.add_argument("path", type=Path, help="image file (NIfTI, NRRD, MHA) or DICOM folder")
    parser.add_argument("--series-uid", help="with a DICOM folder: read and describe this series")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def describe_image(image: sitk.Image) -> dict:
    array = sitk.GetArrayViewFromImage(image)
    return {
        "size": list(image.GetSize()),
        "spacing_mm": [round(s, 6) for s in image.GetSpacing()],
        "origin_lps_mm": [round(o, 4) for o in image.GetOrigin()],
        "direction": [round(d, 6) for d in image.GetDirection()],
        "orientation": io.orientation_of(image),
        "pixel_type": image.GetPixelIDTypeAsString(),
        "hu_percentiles": {str(p): float(v) for p, v in zip((1, 50, 99), np.percentile(array, (1, 50, 99)))},
    }


def describe(path: Path, series_uid: str | None = None) -> dict:
    if path.is_dir() and series_uid is None:
        series = io.list_dicom_series(path)
        if not series:
            raise io.ImageInputError(path, "no DICOM series found in this folder")
        return {"path": str(path), "series": [
            {"series_uid": s.series_uid, "modality": s.modality, "description": s.description,
             "slices": s.n_slices, "slice_thickness_mm": s.slice_thickness, "kernel": s.kernel} for s in series]}
    return {"path": str(path), **describe_image(io.read_image(path, series_uid=series_uid))}


def run(args) -> int:
    result = describe(args.path, args.series_uid)
    if args.json:
        print(json.dumps(result, indent=1))
    elif "series" in result:
        print(f"{result['path']}: {len(result['series'])} DICOM series")
        for s in result["series"]:
            print(f"  {s['series_uid']}  {s['modality']}  {s['slices']} slices  "
                  f"{s['slice_thickness_mm']} mm  kernel {s['kernel'] or '-'}  '{s['description']}'")
    else:
        print(f"{result['path']}: {result['size']} voxels of {result['spacing_mm']} mm, "
              f"orientation {result['orientation']}, origin {result['origin_lps_mm']} (LPS mm), "
              f"{result['pixel_type']}, HU 1/50/99 % = {list(result['hu_percentiles'].values())}")
    return 0
