"""Test-only backends for the cohort engine tests (never part of the product).

Loaded on every Dask worker as a plugin module (config "plugins"), which
registers them in the segmentation and registration BACKENDS registries:

- ``test-truth`` segmenter: returns the phantom's truth lobe map (option ``labels``,
  usually "{labels}" filled per case from the manifest); appends one line per
  call to ``calls_file`` so tests count backend calls across worker processes;
  ``kill_case`` + ``kill_marker``: kills its worker process (os._exit) on that case
  while the marker file is absent (after creating it, or every time with
  ``kill_always``).
- ``test-centroid`` registration: translation that aligns the lung mask centroids
  (moving_to_fixed) and its inverse (fixed_to_moving); ``shift_mm`` adds a known
  extra shift so that tests can change a parameter; also counts calls.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungAtlasLib.io import read_label_map
from LungAtlasLib.registration import base as registration_base
from LungAtlasLib.registration.base import Registration, RegistrationResult
from LungAtlasLib.segmentation import base as segmentation_base
from LungAtlasLib.segmentation.base import SegmentationResult, Segmenter

segmentation_base.BACKENDS["test-truth"] = "cohort_backends:TruthSegmenter"
registration_base.BACKENDS["test-centroid"] = "cohort_backends:CentroidRegistration"


def _count(calls_file, text):
    if calls_file:
        with open(calls_file, "a") as f:
            f.write(text + "\n")


class TruthSegmenter(Segmenter):
    name = "test-truth"

    def __init__(self, labels: str, calls_file: str = "", kill_case: str = "", kill_marker: str = "",
                 kill_always: bool = False):
        self.labels, self.calls_file = labels, calls_file
        self.kill_case, self.kill_marker, self.kill_always = kill_case, kill_marker, kill_always

    def segment(self, ct, case_id="case"):
        if self.kill_case and case_id == self.kill_case and self.kill_marker:
            marker = Path(self.kill_marker)
            if self.kill_always and marker.exists():
                os._exit(17)
            if not self.kill_always and not marker.exists():
                marker.write_text(str(os.getpid()))
                os._exit(17)  # the worker process dies in the middle of the case
        _count(self.calls_file, f"segment {case_id} {os.getpid()}")
        if not self.labels:  # real CT without truth: lungs by threshold, as sides
            return SegmentationResult(labels=_threshold_sides(ct), kind="sides", backend=self.name,
                                      qc={"passed": True, "flags": []})
        labels = read_label_map(self.labels)
        return SegmentationResult(labels=labels, kind="lobes", backend=self.name, qc={"passed": True, "flags": []})


def _threshold_sides(ct):
    """Air below -400 HU not connected to the image border, the two largest parts, split by x."""
    from scipy import ndimage

    air = sitk.GetArrayFromImage(ct) < -400
    components, n = ndimage.label(air)
    border = np.unique(np.concatenate([components[:, 0].ravel(), components[:, -1].ravel(),
                                       components[:, :, 0].ravel(), components[:, :, -1].ravel()]))
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    sizes[border] = 0
    sizes[0] = 0
    lungs = np.isin(components, np.argsort(sizes)[-2:]) & (sizes[components] > 0)
    out = np.zeros(air.shape, np.uint8)
    xs = np.nonzero(lungs)[2]
    middle = np.median(xs) if len(xs) else air.shape[2] / 2
    x = np.arange(air.shape[2])[None, None, :]
    out[lungs & (x < middle)] = 1   # LPS: low column index = patient right
    out[lungs & (x >= middle)] = 2
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(ct)
    return image


class CentroidRegistration(Registration):
    name = "test-centroid"

    def __init__(self, calls_file: str = "", shift_mm: float = 0.0):
        self.calls_file, self.shift_mm = calls_file, float(shift_mm)

    @staticmethod
    def _centroid(mask):
        stats = sitk.LabelShapeStatisticsImageFilter()
        stats.Execute(sitk.Cast(mask, sitk.sitkUInt8))
        return np.array(stats.GetCentroid(1))

    def register(self, fixed, moving, *, fixed_mask=None, moving_mask=None, fixed_labels=None,
                 moving_labels=None):
        _count(self.calls_file, "register")
        offset = self._centroid(fixed_mask) - self._centroid(moving_mask) + np.array([self.shift_mm, 0.0, 0.0])
        moving_to_fixed = sitk.TranslationTransform(3, tuple(offset))
        fixed_to_moving = sitk.TranslationTransform(3, tuple(-offset))
        return RegistrationResult(fixed_to_moving, moving_to_fixed, self.name, {"offset_mm": float(np.linalg.norm(offset))})


def mean_template(cts, label_maps, *, registration, registration_options, calls_file="", **_context):
    """Test-only template builder: voxel-wise mean CT of the subset resampled (no
    registration) onto the first case's grid, and the first case's labels."""
    _count(calls_file, f"template {len(cts)}")
    reference = cts[0]
    total = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.float64)
    for ct in cts:
        total += sitk.GetArrayFromImage(sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1024.0))
    mean = sitk.GetImageFromArray((total / len(cts)).astype(np.float32))
    mean.CopyInformation(reference)
    return {"ct": mean, "labels": label_maps[0], "info": {"n": len(cts), "registration": registration}}
